"""History keepers between real processes: a retained message outlives its publisher, and a
keeper restarted with GLUE_HISTORY_PATH still serves it; publisher and keepers together deliver
each message once."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from glue import AsyncEndpointManager, EndpointManager, UsageError
from tests.endpoint_process import EndpointProcess
from tests.helpers import Inbox, free_udp_port, multicast_settings, wait_until

TOPIC = "plant/boiler/temperature"
KIND = "test.reading"
COUNT = 10


@pytest.fixture
def glue() -> dict[str, str | int]:
    group = f"239.192.137.11:{free_udp_port()}"
    return {
        "discovery_target_address": group,
        "discovery_listen_address": group,
        "discovery_rate_milliseconds": 200,
        "discovery_rate_timeout_multiplier": 5,
    }


@pytest.fixture
def started() -> Iterator[list[EndpointProcess]]:
    processes: list[EndpointProcess] = []
    yield processes
    for process in processes:
        process.close()


def _kept(keeper: EndpointProcess) -> int:
    return keeper.counters()[0].get("topics_kept", 0)


def _publish_ten(publisher: EndpointProcess, *keepers: EndpointProcess) -> list[tuple[int, str]]:
    """Publish COUNT messages (depth COUNT, an hour to live) once every keeper listens; wait
    until each holds them; return (sequence, digest) of each."""
    publisher.request("subscribers", topic=TOPIC, count=len(keepers), timeout=10)
    reply = publisher.request(
        "publish", topic=TOPIC, type=KIND, count=COUNT, history_depth=COUNT, expiry=3600
    )
    for keeper in keepers:
        assert wait_until(lambda k=keeper: _kept(k) >= COUNT, timeout=10), keeper.log()
    return [(reply["first"] + i, digest) for i, digest in enumerate(reply["digests"])]


def _late_joiner(glue: dict[str, str | int], started: list[EndpointProcess]) -> EndpointProcess:
    subscriber = EndpointProcess(label="late", **glue)
    started.append(subscriber)
    subscriber.request("subscribe", pattern="plant/#", type=KIND)
    return subscriber


def test_a_keeper_serves_a_late_joiner_after_the_publisher_exited_and_after_its_own_restart(
    glue: dict[str, str | int], started: list[EndpointProcess], tmp_path: Path
) -> None:
    store = tmp_path / "keeper.db"
    keeper = EndpointProcess(label="keeper", history_keep="plant/#=10", history_path=store, **glue)
    started.append(keeper)
    publisher = EndpointProcess(label="publisher", **glue)
    started.append(publisher)
    expected = _publish_ten(publisher, keeper)
    publisher.close()  # the publisher exits: only the keeper holds its messages now
    assert wait_until(lambda: publisher.endpoint_id not in keeper.peers(), timeout=10)

    first = _late_joiner(glue, started)
    assert first.wait_for(lambda: len(first.messages()) >= COUNT, 10), first.log()
    got = first.messages()
    assert [(m["sequence"], m["digest"]) for m in got] == expected  # once, in order, intact
    assert {m["source"] for m in got} == {publisher.endpoint_id}  # under the publisher's id

    keeper.close()  # the keeper restarts from its file
    restarted = EndpointProcess(
        label="keeper again", history_keep="plant/#=10", history_path=store, **glue
    )
    started.append(restarted)
    assert _kept(restarted) == 0  # restored from the file, not received
    assert restarted.counters()[0].get("topics_kept_restored", 0) == COUNT
    second = _late_joiner(glue, started)
    assert second.wait_for(lambda: len(second.messages()) >= COUNT, 10), second.log()
    assert [(m["sequence"], m["digest"]) for m in second.messages()] == expected


def test_a_publisher_and_two_keepers_serving_one_late_joiner_deliver_each_message_once(
    glue: dict[str, str | int], started: list[EndpointProcess]
) -> None:
    keepers = [
        EndpointProcess(label=f"keeper{n}", history_keep="plant/#=10", **glue) for n in (1, 2)
    ]
    started.extend(keepers)
    publisher = EndpointProcess(label="publisher", **glue)
    started.append(publisher)
    expected = _publish_ten(publisher, *keepers)

    subscriber = _late_joiner(glue, started)

    # All three serve it; it takes each message once. A keeper's copy is ignored if the
    # publisher is known by then (it serves its own history), or taken if it came first, the
    # publisher's copy being the repeat.
    def handled_twice() -> bool:
        counters = subscriber.counters()[0]
        repeats = counters.get("topics_duplicates_suppressed", 0)
        return repeats + counters.get("topics_relays_ignored", 0) >= 2 * COUNT

    # (both keepers' copies may be ignored before the publisher's own arrive: wait for both)
    assert wait_until(
        lambda: len(subscriber.messages()) >= COUNT and handled_twice(), timeout=10
    ), subscriber.log()
    got = subscriber.messages()
    assert [(m["sequence"], m["digest"]) for m in got] == expected
    assert subscriber.counters()[0].get("topics_received_from_keepers", 0) == 2 * COUNT
    # The live stream goes on after the kept history, once.
    publisher.request("publish", topic=TOPIC, type=KIND, count=1)
    assert subscriber.wait_for(lambda: len(subscriber.messages()) == COUNT + 1, 10)
    assert subscriber.messages()[-1]["sequence"] == COUNT + 1


def _in_process_settings() -> dict[str, object]:
    return multicast_settings(
        f"239.192.137.12:{free_udp_port()}", discovery_rate_timeout_multiplier=5.0
    )


def test_keep_history_on_the_blocking_api_serves_a_late_joiner_after_the_publisher_stopped() -> (
    None
):
    settings = _in_process_settings()
    with EndpointManager.from_env(**settings) as keeper:
        keeper.keep_history("plant/#", depth=3)
        with pytest.raises(UsageError):
            keeper.keep_history("plant/#/x")
        with pytest.raises(UsageError):
            keeper.keep_history("plant/#", depth=-1)
        with EndpointManager.from_env(**settings) as publisher:
            publisher.wait_for_subscribers(TOPIC, count=1, timeout=10)
            for n in range(5):
                publisher.publish(TOPIC, KIND, b"%d" % n, expiry=600, history_depth=5)
            publisher.flush(timeout=10)
        with EndpointManager.from_env(**settings) as late:
            inbox = Inbox()
            late.subscribe("plant/#", KIND, inbox)
            assert inbox.wait_for_count(3, timeout=10)
            assert inbox.payloads() == [b"2", b"3", b"4"]
            assert {m.source_id for m in inbox.messages} == {publisher.endpoint_id}


async def test_keep_history_on_the_asyncio_api() -> None:
    settings = _in_process_settings()
    async with AsyncEndpointManager.from_env(**settings) as keeper:
        keeper.keep_history("plant/#", depth=2)
        async with AsyncEndpointManager.from_env(**settings) as publisher:
            await publisher.wait_for_subscribers(TOPIC, count=1, timeout=10)
            for n in range(4):
                await publisher.publish(TOPIC, KIND, b"%d" % n, expiry=600)
            await publisher.flush(timeout=10)
        async with AsyncEndpointManager.from_env(**settings) as late:
            messages = aiter(late.subscribe("plant/#", KIND))
            got = [await asyncio.wait_for(anext(messages), 10) for _ in range(2)]
            assert [m.payload for m in got] == [b"2", b"3"]
