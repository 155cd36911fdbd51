"""Requests: request/reply by name (sans-IO; see ``docs/request-reply.md``).

How this layer works
--------------------
A request and its reply are ordinary transport messages (reliable: each arrives once, in order),
enveloped like topic messages (``docs/PROTOCOL.md``, "Requests and replies"):

- ``{"t":"robots/r1/move","q":7,"d":200}`` request 7 of its sender to the name ``t``, with
  ``d`` milliseconds left before its deadline (remaining time, never a wall-clock date: the two
  clocks need not agree);
- ``{"t":"robots/r1/move","a":7}`` the answer to request 7 (the body is the reply's payload);
  with ``"e":"ValueError"`` the handler raised that (the body is its message, UTF-8); with
  ``"n":true`` nothing serves that name here (any more).

Neither has ``s``: a receiver older than this layer takes the envelope for a malformed topic
message and drops it (counted as ``topics_dropped_bad_envelope``), never delivering it.

Who serves what travels with the topics layer's interest (``Topics.serve``): a requester picks
one responder among the peers that serve a matching pattern, the one with the fewest of its
requests outstanding (round robin among equals), or every one of them (``request_all``).

State: the requests this endpoint waits for (id -> name, the peers asked, when it was sent), the
number outstanding per peer, and the served patterns (id -> pattern). No timers: the caller waits
on its own deadline and then closes its request (``close``), counted as a timeout if unanswered.

Outputs: :class:`~glue.events.RequestArrived` for a request to a served name (the runtime runs
its handler, unless its deadline has passed first), :class:`~glue.events.ReplyArrived` for each
answer to a pending request; replies "not served here" to send (``take_sends``).

Bounds: pending requests by ``MAX_PENDING`` (a caller that exceeds it is refused), the names
warned about by ``glue.errors.MAX_WARNED``.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import orjson

from glue.errors import UsageError, warn_once
from glue.events import Peer, Reply, ReplyArrived, Request, RequestArrived, StackEvent
from glue.topics import APART_BYTES, Outbound, matches, validate_pattern, validate_topic_name
from glue.wire import MAX_TTL_MS, EndpointId

__all__ = ["MAX_ERROR_MESSAGE_BYTES", "MAX_PENDING", "Requests", "reply_envelope"]

logger = logging.getLogger(__name__)

#: Requests one endpoint may wait for at once.
MAX_PENDING: Final = 100_000
#: An error reply's message is cut to this many bytes.
MAX_ERROR_MESSAGE_BYTES: Final = 4096
#: An error type name is cut to this many characters (it travels in the envelope).
_MAX_TYPE_CHARS: Final = 128

Send = tuple[EndpointId, Outbound, float]


@dataclass(slots=True)
class _Pending:
    name: str
    asked: set[EndpointId]
    sent_at: float  # wall clock


def _message(head: bytes, payload: bytes) -> Outbound:
    return (head, payload) if len(payload) > APART_BYTES else head + payload


def reply_envelope(name: str, request_id: int, *, error: str | None = None) -> bytes:
    """The envelope line (with its LF) of the reply to request ``request_id`` on ``name``;
    ``error``: the type name of what the handler raised."""
    head: dict[str, Any] = {"t": name, "a": request_id}
    if error is not None:
        head["e"] = error[:_MAX_TYPE_CHARS] or "Exception"
    return orjson.dumps(head) + b"\n"


class Requests:
    """The request/reply state machine of one endpoint (see the module docstring)."""

    def __init__(
        self,
        *,
        emit: Callable[[StackEvent], object],
        wall_offset: Callable[[], float],
    ) -> None:
        self.counters: Counter[str] = Counter()
        self._emit = emit
        self._wall_offset = wall_offset  # wall clock minus the runtime's monotonic clock
        self._pending: dict[int, _Pending] = {}
        self._outstanding: Counter[EndpointId] = Counter()
        self._next_id = 1
        self._turn = 0
        self._served: dict[int, str] = {}
        self._next_serve = 1
        self._outbox: list[Send] = []
        self._warned: set[object] = set()

    # --- responder ------------------------------------------------------------------------------

    def serve(self, pattern: str) -> int:
        """Serve requests to names matching ``pattern`` here; returns the serve id. (The caller
        advertises the pattern: ``Topics.serve``.)

        Raises:
            UsageError: the pattern is not valid.
        """
        validate_pattern(pattern, "name")
        serve_id = self._next_serve
        self._next_serve += 1
        self._served[serve_id] = pattern
        return serve_id

    def serves(self, name: str) -> bool:
        """Whether this endpoint serves ``name`` itself."""
        return any(matches(pattern, name) for pattern in self._served.values())

    def unserve(self, serve_id: int) -> str | None:
        """Stop serving ``serve_id``; its pattern (None when unknown)."""
        return self._served.pop(serve_id, None)

    def reply(
        self, request: Request, payload: bytes, *, error: str | None, now: float
    ) -> Send | None:
        """The reply to ``request`` to send (``error``: the handler raised that type, and
        ``payload`` is its message), or None once its deadline has passed: the requester gave
        up (it is counted)."""
        if now >= request.deadline:
            self.counters["replies_late"] += 1
            return None
        if error is None:
            self.counters["replied"] += 1
        else:
            self.counters["replied_error"] += 1
            payload = payload[:MAX_ERROR_MESSAGE_BYTES]
        head = reply_envelope(request.name, request.request_id, error=error)
        return (EndpointId(request.requester_id), _message(head, payload), request.deadline)

    def expired_before_start(self, count: int = 1) -> None:
        """Requests whose deadline passed before their handler could start (never started)."""
        self.counters["expired_before_start"] += count

    # --- requester ------------------------------------------------------------------------------

    def open(
        self,
        name: str,
        payload: bytes,
        responders: Sequence[EndpointId],
        *,
        everyone: bool,
        deadline: float,
        now: float,
    ) -> tuple[int, list[Send]]:
        """Start a request to ``name``: to one of ``responders`` (the one with the fewest
        requests outstanding from here, round robin among equals) or to ``everyone``. Returns
        its id and the messages to send (the request, per peer).

        Raises:
            UsageError: too many requests are pending (``MAX_PENDING``).
        """
        if len(self._pending) >= MAX_PENDING:
            raise UsageError(f"{MAX_PENDING} requests are waiting for replies already")
        request_id = self._next_id
        self._next_id += 1
        asked = list(responders) if everyone else [self._choose(responders)]
        remaining_ms = max(1, min(MAX_TTL_MS, math.ceil((deadline - now) * 1000)))
        head = b'%s,"q":%d,"d":%d}\n' % (orjson.dumps({"t": name})[:-1], request_id, remaining_ms)
        message = _message(head, payload)
        for peer in asked:
            self._outstanding[peer] += 1
        self._pending[request_id] = _Pending(name, set(asked), now + self._wall_offset())
        self.counters["sent"] += len(asked)
        return request_id, [(peer, message, deadline) for peer in asked]

    def close(self, request_id: int) -> None:
        """The caller stopped waiting for ``request_id`` (its timeout, or it has every answer);
        peers still owing an answer count as timeouts."""
        pending = self._pending.pop(request_id, None)
        if pending is None:
            return
        if pending.asked:
            self.counters["timeouts"] += len(pending.asked)
            for peer in pending.asked:
                self._done_with(peer)

    def no_responder(self, name: str) -> None:
        """A request to ``name`` found nobody serving it: counted, and warned about once."""
        self.counters["no_responder"] += 1
        self._warn_once(
            ("nobody", name),
            "a request to %r found no endpoint serving that name: NoResponderError "
            "(requests_no_responder counts them)",
            name,
        )

    def pending(self) -> int:
        """How many requests wait for replies."""
        return len(self._pending)

    # --- inputs ---------------------------------------------------------------------------------

    def receive(
        self, peer: Peer, head: dict[str, Any], payload: bytes, now: float, expires_at: float
    ) -> None:
        """Take a request or reply envelope (``q`` or ``a`` beside ``t``) and its body from
        ``peer``; a malformed one is dropped and counted."""
        name = head.get("t")
        try:
            validate_topic_name(name)  # type: ignore[arg-type]
        except UsageError:
            self._drop("bad_envelope", peer)
            return
        assert type(name) is str
        if "q" in head:
            self._receive_request(peer, name, head, payload, now, expires_at)
        else:
            self._receive_reply(peer, name, head, payload, now)

    def peer_removed(self, peer: Peer) -> None:
        """``peer`` is gone for good: requests waiting for it will get no answer from it."""
        if not self._outstanding.get(peer.endpoint_id):
            return
        for request_id, pending in list(self._pending.items()):
            if peer.endpoint_id in pending.asked:
                pending.asked.discard(peer.endpoint_id)
                self.counters["responders_gone"] += 1
                self._emit(
                    ReplyArrived(request_id, peer, None, "gone", "", "", done=not pending.asked)
                )
                if not pending.asked:
                    del self._pending[request_id]
        self._outstanding.pop(peer.endpoint_id, None)

    def take_sends(self) -> list[Send]:
        """Replies this layer makes by itself (``not served here``) to send."""
        out, self._outbox = self._outbox, []
        return out

    # --- internals ------------------------------------------------------------------------------

    def _choose(self, responders: Sequence[EndpointId]) -> EndpointId:
        outstanding = self._outstanding
        count = len(responders)
        turn = self._turn
        self._turn += 1
        return min(
            (responders[(turn + i) % count] for i in range(count)),
            key=lambda peer: outstanding.get(peer, 0),
        )

    def _done_with(self, peer: EndpointId) -> None:
        left = self._outstanding[peer] - 1
        if left > 0:
            self._outstanding[peer] = left
        else:
            self._outstanding.pop(peer, None)

    def _receive_request(
        self,
        peer: Peer,
        name: str,
        head: dict[str, Any],
        payload: bytes,
        now: float,
        expires_at: float,
    ) -> None:
        request_id = head["q"]
        remaining_ms = head.get("d")
        if (
            type(request_id) is not int
            or request_id < 1
            or type(remaining_ms) is not int
            or remaining_ms < 0
        ):
            self._drop("bad_envelope", peer)
            return
        deadline = min(now + remaining_ms / 1000.0, expires_at)
        serve_id = next((i for i, p in self._served.items() if matches(p, name)), None)
        if serve_id is None:
            # Unserved here meanwhile (or never): say so at once, not after the requester's
            # timeout. (It picked us from our interest, which it will hear has changed.)
            self.counters["received_unserved"] += 1
            head_line = orjson.dumps({"t": name, "a": request_id, "n": True}) + b"\n"
            self._outbox.append((peer.endpoint_id, head_line, max(deadline, now + 1.0)))
            return
        self.counters["received"] += 1
        offset = self._wall_offset()
        request = Request(
            name,
            payload,
            peer.endpoint_id,
            peer.name,
            request_id,
            now + offset,
            deadline + offset,
            deadline,
        )
        self._emit(RequestArrived(serve_id, request))

    def _receive_reply(
        self, peer: Peer, name: str, head: dict[str, Any], payload: bytes, now: float
    ) -> None:
        request_id = head.get("a")
        error = head.get("e")
        if type(request_id) is not int or (error is not None and type(error) is not str):
            self._drop("bad_envelope", peer)
            return
        pending = self._pending.get(request_id)
        if pending is None or peer.endpoint_id not in pending.asked or pending.name != name:
            self.counters["replies_unexpected"] += 1  # (late: its requester gave up)
            return
        pending.asked.discard(peer.endpoint_id)
        self._done_with(peer.endpoint_id)
        done = not pending.asked
        if done:
            del self._pending[request_id]
        if head.get("n") is True:
            self.counters["replies_unserved"] += 1
            self._emit(ReplyArrived(request_id, peer, None, "unserved", "", "", done=done))
            return
        if error is not None:
            self.counters["replies_error"] += 1
            message = payload.decode("utf-8", "replace")
            self._emit(ReplyArrived(request_id, peer, None, "error", error, message, done=done))
            return
        self.counters["replies_received"] += 1
        reply = Reply(
            name,
            payload,
            peer.endpoint_id,
            peer.name,
            pending.sent_at,
            now + self._wall_offset(),
        )
        self._emit(ReplyArrived(request_id, peer, reply, "ok", "", "", done=done))

    def _drop(self, reason: str, peer: Peer) -> None:
        self.counters[f"dropped_{reason}"] += 1
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("dropped a malformed request or reply from %s", peer.name)

    def _warn_once(self, key: object, message: str, *args: object) -> None:
        warn_once(logger, self._warned, key, message, *args)
