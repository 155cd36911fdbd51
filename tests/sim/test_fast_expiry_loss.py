"""Large messages under heavy loss, with discovery timeouts of a few hundred milliseconds.

Announcements every 200 ms and a peer dropped after 400 ms of silence (multiplier 2, the
default), 20-30 % of every datagram lost (announcements too), 1 MiB messages in 64 KiB datagrams.
While the sender waits for a retransmission timeout, liveness depends on the data path: the
sender's resends and the receiver's acks are what each hears of the other between announcements.
The promise under test is the strongest one: *every* message arrives, exactly once and in order
(none expires: 30 s of expiry), and the sender ends with nothing unacknowledged and no delivery
failure to report, whether or not a peer was ever taken for gone in between.

``--sim-runs`` scales the number of seeds like the other randomized suites (one run here costs
more: a tenth of them are made), and ``--sim-seed`` replays one.
"""

from __future__ import annotations

import random
import time

import pytest

from glue.sim import NetworkProfile, Simulation

MESSAGE_BYTES = 1024 * 1024
EXPIRY_S = 30.0


def _payload(number: int) -> bytes:
    head = b"%d:" % number
    return head + bytes([number % 251]) * (MESSAGE_BYTES - len(head))


def run_scenario(seed: int) -> tuple[int, int]:
    """One seeded run; returns (removals seen, virtual seconds)."""
    rng = random.Random(seed)
    profile = NetworkProfile(
        loss=rng.uniform(0.2, 0.3), min_delay_s=0.00005, max_delay_s=rng.uniform(0.0002, 0.002)
    )
    sim = Simulation(seed=seed, profile=profile, rate_s=0.2, multiplier=2.0, datagram_bytes=65_507)
    sender, receiver = sim.add_node("tx"), sim.add_node("rx")
    receiver.subscribe("stream", "bytes")
    assert sim.run_until(lambda: bool(sender.stack.topics.subscribers("stream")), timeout=30), (
        f"seed {seed}: the subscriber was not discovered"
    )
    count = rng.randint(10, 20)
    for number in range(1, count + 1):
        assert sender.publish("stream", "bytes", _payload(number), expiry=EXPIRY_S) == 1
        sim.run_for(rng.choice([0.0, 0.0, 0.001, 0.01]))
    done = sim.run_until(
        lambda: len(receiver.topic_messages) >= count and sender.stack.idle(), timeout=EXPIRY_S
    )
    numbers = [int(m.payload.split(b":", 1)[0]) for m in receiver.topic_messages]
    removals = len(sender.removals(receiver)) + len(receiver.removals(sender))
    assert numbers == list(range(1, count + 1)), (
        f"seed {seed}: delivered {numbers} of 1..{count} ({removals} removals)"
    )
    for message in receiver.topic_messages:
        assert message.payload == _payload(int(message.payload.split(b":", 1)[0])), (
            f"seed {seed}: a corrupted message"
        )
    assert done, f"seed {seed}: the sender still holds unacknowledged messages"
    failures = sender.stack.take_delivery_failures()
    assert not failures, f"seed {seed}: delivery failures reported: {failures}"
    return removals, round(sim.now)


def test_large_messages_through_heavy_loss_with_fast_expiry(
    request: pytest.FixtureRequest,
) -> None:
    only = request.config.getoption("--sim-seed")
    runs = max(20, request.config.getoption("--sim-runs") // 10)
    seeds = [only] if only is not None else range(runs)
    started = time.perf_counter()
    removals = 0
    for seed in seeds:
        removed, _ = run_scenario(seed)
        removals += removed
    print(
        f"\n{len(seeds)} seeded runs of 10-20 x 1 MiB at 20-30 % loss, 400 ms discovery "
        f"timeout: every message delivered once, in order; {removals} peer removals on the way; "
        f"{time.perf_counter() - started:.1f} s"
    )
