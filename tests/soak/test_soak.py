"""Soak: long-lived endpoints under churn and 5 % loss keep every message and a flat memory.

In a namespace of its own where every datagram is dropped with 5 % probability (data, acks and
announcements alike), with glue's default settings: two long-lived publishers publish on 20
topics, messages of 10 B to 1 MiB (log-uniform), for ``--soak-seconds``; two long-lived
subscribers take them (one everything, one the even topics, a subscription each). Meanwhile a
short-lived endpoint joins every 3 s, subscribes (half of them also publish), and 2 to 8 s later
leaves cleanly or is killed with SIGKILL.

It prints the resident memory of the long-lived endpoints over time and the counts, and fails if

- a message a long-lived publisher published on a 15 s topic did not reach a long-lived
  subscriber of it (lost among the unexpired: both stayed up, and 15 s is ample at 5 % loss);
  the two 1 s topics may expire on the way: what did is counted, not failed;
- any subscriber, long- or short-lived, got a message twice, out of order or damaged;
- a long-lived publisher's publish failed;
- the memory of a long-lived endpoint grew more than 10 % after the warm-up.
"""

from __future__ import annotations

import math
import os
import random
import shutil
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from glue.stack import PARKED_HOLD_S
from tests.endpoint_process import EndpointProcess
from tests.helpers import free_udp_port, wait_until

TOPICS = [f"soak/t{i:02}" for i in range(20)]
SHORT_TOPICS = TOPICS[-2:]  # 1 s expiry: some may expire under loss, allowed
EXPIRY_S, SHORT_EXPIRY_S = 15.0, 1.0
RATE_PER_TOPIC = 0.5  # messages/s per topic and long-lived publisher: 10/s, ~0.9 MB/s each
MIN_BYTES, MAX_BYTES = 10, 1024 * 1024
SUBSCRIBED = {"S1": TOPICS, "S2": TOPICS[::2]}
CHURN_EVERY_S = 3.0
CHURN_LIFE_S = (2.0, 8.0)
#: Short-lived endpoints, in turn: (pattern, publishes on 3 topics, killed rather than leaving).
#: The same mix every 4 of them, so that the load, and the memory it takes, is steady; their
#: lifetimes, topics and sizes are drawn.
CHURN_CYCLE = [
    ("soak/#", False, True),
    ("soak/+", True, False),
    ("soak/t03", True, True),
    ("soak/t18", False, False),
]
CHURN_RATE = 2.0  # messages/s on each of 3 topics, for a short-lived endpoint that publishes
RSS_GROWTH = 1.10
DISCOVERY_TIMEOUT_S = 2.0  # glue's defaults: announcements every 1 s, silent for 2 s is gone
MB = 1e6
#: Run in the soak's namespace: loopback with multicast routed over it (as tools/isolated-net).
SETUP = ["ip link set lo up", "ip link set lo multicast on", "ip route add 224.0.0.0/4 dev lo"]


def sizes(rng: random.Random, count: int) -> list[int]:
    """``count`` sizes, log-uniform from MIN_BYTES to MAX_BYTES, both ends included."""
    drawn = [round(MIN_BYTES * (MAX_BYTES / MIN_BYTES) ** rng.random()) for _ in range(count)]
    drawn[:2] = [MIN_BYTES, MAX_BYTES][: len(drawn[:2])]
    rng.shuffle(drawn)
    return drawn


def warm_up_s(seconds: float) -> float:
    """Until then memory may grow (queues, history, parked streams fill up); not after. glue
    keeps queueing for a silent (killed) subscriber PARKED_HOLD_S after it expired: memory is
    all there once the first one killed (within CHURN_LIFE_S) has been expired and released."""
    first_released_s = CHURN_LIFE_S[1] + DISCOVERY_TIMEOUT_S + PARKED_HOLD_S
    return max(first_released_s + 5.0, seconds / 5)


@dataclass
class Churner:
    process: EndpointProcess
    leaves_at: float
    killed: bool


class Soak:
    """The endpoints of one soak run, what they did, and the figures drawn from it."""

    def __init__(self, namespace: LossyNamespace, seconds: float, seed: int) -> None:
        self.namespace, self.seconds, self.seed = namespace, seconds, seed
        self.rng = random.Random(seed)
        group = f"239.192.137.20:{free_udp_port()}"
        self.glue = {"discovery_target_address": group, "discovery_listen_address": group}
        self.long_lived: dict[str, EndpointProcess] = {}
        self.churners: list[Churner] = []
        self.churn: Counter[str] = Counter()
        self.rss: list[tuple[float, dict[str, int]]] = []
        self.summaries: list[list[dict[str, Any]]] = []  # every subscriber's, as it ended
        self.published: dict[tuple[str, str], int] = {}  # (publisher, topic) -> count
        self.errors: list[str] = []
        self.started_at = 0.0

    def start(self) -> None:
        """Start the long-lived endpoints and subscribe; publishers wait for the subscribers."""
        for label in ("P1", "P2", "S1", "S2"):
            self.long_lived[label] = EndpointProcess(
                self.namespace.enter, label=label, wait=False, endpoint_name=label, **self.glue
            )
        for process in self.long_lived.values():
            process.wait_ready()
        for label, topics in SUBSCRIBED.items():
            patterns = ["soak/#"] if topics == TOPICS else topics
            for pattern in patterns:
                self.long_lived[label].request("subscribe", pattern=pattern, report="summary")
        for publisher in self.publishers:
            for topic in TOPICS:
                count = sum(topic in topics for topics in SUBSCRIBED.values())
                publisher.request("subscribers", topic=topic, count=count, timeout=30)

    @property
    def publishers(self) -> list[EndpointProcess]:
        return [self.long_lived["P1"], self.long_lived["P2"]]

    def run(self) -> None:
        """Publish for ``seconds`` under churn, then let the last churners go."""
        self.started_at = time.monotonic()
        count = max(2, int(RATE_PER_TOPIC * self.seconds))
        commands = [
            (publisher, topic, publisher.command(
                "publish", topic=topic, count=count, rate=RATE_PER_TOPIC,
                offset=self.rng.uniform(0, 1 / RATE_PER_TOPIC),  # topics out of step
                sizes=sizes(self.rng, count), digests=False, background=True,
                expiry=SHORT_EXPIRY_S if topic in SHORT_TOPICS else EXPIRY_S,
            ))
            for publisher in self.publishers
            for topic in TOPICS
        ]  # fmt: skip
        self._churn_until(self.started_at + self.seconds)
        for publisher, topic, number in commands:
            reply = publisher.result(number, timeout=60)
            self.published[(publisher.label, topic)] = reply["count"]
            if reply["event"] == "error":
                self.errors.append(f"{publisher.label} {topic}: {reply['error']}")
        for churner in list(self.churners):
            self._leave(churner)

    def drain(self) -> float:
        """Wait until the long-lived subscribers have every 15 s message of the long-lived
        publishers (at most one expiry and a margin); their summaries. Returns the wait."""
        began = time.monotonic()
        wait_until(lambda: not self.missing(self._current()), timeout=EXPIRY_S + 10, interval=0.5)
        drained = time.monotonic() - began
        self.summaries += self._current()
        return drained

    def missing(self, summaries: list[list[dict[str, Any]]]) -> dict[str, int]:
        """Per (subscriber, publisher, topic) of a 15 s topic: messages not received."""
        missing: dict[str, int] = {}
        for label, summary in zip(SUBSCRIBED, summaries, strict=True):
            for publisher in self.publishers:
                for topic in SUBSCRIBED[label]:
                    if topic in SHORT_TOPICS:
                        continue
                    got = _received(summary, publisher, topic)
                    expected = self.published.get((publisher.label, topic), 0)
                    if lost := len(set(range(1, expected + 1)) - got):
                        missing[f"{label}<-{publisher.label} {topic}"] = lost
        return missing

    def expired(self, summaries: list[list[dict[str, Any]]]) -> int:
        """Messages of the 1 s topics the long-lived subscribers did not get (expired)."""
        return sum(
            self.published.get((publisher.label, topic), 0)
            - len(_received(summary, publisher, topic))
            for label, summary in zip(SUBSCRIBED, summaries, strict=True)
            for publisher in self.publishers
            for topic in SHORT_TOPICS
            if topic in SUBSCRIBED[label]
        )

    def growth(self) -> dict[str, float]:
        """Per long-lived endpoint: its largest RSS after the warm-up over its largest during
        the warm-up (RSS is mostly a high-water mark: the allocator keeps what it was given)."""
        warm_up = warm_up_s(self.seconds)
        before = [rss for at, rss in self.rss if at < warm_up]
        after = [rss for at, rss in self.rss if at >= warm_up]
        if not before or len(after) < 2:
            return {}
        growth = {}
        for label in self.long_lived:
            baseline = max(rss[label] for rss in before)
            growth[label] = max(rss[label] for rss in after) / baseline if baseline else math.inf
        return growth

    def close(self) -> None:
        for churner in self.churners:
            churner.process.close()
        for process in self.long_lived.values():
            process.close()

    def _current(self) -> list[list[dict[str, Any]]]:
        return [self.long_lived[label].summary() for label in SUBSCRIBED]

    def _churn_until(self, ends_at: float) -> None:
        """Start a short-lived endpoint every CHURN_EVERY_S and end each when its time comes;
        sample memory. Between steps, wait for the next one or for a long-lived publish error."""
        sample_every = max(2.5, self.seconds / 40)
        next_sample = next_join = self.started_at
        while (now := time.monotonic()) < ends_at:
            if now >= next_sample:
                self._sample(now)
                next_sample += sample_every
            if now >= next_join:
                self._join()
                next_join += CHURN_EVERY_S
            for churner in [c for c in self.churners if c.leaves_at <= now]:
                self._leave(churner)
            steps = [next_sample, next_join, ends_at, *(c.leaves_at for c in self.churners)]
            if self.publishers[0].wait_for(self._failed, max(0.0, min(steps) - now)):
                return  # a long-lived publish failed: reported with the figures

    def _sample(self, now: float) -> None:
        rss = {label: process.rss_bytes() for label, process in self.long_lived.items()}
        self.rss.append((now - self.started_at, rss))

    def _failed(self) -> bool:
        return any(publisher.events("error") for publisher in self.publishers)

    def _join(self) -> None:
        pattern, publishes, killed = CHURN_CYCLE[self.churn["joined"] % len(CHURN_CYCLE)]
        self.churn["joined"] += 1
        process = EndpointProcess(
            self.namespace.enter, label=f"C{self.churn['joined']}", **self.glue
        )
        process.request("subscribe", pattern=pattern, report="summary")
        if publishes:
            self.churn["published"] += 1
            for topic in self.rng.sample(TOPICS, 3):
                process.command(
                    "publish", topic=topic, count=1000, rate=CHURN_RATE, expiry=EXPIRY_S,
                    sizes=sizes(self.rng, 20), digests=False, background=True,
                )  # fmt: skip
        leaves_at = time.monotonic() + self.rng.uniform(*CHURN_LIFE_S)
        self.churners.append(Churner(process, leaves_at, killed))

    def _leave(self, churner: Churner) -> None:
        """Its summary (what it got while up), then SIGKILL or a clean stop (goodbye)."""
        self.churners.remove(churner)
        self.summaries.append(churner.process.summary())
        if churner.killed:
            churner.process.kill(signal.SIGKILL)
            self.churn["killed"] += 1
        else:
            self.churn["left"] += 1
        churner.process.close()


def _received(summary: list[dict[str, Any]], publisher: EndpointProcess, topic: str) -> set[int]:
    """Sequences of ``publisher``'s run on ``topic`` in a subscriber's summary."""
    return {
        sequence
        for stream in summary
        if stream["source"] == publisher.endpoint_id
        and stream["run"] == publisher.run
        and stream["topic"] == topic
        for first, last in stream["ranges"]
        for sequence in range(first, last + 1)
    }


class LossyNamespace:
    """A private network namespace (held by a sleeping process) whose INPUT chain counts every
    datagram and drops ``loss`` of them at random."""

    def __init__(self, loss: float) -> None:
        self.loss = loss
        self.holder = subprocess.Popen(["unshare", "--net", "--", "sleep", "infinity"])
        try:
            ours = os.readlink("/proc/self/ns/net")
            assert wait_until(
                lambda: os.readlink(f"/proc/{self.holder.pid}/ns/net") != ours, timeout=5
            ), "unshare --net did not make a namespace"
            for command in SETUP:
                self.run(*command.split())
            self.run("iptables", "-A", "INPUT")  # counts every datagram
            self.run(
                "iptables", "-A", "INPUT", "-m", "statistic", "--mode", "random",
                "--probability", str(loss), "-j", "DROP",
            )  # fmt: skip
        except BaseException:
            self.close()
            raise

    @property
    def enter(self) -> list[str]:
        """Command prefix that runs a program in the namespace."""
        return ["nsenter", f"--net=/proc/{self.holder.pid}/ns/net"]

    def run(self, *args: str) -> str:
        return subprocess.run(
            [*self.enter, *args], check=True, capture_output=True, text=True, timeout=20
        ).stdout

    def packets(self) -> tuple[int, int]:
        """(datagrams that arrived, datagrams dropped) so far."""
        lines = self.run("iptables", "-L", "INPUT", "-v", "-x", "-n").splitlines()[2:]
        counted, dropped = (int(line.split()[0]) for line in lines[:2])
        return counted, dropped

    def close(self) -> None:
        # The namespace, its rules and anything left in it go with the holder.
        self.holder.kill()
        self.holder.wait()


@pytest.fixture
def lossy_namespace() -> Iterator[LossyNamespace]:
    missing = [tool for tool in ("unshare", "nsenter", "ip", "iptables") if not shutil.which(tool)]
    if missing:
        pytest.fail(f"the soak needs {', '.join(missing)}", pytrace=False)
    namespace = LossyNamespace(0.05)
    try:
        yield namespace
    finally:
        namespace.close()


@pytest.fixture
def soak(
    lossy_namespace: LossyNamespace, soak_seconds: float, request: pytest.FixtureRequest
) -> Iterator[Soak]:
    if soak_seconds < warm_up_s(soak_seconds) + 10:
        pytest.fail(
            f"--soak-seconds {soak_seconds:g}: too short to compare memory after a warm-up of "
            f"{warm_up_s(soak_seconds):g} s (at least {warm_up_s(0) + 10:g})",
            pytrace=False,
        )
    seed = request.config.getoption("--soak-seed")
    run = Soak(
        lossy_namespace, soak_seconds, seed=random.randrange(2**32) if seed is None else seed
    )
    try:
        run.start()
        yield run
    finally:
        run.close()


def test_churn_kills_and_5_percent_loss_lose_nothing_and_memory_stays_flat(
    soak: Soak, lossy_namespace: LossyNamespace
) -> None:
    soak.run()
    drained = soak.drain()
    counted, dropped = lossy_namespace.packets()
    final = soak.summaries[-len(SUBSCRIBED) :]
    missing, growth = soak.missing(final), soak.growth()
    streams = [stream for summary in soak.summaries for stream in summary]
    totals = {
        key: sum(stream[key] for stream in streams)
        for key in ("count", "duplicates", "reordered", "misnumbered", "corrupt")
    }
    _report(soak, drained, counted, dropped, missing, totals)

    assert dropped > 0.02 * counted, (counted, dropped)  # the loss was real
    assert not soak.errors, soak.errors
    assert not missing, f"lost among the unexpired: {missing}"
    assert totals["duplicates"] == totals["reordered"] == 0, totals
    assert totals["misnumbered"] == totals["corrupt"] == 0, totals
    assert growth, f"no memory sample after the warm-up: {soak.rss}"
    assert max(growth.values()) <= RSS_GROWTH, f"RSS grew after the warm-up: {growth}"


def _report(
    soak: Soak,
    drained: float,
    counted: int,
    dropped: int,
    missing: dict[str, int],
    totals: dict[str, int],
) -> None:
    long_published = sum(soak.published.values())
    lines = [
        f"\nsoak {soak.seconds:.0f} s, seed {soak.seed}: {dropped} of {counted} datagrams dropped "
        f"({dropped / max(counted, 1):.1%}); 20 topics, {MIN_BYTES} B to {MAX_BYTES // 1024} KiB",
        f"long-lived publishers: {long_published} messages; churn: {soak.churn['joined']} "
        f"joined ({soak.churn['published']} publishing), {soak.churn['left']} left, "
        f"{soak.churn['killed']} killed with SIGKILL",
        f"RSS of the long-lived endpoints, MB (warm-up {warm_up_s(soak.seconds):.0f} s):",
        "     t  " + "  ".join(f"{label:>6}" for label in soak.long_lived),
    ]
    for at, rss in soak.rss:
        lines.append(f"{at:6.0f}  " + "  ".join(f"{rss[label] / MB:6.1f}" for label in rss))
    growth = soak.growth()
    lines += [
        "growth after warm-up (max after / max during): "
        + ", ".join(f"{label} {ratio:.3f}" for label, ratio in growth.items()),
        f"messages received by every subscriber: {totals['count']}; lost among the unexpired: "
        f"{sum(missing.values())}; duplicates: {totals['duplicates']}; out of order: "
        f"{totals['reordered']}; damaged: {totals['corrupt'] + totals['misnumbered']}; expired on "
        f"the 1 s topics: {soak.expired(soak.summaries[-len(SUBSCRIBED) :])}; drained in "
        f"{drained:.1f} s; publish errors: {len(soak.errors)}",
    ]
    print("\n".join(lines))
