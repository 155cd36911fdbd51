"""Discovery between real endpoint processes over real sockets (multicast and rendezvous)."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator

import pytest

from tests.endpoint_process import EndpointProcess, wait_all
from tests.helpers import free_udp_port

RATE_MS = 500
MULTIPLIER = 2.0
RATE_S = RATE_MS / 1000
TIMEOUT_S = RATE_S * MULTIPLIER


def _node(**glue: str | int) -> EndpointProcess:
    """An endpoint announcing every RATE_S that drops a peer after TIMEOUT_S, logging at debug."""
    glue.setdefault("discovery_rate_milliseconds", RATE_MS)
    glue.setdefault("discovery_rate_timeout_multiplier", MULTIPLIER)
    return EndpointProcess(log_level="DEBUG", **glue)


@pytest.fixture
def nodes() -> Iterator[list[EndpointProcess]]:
    started: list[EndpointProcess] = []
    yield started
    for node in started:
        node.close()


def _logs(nodes: list[EndpointProcess]) -> str:
    return "\n".join(f"--- {n.name}\n{n.log()}" for n in nodes)


def test_three_processes_on_multicast_discover_and_expire_a_killed_one(
    nodes: list[EndpointProcess],
) -> None:
    group = f"239.192.137.1:{free_udp_port()}"
    for _ in range(3):
        nodes.append(_node(discovery_target_address=group, discovery_listen_address=group))
    last_started = max(n.started_at for n in nodes)

    # Within 2 announcement periods of the last start, everyone knows everyone.
    deadline = last_started + 2 * RATE_S - time.monotonic()
    met = wait_all(nodes, lambda n: n.knows(*[o for o in nodes if o is not n]), deadline)
    assert met, _logs(nodes)
    print(f"\nmulticast: all met {time.monotonic() - last_started:.3f} s after the last start")

    victim, survivors = nodes[2], nodes[:2]
    killed_at = victim.kill(signal.SIGKILL)
    removed = wait_all(survivors, lambda n: not n.knows(victim), TIMEOUT_S + RATE_S)
    assert removed, _logs(nodes)
    for node in survivors:
        [(when, reason)] = node.removals(victim)
        assert reason == "expired"
        print(f"{node.name} removed the killed node {when - killed_at:.3f} s after kill -9")
    # The survivors never lost each other.
    assert all(not n.removals(o) for n in survivors for o in survivors if o is not n)


@pytest.mark.parametrize("target_host", ["127.0.0.1", "localhost"])
def test_unicast_rendezvous_then_mesh_survives_it(
    nodes: list[EndpointProcess], target_host: str
) -> None:
    port = free_udp_port()
    rendezvous = _node(
        discovery_target_address="0",
        discovery_listen_address=f"127.0.0.1:{port}",
        listen_address="127.0.0.1:0",
    )
    nodes.append(rendezvous)
    members = [
        _node(
            discovery_target_address=f"{target_host}:{port}",
            discovery_listen_address="0",
            listen_address="127.0.0.1:0",
        )
        for _ in range(3)
    ]
    nodes.extend(members)

    met = wait_all(nodes, lambda n: n.knows(*[o for o in nodes if o is not n]), 3 * RATE_S)
    assert met, _logs(nodes)

    rendezvous.kill(signal.SIGKILL)
    gone = wait_all(members, lambda n: not n.knows(rendezvous), TIMEOUT_S + RATE_S)
    assert gone, _logs(nodes)
    stopped_at = time.monotonic()
    # A window to observe, not a wait for a condition: nobody may lose anybody during it.
    assert not members[0].wait_for(
        lambda: any(m.removals(o) for m in members for o in members if o is not m),
        3 * TIMEOUT_S,
    ), _logs(nodes)
    assert time.monotonic() - stopped_at >= 3 * TIMEOUT_S
    assert all(m.knows(*[o for o in members if o is not m]) for m in members)


def test_two_network_ids_never_see_each_other(nodes: list[EndpointProcess]) -> None:
    group = f"239.192.137.1:{free_udp_port()}"
    one = [
        _node(network_id=1, discovery_target_address=group, discovery_listen_address=group)
        for _ in range(2)
    ]
    two = [
        _node(network_id=2, discovery_target_address=group, discovery_listen_address=group)
        for _ in range(2)
    ]
    nodes.extend(one + two)
    assert wait_all(one, lambda n: n.knows(*[o for o in one if o is not n]), 2 * RATE_S)
    assert wait_all(two, lambda n: n.knows(*[o for o in two if o is not n]), 2 * RATE_S)
    # Both networks announce on the same group for two full timeouts: no crossing.
    assert not one[0].wait_for(lambda: any(len(n.known) > 1 for n in nodes), 2 * TIMEOUT_S), {
        n.name: n.known for n in nodes
    }
    for node in nodes:
        assert "dropped" in node.log()  # each dropped the other network's datagrams (debug log)


def test_restarted_endpoint_replaces_its_old_entry_at_once(nodes: list[EndpointProcess]) -> None:
    group = f"239.192.137.1:{free_udp_port()}"
    watcher = _node(discovery_target_address=group, discovery_listen_address=group)
    first = _node(
        endpoint_id=4242,
        endpoint_name="worker",
        discovery_target_address=group,
        discovery_listen_address=group,
    )
    nodes.extend([watcher, first])
    assert watcher.wait_for(lambda: watcher.knows(first), 2 * RATE_S)
    first.kill(signal.SIGKILL)
    second = _node(
        endpoint_id=4242,
        endpoint_name="worker",
        discovery_target_address=group,
        discovery_listen_address=group,
    )
    nodes.append(second)
    # Well before the old entry could expire, the new incarnation has replaced it.
    replaced = watcher.wait_for(
        lambda: bool(watcher.removals(first)) and watcher.knows(second), TIMEOUT_S / 2
    )
    assert replaced, watcher.log()
    assert watcher.removals(first)[0][1] == "restarted"


def test_clean_stop_says_goodbye(nodes: list[EndpointProcess]) -> None:
    group = f"239.192.137.1:{free_udp_port()}"
    a = _node(discovery_target_address=group, discovery_listen_address=group)
    b = _node(discovery_target_address=group, discovery_listen_address=group)
    nodes.extend([a, b])
    assert a.wait_for(lambda: a.knows(b), 2 * RATE_S)
    b.kill(signal.SIGTERM)
    # Removed well before the expiry timeout, because of the goodbye.
    assert a.wait_for(lambda: not a.knows(b), TIMEOUT_S / 2), a.log()
    assert a.removals(b)[0][1] == "left"
