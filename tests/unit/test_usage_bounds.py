"""Bounded in bytes, not only counts (issue 14, item 5), without sockets: subscription and event
queues, event iterators that stop receiving when dropped, async callbacks in order through one
bounded queue."""

from __future__ import annotations

import asyncio
import gc
import logging
import threading

import pytest

from glue.events import Message, MessageReceived, Peer
from glue.subscription import (
    DEFAULT_QUEUE_BYTES,
    AsyncEventIterator,
    AsyncEventQueue,
    AsyncSubscription,
    CallbackPool,
    CallbackRunner,
    EventIterator,
    EventQueue,
    Subscription,
)
from glue.wire import EndpointId

PEER = Peer(EndpointId(7), 1, "p7", "10.0.0.7", 4000, 1.0)


def _message(n: int, size: int) -> Message:
    return Message("t", "k", b"%d:" % n + b"x" * size, 1, "p", n, 0.0, 0.0)


def _received(n: int, size: int) -> MessageReceived:
    return MessageReceived(PEER, b"%d:" % n + b"x" * size, 0.0)


def _payload_size(message: MessageReceived) -> int:
    return len(message.payload)


# --- subscriptions ------------------------------------------------------------------------------


def test_the_default_byte_bound_is_64_mib() -> None:
    assert DEFAULT_QUEUE_BYTES == 64 * 1024 * 1024


def test_an_iterator_subscription_keeps_at_most_queue_bytes() -> None:
    pool = CallbackPool(1, "test")
    subscription = Subscription(
        "t", "k", None, queue_size=1000, queue_bytes=10_000, pool=pool, unsubscribe=lambda _: None
    )
    # 64 KiB-style messages, scaled down: 1,000 bytes each, 25 of them; 10 fit.
    lost = subscription._put_many([_message(n, 998) for n in range(25)])
    assert lost == 15
    assert subscription.dropped == 15
    got = [subscription.get(timeout=0) for _ in range(10)]
    assert [m.sequence for m in got] == list(range(10))  # the oldest kept, the newest dropped
    with pytest.raises(TimeoutError):
        subscription.get(timeout=0)
    # Taken out: room again.
    assert subscription._put_many([_message(n, 998) for n in range(25, 30)]) == 0
    pool.stop()


def test_one_message_larger_than_the_bound_passes_an_empty_queue_only() -> None:
    pool = CallbackPool(1, "test")
    subscription = Subscription(
        "t", "k", None, queue_size=10, queue_bytes=100, pool=pool, unsubscribe=lambda _: None
    )
    assert subscription._put_many([_message(1, 500)]) == 0
    assert subscription._put_many([_message(2, 500)]) == 1
    assert subscription.get(timeout=0).sequence == 1
    assert subscription._put_many([_message(3, 500), _message(4, 1)]) == 1
    assert subscription.get(timeout=0).sequence == 3
    pool.stop()


def test_a_stuck_callback_holds_at_most_queue_bytes_and_the_message_it_is_in() -> None:
    pool = CallbackPool(1, "test")
    entered, release = threading.Event(), threading.Event()
    seen: list[int] = []

    def stuck(message: Message) -> None:
        seen.append(message.sequence)
        entered.set()
        release.wait(10)

    try:
        subscription = Subscription(
            "t", "k", stuck, queue_size=1000, queue_bytes=5_000, pool=pool,
            unsubscribe=lambda _: None,
        )  # fmt: skip
        assert subscription._put_many([_message(0, 998)]) == 0
        assert entered.wait(5)  # message 0 is in the callback: out of the queue
        assert subscription._put_many([_message(n, 998) for n in range(1, 20)]) == 14
        release.set()
        assert _wait(lambda: len(seen) == 6)
        assert seen == [0, 1, 2, 3, 4, 5]
    finally:
        release.set()
        pool.stop()


async def test_an_async_subscription_keeps_at_most_queue_bytes() -> None:
    subscription = AsyncSubscription(
        "t", "k", None, queue_size=1000, queue_bytes=10_000, unsubscribe=lambda _: None
    )
    assert subscription._put_many([_message(n, 998) for n in range(25)]) == 15
    assert [(await subscription.get()).sequence for _ in range(10)] == list(range(10))
    assert subscription._put_many([_message(n, 998) for n in range(25, 34)]) == 0
    subscription.close()


# --- event iterators ----------------------------------------------------------------------------


def test_an_event_queue_is_bounded_in_bytes_and_warns_at_powers_of_ten(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stream: EventQueue[MessageReceived] = EventQueue("messages() of x", 1000, 10_000, _payload_size)
    with caplog.at_level(logging.WARNING, logger="glue.subscription"):
        kept = [stream.offer(_received(n, 998)) for n in range(200)]
    assert kept.count(True) == 10
    assert stream.dropped == 190
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 3  # at the 1st, 10th and 100th drop, not on every one
    assert "messages() of x is not keeping up: 100 events dropped" in warnings[-1]
    assert stream.get(0).payload.startswith(b"0:")  # type: ignore[union-attr]
    assert stream.offer(_received(1, 998))  # a message taken out made room


def test_an_iterator_dropped_without_being_iterated_stops_receiving_at_once() -> None:
    streams: set[EventQueue[MessageReceived]] = set()
    iterator = EventIterator(
        streams, what="m", timeout=0, queue_size=10, queue_bytes=100, sizer=None,
        ended=lambda: False,
    )  # fmt: skip
    assert len(streams) == 1  # registered at the call: nothing after it is missed
    del iterator
    assert streams == set()


def test_an_iterator_in_a_reference_cycle_leaves_at_garbage_collection() -> None:
    streams: set[EventQueue[MessageReceived]] = set()
    holder: dict[str, object] = {}
    holder["self"] = holder
    holder["iterator"] = EventIterator(
        streams, what="m", timeout=0, queue_size=10, queue_bytes=100, sizer=None,
        ended=lambda: False,
    )  # fmt: skip
    del holder
    gc.collect()
    assert streams == set()


def test_an_iterator_ends_when_closed_by_with_or_timed_out_or_made_after_stop() -> None:
    streams: set[EventQueue[MessageReceived]] = set()

    def make(ended: bool = False) -> EventIterator[MessageReceived]:
        return EventIterator(
            streams, what="m", timeout=0.01, queue_size=10, queue_bytes=10_000,
            sizer=_payload_size, ended=lambda: ended,
        )  # fmt: skip

    with make() as iterator:
        [stream] = streams
        stream.offer(_received(1, 5))
        assert next(iterator).payload.startswith(b"1:")
    assert streams == set()
    assert list(iterator) == []
    quiet = make()
    assert list(quiet) == []  # timeout without an event: ended, and unregistered
    assert streams == set()
    assert list(make(ended=True)) == []
    assert streams == set()


async def test_an_async_iterator_dropped_without_being_iterated_stops_receiving() -> None:
    streams: set[AsyncEventQueue[MessageReceived]] = set()
    iterator = AsyncEventIterator(
        streams, what="m", queue_size=10, queue_bytes=100, sizer=None, ended=lambda: False
    )
    assert len(streams) == 1
    del iterator
    assert streams == set()


async def test_an_async_iterator_is_bounded_and_ends_at_close_or_stop() -> None:
    streams: set[AsyncEventQueue[MessageReceived]] = set()
    iterator = AsyncEventIterator(
        streams, what="m", queue_size=100, queue_bytes=3_000, sizer=_payload_size,
        ended=lambda: False,
    )  # fmt: skip
    [stream] = streams
    assert [stream.offer(_received(n, 998)) for n in range(5)] == [True, True, True, False, False]
    assert iterator.dropped == 2
    assert (await anext(iterator)).payload.startswith(b"0:")
    waiting = asyncio.ensure_future(_drain(iterator))
    stream.end()  # the endpoint stopped
    assert await asyncio.wait_for(waiting, 5) == 2
    assert streams == set()


async def _drain(iterator: AsyncEventIterator[MessageReceived]) -> int:
    return len([m async for m in iterator])


# --- async callbacks ----------------------------------------------------------------------------


async def test_async_callbacks_run_in_order_one_at_a_time_on_one_task() -> None:
    seen: list[int] = []
    running = 0
    tasks: set[asyncio.Task[object] | None] = set()

    async def callback(message: MessageReceived) -> None:
        nonlocal running
        running += 1
        assert running == 1, "two calls at once"
        tasks.add(asyncio.current_task())
        number = int(message.payload.split(b":")[0])
        # The odd ones take longer: with a task per event they would finish out of order.
        await asyncio.sleep(0.002 if number % 2 else 0)
        seen.append(number)
        running -= 1

    runner = CallbackRunner(
        callback, what="on_message", queue_size=1000, queue_bytes=10**6, sizer=_payload_size
    )
    for n in range(100):
        assert runner.offer(_received(n, 10))
    assert await _async_wait(lambda: len(seen) == 100)
    assert seen == list(range(100))
    assert len(tasks) == 1
    assert await runner.stop(1) is None


async def test_a_callback_runner_drops_beyond_its_bounds_and_stop_cancels_a_stuck_call() -> None:
    release = asyncio.Event()
    seen: list[bytes] = []

    async def stuck(message: MessageReceived) -> None:
        seen.append(message.payload)
        await release.wait()

    runner = CallbackRunner(
        stuck, what="on_message of x", queue_size=1000, queue_bytes=3_000, sizer=_payload_size
    )
    kept = [runner.offer(_received(n, 998)) for n in range(10)]
    await _async_wait(lambda: len(seen) == 1)
    assert kept.count(False) == 7  # 3 fit in 3,000 bytes (the first was taken after)
    assert runner.dropped == 7
    assert await runner.stop(1) is None  # cancelled, it ended
    assert len(seen) == 1  # no call started after stop


async def test_a_callback_that_ignores_cancellation_is_reported_by_stop() -> None:
    release = asyncio.Event()
    entered = asyncio.Event()

    async def stubborn(peer: Peer) -> None:
        entered.set()
        while not release.is_set():
            try:
                await release.wait()
            except asyncio.CancelledError:
                continue  # refuses to stop

    runner = CallbackRunner(
        stubborn, what="on_peer_added of x", queue_size=10, queue_bytes=10, sizer=None
    )
    runner.offer(PEER)
    await asyncio.wait_for(entered.wait(), 5)
    loop = asyncio.get_running_loop()
    started = loop.time()
    left = await runner.stop(0.2)
    assert loop.time() - started < 1
    assert left is not None
    assert "on_peer_added of x" in left
    release.set()


def _wait(predicate, timeout: float = 5.0) -> bool:  # type: ignore[no-untyped-def]
    from tests.helpers import wait_until

    return wait_until(predicate, timeout=timeout)


async def _async_wait(predicate, timeout: float = 5.0) -> bool:  # type: ignore[no-untyped-def]
    from tests.helpers import async_wait_until

    return await async_wait_until(predicate, timeout=timeout)
