"""Events that layers hand to the runtime, and the runtime to the application."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import orjson

from glue.wire import EndpointId

__all__ = [
    "Gap",
    "GapReason",
    "InterestChanged",
    "Message",
    "MessageReceived",
    "Peer",
    "PeerAdded",
    "PeerEvent",
    "PeerRemoved",
    "RemovalReason",
    "Reply",
    "ReplyArrived",
    "ReplyStatus",
    "Request",
    "RequestArrived",
    "StackEvent",
    "StopReport",
    "TopicDelivery",
    "TopicGap",
]

RemovalReason = Literal["expired", "left", "restarted", "evicted"]
#: Why messages will never arrive (see :class:`Gap`).
GapReason = Literal["expired", "dropped", "history"]


@dataclass(frozen=True, slots=True)
class Peer:
    """Another endpoint on the same network, as discovery knows it."""

    endpoint_id: EndpointId
    incarnation: int
    name: str
    host: str
    port: int
    rate_s: float

    @property
    def address(self) -> tuple[str, int]:
        """Where its data socket listens."""
        return (self.host, self.port)


@dataclass(frozen=True, slots=True)
class PeerAdded:
    """A peer was heard for the first time (or in a new incarnation)."""

    peer: Peer


@dataclass(frozen=True, slots=True)
class PeerRemoved:
    """A peer went away: silent for rate x multiplier (``expired``), said goodbye (``left``),
    restarted, or, never having answered anything, gave its place to a newcomer in a full
    table (``evicted``)."""

    peer: Peer
    reason: RemovalReason


PeerEvent = PeerAdded | PeerRemoved


@dataclass(slots=True)
class MessageReceived:
    """A direct message (``send``) from ``source``, delivered exactly once and in the order it
    was sent.

    The clocks are those of topic messages (:class:`Message`): ``sent_at`` is the sender's
    **wall clock** when it sent it and ``received_at`` this endpoint's when the datagram that
    completed it was read, both in seconds since the epoch (like ``time.time()``; the
    difference is the latency when the clocks agree); ``expires_at`` is when it expires on the
    same clock as ``received_at`` (its ``expiry`` at send, counted down on the way): an
    ``on_message`` callback or ``messages()`` iterator whose queue held it past then does not
    get it (counted in ``direct_messages_expired``). ``message_type`` is the type the sender
    gave (``send(..., message_type=...)``), ``""`` if none. A sender older than these fields
    gives neither type nor time: ``sent_at`` is then ``received_at``.

    Treat it as read-only. It is not frozen: one is built per message on the hot path, and a
    frozen dataclass costs three times as much to build (measured: 500 vs 140 ns).
    """

    source: Peer
    payload: bytes
    received_at: float
    message_type: str = ""
    sent_at: float = 0.0
    expires_at: float = math.inf

    @property
    def source_id(self) -> int:
        """The sender's endpoint id (``source.endpoint_id``)."""
        return self.source.endpoint_id

    @property
    def source_name(self) -> str:
        """The sender's endpoint name (``source.name``)."""
        return self.source.name

    def json(self) -> Any:
        """The payload decoded as JSON (see ``send_json``).

        Raises:
            ValueError: the payload is not JSON.
        """
        return orjson.loads(self.payload)


@dataclass(slots=True)
class Message:
    """One message published on a topic, as a subscriber receives it.

    ``sequence`` counts the publisher's messages on this topic (from 1, per publisher
    incarnation), so a gap shows messages that expired or were dropped from history.
    ``sent_at`` is the publisher's **wall clock** at publish and ``received_at`` this endpoint's
    when the datagram that completed it was read, both in seconds since the epoch (like
    ``time.time()``; the difference is the latency when the clocks agree). Each is the loop's
    monotonic time of the burst plus the offset to the wall clock, measured again at every
    timer (so it follows a clock step soon after), which is why messages of one burst share
    one. (Direct messages, :class:`MessageReceived`, carry the same clocks.)
    Treat it as read-only (not frozen, for the same reason as :class:`MessageReceived`).
    """

    topic_name: str
    topic_type: str
    payload: bytes
    source_id: int
    source_name: str
    sequence: int
    sent_at: float
    received_at: float
    #: When it expires, on the same wall clock as ``received_at`` (its ``expiry`` at publish,
    #: counted down on the way): a subscription whose queue held it past then does not hand
    #: it to its callback or iterator (counted; a Gap where gaps are asked for). ``inf``: never.
    expires_at: float = math.inf
    #: The work-queue group it was given to this endpoint for (``subscribe(..., group=)``;
    #: docs/work-queues.md), or None for a message every subscriber gets.
    group: str | None = None
    #: Whether it went to another member of its group first, which was removed (or left the
    #: group) before its callback returned: it may have been done there too (at-least-once).
    redelivered: bool = False
    #: A grouped message's (publisher incarnation, job number): what its member's done names.
    job: tuple[int, int] | None = None

    def json(self) -> Any:
        """The payload decoded as JSON (see ``publish_json``).

        Raises:
            ValueError: the payload is not JSON.
        """
        return orjson.loads(self.payload)


@dataclass(slots=True)
class TopicDelivery:
    """Topic messages, in order, for the local subscriptions ``subscriptions`` (ids).

    One event carries a run of consecutive messages for the same subscriptions (a bundle's,
    usually), so the hot path builds one object per run, not one per message.
    """

    messages: list[Message]
    subscriptions: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Gap:
    """Messages ``first_sequence`` .. ``first_sequence + count - 1`` of one publisher on one
    topic will never arrive here (seen when a later one arrived), for a subscription that asked
    (``subscribe(..., gaps=True)`` or ``on_gap``).

    ``reason``: ``"expired"``, they expired before they could be delivered (at the publisher,
    waiting for this endpoint, or on the way); ``"dropped"``, the publisher's slow-peer policy
    dropped them for this endpoint (``GLUE_SLOW_PEER=drop``); ``"history"``, they were
    published while this endpoint was away or not subscribed, and the history it got did not
    reach back that far. (A subscription's own full queue is reported apart: its ``dropped``.)
    """

    topic_name: str
    source_id: int
    source_name: str
    first_sequence: int
    count: int
    reason: GapReason
    #: None: a gap carries no payload (b"": a subscription's queue counts it as 0 bytes).
    payload: ClassVar[bytes] = b""
    #: A gap never expires: it is handed over however long it waited.
    expires_at: ClassVar[float] = math.inf

    @property
    def last_sequence(self) -> int:
        """The sequence of the last message missing."""
        return self.first_sequence + self.count - 1


@dataclass(slots=True)
class TopicGap:
    """A :class:`Gap`, for the local subscriptions ``subscriptions`` (ids) that asked for gaps."""

    gap: Gap
    subscriptions: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class InterestChanged:
    """What peer ``peer_id`` subscribes to changed (or became known)."""

    peer_id: int


@dataclass(frozen=True, slots=True)
class StopReport:
    """What ``stop()`` left behind; nothing (``clean``) when it stopped cleanly.

    - ``unacknowledged``: for each peer id, the frames (whole messages, or parts of large
      ones) queued for it or sent and not yet acknowledged when the endpoint stopped. They are
      lost to that peer: call ``flush()`` before ``stop()`` to wait for them.
    - ``unsent``: messages still waiting to be handed to the network; dropped.
    - ``running``: each callback (or thread) still running when the timeout ran out, described.
      It is left to finish on its own (threads are daemons); no callback starts after ``stop``.
    - ``errors``: what went wrong while stopping (a bug; also logged with its traceback); the
      rest of the stop went on regardless.
    """

    unacknowledged: dict[int, int] = field(default_factory=dict)
    unsent: int = 0
    running: tuple[str, ...] = ()
    errors: tuple[Exception, ...] = ()

    @property
    def clean(self) -> bool:
        """Whether nothing was left behind."""
        return not (self.unacknowledged or self.unsent or self.running or self.errors)

    def __str__(self) -> str:
        if self.clean:
            return "nothing left behind"
        parts = []
        if self.unacknowledged:
            frames = sum(self.unacknowledged.values())
            parts.append(f"{frames} frames unacknowledged by {len(self.unacknowledged)} peers")
        if self.unsent:
            parts.append(f"{self.unsent} messages not sent")
        parts.extend(f"still running: {what}" for what in self.running)
        parts.extend(f"failed: {error!r}" for error in self.errors)
        return "; ".join(parts)


@dataclass(slots=True)
class Request:
    """A request to a served name, as its handler receives it (``serve``; docs/request-reply.md).

    ``received_at`` and ``expires_at`` are this endpoint's **wall clock** (like
    :class:`Message`'s): ``expires_at`` is when the requester stops waiting, computed from the
    time it had left when it sent the request (so the clocks need not agree). ``deadline`` is the
    same instant on the **monotonic** clock (``time.monotonic()``): a handler is never started
    after it. Treat it as read-only.
    """

    name: str
    payload: bytes
    requester_id: int
    requester_name: str
    request_id: int
    received_at: float
    expires_at: float
    deadline: float

    def json(self) -> Any:
        """The payload decoded as JSON.

        Raises:
            ValueError: the payload is not JSON.
        """
        return orjson.loads(self.payload)


@dataclass(slots=True)
class Reply:
    """A handler's answer to a request (what ``request`` returns; docs/request-reply.md).

    ``sent_at`` (the request went out) and ``received_at`` (this reply arrived) are both this
    endpoint's **wall clock**, so ``round_trip_s`` needs no clock agreement. Read-only.
    """

    name: str
    payload: bytes
    responder_id: int
    responder_name: str
    sent_at: float
    received_at: float

    @property
    def round_trip_s(self) -> float:
        """Seconds from sending the request to receiving this reply."""
        return self.received_at - self.sent_at

    def json(self) -> Any:
        """The payload decoded as JSON.

        Raises:
            ValueError: the payload is not JSON.
        """
        return orjson.loads(self.payload)


@dataclass(frozen=True, slots=True)
class RequestArrived:
    """A request for the local serve ``serve_id`` (its handler runs on the runtime's pool)."""

    serve_id: int
    request: Request


#: How a responder answered: ``ok`` (a reply), ``error`` (its handler raised), ``unserved`` (it
#: serves the name no longer), ``gone`` (it left before answering).
ReplyStatus = Literal["ok", "error", "unserved", "gone"]


@dataclass(frozen=True, slots=True)
class ReplyArrived:
    """An answer of ``responder`` to the pending request ``request_id``; ``done`` when every
    responder asked has answered."""

    request_id: int
    responder: Peer
    reply: Reply | None
    status: ReplyStatus
    error_type: str
    error_message: str
    done: bool


StackEvent = (
    PeerAdded
    | PeerRemoved
    | MessageReceived
    | TopicDelivery
    | TopicGap
    | InterestChanged
    | RequestArrived
    | ReplyArrived
)
