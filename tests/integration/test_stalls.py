"""Frozen processes lose nothing (issue 14, item 1): SIGSTOP for 5 s, then SIGCONT.

Real processes on loopback inside the private namespace, announcements every 200 ms (a peer is
taken for gone after 400 ms of silence), default history depth (1). A stall of 5 s is twelve
discovery timeouts: each side takes the other for gone, and must get everything back.

- A stopped *subscriber*: the publisher parks its stream (queued and unacknowledged messages are
  kept until they expire) and resumes it when the subscriber is heard again in the same
  incarnation; a healthy subscriber beside it keeps receiving meanwhile.
- A stopped *publisher*: on waking it reads what waits in its sockets before expiring anyone (the
  subscriber's announcements are proof of life), then publishes the 5 s it owes in a burst.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator

import pytest

from tests.endpoint_process import EndpointProcess
from tests.helpers import wait_until

STALL_S = 5.0
RATE = 100  # messages/s
SECONDS = 10
COUNT = RATE * SECONDS
SETTINGS = {"discovery_rate_milliseconds": 200}


@pytest.fixture
def trio() -> Iterator[tuple[EndpointProcess, EndpointProcess, EndpointProcess]]:
    publisher = EndpointProcess(label="publisher", endpoint_name="publisher", **SETTINGS)
    first = EndpointProcess(label="sub-1", endpoint_name="sub-1", **SETTINGS)
    second = EndpointProcess(label="sub-2", endpoint_name="sub-2", **SETTINGS)
    processes = (publisher, first, second)
    try:
        for subscriber in (first, second):
            subscriber.request("subscribe", pattern="stalls", report="summary")
        publisher.request("subscribers", topic="stalls", count=2, timeout=20)
        yield processes
    finally:
        for process in processes:
            process.send_signal(signal.SIGCONT)
            process.close()


def ranges(process: EndpointProcess) -> list[list[int]]:
    return [r for s in process.summary() if s["topic"] == "stalls" for r in s["ranges"]]


def clean(process: EndpointProcess) -> bool:
    return all(
        s["duplicates"] == 0 and s["reordered"] == 0 and s["corrupt"] == 0
        for s in process.summary()
    )


def count(process: EndpointProcess) -> int:
    return sum(last - first + 1 for first, last in ranges(process))


def test_a_subscriber_stopped_for_5_s_loses_nothing_and_the_other_keeps_receiving(
    trio: tuple[EndpointProcess, EndpointProcess, EndpointProcess],
) -> None:
    publisher, stopped, healthy = trio
    publishing = publisher.command(
        "publish", topic="stalls", count=COUNT, rate=RATE, size=1000, background=True
    )
    assert wait_until(lambda: count(stopped) >= RATE, timeout=10, interval=0.05)
    stopped.send_signal(signal.SIGSTOP)
    stopped_at = time.monotonic()
    before = count(healthy)
    # While it is stopped, the other subscriber keeps receiving (at the offered rate: a second's
    # worth within two seconds, whatever the publisher does with the stopped one's stream).
    assert wait_until(lambda: count(healthy) >= before + RATE, timeout=2, interval=0.05)
    assert wait_until(lambda: publisher.removals(stopped) != [], timeout=STALL_S, interval=0.05)
    time.sleep(max(0.0, stopped_at + STALL_S - time.monotonic()))  # the stall itself
    stopped.send_signal(signal.SIGCONT)
    result = publisher.result(publishing, timeout=SECONDS + 20)
    assert result["event"] == "published", result
    for subscriber in (stopped, healthy):
        assert wait_until(lambda s=subscriber: count(s) == COUNT, timeout=20, interval=0.1), (
            subscriber.label,
            ranges(subscriber),
        )
        assert ranges(subscriber) == [[1, COUNT]]
        assert clean(subscriber)
    counters, _ = publisher.counters()
    assert counters.get("transport_streams_unparked", 0) >= 1, counters


def test_a_publisher_stopped_for_5_s_catches_up_in_a_burst_and_loses_nothing(
    trio: tuple[EndpointProcess, EndpointProcess, EndpointProcess],
) -> None:
    publisher, first, second = trio
    publishing = publisher.command(
        "publish", topic="stalls", count=COUNT, rate=RATE, size=1000, background=True
    )
    assert wait_until(lambda: count(first) >= RATE, timeout=10, interval=0.05)
    publisher.send_signal(signal.SIGSTOP)
    stopped_at = time.monotonic()
    # Both subscribers take it for gone meanwhile (its stream to them is parked on their side).
    for subscriber in (first, second):
        assert wait_until(
            lambda s=subscriber: s.removals(publisher) != [], timeout=STALL_S, interval=0.05
        )
    time.sleep(max(0.0, stopped_at + STALL_S - time.monotonic()))  # the stall itself
    publisher.send_signal(signal.SIGCONT)  # its paced loop now owes 5 s: a burst
    result = publisher.result(publishing, timeout=SECONDS + 20)
    assert result["event"] == "published", result
    for subscriber in (first, second):
        assert wait_until(lambda s=subscriber: count(s) == COUNT, timeout=20, interval=0.1), (
            subscriber.label,
            ranges(subscriber),
        )
        assert ranges(subscriber) == [[1, COUNT]]
        assert clean(subscriber)
    # On waking it read the subscribers' announcements before its timer could expire them.
    assert publisher.removals(first) == []
    assert publisher.removals(second) == []
