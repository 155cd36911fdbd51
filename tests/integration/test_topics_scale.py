"""Interest at scale and slow subscribers, over real sockets.

- An endpoint subscribed to 1,000 topics: announcements stay one small datagram (they carry only
  the interest version); the set itself crosses once on the reliable transport; the publisher
  sends exactly the subscribed topics and nothing else.
- A subscription whose callback is stuck: its bounded queue overflows, the drops are counted
  (per subscription and in the endpoint's counters) and warned about, while another subscription
  on the same endpoint gets everything and acks keep flowing.
"""

from __future__ import annotations

import logging
import threading

import pytest

from glue import EndpointManager, Message
from tests.helpers import Inbox, wait_until

KIND = "scale"


def test_a_thousand_subscriptions_route_exactly(settings: dict[str, object]) -> None:
    topics = [f"plant/line{n // 100}/sensor{n}" for n in range(1000)]
    with (
        EndpointManager.from_env(**settings) as publisher,
        EndpointManager.from_env(**settings) as subscriber,
    ):
        inbox = Inbox()
        for topic in topics:
            subscriber.subscribe(topic, KIND, inbox)
        publisher.wait_for_peers(1, timeout=5)
        # The last topic subscribed is known: the whole set has crossed.
        [peer] = publisher.wait_for_subscribers(topics[-1], timeout=10)
        assert peer.endpoint_id == subscriber.endpoint_id
        assert all(publisher.subscribers(t) == [peer] for t in topics[::97])
        assert publisher.subscribers("plant/line0/other") == []
        sent_before = publisher.peer_counters()[peer.endpoint_id]["frames_sent"]
        for _ in range(20):
            publisher.publish("plant/line0/other", KIND, b"nobody wants this")
        for topic in topics:
            publisher.publish(topic, KIND, topic.encode())
        assert inbox.wait_for_count(1000, timeout=20)
        assert sorted(p.decode() for p in inbox.payloads()) == sorted(topics)
        sent_after = publisher.peer_counters()[peer.endpoint_id]["frames_sent"]
        # Only the 1,000 wanted messages went out (bundled: far fewer frames than messages).
        assert sent_after - sent_before <= 1000
        assert subscriber.counters().get("topics_received_unwanted", 0) == 0
        print(f"\n1000 subscriptions: frames for 1000 wanted messages: {sent_after - sent_before}")


def test_announcements_stay_small_with_a_thousand_subscriptions(
    settings: dict[str, object],
) -> None:
    with EndpointManager.from_env(**settings) as subscriber:
        for n in range(1000):
            subscriber.subscribe(f"plant/line{n // 100}/sensor{n}", KIND)
        assert wait_until(lambda: subscriber.counters().get("datagrams_sent", 0) >= 3, timeout=5)
        counters = subscriber.counters()
        # Nothing but announcements was sent (no peers): the average datagram is small.
        assert counters["bytes_sent"] / counters["datagrams_sent"] < 300, counters


def test_a_stuck_subscriber_drops_counts_and_warns_and_holds_up_nobody(
    settings: dict[str, object], caplog: pytest.LogCaptureFixture
) -> None:
    release = threading.Event()
    stuck: list[Message] = []

    def stuck_callback(message: Message) -> None:
        stuck.append(message)
        release.wait(30)

    with (
        EndpointManager.from_env(**settings) as publisher,
        EndpointManager.from_env(**settings) as subscriber,
    ):
        slow = subscriber.subscribe("flow", KIND, stuck_callback, queue_size=10)
        fast = Inbox()
        subscriber.subscribe("flow", KIND, fast)
        publisher.wait_for_subscribers("flow", timeout=5)
        with caplog.at_level(logging.WARNING, logger="glue.subscription"):
            for n in range(200):
                publisher.publish("flow", KIND, b"%d" % n)
            assert fast.wait_for_count(200, timeout=10)
            assert wait_until(lambda: slow.dropped >= 189, timeout=5), slow.dropped
        # The queue took 10 (one more if the callback had already taken the first); the rest
        # were dropped, the newest first, so what the stuck subscription gets is a prefix.
        assert 189 <= slow.dropped <= 190
        assert subscriber.counters()["subscription_messages_dropped"] == slow.dropped
        assert any("not keeping up" in r.getMessage() for r in caplog.records)
        # Acks kept flowing: the publisher has nothing left in flight.
        peer = subscriber.endpoint_id
        assert wait_until(
            lambda: (
                publisher.peer_counters()[peer].get("frames_acked", 0)
                >= publisher.peer_counters()[peer].get("frames_sent", 0)
            ),
            timeout=5,
        ), publisher.peer_counters()[peer]
        release.set()
        kept = 200 - slow.dropped
        assert wait_until(lambda: len(stuck) == kept, timeout=5)
        assert [int(m.payload) for m in stuck] == list(range(kept))


def test_flush_returns_once_subscribers_acknowledged_and_times_out_when_they_cannot(
    settings: dict[str, object],
) -> None:
    with (
        EndpointManager.from_env(**settings) as publisher,
        EndpointManager.from_env(**settings) as subscriber,
    ):
        inbox = Inbox()
        subscriber.subscribe("flush/me", KIND, inbox)
        [peer] = publisher.wait_for_subscribers("flush/me", timeout=5)
        for n in range(100):
            publisher.publish("flush/me", KIND, bytes(5000) + b"%d" % n)
        publisher.flush(timeout=10)
        counters = publisher.peer_counters()[peer.endpoint_id]
        assert counters["frames_acked"] == counters["frames_sent"], counters
        assert inbox.wait_for_count(100, timeout=5)
        # A subscriber that cannot acknowledge (its network loop is stopped): flush times out.
        gate = threading.Event()
        subscriber._endpoint.call_soon(lambda: gate.wait(10))  # blocks its network thread
        try:
            publisher.publish("flush/me", KIND, b"stuck")
            with pytest.raises(TimeoutError):
                publisher.flush(timeout=0.3)
        finally:
            gate.set()
        publisher.flush(timeout=10)
