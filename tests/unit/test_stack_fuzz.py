"""Hostile datagrams that decode: three stacks (a publisher, a subscriber and an attacker that
is a peer of both) exchange real traffic while the attacker sends well-formed datagrams and
messages meant to hurt. Nothing may raise, memory must stay bounded, and the real stream must
arrive whole, once and in order, when the attacker cannot send from the publisher's own address.

What the attacker sends:

- transport and discovery frames (Skips and data far ahead, acks for frames never sent,
  fragments with inconsistent totals, announcements with extreme values, goodbyes, fake peers by
  the hundred), in its own name or the publisher's, from its own address or a forged one;
- envelopes (``docs/PROTOCOL.md``, "Topics layer") that travel in data frames, both on its real
  stream (bundled with good messages, or fragmented when large) and in frames forged with
  repeated or absurd sequence numbers: topic messages (``t y s w``, origins ``o`` naming the
  receiver, a live peer or nobody, retained ``r``), interest (``i set add del sv sva svd gset
  gadd gdel ask``, thousands of patterns), jobs (``g j rd``) for groups nobody has, dones and
  refusals (``gd gr``) for jobs never given, requests (``t q d``) with past or absurd deadlines,
  replies (``t a e n``) to requests never made, direct messages (``y w``), with wrong types,
  missing keys, huge or negative numbers, long names, deep nesting, invalid JSON.

One run uses a fixed seed, one a new seed each time (printed, and in the failure message: replay
it with ``GLUE_FUZZ_SEED=N``; that variable is read here only).
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest

from glue import wire
from glue.events import Message, MessageReceived, RequestArrived, TopicDelivery
from glue.groups import GroupsConfig
from glue.requests import MAX_PENDING
from glue.stack import Stack
from glue.topics import DIRECT_ENVELOPE, TopicsConfig
from glue.wire import Ack, Announce, Data, EndpointId, Goodbye, Header, Skip
from tests.unit.test_stack import A, B, _address, _stack

FIXED_SEED = 20261205
STEPS = 400
#: The random run goes on longer: each new seed is worth more (about 3 s).
RANDOM_STEPS = 1200
DEAF = (100, 250)  # steps during which the attacker acknowledges nothing
ATTACKER: tuple[str, int] = ("10.0.0.66", 6666)
M = EndpointId(3)  # the attacker as a peer: announced, proven, with real streams to A and B
#: Small bounds, so that the attacker can reach them within a run.
TOPICS = TopicsConfig(
    max_streams=500,
    max_peer_patterns=300,
    history_max_bytes=200_000,
    kept_max_bytes=100_000,
    groups=GroupsConfig(window=8, hold_bytes=100_000, max_groups=4),
)
REAL_TOPIC = "real/x"
JOB_TOPIC = "jobs/a"
NAMES = [REAL_TOPIC, JOB_TOPIC, "svc/x", "kept/k", "other", "a/b/c"]
QUEUE_BYTES = 1024 * 1024
CONTROL_SLACK_BYTES = 64 * 1024
GROUPS = ["workers", "nobody", "w.2"]

# --- hostile values ---------------------------------------------------------------------------

_NUMBERS: list[object] = [0, 1, -1, 2, 7, 2**31, 2**53, 2**63 - 1, -(2**63), 2**64 - 1]
_FLOATS: list[object] = [0.0, -0.0, 1.5, -1.5, 1e308, -1e308, 5e-324, 86400.0, 86400.5]
_OTHERS: list[object] = [None, True, False, "", "1", "x" * 300, [], [1, 2], {}, {"a": 1}, [[[]]]]
#: Envelope lines orjson refuses or that are no object: NaN and Infinity are not JSON.
_BAD_LINES = [
    b"",
    b"{",
    b"[]",
    b"null",
    b'"t"',
    b"123",
    b'{"t":NaN,"s":1,"w":1}',
    b'{"w":Infinity}',
    b'{"i":-Infinity,"set":[]}',
    b'{"t":"real/x","s":1,"w":1}\x00',
    b'{"t":"\xff\xfe","s":1,"y":"r","w":1}',
    b'{"q":' + b"[" * 2000 + b"]" * 2000 + b"}",  # deeper than orjson parses
    b'{"t":' + b"[" * 500 + b"]" * 500 + b',"s":1,"y":"r","w":1.0}',
    b'{"t":"real/x","s":99999999999999999999999,"y":"r","w":1.0}',  # beyond 64 bits
]


def _hostile_value(rng: random.Random) -> object:
    pool = rng.choice([_NUMBERS, _FLOATS, _OTHERS])
    return rng.choice(pool)


def _name(rng: random.Random) -> object:
    roll = rng.random()
    if roll < 0.6:
        return rng.choice(NAMES)
    if roll < 0.7:
        return "a" * rng.choice([256, 257, 5000])
    if roll < 0.8:
        return rng.choice(["a//b", "/a", "a/", "#", "a/#", "+", "a b", "é", "$x", "a/+/c"])
    return _hostile_value(rng)


def _patterns(rng: random.Random, count: int | None = None) -> object:
    if rng.random() < 0.15:
        return _hostile_value(rng)
    if count is None:
        count = rng.choice([0, 1, 3, 3, 3, 1000, 12_000]) if rng.random() < 0.1 else 3
    found: list[object] = [f"p{rng.randrange(10**6)}/{n}" for n in range(count)]
    for _ in range(rng.randrange(0, 4)):
        found.append(rng.choice(["#", REAL_TOPIC, "real/#", "jobs/#", "svc/#", "kept/#", "+/x"]))
    if rng.random() < 0.1:
        found.append(_name(rng))  # perhaps invalid: the whole message is dropped
    return found


def _pairs(rng: random.Random) -> object:
    if rng.random() < 0.15:
        return _hostile_value(rng)
    if rng.random() < 0.05:
        return [[f"g{n}", "jobs/#"] for n in range(rng.choice([1500, 12_000]))]
    pairs: list[object] = [[rng.choice(GROUPS), rng.choice(["jobs/#", "#", JOB_TOPIC])]]
    if rng.random() < 0.1:
        pairs.append(rng.choice([["workers"], ["workers", "#", "x"], "workers", [1, "#"]]))
    return pairs


@dataclass
class _Context:
    """What the attacker knows of its victims, to make messages that almost make sense."""

    ids: list[int]
    incarnations: list[int]
    requests: list[int] = field(default_factory=lambda: [1])
    jobs: list[int] = field(default_factory=lambda: [1])


def _int_like(rng: random.Random, known: list[int]) -> object:
    roll = rng.random()
    if roll < 0.5:
        return rng.choice(known) + rng.choice([0, 0, 0, 1, -1])
    if roll < 0.8:
        return rng.choice(_NUMBERS)
    return _hostile_value(rng)


def _topic_message(rng: random.Random, ctx: _Context) -> dict[str, object]:
    head: dict[str, object] = {
        "t": _name(rng),
        "y": rng.choice(["r", "job", "any"]) if rng.random() < 0.8 else _name(rng),
        "s": _int_like(rng, [1, 2, 3, 50]),
        "w": rng.choice([1.7e9, 0, -1.0, *_FLOATS]) if rng.random() < 0.8 else _hostile_value(rng),
    }
    if rng.random() < 0.4:  # an origin: the receiver, a live peer, nobody known, or malformed
        origin: object = [
            rng.choice(ctx.ids) if rng.random() < 0.8 else _int_like(rng, ctx.ids),
            rng.choice(ctx.incarnations) if rng.random() < 0.8 else _hostile_value(rng),
            rng.choice(["n1", "n2", "gone", "x" * 256, ""]),
        ]
        if rng.random() < 0.1:
            origin = rng.choice([origin[:2], [*origin, 1], _hostile_value(rng)])
        head["o"] = origin
    if rng.random() < 0.3:  # retained, perhaps with a negative or absurd time to live
        head["r"] = rng.choice([-5.0, 0, 1e-9, 3.5, 86400, 86401, 1e308, *_OTHERS[:4]])
    return head


def _interest(rng: random.Random, ctx: _Context) -> dict[str, object]:
    head: dict[str, object] = {"i": _int_like(rng, [0, 1, 2, 3, 5, 100])}
    if rng.random() < 0.5:
        head["set"] = _patterns(rng)
        if rng.random() < 0.5:
            head["sv"] = _patterns(rng)
        if rng.random() < 0.5:
            head["gset"] = _pairs(rng)
    else:
        head["add"] = _patterns(rng)
        head["del"] = _patterns(rng, rng.choice([0, 1, 3]))
        for key in ("sva", "svd"):
            if rng.random() < 0.4:
                head[key] = _patterns(rng)
        for key in ("gadd", "gdel"):
            if rng.random() < 0.4:
                head[key] = _pairs(rng)
    if rng.random() < 0.3:
        head["ask"] = rng.choice([True, True, 1, "yes", None])
    return head


def _job(rng: random.Random, ctx: _Context) -> dict[str, object]:
    head = _topic_message(rng, ctx)
    head.pop("o", None)
    head["t"] = rng.choice([JOB_TOPIC, JOB_TOPIC, *NAMES]) if rng.random() < 0.8 else _name(rng)
    head["y"] = rng.choice(["job", "job", "r"])
    head["g"] = rng.choice(GROUPS) if rng.random() < 0.8 else _name(rng)
    head["j"] = _int_like(rng, ctx.jobs)
    if rng.random() < 0.3:
        head["rd"] = rng.choice([True, 1, "true"])
    return head


def _done(rng: random.Random, ctx: _Context) -> dict[str, object]:
    head: dict[str, object] = {}
    for key in ("gd", "gr"):
        if rng.random() < 0.6:
            if rng.random() < 0.8:
                count = rng.choice([1, 2, 5, 3000])
                head[key] = [_int_like(rng, ctx.jobs) for _ in range(count)]
                if rng.random() < 0.1:
                    head[key] = [*head[key], _hostile_value(rng)]  # type: ignore[misc]
            else:
                head[key] = _hostile_value(rng)
    return head or {"gd": []}


def _request(rng: random.Random, ctx: _Context) -> dict[str, object]:
    head: dict[str, object] = {"t": _name(rng) if rng.random() < 0.3 else "svc/x"}
    head["q"] = _int_like(rng, [1, 2, 3])
    head["d"] = rng.choice([0, 1, 200, 86_400_000, 86_400_001, -1, 2**63 - 1, 1.5, None, "5"])
    return head


def _reply(rng: random.Random, ctx: _Context) -> dict[str, object]:
    head: dict[str, object] = {"t": _name(rng) if rng.random() < 0.3 else "svc/x"}
    head["a"] = _int_like(rng, ctx.requests)
    if rng.random() < 0.3:
        head["e"] = rng.choice(["ValueError", "", "E" * 5000, None, 3, ["x"]])
    if rng.random() < 0.3:
        head["n"] = rng.choice([True, False, 1, None])
    return head


def _direct(rng: random.Random, ctx: _Context) -> dict[str, object]:
    head: dict[str, object] = {}
    if rng.random() < 0.7:
        head["y"] = rng.choice(["note", "a/b", ""]) if rng.random() < 0.5 else _name(rng)
    if rng.random() < 0.8:
        head["w"] = rng.choice([1.7e9, *_NUMBERS, *_FLOATS]) if rng.random() < 0.7 else "x"
    return head


_KINDS: list[Callable[[random.Random, _Context], dict[str, object]]] = [
    _topic_message,
    _topic_message,
    _interest,
    _interest,
    _job,
    _done,
    _request,
    _reply,
    _direct,
]


def _envelope(rng: random.Random, ctx: _Context) -> bytes:
    """One hostile message: an envelope line (perhaps with keys missing or mangled), a body."""
    body = rng.randbytes(rng.choice([0, 0, 10, 2000, 70_000]))
    if rng.random() < 0.08:
        return rng.choice(_BAD_LINES) + b"\n" + body
    head: dict[str, Any] = rng.choice(_KINDS)(rng, ctx)
    if head and rng.random() < 0.15:
        del head[rng.choice(list(head))]  # a key missing
    if rng.random() < 0.1:
        head[rng.choice(["t", "s", "i", "q", "a", "g", "o", "w", "y"])] = _hostile_value(rng)
    return orjson.dumps(head) + b"\n" + body


# --- hostile datagrams -------------------------------------------------------------------------


def _hostile(
    rng: random.Random, victim: Stack, named: Stack, ctx: _Context
) -> tuple[bytes, tuple[str, int]]:
    """One decodable datagram aimed at ``victim``, mostly in ``named``'s name."""
    config = named.config.discovery
    victim_incarnation = victim.config.discovery.incarnation
    fake = EndpointId(rng.choice([int(config.endpoint_id), rng.randrange(3, 2**53)]))
    incarnation = rng.choice([config.incarnation, config.incarnation + 1, 2**53 - 1, 0])
    header = Header(1, fake, incarnation, destination=rng.choice([victim_incarnation, 0, 7]))
    big = rng.choice([2**63 - 1, 10**15, rng.randrange(1, 5000)])
    kind = rng.randrange(8)
    if kind == 0:
        frames: list[wire.Frame] = [Skip(big)]
    elif kind == 1:
        frames = [Data(big, _envelope(rng, ctx)[:1400], 60_000)]
    elif kind == 2:
        frames = [Ack(big, ((big + 2, big + 5),)) if big < 2**62 else Ack(big)]
    elif kind == 3:
        parts = rng.choice([2, 3, 1000, 65535])
        frames = [
            Data(rng.randrange(1, 3000), rng.randbytes(1200), 60_000, rng.randrange(parts), parts)
        ]
    elif kind == 4:
        frames = [
            Announce(
                fake,
                incarnation,
                rng.choice([config.name, "x" * 200, f"fake{rng.randrange(10**6)}"]),
                rng.choice(["", "10.0.0.66", "255.255.255.255"]),
                rng.choice([1, 65535, 40001]),
                rng.choice([1, 3_600_000, 1000]),
                ask=rng.random() < 0.3,
                forwarded=rng.random() < 0.3,
                age_ms=rng.choice([0, 86_400_000]),
                interest=rng.choice([0, 1, 2**31]),
                peers_digest=rng.randrange(2**53),
            )
        ]
    elif kind == 5:
        frames = [Goodbye()]
    elif kind == 6:
        frames = [Skip(big), Data(big, DIRECT_ENVELOPE + b"FORGED", 60_000)]
    else:  # a bundle of good and bad messages, in a frame of its own numbering
        messages = [
            _envelope(rng, ctx)[:300] if rng.random() < 0.6 else b'{"w":1.0}\nok'
            for _ in range(rng.randrange(1, 6))
        ]
        lengths = tuple((len(m), rng.choice([60_000, 1, 0])) for m in messages)
        frames = [Data(big, b"".join(messages), 60_000, messages=lengths)]
    return wire.encode(header, frames), ATTACKER


def _forged_stream(rng: random.Random, attacker: Stack, victim: Stack, ctx: _Context) -> bytes:
    """A data frame in the attacker's own name, from its own address, with a sequence number
    that repeats one already used, or runs ahead of its real stream."""
    config = attacker.config.discovery
    header = Header(1, config.endpoint_id, config.incarnation, victim.config.discovery.incarnation)
    seq = rng.choice([1, 2, 3, rng.randrange(1, 200), rng.randrange(1, 5000)])
    messages = [_envelope(rng, ctx)[:400] for _ in range(rng.randrange(1, 4))]
    if len(messages) == 1:
        return wire.encode(header, [Data(seq, messages[0], 60_000)])
    lengths = tuple((len(m), 60_000) for m in messages)
    return wire.encode(header, [Data(seq, b"".join(messages), 60_000, messages=lengths)])


# --- the run -----------------------------------------------------------------------------------


def _trio() -> tuple[Stack, Stack, Stack]:
    """A publisher, a subscriber (member of a group, serving a name, keeping a topic) and an
    attacker, each known to the others."""
    a, b, m = (_stack(n, 65507, topics=TOPICS, seed=n, queue_bytes=QUEUE_BYTES) for n in (A, B, M))
    for sender in (a, b, m):
        config = sender.config.discovery
        announce = Announce(
            config.endpoint_id, config.incarnation, config.name, config.host, config.port, 1000
        )
        header = Header(1, config.endpoint_id, config.incarnation)
        for receiver in (a, b, m):
            if receiver is not sender:
                receiver.receive_datagram(
                    wire.encode(header, [announce]), _address(sender), multicast=True, now=0.0
                )
    b.subscribe("real/#", "r")
    b.subscribe("jobs/#", "job", group="workers")
    b.subscribe("#", "any")
    b.requests.serve("svc/#")
    b.topics.serve("svc/#")
    b.topics.keep("kept/#", 3)
    a.subscribe("other", "any")
    stacks = {_address(s): s for s in (a, b, m)}
    for _ in range(3):  # interest goes round before the traffic starts
        for sender in (a, b, m):
            for data, address in sender.datagrams_to_send(now=0.0):
                stacks[address].receive_datagram(data, _address(sender), multicast=False, now=0.0)
    for stack in (a, b, m):
        while stack.next_event() is not None:
            pass
    assert B in a.topics.subscribers(REAL_TOPIC)
    return a, b, m


def _check_bounds(stack: Stack, seed: int) -> None:
    """Whatever arrived, every structure the attacker can grow stays under its bound."""
    assert stack.reassembler.buffered_bytes <= stack.reassembler.max_total_bytes
    assert len(stack.discovery.peers()) <= stack.config.discovery.max_peers
    topics = stack.topics
    config = topics.config
    for peer, interest in topics._interest.items():
        assert len(interest.patterns) <= config.max_peer_patterns, f"seed {seed}: {peer}"
        assert len(interest.groups) <= config.max_peer_patterns, f"seed {seed}: {peer}"
    gauges = topics.gauges()
    assert gauges["streams_followed"] <= config.max_streams, f"seed {seed}"
    assert len(topics._ahead) <= config.max_streams, f"seed {seed}"
    assert len(topics._passed) <= config.max_streams, f"seed {seed}"
    assert gauges["kept_bytes"] <= config.kept_max_bytes, f"seed {seed}"
    assert gauges["history_bytes"] <= config.history_max_bytes, f"seed {seed}"
    groups = topics._groups
    assert gauges["group_jobs_held_bytes"] <= groups.config.hold_bytes, f"seed {seed}"
    assert all(n <= groups.config.window for n in groups._load.values()), f"seed {seed}"
    # Groups without members by max_groups; those with members by each peer's memberships.
    assert len(groups._patterns) <= groups.config.max_groups + len(groups._members)
    assert len(groups._members) <= (len(topics._interest) + 1) * config.max_peer_patterns
    assert len(groups._load) <= len(groups._jobs) + sum(map(len, groups._members.values()))
    assert stack.requests.pending() <= MAX_PENDING
    # The application's messages wait for room (offer); the layers' own (interest, jobs, dones,
    # replies) are queued regardless, a few at a time.
    for peer in stack.transport.peers():
        queued = stack.transport.peer_gauges(peer)["queued_bytes"]
        assert queued <= QUEUE_BYTES + CONTROL_SLACK_BYTES, f"seed {seed}: {queued} to {peer}"


@dataclass
class _Received:
    direct: list[bytes] = field(default_factory=list)
    topic: list[Message] = field(default_factory=list)


def _drain(stack: Stack, now: float, got: _Received | None, requests: dict[int, float]) -> None:
    """Handle a stack's events as a runtime would (replies, dones), keeping what A sent B."""
    while (event := stack.next_event()) is not None:
        if isinstance(event, MessageReceived):
            if got is not None and event.source.endpoint_id == A:
                got.direct.append(event.payload)
        elif isinstance(event, TopicDelivery):
            for message in event.messages:
                if message.job is not None:
                    stack.topics.done(message.source_id, message.job, now)
                elif got is not None and message.source_id == A:
                    got.topic.append(message)
        elif isinstance(event, RequestArrived):
            send = stack.requests.reply(event.request, b"answer", error=None, now=now)
            if send is not None:
                peer, reply, expires_at = send
                stack.send(peer, reply, expires_at=expires_at, now=now)
    for request_id, deadline in list(requests.items()):
        if now >= deadline:
            stack.requests.close(request_id)
            del requests[request_id]


def _run(seed: int, *, spoofed: bool, steps: int = STEPS) -> None:
    rng = random.Random(seed)
    a, b, m = _trio()
    stacks = {_address(s): s for s in (a, b, m)}
    ctx = _Context(
        ids=[int(A), int(B), int(M), 12345], incarnations=[int(A), int(B), int(M), 0, 99]
    )
    sent: list[bytes] = []
    got = _Received()
    published = 0
    b_requests: dict[int, float] = {}
    now = 0.0
    for step in range(steps):
        now += rng.choice([0.0005, 0.002, 0.01])
        if step < steps - 100:
            for _ in range(rng.randrange(0, 4)):
                size = rng.choice([10, 1000, 5000, 70_000])
                payload = b"%d:" % len(sent) + rng.randbytes(size)
                if a.offer(B, DIRECT_ENVELOPE + payload, now + 60, now):  # (or back-pressure)
                    sent.append(payload)
            for _ in range(rng.randrange(0, 3)):
                message, targets = a.publish(
                    REAL_TOPIC,
                    "r",
                    rng.randbytes(rng.choice([5, 3000])),
                    expires_at=now + 60,
                    now=now,
                )
                published += 1
                assert B in targets
                for target in targets:
                    assert a.offer(target, message, now + 60, now) or target != B or spoofed
            if rng.random() < 0.3:
                job, targets = a.publish(JOB_TOPIC, "job", b"job", expires_at=now + 1, now=now)
                for target in targets:
                    a.offer(target, job, now + 1, now)
            if rng.random() < 0.2:  # B waits for answers from the attacker
                request_id, sends = b.requests.open(
                    "svc/x", b"?", [M], everyone=False, deadline=now + 0.05, now=now
                )
                b_requests[request_id] = now + 0.05
                ctx.requests.append(request_id)
                for peer, request, expires_at in sends:
                    b.send(peer, request, expires_at=expires_at, now=now)
        ctx.jobs = sorted(a.topics._groups._jobs)[:5] or [1]
        # The attacker's own stream: hostile messages, bundled with good ones when small.
        for _ in range(rng.randrange(0, 4)):
            victim = rng.choice([A, B])
            if rng.random() < 0.3:
                m.send(victim, b'{"w":1.0}\ngood', expires_at=now + 60, now=now)
            m.send(victim, _envelope(rng, ctx), expires_at=now + 60, now=now)
        for sender in (a, b, m):
            for data, address in sender.datagrams_to_send(now=now):
                receiver = stacks.get(address)
                if receiver is None or (
                    receiver is m and (rng.random() < 0.2 or DEAF[0] < step < DEAF[1])
                ):
                    continue  # (the attacker loses some of what it is sent)
                receiver.receive_datagram(data, _address(sender), multicast=False, now=now)
        for _ in range(rng.randrange(0, 6)):
            data, source = _hostile(rng, b, a, ctx)
            if spoofed and rng.random() < 0.5:
                source = _address(a)  # the attacker forges the publisher's own address too
            b.receive_datagram(data, source, multicast=rng.random() < 0.5, now=now)
            data, source = _hostile(rng, a, b, ctx)
            a.receive_datagram(data, source, multicast=rng.random() < 0.5, now=now)
            victim = rng.choice([a, b])
            victim.receive_datagram(
                _forged_stream(rng, m, victim, ctx), _address(m), multicast=False, now=now
            )
        for stack in (a, b, m):
            deadline = stack.next_deadline()
            if deadline is not None and deadline <= now:
                stack.handle_timer(now=now)
        _drain(b, now, got, b_requests)
        _drain(a, now, None, {})
        _drain(m, now, None, {})
        for stack in (a, b):
            _check_bounds(stack, seed)
    if not spoofed:
        # From another address nothing the attacker sends moves the real stream.
        numbers = [int(payload.split(b":", 1)[0]) for payload in got.direct]
        assert numbers == list(range(len(sent))), f"seed {seed}: {numbers[:20]}..."
        assert got.direct == sent, f"seed {seed}: a payload differs"
        real = [(m.topic_name, m.sequence) for m in got.topic if m.topic_name == REAL_TOPIC]
        assert real == [(REAL_TOPIC, n) for n in range(1, published + 1)], f"seed {seed}"
    # Drops are counted, not hidden.
    counters = b.all_counters()
    assert any(k.endswith(("bad_envelope", "bad_interest", "bad_done")) for k in counters), (
        f"seed {seed}: {sorted(counters)}"
    )


@pytest.mark.parametrize("spoofed", [False, True], ids=["other-address", "spoofed-address"])
def test_hostile_datagrams_with_a_fixed_seed(spoofed: bool) -> None:
    _run(FIXED_SEED, spoofed=spoofed)


@pytest.mark.parametrize("spoofed", [False, True], ids=["other-address", "spoofed-address"])
def test_hostile_datagrams_with_a_new_seed_each_run(spoofed: bool) -> None:
    seed = int(os.environ.get("GLUE_FUZZ_SEED", "0")) or time.time_ns() % 2**32
    print(f"\nstack fuzz seed {seed} (replay: GLUE_FUZZ_SEED={seed})")
    try:
        _run(seed, spoofed=spoofed, steps=RANDOM_STEPS)
    except Exception as exc:
        raise AssertionError(f"stack fuzz failed with seed {seed}: {exc!r}") from exc
