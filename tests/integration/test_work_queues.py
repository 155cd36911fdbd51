"""Work queues between real processes (docs/work-queues.md): 1,000 jobs shared among 3 worker
processes, each done once; a worker killed mid-run with SIGKILL, its unfinished jobs done by the
others and flagged redelivered; an ordinary subscriber beside the group gets all 1,000. Both APIs:
the workers and the producer on the blocking one, then all on asyncio."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from glue import AsyncEndpointManager, EndpointManager, MessageReceived, load_settings
from tests.endpoint_process import base_env
from tests.helpers import async_wait_until, free_udp_port, wait_until

ROOT = Path(__file__).parents[2]
JOBS = 1000
TOPIC = "jobs/resize"


@pytest.fixture
def glue() -> dict[str, Any]:
    group = f"239.192.137.11:{free_udp_port()}"
    return {
        "discovery_target_address": group,
        "discovery_listen_address": group,
        "discovery_rate_milliseconds": 100,
        "discovery_rate_timeout_multiplier": 5,
    }


class Child:
    """A ``tests.work_process`` child and the lines it printed."""

    def __init__(self, role: str, api: str, glue: dict[str, Any], delay_s: float = 0.0) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.work_process", role, api, str(delay_s)],
            env=base_env(**glue),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.strip())

    def ready(self) -> bool:
        return "ready" in self.lines

    def stop(self) -> str:
        """SIGTERM, wait; its stderr."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        self._reader.join(5)
        assert self.process.stderr is not None
        assert self.process.stdout is not None
        errors = self.process.stderr.read()
        self.process.stderr.close()
        self.process.stdout.close()
        return errors


@pytest.fixture
def children() -> Iterator[list[Child]]:
    started: list[Child] = []
    yield started
    for child in started:
        child.stop()


def _start(children: list[Child], api: str, glue: dict[str, Any], delay_s: float) -> list[Child]:
    workers = [Child("worker", api, glue, delay_s) for _ in range(3)]
    watcher = Child("watcher", api, glue)
    children.extend([*workers, watcher])
    assert wait_until(lambda: all(c.ready() for c in children), timeout=20)
    return workers


class Results:
    """What the workers reported to the producer, from its network thread or loop."""

    def __init__(self) -> None:
        self.reports: list[dict[str, Any]] = []

    def __call__(self, message: MessageReceived) -> None:
        self.reports.append(orjson.loads(message.payload))

    def jobs(self) -> Counter[int]:
        return Counter(report["job"] for report in self.reports)


def _check_watcher(watcher: Child) -> None:
    assert wait_until(lambda: len(watcher.lines) >= JOBS + 1, timeout=30)
    assert sorted(int(line) for line in watcher.lines[1:]) == list(range(JOBS))


def _check_all_done_once(results: Results, workers: list[Child], counters: dict[str, int]) -> None:
    assert results.jobs() == Counter(range(JOBS))  # each job done once, every one done
    by_worker = Counter(report["worker"] for report in results.reports)
    assert len(by_worker) == 3, by_worker  # shared among the three
    assert not any(report["redelivered"] for report in results.reports)
    assert counters["topics_group_sent"] == JOBS
    assert counters["topics_group_done_received"] == JOBS
    assert counters.get("topics_group_redelivered", 0) == 0
    print(f"\n{JOBS} jobs shared as {sorted(by_worker.values())}")


def _check_redelivered(
    results: Results, killed: str, counters: dict[str, int], before_kill: int
) -> None:
    jobs = results.jobs()
    assert set(jobs) == set(range(JOBS)), f"missing: {sorted(set(range(JOBS)) - set(jobs))}"
    redelivered = [r for r in results.reports if r["redelivered"]]
    # The killed worker had jobs unfinished (a window's worth): done by the others, flagged.
    assert redelivered, counters
    assert all(r["worker"] != killed for r in redelivered)
    assert counters["topics_group_redelivered"] >= len({r["job"] for r in redelivered})
    for job, count in jobs.items():
        if count > 1:  # done by the killed worker just before it died, its done lost with it
            reports = [r for r in results.reports if r["job"] == job]
            assert {r["worker"] == killed for r in reports} == {True, False}, reports
            assert any(r["redelivered"] for r in reports)
    print(
        f"\n{len(redelivered)} jobs redelivered after a worker was killed with "
        f"{before_kill} reports in; {sum(c - 1 for c in jobs.values())} done twice"
    )


def test_jobs_are_shared_each_done_once_sync(glue: dict[str, Any], children: list[Child]) -> None:
    workers = _start(children, "sync", glue, 0.0)
    results = Results()
    with EndpointManager(load_settings(**glue)) as producer:
        producer.on_message(results)
        producer.wait_for_subscribers(TOPIC, 3, group="workers", timeout=20)
        producer.wait_for_subscribers(TOPIC, 1, timeout=20)  # the watcher
        for job in range(JOBS):
            producer.publish_json(TOPIC, "job", {"job": job}, expiry=60.0)
        producer.wait_done(timeout=60)
        assert wait_until(lambda: len(results.reports) >= JOBS, timeout=30)
        counters = producer.counters()
    _check_all_done_once(results, workers, counters)
    _check_watcher(children[-1])


def test_jobs_are_shared_each_done_once_async(glue: dict[str, Any], children: list[Child]) -> None:
    workers = _start(children, "async", glue, 0.0)
    results = Results()

    async def produce() -> dict[str, int]:
        async with AsyncEndpointManager(load_settings(**glue)) as producer:
            producer.on_message(results)
            await producer.wait_for_subscribers(TOPIC, 3, group="workers", timeout=20)
            await producer.wait_for_subscribers(TOPIC, 1, timeout=20)
            for job in range(JOBS):
                await producer.publish_json(TOPIC, "job", {"job": job}, expiry=60.0)
            await producer.wait_done(timeout=60)
            assert await async_wait_until(lambda: len(results.reports) >= JOBS, timeout=30)
            return producer.counters()

    counters = asyncio.run(produce())
    _check_all_done_once(results, workers, counters)
    _check_watcher(children[-1])


@pytest.mark.parametrize("api", ["sync", "async"])
def test_a_killed_workers_unfinished_jobs_are_redelivered_flagged(
    api: str, glue: dict[str, Any], children: list[Child]
) -> None:
    # Each job takes 5 ms: the run lasts about 2 s, and the worker dies a quarter of the way in.
    workers = _start(children, api, glue, 0.005)
    results = Results()
    with EndpointManager(load_settings(**glue)) as producer:
        producer.on_message(results)
        producer.wait_for_subscribers(TOPIC, 3, group="workers", timeout=20)
        producer.wait_for_subscribers(TOPIC, 1, timeout=20)
        for job in range(JOBS):
            producer.publish_json(TOPIC, "job", {"job": job}, expiry=60.0)
        victim = workers[0]
        assert wait_until(lambda: len(results.reports) >= JOBS // 4, timeout=30)
        # Its name: the worker that reported most among those that are not... any report of it.
        names = {r["worker"] for r in results.reports}
        victim.process.kill()
        victim.process.wait(10)
        before_kill = len(results.reports)
        producer.wait_done(timeout=60)
        assert wait_until(lambda: set(results.jobs()) == set(range(JOBS)), timeout=30)
        counters = producer.counters()
        peers_left = {p.name for p in producer.peers()}
    killed = (names - peers_left).pop()  # the worker no longer among the peers
    _check_redelivered(results, killed, counters, before_kill)
    _check_watcher(children[-1])
