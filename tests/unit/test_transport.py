"""glue.transport: two ``Transport`` instances driven by hand, every frame moved by the test.

``Pair`` plays the network between endpoint A (id 1, incarnation 10) and endpoint B (id 2,
incarnation 20), like aioquic's ``transfer()`` and h11's ``ConnectionPair``: ``pull`` takes what
one side wants to send now, ``push`` hands frames to the other side, and the test decides which
frames are lost, duplicated or reordered. Time is ``pair.now``; it moves only when a test sets it
or fires the timer at ``next_deadline()``.

Timings are powers of two (RTO 1/8 s, ack delay 1/128 s, ...) so that every deadline and every
``ttl_ms`` below is exact in binary floating point and can be asserted with ``==``.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from glue import wire
from glue.transport import (
    FrameReceived,
    FramesSkipped,
    SendSpaceFreed,
    StreamsDropped,
    Transport,
    TransportConfig,
    TransportEvent,
    held_ranges,
)
from glue.wire import MAX_ACK_RANGES, MAX_TTL_MS, Ack, Data, EndpointId, Header, Skip

A = EndpointId(1)
B = EndpointId(2)
INC_A = 10
INC_B = 20

RTO0 = 1 / 8  # initial RTO
MIN_RTO = 1 / 32
MAX_RTO = 1.0
ACK_DELAY = 1 / 128
LONG = 64.0  # a lifetime no test outlives
CONFIG = TransportConfig(
    window_frames=64,
    window_bytes=1 << 20,
    queue_bytes=1 << 20,
    initial_rto_s=RTO0,
    min_rto_s=MIN_RTO,
    max_rto_s=MAX_RTO,
    ack_delay_s=ACK_DELAY,
    ack_every=32,
)

Frames = list[Data | Ack | Skip]


def data(seq: int, payload: bytes = b"x", ttl_ms: int = 64_000) -> Data:
    return Data(seq, payload, ttl_ms)


class Pair:
    """Transports ``a`` (endpoint A) and ``b`` (endpoint B) that know each other."""

    def __init__(self, config: TransportConfig = CONFIG, config_b: TransportConfig | None = None):
        self.a = Transport(config)
        self.b = Transport(config_b or config)
        self.a.add_peer(B, INC_B)
        self.b.add_peer(A, INC_A)
        self.now = 0.0

    def other(self, side: Transport) -> Transport:
        return self.b if side is self.a else self.a

    def identity(self, side: Transport) -> tuple[EndpointId, int]:
        return (A, INC_A) if side is self.a else (B, INC_B)

    def at(self, now: float) -> Pair:
        assert now >= self.now, "time never runs backwards"
        self.now = now
        return self

    def send(self, *payloads: bytes, life: float = LONG, side: Transport | None = None) -> None:
        """Queue payloads on ``side`` (default a) that expire ``life`` seconds from now."""
        side = side or self.a
        peer, _ = self.identity(self.other(side))
        for payload in payloads:
            assert side.send(peer, payload, expires_at=self.now + life, now=self.now)

    def pull(self, side: Transport) -> Frames:
        """What ``side`` sends now (to its only peer)."""
        out = side.frames_to_send(now=self.now)
        if not out:
            return []
        [(peer, frames)] = out
        assert peer == self.identity(self.other(side))[0]
        return frames

    def push(self, side: Transport, frames: Iterable[Data | Ack | Skip]) -> None:
        """Hand ``frames`` to ``side``, as sent by the other side."""
        source, incarnation = self.identity(self.other(side))
        for frame in frames:
            side.receive(frame, source, incarnation, now=self.now)

    def pull_data(self, side: Transport) -> list[Data]:
        """What ``side`` sends now, which must be data frames only."""
        frames = self.pull(side)
        assert all(isinstance(frame, Data) for frame in frames), frames
        return [frame for frame in frames if isinstance(frame, Data)]

    def transfer(self, side: Transport) -> Frames:
        """Move everything ``side`` sends now to the other side, losing nothing."""
        frames = self.pull(side)
        self.push(self.other(side), frames)
        return frames

    def timer(self, side: Transport) -> float:
        """Advance to ``side``'s deadline and fire its timer there."""
        deadline = side.next_deadline()
        assert deadline is not None
        self.at(max(self.now, deadline))
        side.handle_timer(now=self.now)
        return self.now

    @staticmethod
    def events(side: Transport) -> list[TransportEvent]:
        out = []
        while (event := side.next_event()) is not None:
            out.append(event)
        return out


def seqs(frames: Iterable[Data | Ack | Skip]) -> list[int]:
    """The sequence numbers of data frames (and nothing else may be there)."""
    out = []
    for frame in frames:
        assert isinstance(frame, Data), frame
        out.append(frame.seq)
    return out


def received(*frames: Data) -> list[TransportEvent]:
    """The events for ``frames`` delivered from A."""
    return [FrameReceived(A, frame) for frame in frames]


def counters(side: Transport, *keys: str) -> dict[str, int]:
    totals = side.total_counters()
    return {key: totals[key] for key in keys}


def rtt_exchange(pair: Pair, rtt: float) -> None:
    """One frame from a to b, acked at once: gives a an RTT sample of exactly ``rtt``."""
    pair.send(b"warm-up")
    start = pair.now
    pair.transfer(pair.a)
    pair.timer(pair.b)  # the delayed ack
    pair.events(pair.b)
    ack = pair.pull(pair.b)
    assert len(ack) == 1
    assert isinstance(ack[0], Ack)
    pair.at(start + rtt).push(pair.a, ack)


# --- delivery -------------------------------------------------------------------------------------


def test_frames_are_delivered_in_order_exactly_once() -> None:
    pair = Pair()
    pair.send(b"one", b"two", b"three")
    frames = pair.pull_data(pair.a)
    assert frames == [data(1, b"one"), data(2, b"two"), data(3, b"three")]
    pair.push(pair.b, frames)
    assert pair.events(pair.b) == received(*frames)
    assert pair.a.in_flight(B) == 3
    # The ack waits for ack_delay_s; then one ack covers all three.
    assert pair.pull(pair.b) == []
    assert pair.timer(pair.b) == ACK_DELAY
    assert pair.transfer(pair.b) == [Ack(3)]
    assert pair.a.in_flight(B) == 0
    assert pair.a.next_deadline() is None
    assert pair.b.next_deadline() is None
    assert counters(pair.b, "frames_delivered", "acks_sent") == {
        "frames_delivered": 3,
        "acks_sent": 1,
    }
    assert counters(pair.a, "frames_acked") == {"frames_acked": 3}


def test_payloads_and_fragment_fields_arrive_unchanged() -> None:
    pair = Pair()
    pair.a.send(B, b"\n\x00", expires_at=LONG, now=0.0, part=2, parts=5)
    assert pair.transfer(pair.a) == [Data(1, b"\n\x00", 64_000, 2, 5)]
    assert pair.events(pair.b) == received(Data(1, b"\n\x00", 64_000, 2, 5))


def test_a_duplicate_is_dropped_and_acknowledged_at_once() -> None:
    pair = Pair()
    pair.send(b"one")
    [frame] = pair.pull_data(pair.a)
    pair.push(pair.b, [frame])
    assert pair.events(pair.b) == received(frame)
    assert pair.timer(pair.b) == ACK_DELAY
    assert pair.pull(pair.b) == [Ack(1)]  # lost
    pair.at(0.0625).push(pair.b, [frame])  # the sender's copy, resent or duplicated
    assert pair.events(pair.b) == []
    assert pair.b.next_deadline() == 0.0625  # re-acked at once: our ack was probably lost
    assert pair.pull(pair.b) == [Ack(1)]
    assert counters(pair.b, "duplicates_dropped", "frames_delivered") == {
        "duplicates_dropped": 1,
        "frames_delivered": 1,
    }


def test_a_duplicate_of_a_buffered_frame_is_dropped_too() -> None:
    pair = Pair()
    pair.send(b"one", b"two")
    one, two = pair.pull_data(pair.a)
    pair.push(pair.b, [two, two])
    assert pair.events(pair.b) == []
    assert pair.pull(pair.b) == [Ack(0, ((2, 2),))]
    assert counters(pair.b, "duplicates_dropped") == {"duplicates_dropped": 1}
    pair.push(pair.b, [one, one, two])
    assert pair.events(pair.b) == received(one, two)
    assert pair.pull(pair.b) == [Ack(2)]  # duplicates are acked at once
    assert counters(pair.b, "duplicates_dropped", "frames_delivered") == {
        "duplicates_dropped": 3,
        "frames_delivered": 2,
    }


def test_out_of_order_frames_wait_and_the_ack_lists_them_in_sack_ranges() -> None:
    pair = Pair()
    pair.send(*(bytes([n]) for n in range(1, 8)))
    f = {frame.seq: frame for frame in pair.pull_data(pair.a)}
    pair.push(pair.b, [f[1], f[6], f[3], f[7]])  # 2, 4 and 5 are late
    assert pair.events(pair.b) == received(f[1])
    # A gap: the ack goes at once, with the buffered frames as ranges.
    assert pair.b.next_deadline() == 0.0
    assert pair.pull(pair.b) == [Ack(1, ((3, 3), (6, 7)))]
    pair.at(0.25).push(pair.b, [f[2]])
    assert pair.events(pair.b) == received(f[2], f[3])
    assert pair.pull(pair.b) == [Ack(3, ((6, 7),))]  # a gap remains: at once again
    pair.push(pair.b, [f[5]])
    assert pair.pull(pair.b) == [Ack(3, ((5, 7),))]
    pair.push(pair.b, [f[4]])
    assert pair.events(pair.b) == received(f[4], f[5], f[6], f[7])
    # No gap left: the ack is delayed again.
    assert pair.pull(pair.b) == []
    assert pair.b.next_deadline() == 0.25 + ACK_DELAY
    assert pair.timer(pair.b) == 0.25 + ACK_DELAY
    assert pair.pull(pair.b) == [Ack(7)]


def test_an_ack_lists_at_most_the_64_lowest_ranges() -> None:
    config = TransportConfig(initial_rto_s=RTO0, window_frames=1024)
    pair = Pair(config)
    pair.push(pair.b, [data(seq) for seq in range(3, 2 * MAX_ACK_RANGES + 40, 2)])
    [ack] = pair.pull(pair.b)
    assert ack == Ack(0, tuple((seq, seq) for seq in range(3, 2 * MAX_ACK_RANGES + 3, 2)))
    assert len(ack.ranges) == MAX_ACK_RANGES
    wire.encode(Header(1, A, INC_A, INC_B), [ack])  # and it fits the wire format


@given(st.sets(st.integers(1, 400), max_size=300))
def test_held_ranges_are_the_lowest_runs_of_what_is_held(held: set[int]) -> None:
    # The plain definition: walk the numbers in order, extend the last run or start one.
    runs: list[list[int]] = []
    for seq in sorted(held):
        if runs and runs[-1][1] == seq - 1:
            runs[-1][1] = seq
        else:
            runs.append([seq, seq])
    expected = tuple((first, last) for first, last in runs[:MAX_ACK_RANGES])
    assert held_ranges(held) == expected
    assert held_ranges(reversed(sorted(held))) == expected  # order of arrival does not matter


def test_the_ack_is_delayed_by_ack_delay_from_the_first_unacked_frame() -> None:
    pair = Pair()
    pair.push(pair.b, [data(1)])
    assert pair.b.next_deadline() == ACK_DELAY
    pair.at(ACK_DELAY / 2).push(pair.b, [data(2)])
    assert pair.b.next_deadline() == ACK_DELAY  # not pushed back by later frames
    pair.b.handle_timer(now=pair.now)
    assert pair.pull(pair.b) == []
    assert pair.timer(pair.b) == ACK_DELAY
    assert pair.pull(pair.b) == [Ack(2)]
    assert pair.b.next_deadline() is None


def test_a_delayed_ack_rides_along_with_data() -> None:
    pair = Pair()
    pair.push(pair.b, [data(1, b"ping")])
    pair.at(ACK_DELAY / 4).send(b"pong", side=pair.b)
    assert pair.pull(pair.b) == [Ack(1), Data(1, b"pong", 64_000)]
    # The ack went: the only deadline left is b's retransmission timer.
    assert pair.b.next_deadline() == ACK_DELAY / 4 + RTO0


def test_every_ack_every_frames_an_ack_goes_at_once() -> None:
    pair = Pair(TransportConfig(initial_rto_s=RTO0, ack_delay_s=ACK_DELAY, ack_every=4))
    pair.push(pair.b, [data(1), data(2), data(3)])
    assert pair.pull(pair.b) == []
    pair.push(pair.b, [data(4)])
    assert pair.pull(pair.b) == [Ack(4)]
    pair.push(pair.b, [data(5)])
    assert pair.b.next_deadline() == ACK_DELAY  # counting starts again


def test_ack_due_says_when_an_ack_is_due_and_take_due_acks_makes_only_those() -> None:
    # What a runtime reading a long burst asks between datagrams (see Transport.ack_due).
    pair = Pair(TransportConfig(initial_rto_s=RTO0, ack_delay_s=ACK_DELAY, ack_every=4))
    assert pair.b.ack_due == math.inf
    pair.push(pair.b, [data(1)])
    assert pair.b.ack_due == ACK_DELAY  # the delayed ack
    assert pair.b.take_due_acks(now=ACK_DELAY / 2) == []  # not yet
    pair.push(pair.b, [data(2), data(3), data(4)])
    assert pair.b.ack_due == 0.0  # ack_every frames: due at once
    assert pair.b.take_due_acks(now=0.0) == [(A, Ack(4))]
    assert pair.b.ack_due == math.inf  # exact again: nothing is waiting
    pair.at(0.5).push(pair.b, [data(6)])  # a hole: due at once too
    assert pair.b.ack_due == 0.5
    assert pair.b.take_due_acks(now=0.5) == [(A, Ack(4, ((6, 6),)))]
    assert pair.pull(pair.b) == []  # made once: frames_to_send has no second copy of it
    # It sends nothing but acks: b's own data waits for frames_to_send.
    pair.push(pair.b, [data(5)])  # the hole filled: a delayed ack again
    pair.send(b"pong", side=pair.b)
    assert pair.b.ack_due == 0.5 + ACK_DELAY
    assert pair.b.take_due_acks(now=0.5 + ACK_DELAY) == [(A, Ack(6))]
    assert pair.pull(pair.b) == [Data(1, b"pong", 64_000)]


def test_acks_in_the_middle_of_a_burst_are_half_an_ack_delay_apart() -> None:
    # Holes found one after the other in a burst would each ask for an ack at once (3.5 x the
    # acks at 10 % loss); between two, half an ack delay.
    pair = Pair(TransportConfig(initial_rto_s=RTO0, ack_delay_s=ACK_DELAY, ack_every=4))
    pair.push(pair.b, [data(2)])  # a hole: due at once
    assert pair.b.take_due_acks(now=0.0) == [(A, Ack(0, ((2, 2),)))]
    pair.push(pair.b, [data(4)])  # another, right after
    assert pair.b.take_due_acks(now=0.0) == []
    assert pair.b.ack_due == ACK_DELAY / 2
    assert pair.b.take_due_acks(now=ACK_DELAY / 2) == [(A, Ack(0, ((2, 2), (4, 4))))]
    # The end of the wake-up (frames_to_send) is not held back: it sends what is due then.
    pair.at(ACK_DELAY / 2).push(pair.b, [data(6)])
    assert pair.pull(pair.b) == [Ack(0, ((2, 2), (4, 4), (6, 6)))]


# --- retransmission timer -------------------------------------------------------------------------


def test_the_first_rtt_sample_sets_srtt_rttvar_and_rto() -> None:
    """RFC 6298 2.2: SRTT = R, RTTVAR = R/2, RTO = max(min_rto, SRTT + 4 RTTVAR)."""
    pair = Pair()
    pair.send(b"x")
    pair.pull(pair.a)
    assert pair.a.next_deadline() == RTO0  # before any sample: the initial RTO
    pair.at(1 / 16).push(pair.a, [Ack(1)])
    assert pair.a.next_deadline() is None
    pair.at(1.0).send(b"y")
    pair.pull(pair.a)
    assert pair.a.next_deadline() == 1.0 + 1 / 16 + 4 * (1 / 32)


def test_later_rtt_samples_are_smoothed() -> None:
    """RFC 6298 2.3: RTTVAR = 3/4 RTTVAR + 1/4 |SRTT - R|, then SRTT = 7/8 SRTT + 1/8 R."""
    pair = Pair()
    rtt_exchange(pair, 1 / 16)  # srtt 1/16, rttvar 1/32
    pair.at(1.0).send(b"y")
    pair.pull(pair.a)
    pair.at(1.0 + 1 / 8).push(pair.a, [Ack(2)])
    rttvar = 3 / 4 * (1 / 32) + 1 / 4 * abs(1 / 16 - 1 / 8)
    srtt = 7 / 8 * (1 / 16) + 1 / 8 * (1 / 8)
    pair.at(2.0).send(b"z")
    pair.pull(pair.a)
    assert pair.a.next_deadline() == 2.0 + srtt + 4 * rttvar


def test_the_rto_is_at_least_min_rto() -> None:
    pair = Pair()
    rtt_exchange(pair, 1 / 128)  # srtt + 4 rttvar = 3/128 < 1/32
    pair.at(1.0).send(b"y")
    pair.pull(pair.a)
    assert pair.a.next_deadline() == 1.0 + MIN_RTO


def test_the_rto_is_at_most_max_rto() -> None:
    pair = Pair()
    rtt_exchange(pair, 1.0)  # srtt + 4 rttvar = 3 s
    pair.at(4.0).send(b"y")
    pair.pull(pair.a)
    assert pair.a.next_deadline() == 4.0 + MAX_RTO


def test_the_ttl_sent_is_the_time_left_less_half_the_smoothed_rtt() -> None:
    """The receiver counts ttl from arrival, so the sender takes the transit time off."""
    pair = Pair()
    pair.send(b"x", life=1.0)
    assert pair.pull(pair.a) == [Data(1, b"x", 1000)]  # no estimate yet
    pair.at(1 / 16).push(pair.a, [Ack(1)])  # srtt 1/16: one way 1/32
    pair.send(b"y", life=1.0)
    assert pair.pull(pair.a) == [Data(2, b"y", int((1.0 - 1 / 32) * 1000))]
    pair.send(b"z", life=2 * MAX_TTL_MS / 1000)
    assert pair.pull(pair.a) == [Data(3, b"z", MAX_TTL_MS)]  # capped at one day


def test_a_lost_frame_is_resent_after_the_rto_which_doubles() -> None:
    pair = Pair()
    pair.send(b"x")
    assert pair.pull(pair.a) == [Data(1, b"x", 64_000)]  # lost
    assert pair.a.next_deadline() == RTO0
    assert pair.timer(pair.a) == RTO0
    assert pair.pull(pair.a) == [Data(1, b"x", 63_875)]  # lost again
    assert pair.a.next_deadline() == RTO0 + 2 * RTO0
    assert pair.timer(pair.a) == 3 * RTO0
    [frame] = pair.transfer(pair.a)
    assert frame == Data(1, b"x", 63_625)
    assert pair.events(pair.b) == received(frame)
    assert counters(pair.a, "timeouts", "frames_resent") == {"timeouts": 2, "frames_resent": 2}


def test_backoff_is_capped_at_max_rto_and_ended_by_progress() -> None:
    pair = Pair()
    pair.send(b"x")
    pair.pull(pair.a)
    fired = []
    for _ in range(7):
        fired.append(pair.timer(pair.a))
        assert seqs(pair.pull(pair.a)) == [1]
    # 1/8, then +1/4, +1/2, +1, and +1 from there on (max_rto 1 s).
    assert fired == [0.125, 0.375, 0.875, 1.875, 2.875, 3.875, 4.875]
    assert pair.a.next_deadline() == 5.875
    # The resent frame gets through: no sample (Karn), but progress ends the backoff: the RTO
    # is the estimate's again (no estimate yet: the initial one).
    pair.at(5.0).push(pair.a, [Ack(1)])
    pair.send(b"y")
    assert pair.pull(pair.a) == [Data(2, b"y", 64_000)]
    assert pair.a.next_deadline() == 5.0 + RTO0
    # A frame sent once and acked: a sample, and the RTO is computed afresh.
    pair.at(5.0 + 1 / 16).push(pair.a, [Ack(2)])
    pair.send(b"z")
    pair.pull(pair.a)
    assert pair.a.next_deadline() == 5.0 + 1 / 16 + 3 / 16


def test_karn_the_sample_comes_only_from_frames_sent_once() -> None:
    pair = Pair()
    pair.send(b"old")
    pair.pull(pair.a)  # seq 1, lost
    pair.at(1 / 16).send(b"new")
    pair.pull(pair.a)  # seq 2
    pair.timer(pair.a)  # 1/8: seq 1 resent; seq 2 is not due yet
    assert pair.pull(pair.a) == [Data(1, b"old", 63_875)]
    # One ack covers both: the sample is seq 2's (3/16 - 1/16 = 1/8), never seq 1's.
    pair.at(3 / 16).push(pair.a, [Ack(2)])
    pair.at(1.0).send(b"next")
    pair.pull(pair.a)
    assert pair.a.next_deadline() == 1.0 + 1 / 8 + 4 * (1 / 16)


def test_a_sacked_frame_gives_a_sample_too() -> None:
    pair = Pair()
    pair.send(b"1", b"2")
    pair.pull(pair.a)
    stream = pair.a._peers[B].send
    pair.at(1 / 16).push(pair.a, [Ack(0, ((2, 2),))])
    assert stream.srtt == 1 / 16  # the first sample, from seq 2, selectively acked
    assert stream.min_rtt == 1 / 16


def test_next_deadline_is_the_retransmission_timer() -> None:
    pair = Pair()
    assert pair.a.next_deadline() is None
    pair.send(b"1")
    assert pair.a.next_deadline() is None  # nothing sent yet
    pair.pull(pair.a)
    assert pair.a.next_deadline() == RTO0
    pair.at(1 / 16).send(b"2")
    pair.pull(pair.a)
    assert pair.a.next_deadline() == RTO0  # one timer, for the oldest frame
    # An ack that makes progress restarts it from now (RFC 6298 5.3) with the new RTO.
    pair.at(3 / 32).push(pair.a, [Ack(1)])
    assert pair.a.next_deadline() == 3 / 32 + 3 * (3 / 32)
    pair.at(1 / 8).push(pair.a, [Ack(2)])
    assert pair.a.next_deadline() is None


def test_the_timer_fires_only_at_its_deadline() -> None:
    pair = Pair()
    pair.send(b"1")
    pair.pull(pair.a)
    pair.a.handle_timer(now=RTO0 - 1 / 1024)
    assert pair.at(RTO0 - 1 / 1024).pull(pair.a) == []
    assert counters(pair.a, "timeouts") == {"timeouts": 0}
    pair.a.handle_timer(now=RTO0)
    assert pair.at(RTO0).pull(pair.a) == [Data(1, b"1", 63_875)]


def test_fast_retransmit_when_a_later_transmission_is_sacked() -> None:
    # RACK (RFC 8985): a frame sent after this one arrived, so this one is lost (it had a
    # quarter of the least round trip to turn up, in case it was only reordered).
    pair = Pair()
    rtt_exchange(pair, 1 / 16)  # seq 1; srtt 1/16
    pair.at(1.0).send(b"2", b"3", b"4", b"5")
    _two, three, four, five = pair.pull_data(pair.a)
    pair.push(pair.b, [three])  # two is lost
    ack = pair.pull(pair.b)
    assert ack == [Ack(1, ((3, 3),))]
    pair.at(1.0 + 1 / 16).push(pair.a, ack)
    resent = pair.pull_data(pair.a)
    # Before the RTO (1 + 3/16); the ttl is what is left less srtt / 2.
    assert resent == [Data(2, b"2", int((65.0 - (1.0 + 1 / 16) - 1 / 32) * 1000))]
    assert counters(pair.a, "fast_resends", "frames_resent", "timeouts") == {
        "fast_resends": 1,
        "frames_resent": 1,
        "timeouts": 0,
    }
    pair.push(pair.b, [four, five, *resent])
    assert pair.events(pair.b) == received(*resent, three, four, five)


def test_a_resent_frame_is_resent_again_only_when_a_later_transmission_overtakes_it() -> None:
    pair = Pair()
    rtt_exchange(pair, 1 / 16)  # least round trip 1/16: reordering window 1/64
    pair.at(1.0).send(b"2", b"3", b"4", b"5")
    pair.pull(pair.a)
    sack = [Ack(1, ((3, 5),))]
    pair.at(1.0 + 1 / 32).push(pair.a, sack)
    assert seqs(pair.pull(pair.a)) == [2]
    pair.at(1.0 + 3 / 32).push(pair.a, sack)  # nothing sent after the resend arrived: wait
    assert pair.pull(pair.a) == []
    pair.send(b"6")
    assert seqs(pair.pull(pair.a)) == [6]
    pair.at(1.0 + 4 / 32).push(pair.a, [Ack(1, ((3, 6),))])  # 6 overtook the resend of 2
    assert seqs(pair.pull(pair.a)) == [2]
    assert counters(pair.a, "fast_resends") == {"fast_resends": 2}


def test_sacked_frames_are_not_resent_on_timeout() -> None:
    pair = Pair()
    pair.send(b"1", b"2", b"3")
    pair.pull(pair.a)
    pair.at(1 / 128).push(pair.a, [Ack(0, ((2, 3),))])  # rto: 1/32 (min_rto)
    assert seqs(pair.pull(pair.a)) == [1]  # overtaken by 2 and 3: resent at once (lost again)
    assert pair.timer(pair.a) == RTO0
    assert pair.pull(pair.a) == [Data(1, b"1", int((64 - 1 / 8 - 1 / 256) * 1000))]


# --- expiry ---------------------------------------------------------------------------------------


def test_an_expired_frame_is_not_resent_and_a_skip_is_repeated_until_acked() -> None:
    pair = Pair()
    pair.send(b"short", life=0.25)
    assert pair.pull(pair.a) == [Data(1, b"short", 250)]  # lost
    assert pair.timer(pair.a) == 0.125
    assert pair.pull(pair.a) == [Data(1, b"short", 125)]  # lost
    assert pair.timer(pair.a) == 0.375  # past 0.25: abandoned, not resent
    assert pair.pull(pair.a) == [Skip(2)]  # lost
    assert counters(pair.a, "frames_expired", "frames_resent", "skips_sent") == {
        "frames_expired": 1,
        "frames_resent": 1,
        "skips_sent": 1,
    }
    # Repeated every RTO until acked: 1/4 s, since only the first timer resent something (a
    # timer that only abandons does not back off, and skips do not back off).
    assert pair.a.next_deadline() == 0.375 + 0.25
    assert pair.timer(pair.a) == 0.625
    assert pair.pull(pair.a) == [Skip(2)]  # lost
    assert pair.timer(pair.a) == 0.875
    assert pair.transfer(pair.a) == [Skip(2)]
    assert pair.events(pair.b) == [FramesSkipped(A, 1, 1)]
    assert pair.transfer(pair.b) == [Ack(1)]  # at once
    assert pair.a.next_deadline() is None
    assert pair.a.in_flight(B) == 0
    # The stream carries on.
    pair.send(b"next")
    assert pair.transfer(pair.a) == [Data(2, b"next", 64_000)]
    assert pair.events(pair.b) == received(Data(2, b"next", 64_000))


def test_a_skip_the_receiver_is_past_is_only_acked() -> None:
    pair = Pair()
    pair.push(pair.b, [data(1), data(2)])
    pair.events(pair.b)
    pair.push(pair.b, [Skip(2), Skip(3)])
    assert pair.events(pair.b) == []
    assert pair.pull(pair.b) == [Ack(2)]


def test_frames_buffered_below_a_skip_are_discarded_not_delivered() -> None:
    # The sender abandoned everything below the skip (expired, or dropped while it had lost
    # us); delivering held frames of that range could put them after messages the topics
    # layer sends again from history, so they go too.
    pair = Pair()
    two, five, eight = data(2, b"2"), data(5, b"5"), data(8, b"8")
    pair.push(pair.b, [two, five, eight])
    pair.at(0.125).push(pair.b, [Skip(7)])
    assert pair.events(pair.b) == [FramesSkipped(A, 1, 6)]
    pair.push(pair.b, [data(7, b"7")])
    assert pair.events(pair.b) == received(data(7, b"7"), eight)
    assert pair.pull(pair.b) == [Ack(8)]
    assert counters(pair.b, "frames_skipped", "frames_discarded_by_skip") == {
        "frames_skipped": 6,
        "frames_discarded_by_skip": 2,
    }


def test_frames_buffered_at_and_above_the_skip_point_are_delivered_by_it() -> None:
    pair = Pair()
    pair.push(pair.b, [data(3, b"3"), data(4, b"4"), data(6, b"6")])
    pair.push(pair.b, [Skip(3)])
    assert pair.events(pair.b) == [FramesSkipped(A, 1, 2), *received(data(3, b"3"), data(4, b"4"))]
    assert pair.pull(pair.b) == [Ack(4, ((6, 6),))]


@pytest.mark.parametrize(
    ("gap_filled_at", "expected"),
    [
        pytest.param(5.125 - 1 / 1024, "delivered", id="just-alive"),
        pytest.param(5.125, "skipped", id="just-expired"),
    ],
)
def test_a_buffered_frame_lives_ttl_from_its_arrival(gap_filled_at: float, expected: str) -> None:
    pair = Pair()
    late = data(2, b"late", ttl_ms=125)
    pair.at(5.0).push(pair.b, [late])  # arrives at 5 s, whenever it was sent
    pair.at(gap_filled_at).push(pair.b, [data(1)])
    events = pair.events(pair.b)
    if expected == "delivered":
        assert events == received(data(1), late)
    else:
        assert events == [*received(data(1)), FramesSkipped(A, 2, 2)]
        assert counters(pair.b, "frames_expired_in_buffer") == {"frames_expired_in_buffer": 1}
    pair.push(pair.b, [data(3)])
    assert pair.events(pair.b) == received(data(3))


def test_an_in_order_frame_is_delivered_on_arrival_whatever_its_ttl() -> None:
    pair = Pair()
    pair.push(pair.b, [data(1, ttl_ms=1)])
    assert pair.events(pair.b) == received(data(1, ttl_ms=1))


def test_frames_expiring_in_the_send_queue_are_skipped_without_being_sent() -> None:
    config = TransportConfig(initial_rto_s=RTO0, ack_delay_s=ACK_DELAY, window_frames=1)
    pair = Pair(config)
    pair.send(b"1")
    pair.send(b"2", b"3", life=1 / 16)
    pair.send(b"4")
    assert pair.transfer(pair.a) == [Data(1, b"1", 64_000)]  # the window is full
    pair.timer(pair.b)
    pair.at(1 / 8).transfer(pair.b)  # Ack(1), srtt 1/8
    # 2 and 3 expired while queued: never sent, skipped. They hold window slots until the skip
    # is acknowledged, so 4 waits.
    assert pair.transfer(pair.a) == [Skip(3)]
    assert pair.transfer(pair.b) == [Ack(2)]
    assert pair.transfer(pair.a) == [Skip(4)]
    assert pair.transfer(pair.b) == [Ack(3)]
    four = Data(4, b"4", int((64 - 1 / 8 - 1 / 16) * 1000))  # less srtt / 2
    assert pair.transfer(pair.a) == [four]
    assert pair.events(pair.b) == [
        *received(Data(1, b"1", 64_000)),
        FramesSkipped(A, 2, 2),
        FramesSkipped(A, 3, 3),
        *received(four),
    ]
    assert counters(pair.a, "frames_expired", "frames_resent") == {
        "frames_expired": 2,
        "frames_resent": 0,
    }


def test_an_expired_frame_behind_a_live_one_is_skipped_once_the_live_one_is_acked() -> None:
    pair = Pair()
    pair.send(b"live")
    pair.send(b"short", life=5 / 32)
    pair.send(b"after")
    _, _, after = pair.pull_data(pair.a)
    pair.push(pair.b, [after])  # live and short are lost
    pair.at(1 / 128).push(pair.a, pair.pull(pair.b))  # Ack(0, ((3, 3),)): rto 1/32
    assert [f.payload for f in pair.pull_data(pair.a)] == [b"live", b"short"]  # lost again
    # Resent at every timeout (lost each time) until short expires; live must get through first.
    sent = []
    while len(sent) < 10:
        pair.timer(pair.a)
        frames = pair.pull_data(pair.a)
        sent.append([f.payload for f in frames])
        if len(frames) == 1:
            break
    assert sent[-1] == [b"live"]
    assert all(payloads == [b"live", b"short"] for payloads in sent[:-1])
    assert pair.now >= 5 / 32 - 1 / 256 > pair.now - RTO0  # short had just expired
    [live] = frames
    pair.push(pair.b, [live])
    ack = pair.pull(pair.b)
    assert ack == [Ack(1, ((3, 3),))]
    pair.push(pair.a, ack)
    assert pair.transfer(pair.a) == [Skip(3)]
    assert pair.events(pair.b) == [
        FrameReceived(A, live),
        FramesSkipped(A, 2, 2),
        FrameReceived(A, after),
    ]
    assert pair.transfer(pair.b) == [Ack(3)]
    assert pair.a.in_flight(B) == 0
    assert pair.a.next_deadline() is None


# --- windows and queues ---------------------------------------------------------------------------


def test_window_frames_bounds_the_frames_in_flight() -> None:
    pair = Pair(TransportConfig(initial_rto_s=RTO0, window_frames=4))
    pair.send(*(bytes([n]) for n in range(1, 7)))
    assert seqs(pair.pull(pair.a)) == [1, 2, 3, 4]
    assert pair.a.in_flight(B) == 6  # queued or unacknowledged
    pair.at(1 / 16).push(pair.a, [Ack(2)])
    assert seqs(pair.pull(pair.a)) == [5, 6]


def test_window_bytes_bounds_the_bytes_in_flight() -> None:
    pair = Pair(TransportConfig(initial_rto_s=RTO0, window_bytes=10))
    pair.send(b"aaaa", b"bbbb", b"cccc", b"dddd", b"eeee")
    # A frame goes while fewer than window_bytes are in flight (so one may pass it).
    assert seqs(pair.pull(pair.a)) == [1, 2, 3]
    pair.at(1 / 16).push(pair.a, [Ack(1)])
    assert seqs(pair.pull(pair.a)) == [4]
    pair.push(pair.a, [Ack(3)])
    assert seqs(pair.pull(pair.a)) == [5]


def test_sacked_frames_hold_the_window_until_cumulatively_acked() -> None:
    pair = Pair(TransportConfig(initial_rto_s=RTO0, window_frames=2))
    pair.send(b"1", b"2", b"3")
    assert seqs(pair.pull(pair.a)) == [1, 2]
    pair.at(1 / 16).push(pair.a, [Ack(0, ((2, 2),))])
    assert seqs(pair.pull(pair.a)) == [1]  # resent (2 overtook it), but 3 must wait
    pair.push(pair.a, [Ack(2)])
    assert seqs(pair.pull(pair.a)) == [3]


def test_the_receiver_drops_frames_beyond_its_window_frames() -> None:
    pair = Pair(TransportConfig(window_frames=4))
    pair.push(pair.b, [data(5)])  # 5 > 0 + 4
    assert pair.pull(pair.b) == []  # not acked: the sender will resend it
    assert counters(pair.b, "frames_beyond_window") == {"frames_beyond_window": 1}
    pair.push(pair.b, [data(4)])
    assert pair.pull(pair.b) == [Ack(0, ((4, 4),))]
    pair.push(pair.b, [data(1)])
    pair.push(pair.b, [data(5)])  # now within 1 + 4
    assert pair.pull(pair.b) == [Ack(1, ((4, 5),))]
    assert counters(pair.b, "frames_beyond_window") == {"frames_beyond_window": 1}


def test_the_receiver_buffers_at_most_reorder_bytes_out_of_order() -> None:
    pair = Pair(TransportConfig(reorder_bytes=8))
    pair.push(pair.b, [data(2, b"12345"), data(3, b"678"), data(4, b"9")])
    assert counters(pair.b, "frames_beyond_window") == {"frames_beyond_window": 1}
    assert pair.pull(pair.b) == [Ack(0, ((2, 3),))]
    pair.push(pair.b, [data(1, b"in order, whatever its size")])
    assert [e.frame.seq for e in pair.events(pair.b) if isinstance(e, FrameReceived)] == [1, 2, 3]


def test_can_send_refuses_beyond_queue_bytes_and_acks_free_room() -> None:
    pair = Pair(TransportConfig(initial_rto_s=RTO0, queue_bytes=10))
    assert pair.a.can_send(B, 10)
    pair.send(b"123456")
    assert pair.a.can_send(B, 4)
    pair.pull(pair.a)
    assert pair.a.can_send(B, 4)  # in flight still counts
    pair.send(b"abc")
    assert not pair.a.can_send(B, 2)
    assert pair.events(pair.a) == []
    pair.pull(pair.a)
    pair.at(1 / 16).push(pair.a, [Ack(0, ((2, 2),))])  # sacked frames still count
    assert pair.events(pair.a) == []
    pair.push(pair.a, [Ack(1)])
    assert pair.events(pair.a) == [SendSpaceFreed(B)]
    assert pair.a.can_send(B, 7)
    assert not pair.a.can_send(B, 8)
    pair.push(pair.a, [Ack(2)])
    assert pair.events(pair.a) == [SendSpaceFreed(B)]
    pair.send(b"x")
    pair.pull(pair.a)
    pair.push(pair.a, [Ack(3)])
    assert pair.events(pair.a) == []  # nobody was refused: no event


def test_can_send_to_an_unknown_peer_is_not_blocked_but_send_refuses() -> None:
    t = Transport(CONFIG)
    assert t.can_send(EndpointId(9), 1 << 30)
    assert not t.send(EndpointId(9), b"x", expires_at=1.0, now=0.0)
    assert t.frames_to_send(now=0.0) == []
    assert t.total_counters()["frames_to_unknown_peer"] == 1


# --- peers ----------------------------------------------------------------------------------------


def test_remove_peer_drops_everything_at_once() -> None:
    pair = Pair(TransportConfig(initial_rto_s=RTO0, window_frames=2, queue_bytes=4))
    pair.send(b"1", b"2", b"3")
    pair.pull(pair.a)
    pair.push(pair.a, [Ack(0)])
    assert not pair.a.can_send(B, 2)
    pair.a.remove_peer(B)
    assert counters(pair.a, "frames_dropped_peer_gone") == {"frames_dropped_peer_gone": 3}
    # Whoever waited is told at once, and the loss is reported.
    assert pair.events(pair.a) == [SendSpaceFreed(B), StreamsDropped(B, INC_B, 3)]
    assert pair.a.peers() == []
    assert pair.a.in_flight(B) == 0
    assert pair.a.incarnation(B) is None
    assert pair.a.next_deadline() is None
    assert pair.a.frames_to_send(now=1.0) == []
    assert not pair.a.send(B, b"x", expires_at=LONG, now=1.0)
    pair.a.remove_peer(B)  # twice: nothing more
    assert counters(pair.a, "frames_dropped_peer_gone") == {"frames_dropped_peer_gone": 3}
    # What the departed peer still sends is ignored.
    pair.push(pair.a, [data(1), Ack(3), Skip(2)])
    assert pair.events(pair.a) == []
    assert counters(pair.a, "frames_from_unknown_peer") == {"frames_from_unknown_peer": 3}


def test_a_peer_back_in_a_new_incarnation_starts_from_seq_1() -> None:
    pair = Pair()
    pair.send(b"1", b"2")
    pair.transfer(pair.a)
    pair.timer(pair.b)
    pair.transfer(pair.b)
    pair.events(pair.b)
    # B restarts: a new transport, and A learns the new incarnation from discovery.
    pair.a.add_peer(B, INC_B + 1)
    assert pair.a.incarnation(B) == INC_B + 1
    restarted = Transport(CONFIG)
    restarted.add_peer(A, INC_A)
    pair.a.send(B, b"hello", expires_at=pair.now + LONG, now=pair.now)
    [(peer, frames)] = pair.a.frames_to_send(now=pair.now)
    assert (peer, frames) == (B, [Data(1, b"hello", 64_000)])
    for frame in frames:
        restarted.receive(frame, A, INC_A, now=pair.now)
    assert restarted.next_event() == FrameReceived(A, Data(1, b"hello", 64_000))
    # Frames from the old incarnation are ignored.
    pair.push(pair.a, [Ack(2)])
    assert counters(pair.a, "frames_from_unknown_peer") == {"frames_from_unknown_peer": 1}
    assert pair.a.in_flight(B) == 1


def test_add_peer_with_the_known_incarnation_changes_nothing() -> None:
    pair = Pair()
    pair.send(b"1")
    pair.pull(pair.a)
    pair.a.add_peer(B, INC_B)
    assert pair.a.in_flight(B) == 1
    assert pair.a.next_deadline() == RTO0


def test_a_peer_removed_and_back_in_the_same_incarnation_resumes_its_streams() -> None:
    pair = Pair()
    pair.send(b"1", b"2", b"3")
    one, two, _three = pair.pull_data(pair.a)
    pair.push(pair.b, [one, two])  # three is lost
    pair.events(pair.b)
    # A partition: A's discovery drops B, then hears it again, same incarnation.
    pair.a.remove_peer(B)
    pair.a.add_peer(B, INC_B)
    assert counters(pair.a, "streams_resumed", "frames_dropped_peer_gone") == {
        "streams_resumed": 1,
        "frames_dropped_peer_gone": 3,
    }
    pair.at(1.0).send(b"4")
    assert pair.transfer(pair.a) == [Skip(4), Data(4, b"4", 64_000)]
    assert pair.events(pair.b) == [FramesSkipped(A, 3, 3), FrameReceived(A, Data(4, b"4", 64_000))]


def test_a_silent_peer_back_in_the_same_incarnation_gets_every_parked_frame_in_order() -> None:
    pair = Pair()
    pair.send(b"1", b"2", b"3")
    one, _two, _three = pair.pull_data(pair.a)
    pair.push(pair.b, [one])  # two and three are lost, and so is B's ack of one
    pair.events(pair.b)
    pair.send(b"4")  # queued while the first three are in flight
    # A's discovery takes B for gone (it went silent): its streams are parked, not dropped.
    assert pair.a.remove_peer(B, park=True) == 0
    assert pair.a.parked() == {B: 4}
    assert not pair.a.idle()  # what is parked is still owed
    assert pair.events(pair.a) == []
    assert pair.a.frames_to_send(now=pair.now) == []  # nothing goes to a peer taken for gone
    pair.at(1.0).push(pair.a, [Ack(1)])  # what it says while away is ignored
    assert counters(pair.a, "frames_from_unknown_peer") == {"frames_from_unknown_peer": 1}
    # It was only silent: the same incarnation comes back. Everything unacknowledged is resent
    # at once, then what was queued, with no Skip; B delivers each frame once, in order.
    pair.a.add_peer(B, INC_B)
    assert pair.a.parked() == {}
    pair.timer(pair.a)
    assert pair.now == 1.0
    frames = pair.transfer(pair.a)
    assert seqs(frames) == [1, 2, 3, 4]
    assert [e.frame.seq for e in pair.events(pair.b)] == [2, 3, 4]  # 1 once, before
    assert counters(pair.b, "duplicates_dropped") == {"duplicates_dropped": 1}
    pair.timer(pair.b)
    pair.transfer(pair.b)
    assert pair.a.idle()
    assert counters(pair.a, "streams_parked", "streams_unparked", "frames_dropped_peer_gone") == {
        "streams_parked": 1,
        "streams_unparked": 1,
        "frames_dropped_peer_gone": 0,
    }


def test_a_parked_receive_buffer_is_kept_and_acknowledged_on_return() -> None:
    pair = Pair()
    pair.send(b"1", b"2", b"3")
    _one, two, three = pair.pull_data(pair.a)
    pair.push(pair.b, [two, three])  # one is lost: B buffers two and three
    pair.pull(pair.b)  # its selective ack is lost too
    pair.b.remove_peer(A, park=True)  # B takes A for gone
    pair.b.add_peer(A, INC_A)  # and hears it again
    assert pair.b.next_deadline() == float("-inf")  # it tells A at once what it holds
    pair.b.handle_timer(now=pair.now)
    assert pair.pull(pair.b) == [Ack(0, ((2, 3),))]
    pair.push(pair.b, [_one])
    assert [e.frame.seq for e in pair.events(pair.b)] == [1, 2, 3]


def test_parked_frames_are_dropped_and_reported_once_they_expire() -> None:
    pair = Pair()
    pair.send(b"1", b"2", life=2.0)
    pair.send(b"3", life=5.0)
    pair.pull(pair.a)
    pair.a.remove_peer(B, park=True)
    assert pair.a.next_deadline() == 5.0  # when the last parked frame expires
    pair.a.handle_timer(now=4.9)  # nothing yet
    assert pair.a.parked() == {B: 3}
    assert pair.timer(pair.a) == 5.0
    assert pair.a.parked() == {}
    assert pair.a.idle()
    assert pair.events(pair.a) == [StreamsDropped(B, INC_B, 3)]
    assert counters(pair.a, "parked_streams_dropped_expired") == {
        "parked_streams_dropped_expired": 1
    }
    # A later return in the same incarnation resumes after a Skip, as for a dropped stream.
    pair.a.add_peer(B, INC_B)
    pair.at(6.0).send(b"4")
    assert pair.transfer(pair.a) == [Skip(4), Data(4, b"4", 64_000)]


def test_parked_streams_are_bounded_in_bytes_oldest_dropped_first() -> None:
    config = TransportConfig(parked_bytes=10)
    t = Transport(config)
    for peer in (EndpointId(5), EndpointId(6), EndpointId(7)):
        t.add_peer(peer, 1)
        assert t.send(peer, b"12345", expires_at=LONG, now=0.0)
        t.remove_peer(peer, park=True)
    assert t.parked() == {EndpointId(6): 1, EndpointId(7): 1}
    assert list(t.take_events()) == [StreamsDropped(EndpointId(5), 1, 1)]
    assert t.total_counters()["parked_streams_dropped_memory"] == 1


def test_a_parked_peer_back_as_a_new_incarnation_loses_the_old_frames() -> None:
    pair = Pair()
    pair.send(b"1", b"2")
    pair.pull(pair.a)
    pair.a.remove_peer(B, park=True)
    pair.a.add_peer(B, INC_B + 1)
    assert pair.events(pair.a) == [StreamsDropped(B, INC_B, 2)]
    assert pair.a.idle()
    assert pair.a.incarnation(B) == INC_B + 1


def test_messages_are_counted_not_frames_when_streams_are_dropped() -> None:
    t = Transport(CONFIG)
    t.add_peer(B, INC_B)
    for part in range(3):  # one message in three fragments
        t.send(B, b"f", expires_at=LONG, now=0.0, part=part, parts=3)
    t.send(B, b"abc", expires_at=LONG, now=0.0, bundle=([1, 1, 1], [LONG, LONG, LONG]))
    t.send(B, b"z", expires_at=LONG, now=0.0)
    assert t.remove_peer(B) == 1 + 3 + 1
    assert t.total_counters()["frames_dropped_peer_gone"] == 5


def test_frames_from_an_unknown_peer_or_incarnation_are_counted_and_ignored() -> None:
    pair = Pair()
    for frame in (data(1), Ack(0), Skip(5)):
        pair.b.receive(frame, EndpointId(9), INC_A, now=0.0)
        pair.b.receive(frame, A, INC_A + 1, now=0.0)
        pair.b.receive(frame, A, INC_A - 1, now=0.0)
    assert counters(pair.b, "frames_from_unknown_peer") == {"frames_from_unknown_peer": 9}
    assert pair.events(pair.b) == []
    assert pair.pull(pair.b) == []
    assert pair.b.next_deadline() is None
    pair.push(pair.b, [data(1)])  # the right incarnation: the stream starts at 1
    assert pair.events(pair.b) == received(data(1))


# --- bugs -----------------------------------------------------------------------------------------


def test_a_timer_that_finds_nothing_due_does_not_back_off() -> None:
    pair = Pair()
    pair.send(b"1", b"2", b"3", b"4", b"5")
    pair.pull(pair.a)  # the timer: 1/8
    # 1 and 2 are lost; 3, 4 and 5 are sacked after 1/16 (srtt 1/16, rto 3/16), so 1 and 2
    # are fast-retransmitted at 1/16 (and lost again).
    pair.at(1 / 16).push(pair.a, [Ack(0, ((3, 5),))])
    assert seqs(pair.pull(pair.a)) == [1, 2]
    # At 1/8 the timer fires, but neither frame has been unacknowledged for an RTO yet.
    assert pair.timer(pair.a) == 1 / 8
    assert pair.pull(pair.a) == []
    # They are due one RTO after their resend: 1/16 + 3/16. The code doubles the RTO first
    # (counting a timeout that resent nothing) and resends them only at 1/16 + 3/8.
    assert pair.a.next_deadline() == 1 / 16 + 3 / 16
    assert counters(pair.a, "timeouts") == {"timeouts": 0}


# --- property -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Message:
    gap_ms: int  # after the previous send
    life_ms: int | None  # None: never expires within the run
    size: int


@dataclass(frozen=True)
class Network:
    seed: int
    loss: float
    duplicate: float
    reorder: float
    delay_ms: int


@dataclass
class Run:
    """A seeded lossy link between the pair, and everything that happened on it."""

    pair: Pair
    network: Network
    rng: random.Random = field(init=False)
    flying: list[tuple[float, int, bool, Data | Ack | Skip]] = field(default_factory=list)
    order: itertools.count[int] = field(default_factory=itertools.count)
    arrived_at: dict[int, float] = field(default_factory=dict)  # id(copy) -> arrival
    keep: list[Data] = field(default_factory=list)  # keeps ids unique
    delivered: list[tuple[float, Data]] = field(default_factory=list)
    skipped: list[tuple[int, int]] = field(default_factory=list)
    accounted: list[int] = field(default_factory=list)  # seqs, delivered or skipped, in order

    def __post_init__(self) -> None:
        self.rng = random.Random(self.network.seed)

    def emit(self, side: Transport, expires: dict[int, float]) -> None:
        pair, network, now = self.pair, self.network, self.pair.now
        frames = pair.pull(side)
        if frames:
            # Every batch is a valid datagram: e.g. no ttl of 0 (the receiver would drop it all).
            me, incarnation = pair.identity(side)
            header = Header(1, me, incarnation, pair.identity(pair.other(side))[1])
            datagram = wire.encode(header, frames)
            assert wire.decode(datagram, network_id=1).frames == tuple(frames)
        for frame in frames:
            if isinstance(frame, Data):
                # Never more life than the message has left (1 ms is the smallest ttl).
                assert frame.ttl_ms <= max(1, (expires[frame.seq] - now) * 1000), (frame, now)
            if self.rng.random() < network.loss:
                continue
            copies = 2 if self.rng.random() < network.duplicate else 1
            for _ in range(copies):
                delay = network.delay_ms / 1000
                if self.rng.random() < network.reorder:
                    delay += self.rng.uniform(0, 0.05)
                to_b = side is pair.a
                heapq.heappush(self.flying, (now + delay, next(self.order), to_b, frame))

    def arrive(self) -> None:
        pair = self.pair
        while self.flying and self.flying[0][0] <= pair.now:
            _, _, to_b, frame = heapq.heappop(self.flying)
            if to_b and isinstance(frame, Data):
                frame = Data(frame.seq, frame.payload, frame.ttl_ms, frame.part, frame.parts)
                self.arrived_at[id(frame)] = pair.now
                self.keep.append(frame)
            pair.push(pair.b if to_b else pair.a, [frame])

    def collect(self) -> None:
        for event in Pair.events(self.pair.b):
            if isinstance(event, FrameReceived):
                self.delivered.append((self.pair.now, event.frame))
                self.accounted.append(event.frame.seq)
                arrived = self.arrived_at[id(event.frame)]
                # Never delivered after its time to live, counted from its arrival.
                assert self.pair.now < arrived + event.frame.ttl_ms / 1000, event
            elif isinstance(event, FramesSkipped):
                self.skipped.append((event.first, event.last))
                self.accounted.extend(range(event.first, event.last + 1))
        Pair.events(self.pair.a)  # nobody is blocked: nothing to see there


def run_to_quiescence(
    messages: Sequence[Message], network: Network, config: TransportConfig
) -> tuple[Run, dict[int, float]]:
    pair = Pair(config)
    run = Run(pair, network)
    sends: list[tuple[float, int, Message]] = []
    at = 0.0
    for seq, message in enumerate(messages, 1):
        at += message.gap_ms / 1000
        sends.append((at, seq, message))
    expires: dict[int, float] = {}
    for step in itertools.count():
        assert step < 200_000, "no quiescence"
        run.arrive()
        while sends and sends[0][0] <= pair.now:
            _, seq, message = sends.pop(0)
            life = LONG * 1000 if message.life_ms is None else message.life_ms / 1000
            expires[seq] = pair.now + life
            pair.send(bytes([seq % 256]) * message.size, life=life)
        for side in (pair.a, pair.b):
            deadline = side.next_deadline()
            if deadline is not None and deadline <= pair.now:
                side.handle_timer(now=pair.now)
        for side in (pair.a, pair.b):
            run.emit(side, expires)
        run.collect()
        for side in (pair.a, pair.b):
            deadline = side.next_deadline()
            assert deadline is None or deadline > pair.now, (step, pair.now, deadline)
        upcoming = [
            t
            for t in (
                sends[0][0] if sends else None,
                run.flying[0][0] if run.flying else None,
                pair.a.next_deadline(),
                pair.b.next_deadline(),
            )
            if t is not None
        ]
        if not upcoming:
            return run, expires
        pair.at(max(pair.now, min(upcoming)))
    raise AssertionError("unreachable")


message = st.builds(
    Message,
    gap_ms=st.integers(0, 40),
    life_ms=st.none() | st.integers(1, 400),
    size=st.integers(0, 16),
)
# Drawing the length first keeps long runs (where fast retransmit and windows matter) common.
messages_strategy = st.integers(1, 80).flatmap(lambda n: st.lists(message, min_size=n, max_size=n))
networks = st.builds(
    Network,
    seed=st.integers(0, 2**32 - 1),
    loss=st.sampled_from([0.0, 0.1, 0.3]),
    duplicate=st.sampled_from([0.0, 0.1]),
    reorder=st.sampled_from([0.0, 0.2, 0.5]),
    delay_ms=st.integers(0, 20),
)
configs = st.builds(
    TransportConfig,
    window_frames=st.sampled_from([1, 2, 4, 64]),
    window_bytes=st.sampled_from([16, 1 << 20]),
    initial_rto_s=st.just(0.05),
    min_rto_s=st.just(0.01),
    max_rto_s=st.just(1.0),
    ack_delay_s=st.just(0.002),
    ack_every=st.sampled_from([1, 4, 32]),
)


@given(messages_strategy, networks, configs)
@settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
def test_property_exactly_once_in_order_never_late(
    messages: list[Message], network: Network, config: TransportConfig
) -> None:
    run, expires = run_to_quiescence(messages, network, config)
    pair = run.pair
    count = len(messages)
    # Every frame is accounted for exactly once, in sequence order: delivered or skipped.
    assert run.accounted == list(range(1, count + 1)), (run.skipped, network)
    delivered = [frame.seq for _, frame in run.delivered]
    assert delivered == sorted(set(delivered))
    # Each with its own payload, and at most one transit after the message expired (the ttl
    # it carries is counted from its arrival: checked as each frame is delivered).
    longest_transit = network.delay_ms / 1000 + 0.05
    for at, frame in run.delivered:
        assert frame.payload == bytes([frame.seq % 256]) * messages[frame.seq - 1].size
        assert at < expires[frame.seq] + longest_transit
    # Frames that never expire are all delivered.
    immortal = [seq for seq, m in enumerate(messages, 1) if m.life_ms is None]
    assert set(immortal) <= set(delivered)
    # Quiet: nothing queued, in flight or buffered, no timer.
    assert pair.a.in_flight(B) == 0
    assert pair.a.next_deadline() is None
    assert pair.b.next_deadline() is None
    totals = pair.b.total_counters()
    assert totals["frames_delivered"] == len(delivered)
    assert totals["frames_skipped"] == count - len(delivered)
    # Expired frames are the only ones skipped.
    for first, last in run.skipped:
        for seq in range(first, last + 1):
            assert messages[seq - 1].life_ms is not None


def test_the_property_run_reaches_loss_reorder_and_expiry() -> None:
    """The simulated link of the property test does lose, duplicate and reorder frames."""
    messages = [Message(gap_ms=n % 3, life_ms=None if n % 2 else 30, size=4) for n in range(60)]
    network = Network(seed=7, loss=0.3, duplicate=0.1, reorder=0.5, delay_ms=5)
    run, _ = run_to_quiescence(messages, network, CONFIG)
    a, b = run.pair.a.total_counters(), run.pair.b.total_counters()
    assert a["frames_resent"] > 0
    assert b["duplicates_dropped"] > 0
    assert b["frames_delivered"] >= 30
    assert b["frames_delivered"] + b["frames_skipped"] == 60
    assert Counter(isinstance(m.life_ms, int) for m in messages) == Counter({True: 30, False: 30})


# --- congestion control -------------------------------------------------------------------------

CONGESTION = TransportConfig(
    initial_rto_s=0.05, initial_congestion_bytes=4000, min_congestion_bytes=2000
)


def test_the_congestion_window_limits_bytes_in_flight_and_grows_with_acks() -> None:
    pair = Pair(CONGESTION)
    pair.send(*(bytes(1000) for _ in range(20)))
    assert seqs(pair.pull_data(pair.a)) == [1, 2, 3, 4]  # 4000 bytes: the initial window
    stream = pair.a._peers[B].send
    pair.at(0.01).push(pair.a, [Ack(4)])
    assert stream.cwnd == 8000  # slow start: every acked byte adds one
    assert seqs(pair.pull_data(pair.a)) == [5, 6, 7, 8, 9, 10, 11, 12]


def test_a_loss_with_a_queue_on_the_path_halves_the_window_once_per_episode() -> None:
    pair = Pair(CONGESTION)
    pair.send(*(bytes(1000) for _ in range(8)))
    pair.pull_data(pair.a)
    stream = pair.a._peers[B].send
    pair.at(0.01).push(pair.a, [Ack(4)])  # window 8000; 5..12 go out; least round trip 10 ms
    pair.pull_data(pair.a)
    # 5 lost, 6..9 arrived after 190 ms: srtt 32.5 ms, 22.5 ms over the least round trip (more
    # than it, and than queue_delay_s): a queue stands, the loss is congestion.
    pair.at(0.2).push(pair.a, [Ack(4, ((6, 9),))])
    assert stream.cwnd == 4000
    assert stream.ssthresh == 4000
    assert counters(pair.a, "congestion_events", "fast_resends") == {
        "congestion_events": 1,
        "fast_resends": 1,
    }
    pair.at(0.25).push(pair.a, [Ack(4, ((6, 10),))])  # the same episode: no second halving
    assert stream.cwnd == 4000


def test_a_loss_with_no_queue_on_the_path_keeps_the_window() -> None:
    # Random loss (a bad link) is not congestion: halving would slow the stream and relieve
    # nobody. No queue: the round trip stays near the least seen.
    pair = Pair(CONGESTION)
    pair.send(*(bytes(1000) for _ in range(8)))
    pair.pull_data(pair.a)
    stream = pair.a._peers[B].send
    pair.at(0.01).push(pair.a, [Ack(4)])
    pair.pull_data(pair.a)
    pair.at(0.021).push(pair.a, [Ack(4, ((6, 9),))])  # 5 lost, 6..9 after 11 ms
    assert stream.cwnd == 8000
    assert counters(pair.a, "congestion_events", "losses_tolerated", "fast_resends") == {
        "congestion_events": 0,
        "losses_tolerated": 1,
        "fast_resends": 1,
    }


def test_half_a_round_trip_lost_is_congestion_even_with_no_queue_in_the_round_trip() -> None:
    # A window sent into a queue too short to show in the round trip (a switch port's few
    # hundred KB at 1 Gbit/s): much of it is dropped at once. A round trip that lost half of
    # what left is taken for congestion, whatever the round trip says.
    pair = Pair(CONGESTION)
    pair.send(*(bytes(100) for _ in range(1000)))
    assert seqs(pair.pull_data(pair.a)) == list(range(1, 41))  # 4000 bytes
    stream = pair.a._peers[B].send
    pair.at(0.01).push(pair.a, [Ack(40)])  # window 8000: 41..120 out; least round trip 10 ms
    pair.pull_data(pair.a)
    # 41..100 lost, 101..120 arrived 11 ms later: no queue in the round trip, so noise for now.
    pair.at(0.021).push(pair.a, [Ack(40, ((101, 120),))])
    assert stream.cwnd == 8000
    assert counters(pair.a, "losses_tolerated")["losses_tolerated"] == 1
    pair.pull_data(pair.a)  # the 60 resends
    pair.at(0.032).push(pair.a, [Ack(120)])  # they arrived: that round lost 6 KB of 8 KB sent
    assert stream.round_loss == 0.75
    sent = seqs(pair.pull_data(pair.a))  # (121..140 went with the resends)
    # 121..129, sent after the first episode began, lost: a new episode.
    pair.at(0.043).push(pair.a, [Ack(120, ((130, sent[-1]),))])
    assert counters(pair.a, "congestion_events")["congestion_events"] == 1
    assert stream.cwnd == stream.ssthresh < 16000


def test_random_loss_below_half_a_round_trip_is_still_noise() -> None:
    pair = Pair(CONGESTION)
    pair.send(*(bytes(100) for _ in range(1000)))
    pair.pull_data(pair.a)
    stream = pair.a._peers[B].send
    pair.at(0.01).push(pair.a, [Ack(40)])
    pair.pull_data(pair.a)
    pair.at(0.021).push(pair.a, [Ack(40, ((56, 120),))])  # 41..55 lost: 1.5 KB of 8 KB
    pair.pull_data(pair.a)
    pair.at(0.032).push(pair.a, [Ack(120)])
    assert 0 < stream.round_loss < 0.5
    window = stream.cwnd
    sent = seqs(pair.pull_data(pair.a))
    pair.at(0.043).push(pair.a, [Ack(120, ((130, sent[-1]),))])
    assert counters(pair.a, "congestion_events", "losses_tolerated") == {
        "congestion_events": 0,
        "losses_tolerated": 2,
    }
    assert stream.cwnd >= window


def test_a_round_of_few_frames_says_nothing_of_the_share_lost() -> None:
    # Three of four frames lost is chance more often than not: a round counts 32 frames first.
    pair = Pair(CONGESTION)
    pair.send(*(bytes(1000) for _ in range(60)))
    pair.pull_data(pair.a)
    stream = pair.a._peers[B].send
    pair.at(0.01).push(pair.a, [Ack(1, ((4, 4),))])
    pair.pull_data(pair.a)
    pair.at(0.05).push(pair.a, [Ack(4)])
    assert stream.round_loss == 0.0
    assert stream.round_frames > 0  # still counting


def test_an_episode_ends_with_the_frames_sent_not_with_the_frames_queued() -> None:
    # With a thousand frames queued behind the window, an episode that lasted until the last of
    # them was sent halved an overflowing window once in half a second, where every round trip
    # needed halving.
    pair = Pair(CONGESTION)
    pair.send(*(bytes(1000) for _ in range(1000)))
    pair.pull_data(pair.a)
    stream = pair.a._peers[B].send
    pair.at(0.01).push(pair.a, [Ack(4)])
    pair.pull_data(pair.a)  # 5..12
    pair.at(0.2).push(pair.a, [Ack(4, ((6, 12),))])  # 5 lost with a queue on the path: halved
    assert stream.recover_to == 12
    assert counters(pair.a, "congestion_events")["congestion_events"] == 1
    assert seqs(pair.pull_data(pair.a)) == [5, 13, 14, 15]  # the resend, and room for three
    # 13, sent after the episode began, is lost too: a new episode, halved again.
    pair.at(0.4).push(pair.a, [Ack(12, ((14, 15),))])
    assert counters(pair.a, "congestion_events")["congestion_events"] == 2


def test_a_loss_behind_the_receivers_own_backlog_keeps_the_window() -> None:
    # The queue stands in the receiver's socket (it says so: its acks carry backlog), which the
    # window keeps from overflowing: the loss is noise there, and halving would idle it.
    pair = Pair(CONGESTION)
    pair.send(*(bytes(1000) for _ in range(8)))
    pair.pull_data(pair.a)
    stream = pair.a._peers[B].send
    pair.at(0.01).push(pair.a, [Ack(4)])
    pair.pull_data(pair.a)
    # As in the halving test (srtt well above the least round trip), but the receiver is behind.
    pair.at(0.2).push(pair.a, [Ack(4, ((6, 9),), backlog=True)])
    assert stream.cwnd == 8000
    assert counters(pair.a, "congestion_events", "losses_tolerated", "fast_resends") == {
        "congestion_events": 0,
        "losses_tolerated": 1,
        "fast_resends": 1,
    }


def test_a_backlog_said_long_ago_no_longer_excuses_a_loss() -> None:
    pair = Pair(CONGESTION)
    pair.send(*(bytes(1000) for _ in range(8)))
    pair.pull_data(pair.a)
    stream = pair.a._peers[B].send
    pair.at(0.01).push(pair.a, [Ack(4, backlog=True)])  # behind then, and no more since
    pair.pull_data(pair.a)
    pair.at(0.2).push(pair.a, [Ack(4, ((6, 9),))])
    assert stream.cwnd == 4000
    assert counters(pair.a, "congestion_events")["congestion_events"] == 1


def test_the_next_ack_after_a_backlog_says_so_once() -> None:
    pair = Pair()
    pair.send(b"one", b"two")
    pair.push(pair.b, pair.pull_data(pair.a))
    pair.b.note_backlog(now=pair.now)
    pair.at(1.0).b.handle_timer(now=pair.now)
    [ack] = pair.pull(pair.b)
    assert ack == Ack(2, (), backlog=True)
    pair.send(b"three")
    pair.push(pair.b, pair.pull_data(pair.a))
    pair.at(2.0).b.handle_timer(now=pair.now)
    [ack] = pair.pull(pair.b)
    assert ack == Ack(3)
    assert not ack.backlog


def test_a_first_timeout_with_no_queue_keeps_the_window_and_its_timeouts_are_linear() -> None:
    pair = Pair(CONGESTION)
    pair.send(*(bytes(1000) for _ in range(12)))
    pair.pull_data(pair.a)  # 1..4
    stream = pair.a._peers[B].send
    pair.at(0.01).push(pair.a, [Ack(4)])  # srtt 10 ms, rto 30 ms; window 8000
    assert seqs(pair.pull_data(pair.a)) == [5, 6, 7, 8, 9, 10, 11, 12]  # all lost
    rto = stream.rto
    fired = [pair.timer(pair.a)]
    # The first timeout keeps the window: all 8 resent at once.
    assert seqs(pair.pull_data(pair.a)) == [5, 6, 7, 8, 9, 10, 11, 12]
    assert stream.cwnd == 8000
    for _ in range(7):  # lost again and again: the window drops to its floor, then ...
        fired.append(pair.timer(pair.a))
        assert seqs(pair.pull_data(pair.a)) == [5, 6]
    assert stream.cwnd == 2000
    # ... the same RTO six times in a row (linear), then doubling.
    gaps = [round(b - a, 9) for a, b in itertools.pairwise(fired)]
    assert gaps == [round(rto, 9)] * 6 + [round(2 * rto, 9)]
    assert counters(pair.a, "timeouts", "timeouts_tolerated") == {
        "timeouts": 8,
        "timeouts_tolerated": 1,
    }
    # Progress (an ack of resent frames: no sample) ends the backoff.
    pair.at(pair.now + 0.001).push(pair.a, [Ack(6)])
    assert stream.rto == rto


def test_a_retransmission_timeout_drops_the_window_to_its_floor() -> None:
    pair = Pair(CONGESTION)
    pair.send(*(bytes(1000) for _ in range(4)))
    pair.pull_data(pair.a)  # all lost
    stream = pair.a._peers[B].send
    pair.timer(pair.a)
    assert stream.cwnd == 2000
    assert stream.ssthresh == 2000
    # One window's worth is resent now, the rest as acks come back (the ack clock): resending
    # everything into a receiver that just dropped it would only drop it again.
    assert seqs(pair.pull_data(pair.a)) == [1, 2]
    pair.at(pair.now + 0.01).push(pair.a, [Ack(2)])
    assert seqs(pair.pull_data(pair.a)) == [3, 4]
    pair.at(pair.now + 0.01).push(pair.a, [Ack(4)])
    assert pair.a.in_flight(B) == 0


def test_frames_waiting_after_a_timeout_go_when_the_timer_fires_again_if_no_ack_comes() -> None:
    pair = Pair(CONGESTION)
    pair.send(*(bytes(1000) for _ in range(4)))
    pair.pull_data(pair.a)
    pair.timer(pair.a)
    assert seqs(pair.pull_data(pair.a)) == [1, 2]  # lost again, and no ack ever comes
    pair.timer(pair.a)
    assert seqs(pair.pull_data(pair.a)) == [1, 2]  # the oldest first, again one window
    pair.at(pair.now + 0.01).push(pair.a, [Ack(4)])  # the peer had them after all
    assert pair.a.in_flight(B) == 0
    assert pair.a.next_deadline() is None


def test_out_of_order_frames_of_all_peers_together_are_bounded() -> None:
    # Many peers (fake ones included) each within its own window cannot make the receive
    # buffers grow without bound: past receive_buffer_bytes a frame is neither buffered nor
    # acknowledged, so its sender resends it; in-order frames need no buffer and still flow.
    t = Transport(TransportConfig(window_bytes=1000, receive_buffer_bytes=2500))
    peers = [EndpointId(10 + n) for n in range(5)]
    for peer in peers:
        t.add_peer(peer, 1)
        for seq in range(2, 12):  # seq 1 never comes: all out of order
            t.receive(Data(seq, b"x" * 100, 60_000), peer, 1, now=0.0)
    total = t.total_counters()
    assert total["frames_beyond_receive_buffer"] == 25  # 2500 bytes held, the rest refused
    assert total["frames_beyond_window"] == 0
    t.receive(Data(1, b"in order", 60_000), peers[-1], 1, now=0.0)  # still delivered
    assert [e.frame.seq for e in t.take_events() if isinstance(e, FrameReceived)] == [1]
    t.remove_peer(peers[0])  # its buffer is released: room again
    t.receive(Data(5, b"y" * 100, 60_000), peers[-1], 1, now=0.0)
    assert t.total_counters()["frames_beyond_receive_buffer"] == 25


def test_a_skip_beyond_the_window_is_refused_and_a_long_skip_goes_in_steps() -> None:
    # A forged Skip(10**15) would make every later real frame a "duplicate": no sender skips more
    # than a window past what was acknowledged, so the receiver refuses it.
    pair = Pair(TransportConfig(window_frames=4, initial_rto_s=RTO0))
    pair.push(pair.b, [Skip(10**15)])
    assert counters(pair.b, "skips_beyond_window") == {"skips_beyond_window": 1}
    pair.send(b"1")
    pair.transfer(pair.a)
    assert [e.frame.seq for e in pair.events(pair.b) if isinstance(e, FrameReceived)] == [1]
    # A resumed stream after many frames were dropped skips far, in steps of a window.
    pair.a.remove_peer(B)
    for _ in range(20):  # frames that would have been sent meanwhile (dropped with the stream)
        pair.a._retired[(B, INC_B)] = (pair.a._retired[(B, INC_B)][0] + 1, 0)
    pair.a.add_peer(B, INC_B)
    pair.at(1.0).send(b"after")
    got: list[FrameReceived] = []
    for _ in range(100):  # lossless exchange, timers fired when nothing moves
        moved = pair.transfer(pair.a) + pair.transfer(pair.b)
        got += [e for e in pair.events(pair.b) if isinstance(e, FrameReceived)]
        if got or moved:
            continue
        side = min(
            (s for s in (pair.a, pair.b) if s.next_deadline() is not None),
            key=lambda s: s.next_deadline(),
        )
        pair.timer(side)
    assert [e.frame.payload for e in got] == [b"after"]
    assert counters(pair.b, "skips_beyond_window") == {"skips_beyond_window": 1}


def test_a_fragment_the_layer_above_has_no_room_for_is_neither_delivered_nor_acked() -> None:
    room = {"yes": False}
    receiver = Transport(CONFIG, admit=lambda peer, frame: room["yes"])
    receiver.add_peer(A, INC_A)
    fragment = Data(1, b"part", 64_000, 0, 2)
    receiver.receive(fragment, A, INC_A, now=0.0)
    assert receiver.take_events() == []
    assert receiver.frames_to_send(now=1.0) == []  # not acknowledged: its sender resends it
    assert receiver.total_counters()["frames_refused_no_room"] == 1
    receiver.receive(Data(1, b"whole", 64_000), A, INC_A, now=0.0)  # unfragmented: not asked
    room["yes"] = True
    receiver.receive(Data(2, b"part", 64_000, 0, 2), A, INC_A, now=0.0)  # the resend, later
    assert [e.frame.seq for e in receiver.take_events()] == [1, 2]
