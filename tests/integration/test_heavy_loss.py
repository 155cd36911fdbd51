"""Exactly-once under heavy loss with fast discovery, and a flush that tells the truth.

Real processes on loopback inside the private namespace; iptables drops 20 % of the datagrams
arriving on every port the endpoints use (data and discovery alike). Announcements every 200 ms
and the default multiplier (2): a peer is taken for gone after 400 ms without a word, which under
this loss is often; what is owed to it must not be lost because of that.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import pytest

from glue import DeliveryError, EndpointManager
from tests.helpers import free_udp_port
from tests.integration.nodes import base_env
from tests.integration.stream_process import payload

BIG = 20
BIG_BYTES = 1024 * 1024
SMALL = 2000
SMALL_BYTES = 100


class Stream:
    """One ``stream_process``; its JSON lines, read as they come."""

    def __init__(self, *args: str, **glue: str | int) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.integration.stream_process", *args],
            env=base_env(**glue),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.lines: list[dict[str, Any]] = []
        self._changed = threading.Condition()
        self._stderr = b""
        self._readers = [
            threading.Thread(target=self._read, daemon=True),
            threading.Thread(target=self._read_stderr, daemon=True),
        ]
        for reader in self._readers:
            reader.start()
        assert self.wait_for(lambda: self.started is not None, 20), self.log()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            with self._changed:
                self.lines.append(orjson.loads(raw))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        self._stderr = self.process.stderr.read()

    @property
    def started(self) -> dict[str, Any] | None:
        return next((line for line in self.lines if line["event"] == "started"), None)

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        with self._changed:
            return self._changed.wait_for(predicate, timeout)

    def events(self, kind: str) -> list[dict[str, Any]]:
        with self._changed:
            return [line for line in self.lines if line["event"] == kind]

    def messages(self, topic: str) -> list[dict[str, Any]]:
        return [line for line in self.events("message") if line["topic"] == topic]

    def close(self) -> None:
        if self.process.stdin is not None and not self.process.stdin.closed:
            self.process.stdin.close()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        for reader in self._readers:
            reader.join(10)
        for pipe in (self.process.stdout, self.process.stderr):
            if pipe is not None:
                pipe.close()

    def log(self) -> str:
        return f"lines: {self.lines[-10:]}\nstderr: {self._stderr.decode()[-3000:]}"


@pytest.fixture
def lossy_ports() -> Iterator[Callable[[int], list[int]]]:
    """Free UDP ports on which iptables drops 20 % of arriving datagrams, at random."""
    rules: list[list[str]] = []

    def make(count: int) -> list[int]:
        ports = [free_udp_port() for _ in range(count)]
        rule = [
            "INPUT", "-p", "udp", "-m", "multiport", "--dports", ",".join(map(str, ports)),
            "-m", "statistic", "--mode", "random", "--probability", "0.2", "-j", "DROP",
        ]  # fmt: skip
        subprocess.run(["iptables", "-A", *rule], check=True)
        rules.append(rule)
        return ports

    yield make
    for rule in rules:
        subprocess.run(["iptables", "-D", *rule], check=True)


def _glue(group: str, port: int, name: str) -> dict[str, str | int]:
    return {
        "discovery_target_address": group,
        "discovery_listen_address": group,
        "discovery_rate_milliseconds": 200,
        "discovery_rate_timeout_multiplier": 2,
        "listen_address": f"127.0.0.1:{port}",
        "endpoint_name": name,
    }


def _returns(stream: Stream) -> int:
    """How many times ``stream`` took a peer for gone and then heard it again."""
    returns = 0
    gone: set[str] = set()
    for line in list(stream.lines):
        if line["event"] == "peer_removed":
            gone.add(line["name"])
        elif line["event"] == "peer_added" and line["name"] in gone:
            gone.discard(line["name"])
            returns += 1
    return returns


def _run_once(make_ports: Callable[[int], list[int]]) -> dict[str, Any]:
    group_port, sub_port, big_port, small_port = make_ports(4)
    group = f"239.192.137.1:{group_port}"
    sub = Stream("sub", "stream/#", **_glue(group, sub_port, "sub"))
    publishers = []
    try:
        publishers = [
            Stream("pub", "stream/big", str(BIG), str(BIG_BYTES), **_glue(group, big_port, "big")),
            Stream(
                "pub",
                "stream/small",
                str(SMALL),
                str(SMALL_BYTES),
                **_glue(group, small_port, "small"),
            ),
        ]
        for publisher in publishers:
            assert publisher.wait_for(
                lambda p=publisher: bool(p.events("flushed") or p.events("flush_failed")), 90
            ), publisher.log()
        wanted = {"stream/big": BIG, "stream/small": SMALL}
        sub.wait_for(lambda: all(len(sub.messages(t)) >= n for t, n in wanted.items()), 10)
        removals = sum(map(_returns, [sub, *publishers]))
        for publisher in publishers:
            assert publisher.events("flushed"), publisher.log()
        for topic, count in wanted.items():
            numbers = [line["n"] for line in sub.messages(topic)]
            assert numbers == list(range(1, count + 1)), f"{topic}: {numbers}"
            assert all(line["ok"] for line in sub.messages(topic)), f"{topic}: corrupted"
        return {"removals": removals}
    finally:
        for stream in (*publishers, sub):
            stream.close()


def test_large_and_small_streams_arrive_whole_through_20_percent_loss(
    lossy_ports: Callable[[int], list[int]], request: pytest.FixtureRequest
) -> None:
    runs = request.config.getoption("--loss-runs")
    removals = []
    started = time.perf_counter()
    for _ in range(runs):
        removals.append(_run_once(lossy_ports)["removals"])
    print(
        f"\n20 % loss, 200 ms announcements, x2 timeout: {runs} runs of {BIG} x 1 MiB and "
        f"{SMALL} x {SMALL_BYTES} B, every message once, in order, flushed; peers taken for gone "
        f"and heard again, per run: {removals}; {time.perf_counter() - started:.0f} s"
    )


def test_flush_names_a_subscriber_killed_with_messages_unacknowledged() -> None:
    group_port, sub_port, pub_port = (free_udp_port() for _ in range(3))
    group = f"239.192.137.1:{group_port}"
    sub = Stream("sub", "stream/#", **_glue(group, sub_port, "doomed"))
    try:
        sub_id = sub.started["id"] if sub.started else None
        settings = _glue(group, pub_port, "publisher")
        with EndpointManager.from_env(**settings) as endpoint:
            endpoint.wait_for_subscribers("stream/x", timeout=10)
            sub.process.send_signal(signal.SIGKILL)
            sub.process.wait(10)
            for number in range(1, 6):
                endpoint.publish("stream/x", "stream", payload(number, 1000), expiry=60.0)
            with pytest.raises(DeliveryError) as caught:
                endpoint.flush(timeout=30)
            assert caught.value.peers == (sub_id,)
            assert caught.value.unacknowledged == {sub_id: 5}
            assert "5 to doomed" in str(caught.value)
            assert "silent" in str(caught.value)
    finally:
        sub.close()
