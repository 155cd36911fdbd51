"""ModelSync driven by hand: explicit ``now``, messages moved between replicas by a helper."""

from __future__ import annotations

import logging
import random

import pycrdt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from glue.errors import UsageValueError
from glue.modelsync import (
    ModelChange,
    ModelConfig,
    ModelSync,
    Outgoing,
    decode_state_vector,
    inbox_topic,
    state_topic,
    update_topic,
)

NAME = "plant/state"
CONFIG = ModelConfig(announce_s=1.0, pull_timeout_s=5.0)


def replica(endpoint_id: int, now: float = 0.0, config: ModelConfig = CONFIG) -> ModelSync:
    return ModelSync(
        NAME,
        endpoint_id=endpoint_id,
        doc=pycrdt.Doc(client_id=endpoint_id * 1000),
        config=config,
        now=now,
    )


def recipients(out: Outgoing, sender: ModelSync, replicas: list[ModelSync]) -> list[ModelSync]:
    if out.topic.startswith("_model/to/"):
        target = int(out.topic.split("/")[2])
        return [r for r in replicas if r.endpoint_id == target]
    return [r for r in replicas if r is not sender]


def transfer(replicas: list[ModelSync], *, now: float = 0.0, rounds: int = 10) -> int:
    """Move every message to its recipients until nothing is left; returns how many moved."""
    moved = 0
    for _ in range(rounds):
        batch = [(r, out) for r in replicas for out in r.messages_to_send()]
        if not batch:
            return moved
        for sender, out in batch:
            for target in recipients(out, sender, replicas):
                target.receive(out.topic, sender.endpoint_id, out.payload, now=now)
                moved += 1
    return moved


def tick(replicas: list[ModelSync], now: float) -> None:
    for r in replicas:
        r.handle_timer(now=now)


def changes(sync: ModelSync) -> list[ModelChange]:
    found = []
    while (change := sync.next_event()) is not None:
        found.append(change)
    return found


def test_two_replicas_meet_pull_and_are_synced() -> None:
    a, b = replica(1), replica(2)
    a.root["x"] = 1
    first = a.messages_to_send()
    assert [o.topic for o in first] == [state_topic(NAME), update_topic(NAME)]
    assert first[0].retain
    assert not first[1].retain
    assert b.unsynced([1]) == [1]
    for out in first:
        b.receive(out.topic, 1, out.payload, now=0.0)
    pulls = b.messages_to_send()
    # b met a: an announcement then its pull to a's inbox
    assert [o.topic for o in pulls] == [state_topic(NAME), inbox_topic(NAME, 1)]
    for out in pulls:
        a.receive(out.topic, 2, out.payload, now=0.0)
    transfer([a, b])
    assert a.root.to_py() == b.root.to_py() == {"x": 1.0}
    assert b.unsynced([1]) == []
    assert a.unsynced([2]) == []
    assert b.counters["pulls_sent"] == 1
    assert a.counters["replies_sent"] == 1


def test_changes_say_local_or_remote_and_which_keys() -> None:
    a, b = replica(1), replica(2)
    transfer([a, b])
    changes(a), changes(b)
    with a.doc.transaction():
        a.root["config"] = pycrdt.Map({"rate": 5})
        a.root["notes"] = pycrdt.Text("hi")
    transfer([a, b])
    (local,) = changes(a)
    (remote,) = changes(b)
    assert local.local
    assert local.source_id == 1
    assert local.keys == ("config", "notes")
    assert not remote.local
    assert remote.source_id == 1
    assert remote.keys == ("config", "notes")
    b.root["config"]["rate"] = 6  # nested: reported under its root key
    transfer([a, b])
    assert [c.keys for c in changes(a)] == [("config",)]
    reread = pycrdt.Doc()
    reread.apply_update(local.update)
    assert reread.get("root", type=pycrdt.Map).to_py()["notes"] == "hi"


def test_concurrent_edits_merge_the_same_everywhere() -> None:
    a, b, c = replica(1), replica(2), replica(3)
    a.root["list"] = pycrdt.Array([])
    a.root["text"] = pycrdt.Text("")
    transfer([a, b, c])
    for i, r in enumerate((a, b, c)):
        r.root["same"] = i
        r.root["list"].append(i)
        r.root["text"].insert(0, f"<{i}>")
    transfer([a, b, c])
    assert a.root.to_py() == b.root.to_py() == c.root.to_py()
    assert sorted(a.root.to_py()["list"]) == [0.0, 1.0, 2.0]


def test_local_updates_are_merged_up_to_the_size_bound() -> None:
    a = replica(1, config=ModelConfig(max_update_bytes=200))
    a.messages_to_send()
    for i in range(50):
        a.root[f"k{i}"] = "x" * 20
    updates = [o for o in a.messages_to_send() if o.topic == update_topic(NAME)]
    assert 1 < len(updates) < 50
    assert all(len(o.payload) < 400 for o in updates)
    b = replica(2)
    for o in updates:
        b.receive(o.topic, 1, o.payload, now=0.0)
    assert len(b.root.to_py()) == 50


def test_a_lost_delete_is_repaired_by_the_next_announcement() -> None:
    a, b = replica(1), replica(2)
    a.root["k"] = 1
    transfer([a, b])
    del a.root["k"]  # moves no state vector: only the delete-set digests differ
    lost = a.messages_to_send()
    assert [o.topic for o in lost] == [update_topic(NAME)]
    assert b.root.to_py() == {"k": 1.0}
    tick([a, b], 1.0)
    transfer([a, b], now=1.0)
    assert b.root.to_py() == a.root.to_py() == {}


def test_a_lost_update_is_pulled_after_the_next_announcement() -> None:
    a, b = replica(1), replica(2)
    transfer([a, b])
    a.root["k"] = 1
    a.messages_to_send()  # lost
    tick([a, b], 1.0)
    transfer([a, b], now=1.0)
    assert b.root.to_py() == {"k": 1.0}


def test_in_step_replicas_announce_and_do_nothing_more() -> None:
    a, b = replica(1), replica(2)
    a.root["k"] = 1
    transfer([a, b])
    pulls = b.counters["pulls_sent"]
    tick([a, b], 1.0)
    assert transfer([a, b], now=1.0) == 2  # one announcement each way
    assert b.counters["pulls_sent"] == pulls


def test_a_removed_peer_is_met_again_and_pulled_from() -> None:
    a, b = replica(1), replica(2)
    transfer([a, b])
    assert a.unsynced([2]) == []
    a.peer_removed(2)
    assert a.unsynced([2]) == [2]
    b.root["while-away"] = True
    b.messages_to_send()  # lost: a had removed b
    tick([a, b], 1.0)
    transfer([a, b], now=1.0)
    assert a.unsynced([2]) == []
    assert a.root.to_py() == {"while-away": True}


def test_an_unanswered_pull_times_out_and_is_sent_again() -> None:
    a, b = replica(1), replica(2)
    for out in a.messages_to_send():
        b.receive(out.topic, 1, out.payload, now=0.0)
    assert any(o.topic == inbox_topic(NAME, 1) for o in b.messages_to_send())  # lost
    assert b.next_deadline() == 1.0  # the next announcement comes before the timeout
    tick([a, b], 1.0)
    transfer([a, b], now=1.0)
    assert b.unsynced([1]) == [1]  # the announcement found the pull still awaited
    b.handle_timer(now=5.0)
    assert b.counters["pulls_timed_out"] == 1
    tick([a, b], 6.0)
    transfer([a, b], now=6.0)
    assert b.unsynced([1]) == []


BAD = [
    (state_topic(NAME), b"no header"),
    (state_topic(NAME), b"[1]\n"),
    (state_topic(NAME), b'{"k":"z"}\nxx'),
    (state_topic(NAME), b'{"k":"a"}\n\x00'),  # no digest
    (state_topic(NAME), b'{"k":"a","d":"00"}\n\x05\x01'),  # truncated state vector
    (update_topic(NAME), b'{"k":"u"}\ngarbage\xff\xff'),
    (update_topic(NAME), b'{"k":"u"}\n'),
    (inbox_topic(NAME, 1), b'{"k":"p","n":1}\n\xff\xff\xff'),
    (inbox_topic(NAME, 1), b'{"k":"p"}\n\x00'),
    (inbox_topic(NAME, 1), b'{"k":"r","n":"x"}\n\x00\x00'),
    (inbox_topic(NAME, 1), b'{"k":"r","n":1}\n\x01\x01\x05\x00'),
    (update_topic(NAME), b'{"k":"p","n":1}\n\x00'),  # a pull on the update topic
]


@pytest.mark.parametrize(("topic", "payload"), BAD)
def test_malformed_messages_are_dropped_counted_and_logged_at_debug(
    topic: str, payload: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    a = replica(1)
    a.root["k"] = 1
    a.messages_to_send()
    before = a.doc.get_update()
    with caplog.at_level(logging.DEBUG, logger="glue.modelsync"):
        a.receive(topic, 2, payload, now=0.0)
    dropped = {k: v for k, v in a.counters.items() if k.startswith("dropped_")}
    assert sum(dropped.values()) == 1, dropped
    assert a.doc.get_update() == before
    assert a.messages_to_send() == []
    assert any(r.levelno == logging.DEBUG and "dropped" in r.message for r in caplog.records)


def test_random_bytes_never_raise() -> None:
    rng = random.Random(5)
    a = replica(1)
    a.root["k"] = pycrdt.Array([1, 2])
    good = a.doc.get_update()
    topics = [state_topic(NAME), update_topic(NAME), inbox_topic(NAME, 1)]
    for i in range(2000):
        body = bytearray(good)
        for _ in range(rng.randint(1, 3)):
            body[rng.randrange(len(body))] = rng.randrange(256)
        kind = rng.choice(
            [b'{"k":"u"}', b'{"k":"r","n":1}', b'{"k":"p","n":1}', b'{"k":"a","d":"0"}']
        )
        a.receive(rng.choice(topics), 2 + i % 3, kind + b"\n" + bytes(body), now=0.0)
    a.messages_to_send()
    assert decode_state_vector(a.doc.get_state())


def test_own_messages_delivered_locally_are_ignored() -> None:
    a = replica(1)
    for out in a.messages_to_send():
        a.receive(out.topic, 1, out.payload, now=0.0)
    assert a.messages_to_send() == []
    assert not a.counters["received_announce"]


def test_decode_state_vector() -> None:
    doc = pycrdt.Doc(client_id=300)
    doc.get("root", type=pycrdt.Map)["x"] = 1
    assert decode_state_vector(doc.get_state()) == {300: 1}
    assert decode_state_vector(b"\x00") == {}
    for bad in (b"", b"\x01", b"\x01\x01", b"\x00\x00", b"\x80" * 11, b"\x7f\x01\x01"):
        with pytest.raises(ValueError, match=r"varuint|clients|trailing"):
            decode_state_vector(bad)


def test_model_names_leave_room_for_the_topic_prefix() -> None:
    with pytest.raises(UsageValueError):
        replica_named("a" * 201)
    with pytest.raises(UsageValueError):
        replica_named("bad name")
    assert replica_named("a" * 200).name == "a" * 200


def replica_named(name: str) -> ModelSync:
    return ModelSync(name, endpoint_id=1, doc=pycrdt.Doc(), config=CONFIG, now=0.0)


EDIT = st.tuples(
    st.integers(0, 2),  # replica
    st.sampled_from(["set", "delete", "insert", "text"]),
    st.integers(0, 9),
)
FATE = st.sampled_from(["deliver", "deliver", "deliver", "lose", "duplicate", "delay"])


@settings(max_examples=150, deadline=None)
@given(edits=st.lists(EDIT, max_size=40), fates=st.lists(FATE, min_size=1, max_size=60))
def test_any_edits_and_message_fates_converge_after_announcements(
    edits: list[tuple[int, str, int]], fates: list[str]
) -> None:
    replicas = [replica(1), replica(2), replica(3)]
    replicas[0].root["list"] = pycrdt.Array([])
    replicas[0].root["text"] = pycrdt.Text("")
    transfer(replicas)
    delayed: list[tuple[ModelSync, Outgoing]] = []
    fate_index = 0
    for who, op, n in edits:
        root = replicas[who].root
        if op == "set":
            root[f"k{n}"] = n
        elif op == "delete" and f"k{n}" in root:
            del root[f"k{n}"]
        elif op == "insert" and "list" in root:
            items = root["list"]
            items.insert(min(n, len(items)), n)
        elif "text" in root:
            text = root["text"]
            text.insert(min(n, len(text)), str(n))
        for sender in replicas:
            for out in sender.messages_to_send():
                fate = fates[fate_index % len(fates)]
                fate_index += 1
                copies = {"deliver": 1, "lose": 0, "duplicate": 2, "delay": 0}[fate]
                if fate == "delay":
                    delayed.append((sender, out))
                for target in recipients(out, sender, replicas):
                    for _ in range(copies):
                        target.receive(out.topic, sender.endpoint_id, out.payload, now=0.0)
    for sender, out in reversed(delayed):
        for target in recipients(out, sender, replicas):
            target.receive(out.topic, sender.endpoint_id, out.payload, now=0.0)
    for second in (1.0, 2.0):  # announcements, and what they make the replicas pull
        tick(replicas, second)
        transfer(replicas, now=second)
    states = [r.root.to_py() for r in replicas]
    assert states[0] == states[1] == states[2]


def test_a_newcomer_pulls_from_one_holder_at_a_time_and_gets_the_document_once() -> None:
    holders = [replica(1), replica(2), replica(3)]
    holders[0].root["text"] = pycrdt.Text("x" * 5000)
    transfer(holders)
    newcomer = replica(4)
    newcomer.messages_to_send()
    for holder in holders:  # all three announcements arrive before any reply
        for out in holder.messages_to_send():
            newcomer.receive(out.topic, holder.endpoint_id, out.payload, now=0.0)
        tick([holder], 1.0)
        for out in holder.messages_to_send():
            newcomer.receive(out.topic, holder.endpoint_id, out.payload, now=1.0)
    assert newcomer.counters["pulls_sent"] == 1
    assert newcomer.unsynced([1, 2, 3]) == [1, 2, 3]
    transfer([*holders, newcomer], now=1.0)
    assert newcomer.counters["pulls_sent"] == 3
    assert newcomer.unsynced([1, 2, 3]) == []
    assert newcomer.root.to_py() == holders[0].root.to_py()
    assert 5000 < newcomer.counters["reply_bytes_received"] < 6000


class PanicException(BaseException):
    """What pyo3 raises when Rust panics (it derives from BaseException)."""


class PanickingEvent:
    @property
    def path(self) -> list[str]:
        return []

    @property
    def keys(self) -> dict[str, object]:
        raise PanicException("called `Option::unwrap()` on a `None` value")


def test_a_panic_of_yrs_while_reading_an_event_leaves_keys_unknown() -> None:
    a = replica(1)
    a.messages_to_send()
    a._on_deep([PanickingEvent()])  # as Yrs would call it during the next commit
    a.root["x"] = 1
    (change,) = changes(a)
    assert change.keys is None
    assert a.counters["change_keys_unknown"] == 1
    assert [o.topic for o in a.messages_to_send()] == [update_topic(NAME)]  # still sent
    a.root["y"] = 2
    assert changes(a)[0].keys == ("y",)


def test_announcements_of_absent_holders_are_ignored() -> None:
    a, gone = replica(1), replica(2)
    announcement = gone.messages_to_send()[0]
    a.set_holders([3])  # replayed by a keeper: its publisher, 2, holds nothing any more
    a.receive(announcement.topic, 2, announcement.payload, now=0.0)
    assert a.counters["announcements_from_absent_holders"] == 1
    assert [o.topic for o in a.messages_to_send()] == [state_topic(NAME)]  # no pull
    assert a.unsynced([3]) == [3]
    a.set_holders([2, 3])
    a.receive(announcement.topic, 2, announcement.payload, now=0.0)
    assert a.counters["pulls_sent"] == 1


def test_pull_numbers_start_at_random_when_given_a_generator() -> None:
    a = ModelSync(
        NAME, endpoint_id=1, doc=pycrdt.Doc(), config=CONFIG, now=0.0, rng=random.Random(3)
    )
    b = replica(2)
    for out in b.messages_to_send():
        a.receive(out.topic, 2, out.payload, now=0.0)
    pull = next(o for o in a.messages_to_send() if o.topic == inbox_topic(NAME, 2))
    first = random.Random(3).getrandbits(31) + 1
    assert pull.payload.startswith(b'{"k":"p","n":%d}' % first)


def test_an_overdue_pull_holds_up_the_others_for_two_announcement_periods_only() -> None:
    one, two, newcomer = replica(1), replica(2), replica(4)
    two.root["from-two"] = True
    announcements = {r.endpoint_id: r.messages_to_send()[0] for r in (one, two)}
    newcomer.messages_to_send()
    first = announcements[1]
    newcomer.receive(first.topic, 1, first.payload, now=0.0)
    assert newcomer.counters["pulls_sent"] == 1
    newcomer.messages_to_send()  # the pull to 1 is lost (one way cut, say)
    second = announcements[2]
    newcomer.receive(second.topic, 2, second.payload, now=0.5)
    assert newcomer.counters["pulls_sent"] == 1  # deferred behind the pull to 1
    newcomer.handle_timer(now=1.0)
    assert newcomer.counters["pulls_sent"] == 1
    newcomer.handle_timer(now=2.0)  # two periods after the pull to 1: 2 is pulled
    assert newcomer.counters["pulls_sent"] == 2
    transfer([two, newcomer], now=2.0)
    assert newcomer.root.to_py() == {"from-two": True}
    assert newcomer.unsynced([1, 2]) == [1]
