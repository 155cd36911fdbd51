"""The asyncio runtime: ``Endpoint`` drives one sans-IO stack on the running loop.

What does not depend on asyncio (sockets, the stack, the receive and send paths, queries) is
:class:`glue.runtime.RuntimeCore`; this module adds the loop's part. On every wake-up it reads
*every* datagram waiting on a socket (non-blocking reads until ``EAGAIN``), feeds them all to the
stack, then pulls the outputs once: datagrams to send (each destination's frames packed into as
few datagrams as possible), events, and the next deadline. One timer per endpoint is re-armed
only when the earliest deadline changes.

Sends are handed over in bulk: ``send`` and ``publish`` (on the loop) append to one bounded
hand-off queue and schedule a drain only when that queue was empty; the loop moves everything
queued into the stack and flushes once. On an idle endpoint a message goes out at once. When a
peer's send queue is full, the stack's outbox holds the message (order is preserved) until acks
make room; when the hand-off queue itself is full, senders wait, then raise
:class:`~glue.errors.BackpressureError`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Final

from glue.discovery import Target
from glue.errors import BackpressureError, NoResponderError, UsageError
from glue.events import Request
from glue.metrics import MetricsServer, MetricsSnapshot
from glue.outbox import Outgoing, Publications
from glue.runtime import BUSY_PREEMPTED_S, BusyBackoff, EventListener, RuntimeCore, literal_address
from glue.settings import GlueSettings
from glue.stack import BUNDLE_MAX_MESSAGE_BYTES
from glue.wire import EndpointId

__all__ = ["Endpoint", "EventListener"]

logger = logging.getLogger(__name__)

#: How long a metrics scrape waits for the loop to take a snapshot.
_SNAPSHOT_TIMEOUT_S: Final = 2.0
_MAX_DRAIN_PER_CALL: Final = 4096
_HANDOFF_SOFT_ITEMS: Final = 8192
#: Publications in one run of the hand-off queue at most (see ``Endpoint._join_run``).
_RUN: Final = 1024


class Endpoint(RuntimeCore):
    """One glue endpoint: sockets, the protocol stack and its timer, on the running loop."""

    def __init__(self, settings: GlueSettings) -> None:
        super().__init__(settings)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._resolver: asyncio.Task[None] | None = None
        # The hand-off queue between senders and the loop (bounded in bytes).
        self._handoff: deque[Outgoing | Publications] = deque()
        self._handoff_items = 0  # messages in it (a run of publications counts each)
        # Taken by the loop, not yet in the stack.
        self._staged: deque[Outgoing | Publications] = deque()
        # Of both queues, and of the messages the stack's outbox holds for full peers (counted
        # until every target has them: see glue.outbox).
        self._handoff_bytes = 0
        # Taken by the metrics server's thread too (the gauge of queued bytes).
        self._handoff_mutex = threading.Lock()
        self._space = asyncio.Event()
        self._drain_scheduled = False
        self._idle_waiters: list[asyncio.Future[None]] = []
        self._done_waiters: list[asyncio.Future[None]] = []  # wait_done
        self._silence_check: asyncio.TimerHandle | None = None
        # GLUE_BUSY_POLL_MICROSECONDS: after datagrams, the loop keeps turning (its selector
        # polled without sleeping) until _busy_until, so that a reply finds it awake.
        self._busy_poll_s = settings.busy_poll_microseconds / 1e6
        self._busy_until = 0.0
        self._busy = False  # the _keep_busy callback is scheduled
        self._busy_at = 0.0  # when it last ran (loop time), and this thread's CPU time then
        self._busy_cpu = 0.0
        self._busy_backoff = BusyBackoff()  # (no free core: polling stops for a while)

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the sockets and start discovery.

        Raises:
            ConfigError: an interface, address or group from the settings cannot be used.
            UsageError: the endpoint was already started.
        """
        if self._state != "new":
            raise UsageError(f"endpoint {self.name} was already started")
        self._state = "starting"
        loop = self._loop = asyncio.get_running_loop()
        self._space = asyncio.Event()
        settings = self.settings
        hints: list[str] = []
        if not settings.listen_interface:
            for target in settings.discovery_target_address:
                hints += await self._resolve(target.host)
        self._open_sockets(*self._interface_for(hints), loop.time())
        assert self._data is not None
        assert self._stack is not None
        for sock, multicast in self._sockets():
            loop.add_reader(sock.fileno(), self._on_readable, sock, multicast)
        if settings.discovery_target_address:
            self._stack.set_targets(await self._resolve_targets())
            self._resolver = loop.create_task(self._resolve_forever(), name=f"glue-dns-{self.name}")
        if settings.metrics_address is not None:
            metrics = MetricsServer(self._threadsafe_snapshot)
            try:
                metrics.start(*settings.metrics_address)
            except BaseException:
                self._state = "running"  # so that stop() releases what start() opened
                await self.stop()
                raise
            self.metrics = metrics
        self._state = "running"
        self._log_started()
        self._service(loop.time())

    async def stop(self) -> None:
        """Say goodbye to peers, close the sockets, fail waiting senders. Idempotent."""
        if self._state in ("stopped", "new"):
            self._state = "stopped"
            return
        self._state = "stopped"
        if self._stack is not None:
            self._stack.leave()
            self._flush()
        if self._resolver is not None:
            self._resolver.cancel()
            await asyncio.gather(self._resolver, return_exceptions=True)
        if self._timer is not None:
            self._timer.cancel()
        if self._silence_check is not None:
            self._silence_check.cancel()
            self._silence_check = None
        if self.metrics is not None:
            self.metrics.stop()
            self.metrics = None
        self._close_history()
        self._close_sockets()
        with self._handoff_mutex:
            held = self._stack.outbox.clear() if self._stack is not None else 0
            dropped = _messages(self._handoff) + _messages(self._staged) + held
            self._handoff.clear()
            self._handoff_items = 0
            self._staged.clear()
            self._handoff_bytes = 0
        self._space.set()
        if dropped:
            self.counters["messages_dropped_at_stop"] += dropped
            logger.warning("stopped with %d messages not yet handed to the network", dropped)
        logger.info("endpoint %s (%d) stopped", self.name, self.endpoint_id)

    # --- sending --------------------------------------------------------------------------------

    async def send(
        self,
        payload: bytes,
        *,
        to: Sequence[int] | None,
        expiry_s: float,
        timeout: float,  # noqa: ASYNC109 - the same signature as the blocking twin
        message_type: str = "",
    ) -> None:
        """Queue ``payload`` for ``to`` (every peer when ``None``), from the loop thread.

        Raises:
            BackpressureError: the hand-off queue stayed full for ``timeout`` seconds.
            UsageError: the endpoint is not running, or the payload is too large.
        """
        item = self.try_send(payload, to=to, expiry_s=expiry_s, message_type=message_type)
        if item is not None:
            await self.wait_to_queue(item, timeout)

    def try_send(
        self,
        payload: bytes,
        *,
        to: Sequence[int] | None,
        expiry_s: float,
        message_type: str = "",
    ) -> Outgoing | None:
        """:meth:`send` without waiting: ``None`` once queued, else the message, for
        :meth:`wait_to_queue` (the hand-off queue is full). No coroutine on the usual path.

        Raises:
            UsageError: the endpoint is not running, or the payload is too large.
        """
        item = self._outgoing(payload, to, expiry_s, message_type)
        return None if self._queue_now(item) else item

    def try_publish(
        self,
        topic: str,
        topic_type: str,
        payload: bytes,
        *,
        expiry_s: float,
        history_depth: int | None,
        retain: bool = False,
    ) -> Outgoing | None:
        """:meth:`publish` without waiting (see :meth:`try_send`). Behind messages already
        queued, a small one joins the run of publications on the same topic at the end of the
        queue (:class:`~glue.outbox.Publications`: placed together, at a fraction of the cost
        per message)."""
        if (
            self._handoff
            and type(payload) is bytes
            and len(payload) <= BUNDLE_MAX_MESSAGE_BYTES
            and history_depth is None
            and retain is False
            and expiry_s > 0
            and (topic, topic_type) in self._valid_names
            and self._state == "running"
            and self._join_run(
                (topic, topic_type, None, False), payload, time.monotonic() + expiry_s
            )
        ):
            return None
        item = self._publication(topic, topic_type, payload, expiry_s, history_depth, retain)
        return None if self._queue_now(item) else item

    def _join_run(
        self, topic: tuple[str, str, int | None, bool], payload: bytes, expires_at: float
    ) -> bool:
        """Append a publication to the hand-off queue if it has room (as :meth:`_offer`), to
        the run at its end when that one is on the same ``topic`` (name, type, history depth,
        retain) and not full, else as a new run; False when there is no room, or nothing is
        queued (then the message takes the usual way, which may send it at once)."""
        size = len(payload)
        with self._handoff_mutex:
            handoff = self._handoff
            if (
                not handoff
                or self._handoff_bytes + size > self._send_queue_bytes
                or self._handoff_items >= _HANDOFF_SOFT_ITEMS
            ):
                return False
            self._handoff_bytes += size
            self._handoff_items += 1
            last = handoff[-1]
            if type(last) is Publications and last.topic == topic and len(last.payloads) < _RUN:
                last.payloads.append(payload)
                last.expiries.append(expires_at)
                last.size += size
            else:  # (a drain is scheduled: the queue was not empty)
                handoff.append(Publications(topic, [payload], [expires_at], size))
        return True

    async def publish(
        self,
        topic: str,
        topic_type: str,
        payload: bytes,
        *,
        expiry_s: float,
        history_depth: int | None,
        timeout: float,  # noqa: ASYNC109 - the same signature as the blocking twin
        retain: bool = False,
    ) -> None:
        """Queue a publication on ``topic``, from the loop thread (see :meth:`send`)."""
        item = self.try_publish(
            topic,
            topic_type,
            payload,
            expiry_s=expiry_s,
            history_depth=history_depth,
            retain=retain,
        )
        if item is not None:
            await self.wait_to_queue(item, timeout)

    async def publish_many(
        self,
        topic: str,
        topic_type: str,
        payloads: Sequence[bytes],
        *,
        expiry_s: float,
        history_depth: int | None,
        timeout: float,  # noqa: ASYNC109 - the same signature as the blocking twin
        retain: bool = False,
    ) -> None:
        """Queue publications of ``payloads`` on ``topic``, in order (see the thread runtime's
        ``publish_many``), waiting up to ``timeout`` s each time the queue is full."""
        items = self._publications(topic, topic_type, payloads, expiry_s, history_depth, retain)
        queued = 0
        try:
            for item in items:
                if not self._offer(item):
                    await self.wait_to_queue(item, timeout)
                queued += 1
        except BackpressureError as exc:
            exc.queued = queued
            raise

    def subscribe(
        self, pattern: str, topic_type: str, *, gaps: bool = False, group: str | None = None
    ) -> int:
        """Add a subscription (on the loop thread); peers hear of it at once. Returns its id.

        Raises:
            UsageError: the pattern or type is not valid, or the endpoint is not running.
        """
        if not self.running or self._stack is None:
            raise UsageError("the endpoint is not running")
        subscription = self._stack.subscribe(pattern, topic_type, gaps=gaps, group=group)
        self._flush()
        return subscription

    def report_done(self, source: int, job: tuple[int, int]) -> None:
        """On the loop: a grouped message's callback returned; its publisher hears of it after
        the loop's current turn, batched with the others of the moment."""
        self._dones.append((source, job))
        if len(self._dones) == 1 and self._loop is not None:
            self._loop.call_soon(self._drain_dones)

    def _drain_dones(self) -> None:
        dones, self._dones = self._dones, []
        if self._loop is None or not dones:
            return
        now = self._loop.time()
        self._tell_done(dones, now)
        if self.running:
            self._service(now)

    async def wait_done(self, timeout: float) -> None:  # noqa: ASYNC109 - as its blocking twin
        """Wait until every message published here to a group is done (or expired).

        Raises:
            TimeoutError: some are not done after ``timeout`` seconds.
        """
        stack = self._stack
        if stack is None or stack.topics.groups_idle():
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._done_waiters.append(waiter)
        try:
            await asyncio.wait_for(waiter, timeout)
        except TimeoutError:
            unfinished, held = stack.topics.group_jobs()
            raise TimeoutError(
                f"{unfinished} grouped messages unfinished at members and {held} waiting for "
                f"one after {timeout} s"
            ) from None
        finally:
            if waiter in self._done_waiters:
                self._done_waiters.remove(waiter)

    def keep_history(self, pattern: str, depth: int | None) -> None:
        """Keep (depth 0: stop keeping) the history of topics matching ``pattern``, on the loop
        thread (see ``Topics.keep``); ``None``: GLUE_HISTORY_DEPTH.

        Raises:
            UsageError: the pattern or depth is not valid, or the endpoint is not running.
        """
        self._keep_history(pattern, depth)
        self._flush()

    def unsubscribe(self, subscription: int) -> None:
        """Remove a subscription (on the loop thread); peers hear of it at once."""
        if self._stack is not None:
            self._stack.unsubscribe(subscription)
            if self.running:
                self._flush()

    # --- request/reply (glue.service; on the loop thread) ---------------------------------------

    def serve(self, pattern: str) -> int:
        """Serve ``pattern``; peers hear of it at once. Returns its id.

        Raises:
            UsageError: the pattern is not valid, or the endpoint is not running.
        """
        serve_id = self._serve(pattern)
        self._flush()
        return serve_id

    def unserve(self, serve_id: int) -> None:
        """Stop serving ``serve_id``; peers hear of it at once."""
        self._unserve(serve_id)
        if self.running:
            self._flush()

    def open_request(
        self,
        name: str,
        payload: bytes,
        *,
        everyone: bool,
        deadline: float,
        register: Callable[[int], object],
        excluded: frozenset[EndpointId] = frozenset(),
    ) -> list[Outgoing] | None:
        """:meth:`RuntimeCore._open_request` (queue the result with :meth:`queue`)."""
        return self._open_request(
            name,
            payload,
            everyone=everyone,
            deadline=deadline,
            register=register,
            excluded=excluded,
        )

    def queue(self, item: Outgoing) -> bool:
        """Queue ``item`` if there is room now (else False: :meth:`wait_to_queue`)."""
        return self._queue_now(item)

    def close_request(self, request_id: int) -> None:
        """The caller stopped waiting for ``request_id`` (unanswered peers count as timeouts)."""
        self._close_request(request_id)

    def no_responder(self, name: str, waited: float | None = None) -> NoResponderError:
        """The error for a request to ``name`` nobody serves (counted)."""
        return self._no_responder(name, waited)

    def reply(self, request: Request, payload: bytes, error: str | None) -> Outgoing | None:
        """The reply to ``request`` to queue, or None when its deadline passed (counted)."""
        return self._reply(request, payload, error)

    def expired_before_start(self, count: int) -> None:
        """``count`` requests were not started: their deadline had passed (counted)."""
        self._expired_before_start(count)

    def _queue_now(self, item: Outgoing) -> bool:
        """On the loop thread: queue ``item`` if the hand-off queue has room (False if not)."""
        if not self._handoff and not self._staged:
            stack = self._stack
            if stack is not None and stack.idle():
                # Nothing in flight: send at once (one loop turn less on the round trip). While
                # frames are in flight, messages gather in the queue and go out packed.
                with self._handoff_mutex:
                    # Drained right here: the offer must not schedule a drain for the next turn.
                    scheduled, self._drain_scheduled = self._drain_scheduled, True
                    offered = self._offer(item, locked=True)
                    self._drain_scheduled = scheduled
                if offered:
                    self._drain_handoff()
                return offered
        return self._offer(item)

    async def wait_to_queue(self, item: Outgoing, timeout: float) -> None:  # noqa: ASYNC109
        """On the loop thread: wait up to ``timeout`` s for room for ``item``, then queue it.

        Raises:
            BackpressureError: the hand-off queue stayed full for ``timeout`` seconds.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self._offer(item):
            remaining = deadline - loop.time()
            if remaining <= 0 or not self.running:
                raise self._backpressure(timeout, item.size)
            self._space.clear()
            try:
                await asyncio.wait_for(self._space.wait(), remaining)
            except TimeoutError:
                raise self._backpressure(timeout, item.size) from None

    def _offer(self, item: Outgoing, *, locked: bool = False) -> bool:
        """Append ``item`` to the hand-off queue if it has room; wake the loop if it was empty."""
        if not locked:
            with self._handoff_mutex:
                return self._offer(item, locked=True)
        size = item.size
        waiting = self._handoff or self._staged or self._holding()
        if waiting and self._handoff_bytes + size > self._send_queue_bytes:
            return False
        if self._handoff_items >= _HANDOFF_SOFT_ITEMS:
            # The loop is behind: let the sender wait (releasing the GIL) until the loop has
            # taken the queue, instead of spinning against it.
            return False
        was_empty = not self._handoff
        self._handoff.append(item)
        self._handoff_bytes += size
        self._handoff_items += 1
        if was_empty and not self._drain_scheduled:
            self._drain_scheduled = True
            loop = self._loop
            assert loop is not None
            loop.call_soon(self._drain_handoff)
        return True

    def _drain_handoff(self) -> None:
        """On the loop: move queued messages into the stack, in order, as far as room allows.

        The shared queue is swapped out under the lock in O(1), so senders are never held up
        while messages are placed; placing takes a bounded slice per call, so reads, acks and
        timers interleave with a long queue.
        """
        stack, loop = self._stack, self._loop
        staged = self._staged
        with self._handoff_mutex:
            self._drain_scheduled = False
            if self._handoff:
                if staged:
                    staged.extend(self._handoff)
                else:
                    self._staged = staged = self._handoff
                self._handoff = deque()
                self._handoff_items = 0
        if stack is None or loop is None or self._state != "running" or not staged:
            return  # (nothing staged: a drain scheduled for what an earlier call took)
        now = loop.time()
        freed = 0
        placed_all = False
        everyone = stack.recipients()
        offer = stack.offer
        place = stack.outbox.place  # what Stack.submit calls (one call less per message)
        submit_many = stack.submit_many
        held = stack.outbox.held
        budget = _MAX_DRAIN_PER_CALL  # messages
        while budget > 0:
            if not staged:
                placed_all = True
                break
            item = staged.popleft()
            if isinstance(item, Publications):
                budget -= len(item.payloads)
                freed += submit_many(item, now)
                continue
            budget -= 1
            targets = item.targets
            if (
                targets is not None
                and len(targets) == 1
                and item.topic is None
                and not held
                and item.expires_at > now
                and offer(targets[0], item.payload, item.expires_at, now)
            ):
                # The usual direct message to one peer, placed: what submit does first, inline
                # (Python pays per call). Otherwise submit holds it for the peers without room
                # (they retry on acks or their removal) and the next messages go on to others.
                freed += item.size
            elif place(item, now, everyone):
                freed += item.size
        else:
            placed_all = not staged
        with self._handoff_mutex:
            if freed:
                self._handoff_bytes -= freed
            more = bool(self._handoff) or (bool(staged) and not placed_all)
            if more and not self._drain_scheduled:
                self._drain_scheduled = True
                loop.call_soon(self._drain_handoff)
        if freed:
            self._space.set()
        self._service(now)

    # --- queries and listeners --------------------------------------------------------------------

    # --- queries ---------------------------------------------------------------------------------

    def _queued_bytes(self) -> int:
        with self._handoff_mutex:
            return self._handoff_bytes

    def _threadsafe_snapshot(self) -> MetricsSnapshot:
        """``metrics_snapshot`` taken on the loop thread, for the metrics server's thread."""
        loop = self._loop
        if loop is None or loop.is_closed() or self._state != "running":
            return MetricsSnapshot(self.name, {}, {}, [])
        done: concurrent.futures.Future[MetricsSnapshot] = concurrent.futures.Future()

        def take() -> None:
            try:
                done.set_result(self.metrics_snapshot())
            except BaseException as exc:  # reported to the scrape, never to the loop
                done.set_exception(exc)

        loop.call_soon_threadsafe(take)
        return done.result(timeout=_SNAPSHOT_TIMEOUT_S)

    # --- receive path ---------------------------------------------------------------------------

    def _on_readable(self, sock: socket.socket, multicast: bool) -> None:
        loop = self._loop
        assert loop is not None
        if self._state != "running" or self._stack is None:
            return
        now = loop.time()
        drained = self._read(sock, multicast, now)
        self._service(now, dispatch=self._dispatch_now(drained))
        if self._busy_poll_s and now >= self._busy_backoff.until:
            self._busy_until = now + self._busy_poll_s
            if self._busy:
                self.counters["busy_poll_wakeups"] += 1  # found while the loop kept turning
            else:
                self._busy = True
                self._busy_at, self._busy_cpu = now, time.thread_time()
                loop.call_soon(self._keep_busy)

    def _keep_busy(self) -> None:
        """While a callback is ready the loop polls its selector without sleeping: stay ready
        until ``_busy_until`` (other callbacks and tasks run in between, as usual). Time between
        two turns that this thread did not run (wall clock less its CPU time) means no free
        core: then stop for a while, as the thread runtime does."""
        loop = self._loop
        if loop is None or self._state != "running":
            self._busy = False
            return
        now, cpu = loop.time(), time.thread_time()
        if (now - self._busy_at) - (cpu - self._busy_cpu) > BUSY_PREEMPTED_S:
            self._busy = False
            self._busy_backoff.preempted(now)
            self.counters["busy_poll_preempted"] += 1
        elif now < self._busy_until:
            self._busy_at, self._busy_cpu = now, cpu
            loop.call_soon(self._keep_busy)
        else:
            self._busy = False

    # --- outputs, timers ------------------------------------------------------------------------

    def _service(self, now: float, *, dispatch: bool = True) -> None:
        """Pull the stack's outputs after a burst of inputs, then re-arm the timer.

        Events wait in the stack when ``dispatch`` is false (datagrams and timers never do).
        """
        self._flush()
        if dispatch:
            self._deferred = 0
            self._dispatch_events()
        self._sync_history()
        self._rearm()
        if self._idle_waiters:
            self._settle_flushes(now)
        if self._done_waiters and self._stack is not None and self._stack.topics.groups_idle():
            for waiter in self._done_waiters:
                if not waiter.done():
                    waiter.set_result(None)
            self._done_waiters.clear()

    def _settle_flushes(self, now: float) -> None:
        """Answer waiting ``flush`` calls that can be answered now."""
        failure = self._delivery_failure(now)
        if failure is None and not self._all_sent():
            self._arm_silence_check(now)
            return
        for waiter in self._idle_waiters:
            if not waiter.done():
                if failure is None:
                    waiter.set_result(None)
                else:
                    waiter.set_exception(failure)
        self._idle_waiters.clear()

    def _arm_silence_check(self, now: float) -> None:
        """Wake a waiting flush when a peer taken for gone has been silent long enough."""
        stack, loop = self._stack, self._loop
        assert stack is not None
        assert loop is not None
        at = stack.next_silent_at(now)
        if at is not None and (self._silence_check is None or self._silence_check.when() > at):
            if self._silence_check is not None:
                self._silence_check.cancel()
            self._silence_check = loop.call_at(at, self._on_silence_check)

    def _on_silence_check(self) -> None:
        self._silence_check = None
        if self._idle_waiters and self._loop is not None:
            self._settle_flushes(self._loop.time())

    def _all_sent(self) -> bool:
        stack = self._stack
        return not self._handoff and not self._staged and (stack is None or stack.idle())

    async def flush(self, timeout: float) -> None:  # noqa: ASYNC109 - as its blocking twin
        """Wait until everything sent so far is acknowledged (or expired, unacknowledged, while
        its peer was present).

        Raises:
            DeliveryError: messages to a peer were not acknowledged and it is gone: it left,
                restarted, or went silent for a discovery timeout (its messages are still held
                until they expire, in case it returns). A peer that left or restarted is
                reported once; a silent one while its messages are held.
            TimeoutError: still unacknowledged after ``timeout`` seconds.
        """
        if not self.running:
            return
        assert self._loop is not None
        failure = self._delivery_failure(self._loop.time())
        if failure is not None:
            raise failure
        if self._all_sent():
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._idle_waiters.append(waiter)
        try:
            await asyncio.wait_for(waiter, timeout)
        except TimeoutError:
            raise TimeoutError(f"messages still unacknowledged after {timeout} s") from None
        finally:
            if waiter in self._idle_waiters:
                self._idle_waiters.remove(waiter)

    def _flush(self) -> None:
        stack, sock, loop = self._stack, self._data, self._loop
        if stack is None or sock is None or loop is None:
            return
        # (often nothing, e.g. after a burst that only delivered: its ack is delayed)
        self._send_datagrams(stack.datagrams_to_send(now=loop.time(), gather=True))

    def _local_events(self) -> None:
        """(On the loop) events to dispatch outside a turn: on the loop's next round."""
        loop = self._loop
        if loop is not None:
            loop.call_soon(self._dispatch_events)

    def _dispatch_events(self) -> None:
        events, freed = self._pull_events()
        if freed:  # messages the outbox held for a full peer, placed since (or released)
            with self._handoff_mutex:
                self._handoff_bytes -= freed
            self._space.set()
        if events:
            self._notify_listeners(events)

    def _rearm(self) -> None:
        loop, stack = self._loop, self._stack
        assert loop is not None
        assert stack is not None
        if self._state != "running":
            return
        deadline = stack.next_deadline()
        armed = self._timer_at
        if deadline is None or (armed is not None and armed <= deadline):
            # The armed timer fires no later than needed; when it does, the layers find what is
            # due (possibly nothing) and it is re-armed. Re-arming on every burst would churn
            # the loop's timer heap for deadlines (delayed acks, resends) that move constantly.
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = deadline
        if deadline is not None:
            self._timer = loop.call_at(deadline, self._on_timer, deadline)

    def _on_timer(self, deadline: float) -> None:
        loop, stack = self._loop, self._stack
        assert loop is not None
        assert stack is not None
        self._timer = self._timer_at = None
        if self._state != "running":
            return
        now = max(deadline, loop.time())
        if stack.expiry_due(now):
            # A peer is about to be taken for gone: first read what waits in the sockets (a
            # busy loop may be late to them), since any datagram from it there proves it alive.
            self._read_waiting()
            now = max(now, loop.time())
        # Follow wall-clock steps (NTP) for the timestamps of messages; cheap, once per timer.
        stack.topics.wall_offset = time.time() - now
        stack.handle_timer(now=now)
        self._service(now)

    def _read_waiting(self) -> None:
        """Take every datagram already waiting in the data and discovery sockets."""
        for sock, multicast in self._sockets():
            self._on_readable(sock, multicast)

    # --- discovery targets ----------------------------------------------------------------------

    async def _resolve_forever(self) -> None:
        assert self._stack is not None
        while True:
            await asyncio.sleep(self.settings.discovery_rate_s)
            self._stack.set_targets(await self._resolve_targets())

    async def _resolve_targets(self) -> list[Target]:
        """Resolve every target (DNS names each time, so DNS changes are followed)."""
        hosts = [await self._resolve(e.host) for e in self.settings.discovery_target_address]
        return self._targets(hosts)

    async def _resolve(self, host: str) -> list[str]:
        literal = literal_address(host)
        if literal is not None:
            return literal
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(max(1.0, self.settings.discovery_rate_s)):
                infos = await loop.getaddrinfo(
                    host, None, family=socket.AF_INET, type=socket.SOCK_DGRAM
                )
        except (OSError, TimeoutError) as exc:
            self._resolve_failed(host, exc)
            return []
        return sorted({str(info[4][0]) for info in infos})

    def _close_sockets(self) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            for sock, _ in self._sockets():
                loop.remove_reader(sock.fileno())
        super()._close_sockets()


def _messages(queue: deque[Outgoing | Publications]) -> int:
    """How many messages ``queue`` holds (a run of publications counts each)."""
    return sum(len(item.payloads) if isinstance(item, Publications) else 1 for item in queue)
