"""The public API: ``EndpointManager`` (blocking) and ``AsyncEndpointManager`` (asyncio).

Both are thin: one :class:`~glue.endpoint.Endpoint` does the work underneath. The asyncio manager
runs it in the caller's loop; the blocking manager runs that same asyncio manager in one background
thread and hands calls to it thread-safely. User callbacks never run inside the network handlers:
the asyncio manager schedules them with ``call_soon``; the blocking manager runs them on its own
delivery thread, through a bounded queue whose overflow is counted and reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from concurrent.futures import Future
from types import TracebackType
from typing import Any, Final, Self, TypeVar

from glue.endpoint import Endpoint
from glue.errors import GlueError, UsageError
from glue.events import Peer, PeerAdded, PeerEvent, PeerRemoved
from glue.settings import GlueSettings, load_settings

__all__ = ["AsyncEndpointManager", "EndpointManager"]

logger = logging.getLogger(__name__)

#: Bound of every event queue between the network loop and user code.
EVENT_QUEUE_SIZE: Final = 10_000
_START_TIMEOUT_S: Final = 30.0

T = TypeVar("T")
PeerCallback = Callable[[Peer], object]


class AsyncEndpointManager:
    """A glue endpoint for asyncio code.

    ``async with AsyncEndpointManager.from_env() as endpoint:`` starts it in the running loop and
    stops it (saying goodbye to peers) on exit.
    """

    def __init__(self, settings: GlueSettings | None = None) -> None:
        self.settings = settings if settings is not None else load_settings()
        self._endpoint = Endpoint(self.settings)
        self._peers: dict[int, Peer] = {}
        self._callbacks: list[tuple[type[PeerEvent], PeerCallback]] = []
        self._streams: set[asyncio.Queue[PeerEvent | None]] = set()
        self._changed: asyncio.Future[None] | None = None
        self._endpoint.add_listener(self._on_event)

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
        """Say goodbye, close sockets, end every ``peer_events`` iteration. Idempotent."""
        await self._endpoint.stop()
        for stream in self._streams:
            _put_bounded(stream, None, self._endpoint)
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

    async def peers(self) -> list[Peer]:
        """The peers known now, ordered by name."""
        return sorted(self._peers.values(), key=lambda p: p.name)

    def counters(self) -> dict[str, int]:
        """Datagrams, bytes, drops by reason and discovery counters."""
        return self._endpoint.all_counters()

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

    # --- peer events ------------------------------------------------------------------------------

    def on_peer_added(self, callback: PeerCallback) -> Callable[[], None]:
        """Call ``callback(peer)`` (plain or ``async``) when a peer appears; returns a remover."""
        return self._add_callback(PeerAdded, callback)

    def on_peer_removed(self, callback: PeerCallback) -> Callable[[], None]:
        """Call ``callback(peer)`` (plain or ``async``) when a peer goes away; returns a remover."""
        return self._add_callback(PeerRemoved, callback)

    async def peer_events(self) -> AsyncIterator[PeerEvent]:
        """``async for event in endpoint.peer_events()``: every event from now until stop."""
        stream: asyncio.Queue[PeerEvent | None] = asyncio.Queue(EVENT_QUEUE_SIZE)
        self._streams.add(stream)
        try:
            while (event := await stream.get()) is not None:
                yield event
        finally:
            self._streams.discard(stream)

    def _add_callback(self, kind: type[PeerEvent], callback: PeerCallback) -> Callable[[], None]:
        entry = (kind, callback)
        self._callbacks.append(entry)
        return lambda: self._callbacks.remove(entry) if entry in self._callbacks else None

    def _on_event(self, event: PeerEvent) -> None:
        """Runs inside the network loop's handlers: only cheap, non-blocking work here."""
        if isinstance(event, PeerAdded):
            self._peers[event.peer.endpoint_id] = event.peer
        else:
            self._peers.pop(event.peer.endpoint_id, None)
        loop = asyncio.get_running_loop()
        for kind, callback in self._callbacks:
            if isinstance(event, kind):
                loop.call_soon(_run_callback, callback, event.peer)
        for stream in self._streams:
            _put_bounded(stream, event, self._endpoint)
        self._notify()

    def _notify(self) -> None:
        if self._changed is not None and not self._changed.done():
            self._changed.set_result(None)
            self._changed = asyncio.get_running_loop().create_future()


_callback_tasks: set[asyncio.Future[Any]] = set()


def _run_callback(callback: PeerCallback, peer: Peer) -> None:
    try:
        result = callback(peer)
        if isinstance(result, Awaitable):
            task = asyncio.ensure_future(result)
            _callback_tasks.add(task)  # keep a reference until it finishes
            task.add_done_callback(_callback_tasks.discard)
    except Exception:
        logger.exception("peer callback %r failed", callback)


def _put_bounded(
    stream: asyncio.Queue[PeerEvent | None], item: PeerEvent | None, ep: Endpoint
) -> None:
    try:
        stream.put_nowait(item)
    except asyncio.QueueFull:
        ep.counters["peer_events_overflowed"] += 1
        logger.warning("a peer_events consumer is not keeping up; dropped an event")


class EndpointManager:
    """A glue endpoint for blocking code: the asyncio runtime runs in one background thread.

    ``with EndpointManager.from_env() as endpoint:`` starts it and stops it on exit. Callbacks run
    on a delivery thread, never on the network thread, in the order the events happened.
    """

    def __init__(self, settings: GlueSettings | None = None) -> None:
        self._async = AsyncEndpointManager(settings)
        self.settings = self._async.settings
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._deliveries: queue.Queue[tuple[PeerCallback, Peer] | None] = queue.Queue(
            EVENT_QUEUE_SIZE
        )
        self._delivery_thread: threading.Thread | None = None
        self._callbacks: list[tuple[type[PeerEvent], PeerCallback]] = []
        self._streams: set[queue.Queue[PeerEvent | None]] = set()
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
        self._async._endpoint.add_listener(self._on_event)
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
        for stream in list(self._streams):
            _put_thread_bounded(stream, None)
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

    def peers(self) -> list[Peer]:
        """The peers known now, ordered by name."""
        return self._call(self._async.peers())

    def counters(self) -> dict[str, int]:
        """Datagrams, bytes, drops by reason and discovery counters."""
        return self._call(_as_coroutine(self._async.counters))

    def wait_for_peers(
        self, count: int, *, timeout: float, where: Callable[[Peer], bool] | None = None
    ) -> list[Peer]:
        """Block until at least ``count`` peers (matching ``where``) are known.

        Raises:
            TimeoutError: not enough peers within ``timeout`` seconds.
        """
        return self._call(self._async.wait_for_peers(count, timeout=timeout, where=where))

    # --- peer events ------------------------------------------------------------------------------

    def on_peer_added(self, callback: PeerCallback) -> Callable[[], None]:
        """Call ``callback(peer)`` on the delivery thread when a peer appears; returns a remover."""
        return self._add_callback(PeerAdded, callback)

    def on_peer_removed(self, callback: PeerCallback) -> Callable[[], None]:
        """Call ``callback(peer)`` on the delivery thread when a peer goes; returns a remover."""
        return self._add_callback(PeerRemoved, callback)

    def peer_events(self, *, timeout: float | None = None) -> Iterator[PeerEvent]:
        """Iterate over peer events from now on; ends at stop, or after ``timeout`` s of quiet."""
        stream: queue.Queue[PeerEvent | None] = queue.Queue(EVENT_QUEUE_SIZE)
        self._streams.add(stream)
        try:
            while True:
                try:
                    event = stream.get(timeout=timeout)
                except queue.Empty:
                    return
                if event is None:
                    return
                yield event
        finally:
            self._streams.discard(stream)

    def _add_callback(self, kind: type[PeerEvent], callback: PeerCallback) -> Callable[[], None]:
        entry = (kind, callback)
        with self._lock:
            self._callbacks.append(entry)

        def remove() -> None:
            with self._lock:
                if entry in self._callbacks:
                    self._callbacks.remove(entry)

        return remove

    def _on_event(self, event: PeerEvent) -> None:
        """On the network thread: hand the event over without blocking."""
        with self._lock:
            callbacks = [cb for kind, cb in self._callbacks if isinstance(event, kind)]
        for callback in callbacks:
            try:
                self._deliveries.put_nowait((callback, event.peer))
            except queue.Full:
                self._async._endpoint.counters["callbacks_overflowed"] += 1
                logger.warning("peer callbacks are not keeping up; dropped one")
        for stream in list(self._streams):
            if not _put_thread_bounded(stream, event):
                self._async._endpoint.counters["peer_events_overflowed"] += 1

    def _deliver(self) -> None:
        while (item := self._deliveries.get()) is not None:
            callback, peer = item
            try:
                callback(peer)
            except Exception:
                logger.exception("peer callback %r failed", callback)

    def _call(self, coroutine: Coroutine[Any, Any, T], *, timeout: float | None = None) -> T:
        loop = self._loop
        if loop is None or self._stopped:
            coroutine.close()
            raise UsageError("the endpoint is not running (call start() or use `with`)")
        future: Future[T] = asyncio.run_coroutine_threadsafe(coroutine, loop)
        return future.result(timeout)


async def _as_coroutine(function: Callable[[], T]) -> T:
    return function()


def _put_thread_bounded(stream: queue.Queue[PeerEvent | None], item: PeerEvent | None) -> bool:
    try:
        stream.put_nowait(item)
    except queue.Full:
        return False
    return True
