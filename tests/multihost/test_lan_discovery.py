"""Four hosts on one bridge find each other over multicast; the LAN's multicast block works."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.multihost.lan import INTERFACE, Lan, wait_full_mesh

RATE_MS = 200
MULTIPLIER = 3.0


@pytest.mark.parametrize("choice", ["GLUE_LISTEN_INTERFACE", "default-route"])
def test_four_hosts_discover_each_other_over_multicast(
    lan: Callable[..., Lan], choice: str
) -> None:
    # With the interface named, the hosts have no default route at all; without it, glue must
    # take the interface of the default route (lan0 via the bridge), not fall back to lo.
    by_name = choice == "GLUE_LISTEN_INTERFACE"
    net = lan(4, default_route=not by_name)
    extra = {"listen_interface": INTERFACE} if by_name else {}
    processes = net.start(
        net.hosts,
        discovery_rate_milliseconds=RATE_MS,
        discovery_rate_timeout_multiplier=MULTIPLIER,
        **extra,
    )
    took = wait_full_mesh(processes, timeout=10)

    address = {p.endpoint_id: h.address for p, h in zip(processes, net.hosts, strict=True)}
    for process in processes:
        peers = process.peers()
        # Each peer is known at its host's address on the bridge: the data went over lan0.
        assert peers == {i: a for i, a in address.items() if i != process.endpoint_id}
        assert not process.events("peer_removed"), process.events("peer_removed")
    print(f"\n[{choice}] 4 hosts: full mesh {took * 1000:.0f} ms after the last start")
