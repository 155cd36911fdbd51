"""``stop(timeout=...)`` returns in bounded time and says what it left behind (issue 14, item 5),
over real sockets.

Before, ``stop()`` joined the callback threads without a timeout, so one callback blocked for
good hung it for good, and it swallowed errors. Now it waits ``timeout`` seconds at most (5 by
default), starts no callback after that, and returns a ``StopReport``: frames not acknowledged
per peer, messages not sent, callbacks still running (also logged as a warning).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Iterator

import pytest

from glue import AsyncEndpointManager, EndpointManager, Message, MessageReceived
from glue.manager import DEFAULT_STOP_TIMEOUT_S
from tests.helpers import Inbox, async_wait_until, wait_until

KIND = "stop"
STOP_TIMEOUT_S = 1.0
#: What stop() may take beyond its timeout: handing the answer over between threads.
SLACK_S = 1.0


@pytest.fixture
def release() -> Iterator[threading.Event]:
    """What blocked callbacks wait on; set at the end whatever happens, so no thread is left."""
    event = threading.Event()
    yield event
    event.set()


def test_the_default_stop_timeout_is_five_seconds() -> None:
    assert DEFAULT_STOP_TIMEOUT_S == 5.0


def test_stop_returns_in_time_with_a_subscription_callback_blocked_forever(
    settings: dict[str, object], release: threading.Event, caplog: pytest.LogCaptureFixture
) -> None:
    entered = threading.Event()
    calls: list[bytes] = []

    def blocked(message: Message) -> None:
        calls.append(message.payload)
        entered.set()
        release.wait()  # an event nobody sets before stop() returns

    with EndpointManager.from_env(**settings) as publisher:
        subscriber = EndpointManager.from_env(**settings)
        subscriber.start()
        subscriber.subscribe("stuck/topic", KIND, blocked)
        publisher.wait_for_subscribers("stuck/topic", timeout=5)
        for n in range(5):
            publisher.publish("stuck/topic", KIND, b"%d" % n)
        assert entered.wait(5)
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="glue.manager"):
            report = subscriber.stop(timeout=STOP_TIMEOUT_S)
        took = time.monotonic() - started
    assert took < STOP_TIMEOUT_S + SLACK_S, took
    assert len(report.running) == 1, report
    assert "'stuck/topic'" in report.running[0]
    assert "blocked" in report.running[0]  # the callback, by name
    assert any("stopped leaving behind" in r.getMessage() for r in caplog.records)
    release.set()
    # The blocked callback returns; no other starts after stop (4 messages were waiting).
    assert wait_until(lambda: not [t for t in threading.enumerate() if "callbacks" in t.name
                                   and subscriber.name in t.name], timeout=5)  # fmt: skip
    assert calls == [b"0"]
    assert subscriber.stop().clean  # idempotent: nothing more to report


def test_stop_returns_in_time_with_a_message_callback_blocked_forever(
    settings: dict[str, object], release: threading.Event
) -> None:
    entered = threading.Event()
    calls: list[MessageReceived] = []

    def blocked(message: MessageReceived) -> None:
        calls.append(message)
        entered.set()
        release.wait()

    with EndpointManager.from_env(**settings) as sender:
        receiver = EndpointManager.from_env(**settings)
        receiver.start()
        receiver.on_message(blocked)
        [peer] = sender.wait_for_peers(1, timeout=5)
        for n in range(5):
            sender.send(b"%d" % n, to=[peer.endpoint_id])
        assert entered.wait(5)
        started = time.monotonic()
        report = receiver.stop(timeout=STOP_TIMEOUT_S)
        took = time.monotonic() - started
    assert took < STOP_TIMEOUT_S + SLACK_S, took
    [running] = report.running
    assert "blocked" in running
    assert f"glue-callbacks-{receiver.name}" in running
    release.set()
    assert wait_until(
        lambda: (
            not [t for t in threading.enumerate() if t.name == f"glue-callbacks-{receiver.name}"]
        ),
        timeout=5,
    )
    assert len(calls) == 1  # the four waiting were not delivered after stop


def test_a_clean_stop_reports_nothing(settings: dict[str, object]) -> None:
    with EndpointManager.from_env(**settings) as a, EndpointManager.from_env(**settings) as b:
        inbox = Inbox()
        b.subscribe("clean", KIND, inbox)
        a.wait_for_subscribers("clean", timeout=5)
        a.publish("clean", KIND, b"x")
        assert inbox.wait_for_count(1, timeout=5)
        a.flush(timeout=5)
        report = a.stop(timeout=STOP_TIMEOUT_S)
    assert report.clean, report


def test_stop_names_the_frames_a_peer_did_not_acknowledge(
    settings: dict[str, object], release: threading.Event, caplog: pytest.LogCaptureFixture
) -> None:
    with EndpointManager.from_env(**settings) as subscriber:
        inbox = Inbox()
        subscriber.subscribe("unacked", KIND, inbox)
        publisher = EndpointManager.from_env(**settings)
        publisher.start()
        try:
            publisher.wait_for_subscribers("unacked", timeout=5)
            # The subscriber's network thread is held, so nothing it is sent is acknowledged.
            held = threading.Event()
            subscriber._endpoint.call_soon(lambda: (held.set(), release.wait(10)))
            assert held.wait(5)
            for n in range(5):
                publisher.publish("unacked", KIND, b"%d" % n)
            assert wait_until(
                lambda: publisher.peer_counters()[subscriber.endpoint_id].get("frames_sent", 0) > 0,
                timeout=5,
            )
            with caplog.at_level(logging.WARNING, logger="glue.manager"):
                report = publisher.stop(timeout=STOP_TIMEOUT_S)
        finally:
            release.set()
            publisher.stop()
    assert report.unacknowledged.get(subscriber.endpoint_id, 0) >= 1, report
    assert not report.running
    assert any("frames unacknowledged by 1 peers" in r.getMessage() for r in caplog.records)


async def test_async_stop_cancels_a_callback_awaiting_forever(
    settings: dict[str, object],
) -> None:
    entered = asyncio.Event()
    never = asyncio.Event()

    async def waits_forever(message: Message) -> None:
        entered.set()
        await never.wait()

    async with AsyncEndpointManager.from_env(**settings) as publisher:
        subscriber = AsyncEndpointManager.from_env(**settings)
        await subscriber.start()
        subscriber.subscribe("stuck", KIND, waits_forever)
        await publisher.wait_for_subscribers("stuck", timeout=5)
        await publisher.publish("stuck", KIND, b"x")
        await asyncio.wait_for(entered.wait(), 5)
        loop = asyncio.get_running_loop()
        started = loop.time()
        report = await subscriber.stop(timeout=STOP_TIMEOUT_S)
        assert loop.time() - started < STOP_TIMEOUT_S + SLACK_S
    assert not report.running, report  # cancelled: it ended


async def test_async_stop_returns_in_time_past_a_callback_that_refuses_to_end(
    settings: dict[str, object],
) -> None:
    entered = asyncio.Event()
    done = asyncio.Event()

    async def stubborn(message: MessageReceived) -> None:
        entered.set()
        while not done.is_set():
            try:
                await done.wait()
            except asyncio.CancelledError:
                continue  # swallows the cancellation stop() sends

    async with AsyncEndpointManager.from_env(**settings) as sender:
        receiver = AsyncEndpointManager.from_env(**settings)
        await receiver.start()
        receiver.on_message(stubborn)
        [peer] = await sender.wait_for_peers(1, timeout=5)
        await sender.send(b"x", to=[peer.endpoint_id])
        await asyncio.wait_for(entered.wait(), 5)
        loop = asyncio.get_running_loop()
        started = loop.time()
        report = await receiver.stop(timeout=STOP_TIMEOUT_S)
        assert loop.time() - started < STOP_TIMEOUT_S + SLACK_S
        [running] = report.running
        assert "on_message" in running
        assert "stubborn" in running
        done.set()
        assert await async_wait_until(lambda: not _tasks_named("on_message"), timeout=5)


def _tasks_named(prefix: str) -> list[asyncio.Task[object]]:
    return [t for t in asyncio.all_tasks() if t.get_name().startswith(prefix)]
