"""Request/reply for the managers: ``serve``, ``request``, ``request_all`` (docs/request-reply.md).

The protocol is :mod:`glue.requests` (sans-IO, in the stack). This module is what runs around it:

- *Requesters* wait for answers. Each request registers a waiter (under the runtime's lock, or
  on the loop, before anything is sent); the network thread hands the
  :class:`~glue.events.ReplyArrived` events of a burst to it (``handle``), and the caller wakes.
  No responder known: at once :class:`~glue.errors.NoResponderError` when every peer's interest
  is known, else (no peer known yet, or a peer's interest not heard yet) wait for discovery up
  to the timeout. A responder that answers "not served here" (it stopped serving meanwhile; the
  request did not run) is skipped and another one asked.
- *Responders* run handlers like subscriptions run callbacks: never on the network thread. The
  requests of one requester to one served name wait in a queue of their own (a *lane*) and run
  in order, one at a time; lanes of different requesters run concurrently, on the blocking
  manager's callback pool (``GLUE_CALLBACK_THREADS``) or as one task per lane on the asyncio
  loop. A request whose deadline passed while it waited is never started (counted as
  ``requests_expired_before_start``). Up to ``queue_size`` requests wait per served name; beyond,
  the requester gets a :class:`~glue.errors.RemoteError` of type ``QueueFull`` at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Final

from glue.errors import (
    DeliveryError,
    RemoteError,
    UsageError,
    check_callable,
)
from glue.events import Reply, ReplyArrived, Request, RequestArrived
from glue.outbox import Outgoing
from glue.topics import validate_pattern, validate_topic_name
from glue.wire import EndpointId

if TYPE_CHECKING:
    from glue.endpoint import Endpoint
    from glue.runtime_thread import ThreadRuntime
    from glue.subscription import CallbackPool

__all__ = [
    "DEFAULT_SERVE_QUEUE_SIZE",
    "AsyncHandler",
    "AsyncRequests",
    "AsyncService",
    "Handler",
    "Requests",
    "Service",
]

logger = logging.getLogger(__name__)

#: Requests that may wait for one served name's handler, by default.
DEFAULT_SERVE_QUEUE_SIZE: Final = 10_000
_BATCH: Final = 64
_QUEUE_FULL: Final = "QueueFull"

#: A request handler: returns the reply's payload (``bytes``, ``bytearray``, ``memoryview``;
#: None for an empty one) or raises (the requester gets a RemoteError).
Handler = Callable[[Request], "bytes | bytearray | memoryview | None"]
#: A handler of the asyncio API: plain or ``async``.
AsyncHandler = Callable[
    [Request],
    "bytes | bytearray | memoryview | Awaitable[bytes | bytearray | memoryview | None] | None",
]


def _answer(result: object) -> tuple[bytes, str | None]:
    """What a handler returned, as a reply payload (or an error: not bytes)."""
    if type(result) is bytes:
        return result, None
    if result is None:
        return b"", None
    if isinstance(result, bytes | bytearray | memoryview):
        return bytes(result), None
    return (
        f"the handler returned {type(result).__name__}, not bytes".encode(),
        "TypeError",
    )


def _failure(exc: BaseException) -> tuple[bytes, str]:
    return str(exc).encode("utf-8", "replace"), type(exc).__name__


def _outcome(name: str, answer: ReplyArrived) -> Reply | RemoteError:
    """A reply, or the RemoteError of a handler that raised."""
    if answer.reply is not None:
        return answer.reply
    responder = answer.responder
    return RemoteError(
        f"the handler of {name!r} on {responder.name} raised {answer.error_type}: "
        f"{answer.error_message}",
        name=name,
        remote_type=answer.error_type,
        remote_message=answer.error_message,
        responder_id=responder.endpoint_id,
        responder_name=responder.name,
    )


def _check_request(name: object, payload: object, timeout: object) -> tuple[bytes, float]:
    validate_topic_name(name, "name")  # type: ignore[arg-type]
    if not isinstance(payload, bytes | bytearray | memoryview):
        raise _usage_type("payload", payload, "bytes")
    if type(timeout) is not float:
        if not isinstance(timeout, int | float) or isinstance(timeout, bool):
            raise _usage_type("timeout", timeout, "a number of seconds")
        timeout = float(timeout)
    if not 0 < timeout <= 86400.0:  # (NaN too) the longest time to live a message can have
        from glue.errors import UsageValueError

        raise UsageValueError(
            f"timeout must be more than 0 and at most one day, not {timeout}", argument="timeout"
        )
    return bytes(payload), timeout


def _usage_type(argument: str, value: object, expected: str) -> UsageError:
    from glue.errors import UsageTypeError

    return UsageTypeError(
        f"{argument} must be {expected}, not {type(value).__name__}", argument=argument
    )


class _Waiter:
    """The answers to one request, as they arrive (set from the network thread)."""

    __slots__ = ("answers", "done", "event", "request_id")

    def __init__(self) -> None:
        self.answers: list[ReplyArrived] = []
        self.done = False
        self.event = threading.Event()
        self.request_id = 0

    def add(self, answer: ReplyArrived) -> None:
        self.answers.append(answer)
        if answer.done:
            self.done = True
            self.event.set()


def _settle(
    name: str, answers: list[ReplyArrived], excluded: set[EndpointId]
) -> Reply | RemoteError | None:
    """The outcome of a request to one responder from its answer; None: ask another one (it
    said it no longer serves ``name``: the request did not run)."""
    answer = answers[0]
    if answer.status == "unserved":
        excluded.add(EndpointId(answer.responder.endpoint_id))
        return None
    if answer.status == "gone":
        raise DeliveryError(
            f"{answer.responder.name} left before answering the request to {name!r} (it may "
            "have run)",
            peers=(answer.responder.endpoint_id,),
        )
    return _outcome(name, answer)


def _gathered(name: str, answers: list[ReplyArrived]) -> list[Reply | RemoteError]:
    return [_outcome(name, a) for a in answers if a.status in ("ok", "error")]


# --- blocking -----------------------------------------------------------------------------------


class Service:
    """A served name of the blocking :class:`~glue.manager.EndpointManager` (what ``serve``
    returns); ``close()`` stops serving it. Also a context manager that closes on exit."""

    def __init__(
        self,
        name: str,
        handler: Handler,
        *,
        queue_size: int,
        pool: CallbackPool,
        endpoint: ThreadRuntime,
        remove: Callable[[Service], None],
    ) -> None:
        self.name = name
        self.handler = handler
        self.queue_size = queue_size
        #: Requests not started because their deadline passed while they waited.
        self.expired = 0
        #: Requests refused because the queue was full (answered ``QueueFull``).
        self.refused = 0
        self.id = 0
        self._pool = pool
        self._endpoint = endpoint
        self._remove = remove
        self._lock = threading.Lock()
        self._lanes: dict[int, _Lane] = {}
        self._waiting = 0
        self._closed = False

    @property
    def closed(self) -> bool:
        """Whether ``close()`` was called (or the endpoint stopped)."""
        return self._closed

    def close(self) -> None:
        """Stop serving: peers hear of it at once; no handler starts after this. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._lanes.clear()
        self._remove(self)

    def __enter__(self) -> Service:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def describe(self) -> str:
        """The handler and the name, for people (stop reports)."""
        return f"handler {self.handler!r} serving {self.name!r}"

    def _put(self, request: Request) -> None:
        """On the network thread: queue ``request`` in its requester's lane."""
        lane: _Lane | None = None
        schedule = False
        with self._lock:
            if self._closed:
                return
            full = self._waiting >= self.queue_size
            if not full:
                self._waiting += 1
                lane = self._lanes.get(request.requester_id)
                if lane is None:
                    lane = self._lanes[request.requester_id] = _Lane(self, request.requester_id)
                lane.requests.append(request)
                schedule = not lane.scheduled
                lane.scheduled = True
        if full:
            self.refused += 1
            message = f"{self.queue_size} requests wait for {self.name!r} already".encode()
            self._endpoint.reply(request, message, _QUEUE_FULL, 0.0)
        elif schedule and lane is not None:
            self._pool.schedule(lane)


class _Lane:
    """One requester's requests to one served name, run in order on the callback pool."""

    __slots__ = ("requester", "requests", "scheduled", "service")

    def __init__(self, service: Service, requester: int) -> None:
        self.service = service
        self.requester = requester
        self.requests: deque[Request] = deque()
        self.scheduled = False

    def describe(self) -> str:
        return self.service.describe()

    def _run_batch(self) -> bool:
        """On a pool thread: handle up to a batch; True if more are waiting."""
        service = self.service
        endpoint = service._endpoint
        handler = service.handler
        for _ in range(_BATCH):
            with service._lock:
                if service._closed or not self.requests:
                    break
                request = self.requests.popleft()
                service._waiting -= 1
            if time.monotonic() >= request.deadline:
                service.expired += 1
                endpoint.expired_before_start(1)
                continue
            try:
                payload, error = _answer(handler(request))
            except Exception as exc:
                payload, error = _failure(exc)
                logger.debug("handler of %r raised", service.name, exc_info=True)
            endpoint.reply(request, payload, error, max(0.0, request.deadline - time.monotonic()))
        with service._lock:
            if self.requests and not service._closed:
                return True
            self.scheduled = False
            if service._lanes.get(self.requester) is self:
                del service._lanes[self.requester]
            return False


class Requests:
    """Request/reply of one blocking manager (its ``serve``, ``request`` and ``request_all``)."""

    def __init__(
        self, endpoint: ThreadRuntime, pool: CallbackPool, changed: threading.Condition
    ) -> None:
        self._endpoint = endpoint
        self._pool = pool
        self._changed = changed  # notified when peers or their interest change
        self._waiters: dict[int, _Waiter] = {}
        self._services: dict[int, Service] = {}

    def serve(self, name: str, handler: Handler, *, queue_size: int) -> Service:
        """See :meth:`glue.manager.EndpointManager.serve`."""
        validate_pattern(name, "name")
        check_callable(handler, "handler")
        service = Service(
            name,
            handler,
            queue_size=queue_size,
            pool=self._pool,
            endpoint=self._endpoint,
            remove=self._remove,
        )

        def register(serve_id: int) -> None:
            service.id = serve_id
            self._services[serve_id] = service

        self._endpoint.serve(name, register)
        return service

    def request(self, name: str, payload: bytes, timeout: float) -> Reply:
        """See :meth:`glue.manager.EndpointManager.request`."""
        payload, timeout = _check_request(name, payload, timeout)
        deadline = time.monotonic() + timeout
        excluded: set[EndpointId] = set()
        while True:
            answers = self._ask(name, payload, deadline, timeout, excluded, everyone=False)
            if not answers:
                raise TimeoutError(f"no reply to the request to {name!r} within {timeout} s")
            outcome = _settle(name, answers, excluded)
            if isinstance(outcome, RemoteError):
                raise outcome
            if outcome is not None:
                return outcome

    def request_all(self, name: str, payload: bytes, timeout: float) -> list[Reply | RemoteError]:
        """See :meth:`glue.manager.EndpointManager.request_all`."""
        payload, timeout = _check_request(name, payload, timeout)
        deadline = time.monotonic() + timeout
        return _gathered(name, self._ask(name, payload, deadline, timeout, set(), everyone=True))

    def handle(self, event: RequestArrived | ReplyArrived) -> None:
        """On the network thread: an answer for a waiter, or a request for a service."""
        if type(event) is ReplyArrived:
            waiter = self._waiters.get(event.request_id)
            if waiter is not None:
                waiter.add(event)
            return
        assert isinstance(event, RequestArrived)
        service = self._services.get(event.serve_id)
        if service is not None:
            service._put(event.request)

    def close(self) -> list[Service]:
        """At stop: every service closed (no handler starts after), returned."""
        services = list(self._services.values())
        for service in services:
            with service._lock:
                service._closed = True
                service._lanes.clear()
        self._services.clear()
        for waiter in list(self._waiters.values()):
            waiter.event.set()
        return services

    def _remove(self, service: Service) -> None:
        if self._services.pop(service.id, None) is not None:
            self._endpoint.unserve(service.id)

    def _ask(
        self,
        name: str,
        payload: bytes,
        deadline: float,
        timeout: float,
        excluded: set[EndpointId],
        *,
        everyone: bool,
    ) -> list[ReplyArrived]:
        """Send the request and wait for its answers until ``deadline`` (or every answer)."""
        waiter = _Waiter()
        waiters = self._waiters

        def register(request_id: int) -> None:
            waiter.request_id = request_id
            waiters[request_id] = waiter

        items = self._open(name, payload, deadline, timeout, excluded, everyone, register)
        endpoint = self._endpoint
        try:
            for item in items:
                endpoint.submit(item, max(0.0, deadline - time.monotonic()))
            if not waiter.done:
                waiter.event.wait(max(0.0, deadline - time.monotonic()))
        finally:
            del waiters[waiter.request_id]
            if not waiter.done:
                endpoint.close_request(waiter.request_id)
        return waiter.answers

    def _open(
        self,
        name: str,
        payload: bytes,
        deadline: float,
        timeout: float,
        excluded: set[EndpointId],
        everyone: bool,
        register: Callable[[int], object],
    ) -> list[Outgoing]:
        """The request's messages, once a responder is known (waiting for discovery, while no
        peer's interest is known, until ``deadline``)."""
        endpoint = self._endpoint
        frozen = frozenset(excluded)
        items = endpoint.open_request(
            name, payload, everyone=everyone, deadline=deadline, register=register, excluded=frozen
        )
        if items is not None:
            return items
        with self._changed:
            while True:
                items = endpoint.open_request(
                    name,
                    payload,
                    everyone=everyone,
                    deadline=deadline,
                    register=register,
                    excluded=frozen,
                )
                if items is not None:
                    return items
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise endpoint.no_responder(name, timeout)
                self._changed.wait(remaining)


# --- asyncio ------------------------------------------------------------------------------------


class AsyncService:
    """A served name of :class:`~glue.manager.AsyncEndpointManager` (what ``serve`` returns);
    ``close()`` stops serving it. Also a context manager that closes on exit."""

    def __init__(
        self,
        name: str,
        handler: AsyncHandler,
        *,
        queue_size: int,
        endpoint: Endpoint,
        remove: Callable[[AsyncService], None],
    ) -> None:
        self.name = name
        self.handler = handler
        self.queue_size = queue_size
        #: Requests not started because their deadline passed while they waited.
        self.expired = 0
        #: Requests refused because the queue was full (answered ``QueueFull``).
        self.refused = 0
        self.id = 0
        self._endpoint = endpoint
        self._remove = remove
        self._lanes: dict[int, deque[Request]] = {}
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._waiting = 0
        self._closed = False

    @property
    def closed(self) -> bool:
        """Whether ``close()`` was called (or the endpoint stopped)."""
        return self._closed

    def close(self) -> None:
        """Stop serving: peers hear of it at once; no handler starts after this. Idempotent."""
        if self._end():
            self._remove(self)

    def __enter__(self) -> AsyncService:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _end(self) -> bool:
        if self._closed:
            return False
        self._closed = True
        self._lanes.clear()
        current = asyncio.current_task()
        for task in self._tasks.values():
            if task is not current:
                task.cancel()
        return True

    def _put(self, request: Request) -> None:
        """On the loop: queue ``request`` in its requester's lane (a task runs each lane)."""
        if self._closed:
            return
        if self._waiting >= self.queue_size:
            self.refused += 1
            message = f"{self.queue_size} requests wait for {self.name!r} already".encode()
            self._send_reply(request, message, _QUEUE_FULL)
            return
        self._waiting += 1
        requester = request.requester_id
        lane = self._lanes.get(requester)
        if lane is None:
            lane = self._lanes[requester] = deque()
        lane.append(request)
        if requester not in self._tasks:
            self._tasks[requester] = asyncio.get_running_loop().create_task(
                self._run(requester, lane), name=f"glue-serve-{self.name}"
            )

    async def _run(self, requester: int, lane: deque[Request]) -> None:
        loop = asyncio.get_running_loop()
        try:
            while lane and not self._closed:
                request = lane.popleft()
                self._waiting -= 1
                if loop.time() >= request.deadline:
                    self.expired += 1
                    self._endpoint.expired_before_start(1)
                    continue
                try:
                    result = self.handler(request)
                    if inspect.isawaitable(result):
                        result = await result
                    payload, error = _answer(result)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    payload, error = _failure(exc)
                    logger.debug("handler of %r raised", self.name, exc_info=True)
                item = self._endpoint.reply(request, payload, error)
                if item is not None and not self._endpoint.queue(item):
                    remaining = request.deadline - loop.time()
                    try:
                        await self._endpoint.wait_to_queue(item, max(0.0, remaining))
                    except (DeliveryError, UsageError):
                        self._endpoint.counters["requests_replies_dropped"] += 1
        finally:
            del self._tasks[requester]
            if not lane and self._lanes.get(requester) is lane:
                del self._lanes[requester]

    def _send_reply(self, request: Request, payload: bytes, error: str) -> None:
        item = self._endpoint.reply(request, payload, error)
        if item is not None and not self._endpoint.queue(item):
            self._endpoint.counters["requests_replies_dropped"] += 1

    async def _wait_closed(self, timeout: float) -> list[str]:  # noqa: ASYNC109
        tasks = [t for t in self._tasks.values() if not t.done()]
        if not tasks:
            return []
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        return [f"handler {self.handler!r} serving {self.name!r}" for _ in pending]


class _AsyncWaiter:
    __slots__ = ("answers", "done", "future", "request_id")

    def __init__(self, future: asyncio.Future[None]) -> None:
        self.answers: list[ReplyArrived] = []
        self.done = False
        self.future = future
        self.request_id = 0

    def add(self, answer: ReplyArrived) -> None:
        self.answers.append(answer)
        if answer.done:
            self.done = True
            if not self.future.done():
                self.future.set_result(None)


class AsyncRequests:
    """Request/reply of one asyncio manager (its ``serve``, ``request`` and ``request_all``)."""

    def __init__(self, endpoint: Endpoint, changed: Callable[[], asyncio.Future[None] | None]):
        self._endpoint = endpoint
        self._changed = changed  # resolved when peers or their interest change
        self._waiters: dict[int, _AsyncWaiter] = {}
        self._services: dict[int, AsyncService] = {}

    def serve(self, name: str, handler: AsyncHandler, *, queue_size: int) -> AsyncService:
        """See :meth:`glue.manager.AsyncEndpointManager.serve`."""
        validate_pattern(name, "name")
        check_callable(handler, "handler")
        service = AsyncService(
            name, handler, queue_size=queue_size, endpoint=self._endpoint, remove=self._remove
        )
        service.id = self._endpoint.serve(name)
        self._services[service.id] = service
        return service

    async def request(self, name: str, payload: bytes, timeout: float) -> Reply:  # noqa: ASYNC109
        """See :meth:`glue.manager.AsyncEndpointManager.request`."""
        payload, timeout = _check_request(name, payload, timeout)
        deadline = asyncio.get_running_loop().time() + timeout
        excluded: set[EndpointId] = set()
        while True:
            answers = await self._ask(name, payload, deadline, timeout, excluded, everyone=False)
            if not answers:
                raise TimeoutError(f"no reply to the request to {name!r} within {timeout} s")
            outcome = _settle(name, answers, excluded)
            if isinstance(outcome, RemoteError):
                raise outcome
            if outcome is not None:
                return outcome

    async def request_all(
        self,
        name: str,
        payload: bytes,
        timeout: float,  # noqa: ASYNC109
    ) -> list[Reply | RemoteError]:
        """See :meth:`glue.manager.AsyncEndpointManager.request_all`."""
        payload, timeout = _check_request(name, payload, timeout)
        deadline = asyncio.get_running_loop().time() + timeout
        answers = await self._ask(name, payload, deadline, timeout, set(), everyone=True)
        return _gathered(name, answers)

    def handle(self, event: RequestArrived | ReplyArrived) -> None:
        """On the loop: an answer for a waiter, or a request for a service."""
        if type(event) is ReplyArrived:
            waiter = self._waiters.get(event.request_id)
            if waiter is not None:
                waiter.add(event)
            return
        assert isinstance(event, RequestArrived)
        service = self._services.get(event.serve_id)
        if service is not None:
            service._put(event.request)

    async def close(self, timeout: float) -> list[str]:  # noqa: ASYNC109
        """At stop: every service closed; what still runs after ``timeout`` s."""
        services = list(self._services.values())
        self._services.clear()
        for service in services:
            service._end()
        for waiter in self._waiters.values():
            if not waiter.future.done():
                waiter.future.set_result(None)
        running: list[str] = []
        for service in services:
            running.extend(await service._wait_closed(timeout))
        return running

    def _remove(self, service: AsyncService) -> None:
        if self._services.pop(service.id, None) is not None:
            self._endpoint.unserve(service.id)

    async def _ask(
        self,
        name: str,
        payload: bytes,
        deadline: float,
        timeout: float,  # noqa: ASYNC109
        excluded: set[EndpointId],
        *,
        everyone: bool,
    ) -> list[ReplyArrived]:
        loop = asyncio.get_running_loop()
        waiter = _AsyncWaiter(loop.create_future())
        waiters = self._waiters

        def register(request_id: int) -> None:
            waiter.request_id = request_id
            waiters[request_id] = waiter

        endpoint = self._endpoint
        frozen = frozenset(excluded)
        while True:
            items = endpoint.open_request(
                name,
                payload,
                everyone=everyone,
                deadline=deadline,
                register=register,
                excluded=frozen,
            )
            if items is not None:
                break
            remaining = deadline - loop.time()
            changed = self._changed()
            if remaining <= 0 or changed is None:
                raise endpoint.no_responder(name, timeout)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(changed), remaining)
        try:
            for item in items:
                if not endpoint.queue(item):
                    await endpoint.wait_to_queue(item, max(0.0, deadline - loop.time()))
            if not waiter.done:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(waiter.future, max(0.0, deadline - loop.time()))
        finally:
            del waiters[waiter.request_id]
            if not waiter.done:
                endpoint.close_request(waiter.request_id)
        return waiter.answers
