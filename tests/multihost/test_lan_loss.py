"""Publish/subscribe across four hosts while every host loses 10 % of its packets both ways."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from tests.endpoint_process import LARGE_BYTES, SMALL_BYTES, EndpointProcess
from tests.multihost.lan import Lan, wait_full_mesh

KIND = "test.lan"
LOSS = 0.10
COUNT = 100  # per publisher; every 10th is 64 KiB (about 45 fragments, each may be lost)
SIZES = [SMALL_BYTES] * 9 + [LARGE_BYTES]


def test_every_message_arrives_once_in_order_under_random_loss(lan: Callable[..., Lan]) -> None:
    net = lan(4)
    processes = net.start(
        net.hosts, discovery_rate_milliseconds=200, discovery_rate_timeout_multiplier=4.0
    )
    wait_full_mesh(processes, timeout=10)
    for process in processes:
        process.request("subscribe", pattern="lan/#", type=KIND)
    for process in processes:
        process.request("subscribers", topic=f"lan/{process.label}", count=3, timeout=10)
    for host in net.hosts:  # each host is a receiver: drop 10 % in (data) and out (acks)
        net.add_loss(host, LOSS)

    started = time.monotonic()

    def publish(process: EndpointProcess) -> list[str]:
        reply = process.request(
            "publish", topic=f"lan/{process.label}", type=KIND, count=COUNT, sizes=SIZES,
            history_depth=COUNT, expiry=60.0,
        )  # fmt: skip
        return list(reply["digests"])

    with ThreadPoolExecutor(len(processes)) as pool:
        replies = list(pool.map(publish, processes))
    published = {p.endpoint_id: r for p, r in zip(processes, replies, strict=True)}
    everything = COUNT * len(processes)
    for process in processes:
        assert process.wait_for(lambda p=process: len(p.messages()) >= everything, 60), (
            f"{process.label}: {len(process.messages())} of {everything}:\n{process.log()}"
        )
    took = time.monotonic() - started
    dropped = {host.name: net.dropped(host) for host in net.hosts}
    overflowed = sum(net.udp_stats(host)["RcvbufErrors"] for host in net.hosts)
    stats = [process.counters() for process in processes]
    for host in net.hosts:
        net.clear_loss(host)

    for process in processes:
        got: dict[int, list[tuple[int, str]]] = {}
        for message in process.messages():
            got.setdefault(message["source"], []).append((message["sequence"], message["digest"]))
        for source, digests in published.items():  # exactly once, in publish order, per source
            assert got.get(source) == list(enumerate(digests, start=1)), (process.label, source)
    assert all(dropped.values()), dropped  # the loss was real on every host
    sent = sum(c.get("frames_sent", 0) for _, peers in stats for c in peers.values())
    resent = sum(c.get("frames_resent", 0) for _, peers in stats for c in peers.values())
    suppressed = sum(c.get("topics_duplicates_suppressed", 0) for c, _ in stats)
    removed = sum(len(p.events("peer_removed")) for p in processes)
    print(
        f"\n10 % loss each way on 4 hosts: {everything} messages x 4 receivers "
        f"({len(processes) * COUNT // 10} of 64 KiB) all delivered once, in order, in "
        f"{took:.2f} s; packets dropped by iptables {dropped}; frames sent {sent}, resent "
        f"{resent}; datagrams dropped by full socket buffers {overflowed}; duplicates "
        f"suppressed {suppressed}; peers expired on the way {removed}"
    )
