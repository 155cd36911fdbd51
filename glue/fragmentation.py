"""Fragmentation: messages larger than one datagram, split and rebuilt (sans-IO).

How this layer works
--------------------
The sender splits a message into ``parts`` fragments of at most ``fragment_bytes`` each and hands
them to the transport as consecutive frames (``part`` 0..parts-1). Because the transport delivers
each peer's frames exactly once and in order, the receiver rebuilds at most **one** message per
peer at a time: fragment 0 opens it, each next fragment must be the next part, the last one
completes it. Anything else (a skipped frame, a part out of place, a new part 0) discards the
partial message, counted.

Bounds: a partial message is dropped when it grows past ``max_message_bytes``, when all partial
messages together would pass ``max_total_bytes`` (first the partials of the peers that hold more
than the one growing are dropped to make room, so one peer, or many fake ones, cannot starve
another), and when its first fragment's time to live runs out (``handle_timer``); a departed
peer's partial message is dropped at once.
"""

from __future__ import annotations

import logging
from collections import Counter

from glue.wire import Data, EndpointId

__all__ = ["Reassembler", "split", "split_views"]

logger = logging.getLogger(__name__)


def split(payload: bytes, fragment_bytes: int) -> list[bytes]:
    """``payload`` in fragments of at most ``fragment_bytes`` (one, possibly empty, if it fits)."""
    if len(payload) <= fragment_bytes:
        return [payload]
    view = memoryview(payload)
    return [bytes(view[i : i + fragment_bytes]) for i in range(0, len(payload), fragment_bytes)]


def split_views(payload: bytes | memoryview, fragment_bytes: int) -> list[memoryview]:
    """``split`` without copying: views of ``payload`` (copied once, into each datagram)."""
    view = memoryview(payload)
    if len(payload) <= fragment_bytes:
        return [view]
    return [view[i : i + fragment_bytes] for i in range(0, len(payload), fragment_bytes)]


class _Partial:
    __slots__ = ("chunks", "expires_at", "next_part", "next_seq", "parts", "size")

    def __init__(self, parts: int, expires_at: float, seq: int) -> None:
        self.chunks: list[bytes | memoryview] = []  # joined once, by the layer above
        self.parts = parts
        self.next_part = 0
        # A message's fragments are consecutive frames: the next one must be this frame, or
        # frames were skipped in between (then it is another message's part of the same number).
        self.next_seq = seq
        self.size = 0
        self.expires_at = expires_at


class Reassembler:
    """Rebuilds messages from the in-order fragments the transport delivers."""

    def __init__(self, *, max_message_bytes: int, max_total_bytes: int) -> None:
        self.max_message_bytes = max_message_bytes
        self.max_total_bytes = max_total_bytes
        self.counters: Counter[str] = Counter()
        self._partials: dict[EndpointId, _Partial] = {}
        self._total = 0

    def receive(self, peer: EndpointId, frame: Data, *, now: float) -> bytes | None:
        """Take the next fragment from ``peer``; return the message when it is complete."""
        pieces = self.receive_pieces(peer, frame, now=now)
        if pieces is None:
            return None
        if len(pieces) == 1 and type(pieces[0]) is bytes:
            return pieces[0]
        return b"".join(pieces)

    def receive_pieces(
        self, peer: EndpointId, frame: Data, *, now: float
    ) -> list[bytes | memoryview] | None:
        """:meth:`receive`, but the complete message is returned as its fragments' payloads.

        Decoded fragments are views of their datagrams: the caller joins them once, into what it
        delivers (the stack strips the envelope in the same copy).
        """
        if frame.parts == 1:
            if peer in self._partials:
                self._drop(peer, "incomplete")
            return [frame.payload]
        partial = self._partials.get(peer)
        if frame.part == 0:
            if partial is not None:
                self._drop(peer, "incomplete")
            partial = self._partials[peer] = _Partial(
                frame.parts, now + frame.ttl_ms / 1000.0, frame.seq
            )
        elif (
            partial is None
            or frame.part != partial.next_part
            or frame.parts != partial.parts
            or frame.seq != partial.next_seq
        ):
            if partial is not None:
                self._drop(peer, "out_of_place")
            self.counters["fragments_out_of_place"] += 1
            return None
        size = len(frame.payload)
        if partial.size + size > self.max_message_bytes:
            self._drop(peer, "oversized")
            return None
        if self._total + size > self.max_total_bytes and not self._make_room(
            peer, size, partial.size + size
        ):
            self._drop(peer, "memory_full")
            return None
        partial.chunks.append(frame.payload)
        partial.size += size
        partial.next_part += 1
        partial.next_seq = frame.seq + 1
        self._total += size
        if partial.next_part < partial.parts:
            return None
        del self._partials[peer]
        self._total -= partial.size
        self.counters["messages_reassembled"] += 1
        return partial.chunks

    def admit(self, peer: EndpointId, frame: Data) -> bool:
        """Whether fragment ``frame`` from ``peer`` will find room (making it if it can, as
        ``receive`` would). Asked by the transport before it acknowledges a fragment, so that a
        fragment it acknowledged is never dropped for lack of room: refused, it is resent."""
        size = len(frame.payload)
        if self._total + size <= self.max_total_bytes:
            return True
        partial = self._partials.get(peer)
        held = partial.size if partial is not None and frame.part > 0 else 0
        return self._make_room(peer, size, held + size)

    def _make_room(self, peer: EndpointId, size: int, mine: int) -> bool:
        """Free ``size`` bytes by dropping the partial messages of the peers that hold the most,
        as long as each holds more than ``peer`` would (``mine``): one peer (or many fake ones)
        filling the budget cannot starve another. Whether there is room now."""
        while self._total + size > self.max_total_bytes:
            other, largest = max(
                ((p, partial) for p, partial in self._partials.items() if p != peer),
                key=lambda item: item[1].size,
                default=(None, None),
            )
            if other is None or largest is None or largest.size <= mine:
                return False
            self._drop(other, "evicted")
        return True

    def holds(self, peer: EndpointId) -> bool:
        """Whether a partial message from ``peer`` is being rebuilt."""
        return peer in self._partials

    def discard(self, peer: EndpointId) -> None:
        """Frames of ``peer`` were skipped or the peer left: its partial message is lost."""
        if peer in self._partials:
            self._drop(peer, "incomplete")

    def handle_timer(self, *, now: float) -> None:
        """Drop partial messages whose time to live has run out."""
        for peer, partial in list(self._partials.items()):
            if partial.expires_at <= now:
                self._drop(peer, "expired")

    def next_deadline(self) -> float | None:
        """When the oldest partial message expires, if any."""
        if not self._partials:  # the common case, asked after every burst
            return None
        return min(p.expires_at for p in self._partials.values())

    @property
    def buffered_bytes(self) -> int:
        """Bytes held in partial messages now."""
        return self._total

    def _drop(self, peer: EndpointId, reason: str) -> None:
        partial = self._partials.pop(peer)
        self._total -= partial.size
        self.counters[f"partial_dropped_{reason}"] += 1
        logger.debug(
            "dropped a partial message from %d (%d of %d parts): %s",
            peer,
            partial.next_part,
            partial.parts,
            reason,
        )
