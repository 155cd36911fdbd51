"""The outbox: messages on their way into the per-peer streams, and those held for full peers.

How it works (sans-IO, part of :class:`~glue.stack.Stack`; ``docs/transport.md``, "Slow and
stuck peers")
------------------------------------------------------------------------------------------------
A message (:class:`Outgoing`) is *placed*: queued in the send stream of each of its targets (a
publish is numbered and enveloped by the topics layer first, which names its subscribers). A
target whose send queue is full *holds* it: the message joins that peer's held queue, in order,
and every later message for that peer joins it too, while the message still goes to every other
target. One slow or stuck peer never holds up the others.

When the peer's queue has room again (acks freed it: ``SendSpaceFreed``), its held messages are
offered again, oldest first. When it is removed, they go to its parked stream if it was only
silent, or are released if it left. A message is done when no target holds it any more; the
bytes of done messages are reported (:meth:`Outbox.take_placed_bytes`) so that a runtime bounding
what waits can admit more.

With ``drop_slow`` (``GLUE_SLOW_PEER=drop``), a full peer's backlog (everything it has not
acknowledged) is dropped instead and the message queued in its place; its receiver skips past
the dropped frames (a gap in each publisher's sequence numbers).

Both runtimes and the simulator place every message through :meth:`Outbox.place` (via
``Stack.submit``), or a run of publications on one topic through :meth:`Outbox.place_many` (via
``Stack.submit_many``: what the runtimes' callers queue while frames are in flight), so the
seeded simulations run the code that carries real traffic.
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, cast

from glue.topics import Outbound
from glue.wire import EndpointId

if TYPE_CHECKING:
    from glue.stack import Stack

__all__ = ["Outbox", "Outgoing", "Publications"]

logger = logging.getLogger(__name__)

#: Slow peers warned about (once each), at most.
_MAX_WARNED = 1024


class Outgoing:
    """One message to send: a direct one (``payload`` enveloped, ``targets`` ids or None for
    every recipient) or a publication not yet numbered (``topic`` set, ``payload`` the caller's)."""

    __slots__ = ("expires_at", "payload", "remaining", "size", "targets", "topic")

    def __init__(
        self,
        payload: Outbound,
        targets: Sequence[EndpointId] | None,
        expires_at: float,
        topic: tuple[str, str, int | None, bool] | None = None,
    ):
        self.payload = payload
        # As counted in a runtime's hand-off queue (outbound_size, inline: made per message).
        if isinstance(payload, bytes):
            self.size = len(payload)
        else:
            self.size = len(payload[0]) + len(payload[1])
        self.targets = targets  # None: every recipient when it is placed
        self.remaining: list[EndpointId] | None = None  # the targets that hold it
        self.expires_at = expires_at
        # (name, type, history depth) of a publish not yet numbered by the topics layer
        self.topic = topic


class Publications:
    """Publications on one topic, in order, handed over together and not yet numbered: what
    a runtime's callers queue while frames are in flight (consecutive ``publish`` calls on one
    topic add to the last run) and what ``publish_many`` makes. Placed at once
    (:meth:`Outbox.place_many`): Python pays per call and per object, so a run costs the
    per-topic work once and one list entry per message, not an :class:`Outgoing` each.

    ``topic`` is (name, type, history depth, retain), as :attr:`Outgoing.topic`; ``size`` the
    bytes of the payloads, as the runtime counts them in its hand-off queue."""

    __slots__ = ("expiries", "payloads", "size", "topic")

    def __init__(
        self,
        topic: tuple[str, str, int | None, bool],
        payloads: list[bytes],
        expiries: list[float],
        size: int,
    ) -> None:
        self.topic = topic
        self.payloads = payloads
        self.expiries = expiries  # expires_at of each (the runtime's clock)
        self.size = size


class Outbox:
    """Placement of messages into the streams of one stack, and the queues of full peers."""

    def __init__(self, stack: Stack, *, drop_slow: bool) -> None:
        self._stack = stack
        self.drop_slow = drop_slow
        self.counters: Counter[str] = stack.counters  # the stack's own (unprefixed)
        #: Per peer whose send queue is full: the messages it holds, in order (read-only outside).
        self.held: dict[EndpointId, deque[Outgoing]] = {}
        self._placed_bytes = 0
        self._warned: set[EndpointId] = set()

    @property
    def holding(self) -> bool:
        """Whether messages are held for any peer."""
        return bool(self.held)

    def held_peers(self) -> tuple[EndpointId, ...]:
        """The peers messages are held for (their send queues are full)."""
        return tuple(self.held)

    def take_placed_bytes(self) -> int:
        """Bytes (``Outgoing.size``) of held messages placed for every target since last asked."""
        placed, self._placed_bytes = self._placed_bytes, 0
        return placed

    def clear(self) -> int:
        """Forget every held message (the runtime stops); returns how many there were."""
        held = {id(item) for items in self.held.values() for item in items}
        self.held.clear()
        return len(held)

    def place(self, item: Outgoing, now: float, everyone: Sequence[EndpointId]) -> bool:
        """Queue ``item`` to every target with room (``everyone`` when it names none); True
        when no target holds it. A target without room, or with messages held before this one,
        holds it, in order."""
        stack = self._stack
        if item.expires_at <= now:
            self.counters["messages_expired_before_sending"] += 1
            return True
        if item.topic is not None:
            topic, topic_type, depth, retain = item.topic
            item.topic = None
            item.payload, item.targets = stack.publish(
                topic,
                topic_type,
                cast(bytes, item.payload),  # the caller's payload, not yet enveloped
                expires_at=item.expires_at,
                now=now,
                history_depth=depth,
                retain=retain,
            )
        return self._place(item, everyone if item.targets is None else item.targets, now)

    def place_many(self, run: Publications, now: float) -> int:
        """:meth:`place` of each publication of ``run``, in order; returns the bytes (as
        ``size`` counts them) of those no target holds (the others are reported by
        :meth:`take_placed_bytes` once their targets took them).

        The usual case costs per message one envelope and one entry in each target's bundle:
        every target without held messages takes the whole run if its queue has room for all of
        it; the others (and runs of large messages) are placed message by message, as
        :meth:`place` does, so that what one full peer holds goes on to everyone else."""
        stack = self._stack
        payloads, expiries = run.payloads, run.expiries
        if len(payloads) == 1:  # (less work so)
            item = Outgoing(payloads[0], (), expiries[0], run.topic)
            return run.size if self.place(item, now, ()) else 0
        topic, topic_type, depth, retain = run.topic
        placed = run.size
        if min(expiries) <= now:  # expired while queued: counted, never numbered
            alive = [index for index, expires_at in enumerate(expiries) if expires_at > now]
            self.counters["messages_expired_before_sending"] += len(expiries) - len(alive)
            if not alive:
                return placed
            payloads = [payloads[index] for index in alive]
            expiries = [expiries[index] for index in alive]
        envelopes, targets = stack.publish_many(
            topic,
            topic_type,
            payloads,
            expiries,
            now=now,
            history_depth=depth,
            retain=retain,
        )
        held = self.held
        rest: list[EndpointId]
        size = stack.bundled_size(envelopes)
        if size is not None:
            small = cast(list[bytes], envelopes)
            offer_many = stack.offer_many
            rest = [
                peer
                for peer in targets
                if peer in held or not offer_many(peer, small, expiries, size, now)
            ]
        else:
            rest = list(targets)
        if rest:
            for payload, envelope, expires_at in zip(payloads, envelopes, expiries, strict=True):
                item = Outgoing(envelope, rest, expires_at)
                item.size = len(payload)  # (as the runtime counted it)
                if not self._place(item, rest, now):
                    placed -= item.size
        return placed

    def _place(self, item: Outgoing, targets: Sequence[EndpointId], now: float) -> bool:
        """Offer ``item`` (numbered and enveloped) to ``targets``; hold it for those without
        room, or with messages held before it. True when none holds it."""
        stack = self._stack
        offer = stack.offer
        payload, expires_at = item.payload, item.expires_at
        held = self.held
        owed: list[EndpointId] | None = None
        for peer in targets:
            waiting = held.get(peer)
            if waiting is None:
                if offer(peer, payload, expires_at, now) or self._offer_after_drop(
                    peer, payload, expires_at, now
                ):
                    continue
                waiting = held[peer] = deque()
                logger.debug("send queue to %s full: holding its messages", self.label(peer))
            waiting.append(item)
            if owed is None:
                owed = []
            owed.append(peer)
        item.remaining = owed
        return owed is None

    def retry(self, peer: EndpointId, now: float, *, gone: bool) -> None:
        """Offer ``peer``'s held messages again, in order, as far as room allows; release them
        all if it is ``gone`` (it left: nobody to send them to)."""
        waiting = self.held.get(peer)
        if waiting is None:
            return
        offer = self._stack.offer
        while waiting:
            item = waiting[0]
            if not gone and item.expires_at > now:
                payload, expires_at = item.payload, item.expires_at
                if not offer(peer, payload, expires_at, now) and not self._offer_after_drop(
                    peer, payload, expires_at, now
                ):
                    return
            elif gone:
                self.counters["messages_not_sent_peer_gone"] += 1
            else:
                self.counters["messages_expired_before_sending"] += 1
            waiting.popleft()
            owed = item.remaining
            if owed is not None:
                owed.remove(peer)
                if not owed:
                    item.remaining = None
                    self._placed_bytes += item.size
        del self.held[peer]

    def label(self, peer: EndpointId) -> str:
        """``name (id)`` of a peer, for messages to people."""
        known = self._stack.discovery.peer(peer)
        return f"{known.name} ({peer})" if known is not None else str(peer)

    def _offer_after_drop(
        self, peer: EndpointId, payload: Outbound, expires_at: float, now: float
    ) -> bool:
        """A message ``peer`` had no room for: with ``drop_slow``, drop its backlog and offer the
        message again; whether it was queued."""
        return (
            self.drop_slow
            and self._drop_backlog(peer, now)
            and self._stack.offer(peer, payload, expires_at, now)
        )

    def _drop_backlog(self, peer: EndpointId, now: float) -> bool:
        """``drop_slow``: drop what ``peer`` has not acknowledged (its subscriber skips past it:
        a gap in each publisher's sequence); whether anything was dropped."""
        dropped = self._stack.drop_backlog(peer, now)
        if dropped:
            self.counters["messages_dropped_slow_peer"] += dropped
            if peer not in self._warned and len(self._warned) < _MAX_WARNED:
                self._warned.add(peer)
                logger.warning(
                    "%s cannot keep up: dropped %d messages queued for it (GLUE_SLOW_PEER=drop)",
                    self.label(peer),
                    dropped,
                )
        return dropped > 0
