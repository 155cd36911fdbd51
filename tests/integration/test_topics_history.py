"""History for late joiners over real sockets: the last N unexpired messages, once, in order,
before anything newer; nothing once they expired."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from glue import EndpointManager
from tests.helpers import Inbox, free_udp_port, multicast_settings, wait_until

TOPIC = "plant/line1/state"
KIND = "test.state"


@pytest.fixture
def settings() -> dict[str, object]:
    return multicast_settings(
        f"239.192.137.8:{free_udp_port()}", discovery_rate_timeout_multiplier=5.0
    )


@pytest.fixture
def publisher(settings: dict[str, object]) -> Iterator[EndpointManager]:
    with EndpointManager.from_env(**settings) as endpoint:
        yield endpoint


def _publish(endpoint: EndpointManager, numbers: range, **options: object) -> list[bytes]:
    payloads = [b"message %d" % n for n in numbers]
    for payload in payloads:
        endpoint.publish(TOPIC, KIND, payload, **options)  # type: ignore[arg-type]
    return payloads


def _interest_from(endpoint: EndpointManager, count: int) -> bool:
    """Whether ``endpoint`` has received ``count`` interest messages (peers' subscriptions)."""
    return wait_until(
        lambda: endpoint.counters().get("topics_interest_received", 0) >= count, timeout=5
    )


def test_a_late_joiner_gets_the_last_five_in_order_then_new_ones(
    settings: dict[str, object], publisher: EndpointManager
) -> None:
    payloads = _publish(publisher, range(1, 11), history_depth=5, expiry=60.0)
    inbox = Inbox()
    joined_at = time.monotonic()
    with EndpointManager.from_env(**settings) as joiner:
        joiner.subscribe(TOPIC, KIND, inbox)
        assert inbox.wait_for_count(5, timeout=5), inbox.sequences()
        history_after = time.monotonic() - joined_at
        payloads += _publish(publisher, range(11, 13), expiry=60.0)
        assert inbox.wait_for_count(7, timeout=5), inbox.sequences()
        counters = joiner.counters()
    # 6..10 from history, each once and before anything newer, then 11 and 12 live.
    assert inbox.sequences() == [6, 7, 8, 9, 10, 11, 12]
    assert inbox.payloads() == payloads[5:]
    assert {m.source_id for m in inbox.messages} == {publisher.endpoint_id}
    assert publisher.counters()["topics_history_sent"] == 5
    assert counters.get("topics_duplicates_suppressed", 0) == 0
    print(f"\nlate joiner: 5 messages of history {history_after * 1000:.0f} ms after start")


def test_a_late_joiner_gets_no_expired_history(
    settings: dict[str, object], publisher: EndpointManager
) -> None:
    expiry = 0.3
    _publish(publisher, range(1, 11), history_depth=5, expiry=expiry)
    expired_at = time.monotonic() + expiry  # every expiry above is before this
    assert wait_until(lambda: time.monotonic() > expired_at, timeout=expiry + 1)
    inbox = Inbox()
    with EndpointManager.from_env(**settings) as joiner:
        joiner.subscribe(TOPIC, KIND, inbox)
        joiner.wait_for_peers(1, timeout=5)
        assert _interest_from(publisher, 1)
        # History goes before anything newer: if any had been sent, it would precede 11.
        fresh = _publish(publisher, range(11, 12), expiry=60.0)
        assert inbox.wait_for_count(1, timeout=5)
    assert inbox.sequences() == [11]
    assert inbox.payloads() == fresh
    assert publisher.counters().get("topics_history_sent", 0) == 0


def test_a_known_peer_that_subscribes_later_gets_the_history_once(
    settings: dict[str, object], publisher: EndpointManager
) -> None:
    with EndpointManager.from_env(**settings) as late:
        late.wait_for_peers(1, timeout=5)
        publisher.wait_for_peers(1, timeout=5)
        payloads = _publish(publisher, range(1, 11), history_depth=5, expiry=60.0)
        first, second = Inbox(), Inbox()
        subscription = late.subscribe(TOPIC, KIND, first)
        assert first.wait_for_count(5, timeout=5), first.sequences()
        # Unsubscribing and subscribing again makes the publisher replay its history, which the
        # subscriber recognises (same publisher incarnation, same sequences) and drops.
        subscription.close()
        late.subscribe(TOPIC, KIND, second)
        assert wait_until(
            lambda: publisher.counters().get("topics_history_sent", 0) == 10, timeout=5
        )
        assert wait_until(
            lambda: late.counters().get("topics_duplicates_suppressed", 0) == 5, timeout=5
        )
        payloads += _publish(publisher, range(11, 12), expiry=60.0)
        assert second.wait_for_count(1, timeout=5)
        counters = late.counters()
    assert first.sequences() == [6, 7, 8, 9, 10]
    assert first.payloads() == payloads[5:10]
    assert second.sequences() == [11]
    assert counters["topics_received"] == 6


def test_a_history_depth_given_to_publish_applies_to_the_topic_from_now_on(
    settings: dict[str, object], publisher: EndpointManager
) -> None:
    _publish(publisher, range(1, 6), history_depth=5, expiry=60.0)
    # No depth given: 5 still holds (publish: "applies to the topic from now on").
    _publish(publisher, range(6, 8), expiry=60.0)
    inbox = Inbox()
    with EndpointManager.from_env(**settings) as late:
        late.subscribe(TOPIC, KIND, inbox)
        assert inbox.wait_for_count(1, timeout=5)
        _publish(publisher, range(8, 9), expiry=60.0)  # history goes first: this one marks its end
        assert wait_until(lambda: 8 in inbox.sequences(), timeout=5)
    assert inbox.sequences() == [3, 4, 5, 6, 7, 8]


def test_history_of_a_message_no_subscription_took_reaches_a_later_subscription(
    settings: dict[str, object], publisher: EndpointManager
) -> None:
    wrong_type, right_type = Inbox(), Inbox()
    with EndpointManager.from_env(**settings) as subscriber:
        subscription = subscriber.subscribe(TOPIC, "kind.x", wrong_type)
        subscriber.wait_for_peers(1, timeout=5)
        assert _interest_from(publisher, 1)
        publisher.publish(TOPIC, "kind.y", b"retained", expiry=60.0)  # history depth 1
        assert wait_until(
            lambda: subscriber.counters().get("topics_type_mismatches", 0) == 1, timeout=5
        )
        subscription.close()
        assert _interest_from(publisher, 2)
        subscriber.subscribe(TOPIC, "kind.y", right_type)  # interest grows: history replayed
        assert wait_until(
            lambda: publisher.counters().get("topics_history_sent", 0) == 1, timeout=5
        )
        publisher.publish(TOPIC, "kind.y", b"marker", expiry=60.0)
        assert wait_until(lambda: b"marker" in right_type.payloads(), timeout=5)
    assert wrong_type.payloads() == []
    assert right_type.payloads() == [b"retained", b"marker"]
