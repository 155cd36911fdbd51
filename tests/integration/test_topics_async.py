"""The asyncio topics API over real sockets: ``async for`` over a subscription, plain and async
callbacks, history for a late joiner, unsubscribing."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from glue import AsyncEndpointManager, Message, UsageError
from tests.helpers import async_wait_until

KIND = "test.async"


@pytest.fixture
async def pair(
    settings: dict[str, object],
) -> AsyncIterator[tuple[AsyncEndpointManager, AsyncEndpointManager]]:
    async with (
        AsyncEndpointManager.from_env(**settings) as publisher,
        AsyncEndpointManager.from_env(**settings) as subscriber,
    ):
        await publisher.wait_for_peers(1, timeout=5)
        await subscriber.wait_for_peers(1, timeout=5)
        yield publisher, subscriber


async def _interest_known(publisher: AsyncEndpointManager, count: int) -> None:
    assert await async_wait_until(
        lambda: publisher.counters().get("topics_interest_received", 0) >= count, timeout=5
    ), publisher.counters()


async def test_async_for_over_a_subscription_yields_every_message_in_order(
    pair: tuple[AsyncEndpointManager, AsyncEndpointManager],
) -> None:
    publisher, subscriber = pair
    subscription = subscriber.subscribe("async/+/data", KIND)
    await _interest_known(publisher, 1)
    sent = [b"%d:" % n + bytes(n * 331 % 70_000) for n in range(1, 51)]  # some fragmented
    for index, payload in enumerate(sent):
        await publisher.publish(f"async/{index % 3}/data", KIND, payload)

    async def first(count: int) -> list[Message]:
        got = []
        async for message in subscription:
            got.append(message)
            if len(got) == count:
                break
        return got

    got = await asyncio.wait_for(first(len(sent)), 10)
    assert [m.payload for m in got] == sent
    for topic in ("async/0/data", "async/1/data", "async/2/data"):
        sequences = [m.sequence for m in got if m.topic_name == topic]
        assert sequences == list(range(1, len(sequences) + 1))
    assert {m.source_id for m in got} == {publisher.endpoint_id}
    subscription.close()
    with pytest.raises(EOFError):
        await subscription.get()


async def test_plain_and_async_callbacks_run_in_order(
    pair: tuple[AsyncEndpointManager, AsyncEndpointManager],
) -> None:
    publisher, subscriber = pair
    plain: list[int] = []
    awaited: list[int] = []

    def on_plain(message: Message) -> None:
        plain.append(message.sequence)

    async def on_async(message: Message) -> None:
        await asyncio.sleep(0)  # a real suspension between messages
        awaited.append(message.sequence)

    subscriber.subscribe("cb/t", KIND, on_plain)
    subscriber.subscribe("cb/#", KIND, on_async)
    await _interest_known(publisher, 1)
    for number in range(200):
        await publisher.publish("cb/t", KIND, b"%d" % number)
    assert await async_wait_until(lambda: len(plain) == 200 and len(awaited) == 200, timeout=10)
    assert plain == list(range(1, 201))
    assert awaited == plain


async def test_a_callback_subscription_cannot_be_iterated(
    pair: tuple[AsyncEndpointManager, AsyncEndpointManager],
) -> None:
    _, subscriber = pair
    subscription = subscriber.subscribe("cb/t", KIND, lambda message: None)
    with pytest.raises(UsageError, match="callback"):
        subscription.__aiter__()
    with pytest.raises(UsageError, match="invalid topic pattern"):
        subscriber.subscribe("a/#/b", KIND)


async def test_an_async_late_joiner_gets_the_history_then_new_messages(
    settings: dict[str, object],
) -> None:
    async with AsyncEndpointManager.from_env(**settings) as publisher:
        for number in range(1, 11):
            await publisher.publish("late/t", KIND, b"%d" % number, history_depth=5, expiry=60)
        async with AsyncEndpointManager.from_env(**settings) as late:
            subscription = late.subscribe("late/#", KIND)
            history = [await asyncio.wait_for(subscription.get(), 5) for _ in range(5)]
            await publisher.publish("late/t", KIND, b"11", expiry=60)
            new = await asyncio.wait_for(subscription.get(), 5)
    assert [m.sequence for m in history] == [6, 7, 8, 9, 10]
    assert [m.payload for m in history] == [b"6", b"7", b"8", b"9", b"10"]
    assert (new.sequence, new.payload) == (11, b"11")


async def test_no_callback_starts_after_an_async_unsubscribe_while_messages_flow(
    pair: tuple[AsyncEndpointManager, AsyncEndpointManager],
) -> None:
    publisher, subscriber = pair
    release = asyncio.Event()
    calls: list[int] = []
    after_close: list[int] = []
    closed = False

    async def blocking(message: Message) -> None:
        if closed:
            after_close.append(message.sequence)
        calls.append(message.sequence)
        await release.wait()

    control: list[int] = []
    subscription = subscriber.subscribe("flow/#", KIND, blocking)
    subscriber.subscribe("flow/data", KIND, lambda m: control.append(m.sequence))
    await _interest_known(publisher, 1)
    for number in range(300):
        await publisher.publish("flow/data", KIND, b"%d" % number)
    assert await async_wait_until(lambda: len(control) == 300, timeout=10)
    assert calls == [1]  # the first call waits; 299 are queued behind it
    subscriber.unsubscribe(subscription)
    closed = True
    release.set()
    for number in range(300, 600):
        await publisher.publish("flow/data", KIND, b"%d" % number)
    assert await async_wait_until(lambda: len(control) == 600, timeout=10)
    assert after_close == []
    assert calls == [1]
    assert subscription.closed
