"""Exactly-once under heavy loss with fast discovery, and a flush that tells the truth.

Real processes on loopback inside the private namespace; iptables drops 20 % of the datagrams
arriving on every port the endpoints use (data and discovery alike). Announcements every 200 ms
and the default multiplier (2): a peer is taken for gone after 400 ms without a word, which under
this loss is often; what is owed to it must not be lost because of that.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

import pytest

from glue import DeliveryError, EndpointManager
from tests.endpoint_process import EndpointProcess
from tests.helpers import free_udp_port, random_loss

BIG = 20
BIG_BYTES = 1024 * 1024
SMALL = 2000
SMALL_BYTES = 100
KIND = "stream"


@pytest.fixture
def lossy_ports() -> Iterator[Callable[[int], list[int]]]:
    """Free UDP ports on which iptables drops 20 % of arriving datagrams, at random."""
    with ExitStack() as rules:

        def make(count: int) -> list[int]:
            ports = [free_udp_port() for _ in range(count)]
            rules.enter_context(random_loss(ports, 0.2))
            return ports

        yield make


def _glue(group: str, port: int, name: str) -> dict[str, str | int]:
    return {
        "discovery_target_address": group,
        "discovery_listen_address": group,
        "discovery_rate_milliseconds": 200,
        "discovery_rate_timeout_multiplier": 2,
        "listen_address": f"127.0.0.1:{port}",
        "endpoint_name": name,
    }


def _returns(stream: EndpointProcess) -> int:
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
    sub = EndpointProcess(**_glue(group, sub_port, "sub"))
    publishers: list[EndpointProcess] = []
    try:
        sub.request("subscribe", pattern="stream/#", type=KIND)
        publishers = [
            EndpointProcess(**_glue(group, big_port, "big")),
            EndpointProcess(**_glue(group, small_port, "small")),
        ]
        wanted = {"stream/big": (BIG, BIG_BYTES), "stream/small": (SMALL, SMALL_BYTES)}
        flushes = []
        for publisher, (topic, (count, size)) in zip(publishers, wanted.items(), strict=True):
            # In order, each once the one before it is done: wait for the subscriber, publish
            # as fast as it can with a 30 s expiry, then flush.
            publisher.command("subscribers", topic=topic, timeout=30)
            publisher.command("publish", topic=topic, type=KIND, count=count, size=size, timeout=30)
            flushes.append(publisher.command("flush", timeout=30))
        results = [p.result(f, 90) for p, f in zip(publishers, flushes, strict=True)]
        sub.wait_for(lambda: all(len(sub.messages(t)) >= n for t, (n, _) in wanted.items()), 10)
        removals = sum(map(_returns, [sub, *publishers]))
        for publisher, result in zip(publishers, results, strict=True):
            assert result["event"] == "flushed", f"{result}\n{publisher.log()}"
        for topic, (count, _) in wanted.items():
            numbers = [line["n"] for line in sub.messages(topic)]
            assert numbers == list(range(1, count + 1)), f"{topic}: {numbers}"
            assert all(line["intact"] for line in sub.messages(topic)), f"{topic}: corrupted"
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
    sub = EndpointProcess(**_glue(group, sub_port, "doomed"))
    try:
        sub.request("subscribe", pattern="stream/#", type=KIND)
        sub_id = sub.endpoint_id
        settings = _glue(group, pub_port, "publisher")
        with EndpointManager.from_env(**settings) as endpoint:
            endpoint.wait_for_subscribers("stream/x", timeout=10)
            sub.kill(signal.SIGKILL)
            for number in range(1, 6):
                endpoint.publish("stream/x", KIND, b"%d:" % number + bytes(1000), expiry=60.0)
            with pytest.raises(DeliveryError) as caught:
                endpoint.flush(timeout=30)
            assert caught.value.peers == (sub_id,)
            assert caught.value.unacknowledged == {sub_id: 5}
            assert "5 to doomed" in str(caught.value)
            assert "silent" in str(caught.value)
    finally:
        sub.close()
