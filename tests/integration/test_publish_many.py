"""``publish_many`` (issue 15's batch API) over real sockets, with both APIs.

It does what as many ``publish`` calls do: each payload is its own message, numbered in turn,
delivered once and in order to every subscriber (in another process, and in the same endpoint),
interleaved correctly with single publishes; large payloads among small ones arrive whole. When a
subscriber stops acknowledging it waits, then raises ``BackpressureError`` saying how many of
its messages were queued; those arrive, once and in order, when the subscriber comes back. Bad
arguments are refused by name (tests/integration/test_usage_arguments.py).
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator

import pytest

from glue import AsyncEndpointManager, BackpressureError, EndpointManager
from tests.endpoint_process import EndpointProcess
from tests.helpers import Inbox, free_udp_port, wait_until

KIND = "many"
TOPIC = "many/t"


def _payloads(first: int, count: int, size: int = 16) -> list[bytes]:
    """Payloads numbered ``first``.. (the test endpoint checks ``<number>:`` against the
    sequence)."""
    return [b"%d:" % n + b"x" * size for n in range(first, first + count)]


@pytest.fixture
def subscriber() -> Iterator[tuple[dict[str, object], EndpointProcess]]:
    yield from _subscriber(f"239.192.137.1:{free_udp_port()}")


def _subscriber(group: str) -> Iterator[tuple[dict[str, object], EndpointProcess]]:
    """A subscriber process on TOPIC that the test may SIGSTOP (it stays a peer meanwhile)."""
    glue: dict[str, object] = {
        "discovery_target_address": group,
        "discovery_listen_address": group,
        "discovery_rate_milliseconds": 200,
        "discovery_rate_timeout_multiplier": 100.0,  # stopped, not gone
    }
    process = EndpointProcess(**glue)
    process.request("subscribe", pattern=TOPIC, type=KIND, report="summary")
    try:
        yield glue, process
    finally:
        if process.process.poll() is None:
            process.send_signal(signal.SIGCONT)
        process.close()


def _received(process: EndpointProcess) -> tuple[int, bool]:
    """How many TOPIC messages the process got, and whether once each, in order from 1, each
    payload's number its sequence."""
    streams = [s for s in process.summary() if s["topic"] == TOPIC]
    count = sum(s["count"] for s in streams)
    whole = len(streams) == 1 and streams[0]["ranges"] == [[1, count]]
    clean = all(s["duplicates"] == s["reordered"] == s["misnumbered"] == s["corrupt"] == 0
                for s in streams)  # fmt: skip
    return count, whole and clean


def test_batches_and_single_publishes_arrive_once_in_order_everywhere(
    subscriber: tuple[dict[str, object], EndpointProcess],
) -> None:
    glue, remote = subscriber
    with EndpointManager.from_env(**glue) as publisher:
        local = Inbox()
        publisher.subscribe(TOPIC, KIND, local)
        publisher.wait_for_subscribers(TOPIC, timeout=10)
        sent = 0
        for batch in (1, 100, 7, 1000, 3):
            publisher.publish_many(TOPIC, KIND, _payloads(sent + 1, batch))
            sent += batch
            publisher.publish(TOPIC, KIND, _payloads(sent + 1, 1)[0])
            sent += 1
        # Large ones among small ones: fragmented, and sent beside bundles.
        sizes = [10, 70_000, 20, 1_100_000, 30]
        publisher.publish_many(
            TOPIC, KIND, [_payloads(sent + 1 + i, 1, size)[0] for i, size in enumerate(sizes)]
        )
        sent += len(sizes)
        publisher.publish_many(TOPIC, KIND, [])  # nothing, and no error
        publisher.flush(timeout=20)
        assert wait_until(lambda: _received(remote)[0] >= sent, timeout=20, interval=0.05)
        assert _received(remote) == (sent, True)
        assert local.wait_for_count(sent, timeout=10)
        assert local.sequences() == list(range(1, sent + 1))
        assert [p.split(b":")[0] for p in local.payloads()] == [b"%d" % n for n in
                                                                range(1, sent + 1)]  # fmt: skip


def test_a_batch_waits_for_a_stuck_subscriber_then_says_how_many_were_queued(
    subscriber: tuple[dict[str, object], EndpointProcess],
) -> None:
    glue, remote = subscriber
    with EndpointManager.from_env(**glue, send_queue_bytes=65536) as publisher:
        publisher.wait_for_subscribers(TOPIC, timeout=10)
        remote.freeze()  # every thread stopped: none acknowledges
        batch = _payloads(1, 2000, 1000)  # 2 MB: far beyond what may wait for it
        with pytest.raises(BackpressureError) as caught:
            publisher.publish_many(TOPIC, KIND, batch, timeout=0.5)
        queued = caught.value.queued
        assert queued is not None
        # Bounded: the hand-off queue and the peer's queue, 64 KiB each, and no more.
        assert 0 < queued * 1000 <= 2 * 65536 + 2000, queued
        assert caught.value.peers == (remote.endpoint_id,)
        remote.send_signal(signal.SIGCONT)
        rest = _payloads(queued + 1, 300)
        publisher.publish_many(TOPIC, KIND, rest, timeout=10)  # room again once acks flow
        sent = queued + len(rest)
        publisher.flush(timeout=20)
        assert wait_until(lambda: _received(remote)[0] >= sent, timeout=20, interval=0.05)
        assert _received(remote) == (sent, True)


def test_the_asyncio_api_publishes_batches_in_order(
    subscriber: tuple[dict[str, object], EndpointProcess],
) -> None:
    glue, remote = subscriber

    async def main() -> int:
        async with AsyncEndpointManager.from_env(**glue) as publisher:
            await publisher.wait_for_subscribers(TOPIC, timeout=10)
            sent = 0
            for batch in (50, 1, 500):
                await publisher.publish_many(TOPIC, KIND, _payloads(sent + 1, batch))
                sent += batch
                await publisher.publish(TOPIC, KIND, _payloads(sent + 1, 1)[0])
                sent += 1
            await publisher.flush(timeout=20)
            return sent

    sent = asyncio.run(main())
    assert wait_until(lambda: _received(remote)[0] >= sent, timeout=20, interval=0.05)
    assert _received(remote) == (sent, True)


def test_the_asyncio_api_raises_backpressure_with_what_was_queued(
    subscriber: tuple[dict[str, object], EndpointProcess],
) -> None:
    glue, remote = subscriber

    async def main() -> int:
        async with AsyncEndpointManager.from_env(**glue, send_queue_bytes=65536) as publisher:
            await publisher.wait_for_subscribers(TOPIC, timeout=10)
            remote.freeze()
            with pytest.raises(BackpressureError) as caught:
                await publisher.publish_many(TOPIC, KIND, _payloads(1, 2000, 1000), timeout=0.5)
            queued = caught.value.queued
            assert queued is not None
            assert 0 < queued * 1000 <= 2 * 65536 + 2000, queued
            remote.send_signal(signal.SIGCONT)
            await publisher.publish_many(TOPIC, KIND, _payloads(queued + 1, 100), timeout=10)
            await publisher.flush(timeout=20)
            return queued + 100

    sent = asyncio.run(main())
    assert wait_until(lambda: _received(remote)[0] >= sent, timeout=20, interval=0.05)
    assert _received(remote) == (sent, True)
