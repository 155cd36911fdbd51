"""``GLUE_BUSY_POLL_MICROSECONDS`` (issue 15) over real sockets, with both APIs.

With it set, the network thread (blocking API) or the event loop (asyncio API) keeps polling its
sockets for that long after datagrams came, instead of sleeping: a reply that comes back within
it is found by a thread already running. These tests show that a conversation under it loses
nothing and keeps its order, that the polling really finds datagrams (``busy_poll_wakeups``),
and that it stops when the traffic stops: an idle endpoint does not spin.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from glue import AsyncEndpointManager, EndpointManager, Message
from tests.helpers import async_wait_until, wait_until

KIND = "busy"
ROUND_TRIPS = 500
BUSY_POLL_US = 2000
IDLE_S = 2.0


def _ping_pong(pinger: EndpointManager, echo: EndpointManager, *, inline: bool) -> list[bytes]:
    echo.subscribe(
        "busy/ping",
        KIND,
        lambda m: echo.publish("busy/pong", KIND, m.payload),
        inline=inline,
    )
    pongs = pinger.subscribe("busy/pong", KIND)
    pinger.wait_for_subscribers("busy/ping", timeout=5)
    echo.wait_for_subscribers("busy/pong", timeout=5)
    got = []
    for n in range(ROUND_TRIPS):
        pinger.publish("busy/ping", KIND, b"%d" % n)
        got.append(pongs.get(timeout=5).payload)
    return got


@pytest.mark.parametrize("inline", [True, False], ids=["inline", "pool"])
def test_a_blocking_conversation_under_busy_polling_is_whole_and_in_order(
    settings: dict[str, object], inline: bool
) -> None:
    busy = {**settings, "busy_poll_microseconds": BUSY_POLL_US}
    with EndpointManager.from_env(**busy) as pinger, EndpointManager.from_env(**busy) as echo:
        got = _ping_pong(pinger, echo, inline=inline)
        assert got == [b"%d" % n for n in range(ROUND_TRIPS)]
        # The replies were found by polling, not by waking from a sleep (most of them: the
        # first of each burst, and any after a pause longer than the polling, are not).
        # Each polled: replies were found by polling, or polling was cut short (the thread kept
        # from running, here mostly waiting for the GIL the other endpoint's threads hold).
        for endpoint in (pinger, echo):
            assert _engaged(endpoint.counters()), endpoint.counters()


async def test_an_asyncio_conversation_under_busy_polling_is_whole_and_in_order(
    settings: dict[str, object],
) -> None:
    busy = {**settings, "busy_poll_microseconds": BUSY_POLL_US}
    async with (
        AsyncEndpointManager.from_env(**busy) as pinger,
        AsyncEndpointManager.from_env(**busy) as echo,
    ):

        async def answer(message: Message) -> None:
            await echo.publish("busy/pong", KIND, message.payload)

        echo.subscribe("busy/ping", KIND, answer)
        pongs = aiter(pinger.subscribe("busy/pong", KIND))
        await pinger.wait_for_subscribers("busy/ping", timeout=5)
        await echo.wait_for_subscribers("busy/pong", timeout=5)
        got = []
        for n in range(ROUND_TRIPS):
            await pinger.publish("busy/ping", KIND, b"%d" % n)
            async with asyncio.timeout(5):
                got.append((await anext(pongs)).payload)
        assert got == [b"%d" % n for n in range(ROUND_TRIPS)]
        for endpoint in (pinger, echo):
            assert _engaged(endpoint.counters()), endpoint.counters()


def _engaged(counters: dict[str, int]) -> bool:
    """Whether busy polling ran: it found datagrams, or stopped for want of a free core."""
    return counters.get("busy_poll_wakeups", 0) + counters.get("busy_poll_preempted", 0) > 0


def test_polling_stops_while_another_thread_holds_the_gil(settings: dict[str, object]) -> None:
    busy = {**settings, "busy_poll_microseconds": BUSY_POLL_US}
    with EndpointManager.from_env(**busy) as pinger, EndpointManager.from_env(**busy) as echo:
        stop = threading.Event()

        def hog() -> None:  # pure Python: holds the GIL for a switch interval (5 ms) at a time
            while not stop.is_set():
                sum(range(1000))

        hogging = threading.Thread(target=hog, daemon=True)
        hogging.start()
        try:
            got = _ping_pong(pinger, echo, inline=True)
        finally:
            stop.set()
            hogging.join()
        assert got == [b"%d" % n for n in range(ROUND_TRIPS)]
        # The polling threads were kept from running for longer than a poll takes, and said so.
        preempted = pinger.counters().get("busy_poll_preempted", 0)
        preempted += echo.counters().get("busy_poll_preempted", 0)
        assert preempted > 0


def test_the_network_thread_stops_polling_when_the_traffic_stops(
    settings: dict[str, object],
) -> None:
    # Announcements once a second: each one heard starts a polling of 20 ms, 2 % of a core.
    quiet = {**settings, "discovery_rate_milliseconds": 1000}
    with (
        EndpointManager.from_env(**quiet, busy_poll_microseconds=20_000) as busy,
        EndpointManager.from_env(**quiet) as other,
    ):
        busy.subscribe("busy/idle", KIND)
        other.wait_for_subscribers("busy/idle", timeout=5)
        for n in range(100):
            other.publish("busy/idle", KIND, b"%d" % n)
        other.flush(timeout=5)
        [thread] = [t for t in threading.enumerate() if t.name == f"glue-net-{busy.name}"]
        assert thread.ident is not None
        clock = time.pthread_getcpuclockid(thread.ident)
        assert wait_until(lambda: _engaged(busy.counters()), timeout=5)
        started_cpu, started = time.clock_gettime(clock), time.monotonic()
        time.sleep(IDLE_S)  # not a wait for something: the window the CPU is measured over
        cpu = time.clock_gettime(clock) - started_cpu
        elapsed = time.monotonic() - started
        # Spinning all along would take about a core (at least half of one on a loaded machine).
        assert cpu < 0.15 * elapsed, f"network thread used {cpu:.3f} s of CPU in {elapsed:.2f} s"


async def test_the_event_loop_stops_turning_when_the_traffic_stops(
    settings: dict[str, object],
) -> None:
    quiet = {**settings, "discovery_rate_milliseconds": 1000}
    async with (
        AsyncEndpointManager.from_env(**quiet, busy_poll_microseconds=20_000) as busy,
        AsyncEndpointManager.from_env(**quiet) as other,
    ):
        busy.subscribe("busy/idle", KIND)
        await other.wait_for_subscribers("busy/idle", timeout=5)
        for n in range(100):
            await other.publish("busy/idle", KIND, b"%d" % n)
        await other.flush(timeout=5)
        assert await async_wait_until(lambda: _engaged(busy.counters()), timeout=5)
        # The loop runs on this thread: its CPU over an idle window (both endpoints' share).
        started_cpu, started = time.thread_time(), time.monotonic()
        await asyncio.sleep(IDLE_S)  # not a wait for something: the window measured
        cpu = time.thread_time() - started_cpu
        elapsed = time.monotonic() - started
        assert cpu < 0.15 * elapsed, f"the loop used {cpu:.3f} s of CPU in {elapsed:.2f} s"
