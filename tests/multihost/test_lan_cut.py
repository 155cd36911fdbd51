"""A host whose link is cut is removed by the others on time and, once healed, catches up: what
was published during the cut and has not expired arrives once and in order (the publisher queued
it in the cut host's parked stream; its history is dropped as duplicates)."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from tests.endpoint_process import EndpointProcess
from tests.helpers import wait_until
from tests.multihost.lan import Lan, wait_full_mesh

KIND = "test.lan"
RATE_MS = 250
MULTIPLIER = 3.0
TIMEOUT_S = RATE_MS / 1000 * MULTIPLIER  # the spec: silent this long, a peer is removed
MARGIN_S = 0.75  # scheduling of four Python processes on a small CI machine
KEPT, SHORT, EXPIRING = "plant/kept", "plant/short", "plant/expiring"
SHORT_DEPTH = 3
EXPIRING_S = 0.5


def _sequences(process: EndpointProcess, topic: str) -> list[int]:
    return [m["sequence"] for m in process.messages(topic)]


@pytest.mark.parametrize("how", ["link", "iptables"])
def test_a_cut_host_is_removed_on_time_and_catches_up_when_healed(
    lan: Callable[..., Lan], how: str
) -> None:
    net = lan(4)
    processes = net.start(
        net.hosts,
        discovery_rate_milliseconds=RATE_MS,
        discovery_rate_timeout_multiplier=MULTIPLIER,
    )
    publisher, *subscribers = processes
    cut_process, cut_host = processes[3], net.hosts[3]
    others = processes[:3]
    wait_full_mesh(processes, timeout=10)
    for process in subscribers:
        process.request("subscribe", pattern="plant/#", type=KIND)
    for topic in (KEPT, SHORT, EXPIRING):
        publisher.request("subscribers", topic=topic, count=3, timeout=10)
    kept: list[str] = []

    def publish(topic: str, count: int, depth: int, expiry: float = 60.0) -> float:
        reply = publisher.request(
            "publish", topic=topic, type=KIND, count=count, history_depth=depth, expiry=expiry
        )
        if topic == KEPT:
            kept.extend(reply["digests"])
        return time.monotonic()

    publish(KEPT, 20, 100)
    publish(SHORT, 2, SHORT_DEPTH)
    publish(EXPIRING, 1, 100, EXPIRING_S)
    for process in subscribers:
        assert process.wait_for(lambda p=process: len(p.messages()) == 23, 10), process.log()

    # --- cut: everyone removes the other side within rate x multiplier (+ margin) ----------------
    cut_at = time.monotonic()  # before: a delay measured from here is never too short
    net.cut(cut_host, how)
    limit = TIMEOUT_S + MARGIN_S

    def removed(by: EndpointProcess, peer: EndpointProcess) -> list[float]:
        return [e["t"] - cut_at for e in by.events("peer_removed", peer=peer.endpoint_id)]

    for process in others:
        assert process.wait_for(lambda p=process: bool(removed(p, cut_process)), limit + 5), (
            f"{process.label} never removed the cut host:\n{process.log()}"
        )
        assert cut_process.wait_for(lambda p=process: bool(removed(cut_process, p)), limit + 5)
    delays = {p.label: removed(p, cut_process)[0] for p in others}
    delays |= {f"h4 drops {p.label}": removed(cut_process, p)[0] for p in others}
    print(
        f"\n[{how}] cut h4: removals after {', '.join(f'{k} {v:.2f}' for k, v in delays.items())}"
        f" s (timeout {TIMEOUT_S:.2f} s, allowed {limit:.2f} s)"
    )
    assert all(0 < delay <= limit for delay in delays.values()), delays

    # --- during the cut: to h2 and h3 live; to h4 queued in its parked stream ------------------
    publish(KEPT, 10, 100)
    publish(SHORT, 10, SHORT_DEPTH)  # history keeps the last 3 of these
    publish(EXPIRING, 1, 100, EXPIRING_S)  # expires in the history before the heal
    for process in subscribers[:2]:
        assert process.wait_for(lambda p=process: len(p.messages()) == 44, 10), process.log()
    assert wait_until(
        lambda: publisher.counters()[0].get("topics_history_expired", 0) >= 2, timeout=10
    ), "the publisher's history never dropped the expired messages"  # both EXPIRING ones
    assert len(cut_process.messages()) == 23

    # --- heal: h4 is found again and gets what was queued for it and has not expired, once, in
    # order: all of the cut's kept and short messages, not the expiring one (before parked
    # streams took what was published while it was away, only the last 3 of short, from history)
    healed_at = time.monotonic()  # before: an announcement may get through before heal returns
    net.heal(cut_host)
    expected = {KEPT: list(range(1, 31)), SHORT: list(range(1, 13)), EXPIRING: [1]}
    assert cut_process.wait_for(
        lambda: all(_sequences(cut_process, t)[: len(s)] == s for t, s in expected.items()),
        15,
    ), f"after healing h4 has { ({t: _sequences(cut_process, t) for t in expected}) }"
    caught_up = cut_process.messages()[-1]["t"] - healed_at

    def met_again() -> list[float]:
        return [e["t"] - healed_at for e in cut_process.events("peer_added") if e["t"] > healed_at]

    assert cut_process.wait_for(lambda: len(met_again()) == 3, 10), (
        f"h4 met again {met_again()}; peers now: "
        f"{ {p.label: p.peers() for p in processes} }\nh4 log:\n{cut_process.log()}"
    )
    rediscovered = max(met_again())
    for topic in (KEPT, SHORT, EXPIRING):  # live again; and nothing else was coming before it
        publish(topic, 1, 100 if topic != SHORT else SHORT_DEPTH)
    expected = {KEPT: list(range(1, 32)), SHORT: list(range(1, 14)), EXPIRING: [1, 3]}
    assert cut_process.wait_for(lambda: len(cut_process.messages()) == 43 + 3, 10)
    assert {t: _sequences(cut_process, t) for t in expected} == expected
    assert [m["digest"] for m in cut_process.messages(KEPT)] == kept
    for process in subscribers[:2]:  # never cut: everything once
        assert process.wait_for(lambda p=process: len(p.messages()) == 47, 10)
        assert _sequences(process, KEPT) == list(range(1, 32))
        assert _sequences(process, SHORT) == list(range(1, 14))
        assert _sequences(process, EXPIRING) == [1, 2, 3]
    suppressed = cut_process.counters()[0].get("topics_duplicates_suppressed", 0)
    to_cut = publisher.counters()[1].get(cut_process.endpoint_id, {})
    print(
        f"[{how}] healed: h4 met the others again after {rediscovered:.2f} s, had the 10 + 10 "
        f"messages of the cut after {caught_up:.2f} s ({suppressed} duplicates dropped; "
        f"h1 -> h4 since: frames resent {to_cut.get('frames_resent')}, "
        f"timeouts {to_cut.get('timeouts')})"
    )
