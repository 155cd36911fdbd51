"""The blocking topics API over real sockets: wildcards, types, names, unsubscribe, local delivery,
and slow callbacks that hold up nobody else."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import pytest

from glue import EndpointManager, UsageError
from tests.helpers import Inbox, wait_until

KIND = "test.kind"


@pytest.fixture
def pair(settings: dict[str, object]) -> Iterator[tuple[EndpointManager, EndpointManager]]:
    """A publisher and a subscriber endpoint that know each other."""
    with (
        EndpointManager.from_env(**settings) as publisher,
        EndpointManager.from_env(**settings) as subscriber,
    ):
        publisher.wait_for_peers(1, timeout=5)
        subscriber.wait_for_peers(1, timeout=5)
        yield publisher, subscriber


def _interest_known(publisher: EndpointManager, count: int) -> None:
    """Wait until ``publisher`` has received ``count`` interest messages (whole sets or changes)."""
    assert wait_until(
        lambda: publisher.counters().get("topics_interest_received", 0) >= count, timeout=5
    ), publisher.counters()


def test_wildcards_match_what_they_say(pair: tuple[EndpointManager, EndpointManager]) -> None:
    publisher, subscriber = pair
    patterns = ["#", "a/b/#", "a/+/c", "a/b"]
    inboxes = {pattern: Inbox() for pattern in patterns}
    for pattern, inbox in inboxes.items():
        subscriber.subscribe(pattern, KIND, inbox)
    _interest_known(publisher, 1)
    topics = ["a/b", "a/b/c", "a/x/c", "a/b/c/d", "z", "a/x/c/d", "ab/c", "a/bc/x"]
    for topic in topics:
        publisher.publish(topic, KIND, topic.encode())
    # Each subscription gets its messages in order, so the end markers it matches, published
    # last, tell that everything before them has been delivered.
    markers = ["a/b/c", "a/b"]
    for topic in markers:
        publisher.publish(topic, KIND, b"end")
    ends = {"#": 2, "a/b/#": 2, "a/+/c": 1, "a/b": 1}
    for pattern, inbox in inboxes.items():
        assert wait_until(
            lambda i=inbox, n=ends[pattern]: i.payloads().count(b"end") == n, timeout=5
        ), pattern
    expected = {
        "#": [*topics, *markers],
        "a/b/#": ["a/b", "a/b/c", "a/b/c/d", *markers],  # "a/b/#" matches "a/b" itself
        "a/+/c": ["a/b/c", "a/x/c", "a/b/c"],
        "a/b": ["a/b", "a/b"],
    }
    got = {p: [m.topic_name for m in inbox.messages] for p, inbox in inboxes.items()}
    assert got == expected
    assert subscriber.counters()["topics_received"] == len(topics) + 2  # once per endpoint


def test_a_subscription_of_another_type_gets_nothing_and_the_mismatch_is_counted(
    pair: tuple[EndpointManager, EndpointManager],
) -> None:
    publisher, subscriber = pair
    wanted, other = Inbox(), Inbox()
    subscriber.subscribe("m/t", "kind.one", wanted)
    subscriber.subscribe("m/+", "kind.two", other)
    _interest_known(publisher, 2)
    for number in range(3):
        publisher.publish("m/t", "kind.one", b"one %d" % number)
    publisher.publish("m/t", "kind.three", b"three")
    publisher.publish("m/t", "kind.two", b"two")
    assert other.wait_for_count(1, timeout=5)
    assert wanted.wait_for_count(3, timeout=5)
    # "one" mismatches the kind.two subscription 3 times, "three" both, "two" the kind.one one.
    assert wait_until(
        lambda: subscriber.counters().get("topics_type_mismatches", 0) == 6, timeout=5
    ), subscriber.counters()
    assert wanted.payloads() == [b"one 0", b"one 1", b"one 2"]
    assert other.payloads() == [b"two"]
    assert {m.topic_type for m in wanted.messages} == {"kind.one"}


BAD_NAMES = ["", "/a", "a/", "a//b", "a b", "a/#", "#", "a/+", "+", "é", "x" * 257, 7, None]
BAD_PATTERNS = ["", "/a", "a/", "a//b", "a b", "#/a", "a/#/b", "a#", "a/b#", "+a", "x" * 257, 7]
BAD_TYPES = ["", "a b", "é", "t" * 129, 7, None]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_publishing_to_an_invalid_name_is_refused_clearly(
    pair: tuple[EndpointManager, EndpointManager], name: object
) -> None:
    publisher, _ = pair
    with pytest.raises(UsageError, match=r"invalid topic name .*expected"):
        publisher.publish(name, KIND, b"x")  # type: ignore[arg-type]
    assert publisher.counters().get("topics_published", 0) == 0


@pytest.mark.parametrize("pattern", BAD_PATTERNS)
def test_subscribing_to_an_invalid_pattern_is_refused_clearly(
    pair: tuple[EndpointManager, EndpointManager], pattern: object
) -> None:
    _, subscriber = pair
    with pytest.raises(UsageError, match=r"invalid topic pattern .*expected"):
        subscriber.subscribe(pattern, KIND, Inbox())  # type: ignore[arg-type]


@pytest.mark.parametrize("topic_type", BAD_TYPES)
def test_an_invalid_type_is_refused_at_publish_and_subscribe(
    pair: tuple[EndpointManager, EndpointManager], topic_type: object
) -> None:
    publisher, subscriber = pair
    with pytest.raises(UsageError, match=r"invalid topic type .*expected"):
        publisher.publish("a/b", topic_type, b"x")  # type: ignore[arg-type]
    with pytest.raises(UsageError, match=r"invalid topic type .*expected"):
        subscriber.subscribe("a/b", topic_type)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "options", [{"history_depth": -1}, {"history_depth": 1.5}, {"expiry": 0}, {"expiry": -1.0}]
)
def test_an_invalid_depth_or_expiry_is_refused(
    pair: tuple[EndpointManager, EndpointManager], options: dict[str, object]
) -> None:
    publisher, _ = pair
    with pytest.raises(UsageError, match=next(iter(options)).split("_")[0]):
        publisher.publish("a/b", KIND, b"x", **options)  # type: ignore[arg-type]


def _stream(publisher: EndpointManager, topic: str) -> tuple[threading.Thread, threading.Event]:
    """Publish numbered messages on ``topic`` until the returned event is set."""
    stop = threading.Event()

    def run() -> None:
        number = 0
        while not stop.is_set():
            number += 1
            publisher.publish(topic, KIND, b"%d" % number, timeout=10)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, stop


UNSUBSCRIBES: dict[str, Callable[[EndpointManager, object], None]] = {
    "close": lambda endpoint, subscription: subscription.close(),  # type: ignore[attr-defined]
    "unsubscribe": lambda endpoint, subscription: endpoint.unsubscribe(subscription),  # type: ignore[arg-type]
    "unsubscribe-pattern": lambda endpoint, subscription: endpoint.unsubscribe("flow/#"),
}


@pytest.mark.parametrize("how", list(UNSUBSCRIBES))
def test_no_callback_starts_after_unsubscribing_while_messages_flow(
    pair: tuple[EndpointManager, EndpointManager], how: str
) -> None:
    publisher, subscriber = pair
    entered, release, returned = threading.Event(), threading.Event(), threading.Event()
    calls: list[bytes] = []
    after_return: list[bytes] = []

    def blocking(message) -> None:  # type: ignore[no-untyped-def]
        if returned.is_set():
            after_return.append(message.payload)
        calls.append(message.payload)
        entered.set()
        release.wait(10)

    control = Inbox()
    subscription = subscriber.subscribe("flow/#", KIND, blocking)
    subscriber.subscribe("flow/data", KIND, control)
    _interest_known(publisher, 1)
    streamer, stop = _stream(publisher, "flow/data")
    try:
        assert entered.wait(5)
        assert control.wait_for_count(100, timeout=5)  # a backlog waits behind the blocked call

        def unsubscribe() -> None:
            UNSUBSCRIBES[how](subscriber, subscription)
            returned.set()

        closer = threading.Thread(target=unsubscribe)
        closer.start()
        assert wait_until(lambda: subscription.closed, timeout=5)
        release.set()  # the running callback returns; close() may return now, not before
        closer.join(10)
        assert returned.is_set()
        seen = len(control.messages)
        assert control.wait_for_count(seen + 500, timeout=10)  # messages keep flowing
    finally:
        release.set()
        stop.set()
        streamer.join(10)
    assert after_return == []
    assert calls == [b"1"]  # the backlog behind the blocked call never ran
    assert subscription.closed


def test_a_subscription_on_the_publishing_endpoint_gets_its_own_messages(
    settings: dict[str, object],
) -> None:
    inbox = Inbox()
    with EndpointManager.from_env(**settings) as alone:
        alone.subscribe("self/#", KIND, inbox)
        for number in range(5):
            alone.publish("self/loop", KIND, b"%d" % number)
        assert inbox.wait_for_count(5, timeout=5)
        counters = alone.counters()
        assert alone.peers() == []
    assert inbox.payloads() == [b"0", b"1", b"2", b"3", b"4"]
    assert inbox.sequences() == [1, 2, 3, 4, 5]
    assert {m.source_id for m in inbox.messages} == {alone.endpoint_id}
    assert counters["topics_delivered_locally"] == 5
    assert counters.get("transport_frames_sent", 0) == 0  # no network involved


def test_an_iterated_subscription_yields_messages_in_order(
    pair: tuple[EndpointManager, EndpointManager],
) -> None:
    publisher, subscriber = pair
    subscription = subscriber.subscribe("iter/t", KIND)
    _interest_known(publisher, 1)
    for number in range(20):
        publisher.publish("iter/t", KIND, b"%d" % number)
    first = subscription.get(timeout=5)
    rest = [m.payload for _, m in zip(range(19), subscription.messages(timeout=5), strict=False)]
    assert [first.payload, *rest] == [b"%d" % n for n in range(20)]
    with pytest.raises(TimeoutError):
        subscription.get(timeout=0.05)
    subscription.close()
    with pytest.raises(EOFError):
        subscription.get(timeout=1)


def test_a_blocked_callback_holds_up_neither_other_subscriptions_nor_other_endpoints_nor_acks(
    settings: dict[str, object],
) -> None:
    count = 2000
    release = threading.Event()
    slow: list[int] = []

    def stuck(message) -> None:  # type: ignore[no-untyped-def]
        slow.append(message.sequence)
        release.wait(20)

    fast, elsewhere = Inbox(), Inbox()
    # The smallest send queue allowed: 2 MB of messages get through only if acks keep flowing.
    with (
        EndpointManager.from_env(**settings, send_queue_bytes=65536) as publisher,
        EndpointManager.from_env(**settings) as blocked,
        EndpointManager.from_env(**settings) as other,
    ):
        try:
            blocked.subscribe("load/#", KIND, stuck)
            blocked.subscribe("load/data", KIND, fast)
            other.subscribe("load/#", KIND, elsewhere)
            publisher.wait_for_peers(2, timeout=5)
            # Both subscribing endpoints, not just two interest messages (blocked sends two).
            publisher.wait_for_subscribers("load/data", 2, timeout=5)
            for number in range(count):
                publisher.publish("load/data", KIND, b"%d:" % number + b"x" * 1024, timeout=10)
            assert fast.wait_for_count(count, timeout=20)
            assert elsewhere.wait_for_count(count, timeout=20)
            assert slow == [1]  # still inside its first call
            to_peers = publisher.peer_counters()
            sent = to_peers[blocked.endpoint_id]["frames_sent"]
            assert wait_until(
                lambda: (
                    publisher.peer_counters()[blocked.endpoint_id].get("frames_acked", 0) == sent
                ),
                timeout=5,
            ), publisher.peer_counters()[blocked.endpoint_id]
        finally:
            release.set()
        assert wait_until(lambda: len(slow) == count, timeout=20)
        assert publisher.counters().get("backpressure_errors", 0) == 0
    assert slow == list(range(1, count + 1))
    assert fast.sequences() == slow
    assert elsewhere.sequences() == slow


def test_after_unsubscribing_a_peer_is_sent_nothing_more_on_that_topic(
    pair: tuple[EndpointManager, EndpointManager],
) -> None:
    publisher, subscriber = pair
    gone, still = Inbox(), Inbox()
    subscription = subscriber.subscribe("gone/t", KIND, gone)
    _interest_known(publisher, 1)
    publisher.publish("gone/t", KIND, b"before")
    assert gone.wait_for_count(1, timeout=5)
    subscription.close()
    _interest_known(publisher, 2)  # the change reached the publisher
    frames_before = publisher.peer_counters()[subscriber.endpoint_id]["frames_sent"]
    for number in range(50):
        publisher.publish("gone/t", KIND, b"%d" % number)
    subscriber.subscribe("still/t", KIND, still)
    _interest_known(publisher, 3)
    publisher.publish("still/t", KIND, b"marker")  # sent after the 50, so it arrives after them
    assert still.wait_for_count(1, timeout=5)
    frames_after = publisher.peer_counters()[subscriber.endpoint_id]["frames_sent"]
    counters = subscriber.counters()
    assert gone.payloads() == [b"before"]
    assert counters.get("topics_received_unwanted", 0) == 0
    assert frames_after == frames_before + 1  # the marker alone
