"""Gap events without sockets: the topics layer tells a subscription that asked which messages
will never come and why; the transport's skip says whether the sender dropped or let expire."""

from __future__ import annotations

import orjson
import pytest

from glue import wire
from glue.events import Gap, TopicGap
from glue.transport import FramesSkipped
from glue.wire import Ack, Data, Skip
from tests.unit.test_topics import Node, _joined, _meet, _publish
from tests.unit.test_topics_keepers import _apart, _keeper
from tests.unit.test_transport import A, B, Pair


def _gaps(node: Node) -> list[Gap]:
    return [event.gap for event in node.events if isinstance(event, TopicGap)]


def _stream(pub: Node, sub: Node, lost: set[int], count: int = 6, **publish: object) -> None:
    """Publish ``count`` messages, each reaching ``sub`` unless its sequence is in ``lost``."""
    for sequence in range(1, count + 1):
        envelope, _ = _publish(pub, **publish)  # type: ignore[arg-type]
        if sequence not in lost:
            sub.topics.receive(pub.peer, _joined(envelope), 0.0)


def test_a_run_of_missing_messages_is_one_gap_for_a_subscription_that_asked() -> None:
    pub, sub = Node(1), Node(2)
    asked = sub.topics.subscribe("a/#", "t", gaps=True)
    plain = sub.topics.subscribe("a/#", "t")
    _meet(pub, sub)
    _stream(pub, sub, lost={3, 4})
    gaps = [event for event in sub.events if isinstance(event, TopicGap)]
    assert [(e.gap, e.subscriptions) for e in gaps] == [
        (Gap("a/b", 1, "p1", 3, 2, "history"), (asked,))
    ]
    assert gaps[0].gap.last_sequence == 4
    # In order: the messages before the gap, the gap, the messages after it.
    order = [
        ("gap", e.gap.first_sequence)
        if isinstance(e, TopicGap)
        else ("msg", e.messages[0].sequence)
        for e in sub.events
        if isinstance(e, TopicGap) or hasattr(e, "messages")
    ]
    assert order == [("msg", 1), ("msg", 2), ("gap", 3), ("msg", 5), ("msg", 6)]
    assert plain not in gaps[0].subscriptions
    assert sub.topics.counters["gaps"] == 1
    assert sub.topics.counters["gap_messages"] == 2


def test_gaps_are_counted_even_when_no_subscription_asked() -> None:
    pub, sub = Node(1), Node(2)
    sub.topics.subscribe("a/#", "t")
    _meet(pub, sub)
    _stream(pub, sub, lost={2, 5})
    assert _gaps(sub) == []
    assert sub.topics.counters["gaps"] == 2
    assert sub.topics.counters["gap_messages"] == 2


@pytest.mark.parametrize("reason", ["expired", "dropped"])
def test_a_gap_after_a_skip_says_why_the_frames_were_skipped(reason: str) -> None:
    pub, sub = Node(1), Node(2)
    sub.topics.subscribe("a/#", "t", gaps=True)
    _meet(pub, sub)
    _stream(pub, sub, lost={2}, count=1)
    envelope, _ = _publish(pub)  # 2: lost
    sub.topics.skipped(pub.peer.endpoint_id, reason)  # type: ignore[arg-type]
    envelope, _ = _publish(pub)
    sub.topics.receive(pub.peer, _joined(envelope), 0.0)
    assert _gaps(sub) == [Gap("a/b", 1, "p1", 2, 1, reason)]  # type: ignore[arg-type]


def test_a_skip_reason_does_not_outlive_the_peer() -> None:
    pub, sub = Node(1), Node(2)
    sub.topics.subscribe("a/#", "t", gaps=True)
    _meet(pub, sub)
    _stream(pub, sub, lost=set(), count=1)
    sub.topics.skipped(pub.peer.endpoint_id, "dropped")
    _apart(pub, sub)  # a partition: the publisher's history does not reach back far enough
    for _ in range(3):
        _publish(pub, history_depth=1)
    _meet(pub, sub)
    assert _gaps(sub) == [Gap("a/b", 1, "p1", 2, 2, "history")]


def test_a_gap_in_what_a_keeper_serves_is_for_history() -> None:
    pub, keeper, sub = Node(1), _keeper(2, depth=2), Node(3)
    sub.topics.subscribe("a/#", "t", gaps=True)
    _meet(pub, keeper, sub)
    _stream(pub, sub, lost=set(), count=1)
    _apart(pub, sub)
    for _ in range(4):  # 2..5: the keeper gets them, the subscriber does not
        envelope, _ = _publish(pub)
        keeper.topics.receive(pub.peer, _joined(envelope), 0.0)
    _apart(keeper, sub)
    _meet(keeper, sub)  # the keeper serves 4 and 5
    assert _gaps(sub) == [Gap("a/b", 1, "p1", 2, 2, "history")]


def test_a_type_mismatch_is_no_gap() -> None:
    pub, sub = Node(1), Node(2)
    sub.topics.subscribe("a/#", "t", gaps=True)
    _meet(pub, sub)
    _stream(pub, sub, lost=set(), count=2)
    _stream(pub, sub, lost=set(), count=2, topic_type="other")  # not delivered, not a gap
    _stream(pub, sub, lost=set(), count=1)
    assert _gaps(sub) == []


def test_a_skip_carries_why_on_the_wire() -> None:
    header = wire.Header(1, 7, 1, destination=2)
    for skip, json in (
        (Skip(10), {"t": "s", "seq": 10}),
        (Skip(10, True), {"t": "s", "seq": 10, "why": "d"}),
    ):
        datagram = wire.encode(header, [skip])
        assert orjson.loads(datagram.split(b"\n")[0])["f"] == [json]
        assert wire.decode(datagram, network_id=1).frames == (skip,)
    bad = wire.encode(header, [Skip(10)]).replace(b'"seq":10', b'"seq":10,"why":"x"')
    with pytest.raises(wire.DecodeError, match="why"):
        wire.decode(bad, network_id=1)


def test_a_dropped_backlog_is_skipped_as_dropped_and_an_expired_frame_as_expired() -> None:
    pair = Pair()
    pair.send(b"1", b"2")
    pair.pull(pair.a)  # both lost
    assert pair.a.drop_backlog(B) == 2
    assert pair.transfer(pair.a) == [Skip(3, True)]
    assert pair.events(pair.b) == [FramesSkipped(A, 1, 2, "dropped")]
    assert pair.transfer(pair.b) == [Ack(2)]
    pair.send(b"3", life=0.25)
    assert pair.pull(pair.a) == [Data(3, b"3", 250)]  # lost
    pair.timer(pair.a)
    pair.pull(pair.a)
    pair.timer(pair.a)
    assert pair.transfer(pair.a) == [Skip(4)]  # expired: not a drop
    assert pair.events(pair.b) == [FramesSkipped(A, 3, 3, "expired")]
