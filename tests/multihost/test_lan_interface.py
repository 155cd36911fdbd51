"""The interface glue picks by itself, on hosts shaped like real ones, and what it says.

Each case is a LAN of two hosts (network namespaces on one bridge) whose routes and interfaces
are arranged as hosts in the wild are: a default route through a gateway; a default route with
no gateway (``default dev lan0``: point-to-point links, some VPNs and CNIs); no default route at
all; and a second interface (one end of a veth pair, up, with IPv4 and multicast) beside
``lan0``. Without ``GLUE_LISTEN_INTERFACE``, glue must pick ``lan0`` wherever something says so,
discover the other host over multicast and deliver a message; where nothing can tell the two
interfaces apart, it must say so in a warning that names them and the setting to use.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tests.endpoint_process import LARGE_BYTES, SMALL_BYTES
from tests.multihost.lan import INTERFACE, Lan, run, wait_full_mesh

RATE_MS = 200
MULTIPLIER = 3.0
DUMMY = "aux0"  # sorts before lan0: a guess by name alone would be wrong

CASES = {
    # name: (default route, add the dummy, name the interface)
    "via-gateway": ("via", False, False),
    "device-only-default-route": ("dev", False, False),
    "no-route-one-interface": (None, False, False),
    "two-interfaces-default-route": ("via", True, False),
    "two-interfaces-named": (None, True, True),
}


def _shape(net: Lan, route: str | None, dummy: bool) -> None:
    for number, host in enumerate(net.hosts, start=1):
        if route == "dev":
            host.ip("route", "replace", "default", "dev", INTERFACE)
        if dummy:
            # A veth pair inside the host (no dummy driver everywhere): up, IPv4, multicast,
            # and leading nowhere.
            host.ip("link", "add", DUMMY, "type", "veth", "peer", "name", f"{DUMMY}p")
            host.ip("addr", "add", f"10.99.{net.number}.{number}/24", "dev", DUMMY)
            host.ip("link", "set", DUMMY, "multicast", "on")
            host.ip("link", "set", f"{DUMMY}p", "up")
            host.ip("link", "set", DUMMY, "up")


def _exchange(processes: list[Any]) -> None:
    subscriber, publisher = processes
    subscriber.request("subscribe", pattern="lan/#", type="t")
    publisher.request("subscribers", topic="lan/x", count=1, timeout=10)
    sizes = [SMALL_BYTES, SMALL_BYTES, LARGE_BYTES]  # the third fragmented
    publisher.request("publish", topic="lan/x", type="t", count=3, sizes=sizes)
    assert subscriber.wait_for(lambda: len(subscriber.messages("lan/x")) == 3, 10), subscriber.log()
    assert [m["sequence"] for m in subscriber.messages("lan/x")] == [1, 2, 3]


@pytest.mark.parametrize("case", list(CASES))
def test_glue_picks_the_interface_that_reaches_its_peers(
    lan: Callable[..., Lan], case: str
) -> None:
    route, dummy, named = CASES[case]
    net = lan(2, default_route=route == "via")
    _shape(net, route, dummy)
    extra = {"listen_interface": INTERFACE} if named else {}
    processes = net.start(
        net.hosts,
        discovery_rate_milliseconds=RATE_MS,
        discovery_rate_timeout_multiplier=MULTIPLIER,
        log_level="INFO",
        **extra,
    )
    took = wait_full_mesh(processes, timeout=10)
    address = {p.endpoint_id: h.address for p, h in zip(processes, net.hosts, strict=True)}
    for process in processes:
        assert process.peers() == {i: a for i, a in address.items() if i != process.endpoint_id}
        assert "WARNING" not in process.log(), process.log()
        if dummy and not named:  # several candidates: the choice and its reason are logged
            assert f"interface {INTERFACE} " in process.log(), process.log()
            assert "chosen: the kernel routes to" in process.log(), process.log()
    _exchange(processes)
    print(f"\n[{case}] met in {took * 1000:.0f} ms over {INTERFACE}, messages delivered")


def test_two_interfaces_and_no_route_is_named_as_a_problem(lan: Callable[..., Lan]) -> None:
    net = lan(2, default_route=False)
    _shape(net, None, dummy=True)
    processes = net.start(
        net.hosts,
        discovery_rate_milliseconds=RATE_MS,
        discovery_rate_timeout_multiplier=MULTIPLIER,
    )
    for process in processes:
        log = process.log()
        assert "WARNING" in log
        assert f"several interfaces could carry glue ({DUMMY}, {INTERFACE})" in log, log
        assert "Set GLUE_LISTEN_INTERFACE" in log, log


def test_the_datagram_size_follows_the_mtu_of_the_path(lan: Callable[..., Lan]) -> None:
    # Jumbo frames on the LAN (9000 bytes): a 64 KiB message takes about 8 datagrams, not 45.
    net = lan(2)
    for host in net.hosts:
        run(["ip", "-n", net.switch, "link", "set", host.port, "mtu", "9000"])
        host.ip("link", "set", INTERFACE, "mtu", "9000")
    processes = net.start(
        net.hosts,
        discovery_rate_milliseconds=RATE_MS,
        discovery_rate_timeout_multiplier=MULTIPLIER,
    )
    wait_full_mesh(processes, timeout=10)
    subscriber, publisher = processes
    subscriber.request("subscribe", pattern="lan/#", type="t")
    publisher.request("subscribers", topic="lan/x", count=1, timeout=10)
    publisher.request("publish", topic="lan/x", type="t", count=20, size=LARGE_BYTES)
    assert subscriber.wait_for(lambda: len(subscriber.messages("lan/x")) == 20, 10)
    _, per_peer = publisher.counters()
    sent = per_peer[subscriber.endpoint_id]
    average = sent["bytes_sent"] / sent["datagrams_sent"]
    assert average > 4000, sent  # 1472-byte datagrams would average under 1472
    print(f"\njumbo path: {sent['datagrams_sent']} datagrams of {average:.0f} B on average")
