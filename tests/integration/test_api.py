"""The blocking and asyncio managers over real sockets, in this process."""

from __future__ import annotations

import asyncio
import random
import socket
import threading
from collections.abc import Iterator

import pytest

from glue import (
    AsyncEndpointManager,
    ConfigError,
    EndpointManager,
    Peer,
    PeerAdded,
    PeerRemoved,
    UsageError,
    network,
    wire,
)
from tests.helpers import async_wait_until, free_udp_port, multicast_settings, wait_until

RATE_MS = 200


@pytest.fixture
def group() -> str:
    return f"239.192.137.1:{free_udp_port()}"


def _settings(group: str, **extra: object) -> dict[str, object]:
    return multicast_settings(group, discovery_rate_milliseconds=RATE_MS, **extra)


@pytest.fixture
def pair(group: str) -> Iterator[tuple[EndpointManager, EndpointManager]]:
    with (
        EndpointManager.from_env(**_settings(group)) as a,
        EndpointManager.from_env(**_settings(group)) as b,
    ):
        yield a, b


def test_blocking_managers_discover_each_other(pair: tuple[EndpointManager, ...]) -> None:
    a, b = pair
    [peer] = a.wait_for_peers(1, timeout=2 * RATE_MS / 1000)
    assert (peer.endpoint_id, peer.name) == (b.endpoint_id, b.name)
    assert peer.port == b.data_address[1]
    assert [p.endpoint_id for p in b.wait_for_peers(1, timeout=1)] == [a.endpoint_id]
    counters = a.counters()
    assert counters["datagrams_sent"] >= 1
    assert counters["discovery_peers_added"] == 1


def test_callbacks_run_on_the_delivery_thread_in_order(group: str) -> None:
    events: list[tuple[str, int, str]] = []
    with EndpointManager.from_env(**_settings(group)) as watcher:
        network_thread = {t.name for t in threading.enumerate() if t.name.startswith("glue-net-")}
        watcher.on_peer_added(
            lambda p: events.append(("added", p.endpoint_id, threading.current_thread().name))
        )
        watcher.on_peer_removed(
            lambda p: events.append(("removed", p.endpoint_id, threading.current_thread().name))
        )
        with EndpointManager.from_env(**_settings(group)) as other:
            assert wait_until(lambda: len(events) == 1, timeout=2)
        assert wait_until(lambda: len(events) == 2, timeout=2)  # goodbye: removed at once
    assert [(kind, ident) for kind, ident, _ in events] == [
        ("added", other.endpoint_id),
        ("removed", other.endpoint_id),
    ]
    threads = {name for _, _, name in events}
    assert len(threads) == 1
    assert threads.isdisjoint(network_thread)
    assert threads.pop().startswith("glue-callbacks-")


def test_senders_on_many_threads_each_keep_their_order(
    pair: tuple[EndpointManager, EndpointManager],
) -> None:
    # Sends on an idle link go out from the sender's thread, the others through the loop's
    # queue: whichever way each message takes, every one arrives once, in its sender's order.
    a, b = pair
    [peer] = a.wait_for_peers(1, timeout=2)
    got: list[bytes] = []
    b.on_message(lambda m: got.append(m.payload))
    threads, per_thread = 4, 200

    def send_all(index: int) -> None:
        for n in range(per_thread):
            a.send(f"{index}:{n}".encode(), to=[peer.endpoint_id], expiry=30, timeout=30)

    senders = [threading.Thread(target=send_all, args=(i,)) for i in range(threads)]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join()
    assert wait_until(lambda: len(got) >= threads * per_thread, timeout=10)
    assert len(got) == len(set(got)) == threads * per_thread
    for index in range(threads):
        mine = [int(p.split(b":")[1]) for p in got if p.startswith(f"{index}:".encode())]
        assert mine == list(range(per_thread))


def test_a_failing_callback_does_not_stop_the_endpoint(group: str) -> None:
    seen: list[Peer] = []

    def broken(peer: Peer) -> None:
        raise RuntimeError("user bug")

    with EndpointManager.from_env(**_settings(group)) as watcher:
        watcher.on_peer_added(broken)
        watcher.on_peer_added(seen.append)
        with EndpointManager.from_env(**_settings(group)):
            assert wait_until(lambda: len(seen) == 1, timeout=2)
            assert len(watcher.peers()) == 1


def test_peer_events_iteration_and_removers(group: str) -> None:
    with EndpointManager.from_env(**_settings(group)) as watcher:
        remover = watcher.on_peer_added(lambda p: pytest.fail("removed callback was called"))
        remover()
        stream = watcher.peer_events(timeout=5)
        with EndpointManager.from_env(**_settings(group)) as other:
            first = next(stream)
        second = next(stream)
    assert first == PeerAdded(first.peer)
    assert first.peer.endpoint_id == other.endpoint_id
    assert isinstance(second, PeerRemoved)
    assert second.reason == "left"
    assert list(stream) == []  # the stream ends when the endpoint stops


def test_stop_is_idempotent_and_calls_after_stop_fail_clearly(group: str) -> None:
    endpoint = EndpointManager.from_env(**_settings(group))
    endpoint.start()
    with pytest.raises(UsageError):
        endpoint.start()
    endpoint.stop()
    endpoint.stop()
    endpoint.close()
    with pytest.raises(UsageError, match="not running"):
        endpoint.peers()
    assert not [t for t in threading.enumerate() if t.name.startswith("glue-")]


def test_unknown_interface_fails_at_start_naming_the_variable(group: str) -> None:
    endpoint = EndpointManager.from_env(**_settings(group, listen_interface="nosuch0"))
    with pytest.raises(ConfigError, match=r"GLUE_LISTEN_INTERFACE='nosuch0'.*lo") as info:
        endpoint.start()
    assert info.value.variable == "GLUE_LISTEN_INTERFACE"
    assert not [t for t in threading.enumerate() if t.name.startswith("glue-")]


def test_port_in_use_fails_at_start_naming_the_variable(group: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        endpoint = EndpointManager.from_env(**_settings(group, listen_address=f"127.0.0.1:{port}"))
        with pytest.raises(ConfigError, match="GLUE_LISTEN_ADDRESS"):
            endpoint.start()


def test_bad_datagrams_are_dropped_counted_and_harmless(group: str) -> None:
    rng = random.Random(7)
    good = wire.encode(wire.Header(1, wire.EndpointId(9), 1), [wire.Data(1, b"x" * 40)])
    junk = [
        b"",
        b"hello",
        b"\xff" * 100,
        good[:10],
        good[:-3],
        good + b"extra",
        good.replace(b'"glue":1', b'"glue":9'),
        good.replace(b'"net":1', b'"net":7'),
        bytes(rng.getrandbits(8) for _ in range(60000)),
    ]
    with EndpointManager.from_env(**_settings(group)) as target:
        host, port = "127.0.0.1", target.data_address[1]
        group_host, group_port = group.split(":")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as attacker:
            attacker.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(host))
            for datagram in junk * 20:
                attacker.sendto(datagram, (host, port))
                attacker.sendto(datagram, (group_host, int(group_port)))

        def dropped() -> int:
            return sum(v for k, v in target.counters().items() if k.startswith("dropped_"))

        assert wait_until(lambda: dropped() >= 8 * 2 * 20, timeout=5), target.counters()
        counters = target.counters()
        for reason in ("foreign", "truncated", "malformed", "version", "network"):
            assert counters[f"dropped_{reason}"] > 0, reason
        # Still fully working: it discovers a newcomer.
        with EndpointManager.from_env(**_settings(group)) as other:
            found = target.wait_for_peers(1, timeout=2)
            assert [p.endpoint_id for p in found] == [other.endpoint_id]


async def test_async_manager_with_async_iteration_and_callbacks(group: str) -> None:
    added: list[int] = []

    async def on_added(peer: Peer) -> None:
        added.append(peer.endpoint_id)

    async with AsyncEndpointManager.from_env(**_settings(group)) as a:
        a.on_peer_added(on_added)
        events: list[object] = []

        async def consume() -> None:
            async for event in a.peer_events():
                events.append(event)

        consumer = asyncio.create_task(consume())
        await asyncio.sleep(0)  # let the consumer register before the peer appears
        async with AsyncEndpointManager.from_env(**_settings(group)) as b:
            [peer] = await a.wait_for_peers(1, timeout=2)
            assert peer.endpoint_id == b.endpoint_id
        assert await async_wait_until(lambda: len(events) == 2, timeout=2)
    await asyncio.wait_for(consumer, 2)  # ends when the endpoint stops
    assert [type(e) for e in events] == [PeerAdded, PeerRemoved]
    assert added == [b.endpoint_id]
    await a.stop()  # idempotent


async def test_async_wait_for_peers_times_out_clearly(group: str) -> None:
    async with AsyncEndpointManager.from_env(**_settings(group)) as alone:
        with pytest.raises(TimeoutError, match="0 of 1 peers"):
            await alone.wait_for_peers(1, timeout=0.3)


def test_the_interface_is_chosen_by_the_route_to_the_group_and_lo_alone_is_a_warning() -> None:
    # In the private namespace only lo exists, with the multicast route on it.
    routed = network.choose_interface(["239.192.137.1"])
    assert (routed.name, routed.address, routed.warning) == ("lo", "127.0.0.1", None)
    assert routed.reason == "the kernel routes to 239.192.137.1 through it"
    fallback = network.choose_interface([])  # no route hint, no default route, no candidate
    assert fallback.name == "lo"
    assert fallback.warning is not None
    assert "multicast discovery will not leave this host" in fallback.warning
    assert "GLUE_LISTEN_INTERFACE" in fallback.warning
