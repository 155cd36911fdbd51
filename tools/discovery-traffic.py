#!/usr/bin/env python3
"""Discovery traffic in the simulator: headless (every pod targets every pod) vs one rendezvous.

    tools/discovery-traffic.py headless,rendezvous 3 10 30 50

Runs the real discovery code in ``glue.sim`` (no sockets) with the default 1 s period and prints
the datagrams and bytes per second of the whole cluster once the mesh has formed; the figures in
docs/kubernetes.md come from it.
"""

import sys

from glue.sim import Simulation


def run(n: int, mode: str) -> tuple[bool, float, float]:
    """Form an N-pod mesh, then count what it sends in 10 s of virtual time."""
    sim = Simulation(seed=1, rate_s=1.0, multiplier=2.0)
    nodes = [sim.add_node(f"pod-{i}") for i in range(n)]
    for node in nodes:
        sim._by_address[(node.address[0], 27320)] = node
    if mode == "headless":
        targets = [((node.address[0], 27320), True) for node in nodes]
        for node in nodes:
            node.stack.set_targets(targets)
    else:
        rv = nodes[0]  # the rendezvous: does not announce
        rv.stack.discovery._announce_at = None
        rv.stack.set_targets([])
        for node in nodes[1:]:
            node.stack.set_targets([((rv.address[0], 27320), True)])
    ok = sim.run_until(
        lambda: all(a.knows(*[b for b in nodes[1:] if b is not a]) for a in nodes[1:]), timeout=30
    )
    sim.run_for(5)
    # measure 10 s
    sent = {"d": 0, "b": 0}
    orig = sim._transmit

    def count(sender, to, datagram, *, multicast):
        sent["d"] += 1
        sent["b"] += len(datagram)
        orig(sender, to, datagram, multicast=multicast)

    sim._transmit = count
    sim.run_for(10)
    return ok, sent["d"] / 10, sent["b"] / 10


for mode in sys.argv[1].split(","):
    for n in map(int, sys.argv[2:]):
        ok, d, b = run(n, mode)
        print(  # noqa: T201
            f"{mode:10s} N={n:4d} meshed={ok} datagrams/s={d:9.0f} ({d / n:7.1f}/pod) "
            f"bytes/s={b:12.0f} ({b / n / 1024:8.1f} KiB/pod)"
        )
