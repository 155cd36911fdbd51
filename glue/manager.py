"""The public API: ``EndpointManager`` (blocking) and ``AsyncEndpointManager`` (asyncio).

Both are thin: one :class:`~glue.endpoint.Endpoint` does the work underneath. The asyncio manager
runs it in the caller's loop; the blocking manager runs that same asyncio manager in one background
thread and hands calls to it thread-safely. User callbacks never run inside the network handlers.
Subscriptions (:mod:`glue.subscription`) each have a bounded queue: the blocking manager runs
their callbacks on a pool of ``GLUE_CALLBACK_THREADS`` threads (one subscription on one thread at
a time, in order), the asyncio manager in one task per subscription on the caller's loop (which is
also the network's: a callback that blocks that loop stalls acks, so make it ``async`` or quick).
Direct-message and peer callbacks run on one delivery thread (blocking) or via ``call_soon``
(asyncio). Overflow is counted and reported, never silent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterator,
    Mapping,
    Sequence,
)
from concurrent.futures import Future
from types import TracebackType
from typing import Any, Final, Protocol, Self, TypeVar

import orjson

from glue.endpoint import Endpoint
from glue.errors import GlueError, UsageError
from glue.events import (
    InterestChanged,
    Message,
    MessageReceived,
    Peer,
    PeerAdded,
    PeerEvent,
    PeerRemoved,
    StackEvent,
    TopicDelivery,
)
from glue.settings import GlueSettings, load_settings
from glue.subscription import (
    DEFAULT_QUEUE_SIZE,
    AsyncMessageCallback,
    AsyncSubscription,
    CallbackPool,
    MessageCallback,
    Subscription,
)
from glue.topics import validate_pattern, validate_topic_name, validate_topic_type

__all__ = ["DEFAULT_EXPIRY_S", "DEFAULT_SEND_TIMEOUT_S", "AsyncEndpointManager", "EndpointManager"]

logger = logging.getLogger(__name__)

#: Bound of every event queue between the network loop and user code (events, not bytes).
EVENT_QUEUE_SIZE: Final = 100_000
DEFAULT_EXPIRY_S: Final = 5.0
DEFAULT_SEND_TIMEOUT_S: Final = 5.0
_START_TIMEOUT_S: Final = 30.0

T = TypeVar("T")
PeerCallback = Callable[[Peer], object]
_Callback = Callable[[Any], object]


class AsyncEndpointManager:
    """A glue endpoint for asyncio code.

    ``async with AsyncEndpointManager.from_env() as endpoint:`` starts it in the running loop and
    stops it (saying goodbye to peers) on exit.
    """

    def __init__(self, settings: GlueSettings | None = None) -> None:
        self.settings = settings if settings is not None else load_settings()
        self._endpoint = Endpoint(self.settings)
        self._peers: dict[int, Peer] = {}
        self._callbacks: list[tuple[type[StackEvent], _Callback]] = []
        self._peer_streams: set[asyncio.Queue[PeerEvent | None]] = set()
        self._message_streams: set[asyncio.Queue[MessageReceived | None]] = set()
        self._subscriptions: dict[int, AsyncSubscription] = {}
        self._changed: asyncio.Future[None] | None = None
        self._endpoint.add_listener(self._on_events)

    @classmethod
    def from_env(cls, **overrides: Any) -> Self:
        """Build from ``GLUE_*`` variables and ``.env``; keyword arguments override them.

        Raises:
            ConfigError: a variable has a bad value (the message names it).
        """
        return cls(load_settings(**overrides))

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Open sockets and begin discovery.

        Raises:
            ConfigError: an interface or address in the settings cannot be used.
        """
        self._changed = asyncio.get_running_loop().create_future()
        await self._endpoint.start()

    async def stop(self) -> None:
        """Say goodbye, close sockets, end every event iteration. Idempotent."""
        await self._endpoint.stop()
        streams: list[asyncio.Queue[Any]] = [*self._peer_streams, *self._message_streams]
        for stream in streams:
            _put_bounded(stream, None, self._endpoint)
        subscriptions = list(self._subscriptions.values())
        self._subscriptions.clear()
        for subscription in subscriptions:
            subscription._end()
        for subscription in subscriptions:
            await subscription._wait_closed()
        self._notify()

    aclose = stop

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    # --- identity and state -------------------------------------------------------------------

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
        """
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

    def subscribers(self, topic_name: str) -> list[Peer]:
        """The peers subscribed to ``topic_name`` now (a publish on it goes to them), by name."""
        peers = self._peers
        found = [peers[i] for i in self._endpoint.subscribers(topic_name) if i in peers]
        return sorted(found, key=lambda p: p.name)

    async def wait_for_subscribers(
        self,
        topic_name: str,
        count: int = 1,
        *,
        timeout: float,  # noqa: ASYNC109 - the same signature as the blocking twin
    ) -> list[Peer]:
        """Wait until at least ``count`` peers subscribe to ``topic_name`` (its messages reach
        them from then on; what was published before reaches them only through history).

        Raises:
            UsageError: the name is not valid, or the endpoint is not running.
            TimeoutError: fewer subscribers within ``timeout`` seconds.
        """
        validate_topic_name(topic_name)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            found = self.subscribers(topic_name)
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
        """
        await self._endpoint.flush(timeout)

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
    ) -> None:
        """Publish ``payload`` on ``topic_name``: see :meth:`EndpointManager.publish`."""
        waiting = self._endpoint.try_publish(
            topic_name, topic_type, payload, expiry_s=expiry, history_depth=history_depth
        )
        if waiting is not None:
            await self._endpoint.wait_to_queue(waiting, timeout)

    async def publish_json(
        self,
        topic_name: str,
        topic_type: str,
        value: Any,
        *,
        expiry: float = DEFAULT_EXPIRY_S,
        history_depth: int | None = None,
        timeout: float = DEFAULT_SEND_TIMEOUT_S,  # noqa: ASYNC109 - same as the blocking twin
    ) -> None:
        """Publish ``value`` encoded with orjson (read it back with ``message.json()``).

        Raises:
            TypeError: ``value`` cannot be encoded as JSON.
        """
        await self.publish(
            topic_name,
            topic_type,
            orjson.dumps(value),
            expiry=expiry,
            history_depth=history_depth,
            timeout=timeout,
        )

    def subscribe(
        self,
        topic_name: str,
        topic_type: str,
        callback: AsyncMessageCallback | None = None,
        *,
        queue_size: int = DEFAULT_QUEUE_SIZE,
    ) -> AsyncSubscription:
        """Receive messages published on topics matching ``topic_name`` with type ``topic_type``.

        ``topic_name`` may be ``#`` (everything), end in ``/#`` (a prefix) or hold ``+`` for
        one segment. With ``callback`` (plain or ``async``), it is called for each message, in
        order; without, iterate: ``async for message in endpoint.subscribe(...)``. Messages
        published here reach matching subscriptions here too, without the network.

        Raises:
            UsageError: the pattern or type is not valid, or the endpoint is not running.
        """
        validate_pattern(topic_name)
        validate_topic_type(topic_type)
        subscription = AsyncSubscription(
            topic_name,
            topic_type,
            callback,
            queue_size=queue_size,
            unsubscribe=self._remove_subscription,
        )
        try:
            subscription.id = self._endpoint.subscribe(topic_name, topic_type)
        except BaseException:
            subscription._end()
            raise
        self._subscriptions[subscription.id] = subscription
        return subscription

    def unsubscribe(self, subscription: AsyncSubscription | str) -> None:
        """Close one subscription, or every subscription to the pattern given as a string."""
        if isinstance(subscription, str):
            for entry in list(self._subscriptions.values()):
                if entry.topic_name == subscription:
                    entry.close()
        else:
            subscription.close()

    def _remove_subscription(self, subscription: AsyncSubscription) -> None:
        if self._subscriptions.pop(subscription.id, None) is not None:
            self._endpoint.unsubscribe(subscription.id)

    # --- messages -------------------------------------------------------------------------------

    async def send(
        self,
        payload: bytes,
        *,
        to: Sequence[int] | None = None,
        expiry: float = DEFAULT_EXPIRY_S,
        timeout: float = DEFAULT_SEND_TIMEOUT_S,  # noqa: ASYNC109 - same as the blocking twin
    ) -> None:
        """Send ``payload`` to the peers ``to`` (ids; every peer known when it goes out if None).

        Delivered to each peer exactly once and in order, unless ``expiry`` seconds pass first.

        Raises:
            BackpressureError: peers acknowledge too slowly and the queue stayed full ``timeout`` s.
            UsageError: the payload exceeds ``GLUE_MAX_MESSAGE_BYTES`` or the endpoint is stopped.
        """
        # The usual path queues at once, without a coroutine more per message.
        waiting = self._endpoint.try_send(payload, to=to, expiry_s=expiry)
        if waiting is not None:
            await self._endpoint.wait_to_queue(waiting, timeout)

    def on_message(self, callback: Callable[[MessageReceived], object]) -> Callable[[], None]:
        """Call ``callback(message)`` (plain or ``async``) for each message; returns a remover."""
        return self._add_callback(MessageReceived, callback)

    def messages(self) -> AsyncIterator[MessageReceived]:
        """``async for message in endpoint.messages()``: every message from now until stop."""
        return _iterate(self._message_streams)

    # --- peer events ----------------------------------------------------------------------------

    def on_peer_added(self, callback: PeerCallback) -> Callable[[], None]:
        """Call ``callback(peer)`` (plain or ``async``) when a peer appears; returns a remover."""
        return self._add_callback(PeerAdded, callback)

    def on_peer_removed(self, callback: PeerCallback) -> Callable[[], None]:
        """Call ``callback(peer)`` (plain or ``async``) when a peer goes away; returns a remover."""
        return self._add_callback(PeerRemoved, callback)

    def peer_events(self) -> AsyncIterator[PeerEvent]:
        """``async for event in endpoint.peer_events()``: every event from now until stop."""
        return _iterate(self._peer_streams)

    def _add_callback(self, kind: type[StackEvent], callback: _Callback) -> Callable[[], None]:
        entry = (kind, callback)
        self._callbacks.append(entry)
        return lambda: self._callbacks.remove(entry) if entry in self._callbacks else None

    def _on_events(self, events: list[StackEvent]) -> None:
        """Runs inside the network loop's handlers: only cheap, non-blocking work here."""
        loop = asyncio.get_running_loop()
        changed = False
        batch: list[tuple[_Callback, object]] = []
        message_callbacks = [cb for kind, cb in self._callbacks if kind is MessageReceived]
        message_streams = self._message_streams
        wants_messages = bool(message_callbacks or message_streams)
        # Each subscription's messages of the burst go to it in one call (one lock, one wake-up).
        per_subscription: dict[int, list[Message]] = {}
        for event in events:
            if isinstance(event, MessageReceived):  # the most common first (Python pays per check)
                if not wants_messages:
                    continue
                for stream in message_streams:
                    _put_bounded(stream, event, self._endpoint)
                batch.extend((callback, event) for callback in message_callbacks)
                continue
            if isinstance(event, TopicDelivery):
                _collect(per_subscription, event)
                continue
            if isinstance(event, InterestChanged):
                changed = True
                continue
            changed = True
            peer = event.peer
            if isinstance(event, PeerAdded):
                self._peers[peer.endpoint_id] = peer
            else:
                self._peers.pop(peer.endpoint_id, None)
            for peer_stream in self._peer_streams:
                _put_bounded(peer_stream, event, self._endpoint)
            batch.extend((cb, peer) for kind, cb in self._callbacks if isinstance(event, kind))
        _hand_over(per_subscription, self._subscriptions, self._endpoint)
        if batch:
            loop.call_soon(_run_callbacks, batch)  # one hop for the burst, in order
        if changed:
            self._notify()

    def _notify(self) -> None:
        if self._changed is not None and not self._changed.done():
            self._changed.set_result(None)
            self._changed = asyncio.get_running_loop().create_future()


def _iterate(streams: set[asyncio.Queue[T | None]]) -> AsyncIterator[T]:
    """Items put in a new bounded queue registered in ``streams``, until ``None`` (stop).

    The queue is registered now, not at the first ``__anext__``, so nothing that happens between
    the call and the first iteration is missed.
    """
    stream: asyncio.Queue[T | None] = asyncio.Queue(EVENT_QUEUE_SIZE)
    streams.add(stream)

    async def items() -> AsyncIterator[T]:
        try:
            while (item := await stream.get()) is not None:
                yield item
        finally:
            streams.discard(stream)

    return items()


class _Queued(Protocol):
    def _put_many(self, messages: list[Message]) -> int: ...


def _collect(per_subscription: dict[int, list[Message]], delivery: TopicDelivery) -> None:
    """Add ``delivery``'s messages to the burst of each subscription it is for."""
    for subscription_id in delivery.subscriptions:
        found = per_subscription.get(subscription_id)
        if found is None:
            per_subscription[subscription_id] = list(delivery.messages)
        else:
            found.extend(delivery.messages)


def _hand_over(
    per_subscription: dict[int, list[Message]],
    subscriptions: Mapping[int, _Queued],
    endpoint: Endpoint,
) -> None:
    """Queue each subscription's burst in one call; count what full queues dropped."""
    for subscription_id, delivered in per_subscription.items():
        entry = subscriptions.get(subscription_id)
        if entry is not None:
            lost = entry._put_many(delivered)
            if lost:
                endpoint.counters["subscription_messages_dropped"] += lost


_callback_tasks: set[asyncio.Future[Any]] = set()


def _run_callbacks(batch: list[tuple[_Callback, object]]) -> None:
    for callback, argument in batch:
        try:
            result = callback(argument)
            if isinstance(result, Awaitable):
                task = asyncio.ensure_future(result)
                _callback_tasks.add(task)  # keep a reference until it finishes
                task.add_done_callback(_callback_tasks.discard)
        except Exception:
            logger.exception("callback %r failed", callback)


def _put_bounded(stream: asyncio.Queue[Any], item: object, endpoint: Endpoint) -> None:
    try:
        stream.put_nowait(item)
    except asyncio.QueueFull:
        endpoint.counters["events_dropped_slow_consumer"] += 1
        logger.warning("an event iterator is not keeping up; dropped an event")


class EndpointManager:
    """A glue endpoint for blocking code: the asyncio runtime runs in one background thread.

    ``with EndpointManager.from_env() as endpoint:`` starts it and stops it on exit. Callbacks run
    on a delivery thread, never on the network thread, in the order the events happened.
    """

    def __init__(self, settings: GlueSettings | None = None) -> None:
        self._async = AsyncEndpointManager(settings)
        self.settings = self._async.settings
        self._endpoint = self._async._endpoint
        # Each hand-over to the delivery thread costs thread switches: under load, fewer and
        # larger ones (see Endpoint.coalesce_events).
        self._endpoint.coalesce_events = True
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        # Batches of (callbacks, items) for the delivery thread; ``_pending`` bounds the items.
        self._deliveries: queue.SimpleQueue[
            list[tuple[tuple[_Callback, ...], Sequence[object]]] | None
        ] = queue.SimpleQueue()
        self._pending = 0
        self._delivery_thread: threading.Thread | None = None
        self._callbacks: list[tuple[type[StackEvent], _Callback]] = []
        # SimpleQueue: put and get are C calls (queue.Queue runs a Condition in Python), which
        # is most of the hand-off to a thread waiting in ``messages()``. Bounded by its size.
        self._peer_streams: set[queue.SimpleQueue[PeerEvent | None]] = set()
        self._message_streams: set[queue.SimpleQueue[MessageReceived | None]] = set()
        self._subscriptions: dict[int, Subscription] = {}  # touched on the network thread only
        self._pool = CallbackPool(self.settings.callback_threads, self._async.name)
        self._lock = threading.Lock()
        self._stopped = False

    @classmethod
    def from_env(cls, **overrides: Any) -> Self:
        """Build from ``GLUE_*`` variables and ``.env``; keyword arguments override them.

        Raises:
            ConfigError: a variable has a bad value (the message names it).
        """
        return cls(load_settings(**overrides))

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the network thread and the endpoint.

        Raises:
            ConfigError: an interface or address in the settings cannot be used.
            UsageError: already started.
        """
        if self._thread is not None:
            raise UsageError("this EndpointManager was already started")
        loop = self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=loop.run_forever, name=f"glue-net-{self._async.name}", daemon=True
        )
        self._thread.start()
        self._delivery_thread = threading.Thread(
            target=self._deliver, name=f"glue-callbacks-{self._async.name}", daemon=True
        )
        self._delivery_thread.start()
        self._endpoint.add_listener(self._on_events)
        try:
            self._call(self._async.start(), timeout=_START_TIMEOUT_S)
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Say goodbye to peers, close sockets, join both threads. Idempotent."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        loop, thread = self._loop, self._thread
        if loop is not None and thread is not None and thread.is_alive():
            future = asyncio.run_coroutine_threadsafe(self._async.stop(), loop)
            with contextlib.suppress(GlueError, TimeoutError):
                future.result(_START_TIMEOUT_S)
            # DNS lookups ran on the loop's default executor: join its threads too.
            drained = asyncio.run_coroutine_threadsafe(loop.shutdown_default_executor(), loop)
            with contextlib.suppress(TimeoutError):
                drained.result(_START_TIMEOUT_S)
            loop.call_soon_threadsafe(loop.stop)
            thread.join()
            loop.close()
        streams: list[queue.SimpleQueue[Any]] = [*self._peer_streams, *self._message_streams]
        for stream in streams:
            _put_thread_bounded(stream, None)
        subscriptions = list(self._subscriptions.values())
        self._subscriptions.clear()
        for subscription in subscriptions:
            subscription._end()
        self._pool.stop()
        if self._delivery_thread is not None:
            self._deliveries.put(None)
            if self._delivery_thread is not threading.current_thread():
                self._delivery_thread.join()

    close = stop

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # --- identity and state -------------------------------------------------------------------

    @property
    def endpoint_id(self) -> int:
        """This endpoint's id (``GLUE_ENDPOINT_ID`` or random)."""
        return self._async.endpoint_id

    @property
    def name(self) -> str:
        """This endpoint's unique name."""
        return self._async.name

    @property
    def data_address(self) -> tuple[str, int]:
        """The ``host:port`` the data socket is bound to (after start)."""
        return self._async.data_address

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        """Where Prometheus metrics are served (``GLUE_METRICS_ADDRESS``, port resolved), if."""
        return self._async.metrics_address

    def peers(self) -> list[Peer]:
        """The peers known now, ordered by name."""
        return self._call(self._async.peers())

    def counters(self) -> dict[str, int]:
        """Datagrams, bytes, drops by reason, and every layer's counters, in total."""
        return self._call(_as_coroutine(self._async.counters))

    def peer_counters(self) -> dict[int, dict[str, int]]:
        """For each peer id: frames sent, resent, acked, delivered, duplicates dropped, expired,
        data datagrams and bytes sent and received."""
        return self._call(_as_coroutine(self._async.peer_counters))

    def wait_for_peers(
        self, count: int, *, timeout: float, where: Callable[[Peer], bool] | None = None
    ) -> list[Peer]:
        """Block until at least ``count`` peers (matching ``where``) are known.

        Raises:
            TimeoutError: not enough peers within ``timeout`` seconds.
        """
        return self._call(self._async.wait_for_peers(count, timeout=timeout, where=where))

    def subscribers(self, topic_name: str) -> list[Peer]:
        """The peers subscribed to ``topic_name`` now (a publish on it goes to them), by name."""
        return self._call(_as_coroutine(lambda: self._async.subscribers(topic_name)))

    def wait_for_subscribers(
        self, topic_name: str, count: int = 1, *, timeout: float
    ) -> list[Peer]:
        """Block until at least ``count`` peers subscribe to ``topic_name`` (its messages reach
        them from then on; what was published before reaches them only through history).

        Raises:
            UsageError: the name is not valid, or the endpoint is not running.
            TimeoutError: fewer subscribers within ``timeout`` seconds.
        """
        return self._call(self._async.wait_for_subscribers(topic_name, count, timeout=timeout))

    def flush(self, *, timeout: float) -> None:
        """Block until everything published or sent so far is acknowledged by the peers it went
        to (or expired first): call before exiting a short-lived publisher.

        Raises:
            DeliveryError: a peer that messages went to is gone with some unacknowledged: it
                left, restarted, or has been silent for a discovery timeout (``peers`` and
                ``unacknowledged`` name them and count the messages). A peer that left or
                restarted is reported once; a silent one while its messages are held.
            TimeoutError: still unacknowledged after ``timeout`` seconds.
        """
        self._call(self._async.flush(timeout=timeout))

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
    ) -> None:
        """Publish ``payload`` on ``topic_name`` with type ``topic_type``.

        Every endpoint subscribed to a matching pattern with the same type gets it exactly once
        and in publish order, unless ``expiry`` seconds pass first (then it is never delivered).
        Matching subscriptions of this endpoint get it too, without the network. The last
        ``history_depth`` messages of the topic (default ``GLUE_HISTORY_DEPTH``; the value given
        applies to the topic from now on) are kept until they expire, for subscribers that
        appear later. Returns once queued; waits only while the queue is full.

        Raises:
            UsageError: invalid name, type or depth; payload over ``GLUE_MAX_MESSAGE_BYTES``;
                expiry not positive; endpoint not running.
            BackpressureError: subscribers acknowledge too slowly and the queue stayed full
                ``timeout`` seconds.
        """
        if self._loop is None or self._stopped:
            raise UsageError("the endpoint is not running (call start() or use `with`)")
        self._endpoint.publish_threadsafe(
            topic_name,
            topic_type,
            payload,
            expiry_s=expiry,
            history_depth=history_depth,
            timeout=timeout,
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
    ) -> None:
        """Publish ``value`` encoded with orjson (read it back with ``message.json()``).

        Raises:
            TypeError: ``value`` cannot be encoded as JSON (and as :meth:`publish`).
        """
        self.publish(
            topic_name,
            topic_type,
            orjson.dumps(value),
            expiry=expiry,
            history_depth=history_depth,
            timeout=timeout,
        )

    def subscribe(
        self,
        topic_name: str,
        topic_type: str,
        callback: MessageCallback | None = None,
        *,
        queue_size: int = DEFAULT_QUEUE_SIZE,
    ) -> Subscription:
        """Receive messages published on topics matching ``topic_name`` with type ``topic_type``.

        ``topic_name`` may be ``#`` (everything), end in ``/#`` (a prefix) or hold ``+`` for
        one segment. With ``callback``, it is called on a callback thread for each message, in
        order (other subscriptions' callbacks run on other threads); without, iterate:
        ``for message in endpoint.subscribe(...)``. Up to ``queue_size`` messages wait for a slow
        subscriber; beyond, they are dropped for it, counted and reported.

        Raises:
            UsageError: the pattern or type is not valid, or the endpoint is not running.
        """
        validate_pattern(topic_name)
        validate_topic_type(topic_type)
        subscription = Subscription(
            topic_name,
            topic_type,
            callback,
            queue_size=queue_size,
            pool=self._pool,
            unsubscribe=self._remove_subscription,
        )

        def register() -> None:
            # On the network thread, so no message can arrive before it is registered.
            subscription.id = self._endpoint.subscribe(topic_name, topic_type)
            self._subscriptions[subscription.id] = subscription

        self._call(_as_coroutine(register))
        return subscription

    def unsubscribe(self, subscription: Subscription | str) -> None:
        """Close one subscription, or every subscription to the pattern given as a string.

        No callback of it starts after this returns."""
        if isinstance(subscription, str):
            subscriptions = self._subscriptions
            found = self._call(
                _as_coroutine(
                    lambda: [s for s in subscriptions.values() if s.topic_name == subscription]
                )
            )
            for entry in found:
                entry.close()
        else:
            subscription.close()

    def _remove_subscription(self, subscription: Subscription) -> None:
        def remove() -> None:
            if self._subscriptions.pop(subscription.id, None) is not None:
                self._endpoint.unsubscribe(subscription.id)

        if self._loop is not None and not self._stopped:
            with contextlib.suppress(UsageError):
                self._call(_as_coroutine(remove))

    # --- messages -------------------------------------------------------------------------------

    def send(
        self,
        payload: bytes,
        *,
        to: Sequence[int] | None = None,
        expiry: float = DEFAULT_EXPIRY_S,
        timeout: float = DEFAULT_SEND_TIMEOUT_S,
    ) -> None:
        """Send ``payload`` to the peers ``to`` (ids; every peer known when it goes out if None).

        Returns as soon as the message is queued (it never waits for the network unless the
        queue is full). Delivered to each peer exactly once and in order, unless ``expiry``
        seconds pass first.

        Raises:
            BackpressureError: peers acknowledge too slowly and the queue stayed full ``timeout`` s.
            UsageError: the payload exceeds ``GLUE_MAX_MESSAGE_BYTES`` or the endpoint is stopped.
        """
        if self._loop is None or self._stopped:
            raise UsageError("the endpoint is not running (call start() or use `with`)")
        self._endpoint.send_threadsafe(payload, to=to, expiry_s=expiry, timeout=timeout)

    def on_message(self, callback: Callable[[MessageReceived], object]) -> Callable[[], None]:
        """Call ``callback(message)`` on the delivery thread for each message; returns a remover."""
        return self._add_callback(MessageReceived, callback)

    def messages(self, *, timeout: float | None = None) -> Iterator[MessageReceived]:
        """Iterate over messages from now on; ends at stop, or after ``timeout`` s of quiet."""
        return self._iterate(self._message_streams, timeout)

    # --- peer events ----------------------------------------------------------------------------

    def on_peer_added(self, callback: PeerCallback) -> Callable[[], None]:
        """Call ``callback(peer)`` on the delivery thread when a peer appears; returns a remover."""
        return self._add_callback(PeerAdded, callback)

    def on_peer_removed(self, callback: PeerCallback) -> Callable[[], None]:
        """Call ``callback(peer)`` on the delivery thread when a peer goes; returns a remover."""
        return self._add_callback(PeerRemoved, callback)

    def peer_events(self, *, timeout: float | None = None) -> Iterator[PeerEvent]:
        """Iterate over peer events from now on; ends at stop, or after ``timeout`` s of quiet."""
        return self._iterate(self._peer_streams, timeout)

    def _iterate(
        self, streams: set[queue.SimpleQueue[T | None]], timeout: float | None
    ) -> Iterator[T]:
        # Registered now, not at the first next(): events right after the call are not missed.
        stream: queue.SimpleQueue[T | None] = queue.SimpleQueue()
        streams.add(stream)

        def items() -> Iterator[T]:
            try:
                while True:
                    try:
                        item = stream.get(timeout=timeout)
                    except queue.Empty:
                        return
                    if item is None:
                        return
                    yield item
            finally:
                streams.discard(stream)

        return items()

    def _add_callback(self, kind: type[StackEvent], callback: _Callback) -> Callable[[], None]:
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
        message_callbacks = tuple(cb for kind, cb in callbacks if kind is MessageReceived)
        batch: list[tuple[tuple[_Callback, ...], Sequence[object]]] = []
        messages: list[MessageReceived] = []
        dropped = 0
        # Each subscription's messages of the burst go to it in one call (one lock, one wake-up).
        per_subscription: dict[int, list[Message]] = {}
        for event in events:
            if isinstance(event, TopicDelivery):
                _collect(per_subscription, event)
                continue
            if isinstance(event, InterestChanged):
                continue
            if isinstance(event, MessageReceived):
                messages.append(event)
                for message_stream in list(self._message_streams):
                    if not _put_thread_bounded(message_stream, event):
                        dropped += 1
                continue
            if messages:  # keep the order of messages and peer events
                batch.append((message_callbacks, messages))
                messages = []
            peer_callbacks = tuple(cb for kind, cb in callbacks if isinstance(event, kind))
            batch.append((peer_callbacks, [event.peer]))
            for stream in list(self._peer_streams):
                if not _put_thread_bounded(stream, event):
                    dropped += 1
        if messages:
            batch.append((message_callbacks, messages))
        _hand_over(per_subscription, self._subscriptions, self._endpoint)
        batch = [(cbs, items) for cbs, items in batch if cbs]
        if batch:
            size = sum(len(items) for _, items in batch)
            with self._lock:
                if self._pending + size > EVENT_QUEUE_SIZE:
                    dropped += size
                    batch = []
                else:
                    self._pending += size
            if batch:
                self._deliveries.put(batch)
        if dropped:
            self._endpoint.counters["events_dropped_slow_consumer"] += dropped
            logger.warning("callbacks or iterators are not keeping up; dropped %d events", dropped)

    def _deliver(self) -> None:
        while (batch := self._deliveries.get()) is not None:
            size = 0
            for callbacks, items in batch:
                size += len(items)
                for item in items:
                    for callback in callbacks:
                        try:
                            callback(item)
                        except Exception:
                            logger.exception("callback %r failed", callback)
            with self._lock:
                self._pending -= size

    def _call(self, coroutine: Coroutine[Any, Any, T], *, timeout: float | None = None) -> T:
        loop = self._loop
        if loop is None or self._stopped:
            coroutine.close()
            raise UsageError("the endpoint is not running (call start() or use `with`)")
        future: Future[T] = asyncio.run_coroutine_threadsafe(coroutine, loop)
        return future.result(timeout)


async def _as_coroutine(function: Callable[[], T]) -> T:
    return function()


def _put_thread_bounded(stream: queue.SimpleQueue[Any], item: object) -> bool:
    if stream.qsize() >= EVENT_QUEUE_SIZE:
        return False
    stream.put(item)
    return True
