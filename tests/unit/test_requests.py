"""The request/reply layer alone (no sockets): served names in interest, requests, replies,
deadlines, responder choice, and what a receiver without the layer does with them."""

from __future__ import annotations

import math

import orjson
import pytest

from glue.events import (
    MessageReceived,
    Peer,
    ReplyArrived,
    RequestArrived,
    StackEvent,
    TopicDelivery,
)
from glue.requests import Requests
from glue.topics import Outbound, Topics, TopicsConfig
from glue.wire import EndpointId

WALL = 1000.0


def _peer(number: int) -> Peer:
    return Peer(EndpointId(number), 1, f"p{number}", f"10.0.0.{number}", 4000, 1.0)


class Node:
    """One Topics with its Requests (as the stack wires them), and what they emitted."""

    def __init__(self, number: int, *, with_requests: bool = True) -> None:
        self.events: list[StackEvent] = []
        self.peer = _peer(number)
        self.topics = Topics(
            TopicsConfig(),
            endpoint_id=self.peer.endpoint_id,
            name=self.peer.name,
            incarnation=1,
            emit=self.events.append,
            wall_offset=WALL,
        )
        self.requests = Requests(emit=self.events.append, wall_offset=lambda: WALL)
        if with_requests:
            self.topics.requests = self.requests

    def take(self, kind: type) -> list:
        found = [e for e in self.events if isinstance(e, kind)]
        self.events[:] = [e for e in self.events if not isinstance(e, kind)]  # (emit appends)
        return found


def _joined(message: Outbound) -> bytes:
    return message if isinstance(message, bytes) else b"".join(message)


def _exchange(*nodes: Node, now: float = 0.0) -> list[bytes]:
    """Carry interest (and the layer's own replies) between the nodes until quiet."""
    by_id = {node.peer.endpoint_id: node for node in nodes}
    carried = []
    while True:
        sends = [
            (node, send)
            for node in nodes
            for send in (*node.topics.take_sends(), *node.requests.take_sends())
        ]
        if not sends:
            return carried
        for sender, (to, envelope, _) in sends:
            data = _joined(envelope)
            carried.append(data)
            by_id[to].topics.receive(sender.peer, data, now)


def _meet(*nodes: Node) -> None:
    for node in nodes:
        for other in nodes:
            if other is not node:
                node.topics.peer_added(other.peer)
    _exchange(*nodes)


def _send(sender: Node, sends: list, receivers: dict[int, Node], now: float = 0.0) -> None:
    for to, message, _ in sends:  # (the transport's expiry: later than the deadline, here)
        receivers[to].topics.receive(sender.peer, _joined(message), now)


def test_served_names_travel_in_the_interest_apart_from_topic_patterns() -> None:
    robot, controller = Node(1), Node(2)
    robot.topics.subscribe("#", "t")  # subscribed to everything: still serves nothing
    robot.topics.serve("robots/+/move")
    robot.topics.peer_added(controller.peer)
    controller.topics.peer_added(robot.peer)
    (full,) = [s for s in robot.topics.take_sends()]
    head = orjson.loads(_joined(full[1]).split(b"\n")[0])
    assert head == {"i": 1, "set": ["#"], "sv": ["robots/+/move"]}
    controller.topics.receive(robot.peer, _joined(full[1]), 0.0)
    assert controller.topics.responders("robots/r1/move") == (robot.peer.endpoint_id,)
    assert controller.topics.responders("robots/r1/stop") == ()
    assert controller.topics.subscribers("robots/r1/move") == (robot.peer.endpoint_id,)  # by '#'
    # A served pattern never makes a topic subscriber, nor a subscription a responder.
    other = Node(3)
    other.topics.serve("#")
    _meet(other, controller)
    assert other.peer.endpoint_id not in controller.topics.subscribers("a/b")
    assert controller.topics.responders("a/b") == (other.peer.endpoint_id,)


def test_serving_and_unserving_later_go_as_changes_an_older_receiver_reads_as_empty() -> None:
    robot, controller = Node(1), Node(2)
    robot.topics.subscribe("cmd", "t")
    _meet(robot, controller)
    robot.topics.serve("robots/r1/move")
    (delta,) = _exchange(robot, controller)
    assert orjson.loads(delta[:-1]) == {
        "i": 2,
        "add": [],
        "del": [],
        "sva": ["robots/r1/move"],
        "svd": [],
    }
    assert controller.topics.responders("robots/r1/move") == (robot.peer.endpoint_id,)
    assert controller.topics.peer_patterns(robot.peer.endpoint_id) == ["$robots/r1/move", "cmd"]
    assert robot.topics.patterns() == ["cmd"]
    robot.topics.unserve("robots/r1/move")
    _exchange(robot, controller)
    assert controller.topics.responders("robots/r1/move") == ()
    # A receiver predating served names still holds the topic patterns (keys it ignores).
    old = Node(3, with_requests=False)
    robot.topics.serve("x")
    _meet(robot, controller, old)
    assert old.topics.subscribers("cmd") == (robot.peer.endpoint_id,)


def test_a_request_reaches_the_handler_with_its_deadline_and_its_reply_the_requester() -> None:
    robot, controller = Node(1), Node(2)
    serve_id = robot.requests.serve("robots/+/move")
    robot.topics.serve("robots/+/move")
    _meet(robot, controller)
    responders = controller.topics.responders("robots/r1/move")
    request_id, sends = controller.requests.open(
        "robots/r1/move", b"go", responders, everyone=False, deadline=10.2, now=10.0
    )
    ((to, message, expires_at),) = sends
    assert (to, expires_at) == (robot.peer.endpoint_id, 10.2)
    assert _joined(message) == b'{"t":"robots/r1/move","q":1,"d":200}\ngo'
    _send(controller, sends, {1: robot}, now=10.05)
    (arrived,) = robot.take(RequestArrived)
    request = arrived.request
    assert arrived.serve_id == serve_id
    assert (request.name, request.payload) == ("robots/r1/move", b"go")
    assert request.requester_name == "p2"
    assert request.deadline == pytest.approx(10.25)  # its arrival + what it had left
    assert request.expires_at == pytest.approx(WALL + 10.25)
    reply = robot.requests.reply(request, b"done", error=None, now=10.1)
    assert reply is not None
    _send(robot, [reply], {2: controller}, now=10.11)
    (answer,) = controller.take(ReplyArrived)
    assert answer.status == "ok"
    assert answer.done
    assert answer.request_id == request_id
    assert answer.reply is not None
    assert answer.reply.payload == b"done"
    assert answer.reply.round_trip_s == pytest.approx(0.11)
    assert controller.requests.pending() == 0
    assert controller.requests.counters["replies_received"] == 1
    assert robot.requests.counters["replied"] == 1


def test_an_error_a_late_reply_and_an_unserved_name() -> None:
    robot, controller = Node(1), Node(2)
    robot.requests.serve("a")
    ids = (robot.peer.endpoint_id,)
    _, sends = controller.requests.open("a", b"", ids, everyone=False, deadline=1.0, now=0.0)
    _send(controller, sends, {1: robot})
    (arrived,) = robot.take(RequestArrived)
    error = robot.requests.reply(arrived.request, b"no way", error="ValueError", now=0.5)
    assert error is not None
    _send(robot, [error], {2: controller})
    (answer,) = controller.take(ReplyArrived)
    assert (answer.status, answer.error_type, answer.error_message) == (
        "error",
        "ValueError",
        "no way",
    )
    # After its deadline, no reply is sent (the requester gave up).
    assert robot.requests.reply(arrived.request, b"", error=None, now=1.0) is None
    assert robot.requests.counters["replies_late"] == 1
    # A name nothing serves here is answered at once: no handler runs.
    _, sends = controller.requests.open("b", b"", ids, everyone=False, deadline=1.0, now=0.0)
    _send(controller, sends, {1: robot})
    assert robot.take(RequestArrived) == []
    _exchange(robot, controller)
    (answer,) = controller.take(ReplyArrived)
    assert answer.status == "unserved"
    assert robot.requests.counters["received_unserved"] == 1


def test_a_reply_nobody_waits_for_is_dropped_and_a_closed_request_counts_as_a_timeout() -> None:
    robot, controller = Node(1), Node(2)
    robot.requests.serve("a")
    ids = (robot.peer.endpoint_id,)
    request_id, sends = controller.requests.open(
        "a", b"", ids, everyone=False, deadline=5.0, now=0.0
    )
    _send(controller, sends, {1: robot})
    (arrived,) = robot.take(RequestArrived)
    controller.requests.close(request_id)  # the caller's timeout
    assert controller.requests.counters["timeouts"] == 1
    reply = robot.requests.reply(arrived.request, b"", error=None, now=1.0)
    assert reply is not None
    _send(robot, [reply], {2: controller})
    assert controller.take(ReplyArrived) == []
    assert controller.requests.counters["replies_unexpected"] == 1
    # From a peer not asked: dropped too.
    stranger = Node(3)
    controller.topics.receive(stranger.peer, b'{"t":"a","a":2}\n', 0.0)
    assert controller.requests.counters["replies_unexpected"] == 2


def test_a_receiver_without_the_layer_drops_requests_and_replies_never_delivers_them() -> None:
    old = Node(1, with_requests=False)
    sender = Node(2)
    old.topics.subscribe("#", "t")
    for data in (
        b'{"t":"robots/r1/move","q":1,"d":200}\ngo',
        b'{"t":"robots/r1/move","a":1}\ndone',
        b'{"t":"robots/r1/move","a":1,"e":"ValueError"}\nno',
    ):
        old.topics.receive(sender.peer, data, 0.0)
        old.topics.receive_many(sender.peer, [data], 0.0)
    assert old.take(MessageReceived) == []
    assert old.take(TopicDelivery) == []
    assert old.topics.counters["dropped_bad_envelope"] == 6


def test_malformed_requests_and_replies_are_dropped_and_counted() -> None:
    node, peer = Node(1), Node(2)
    node.requests.serve("#")
    for data in (
        b'{"t":"a","q":0,"d":1}\n',
        b'{"t":"a","q":1}\n',
        b'{"t":"a","q":1,"d":-1}\n',
        b'{"t":"a b","q":1,"d":1}\n',
        b'{"t":"a","a":"x"}\n',
        b'{"t":"a","a":1,"e":3}\n',
    ):
        node.topics.receive(peer.peer, data, 0.0)
    assert node.events == []
    assert node.requests.counters["dropped_bad_envelope"] == 6


def test_a_request_goes_to_the_responder_with_fewest_outstanding_round_robin_among_equals() -> None:
    controller = Node(9)
    ids = (EndpointId(1), EndpointId(2), EndpointId(3))
    chosen = []
    for _ in range(6):
        _, ((to, _, _),) = controller.requests.open(
            "a", b"", ids, everyone=False, deadline=1.0, now=0.0
        )
        chosen.append(to)
    assert sorted(chosen) == [1, 1, 2, 2, 3, 3]  # none answered: spread evenly
    # Responder 1 answers everything: it has the fewest outstanding, so it gets the next.
    for request_id in range(1, 7):
        if chosen[request_id - 1] == 1:
            controller.topics.receive(_peer(1), b'{"t":"a","a":%d}\n' % request_id, 0.0)
    _, ((to, _, _),) = controller.requests.open(
        "a", b"", ids, everyone=False, deadline=1.0, now=0.0
    )
    assert to == 1


def test_request_all_asks_every_responder_and_is_done_when_each_answered_or_left() -> None:
    controller = Node(9)
    ids = (EndpointId(1), EndpointId(2), EndpointId(3))
    request_id, sends = controller.requests.open(
        "a", b"x", ids, everyone=True, deadline=1.0, now=0.0
    )
    assert [to for to, _, _ in sends] == [1, 2, 3]
    controller.topics.receive(_peer(1), b'{"t":"a","a":1}\none', 0.0)
    controller.topics.receive(_peer(3), b'{"t":"a","a":1,"e":"KeyError"}\nk', 0.0)
    controller.requests.peer_removed(_peer(2))
    answers = controller.take(ReplyArrived)
    assert [(a.responder.endpoint_id, a.status, a.done) for a in answers] == [
        (1, "ok", False),
        (3, "error", False),
        (2, "gone", True),
    ]
    assert controller.requests.pending() == 0
    assert request_id == 1


def test_the_deadline_is_no_later_than_the_transport_expiry() -> None:
    robot, controller = Node(1), Node(2)
    robot.requests.serve("a")
    # The request says 10 s; its transport message lives 1 s.
    robot.topics.receive(controller.peer, b'{"t":"a","q":1,"d":10000}\n', 5.0, 6.0)
    (arrived,) = robot.take(RequestArrived)
    assert arrived.request.deadline == 6.0
    robot.topics.receive(controller.peer, b'{"t":"a","q":2,"d":10000}\n', 5.0, math.inf)
    (arrived,) = robot.take(RequestArrived)
    assert arrived.request.deadline == 15.0


def test_interest_not_yet_heard_is_known_to_be_missing() -> None:
    controller, robot = Node(1), Node(2)
    robot.topics.serve("a")
    robot.topics.subscribe("b", "t")
    robot.topics.take_sends()  # (its version moves on; nobody to tell yet)
    controller.topics.peer_added(robot.peer)
    # The announcement that made it known names its version: its set is on the way.
    controller.topics.announced(robot.peer.endpoint_id, robot.topics.version)
    assert controller.topics.interest_unknown()
    assert controller.topics.responders("a") == ()
    robot.topics.peer_added(controller.peer)
    _exchange(robot, controller)
    assert not controller.topics.interest_unknown()
    assert controller.topics.responders("a") == (robot.peer.endpoint_id,)


def test_no_responder_is_counted_and_warned_about_once(caplog: pytest.LogCaptureFixture) -> None:
    node = Node(1)
    node.requests.no_responder("robots/r9/move")
    node.requests.no_responder("robots/r9/move")
    assert node.requests.counters["no_responder"] == 2
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1
    assert "robots/r9/move" in warnings[0].getMessage()
