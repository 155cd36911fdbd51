"""Subscriptions: what ``subscribe`` returns, and how messages reach user code.

The network loop never runs user code. It puts each message in the subscription's own bounded
queue and moves on; when a queue is full the message is dropped for that subscription only,
counted (``Subscription.dropped`` and the endpoint counter ``subscription_messages_dropped``) and
reported with a warning, so a slow subscriber never stalls acks, discovery or other subscribers.

- Blocking API (:class:`Subscription`): with a callback, the subscription is run by a small pool
  of callback threads (``GLUE_CALLBACK_THREADS``), one batch at a time, so its callbacks run one
  after another in message order while other subscriptions' callbacks run on other threads.
  Without a callback it is an iterator: ``for message in subscription``.
- asyncio API (:class:`AsyncSubscription`): with a callback (plain or ``async``), one task per
  subscription calls it in order; without, ``async for message in subscription``.

``close()`` (or the manager's ``unsubscribe``) stops deliveries: no callback starts after it
returns, and a callback running on another thread is waited for.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import queue
import threading
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from types import TracebackType
from typing import Final, Self

from glue.events import Message

__all__ = [
    "DEFAULT_QUEUE_SIZE",
    "AsyncMessageCallback",
    "AsyncSubscription",
    "CallbackPool",
    "MessageCallback",
    "Subscription",
]

logger = logging.getLogger(__name__)

#: Messages that may wait in one subscription's queue by default.
DEFAULT_QUEUE_SIZE: Final = 100_000
_BATCH: Final = 256

MessageCallback = Callable[[Message], object]
AsyncMessageCallback = Callable[[Message], object | Awaitable[object]]


def _report_drop(subscription: Subscription | AsyncSubscription, count: int) -> None:
    before = subscription.dropped
    subscription.dropped += count
    # Warn when the count first reaches 1, 10, 100...: visible, without flooding the log.
    if len(str(subscription.dropped)) > len(str(before)) or before == 0:
        logger.warning(
            "subscription %r (%s) is not keeping up: %d messages dropped (queue of %d full)",
            subscription.topic_name,
            subscription.topic_type,
            subscription.dropped,
            subscription.queue_size,
        )


class CallbackPool:
    """Threads that run subscriptions' callbacks; each subscription runs on one at a time."""

    def __init__(self, threads: int, name: str) -> None:
        self._max = threads
        self._name = name
        self._ready: queue.SimpleQueue[Subscription | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._idle = 0  # threads waiting for work
        self._queued = 0  # subscriptions put in ``_ready`` and not yet taken
        self._lock = threading.Lock()
        self._idents: set[int] = set()

    def schedule(self, subscription: Subscription) -> None:
        """Run ``subscription``'s waiting callbacks on a pool thread (starting one if needed)."""
        self._enqueue(subscription)

    def _enqueue(self, subscription: Subscription) -> None:
        with self._lock:
            self._queued += 1
            # A thread for each queued subscription, as far as the limit allows: counting idle
            # threads alone would let two subscriptions queued before an idle thread wakes share
            # it, and the second would wait behind whatever the first's callback blocks on.
            if self._idle < self._queued and len(self._threads) < self._max:
                thread = threading.Thread(
                    target=self._work,
                    name=f"glue-callbacks-{self._name}-{len(self._threads)}",
                    daemon=True,
                )
                self._threads.append(thread)
                thread.start()
        self._ready.put(subscription)

    def on_pool_thread(self) -> bool:
        """Whether the caller is one of the pool's threads (inside a callback)."""
        return threading.get_ident() in self._idents

    def stop(self) -> None:
        """Let every thread finish its batch, then join them (not from a pool thread)."""
        with self._lock:
            threads = list(self._threads)
        for _ in threads:
            self._ready.put(None)
        current = threading.current_thread()
        for thread in threads:
            if thread is not current:
                thread.join()

    def _work(self) -> None:
        self._idents.add(threading.get_ident())
        while True:
            with self._lock:
                self._idle += 1
            subscription = self._ready.get()
            with self._lock:
                self._idle -= 1
                if subscription is not None:
                    self._queued -= 1
            if subscription is None:
                return
            if subscription._run_batch():
                self._enqueue(subscription)  # more waiting: go round, others get a turn


class Subscription:
    """A subscription of the blocking :class:`~glue.manager.EndpointManager`.

    Iterate over it (when made without a callback) to receive messages; ``close()`` ends it.
    Also a context manager that closes on exit.
    """

    def __init__(
        self,
        topic_name: str,
        topic_type: str,
        callback: MessageCallback | None,
        *,
        queue_size: int,
        pool: CallbackPool,
        unsubscribe: Callable[[Subscription], None],
    ) -> None:
        self.topic_name = topic_name
        self.topic_type = topic_type
        self.callback = callback
        self.queue_size = queue_size
        #: Messages dropped because this subscription's queue was full.
        self.dropped = 0
        self.id = 0  # set when the endpoint has registered it
        self._pool = pool
        self._unsubscribe = unsubscribe
        self._items: deque[Message] = deque()
        # Messages a pool thread took for its batch and has not yet started to call back for:
        # still waiting, so they count against queue_size (a stuck callback holds at most
        # queue_size + the one it is in).
        self._taken = 0
        # A plain lock for the hot path (its ``with`` is a C call) and a Condition on it for
        # iterators that wait.
        self._mutex = threading.Lock()
        self._lock = threading.Condition(self._mutex)
        self._running = threading.RLock()  # held while callbacks run
        self._scheduled = False
        self._closed = False

    @property
    def closed(self) -> bool:
        """Whether ``close()`` was called (or the endpoint stopped)."""
        return self._closed

    def close(self) -> None:
        """Stop deliveries: no callback starts after this returns. Idempotent.

        A callback running on another thread is waited for, unless ``close`` is called from a
        callback thread (a callback may close its own or another subscription without deadlock).
        """
        if not self._end():
            return
        self._unsubscribe(self)
        if not self._pool.on_pool_thread():
            with self._running:
                pass

    def _end(self) -> bool:
        with self._lock:
            if self._closed:
                return False
            self._closed = True
            self._items.clear()
            self._lock.notify_all()
        return True

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __iter__(self) -> Iterator[Message]:
        return self.messages()

    def messages(self, *, timeout: float | None = None) -> Iterator[Message]:
        """Messages as they arrive; ends when closed, or after ``timeout`` s without one.

        Raises:
            UsageError: the subscription has a callback (its messages go there).
        """
        if self.callback is not None:
            from glue.errors import UsageError

            raise UsageError("this subscription delivers to its callback; it cannot be iterated")
        return self._messages(timeout)

    def _messages(self, timeout: float | None) -> Iterator[Message]:
        items = self._items
        while True:
            with self._lock:
                if not items and not self._closed:
                    self._lock.wait_for(lambda: items or self._closed, timeout)
                if self._closed or not items:
                    return
                batch = list(items)
                items.clear()
            yield from batch

    def get(self, timeout: float | None = None) -> Message:
        """The next message (iterator subscriptions).

        Raises:
            TimeoutError: none within ``timeout`` seconds.
            EOFError: the subscription is closed.
        """
        with self._lock:
            if not self._lock.wait_for(lambda: self._items or self._closed, timeout):
                raise TimeoutError(f"no message on {self.topic_name!r} within {timeout} s")
            if self._closed:
                raise EOFError(f"subscription to {self.topic_name!r} is closed")
            return self._items.popleft()

    # --- called by the manager ------------------------------------------------------------------

    def _put_many(self, messages: list[Message]) -> int:
        """On the network thread: queue ``messages``; returns how many were dropped (full)."""
        schedule = False
        lost = 0
        with self._mutex:
            if self._closed:
                return 0
            items = self._items
            room = self.queue_size - len(items) - self._taken
            if room < len(messages):
                lost = len(messages) - max(room, 0)
                messages = messages[: max(room, 0)]
            items.extend(messages)
            if self.callback is None:
                self._lock.notify()
            elif not self._scheduled and items:
                self._scheduled = schedule = True
        if lost:
            _report_drop(self, lost)
        if schedule:
            self._pool.schedule(self)
        return lost

    def _run_batch(self) -> bool:
        """On a pool thread: run callbacks for up to a batch; True if more are waiting."""
        callback = self.callback
        assert callback is not None
        with self._running:
            with self._mutex:
                items = self._items
                if len(items) <= _BATCH:
                    batch = list(items)
                    items.clear()
                else:
                    batch = [items.popleft() for _ in range(_BATCH)]
                self._taken = len(batch)
            for message in batch:
                if self._closed:
                    break
                self._taken -= 1  # (one writer, this thread; a reader may see it one late)
                try:
                    callback(message)
                except Exception:
                    logger.exception("callback of subscription %r failed", self.topic_name)
            with self._mutex:
                self._taken = 0
                if self._items and not self._closed:
                    return True
                self._scheduled = False
                return False


class AsyncSubscription:
    """A subscription of :class:`~glue.manager.AsyncEndpointManager`.

    ``async for message in subscription`` (when made without a callback); ``close()`` ends it.
    Also a (sync or async) context manager that closes on exit.
    """

    def __init__(
        self,
        topic_name: str,
        topic_type: str,
        callback: AsyncMessageCallback | None,
        *,
        queue_size: int,
        unsubscribe: Callable[[AsyncSubscription], None],
    ) -> None:
        self.topic_name = topic_name
        self.topic_type = topic_type
        self.callback = callback
        self.queue_size = queue_size
        #: Messages dropped because this subscription's queue was full.
        self.dropped = 0
        self.id = 0
        self._unsubscribe = unsubscribe
        self._queue: asyncio.Queue[Message | None] = asyncio.Queue()
        self._closed = False
        self._task: asyncio.Task[None] | None = None
        if callback is not None:
            self._task = asyncio.get_running_loop().create_task(
                self._call_back(callback), name=f"glue-subscription-{topic_name}"
            )

    @property
    def closed(self) -> bool:
        """Whether ``close()`` was called (or the endpoint stopped)."""
        return self._closed

    def close(self) -> None:
        """Stop deliveries: no callback starts after this returns. Idempotent."""
        if self._end():
            self._unsubscribe(self)

    def _end(self) -> bool:
        if self._closed:
            return False
        self._closed = True
        while not self._queue.empty():
            self._queue.get_nowait()
        self._queue.put_nowait(None)
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()
        return True

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __aiter__(self) -> AsyncIterator[Message]:
        if self.callback is not None:
            from glue.errors import UsageError

            raise UsageError("this subscription delivers to its callback; it cannot be iterated")
        return self._messages()

    async def _messages(self) -> AsyncIterator[Message]:
        while (message := await self._queue.get()) is not None:
            yield message

    async def get(self) -> Message:
        """The next message (iterator subscriptions).

        Raises:
            EOFError: the subscription is closed.
        """
        message = await self._queue.get()
        if message is None:
            self._queue.put_nowait(None)
            raise EOFError(f"subscription to {self.topic_name!r} is closed")
        return message

    # --- called by the manager ------------------------------------------------------------------

    def _put_many(self, messages: list[Message]) -> int:
        if self._closed:
            return 0
        put = self._queue.put_nowait
        room = self.queue_size - self._queue.qsize()
        lost = max(0, len(messages) - max(room, 0))
        for message in messages[: max(room, 0)]:
            put(message)
        if lost:
            _report_drop(self, lost)
        return lost

    async def _call_back(self, callback: AsyncMessageCallback) -> None:
        queue_ = self._queue
        while (message := await queue_.get()) is not None:
            try:
                result = callback(message)
                if inspect.isawaitable(result):
                    await result
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("callback of subscription %r failed", self.topic_name)

    async def _wait_closed(self) -> None:
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
