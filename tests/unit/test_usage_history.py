"""Topic history keeps only topics that hold something (issue 14, item 5): a topic whose
retained messages all expired leaves the map timers scan, and numbers on if published again."""

from __future__ import annotations

from glue.topics import Topics, TopicsConfig
from glue.wire import EndpointId


def _topics(**config: int) -> Topics:
    return Topics(
        TopicsConfig(**config),
        endpoint_id=EndpointId(1),
        name="p1",
        incarnation=1,
        emit=lambda event: None,
    )


def _publish(topics: Topics, topic: str, *, now: float, expires_at: float, **kw: int) -> int:
    envelope, _ = topics.publish(topic, "t", b"x", expires_at=expires_at, now=now, **kw)
    line = envelope if isinstance(envelope, bytes) else envelope[0]
    head = line.split(b"\n")[0]
    return int(head.split(b'"s":')[1].split(b",")[0])


def test_topics_whose_history_expired_leave_the_map_and_number_on() -> None:
    topics = _topics()
    for n in range(1000):
        assert _publish(topics, f"t/{n}", now=0.0, expires_at=5.0) == 1
    assert topics.history_topics() == 1000
    topics.prune_history(4.0)
    assert topics.history_topics() == 1000  # nothing expired yet
    topics.prune_history(5.0)
    assert topics.history_topics() == 0
    assert topics._history_bytes == 0
    assert topics.counters["history_expired"] == 1000
    # Published again, a topic numbers on: a subscriber must not take it for a duplicate.
    assert _publish(topics, "t/7", now=6.0, expires_at=10.0) == 2
    assert topics.history_topics() == 1


def test_a_depth_given_for_a_topic_is_kept_while_it_rests() -> None:
    topics = _topics()
    _publish(topics, "a", now=0.0, expires_at=1.0, history_depth=3)
    topics.prune_history(2.0)
    assert topics.history_topics() == 0
    for _ in range(5):
        _publish(topics, "a", now=3.0, expires_at=10.0)
    assert len(topics._history["a"].entries) == 3


def test_a_topic_without_history_never_enters_the_map() -> None:
    topics = _topics(history_depth=0)
    for n in range(3):
        assert _publish(topics, "a", now=0.0, expires_at=10.0) == n + 1
    assert topics.history_topics() == 0


def test_resting_topics_are_bounded_and_a_forgotten_one_numbers_above_all_forgotten() -> None:
    topics = _topics(history_depth=0, max_dormant_topics=10)
    for _ in range(5):
        _publish(topics, "busy", now=0.0, expires_at=10.0)  # sequences 1..5
    for n in range(20):
        _publish(topics, f"t/{n}", now=0.0, expires_at=10.0)
    assert len(topics._dormant) == 10
    assert topics.counters["history_topics_forgotten"] == 11
    assert _publish(topics, "busy", now=0.0, expires_at=10.0) == 6  # above its own 5


def test_timers_do_not_scan_history_before_its_earliest_expiry() -> None:
    topics = _topics()
    for n in range(100):
        _publish(topics, f"t/{n}", now=0.0, expires_at=50.0 + n)
    scans = 0
    real = topics._history.items

    class Counting(dict):  # type: ignore[type-arg]
        def items(self):  # type: ignore[no-untyped-def]
            nonlocal scans
            scans += 1
            return real()

    topics._history = Counting(topics._history)
    for now in range(49):
        topics.prune_history(float(now))
    assert scans == 0
    topics.prune_history(50.0)
    assert scans == 1
    assert topics.history_topics() == 99
