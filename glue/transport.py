"""Transport: exactly-once, in-order delivery of unexpired frames per (sender, receiver) pair.

How this layer works (sans-IO; see ``docs/PROTOCOL.md``)
--------------------------------------------------------
State: for every peer, a send stream and a receive stream, both tied to the peer's incarnation.

- *Send stream*: frames get consecutive sequence numbers from 1. At most ``window_frames`` frames
  (and ``reorder_bytes``) are unacknowledged and ``window_bytes`` (and the congestion window) in
  the network; later ones wait in a queue bounded by ``queue_bytes`` (``can_send`` tells the
  runtime whether a message fits; the runtime turns "no" into back-pressure). Every in-flight
  frame is resent at once when selective acks show that a later transmission arrived (RACK,
  RFC 8985), or when unacknowledged for one retransmission timeout (RTO = smoothed RTT + 4 x RTT
  variance, RFC 6298; samples only from frames sent once, Karn's rule; doubled on each timeout
  when a queue stands on the path or after six in a row, linear before; reset by progress). A
  loss halves the congestion window only when a queue stands (the round trip is well above the
  least seen): random loss is noise, not congestion (``TransportConfig.queue_delay_s``). A frame
  whose message expired is never sent again: it is dropped and the receiver is told to skip past
  it (``Skip``, like SCTP FORWARD-TSN), repeated until acknowledged, so one lost message never
  stalls later ones.
- *Receive stream*: frames are delivered in sequence order, each once; duplicates are dropped and
  re-acknowledged; out-of-order frames wait in a buffer bounded by ``window_frames`` and
  ``reorder_bytes``. A frame whose time to live (``ttl_ms``, counted from its arrival) has passed
  when its turn comes is skipped, never delivered late. Acks are cumulative plus up to
  ``MAX_ACK_RANGES`` selective ranges, sent at once when a new hole opens, one is filled or a
  duplicate arrives, and otherwise after ``ack_delay_s`` (or ``ack_every`` frames), so one ack
  covers many frames.

Inputs: ``add_peer``/``remove_peer`` (from discovery), ``send``, ``receive``, ``handle_timer``.
Outputs: ``frames_to_send`` (frames per peer id), ``next_event``/``take_events`` (``FrameReceived``,
``FramesSkipped``, ``SendSpaceFreed``, ``StreamsDropped``), ``next_deadline``.

A peer removed from discovery is never sent to again. A peer that *left* (goodbye, restart) loses
both streams at once; one that only went *silent* (``remove_peer(park=True)``) has them *parked*:
its queued and unacknowledged frames and its receive buffer are kept, untouched, until the last
of them expires (bounded by ``parked_bytes`` over all parked peers, oldest evicted first), so that
if it was only taken for gone (heavy loss, a stalled process) and comes back in the same
incarnation, it gets every unexpired frame, in order, with no ``Skip``. Frames a parked stream
drops unacknowledged are reported (``StreamsDropped``), as are those of a peer that left.
"""

from __future__ import annotations

import logging
import math
from collections import Counter, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import count, groupby
from operator import sub
from typing import Final, Literal

from glue.wire import MAX_ACK_RANGES, MAX_DATAGRAM_BYTES, MAX_TTL_MS, Ack, Data, EndpointId, Skip

__all__ = [
    "FrameReceived",
    "FramesSkipped",
    "SendSpaceFreed",
    "StreamsDropped",
    "Transport",
    "TransportConfig",
    "TransportEvent",
    "held_ranges",
]

logger = logging.getLogger(__name__)

_RTT_ALPHA: Final = 1 / 8
_RTT_BETA: Final = 1 / 4
#: How long the least round trip seen stands before a new sample replaces it (paths change).
_MIN_RTT_WINDOW_S: Final = 10.0
#: Timeouts in a row resent after the same RTO, not a doubled one, while no queue stands on the
#: path (see ``_on_rto``); exponential backoff from there on.
_LINEAR_TIMEOUTS: Final = 6
#: The share of a round trip's bytes lost from which a loss is taken for congestion whatever the
#: round trip says (see ``_congested``): 30 % random loss stays well under it, a window sent into
#: a full queue well over (64 KiB messages into a 1 Gbit/s link with a 5 ms queue: 60-70 %).
_CONGESTED_LOSS: Final = 0.5
#: Frames a round must count (arrived or resent) before its share lost is taken.
_ROUND_FRAMES: Final = 32


def held_ranges(seqs: Iterable[int]) -> tuple[tuple[int, int], ...]:
    """The first ``MAX_ACK_RANGES`` runs of consecutive numbers in ``seqs`` (any order), as
    ``(first, last)`` pairs in ascending order: an ack's selective ranges.

    Made at every ack while frames are held out of order (often a hundred or more at 10 % loss):
    the numbers of one run share ``seq - index``, so ``groupby`` splits them in C and Python
    works once per run, not once per frame (140 frames held: 14 -> 8 us per ack).
    """
    ordered = sorted(seqs)
    ranges: list[tuple[int, int]] = []
    start = 0
    for _, run in groupby(map(sub, ordered, count())):
        end = start + len(list(run))
        ranges.append((ordered[start], ordered[end - 1]))
        if len(ranges) == MAX_ACK_RANGES:
            break
        start = end
    return tuple(ranges)


@dataclass(frozen=True, slots=True)
class TransportConfig:
    """Limits and timings of the transport (defaults suit a LAN and loopback)."""

    window_frames: int = 2048
    #: At most the payload a receiver's socket buffer holds (glue asks for 4 MiB, which the
    #: kernel doubles to cover its accounting): then a stalled receiver cannot be overrun. With
    #: 8 MiB, a 64 KiB stream on loopback lost and resent 80-460 frames per 100,000 messages;
    #: with 4 MiB, none.
    window_bytes: int = 4 * 1024 * 1024
    #: Out-of-order bytes a receiver holds per peer, and so what a sender leaves unacknowledged
    #: at most (in the network, within ``window_bytes``, plus selectively acked): room for a
    #: window behind a hole, so that the stream flows on while the hole is repaired.
    reorder_bytes: int = 8 * 1024 * 1024
    #: Congestion window (bytes in flight) at the start and its floor after losses; it grows
    #: as acks arrive (doubling per round trip up to the threshold, then by one datagram per
    #: round trip) and halves on a loss, so a slower receiver is not flooded into dropping.
    initial_congestion_bytes: int = 1024 * 1024
    #: At least four of the largest datagrams, so that one loss leaves acks to clock recovery.
    min_congestion_bytes: int = 256 * 1024
    #: Queueing delay (smoothed round trip above the least seen) beyond which a loss is taken for
    #: congestion; below it (and below the least round trip itself) the path has no standing
    #: queue, so a loss is noise (a bad link, a busy switch port) and the window is kept: halving
    #: it would only slow the stream without relieving anyone. Four delayed-ack intervals, so
    #: that acks held back on purpose do not read as a queue.
    queue_delay_s: float = 0.008
    queue_bytes: int = 64 * 1024 * 1024
    initial_rto_s: float = 0.05
    min_rto_s: float = 0.01
    max_rto_s: float = 1.0
    ack_delay_s: float = 0.002
    ack_every: int = 32
    retired_streams: int = 4096
    #: Bytes kept in all in the streams of peers taken for gone (see ``remove_peer``).
    parked_bytes: int = 64 * 1024 * 1024
    #: Out-of-order frames held for all peers together (each also within ``reorder_bytes``): a
    #: frame that would pass it is not buffered nor acknowledged (its sender resends it), so
    #: many peers, fake ones included, cannot make the receive buffers grow without bound.
    receive_buffer_bytes: int = 64 * 1024 * 1024


@dataclass(slots=True, unsafe_hash=True)  # not frozen: made per frame (see wire.Data)
class FrameReceived:
    """A frame from ``peer``, in order, exactly once; it arrived at ``arrived_at``."""

    peer: EndpointId
    frame: Data
    arrived_at: float = field(default=0.0, compare=False)


@dataclass(frozen=True, slots=True)
class FramesSkipped:
    """Frames ``first``..``last`` from ``peer`` will never be delivered: any message they
    belonged to is lost. ``reason``: ``"expired"`` (at the sender, or here before their turn) or
    ``"dropped"`` (the sender's slow-peer policy dropped some of them)."""

    peer: EndpointId
    first: int
    last: int
    reason: Literal["expired", "dropped"] = "expired"


@dataclass(frozen=True, slots=True)
class SendSpaceFreed:
    """Acks freed room in the send queue to ``peer``: blocked senders may retry."""

    peer: EndpointId


@dataclass(frozen=True, slots=True)
class StreamsDropped:
    """The streams of departed ``peer`` were dropped with ``messages`` not acknowledged."""

    peer: EndpointId
    incarnation: int
    messages: int


TransportEvent = FrameReceived | FramesSkipped | SendSpaceFreed | StreamsDropped


class _Outgoing:
    __slots__ = (
        "abandoned",
        "bundle",
        "expires_at",
        "lost",
        "part",
        "parts",
        "payload",
        "prefix",
        "resends",
        "sacked",
        "sent_at",
        "seq",
        "size",
        "xmit",
    )

    def __init__(
        self,
        seq: int,
        payload: bytes | memoryview,
        part: int,
        parts: int,
        expires_at: float,
        prefix: bytes = b"",
    ) -> None:
        self.seq = seq
        self.payload = payload
        self.prefix = prefix  # sent before the payload, in the same frame (an envelope)
        self.size = len(prefix) + len(payload)
        self.part = part
        self.parts = parts
        self.expires_at = expires_at
        self.sent_at = -1.0  # never sent
        self.resends = 0
        self.xmit = 0  # the stream's transmission number of its latest (re)transmission
        self.sacked = False  # selectively acked: not resent, but kept until cumulatively acked
        self.abandoned = False  # expired: a placeholder until the receiver skips past it
        self.lost = False  # timed out, waiting in the stream's ``lost`` queue to be resent
        # A bundle's messages: their lengths and their expiry times, in order (None: not one).
        self.bundle: tuple[list[int], list[float]] | None = None


def _messages(frames: list[_Outgoing]) -> int:
    """How many messages end in ``frames`` (a bundle holds many; a fragment ends one if last)."""
    count = 0
    for out in frames:
        if out.abandoned:
            continue
        if out.bundle is not None:
            count += len(out.bundle[0])
        elif out.part == out.parts - 1:
            count += 1
    return count


class _SendStream:
    __slots__ = (
        "abandoned",
        "acked_to",
        "backlog_at",
        "backoff",
        "counters",
        "cwnd",
        "dropped_to",
        "in_flight_bytes",
        "lost",
        "min_rtt",
        "min_rtt_at",
        "next_seq",
        "one_way_s",
        "outbox",
        "pending",
        "queued_bytes",
        "rack_xmit",
        "recover_to",
        "resend_at",
        "round_delivered",
        "round_end",
        "round_frames",
        "round_loss",
        "round_lost",
        "round_share",
        "rto",
        "rttvar",
        "sack_top",
        "sacked",
        "sacked_bytes",
        "skip_sent_at",
        "skip_to",
        "srtt",
        "ssthresh",
        "unacked",
        "xmits",
    )

    def __init__(self, initial_rto: float, counters: Counter[str], cwnd: int) -> None:
        self.counters = counters
        self.cwnd = cwnd  # congestion window, bytes in flight
        self.ssthresh = 1 << 62  # slow start until the first loss
        # Losses of frames up to this seq belong to one episode: the highest sent when it began
        # (not the highest queued: a full send queue made one episode of a thousand frames, and
        # a window overflowing a queue was halved once where it needed halving again and again).
        self.recover_to = 0
        self.next_seq = 1
        self.acked_to = 0
        # When an ack last said the receiver's socket held a backlog (Ack.backlog): the queue
        # that stands then is the receiver's own, which the window keeps from overflowing.
        self.backlog_at = float("-inf")
        self.pending: deque[_Outgoing] = deque()
        self.unacked: dict[int, _Outgoing] = {}
        # Frames a timeout found lost, resent as acks come back (the ack clock), not all at once.
        self.lost: deque[_Outgoing] = deque()
        self.queued_bytes = 0  # pending + unacked payload bytes
        self.in_flight_bytes = 0
        self.sacked = 0  # how many unacked frames are marked sacked
        # Their bytes: in flight, but no longer in the network (the receiver holds them).
        self.sacked_bytes = 0
        self.sack_top = 0  # the highest seq any selective ack has reached
        self.abandoned = 0  # how many unacked frames are expired placeholders
        self.skip_to = 0
        self.skip_sent_at = float("-inf")
        self.dropped_to = 0  # the highest seq a slow-peer drop abandoned (a skip says why)
        self.srtt: float | None = None
        self.rttvar = 0.0
        # The least round trip seen lately (renewed every _MIN_RTT_WINDOW_S): the path's own, no
        # queue; with srtt, it tells a congestion loss from noise (see TransportConfig).
        self.min_rtt: float | None = None
        self.min_rtt_at = 0.0
        self.backoff = 0  # timeouts in a row with no progress in between (RTO doubled each)
        # Transmissions so far (fresh or resent), and the latest transmission known to have
        # arrived: a frame transmitted before one that arrived is lost (RACK, RFC 8985).
        self.xmits = 0
        self.rack_xmit = 0
        # Per round trip (a smoothed round trip's time, from an ack): bytes that arrived (acked
        # or sacked) and bytes resent (their transmission was lost), and the share lost in the
        # last whole round: when a window overflows a queue, much of it is lost at once (see
        # _congested).
        self.round_end = 0.0
        self.round_delivered = 0
        self.round_lost = 0
        self.round_frames = 0  # frames that arrived or were resent in it
        self.round_share = 0.0  # the last round's alone
        self.round_loss = 0.0  # the larger of the last two rounds'
        # Estimated transit time (srtt / 2), taken off the time to live a frame carries, since the
        # receiver counts it from arrival: it keeps a message from living longer than it should.
        self.one_way_s = 0.0
        self.rto = initial_rto
        self.resend_at: float | None = None  # the one retransmission timer (RFC 6298)
        self.outbox: list[Data] = []


def _sent_to(stream: _SendStream) -> int:
    """The highest sequence number sent so far (``unacked`` is in sequence order)."""
    return next(reversed(stream.unacked), stream.acked_to)


class _RecvStream:
    __slots__ = (
        "ack_at",
        "acked_at",
        "backlogs",
        "buffer",
        "buffer_top",
        "buffered_bytes",
        "counters",
        "delivered",
        "delivered_to",
        "unacked",
    )

    def __init__(self, counters: Counter[str]) -> None:
        self.counters = counters
        self.delivered = 0  # frames delivered on the hot path (added to counters when read)
        self.delivered_to = 0
        self.buffer: dict[int, tuple[Data, float, float]] = {}  # seq -> frame, expiry, arrival
        self.buffer_top = 0  # the highest seq ever buffered out of order
        self.buffered_bytes = 0
        self.unacked = 0
        self.ack_at: float | None = None
        self.acked_at = float("-inf")  # when the last ack was made (see take_due_acks)
        self.backlogs = 0  # Transport._backlogs when this stream's last ack was made


class _Peer:
    __slots__ = ("counters", "hold_until", "incarnation", "parked_until", "recv", "send")

    def __init__(self, incarnation: int, initial_rto: float, cwnd: int) -> None:
        self.incarnation = incarnation
        self.counters: Counter[str] = Counter()  # this peer's; folded into the totals on removal
        self.send = _SendStream(initial_rto, self.counters, cwnd)
        self.recv = _RecvStream(self.counters)
        self.parked_until = 0.0  # when parked: the time its last frame expires (or hold_until)
        self.hold_until = 0.0  # when parked: kept at least until then, frames or not

    def frames(self) -> list[_Outgoing]:
        """Queued and unacknowledged frames, in sequence order."""
        return [*self.send.unacked.values(), *self.send.pending]

    def held_bytes(self) -> int:
        """Payload bytes held for this peer, both ways."""
        return self.send.queued_bytes + self.recv.buffered_bytes


class Transport:
    """The transport state machine of one endpoint, for all its peers."""

    def __init__(
        self,
        config: TransportConfig | None = None,
        *,
        admit: Callable[[EndpointId, Data], bool] | None = None,
    ) -> None:
        self.config = config or TransportConfig()
        self.counters: Counter[str] = Counter()
        # Asked before a fragment (``parts`` > 1) is delivered: whether the layer above has room
        # for it. If not, it is neither delivered nor acknowledged (its sender resends it later):
        # a message whose frames were acknowledged is never dropped for lack of room.
        self._admit = admit
        self._peers: dict[EndpointId, _Peer] = {}
        self._events: deque[TransportEvent] = deque()
        self._dirty: set[EndpointId] = set()  # peers with something to send
        # (peer, incarnation) -> (next seq to send, last seq delivered) of departed peers.
        self._retired: dict[tuple[EndpointId, int], tuple[int, int]] = {}
        self._blocked: set[EndpointId] = set()  # peers a sender found full
        # Streams of peers that went silent, oldest first (see remove_peer), and their bytes.
        self._parked: dict[EndpointId, _Peer] = {}
        self._parked_bytes = 0
        self._receive_buffered = 0  # out-of-order bytes held for the live peers together
        self._backlogs = 0  # reads that stopped with datagrams still waiting (note_backlog)
        #: No ack to any peer is due before this (``math.inf``: none is waiting); it may be
        #: earlier than the truth, never later. A runtime reading a long burst compares it with
        #: the clock between datagrams and sends the due acks at once (``take_due_acks``), not
        #: at the end of the burst: a sender then hears of a hole at once, and is clocked by
        #: acks every ``ack_delay_s`` rather than once per burst, which would let it send
        #: half a megabyte at a time into a switch port's queue.
        self.ack_due = math.inf

    # --- peers ----------------------------------------------------------------------------------

    def add_peer(self, peer: EndpointId, incarnation: int) -> None:
        """Start streams to and from ``peer`` (a new incarnation replaces the old streams).

        A peer that comes back in the *same* incarnation resumes where the streams stopped. If
        they were parked (it went silent), everything is as it was: unacknowledged frames are
        resent at once, in order, and the receive buffer is kept. Otherwise (they were dropped)
        sending continues after the last sequence number used, with a ``Skip`` over what was
        dropped, and receiving continues after the last frame delivered. The other side may
        never have noticed the gap, so restarting from 1 would lose or stall frames.
        """
        known = self._peers.get(peer)
        if known is not None and known.incarnation == incarnation:
            return
        if known is not None:
            self.remove_peer(peer)
        parked = self._parked.pop(peer, None)
        if parked is not None:
            if parked.incarnation == incarnation:
                self._unpark(peer, parked)
                return
            self._drop_parked(peer, parked, "replaced")
        state = _Peer(incarnation, self.config.initial_rto_s, self.config.initial_congestion_bytes)
        resumed = self._retired.pop((peer, incarnation), None)
        if resumed is not None:
            next_seq, delivered_to = resumed
            state.send.next_seq = next_seq
            state.send.skip_to = next_seq  # sent until an ack covers next_seq - 1
            state.recv.delivered_to = delivered_to
            self.counters["streams_resumed"] += 1
            self._dirty.add(peer)
        self._peers[peer] = state

    def remove_peer(self, peer: EndpointId, *, park: bool = False, hold_until: float = 0.0) -> int:
        """Stop sending to ``peer``; returns how many messages to it were dropped unacknowledged.

        With ``park`` (the peer went silent, it did not say goodbye), its streams are kept, for a
        return in the same incarnation, until the last of their frames expires and at least
        until ``hold_until``; frames may still be queued to it meanwhile (:meth:`send`), to go
        when it is back. 0 is returned: nothing is dropped (yet). Otherwise its frames are
        dropped at once and counted.
        """
        state = self._peers.pop(peer, None)
        if state is None:
            return 0
        self._dirty.discard(peer)
        if peer in self._blocked:
            self._blocked.discard(peer)
            self._events.append(SendSpaceFreed(peer))
        if park:
            self._park(peer, state, hold_until)
            return 0
        self._receive_buffered -= state.recv.buffered_bytes
        return self._retire(peer, state)

    def final_acks(self) -> list[tuple[EndpointId, Ack]]:
        """An ack for every peer whose latest frames are not yet acknowledged (before leaving:
        the sender must not take what we received for lost when our goodbye reaches it)."""
        acks = []
        for peer, state in self._peers.items():
            recv = state.recv
            if recv.ack_at is not None or recv.buffer:
                acks.append((peer, self._make_ack(recv)))
        return acks

    def parked(self) -> dict[EndpointId, int]:
        """Peers whose streams are parked, with the messages to them not yet acknowledged."""
        return {peer: _messages(state.frames()) for peer, state in self._parked.items()}

    def is_parked(self, peer: EndpointId) -> bool:
        """Whether ``peer``'s streams are parked (it went silent and may come back)."""
        return peer in self._parked

    def _park(self, peer: EndpointId, state: _Peer, hold_until: float) -> None:
        frames = state.frames()
        expiries = [out.expires_at for out in frames if not out.abandoned]
        expiries.extend(expires_at for _, expires_at, _ in state.recv.buffer.values())
        state.hold_until = hold_until
        state.parked_until = max(expiries, default=hold_until)
        self._parked[peer] = state
        self._parked_bytes += state.held_bytes()
        self._receive_buffered -= state.recv.buffered_bytes  # now counted as parked
        self.counters["streams_parked"] += 1
        logger.debug("parked %d frames for silent peer %d", len(frames), peer)
        self._trim_parked()

    def _trim_parked(self) -> None:
        while self._parked and (
            self._parked_bytes > self.config.parked_bytes
            or len(self._parked) > self.config.retired_streams
        ):
            oldest = next(iter(self._parked))
            self._drop_parked(oldest, self._parked.pop(oldest), "memory")

    def _unpark(self, peer: EndpointId, state: _Peer) -> None:
        self._parked_bytes -= state.held_bytes()
        self._receive_buffered += state.recv.buffered_bytes
        stream = state.send
        # Back from a silence: probe again from the initial window and timeout (RFC 5681 4.1,
        # after an idle period), and resend everything unacknowledged at the next timer.
        stream.cwnd = self.config.initial_congestion_bytes
        stream.rto = self.config.initial_rto_s
        for out in stream.unacked.values():
            if out.sacked:
                out.sacked = False  # its receiver may have forgotten it meanwhile
                stream.sacked -= 1
                stream.sacked_bytes -= out.size
        stream.sack_top = 0
        if len(stream.unacked) > stream.abandoned:
            stream.resend_at = float("-inf")
        if stream.skip_to > stream.acked_to + 1:
            stream.skip_sent_at = float("-inf")
        recv = state.recv
        if recv.buffer or recv.unacked:
            recv.ack_at = self.ack_due = float("-inf")  # tell it at once what we hold
        self._peers[peer] = state
        self._dirty.add(peer)
        self.counters["streams_unparked"] += 1

    def _drop_parked(self, peer: EndpointId, state: _Peer, reason: str) -> None:
        self._parked_bytes -= state.held_bytes()
        self.counters[f"parked_streams_dropped_{reason}"] += 1
        self._retire(peer, state)

    def _retire(self, peer: EndpointId, state: _Peer) -> int:
        """Drop ``state``'s frames, keep where its streams stopped; returns the messages lost."""
        retired = self._retired
        retired[(peer, state.incarnation)] = (state.send.next_seq, state.recv.delivered_to)
        if len(retired) > self.config.retired_streams:
            del retired[next(iter(retired))]  # the oldest; a resume then starts afresh
            self.counters["retired_streams_evicted"] += 1
        self._fold(state)
        self.counters.update(state.counters)
        frames = state.frames()
        dropped = sum(not out.abandoned for out in frames)
        messages = _messages(frames)
        if dropped:
            self.counters["frames_dropped_peer_gone"] += dropped
            logger.debug("dropped %d frames queued for departed peer %d", dropped, peer)
        if messages:
            self._events.append(StreamsDropped(peer, state.incarnation, messages))
        return messages

    def _purge_parked(self, now: float) -> None:
        """Parked streams whose every frame has expired: drop them, or, until their hold time,
        only their frames (reported), keeping the streams for the peer's return."""
        for peer in [p for p, state in self._parked.items() if state.parked_until <= now]:
            state = self._parked[peer]
            if state.hold_until <= now:
                self._drop_parked(peer, self._parked.pop(peer), "expired")
                continue
            before = state.held_bytes()
            messages = self._abandon_all(state.send, "frames_expired")  # skipped when it is back
            self._parked_bytes -= before - state.held_bytes()
            state.parked_until = state.hold_until
            if messages:
                self.counters["parked_messages_expired"] += messages
                self._events.append(StreamsDropped(peer, state.incarnation, messages))

    def total_counters(self) -> Counter[str]:
        """Counters over every peer, present and departed."""
        total = Counter(self.counters)
        for state in (*self._peers.values(), *self._parked.values()):
            self._fold(state)
            total.update(state.counters)
        return total

    @staticmethod
    def _fold(state: _Peer) -> None:
        if state.recv.delivered:
            state.counters["frames_delivered"] += state.recv.delivered
            state.recv.delivered = 0

    def peer_counters(self, peer: EndpointId) -> Counter[str] | None:
        """The live counters of ``peer`` (frames sent, resent, acked, delivered, ...), if known."""
        state = self._peers.get(peer)
        if state is None:
            return None
        self._fold(state)
        return state.counters

    def peer_gauges(self, peer: EndpointId) -> dict[str, float]:
        """The state of the streams with ``peer`` now: smoothed round trip (s, 0 before the first
        sample), retransmission timeout (s), congestion window, queued and in-flight bytes, frames
        queued or unacknowledged, frames buffered out of order (empty if unknown)."""
        state = self._peers.get(peer)
        if state is None:
            return {}
        send, recv = state.send, state.recv
        return {
            "rtt_seconds": send.srtt or 0.0,
            "rto_seconds": send.rto,
            "congestion_window_bytes": send.cwnd,
            "queued_bytes": send.queued_bytes,
            "in_flight_bytes": send.in_flight_bytes,
            "unacknowledged_frames": len(send.pending) + len(send.unacked),
            "receive_buffered_frames": len(recv.buffer),
        }

    def incarnation(self, peer: EndpointId) -> int | None:
        """The incarnation of ``peer`` the streams belong to, if known."""
        state = self._peers.get(peer)
        return state.incarnation if state else None

    def peers(self) -> list[EndpointId]:
        """Ids of the peers that have streams."""
        return list(self._peers)

    def idle(self) -> bool:
        """Whether nothing is queued or unacknowledged towards any peer, parked ones included."""
        return not self._parked_sends() and not any(
            s.send.pending or s.send.unacked for s in self._peers.values()
        )

    def _parked_sends(self) -> bool:
        return any(
            s.send.pending or len(s.send.unacked) > s.send.abandoned for s in self._parked.values()
        )

    def in_flight(self, peer: EndpointId) -> int:
        """Frames queued or unacknowledged towards ``peer``."""
        state = self._peers.get(peer)
        return len(state.send.pending) + len(state.send.unacked) if state else 0

    # --- inputs ---------------------------------------------------------------------------------

    def has_room(self, peer: EndpointId, size: int) -> bool:
        """``can_send`` without asking to be told when room frees (``SendSpaceFreed``)."""
        state = self._peers.get(peer)
        return state is None or state.send.queued_bytes + size <= self.config.queue_bytes

    def can_send(self, peer: EndpointId, size: int) -> bool:
        """Whether ``size`` more payload bytes fit in the send queue to ``peer`` now."""
        state = self._peers.get(peer)
        if state is None:
            return True  # sending to an unknown peer is refused by send(), not blocked
        fits = state.send.queued_bytes + size <= self.config.queue_bytes
        if not fits:
            self._blocked.add(peer)
        return fits

    def send(
        self,
        peer: EndpointId,
        payload: bytes | memoryview,
        *,
        expires_at: float,
        now: float,
        part: int = 0,
        parts: int = 1,
        bundle: tuple[list[int], list[float]] | None = None,
        prefix: bytes = b"",
    ) -> bool:
        """Queue one frame to ``peer``; False if the peer is unknown (nothing is queued).

        ``bundle`` makes the frame a bundle of small messages: ``(lengths, expiry times)``, one
        of each per message, their payloads concatenated in ``payload``; ``expires_at`` is then
        the latest of them.
        ``prefix`` goes on the wire just before ``payload``, as part of it (see ``Data.prefix``).
        """
        state = self._peers.get(peer)
        parked = False
        if state is None:
            state = self._parked.get(peer)
            if state is None:
                self.counters["frames_to_unknown_peer"] += 1
                return False
            parked = True
        stream = state.send
        out = _Outgoing(stream.next_seq, payload, part, parts, expires_at, prefix)
        if bundle is not None:
            out.bundle = bundle
        stream.next_seq += 1
        stream.pending.append(out)
        stream.queued_bytes += out.size
        if not parked:
            self._dirty.add(peer)
            return True
        # Queued for a peer taken for gone, for its return (within the parked streams' bound).
        # (Its only live frame sets the stream's next deadline: the hold time may be later.)
        if stream.queued_bytes == out.size or expires_at > state.parked_until:
            state.parked_until = expires_at
        self._parked_bytes += out.size
        self.counters["frames_queued_while_parked"] += 1
        self._trim_parked()
        return True

    def drop_backlog(self, peer: EndpointId) -> int:
        """Drop every frame not yet acknowledged by ``peer``, queued or in flight (a slow peer's
        backlog): none is sent again, and the receiver is told to skip past them. Returns the
        messages that ended in them (a message whose first fragments were acknowledged is lost
        too: its receiver drops the partial message when it skips)."""
        state = self._peers.get(peer)
        if state is None:
            return 0
        stream = state.send
        if not stream.pending and len(stream.unacked) == stream.abandoned:
            return 0
        messages = self._abandon_all(stream, "frames_dropped_slow_peer")  # skip_to: next_seq
        stream.dropped_to = stream.next_seq - 1
        stream.resend_at = None
        # Every frame is a placeholder now: the skip alone stands for them (a stuck peer that
        # never acknowledges it must not make them pile up, drop after drop).
        stream.unacked.clear()
        stream.abandoned = 0
        self._dirty.add(peer)
        if peer in self._blocked:
            self._blocked.discard(peer)
            self._events.append(SendSpaceFreed(peer))
        return messages

    def receive(
        self, frame: Data | Ack | Skip, peer: EndpointId, incarnation: int, *, now: float
    ) -> None:
        """Take one transport frame from ``peer`` (its incarnation from the datagram header)."""
        state = self._peers.get(peer)
        if state is None or state.incarnation != incarnation:
            self.counters["frames_from_unknown_peer"] += 1
            return
        if type(frame) is Data:
            recv = state.recv
            if (
                frame.parts > 1
                and self._admit is not None
                and frame.seq > recv.delivered_to
                and frame.seq not in recv.buffer
                and not self._admit(peer, frame)
            ):
                recv.counters["frames_refused_no_room"] += 1
                return
            if frame.seq == recv.delivered_to + 1 and not recv.buffer:
                # The hot path, in order with nothing buffered: deliver, ack later or now.
                recv.delivered_to = frame.seq
                self._events.append(FrameReceived(peer, frame, now))
                recv.delivered += 1
                recv.unacked += 1
                if recv.unacked >= self.config.ack_every:
                    recv.ack_at = now
                    self._dirty.add(peer)
                    if now < self.ack_due:
                        self.ack_due = now
                elif recv.ack_at is None:
                    recv.ack_at = at = now + self.config.ack_delay_s
                    if at < self.ack_due:
                        self.ack_due = at
                return
            self._receive_data(peer, recv, frame, now)
        elif type(frame) is Ack:
            self._receive_ack(peer, state.send, frame, now)
        else:
            assert type(frame) is Skip
            self._receive_skip(peer, state.recv, frame, now)

    def take_due_acks(self, *, now: float) -> list[tuple[EndpointId, Ack]]:
        """The acks due by ``now`` (see ``ack_due``), made now; it makes ``ack_due`` exact
        again (one pass over the peers). Nothing else is sent: data waits for
        ``frames_to_send``."""
        due = math.inf
        acks: list[tuple[EndpointId, Ack]] = []
        # At most one ack per half an ack delay to a peer in the middle of a burst: a burst
        # bringing several new holes asked for one each, at once (64 KiB at 10 % loss: 3.5 x
        # the acks of one per wake-up); within that time the later ones say little more.
        spacing = self.config.ack_delay_s / 2
        for peer, state in self._peers.items():
            recv = state.recv
            at = recv.ack_at
            if at is None:
                continue
            if recv.acked_at + spacing > at:
                at = recv.acked_at + spacing
            if at <= now:
                recv.acked_at = now
                acks.append((peer, self._make_ack(recv)))
            elif at < due:
                due = at
        self.ack_due = due
        return acks

    def note_backlog(self, *, now: float) -> None:
        """The runtime stopped reading with datagrams still waiting in the socket: this endpoint
        is the slow end. The next ack to each peer says so (``Ack.backlog``)."""
        self._backlogs += 1

    def handle_timer(self, *, now: float) -> None:
        """Resend what timed out, expire what is too old, send due acks."""
        if self._parked:
            self._purge_parked(now)
        for peer, state in self._peers.items():
            stream = state.send
            if stream.resend_at is not None and stream.resend_at <= now:
                self._on_rto(stream, now)
                self._dirty.add(peer)
            if stream.skip_to > stream.acked_to + 1 and stream.skip_sent_at + stream.rto <= now:
                self._dirty.add(peer)
            if state.recv.ack_at is not None and state.recv.ack_at <= now:
                self._dirty.add(peer)

    # --- outputs --------------------------------------------------------------------------------

    def frames_to_send(self, *, now: float) -> list[tuple[EndpointId, list[Data | Ack | Skip]]]:
        """Frames to transmit now, grouped per peer (a skip first, then an ack, then data)."""
        out: list[tuple[EndpointId, list[Data | Ack | Skip]]] = []
        for peer in self._dirty:
            state = self._peers.get(peer)
            if state is None:
                continue
            frames: list[Data | Ack | Skip] = []
            recv = state.recv
            stream = state.send
            self._fill_window(stream, now)
            if stream.skip_to > stream.acked_to + 1 and stream.skip_sent_at + stream.rto <= now:
                # At most a window past what the receiver acknowledged: it refuses a longer jump
                # (a forged Skip could otherwise silence the stream); the rest follows in steps.
                step = stream.acked_to + 1 + self.config.window_frames
                frames.append(Skip(min(stream.skip_to, step), stream.dropped_to > stream.acked_to))
                stream.skip_sent_at = now
                stream.counters["skips_sent"] += 1
            # A due ack goes now; a delayed one rides along with data when there is some.
            if recv.ack_at is not None and (recv.ack_at <= now or stream.outbox):
                recv.acked_at = now
                frames.append(self._make_ack(recv))
            if stream.outbox:
                frames.extend(stream.outbox)
                stream.outbox = []
            if frames:
                out.append((peer, frames))
        self._dirty.clear()
        return out

    def next_event(self) -> TransportEvent | None:
        """The oldest event not yet pulled, or ``None``."""
        return self._events.popleft() if self._events else None

    def take_events(self) -> list[TransportEvent]:
        """Every event not yet pulled, oldest first (one call, not one per event)."""
        if not self._events:
            return []
        events = list(self._events)
        self._events.clear()
        return events

    def next_deadline(self) -> float | None:
        """The earliest resend, skip or delayed-ack time over all peers."""
        # Called after every burst: no lists, no generators (Python pays per object).
        deadline: float | None = None
        for state in self._peers.values():
            stream = state.send
            candidate = stream.resend_at
            if candidate is not None and (deadline is None or candidate < deadline):
                deadline = candidate
            if stream.skip_to > stream.acked_to + 1:
                candidate = stream.skip_sent_at + stream.rto
                if deadline is None or candidate < deadline:
                    deadline = candidate
            candidate = state.recv.ack_at
            if candidate is not None and (deadline is None or candidate < deadline):
                deadline = candidate
        if self._parked:
            candidate = min(state.parked_until for state in self._parked.values())
            if deadline is None or candidate < deadline:
                deadline = candidate
        return deadline

    def has_output(self) -> bool:
        """Whether ``frames_to_send`` would return something now (cheap check)."""
        return bool(self._dirty)

    # --- sending internals ----------------------------------------------------------------------

    def _fill_window(self, stream: _SendStream, now: float) -> None:
        config = self.config
        pending = stream.pending
        unacked = stream.unacked
        outbox = stream.outbox
        expired = False
        fresh = 0
        # Two limits: what is in the network (in flight, not selectively acked: the "pipe" of
        # RFC 6675) within the congestion window and what a receiver's socket holds; and what
        # is not yet cumulatively acked within what the receiver buffers out of order besides.
        # Counting sacked frames against the first would stall the stream behind every hole
        # until it is repaired, a round trip per loss.
        limit = min(config.window_bytes, stream.cwnd)
        outstanding = config.reorder_bytes
        while (
            pending
            and len(unacked) < config.window_frames
            and stream.in_flight_bytes - stream.sacked_bytes < limit
            and stream.in_flight_bytes < outstanding
        ):
            out = pending.popleft()
            unacked[out.seq] = out
            ttl_ms = int((out.expires_at - now - stream.one_way_s) * 1000)
            if ttl_ms <= 0:
                self._abandon(stream, out)
                expired = True
                continue
            out.sent_at = now
            stream.xmits += 1
            out.xmit = stream.xmits
            fresh += 1
            stream.in_flight_bytes += out.size
            outbox.append(self._data(out, ttl_ms, now, stream.one_way_s))
        if expired:
            self._update_skip(stream)
        if outbox and stream.resend_at is None:
            stream.resend_at = now + stream.rto
        stream.counters["frames_sent"] += fresh  # first transmissions; resends count apart

    @staticmethod
    def _data(out: _Outgoing, ttl_ms: int, now: float, one_way_s: float) -> Data:
        """The frame for one (re)transmission of ``out``, times to live counted from ``now``."""
        if out.bundle is None:
            return Data(
                out.seq,
                out.payload,
                min(ttl_ms, MAX_TTL_MS),
                out.part,
                out.parts,
                prefix=out.prefix,
            )
        lengths, expiries = out.bundle
        base = now + one_way_s
        # Per message, so in list comprehensions and C builtins (thousands per bundle).
        ttls = [int((expires_at - base) * 1000) for expires_at in expiries]
        if min(ttls) < 0 or max(ttls) > MAX_TTL_MS:  # rare: expired or very long-lived ones
            ttls = [min(MAX_TTL_MS, max(0, ttl)) for ttl in ttls]
        messages = tuple(zip(lengths, ttls, strict=True))
        return Data(out.seq, out.payload, min(ttl_ms, MAX_TTL_MS), messages=messages)

    def _abandon_all(self, stream: _SendStream, counter: str) -> int:
        """Abandon every frame not yet acknowledged, queued or in flight (counted as
        ``counter``), and have the receiver skip past them; returns the messages they ended."""
        frames = [out for out in stream.unacked.values() if not out.abandoned]
        frames.extend(stream.pending)
        messages = _messages(frames)
        for out in stream.pending:
            stream.unacked[out.seq] = out  # a placeholder: the skip covers its sequence number
        stream.pending.clear()
        for out in frames:
            out.lost = False
            self._abandon(stream, out, counter)
        stream.lost.clear()
        self._update_skip(stream)
        return messages

    def _abandon(
        self, stream: _SendStream, out: _Outgoing, counter: str = "frames_expired"
    ) -> None:
        """``out`` (in ``unacked``) expired (or was dropped): never send it again; keep a
        placeholder for its seq."""
        size = out.size
        stream.queued_bytes -= size
        if out.sent_at >= 0:
            stream.in_flight_bytes -= size
        if out.sacked:
            out.sacked = False
            stream.sacked -= 1
            stream.sacked_bytes -= size
        out.abandoned = True
        out.lost = False
        out.payload = out.prefix = b""
        out.size = 0
        stream.abandoned += 1
        stream.counters[counter] += 1

    def _update_skip(self, stream: _SendStream) -> None:
        """If the lowest unacknowledged frames are abandoned, have the receiver skip past them."""
        if not stream.abandoned:
            return
        unacked = stream.unacked
        front = next(iter(unacked.values()), None)
        if front is None or not front.abandoned:
            return  # a live frame must get through first
        target = next(
            (out.seq for out in unacked.values() if not out.abandoned),
            stream.pending[0].seq if stream.pending else stream.next_seq,
        )
        if target > stream.skip_to:
            stream.skip_to = target
            stream.skip_sent_at = float("-inf")

    def _on_rto(self, stream: _SendStream, now: float) -> None:
        rto = stream.rto
        expired = False
        due: list[_Outgoing] = []
        for out in stream.unacked.values():
            if out.abandoned:
                continue
            if out.expires_at - stream.one_way_s <= now:
                self._abandon(stream, out)
                expired = True
            elif not out.sacked and (out.lost or out.sent_at + rto <= now):
                due.append(out)
        if expired:
            self._update_skip(stream)
        if due:  # back off only for a real timeout, not a timer that found nothing due
            stream.counters["timeouts"] += 1
            floor = self.config.min_congestion_bytes
            congested = self._congested(stream, now)
            if stream.backoff == 0 and not congested:
                # The first timeout with no queue on the path: the tail of a burst was lost to
                # noise. Keep the window and resend within it.
                stream.counters["timeouts_tolerated"] += 1
                budget = stream.cwnd
            else:
                stream.ssthresh = max(floor, stream.cwnd // 2)
                stream.cwnd = budget = floor
            if congested or stream.backoff >= _LINEAR_TIMEOUTS:
                stream.rto = min(self.config.max_rto_s, rto * 2)
            # Else linear timeouts, like Linux's for thin streams: with no queue on the path,
            # a resend lost to noise is not news of congestion, and doubling the RTO at each
            # would stall a lossy link for seconds (a round trip fails half the time at 30 %
            # loss each way).
            stream.backoff += 1
            stream.recover_to = _sent_to(stream)
            # Resend one congestion window's worth now; the rest as acks come back. Resending
            # a whole window into a receiver that just dropped it would only drop it again.
            for out in due:
                out.lost = True
            stream.lost = deque(due)
            self._resend_lost(stream, budget, now)
        stream.resend_at = self._oldest_unsacked(stream)
        if stream.resend_at is None and stream.lost:
            stream.resend_at = now + stream.rto

    def _resend_lost(self, stream: _SendStream, budget: int, now: float) -> None:
        """Resend frames of the ``lost`` queue, in order, up to ``budget`` bytes (at least one)."""
        lost = stream.lost
        while lost and budget > 0:
            out = lost.popleft()
            if not out.lost:
                continue  # acked, sacked or abandoned since
            out.lost = False
            if out.expires_at - stream.one_way_s <= now:
                self._abandon(stream, out)
                self._update_skip(stream)
                continue
            self._resend(stream, out, now)
            budget -= out.size

    def _resend(self, stream: _SendStream, out: _Outgoing, now: float) -> None:
        ttl_ms = max(1, int((out.expires_at - now - stream.one_way_s) * 1000))
        out.sent_at = now
        stream.xmits += 1
        out.xmit = stream.xmits
        out.resends += 1
        stream.round_lost += out.size
        stream.round_frames += 1
        stream.outbox.append(self._data(out, ttl_ms, now, stream.one_way_s))
        stream.counters["frames_resent"] += 1

    def _receive_ack(self, peer: EndpointId, stream: _SendStream, ack: Ack, now: float) -> None:
        unacked = stream.unacked
        # At least a smoothed round trip and enough frames for the share to mean something (of 32
        # frames at 30 % random loss, half are lost about once in a hundred rounds).
        round_over = now >= stream.round_end and stream.round_frames >= _ROUND_FRAMES
        if round_over:
            # A round trip is over: what share of what left us in it was lost. The larger of
            # the last two rounds counts: after a round that lost much comes one of repairs,
            # which loses little until the window overflows again.
            total = stream.round_delivered + stream.round_lost
            share = stream.round_lost / total if total else 0.0
            stream.round_loss = max(share, stream.round_share)
            stream.round_share = share
            stream.round_delivered = stream.round_lost = stream.round_frames = 0
        if ack.backlog:
            stream.backlog_at = now
        cumulative = min(ack.cumulative, stream.next_seq - 1)
        if cumulative > stream.acked_to:
            stream.acked_to = cumulative
            if stream.skip_to > cumulative + 1:
                stream.skip_sent_at = float("-inf")  # the next step of a long skip, at once
                self._dirty.add(peer)
        newest: _Outgoing | None = None
        freed = 0
        freed_sacked = 0  # of freed, bytes an earlier ack had sacked (arrived before)
        arrived = 0  # frames this ack says arrived, not said before
        newly_sacked = 0
        rack = stream.rack_xmit
        acked = 0
        # unacked is in sequence order: pop from the front while cumulatively acknowledged.
        while unacked:
            out = next(iter(unacked.values()))
            if out.seq > cumulative:
                break
            del unacked[out.seq]
            acked += 1
            freed += out.size
            if out.xmit > rack:
                rack = out.xmit
            out.lost = False
            if out.sacked:
                stream.sacked -= 1
                stream.sacked_bytes -= out.size
                freed_sacked += out.size
                arrived -= 1
            elif out.abandoned:
                stream.abandoned -= 1
            elif out.resends == 0:
                newest = out
        highest = cumulative
        ranges = ack.ranges
        if ranges:
            # Walk unacked and the ranges together (both ascending). A covered frame is marked
            # sacked: not resent, but kept until cumulatively acked, because a receiver that
            # forgets its buffer (the peer was removed and came back) reneges: a sacked frame
            # no longer covered must become due again.
            highest = ranges[-1][1]
            # An ack reaching less far than one already seen may simply be older (acks can be
            # reordered): it marks what it covers but is not taken as evidence of reneging.
            current = highest >= stream.sack_top
            stream.sack_top = max(stream.sack_top, highest)
            index = 0
            for seq, held in unacked.items():
                if seq > highest:
                    break
                while ranges[index][1] < seq:
                    index += 1
                if ranges[index][0] <= seq:
                    if not held.sacked and not held.abandoned:
                        held.sacked = True
                        held.lost = False
                        newly_sacked += held.size
                        arrived += 1
                        stream.sacked += 1
                        stream.sacked_bytes += held.size
                        if held.xmit > rack:
                            rack = held.xmit
                        if held.resends == 0 and (newest is None or seq > newest.seq):
                            newest = held
                elif held.sacked and current:
                    held.sacked = False
                    stream.sacked -= 1
                    stream.sacked_bytes -= held.size
                    stream.counters["reneged"] += 1
        elif stream.sacked:
            for held in unacked.values():
                held.sacked = False  # nothing is buffered over there any more
            stream.counters["reneged"] += stream.sacked
            stream.sacked = 0
            stream.sacked_bytes = 0
            stream.sack_top = 0
        stream.rack_xmit = rack
        if newest is not None:
            self._sample_rtt(stream, now - newest.sent_at, now)
        elif acked and stream.backoff:
            # Progress ends a backoff even without a sample (only resent frames were acked,
            # Karn's rule): the path works, and under heavy loss a sample may be long in coming
            # while every further loss would wait out a doubled timeout.
            self._reset_rto(stream)
        if round_over:
            stream.round_end = now + (stream.srtt or self.config.initial_rto_s)
        # What this ack says arrived, and what it makes us resend (_fast_retransmit), count in
        # the same round.
        stream.round_delivered += freed - freed_sacked + newly_sacked
        stream.round_frames += acked + arrived
        if acked:
            stream.in_flight_bytes -= freed
            stream.queued_bytes -= freed
            cwnd = stream.cwnd
            if cwnd < self.config.window_bytes:
                if cwnd < stream.ssthresh:
                    stream.cwnd = cwnd + freed  # slow start: doubles per round trip
                else:  # about one largest datagram more per round trip
                    stream.cwnd = cwnd + max(1, MAX_DATAGRAM_BYTES * freed // cwnd)
            stream.counters["frames_acked"] += acked
            # Progress restarts the retransmission timer (RFC 6298, 5.3).
            waiting = len(unacked) > stream.sacked + stream.abandoned
            stream.resend_at = now + stream.rto if waiting else None
            self._update_skip(stream)
            self._dirty.add(peer)  # the window opened
            if peer in self._blocked:
                self._blocked.discard(peer)
                self._events.append(SendSpaceFreed(peer))
        if stream.lost and (freed or newly_sacked):
            # The ack clock: what left the network lets twice as much be resent (slow start).
            self._resend_lost(stream, 2 * (freed + newly_sacked), now)
        if ack.ranges and unacked:
            self._fast_retransmit(stream, highest, now)
        if stream.outbox:
            self._dirty.add(peer)
        if stream.resend_at is None and len(unacked) > stream.sacked + stream.abandoned:
            stream.resend_at = now + stream.rto  # e.g. a renege made sacked frames due again

    @staticmethod
    def _oldest_unsacked(stream: _SendStream) -> float | None:
        """When the retransmission timer should fire: the oldest frame not sacked, plus RTO."""
        oldest = min(
            (
                o.sent_at
                for o in stream.unacked.values()
                if not o.sacked and not o.abandoned and not o.lost
            ),
            default=None,
        )
        return None if oldest is None else oldest + stream.rto

    def _fast_retransmit(self, stream: _SendStream, highest: int, now: float) -> None:
        """Resend the frames a later transmission overtook (RACK, RFC 8985): the receiver has
        something we sent after them, so they are lost, unless merely reordered (they get a
        quarter of the least round trip to turn up). A resent frame is judged by its resend,
        never again for what overtook its first transmission (resending it once per ack, as a
        threshold of sequence numbers would, floods a lossy link)."""
        rack = stream.rack_xmit
        reordering_s = (stream.min_rtt or 0.0) / 4
        for seq, out in stream.unacked.items():
            if seq > highest:
                break
            if out.sacked or out.abandoned or out.lost or out.xmit >= rack:
                continue
            if now - out.sent_at >= reordering_s and out.expires_at - stream.one_way_s > now:
                if seq > stream.recover_to:  # a new loss episode: halve the window once
                    if self._congested(stream, now):
                        stream.ssthresh = max(self.config.min_congestion_bytes, stream.cwnd // 2)
                        stream.cwnd = stream.ssthresh
                        stream.counters["congestion_events"] += 1
                    else:
                        stream.counters["losses_tolerated"] += 1
                    stream.recover_to = _sent_to(stream)
                self._resend(stream, out, now)
                stream.counters["fast_resends"] += 1

    def _sample_rtt(self, stream: _SendStream, rtt: float, now: float) -> None:
        if stream.srtt is None:
            stream.srtt = rtt
            stream.rttvar = rtt / 2
        else:
            stream.rttvar = (1 - _RTT_BETA) * stream.rttvar + _RTT_BETA * abs(stream.srtt - rtt)
            stream.srtt = (1 - _RTT_ALPHA) * stream.srtt + _RTT_ALPHA * rtt
        if (
            stream.min_rtt is None
            or rtt <= stream.min_rtt
            or now - stream.min_rtt_at > _MIN_RTT_WINDOW_S
        ):
            stream.min_rtt = rtt
            stream.min_rtt_at = now
        self._reset_rto(stream)
        stream.one_way_s = stream.srtt / 2

    def _reset_rto(self, stream: _SendStream) -> None:
        """The RTO from the round-trip estimates (RFC 6298 2.3), with no backoff."""
        stream.backoff = 0
        if stream.srtt is None:
            stream.rto = self.config.initial_rto_s
            return
        config = self.config
        stream.rto = min(config.max_rto_s, max(config.min_rto_s, stream.srtt + 4 * stream.rttvar))

    def _congested(self, stream: _SendStream, now: float) -> bool:
        """Whether a loss now is taken for congestion: a queue stands on the path (or we cannot
        tell yet), and it is not the receiver's own. See ``TransportConfig.queue_delay_s``."""
        if stream.round_loss >= _CONGESTED_LOSS:
            # Half a round trip lost: a window overflowing a queue, even one too short to read
            # as a queue in the round trip (a switch port's few hundred KB at 1 Gbit/s: 2-5 ms).
            # Random loss that high is a broken link, and halving costs nothing there.
            return True
        srtt, min_rtt = stream.srtt, stream.min_rtt
        if srtt is None or min_rtt is None:
            return True
        delay = self.config.queue_delay_s
        if now - stream.backlog_at <= max(srtt, delay):
            # The receiver is the slow end and the queue is in its socket, which the window
            # (window_bytes) keeps from overflowing: a loss there is not the queue's doing, and
            # halving would only idle the receiver (64 B bundles at 10 % loss: 0.67 of the
            # lossless goodput with halving, 0.98 without).
            return False
        return srtt - min_rtt > max(min_rtt, delay)

    # --- receiving internals --------------------------------------------------------------------

    def _receive_data(self, peer: EndpointId, recv: _RecvStream, frame: Data, now: float) -> None:
        seq = frame.seq
        config = self.config
        if seq <= recv.delivered_to or seq in recv.buffer:
            recv.counters["duplicates_dropped"] += 1
            self._ack_soon(peer, recv, now, immediately=True)  # our ack was probably lost
            return
        if seq == recv.delivered_to + 1:
            recv.delivered_to = seq
            self._events.append(FrameReceived(peer, frame, now))
            recv.counters["frames_delivered"] += 1
            if recv.buffer:
                self._drain(peer, recv, now)
            self._ack_soon(peer, recv, now, immediately=bool(recv.buffer))
            return
        if (
            seq > recv.delivered_to + config.window_frames
            or recv.buffered_bytes + len(frame.payload) > config.reorder_bytes
        ):
            recv.counters["frames_beyond_window"] += 1
            return
        size = len(frame.payload)
        if self._receive_buffered + size > config.receive_buffer_bytes:
            recv.counters["frames_beyond_receive_buffer"] += 1  # not acked: resent later
            return
        recv.buffer[seq] = (frame, now + frame.ttl_ms / 1000.0, now)
        recv.buffered_bytes += size
        self._receive_buffered += size
        # A new hole: tell the sender now. A frame extending the run above the newest hole
        # tells it nothing new, so it waits for the usual delayed ack (an immediate ack per
        # frame there tripled the acks, and their cost, under 10 % loss).
        new_hole = recv.buffer_top <= recv.delivered_to or seq != recv.buffer_top + 1
        if seq > recv.buffer_top:
            recv.buffer_top = seq
        self._ack_soon(peer, recv, now, immediately=new_hole)

    def _drain(self, peer: EndpointId, recv: _RecvStream, now: float) -> None:
        buffer = recv.buffer
        while (entry := buffer.pop(recv.delivered_to + 1, None)) is not None:
            frame, expires_at, arrived_at = entry
            recv.delivered_to += 1
            recv.buffered_bytes -= len(frame.payload)
            self._receive_buffered -= len(frame.payload)
            if expires_at <= now:
                recv.counters["frames_expired_in_buffer"] += 1
                self._skipped(peer, recv, frame.seq, frame.seq)
            else:
                self._events.append(FrameReceived(peer, frame, arrived_at))
                recv.counters["frames_delivered"] += 1

    def _receive_skip(self, peer: EndpointId, recv: _RecvStream, skip: Skip, now: float) -> None:
        seq = skip.seq
        self._ack_soon(peer, recv, now, immediately=True)
        if seq - 1 <= recv.delivered_to:
            return
        if seq - 1 > recv.delivered_to + self.config.window_frames:
            # No sender skips more than a window past what we acknowledged (it steps): this one
            # was forged (a Skip to 10**15 would make every later real frame a "duplicate").
            recv.counters["skips_beyond_window"] += 1
            return
        # The sender abandoned everything below seq: its frames expired, or it dropped them when
        # it lost us for a while (a resumed stream). Frames of that range held here are dropped
        # too, never delivered: after a resume, the topics layer may send their messages again
        # from history, and delivering these first would put later messages before them.
        # Walk only what is buffered (a skip may cover many frames never sent).
        buffer = recv.buffer
        for held in [s for s in buffer if s < seq]:
            frame, _, _ = buffer.pop(held)
            recv.buffered_bytes -= len(frame.payload)
            self._receive_buffered -= len(frame.payload)
            recv.counters["frames_discarded_by_skip"] += 1
        self._skipped(
            peer, recv, recv.delivered_to + 1, seq - 1, "dropped" if skip.dropped else "expired"
        )
        recv.delivered_to = seq - 1
        self._drain(peer, recv, now)

    def _skipped(
        self,
        peer: EndpointId,
        recv: _RecvStream,
        first: int,
        last: int,
        reason: Literal["expired", "dropped"] = "expired",
    ) -> None:
        self._events.append(FramesSkipped(peer, first, last, reason))
        recv.counters["frames_skipped"] += last - first + 1

    def _ack_soon(
        self, peer: EndpointId, recv: _RecvStream, now: float, *, immediately: bool
    ) -> None:
        recv.unacked += 1
        if immediately or recv.unacked >= self.config.ack_every:
            recv.ack_at = now
            self._dirty.add(peer)
        elif recv.ack_at is None:
            recv.ack_at = now + self.config.ack_delay_s
        else:
            return
        if recv.ack_at < self.ack_due:
            self.ack_due = recv.ack_at

    def _make_ack(self, recv: _RecvStream) -> Ack:
        recv.ack_at = None
        recv.unacked = 0
        recv.counters["acks_sent"] += 1
        backlog = recv.backlogs != self._backlogs
        recv.backlogs = self._backlogs
        if not recv.buffer:
            return Ack(recv.delivered_to, (), backlog)
        return Ack(recv.delivered_to, held_ranges(recv.buffer), backlog)
