"""Every public method checks its arguments (issue 14, item 4), over real sockets.

Each bad argument raises a ``UsageTypeError`` (a ``TypeError``) or ``UsageValueError`` (a
``ValueError``) naming it, and the endpoint still works afterwards: a good message published or
sent right after it arrives. Before, ``expiry=math.inf`` was accepted and broke the transport's
timers for good (0 of the next 141 messages arrived), a ``str``, ``int`` or ``None`` payload or
an expiry of ``"5"`` raised a bare ``TypeError``, and a list payload was sent as bytes.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest

from glue import (
    AsyncEndpointManager,
    EndpointManager,
    MessageReceived,
    UsageError,
    UsageTypeError,
    UsageValueError,
)
from tests.helpers import Inbox, async_wait_until, wait_until

KIND = "usage"
TOPIC = "usage/t"
T, V = UsageTypeError, UsageValueError

PEER_ID = object()  # stands for the subscriber's id in the cases below
PEERS = object()  # stands for publisher.peers() (Peer objects, not ids)


def c(error: type[UsageError], argument: str, method: str, *args: object, **kw: object) -> Any:
    """One bad call: ``endpoint.<method>(*args, **kw)`` must raise ``error`` naming ``argument``.
    ``method`` may be dotted: "subscribe.get" calls get() on a new iterator subscription."""
    shown = [_short(a) for a in args] + [f"{k}={_short(v)}" for k, v in kw.items()]
    return pytest.param(method, args, kw, error, argument, id=f"{method}({', '.join(shown)})")


def _short(value: object) -> str:
    if value is PEER_ID:
        return "<id>"
    if value is PEERS:
        return "<peers>"
    if isinstance(value, list):
        return "[" + ", ".join(_short(v) for v in value) + "]"
    text = repr(value)
    return text if len(text) <= 20 else f"<{type(value).__name__} of {len(text)} chars>"


def _call(endpoint: Any, method: str, args: tuple[object, ...], kw: dict[str, object]) -> Any:
    def real(value: object) -> object:
        if value is PEER_ID:
            return endpoint.test_peer_id
        if value is PEERS:
            return endpoint.test_peers
        if isinstance(value, list):
            return [real(v) for v in value]
        return value

    target = endpoint
    if method.startswith("subscribe."):
        target = endpoint.subscribe("s", KIND)
        method = method.split(".", 1)[1]
    return getattr(target, method)(*[real(a) for a in args], **{k: real(v) for k, v in kw.items()})


X = b"x"
BLOCKING_CASES = [
    c(V, "expiry", "publish", TOPIC, KIND, X, expiry=math.inf),
    c(V, "expiry", "publish", TOPIC, KIND, X, expiry=-math.inf),
    c(V, "expiry", "publish", TOPIC, KIND, X, expiry=math.nan),
    c(V, "expiry", "publish", TOPIC, KIND, X, expiry=1e306),
    c(V, "expiry", "publish", TOPIC, KIND, X, expiry=86_401),
    c(V, "expiry", "publish", TOPIC, KIND, X, expiry=0),
    c(T, "expiry", "publish", TOPIC, KIND, X, expiry="5"),
    c(T, "expiry", "publish", TOPIC, KIND, X, expiry=None),
    c(T, "expiry", "publish", TOPIC, KIND, X, expiry=True),
    c(T, "payload", "publish", TOPIC, KIND, "n=9"),
    c(T, "payload", "publish", TOPIC, KIND, 9),
    c(T, "payload", "publish", TOPIC, KIND, None),
    c(T, "payload", "publish", TOPIC, KIND, [110, 61, 57]),
    c(V, "payload", "publish", TOPIC, KIND, bytes(4097)),
    c(V, "history_depth", "publish", TOPIC, KIND, X, history_depth=-1),
    c(V, "history_depth", "publish", TOPIC, KIND, X, history_depth=10**7),
    c(T, "history_depth", "publish", TOPIC, KIND, X, history_depth="1"),
    c(T, "history_depth", "publish", TOPIC, KIND, X, history_depth=1.0),
    c(V, "timeout", "publish", TOPIC, KIND, X, timeout=-1),
    c(V, "timeout", "publish", TOPIC, KIND, X, timeout=math.inf),
    c(T, "timeout", "publish", TOPIC, KIND, X, timeout="1"),
    c(T, "topic_name", "publish", 7, KIND, X),
    c(V, "topic_name", "publish", "a b", KIND, X),
    c(T, "topic_type", "publish", TOPIC, None, X),
    c(V, "topic_type", "publish", TOPIC, "", X),
    c(T, "payloads", "publish_many", TOPIC, KIND, X),
    c(T, "payloads", "publish_many", TOPIC, KIND, "abc"),
    c(T, "payloads", "publish_many", TOPIC, KIND, None),
    c(T, "payloads[1]", "publish_many", TOPIC, KIND, [X, "text"]),
    c(V, "payloads[2]", "publish_many", TOPIC, KIND, [X, X, bytes(4097)]),
    c(V, "expiry", "publish_many", TOPIC, KIND, [X], expiry=math.inf),
    c(T, "history_depth", "publish_many", TOPIC, KIND, [X], history_depth="1"),
    c(V, "timeout", "publish_many", TOPIC, KIND, [X], timeout=-1),
    c(T, "topic_name", "publish_many", 7, KIND, [X]),
    c(V, "topic_type", "publish_many", TOPIC, "", [X]),
    c(T, "value", "publish_json", TOPIC, KIND, object()),
    c(T, "value", "publish_json", TOPIC, KIND, 2**70),
    c(V, "expiry", "publish_json", TOPIC, KIND, 1, expiry=math.inf),
    c(V, "expiry", "send", X, to=[PEER_ID], expiry=math.inf),
    c(T, "expiry", "send", X, to=[PEER_ID], expiry="5"),
    c(T, "payload", "send", "x", to=[PEER_ID]),
    c(T, "payload", "send", None, to=[PEER_ID]),
    c(T, "to", "send", X, to=PEER_ID),
    c(T, "to", "send", X, to="ab"),
    c(V, "an id in to", "send", X, to=[0]),
    c(T, "an id in to", "send", X, to=[True]),
    c(T, "to", "send", X, to=PEERS),
    c(V, "timeout", "send", X, to=[PEER_ID], timeout=-1),
    c(T, "topic_name", "subscribe", 7, KIND),
    c(V, "topic_name", "subscribe", "a/#/b", KIND),
    c(T, "topic_type", "subscribe", "a", 5),
    c(T, "callback", "subscribe", "a", KIND, 5),
    c(V, "queue_size", "subscribe", "a", KIND, queue_size=0),
    c(T, "queue_size", "subscribe", "a", KIND, queue_size=True),
    c(V, "queue_bytes", "subscribe", "a", KIND, queue_bytes=0),
    c(T, "queue_bytes", "subscribe", "a", KIND, queue_bytes=1.5),
    c(T, "subscription", "unsubscribe", 5),
    c(V, "subscription", "unsubscribe", "a b"),
    c(T, "count", "wait_for_peers", "1", timeout=1),
    c(V, "count", "wait_for_peers", -1, timeout=1),
    c(V, "timeout", "wait_for_peers", 1, timeout=-1),
    c(T, "where", "wait_for_peers", 1, timeout=1, where=5),
    c(T, "topic_name", "wait_for_subscribers", 7, timeout=1),
    c(V, "count", "wait_for_subscribers", "a", -1, timeout=1),
    c(T, "timeout", "wait_for_subscribers", "a", timeout="x"),
    c(T, "topic_name", "subscribers", None),
    c(V, "timeout", "flush", timeout=-1),
    c(V, "timeout", "flush", timeout=math.inf),
    c(T, "timeout", "flush", timeout=None),
    c(V, "timeout", "messages", timeout=-1),
    c(V, "queue_bytes", "messages", queue_bytes=0),
    c(T, "timeout", "peer_events", timeout="1"),
    c(T, "callback", "on_message", 5),
    c(T, "callback", "on_peer_added", None),
    c(T, "callback", "on_peer_removed", "x"),
    c(V, "timeout", "stop", timeout=-1),
    c(T, "timeout", "stop", timeout="5"),
    c(V, "timeout", "subscribe.get", timeout=-1),
    c(T, "timeout", "subscribe.messages", timeout="x"),
]  # fmt: skip


class Pair:
    """A publisher and a subscriber that know each other, and a check that they still work."""

    def __init__(self, publisher: EndpointManager, subscriber: EndpointManager) -> None:
        self.publisher, self.subscriber = publisher, subscriber
        self.topic_inbox, self.direct = Inbox(), Inbox()
        subscriber.subscribe(TOPIC, KIND, self.topic_inbox)
        subscriber.on_message(self.direct)
        [peer] = publisher.wait_for_subscribers(TOPIC, timeout=5)
        self.peer_id = peer.endpoint_id
        self.checks = 0

    def assert_still_works(self) -> None:
        """A good publish and a good send, right after, both arrive."""
        self.checks += 1
        self.publisher.publish(TOPIC, KIND, b"good %d" % self.checks)
        self.publisher.send(b"good %d" % self.checks, to=[self.peer_id])
        assert self.topic_inbox.wait_for_count(self.checks, timeout=5), self.topic_inbox.payloads()
        assert self.direct.wait_for_count(self.checks, timeout=5), self.direct.payloads()
        assert self.topic_inbox.payloads()[-1] == b"good %d" % self.checks
        assert self.direct.payloads()[-1] == b"good %d" % self.checks


@pytest.fixture
def pair(settings: dict[str, object]) -> Iterator[Pair]:
    with (
        EndpointManager.from_env(**settings, max_message_bytes=4096) as publisher,
        EndpointManager.from_env(**settings) as subscriber,
    ):
        yield Pair(publisher, subscriber)


@pytest.mark.parametrize(("method", "args", "kw", "error", "argument"), BLOCKING_CASES)
def test_each_bad_argument_is_refused_by_name_and_the_endpoint_still_works(
    pair: Pair,
    method: str,
    args: tuple[object, ...],
    kw: dict[str, object],
    error: type[UsageError],
    argument: str,
) -> None:
    pair.assert_still_works()
    publisher: Any = pair.publisher
    publisher.test_peer_id = pair.peer_id
    publisher.test_peers = publisher.peers()
    with pytest.raises(error) as caught:
        _call(publisher, method, args, kw)
    assert caught.value.argument == argument, caught.value
    assert argument.split()[-1] in str(caught.value)
    # Ordinary except clauses catch it too.
    assert isinstance(caught.value, TypeError if error is T else ValueError)
    pair.assert_still_works()


def test_after_expiry_inf_every_following_message_arrives(pair: Pair) -> None:
    # Before: accepted, then int(inf) raised in the transport's timers on every tick and the
    # subscriber got 0 of the next 141 messages.
    for bad in (math.inf, 1e306):
        with pytest.raises(ValueError, match="expiry"):
            pair.publisher.publish(TOPIC, KIND, b"never", expiry=bad)
        with pytest.raises(ValueError, match="expiry"):
            pair.publisher.send(b"never", to=[pair.peer_id], expiry=bad)
    for n in range(141):
        pair.publisher.publish(TOPIC, KIND, b"%d" % n)
        pair.publisher.send(b"%d" % n, to=[pair.peer_id])
    assert pair.topic_inbox.wait_for_count(141, timeout=10), len(pair.topic_inbox.messages)
    assert pair.direct.wait_for_count(141, timeout=10), len(pair.direct.messages)
    assert pair.topic_inbox.payloads() == [b"%d" % n for n in range(141)]
    assert pair.direct.payloads() == [b"%d" % n for n in range(141)]
    assert b"never" not in pair.topic_inbox.payloads()


def test_a_str_payload_says_to_encode_it_and_bytes_like_payloads_arrive_as_bytes(
    pair: Pair,
) -> None:
    with pytest.raises(TypeError, match=r"encode text first \(payload.encode\(\)\) or publish_"):
        pair.publisher.publish(TOPIC, KIND, "n=9")
    with pytest.raises(TypeError, match=r"bytes\(values\)"):
        pair.publisher.publish(TOPIC, KIND, [110, 61, 57])
    buffer = bytearray(b"from a bytearray")
    pair.publisher.publish(TOPIC, KIND, buffer)
    buffer[:4] = b"XXXX"  # copied at the call: the change does not travel
    pair.publisher.publish(TOPIC, KIND, memoryview(b"..from a memoryview")[2:])
    assert pair.topic_inbox.wait_for_count(2, timeout=5)
    assert pair.topic_inbox.payloads() == [b"from a bytearray", b"from a memoryview"]
    assert all(type(p) is bytes for p in pair.topic_inbox.payloads())


# --- the asyncio manager ------------------------------------------------------------------------

ASYNC_CASES = [
    c(V, "expiry", "publish", TOPIC, KIND, X, expiry=math.inf),
    c(T, "expiry", "publish", TOPIC, KIND, X, expiry="5"),
    c(T, "payload", "publish", TOPIC, KIND, "x"),
    c(T, "payload", "publish", TOPIC, KIND, [1, 2]),
    c(V, "payload", "publish", TOPIC, KIND, bytes(4097)),
    c(T, "history_depth", "publish", TOPIC, KIND, X, history_depth=True),
    c(V, "timeout", "publish", TOPIC, KIND, X, timeout=math.nan),
    c(T, "topic_name", "publish", None, KIND, X),
    c(T, "value", "publish_json", TOPIC, KIND, {1}),
    c(T, "payloads", "publish_many", TOPIC, KIND, X),
    c(T, "payloads[0]", "publish_many", TOPIC, KIND, [5, X]),
    c(V, "payloads[1]", "publish_many", TOPIC, KIND, [X, bytes(4097)]),
    c(V, "expiry", "publish_many", TOPIC, KIND, [X], expiry=0),
    c(T, "topic_name", "publish_many", None, KIND, [X]),
    c(V, "expiry", "send", X, to=[PEER_ID], expiry=math.inf),
    c(T, "payload", "send", 5, to=[PEER_ID]),
    c(T, "to", "send", X, to=PEER_ID),
    c(V, "an id in to", "send", X, to=[-1]),
    c(T, "callback", "subscribe", "a", KIND, "f"),
    c(V, "queue_size", "subscribe", "a", KIND, queue_size=-5),
    c(T, "subscription", "unsubscribe", None),
    c(T, "count", "wait_for_peers", 1.0, timeout=1),
    c(V, "timeout", "wait_for_peers", 1, timeout=math.inf),
    c(V, "topic_name", "wait_for_subscribers", "", timeout=1),
    c(T, "timeout", "flush", timeout="1"),
    c(T, "queue_size", "messages", queue_size="1"),
    c(T, "callback", "on_message", 5),
    c(T, "callback", "on_peer_removed", None),
    c(V, "timeout", "stop", timeout=-1),
]  # fmt: skip


@pytest.mark.parametrize(("method", "args", "kw", "error", "argument"), ASYNC_CASES)
async def test_each_bad_argument_to_the_async_manager_is_refused_and_it_still_works(
    settings: dict[str, object],
    method: str,
    args: tuple[object, ...],
    kw: dict[str, object],
    error: type[UsageError],
    argument: str,
) -> None:
    async with (
        AsyncEndpointManager.from_env(**settings, max_message_bytes=4096) as publisher,
        AsyncEndpointManager.from_env(**settings) as subscriber,
    ):
        topic_messages = subscriber.subscribe(TOPIC, KIND)
        direct: list[MessageReceived] = []
        subscriber.on_message(direct.append)
        [peer] = await publisher.wait_for_subscribers(TOPIC, timeout=5)
        target: Any = publisher
        target.test_peer_id = peer.endpoint_id
        with pytest.raises(error) as caught:
            await _maybe_await(_call, target, method, args, kw)
        assert caught.value.argument == argument, caught.value
        await publisher.publish(TOPIC, KIND, b"good")
        await publisher.send(b"good", to=[peer.endpoint_id])
        message = await asyncio.wait_for(topic_messages.get(), 5)
        assert message.payload == b"good"
        assert await async_wait_until(lambda: len(direct) == 1, timeout=5)
        assert direct[0].payload == b"good"


async def _maybe_await(function: Callable[..., Any], *args: Any) -> None:
    """Call ``function``; await what it returns if it is awaitable (coroutine methods)."""
    result = function(*args)
    if isinstance(result, Awaitable):
        await result


def test_calls_after_stop_still_name_a_bad_argument_first(settings: dict[str, object]) -> None:
    endpoint = EndpointManager.from_env(**settings)
    endpoint.start()
    endpoint.stop()
    with pytest.raises(UsageValueError):
        endpoint.publish(TOPIC, KIND, b"x", expiry=math.inf)
    with pytest.raises(UsageError, match="not running"):
        endpoint.publish(TOPIC, KIND, b"x")
    assert wait_until(lambda: True, timeout=0)
