"""A partition over real sockets: publisher and subscriber in two network namespaces joined by a
veth pair, cut with iptables until they expire each other, then healed.

What was published during the partition arrives after healing, once and in order (from the
publisher's history); what arrived before is not delivered again.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.endpoint_process import LARGE_BYTES, SMALL_BYTES, EndpointProcess
from tests.helpers import free_udp_port, wait_until

TOPIC = "site/partitioned"
KIND = "test.reading"
RATE_MS = 200
MULTIPLIER = 2
DEPTH = 100  # more than everything published here, so history covers the partition
# Message sizes, cycled: 64 KiB ones are fragmented.
EVERY_7TH_LARGE = [SMALL_BYTES] * 6 + [LARGE_BYTES]
EVERY_3RD_LARGE = [SMALL_BYTES] * 2 + [LARGE_BYTES]
#: iptables rules in the subscriber's namespace, and which side then loses the other.
CUTS = {
    "both-ways": (("INPUT", "OUTPUT"), ("publisher", "subscriber")),
    "publisher-deaf": (("OUTPUT",), ("publisher",)),
    "subscriber-deaf": (("INPUT",), ("subscriber",)),
}


@dataclass
class Namespace:
    holder: subprocess.Popen[bytes]
    interface: str
    address: str

    @property
    def enter(self) -> list[str]:
        return ["nsenter", f"--net=/proc/{self.holder.pid}/ns/net"]

    def run(self, command: str) -> None:
        subprocess.run([*self.enter, *command.split()], check=True, timeout=10)


def _namespace(interface: str, address: str) -> Namespace:
    """An empty network namespace held open by a sleeping process (gone when it is killed)."""
    holder = subprocess.Popen(["unshare", "--net", "--", "sleep", "infinity"])
    ours = os.readlink("/proc/self/ns/net")
    assert wait_until(lambda: os.readlink(f"/proc/{holder.pid}/ns/net") != ours, timeout=5)
    return Namespace(holder, interface, address)


@pytest.fixture
def namespaces() -> Iterator[tuple[Namespace, Namespace]]:
    """Two namespaces joined by a veth pair, 10.98.0.1/24 and 10.98.0.2/24, with multicast."""
    pair = (_namespace("gluep0", "10.98.0.1"), _namespace("gluep1", "10.98.0.2"))
    try:
        subprocess.run(
            ["ip", "link", "add", "gluep0", "type", "veth", "peer", "name", "gluep1"],
            check=True,
            timeout=10,
        )
        for ns in pair:
            subprocess.run(
                ["ip", "link", "set", ns.interface, "netns", str(ns.holder.pid)],
                check=True,
                timeout=10,
            )
            ns.run("ip link set lo up")
            ns.run(f"ip addr add {ns.address}/24 dev {ns.interface}")
            ns.run(f"ip link set {ns.interface} up")
            ns.run(f"ip route add 224.0.0.0/4 dev {ns.interface}")
        yield pair
    finally:
        for ns in pair:  # the veth pair and any iptables rules go with the namespaces
            ns.holder.kill()
            ns.holder.wait()


def _endpoint(ns: Namespace, group: str, multiplier: float = MULTIPLIER) -> EndpointProcess:
    return EndpointProcess(
        ns.enter,
        discovery_target_address=group,
        discovery_listen_address=group,
        listen_interface=ns.interface,
        discovery_rate_milliseconds=RATE_MS,
        discovery_rate_timeout_multiplier=multiplier,
    )


def _peers(process: EndpointProcess) -> list[int]:
    return list(process.peers())


@pytest.mark.parametrize("cut", list(CUTS))
def test_messages_published_during_a_partition_arrive_once_in_order_after_it_heals(
    namespaces: tuple[Namespace, Namespace], cut: str
) -> None:
    chains, losing = CUTS[cut]
    group = f"239.192.137.9:{free_udp_port()}"
    publisher_ns, subscriber_ns = namespaces
    publisher = _endpoint(publisher_ns, group)
    subscriber = _endpoint(subscriber_ns, group)
    try:
        subscriber.request("subscribe", pattern=TOPIC, type=KIND)
        publisher.request("peers", count=1, timeout=5)
        assert wait_until(
            lambda: publisher.counters()[0].get("topics_interest_received", 0) >= 1, timeout=5
        )
        published: list[str] = []

        def publish(count: int) -> None:
            reply = publisher.request(
                "publish", topic=TOPIC, type=KIND, count=count, sizes=EVERY_7TH_LARGE,
                history_depth=DEPTH, expiry=60.0,
            )  # fmt: skip
            assert reply["first"] == len(published) + 1
            published.extend(reply["digests"])

        publish(20)
        assert subscriber.wait_for(lambda: len(subscriber.messages()) == 20, 10)

        for chain in chains:
            subscriber_ns.run(f"iptables -A {chain} -j DROP")
        cut_at = time.monotonic()
        publish(10)  # queued to a peer that is still known: the transport keeps resending
        expiry_s = RATE_MS / 1000 * MULTIPLIER
        sides = {"publisher": publisher, "subscriber": subscriber}
        assert wait_until(
            lambda: all(not _peers(sides[side]) for side in losing), timeout=expiry_s + 3
        ), f"{losing} did not expire the other side"
        parted_after = time.monotonic() - cut_at
        publish(20)  # queued for the subscriber, taken for gone, in its parked stream
        if "INPUT" in chains:
            assert len(subscriber.messages()) == 20
        before_healing = len(subscriber.messages())  # 30 when only its sending was cut

        for chain in chains:
            subscriber_ns.run(f"iptables -D {chain} -j DROP")
        healed_at = time.monotonic()
        assert subscriber.wait_for(lambda: len(subscriber.messages()) >= 50, 10), (
            f"{len(subscriber.messages())} of 50 after healing:\n{subscriber.log()}"
        )
        caught_up_after = time.monotonic() - healed_at
        publish(5)  # and live delivery goes on
        assert subscriber.wait_for(lambda: len(subscriber.messages()) >= 55, 10)
        subscriber_counters, _ = subscriber.counters()
        publisher_counters, _ = publisher.counters()
    finally:
        publisher.close()
        subscriber.close()

    got = subscriber.messages()
    assert [(m["sequence"], m["digest"]) for m in got] == list(
        enumerate(published, start=1)
    )  # every message once, in order, nothing from before the cut twice
    assert subscriber_counters["topics_received"] == 55
    if "publisher" in losing:
        # The publisher took the subscriber for gone: its stream was parked, with 21..30 (in
        # flight at the cut) and 31..50 (published while it was gone: still queued for it, by the
        # interest it had), and delivered on healing, in order. Whatever history the publisher
        # replayed when they met again, the subscriber had already: all suppressed.
        assert publisher_counters["transport_streams_unparked"] == 1
        assert publisher_counters["transport_frames_queued_while_parked"] >= 20
        assert subscriber_counters.get("topics_duplicates_suppressed", 0) == (
            publisher_counters.get("topics_history_sent", 0)
        )
    print(
        f"\npartition {cut}: {'/'.join(losing)} expired the other {parted_after:.2f} s after "
        f"the cut; the {50 - before_healing} missing arrived {caught_up_after:.2f} s after healing"
    )


def test_a_partition_shorter_than_the_discovery_timeout_is_repaired_by_the_transport(
    namespaces: tuple[Namespace, Namespace],
) -> None:
    group = f"239.192.137.12:{free_udp_port()}"
    publisher_ns, subscriber_ns = namespaces
    # A 4 s discovery timeout: the cut below ends at the first resend, long before.
    publisher = _endpoint(publisher_ns, group, multiplier=20)
    subscriber = _endpoint(subscriber_ns, group, multiplier=20)
    try:
        subscriber.request("subscribe", pattern=TOPIC, type=KIND)
        publisher.request("peers", count=1, timeout=5)
        assert wait_until(
            lambda: publisher.counters()[0].get("topics_interest_received", 0) >= 1, timeout=5
        )
        first = publisher.request("publish", topic=TOPIC, type=KIND, count=5, sizes=EVERY_3RD_LARGE)
        assert subscriber.wait_for(lambda: len(subscriber.messages()) == 5, 10)

        def resent() -> int:
            return publisher.counters()[1][subscriber.endpoint_id].get("frames_resent", 0)

        resent_before = resent()
        for chain in ("INPUT", "OUTPUT"):
            subscriber_ns.run(f"iptables -A {chain} -j DROP")
        cut_at = time.monotonic()
        during = publisher.request(
            "publish", topic=TOPIC, type=KIND, count=10, sizes=EVERY_3RD_LARGE
        )
        assert wait_until(lambda: resent() > resent_before, timeout=3)  # lost, and resent
        for chain in ("INPUT", "OUTPUT"):
            subscriber_ns.run(f"iptables -D {chain} -j DROP")
        cut_s = time.monotonic() - cut_at
        assert subscriber.wait_for(lambda: len(subscriber.messages()) >= 15, 10)
        publisher_counters, _ = publisher.counters()
        subscriber_counters, _ = subscriber.counters()
    finally:
        publisher.close()
        subscriber.close()
    got = subscriber.messages()
    assert [(m["sequence"], m["digest"]) for m in got] == list(
        enumerate(first["digests"] + during["digests"], start=1)
    )
    # Neither side noticed a departure: the transport, not history, repaired the loss.
    assert publisher_counters.get("discovery_peers_removed", 0) == 0
    assert subscriber_counters.get("discovery_peers_removed", 0) == 0
    assert publisher_counters.get("topics_history_sent", 0) == 0
    assert subscriber_counters.get("topics_duplicates_suppressed", 0) == 0
    print(f"\nshort partition: cut for {cut_s:.2f} s, repaired by resends")
