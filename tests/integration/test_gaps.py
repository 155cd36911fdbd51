"""Gap events between real processes: messages that expired while a subscriber was cut off
reach it as one Gap with the right count and reason, in order between the messages around
them (the slow-peer "dropped" case is in test_slow_peer.py)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator

import pytest

from glue import (
    AsyncEndpointManager,
    EndpointManager,
    Gap,
    Message,
    UsageTypeError,
    UsageValueError,
)
from tests.endpoint_process import EndpointProcess
from tests.helpers import async_wait_until, free_udp_port, multicast_settings, wait_until
from tests.integration.test_slow_peer import data_port, dropped_to

SETTINGS = {
    "discovery_rate_milliseconds": 200,
    # Cut off from data, the subscriber still announces: it stays a peer, its frames expire.
    "discovery_rate_timeout_multiplier": 10,
}


@pytest.fixture
def pair() -> Iterator[tuple[EndpointProcess, EndpointProcess]]:
    publisher = EndpointProcess(label="publisher", endpoint_name="publisher", **SETTINGS)
    subscriber = EndpointProcess(label="subscriber", endpoint_name="subscriber", **SETTINGS)
    try:
        subscriber.request("subscribe", pattern="plant/#", gaps=True)
        publisher.request("subscribers", topic="plant/a", count=1, timeout=20)
        yield publisher, subscriber
    finally:
        publisher.close()
        subscriber.close()


def _frames(publisher: EndpointProcess, subscriber: EndpointProcess, counter: str) -> int:
    """A transport counter of the publisher toward the subscriber (frames_sent, ...)."""
    return publisher.counters()[1].get(subscriber.endpoint_id, {}).get(counter, 0)


def test_messages_expired_while_cut_off_arrive_as_one_gap_with_count_and_reason(
    pair: tuple[EndpointProcess, EndpointProcess],
) -> None:
    publisher, subscriber = pair
    publisher.request("publish", topic="plant/a", count=1)
    assert subscriber.wait_for(lambda: len(subscriber.messages()) == 1, 10)
    sent = _frames(publisher, subscriber, "frames_sent")
    with dropped_to(data_port(subscriber)):
        publisher.request("publish", topic="plant/a", count=5, expiry=0.3)
        assert wait_until(lambda: _frames(publisher, subscriber, "frames_sent") > sent, timeout=10)
        sent = _frames(publisher, subscriber, "frames_sent") - sent  # (bundled: 1 or 2 frames)
        # Unacknowledged, they expire at the publisher (never delivered, never resent).
        assert wait_until(
            lambda: _frames(publisher, subscriber, "frames_expired") >= sent, timeout=10
        ), publisher.counters()
    publisher.request("publish", topic="plant/a", count=1, expiry=30)
    assert subscriber.wait_for(lambda: len(subscriber.messages()) == 2, 10), subscriber.log()
    assert [m["sequence"] for m in subscriber.messages()] == [1, 7]
    [gap] = subscriber.events("gap")
    assert (gap["topic"], gap["source"]) == ("plant/a", publisher.endpoint_id)
    assert (gap["first"], gap["count"], gap["reason"]) == (2, 5, "expired")
    # In order: after message 1, before message 7.
    kinds = [(e["event"], e.get("sequence", e.get("first"))) for e in subscriber.lines]
    kinds = [k for k in kinds if k[0] in ("message", "gap")]
    assert kinds == [("message", 1), ("gap", 2), ("message", 7)]
    counters, _ = subscriber.counters()
    assert counters.get("topics_gaps", 0) == 1
    assert counters.get("topics_gap_messages", 0) == 5


def test_iterating_a_subscription_with_gaps_true_yields_the_gap_in_order() -> None:
    settings = multicast_settings(
        f"239.192.137.14:{free_udp_port()}", discovery_rate_timeout_multiplier=10.0
    )
    with (
        EndpointManager.from_env(**settings) as publisher,
        EndpointManager.from_env(**settings) as subscriber,
    ):
        subscription = subscriber.subscribe("plant/#", "t", gaps=True)
        publisher.wait_for_subscribers("plant/a", count=1, timeout=10)
        publisher.publish("plant/a", "t", b"1", expiry=30)
        assert isinstance(subscription.get(timeout=10), Message)

        def frames(counter: str) -> int:
            return publisher.peer_counters()[subscriber.endpoint_id].get(counter, 0)

        sent = frames("frames_sent")
        with dropped_to(subscriber.data_address[1]):
            for n in range(3):
                publisher.publish("plant/a", "t", b"%d" % (n + 2), expiry=0.3)
            assert wait_until(lambda: frames("frames_sent") > sent, timeout=10)
            sent = frames("frames_sent") - sent
            assert wait_until(lambda: frames("frames_expired") >= sent, timeout=10)
        publisher.publish("plant/a", "t", b"5", expiry=30)
        items = [subscription.get(timeout=10), subscription.get(timeout=10)]
        gap, message = items
        assert isinstance(gap, Gap), items
        assert (gap.first_sequence, gap.count, gap.reason) == (2, 3, "expired")
        assert gap.source_name == publisher.name
        assert isinstance(message, Message)
        assert message.sequence == 5


def test_gap_arguments_are_checked() -> None:
    settings = multicast_settings(f"239.192.137.15:{free_udp_port()}")
    with EndpointManager.from_env(**settings) as endpoint:
        with pytest.raises(UsageValueError, match="on_gap"):
            endpoint.subscribe("a", "t", lambda m: None, gaps=True)
        with pytest.raises(UsageValueError, match="gaps=True"):
            endpoint.subscribe("a", "t", on_gap=lambda g: None)
        with pytest.raises(UsageTypeError):
            endpoint.subscribe("a", "t", gaps="yes")  # type: ignore[arg-type]
        with pytest.raises(UsageTypeError):
            endpoint.subscribe("a", "t", lambda m: None, on_gap=42)  # type: ignore[arg-type]


async def test_on_gap_on_the_asyncio_api_comes_between_the_messages() -> None:
    settings = multicast_settings(
        f"239.192.137.16:{free_udp_port()}", discovery_rate_timeout_multiplier=10.0
    )
    seen: list[object] = []
    arrived = asyncio.Event()

    async def on_gap(gap: Gap) -> None:  # an async one: awaited in order
        seen.append(gap)

    def on_message(message: Message) -> None:
        seen.append(message.sequence)
        if message.sequence == 5:
            arrived.set()

    async with (
        AsyncEndpointManager.from_env(**settings) as publisher,
        AsyncEndpointManager.from_env(**settings) as subscriber,
    ):
        subscriber.subscribe("plant/#", "t", on_message, on_gap=on_gap)
        await publisher.wait_for_subscribers("plant/a", count=1, timeout=10)
        await publisher.publish("plant/a", "t", b"1", expiry=30)
        assert await async_wait_until(lambda: seen == [1], timeout=10)

        def frames(counter: str) -> int:
            return publisher.peer_counters()[subscriber.endpoint_id].get(counter, 0)

        sent = frames("frames_sent")
        with dropped_to(subscriber.data_address[1]):
            for n in range(3):
                await publisher.publish("plant/a", "t", b"%d" % (n + 2), expiry=0.3)
            assert await async_wait_until(lambda: frames("frames_sent") > sent, timeout=10)
            sent = frames("frames_sent") - sent
            assert await async_wait_until(lambda: frames("frames_expired") >= sent, timeout=10)
        await publisher.publish("plant/a", "t", b"5", expiry=30)
        await asyncio.wait_for(arrived.wait(), 10)
    first, gap, last = seen
    assert (first, last) == (1, 5)
    assert isinstance(gap, Gap)
    assert (gap.first_sequence, gap.count, gap.reason) == (2, 3, "expired")


def test_a_message_that_expired_in_a_busy_callback_queue_never_reaches_the_callback() -> None:
    settings = multicast_settings(f"239.192.137.20:{free_udp_port()}")
    seen: list[object] = []
    busy = threading.Event()
    release = threading.Event()

    def on_message(message: Message) -> None:
        seen.append(message.sequence)
        if message.sequence == 1:
            busy.set()
            release.wait(30)  # a slow handler: the next messages wait in the queue

    with (
        EndpointManager.from_env(**settings) as publisher,
        EndpointManager.from_env(**settings) as subscriber,
    ):
        subscription = subscriber.subscribe("robot/#", "command", on_message, on_gap=seen.append)
        publisher.wait_for_subscribers("robot/arm", count=1, timeout=10)
        publisher.publish("robot/arm", "command", b"1", expiry=30)
        assert busy.wait(10)
        sent_at = time.time()
        for _ in range(3):  # 2..4: they expire while the callback is busy
            publisher.publish("robot/arm", "command", b"stale", expiry=0.3)
        publisher.publish("robot/arm", "command", b"5", expiry=30)
        assert wait_until(lambda: subscriber.counters().get("topics_received", 0) >= 5, timeout=10)
        assert wait_until(lambda: time.time() > sent_at + 0.3, timeout=5)  # their expiry
        release.set()
        assert wait_until(lambda: 5 in seen, timeout=10)
    first, gap, last = seen
    assert (first, last) == (1, 5)
    assert isinstance(gap, Gap)
    assert (gap.first_sequence, gap.count, gap.reason) == (2, 3, "expired")
    assert subscription.expired == 3
