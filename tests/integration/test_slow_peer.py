"""A slow or stuck peer never holds up what goes to the others (issue 14, item 3).

Real processes on loopback inside the private namespace. The *stuck* subscriber keeps announcing
(so it stays a peer) but never acknowledges: iptables drops every datagram to its data port, as
a broken data path or a wedged receiver would. Beside it a *healthy* subscriber on the same
topic, and on another topic. The publisher's send queue is small (``GLUE_SEND_QUEUE_BYTES``) so
that the stuck peer's queue fills within a second.

Before the fix, the message at the head of the publisher's hand-off queue waited for room for the
stuck peer, and every message behind it waited too, for every peer: the healthy subscriber
stopped receiving as soon as the stuck peer's queue was full.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from tests.endpoint_process import EndpointProcess
from tests.helpers import wait_until

QUEUE_BYTES = 256 * 1024
SIZE = 16 * 1024
COUNT = 2000
PACED = 1000
RATE = 500  # messages/s: 8 MB/s per topic
SETTINGS = {
    "discovery_rate_milliseconds": 200,
    # The stuck peer is never taken for gone while it announces, whatever its acks.
    "discovery_rate_timeout_multiplier": 10,
}


@contextmanager
def dropped_to(port: int) -> Iterator[None]:
    """Every UDP datagram to ``port`` is dropped (the namespace's iptables), until the end."""
    rule = ["INPUT", "-p", "udp", "--dport", str(port), "-j", "DROP"]
    subprocess.run(["iptables", "-A", *rule], check=True)
    try:
        yield
    finally:
        subprocess.run(["iptables", "-D", *rule], check=True)


@pytest.fixture
def trio(request: pytest.FixtureRequest) -> Iterator[tuple[EndpointProcess, ...]]:
    policy: str = request.param
    publisher = EndpointProcess(
        label="publisher",
        endpoint_name="publisher",
        send_queue_bytes=QUEUE_BYTES,
        slow_peer=policy,
        **SETTINGS,
    )
    healthy = EndpointProcess(label="healthy", endpoint_name="healthy", **SETTINGS)
    stuck = EndpointProcess(label="stuck", endpoint_name="stuck", **SETTINGS)
    processes = (publisher, healthy, stuck)
    try:
        healthy.request("subscribe", pattern="shared", report="summary")
        healthy.request("subscribe", pattern="other", report="summary")
        stuck.request("subscribe", pattern="shared", report="summary", gaps=True)
        publisher.request("subscribers", topic="shared", count=2, timeout=20)
        publisher.request("subscribers", topic="other", count=1, timeout=20)
        yield processes
    finally:
        for process in processes:
            process.close()


def data_port(process: EndpointProcess) -> int:
    port: int = process.events("ready")[0]["address"][1]
    return port


def received(process: EndpointProcess, topic: str) -> int:
    """How many distinct messages ``process`` has had on ``topic`` (from one publisher)."""
    streams = [s for s in process.summary() if s["topic"] == topic]
    return sum(last - first + 1 for s in streams for first, last in s["ranges"])


def in_order_once(process: EndpointProcess, topic: str) -> bool:
    streams = [s for s in process.summary() if s["topic"] == topic]
    return all(s["duplicates"] == 0 and s["reordered"] == 0 and s["corrupt"] == 0 for s in streams)


@pytest.mark.parametrize("trio", ["block"], indirect=True)
def test_a_stuck_peer_blocks_only_when_its_backlog_is_full_and_is_named(
    trio: tuple[EndpointProcess, ...],
) -> None:
    publisher, healthy, stuck = trio
    with dropped_to(data_port(stuck)):
        shared = publisher.command("publish", topic="shared", count=COUNT, size=SIZE, timeout=2)
        result = publisher.result(shared, timeout=60)
        # Its backlog (queue and hand-off, GLUE_SEND_QUEUE_BYTES each) filled up: the publish
        # waited its timeout and failed, naming the stuck peer, and only that one.
        assert result["event"] == "error", result
        assert "BackpressureError" in result["error"], result
        assert "stuck" in result["error"], result
        assert "healthy" not in result["error"], result
        accepted = result["count"]
        assert 0 < accepted < COUNT
        # Every message accepted before that reached the healthy subscriber: none waited behind
        # the stuck peer's.
        assert wait_until(
            lambda: received(healthy, "shared") == accepted, timeout=30, interval=0.2
        ), (
            received(healthy, "shared"),
            accepted,
        )
    assert in_order_once(healthy, "shared")
    counters, _ = publisher.counters()
    assert counters.get("backpressure_errors", 0) >= 1


@pytest.mark.parametrize("trio", ["drop"], indirect=True)
def test_with_slow_peer_drop_a_stuck_peer_loses_its_backlog_and_nobody_waits(
    trio: tuple[EndpointProcess, ...],
) -> None:
    publisher, healthy, stuck = trio
    # One message before it is stuck: what it then misses is a gap in a stream it had.
    publisher.request("publish", topic="shared", count=1, size=SIZE)
    assert wait_until(lambda: received(stuck, "shared") == 1, timeout=10, interval=0.05)
    with dropped_to(data_port(stuck)):
        # Paced, so that the healthy subscriber keeps up (an unpaced burst larger than its
        # queue would have its backlog dropped too: that is what "drop" does).
        paced = {"count": PACED, "size": SIZE, "rate": RATE, "timeout": 2}
        shared = publisher.command("publish", topic="shared", background=True, **paced)
        other = publisher.command("publish", topic="other", background=True, **paced)
        for command in (shared, other):
            result = publisher.result(command, timeout=60)
            assert result["event"] == "published", result  # never blocked out
            assert result["count"] == PACED
        for topic, count in (("shared", PACED + 1), ("other", PACED)):
            arrived = wait_until(
                lambda t=topic, c=count: received(healthy, t) == c, timeout=60, interval=0.2
            )  # type: ignore[misc]
            assert arrived, (
                topic,
                received(healthy, topic),
            )
        counters, _ = publisher.counters()
        dropped = counters.get("messages_dropped_slow_peer", 0)
        assert dropped > 0, counters
    # Unstuck, it gets what was still queued or in flight when its backlog was last dropped,
    # once and in order: a gap, then the tail of the stream.
    publisher.request("flush", timeout=60)

    def tail_arrived() -> bool:  # (the warm message alone was there all along)
        streams = [s for s in stuck.summary() if s["topic"] == "shared"]
        return bool(streams) and streams[0]["ranges"][-1][1] == PACED + 1

    assert wait_until(tail_arrived, timeout=30, interval=0.1), stuck.summary()
    [stream] = [s for s in stuck.summary() if s["topic"] == "shared"]
    warm, (first, last) = stream["ranges"]
    assert warm == [1, 1]
    assert last == PACED + 1
    assert first > 2
    assert first - 2 <= dropped  # the gap is what was dropped for it
    # ...and the subscriber was told, once, with the count and why (gaps=True).
    assert stuck.wait_for(lambda: bool(stuck.events("gap")), 10)
    [gap] = stuck.events("gap")
    assert (gap["topic"], gap["first"], gap["count"]) == ("shared", 2, first - 2)
    assert gap["reason"] == "dropped"
    assert in_order_once(stuck, "shared")
    assert in_order_once(healthy, "shared")
    assert in_order_once(healthy, "other")
