"""The protocol layers wired together, still sans-IO: datagrams in, datagrams out.

``Stack`` is what both runtimes drive: :mod:`glue.endpoint` with real sockets and the asyncio clock,
:mod:`glue.sim` with a virtual network and clock. It decodes each datagram once, routes discovery
frames to :class:`~glue.discovery.Discovery` and transport frames to
:class:`~glue.transport.Transport`, applies discovery's peer events to the transport (a departed
peer's streams go at once), rebuilds messages from the transport's in-order frames with the
:class:`~glue.fragmentation.Reassembler`, and packs every destination's outgoing frames into as
few datagrams as the path allows.
"""

from __future__ import annotations

import logging
import random
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Final, cast

from glue import wire
from glue.discovery import Address, Discovery, DiscoveryConfig, Target
from glue.errors import DecodeError, UsageError
from glue.events import Peer, PeerAdded, PeerRemoved, StackEvent
from glue.fragmentation import Reassembler, split_views
from glue.outbox import Outbox, Outgoing, Publications
from glue.requests import Requests
from glue.topics import (
    MAX_ENVELOPE_BYTES,
    Outbound,
    Topics,
    TopicsConfig,
    any_matches,
    outbound_size,
)
from glue.transport import (
    FrameReceived,
    FramesSkipped,
    SendSpaceFreed,
    StreamsDropped,
    Transport,
    TransportConfig,
)
from glue.wire import Ack, Data, EndpointId, Skip

__all__ = [
    "DISCOVERY_DATAGRAM_BYTES",
    "FRAME_OVERHEAD_BYTES",
    "LIVENESS_SIGNALS",
    "PARKED_HOLD_S",
    "Stack",
    "StackConfig",
    "StackOutput",
]

logger = logging.getLogger(__name__)

#: Announcements are packed into datagrams that fit a 1500-byte Ethernet MTU, so a rendezvous
#: answer never relies on IP fragmentation (one lost fragment would lose all of it).
DISCOVERY_DATAGRAM_BYTES: Final = 1400
#: Room kept in each datagram for the header and one frame's JSON around a fragment's payload.
FRAME_OVERHEAD_BYTES: Final = 256
#: Messages up to this size sent to one peer in one burst travel as one bundle frame.
BUNDLE_MAX_MESSAGE_BYTES: Final = 1024
#: JSON of one message's entry in a bundle's "m" list, at most ("[65507,86400000],").
_BUNDLE_ENTRY_BYTES: Final = 18
#: Room for one more fragment frame's JSON in a datagram (its longest form, the comma included,
#: is 85 bytes), on top of FRAME_OVERHEAD_BYTES.
_FRAGMENT_JSON_BYTES: Final = 96
#: A first fragment smaller than this (or than a quarter of a datagram) starts a datagram of its
#: own instead of filling a tail's: a frame more is not worth a few bytes.
_MIN_CHAINED_FRAGMENT: Final = 1024
#: The least payload a first fragment carries beside the message's envelope.
_MIN_FIRST_FRAGMENT: Final = 64

#: While frames are unacknowledged, the retransmission timeout never exceeds a peer's discovery
#: timeout (rate x multiplier) divided by this: a sender waiting for acks under heavy loss still
#: sends (and so hears acks) several times per timeout, so neither side takes the other for gone
#: on the strength of a few lost announcements.
LIVENESS_SIGNALS: Final = 4
#: A peer taken for gone (silent, not said goodbye) keeps its streams at least this long, and
#: publications matching its interest queue for it meanwhile (then as long as they live): a
#: process frozen for a few seconds (SIGSTOP, a VM pause, a long GC) comes back to everything.
PARKED_HOLD_S: Final = 30.0
#: At most this many peers' undelivered messages are remembered for ``take_delivery_failures``.
_MAX_FAILURES: Final = 1024

StackOutput = StackEvent | SendSpaceFreed


@dataclass(frozen=True, slots=True)
class StackConfig:
    """Identity, timings and bounds of one endpoint's layers."""

    network_id: int
    discovery: DiscoveryConfig
    transport: TransportConfig = field(default_factory=TransportConfig)
    topics: TopicsConfig = field(default_factory=TopicsConfig)
    #: Largest datagram to peers on other hosts (the path MTU less 28 bytes of IP and UDP).
    datagram_bytes: int = 1472
    #: Largest datagram to peers on 127.0.0.0/8.
    loopback_datagram_bytes: int = wire.MAX_DATAGRAM_BYTES
    #: The largest datagram toward a peer's host, from the MTU of the interface that reaches it
    #: (the runtime asks the kernel's routes); None, or a None answer: ``datagram_bytes``.
    path_datagram_bytes: Callable[[str], int | None] | None = None
    max_message_bytes: int = 16 * 1024 * 1024
    max_reassembly_bytes: int = 64 * 1024 * 1024
    #: A peer whose send queue is full loses its backlog (``GLUE_SLOW_PEER=drop``) instead of
    #: holding its messages (see :mod:`glue.outbox`).
    drop_slow_peer: bool = False


class _Route:
    __slots__ = ("address", "counters", "datagram_bytes", "header", "peer", "proven")

    def __init__(
        self, peer: Peer, header: wire.Header, datagram_bytes: int, counters: Counter[str]
    ) -> None:
        self.peer = peer
        self.counters = counters
        self.address = peer.address
        self.header = header
        self.datagram_bytes = datagram_bytes
        self.proven = False  # told to discovery once, at its first ack


class _Bundle:
    """Small messages waiting for one peer, in order: bundled at the next flush."""

    __slots__ = ("expiries", "payloads", "size")

    def __init__(self) -> None:
        self.payloads: list[bytes] = []
        self.expiries: list[float] = []
        self.size = 0


class Stack:
    """Discovery, transport and fragmentation of one endpoint."""

    def __init__(self, config: StackConfig, *, rng: random.Random, now: float) -> None:
        self.config = config
        self.counters: Counter[str] = Counter()
        identity = config.discovery
        self.endpoint_id = identity.endpoint_id
        self.incarnation = identity.incarnation
        self.discovery = Discovery(identity, rng=rng, now=now)
        liveness_rto_s = identity.rate_s * identity.multiplier / LIVENESS_SIGNALS
        transport_config = config.transport
        if transport_config.max_rto_s > liveness_rto_s:
            transport_config = replace(
                transport_config,
                max_rto_s=liveness_rto_s,
                initial_rto_s=min(transport_config.initial_rto_s, liveness_rto_s),
                min_rto_s=min(transport_config.min_rto_s, liveness_rto_s),
            )
        self.reassembler = Reassembler(
            max_message_bytes=config.max_message_bytes + MAX_ENVELOPE_BYTES,
            max_total_bytes=config.max_reassembly_bytes,
        )
        # A fragment is acknowledged only if reassembly has room for it (else it is resent).
        self.transport = Transport(transport_config, admit=self.reassembler.admit)
        self._header = wire.Header(config.network_id, self.endpoint_id, self.incarnation)
        self._routes: dict[EndpointId, _Route] = {}
        self._events: deque[StackOutput] = deque()
        self._control_events = False  # whether _events holds anything but messages
        self.topics = Topics(
            config.topics,
            endpoint_id=self.endpoint_id,
            name=identity.name,
            incarnation=self.incarnation,
            emit=self._events.append,
        )
        self.requests = Requests(emit=self._events.append, wall_offset=self._wall_offset)
        self.topics.requests = self.requests
        self.topics.room = self._has_room  # (history replays, answers to ask)
        self.topics.set_job_room(self.transport.can_send)  # (work-queue jobs: room_freed)
        # Small messages waiting to be bundled, per peer, until the next datagrams_to_send.
        self._bundles: dict[EndpointId, _Bundle] = {}
        # Per peer, the size of the last fragment queued in this burst when a fragmented
        # message was the last thing queued (the next one's first fragment can share its datagram).
        self._tails: dict[EndpointId, int] = {}
        # Peers taken for gone (their streams are parked in the transport): the peer, when it
        # was removed and its route; and, for those that subscribed to something, the patterns:
        # publications matching them still queue for it, for its return (a stalled process must
        # lose nothing).
        self._parked: dict[EndpointId, tuple[Peer, float, _Route]] = {}
        self._parked_interest: dict[EndpointId, tuple[str, ...]] = {}
        # Parked peers back in the same incarnation whose interest the topics layer has not heard
        # again yet: publications meanwhile still go to them, by the interest they had.
        self._returning: dict[EndpointId, tuple[str, ...]] = {}
        # Acks sent on leaving, before the goodbyes.
        self._farewell: list[tuple[wire.OutDatagram, Address]] = []
        # Sources already warned about sending transport frames in another peer's name.
        self._warned_addresses: set[Address] = set()
        # Peers gone for good with messages not acknowledged: (peer, messages), per peer id.
        self._failures: dict[EndpointId, tuple[Peer, int]] = {}
        self.outbox = Outbox(self, drop_slow=config.drop_slow_peer)

    # --- inputs ---------------------------------------------------------------------------------

    def receive_datagram(
        self, data: bytes | bytearray, source: Address, *, multicast: bool, now: float
    ) -> None:
        """Decode one datagram and feed its frames to the layers; bad ones are counted, dropped.

        ``data`` may be a reused receive buffer (see :func:`glue.wire.decode`).
        """
        try:
            datagram = wire.decode(data, network_id=self.config.network_id)
        except DecodeError as exc:
            self.counters[f"dropped_{exc.reason}"] += 1
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug("dropped %d bytes from %s:%d: %s", len(data), *source, exc)
            return
        header = datagram.header
        incarnation = self.incarnation
        if header.source_id == self.endpoint_id and header.incarnation == incarnation:
            self.counters["own_datagrams_ignored"] += 1  # our own multicast, looped back
            return
        transport = self.transport
        touched = False
        route = self._routes.get(header.source_id)
        for frame in datagram.frames:
            kind = type(frame)
            if kind is Data or kind is Ack or kind is Skip:
                if header.destination != incarnation:
                    self.counters["dropped_other_incarnation"] += 1
                    continue
                if route is not None and route.address != source:
                    # Transport frames only from the address the peer is known at: a datagram
                    # from elsewhere in its name (forged, without a key) cannot move its streams.
                    self._wrong_address(header.source_id, route, source)
                    continue
                transport.receive(frame, header.source_id, header.incarnation, now=now)  # type: ignore[arg-type]
                touched = True
                if kind is Ack and route is not None and not route.proven:
                    # It answered what we sent to its address: reachable there (see Discovery).
                    route.proven = True
                    self.discovery.prove(header.source_id, header.incarnation)
            else:
                self.discovery.receive(frame, header, source, multicast=multicast, now=now)  # type: ignore[arg-type]
                self._pump_discovery(now)
                if kind is wire.Announce and frame.interest and not frame.forwarded:  # type: ignore[union-attr]
                    self.topics.announced(frame.endpoint_id, frame.interest)  # type: ignore[union-attr]
        if touched:
            self.discovery.touch(header.source_id, header.incarnation, now=now)
            if route is not None:
                route.counters["datagrams_received"] += 1
                route.counters["bytes_received"] += len(data)
        self._pump_transport(now)

    def send(self, peer: EndpointId, message: Outbound, *, expires_at: float, now: float) -> bool:
        """Queue ``message`` to ``peer``, fragmented as its path needs; False if it is unknown.

        Raises:
            UsageError: the message is larger than ``max_message_bytes``.
        """
        head = b""
        if isinstance(message, bytes):
            payload = message
        else:
            head, payload = message
        size = len(head) + len(payload)
        if size > self.config.max_message_bytes + MAX_ENVELOPE_BYTES:
            raise UsageError(
                f"a message of {size - MAX_ENVELOPE_BYTES}+ bytes exceeds the maximum of "
                f"{self.config.max_message_bytes} (GLUE_MAX_MESSAGE_BYTES)"
            )
        route = self._routes.get(peer) or self._parked_route(peer)
        if route is None:
            return False
        if size <= BUNDLE_MAX_MESSAGE_BYTES:
            if head:
                payload = head + payload  # small: one copy is cheaper than a piece more
            # Small messages of one burst share a frame: one sequence number, one ack entry, one
            # frame object for many messages (Python pays per object, not per byte).
            bundle = self._bundles.get(peer)
            if bundle is None:
                bundle = self._bundles[peer] = _Bundle()
            bundle.payloads.append(payload)
            bundle.expiries.append(expires_at)
            bundle.size += size
            return True
        if peer in self._bundles:
            self._flush_bundle(peer, now)  # what was sent before goes first
        budget = route.datagram_bytes - FRAME_OVERHEAD_BYTES
        tail = self._tails.pop(peer, 0)
        if size <= budget:
            self.transport.send(peer, payload, expires_at=expires_at, now=now, prefix=head)
            return True
        # The first fragment fills what the previous large message's last fragment left of its
        # datagram (they are packed together), so a stream of messages just over one datagram
        # (64 KiB on loopback) takes about one datagram each, not two.
        room = budget - tail - _FRAGMENT_JSON_BYTES if tail else budget
        if room - len(head) < min(_MIN_CHAINED_FRAGMENT, budget // 4):
            room = budget
        if room - len(head) < _MIN_FIRST_FRAGMENT:
            # An envelope that nearly fills a small datagram (a long topic name, a datagram size
            # near its 576-byte minimum) is joined to the payload instead: one copy.
            payload, head = head + payload, b""
        # Views, not copies: the kernel gathers each datagram from the envelope and the
        # fragments' views of the caller's payload (the first fragment is shorter by the envelope).
        first = room - len(head)
        view = memoryview(payload)
        fragments = [view[:first], *split_views(view[first:], budget)]
        parts = len(fragments)
        send = self.transport.send
        send(peer, fragments[0], expires_at=expires_at, now=now, part=0, parts=parts, prefix=head)
        for part in range(1, parts):
            send(peer, fragments[part], expires_at=expires_at, now=now, part=part, parts=parts)
        self._tails[peer] = len(fragments[-1])
        return True

    def idle(self) -> bool:
        """Whether no message is held for a full peer or waiting to be bundled, and no frame is
        queued or unacknowledged towards any peer (parked ones too)."""
        return not self.outbox.holding and not self._bundles and self.transport.idle()

    def submit(
        self, item: Outgoing, now: float, everyone: Sequence[EndpointId] | None = None
    ) -> bool:
        """Place a message in the streams of its targets, or hold it for those whose send queue
        is full (see :mod:`glue.outbox`); True once no target holds it. ``everyone`` (what
        :meth:`recipients` returns, passed when placing many) is the targets of a message that
        names none.

        Raises:
            UsageError: the message is larger than ``max_message_bytes``.
        """
        return self.outbox.place(item, now, self.recipients() if everyone is None else everyone)

    def submit_many(self, run: Publications, now: float) -> int:
        """Place a run of publications (see :class:`~glue.outbox.Publications`), in order, as
        as many :meth:`submit` calls would; returns the bytes (``size``) of those no target
        holds."""
        return self.outbox.place_many(run, now)

    def expiry_due(self, now: float) -> bool:
        """Whether discovery may take a peer for gone at ``now`` (cheap; a lower bound).

        The runtime reads what waits in its sockets first: a peer's datagram queued there is proof
        of life that must count before a silent-peer decision.
        """
        return self.discovery.expiry_due(now)

    def take_delivery_failures(self) -> list[tuple[Peer, int]]:
        """Peers gone for good with messages not acknowledged, and how many; forgotten once taken.

        Gone for good: it left (goodbye), came back as a new incarnation, or went silent and did
        not come back before the messages expired (or parked memory ran out).
        """
        failures = list(self._failures.values())
        self._failures.clear()
        return failures

    def silent_peers(self, now: float) -> list[tuple[Peer, int, float]]:
        """Peers taken for gone at least one discovery timeout ago whose messages are still held
        for their return: (peer, messages not acknowledged, seconds since removed)."""
        if not self._parked:
            return []
        held = self.transport.parked()
        silent = []
        for peer_id, (peer, removed_at, _) in self._parked.items():
            if now >= removed_at + self._timeout_s(peer) and held.get(peer_id):
                silent.append((peer, held[peer_id], now - removed_at))
        return silent

    def offer(self, peer: EndpointId, message: Outbound, expires_at: float, now: float) -> bool:
        """Queue ``message`` to ``peer`` if its send queue has room; True if queued or unknown.

        An unknown peer (departed) counts as done: there is nobody to wait for.

        Raises:
            UsageError: the message is larger than ``max_message_bytes``.
        """
        if type(message) is bytes and len(message) <= BUNDLE_MAX_MESSAGE_BYTES:
            # The hot path of small messages, inline (what can_send and send do for them):
            # Python pays per call, and a 64-byte message costs only a few.
            size = len(message)
            bundle = self._bundles.get(peer)
            if not self.transport.can_send(peer, size if bundle is None else size + bundle.size):
                return False
            if peer not in self._routes and peer not in self._parked:
                return True
            if bundle is None:
                bundle = self._bundles[peer] = _Bundle()
            bundle.payloads.append(message)
            bundle.expiries.append(expires_at)
            bundle.size += size
            return True
        if not self.can_send(peer, outbound_size(message)):
            return False
        self.send(peer, message, expires_at=expires_at, now=now)
        return True

    def bundled_size(self, messages: Sequence[Outbound]) -> int | None:
        """The bytes of ``messages`` if each is small enough to share a bundle frame (what
        :meth:`offer_many` takes), else None."""
        if set(map(type, messages)) == {bytes} and (
            max(map(len, messages)) <= BUNDLE_MAX_MESSAGE_BYTES
        ):
            return sum(map(len, cast(Sequence[bytes], messages)))
        return None

    def offer_many(
        self,
        peer: EndpointId,
        messages: list[bytes],
        expiries: list[float],
        size: int,
        now: float,
    ) -> bool:
        """:meth:`offer` of each of ``messages`` (small: bytes of at most
        ``BUNDLE_MAX_MESSAGE_BYTES``, ``size`` bytes in all), all or none: True if all were
        queued (or the peer is unknown), False if its send queue has no room for all of them
        (then nothing was queued, and nothing asked to be told when room frees)."""
        if not self._has_room(peer, size):
            return False
        if peer not in self._routes and peer not in self._parked:
            return True
        bundle = self._bundles.get(peer)
        if bundle is None:
            bundle = self._bundles[peer] = _Bundle()
        bundle.payloads.extend(messages)
        bundle.expiries.extend(expiries)
        bundle.size += size
        return True

    def publish(
        self,
        topic: str,
        topic_type: str,
        payload: bytes,
        *,
        expires_at: float,
        now: float,
        history_depth: int | None = None,
        retain: bool = False,
    ) -> tuple[Outbound, tuple[EndpointId, ...]]:
        """Number, keep and locally deliver a topic message; returns what to send, and to whom.

        The caller offers the envelope to each target (:meth:`offer`), as for any message.
        """
        message, targets = self.topics.publish(
            topic,
            topic_type,
            payload,
            expires_at=expires_at,
            now=now,
            history_depth=history_depth,
            retain=retain,
        )
        if self._parked_interest or self._returning:
            targets = self._with_parked(topic, targets)
        return message, targets

    def publish_many(
        self,
        topic: str,
        topic_type: str,
        payloads: Sequence[bytes],
        expiries: Sequence[float],
        *,
        now: float,
        history_depth: int | None = None,
        retain: bool = False,
    ) -> tuple[list[Outbound], tuple[EndpointId, ...]]:
        """:meth:`publish` of each of ``payloads`` (expiring at ``expiries``), in order, at
        once (``Topics.publish_many``); the envelopes, and to whom they go."""
        messages, targets = self.topics.publish_many(
            topic,
            topic_type,
            payloads,
            expiries,
            now=now,
            history_depth=history_depth,
            retain=retain,
        )
        if self._parked_interest or self._returning:
            targets = self._with_parked(topic, targets)
        return messages, targets

    def _with_parked(self, topic: str, targets: tuple[EndpointId, ...]) -> tuple[EndpointId, ...]:
        """``targets`` and the silent peers (parked) whose interest matched ``topic``."""
        extra = [p for p in self._parked_subscribers(topic) if p not in targets]
        return (*targets, *extra) if extra else targets

    def _parked_subscribers(self, topic: str) -> list[EndpointId]:
        """Silent peers (parked) whose interest matched ``topic`` when they went silent."""
        found = []
        parked = self.transport.is_parked
        for peer, patterns in list(self._parked_interest.items()):
            if not parked(peer):  # its parked streams were dropped: forget it
                self._forget_parked(peer)
            elif any_matches(patterns, topic):
                found.append(peer)
        for peer, patterns in list(self._returning.items()):
            if self.topics.peer_patterns(peer):  # its interest is known again
                del self._returning[peer]
            elif any_matches(patterns, topic):
                found.append(peer)
        return found

    def _forget_parked(self, peer: EndpointId) -> None:
        self._parked.pop(peer, None)
        self._parked_interest.pop(peer, None)

    def _parked_route(self, peer: EndpointId) -> _Route | None:
        parked = self._parked.get(peer)
        return parked[2] if parked is not None else None

    def subscribe(
        self, pattern: str, topic_type: str, *, gaps: bool = False, group: str | None = None
    ) -> int:
        """Add a local subscription (its id), a member of ``group`` if given; peers learn it at
        the next flush.

        Raises:
            UsageError: the pattern, type or group is not valid.
        """
        return self.topics.subscribe(pattern, topic_type, gaps=gaps, group=group)

    def unsubscribe(self, subscription: int) -> None:
        """Remove a local subscription; peers learn it at the next flush."""
        self.topics.unsubscribe(subscription)

    def drop_backlog(self, peer: EndpointId, now: float) -> int:
        """Drop the messages to ``peer`` not yet acknowledged, queued or in flight (a slow peer's
        backlog, see ``GLUE_SLOW_PEER``); its receiver is told to skip past them. Returns how
        many."""
        if peer in self._bundles:
            self._flush_bundle(peer, now)
        self._tails.pop(peer, None)
        return self.transport.drop_backlog(peer)

    def can_send(self, peer: EndpointId, size: int) -> bool:
        """Whether ``size`` bytes fit in the send queue to ``peer`` now."""
        bundle = self._bundles.get(peer)
        return self.transport.can_send(peer, size if bundle is None else size + bundle.size)

    def set_targets(self, targets: Sequence[Target]) -> None:
        """Replace the discovery targets (resolved addresses)."""
        self.discovery.set_targets(targets)

    def handle_timer(self, *, now: float) -> None:
        """Run every layer's timers."""
        self.discovery.handle_timer(now=now)
        self._pump_discovery(now)
        self.transport.handle_timer(now=now)
        self.reassembler.handle_timer(now=now)
        self.topics.prune_history(now)
        self._pump_transport(now)

    def leave(self) -> None:
        """Acknowledge what arrived, then say goodbye; every peer's state is dropped."""
        for peer, ack in self.transport.final_acks():
            route = self._routes.get(peer)
            if route is not None:
                for datagram in wire.pack(route.header, [ack], max_bytes=route.datagram_bytes):
                    self._farewell.append((datagram, route.address))
        self.discovery.leave()
        self._bundles.clear()
        self._tails.clear()
        for peer in list(self._routes):
            self.transport.remove_peer(peer)
        self._routes.clear()
        self._parked.clear()

    # --- outputs --------------------------------------------------------------------------------

    def datagrams_to_send(
        self, *, now: float, gather: bool = False
    ) -> list[tuple[wire.OutDatagram, Address]]:
        """Every datagram to send now, packed per destination.

        With ``gather``, a datagram carrying a large payload comes as its pieces (see
        :func:`glue.wire.pack`), for ``socket.sendmsg``: its payload is never copied in Python.
        """
        out: list[tuple[wire.OutDatagram, Address]] = []
        if self._farewell:  # the last acks go before the goodbyes
            out.extend(self._farewell)
            self._farewell.clear()
        topics = self.topics
        if topics.has_sends():
            horizon = now + wire.MAX_TTL_MS / 1000.0
            send = self.send
            for peer, envelope, expires_at in topics.take_sends():
                send(peer, envelope, expires_at=min(expires_at, horizon), now=now)
            self.discovery.interest_version = topics.version
        for peer, reply, expires_at in self.requests.take_sends():
            # "Not served here", made for any request: only while the requester's send queue
            # has room, so that one that never acknowledges cannot make them pile up.
            if self._has_room(peer, outbound_size(reply)):
                self.send(peer, reply, expires_at=expires_at, now=now)
            else:
                self.counters["requests_answers_not_sent_queue_full"] += 1
        announcements = self.discovery.frames_to_send()
        if announcements:
            by_destination: dict[Address, list[wire.Frame]] = {}
            for frame, destination in announcements:
                by_destination.setdefault(destination, []).append(frame)
            for destination, frames in by_destination.items():
                datagrams = wire.pack(self._header, frames, max_bytes=DISCOVERY_DATAGRAM_BYTES)
                out.extend((datagram, destination) for datagram in datagrams)
        if self._bundles:
            for peer in list(self._bundles):
                self._flush_bundle(peer, now)
        if self._tails:
            self._tails.clear()  # the next burst's frames start new datagrams
        if self.transport.has_output():
            for peer, transport_frames in self.transport.frames_to_send(now=now):
                self._pack_transport(peer, transport_frames, gather, out)
        return out

    def due_acks(self, *, now: float) -> list[tuple[wire.OutDatagram, Address]]:
        """The datagrams of the acks due by ``now`` (``Transport.ack_due``), and nothing else:
        a runtime reading a long burst sends them between datagrams."""
        out: list[tuple[wire.OutDatagram, Address]] = []
        for peer, ack in self.transport.take_due_acks(now=now):
            self._pack_transport(peer, [ack], False, out)
        return out

    def _pack_transport(
        self,
        peer: EndpointId,
        frames: list[Data | Ack | Skip],
        gather: bool,
        out: list[tuple[wire.OutDatagram, Address]],
    ) -> None:
        route = self._routes.get(peer)
        if route is None:
            return
        datagrams = wire.pack(route.header, frames, max_bytes=route.datagram_bytes, gather=gather)
        route.counters["datagrams_sent"] += len(datagrams)
        route.counters["bytes_sent"] += sum(map(_length, datagrams))
        out.extend((datagram, route.address) for datagram in datagrams)

    def next_event(self) -> StackOutput | None:
        """The oldest event not yet pulled, or ``None``."""
        return self._events.popleft() if self._events else None

    def has_events(self) -> bool:
        """Whether events wait to be pulled (cheap)."""
        return bool(self._events)

    def take_events(self) -> tuple[list[StackOutput], bool]:
        """Every event not yet pulled, and whether any is not a ``MessageReceived`` (bulk pull)."""
        events = list(self._events)
        self._events.clear()
        control, self._control_events = self._control_events, False
        return events, control

    def next_deadline(self) -> float | None:
        """The earliest time any layer wants ``handle_timer``."""
        deadlines = [
            d
            for d in (
                self.discovery.next_deadline(),
                self.transport.next_deadline(),
                self.reassembler.next_deadline(),
            )
            if d is not None
        ]
        return min(deadlines, default=None)

    def next_silent_at(self, now: float) -> float | None:
        """When the next parked peer will count as silent (see ``silent_peers``), if one will."""
        upcoming = [
            at
            for peer, removed_at, _ in self._parked.values()
            if (at := removed_at + self._timeout_s(peer)) > now
        ]
        return min(upcoming, default=None)

    # --- queries --------------------------------------------------------------------------------

    def peers(self) -> list[Peer]:
        """The peers known now, ordered by name."""
        return self.discovery.peers()

    def peer_ids(self) -> list[EndpointId]:
        """Ids of the peers data can be sent to now (cheap: no sorting)."""
        return list(self._routes)

    def recipients(self) -> list[EndpointId]:
        """Ids of the peers a message to everyone goes to: those known now, and those taken for
        gone lately whose streams are kept for their return (it is queued for them)."""
        if not self._parked:
            return list(self._routes)
        return [*self._routes, *(p for p in self._parked if p not in self._routes)]

    def peer_counters(self, peer: EndpointId) -> dict[str, int]:
        """Transport counters and data datagrams/bytes for one peer (empty if unknown)."""
        counters = self.transport.peer_counters(peer)
        return dict(sorted(counters.items())) if counters else {}

    def all_counters(self) -> dict[str, int]:
        """Every layer's counters, prefixed by layer."""
        merged = Counter(self.counters)
        for prefix, counters in (
            ("discovery", self.discovery.counters),
            ("transport", self.transport.total_counters()),
            ("fragmentation", self.reassembler.counters),
            ("topics", self.topics.fold_counters()),
            ("requests", self.requests.counters),
        ):
            merged.update({f"{prefix}_{key}": value for key, value in counters.items()})
        return dict(merged)

    # --- internals ------------------------------------------------------------------------------

    def _has_room(self, peer: EndpointId, size: int) -> bool:
        """Whether ``size`` more bytes fit in the send queue to ``peer``, counting the small
        messages waiting in its bundle (queued in the transport only at the next flush)."""
        bundle = self._bundles.get(peer)
        return self.transport.has_room(peer, size + (bundle.size if bundle is not None else 0))

    def _flush_bundle(self, peer: EndpointId, now: float) -> None:
        """Hand ``peer``'s waiting small messages to the transport, as few frames as fit."""
        bundle = self._bundles.pop(peer, None)
        route = self._routes.get(peer) or self._parked_route(peer)
        if bundle is None or route is None:
            return
        self._tails.pop(peer, None)  # a bundle frame now follows the last fragment
        payloads, expiries = bundle.payloads, bundle.expiries
        budget = route.datagram_bytes - FRAME_OVERHEAD_BYTES
        count = len(payloads)
        if bundle.size + count * _BUNDLE_ENTRY_BYTES <= budget and count <= wire.MAX_BUNDLE:
            self._send_bundle(peer, payloads, expiries, now)  # the usual case: one frame
            return
        start, used = 0, 0
        for index, payload in enumerate(payloads):
            cost = len(payload) + _BUNDLE_ENTRY_BYTES
            if index > start and (used + cost > budget or index - start >= wire.MAX_BUNDLE):
                self._send_bundle(peer, payloads[start:index], expiries[start:index], now)
                start, used = index, 0
            used += cost
        self._send_bundle(peer, payloads[start:], expiries[start:], now)

    def _send_bundle(
        self, peer: EndpointId, payloads: list[bytes], expiries: list[float], now: float
    ) -> None:
        if len(payloads) == 1:
            self.transport.send(peer, payloads[0], expires_at=expiries[0], now=now)
            return
        self.transport.send(
            peer,
            b"".join(payloads),
            expires_at=max(expiries),
            now=now,
            bundle=(list(map(len, payloads)), expiries),
        )

    def _pump_discovery(self, now: float) -> None:
        while (event := self.discovery.next_event()) is not None:
            peer = event.peer
            peer_id = peer.endpoint_id
            if isinstance(event, PeerAdded):
                parked = self._parked.get(peer_id)
                if parked is not None:
                    patterns = self._parked_interest.get(peer_id)
                    self._forget_parked(peer_id)  # back (or a new incarnation): streams resume
                    if patterns and parked[0].incarnation == peer.incarnation:
                        self._returning[peer_id] = patterns
                self.transport.add_peer(peer_id, peer.incarnation)
                self._routes[peer_id] = self._route(peer)
                self.topics.peer_added(peer)
            else:
                self._remove(event, now)
            self._events.append(event)
            self._control_events = True

    def _remove(self, event: PeerRemoved, now: float) -> None:
        peer = event.peer
        peer_id = peer.endpoint_id
        self._flush_bundle(peer_id, now)  # its small messages are held (or counted) with the rest
        silent = event.reason == "expired"
        hold_until = now + PARKED_HOLD_S
        lost = self.transport.remove_peer(peer_id, park=silent, hold_until=hold_until)
        route = self._routes.get(peer_id)
        if silent and route is not None and self.transport.is_parked(peer_id):
            self._parked[peer_id] = (peer, now, route)
            # (One that went silent again before its interest was heard again keeps the old.)
            patterns = self.topics.peer_patterns(peer_id) or self._returning.get(peer_id)
            if patterns:
                self._parked_interest[peer_id] = tuple(patterns)
        elif lost and event.reason != "evicted":  # an evicted peer never proved reachable
            self._failed(peer, lost)
        if not silent:
            # A silent peer may come back in the same incarnation, its frames continuing where
            # they stopped: a partial message from it stays (bounded by the reassembler's limits).
            self.reassembler.discard(peer_id)
        self._routes.pop(peer_id, None)
        self._tails.pop(peer_id, None)
        self._returning.pop(peer_id, None)
        self.topics.peer_removed(peer)
        if not self.transport.is_parked(peer_id):  # (a parked one may still answer)
            self.requests.peer_removed(peer)
        if self.outbox.holding:  # held for it: to its parked stream, or released if it left
            self.outbox.retry(peer_id, now, gone=not self.transport.is_parked(peer_id))

    def _wrong_address(self, peer_id: EndpointId, route: _Route, source: Address) -> None:
        self.counters["dropped_wrong_address"] += 1
        if source in self._warned_addresses or len(self._warned_addresses) >= _MAX_FAILURES:
            logger.debug("transport frames in the name of %d from %s:%d dropped", peer_id, *source)
            return
        self._warned_addresses.add(source)
        logger.warning(
            "transport frames in the name of %s (%d) came from %s:%d, not from its address "
            "%s:%d: dropped (forged, or the peer is behind NAT; a network key authenticates)",
            route.peer.name,
            peer_id,
            *source,
            *route.address,
        )

    def _failed(self, peer: Peer, messages: int) -> None:
        known = self._failures.pop(peer.endpoint_id, None)
        if known is None and len(self._failures) >= _MAX_FAILURES:
            del self._failures[next(iter(self._failures))]
        self._failures[peer.endpoint_id] = (peer, messages + (known[1] if known else 0))
        logger.info(
            "%d messages to %s (%d) were not acknowledged", messages, peer.name, peer.endpoint_id
        )

    def _timeout_s(self, peer: Peer) -> float:
        return peer.rate_s * self.config.discovery.multiplier

    def _unbundle(self, event: FrameReceived, now: float) -> None:
        """Deliver each message of a bundle whose own time to live has not run out."""
        if self.reassembler.holds(event.peer):
            self.reassembler.discard(event.peer)  # cannot happen with a well-behaved sender
        route = self._routes.get(event.peer)
        if route is None:
            return
        source = route.peer
        payload = event.frame.payload
        if type(payload) is not bytes:  # only fragments arrive as views
            payload = bytes(payload)
        arrived = event.arrived_at
        alive: list[bytes] = []
        expiries: list[float] = []  # when each runs out (a history keeper keeps it until then)
        keep = alive.append
        keep_expiry = expiries.append
        offset = 0
        expired = 0
        for length, ttl_ms in event.frame.messages:
            end = offset + length
            expires_at = arrived + ttl_ms / 1000.0
            if ttl_ms and expires_at > now:
                keep(payload[offset:end])
                keep_expiry(expires_at)
            else:
                expired += 1
            offset = end
        if expired:
            self.counters["messages_expired_in_bundle"] += expired
            self.topics.skipped(source.endpoint_id, "expired")
        self.topics.receive_many(source, alive, now, expiries)

    def _route(self, peer: Peer) -> _Route:
        header = wire.Header(
            self.config.network_id,
            self.endpoint_id,
            self.incarnation,
            destination=peer.incarnation,
        )
        config = self.config
        size: int | None = None
        if peer.host.startswith("127."):
            size = config.loopback_datagram_bytes
        elif config.path_datagram_bytes is not None:
            size = config.path_datagram_bytes(peer.host)
        if size is None:
            size = config.datagram_bytes
        counters = self.transport.peer_counters(peer.endpoint_id)
        assert counters is not None  # added to the transport just before
        return _Route(peer, header, size, counters)

    def _pump_transport(self, now: float) -> None:
        transport = self.transport
        reassembler = self.reassembler
        routes = self._routes
        deliver = self.topics.receive
        deliver_pieces = self.topics.receive_pieces
        for event in transport.take_events():
            if type(event) is FrameReceived:
                frame = event.frame
                if frame.messages:
                    self._unbundle(event, now)
                    continue
                payload = frame.payload
                if type(payload) is bytes and frame.parts == 1:
                    # The common case: a small message, whole, in one frame.
                    if reassembler.holds(event.peer):
                        reassembler.discard(event.peer)  # cannot happen with a good sender
                    route = routes.get(event.peer)
                    if route is not None:
                        deliver(route.peer, payload, now, event.arrived_at + frame.ttl_ms / 1000.0)
                    continue
                # A large message's pieces (views of the datagrams) are joined once, by topics.
                pieces = reassembler.receive_pieces(event.peer, frame, now=now)
                if pieces is not None:
                    route = routes.get(event.peer)
                    if route is not None:
                        expires_at = event.arrived_at + frame.ttl_ms / 1000.0  # its last piece's
                        deliver_pieces(route.peer, pieces, now, expires_at)
            elif type(event) is FramesSkipped:
                self.reassembler.discard(event.peer)
                self.counters["frames_skipped"] += event.last - event.first + 1
                self.topics.skipped(
                    event.peer, "dropped" if event.reason == "dropped" else "expired"
                )
            elif type(event) is StreamsDropped:
                parked = self._parked.get(event.peer)
                if parked is not None:  # dropped (expired, memory) while it was away
                    if not self.transport.is_parked(event.peer):
                        self._forget_parked(event.peer)  # (else only its frames expired)
                    self._failed(parked[0], event.messages)
            else:
                assert isinstance(event, SendSpaceFreed)
                if self.outbox.holding:  # room for what was held for it
                    self.outbox.retry(event.peer, now, gone=False)
                self.topics.room_freed(now)  # (work-queue jobs held for want of room)
                self._events.append(event)
                self._control_events = True

    def _wall_offset(self) -> float:
        return self.topics.wall_offset


def _length(datagram: wire.OutDatagram) -> int:
    return len(datagram) if isinstance(datagram, bytes) else sum(map(len, datagram))
