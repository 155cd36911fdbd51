"""Bounded in bytes, not only counts (issue 14, item 5), over real sockets.

- A stuck subscriber of 64 KiB messages holds at most its ``queue_bytes`` (before: 100,000
  messages, 6.5 GB); the rest is dropped for it alone, counted and warned about, while a healthy
  subscription on the same endpoint gets everything.
- ``messages()`` and ``peer_events()`` iterators dropped without being iterated stop receiving
  at once (before: registered forever, collecting 100,000 events and warning on every burst);
  one kept but never iterated holds at most its bounds and warns at the 1st, 10th, 100th drop.
- ``AsyncEndpointManager`` callbacks run in order, one call at a time, on one task per callback
  (before: one task per event, unbounded and out of order).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading

import pytest

from glue import AsyncEndpointManager, EndpointManager, Message, MessageReceived, Peer
from tests.helpers import Inbox, async_wait_until, wait_until

KIND = "bounded"
SIZE = 64 * 1024


def test_a_stuck_subscriber_of_64_kib_messages_holds_at_most_its_queue_bytes(
    settings: dict[str, object], caplog: pytest.LogCaptureFixture
) -> None:
    release = threading.Event()
    entered = threading.Event()
    stuck: list[Message] = []

    def stuck_callback(message: Message) -> None:
        stuck.append(message)
        entered.set()
        release.wait(30)

    try:
        with (
            EndpointManager.from_env(**settings) as publisher,
            EndpointManager.from_env(**settings) as subscriber,
        ):
            slow = subscriber.subscribe("big", KIND, stuck_callback, queue_bytes=1024 * 1024)
            fast = Inbox()
            subscriber.subscribe("big", KIND, fast)
            publisher.wait_for_subscribers("big", timeout=5)
            publisher.publish("big", KIND, bytes(SIZE))
            assert entered.wait(5)  # the first is in the callback, out of the queue
            with caplog.at_level(logging.WARNING, logger="glue.subscription"):
                for n in range(1, 200):
                    publisher.publish("big", KIND, b"%05d" % n + bytes(SIZE - 5), timeout=30)
                assert fast.wait_for_count(200, timeout=30), len(fast.messages)
                # 1 MiB holds 16 messages of 64 KiB; the other 183 are dropped.
                assert wait_until(lambda: slow.dropped == 199 - 16, timeout=5), slow.dropped
            warnings = [
                r.getMessage() for r in caplog.records if "not keeping up" in r.getMessage()
            ]
            assert 1 <= len(warnings) <= 3  # at the 1st, 10th and 100th drop only
            assert subscriber.counters()["subscription_messages_dropped"] == slow.dropped
            release.set()
            assert wait_until(lambda: len(stuck) == 17, timeout=5)
            assert [m.sequence for m in stuck] == list(range(1, 18))  # the oldest, in order
    finally:
        release.set()


def test_iterators_dropped_without_being_iterated_stop_receiving(
    settings: dict[str, object], caplog: pytest.LogCaptureFixture
) -> None:
    with (
        EndpointManager.from_env(**settings) as sender,
        EndpointManager.from_env(**settings) as receiver,
    ):
        got = Inbox()
        receiver.on_message(got)
        receiver.messages()  # never iterated, dropped at once
        receiver.peer_events()
        forgotten = receiver.messages(timeout=5)
        del forgotten
        gc.collect()
        kept = receiver.messages(queue_size=10)  # held, never iterated
        [peer] = sender.wait_for_peers(1, timeout=5)
        with caplog.at_level(logging.WARNING):
            for n in range(500):
                sender.send(b"%d" % n, to=[peer.endpoint_id])
            assert got.wait_for_count(500, timeout=10)
            assert wait_until(lambda: kept.dropped == 490, timeout=5), kept.dropped
        # Only the kept one collected anything, and it was told to the log three times, not
        # once per burst.
        assert receiver.counters()["events_dropped_slow_consumer"] == 490
        assert len(receiver._message_streams) == 1  # the kept one
        assert len(receiver._peer_streams) == 0
        warnings = [r.getMessage() for r in caplog.records if "not keeping up" in r.getMessage()]
        assert len(warnings) == 3, warnings
        assert [next(kept).payload for _ in range(10)] == [b"%d" % n for n in range(10)]
        kept.close()
        assert list(kept) == []


async def test_async_iterators_dropped_without_being_iterated_stop_receiving(
    settings: dict[str, object],
) -> None:
    async with (
        AsyncEndpointManager.from_env(**settings) as sender,
        AsyncEndpointManager.from_env(**settings) as receiver,
    ):
        got: list[MessageReceived] = []
        receiver.on_message(got.append)
        receiver.messages()
        receiver.peer_events()
        listening = receiver.messages()
        [peer] = await sender.wait_for_peers(1, timeout=5)
        for n in range(300):
            await sender.send(b"%d" % n, to=[peer.endpoint_id])
        assert await async_wait_until(lambda: len(got) == 300, timeout=10)
        assert receiver.counters().get("events_dropped_slow_consumer", 0) == 0
        # Only the iterator still referenced is registered (before: all three, for good).
        assert len(receiver._message_streams) == 1
        assert len(receiver._peer_streams) == 0
        received = [(await anext(listening)).payload for _ in range(300)]
        assert received == [b"%d" % n for n in range(300)]
        await listening.aclose()


async def test_async_message_callbacks_run_in_order_on_one_task(
    settings: dict[str, object],
) -> None:
    seen: list[int] = []
    tasks: set[object] = set()
    running = 0
    overlapped = False

    async def on_message(message: MessageReceived) -> None:
        nonlocal running, overlapped
        running += 1
        overlapped = overlapped or running > 1
        tasks.add(asyncio.current_task())
        number = int(message.payload)
        # The odd ones take longer: with a task per message, they finished out of order.
        await asyncio.sleep(0.002 if number % 2 else 0)
        seen.append(number)
        running -= 1

    async with (
        AsyncEndpointManager.from_env(**settings) as sender,
        AsyncEndpointManager.from_env(**settings) as receiver,
    ):
        receiver.on_message(on_message)
        [peer] = await sender.wait_for_peers(1, timeout=5)
        for n in range(200):
            await sender.send(b"%d" % n, to=[peer.endpoint_id])
        assert await async_wait_until(lambda: len(seen) == 200, timeout=10), len(seen)
    assert seen == list(range(200))
    assert not overlapped
    assert len(tasks) == 1


async def test_async_peer_callbacks_run_in_order_on_one_task(settings: dict[str, object]) -> None:
    added: list[str] = []
    tasks: set[object] = set()

    async def on_added(peer: Peer) -> None:
        tasks.add(asyncio.current_task())
        # The first takes longest: with a task per event, it was added last.
        await asyncio.sleep(0.05 if not added and peer.name == "p0" else 0)
        added.append(peer.name)

    async with AsyncEndpointManager.from_env(**settings) as watcher:
        watcher.on_peer_added(on_added)
        for n in range(3):
            async with AsyncEndpointManager.from_env(**settings, endpoint_name=f"p{n}"):
                assert await async_wait_until(lambda n=n: len(added) == n + 1, timeout=5)
    assert added == ["p0", "p1", "p2"]
    assert len(tasks) == 1
