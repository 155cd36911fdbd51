"""Models: a replicated document per name that every endpoint opening it shares (see
``docs/model.md``).

``model = endpoint.model("plant/state")`` returns a :class:`Model` (blocking manager) or an
:class:`AsyncModel` (asyncio manager). Its ``root`` is a ``pycrdt.Map``: maps, arrays and text
inside it are edited with pycrdt's own API, and every edit reaches every other endpoint holding
the model; concurrent edits merge with Yjs's semantics, so every replica ends in the same state.
The protocol is :class:`~glue.modelsync.ModelSync` (sans-IO); this module is its runtime, built
on the managers' public API only (``subscribe``, ``publish``, ``subscribers``,
``on_peer_removed``).

Threads (blocking manager): a ``pycrdt.Doc`` must not be used by two threads at once. Each
model has one thread of its own (``glue-model-<name>``) that applies what peers send, answers
them, announces, publishes local edits and runs ``on_change`` callbacks; it touches the
document only under the model's lock. Edit and read the model from your threads inside
``with model.transaction():`` (it takes that lock; one transaction becomes one update on the
wire); ``snapshot()`` takes it by itself. An edit outside it is still sent, but races with the
model's thread; the first one is logged as a warning. asyncio: everything runs on the loop's
thread, so edit ``model.root`` from coroutines and callbacks of that loop directly (a
transaction still groups edits into one update).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import queue
import random
import threading
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any, Final, Self

import pycrdt

from glue.errors import (
    BackpressureError,
    UsageError,
    check_callable,
    check_int,
    check_timeout,
)
from glue.events import Message, Peer
from glue.modelsync import (
    TOPIC_TYPE,
    ModelChange,
    ModelConfig,
    ModelSync,
    Outgoing,
    inbox_topic,
    state_topic,
    update_topic,
    validate_model_name,
)

if TYPE_CHECKING:
    from glue.manager import AsyncEndpointManager, EndpointManager

__all__ = ["AsyncModel", "Model", "ModelChange", "open_async_model", "open_model"]

logger = logging.getLogger(__name__)

#: The model's thread looks at least this often whether its endpoint stopped.
_CHECK_S: Final = 1.0
#: Changes that may wait in one ``changes()`` iterator; beyond, they are dropped for it.
CHANGE_QUEUE_SIZE: Final = 100_000
_PUBLISH_TIMEOUT_S: Final = 5.0
#: Messages from peers waiting for the model's thread (or task); beyond, dropped and counted.
INBOX_SIZE: Final = 100_000

_open: weakref.WeakKeyDictionary[object, dict[str, _ModelBase]] = weakref.WeakKeyDictionary()
_open_lock = threading.Lock()


def open_model(manager: EndpointManager, name: str) -> Model:
    """The model ``name`` of ``manager``: the one already open, or a new one (see
    :meth:`~glue.manager.EndpointManager.model`)."""
    validate_model_name(name)
    with _open_lock:
        models = _open.setdefault(manager, {})
        found = models.get(name)
        if found is not None:
            assert isinstance(found, Model)
            return found
        model = models[name] = Model(manager, name)
    try:
        model._start()
    except BaseException:
        model.close()
        raise
    return model


def open_async_model(manager: AsyncEndpointManager, name: str) -> AsyncModel:
    """The model ``name`` of ``manager`` (see :meth:`~glue.manager.AsyncEndpointManager.model`)."""
    validate_model_name(name)
    models = _open.setdefault(manager, {})
    found = models.get(name)
    if found is not None:
        assert isinstance(found, AsyncModel)
        return found
    model = models[name] = AsyncModel(manager, name)
    try:
        model._start()
    except BaseException:
        model.close()
        raise
    return model


class _ModelBase:
    """What both runtimes share: the document, the sync machine, the lock, the inbox."""

    #: Whether other threads than the model's may edit (then an edit outside transaction()
    #: is warned about).
    _threaded = True

    def __init__(self, manager: EndpointManager | AsyncEndpointManager, name: str) -> None:
        self.name = name
        self._manager = manager
        settings = manager.settings
        self._endpoint_id = manager.endpoint_id
        self._config = ModelConfig(
            announce_s=settings.discovery_rate_s,
            max_update_bytes=max(1024, min(1024 * 1024, settings.max_message_bytes // 2)),
        )
        self._lock = threading.RLock()
        self._owner: int | None = None  # the thread inside transaction(), if any
        self._warned = False
        self._doc: pycrdt.Doc[Any] = pycrdt.Doc()
        self._sync = ModelSync(
            name,
            endpoint_id=self._endpoint_id,
            doc=self._doc,
            config=self._config,
            now=time.monotonic(),
            rng=random.Random(),
        )
        self._inbox: deque[tuple[str, int, bytes]] = deque()
        self._removed: deque[int] = deque()
        self._callbacks: list[Callable[[ModelChange], object]] = []
        self._closed = False
        self._failed = 0  # messages that could not be published
        self._changes_dropped = 0  # by changes() iterations that fell behind
        self._inbox_dropped = 0  # messages dropped because the runner fell behind
        # Runner steps begun and completed (what it took from the sync machine is published):
        # flush() waits for a step begun after it was called.
        self._steps_begun = 0
        self._steps_done = 0
        self._first_seen: dict[int, float] = {}  # subscribers of the state topic, since when
        self._doc.observe(self._on_commit)

    @property
    def root(self) -> pycrdt.Map[Any]:
        """The root map of the document: edit it with pycrdt's API (inside
        :meth:`transaction` from threads other than the event loop's)."""
        return self._sync.root

    @property
    def doc(self) -> pycrdt.Doc[Any]:
        """The ``pycrdt.Doc`` holding ``root`` (same locking rules as ``root``)."""
        return self._doc

    @property
    def closed(self) -> bool:
        """Whether the model was closed (or its endpoint stopped)."""
        return self._closed

    @contextlib.contextmanager
    def transaction(self) -> Iterator[pycrdt.Map[Any]]:
        """``with model.transaction() as root:`` edit (or read) the document; the edits made
        inside become one update, sent when the block ends. Takes the model's lock."""
        with self._lock:
            owner, self._owner = self._owner, threading.get_ident()
            try:
                with self._doc.transaction():
                    yield self._sync.root
            finally:
                self._owner = owner

    def snapshot(self) -> dict[str, Any]:
        """The root as plain Python data (dicts, lists, str, numbers; pycrdt gives numbers as
        float). Consistent: taken under the model's lock."""
        with self.transaction() as root:
            value: dict[str, Any] = root.to_py() or {}
            return value

    def on_change(self, callback: Callable[[ModelChange], object]) -> Callable[[], None]:
        """Call ``callback(change)`` for each transaction, local or remote, in order; returns
        a remover. Blocking manager: on the model's thread (keep it short; it may use
        ``transaction()``); asyncio: on the loop (an ``async`` one is awaited).

        Raises:
            UsageTypeError: ``callback`` is not callable.
        """
        check_callable(callback, "callback")
        with self._lock:
            self._callbacks.append(callback)

        def remove() -> None:
            with self._lock:
                if callback in self._callbacks:
                    self._callbacks.remove(callback)

        return remove

    def counters(self) -> dict[str, int]:
        """What this model sent, received, applied and dropped (by reason)."""
        with self._lock:
            counters = dict(self._sync.counters)
        if self._failed:
            counters["publish_failed"] = self._failed
        if self._changes_dropped:
            counters["changes_dropped_slow_iterator"] = self._changes_dropped
        if self._inbox_dropped:
            counters["dropped_inbox_full"] = self._inbox_dropped
        return counters

    # --- internals ------------------------------------------------------------------------------

    def _topics(self) -> list[str]:
        name = self.name
        return [state_topic(name), update_topic(name), inbox_topic(name, self._endpoint_id)]

    def _received(self, message: Message) -> None:
        """A subscription callback: queue the message for the model's runner."""
        if len(self._inbox) >= INBOX_SIZE:
            # The runner is stuck (publishing against back-pressure, say): what is dropped
            # here is pulled again after the next announcements.
            self._inbox_dropped += 1
            return
        self._inbox.append((message.topic_name, message.source_id, message.payload))
        self._wake()

    def _peer_removed(self, peer: Peer) -> None:
        self._removed.append(peer.endpoint_id)
        self._wake()

    def _wake(self) -> None:
        raise NotImplementedError

    def _on_commit(self, event: pycrdt.TransactionEvent) -> None:
        """Document observer, after the sync machine's: wake the runner for a local edit."""
        if self._sync.applying:
            return  # a remote update being applied by the runner
        if self._owner != threading.get_ident() and not self._warned and self._threaded:
            self._warned = True
            logger.warning(
                "model %s was edited outside `with model.transaction():` on thread %s; that "
                "races with the model's own thread (see docs/model.md)",
                self.name,
                threading.current_thread().name,
            )
        self._wake()

    def _step(self, now: float) -> tuple[list[Outgoing], list[ModelChange], float | None]:
        """Feed what arrived to the sync machine; what to publish, the changes, the deadline."""
        arrived = []
        while self._inbox:  # (filled by other threads: popleft is atomic, iterating is not)
            arrived.append(self._inbox.popleft())
        state = state_topic(self.name)
        holders = None
        if any(topic == state for topic, _, _ in arrived):
            with contextlib.suppress(UsageError):  # the endpoint is stopping
                holders = self._holders()
        with self._lock:
            owner, self._owner = self._owner, threading.get_ident()
            try:
                sync = self._sync
                while self._removed:
                    sync.peer_removed(self._removed.popleft())
                if holders is not None:
                    sync.set_holders(holders)
                for topic, source, payload in arrived:
                    sync.receive(topic, source, payload, now=now)
                deadline = sync.next_deadline()
                if deadline is not None and deadline <= now:
                    sync.handle_timer(now=now)
                    deadline = sync.next_deadline()
                outgoing = sync.messages_to_send()
                changes = []
                while (change := sync.next_event()) is not None:
                    changes.append(change)
            finally:
                self._owner = owner
        return outgoing, changes, deadline

    def _holders(self) -> list[int]:
        """The peers subscribed to the model's state topic now."""
        return [p.endpoint_id for p in self._manager.subscribers(state_topic(self.name))]

    def _sync_status(self, now: float) -> tuple[list[int], list[int]]:
        """(not yet synced with, synced with): of the peers that announced the model, and of
        its topic's subscribers seen for less than 3 announcement periods (one that never
        announces holds no model: a keeper or a '#' subscriber, say)."""
        subscribers = self._holders()
        seen = self._first_seen
        for peer in subscribers:
            seen.setdefault(peer, now)
        for peer in set(seen) - set(subscribers):
            del seen[peer]
        grace = 3 * self._config.announce_s
        with self._lock:
            met = self._sync.met()
            waited = [p for p in subscribers if p in met or now - seen[p] < grace]
            missing = self._sync.unsynced(waited)
            synced = [p for p in self._sync.synced() if p not in missing]
        return missing, synced

    def _publish_failed(self, out: Outgoing, exc: Exception) -> None:
        self._failed += 1
        # Once as a warning, then at debug: a reply too large for GLUE_MAX_MESSAGE_BYTES
        # fails again at every pull.
        log = logger.warning if self._failed == 1 else logger.debug
        log(
            "model %s: could not publish %d bytes on %s (%s); the next announcements repair it",
            self.name,
            len(out.payload),
            out.topic,
            exc,
        )

    def _forget(self) -> None:
        with _open_lock:
            models = _open.get(self._manager)
            if models is not None and models.get(self.name) is self:
                del models[self.name]
        with self._lock:
            self._sync.close()


def _end(stream: queue.Queue[ModelChange | None] | asyncio.Queue[ModelChange | None]) -> None:
    """End a ``changes()`` iteration: its end marker always fits (the oldest change makes room)."""
    while True:
        try:
            stream.put_nowait(None)
            return
        except (queue.Full, asyncio.QueueFull):
            with contextlib.suppress(queue.Empty, asyncio.QueueEmpty):
                stream.get_nowait()


def _synced_error(name: str, missing: list[int], holders: int, peers: int, timeout: float) -> str:
    if missing:
        return f"model {name}: not synced with peers {missing} after {timeout} s"
    return f"model {name}: {holders} of {peers} peers holding it after {timeout} s"


class Model(_ModelBase):
    """A replicated document of the blocking :class:`~glue.manager.EndpointManager`.

    ``with endpoint.model("plant/state") as model:`` opens it and closes it on exit.
    """

    def __init__(self, manager: EndpointManager, name: str) -> None:
        super().__init__(manager, name)
        self._blocking = manager
        self._event = threading.Event()
        self._synced = threading.Condition()
        self._streams: set[queue.Queue[ModelChange | None]] = set()
        self._subscriptions: list[Any] = []
        self._remove_peer_callback: Callable[[], None] | None = None
        self._thread = threading.Thread(target=self._run, name=f"glue-model-{name}", daemon=True)

    def _start(self) -> None:
        manager = self._blocking
        self._remove_peer_callback = manager.on_peer_removed(self._peer_removed)
        for topic in self._topics():
            self._subscriptions.append(manager.subscribe(topic, TOPIC_TYPE, self._received))
        self._thread.start()

    def close(self) -> None:
        """Stop syncing: unsubscribe, end ``changes()`` iterations, stop the model's thread.
        The document stays readable. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._event.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(_CHECK_S + _PUBLISH_TIMEOUT_S)
        if self._remove_peer_callback is not None:
            self._remove_peer_callback()
        for subscription in self._subscriptions:
            subscription.close()
        for stream in tuple(self._streams):
            _end(stream)
        with self._synced:
            self._synced.notify_all()
        self._forget()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def wait_synced(self, *, timeout: float, peers: int = 0) -> list[int]:
        """Block until the model has exchanged state with every peer holding it (and with at
        least ``peers`` of them): each answered a pull of ours since it appeared, so this
        replica holds everything they held then. Returns their endpoint ids. A subscriber of
        the model's topics that does not announce it within 3 announcement periods (a history
        keeper of ``#``, say) is not waited for.

        Raises:
            TimeoutError: not within ``timeout`` seconds (the message names who is missing).
            UsageError: the model is closed; a bad ``timeout`` or ``peers``.
        """
        timeout = check_timeout(timeout)
        peers = check_int(peers, "peers", minimum=0)
        self._refuse_on_own_thread("wait_synced")
        deadline = time.monotonic() + timeout
        while True:
            if self._closed:
                raise UsageError(f"model {self.name} is closed")
            missing, synced = self._sync_status(time.monotonic())
            if not missing and len(synced) >= peers:
                return synced
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(_synced_error(self.name, missing, len(synced), peers, timeout))
            with self._synced:
                self._synced.wait(min(remaining, self._config.announce_s))

    def flush(self, *, timeout: float) -> None:
        """Block until the edits made so far are published and acknowledged by the peers they
        went to (``EndpointManager.flush``): call before exiting after an edit.

        Raises:
            TimeoutError: not within ``timeout`` seconds.
            DeliveryError: a peer went away with some unacknowledged (see ``flush``).
            UsageError: the model is closed; a bad ``timeout``.
        """
        timeout = check_timeout(timeout)
        self._refuse_on_own_thread("flush")
        deadline = time.monotonic() + timeout
        target = self._steps_begun + 1
        self._event.set()
        with self._synced:
            while self._steps_done < target:
                if self._closed:
                    raise UsageError(f"model {self.name} is closed")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"model {self.name}: edits not published in {timeout} s")
                self._synced.wait(min(remaining, _CHECK_S))
        self._blocking.flush(timeout=max(0.0, deadline - time.monotonic()))

    def changes(self, *, timeout: float | None = None) -> Iterator[ModelChange]:
        """Iterate over changes (local and remote) from this call on; ends when the model
        closes or after ``timeout`` s without one. Up to 100,000 wait; beyond, they are dropped
        for this iteration and counted (``changes_dropped_slow_iterator``)."""
        if timeout is not None:
            timeout = check_timeout(timeout)
        stream: queue.Queue[ModelChange | None] = queue.Queue(CHANGE_QUEUE_SIZE)
        self._streams.add(stream)
        return self._iterate(stream, timeout)

    def _iterate(
        self, stream: queue.Queue[ModelChange | None], timeout: float | None
    ) -> Iterator[ModelChange]:
        try:
            while not self._closed:
                try:
                    change = stream.get(timeout=timeout)
                except queue.Empty:
                    return
                if change is None:
                    return
                yield change
        finally:
            self._streams.discard(stream)

    def _wake(self) -> None:
        self._event.set()

    def _refuse_on_own_thread(self, method: str) -> None:
        if threading.current_thread() is self._thread:
            raise UsageError(
                f"{method}() from an on_change callback would wait for the model's own thread, "
                "which runs the callback"
            )

    def _run(self) -> None:
        try:
            while not self._closed:
                if any(s.closed for s in self._subscriptions):
                    break  # the endpoint stopped
                now = time.monotonic()
                self._steps_begun += 1
                outgoing, changes, deadline = self._step(now)
                for out in outgoing:
                    if not self._send(out):
                        return
                self._steps_done += 1
                with self._synced:
                    self._synced.notify_all()
                self._deliver(changes)
                wait = _CHECK_S if deadline is None else min(_CHECK_S, deadline - now)
                if wait > 0:
                    self._event.wait(wait)
                self._event.clear()
        except Exception:
            logger.exception("model %s: its thread failed", self.name)
        finally:
            self._closed = True
            for stream in tuple(self._streams):
                _end(stream)
            with self._synced:
                self._synced.notify_all()

    def _send(self, out: Outgoing) -> bool:
        try:
            self._blocking.publish(
                out.topic,
                TOPIC_TYPE,
                out.payload,
                expiry=out.expiry_s,
                history_depth=1 if out.retain else 0,
                timeout=_PUBLISH_TIMEOUT_S,
            )
        except BackpressureError as exc:
            self._publish_failed(out, exc)
        except UsageError as exc:
            if self._closed or "not running" in str(exc):
                return False
            self._publish_failed(out, exc)
        return True

    def _deliver(self, changes: list[ModelChange]) -> None:
        if not changes:
            return
        with self._lock:
            callbacks = list(self._callbacks)
        for change in changes:
            for stream in tuple(self._streams):
                try:
                    stream.put_nowait(change)
                except queue.Full:
                    self._changes_dropped += 1
            for callback in callbacks:
                try:
                    callback(change)
                except Exception:
                    logger.exception(
                        "on_change callback %r of model %s failed", callback, self.name
                    )


class AsyncModel(_ModelBase):
    """A replicated document of :class:`~glue.manager.AsyncEndpointManager`; use it from the
    loop's thread. ``async with endpoint.model("plant/state") as model:`` closes it on exit."""

    _threaded = False

    def __init__(self, manager: AsyncEndpointManager, name: str) -> None:
        super().__init__(manager, name)
        self._asynchronous = manager
        self._loop = asyncio.get_running_loop()
        self._event = asyncio.Event()
        self._synced = asyncio.Event()
        self._streams: set[asyncio.Queue[ModelChange | None]] = set()
        self._subscriptions: list[Any] = []
        self._remove_peer_callback: Callable[[], None] | None = None
        self._task: asyncio.Task[None] | None = None

    def _start(self) -> None:
        manager = self._asynchronous
        self._remove_peer_callback = manager.on_peer_removed(self._peer_removed)
        for topic in self._topics():
            self._subscriptions.append(manager.subscribe(topic, TOPIC_TYPE, self._received))
        self._task = self._loop.create_task(self._run(), name=f"glue-model-{self.name}")

    def close(self) -> None:
        """Stop syncing: unsubscribe, end ``changes()`` iterations, cancel the model's task.
        The document stays readable. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()
        if self._remove_peer_callback is not None:
            self._remove_peer_callback()
        for subscription in self._subscriptions:
            subscription.close()
        for stream in tuple(self._streams):
            _end(stream)
        self._synced.set()
        self._forget()

    aclose = close

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    async def wait_synced(self, *, timeout: float, peers: int = 0) -> list[int]:  # noqa: ASYNC109
        """Wait until the model has exchanged state with every peer holding it (and with at
        least ``peers`` of them): see :meth:`Model.wait_synced`.

        Raises:
            TimeoutError: not within ``timeout`` seconds (the message names who is missing).
            UsageError: the model is closed; a bad ``timeout`` or ``peers``.
        """
        timeout = check_timeout(timeout)
        peers = check_int(peers, "peers", minimum=0)
        deadline = self._loop.time() + timeout
        while True:
            if self._closed:
                raise UsageError(f"model {self.name} is closed")
            missing, synced = self._sync_status(time.monotonic())
            if not missing and len(synced) >= peers:
                return synced
            remaining = deadline - self._loop.time()
            if remaining <= 0:
                raise TimeoutError(_synced_error(self.name, missing, len(synced), peers, timeout))
            self._synced.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._synced.wait(), min(remaining, self._config.announce_s))

    async def flush(self, *, timeout: float) -> None:  # noqa: ASYNC109
        """Wait until the edits made so far are published and acknowledged: see
        :meth:`Model.flush`."""
        timeout = check_timeout(timeout)
        deadline = self._loop.time() + timeout
        target = self._steps_begun + 1
        self._event.set()
        while self._steps_done < target:
            if self._closed:
                raise UsageError(f"model {self.name} is closed")
            remaining = deadline - self._loop.time()
            if remaining <= 0:
                raise TimeoutError(f"model {self.name}: edits not published in {timeout} s")
            self._synced.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._synced.wait(), min(remaining, _CHECK_S))
        await self._asynchronous.flush(timeout=max(0.0, deadline - self._loop.time()))

    async def changes(self) -> AsyncIterator[ModelChange]:
        """``async for change in model.changes()``: changes from this call on, until the model
        closes. Up to 100,000 wait; beyond, they are dropped for this iteration and counted
        (``changes_dropped_slow_iterator``)."""
        stream: asyncio.Queue[ModelChange | None] = asyncio.Queue(CHANGE_QUEUE_SIZE)
        self._streams.add(stream)
        try:
            while not self._closed and (change := await stream.get()) is not None:
                yield change
        finally:
            self._streams.discard(stream)

    def _wake(self) -> None:
        self._event.set()

    async def _run(self) -> None:
        try:
            while not self._closed:
                if any(s.closed for s in self._subscriptions):
                    break
                now = time.monotonic()
                self._steps_begun += 1
                outgoing, changes, deadline = self._step(now)
                for out in outgoing:
                    if not await self._send(out):
                        return
                self._steps_done += 1
                self._synced.set()
                await self._deliver(changes)
                wait = _CHECK_S if deadline is None else min(_CHECK_S, deadline - now)
                if wait > 0:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._event.wait(), wait)
                self._event.clear()
        except asyncio.CancelledError:
            pass
        except Exception:
            logger.exception("model %s: its task failed", self.name)
        finally:
            self._closed = True
            for stream in tuple(self._streams):
                _end(stream)
            self._synced.set()

    async def _send(self, out: Outgoing) -> bool:
        try:
            await self._asynchronous.publish(
                out.topic,
                TOPIC_TYPE,
                out.payload,
                expiry=out.expiry_s,
                history_depth=1 if out.retain else 0,
                timeout=_PUBLISH_TIMEOUT_S,
            )
        except BackpressureError as exc:
            self._publish_failed(out, exc)
        except UsageError as exc:
            if self._closed or "not running" in str(exc):
                return False
            self._publish_failed(out, exc)
        return True

    async def _deliver(self, changes: list[ModelChange]) -> None:
        if not changes:
            return
        callbacks = list(self._callbacks)
        for change in changes:
            for stream in tuple(self._streams):
                try:
                    stream.put_nowait(change)
                except asyncio.QueueFull:
                    self._changes_dropped += 1
            for callback in callbacks:
                try:
                    result = callback(change)
                    if inspect.isawaitable(result):
                        await result
                except Exception:
                    logger.exception(
                        "on_change callback %r of model %s failed", callback, self.name
                    )
