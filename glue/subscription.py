"""Subscriptions: what ``subscribe`` returns, and how messages and events reach user code.

The network thread (or loop) runs no user code unless asked (``inline=True``, below). It puts
each message in the subscription's own bounded queue and moves on; when a queue is full the
message is dropped for that subscription only, counted (``Subscription.dropped`` and the endpoint
counter ``subscription_messages_dropped``) and reported with a warning, so a slow subscriber
never stalls acks, discovery or other subscribers. Every queue here is bounded twice: in
messages (``queue_size``, default 100,000) and in payload bytes (``queue_bytes``, default 64 MiB;
one message larger than that still passes an empty queue), so a slow subscriber of large
messages holds at most tens of MiB, not gigabytes.

- Blocking API (:class:`Subscription`): with a callback, the subscription is run by a small pool
  of callback threads (``GLUE_CALLBACK_THREADS``), one batch at a time, so its callbacks run one
  after another in message order while other subscriptions' callbacks run on other threads.
  Without a callback it is an iterator: ``for message in subscription``. With ``inline=True`` the
  callback runs on the endpoint's network thread as each burst arrives: no queue and no thread
  switch, so it must not block (the endpoint reads and acknowledges nothing meanwhile).
- asyncio API (:class:`AsyncSubscription`): with a callback (plain or ``async``), one task per
  subscription calls it in order; without, ``async for message in subscription``.

``close()`` (or the manager's ``unsubscribe``) stops deliveries: no callback starts after it
returns, and a callback running on another thread is waited for.

The managers' ``messages()`` and ``peer_events()`` return an :class:`EventIterator` (blocking) or
:class:`AsyncEventIterator`: it receives from the call on (nothing between the call and the first
``next`` is missed) and stops receiving when it is closed, exhausted or garbage-collected (the
registry holds its queue, never the iterator, so one dropped without being iterated is gone at
once), and is bounded in events and bytes. :class:`CallbackRunner` runs each callback given to
``AsyncEndpointManager.on_message``/``on_peer_*`` on one task, in order, from a bounded queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import math
import queue
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from types import TracebackType
from typing import Any, Final, Generic, Protocol, Self, TypeVar, cast

from glue.errors import UsageError, check_int, check_timeout
from glue.events import Gap, Message, MessageReceived

__all__ = [
    "DEFAULT_QUEUE_BYTES",
    "DEFAULT_QUEUE_SIZE",
    "AsyncEventIterator",
    "AsyncEventQueue",
    "AsyncGapCallback",
    "AsyncMessageCallback",
    "AsyncSubscription",
    "CallbackPool",
    "CallbackRunner",
    "EventIterator",
    "EventQueue",
    "GapCallback",
    "MessageCallback",
    "Subscription",
]

logger = logging.getLogger(__name__)

#: Messages that may wait in one subscription's (or event iterator's) queue by default.
DEFAULT_QUEUE_SIZE: Final = 100_000
#: Payload bytes that may wait in one subscription's (or event iterator's) queue by default.
DEFAULT_QUEUE_BYTES: Final = 64 * 1024 * 1024
_BATCH: Final = 256

T = TypeVar("T")
MessageCallback = Callable[[Message], object]
AsyncMessageCallback = Callable[[Message], object | Awaitable[object]]
#: Called with each :class:`~glue.events.Gap` of a subscription (``on_gap``), in order with its
#: messages; the asyncio API's may be ``async``.
GapCallback = Callable[[Gap], object]
AsyncGapCallback = Callable[[Gap], object | Awaitable[object]]
#: The size an event counts for against a byte bound (its payload's length).
Sizer = Callable[[Any], int]
#: Told of each grouped message a work-queue member is finished with (its callback returned, or
#: it was dropped or expired here): its publisher hears of it (docs/work-queues.md).
DoneReporter = Callable[[Message], None]


def check_queue_bounds(queue_size: object, queue_bytes: object) -> tuple[int, int]:
    """``queue_size`` and ``queue_bytes`` if both are ints >= 1.

    Raises:
        UsageTypeError, UsageValueError: either is not (the message names which).
    """
    return check_int(queue_size, "queue_size", minimum=1), check_int(
        queue_bytes, "queue_bytes", minimum=1
    )


def _report_drop(
    subscription: Subscription | AsyncSubscription, count: int, lost: list[Message | Gap]
) -> None:
    done = subscription._done
    if done is not None:  # (a member's: the publisher must not wait for them)
        for message in lost:
            if type(message) is Message:
                done(message)
    before = subscription.dropped
    subscription.dropped += count
    if crossed_power_of_ten(before, subscription.dropped):
        logger.warning(
            "subscription %r (%s) is not keeping up: %d messages dropped (queue of %d messages "
            "or %d bytes full)",
            subscription.topic_name,
            subscription.topic_type,
            subscription.dropped,
            subscription.queue_size,
            subscription.queue_bytes,
        )


def _without_expired(
    subscription: Subscription | AsyncSubscription, items: list[Message | Gap], gaps: bool
) -> list[Message | Gap]:
    """``items`` less the messages whose expiry passed while they waited (counted in
    ``subscription.expired``), each run of them from one publisher on one topic replaced by a
    Gap when ``gaps``."""
    now = time.time()
    # (Gaps never expire: math.inf.) The usual case, nothing expired: one pass in C.
    if min([item.expires_at for item in items], default=math.inf) > now:
        return items
    kept: list[Message | Gap] = []
    expired = 0
    done = subscription._done
    for item in items:
        if type(item) is not Message or item.expires_at > now:
            kept.append(item)
            continue
        expired += 1
        if done is not None:
            done(item)
        if not gaps:
            continue
        last = kept[-1] if kept else None
        if (
            type(last) is Gap
            and last.reason == "expired"
            and (last.topic_name, last.source_id) == (item.topic_name, item.source_id)
            and last.first_sequence + last.count == item.sequence
        ):
            kept[-1] = Gap(
                last.topic_name, last.source_id, last.source_name, last.first_sequence,
                last.count + 1, "expired",
            )  # fmt: skip
        else:
            kept.append(
                Gap(item.topic_name, item.source_id, item.source_name, item.sequence, 1, "expired")
            )
    before = subscription.expired
    subscription.expired += expired
    if crossed_power_of_ten(before, subscription.expired):
        logger.warning(
            "subscription %r (%s): %d messages expired while they waited in its queue, not "
            "handed over (a callback or reader too slow for the messages' expiry)",
            subscription.topic_name,
            subscription.topic_type,
            subscription.expired,
        )
    return kept


def crossed_power_of_ten(before: int, after: int) -> bool:
    """Warn when a drop count first reaches 1, 10, 100...: visible, without flooding the log."""
    return before == 0 or len(str(after)) > len(str(before))


def _warn_dropped(what: str, dropped: int, queue_size: int, queue_bytes: int) -> None:
    logger.warning(
        "%s is not keeping up: %d events dropped (queue of %d events or %d bytes full)",
        what,
        dropped,
        queue_size,
        queue_bytes,
    )


def _fitting(messages: list[Message | Gap], room: int, room_bytes: int, empty: bool) -> int:
    """How many of ``messages``, from the first, fit in ``room`` items and ``room_bytes`` bytes;
    into an ``empty`` queue the first always fits (one message may exceed the byte bound)."""
    count = 0
    for message in messages:
        if count >= room:
            break
        room_bytes -= len(message.payload)
        if room_bytes < 0 and not (empty and count == 0):
            break
        count += 1
    return count


def expired_now(message: MessageReceived) -> bool:
    """Whether a direct message's expiry passed (wall clock, as ``expires_at``)."""
    return message.expires_at <= time.time()


class _Runnable(Protocol):
    """What the pool runs: a subscription, or one sender's lane of an ``on_message``."""

    def _run_batch(self) -> bool: ...
    def describe(self) -> str: ...


class CallbackPool:
    """Threads that run subscriptions' callbacks; each subscription runs on one at a time."""

    def __init__(self, threads: int, name: str) -> None:
        self._max = threads
        self._name = name
        self._ready: queue.SimpleQueue[_Runnable | None] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._idle = 0  # threads waiting for work
        self._queued = 0  # subscriptions put in ``_ready`` and not yet taken
        self._lock = threading.Lock()
        self._idents: set[int] = set()
        self._current: dict[threading.Thread, _Runnable] = {}  # what each thread runs now

    def schedule(self, subscription: _Runnable) -> None:
        """Run ``subscription``'s waiting callbacks on a pool thread (starting one if needed)."""
        self._enqueue(subscription)

    def _enqueue(self, subscription: _Runnable, *, start: bool = True) -> None:
        """Queue ``subscription`` for a pool thread, starting one if needed and ``start``."""
        with self._lock:
            self._queued += 1
            # A thread for each queued subscription, as far as the limit allows: counting idle
            # threads alone would let two subscriptions queued before an idle thread wakes share
            # it, and the second would wait behind whatever the first's callback blocks on.
            if start and self._idle < self._queued and len(self._threads) < self._max:
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

    def stop(self, timeout: float | None = None) -> list[str]:
        """Let every thread finish the callback it is in, then join them, waiting ``timeout`` s
        at most in all (not from a pool thread). Returns what still runs after that."""
        with self._lock:
            threads = list(self._threads)
        for _ in threads:
            self._ready.put(None)
        current = threading.current_thread()
        deadline = None if timeout is None else time.monotonic() + timeout
        for thread in threads:
            if thread is not current:
                thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        still = []
        for thread in threads:
            subscription = self._current.get(thread)
            if thread is not current and thread.is_alive() and subscription is not None:
                still.append(f"{subscription.describe()} on thread {thread.name}")
        return still

    def _work(self) -> None:
        self._idents.add(threading.get_ident())
        me = threading.current_thread()
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
            self._current[me] = subscription
            more = subscription._run_batch()
            del self._current[me]
            if more:  # more waiting: go round, others get a turn
                # This thread takes the next one itself, so no thread is started for it (it is
                # not idle yet: counted so, one subscription's long stream would start every
                # thread of the pool, hopping between them).
                self._enqueue(subscription, start=False)


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
        queue_bytes: int = DEFAULT_QUEUE_BYTES,
        inline: bool = False,
        on_gap: GapCallback | None = None,
        gaps: bool = False,
        group: str | None = None,
        done: DoneReporter | None = None,
    ) -> None:
        self.topic_name = topic_name
        self.topic_type = topic_type
        self.callback = callback
        #: Called with each Gap, in order with the messages (see ``subscribe(on_gap=)``).
        self.on_gap = on_gap
        #: Iteration yields Gaps too (``subscribe(gaps=True)``).
        self.gaps = gaps
        #: The work-queue group it is a member of (``subscribe(group=)``), or None.
        self.group = group
        self._done = done  # (a member's) told of each message it is finished with
        #: Messages not handed over because their expiry passed while they waited in the queue.
        self.expired = 0
        self.queue_size = queue_size
        self.queue_bytes = queue_bytes
        #: Whether the callback runs on the network thread (no queue; see ``subscribe``).
        self.inline = inline
        self._inline_thread: int | None = None  # the thread in the inline callback now
        #: Messages dropped because this subscription's queue was full.
        self.dropped = 0
        self.id = 0  # set when the endpoint has registered it
        self._pool = pool
        self._unsubscribe = unsubscribe
        # Messages, and gaps when asked for (``subscribe(gaps=True)``), in order.
        self._items: deque[Message | Gap] = deque()
        self._bytes = 0  # payload bytes in ``_items``
        # Messages a pool thread took for its batch and has not yet started to call back for:
        # still waiting, so they count against queue_size and queue_bytes (a stuck callback
        # holds at most the bounds + the one it is in).
        self._taken = 0
        self._taken_bytes = 0
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
        if not self._pool.on_pool_thread() and self._inline_thread != threading.get_ident():
            with self._running:
                pass

    def _end(self) -> bool:
        with self._lock:
            if self._closed:
                return False
            self._closed = True
            self._items.clear()
            self._bytes = 0
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
            UsageTypeError, UsageValueError: ``timeout`` is not None or a number >= 0.
        """
        timeout = _check_timeout(timeout)
        if self.callback is not None:
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
                self._bytes = 0
            batch = _without_expired(self, batch, self.gaps)
            # (a Gap among them only for a subscription made with gaps=True)
            yield from cast(list[Message], batch)

    def get(self, timeout: float | None = None) -> Message:
        """The next message (iterator subscriptions).

        Raises:
            TimeoutError: none within ``timeout`` seconds.
            EOFError: the subscription is closed.
            UsageError: the subscription has a callback (its messages go there).
            UsageTypeError, UsageValueError: ``timeout`` is not None or a number >= 0.
        """
        timeout = _check_timeout(timeout)
        if self.callback is not None:
            raise UsageError("this subscription delivers to its callback; use no get()")
        with self._lock:
            if not self._lock.wait_for(lambda: self._items or self._closed, timeout):
                raise TimeoutError(f"no message on {self.topic_name!r} within {timeout} s")
            if self._closed:
                raise EOFError(f"subscription to {self.topic_name!r} is closed")
            while True:
                message = self._items.popleft()
                self._bytes -= len(message.payload)
                found = _without_expired(self, [message], self.gaps)
                if found:
                    return cast(Message, found[0])  # (or a Gap: gaps=True)
                if not self._lock.wait_for(lambda: self._items or self._closed, timeout):
                    raise TimeoutError(f"no message on {self.topic_name!r} within {timeout} s")
                if self._closed:
                    raise EOFError(f"subscription to {self.topic_name!r} is closed")

    # --- called by the manager ------------------------------------------------------------------

    def in_inline_callback(self) -> bool:
        """Whether an inline callback of this subscription is running now."""
        return self._inline_thread is not None

    def describe(self) -> str:
        """The callback and the subscription, for people (stop reports)."""
        return f"callback {self.callback!r} of subscription {self.topic_name!r} ({self.topic_type})"

    def _put_many(self, messages: list[Message | Gap]) -> int:
        """On the network thread: queue ``messages`` (and gaps; or call an inline callback with
        each); returns how many were dropped (full)."""
        if self.inline:
            self._call_inline(messages)
            return 0
        schedule = False
        lost = 0
        dropped: list[Message | Gap] = []
        size = sum([len(m.payload) for m in messages])
        with self._mutex:
            if self._closed:
                return 0
            items = self._items
            room = self.queue_size - len(items) - self._taken
            room_bytes = self.queue_bytes - self._bytes - self._taken_bytes
            if room < len(messages) or room_bytes < size:
                empty = not items and not self._taken
                kept = _fitting(messages, room, room_bytes, empty)
                lost = len(messages) - kept
                dropped = messages[kept:]
                messages = messages[:kept]
                size = sum([len(m.payload) for m in messages])
            items.extend(messages)
            self._bytes += size
            if self.callback is None:
                self._lock.notify()
            elif not self._scheduled and items:
                self._scheduled = schedule = True
        if lost:
            _report_drop(self, lost, dropped)
        if schedule:
            self._pool.schedule(self)
        return lost

    def _call_inline(self, messages: list[Message | Gap]) -> None:
        """On the network thread: the callback for each message, in order, unless closed."""
        callback = self.callback
        assert callback is not None
        with self._running:
            self._inline_thread = threading.get_ident()
            try:
                for message in messages:
                    if self._closed:
                        break
                    self._hand(callback, message)
            finally:
                self._inline_thread = None

    def _hand(self, callback: MessageCallback, item: Message | Gap) -> None:
        """Give one message to ``callback`` (a Gap to ``on_gap``, if any); log what it raises."""
        try:
            if type(item) is Gap:
                if self.on_gap is not None:
                    self.on_gap(item)
            else:
                callback(cast(Message, item))
        except Exception:
            logger.exception("callback of subscription %r failed", self.topic_name)
        if self._done is not None and type(item) is Message:
            self._done(item)  # (a member's: returned, raising or not; done)

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
                    size = self._bytes
                else:
                    batch = [items.popleft() for _ in range(_BATCH)]
                    size = sum([len(m.payload) for m in batch])
                self._bytes -= size
                self._taken = len(batch)
                self._taken_bytes = size
            taken = len(batch)
            batch = _without_expired(self, batch, self.on_gap is not None)
            if len(batch) != taken:  # (the expired are no longer waiting)
                with self._mutex:
                    self._taken = len(batch)
                    self._taken_bytes = sum([len(m.payload) for m in batch])
            # The usual case (a plain subscription) calls the callback here, not through
            # _hand: one Python call less per message (~0.1 us of ~0.5).
            plain = self._done is None
            for message in batch:
                if self._closed:
                    break
                # (one writer, this thread; a reader may see them one message late)
                self._taken -= 1
                self._taken_bytes -= len(message.payload)
                if plain and type(message) is Message:
                    try:
                        callback(message)
                    except Exception:
                        logger.exception("callback of subscription %r failed", self.topic_name)
                else:
                    self._hand(callback, message)
            with self._mutex:
                self._taken = 0
                self._taken_bytes = 0
                if self._items and not self._closed:
                    return True
                self._scheduled = False
                return False


class SenderLanes:
    """One ``on_message`` callback of the blocking manager: each sender's messages wait in a
    lane of their own and run in order on the callback pool, lanes side by side, so a handler
    slow for one sender does not hold up another's.

    The lanes share one bound (``queue_size`` messages, ``queue_bytes`` bytes of payload);
    beyond, messages are dropped, counted and reported. A message whose expiry passed while it
    waited is not handed over (``on_expired`` is told how many).
    """

    def __init__(
        self,
        callback: Callable[[MessageReceived], object],
        *,
        pool: CallbackPool,
        what: str,
        queue_size: int,
        queue_bytes: int,
        on_expired: Callable[[int], None],
    ) -> None:
        self.callback = callback
        self.what = what
        #: Messages dropped because the queue was full.
        self.dropped = 0
        self._expiry: _ExpirySkip[MessageReceived] = _ExpirySkip(
            what, None, on_expired, "a callback"
        )
        self._pool = pool
        self._queue_size = queue_size
        self._queue_bytes = queue_bytes
        self._lanes: dict[int, _Lane] = {}
        self._waiting = 0  # messages in every lane, and their payload bytes
        self._waiting_bytes = 0
        self._lock = threading.Lock()
        self.closed = False

    def offer(self, messages: list[MessageReceived]) -> int:
        """On the network thread: queue ``messages`` (in order, of any senders) in their
        senders' lanes; returns how many were dropped (full)."""
        dropped = 0
        schedule: list[_Lane] = []
        with self._lock:
            if self.closed:
                return 0
            for message in messages:
                size = len(message.payload)
                if self._waiting and (
                    self._waiting >= self._queue_size
                    or self._waiting_bytes + size > self._queue_bytes
                ):
                    dropped += 1
                    continue
                self._waiting += 1
                self._waiting_bytes += size
                sender = message.source.endpoint_id
                lane = self._lanes.get(sender)
                if lane is None:
                    lane = self._lanes[sender] = _Lane(self, message.source.name)
                lane.items.append(message)
                if not lane.scheduled:
                    lane.scheduled = True
                    schedule.append(lane)
        for lane in schedule:
            self._pool.schedule(lane)
        if dropped:
            before = self.dropped
            self.dropped += dropped
            if crossed_power_of_ten(before, self.dropped):
                _warn_dropped(self.what, self.dropped, self._queue_size, self._queue_bytes)
        return dropped

    def forget(self, sender: int) -> None:
        """``sender`` left: its lane goes once nothing waits in it."""
        with self._lock:
            lane = self._lanes.get(sender)
            if lane is not None and not lane.scheduled:
                del self._lanes[sender]

    def close(self) -> None:
        """No callback starts after this (one running may finish). Idempotent."""
        with self._lock:
            self.closed = True
            for lane in self._lanes.values():
                lane.items.clear()
            self._lanes.clear()
            self._waiting = self._waiting_bytes = 0

    def _take(self, lane: _Lane) -> list[MessageReceived]:
        """On a pool thread: up to a batch of ``lane``'s messages, no longer counted waiting."""
        with self._lock:
            items = lane.items
            batch = [items.popleft() for _ in range(min(len(items), _BATCH))]
            self._waiting -= len(batch)
            self._waiting_bytes -= sum([len(m.payload) for m in batch])
            return batch

    @property
    def expired(self) -> int:
        """Messages not handed over because they expired while they waited."""
        return self._expiry.count


class _Lane:
    """The messages of one sender for one :class:`SenderLanes`, run by the pool in order."""

    __slots__ = ("items", "owner", "scheduled", "sender")

    def __init__(self, owner: SenderLanes, sender: str) -> None:
        self.owner = owner
        self.sender = sender
        self.items: deque[MessageReceived] = deque()
        self.scheduled = False  # in the pool's queue or running there (under owner._lock)

    def describe(self) -> str:
        return (
            f"{self.owner.what} (callback {self.owner.callback!r}) for messages from {self.sender}"
        )

    def _run_batch(self) -> bool:
        owner = self.owner
        batch = owner._take(self)
        now = time.time()
        live = [m for m in batch if m.expires_at > now]
        if len(live) != len(batch):
            owner._expiry.expired(len(batch) - len(live))
        callback = owner.callback
        for message in live:
            if owner.closed:
                break
            try:
                callback(message)
            except Exception:
                logger.exception("%s: callback %r failed", owner.what, callback)
        with owner._lock:
            if self.items and not owner.closed:
                return True  # more waiting: go round, others get a turn
            self.scheduled = False
            return False


class SenderRunners:
    """One ``on_message`` callback of the asyncio manager: a :class:`CallbackRunner` per
    sender, so an ``async`` handler slow for one sender does not hold up another's; each
    sender's messages in order. A message whose expiry passed while it waited is not handed
    over (``on_expired`` is told)."""

    def __init__(
        self,
        callback: Callable[[Any], object],
        *,
        what: str,
        queue_size: int,
        queue_bytes: int,
        on_expired: Callable[[int], None],
    ) -> None:
        self.callback = callback
        self.what = what
        self._queue_size = queue_size
        self._queue_bytes = queue_bytes
        self._on_expired = on_expired
        self._runners: dict[int, CallbackRunner] = {}
        self._closed = False

    @property
    def dropped(self) -> int:
        """Messages dropped because a sender's queue was full."""
        return sum(runner.dropped for runner in self._runners.values())

    def offer(self, message: MessageReceived) -> bool:
        """On the loop: queue ``message`` in its sender's runner; False if dropped (full)."""
        if self._closed:
            return True
        sender = message.source.endpoint_id
        runner = self._runners.get(sender)
        if runner is None:
            runner = self._runners[sender] = CallbackRunner(
                self.callback,
                what=f"{self.what} for messages from {message.source.name}",
                queue_size=self._queue_size,
                queue_bytes=self._queue_bytes,
                sizer=_payload_bytes,
                expired=expired_now,
                on_expired=self._on_expired,
            )
        return runner.offer(message)

    def forget(self, sender: int) -> None:
        """``sender`` left: its runner goes once nothing waits in it."""
        runner = self._runners.get(sender)
        if runner is not None and runner.idle():
            runner.close()
            del self._runners[sender]

    def close(self) -> None:
        self._closed = True
        for runner in self._runners.values():
            runner.close()

    async def stop(self, timeout: float | None) -> str | None:  # noqa: ASYNC109
        """As :meth:`CallbackRunner.stop`, for every sender's runner (``timeout`` each)."""
        self._closed = True
        still = [await runner.stop(timeout) for runner in list(self._runners.values())]
        left = [what for what in still if what is not None]
        return "; ".join(left) if left else None


def _payload_bytes(message: MessageReceived) -> int:
    return len(message.payload)


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
        queue_bytes: int = DEFAULT_QUEUE_BYTES,
        on_gap: AsyncGapCallback | None = None,
        gaps: bool = False,
        group: str | None = None,
        done: DoneReporter | None = None,
    ) -> None:
        self.topic_name = topic_name
        self.topic_type = topic_type
        self.callback = callback
        #: Called with each Gap, in order with the messages (see ``subscribe(on_gap=)``).
        self.on_gap = on_gap
        #: Iteration yields Gaps too (``subscribe(gaps=True)``).
        self.gaps = gaps
        #: The work-queue group it is a member of (``subscribe(group=)``), or None.
        self.group = group
        self._done = done  # (a member's) told of each message it is finished with
        #: Messages not handed over because their expiry passed while they waited in the queue.
        self.expired = 0
        self.queue_size = queue_size
        self.queue_bytes = queue_bytes
        #: Messages dropped because this subscription's queue was full.
        self.dropped = 0
        self.id = 0
        self._unsubscribe = unsubscribe
        # Messages (and gaps, when asked for) waiting, in order; ``_ready`` is set when some
        # arrive (or at close). A deque and an Event, not an asyncio.Queue: a burst is queued
        # with one extend and one wake-up, and taking a message costs no coroutine step.
        self._items: deque[Message | Gap] = deque()
        self._ready = asyncio.Event()
        self._bytes = 0  # payload bytes waiting in ``_items``
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
        self._items.clear()
        self._bytes = 0
        self._ready.set()  # (waiting iterators see it closed)
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
            raise UsageError("this subscription delivers to its callback; it cannot be iterated")
        return self._messages()

    async def _messages(self) -> AsyncIterator[Message]:
        while (message := await self._take()) is not None:
            yield message

    async def get(self) -> Message:
        """The next message (iterator subscriptions).

        Raises:
            EOFError: the subscription is closed.
            UsageError: the subscription has a callback (its messages go there).
        """
        if self.callback is not None:
            raise UsageError("this subscription delivers to its callback; use no get()")
        message = await self._take()
        if message is None:
            raise EOFError(f"subscription to {self.topic_name!r} is closed")
        return message

    async def _take(self) -> Message | None:
        return cast(Message | None, await self._take_item())  # (or a Gap: gaps=True)

    async def _take_item(self) -> Message | Gap | None:
        """The next message (or gap) to hand over; None once closed. A message whose expiry
        passed while it waited is not (counted; a Gap instead when gaps are asked for)."""
        items = self._items
        while True:
            if not items:
                if self._closed:
                    return None
                self._ready.clear()
                await self._ready.wait()
                continue
            message = items.popleft()
            self._bytes -= len(message.payload)
            if type(message) is Message and message.expires_at > time.time():
                return message  # (the usual case)
            found = _without_expired(self, [message], self.gaps or self.on_gap is not None)
            if found:
                return found[0]

    # --- called by the manager ------------------------------------------------------------------

    def _put_many(self, messages: list[Message | Gap]) -> int:
        if self._closed:
            return 0
        size = sum([len(m.payload) for m in messages])
        items = self._items
        waiting = len(items)
        room = self.queue_size - waiting
        room_bytes = self.queue_bytes - self._bytes
        lost = 0
        dropped: list[Message | Gap] = []
        if room < len(messages) or room_bytes < size:
            kept = _fitting(messages, room, room_bytes, waiting == 0)
            lost = len(messages) - kept
            dropped = messages[kept:]
            messages = messages[:kept]
            size = sum([len(m.payload) for m in messages])
        if messages:
            items.extend(messages)
            self._bytes += size
            self._ready.set()
        if lost:
            _report_drop(self, lost, dropped)
        return lost

    async def _call_back(self, callback: AsyncMessageCallback) -> None:
        items = self._items
        while True:
            if items:  # (what _take_item does, inline: no coroutine per message)
                message = items.popleft()
                self._bytes -= len(message.payload)
                if type(message) is not Message or message.expires_at <= time.time():
                    found = _without_expired(self, [message], self.gaps or self.on_gap is not None)
                    if not found:
                        continue
                    message = found[0]
            else:
                waited = await self._take_item()
                if waited is None:
                    return
                message = waited
            try:
                if isinstance(message, Gap):
                    result = self.on_gap(message) if self.on_gap is not None else None
                else:
                    result = callback(message)
                if result is not None and inspect.isawaitable(result):
                    await result
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("callback of subscription %r failed", self.topic_name)
            if self._done is not None and type(message) is Message:
                self._done(message)  # (a member's: returned, raising or not; done)

    async def _wait_closed(self, timeout: float | None = None) -> str | None:  # noqa: ASYNC109
        """Wait up to ``timeout`` s for the callback task to end; what still runs, if any."""
        task = self._task
        if task is None or task.done():
            return None
        with contextlib.suppress(asyncio.CancelledError, TimeoutError):
            await asyncio.wait_for(asyncio.shield(task), timeout)
        if task.done():
            return None
        return (
            f"callback {self.callback!r} of subscription {self.topic_name!r} "
            f"({self.topic_type}) on task {task.get_name()}"
        )


# --- event iterators and callback runners of the managers ---------------------------------------


class EventQueue(Generic[T]):
    """The queue between the network thread and one :class:`EventIterator`.

    Bounded in events and, with a ``sizer``, in bytes; what does not fit is dropped, counted in
    ``dropped`` and warned about when the count reaches 1, 10, 100... Byte counts are two
    counters with one writer each (the network thread adds, the reader subtracts), so neither
    side takes a lock.
    """

    __slots__ = (
        "_added_bytes",
        "_items",
        "_queue_bytes",
        "_queue_size",
        "_sizer",
        "_taken_bytes",
        "dropped",
        "what",
    )

    def __init__(self, what: str, queue_size: int, queue_bytes: int, sizer: Sizer | None) -> None:
        self.what = what
        self.dropped = 0
        self._queue_size = queue_size
        self._queue_bytes = queue_bytes
        self._sizer = sizer
        # SimpleQueue: put and get are C calls (queue.Queue runs a Condition in Python), which
        # is most of the hand-off to a thread waiting in ``messages()``.
        self._items: queue.SimpleQueue[T | None] = queue.SimpleQueue()
        self._added_bytes = 0
        self._taken_bytes = 0

    def offer(self, item: T) -> bool:
        """On the network thread: queue ``item`` if it fits; False (dropped, counted) if not."""
        sizer = self._sizer
        size = 0 if sizer is None else sizer(item)
        waiting = self._items.qsize()
        if waiting >= self._queue_size or (
            waiting and self._added_bytes - self._taken_bytes + size > self._queue_bytes
        ):
            self.dropped += 1
            if crossed_power_of_ten(self.dropped - 1, self.dropped):
                _warn_dropped(self.what, self.dropped, self._queue_size, self._queue_bytes)
            return False
        self._added_bytes += size
        self._items.put(item)
        return True

    def end(self) -> None:
        """Wake the reader and end its iteration (the endpoint stopped); never dropped."""
        self._items.put(None)

    def get(self, timeout: float | None) -> T | None:
        """The next event; None at the end or after ``timeout`` s without one."""
        try:
            item = self._items.get(timeout=timeout)
        except queue.Empty:
            return None
        if item is not None and self._sizer is not None:
            self._taken_bytes += self._sizer(item)
        return item


class _ExpirySkip(Generic[T]):
    """What an iterator, callback runner or lanes of direct messages did not hand over because
    it expired while it waited: counted, told to ``on_expired``, warned about at the 1st, 10th,
    100th... (``who`` was too slow: "a reader", "a callback")."""

    __slots__ = ("check", "count", "on_expired", "what", "who")

    def __init__(
        self,
        what: str,
        check: Callable[[T], bool] | None,
        on_expired: Callable[[int], None] | None,
        who: str = "a reader",
    ) -> None:
        self.what = what
        self.check = check
        self.on_expired = on_expired
        self.who = who
        self.count = 0

    def skips(self, item: T) -> bool:
        """Whether ``item`` expired (then counted, as :meth:`expired` says)."""
        if self.check is None or not self.check(item):
            return False
        self.expired(1)
        return True

    def expired(self, count: int) -> None:
        """``count`` more were not handed over."""
        before = self.count
        self.count += count
        if self.on_expired is not None:
            self.on_expired(count)
        if crossed_power_of_ten(before, self.count):
            logger.warning(
                "%s: %d messages expired while they waited in its queue, not handed over (%s "
                "too slow for the messages' expiry)",
                self.what,
                self.count,
                self.who,
            )


class EventIterator(Generic[T]):
    """What ``EndpointManager.messages()`` and ``peer_events()`` return.

    It receives from the call on, so nothing that happens between the call and the first
    ``next`` is missed, until it is closed (``close()``, or ``with ... as stream:`` ends), ends
    (the endpoint stopped, or ``timeout`` s passed without an event), or is garbage-collected:
    an iterator dropped without being iterated stops receiving at once. One kept and never
    iterated holds at most its bounds (events and bytes) and warns at the 1st, 10th, 100th...
    drop.
    """

    def __init__(
        self,
        streams: set[EventQueue[T]],
        *,
        what: str,
        timeout: float | None,
        queue_size: int,
        queue_bytes: int,
        sizer: Sizer | None,
        ended: Callable[[], bool],
        expired: Callable[[T], bool] | None = None,
        on_expired: Callable[[int], None] | None = None,
    ) -> None:
        # The registry holds the queue, never this iterator: dropping it unregisters (__del__).
        self._streams = streams
        self._timeout = timeout
        self._expiry = _ExpirySkip(what, expired, on_expired)
        self._queue: EventQueue[T] = EventQueue(what, queue_size, queue_bytes, sizer)
        self._open = True
        streams.add(self._queue)
        # After registering: a stop that ran before the add could not end this queue.
        if ended():
            self.close()

    @property
    def dropped(self) -> int:
        """Events dropped because this iterator's queue was full."""
        return self._queue.dropped

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> T:
        if not self._open:
            raise StopIteration
        item = self._queue.get(self._timeout)
        while item is not None and self._expiry.skips(item):
            item = self._queue.get(self._timeout)
        if item is None:
            self.close()
            raise StopIteration
        return item

    @property
    def expired(self) -> int:
        """Messages not handed over because they expired while they waited."""
        return self._expiry.count

    def close(self) -> None:
        """Stop receiving; iteration ends. Idempotent."""
        self._open = False
        self._streams.discard(self._queue)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __del__(self) -> None:
        self._streams.discard(self._queue)


class AsyncEventQueue(Generic[T]):
    """The queue between the network loop and one :class:`AsyncEventIterator` (same loop),
    bounded like :class:`EventQueue`."""

    __slots__ = (
        "_bytes",
        "_items",
        "_queue_bytes",
        "_queue_size",
        "_sizer",
        "_waiter",
        "dropped",
        "what",
    )

    def __init__(self, what: str, queue_size: int, queue_bytes: int, sizer: Sizer | None) -> None:
        self.what = what
        self.dropped = 0
        self._queue_size = queue_size
        self._queue_bytes = queue_bytes
        self._sizer = sizer
        self._items: deque[T | None] = deque()
        self._bytes = 0
        self._waiter: asyncio.Future[None] | None = None

    def offer(self, item: T) -> bool:
        """On the loop: queue ``item`` if it fits; False (dropped, counted, warned) if not."""
        size = 0 if self._sizer is None else self._sizer(item)
        items = self._items
        if len(items) >= self._queue_size or (items and self._bytes + size > self._queue_bytes):
            self.dropped += 1
            if crossed_power_of_ten(self.dropped - 1, self.dropped):
                _warn_dropped(self.what, self.dropped, self._queue_size, self._queue_bytes)
            return False
        self._bytes += size
        items.append(item)
        self.wake()
        return True

    def end(self) -> None:
        """The endpoint stopped: iteration ends after what is queued."""
        self._items.append(None)
        self.wake()

    async def get(self) -> T | None:
        """The next event, waiting for one; None at the end."""
        items = self._items
        while not items:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        item = items.popleft()
        if item is not None and self._sizer is not None:
            self._bytes -= self._sizer(item)
        return item

    def wake(self) -> None:
        """Let a waiting :meth:`get` look again."""
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def clear(self) -> None:
        """Forget what waits, and end a waiting :meth:`get`."""
        self._items.clear()
        self._bytes = 0
        self.end()


class AsyncEventIterator(Generic[T]):
    """What ``AsyncEndpointManager.messages()`` and ``peer_events()`` return: ``async for``.

    Receives from the call on until closed (``close()``/``aclose()``, or a ``with``/``async
    with`` block ends), the endpoint stops, or it is garbage-collected; bounded in events and
    bytes like :class:`EventIterator`.
    """

    def __init__(
        self,
        streams: set[AsyncEventQueue[T]],
        *,
        what: str,
        queue_size: int,
        queue_bytes: int,
        sizer: Sizer | None,
        ended: Callable[[], bool],
        expired: Callable[[T], bool] | None = None,
        on_expired: Callable[[int], None] | None = None,
    ) -> None:
        self._streams = streams
        self._expiry = _ExpirySkip(what, expired, on_expired)
        self._queue: AsyncEventQueue[T] = AsyncEventQueue(what, queue_size, queue_bytes, sizer)
        self._open = True
        streams.add(self._queue)
        if ended():
            self.close()

    @property
    def dropped(self) -> int:
        """Events dropped because this iterator's queue was full."""
        return self._queue.dropped

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> T:
        if not self._open:
            raise StopAsyncIteration
        item = await self._queue.get()
        while item is not None and self._expiry.skips(item):
            item = await self._queue.get()
        if item is None:
            self.close()
            raise StopAsyncIteration
        return item

    @property
    def expired(self) -> int:
        """Messages not handed over because they expired while they waited."""
        return self._expiry.count

    def close(self) -> None:
        """Stop receiving; iteration ends (a waiting ``__anext__`` too). Idempotent."""
        if self._open:
            self._open = False
            self._queue.clear()
        self._streams.discard(self._queue)

    async def aclose(self) -> None:
        """:meth:`close`, as async generators have it (``contextlib.aclosing``)."""
        self.close()

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

    def __del__(self) -> None:
        self._streams.discard(self._queue)


class CallbackRunner:
    """Runs one callback of :class:`~glue.manager.AsyncEndpointManager` (``on_message``,
    ``on_peer_added``, ``on_peer_removed``) for each event, in order, one call at a time.

    Events wait in one queue bounded in events and bytes (dropped beyond, counted, warned
    about); one task, started with the first event, calls the callback and awaits what an
    ``async`` callback returns before the next event.
    """

    def __init__(
        self,
        callback: Callable[[Any], object],
        *,
        what: str,
        queue_size: int,
        queue_bytes: int,
        sizer: Sizer | None,
        expired: Callable[[Any], bool] | None = None,
        on_expired: Callable[[int], None] | None = None,
    ) -> None:
        self.callback = callback
        self.what = what
        #: Events dropped because the queue was full.
        self.dropped = 0
        self._expiry: _ExpirySkip[Any] = _ExpirySkip(what, expired, on_expired, "a callback")
        self._queue_size = queue_size
        self._queue_bytes = queue_bytes
        self._sizer = sizer
        self._items: deque[object] = deque()
        self._bytes = 0
        self._waiter: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    def offer(self, item: object) -> bool:
        """On the loop: queue ``item`` for the callback; False (dropped, counted) if full."""
        if self._closed:
            return True
        size = 0 if self._sizer is None else self._sizer(item)
        items = self._items
        if len(items) >= self._queue_size or (items and self._bytes + size > self._queue_bytes):
            self.dropped += 1
            if crossed_power_of_ten(self.dropped - 1, self.dropped):
                _warn_dropped(self.what, self.dropped, self._queue_size, self._queue_bytes)
            return False
        self._bytes += size
        items.append(item)
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=self.what)
        else:
            waiter = self._waiter
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
        return True

    def idle(self) -> bool:
        """Nothing waits and no call runs."""
        return not self._items and (self._task is None or self._waiter is not None)

    def close(self) -> None:
        """No call starts after this; a call running now may finish. Idempotent."""
        self._closed = True
        self._items.clear()
        self._bytes = 0
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def stop(self, timeout: float | None) -> str | None:  # noqa: ASYNC109
        """Close, cancel a running ``async`` call, wait ``timeout`` s at most for it to end;
        what still runs after that, if anything."""
        self.close()
        task = self._task
        if task is None or task.done():
            return None
        name = task.get_name()
        if not _is_current(task):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(asyncio.shield(task), timeout)
            if task.done():
                return None
        return f"{self.what} (callback {self.callback!r}) on task {name}"

    async def _run(self) -> None:
        items, callback, sizer = self._items, self.callback, self._sizer
        loop = asyncio.get_running_loop()
        while not self._closed:
            if not items:
                self._waiter = loop.create_future()
                try:
                    await self._waiter
                finally:
                    self._waiter = None
                continue
            # Plain callbacks run back to back; the loop gets a turn after a batch of them.
            for _ in range(_BATCH):
                if not items or self._closed:
                    break
                item = items.popleft()
                if sizer is not None:
                    self._bytes -= sizer(item)
                if self._expiry.skips(item):
                    continue
                try:
                    result = callback(item)
                    if inspect.isawaitable(result):
                        await result
                except asyncio.CancelledError:
                    raise
                except Exception:
                    logger.exception("%s: callback %r failed", self.what, callback)
            else:
                await asyncio.sleep(0)

    @property
    def expired(self) -> int:
        """Events not handed over because ``expired`` said so when their turn came."""
        return self._expiry.count


def _is_current(task: asyncio.Task[Any]) -> bool:
    return asyncio.current_task() is task


def _check_timeout(timeout: object) -> float | None:
    """``timeout`` if None (wait without limit) or a finite number of seconds >= 0."""
    return None if timeout is None else check_timeout(timeout)
