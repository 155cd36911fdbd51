"""Exactly-once, in-order, never-late delivery under loss, duplication, reordering and partitions.

Each run draws its network (0-30 % loss, 0-10 % duplication, random delays that reorder), its
nodes, its messages (small and multi-fragment, short and long expiries) and one partition that
heals, all from its seed. ``--sim-runs`` sets the number of runs (1000 in CI; 100000 on demand)
and ``--sim-seed`` replays one. A failure names its seed.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

import pytest

from glue.events import PeerRemoved
from glue.sim import NetworkProfile, SimNode, Simulation

LONG_EXPIRY_S = 120.0


@dataclass
class Sent:
    sender: str
    receiver: str
    number: int
    at: float
    expiry: float
    payload: bytes


@dataclass
class Report:
    seed: int
    sent: list[Sent] = field(default_factory=list)
    delivered: int = 0
    owed: int = 0
    virtual_s: float = 0.0
    #: What _all_long_delivered last looked at (sizes), when its answer was no.
    checked: tuple[int, ...] = ()


def _payload(rng: random.Random, sender: str, number: int) -> bytes:
    head = f"{sender}:{number}:".encode()
    size = rng.choice([0, 10, 64, 500, 1400, 3000, 20000])
    return head + rng.randbytes(size)


def run_scenario(seed: int) -> Report:
    rng = random.Random(seed)
    profile = NetworkProfile(
        loss=rng.uniform(0.0, 0.3),
        duplicate=rng.uniform(0.0, 0.1),
        min_delay_s=0.0001,
        max_delay_s=rng.uniform(0.0005, 0.03),
    )
    sim = Simulation(seed=seed, profile=profile, rate_s=0.2, multiplier=5.0)
    nodes = [sim.add_node(f"n{i}") for i in range(rng.randint(2, 4))]
    met = sim.run_until(
        lambda: all(n.knows(*[o for o in nodes if o is not n]) for n in nodes), timeout=30
    )
    assert met, f"seed {seed}: discovery did not converge"
    report = Report(seed)
    counters = {(a.name, b.name): 0 for a in nodes for b in nodes if a is not b}
    partition_at = sim.now + rng.uniform(0.0, 1.0)
    heal_at = partition_at + rng.uniform(0.05, 2.5)  # sometimes longer than the 1 s timeout
    side = rng.sample(nodes, rng.randint(1, len(nodes) - 1))
    others = [n for n in nodes if n not in side]
    partitioned = healed = False
    for _ in range(rng.randint(20, 60)):
        sim.run_for(rng.uniform(0.0, 0.08))
        if not partitioned and sim.now >= partition_at:
            sim.partition(side, others)
            partitioned = True
        if partitioned and not healed and sim.now >= heal_at:
            sim.heal()
            healed = True
        sender, receiver = rng.sample(nodes, 2)
        # Often a burst at one instant: small messages of one burst travel as one bundle.
        for _ in range(rng.choice([1, 1, 1, 3, 10])):
            key = (sender.name, receiver.name)
            number = counters[key] = counters[key] + 1
            expiry = LONG_EXPIRY_S if rng.random() < 0.7 else rng.uniform(0.01, 0.5)
            payload = _payload(rng, sender.name, number)
            if sender.send(receiver, payload, expiry=expiry):
                report.sent.append(Sent(*key, number, sim.now, expiry, payload))
    if not healed:
        sim.run_for(max(0.0, heal_at - sim.now))
        sim.heal()
    # Long enough for every long-lived message to get through after healing.
    sim.run_until(lambda: _all_long_delivered(report, nodes), timeout=60)
    report.virtual_s = sim.now
    _check(report, nodes)
    return report


def _all_long_delivered(report: Report, nodes: list[SimNode]) -> bool:
    # Checked after every simulation step: only when a message or an event came since the last
    # check (nothing else changes the answer), and indexed once per check (what _gap_free and a
    # scan of the received messages per message would tell, in linear time).
    state = (len(report.sent), *(len(n.received) + len(n.events) for n in nodes))
    if report.checked == state:
        return False
    report.checked = state
    received = {n.name: {m.payload for m in n.received} for n in nodes}
    names = {n.endpoint_id: n.name for n in nodes}
    last_removal: dict[frozenset[str], float] = {}
    for node in nodes:
        for at, event in node.events:
            if isinstance(event, PeerRemoved) and event.peer.endpoint_id in names:
                pair = frozenset((node.name, names[event.peer.endpoint_id]))
                last_removal[pair] = max(at, last_removal.get(pair, at))
    for sent in report.sent:
        if sent.expiry < LONG_EXPIRY_S:
            continue
        removed_at = last_removal.get(frozenset((sent.sender, sent.receiver)))
        if removed_at is not None and removed_at >= sent.at:
            continue  # not gap-free (see _gap_free): not owed
        if sent.payload not in received[sent.receiver]:
            return False
    return True


def _gap_free(receiver: SimNode, sender_name: str, since: float) -> bool:
    """No removal between the two, either way, after ``since`` (then delivery is owed)."""
    sender = next(n for n in receiver.sim.nodes if n.name == sender_name)
    for node, other in ((receiver, sender), (sender, receiver)):
        for at, event in node.events:
            if (
                at >= since
                and isinstance(event, PeerRemoved)
                and event.peer.endpoint_id == other.endpoint_id
            ):
                return False
    return True


def _check(report: Report, nodes: list[SimNode]) -> None:
    seed = report.seed
    sent_by_key = {(s.sender, s.receiver, s.number): s for s in report.sent}
    for receiver in nodes:
        last: dict[str, int] = {}
        for message in receiver.received:
            sender_name, number_text, _ = message.payload.split(b":", 2)
            sender, number = sender_name.decode(), int(number_text)
            sent = sent_by_key.get((sender, receiver.name, number))
            assert sent is not None, f"seed {seed}: {receiver.name} got a message never sent"
            assert message.payload == sent.payload, f"seed {seed}: corrupted {sender}:{number}"
            assert number > last.get(sender, 0), (
                f"seed {seed}: {receiver.name} got {sender}:{number} after "
                f"{sender}:{last.get(sender)} (duplicate or out of order)"
            )
            last[sender] = number
            # The receiver counts the time to live from arrival (it cannot read the sender's
            # clock), so "never late" holds up to one transit time.
            transit = receiver.sim.profile.max_delay_s
            assert message.received_at <= sent.at + sent.expiry + transit, (
                f"seed {seed}: {sender}:{number} delivered after its expiry"
            )
            report.delivered += 1
    for sent in report.sent:
        if sent.expiry < LONG_EXPIRY_S:
            continue
        receiver = next(n for n in nodes if n.name == sent.receiver)
        if _gap_free(receiver, sent.sender, sent.at):
            report.owed += 1
            assert any(m.payload == sent.payload for m in receiver.received), (
                f"seed {seed}: {sent.sender}:{sent.number} to {sent.receiver} never delivered"
            )


def test_seeded_runs_deliver_exactly_once_in_order_never_late(
    request: pytest.FixtureRequest,
) -> None:
    only = request.config.getoption("--sim-seed")
    seeds = [only] if only is not None else range(request.config.getoption("--sim-runs"))
    started = time.perf_counter()
    delivered = sent = owed = 0
    for seed in seeds:
        report = run_scenario(seed)
        delivered += report.delivered
        sent += len(report.sent)
        owed += report.owed
    if len(seeds) >= 50:  # the liveness check must have had work to do
        assert owed > sent // 4, (owed, sent)
    print(
        f"\n{len(seeds)} seeded runs (seeds {min(seeds)}..{max(seeds)}): {sent} messages sent, "
        f"{delivered} delivered ({owed} owed by the rules, all of them delivered), "
        f"{time.perf_counter() - started:.1f} s; "
        "replay one with --sim-seed N"
    )
