"""Retained messages (``publish(..., retain=True)``) in the topics layer alone: kept until
replaced, not only until they expire, by the publisher and by keepers."""

from __future__ import annotations

import math
from pathlib import Path

from glue.history import open_store
from tests.unit.test_topics import Node, _exchange, _meet, _publish
from tests.unit.test_topics_keepers import _apart, _keeper


def _late(pub: Node, now: float, pattern: str = "a/#") -> tuple[Node, list[float]]:
    """A subscriber that meets ``pub`` at ``now``; what it got, and the times to live it got
    them with (seconds left at ``now``)."""
    sub = Node(7)
    sub.topics.subscribe(pattern, "t")
    for node, other in ((pub, sub), (sub, pub)):
        node.topics.peer_added(other.peer)
    ttls = []
    for _ in range(3):  # interest one way, then the other, then the replay
        for node, other in ((pub, sub), (sub, pub)):
            for _to, envelope, expires_at in node.topics.take_sends():
                payload = envelope if isinstance(envelope, bytes) else b"".join(envelope)
                if node is pub and b'"t":' in payload:
                    ttls.append(expires_at - now)
                if expires_at > now:
                    other.topics.receive(node.peer, payload, now)
    return sub, ttls


def test_a_retained_message_outlives_its_expiry_for_late_joiners() -> None:
    pub = Node(1)
    _publish(pub, topic="a/kept", payload=b"22.5", expires_at=5.0, retain=True)
    _publish(pub, topic="a/plain", payload=b"gone", expires_at=5.0)
    pub.topics.prune_history(1000.0)  # long after both expired: only the plain one goes
    sub, ttls = _late(pub, now=1000.0)
    assert [(m.topic_name, m.payload) for m in sub.delivered()] == [("a/kept", b"22.5")]
    assert ttls == [5.0]  # sent with its whole time to live again
    assert pub.topics.counters["history_expired"] == 1


def test_a_replaced_retained_value_is_gone() -> None:
    pub = Node(1)
    _publish(pub, payload=b"old", expires_at=5.0, retain=True)
    _publish(pub, payload=b"new", expires_at=5.0, retain=True)
    sub, _ = _late(pub, now=100.0)
    assert [m.payload for m in sub.delivered()] == [b"new"]


def test_a_later_message_that_is_not_retained_replaces_a_retained_one() -> None:
    pub = Node(1)
    _publish(pub, payload=b"kept", expires_at=5.0, retain=True)
    _publish(pub, payload=b"plain", expires_at=5.0)
    sub, _ = _late(pub, now=100.0)
    assert sub.delivered() == []  # the plain one replaced it, then expired


def test_the_envelope_says_retained_with_the_time_to_live() -> None:
    pub = Node(1)
    envelope, _ = _publish(pub, payload=b"x", expires_at=7.5, retain=True)
    assert b',"r":7.5,"w":' in envelope


def test_a_keeper_keeps_a_retained_message_and_serves_it_after_the_publisher_left() -> None:
    pub, keeper = Node(1), _keeper(2, depth=1)
    _meet(pub, keeper)
    _publish(pub, keeper, payload=b"last", expires_at=5.0, retain=True)
    keeper.topics.prune_history(1000.0)
    assert keeper.topics.kept_messages() == 1
    _apart(pub, keeper)
    sub, ttls = _late(keeper, now=1000.0)
    assert [(m.source_id, m.payload) for m in sub.delivered()] == [(1, b"last")]
    assert ttls == [5.0]


def test_a_retained_message_restored_from_the_store_is_still_retained() -> None:
    pub, keeper = Node(1), _keeper(2, depth=1)
    keeper.topics.journal_kept()
    _meet(pub, keeper)
    _publish(pub, keeper, payload=b"last", expires_at=5.0, retain=True)
    changes = keeper.topics.take_kept_changes()
    puts = [message for kind, message in changes if kind == "put"]
    assert len(puts) == 1
    assert puts[0][-1] == math.inf
    again = _keeper(3, depth=1)
    assert again.topics.restore_kept(puts[0])
    sub, ttls = _late(again, now=1000.0)
    assert [m.payload for m in sub.delivered()] == [b"last"]
    assert ttls == [5.0]
    _exchange(again, sub)


def test_a_retained_message_in_the_sqlite_store_comes_back_retained(tmp_path: Path) -> None:
    path = tmp_path / "history.db"
    pub, keeper = Node(1), _keeper(2, depth=1)
    store = open_store(path, keeper.topics)
    _meet(pub, keeper)
    _publish(pub, keeper, payload=b"last", expires_at=5.0, retain=True)
    store.sync(keeper.topics)
    store.close()
    again = _keeper(5, depth=1)
    store = open_store(path, again.topics)  # long after it expired (wall clock), still there
    store.close()
    assert again.topics.kept_messages() == 1
    sub, ttls = _late(again, now=10_000.0)
    assert [m.payload for m in sub.delivered()] == [b"last"]
    assert ttls == [5.0]
