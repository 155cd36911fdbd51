"""Where multicast does not pass (blocked with iptables on every host): discovery through a
unicast rendezvous given by address or by DNS name, and with no rendezvous at all through a name
that resolves to every host (a Kubernetes headless Service)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import pytest

from tests.endpoint_process import LARGE_BYTES, SMALL_BYTES, EndpointProcess
from tests.multihost.lan import Lan, wait_full_mesh

KIND = "test.lan"
PORT = 27320
RATE_MS = 200
COUNT = 20
SIZES = [SMALL_BYTES] * 4 + [LARGE_BYTES]  # every 5th fragmented
TIMING = {"discovery_rate_milliseconds": RATE_MS, "discovery_rate_timeout_multiplier": 3.0}


def _exchange(processes: Sequence[EndpointProcess], publishers: Sequence[EndpointProcess]) -> float:
    """Every process subscribes to ``ex/#``; each publisher publishes COUNT messages on its own
    topic; every process (the publisher too, locally) must get them all, once, in order.
    Returns the seconds taken."""
    for process in processes:
        process.request("subscribe", pattern="ex/#", type=KIND)
    started = time.monotonic()
    published = {}
    for publisher in publishers:
        topic = f"ex/{publisher.label}"
        publisher.request("subscribers", topic=topic, count=len(processes) - 1, timeout=10)
        reply = publisher.request(
            "publish", topic=topic, type=KIND, count=COUNT, sizes=SIZES, expiry=60.0
        )
        published[publisher.endpoint_id] = list(enumerate(reply["digests"], start=1))
    sources = {p.endpoint_id for p in publishers}
    for process in processes:

        def got(p: EndpointProcess = process) -> dict[int, list[tuple[int, str]]]:
            found: dict[int, list[tuple[int, str]]] = {s: [] for s in sources}
            for m in p.messages():
                found[m["source"]].append((m["sequence"], m["digest"]))
            return found

        assert process.wait_for(lambda g=got: g() == published, 15), (
            f"{process.label}: { ({s: len(v) for s, v in got().items()}) }\n{process.log()}"
        )
    return time.monotonic() - started


def test_blocking_multicast_stops_multicast_discovery(lan: Callable[..., Lan]) -> None:
    """The control for the tests below: with the block, multicast-only hosts never meet."""
    net = lan(2)
    net.block_multicast()
    first, second = net.start(net.hosts, **TIMING)
    window = 3 * RATE_MS / 1000 * 3.0  # three discovery timeouts
    assert not first.wait_for(lambda: bool(first.events("peer_added")), window)
    assert not second.events("peer_added")
    assert all(net.dropped(host) > 0 for host in net.hosts)  # their announcements hit the rule
    net.unblock_multicast()
    wait_full_mesh([first, second], timeout=5)


@pytest.mark.parametrize("given_by", ["address", "dns-name"])
def test_discovery_through_a_unicast_rendezvous(lan: Callable[..., Lan], given_by: str) -> None:
    net = lan(4)
    net.block_multicast()
    rendezvous_host = net.hosts[0]
    target = f"{rendezvous_host.address}:{PORT}"
    if given_by == "dns-name":
        for host in net.hosts:
            net.set_hosts_file(host, {"glue-rendezvous": [rendezvous_host.address]})
        assert net.hosts[1].resolve("glue-rendezvous") == [rendezvous_host.address]
        target = f"glue-rendezvous:{PORT}"
    # The rendezvous only listens on a unicast address; the others announce to it and keep the
    # default multicast listen address, which hears nothing here.
    rendezvous = net.start(
        [rendezvous_host],
        discovery_target_address="0",
        discovery_listen_address=f"0.0.0.0:{PORT}",
        **TIMING,
    )
    others = net.start(net.hosts[1:], discovery_target_address=target, **TIMING)
    processes = rendezvous + others
    met = wait_full_mesh(processes, timeout=10)
    took = _exchange(processes, others)
    for process in processes:
        assert not process.events("peer_removed"), process.label
    print(
        f"\n[rendezvous by {given_by}] multicast blocked: 4 hosts full mesh {met * 1000:.0f} ms "
        f"after the last start; {COUNT} messages from each of 3 publishers to 3 hosts each in "
        f"{took:.2f} s"
    )


def test_a_name_resolving_to_every_host_is_enough_without_a_rendezvous(
    lan: Callable[..., Lan],
) -> None:
    net = lan(4)
    net.block_multicast()
    addresses = [host.address for host in net.hosts]
    for host in net.hosts:  # one line per address, all with the same name
        net.set_hosts_file(host, {"glue-peers": addresses})
    for host in net.hosts:
        assert sorted(host.resolve("glue-peers")) == sorted(addresses), host
    # Every host announces to every address of the name (itself included) and listens unicast.
    processes = net.start(
        net.hosts,
        discovery_target_address=f"glue-peers:{PORT}",
        discovery_listen_address=f"0.0.0.0:{PORT}",
        **TIMING,
    )
    met = wait_full_mesh(processes, timeout=10)
    took = _exchange(processes, processes)
    for process in processes:
        assert not process.events("peer_removed"), process.label
    print(
        f"\n[headless name, 4 addresses] multicast blocked: full mesh {met * 1000:.0f} ms after "
        f"the last start; {COUNT} messages from each of 4 publishers to 3 hosts each in "
        f"{took:.2f} s"
    )
