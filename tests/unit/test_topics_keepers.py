"""History keepers in the topics layer alone (no sockets), and their SQLite store."""

from __future__ import annotations

import math
import time
from pathlib import Path

import orjson
import pytest

from glue.errors import ConfigError, UsageError
from glue.events import TopicGap
from glue.history import HistoryStore, open_store
from tests.unit.test_topics import Node, _exchange, _joined, _meet, _peer, _publish


def _keeper(number: int, pattern: str = "a/#", depth: int = 10, **config: int) -> Node:
    node = Node(number, **config)
    node.topics.keep(pattern, depth)
    return node


def _apart(*nodes: Node) -> None:
    """Every node forgets every other (a partition, or they exited)."""
    for node in nodes:
        for other in nodes:
            if other is not node:
                node.topics.peer_removed(other.peer)


def test_a_keeper_serves_a_late_joiner_after_the_publisher_left() -> None:
    pub, keeper, sub = Node(1), _keeper(2), Node(3)
    _meet(pub, keeper)
    for index in range(10):
        _publish(pub, keeper, payload=b"%d" % index, history_depth=10)
    assert keeper.topics.kept_messages() == 10
    assert keeper.delivered() == []  # kept, not subscribed: nothing delivered there
    # The gauges (glue_kept_bytes, glue_history_*) say what each holds: 10 messages of 1 byte,
    # each with its envelope, kept; the publisher's history the same ten.
    kept, history = keeper.topics.gauges(), pub.topics.gauges()
    assert 10 * 1 < kept["kept_bytes"] < 10 * 200
    assert (history["history_topics"], kept["history_topics"]) == (1, 0)
    assert 10 * 1 < history["history_bytes"] < 10 * 200
    _apart(pub, keeper)  # the publisher exits
    sub.topics.subscribe("a/#", "t")
    _meet(keeper, sub)
    got = sub.delivered()
    assert [m.sequence for m in got] == list(range(1, 11))
    assert [m.payload for m in got] == [b"%d" % i for i in range(10)]
    # Under the publisher's name and id, not the keeper's.
    assert {(m.source_id, m.source_name) for m in got} == {(1, "p1")}
    assert keeper.topics.counters["kept_sent"] == 10


def test_a_late_joiner_served_by_the_publisher_and_two_keepers_gets_each_message_once() -> None:
    pub, k1, k2, sub = Node(1), _keeper(2), _keeper(3), Node(4)
    _meet(pub, k1, k2)
    for index in range(10):
        _publish(pub, k1, k2, payload=b"%d" % index, history_depth=10)
    sub.topics.subscribe("a/#", "t")
    _meet(pub, k1, k2, sub)
    assert [m.sequence for m in sub.delivered()] == list(range(1, 11))
    # The publisher is a peer: it serves its own history, and the keepers' copies are ignored.
    assert sub.topics.counters["relays_ignored"] == 20
    # And the live stream goes on after the kept history, once.
    _publish(pub, k1, k2, sub, payload=b"live")
    assert [(m.sequence, m.payload) for m in sub.delivered()] == [(11, b"live")]


def test_keepers_keep_what_other_keepers_serve_once_and_not_their_own() -> None:
    pub, k1 = Node(1), _keeper(2)
    _meet(pub, k1)
    for _ in range(3):
        _publish(pub, k1, history_depth=10)
    _apart(pub, k1)
    k2 = _keeper(3)
    _meet(k1, k2)  # k2 learns the history from k1, relayed
    assert k2.topics.kept_messages() == 3
    _exchange(k1, k2)
    assert k1.topics.kept_messages() == 3  # k2 served k1's own copies back: kept once
    sub = Node(4)
    sub.topics.subscribe("a/b", "t")
    _meet(k2, sub)
    assert [(m.source_id, m.sequence) for m in sub.delivered()] == [(1, 1), (1, 2), (1, 3)]


def test_a_restarted_publisher_replaces_what_was_kept_of_it() -> None:
    pub, keeper = Node(1), _keeper(2, depth=5)
    _meet(pub, keeper)
    for _ in range(4):
        _publish(pub, keeper)
    restarted = Node(1)
    restarted.peer = _peer(1, incarnation=2)
    restarted.topics.incarnation = 2
    keeper.topics.peer_removed(pub.peer)
    _meet(restarted, keeper)
    _publish(restarted, keeper, payload=b"new")
    assert keeper.topics.kept_messages() == 1
    sub = Node(3)
    sub.topics.subscribe("a/b", "t")
    _apart(restarted, keeper)
    _meet(keeper, sub)
    assert [(m.sequence, m.payload) for m in sub.delivered()] == [(1, b"new")]


def test_depth_keeps_the_last_messages_of_each_publisher_on_each_topic() -> None:
    p1, p2, keeper = Node(1), Node(2), _keeper(3, depth=2)
    _meet(p1, p2, keeper)
    for index in range(5):
        _publish(p1, keeper, topic="a/x", payload=b"1-%d" % index)
        _publish(p2, keeper, topic="a/x", payload=b"2-%d" % index)
        _publish(p1, keeper, topic="a/y", payload=b"1y-%d" % index)
    assert keeper.topics.kept_messages() == 6
    sub = Node(4)
    sub.topics.subscribe("a/#", "t")
    _apart(p1, p2, keeper)
    _meet(keeper, sub)
    got = sorted(m.payload for m in sub.delivered())
    assert got == [b"1-3", b"1-4", b"1y-3", b"1y-4", b"2-3", b"2-4"]


def test_expired_kept_messages_are_never_sent_and_are_pruned() -> None:
    pub, keeper = Node(1), _keeper(2)
    _meet(pub, keeper)
    envelope, _ = _publish(pub, history_depth=5)
    keeper.topics.receive(pub.peer, _joined(envelope), 0.0, 1.0)  # expires at 1.0
    envelope, _ = _publish(pub, history_depth=5)
    keeper.topics.receive(pub.peer, _joined(envelope), 0.0, 50.0)
    sub = Node(3)
    sub.topics.subscribe("a/b", "t")
    _apart(pub, keeper)
    for node, other in ((keeper, sub), (sub, keeper)):
        node.topics.peer_added(other.peer)
    _exchange(keeper, sub, now=2.0)
    assert [m.sequence for m in sub.delivered()] == [2]
    keeper.topics.prune_history(60.0)
    assert keeper.topics.kept_messages() == 0
    assert keeper.topics.counters["kept_expired"] == 2


def test_kept_history_is_bounded_in_bytes() -> None:
    pub, keeper = Node(1), _keeper(2, depth=1000, kept_max_bytes=10_000)
    _meet(pub, keeper)
    for _ in range(100):
        _publish(pub, keeper, payload=b"x" * 500)
    assert keeper.topics._kept_bytes <= 10_000
    assert 0 < keeper.topics.kept_messages() < 100
    assert keeper.topics.counters["kept_evicted_for_space"] > 0


def test_keeping_joins_the_interest_and_unkeeping_leaves_it() -> None:
    pub, keeper = Node(1), Node(2)
    _meet(pub, keeper)
    keeper.topics.keep("a/#", 3)
    _exchange(pub, keeper)
    assert pub.topics.subscribers("a/b") == (2,)
    keeper.topics.keep("a/#", 5)  # a new depth, the same interest
    assert keeper.topics.kept_patterns() == {"a/#": 5}
    _publish(pub, keeper)
    keeper.topics.unkeep("a/#")
    _exchange(pub, keeper)
    assert pub.topics.subscribers("a/b") == ()
    assert keeper.topics.kept_messages() == 0
    with pytest.raises(UsageError):
        keeper.topics.keep("a/#/b", 1)
    with pytest.raises(UsageError):
        keeper.topics.keep("a/#", -1)


@pytest.mark.parametrize(
    "origin",
    [
        "p1",
        [1, 1],
        [0, 1, "p"],
        [2**53, 1, "p"],
        [1, -1, "p"],
        [1, 1, ""],
        [1, 1, "x" * 256],
        [1.0, 1, "p"],
        {"id": 1},
    ],
)
def test_a_malformed_origin_is_dropped_and_counted(origin: object) -> None:
    sub, relay = Node(1), Node(2)
    sub.topics.subscribe("#", "t")
    head = {"t": "a", "y": "t", "s": 1, "w": 1.0, "o": origin}
    sub.topics.receive(relay.peer, orjson.dumps(head) + b"\nbody", 0.0)
    assert sub.delivered() == []
    assert sub.topics.counters["dropped_bad_envelope"] == 1


def test_the_journal_mirrors_what_is_kept_and_a_restore_replays_it() -> None:
    pub, keeper = Node(1), _keeper(2, depth=2)
    keeper.topics.journal_kept()
    _meet(pub, keeper)
    for index in range(3):
        _publish(pub, keeper, payload=b"%d" % index)
    changes = keeper.topics.take_kept_changes()
    assert [kind for kind, _ in changes] == ["put", "put", "put", "drop"]
    assert changes[-1][1] == ("a/b", 1, 1)  # sequence 1 left the depth of 2
    assert keeper.topics.take_kept_changes() == []
    restored = _keeper(3, depth=2)
    for kind, message in changes:
        if kind == "put":
            restored.topics.restore_kept(message)
    assert restored.topics.kept_messages() == 2
    sub = Node(4)
    sub.topics.subscribe("a/b", "t")
    _meet(restored, sub)
    assert [m.payload for m in sub.delivered()] == [b"1", b"2"]


def test_the_store_gives_back_what_was_kept_after_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "history.db"
    pub, keeper = Node(1), _keeper(2, depth=3)
    store = open_store(path, keeper.topics)
    _meet(pub, keeper)
    for index in range(5):
        _publish(pub, keeper, payload=b"%d" % index + b"y" * (5000 * (index == 4)))
    envelope, _ = _publish(pub, history_depth=5)
    keeper.topics.receive(pub.peer, _joined(envelope), 0.0, -1.0)  # already expired: not kept
    store.sync(keeper.topics)
    store.close()

    again = _keeper(5, depth=3)
    again.topics.wall_offset = keeper.topics.wall_offset
    store = open_store(path, again.topics)
    store.close()
    assert again.topics.kept_messages() == 3
    sub = Node(4)
    sub.topics.subscribe("a/b", "t")
    _meet(again, sub)
    got = sub.delivered()
    assert [m.sequence for m in got] == [3, 4, 5]
    assert got[-1].payload == b"4" + b"y" * 5000
    assert {m.source_name for m in got} == {"p1"}


def test_the_store_drops_expired_messages_and_those_no_longer_kept(tmp_path: Path) -> None:
    path = tmp_path / "history.db"
    keeper = _keeper(2, pattern="#", depth=5)
    store = open_store(path, keeper.topics)
    pub = Node(1)
    _meet(pub, keeper)
    now_offset = keeper.topics.wall_offset
    # Expiry in monotonic time: the wall clock is now_offset ahead of it.
    soon = time.time() - now_offset + 0.05
    for topic in ("a/b", "c/d"):
        envelope, _ = _publish(pub, topic=topic)
        keeper.topics.receive(pub.peer, _joined(envelope), 0.0, math.inf)
    envelope, _ = _publish(pub, topic="e/f")
    keeper.topics.receive(pub.peer, _joined(envelope), 0.0, soon)
    store.sync(keeper.topics)
    store.close()
    deadline = time.monotonic() + 5
    while time.time() - now_offset < soon and time.monotonic() < deadline:
        time.sleep(0.01)

    narrower = _keeper(3, pattern="a/#", depth=5)
    narrower.topics.wall_offset = now_offset
    open_store(path, narrower.topics).close()
    assert narrower.topics.kept_messages() == 1  # c/d is not kept any more; e/f expired
    check = HistoryStore(path)
    assert [m[0] for m in check.load(now_offset)] == ["a/b"]
    check.close()


def test_a_file_that_is_not_sqlite_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "history.db"
    path.write_bytes(b"not a database" * 100)
    with pytest.raises(ConfigError, match="GLUE_HISTORY_PATH"):
        HistoryStore(path)


def _relay(node: Node, relay: Node, origin: Node, sequence: int, **head: object) -> None:
    """``relay`` hands ``node`` a kept message of ``origin`` (a keeper's, or a forged one)."""
    line = {"t": "a/b", "y": "t", "s": sequence, "w": 1.0, "o": [*_origin_of(origin)], **head}
    node.topics.receive(relay.peer, orjson.dumps(line) + b"\nrelayed", 0.0)


def _origin_of(node: Node) -> tuple[int, int, str]:
    return (node.peer.endpoint_id, node.peer.incarnation, node.peer.name)


def test_relays_of_a_live_publisher_are_ignored_even_forged_with_a_huge_sequence() -> None:
    pub, attacker, sub = Node(1), Node(9), Node(3)
    sub.topics.subscribe("a/#", "t", gaps=True)
    _meet(pub, sub)
    for _ in range(3):
        _publish(pub, sub)
    assert [m.sequence for m in sub.delivered()] == [1, 2, 3]
    _relay(sub, attacker, pub, 10**15)
    _relay(sub, attacker, pub, 4, o=[1, 2, "p1"])  # a "newer incarnation" of it: the same
    assert sub.delivered() == []
    assert sub.topics.counters["relays_ignored"] == 2
    for _ in range(100):
        _publish(pub, sub)
    got = list(sub.events)
    assert [m.sequence for m in sub.delivered()] == list(range(4, 104))
    assert not [e for e in got if isinstance(e, TopicGap)]


def test_a_forged_relay_before_the_publisher_is_known_does_not_silence_it() -> None:
    pub, attacker, sub = Node(1), Node(9), Node(3)
    sub.topics.subscribe("a/#", "t")
    _relay(sub, attacker, pub, 2**53)  # sub has never heard of pub: nothing to check it by
    assert [m.sequence for m in sub.delivered()] == [2**53]
    _meet(pub, sub)
    for _ in range(5):
        _publish(pub, sub)
    assert [m.sequence for m in sub.delivered()] == [1, 2, 3, 4, 5]


def test_relays_that_went_ahead_of_the_publisher_are_not_delivered_again() -> None:
    pub, keeper, sub = Node(1), _keeper(2), Node(3)
    _meet(pub, keeper)
    for _ in range(10):
        _publish(pub, keeper, history_depth=10)
    sub.topics.subscribe("a/#", "t")
    _meet(keeper, sub)  # the keeper's replay comes before the publisher is known
    assert [m.sequence for m in sub.delivered()] == list(range(1, 11))
    _meet(pub, keeper, sub)  # now the publisher's own history: every one a repeat
    assert sub.delivered() == []
    for _ in range(3):
        _publish(pub, keeper, sub)
    assert [m.sequence for m in sub.delivered()] == [11, 12, 13]
    assert not sub.topics._ahead  # the publisher's stream passed what was relayed: pruned


def test_relays_ahead_of_a_publisher_are_bounded_in_runs() -> None:
    pub, attacker, sub = Node(1), Node(9), Node(3)
    sub.topics.subscribe("a/#", "t")
    for index in range(100):
        _relay(sub, attacker, pub, 1000 + 2 * index)  # each one a run of its own
    assert len(sub.delivered()) == 16
    assert sub.topics.counters["relays_refused"] == 100 - 16
    assert sub.topics.counters["received_from_keepers"] == 100
    _meet(pub, sub)
    for _ in range(5):
        _publish(pub, sub)
    assert [m.sequence for m in sub.delivered()] == [1, 2, 3, 4, 5]


def test_a_keeper_does_not_keep_relays_of_a_live_publisher() -> None:
    pub, keeper, attacker = Node(1), _keeper(2), Node(9)
    _meet(pub, keeper)
    for _ in range(3):
        _publish(pub, keeper, history_depth=10)
    # A forged relay with a newer incarnation would replace the real stream, one with a huge
    # sequence would make every real message look kept already: neither is kept.
    _relay(keeper, attacker, pub, 5, o=[1, 2**53 - 1, "p1"])
    _relay(keeper, attacker, pub, 10**15)
    for _ in range(3):
        _publish(pub, keeper, history_depth=10)
    sub = Node(3)
    sub.topics.subscribe("a/#", "t")
    _apart(pub, keeper)
    _meet(keeper, sub)
    assert [(m.sequence, m.payload) for m in sub.delivered()] == [(s, b"x") for s in range(1, 7)]
