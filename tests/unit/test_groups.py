"""Work queues without sockets: member choice, done acks, redelivery, held jobs and their bounds
(glue.groups alone, then through the topics layer between nodes)."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import orjson
import pytest

from glue.errors import UsageError
from glue.events import Message, Peer, StackEvent, TopicDelivery, TopicGap
from glue.groups import GroupsConfig, GroupSender, Job, validate_group
from glue.topics import Outbound, Topics, TopicsConfig, any_matches
from glue.wire import EndpointId

A, B, C = EndpointId(11), EndpointId(12), EndpointId(13)


def _sender(**config: int) -> GroupSender:
    return GroupSender(GroupsConfig(**config), Counter(), any_matches)


def _publish(sender: GroupSender, count: int, *, topic: str = "jobs/x", expires_at: float = 100.0):
    out: list[Job] = []
    for sequence in range(1, count + 1):
        out += sender.publish(topic, "job", sequence, 0.0, b"p%d" % sequence, expires_at)
    return out


def _by_member(jobs: list[Job]) -> Counter[EndpointId | None]:
    return Counter(job.member for job in jobs)


def test_group_names_are_checked() -> None:
    assert validate_group("workers-1.a") == "workers-1.a"
    for bad in ("", "a b", "a/b", "x" * 129):
        with pytest.raises(UsageError, match="invalid group name"):
            validate_group(bad)
    with pytest.raises(UsageError, match="must be a str"):
        validate_group(3)


def test_each_job_goes_to_one_member_the_one_with_most_credit() -> None:
    sender = _sender(window=10)
    for member in (A, B, C):
        sender.set_member(member, {"workers": frozenset({"jobs/#"})}, 0.0)
    jobs = _publish(sender, 9)
    assert _by_member(jobs) == {A: 3, B: 3, C: 3}  # equal credit: in turn
    assert len({job.number for job in jobs}) == 9
    done_by_a = [job.number for job in jobs if job.member == A]
    assert sender.done(A, done_by_a, 0.0) == []  # nothing held: nothing more to send
    assert sender.counters["group_done"] == 3
    assert _by_member(_publish(sender, 3)) == {A: 3}  # A has the most credit now


def test_beyond_every_members_window_jobs_are_held_until_a_done() -> None:
    sender = _sender(window=2)
    sender.set_member(A, {"workers": frozenset({"jobs/#"})}, 0.0)
    sender.set_member(B, {"workers": frozenset({"jobs/#"})}, 0.0)
    jobs = _publish(sender, 7)
    assert _by_member(jobs) == {A: 2, B: 2}
    assert sender.held() == 3
    freed = sender.done(B, [jobs[1].number], 0.0)  # B's first job
    assert [(job.member, job.payload) for job in freed] == [(B, b"p5")]  # the oldest held
    assert sender.held() == 2
    assert not sender.idle()


def test_a_removed_members_unfinished_jobs_go_to_another_flagged_redelivered() -> None:
    sender = _sender(window=100)
    sender.set_member(A, {"workers": frozenset({"jobs/#"})}, 0.0)
    sender.set_member(B, {"workers": frozenset({"jobs/#"})}, 0.0)
    jobs = _publish(sender, 6)
    a_jobs = [job for job in jobs if job.member == A]
    sender.done(A, [a_jobs[0].number], 0.0)  # finished before it went
    again = sender.set_member(A, {}, 0.0)
    assert [job.number for job in again] == [job.number for job in a_jobs[1:]]  # in order
    assert all(job.member == B and job.redelivered for job in again)
    assert sender.counters["group_redelivered"] == 2
    # A done from the removed member is stale: the jobs belong to B now.
    assert sender.done(A, [job.number for job in again], 0.0) == []
    assert sender.counters["group_done_stale"] == 2
    sender.done(B, [job.number for job in jobs if job.member == B], 0.0)
    assert sender.idle()


def test_a_member_leaving_the_group_for_a_topic_gives_back_only_that_topics_jobs() -> None:
    sender = _sender()
    sender.set_member(A, {"workers": frozenset({"jobs/#", "other"})}, 0.0)
    sender.set_member(B, {"workers": frozenset({"jobs/#"})}, 0.0)
    sender.set_member(B, {}, 0.0)  # A alone in the group
    _publish(sender, 2, topic="other")
    jobs = _publish(sender, 2)
    sender.set_member(B, {"workers": frozenset({"jobs/#"})}, 0.0)
    again = sender.set_member(A, {"workers": frozenset({"other"})}, 0.0)
    assert [(job.topic, job.member, job.redelivered) for job in again] == [
        ("jobs/x", B, True),
        ("jobs/x", B, True),
    ]
    assert {job.number for job in again} == {job.number for job in jobs}


def test_without_a_live_member_jobs_wait_for_one_until_they_expire() -> None:
    sender = _sender()
    assert _publish(sender, 2) == []  # a group never heard of: nothing to hold
    assert sender.idle()
    sender.set_member(A, {"workers": frozenset({"jobs/#"})}, 0.0)
    sender.set_member(A, {}, 0.0)  # the last member left: the group is remembered
    assert _publish(sender, 2, expires_at=5.0) + _publish(sender, 1, expires_at=50.0) == []
    assert sender.held() == 3
    sender.prune(10.0)
    assert sender.held() == 1
    assert sender.counters["group_held_expired"] == 2
    back = sender.set_member(B, {"workers": frozenset({"jobs/#"})}, 10.0)
    assert [(job.member, job.payload) for job in back] == [(B, b"p1")]
    assert not back[0].redelivered


def test_held_jobs_are_bounded_in_bytes_the_oldest_dropped_and_counted() -> None:
    sender = _sender(window=1, hold_bytes=3 * (256 + 2))
    sender.set_member(A, {"g": frozenset({"#"})}, 0.0)
    jobs = _publish(sender, 6)
    assert len(jobs) == 1
    assert sender.held() == 3
    assert sender.counters["group_dropped_over_limit"] == 2
    freed = sender.done(A, [jobs[0].number], 0.0)
    assert [job.payload for job in freed] == [b"p4"]  # p2 and p3 were dropped


def test_unfinished_jobs_past_their_expiry_are_released() -> None:
    sender = _sender(window=1)
    sender.set_member(A, {"g": frozenset({"#"})}, 0.0)
    jobs = _publish(sender, 2, expires_at=5.0)
    assert len(jobs) == 1
    sender.prune(6.0)
    assert sender.idle()  # the unfinished one released, the held one dropped
    assert sender.counters["group_unfinished_expired"] == 1
    assert sender.set_member(A, {}, 6.0) == []  # nothing redelivered after expiry


def test_a_refusal_naming_a_job_twice_gives_it_back_once() -> None:
    # A member (or an attacker in its name) may repeat a number in "gr": it raised KeyError.
    sender = _sender(window=10)
    for member in (A, B):
        sender.set_member(member, {"workers": frozenset({"jobs/#"})}, 0.0)
    [job] = _publish(sender, 1)
    other = B if job.member == A else A
    [again] = sender.refused(job.member, [job.number, job.number], 0.0)
    assert (again.number, again.member, again.redelivered) == (job.number, other, True)
    assert sender.counters["group_refused"] == 1
    assert sender.unfinished() == 1


def test_a_member_whose_send_queue_is_full_gets_nothing_more_until_room_frees() -> None:
    # Credit counts jobs not done; a member that never acknowledges also fills its send queue,
    # and one that joins many groups would get a job per group per message: room decides too.
    sender = _sender(window=100)
    full: set[EndpointId] = set()
    sender.room = lambda member, size: member not in full
    for member in (A, B):
        sender.set_member(member, {"workers": frozenset({"jobs/#"})}, 0.0)
    full.add(A)
    assert _by_member(_publish(sender, 6)) == {B: 6}  # A has credit, but no room
    full.add(B)
    assert _publish(sender, 4) == []  # nobody has room: held, in order
    assert sender.held() == 4
    assert sender.retry(0.0) == []  # still no room
    full.clear()
    again = sender.retry(0.0)  # room freed (the transport says so): they go, in order
    assert [job.sequence for job in again] == [1, 2, 3, 4]
    assert sender.held() == 0


def test_each_group_gets_each_message_once() -> None:
    sender = _sender()
    sender.set_member(A, {"one": frozenset({"#"}), "two": frozenset({"#"})}, 0.0)
    sender.set_member(B, {"two": frozenset({"#"})}, 0.0)
    jobs = _publish(sender, 4)
    assert Counter(job.group for job in jobs) == {"one": 4, "two": 4}
    assert {job.member for job in jobs if job.group == "one"} == {A}


# --- through the topics layer -------------------------------------------------------------------


def _peer(number: int, incarnation: int = 1) -> Peer:
    return Peer(EndpointId(number), incarnation, f"p{number}", f"10.0.0.{number}", 4000, 1.0)


class Node:
    def __init__(self, number: int, **groups: int) -> None:
        self.events: list[StackEvent] = []
        self.peer = _peer(number)
        self.topics = Topics(
            TopicsConfig(groups=GroupsConfig(**groups)),
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


class Net:
    """Nodes that carry every send to each other (in order, nothing lost)."""

    def __init__(self, *nodes: Node) -> None:
        self.nodes = {node.peer.endpoint_id: node for node in nodes}
        self.wire: list[bytes] = []
        for node in nodes:
            for other in nodes:
                if other is not node:
                    node.topics.peer_added(other.peer)
        self.run()

    def run(self, now: float = 0.0) -> None:
        while True:
            sends = [
                (node, send) for node in self.nodes.values() for send in node.topics.take_sends()
            ]
            if not sends:
                return
            for sender, (to, envelope, _) in sends:
                if to in self.nodes:
                    data = _joined(envelope)
                    self.wire.append(data)
                    self.nodes[to].topics.receive(sender.peer, data, now)

    def remove(self, gone: Node) -> None:
        del self.nodes[gone.peer.endpoint_id]
        for node in self.nodes.values():
            node.topics.peer_removed(gone.peer)
        self.run()


def _joined(message: Outbound) -> bytes:
    return message if isinstance(message, bytes) else b"".join(message)


def _publish_on(pub: Node, net: Net, count: int, topic: str = "jobs/a") -> None:
    for number in range(count):
        envelope, targets = pub.topics.publish(
            topic, "job", b"%d" % number, expires_at=100.0, now=0.0
        )
        for target in targets:
            net.nodes[target].topics.receive(pub.peer, _joined(envelope), 0.0)
    net.run()


def _finish(node: Node, messages: list[Message]) -> None:
    for message in messages:
        assert message.job is not None
        node.topics.done(message.source_id, message.job, 0.0)


def test_members_share_a_stream_while_an_ordinary_subscriber_gets_all_without_gaps() -> None:
    pub, w1, w2, sub = Node(1), Node(2), Node(3), Node(4)
    w1.topics.subscribe("jobs/#", "job", gaps=True, group="workers")
    w2.topics.subscribe("jobs/#", "job", gaps=True, group="workers")
    sub.topics.subscribe("jobs/#", "job", gaps=True)
    net = Net(pub, w1, w2, sub)
    assert pub.topics.subscribers("jobs/a") == (sub.peer.endpoint_id,)
    assert set(pub.topics.members("jobs/a", "workers")) == {2, 3}
    _publish_on(pub, net, 10)
    got1, got2 = w1.delivered(), w2.delivered()
    assert sorted(m.payload for m in got1 + got2) == sorted(b"%d" % n for n in range(10))
    assert len(got1) == len(got2) == 5
    assert all(m.group == "workers" and not m.redelivered for m in got1 + got2)
    assert [m.sequence for m in sub.delivered()] == list(range(1, 11))
    assert not [e for n in (w1, w2, sub) for e in n.events if isinstance(e, TopicGap)]
    assert pub.topics.group_jobs() == (10, 0)
    _finish(w1, got1)
    _finish(w2, got2)
    net.run()
    assert pub.topics.groups_idle()
    assert pub.topics.counters["group_done_received"] == 10
    dones = [orjson.loads(d.split(b"\n")[0]) for d in net.wire if d.startswith(b'{"gd"')]
    assert sorted(len(d["gd"]) for d in dones) == [5, 5]  # one batched message per member


def test_a_removed_members_jobs_are_redelivered_to_another_flagged() -> None:
    pub, w1, w2 = Node(1), Node(2), Node(3)
    for worker in (w1, w2):
        worker.topics.subscribe("jobs/#", "job", group="workers")
    net = Net(pub, w1, w2)
    _publish_on(pub, net, 6)
    got1, got2 = w1.delivered(), w2.delivered()
    _finish(w1, got1[:1])
    net.run()
    net.remove(w1)  # before its callback returned for the other two
    again = w2.delivered()
    assert [m.payload for m in again] == [m.payload for m in got1[1:]]
    assert all(m.redelivered for m in again)
    assert pub.topics.counters["group_redelivered"] == 2
    _finish(w2, got2 + again)
    net.run()
    assert pub.topics.groups_idle()


def test_a_member_that_left_the_group_refuses_and_another_gets_it() -> None:
    pub, w1, w2 = Node(1), Node(2), Node(3)
    ids = {node: node.topics.subscribe("jobs/#", "job", group="workers") for node in (w1, w2)}
    net = Net(pub, w1, w2)
    pub.topics.publish("jobs/a", "job", b"x", expires_at=100.0, now=0.0)
    (to, grouped, _), *_ = pub.topics.take_sends()
    member = net.nodes[to]
    # The member unsubscribes while the job is on its way: it refuses it when it arrives.
    member.topics.unsubscribe(ids[member])
    member.topics.receive(pub.peer, _joined(grouped), 0.0)
    assert member.delivered() == []
    net.run()
    other = w2 if member is w1 else w1
    assert [(m.payload, m.redelivered) for m in other.delivered()] == [(b"x", True)]


def test_a_local_member_takes_its_share_without_the_network() -> None:
    pub, w2 = Node(1, window=2), Node(2, window=2)
    pub.topics.subscribe("jobs/#", "job", group="workers")
    w2.topics.subscribe("jobs/#", "job", group="workers")
    net = Net(pub, w2)
    _publish_on(pub, net, 6)
    local, remote = pub.delivered(), w2.delivered()
    assert (len(local), len(remote)) == (2, 2)  # each one's window; two held
    _finish(pub, local)  # our own: credit frees at once, the held ones come here
    assert len(pub.delivered()) == 2
    assert pub.topics.group_jobs() == (4, 0)


def test_interest_with_groups_keeps_the_fields_older_peers_read() -> None:
    pub, w1 = Node(1), Node(2)
    w1.topics.subscribe("jobs/#", "job", group="workers")
    net = Net(pub, w1)
    heads = [orjson.loads(d.split(b"\n")[0]) for d in net.wire if d.startswith(b'{"i"')]
    full = next(h for h in heads if "gset" in h)
    assert full["set"] == []
    assert full["gset"] == [["workers", "jobs/#"]]
    w1.topics.subscribe("more", "job", group="workers")
    net.run()
    delta = orjson.loads(net.wire[-1].split(b"\n")[0])
    assert delta == {"i": 2, "add": [], "del": [], "gadd": [["workers", "more"]], "gdel": []}
    # A plain subscriber is not a member, and an ordinary publish reaches no member.
    assert pub.topics.subscribers("jobs/a") == ()
    _, targets = pub.topics.publish("jobs/a", "job", b"x", expires_at=9.0, now=0.0)
    assert targets == ()
    assert b'"g":"workers"' in _joined(pub.topics.take_sends()[0][1])


def _protocol_examples() -> list[bytes]:
    """The JSON lines of the ``Work queues`` part of docs/PROTOCOL.md, in order."""
    text = (Path(__file__).parents[2] / "docs" / "PROTOCOL.md").read_text(encoding="utf-8")
    part = text[text.index("\n### Work queues") : text.index("\n### Topic examples")]
    blocks = re.findall(r"```json\n(.*?)```", part, re.DOTALL)
    return [line.encode() for block in blocks for line in block.splitlines()]


def test_the_protocol_examples_are_taken_as_the_text_says() -> None:
    full, delta, job, again, done, refused = _protocol_examples()
    pub, member = Node(1), Node(2)
    member.topics.subscribe("jobs/#", "job", group="workers")
    pub.topics.peer_added(member.peer)
    pub.topics.receive(member.peer, full + b"\n", 0.0)
    pub.topics.receive(member.peer, delta + b"\n", 0.0)
    assert pub.topics.counters["interest_out_of_step"] == 0
    assert set(pub.topics.members("jobs/urgent", "workers")) == {member.peer.endpoint_id}
    member.topics.peer_added(pub.peer)
    member.topics.receive(pub.peer, job + b"\n{}", 0.0)
    member.topics.receive(pub.peer, again + b"\n{}", 0.0)
    got = member.delivered()
    assert [(m.sequence, m.group, m.redelivered, m.job) for m in got] == [
        (42, "workers", False, (1, 17)),
        (40, "workers", True, (1, 15)),
    ]
    assert orjson.loads(done) == {"gd": [15, 16, 17, 21]}
    assert orjson.loads(refused) == {"gr": [18]}
    pub.topics.receive(member.peer, done + b"\n", 0.0)  # jobs it never gave: stale
    assert pub.topics.counters["group_done_stale"] == 4
