"""Topics between processes over multicast: every subscriber gets everything once, in order, and
an endpoint that does not subscribe gets nothing, not even on the wire."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.endpoint_process import LARGE_BYTES, SMALL_BYTES, EndpointProcess
from tests.helpers import free_udp_port, wait_until

TOPIC = "fleet/telemetry"
OTHER = "fleet/other"
KIND = "test.reading"
COUNT = 300


@pytest.fixture
def glue() -> dict[str, str | int]:
    group = f"239.192.137.7:{free_udp_port()}"
    return {
        "discovery_target_address": group,
        "discovery_listen_address": group,
        "discovery_rate_milliseconds": 200,
        "discovery_rate_timeout_multiplier": 5,
    }


@pytest.fixture
def processes(glue: dict[str, str | int]) -> Iterator[list[EndpointProcess]]:
    started: list[EndpointProcess] = []
    try:
        for number in range(5):  # the first subscriber on the asyncio API, the rest blocking
            started.append(EndpointProcess(api="async" if number == 0 else "sync", **glue))
        yield started
    finally:
        for process in started:
            process.close()


def test_three_subscriber_processes_get_every_message_once_in_order_and_a_fourth_none(
    processes: list[EndpointProcess],
) -> None:
    *subscribers, bystander, publisher = processes
    for subscriber in subscribers:
        subscriber.request("subscribe", pattern=TOPIC, type=KIND)
    bystander.request("subscribe", pattern=OTHER, type=KIND)
    publisher.request("peers", count=4, timeout=10)
    # Publish only once the publisher holds every peer's interest (each sends it on meeting us).
    assert wait_until(
        lambda: publisher.counters()[0].get("topics_interest_received", 0) >= 4,
        timeout=10,
        interval=0.05,
    ), publisher.log()

    started = time.monotonic()
    sizes = [SMALL_BYTES] * 9 + [LARGE_BYTES]  # every 10th fragmented
    reply = publisher.request("publish", topic=TOPIC, type=KIND, count=COUNT, sizes=sizes)
    expected = [(reply["first"] + i, d) for i, d in enumerate(reply["digests"])]
    assert len(expected) == COUNT

    for subscriber in subscribers:
        assert subscriber.wait_for(lambda s=subscriber: len(s.messages()) >= COUNT, 30), (
            f"{len(subscriber.messages())} of {COUNT}:\n{subscriber.log()}"
        )
    elapsed = time.monotonic() - started

    publisher_counters, to_peers = publisher.counters()
    for subscriber in subscribers:
        got = subscriber.messages()
        # Exactly once and in order: the same sequences and payloads as published, nothing more.
        assert [(m["sequence"], m["digest"]) for m in got] == expected
        assert {(m["topic"], m["type"], m["source"]) for m in got} == {
            (TOPIC, KIND, publisher.endpoint_id)
        }
        assert sum(m["size"] == LARGE_BYTES for m in got) == COUNT // 10  # fragmented ones too
        counters, _ = subscriber.counters()
        assert counters.get("topics_received", 0) == COUNT
        assert counters.get("topics_duplicates_suppressed", 0) == 0

    # The bystander subscribes to another topic: nothing reached its subscription...
    assert bystander.messages() == []
    bystander_counters, _ = bystander.counters()
    assert bystander_counters.get("topics_received", 0) == 0
    assert bystander_counters.get("topics_received_unwanted", 0) == 0
    # ...and nothing was sent to it: the publisher (which subscribes to nothing) had no message
    # for it at all, while every subscriber took at least one frame per message.
    assert to_peers[bystander.endpoint_id].get("frames_sent", 0) == 0
    for subscriber in subscribers:
        assert to_peers[subscriber.endpoint_id]["frames_sent"] >= COUNT // 10 * 2
        assert to_peers[subscriber.endpoint_id]["bytes_sent"] > COUNT // 10 * LARGE_BYTES
    assert to_peers[bystander.endpoint_id].get("bytes_sent", 0) < 4096  # acks only
    assert publisher_counters["topics_published"] == COUNT
    print(
        f"\n{COUNT} messages ({COUNT // 10} x 64 KiB) to 3 subscriber processes in {elapsed:.2f} s"
    )


def test_a_publisher_restarted_with_the_same_id_is_a_new_run_whose_messages_all_arrive(
    glue: dict[str, str | int],
) -> None:
    # Dedup is per publisher *run* (incarnation): sequences start again at 1 after a restart and
    # must not be taken for duplicates of the previous run's.
    subscriber = EndpointProcess(**glue)
    first = second = None
    try:
        subscriber.request("subscribe", pattern=TOPIC, type=KIND)
        first = EndpointProcess(**glue, endpoint_id=4242)
        first.request("peers", count=1, timeout=5)
        assert wait_until(
            lambda: first.counters()[0].get("topics_interest_received", 0) >= 1, timeout=5
        )
        before = first.request("publish", topic=TOPIC, type=KIND, count=10, history_depth=10)
        assert subscriber.wait_for(lambda: len(subscriber.messages()) == 10, 10)
        first.process.kill()
        first.process.wait(10)
        second = EndpointProcess(**glue, endpoint_id=4242)
        second.request("peers", count=1, timeout=5)
        assert wait_until(
            lambda: second.counters()[0].get("topics_interest_received", 0) >= 1, timeout=5
        )
        after = second.request("publish", topic=TOPIC, type=KIND, count=5)
        assert subscriber.wait_for(lambda: len(subscriber.messages()) >= 15, 10), subscriber.log()
        counters, _ = subscriber.counters()
    finally:
        for process in (subscriber, first, second):
            if process is not None:
                process.close()
    got = subscriber.messages()
    assert [(m["sequence"], m["digest"]) for m in got] == [
        *enumerate(before["digests"], start=1),
        *enumerate(after["digests"], start=1),
    ]
    assert {m["source"] for m in got} == {4242}
    assert counters.get("topics_duplicates_suppressed", 0) == 0
