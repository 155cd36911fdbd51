"""Direct messages grown up (issue 17, items 3 and 4) over real sockets: a type, ``sent_at``,
``expires_at`` and ``.json()`` with the clocks of topic messages; ``on_message`` callbacks
that run side by side per sender; and expiry that holds to the callback and the iterator."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from glue import AsyncEndpointManager, EndpointManager, MessageReceived, UsageError
from tests.helpers import Inbox, async_wait_until, free_udp_port, multicast_settings, wait_until


def _settings(last: int) -> dict[str, object]:
    return multicast_settings(f"239.192.137.{last}:{free_udp_port()}")


def test_a_direct_message_carries_its_type_times_and_json() -> None:
    settings = _settings(23)
    with (
        EndpointManager.from_env(**settings, endpoint_name="controller") as controller,
        EndpointManager.from_env(**settings, endpoint_name="robot") as robot,
    ):
        inbox = Inbox()
        robot.on_message(inbox)
        controller.wait_for_peers(1, timeout=10)
        before = time.time()
        controller.send_json({"go": "home"}, to=["robot"], message_type="command", expiry=30)
        controller.send(b"raw", to=["robot"])
        assert inbox.wait_for_count(2, timeout=10)
        after = time.time()
        typed, plain = inbox.messages
        with pytest.raises(UsageError) as bad:
            controller.send(b"x", message_type="no spaces")
        assert bad.value.argument == "message_type"
        with pytest.raises(UsageError):
            controller.send(b"x", message_type=7)  # type: ignore[arg-type]
    assert isinstance(typed, MessageReceived)
    assert typed.json() == {"go": "home"}
    assert (typed.message_type, plain.message_type) == ("command", "")
    assert (typed.source_name, typed.source_id) == ("controller", typed.source.endpoint_id)
    # Wall clock, as topic messages: sent, then received, both within the test's own span.
    assert before <= typed.sent_at <= typed.received_at <= after
    # (the time to live travels in whole milliseconds, and each side's wall clock is its
    # monotonic one plus an offset measured at its timers: a few ms of slack)
    assert typed.received_at + 29 < typed.expires_at < typed.sent_at + 30.05
    assert plain.expires_at < plain.sent_at + 5.05  # the default expiry


def test_a_slow_handler_for_one_sender_does_not_hold_up_another() -> None:
    settings = _settings(24)
    with (
        EndpointManager.from_env(**settings, endpoint_name="robot") as robot,
        EndpointManager.from_env(**settings, endpoint_name="slow") as slow,
        EndpointManager.from_env(**settings, endpoint_name="ping") as ping,
    ):
        release = threading.Event()
        pinged = threading.Event()
        handled: list[tuple[str, bytes]] = []

        def handler(message: MessageReceived) -> None:
            handled.append((message.source_name, message.payload))
            if message.source_name == "slow":
                release.wait(10)  # a 10 s handler, unless released
            else:
                pinged.set()

        robot.on_message(handler)
        for endpoint in (robot, slow, ping):
            endpoint.wait_for_peers(2, timeout=10)
        slow.send(b"long job", to=["robot"])
        slow.send(b"second job", to=["robot"])  # waits behind the first: same sender
        assert wait_until(lambda: ("slow", b"long job") in handled, timeout=10)
        ping.send(b"ping", to=["robot"])
        assert pinged.wait(10), handled  # while the slow sender's handler still runs
        assert ("slow", b"second job") not in handled
        release.set()
        assert wait_until(lambda: len(handled) == 3, timeout=10)
    assert handled == [("slow", b"long job"), ("ping", b"ping"), ("slow", b"second job")]


def test_a_direct_message_that_expired_in_the_callback_queue_is_not_handed_over() -> None:
    # The robot: a command that timed out at the controller still ran 0.6 s later.
    settings = _settings(25)
    with (
        EndpointManager.from_env(**settings, endpoint_name="robot") as robot,
        EndpointManager.from_env(**settings, endpoint_name="controller") as controller,
    ):
        release = threading.Event()
        handled: list[bytes] = []

        def handler(message: MessageReceived) -> None:
            handled.append(message.payload)
            if message.payload == b"busy":
                release.wait(10)

        robot.on_message(handler)
        controller.wait_for_peers(1, timeout=10)
        controller.send(b"busy", to=["robot"], expiry=30)
        assert wait_until(lambda: handled == [b"busy"], timeout=10)
        controller.send(b"move now", to=["robot"], expiry=0.2)  # will wait behind "busy"
        controller.send(b"after", to=["robot"], expiry=30)
        controller.flush(timeout=10)  # both arrived (acknowledged), waiting for the callback
        sent = time.time()
        assert wait_until(lambda: time.time() > sent + 0.3, timeout=5)  # "move now" expired
        release.set()
        assert wait_until(lambda: b"after" in handled, timeout=10)
        assert robot.counters()["direct_messages_expired"] == 1
    assert handled == [b"busy", b"after"]


def test_the_messages_iterator_skips_what_expired_while_it_waited() -> None:
    settings = _settings(26)
    with (
        EndpointManager.from_env(**settings) as rx,
        EndpointManager.from_env(**settings) as tx,
        rx.messages(timeout=10) as stream,
    ):
        tx.wait_for_peers(1, timeout=10)
        tx.send(b"stale", expiry=0.2)
        tx.send(b"fresh", expiry=30)
        tx.flush(timeout=10)
        sent = time.time()
        assert wait_until(lambda: time.time() > sent + 0.3, timeout=5)
        assert next(stream).payload == b"fresh"
        assert stream.expired == 1
        assert rx.counters()["direct_messages_expired"] == 1


async def test_the_asyncio_api_types_and_runs_senders_side_by_side() -> None:
    settings = _settings(27)
    async with (
        AsyncEndpointManager.from_env(**settings, endpoint_name="robot") as robot,
        AsyncEndpointManager.from_env(**settings, endpoint_name="slow") as slow,
        AsyncEndpointManager.from_env(**settings, endpoint_name="ping") as ping,
    ):
        release = asyncio.Event()
        handled: list[tuple[str, str, object]] = []

        async def handler(message: MessageReceived) -> None:
            handled.append((message.source_name, message.message_type, message.json()))
            if message.source_name == "slow":
                await asyncio.wait_for(release.wait(), 10)

        remove = robot.on_message(handler)
        for endpoint in (robot, slow, ping):
            await endpoint.wait_for_peers(2, timeout=10)
        await slow.send_json("job", to=["robot"], message_type="job")
        await slow.send_json("job 2", to=["robot"], message_type="job")
        assert await async_wait_until(lambda: len(handled) == 1, timeout=10)
        await ping.send_json("ping", to=["robot"], message_type="ping")
        assert await async_wait_until(lambda: len(handled) == 2, timeout=10), handled
        release.set()
        assert await async_wait_until(lambda: len(handled) == 3, timeout=10)
        remove()
        async with robot.messages() as stream:
            await ping.send(b"stale", to=["robot"], expiry=0.2)
            await ping.send(b"fresh", to=["robot"], expiry=30)
            await ping.flush(timeout=10)
            sent = time.time()
            assert await async_wait_until(lambda: time.time() > sent + 0.3, timeout=5)
            assert (await anext(stream)).payload == b"fresh"
            assert stream.expired == 1
    assert handled == [("slow", "job", "job"), ("ping", "ping", "ping"), ("slow", "job", "job 2")]
