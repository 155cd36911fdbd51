"""The public API: ``EndpointManager`` (blocking) and ``AsyncEndpointManager`` (asyncio).

Both are thin, and share what does not depend on how they wait (:class:`_Manager`: settings,
identity; module functions: argument checks, the routing of a burst's events to subscriptions).
Underneath, one runtime drives the sans-IO stack: the asyncio manager runs
:class:`~glue.endpoint.Endpoint` in the caller's loop; the blocking manager runs
:class:`~glue.runtime_thread.ThreadRuntime`, with no event loop: a publish places the message under
the stack's lock and, on an idle endpoint, sends it from the caller's thread; one network thread
receives, runs the timers and hands events over. User callbacks never run inside the network
handlers unless asked: subscriptions (:mod:`glue.subscription`) each have a queue bounded in
messages and bytes; the blocking manager runs their callbacks on a pool of
``GLUE_CALLBACK_THREADS`` threads (one subscription on one thread at a time, in order), or inline
on the network thread for ``subscribe(..., inline=True)`` (no queue, no thread switch; such a
callback must not block); the asyncio manager runs them in one task per subscription on the
caller's loop (which is also the network's: a callback that blocks that loop stalls acks, so make
it ``async`` or quick). Direct-message and peer callbacks run on one delivery thread (blocking) or
each on one task of its own, in order, from a bounded queue (asyncio). Overflow is counted and
reported, never silent.

Every public method checks its arguments before anything happens: a wrong type raises
:class:`~glue.errors.UsageTypeError` (a ``TypeError``), a bad value
:class:`~glue.errors.UsageValueError` (a ``ValueError``), both naming the argument. ``stop``
returns in bounded time (``timeout``) and says what it left behind
(:class:`~glue.events.StopReport`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import select
import signal
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, NoReturn, Protocol, Self, TypeVar, cast

import orjson

from glue import wire
from glue.endpoint import Endpoint
from glue.errors import (
    MAX_TIMEOUT_S,
    RemoteError,
    UnknownPeerError,
    UsageError,
    UsageTypeError,
    UsageValueError,
    check_callable,
    check_int,
    check_number,
    check_payload,
    check_timeout,
)
from glue.events import (
    Gap,
    InterestChanged,
    Message,
    MessageReceived,
    Peer,
    PeerAdded,
    PeerEvent,
    PeerRemoved,
    Reply,
    ReplyArrived,
    RequestArrived,
    StackEvent,
    StopReport,
    TopicDelivery,
    TopicGap,
)
from glue.groups import validate_group
from glue.runtime import RuntimeCore
from glue.runtime_thread import ThreadRuntime
from glue.service import (
    DEFAULT_SERVE_QUEUE_SIZE,
    AsyncHandler,
    AsyncRequests,
    AsyncService,
    Handler,
    Requests,
    Service,
)
from glue.settings import GlueSettings, load_settings
from glue.subscription import (
    DEFAULT_QUEUE_BYTES,
    DEFAULT_QUEUE_SIZE,
    AsyncEventIterator,
    AsyncEventQueue,
    AsyncGapCallback,
    AsyncMessageCallback,
    AsyncSubscription,
    CallbackPool,
    CallbackRunner,
    EventIterator,
    EventQueue,
    GapCallback,
    MessageCallback,
    SenderLanes,
    SenderRunners,
    Subscription,
    check_queue_bounds,
    crossed_power_of_ten,
    expired_now,
)
from glue.topics import validate_pattern, validate_topic_name, validate_topic_type
from glue.wire import EndpointId

if TYPE_CHECKING:
    from glue.model import AsyncModel, Model

__all__ = [
    "DEFAULT_EXPIRY_S",
    "DEFAULT_SEND_TIMEOUT_S",
    "DEFAULT_STOP_TIMEOUT_S",
    "EVENT_QUEUE_BYTES",
    "EVENT_QUEUE_SIZE",
    "MAX_EXPIRY_S",
    "MAX_HISTORY_DEPTH",
    "AsyncEndpointManager",
    "EndpointManager",
]

logger = logging.getLogger(__name__)

#: The signals ``run_forever`` ends on: Ctrl-C and what ``docker stop``/Kubernetes send.
STOP_SIGNALS: Final = (signal.SIGINT, signal.SIGTERM)

#: Events that may wait in each event queue between the network loop and user code (peer and
#: direct-message callbacks, ``messages()``, ``peer_events()``).
EVENT_QUEUE_SIZE: Final = DEFAULT_QUEUE_SIZE
#: Payload bytes that may wait in each of those queues (one larger message passes an empty one).
EVENT_QUEUE_BYTES: Final = DEFAULT_QUEUE_BYTES
DEFAULT_EXPIRY_S: Final = 5.0
#: The longest ``expiry`` a message may have: one day, the longest time to live the wire can
#: carry (``ttl`` in docs/PROTOCOL.md). Longer, infinite or NaN expiries are refused.
MAX_EXPIRY_S: Final = wire.MAX_TTL_MS / 1000.0
#: The largest ``history_depth`` (as ``GLUE_HISTORY_DEPTH``).
MAX_HISTORY_DEPTH: Final = 1_000_000
DEFAULT_SEND_TIMEOUT_S: Final = 5.0
#: How long ``stop()`` waits by default for the network and callbacks to finish.
DEFAULT_STOP_TIMEOUT_S: Final = 5.0
_START_TIMEOUT_S: Final = 30.0
#: What a blocking stop() allows the loop thread beyond its timeout to hand its answer over.
_STOP_GRACE_S: Final = 0.5

T = TypeVar("T")
PeerCallback = Callable[[Peer], object]
_Callback = Callable[[Any], object]


def _payload_size(message: MessageReceived) -> int:
    return len(message.payload)


# --- argument checks (the usual values pass the first test, at once) -----------------------------


def _check_expiry(expiry: object) -> float:
    if type(expiry) is float and 0.0 < expiry <= MAX_EXPIRY_S:
        return expiry
    return check_number(
        expiry,
        "expiry",
        minimum=0.0,
        maximum=MAX_EXPIRY_S,
        above=True,
        hint=" (one day, the longest time to live a message can have)",
    )


def _checked_message(
    payload: object,
    expiry: object,
    timeout: object,
    history_depth: object,
    max_bytes: int,
    *,
    json_hint: bool,
) -> tuple[bytes, float, float, int | None]:
    """The arguments of a publish or send, checked (the slow path: the usual values are let
    through by an inline test in each method, since Python pays per call)."""
    data = payload if type(payload) is bytes else check_payload(payload, json_hint=json_hint)
    if len(data) > max_bytes:
        raise UsageValueError(
            f"payload of {len(data)} bytes exceeds the maximum of {max_bytes} "
            "(GLUE_MAX_MESSAGE_BYTES)",
            argument="payload",
        )
    depth = (
        None
        if history_depth is None
        else check_int(history_depth, "history_depth", minimum=0, maximum=MAX_HISTORY_DEPTH)
    )
    return data, _check_expiry(expiry), check_timeout(timeout), depth


def _checked_batch(
    payloads: object,
    expiry: object,
    timeout: object,
    history_depth: object,
    retain: object,
    max_bytes: int,
) -> tuple[list[bytes], float, float, int | None]:
    """The arguments of a ``publish_many``, checked (both managers): the payloads, then the
    rest as for one ``publish``."""
    checked = _checked_payloads(payloads, max_bytes)
    _, expiry_s, timeout_s, depth = _checked_message(
        b"", expiry, timeout, history_depth, max_bytes, json_hint=False
    )
    if retain is not False:
        _check_retain(retain)
    return checked, expiry_s, timeout_s, depth


def _checked_payloads(payloads: object, max_bytes: int) -> list[bytes]:
    """``publish_many``'s payloads: a list or tuple (any iterable but text and bytes) of
    ``bytes``, ``bytearray`` or ``memoryview``, each at most ``max_bytes`` (the one at fault is
    named by its index)."""
    if isinstance(payloads, str | bytes | bytearray | memoryview) or not isinstance(
        payloads, Iterable
    ):
        raise UsageTypeError(
            f"payloads must be a list of payloads (bytes), not {type(payloads).__name__}: "
            "publish() takes one",
            argument="payloads",
        )
    checked = list(payloads)
    for index, payload in enumerate(checked):
        if type(payload) is not bytes:
            payload = checked[index] = check_payload(payload, f"payloads[{index}]")
        if len(payload) > max_bytes:
            raise UsageValueError(
                f"payloads[{index}] of {len(payload)} bytes exceeds the maximum of {max_bytes} "
                "(GLUE_MAX_MESSAGE_BYTES)",
                argument=f"payloads[{index}]",
            )
    return checked


def _check_targets(to: object) -> tuple[int | str, ...] | None:
    """``to`` as a tuple of endpoint ids and peer names, or None (every peer)."""
    if to is None:
        return None
    if type(to) is not list and type(to) is not tuple:
        if isinstance(to, int | Peer):
            raise UsageTypeError(
                f"to must be a list of endpoint ids, not one {type(to).__name__}: to=[id]",
                argument="to",
            )
        if isinstance(to, str | bytes | bytearray | memoryview | Mapping) or not isinstance(
            to, Iterable
        ):
            raise UsageTypeError(
                f"to must be a list of endpoint ids (or peer names) or None, not "
                f"{type(to).__name__}",
                argument="to",
            )
    ids = tuple(to)
    for peer_id in ids:
        if type(peer_id) is str:
            continue  # a peer's name, resolved when sending (_resolve_names)
        if type(peer_id) is not int or not 0 < peer_id <= wire.MAX_ID:
            if isinstance(peer_id, Peer):
                raise UsageTypeError(
                    "to must hold endpoint ids, not Peer objects: use peer.endpoint_id",
                    argument="to",
                )
            check_int(peer_id, "an id in to", minimum=1, maximum=wire.MAX_ID)
    return ids


def _resolve_names(to: tuple[int | str, ...], peers: Iterable[Peer]) -> tuple[int, ...]:
    """``to`` with each peer name replaced by that peer's id (the peers known now).

    Raises:
        UnknownPeerError: no peer known now has one of the names.
    """
    if all(type(target) is int for target in to):
        return cast(tuple[int, ...], to)
    by_name = {peer.name: peer.endpoint_id for peer in peers}
    ids: list[int] = []
    for target in to:
        if type(target) is int:
            ids.append(target)
            continue
        found = by_name.get(cast(str, target))
        if found is None:
            known = ", ".join(sorted(by_name)) or "none"
            raise UnknownPeerError(
                f"no peer named {target!r} is known now (known: {known})", name=cast(str, target)
            )
        ids.append(found)
    return tuple(ids)


def _one_id(to: object) -> bool:
    """Whether ``to`` is the usual ``[peer_id]`` (let through without the full check)."""
    return type(to) is list and len(to) == 1 and type(to[0]) is int and 0 < to[0] <= wire.MAX_ID


def _check_wait(count: object, timeout: object) -> tuple[int, float]:
    return check_int(count, "count", minimum=0), check_timeout(timeout)


def _encode_json(value: Any) -> bytes:
    try:
        return orjson.dumps(value)
    except TypeError as exc:  # orjson.JSONEncodeError is a TypeError
        raise UsageTypeError(f"value cannot be encoded as JSON: {exc}", argument="value") from exc


def _check_callback(callback: object, argument: str = "callback") -> None:
    check_callable(callback, argument)


def _check_group(group: object, callback: object, gaps: object) -> str | None:
    """``group`` if None or a valid group name, for a subscription with a callback (a member
    says a message is done when its callback returns; an iterator cannot say so)."""
    if group is None:
        return None
    validate_group(group)
    if callback is None:
        raise UsageValueError(
            "group= needs a callback: a member's message is done when its callback returns "
            "(docs/work-queues.md)",
            argument="group",
        )
    return cast(str, group)


def _left_behind(name: str, report: StopReport) -> StopReport:
    if not report.clean:
        logger.warning("endpoint %s stopped leaving behind: %s", name, report)
    return report


def _checked_settings(settings: object) -> GlueSettings:
    if settings is None:
        return load_settings()
    if not isinstance(settings, GlueSettings):
        raise UsageTypeError(
            f"settings must be GlueSettings or None, not {type(settings).__name__} "
            "(keyword settings go to from_env(**settings))",
            argument="settings",
        )
    return settings


class _Manager:
    """What both managers share: the settings, the identity and the runtime underneath (the
    asyncio :class:`~glue.endpoint.Endpoint` or the :class:`~glue.runtime_thread.ThreadRuntime`,
    both a :class:`~glue.runtime.RuntimeCore`). The argument checks and the routing of events
    to subscriptions are module functions both use."""

    _endpoint: RuntimeCore

    def __init__(self, settings: GlueSettings | None) -> None:
        self.settings = _checked_settings(settings)
        self._max_message_bytes = self.settings.max_message_bytes

    @classmethod
    def from_env(cls, **overrides: Any) -> Self:
        """Build from ``GLUE_*`` variables and ``.env``; keyword arguments override them.

        Raises:
            ConfigError: a variable has a bad value (the message names it).
        """
        return cls(load_settings(**overrides))

    @property
    def endpoint_id(self) -> int:
        """This endpoint's id (``GLUE_ENDPOINT_ID`` or random)."""
        return self._endpoint.endpoint_id

    @property
    def name(self) -> str:
        """This endpoint's unique name."""
        return self._endpoint.name

    @property
    def data_address(self) -> tuple[str, int]:
        """The ``host:port`` the data socket is bound to (after start)."""
        return self._endpoint.data_address

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        """Where Prometheus metrics are served (``GLUE_METRICS_ADDRESS``, port resolved), if."""
        metrics = self._endpoint.metrics
        return metrics.address if metrics is not None else None


class AsyncEndpointManager(_Manager):
    """A glue endpoint for asyncio code.

    ``async with AsyncEndpointManager.from_env() as endpoint:`` starts it in the running loop and
    stops it (saying goodbye to peers) on exit.
    """

    def __init__(self, settings: GlueSettings | None = None) -> None:
        super().__init__(settings)
        self._endpoint: Endpoint = Endpoint(self.settings)
        self._peers: dict[int, Peer] = {}
        self._runners: list[tuple[type[StackEvent], CallbackRunner]] = []  # peer callbacks
        self._message_runners: list[SenderRunners] = []  # on_message callbacks
        self._peer_streams: set[AsyncEventQueue[PeerEvent]] = set()
        self._message_streams: set[AsyncEventQueue[MessageReceived]] = set()
        self._subscriptions: dict[int, AsyncSubscription] = {}
        self._changed: asyncio.Future[None] | None = None
        self._stopped = False
        self._requests = AsyncRequests(self._endpoint, lambda: self._changed)
        self._endpoint.add_listener(self._on_events)

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Open sockets and begin discovery.

        Raises:
            ConfigError: an interface or address in the settings cannot be used.
        """
        self._changed = asyncio.get_running_loop().create_future()
        await self._endpoint.start()

    async def run_forever(
        self,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - as its blocking twin
        signals: Sequence[int] = STOP_SIGNALS,
    ) -> int | None:
        """Serve until SIGINT or SIGTERM (or ``timeout`` seconds), then :meth:`stop`: peers are
        told goodbye at once, so a stopped container is seen gone by everyone right away.

        Returns the signal's number, or None when ``timeout`` passed first. The signals are
        handled by the running loop (``loop.add_signal_handler``) only while this runs: the
        loop must run in the main thread.

        Raises:
            UsageError: not in the main thread's loop, or the endpoint is not running.
            UsageTypeError, UsageValueError: ``timeout`` is not None or a number >= 0.
        """
        timeout = _check_optional_timeout(timeout)
        if self._stopped:
            raise UsageError("the endpoint is not running")
        loop = asyncio.get_running_loop()
        caught: asyncio.Future[int] = loop.create_future()

        def on_signal(number: int) -> None:
            if not caught.done():
                caught.set_result(number)

        added: list[int] = []
        try:
            for number in signals:
                loop.add_signal_handler(number, on_signal, int(number))
                added.append(number)
        except (RuntimeError, ValueError) as exc:
            for number in added:
                loop.remove_signal_handler(number)
            raise UsageError(f"run_forever needs the main thread's event loop: {exc}") from None
        try:
            received: int | None = await asyncio.wait_for(caught, timeout)
        except TimeoutError:
            received = None
        finally:
            for number in added:
                loop.remove_signal_handler(number)
        if received is not None:
            logger.info("endpoint %s: signal %d, stopping", self.name, received)
        await self.stop()
        return received

    async def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT_S) -> StopReport:  # noqa: ASYNC109
        """Say goodbye, close sockets, end every event iteration and callback. Idempotent.

        Returns within about ``timeout`` seconds, whatever callbacks do: an ``async`` callback
        still running is cancelled, and one that does not end within the timeout is left behind.
        It does not wait for peers to acknowledge (call :meth:`flush` first for that).

        Returns:
            What was left behind (also logged as a warning when anything was): frames not
            acknowledged per peer, messages not sent, callbacks still running. A second call
            returns an empty report.

        Raises:
            UsageTypeError, UsageValueError: ``timeout`` is not a number of seconds >= 0.
        """
        return _left_behind(self.name, await self._stop(check_timeout(timeout)))

    async def _stop(self, timeout: float) -> StopReport:  # noqa: ASYNC109
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        unacknowledged: dict[int, int] = {}
        running: list[str] = []
        errors: list[Exception] = []
        endpoint = self._endpoint
        unsent = endpoint.counters["messages_dropped_at_stop"]
        if endpoint.running:
            unacknowledged = _unacknowledged(endpoint)
        self._stopped = True
        stopping = asyncio.ensure_future(endpoint.stop())
        try:
            await asyncio.wait_for(asyncio.shield(stopping), timeout)
        except TimeoutError:
            running.append("the endpoint's stop (waiting for its address resolver)")
        except Exception as exc:  # a bug: reported, and the rest of the stop goes on
            logger.exception("stopping endpoint %s failed", self.name)
            errors.append(exc)
        unsent = endpoint.counters["messages_dropped_at_stop"] - unsent
        for peer_stream in tuple(self._peer_streams):
            peer_stream.end()
        for message_stream in tuple(self._message_streams):
            message_stream.end()
        subscriptions = list(self._subscriptions.values())
        self._subscriptions.clear()
        for subscription in subscriptions:
            subscription._end()
        runners: list[CallbackRunner | SenderRunners] = [runner for _, runner in self._runners]
        runners.extend(self._message_runners)
        self._runners.clear()
        self._message_runners.clear()
        for runner in runners:
            runner.close()
        for subscription in subscriptions:
            still = await subscription._wait_closed(max(0.0, deadline - loop.time()))
            if still is not None:
                running.append(still)
        running.extend(await self._requests.close(max(0.0, deadline - loop.time())))
        for runner in runners:
            still = await runner.stop(max(0.0, deadline - loop.time()))
            if still is not None:
                running.append(still)
        self._notify()
        return StopReport(unacknowledged, unsent, tuple(running), tuple(errors))

    aclose = stop

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    # --- identity and state -------------------------------------------------------------------

    async def peers(self) -> list[Peer]:
        """The peers known now, ordered by name."""
        return sorted(self._peers.values(), key=lambda p: p.name)

    def counters(self) -> dict[str, int]:
        """Datagrams, bytes, drops by reason, and every layer's counters, in total."""
        return self._endpoint.all_counters()

    def peer_counters(self) -> dict[int, dict[str, int]]:
        """For each peer id: frames sent, resent, acked, delivered, duplicates dropped, expired,
        data datagrams and bytes sent and received."""
        return self._endpoint.peer_counters()

    async def wait_for_peers(
        self,
        count: int,
        *,
        timeout: float,  # noqa: ASYNC109 - the same signature as the blocking twin
        where: Callable[[Peer], bool] | None = None,
    ) -> list[Peer]:
        """Wait until at least ``count`` peers (matching ``where``) are known.

        Raises:
            TimeoutError: not enough peers within ``timeout`` seconds.
            UsageTypeError, UsageValueError: ``count`` is not an int >= 0, ``timeout`` not a
                number of seconds >= 0, or ``where`` not callable.
        """
        count, timeout = _check_wait(count, timeout)
        if where is not None:
            _check_callback(where, "where")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            found = [p for p in self._peers.values() if where is None or where(p)]
            if len(found) >= count:
                return sorted(found, key=lambda p: p.name)
            if not self._endpoint.running:
                raise UsageError("the endpoint is not running")
            remaining = deadline - loop.time()
            if remaining <= 0 or self._changed is None:
                raise TimeoutError(f"{len(found)} of {count} peers after {timeout} s")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._changed), remaining)

    def subscribers(self, topic_name: str, *, group: str | None = None) -> list[Peer]:
        """The peers subscribed to ``topic_name`` now (a publish on it goes to them), by name;
        with ``group``, the peers that are members of that work-queue group for it.

        Raises:
            UsageTypeError, UsageValueError: the name or group is not valid.
        """
        validate_topic_name(topic_name)
        peers = self._peers
        if group is None:
            ids = self._endpoint.subscribers(topic_name)
        else:
            ids = self._endpoint.members(topic_name, validate_group(group))
        found = [peers[i] for i in ids if i in peers]
        return sorted(found, key=lambda p: p.name)

    async def wait_for_subscribers(
        self,
        topic_name: str,
        count: int = 1,
        *,
        timeout: float,  # noqa: ASYNC109 - the same signature as the blocking twin
        group: str | None = None,
    ) -> list[Peer]:
        """Wait until at least ``count`` peers subscribe to ``topic_name`` (its messages reach
        them from then on; what was published before reaches them only through history), or,
        with ``group``, are members of that group for it.

        Raises:
            UsageError: the name is not valid, or the endpoint is not running.
            TimeoutError: fewer subscribers within ``timeout`` seconds.
        """
        validate_topic_name(topic_name)
        count, timeout = _check_wait(count, timeout)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            found = self.subscribers(topic_name, group=group)
            if len(found) >= count:
                return found
            if not self._endpoint.running:
                raise UsageError("the endpoint is not running")
            remaining = deadline - loop.time()
            if remaining <= 0 or self._changed is None:
                raise TimeoutError(
                    f"{len(found)} of {count} subscribers to {topic_name!r} after {timeout} s"
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._changed), remaining)

    async def flush(self, *, timeout: float) -> None:  # noqa: ASYNC109 - as its blocking twin
        """Wait until everything published or sent so far is acknowledged by the peers it went
        to (or expired first): call before exiting a short-lived publisher.

        Raises:
            DeliveryError: a peer that messages went to is gone with some unacknowledged: it
                left, restarted, or has been silent for a discovery timeout (``peers`` and
                ``unacknowledged`` name them and count the messages). A peer that left or
                restarted is reported once; a silent one while its messages are held.
            TimeoutError: still unacknowledged after ``timeout`` seconds.
            UsageTypeError, UsageValueError: ``timeout`` is not a number of seconds >= 0.
        """
        await self._endpoint.flush(check_timeout(timeout))

    # --- topics ---------------------------------------------------------------------------------

    async def publish(
        self,
        topic_name: str,
        topic_type: str,
        payload: bytes,
        *,
        expiry: float = DEFAULT_EXPIRY_S,
        history_depth: int | None = None,
        timeout: float = DEFAULT_SEND_TIMEOUT_S,  # noqa: ASYNC109 - same as the blocking twin
        retain: bool = False,
    ) -> None:
        """Publish ``payload`` on ``topic_name``: see :meth:`EndpointManager.publish`."""
        if not (
            type(payload) is bytes
            and type(expiry) is float
            and 0.0 < expiry <= MAX_EXPIRY_S
            and type(timeout) is float
            and 0.0 <= timeout <= MAX_TIMEOUT_S
            and history_depth is None
            and len(payload) <= self._max_message_bytes
        ):
            payload, expiry, timeout, history_depth = _checked_message(
                payload, expiry, timeout, history_depth, self._max_message_bytes, json_hint=True
            )
        if retain is not False:
            _check_retain(retain)
        waiting = self._endpoint.try_publish(
            topic_name,
            topic_type,
            payload,
            expiry_s=expiry,
            history_depth=history_depth,
            retain=retain,
        )
        if waiting is not None:
            await self._endpoint.wait_to_queue(waiting, timeout)

    async def publish_many(
        self,
        topic_name: str,
        topic_type: str,
        payloads: Iterable[bytes],
        *,
        expiry: float = DEFAULT_EXPIRY_S,
        history_depth: int | None = None,
        timeout: float = DEFAULT_SEND_TIMEOUT_S,  # noqa: ASYNC109 - same as the blocking twin
        retain: bool = False,
    ) -> None:
        """Publish each of ``payloads`` on ``topic_name``, in order: see
        :meth:`EndpointManager.publish_many`."""
        checked, expiry, timeout, history_depth = _checked_batch(
            payloads, expiry, timeout, history_depth, retain, self._max_message_bytes
        )
        if not self._endpoint.running:
            raise UsageError("the endpoint is not running")
        await self._endpoint.publish_many(
            topic_name,
            topic_type,
            checked,
            expiry_s=expiry,
            history_depth=history_depth,
            timeout=timeout,
            retain=retain,
        )

    async def publish_json(
        self,
        topic_name: str,
        topic_type: str,
        value: Any,
        *,
        expiry: float = DEFAULT_EXPIRY_S,
        history_depth: int | None = None,
        timeout: float = DEFAULT_SEND_TIMEOUT_S,  # noqa: ASYNC109 - same as the blocking twin
        retain: bool = False,
    ) -> None:
        """Publish ``value`` encoded with orjson (read it back with ``message.json()``).

        Raises:
            UsageTypeError: ``value`` cannot be encoded as JSON (a ``TypeError``); and as
                :meth:`EndpointManager.publish`.
        """
        await self.publish(
            topic_name,
            topic_type,
            _encode_json(value),
            expiry=expiry,
            history_depth=history_depth,
            timeout=timeout,
            retain=retain,
        )

    def subscribe(
        self,
        topic_name: str,
        topic_type: str,
        callback: AsyncMessageCallback | None = None,
        *,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        queue_bytes: int = DEFAULT_QUEUE_BYTES,
        gaps: bool = False,
        on_gap: AsyncGapCallback | None = None,
        group: str | None = None,
    ) -> AsyncSubscription:
        """Receive messages published on topics matching ``topic_name`` with type ``topic_type``.

        ``topic_name`` may be ``#`` (everything), end in ``/#`` (a prefix) or hold ``+`` for
        one segment. With ``callback`` (plain or ``async``), it is called for each message, in
        order; without, iterate: ``async for message in endpoint.subscribe(...)``. Messages
        published here reach matching subscriptions here too, without the network. Up to
        ``queue_size`` messages and ``queue_bytes`` bytes of payload wait for a slow subscriber;
        beyond, they are dropped for it, counted and reported.

        Gaps (docs/history.md): with ``gaps=True`` (iteration) a :class:`~glue.events.Gap`
        comes in order among the messages for each run of messages that will never arrive;
        with a callback, ``on_gap`` (plain or ``async``) is called with each instead.

        Work queues (docs/work-queues.md): with ``group``, this subscription is a member of
        that group, and each message goes to one member of each group, not to all (ordinary
        subscriptions still get every one); a member removed before its callback returned has
        the message given to another, ``redelivered`` set (at least once per group).

        Raises:
            UsageError: the pattern, type, callback, group or a bound is not valid (as
                ``UsageTypeError``/``UsageValueError``), or the endpoint is not running.
        """
        validate_pattern(topic_name)
        validate_topic_type(topic_type)
        if callback is not None:
            _check_callback(callback)
        queue_size, queue_bytes = check_queue_bounds(queue_size, queue_bytes)
        _check_gaps(callback, gaps, on_gap)
        group = _check_group(group, callback, gaps)
        subscription = AsyncSubscription(
            topic_name,
            topic_type,
            callback,
            queue_size=queue_size,
            queue_bytes=queue_bytes,
            unsubscribe=self._remove_subscription,
            on_gap=on_gap,
            gaps=gaps,
            group=group,
            done=None if group is None else self._report_done,
        )
        try:
            subscription.id = self._endpoint.subscribe(
                topic_name, topic_type, gaps=gaps or on_gap is not None, group=group
            )
        except BaseException:
            subscription._end()
            raise
        self._subscriptions[subscription.id] = subscription
        return subscription

    def keep_history(self, pattern: str, *, depth: int | None = None) -> None:
        """Keep the history of topics matching ``pattern`` for others, as their publishers do:
        the last ``depth`` messages of each publisher on each topic (GLUE_HISTORY_DEPTH when
        None), served to late joiners and to peers back from a partition under the original
        publisher's name and sequence, so they arrive once, in order, even after the publisher
        exited (``docs/history.md``). ``depth=0`` stops keeping the pattern. With
        GLUE_HISTORY_PATH, what is kept survives a restart.

        Raises:
            UsageError: the pattern or depth is not valid (as ``UsageTypeError`` or
                ``UsageValueError``), or the endpoint is not running.
        """
        validate_pattern(pattern, "pattern")
        self._endpoint.keep_history(pattern, depth)

    def unsubscribe(self, subscription: AsyncSubscription | str) -> None:
        """Close one subscription, or every subscription to the pattern given as a string.

        Raises:
            UsageTypeError, UsageValueError: not a subscription or a valid pattern.
        """
        if isinstance(subscription, str):
            validate_pattern(subscription, "subscription")
            for entry in list(self._subscriptions.values()):
                if entry.topic_name == subscription:
                    entry.close()
        elif isinstance(subscription, AsyncSubscription):
            subscription.close()
        else:
            raise _not_a_subscription(subscription, "AsyncSubscription")

    def _remove_subscription(self, subscription: AsyncSubscription) -> None:
        if self._subscriptions.pop(subscription.id, None) is not None:
            self._endpoint.unsubscribe(subscription.id)

    def _report_done(self, message: Message) -> None:
        if message.job is not None and self._endpoint.running:
            self._endpoint.report_done(message.source_id, message.job)

    async def wait_done(self, *, timeout: float) -> None:  # noqa: ASYNC109 - as its blocking twin
        """Wait until every message published here to a group is done: see
        :meth:`EndpointManager.wait_done`."""
        await self._endpoint.wait_done(check_timeout(timeout))

    # --- messages -------------------------------------------------------------------------------

    async def send(
        self,
        payload: bytes,
        *,
        to: Sequence[int | str] | None = None,
        expiry: float = DEFAULT_EXPIRY_S,
        timeout: float = DEFAULT_SEND_TIMEOUT_S,  # noqa: ASYNC109 - same as the blocking twin
        message_type: str = "",
    ) -> None:
        """Send ``payload`` to the peers ``to`` (ids; every peer known when it goes out if None).

        Delivered to each peer exactly once and in order, unless ``expiry`` seconds pass first.
        See :meth:`EndpointManager.send`.

        Raises:
            BackpressureError: peers acknowledge too slowly and the queue stayed full ``timeout`` s.
            UsageError: a bad argument (as :meth:`EndpointManager.send`) or the endpoint stopped.
        """
        if not (
            type(payload) is bytes
            and type(expiry) is float
            and 0.0 < expiry <= MAX_EXPIRY_S
            and type(timeout) is float
            and 0.0 <= timeout <= MAX_TIMEOUT_S
            and len(payload) <= self._max_message_bytes
        ):
            payload, expiry, timeout, _ = _checked_message(
                payload, expiry, timeout, None, self._max_message_bytes, json_hint=False
            )
        targets = cast("Sequence[int] | None", to)  # (checked below unless the usual [id])
        if to is not None and not _one_id(to):
            targets = _resolve_names(_check_targets(to) or (), self._peers.values())
        # The usual path queues at once, without a coroutine more per message.
        if type(message_type) is not str:
            _refuse_message_type(message_type)
        waiting = self._endpoint.try_send(
            payload, to=targets, expiry_s=expiry, message_type=message_type
        )
        if waiting is not None:
            await self._endpoint.wait_to_queue(waiting, timeout)

    async def send_json(
        self,
        value: Any,
        *,
        to: Sequence[int | str] | None = None,
        expiry: float = DEFAULT_EXPIRY_S,
        timeout: float = DEFAULT_SEND_TIMEOUT_S,  # noqa: ASYNC109 - same as the blocking twin
        message_type: str = "",
    ) -> None:
        """Send ``value`` encoded with orjson (read it back with ``message.json()``): see
        :meth:`EndpointManager.send`."""
        await self.send(
            _encode_json(value), to=to, expiry=expiry, timeout=timeout, message_type=message_type
        )

    def on_message(self, callback: Callable[[MessageReceived], object]) -> Callable[[], None]:
        """Call ``callback(message)`` (plain or ``async``) for each direct message; returns a
        remover.

        Each sender's messages come in order (an ``async`` callback is awaited before the next
        call for that sender); different senders' run side by side, so a handler slow for one
        does not hold up another's. Each sender's messages wait in a queue of their own
        (``EVENT_QUEUE_SIZE`` messages, ``EVENT_QUEUE_BYTES`` bytes); beyond, they are dropped,
        counted (``events_dropped_slow_consumer``) and reported. One that expired while it
        waited is not handed over (``direct_messages_expired``).

        Raises:
            UsageTypeError: ``callback`` is not callable.
        """
        return self._add_callback(MessageReceived, callback, "on_message")

    def messages(
        self, *, queue_size: int = EVENT_QUEUE_SIZE, queue_bytes: int = EVENT_QUEUE_BYTES
    ) -> AsyncEventIterator[MessageReceived]:
        """``async for message in endpoint.messages()``: every message from this call until
        stop, ``close()`` (or the end of ``with endpoint.messages() as stream:``).

        Nothing sent after the call is missed; an iterator closed or garbage-collected (dropped
        without being iterated, say) receives nothing more. Up to ``queue_size`` messages and
        ``queue_bytes`` bytes of payload wait; beyond, they are dropped, counted
        (``events_dropped_slow_consumer``) and reported.

        Raises:
            UsageTypeError, UsageValueError: a bound is not an int >= 1.
        """
        queue_size, queue_bytes = check_queue_bounds(queue_size, queue_bytes)
        return AsyncEventIterator(
            self._message_streams,
            what=f"messages() of {self.name}",
            queue_size=queue_size,
            queue_bytes=queue_bytes,
            sizer=_payload_size,
            ended=self._ended,
            expired=expired_now,
            on_expired=self._count_expired,
        )

    def _count_expired(self, count: int) -> None:
        self._endpoint.counters["direct_messages_expired"] += count

    # --- peer events ----------------------------------------------------------------------------

    def on_peer_added(self, callback: PeerCallback) -> Callable[[], None]:
        """Call ``callback(peer)`` (plain or ``async``) when a peer appears, in order; returns
        a remover.

        Raises:
            UsageTypeError: ``callback`` is not callable.
        """
        return self._add_callback(PeerAdded, callback, "on_peer_added")

    def on_peer_removed(self, callback: PeerCallback) -> Callable[[], None]:
        """Call ``callback(peer)`` (plain or ``async``) when a peer goes away, in order; returns
        a remover.

        Raises:
            UsageTypeError: ``callback`` is not callable.
        """
        return self._add_callback(PeerRemoved, callback, "on_peer_removed")

    def peer_events(self) -> AsyncEventIterator[PeerEvent]:
        """``async for event in endpoint.peer_events()``: every event from this call until stop
        or ``close()`` (see :meth:`messages`)."""
        return AsyncEventIterator(
            self._peer_streams,
            what=f"peer_events() of {self.name}",
            queue_size=EVENT_QUEUE_SIZE,
            queue_bytes=EVENT_QUEUE_BYTES,
            sizer=None,
            ended=self._ended,
        )

    def _ended(self) -> bool:
        return self._stopped

    def _add_callback(
        self, kind: type[StackEvent], callback: _Callback, what: str
    ) -> Callable[[], None]:
        _check_callback(callback)
        if kind is MessageReceived:
            lanes = SenderRunners(
                callback,
                what=f"{what} of {self.name}",
                queue_size=EVENT_QUEUE_SIZE,
                queue_bytes=EVENT_QUEUE_BYTES,
                on_expired=self._count_expired,
            )
            self._message_runners.append(lanes)

            def remove_lanes() -> None:
                if lanes in self._message_runners:
                    self._message_runners.remove(lanes)
                lanes.close()

            return remove_lanes
        runner = CallbackRunner(
            callback,
            what=f"{what} of {self.name}",
            queue_size=EVENT_QUEUE_SIZE,
            queue_bytes=EVENT_QUEUE_BYTES,
            sizer=None,
        )
        entry = (kind, runner)
        self._runners.append(entry)

        def remove() -> None:
            if entry in self._runners:
                self._runners.remove(entry)
            runner.close()

        return remove

    def _on_events(self, events: list[StackEvent]) -> None:
        """Runs inside the network loop's handlers: only cheap, non-blocking work here."""
        changed = False
        dropped = 0
        runners = self._runners
        message_runners = self._message_runners
        # A copy: an iterator garbage-collected meanwhile leaves the set.
        message_streams = tuple(self._message_streams)
        wants_messages = bool(message_runners or message_streams)
        # Each subscription's messages of the burst go to it in one call (one lock, one wake-up).
        per_subscription: dict[int, list[Message | Gap]] = {}
        for event in events:
            if isinstance(event, MessageReceived):  # the most common first (Python pays per check)
                if not wants_messages:
                    continue
                for stream in message_streams:
                    if not stream.offer(event):
                        dropped += 1
                for lanes in message_runners:
                    if not lanes.offer(event):
                        dropped += 1
                continue
            if isinstance(event, TopicDelivery):
                _collect(per_subscription, event)
                continue
            if isinstance(event, InterestChanged):
                changed = True
                continue
            if isinstance(event, TopicGap):  # in order with the messages around it
                _collect_gap(per_subscription, event)
                continue
            if isinstance(event, ReplyArrived | RequestArrived):
                self._requests.handle(event)
                continue
            changed = True
            peer = event.peer
            if isinstance(event, PeerAdded):
                self._peers[peer.endpoint_id] = peer
            else:
                self._peers.pop(peer.endpoint_id, None)
            for peer_stream in tuple(self._peer_streams):
                if not peer_stream.offer(event):
                    dropped += 1
            for kind, runner in runners:
                if isinstance(event, kind) and not runner.offer(peer):
                    dropped += 1
            if isinstance(event, PeerRemoved):
                for lanes in message_runners:
                    lanes.forget(peer.endpoint_id)
        lost = _hand_over(per_subscription, self._subscriptions)
        counters = self._endpoint.counters
        if lost:
            counters["subscription_messages_dropped"] += lost
        if dropped:
            counters["events_dropped_slow_consumer"] += dropped
        if changed:
            self._notify()

    def _notify(self) -> None:
        if self._changed is not None and not self._changed.done():
            self._changed.set_result(None)
            self._changed = asyncio.get_running_loop().create_future()

    # --- request/reply ---------------------------------------------------------------------------

    def serve(
        self, name: str, handler: AsyncHandler, *, queue_size: int = DEFAULT_SERVE_QUEUE_SIZE
    ) -> AsyncService:
        """Answer requests to ``name`` with ``handler(request)``, plain or ``async``: see
        :meth:`EndpointManager.serve`. Each requester's requests run in one task, in order; a
        plain handler runs on the loop (which is also the network's), so make it quick or
        ``async``.

        Raises:
            UsageError: a bad name, handler or bound, or the endpoint is not running.
        """
        queue_size = check_int(queue_size, "queue_size", minimum=1)
        return self._requests.serve(name, handler, queue_size=queue_size)

    async def request(self, name: str, payload: bytes, *, timeout: float) -> Reply:  # noqa: ASYNC109
        """Ask one endpoint serving ``name`` and wait for its reply: see
        :meth:`EndpointManager.request` (the same errors)."""
        return await self._requests.request(name, payload, timeout)

    async def request_all(
        self,
        name: str,
        payload: bytes,
        *,
        timeout: float,  # noqa: ASYNC109 - the same signature as the blocking twin
    ) -> list[Reply | RemoteError]:
        """Ask every endpoint serving ``name`` and gather their answers: see
        :meth:`EndpointManager.request_all`."""
        return await self._requests.request_all(name, payload, timeout)

    def responders(self, name: str) -> list[Peer]:
        """The peers serving ``name`` now (those ``request`` chooses among), by name.

        Raises:
            UsageTypeError, UsageValueError: the name is not valid.
        """
        validate_topic_name(name, "name")
        peers = self._peers
        found = [peers[i] for i in self._endpoint.responders(name) if i in peers]
        return sorted(found, key=lambda p: p.name)

    async def wait_for_responders(
        self,
        name: str,
        count: int = 1,
        *,
        timeout: float,  # noqa: ASYNC109 - the same signature as the blocking twin
    ) -> list[Peer]:
        """Wait until at least ``count`` peers serve ``name``.

        Raises:
            UsageError: the name is not valid, or the endpoint is not running.
            TimeoutError: fewer responders within ``timeout`` seconds.
        """
        validate_topic_name(name, "name")
        count, timeout = _check_wait(count, timeout)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            found = self.responders(name)
            if len(found) >= count:
                return found
            if not self._endpoint.running:
                raise UsageError("the endpoint is not running")
            remaining = deadline - loop.time()
            if remaining <= 0 or self._changed is None:
                raise TimeoutError(
                    f"{len(found)} of {count} responders to {name!r} after {timeout} s"
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._changed), remaining)

    # --- models ---------------------------------------------------------------------------------

    def model(self, name: str) -> AsyncModel:
        """The replicated document ``name``, shared by every endpoint that opens it (see
        docs/model.md): opened here on the first call, the same object after. Call it from the
        loop; edit ``model.root`` from the loop's thread.

        Raises:
            UsageTypeError, UsageValueError: ``name`` is not a topic name of at most 200
                characters.
            UsageError: the endpoint is not running.
        """
        from glue.model import open_async_model  # pycrdt is imported only by those who use it

        return open_async_model(self, name)


def _unacknowledged(endpoint: RuntimeCore) -> dict[int, int]:
    """Per peer id, the frames queued or unacknowledged now (on the network thread, or under
    the runtime's lock)."""
    found: dict[int, int] = {}
    for peer in endpoint.metrics_snapshot().peers:
        frames = int(peer.gauges.get("unacknowledged_frames", 0))
        if frames:
            found[peer.endpoint_id] = frames
    return found


def _check_optional_timeout(timeout: object) -> float | None:
    if timeout is None:
        return None
    if not isinstance(timeout, int | float) or isinstance(timeout, bool):
        raise UsageTypeError(
            f"timeout must be a number or None, not {type(timeout).__name__}", argument="timeout"
        )
    if not timeout >= 0:  # (NaN too)
        raise UsageValueError(f"timeout must be 0 or more, not {timeout}", argument="timeout")
    return float(timeout)


def _wait_for_signal(signals: Sequence[int], timeout: float | None) -> int | None:
    """The first of ``signals`` to arrive within ``timeout`` s (main thread only), or None.

    Python runs a handler only when the main thread next runs bytecode, so a handler that wakes
    a blocked main thread (``Event.set``) can wait forever: the signal may land just before the
    thread blocks, or on another thread (the kernel picks any). And ``Event.set`` in a handler
    deadlocks when it runs while the main thread holds that Event's lock inside ``wait``. So, as
    asyncio does, the C-level handler writes each signal's number to a pipe
    (``signal.set_wakeup_fd``), this waits on the pipe, and the Python handlers do nothing.
    """
    wanted = list(dict.fromkeys(int(number) for number in signals))
    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    os.set_blocking(write_fd, False)
    previous_fd = signal.set_wakeup_fd(write_fd, warn_on_full_buffer=False)
    previous: dict[int, Any] = {}
    try:
        for number in wanted:  # after the wakeup fd: a caught signal always writes to it
            previous[number] = signal.signal(number, _ignore_signal)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            select.select([read_fd], [], [], remaining)
            with contextlib.suppress(BlockingIOError):
                for number in os.read(read_fd, 512):
                    if number in wanted:
                        return number
            if remaining == 0.0:
                return None
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        signal.set_wakeup_fd(previous_fd)
        os.close(read_fd)
        os.close(write_fd)


def _ignore_signal(number: int, frame: object) -> None:
    """The Python-level handler of ``_wait_for_signal``: the wakeup fd carries the signal."""


def _refuse_message_type(message_type: object) -> NoReturn:
    raise UsageTypeError(
        f"message_type must be a str, not {type(message_type).__name__}", argument="message_type"
    )


def _check_retain(retain: object) -> None:
    if type(retain) is not bool:
        raise UsageTypeError(
            f"retain must be True or False, not {type(retain).__name__}", argument="retain"
        )


def _check_gaps(callback: object, gaps: object, on_gap: object) -> None:
    """``gaps`` goes with iteration, ``on_gap`` with a callback."""
    if type(gaps) is not bool:
        raise UsageTypeError(
            f"gaps must be True or False, not {type(gaps).__name__}", argument="gaps"
        )
    if on_gap is not None:
        _check_callback(on_gap, "on_gap")
        if callback is None:
            raise UsageValueError(
                "on_gap goes with a callback; to iterate over gaps, pass gaps=True",
                argument="on_gap",
            )
    if gaps and callback is not None:
        raise UsageValueError(
            "gaps=True is for iteration; with a callback, pass on_gap= to get gaps",
            argument="gaps",
        )


def _not_a_subscription(value: object, kind: str) -> UsageTypeError:
    return UsageTypeError(
        f"subscription must be a {kind} or a pattern (str), not {type(value).__name__}",
        argument="subscription",
    )


class _Queued(Protocol):
    def _put_many(self, messages: list[Message | Gap]) -> int: ...


def _collect(per_subscription: dict[int, list[Message | Gap]], delivery: TopicDelivery) -> None:
    """Add ``delivery``'s messages to the burst of each subscription it is for."""
    for subscription_id in delivery.subscriptions:
        found = per_subscription.get(subscription_id)
        if found is None:
            per_subscription[subscription_id] = list(delivery.messages)
        else:
            found.extend(delivery.messages)


def _collect_gap(per_subscription: dict[int, list[Message | Gap]], event: TopicGap) -> None:
    """Add a gap to the burst of each subscription that asked for it."""
    for subscription_id in event.subscriptions:
        per_subscription.setdefault(subscription_id, []).append(event.gap)


def _hand_over(
    per_subscription: dict[int, list[Message | Gap]], subscriptions: Mapping[int, _Queued]
) -> int:
    """Queue each subscription's burst in one call; how many messages full queues dropped."""
    lost = 0
    for subscription_id, delivered in per_subscription.items():
        entry = subscriptions.get(subscription_id)
        if entry is not None:
            lost += entry._put_many(delivered)
    return lost


class EndpointManager(_Manager):
    """A glue endpoint for blocking code, driven by the thread runtime (no event loop).

    ``with EndpointManager.from_env() as endpoint:`` starts it and stops it on exit. A publish
    sends from the caller's thread when nothing is in flight; one network thread receives, runs
    the timers and hands events over. Callbacks run on a pool of callback threads (subscriptions,
    and direct messages by sender) or a delivery thread (peers), in the order the events happened; a
    subscription made with ``inline=True`` runs its callback on the network thread itself.
    """

    def __init__(self, settings: GlueSettings | None = None) -> None:
        super().__init__(settings)
        self._endpoint: ThreadRuntime = ThreadRuntime(self.settings)
        self._peers: dict[int, Peer] = {}
        # Notified when peers or their interest change (wait_for_peers, wait_for_subscribers).
        self._changed = threading.Condition()
        # Batches of (callbacks, items) for the delivery thread; ``_pending`` and
        # ``_pending_bytes`` bound the items and their payload bytes.
        self._deliveries: queue.SimpleQueue[
            list[tuple[tuple[_Callback, ...], Sequence[object]]] | None
        ] = queue.SimpleQueue()
        self._pending = 0
        self._pending_bytes = 0
        self._callback_drops = 0  # events the delivery queue dropped, for the warnings
        self._delivery_thread: threading.Thread | None = None
        self._delivering: _Callback | None = None  # the callback the delivery thread is in
        self._abandoned = False  # stop() gave up waiting: the delivery thread starts no more
        self._callbacks: list[tuple[type[StackEvent], _Callback]] = []  # peer callbacks
        self._message_lanes: list[SenderLanes] = []  # on_message callbacks
        self._peer_streams: set[EventQueue[PeerEvent]] = set()
        self._message_streams: set[EventQueue[MessageReceived]] = set()
        self._subscriptions: dict[int, Subscription] = {}
        self._pool = CallbackPool(self.settings.callback_threads, self._endpoint.name)
        self._lock = threading.Lock()
        self._started = False
        self._stopped = False
        self._requests = Requests(self._endpoint, self._pool, self._changed)

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the endpoint and its network thread.

        Raises:
            ConfigError: an interface or address in the settings cannot be used.
            UsageError: already started.
        """
        with self._lock:
            if self._started:
                raise UsageError("this EndpointManager was already started")
            self._started = True
        self._delivery_thread = threading.Thread(
            target=self._deliver, name=f"glue-callbacks-{self.name}", daemon=True
        )
        self._delivery_thread.start()
        self._endpoint.add_listener(self._on_events)
        try:
            self._endpoint.start()
        except BaseException:
            self.stop()
            raise

    def run_forever(
        self, *, timeout: float | None = None, signals: Sequence[int] = STOP_SIGNALS
    ) -> int | None:
        """Serve until SIGINT or SIGTERM (or ``timeout`` seconds), then :meth:`stop`: peers are
        told goodbye at once, so a stopped container is seen gone by everyone right away.

        The end of a service's main: ``with EndpointManager.from_env() as endpoint: ...;
        endpoint.run_forever()``. Returns the signal's number, or None when ``timeout`` passed
        first. Python runs signal handlers in the main thread, so call it there. The signals
        are handled only while it runs, whichever thread the kernel hands them to (before the
        call, their previous handlers apply: Python's own end the process without a goodbye);
        the previous handlers and ``signal.set_wakeup_fd`` are back when it returns.

        Raises:
            UsageError: not in the main thread, or the endpoint is not running.
            UsageTypeError, UsageValueError: ``timeout`` is not None or a number >= 0.
        """
        timeout = _check_optional_timeout(timeout)
        if threading.current_thread() is not threading.main_thread():
            raise UsageError("run_forever must be called from the main thread (signal handlers)")
        self._check_running()
        received = _wait_for_signal(signals, timeout)
        if received is not None:
            logger.info("endpoint %s: signal %d, stopping", self.name, received)
        self.stop()
        return received

    def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT_S) -> StopReport:
        """Say goodbye to peers, close sockets, end iterations, join the threads. Idempotent.

        Returns within about ``timeout`` seconds, whatever callbacks do: callbacks already
        queued run until then; after it, a callback still running (blocked, say) is left to
        finish on its thread (a daemon) and no other callback starts. It does not wait for peers
        to acknowledge (call :meth:`flush` first for that). Safe to call from a callback, an
        inline one included.

        Returns:
            What was left behind (also logged as a warning when anything was): frames not
            acknowledged per peer, messages not sent, callbacks and threads still running. A
            second call returns an empty report.

        Raises:
            UsageTypeError, UsageValueError: ``timeout`` is not a number of seconds >= 0.
        """
        timeout = check_timeout(timeout)
        with self._lock:
            if self._stopped:
                return StopReport()
            self._stopped = True
        deadline = time.monotonic() + timeout

        def remaining() -> float:
            return max(0.0, deadline - time.monotonic())

        endpoint = self._endpoint
        unacknowledged: dict[int, int] = {}
        errors: list[Exception] = []
        running: list[str] = []
        unsent = 0
        try:
            if endpoint.running:
                with endpoint.locked():
                    unacknowledged = _unacknowledged(endpoint)
            inline = [s for s in self._subscriptions.values() if s.in_inline_callback()]
            unsent, left = endpoint.stop(remaining() + _STOP_GRACE_S)
            if left and inline:
                left = [f"{s.describe()} on the network thread" for s in inline]
            running.extend(left)
        except Exception as exc:  # a bug: reported, and the rest of the stop goes on
            logger.exception("stopping endpoint %s failed", self.name)
            errors.append(exc)
        with self._changed:
            self._changed.notify_all()
        for peer_stream in tuple(self._peer_streams):
            peer_stream.end()
        for message_stream in tuple(self._message_streams):
            message_stream.end()
        subscriptions = list(self._subscriptions.values())
        self._subscriptions.clear()
        for subscription in subscriptions:
            subscription._end()
        with self._lock:
            lanes, self._message_lanes = self._message_lanes, []
        for message_lanes in lanes:
            message_lanes.close()
        self._requests.close()
        running.extend(self._pool.stop(remaining()))
        running.extend(self._stop_deliveries(remaining()))
        return _left_behind(
            self.name, StopReport(unacknowledged, unsent, tuple(running), tuple(errors))
        )

    def _stop_deliveries(self, timeout: float) -> list[str]:
        """Let the delivery thread run what is queued for ``timeout`` s at most, then end it."""
        thread = self._delivery_thread
        if thread is None:
            return []
        self._deliveries.put(None)
        if thread is threading.current_thread():
            return []
        thread.join(timeout)
        if thread.is_alive() and self._delivering is None:
            thread.join(_STOP_GRACE_S)  # in no callback: about to take the end marker
        if not thread.is_alive():
            return []
        self._abandoned = True
        return [f"callback {self._delivering!r} on thread {thread.name}"]

    close = stop

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # --- identity and state -------------------------------------------------------------------

    def peers(self) -> list[Peer]:
        """The peers known now, ordered by name."""
        self._check_running()
        with self._changed:
            return sorted(self._peers.values(), key=lambda p: p.name)

    def counters(self) -> dict[str, int]:
        """Datagrams, bytes, drops by reason, and every layer's counters, in total."""
        self._check_running()
        with self._endpoint.locked():
            return self._endpoint.all_counters()

    def peer_counters(self) -> dict[int, dict[str, int]]:
        """For each peer id: frames sent, resent, acked, delivered, duplicates dropped, expired,
        data datagrams and bytes sent and received."""
        self._check_running()
        with self._endpoint.locked():
            return self._endpoint.peer_counters()

    def wait_for_peers(
        self, count: int, *, timeout: float, where: Callable[[Peer], bool] | None = None
    ) -> list[Peer]:
        """Block until at least ``count`` peers (matching ``where``) are known.

        Raises:
            TimeoutError: not enough peers within ``timeout`` seconds.
            UsageTypeError, UsageValueError: ``count`` is not an int >= 0, ``timeout`` not a
                number of seconds >= 0, or ``where`` not callable.
        """
        count, timeout = _check_wait(count, timeout)
        if where is not None:
            _check_callback(where, "where")
        self._check_running()
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = [p for p in self._peers.values() if where is None or where(p)]
                if len(found) >= count:
                    return sorted(found, key=lambda p: p.name)
                self._check_running()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"{len(found)} of {count} peers after {timeout} s")
                self._changed.wait(remaining)

    def subscribers(self, topic_name: str, *, group: str | None = None) -> list[Peer]:
        """The peers subscribed to ``topic_name`` now (a publish on it goes to them), by name;
        with ``group``, the peers that are members of that work-queue group for it.

        Raises:
            UsageTypeError, UsageValueError: the name or group is not valid.
        """
        validate_topic_name(topic_name)
        if group is not None:
            validate_group(group)
        self._check_running()
        with self._endpoint.locked():
            ids = self._ids(topic_name, group)
        with self._changed:
            return self._subscribers(ids)

    def _ids(self, topic_name: str, group: str | None) -> list[EndpointId]:
        if group is None:
            return self._endpoint.subscribers(topic_name)
        return self._endpoint.members(topic_name, group)

    def _subscribers(self, ids: list[EndpointId]) -> list[Peer]:
        peers = self._peers
        return sorted((peers[i] for i in ids if i in peers), key=lambda p: p.name)

    def wait_for_subscribers(
        self, topic_name: str, count: int = 1, *, timeout: float, group: str | None = None
    ) -> list[Peer]:
        """Block until at least ``count`` peers subscribe to ``topic_name`` (its messages reach
        them from then on; what was published before reaches them only through history), or,
        with ``group``, are members of that work-queue group for it.

        Raises:
            UsageError: the name or group is not valid, or the endpoint is not running.
            TimeoutError: fewer subscribers within ``timeout`` seconds.
        """
        validate_topic_name(topic_name)
        if group is not None:
            validate_group(group)
        count, timeout = _check_wait(count, timeout)
        self._check_running()
        deadline = time.monotonic() + timeout
        endpoint = self._endpoint
        with self._changed:
            while True:
                # (the runtime's lock inside the condition's: the network thread takes them
                # one after the other, never nested)
                with endpoint.locked():
                    ids = self._ids(topic_name, group)
                found = self._subscribers(ids)
                if len(found) >= count:
                    return found
                self._check_running()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"{len(found)} of {count} subscribers to {topic_name!r} after {timeout} s"
                    )
                self._changed.wait(remaining)

    def flush(self, *, timeout: float) -> None:
        """Block until everything published or sent so far is acknowledged by the peers it went
        to (or expired first): call before exiting a short-lived publisher.

        Raises:
            DeliveryError: a peer that messages went to is gone with some unacknowledged: it
                left, restarted, or has been silent for a discovery timeout (``peers`` and
                ``unacknowledged`` name them and count the messages). A peer that left or
                restarted is reported once; a silent one while its messages are held.
            TimeoutError: still unacknowledged after ``timeout`` seconds.
            UsageTypeError, UsageValueError: ``timeout`` is not a number of seconds >= 0.
        """
        timeout = check_timeout(timeout)
        self._check_running()
        self._endpoint.flush(timeout)

    # --- topics ---------------------------------------------------------------------------------

    def publish(
        self,
        topic_name: str,
        topic_type: str,
        payload: bytes,
        *,
        expiry: float = DEFAULT_EXPIRY_S,
        history_depth: int | None = None,
        timeout: float = DEFAULT_SEND_TIMEOUT_S,
        retain: bool = False,
    ) -> None:
        """Publish ``payload`` on ``topic_name`` with type ``topic_type``.

        Every endpoint subscribed to a matching pattern with the same type gets it exactly once
        and in publish order, unless ``expiry`` seconds pass first (then it is never delivered).
        Matching subscriptions of this endpoint get it too, without the network. The last
        ``history_depth`` messages of the topic (default ``GLUE_HISTORY_DEPTH``; the value given
        applies to the topic from now on) are kept until they expire, for subscribers that
        appear later; with ``retain=True``, until later messages of the topic replace them
        (a quiet sensor's last reading stays for late joiners; see docs/late-joiners.md).
        Returns once queued; waits only while the queue is full.

        Args:
            topic_name: a topic name (see docs/topics.md).
            topic_type: the type subscribers must ask for.
            payload: ``bytes``, ``bytearray`` or ``memoryview`` (copied); text must be encoded
                first, other values go through :meth:`publish_json`.
            expiry: seconds, more than 0 and at most ``MAX_EXPIRY_S`` (one day).
            history_depth: an int from 0 to ``MAX_HISTORY_DEPTH``, or None.
            timeout: seconds (>= 0) to wait for room in the send queue.
            retain: keep it in history until replaced, not only until it expires.

        Raises:
            UsageTypeError: an argument of the wrong type (a ``TypeError``; ``argument`` names it).
            UsageValueError: a bad value (a ``ValueError``): invalid name or type, payload over
                ``GLUE_MAX_MESSAGE_BYTES``, expiry not in (0, one day], negative timeout...
            UsageError: the endpoint is not running.
            BackpressureError: subscribers acknowledge too slowly and the queue stayed full
                ``timeout`` seconds.
        """
        if not (
            type(payload) is bytes
            and type(expiry) is float
            and 0.0 < expiry <= MAX_EXPIRY_S
            and type(timeout) is float
            and 0.0 <= timeout <= MAX_TIMEOUT_S
            and history_depth is None
            and len(payload) <= self._max_message_bytes
        ):
            payload, expiry, timeout, history_depth = _checked_message(
                payload, expiry, timeout, history_depth, self._max_message_bytes, json_hint=True
            )
        if retain is not False:
            _check_retain(retain)
        if not self._started or self._stopped:
            raise UsageError("the endpoint is not running (call start() or use `with`)")
        self._endpoint.publish(
            topic_name,
            topic_type,
            payload,
            expiry_s=expiry,
            history_depth=history_depth,
            timeout=timeout,
            retain=retain,
        )

    def publish_many(
        self,
        topic_name: str,
        topic_type: str,
        payloads: Iterable[bytes],
        *,
        expiry: float = DEFAULT_EXPIRY_S,
        history_depth: int | None = None,
        timeout: float = DEFAULT_SEND_TIMEOUT_S,
        retain: bool = False,
    ) -> None:
        """Publish each of ``payloads`` on ``topic_name``, in order: what as many
        :meth:`publish` calls do, at a fraction of the cost per message (the arguments are
        checked once, and the messages go to the network thread together), for streams of
        small messages. Each is its own message (its own sequence number, delivered to
        subscribers one by one); all share ``expiry``, ``history_depth`` and ``retain``.

        Args:
            payloads: a list (or any iterable but ``bytes`` and text) of ``bytes``,
                ``bytearray`` or ``memoryview``.
            timeout: seconds (>= 0) to wait for room in the send queue, each time it is full.

        Raises:
            UsageTypeError, UsageValueError: as :meth:`publish`; ``argument`` names a bad
                payload by its index (``payloads[3]``). Nothing is published then.
            UsageError: the endpoint is not running.
            BackpressureError: the queue stayed full ``timeout`` seconds; its ``queued`` says
                how many of the messages (the first ones) were published before.
        """
        checked, expiry, timeout, history_depth = _checked_batch(
            payloads, expiry, timeout, history_depth, retain, self._max_message_bytes
        )
        if not self._started or self._stopped:
            raise UsageError("the endpoint is not running (call start() or use `with`)")
        self._endpoint.publish_many(
            topic_name,
            topic_type,
            checked,
            expiry_s=expiry,
            history_depth=history_depth,
            timeout=timeout,
            retain=retain,
        )

    def publish_json(
        self,
        topic_name: str,
        topic_type: str,
        value: Any,
        *,
        expiry: float = DEFAULT_EXPIRY_S,
        history_depth: int | None = None,
        timeout: float = DEFAULT_SEND_TIMEOUT_S,
        retain: bool = False,
    ) -> None:
        """Publish ``value`` encoded with orjson (read it back with ``message.json()``).

        Raises:
            UsageTypeError: ``value`` cannot be encoded as JSON (a ``TypeError``); and as
                :meth:`publish`.
        """
        self.publish(
            topic_name,
            topic_type,
            _encode_json(value),
            expiry=expiry,
            history_depth=history_depth,
            timeout=timeout,
            retain=retain,
        )

    def subscribe(
        self,
        topic_name: str,
        topic_type: str,
        callback: MessageCallback | None = None,
        *,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        queue_bytes: int = DEFAULT_QUEUE_BYTES,
        inline: bool = False,
        gaps: bool = False,
        on_gap: GapCallback | None = None,
        group: str | None = None,
    ) -> Subscription:
        """Receive messages published on topics matching ``topic_name`` with type ``topic_type``.

        ``topic_name`` may be ``#`` (everything), end in ``/#`` (a prefix) or hold ``+`` for
        one segment. With ``callback``, it is called on a callback thread for each message, in
        order (other subscriptions' callbacks run on other threads); without, iterate:
        ``for message in endpoint.subscribe(...)``. Up to ``queue_size`` messages and
        ``queue_bytes`` bytes of payload (64 MiB by default; one larger message still passes an
        empty queue) wait for a slow subscriber; beyond, they are dropped for it, counted and
        reported.

        With ``inline=True`` the callback runs on the network thread as each burst of messages
        arrives: no queue and no thread switch, the lowest latency. It must not block: while it
        runs, this endpoint reads nothing, sends no acks and no announcements, and other
        subscriptions wait. It may publish, send, subscribe, close subscriptions and stop the
        endpoint. An exception it raises is logged and the next message comes.

        Args:
            topic_name: a pattern (see docs/topics.md).
            topic_type: the type of the messages wanted.
            callback: called with each :class:`~glue.events.Message`; None to iterate.
            queue_size: messages that may wait (ints >= 1; unused when inline).
            queue_bytes: payload bytes that may wait (unused when inline).
            inline: run ``callback`` on the network thread (a callback is needed).
            gaps: iteration yields a :class:`~glue.events.Gap`, in order among the messages,
                for each run of messages that will never arrive (docs/history.md).
            on_gap: with a callback, called with each Gap instead (on the callback's thread,
                in order with its messages).
            group: make this subscription a member of that work-queue group
                (docs/work-queues.md): each message goes to one member of each group (the one
                with the most room, chosen by the publisher), ordinary subscriptions still get
                every one. When the callback returns (or raises), the message is done; a member
                removed before that has it given to another, ``Message.redelivered`` set (at
                least once per group). Needs a callback.

        Raises:
            UsageError: the pattern, type, callback, group or a bound is not valid (as
                ``UsageTypeError``/``UsageValueError``), or the endpoint is not running.
        """
        validate_pattern(topic_name)
        validate_topic_type(topic_type)
        if callback is not None:
            _check_callback(callback)
        queue_size, queue_bytes = check_queue_bounds(queue_size, queue_bytes)
        if type(inline) is not bool:
            raise UsageTypeError(
                f"inline must be True or False, not {type(inline).__name__}", argument="inline"
            )
        if inline and callback is None:
            raise UsageValueError("inline=True needs a callback to run", argument="inline")
        _check_gaps(callback, gaps, on_gap)
        group = _check_group(group, callback, gaps)
        self._check_running()
        subscription = Subscription(
            topic_name,
            topic_type,
            callback,
            queue_size=queue_size,
            queue_bytes=queue_bytes,
            pool=self._pool,
            unsubscribe=self._remove_subscription,
            inline=inline,
            on_gap=on_gap,
            gaps=gaps,
            group=group,
            done=None if group is None else self._report_done,
        )

        def register(subscription_id: int) -> None:
            # Under the runtime's lock, so no message for it can be pulled before this.
            subscription.id = subscription_id
            self._subscriptions[subscription_id] = subscription

        try:
            self._endpoint.subscribe(
                topic_name, topic_type, register, gaps=gaps or on_gap is not None, group=group
            )
        except BaseException:
            subscription._end()
            raise
        return subscription

    def keep_history(self, pattern: str, *, depth: int | None = None) -> None:
        """Keep the history of topics matching ``pattern`` for others, as their publishers do:
        the last ``depth`` messages of each publisher on each topic (GLUE_HISTORY_DEPTH when
        None), served to late joiners and to peers back from a partition under the original
        publisher's name and sequence, so they arrive once, in order, even after the publisher
        exited (``docs/history.md``). ``depth=0`` stops keeping the pattern. With
        GLUE_HISTORY_PATH, what is kept survives a restart.

        Raises:
            UsageError: the pattern or depth is not valid (as ``UsageTypeError`` or
                ``UsageValueError``), or the endpoint is not running.
        """
        validate_pattern(pattern, "pattern")
        self._check_running()
        self._endpoint.keep_history(pattern, depth)

    def unsubscribe(self, subscription: Subscription | str) -> None:
        """Close one subscription, or every subscription to the pattern given as a string.

        No callback of it starts after this returns.

        Raises:
            UsageTypeError, UsageValueError: not a subscription or a valid pattern.
        """
        if isinstance(subscription, str):
            validate_pattern(subscription, "subscription")
            self._check_running()
            found = [s for s in list(self._subscriptions.values()) if s.topic_name == subscription]
            for entry in found:
                entry.close()
        elif isinstance(subscription, Subscription):
            subscription.close()
        else:
            raise _not_a_subscription(subscription, "Subscription")

    def _remove_subscription(self, subscription: Subscription) -> None:
        if self._subscriptions.pop(subscription.id, None) is not None and not self._stopped:
            self._endpoint.unsubscribe(subscription.id)

    def _report_done(self, message: Message) -> None:
        if message.job is not None and not self._stopped:
            self._endpoint.report_done(message.source_id, message.job)

    def wait_done(self, *, timeout: float) -> None:
        """Block until every message published here to a work-queue group is done: its
        member's callback returned (or it expired, or was dropped over GLUE_GROUP_HOLD_BYTES).
        Call it before a producer exits: a message not yet done is redelivered only by its
        publisher, if its member goes (docs/work-queues.md).

        Raises:
            TimeoutError: some are still unfinished at members, or waiting for one, after
                ``timeout`` seconds (the message says how many).
            UsageError: the endpoint is not running.
            UsageTypeError, UsageValueError: ``timeout`` is not a number of seconds >= 0.
        """
        timeout = check_timeout(timeout)
        self._check_running()
        self._endpoint.wait_done(timeout)

    # --- messages -------------------------------------------------------------------------------

    def send(
        self,
        payload: bytes,
        *,
        to: Sequence[int | str] | None = None,
        expiry: float = DEFAULT_EXPIRY_S,
        timeout: float = DEFAULT_SEND_TIMEOUT_S,
        message_type: str = "",
    ) -> None:
        """Send ``payload`` to the peers ``to`` (ids; every peer known when it goes out if None).

        Returns as soon as the message is queued (it never waits for the network unless the
        queue is full). Delivered to each peer exactly once and in order, unless ``expiry``
        seconds pass first: a receiver's ``on_message`` callback or ``messages()`` iterator
        does not get it if it expired while waiting in their queue. Receivers see it as a
        :class:`~glue.MessageReceived` with ``message_type``, ``sent_at`` and ``expires_at``.

        Args:
            payload: ``bytes``, ``bytearray`` or ``memoryview`` (copied).
            to: endpoint ids (``peer.endpoint_id``) or peer names (resolved among the peers
                known now), a list or other iterable; None: every peer.
            expiry: seconds, more than 0 and at most ``MAX_EXPIRY_S`` (one day).
            timeout: seconds (>= 0) to wait for room in the send queue.
            message_type: what the receiver sees as ``message.message_type`` (the rules of a
                topic type; ``""``, the default, for none).

        Raises:
            UsageTypeError: an argument of the wrong type (a ``TypeError``; ``argument`` names it).
            UsageValueError: a bad value (a ``ValueError``): payload over
                ``GLUE_MAX_MESSAGE_BYTES``, expiry not in (0, one day], an id out of range...
            UsageError: the endpoint is not running.
            UnknownPeerError: a name in ``to`` is no peer known now (a ``LookupError``).
            BackpressureError: peers acknowledge too slowly and the queue stayed full ``timeout`` s.
        """
        if not (
            type(payload) is bytes
            and type(expiry) is float
            and 0.0 < expiry <= MAX_EXPIRY_S
            and type(timeout) is float
            and 0.0 <= timeout <= MAX_TIMEOUT_S
            and len(payload) <= self._max_message_bytes
        ):
            payload, expiry, timeout, _ = _checked_message(
                payload, expiry, timeout, None, self._max_message_bytes, json_hint=False
            )
        targets = cast("Sequence[int] | None", to)  # (checked below unless the usual [id])
        if to is not None and not _one_id(to):
            with self._changed:
                peers = list(self._peers.values())
            targets = _resolve_names(_check_targets(to) or (), peers)
        if type(message_type) is not str:
            _refuse_message_type(message_type)
        if not self._started or self._stopped:
            raise UsageError("the endpoint is not running (call start() or use `with`)")
        self._endpoint.send(
            payload, to=targets, expiry_s=expiry, timeout=timeout, message_type=message_type
        )

    def send_json(
        self,
        value: Any,
        *,
        to: Sequence[int | str] | None = None,
        expiry: float = DEFAULT_EXPIRY_S,
        timeout: float = DEFAULT_SEND_TIMEOUT_S,
        message_type: str = "",
    ) -> None:
        """Send ``value`` encoded with orjson (read it back with ``message.json()``).

        Raises:
            UsageTypeError: ``value`` cannot be encoded as JSON (a ``TypeError``); and as
                :meth:`send`.
        """
        self.send(
            _encode_json(value), to=to, expiry=expiry, timeout=timeout, message_type=message_type
        )

    def on_message(self, callback: Callable[[MessageReceived], object]) -> Callable[[], None]:
        """Call ``callback(message)`` for each direct message, on the callback threads; returns
        a remover.

        Each sender's messages come in order, one call at a time; different senders' run side
        by side (up to ``GLUE_CALLBACK_THREADS``), so a handler slow for one sender does not
        hold up another's. Messages wait in one queue (``EVENT_QUEUE_SIZE`` messages,
        ``EVENT_QUEUE_BYTES`` bytes); beyond, they are dropped, counted
        (``events_dropped_slow_consumer``) and reported. One that expired while it waited is
        not handed over (``direct_messages_expired``).

        Raises:
            UsageTypeError: ``callback`` is not callable.
        """
        return self._add_callback(MessageReceived, callback)

    def messages(
        self,
        *,
        timeout: float | None = None,
        queue_size: int = EVENT_QUEUE_SIZE,
        queue_bytes: int = EVENT_QUEUE_BYTES,
    ) -> EventIterator[MessageReceived]:
        """Iterate over messages from this call on; ends at stop, at ``close()`` (or the end of
        ``with endpoint.messages() as stream:``), or after ``timeout`` s of quiet.

        Nothing sent after the call is missed; an iterator closed or garbage-collected (dropped
        without being iterated, say) receives nothing more. Up to ``queue_size`` messages and
        ``queue_bytes`` bytes of payload wait; beyond, they are dropped, counted
        (``events_dropped_slow_consumer``) and reported.

        Raises:
            UsageTypeError, UsageValueError: ``timeout`` is not None or a number >= 0, or a
                bound not an int >= 1.
        """
        if timeout is not None:
            timeout = check_timeout(timeout)
        queue_size, queue_bytes = check_queue_bounds(queue_size, queue_bytes)
        return EventIterator(
            self._message_streams,
            what=f"messages() of {self.name}",
            timeout=timeout,
            queue_size=queue_size,
            queue_bytes=queue_bytes,
            sizer=_payload_size,
            ended=self._ended,
            expired=expired_now,
            on_expired=self._count_expired,
        )

    def _count_expired(self, count: int) -> None:
        with self._endpoint.locked():  # (counters are read under it)
            self._endpoint.counters["direct_messages_expired"] += count

    # --- peer events ----------------------------------------------------------------------------

    def on_peer_added(self, callback: PeerCallback) -> Callable[[], None]:
        """Call ``callback(peer)`` on the delivery thread when a peer appears; returns a remover.

        Raises:
            UsageTypeError: ``callback`` is not callable.
        """
        return self._add_callback(PeerAdded, callback)

    def on_peer_removed(self, callback: PeerCallback) -> Callable[[], None]:
        """Call ``callback(peer)`` on the delivery thread when a peer goes; returns a remover.

        Raises:
            UsageTypeError: ``callback`` is not callable.
        """
        return self._add_callback(PeerRemoved, callback)

    def peer_events(self, *, timeout: float | None = None) -> EventIterator[PeerEvent]:
        """Iterate over peer events from this call on; ends at stop, at ``close()``, or after
        ``timeout`` s of quiet (see :meth:`messages`).

        Raises:
            UsageTypeError, UsageValueError: ``timeout`` is not None or a number >= 0.
        """
        if timeout is not None:
            timeout = check_timeout(timeout)
        return EventIterator(
            self._peer_streams,
            what=f"peer_events() of {self.name}",
            timeout=timeout,
            queue_size=EVENT_QUEUE_SIZE,
            queue_bytes=EVENT_QUEUE_BYTES,
            sizer=None,
            ended=self._ended,
        )

    def _ended(self) -> bool:
        return self._stopped

    def _add_callback(self, kind: type[StackEvent], callback: _Callback) -> Callable[[], None]:
        _check_callback(callback)
        if kind is MessageReceived:
            lanes = SenderLanes(
                callback,
                pool=self._pool,
                what=f"on_message of {self.name}",
                queue_size=EVENT_QUEUE_SIZE,
                queue_bytes=EVENT_QUEUE_BYTES,
                on_expired=self._count_expired,
            )
            with self._lock:
                self._message_lanes.append(lanes)

            def remove_lanes() -> None:
                with self._lock:
                    if lanes in self._message_lanes:
                        self._message_lanes.remove(lanes)
                lanes.close()

            return remove_lanes
        entry = (kind, callback)
        with self._lock:
            self._callbacks.append(entry)

        def remove() -> None:
            with self._lock:
                if entry in self._callbacks:
                    self._callbacks.remove(entry)

        return remove

    def _on_events(self, events: list[StackEvent]) -> None:
        """On the network thread: hand the burst's events over without blocking."""
        with self._lock:
            callbacks = list(self._callbacks)
            message_lanes = tuple(self._message_lanes)
        # Copies: an iterator garbage-collected meanwhile leaves the set.
        message_streams = tuple(self._message_streams)
        peer_streams = tuple(self._peer_streams)
        batch: list[tuple[tuple[_Callback, ...], Sequence[object]]] = []
        messages: list[MessageReceived] = []  # for the on_message callbacks' lanes
        removed: list[int] = []  # peers gone: their lanes go once empty
        dropped = 0
        size = 0
        changed = False  # peers or their interest
        # Each subscription's messages of the burst go to it in one call (one lock, one wake-up).
        per_subscription: dict[int, list[Message | Gap]] = {}
        for event in events:
            if isinstance(event, TopicDelivery):
                _collect(per_subscription, event)
                continue
            if isinstance(event, InterestChanged):
                changed = True
                continue
            if isinstance(event, TopicGap):  # in order with the messages around it
                _collect_gap(per_subscription, event)
                continue
            if isinstance(event, ReplyArrived | RequestArrived):
                self._requests.handle(event)
                continue
            if isinstance(event, MessageReceived):
                if message_lanes:
                    messages.append(event)
                for message_stream in message_streams:
                    if not message_stream.offer(event):
                        dropped += 1
                continue
            changed = True
            with self._changed:
                if isinstance(event, PeerAdded):
                    self._peers[event.peer.endpoint_id] = event.peer
                else:
                    self._peers.pop(event.peer.endpoint_id, None)
                    removed.append(event.peer.endpoint_id)
            peer_callbacks = tuple(cb for kind, cb in callbacks if isinstance(event, kind))
            batch.append((peer_callbacks, [event.peer]))
            for stream in peer_streams:
                if not stream.offer(event):
                    dropped += 1
        if messages:
            for lanes in message_lanes:
                dropped += lanes.offer(messages)
        for peer_id in removed:
            for lanes in message_lanes:
                lanes.forget(peer_id)
        if changed:
            with self._changed:
                self._changed.notify_all()
        # (inline callbacks run here, on this thread, the runtime's lock free)
        lost = _hand_over(per_subscription, self._subscriptions)
        batch = [(cbs, items) for cbs, items in batch if cbs]
        if batch:
            count = sum(len(items) for _, items in batch)
            with self._lock:
                # (one burst may pass an empty queue whatever its size, as one message may)
                full = self._pending and (
                    self._pending + count > EVENT_QUEUE_SIZE
                    or self._pending_bytes + size > EVENT_QUEUE_BYTES
                )
                if not full:
                    self._pending += count
                    self._pending_bytes += size
            if full:
                self._callback_drops += count
                dropped += count
                if crossed_power_of_ten(self._callback_drops - count, self._callback_drops):
                    logger.warning(
                        "callbacks of %s are not keeping up: %d events dropped (queue of %d "
                        "events or %d bytes full)",
                        self.name,
                        self._callback_drops,
                        EVENT_QUEUE_SIZE,
                        EVENT_QUEUE_BYTES,
                    )
            else:
                self._deliveries.put(batch)
        if dropped or lost:
            with self._endpoint.locked():  # (counters are read under it)
                counters = self._endpoint.counters
                if lost:
                    counters["subscription_messages_dropped"] += lost
                if dropped:
                    counters["events_dropped_slow_consumer"] += dropped

    def _deliver(self) -> None:
        while (batch := self._deliveries.get()) is not None:
            count = size = 0
            for callbacks, items in batch:
                count += len(items)
                for item in items:
                    if isinstance(item, MessageReceived):
                        size += len(item.payload)
                    for callback in callbacks:
                        if self._abandoned:  # stop() gave up on us: start nothing more
                            return
                        self._delivering = callback
                        try:
                            callback(item)
                        except Exception:
                            logger.exception("callback %r failed", callback)
                        finally:
                            self._delivering = None
            with self._lock:
                self._pending -= count
                self._pending_bytes -= size

    # --- request/reply ---------------------------------------------------------------------------

    def serve(
        self, name: str, handler: Handler, *, queue_size: int = DEFAULT_SERVE_QUEUE_SIZE
    ) -> Service:
        """Answer requests to ``name`` with ``handler(request)`` (docs/request-reply.md).

        ``name`` may be a pattern, as for ``subscribe`` (``robots/+/move``). The handler gets a
        :class:`~glue.events.Request` and returns the reply's payload (``bytes``; None for an
        empty one); what it raises reaches the requester as a :class:`~glue.errors.RemoteError`
        (type name and message). Handlers run on the callback pool, never on the network
        thread: one requester's requests in order, one at a time, different requesters'
        concurrently. A request whose deadline passed while it waited is never started
        (counted in ``service.expired`` and ``requests_expired_before_start``). Peers learn of
        the name at once (with the interest they know of the subscriptions).

        Args:
            name: a topic name or pattern.
            handler: called with each request.
            queue_size: requests that may wait for the handler; beyond, a request is answered
                at once with a RemoteError of type ``QueueFull``.

        Raises:
            UsageError: a bad name, handler or bound (as ``UsageTypeError`` or
                ``UsageValueError``), or the endpoint is not running.
        """
        queue_size = check_int(queue_size, "queue_size", minimum=1)
        self._check_running()
        return self._requests.serve(name, handler, queue_size=queue_size)

    def request(self, name: str, payload: bytes, *, timeout: float) -> Reply:
        """Ask one endpoint serving ``name`` and wait for its reply (docs/request-reply.md).

        The responder is chosen among the peers that serve a matching pattern: the one with
        the fewest requests outstanding from here (round robin among equals). The request
        travels with the time it has left (``timeout``); it runs at most once, and never after
        that. Before any peer is known (just after start), it waits for discovery, up to the
        timeout.

        Args:
            name: a topic name (no wildcard).
            payload: ``bytes``, ``bytearray`` or ``memoryview`` (copied).
            timeout: seconds, more than 0 and at most one day.

        Returns:
            The :class:`~glue.events.Reply`: its payload, who answered, when.

        Raises:
            NoResponderError: no endpoint serves ``name`` (known at once from the peers'
                interest; while no peer is known, at the timeout).
            RemoteError: the handler raised (``remote_type``, ``remote_message``).
            TimeoutError: no reply within ``timeout`` seconds.
            DeliveryError: the responder left before answering (the request may have run).
            UsageError: a bad argument, or the endpoint is not running.
        """
        self._check_running()
        return self._requests.request(name, payload, timeout)

    def request_all(
        self, name: str, payload: bytes, *, timeout: float
    ) -> list[Reply | RemoteError]:
        """Ask every endpoint serving ``name``; gather their answers until each has answered
        or ``timeout`` seconds passed, in the order they arrived: a :class:`~glue.events.Reply`
        each, or the :class:`~glue.errors.RemoteError` of a handler that raised (returned, not
        raised). Those that did not answer in time are missing from the list.

        Raises:
            NoResponderError: no endpoint serves ``name`` (as :meth:`request`).
            UsageError: a bad argument, or the endpoint is not running.
        """
        self._check_running()
        return self._requests.request_all(name, payload, timeout)

    def responders(self, name: str) -> list[Peer]:
        """The peers serving ``name`` now (those ``request`` chooses among), by name.

        Raises:
            UsageTypeError, UsageValueError: the name is not valid.
        """
        validate_topic_name(name, "name")
        self._check_running()
        with self._endpoint.locked():
            ids = self._endpoint.responders(name)
        with self._changed:
            return self._subscribers(ids)

    def wait_for_responders(self, name: str, count: int = 1, *, timeout: float) -> list[Peer]:
        """Block until at least ``count`` peers serve ``name``.

        Raises:
            UsageError: the name is not valid, or the endpoint is not running.
            TimeoutError: fewer responders within ``timeout`` seconds.
        """
        validate_topic_name(name, "name")
        count, timeout = _check_wait(count, timeout)
        self._check_running()
        deadline = time.monotonic() + timeout
        endpoint = self._endpoint
        with self._changed:
            while True:
                with endpoint.locked():  # (inside the condition's lock, as wait_for_subscribers)
                    ids = endpoint.responders(name)
                found = self._subscribers(ids)
                if len(found) >= count:
                    return found
                self._check_running()
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"{len(found)} of {count} responders to {name!r} after {timeout} s"
                    )
                self._changed.wait(remaining)

    # --- models ---------------------------------------------------------------------------------

    def model(self, name: str) -> Model:
        """The replicated document ``name``, shared by every endpoint that opens it (see
        docs/model.md): opened here on the first call, the same object after. Edit it inside
        ``with model.transaction():``.

        Raises:
            UsageTypeError, UsageValueError: ``name`` is not a topic name of at most 200
                characters.
            UsageError: the endpoint is not running.
        """
        from glue.model import open_model  # pycrdt is imported only by those who use it

        return open_model(self, name)

    def _check_running(self) -> None:
        if not self._started or self._stopped:
            raise UsageError("the endpoint is not running (call start() or use `with`)")
