"""Work queues over a lossy simulated network (docs/work-queues.md).

Each seeded run (a tenth of ``--sim-runs``): a publisher and 3 group members, loss 0-15 %,
duplication, reordering; jobs are published while the members work through them (each member
finishes what it was given as it arrives); one member is cut off from the publisher mid-run
and never finishes its jobs, so the publisher takes it for gone. In the end every job was done,
no job was given out unflagged twice, only the cut-off member's jobs were redelivered (the copies
flagged), no member got a job twice, and the publisher holds nothing. A failure names its seed.
"""

from __future__ import annotations

import random
from collections import defaultdict

import pytest

from glue.events import Message
from glue.sim import NetworkProfile, SimNode, Simulation

JOBS = 120


def run_scenario(seed: int) -> None:
    rng = random.Random(seed)
    profile = NetworkProfile(
        loss=rng.uniform(0.0, 0.15),
        duplicate=rng.uniform(0.0, 0.05),
        min_delay_s=0.0001,
        max_delay_s=rng.uniform(0.0005, 0.005),
    )
    sim = Simulation(seed=seed, profile=profile, rate_s=0.1, multiplier=3.0)
    publisher = sim.add_node("pub")
    members = [sim.add_node(f"w{n}") for n in range(3)]
    for member in members:
        member.subscribe("jobs/#", "job", group="workers")
    assert sim.run_until(
        lambda: len(publisher.stack.topics.members("jobs/a", "workers")) == 3, timeout=10
    ), f"seed {seed}: members not known"
    victim = rng.choice(members)
    done_upto: dict[SimNode, int] = dict.fromkeys(members, 0)
    got: dict[int, list[tuple[str, Message]]] = defaultdict(list)

    def work() -> None:
        for member in members:
            new = member.topic_messages[done_upto[member] :]
            done_upto[member] = len(member.topic_messages)
            for message in new:
                got[int(message.payload)].append((member.name, message))
                if member is not victim or not cut:
                    member.done(message)

    cut = False
    for number in range(JOBS):
        publisher.publish(f"jobs/{number % 3}", "job", b"%d" % number, expiry=600.0)
        sim.run_for(rng.uniform(0.0, 0.004))
        work()
        if number == JOBS // 3:
            sim.partition([victim], [publisher])
            cut = True

    def finished() -> bool:
        work()
        return publisher.stack.topics.groups_idle()

    assert sim.run_until(finished, timeout=30), (
        f"seed {seed}: {publisher.stack.topics.group_jobs()}"
    )
    assert sorted(got) == list(range(JOBS)), f"seed {seed}: missing jobs"
    for job, copies in got.items():
        names = [name for name, _ in copies]
        assert len(set(names)) == len(names), f"seed {seed}: job {job} twice at one member"
        first = [name for name, m in copies if not m.redelivered]
        assert len(first) <= 1, f"seed {seed}: job {job} given out twice: {names}"
        if len(copies) > len(first):  # redelivered: only the cut-off member ever had it
            assert first in ([], [victim.name]), f"seed {seed}: job {job} redelivered {names}"


def _seeds(config: pytest.Config) -> list[int]:
    seed = config.getoption("--sim-seed")
    return [seed] if seed is not None else list(range(max(1, config.getoption("--sim-runs") // 10)))


def test_work_queues_under_loss_with_a_member_cut_off(pytestconfig: pytest.Config) -> None:
    for seed in _seeds(pytestconfig):
        run_scenario(seed)
