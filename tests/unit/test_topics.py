"""The topics layer alone (no sockets): names, matching, interest, history, dedup, bounds."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from glue.errors import UsageError
from glue.events import Message, MessageReceived, Peer, StackEvent, TopicDelivery
from glue.topics import (
    APART_BYTES,
    DIRECT_ENVELOPE,
    Outbound,
    Topics,
    TopicsConfig,
    matches,
    validate_pattern,
    validate_topic_name,
    validate_topic_type,
)
from glue.wire import EndpointId


def _peer(number: int, incarnation: int = 1) -> Peer:
    return Peer(EndpointId(number), incarnation, f"p{number}", f"10.0.0.{number}", 4000, 1.0)


class Node:
    """One Topics instance and what it emitted."""

    def __init__(self, number: int, **config: int) -> None:
        self.events: list[StackEvent] = []
        self.peer = _peer(number)
        self.topics = Topics(
            TopicsConfig(**config),
            endpoint_id=self.peer.endpoint_id,
            name=self.peer.name,
            incarnation=1,
            emit=self.events.append,
            wall_offset=1000.0,
        )

    def delivered(self) -> list[Message]:
        out = [m for e in self.events if isinstance(e, TopicDelivery) for m in e.messages]
        self.events.clear()
        return out


def _exchange(*nodes: Node, now: float = 0.0) -> int:
    """Carry every pending send between the nodes until quiet; returns how many went."""
    by_id = {node.peer.endpoint_id: node for node in nodes}
    moved = 0
    while True:
        sends = [(node, send) for node in nodes for send in node.topics.take_sends()]
        if not sends:
            return moved
        for sender, (to, envelope, expires_at) in sends:
            if expires_at > now:
                by_id[to].topics.receive(sender.peer, _joined(envelope), now)
                moved += 1


def _joined(message: Outbound) -> bytes:
    return message if isinstance(message, bytes) else b"".join(message)


def _meet(*nodes: Node) -> None:
    for node in nodes:
        for other in nodes:
            if other is not node:
                node.topics.peer_added(other.peer)
    _exchange(*nodes)


def _publish(node: Node, *targets: Node, topic: str = "a/b", now: float = 0.0, **kw: object):
    envelope, to = node.topics.publish(
        topic,
        str(kw.pop("topic_type", "t")),
        bytes(kw.pop("payload", b"x")),  # type: ignore[call-overload]
        expires_at=float(kw.pop("expires_at", 100.0)),  # type: ignore[arg-type]
        now=now,
        **kw,  # type: ignore[arg-type]
    )
    for target in targets:
        if target.peer.endpoint_id in to:
            target.topics.receive(node.peer, _joined(envelope), now)
    return envelope, to


# --- names and patterns -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a", "sensors/kitchen/temp", "A-b_c.d:e", "x" * 256, "1/2/3"])
def test_valid_topic_names(name: str) -> None:
    assert validate_topic_name(name) == name


@pytest.mark.parametrize(
    "name", ["", "/a", "a/", "a//b", "a b", "a/#", "+", "x" * 257, "caf\u00e9", "a\nb", 5]
)
def test_invalid_topic_names_are_refused_with_the_rule(name: object) -> None:
    with pytest.raises(UsageError, match="invalid topic name"):
        validate_topic_name(name)  # type: ignore[arg-type]


@pytest.mark.parametrize("pattern", ["#", "a/#", "a/+/c", "+", "+/#", "a"])
def test_valid_patterns(pattern: str) -> None:
    assert validate_pattern(pattern) == pattern


@pytest.mark.parametrize("pattern", ["", "a/#/b", "#/a", "a+", "a/b#", "a//b", "##"])
def test_invalid_patterns(pattern: str) -> None:
    with pytest.raises(UsageError, match="invalid topic pattern"):
        validate_pattern(pattern)


@pytest.mark.parametrize("topic_type", ["", "has space", "x" * 129, "\u00e9"])
def test_invalid_types(topic_type: str) -> None:
    with pytest.raises(UsageError, match="invalid topic type"):
        validate_topic_type(topic_type)


@pytest.mark.parametrize(
    ("pattern", "topic", "expected"),
    [
        ("#", "anything/at/all", True),
        ("a/b", "a/b", True),
        ("a/b", "a/b/c", False),
        ("a/b/#", "a/b", True),
        ("a/b/#", "a/b/c/d", True),
        ("a/b/#", "a/bc", False),
        ("a/+/c", "a/x/c", True),
        ("a/+/c", "a/x/y/c", False),
        ("+", "a", True),
        ("+", "a/b", False),
        ("+/#", "a/b", True),
    ],
)
def test_matching(pattern: str, topic: str, expected: bool) -> None:
    assert matches(pattern, topic) is expected


_segment = st.text(alphabet="ab", min_size=1, max_size=2)
_topic = st.lists(_segment, min_size=1, max_size=4).map("/".join)


@given(_topic)
def test_a_topic_matches_itself_everything_and_its_prefixes(topic: str) -> None:
    parts = topic.split("/")
    assert matches(topic, topic)
    assert matches("#", topic)
    for cut in range(1, len(parts) + 1):
        assert matches("/".join(parts[:cut]) + "/#", topic)
    assert matches("/".join("+" for _ in parts), topic)


# --- interest and routing -----------------------------------------------------------------------


def test_publish_goes_only_to_peers_whose_interest_matches() -> None:
    pub, sub, other = Node(1), Node(2), Node(3)
    sub.topics.subscribe("a/#", "t")
    other.topics.subscribe("z", "t")
    _meet(pub, sub, other)
    _, targets = _publish(pub, sub, other, topic="a/b")
    assert targets == (sub.peer.endpoint_id,)
    [message] = sub.delivered()
    assert (message.topic_name, message.topic_type, message.payload) == ("a/b", "t", b"x")
    assert (message.source_id, message.source_name, message.sequence) == (1, "p1", 1)
    assert other.delivered() == []


def test_a_later_subscription_reaches_known_peers_as_a_delta() -> None:
    pub, sub = Node(1), Node(2)
    _meet(pub, sub)
    assert _publish(pub, sub)[1] == ()
    sub.topics.subscribe("a/b", "t")
    assert _exchange(pub, sub) >= 1
    assert pub.topics.peer_patterns(sub.peer.endpoint_id) == ["a/b"]
    sid = next(iter(sub.topics._subscriptions))
    sub.topics.unsubscribe(sid)
    _exchange(pub, sub)
    assert pub.topics.peer_patterns(sub.peer.endpoint_id) == []
    assert _publish(pub, sub)[1] == ()


def test_subscribe_and_unsubscribe_in_one_burst_send_nothing() -> None:
    pub, sub = Node(1), Node(2)
    _meet(pub, sub)
    sub.topics.unsubscribe(sub.topics.subscribe("a", "t"))
    assert not sub.topics.has_sends()


def test_a_newer_announced_version_makes_us_ask_for_the_whole_set() -> None:
    pub, sub = Node(1), Node(2)
    sub.topics.subscribe("a/#", "t")
    pub.topics.peer_added(sub.peer)  # the subscriber never learns of us: no push comes
    sub.topics.take_sends()
    pub.topics.announced(sub.peer.endpoint_id, sub.topics.version)  # the one that added it
    assert not pub.topics.has_sends()
    sub.topics.take_sends()  # flush the delta (to nobody)
    pub.topics.announced(sub.peer.endpoint_id, sub.topics.version)
    [(to, envelope, _)] = pub.topics.take_sends()
    assert to == sub.peer.endpoint_id
    assert orjson.loads(envelope)["ask"] is True
    sub.topics.peer_added(pub.peer)
    sub.topics.take_sends()
    sub.topics.receive(pub.peer, envelope, 0.0)
    _exchange(pub, sub)
    assert pub.topics.peer_patterns(sub.peer.endpoint_id) == ["a/#"]
    pub.topics.announced(sub.peer.endpoint_id, sub.topics.version)
    assert not pub.topics.has_sends()  # up to date: no more asking


def test_a_delta_out_of_step_asks_once_for_the_whole_set() -> None:
    pub, sub = Node(1), Node(2)
    _meet(pub, sub)
    delta = orjson.dumps({"i": 7, "add": ["q"], "del": []}) + b"\n"
    pub.topics.receive(sub.peer, delta, 0.0)
    pub.topics.receive(sub.peer, delta, 0.0)
    sends = pub.topics.take_sends()
    assert len(sends) == 1
    assert orjson.loads(sends[0][1])["ask"] is True
    assert pub.topics.peer_patterns(sub.peer.endpoint_id) == []
    assert pub.topics.counters["interest_out_of_step"] == 2


def test_a_peer_interest_is_bounded() -> None:
    pub, sub = Node(1, max_peer_patterns=10), Node(2)
    for index in range(50):
        sub.topics.subscribe(f"t{index}", "t")
    _meet(pub, sub)
    assert len(pub.topics.peer_patterns(sub.peer.endpoint_id)) == 10
    assert pub.topics.counters["interest_patterns_over_limit"] == 1


def test_a_thousand_subscriptions_cross_in_one_message() -> None:
    pub, sub = Node(1), Node(2)
    for index in range(1000):
        sub.topics.subscribe(f"sensors/room{index}/temperature", "t")
    sub.topics.take_sends()
    sub.topics.peer_added(pub.peer)
    [(_, envelope, _)] = sub.topics.take_sends()
    pub.topics.peer_added(sub.peer)
    pub.topics.receive(sub.peer, envelope, 0.0)
    assert len(pub.topics.peer_patterns(sub.peer.endpoint_id)) == 1000
    assert len(envelope) < 40_000  # one reliable, fragmented message; not per announcement


# --- local delivery and types -------------------------------------------------------------------


def test_local_subscriptions_get_own_publications_without_the_network() -> None:
    node = Node(1)
    sid = node.topics.subscribe("a/+", "t")
    _, targets = _publish(node, topic="a/b", payload=b"hi")
    assert targets == ()
    [event] = node.events
    assert isinstance(event, TopicDelivery)
    assert event.subscriptions == (sid,)
    [message] = event.messages
    assert message.source_id == 1
    assert message.payload == b"hi"
    assert node.topics.counters["delivered_locally"] == 1


def test_a_type_mismatch_is_not_delivered_and_is_counted_each_time(
    caplog: pytest.LogCaptureFixture,
) -> None:
    pub, sub = Node(1), Node(2)
    wanted = sub.topics.subscribe("a/b", "t")
    sub.topics.subscribe("a/b", "other")
    _meet(pub, sub)
    with caplog.at_level("WARNING"):
        for _ in range(3):
            _publish(pub, sub, topic="a/b", topic_type="t")
    deliveries = [e for e in sub.events if isinstance(e, TopicDelivery)]
    assert [d.subscriptions for d in deliveries] == [(wanted,)] * 3
    assert sub.topics.counters["type_mismatches"] == 3
    assert len([r for r in caplog.records if "has type" in r.getMessage()]) == 1


# --- history: late joiners and partitions -------------------------------------------------------


def test_a_late_joiner_gets_the_last_depth_messages_once_in_order() -> None:
    pub, sub = Node(1), Node(2)
    for index in range(10):
        _publish(pub, topic="a/b", payload=b"%d" % index, history_depth=5)
    sub.topics.subscribe("a/#", "t")
    _meet(pub, sub)
    assert [m.sequence for m in sub.delivered()] == [6, 7, 8, 9, 10]
    _publish(pub, sub, topic="a/b", payload=b"new")
    assert [m.payload for m in sub.delivered()] == [b"new"]


def test_a_peer_that_never_acknowledges_cannot_make_history_and_answers_pile_up() -> None:
    # Without a key, anyone can flip its interest between nothing and everything, or ask for
    # our interest again and again: each flip replays the history, each ask is answered. What
    # the stack has not yet handed to the transport counts against the peer's send queue too.
    pub, attacker = Node(1), _peer(66)
    for index in range(200):
        _publish(pub, topic=f"a/{index}", payload=b"x" * 1000, history_depth=1)
    pub.topics.subscribe("mine/#", "t")
    pub.topics.peer_added(attacker)
    pub.topics.take_sends()
    limit = 50_000
    queued = {"bytes": 0}  # what "the transport" holds for it: never acknowledged
    pub.topics.room = lambda peer, size: queued["bytes"] + size <= limit
    version = 0
    for _ in range(100):
        for patterns in ([], ["#"]):
            version += 1
            head = {"i": version, "set": patterns, "ask": True}
            pub.topics.receive(attacker, orjson.dumps(head) + b"\n", 0.0)
        for to, envelope, _ in pub.topics.take_sends():
            assert to == attacker.endpoint_id
            queued["bytes"] += len(_joined(envelope))
    assert queued["bytes"] <= limit
    counters = pub.topics.counters
    assert counters["history_not_sent_queue_full"] > 0
    assert counters["interest_answers_not_sent_queue_full"] > 0
    # With room, a late joiner still gets the history and its answer, as before.
    sub = Node(2)
    sub.topics.subscribe("a/#", "t")
    pub.topics.room = lambda peer, size: True
    _meet(pub, sub)
    assert len(sub.delivered()) == 200


def test_expired_history_is_never_sent() -> None:
    pub, sub = Node(1), Node(2)
    for _ in range(3):
        _publish(pub, expires_at=1.0, history_depth=5)
    sub.topics.subscribe("#", "t")
    for node, other in ((pub, sub), (sub, pub)):
        node.topics.peer_added(other.peer)
    _exchange(pub, sub, now=2.0)
    assert sub.delivered() == []


def test_history_is_replayed_when_interest_grows_not_when_it_was_already_matched() -> None:
    pub, sub = Node(1), Node(2)
    _publish(pub, topic="a/b")
    _publish(pub, topic="c")
    sub.topics.subscribe("a/#", "t")
    _meet(pub, sub)
    assert [m.topic_name for m in sub.delivered()] == ["a/b"]
    sub.topics.subscribe("#", "t")
    _exchange(pub, sub)
    assert [m.topic_name for m in sub.delivered()] == ["c"]  # a/b was matched already


def test_history_sent_again_after_a_partition_is_delivered_once() -> None:
    pub, sub = Node(1), Node(2)
    sub.topics.subscribe("a/b", "t")
    _meet(pub, sub)
    for _ in range(3):
        _publish(pub, sub, history_depth=10)
    assert [m.sequence for m in sub.delivered()] == [1, 2, 3]
    for node, other in ((pub, sub), (sub, pub)):  # both expire each other...
        node.topics.peer_removed(other.peer)
    for _ in range(2):
        _publish(pub, sub, history_depth=10)  # ...so these go nowhere
    _meet(pub, sub)  # rediscovered: the whole history is offered again
    assert [m.sequence for m in sub.delivered()] == [4, 5]
    assert sub.topics.counters["duplicates_suppressed"] == 3


def test_a_restarted_publisher_is_a_new_stream() -> None:
    pub, sub = Node(1), Node(2)
    sub.topics.subscribe("a/b", "t")
    _meet(pub, sub)
    _publish(pub, sub)
    restarted = Node(1)
    restarted.peer = _peer(1, incarnation=2)
    restarted.topics.incarnation = 2
    sub.topics.peer_removed(pub.peer)
    _meet(restarted, sub)
    _publish(restarted, sub)
    assert [(m.sequence, m.source_id) for m in sub.delivered()] == [(1, 1), (1, 1)]


def test_history_is_bounded_in_bytes_oldest_topics_first() -> None:
    pub, sub = Node(1, history_max_bytes=3000), Node(2)
    for index in range(10):
        _publish(pub, topic=f"t{index}", payload=b"x" * 900, history_depth=5)
    assert pub.topics._history_bytes <= 3000
    assert pub.topics.counters["history_evicted_for_space"] >= 7
    sub.topics.subscribe("#", "t")
    _meet(pub, sub)
    assert [m.topic_name for m in sub.delivered()] == ["t7", "t8", "t9"]


def test_depth_zero_keeps_nothing() -> None:
    pub, sub = Node(1), Node(2)
    _publish(pub, history_depth=0)
    sub.topics.subscribe("#", "t")
    _meet(pub, sub)
    assert sub.delivered() == []


# --- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"no newline",
        b"[1,2]\nbody",
        b"{bad json\nbody",
        b'{"t":"a","y":"t"}\nmissing seq',
        b'{"t":"a","y":"t","s":0,"w":1}\n',
        b'{"t":"a","y":"t","s":"1","w":1}\n',
        b'{"t":"a b","y":"t","s":1,"w":1}\n',
        b'{"t":"a","y":5,"s":1,"w":1}\n',
        b'{"t":"a","y":"t","s":1,"w":"x"}\n',
        b'{"i":"v","set":[]}\n',
        b'{"i":1,"set":["a b"]}\n',
        b'{"i":1,"add":"x","del":[]}\n',
        # A name or type that is no string, and cannot be hashed (it raised TypeError).
        b'{"t":["a"],"y":"t","s":1,"w":1}\n',
        b'{"t":"a","y":{"t":1},"s":1,"w":1}\n',
    ],
)
def test_malformed_envelopes_are_dropped_and_counted(data: bytes) -> None:
    pub, sub = Node(1), Node(2)
    sub.topics.subscribe("#", "t")
    _meet(pub, sub)
    sub.topics.receive(pub.peer, data, 0.0)
    pub.topics.receive(sub.peer, data, 0.0)
    assert sub.delivered() == []
    dropped = sum(
        v for k, v in (pub.topics.counters + sub.topics.counters).items() if "dropped" in k
    )
    assert dropped >= 1


def test_direct_messages_pass_through_untouched() -> None:
    node = Node(1)
    node.topics.receive(_peer(2), DIRECT_ENVELOPE + b"raw\nbytes", 0.0)
    [event] = node.events
    assert isinstance(event, MessageReceived)
    assert event.payload == b"raw\nbytes"


def test_the_dedup_table_is_bounded() -> None:
    pub, sub = Node(1), Node(2, max_streams=100)
    sub.topics.subscribe("#", "t")
    _meet(pub, sub)
    for index in range(500):
        _publish(pub, sub, topic=f"t{index}")
    assert len(sub.topics._seen) <= 100
    assert len(sub.delivered()) == 500


def test_timestamps_are_wall_clock() -> None:
    pub, sub = Node(1), Node(2)
    sub.topics.subscribe("#", "t")
    _meet(pub, sub)
    _publish(pub, sub, now=5.0)
    [message] = [m for e in sub.events if isinstance(e, TopicDelivery) for m in e.messages]
    assert message.sent_at == message.received_at == 1005.0


# --- the hot path's shape ------------------------------------------------------------------------


def test_consecutive_messages_for_the_same_subscriptions_share_one_delivery() -> None:
    pub, sub = Node(1), Node(2)
    sid = sub.topics.subscribe("a/#", "t")
    _meet(pub, sub)
    bundle = [_joined(_publish(pub, topic="a/b", payload=b"%d" % i)[0]) for i in range(5)]
    bundle.insert(3, DIRECT_ENVELOPE + b"direct")  # splits the run, keeping the order
    sub.events.clear()
    sub.topics.receive_many(pub.peer, bundle, 0.0)
    kinds = [type(e).__name__ for e in sub.events]
    assert kinds == ["TopicDelivery", "MessageReceived", "TopicDelivery"]
    first, direct, second = sub.events
    assert isinstance(first, TopicDelivery)
    assert isinstance(second, TopicDelivery)
    assert isinstance(direct, MessageReceived)
    assert [m.payload for m in first.messages] == [b"0", b"1", b"2"]
    assert direct.payload == b"direct"
    assert [m.payload for m in second.messages] == [b"3", b"4"]
    assert first.subscriptions == second.subscriptions == (sid,)


def test_a_large_payload_is_kept_apart_from_its_envelope_and_joined_once() -> None:
    pub, sub = Node(1), Node(2)
    sub.topics.subscribe("a/b", "t")
    _meet(pub, sub)
    payload = bytes(range(256)) * (APART_BYTES // 256 + 1)
    message, _ = _publish(pub, payload=payload)
    assert isinstance(message, tuple)
    line, body = message
    assert body is payload  # not copied
    assert line.endswith(b"\n")
    assert line.count(b"\n") == 1
    # As fragments arrive: the envelope line and views of the payload.
    view = memoryview(body)
    sub.topics.receive_pieces(pub.peer, [line + view[:100].tobytes(), view[100:]], 0.0)
    sub.topics.receive_pieces(pub.peer, [view[:0], line, view[:]], 0.0)  # (a duplicate)
    [got] = sub.delivered()
    assert got.payload == payload
    assert type(got.payload) is bytes
    assert sub.topics.counters["duplicates_suppressed"] == 1
