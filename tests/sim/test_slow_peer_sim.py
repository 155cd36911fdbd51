"""A stuck peer beside a healthy one, in the simulator: what the outbox holds or drops.

The stuck subscriber is cut off from the publisher (no datagram either way) but never taken for
gone (a discovery timeout of minutes), as a peer that announces and never acknowledges would be.
The publisher's send queue per peer is 64 KiB. Messages go through ``Stack.submit``, the entry
point of both runtimes.
"""

from __future__ import annotations

from glue.sim import SimNode, Simulation
from glue.transport import TransportConfig

COUNT = 200
SIZE = 2000  # more than a bundle: one frame each


def _setup(slow_peer: str, count: int = COUNT) -> tuple[Simulation, SimNode, SimNode, SimNode]:
    sim = Simulation(
        seed=7,
        rate_s=0.5,
        multiplier=600.0,
        transport=TransportConfig(queue_bytes=64 * 1024),
        slow_peer=slow_peer,
    )
    publisher, healthy, stuck = (sim.add_node(n) for n in ("publisher", "healthy", "stuck"))
    for subscriber in (healthy, stuck):
        subscriber.subscribe("plant/#", "reading")
    assert sim.run_until(
        lambda: len(publisher.stack.topics.subscribers("plant/pump")) == 2, timeout=10
    )
    sim.partition([publisher], [stuck])
    for number in range(1, count + 1):
        publisher.publish("plant/pump", "reading", b"%d:" % number + bytes(SIZE), expiry=600)
        sim.run_for(0.002)
    return sim, publisher, healthy, stuck


def _sequences(node: SimNode) -> list[int]:
    return [m.sequence for m in node.topic_messages]


def test_a_stuck_peer_holds_its_messages_and_the_healthy_one_gets_every_one() -> None:
    sim, publisher, healthy, stuck = _setup("block")
    assert sim.run_until(lambda: len(healthy.topic_messages) == COUNT, timeout=10)
    assert _sequences(healthy) == list(range(1, COUNT + 1))
    outbox = publisher.stack.outbox
    assert outbox.held_peers() == (stuck.endpoint_id,)
    held = len(outbox.held[stuck.endpoint_id])
    assert 0 < held < COUNT
    # Healed: the held messages go as acks make room; every one arrives, once, in order.
    sim.heal()
    assert sim.run_until(lambda: len(stuck.topic_messages) == COUNT, timeout=60)
    assert _sequences(stuck) == list(range(1, COUNT + 1))
    assert not outbox.holding
    assert sim.run_until(publisher.stack.idle, timeout=5)  # and acknowledged


def test_with_slow_peer_drop_the_stuck_peer_loses_its_backlog_and_sees_a_gap() -> None:
    sim, publisher, healthy, stuck = _setup("drop")
    assert sim.run_until(lambda: len(healthy.topic_messages) == COUNT, timeout=10)
    assert _sequences(healthy) == list(range(1, COUNT + 1))
    assert not publisher.stack.outbox.holding
    dropped = publisher.stack.all_counters()["messages_dropped_slow_peer"]
    assert dropped > 0
    sim.heal()
    assert sim.run_until(lambda: publisher.stack.idle(), timeout=60)
    got = _sequences(stuck)
    assert got, "the tail queued after the last drop arrives"
    assert got == list(range(got[0], COUNT + 1))  # a gap, then in order, once
    assert got[0] - 1 <= dropped


def test_runs_of_small_messages_are_held_for_a_stuck_peer_from_the_first_without_room() -> None:
    # Small messages placed as runs (Stack.submit_many, as the runtimes place them while frames
    # are in flight): the healthy peer takes each run whole; the stuck one takes what fits of
    # the run that fills its queue, and holds the rest, in order, for when it acknowledges.
    sim, publisher, healthy, stuck = _setup("block", count=0)
    for start in range(1, 4001, 100):
        payloads = [b"%d:" % number + bytes(80) for number in range(start, start + 100)]
        publisher.publish_many("plant/pump", "reading", payloads, expiry=600)
        sim.run_for(0.002)
    assert sim.run_until(lambda: len(healthy.topic_messages) == 4000, timeout=10)
    assert _sequences(healthy) == list(range(1, 4001))
    outbox = publisher.stack.outbox
    assert outbox.held_peers() == (stuck.endpoint_id,)
    assert 0 < len(outbox.held[stuck.endpoint_id]) < 4000
    sim.heal()
    assert sim.run_until(lambda: len(stuck.topic_messages) == 4000, timeout=60)
    assert _sequences(stuck) == list(range(1, 4001))
    assert [m.payload.split(b":")[0] for m in stuck.topic_messages] == [
        b"%d" % n for n in range(1, 4001)
    ]
    assert not outbox.holding
    assert sim.run_until(publisher.stack.idle, timeout=5)
