"""Retained values over real sockets (issue 17, item 5): ``publish(..., retain=True)`` keeps a
quiet sensor's last reading for late joiners past the message's expiry, until a later one
replaces it; a keeper does the same after the publisher is gone."""

from __future__ import annotations

import time

import pytest

from glue import AsyncEndpointManager, EndpointManager, UsageError
from tests.helpers import Inbox, async_wait_until, free_udp_port, multicast_settings, wait_until

EXPIRY = 0.3


def _settings() -> dict[str, object]:
    return multicast_settings(f"239.192.137.14:{free_udp_port()}")


def _late_joiner_reads(settings: dict[str, object], publisher: EndpointManager) -> list[bytes]:
    """What a subscriber started now gets from history; the publisher's live message on
    ``room/end`` after it marks the end (history is sent before it, on the same stream)."""
    with EndpointManager.from_env(**settings) as late:
        inbox = Inbox()
        late.subscribe("room/#", "reading", inbox)
        publisher.wait_for_subscribers("room/end", count=1, timeout=10)
        publisher.publish("room/end", "reading", b"end")
        assert wait_until(lambda: b"end" in inbox.payloads(), timeout=10), inbox.payloads()
        return [p for p in inbox.payloads() if p != b"end"]


def test_a_retained_reading_outlives_its_expiry_until_replaced() -> None:
    settings = _settings()
    with EndpointManager.from_env(**settings) as sensor:
        sensor.publish("room/1", "reading", b"21.5", expiry=EXPIRY, retain=True)
        sensor.publish("room/2", "reading", b"gone", expiry=EXPIRY)  # not retained
        published = time.monotonic()
        with pytest.raises(UsageError):
            sensor.publish("room/1", "reading", b"x", retain=1)  # type: ignore[arg-type]
        # The sensor stays quiet past both expiries.
        assert wait_until(lambda: time.monotonic() > published + 2 * EXPIRY, timeout=5)
        assert _late_joiner_reads(settings, sensor) == [b"21.5"]
        sensor.publish("room/1", "reading", b"22.0", expiry=EXPIRY, retain=True)
        assert _late_joiner_reads(settings, sensor) == [b"22.0"]  # the old value is gone


def test_a_keeper_serves_a_retained_reading_after_its_publisher_exited_and_it_expired() -> None:
    settings = _settings()
    with EndpointManager.from_env(**settings) as keeper:
        keeper.keep_history("room/#", depth=1)
        with EndpointManager.from_env(**settings) as sensor:
            sensor.wait_for_subscribers("room/1", count=1, timeout=10)
            sensor.publish("room/1", "reading", b"19.0", expiry=EXPIRY, retain=True)
            sensor.flush(timeout=10)
            name = sensor.name
        published = time.monotonic()
        assert wait_until(lambda: time.monotonic() > published + 2 * EXPIRY, timeout=5)
        with EndpointManager.from_env(**settings) as late:
            inbox = Inbox()
            late.subscribe("room/#", "reading", inbox)
            assert inbox.wait_for_count(1, timeout=10)
            message = inbox.messages[0]
        assert keeper.counters().get("topics_kept_expired", 0) == 0
    assert (message.payload, message.source_name) == (b"19.0", name)


async def test_retain_on_the_asyncio_api() -> None:
    settings = _settings()
    async with AsyncEndpointManager.from_env(**settings) as sensor:
        await sensor.publish("room/1", "reading", b"20.0", expiry=EXPIRY, retain=True)
        await sensor.publish_json("room/2", "reading", {"t": 20.5}, expiry=EXPIRY, retain=True)
        published = time.monotonic()
        assert await async_wait_until(lambda: time.monotonic() > published + 2 * EXPIRY, timeout=5)
        async with AsyncEndpointManager.from_env(**settings) as late:
            got: list[bytes] = []
            late.subscribe("room/#", "reading", lambda m: got.append(m.payload))
            assert await async_wait_until(lambda: len(got) == 2, timeout=10), got
    assert sorted(got) == [b"20.0", b'{"t":20.5}']
