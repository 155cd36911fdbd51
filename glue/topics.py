"""Topics: publish/subscribe by name and type, interest, history (sans-IO; see ``docs/topics.md``).

How this layer works
--------------------
Every message the transport delivers starts with one line of JSON, the *envelope*, then ``\\n``,
then the body (``docs/PROTOCOL.md``, "Topics"):

- ``{"t":"sensors/a","y":"reading","s":7,"w":1763900000.5}`` a message published on topic ``t``
  of type ``y``, the publisher's ``s``-th on that topic (per incarnation), sent at wall time ``w``;
- ``{"i":3,"set":["sensors/#"],"ask":true}`` the sender's whole interest (the topic patterns it
  subscribes to), version 3; ``ask`` asks for ours in return;
- ``{"i":4,"add":["b"],"del":[]}`` a change of interest from version 3 to 4;
- ``{}`` a direct message (``send(payload, to=...)``), outside any topic.

State: local subscriptions (id -> pattern, type), each peer's interest (patterns and version),
this endpoint's history per published topic (the last *depth* envelopes, with their expiry), and
the last sequence delivered per (publisher, incarnation, topic).

Rules:
- When a peer appears we send it our whole interest and ask for its own; afterwards every change
  of our subscriptions goes to every peer as a delta, coalesced per burst. Interest travels on the
  reliable transport, so it arrives once and in order; a delta that does not follow the version we
  hold makes us ask again for the whole set.
- ``publish`` gives a message the next sequence of its topic, keeps it in the topic's history,
  delivers it to matching local subscriptions without the network, and returns the peers whose
  interest matches the topic.
- When a peer's interest grows to match a topic in our history (it appeared, or subscribed later),
  that topic's unexpired history goes to it at once, in order, before anything newer.
- A received topic message whose sequence is not above the last one delivered from that
  publisher incarnation and topic is a duplicate (history sent again after a partition healed) and
  is dropped; so every message reaches each subscribing endpoint at most once, in order.
- A subscription whose type differs from the message's does not get it; the mismatch is counted
  and logged once per (topic, type).

Bounds: history by depth per topic and by ``history_max_bytes`` in total (oldest topics' entries
go first); a topic whose retained messages all expired leaves the history map (timers scan only
topics holding something, and only once the earliest entry expires), keeping just its sequence
and depth among at most ``max_dormant_topics``; the dedup table by ``max_streams`` entries, each
peer's interest by ``max_peer_patterns``, and the match caches by entry count.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, TypeVar, cast

import orjson

from glue.errors import UsageError, UsageTypeError, UsageValueError, warn_once
from glue.events import (
    Gap,
    GapReason,
    InterestChanged,
    Message,
    MessageReceived,
    Peer,
    StackEvent,
    TopicDelivery,
    TopicGap,
)
from glue.groups import (
    GroupsConfig,
    GroupSender,
    Job,
    by_group,
    group_pairs,
    job_envelope,
    validate_group,
)
from glue.wire import MAX_ID, MAX_NAME_CHARS, EndpointId

if TYPE_CHECKING:
    from glue.requests import Requests

__all__ = [
    "APART_BYTES",
    "DIRECT_ENVELOPE",
    "MAX_ENVELOPE_BYTES",
    "MAX_TOPIC_CHARS",
    "MAX_TYPE_CHARS",
    "SERVED",
    "Outbound",
    "Topics",
    "TopicsConfig",
    "direct_message",
    "matches",
    "outbound_size",
    "validate_pattern",
    "validate_topic_name",
    "validate_topic_type",
]

logger = logging.getLogger(__name__)
K = TypeVar("K")

MAX_TOPIC_CHARS: Final = 256
MAX_TYPE_CHARS: Final = 128
_SEGMENT: Final = r"[A-Za-z0-9_.:\-]+"
_TOPIC_RE: Final = re.compile(rf"{_SEGMENT}(?:/{_SEGMENT})*")
_PATTERN_RE: Final = re.compile(rf"(?:(?:{_SEGMENT}|\+)(?:/(?:{_SEGMENT}|\+))*(?:/#)?|#)")
_TYPE_RE: Final = re.compile(r"[A-Za-z0-9_.:/\-]+")
#: Room for an envelope on top of the largest message (GLUE_MAX_MESSAGE_BYTES counts the body).
MAX_ENVELOPE_BYTES: Final = 1024
#: The envelope of a direct message (not on a topic).
DIRECT_ENVELOPE: Final = b"{}\n"
#: Marks a served pattern among a peer's interest (``Topics.serve``); no topic name or pattern
#: can hold it, so served names and topics never match each other.
SERVED: Final = "$"
_CACHE_ENTRIES: Final = 65536
#: The longest time to live a retained message may carry (``MAX_EXPIRY_S``, one day).
_MAX_RETAIN_S: Final = 86400.0
_NO_MISMATCH: Final = ((), 0)

#: Payloads larger than this are published as ``(envelope line, payload)``, never concatenated:
#: the transport sends the two pieces as one (see :data:`Outbound`).
APART_BYTES: Final = 4096

#: A message to send: its bytes (envelope line, then payload), or for a large payload the two
#: kept apart, ``(envelope line, payload)``: the same bytes on the wire, the payload not copied.
Outbound = bytes | tuple[bytes, bytes]
Send = tuple[EndpointId, Outbound, float]


def direct_message(payload: bytes, message_type: str = "", sent_at: float = 0.0) -> Outbound:
    """A direct message (``send``, not on a topic): its envelope (``{"w":SENT_AT}``, with
    ``"y"`` first when typed; PROTOCOL.md), then ``payload``. The runtimes build the same bytes
    with a cached stamp (``RuntimeCore._outgoing``).

    A large payload is kept apart, not copied (it must be ``bytes``, so it cannot change); a small
    one is copied once, after the envelope.
    """
    head = {"y": message_type, "w": sent_at} if message_type else {"w": sent_at}
    line = orjson.dumps(head) + b"\n"
    if len(payload) > APART_BYTES:
        return (line, payload)
    return line + payload


def outbound_size(message: Outbound) -> int:
    """The length on the wire of a message to send."""
    if isinstance(message, bytes):
        return len(message)
    head, body = message
    return len(head) + len(body)


def validate_topic_name(name: str, argument: str = "topic_name") -> str:
    """Return ``name`` if it can be published to.

    A topic name is 1 to 256 characters: segments of letters, digits, ``_ . : -`` separated by
    single ``/`` (``sensors/kitchen/temperature``).

    Raises:
        UsageTypeError: not a ``str`` (``argument`` names it).
        UsageValueError: the name is not valid (the message says why).
    """
    if (
        type(name) is not str
        or not 0 < len(name) <= MAX_TOPIC_CHARS
        or not _TOPIC_RE.fullmatch(name)
    ):
        _refuse_name(name, argument, "topic name")
        raise UsageValueError(
            f"invalid topic name {name!r} ({argument}): expected 1-{MAX_TOPIC_CHARS} characters, "
            "segments of letters, digits and _ . : - separated by single '/' (e.g. "
            "'sensors/kitchen')",
            argument=argument,
        )
    return name


def validate_pattern(pattern: str, argument: str = "topic_name") -> str:
    """Return ``pattern`` if it can be subscribed to.

    A pattern is a topic name, ``#`` (everything), a name ending in ``/#`` (that name and every
    name under it), and ``+`` may stand for exactly one segment (``sensors/+/temperature``).

    Raises:
        UsageTypeError: not a ``str`` (``argument`` names it).
        UsageValueError: the pattern is not valid.
    """
    if (
        type(pattern) is not str
        or not 0 < len(pattern) <= MAX_TOPIC_CHARS
        or not _PATTERN_RE.fullmatch(pattern)
    ):
        _refuse_name(pattern, argument, "topic pattern")
        raise UsageValueError(
            f"invalid topic pattern {pattern!r} ({argument}): expected a topic name, '#', a name "
            "ending in '/#', with '+' standing for one whole segment (e.g. "
            "'sensors/+/temperature')",
            argument=argument,
        )
    return pattern


def validate_topic_type(topic_type: str, argument: str = "topic_type") -> str:
    """Return ``topic_type`` if valid: 1 to 128 letters, digits and ``_ . : / -``.

    Raises:
        UsageTypeError: not a ``str`` (``argument`` names it).
        UsageValueError: the type is not valid.
    """
    if (
        type(topic_type) is not str
        or not 0 < len(topic_type) <= MAX_TYPE_CHARS
        or not _TYPE_RE.fullmatch(topic_type)
    ):
        _refuse_name(topic_type, argument, "topic type")
        raise UsageValueError(
            f"invalid topic type {topic_type!r} ({argument}): expected 1-{MAX_TYPE_CHARS} "
            "letters, digits and _ . : / -",
            argument=argument,
        )
    return topic_type


def _refuse_name(value: object, argument: str, what: str) -> None:
    """Raise the type error for a name that is not a plain ``str`` (a subclass, such as a
    ``StrEnum``, is refused too: pass ``str(value)``)."""
    if type(value) is not str:
        raise UsageTypeError(
            f"invalid {what} {value!r}: expected a plain str for {argument}, not "
            f"{type(value).__name__}",
            argument=argument,
        )


def matches(pattern: str, topic: str) -> bool:
    """Whether the subscription ``pattern`` matches the topic name ``topic``."""
    if pattern == "#" or pattern == topic:
        return True
    if "#" not in pattern and "+" not in pattern:
        return False
    wanted = pattern.split("/")
    parts = topic.split("/")
    if wanted[-1] == "#":
        wanted.pop()
        if len(parts) < len(wanted):
            return False
        parts = parts[: len(wanted)]
    elif len(parts) != len(wanted):
        return False
    return all(w == "+" or w == p for w, p in zip(wanted, parts, strict=True))


def any_matches(patterns: Iterable[str], topic: str) -> bool:
    """Whether any of ``patterns`` matches ``topic`` (see :func:`matches`)."""
    return any(matches(pattern, topic) for pattern in patterns)


@dataclass(frozen=True, slots=True)
class TopicsConfig:
    """Bounds and defaults of the topics layer."""

    #: Messages kept per topic for late joiners when ``publish`` does not say (like MQTT retain).
    history_depth: int = 1
    #: Bytes of history kept in total; beyond it the least recently published topics lose
    #: their oldest entries.
    history_max_bytes: int = 64 * 1024 * 1024
    #: (publisher, incarnation, topic) entries remembered for duplicate suppression.
    max_streams: int = 100_000
    #: Patterns accepted from one peer's interest.
    max_peer_patterns: int = 10_000
    #: Topics remembered (their sequence and depth) after their history emptied; beyond, the
    #: oldest are forgotten and a topic published anew numbers on from the highest forgotten.
    max_dormant_topics: int = 100_000
    #: Bytes of other publishers' messages a keeper holds in total (``keep``); beyond it the
    #: least recently updated (topic, publisher) histories lose their oldest entries.
    kept_max_bytes: int = 64 * 1024 * 1024
    #: Patterns kept from the start, each with its depth (``GLUE_HISTORY_KEEP``).
    keep: tuple[tuple[str, int], ...] = ()
    #: Bounds of this publisher's work queues (``glue.groups``).
    groups: GroupsConfig = field(default_factory=GroupsConfig)


@dataclass(slots=True)
class _Subscription:
    pattern: str
    topic_type: str
    gaps: bool = False  # it wants Gap events (TopicGap)
    group: str | None = None  # a member of this work-queue group (grouped messages only)


class _History:
    __slots__ = ("depth", "entries", "sequence")

    def __init__(self, depth: int) -> None:
        self.sequence = 0
        self.depth = depth  # the configured default until a publish sets it for the topic
        # (sequence, message, expires_at, its size, refresh): ``refresh`` (seconds) > 0 for a
        # retained message: kept until replaced (``expires_at`` inf), sent again with that
        # time to live
        self.entries: deque[tuple[int, Outbound, float, int, float]] = deque()


class _Kept:
    """What a keeper holds of one publisher on one topic: its last ``depth`` messages."""

    __slots__ = ("depth", "entries", "incarnation", "name")

    def __init__(self, incarnation: int, name: str, depth: int) -> None:
        self.incarnation = incarnation
        self.name = name
        self.depth = depth
        # (sequence, envelope with its origin, expires_at, size, refresh: as _History's), in
        # sequence order
        self.entries: deque[tuple[int, Outbound, float, int, float]] = deque()


#: One kept message as persisted (``glue.history``): topic, publisher id, incarnation and name,
#: sequence, the envelope line (with its origin, no LF), the payload, expiry (monotonic time).
KeptMessage = tuple[str, EndpointId, int, str, int, bytes, bytes, float]
#: A change to what is kept, for a persistent store: ``("put", KeptMessage)``, or
#: ``("drop", (topic, publisher id, up to sequence))`` (every sequence when it is -1).
KeptChange = tuple[str, Any]


#: How many separate runs of relayed sequences a stream may hold ahead of its publisher's own
#: messages (see ``_Ahead``); a relay that would start one more is refused.
_RELAY_SPANS: Final = 16


class _Ahead:
    """What keepers' relays delivered of one stream beyond the messages its publisher sent us
    itself, so that a relay never hides the publisher's own messages.

    Relays of a publisher that is a peer now are ignored (it serves its own history); this is
    for those that come while it is not (before we learn of it, or while it is expired). Without
    it, one relay (from a keeper, or forged by anyone on the network without a key) with a huge
    sequence would move the stream's dedup watermark past everything the publisher will ever
    send, and each of its real messages would be dropped as a repeat. Here the
    publisher's own messages are dropped only when they are at or below ``direct`` or were
    relayed exactly; the relayed sequences are held as a few runs, pruned as the publisher's own
    stream passes them, so a real keeper's replay costs one run, and a forged one cannot cost
    more than ``_RELAY_SPANS``.
    """

    __slots__ = ("direct", "spans")

    def __init__(self, direct: int) -> None:
        self.direct = direct  # the highest of the publisher's own sequences handled
        self.spans: list[list[int]] = []  # relayed sequences above it: sorted [first, last] runs

    def covers(self, sequence: int) -> bool:
        return any(first <= sequence <= last for first, last in self.spans)

    def below(self, sequence: int) -> int:
        """The highest sequence under ``sequence`` up to which nothing is missing."""
        top = self.direct
        for first, last in self.spans:
            if first > top + 1 or first >= sequence:
                break
            top = max(top, min(last, sequence - 1))
        return top

    def fits(self, sequence: int) -> bool:
        spans = self.spans
        return len(spans) < _RELAY_SPANS or spans[-1][1] + 1 == sequence

    def add(self, sequence: int) -> None:
        """A relayed ``sequence``, above every sequence held (relays are taken in order)."""
        spans = self.spans
        if spans and spans[-1][1] + 1 == sequence:
            spans[-1][1] = sequence
        else:
            spans.append([sequence, sequence])

    def advance(self, sequence: int) -> bool:
        """The publisher's own ``sequence`` was handled: prune what it passed; True when no
        relayed sequence is left ahead of it."""
        if sequence > self.direct:
            self.direct = sequence
        spans = self.spans
        while spans and spans[0][1] <= sequence:
            del spans[0]
        if spans and spans[0][0] <= sequence:
            spans[0][0] = sequence + 1
        return not spans


class _Interest:
    __slots__ = ("announced", "asked", "fresh", "groups", "patterns", "version")

    def __init__(self) -> None:
        self.version = 0  # what a peer without subscriptions announces
        self.announced = 0  # the highest version its announcements named
        self.patterns: frozenset[str] = frozenset()
        self.groups: frozenset[tuple[str, str]] = frozenset()  # (group, pattern) memberships
        self.asked = False
        self.fresh = True  # its first announcement: it sends its interest by itself


class Topics:
    """The topics state machine of one endpoint."""

    def __init__(
        self,
        config: TopicsConfig,
        *,
        endpoint_id: EndpointId,
        name: str,
        incarnation: int,
        emit: Callable[[StackEvent], object],
        wall_offset: float = 0.0,
    ) -> None:
        self.config = config
        self.endpoint_id = endpoint_id
        self.name = name
        self.incarnation = incarnation
        #: Wall-clock seconds since the epoch minus the monotonic ``now`` the runtime passes in.
        self.wall_offset = wall_offset
        self.counters: Counter[str] = Counter()
        self._emit = emit
        self._subscriptions: dict[int, _Subscription] = {}
        self._next_subscription = 1
        self._pattern_counts: Counter[str] = Counter()
        self._version = 0
        self._added: set[str] = set()  # pattern changes since the last delta
        self._removed: set[str] = set()
        self._peers: dict[EndpointId, Peer] = {}
        self._interest: dict[EndpointId, _Interest] = {}
        # Topics with retained messages, ordered by last publish (oldest first). A topic whose
        # retained messages all expired (or that keeps none) leaves it for ``_dormant``, which
        # keeps only its numbering: timers scan only topics that hold something.
        self._history: dict[str, _History] = {}
        self._history_bytes = 0
        self._dormant: dict[str, tuple[int, int]] = {}  # topic -> (sequence, depth)
        self._sequence_floor = 0  # the highest sequence of a forgotten dormant topic
        self._prune_at = math.inf  # no retained message expires before this
        self._seen: dict[tuple[int, int, str], int] = {}
        # Streams where keepers' relays went ahead of the publisher's own messages.
        self._ahead: dict[tuple[int, int, str], _Ahead] = {}
        self._local_cache: dict[tuple[str, str], tuple[tuple[int, ...], int]] = {}
        self._target_cache: dict[str, tuple[EndpointId, ...]] = {}
        self._prefix_cache: dict[tuple[str, str], bytes] = {}
        self._valid_names: set[tuple[str, str]] = set()
        self._valid_types: set[str] = set()  # of direct messages
        self._outbox: list[Send] = []
        #: Whether ``size`` more bytes fit in the send queue to a peer now (the stack's, set by
        #: it): history replays and answers to ``ask`` are sent only while they do, so that a
        #: peer that never acknowledges cannot make this endpoint queue without bound by asking
        #: again or flipping its interest (each flip replays the history).
        self.room: Callable[[EndpointId, int], bool] = lambda peer, size: True
        self._outbox_bytes: dict[EndpointId, int] = {}  # per peer, in _outbox now
        self._warned: set[object] = set()
        self._published = 0
        self._received = 0
        self._stamp_now = float("nan")
        self._stamp_wall = 0.0
        self._stamp = b""
        # History keeping (``keep``): pattern -> depth; per topic, the depth its patterns give
        # (0: not kept); per (topic, publisher), what is kept, least recently updated first.
        self._keep: dict[str, int] = {}
        self._keep_cache: dict[str, int] = {}
        self._kept: dict[tuple[str, EndpointId], _Kept] = {}
        self._kept_bytes = 0
        self._kept_prune_at = math.inf
        self._kept_changes: list[KeptChange] | None = None  # journaled once a store asks
        # The last sequence of a stream that arrived unwanted (another type): no gap up to it.
        self._passed: dict[tuple[int, int, str], int] = {}
        # Why frames from a peer were last skipped (its next gap says so), per peer.
        self._skip_reasons: dict[EndpointId, GapReason] = {}
        # Work queues (docs/work-queues.md): our memberships, as interest; as a publisher, the
        # share-out among each group's members; as a member, the done (and refused) job numbers
        # owed to each publisher, sent at the next take_sends.
        self._group_counts: Counter[tuple[str, str]] = Counter()
        self._groups_added: set[tuple[str, str]] = set()
        self._groups_removed: set[tuple[str, str]] = set()
        self._groups = GroupSender(config.groups, self.counters, any_matches)
        self._done_out: dict[EndpointId, list[int]] = {}
        self._refused_out: dict[EndpointId, list[int]] = {}
        self._now = 0.0  # the latest now seen (for inputs that carry none, like subscribe)
        #: Where requests and replies go (``glue.requests``); None: dropped as malformed.
        self.requests: Requests | None = None
        for pattern, depth in config.keep:
            self.keep(pattern, depth)

    # --- local subscriptions --------------------------------------------------------------------

    def subscribe(
        self, pattern: str, topic_type: str, *, gaps: bool = False, group: str | None = None
    ) -> int:
        """Add a local subscription; returns its id. With ``gaps``, it also gets a
        :class:`TopicGap` for every run of messages that will never arrive. With ``group``, it
        is a member of that work-queue group: it gets only the grouped messages publishers
        give this endpoint (docs/work-queues.md), each to be reported :meth:`done`.

        Raises:
            UsageError: the pattern, type or group is not valid.
        """
        validate_pattern(pattern)
        validate_topic_type(topic_type)
        if group is not None:
            validate_group(group)
        subscription = self._next_subscription
        self._next_subscription += 1
        self._subscriptions[subscription] = _Subscription(pattern, topic_type, gaps, group)
        self._local_cache.clear()
        if group is None:
            self._want(pattern)
        else:
            self._want_group(group, pattern)
        return subscription

    def unsubscribe(self, subscription: int) -> None:
        """Remove a local subscription (no-op when unknown)."""
        entry = self._subscriptions.pop(subscription, None)
        if entry is None:
            return
        self._local_cache.clear()
        if entry.group is None:
            self._unwant(entry.pattern)
        else:
            self._unwant_group(entry.group, entry.pattern)

    def _want(self, pattern: str) -> None:
        """One more subscription (or keeper) wants ``pattern``: a new one joins our interest."""
        _count_in(self._pattern_counts, pattern, self._added, self._removed)

    def _want_group(self, group: str, pattern: str) -> None:
        """A subscription joins ``group`` for ``pattern``: in our interest, and as a member of
        our own publications' groups."""
        pair = (group, pattern)
        if _count_in(self._group_counts, pair, self._groups_added, self._groups_removed):
            self._local_member_changed()

    def _unwant_group(self, group: str, pattern: str) -> None:
        pair = (group, pattern)
        if _count_out(self._group_counts, pair, self._groups_added, self._groups_removed):
            self._local_member_changed()

    def _local_member_changed(self) -> None:
        self._send_jobs(
            self._groups.set_member(self.endpoint_id, by_group(self._group_counts), self._now),
            self._now,
        )

    def _unwant(self, pattern: str) -> None:
        _count_out(self._pattern_counts, pattern, self._added, self._removed)

    # --- history keeping ------------------------------------------------------------------------

    def keep(self, pattern: str, depth: int) -> None:
        """Keep the last ``depth`` messages of every publisher on topics matching ``pattern``,
        and serve them to late joiners as their publishers would (``docs/history.md``).

        The pattern joins this endpoint's interest, so publishers send to it. Keeping a pattern
        again changes its depth; a depth of 0 stops keeping it (``unkeep``).

        Raises:
            UsageError: the pattern or depth is not valid.
        """
        validate_pattern(pattern, "pattern")
        if type(depth) is not int:
            raise UsageTypeError(f"depth must be an int, not {type(depth).__name__}")
        if depth < 0:
            raise UsageValueError(f"depth must be 0 or more, not {depth}")
        if depth == 0:
            self.unkeep(pattern)
            return
        if pattern not in self._keep:
            self._want(pattern)
        self._keep[pattern] = depth
        self._keep_cache.clear()

    def unkeep(self, pattern: str) -> None:
        """Stop keeping ``pattern`` (no-op when not kept); what it kept is dropped."""
        if self._keep.pop(pattern, None) is None:
            return
        self._unwant(pattern)
        self._keep_cache.clear()
        for key in [key for key in self._kept if not self._keep_depth(key[0])]:
            self._forget_kept(key)

    def kept_patterns(self) -> dict[str, int]:
        """The patterns kept, with their depths."""
        return dict(self._keep)

    def kept_messages(self) -> int:
        """How many messages of other publishers are kept now."""
        return sum(len(kept.entries) for kept in self._kept.values())

    def gauges(self) -> dict[str, float]:
        """What this layer holds now, for metrics (each within its bound): history and kept
        bytes, topics with history, publishers' streams followed for duplicates, work-queue
        jobs unfinished and held, and the bytes held."""
        groups = self._groups
        return {
            "history_bytes": float(self._history_bytes),
            "history_topics": float(len(self._history)),
            "kept_bytes": float(self._kept_bytes),
            "streams_followed": float(len(self._seen)),
            "group_jobs_unfinished": float(groups.unfinished()),
            "group_jobs_held": float(groups.held()),
            "group_jobs_held_bytes": float(groups.held_bytes()),
        }

    def journal_kept(self) -> None:
        """Record every change to what is kept from now on, for ``take_kept_changes``."""
        if self._kept_changes is None:
            self._kept_changes = []

    def take_kept_changes(self) -> list[KeptChange]:
        """Changes to what is kept since the last call (see ``journal_kept``), oldest first."""
        changes = self._kept_changes
        if not changes:
            return []
        self._kept_changes = []
        return changes

    def restore_kept(self, message: KeptMessage) -> bool:
        """Keep a message read back from a store (in sequence order per publisher and topic);
        False when it is not kept (no pattern matches it any more, or it expired)."""
        topic, publisher, incarnation, name, sequence, line, body, expires_at = message
        depth = self._keep_depth(topic)
        if not depth:
            return False
        refresh = 0.0
        if expires_at == math.inf:  # retained: sent again with the time to live it names
            with contextlib.suppress(orjson.JSONDecodeError, AttributeError):
                refresh = _retained(orjson.loads(line).get("r"))
        return self._keep_message(
            topic,
            publisher,
            incarnation,
            name,
            sequence,
            line,
            body,
            expires_at,
            depth,
            put=False,
            refresh=refresh,
        )  # (it is in the store already: only what it displaces is journaled)

    def _journal_drop(self, topic: str, publisher: EndpointId, up_to: int) -> None:
        if self._kept_changes is not None:
            self._kept_changes.append(("drop", (topic, publisher, up_to)))

    def _forget_kept(self, key: tuple[str, EndpointId]) -> None:
        kept = self._kept.pop(key)
        self._kept_bytes -= sum(entry[3] for entry in kept.entries)
        self._journal_drop(key[0], key[1], -1)

    def _trim_kept(self) -> None:
        """Within ``kept_max_bytes``: the least recently updated histories lose their oldest."""
        limit = self.config.kept_max_bytes
        emptied = []
        for key, kept in self._kept.items():
            entries = kept.entries
            dropped = 0
            while entries and self._kept_bytes > limit:
                old = entries.popleft()
                self._kept_bytes -= old[3]
                dropped = old[0]
                self.counters["kept_evicted_for_space"] += 1
            if dropped:
                self._journal_drop(key[0], key[1], dropped)
            if not entries:
                emptied.append(key)
            if self._kept_bytes <= limit:
                break
        for key in emptied:
            del self._kept[key]

    def _prune_kept(self, now: float) -> None:
        earliest = math.inf
        emptied = []
        expired = 0
        for key, kept in self._kept.items():
            entries = kept.entries
            dropped = 0
            # In sequence order: a later message that expires sooner (its own expiry) waits for
            # the ones before it (within the depth; expired entries are never sent).
            while entries and entries[0][2] <= now:
                old = entries.popleft()
                self._kept_bytes -= old[3]
                dropped = old[0]
                expired += 1
            if dropped:
                self._journal_drop(key[0], key[1], dropped)
            if entries:
                earliest = min(earliest, entries[0][2])
            else:
                emptied.append(key)
        for key in emptied:
            del self._kept[key]
        self._kept_prune_at = earliest
        if expired:
            self.counters["kept_expired"] += expired

    def _keep_depth(self, topic: str) -> int:
        depth = self._keep_cache.get(topic)
        if depth is None:
            depth = max((d for p, d in self._keep.items() if matches(p, topic)), default=0)
            if len(self._keep_cache) >= _CACHE_ENTRIES:
                self._keep_cache.clear()
            self._keep_cache[topic] = depth
        return depth

    def _keep_message(
        self,
        topic: str,
        publisher: EndpointId,
        incarnation: int,
        name: str,
        sequence: int,
        line: bytes,
        body: bytes,
        expires_at: float,
        depth: int,
        *,
        put: bool = True,
        refresh: float = 0.0,
    ) -> bool:
        """Keep one message of ``publisher`` (``line``: its envelope line, with its origin);
        ``put``: journal it (see ``journal_kept``); ``refresh``: it is retained (see
        ``_History``)."""
        key = (topic, publisher)
        kept = self._kept.pop(key, None)
        if kept is not None and kept.incarnation != incarnation:
            if incarnation < kept.incarnation:
                self._kept[key] = kept  # an older incarnation's message: a newer one replaced it
                return False
            self._kept[key] = kept
            self._forget_kept(key)  # the publisher restarted: its new messages replace these
            kept = None
        if kept is None:
            kept = _Kept(incarnation, name, depth)
        self._kept[key] = kept  # now the most recently updated
        kept.depth = depth
        entries = kept.entries
        if entries and sequence <= entries[-1][0]:
            return False  # kept already (or older than what is kept)
        apart = len(body) > APART_BYTES
        envelope: Outbound = (line + b"\n", body) if apart else line + b"\n" + body
        size = len(line) + 1 + len(body)
        entries.append((sequence, envelope, expires_at, size, refresh))
        self._kept_bytes += size
        if expires_at < self._kept_prune_at:
            self._kept_prune_at = expires_at
        if put and self._kept_changes is not None:
            message = (topic, publisher, incarnation, name, sequence, line, body, expires_at)
            self._kept_changes.append(("put", message))
        dropped = 0
        while len(entries) > depth:
            old = entries.popleft()
            self._kept_bytes -= old[3]
            dropped = old[0]
        if dropped:
            self._journal_drop(topic, publisher, dropped)
        self.counters["kept" if put else "kept_restored"] += 1
        if self._kept_bytes > self.config.kept_max_bytes:
            self._trim_kept()
        return True

    def patterns(self) -> list[str]:
        """The patterns this endpoint subscribes to, sorted (not those it serves)."""
        return sorted(p for p in self._pattern_counts if p[0] != SERVED)

    def peer_patterns(self, peer: EndpointId) -> list[str]:
        """The patterns ``peer`` told us it subscribes to, sorted."""
        interest = self._interest.get(peer)
        return sorted(interest.patterns) if interest else []

    def subscribers(self, topic: str) -> tuple[EndpointId, ...]:
        """The peers whose interest matches ``topic`` (those a publish on it goes to)."""
        found = self._target_cache.get(topic)
        return found if found is not None else self._targets(topic)

    # --- work queues (docs/work-queues.md) -------------------------------------------------------

    def members(self, topic: str, group: str) -> tuple[EndpointId, ...]:
        """The peers (and this endpoint) in ``group`` whose patterns match ``topic``."""
        return self._groups.members(group, topic)

    def groups_idle(self) -> bool:
        """Whether every message this endpoint published to a group is done (or expired)."""
        return self._groups.idle()

    def group_jobs(self) -> tuple[int, int]:
        """This publisher's jobs unfinished at members, and held for want of one."""
        return self._groups.unfinished(), self._groups.held()

    def set_job_room(self, room: Callable[[EndpointId, int], bool]) -> None:
        """Whether a job of ``size`` bytes fits in a member's send queue now (the stack sets
        the transport's ``can_send``, which reports room freeing: then call ``room_freed``)."""
        self._groups.room = room

    def room_freed(self, now: float) -> None:
        """Room freed in some peer's send queue: jobs held for want of it may go now."""
        if self._groups.held():
            self._send_jobs(self._groups.retry(now), now)

    def done(self, source: int, job: tuple[int, int], now: float) -> None:
        """A member's callback returned for a grouped message (``Message.job`` from ``source``):
        tell its publisher at the next ``take_sends`` (batched), or, our own, free its credit."""
        self._now = now
        incarnation, number = job
        if source == self.endpoint_id and incarnation == self.incarnation:
            self._send_jobs(self._groups.done(self.endpoint_id, (number,), now), now)
            return
        peer = self._peers.get(EndpointId(source))
        if peer is None or peer.incarnation != incarnation:
            self.counters["group_done_publisher_gone"] += 1  # it redelivers on its own
            return
        self._done_out.setdefault(peer.endpoint_id, []).append(number)

    def _send_jobs(self, jobs: list[Job], now: float) -> None:
        """Send each job to its member (ours: delivered here, without the network)."""
        me = self.endpoint_id
        for job in jobs:
            if job.member != me:
                assert job.member is not None
                self._queue(job.member, job_envelope(job, APART_BYTES), job.expires_at)
                continue
            local, _ = self._group_local(job.group, job.topic, job.topic_type)
            wall = now + self.wall_offset
            message = Message(
                job.topic,
                job.topic_type,
                job.payload,
                me,
                self.name,
                job.sequence,
                job.sent_at,
                wall,
                job.expires_at + self.wall_offset,
                job.group,
                job.redelivered,
                (self.incarnation, job.number),
            )
            if local:
                self._emit(TopicDelivery([message], local))
            else:  # (another type here: dropped, as for any subscription; done, not refused)
                self._send_jobs(self._groups.done(me, (job.number,), now), now)

    def _group_local(self, group: str, topic: str, topic_type: str) -> tuple[tuple[int, ...], bool]:
        """The local subscriptions in ``group`` that take ``(topic, type)``, and whether any in
        ``group`` takes the topic at all (whatever the type)."""
        found: list[int] = []
        member = False
        for number, entry in self._subscriptions.items():
            if entry.group != group or not matches(entry.pattern, topic):
                continue
            member = True
            if entry.topic_type == topic_type:
                found.append(number)
            else:
                self.counters["type_mismatches"] += 1
                self._warn_once(
                    ("type", topic, topic_type, entry.topic_type),
                    "a message on %r has type %r; subscription %r wants %r: not delivered",
                    topic,
                    topic_type,
                    entry.pattern,
                    entry.topic_type,
                )
        return tuple(found), member

    def _receive_job(
        self,
        peer: Peer,
        head: dict[str, Any],
        payload: bytes,
        now: float,
        expires_at: float | None,
    ) -> None:
        """A grouped message a publisher gave this endpoint: to its group's subscriptions here.

        No sequence bookkeeping: a member sees only some of a stream's sequences, so neither
        dedup nor gap detection applies (the transport delivers it once; a redelivery comes from
        the publisher, flagged ``rd``).
        """
        self._now = now
        number, sequence, sent_at = head.get("j"), head.get("s"), head.get("w")
        try:
            if (
                type(number) is not int
                or number < 1
                or type(sequence) is not int
                or (type(sent_at) is not float and type(sent_at) is not int)
            ):
                raise TypeError("job")
            topic = validate_topic_name(head["t"])
            topic_type = validate_topic_type(head.get("y"))  # type: ignore[arg-type]
            group = validate_group(head["g"])
        except (TypeError, UsageError):
            self._drop("bad_envelope", peer, "a grouped message with a malformed envelope")
            return
        local, member = self._group_local(group, topic, topic_type)
        if not local:
            if member:  # another type: dropped, as for any subscription (no use elsewhere)
                self._done_out.setdefault(peer.endpoint_id, []).append(number)
            else:  # we left the group meanwhile: the publisher gives it to another member
                self.counters["group_refused_sent"] += 1
                self._refused_out.setdefault(peer.endpoint_id, []).append(number)
            return
        self.counters["group_received"] += 1
        message = Message(
            topic,
            topic_type,
            payload,
            peer.endpoint_id,
            peer.name,
            sequence,
            float(sent_at),
            now + self.wall_offset,
            math.inf if expires_at is None else expires_at + self.wall_offset,
            group,
            head.get("rd") is True,
            (peer.incarnation, number),
        )
        self._emit(TopicDelivery([message], local))

    def _receive_done(self, peer: Peer, head: dict[str, Any], now: float) -> None:
        """A member's done (``gd``) and refused (``gr``) job numbers."""
        self._now = now
        done, refused = head.get("gd", []), head.get("gr", [])
        if (
            type(done) is not list
            or type(refused) is not list
            or not all(type(n) is int for n in done)
            or not all(type(n) is int for n in refused)
        ):
            self._drop("bad_done", peer, "a malformed done message")
            return
        member = peer.endpoint_id
        if done:
            self.counters["group_done_received"] += len(done)
            self._send_jobs(self._groups.done(member, done, now), now)
        if refused:
            self._send_jobs(self._groups.refused(member, refused, now), now)

    def _send_done(self) -> None:
        """The done and refused job numbers owed to each publisher, one message each; only
        while its send queue has room (a publisher that sends jobs and never acknowledges could
        otherwise make them pile up; without them its jobs' credit comes back at their expiry)."""
        for peer in self._done_out.keys() | self._refused_out.keys():
            head: dict[str, Any] = {}
            done = self._done_out.get(peer)
            if done:
                head["gd"] = done
            refused = self._refused_out.get(peer)
            if refused:
                head["gr"] = refused
            if not self._send_optional(peer, orjson.dumps(head) + b"\n", math.inf):
                self.counters["group_dones_not_sent_queue_full"] += len(done or ()) + len(
                    refused or ()
                )
                continue
            if done:
                self.counters["group_done_sent"] += len(done)
        self._done_out.clear()
        self._refused_out.clear()

    # --- publishing -----------------------------------------------------------------------------

    def publish(
        self,
        topic: str,
        topic_type: str,
        payload: bytes,
        *,
        expires_at: float,
        now: float,
        history_depth: int | None = None,
        retain: bool = False,
    ) -> tuple[Outbound, tuple[EndpointId, ...]]:
        """Number, keep and locally deliver one message; returns it with its envelope (see
        :data:`Outbound`) and the peers to send it to. Names and types are validated by the
        caller (the API) before queuing.

        ``retain``: its history entry stays until a later message replaces it (``depth``), not
        only until it expires; late joiners get it with its whole time to live again, and
        keepers keep it the same way (envelope field ``r``)."""
        history = self._history.pop(topic, None)
        if history is None:
            history = self._revive(topic)
        self._history[topic] = history  # now the most recently published topic
        history.sequence += 1
        sequence = history.sequence
        if now != self._stamp_now:  # one wall-clock stamp per burst (now is the burst's time)
            self._restamp(now)
        wall = self._stamp_wall
        key = (topic, topic_type)
        prefix = self._prefix_cache.get(key)
        if prefix is None:
            prefix = self._new_prefix(key)
        envelope: Outbound
        stamp = self._stamp
        refresh = 0.0
        if retain:
            refresh = max(expires_at - now, 0.001)
            stamp = b',"r":%r%s' % (refresh, stamp)
        if len(payload) > APART_BYTES:
            line = b"%s%d%s" % (prefix, sequence, stamp)
            envelope = (line, payload)
            size = len(line) + len(payload)
        else:
            envelope = b"%s%d%s%s" % (prefix, sequence, stamp, payload)
            size = len(envelope)
        if history_depth is not None:
            history.depth = history_depth  # for this topic from now on
        depth = history.depth
        entries = history.entries
        if depth > 0:
            entries.append((sequence, envelope, math.inf if retain else expires_at, size, refresh))
            self._history_bytes += size
            if expires_at < self._prune_at:
                self._prune_at = expires_at
        while len(entries) > depth:
            self._history_bytes -= entries.popleft()[3]
        if not entries:  # a topic without history keeps only its numbering
            self._rest(topic, self._history.pop(topic))
        if self._history_bytes > self.config.history_max_bytes:
            self._trim_history()
        found = self._local_cache.get(key)
        local = found[0] if found is not None and not found[1] else None
        if local is None:
            local = self._local_matches(topic, topic_type)
        if local:
            message = Message(
                topic,
                topic_type,
                payload,
                self.endpoint_id,
                self.name,
                sequence,
                wall,
                wall,
                expires_at + self.wall_offset,
            )
            self._emit(TopicDelivery([message], local))
            self.counters["delivered_locally"] += 1
        if self._groups.known:
            jobs = self._groups.publish(topic, topic_type, sequence, wall, payload, expires_at)
            if jobs:
                self._send_jobs(jobs, now)
        targets = self._target_cache.get(topic)
        if targets is None:
            targets = self._targets(topic)
        self._published += 1  # folded into counters when they are read (a Counter is slower)
        return envelope, targets

    def _restamp(self, now: float) -> None:
        """The wall-clock stamp of envelopes published at ``now`` (one per burst)."""
        self._stamp_now = now
        self._stamp_wall = now + self.wall_offset
        self._stamp = b',"w":%r}\n' % self._stamp_wall

    def _new_prefix(self, key: tuple[str, str]) -> bytes:
        """The start of a (topic, type)'s envelopes, up to the sequence number (a cache miss)."""
        if len(self._prefix_cache) >= _CACHE_ENTRIES:
            self._prefix_cache.clear()
        head = orjson.dumps({"t": key[0], "y": key[1]})
        prefix = self._prefix_cache[key] = head[:-1] + b',"s":'
        return prefix

    def publish_many(
        self,
        topic: str,
        topic_type: str,
        payloads: Sequence[bytes],
        expiries: Sequence[float],
        *,
        now: float,
        history_depth: int | None = None,
        retain: bool = False,
    ) -> tuple[list[Outbound], tuple[EndpointId, ...]]:
        """:meth:`publish` of each of ``payloads`` (``expiries[i]`` the ``expires_at`` of the
        i-th), in order, at one time: the same numbering, history, local deliveries (one
        ``TopicDelivery`` for all) and targets as as many calls, with the per-topic work done
        once. Returns the envelopes, in order, and the peers to send them to."""
        key = (topic, topic_type)
        found = self._local_cache.get(key)
        if (
            len(payloads) == 1
            or retain
            or self._groups.known
            or found is None
            or found[1]
            or max(map(len, payloads)) > APART_BYTES
        ):
            # One by one: a single message (less work so), and the rare cases: work-queue jobs,
            # retained messages (each with its own time to live again), large payloads (kept
            # apart), a first publish on the topic, type mismatches (counted per message).
            envelopes: list[Outbound] = []
            to: tuple[EndpointId, ...] = ()
            for payload, expires_at in zip(payloads, expiries, strict=True):
                envelope, to = self.publish(
                    topic,
                    topic_type,
                    payload,
                    expires_at=expires_at,
                    now=now,
                    history_depth=history_depth,
                    retain=retain,
                )
                envelopes.append(envelope)
            return envelopes, to
        history = self._history.pop(topic, None)
        if history is None:
            history = self._revive(topic)
        self._history[topic] = history  # now the most recently published topic
        first = history.sequence + 1
        history.sequence += len(payloads)
        if now != self._stamp_now:
            self._restamp(now)
        wall = self._stamp_wall
        stamp = self._stamp
        prefix = self._prefix_cache.get(key)
        if prefix is None:
            prefix = self._new_prefix(key)
        sequences = range(first, history.sequence + 1)
        made: list[bytes] = [
            b"%s%d%s%s" % (prefix, sequence, stamp, payload)
            for sequence, payload in zip(sequences, payloads, strict=True)
        ]
        if history_depth is not None:
            history.depth = history_depth  # for this topic from now on
        depth = history.depth
        entries = history.entries
        if depth > 0:
            # Only the last ``depth`` can stay: the others would be pushed out at once.
            count = len(made)
            for index in range(count - depth if count > depth else 0, count):
                envelope, expires_at = made[index], expiries[index]
                size = len(envelope)
                entries.append((first + index, envelope, expires_at, size, 0.0))
                self._history_bytes += size
                if expires_at < self._prune_at:
                    self._prune_at = expires_at
        while len(entries) > depth:
            self._history_bytes -= entries.popleft()[3]
        if not entries:  # a topic without history keeps only its numbering
            self._rest(topic, self._history.pop(topic))
        if self._history_bytes > self.config.history_max_bytes:
            self._trim_history()
        local = found[0]
        if local:
            endpoint_id, name, offset = self.endpoint_id, self.name, self.wall_offset
            messages = [
                Message(
                    topic,
                    topic_type,
                    payload,
                    endpoint_id,
                    name,
                    sequence,
                    wall,
                    wall,
                    expires_at + offset,
                )
                for sequence, payload, expires_at in zip(sequences, payloads, expiries, strict=True)
            ]
            self._emit(TopicDelivery(messages, local))
            self.counters["delivered_locally"] += len(messages)
        targets = self._target_cache.get(topic)
        if targets is None:
            targets = self._targets(topic)
        self._published += len(made)
        return cast(list[Outbound], made), targets

    def take_sends(self) -> list[Send]:
        """Interest messages and history replays to send: (peer, envelope, expires_at)."""
        if self._added or self._removed or self._groups_added or self._groups_removed:
            self._send_delta()
        if self._done_out or self._refused_out:
            self._send_done()
        out, self._outbox = self._outbox, []
        self._outbox_bytes.clear()
        return out

    def has_sends(self) -> bool:
        """Whether ``take_sends`` has anything."""
        return bool(
            self._outbox
            or self._added
            or self._removed
            or self._groups_added
            or self._groups_removed
            or self._done_out
            or self._refused_out
        )

    # --- peers ----------------------------------------------------------------------------------

    @property
    def version(self) -> int:
        """Our interest version (announced by discovery)."""
        return self._version

    def peer_added(self, peer: Peer) -> None:
        """Send the newcomer our whole interest (it does the same when it learns of us)."""
        if self._added or self._removed or self._groups_added or self._groups_removed:
            self._send_delta()  # to the others; the newcomer gets the whole set, this version
        self._peers[peer.endpoint_id] = peer
        self._interest[peer.endpoint_id] = _Interest()
        self._skip_reasons.pop(peer.endpoint_id, None)
        self._target_cache.clear()
        if self._pattern_counts or self._group_counts:
            self._send_full(peer.endpoint_id, ask=False)

    def announced(self, peer: EndpointId, version: int) -> None:
        """``peer`` announced interest ``version``: ask for its whole set if we hold an older one.

        Not on the announcement that made it known (it sends its set by itself then), and not
        again while an answer is awaited; this repairs what a one-sided removal lost.
        """
        interest = self._interest.get(peer)
        if interest is None:
            return
        interest.announced = max(interest.announced, version)
        if interest.fresh:
            interest.fresh = False
            return
        if version > interest.version and not interest.asked and self._send_full(peer, ask=True):
            interest.asked = True
            self.counters["interest_asked"] += 1

    def peer_removed(self, peer: Peer) -> None:
        """Forget the peer's interest (what it received stays remembered for dedup)."""
        self._peers.pop(peer.endpoint_id, None)
        interest = self._interest.pop(peer.endpoint_id, None)
        self._skip_reasons.pop(peer.endpoint_id, None)
        self._target_cache.clear()
        self._done_out.pop(peer.endpoint_id, None)
        self._refused_out.pop(peer.endpoint_id, None)
        if interest is not None and interest.groups:  # its unfinished jobs go to others
            self._send_jobs(self._groups.set_member(peer.endpoint_id, {}, self._now), self._now)

    # --- receiving ------------------------------------------------------------------------------

    def skipped(self, peer: EndpointId, reason: GapReason) -> None:
        """Messages from ``peer`` were lost below this layer (the transport skipped frames, or a
        bundle's message expired): the next gap in its topics is for ``reason``."""
        if peer in self._peers:
            self._skip_reasons[peer] = reason

    def receive(self, peer: Peer, data: bytes, now: float, expires_at: float = math.inf) -> None:
        """Take one whole message the transport delivered from ``peer`` (``expires_at``: when
        its time to live runs out, which a keeper keeps it until)."""
        if data.startswith(DIRECT_ENVELOPE):  # what _receive does with it, without its set-up
            wall = now + self.wall_offset
            payload = data[len(DIRECT_ENVELOPE) :]
            self._emit(
                MessageReceived(peer, payload, wall, "", wall, expires_at + self.wall_offset)
            )
            return
        self._receive(peer, (data,), now, None, (expires_at,))

    def receive_pieces(
        self,
        peer: Peer,
        pieces: Sequence[bytes | memoryview],
        now: float,
        expires_at: float = math.inf,
    ) -> None:
        """Take one large message from ``peer`` as its pieces (fragments' payloads, in order).

        The envelope is read from the first piece, and the payload is joined from the rest in one
        copy, so a large message is copied once on its way from the datagrams to the subscriber.
        """
        first = pieces[0]
        line = bytes(first[: MAX_ENVELOPE_BYTES + 1])  # small: at most the envelope and its LF
        end = line.find(b"\n")
        if end < 0:  # no envelope in the first piece: let the general path name the problem
            self.receive_many(peer, (b"".join(pieces),), now)
            return
        rest = first[end + 1 :]
        body = bytes(rest) if len(pieces) == 1 else b"".join((rest, *pieces[1:]))
        if line.startswith(DIRECT_ENVELOPE):  # what _receive does with it, without its set-up
            wall = now + self.wall_offset
            self._emit(MessageReceived(peer, body, wall, "", wall, expires_at + self.wall_offset))
            return
        self._receive(peer, (line[: end + 1],), now, body, (expires_at,))

    def receive_many(
        self,
        peer: Peer,
        messages: Sequence[bytes],
        now: float,
        expiries: Sequence[float] | None = None,
    ) -> None:
        """Take whole messages the transport delivered from ``peer``, in order (a bundle's), and
        when each expires (``receive``), if known."""
        self._receive(peer, messages, now, None, expiries)

    def _receive(
        self,
        peer: Peer,
        messages: Sequence[bytes],
        now: float,
        body: bytes | None,
        expiries: Sequence[float] | None,
    ) -> None:
        """The receiving loop; ``body``, when given, is the payload of the only message, whose
        bytes in ``messages`` are then its envelope line alone.

        The loop keeps what repeats from one message to the next (the topic's checks, its local
        subscriptions, the dedup key) in local variables: a bundle usually holds many messages
        of one topic, and Python pays per operation.
        """
        emit = self._emit
        loads = orjson.loads
        seen = self._seen
        aheads = self._ahead
        valid = self._valid_names
        peer_id, incarnation = peer.endpoint_id, peer.incarnation
        received_at = now + self.wall_offset
        current: tuple[str, str] | None = None  # (topic, type) of the previous message
        key: tuple[int, int, str] = (0, 0, "")
        local: tuple[int, ...] = ()
        received = 0
        # Consecutive messages for the same subscriptions share one TopicDelivery (one object
        # per run, not per message); anything else emitted in between starts a new run.
        run: list[Message] | None = None
        run_local: tuple[int, ...] = ()
        keeping = bool(self._keep)
        recount = 0  # type mismatches of the current (topic, type): counted per message
        for index, data in enumerate(messages):
            end = data.find(b"\n")
            if end == 2 and data.startswith(DIRECT_ENVELOPE):  # (from an older sender)
                expires_at = math.inf if expiries is None else expiries[index] + self.wall_offset
                payload = data[3:] if body is None else body
                emit(MessageReceived(peer, payload, received_at, "", received_at, expires_at))
                run = None
                continue
            try:
                head = loads(data[:end]) if end > 0 else None
            except orjson.JSONDecodeError:
                head = None
            if type(head) is not dict:
                self._drop("bad_envelope", peer, "a message without a valid envelope")
                continue
            topic = head.get("t")
            if topic is None:
                if "i" in head:
                    self._receive_interest(peer, head, now)
                elif "gd" in head or "gr" in head:
                    self._receive_done(peer, head, now)
                else:
                    expires_at = (
                        math.inf if expiries is None else expiries[index] + self.wall_offset
                    )
                    payload = data[end + 1 :] if body is None else body
                    self._direct(peer, head, payload, received_at, expires_at)
                run = None
                continue
            if "g" in head:  # a work-queue job given to this endpoint (docs/work-queues.md)
                payload = data[end + 1 :] if body is None else body
                self._receive_job(peer, head, payload, now, expiries[index] if expiries else None)
                run = None
                continue
            topic_type = cast(str, head.get("y"))  # checked below, once per (topic, type)
            sequence = head.get("s")
            sent_at = head.get("w")
            if (
                type(sequence) is not int
                or sequence < 1
                or (type(sent_at) is not float and type(sent_at) is not int)
            ):
                if sequence is None and self.requests is not None and ("q" in head or "a" in head):
                    # A request or reply (glue.requests): "t" without "s", so that a receiver
                    # without requests drops it as a malformed topic message.
                    expires_at = math.inf if expiries is None else expiries[index]
                    payload = data[end + 1 :] if body is None else body
                    self.requests.receive(peer, head, payload, now, expires_at)
                    run = None
                    continue
                self._drop("bad_envelope", peer, "a topic message with a malformed envelope")
                continue
            names = (topic, topic_type)
            if names != current:
                # (A name that is no string may be a list, which cannot be looked up in a set.)
                if type(topic) is not str or type(topic_type) is not str or names not in valid:
                    try:
                        validate_topic_name(topic)
                        validate_topic_type(topic_type)
                    except UsageError:
                        self._drop("bad_envelope", peer, "a topic message with a bad name")
                        continue
                    if len(valid) >= _CACHE_ENTRIES:
                        valid.clear()
                    valid.add(names)
                current = names
                key = (peer_id, incarnation, topic)
                local = self._local_matches(topic, topic_type)
                recount = self._local_cache.get(names, _NO_MISMATCH)[1]
            elif recount:
                local = self._local_matches(topic, topic_type)
            origin = head.get("o")
            if origin is None:
                stream, source_id, source_name = key, peer_id, peer.name
            else:  # kept by a keeper: the publisher's stream, whoever relays it
                found = _origin(origin)
                if found is None:
                    self._drop("bad_envelope", peer, "a kept message with a malformed origin")
                    continue
                source_id, source_incarnation, source_name = found
                stream = (source_id, source_incarnation, topic)
                self.counters["received_from_keepers"] += 1
                if source_id in self._peers:
                    # A live publisher serves its own history; a relay of it (any incarnation)
                    # is stale at best, and may be forged.
                    self.counters["relays_ignored"] += 1
                    continue
            last = seen.get(stream)
            ahead = None
            if origin is not None or aheads:  # (the common case skips this: nothing relayed)
                ahead = aheads.get(stream)
                if ahead is None:
                    pass
                elif origin is None:
                    # Relays went ahead of the publisher: its own message is a repeat only if
                    # it was handled or relayed exactly.
                    if sequence <= ahead.direct or ahead.covers(sequence):
                        if ahead.advance(sequence):
                            del aheads[stream]
                        self.counters["duplicates_suppressed"] += 1
                        continue
                    last = ahead.below(sequence)
                elif (last is None or sequence > last) and not ahead.fits(sequence):
                    self.counters["relays_refused"] += 1
                    logger.debug(
                        "relay of %s's %r #%d from %s refused: too many runs ahead of the "
                        "publisher",
                        source_name,
                        topic,
                        sequence,
                        peer.name,
                    )
                    continue
            if last is not None and sequence <= last + 1:
                if sequence <= last:
                    self.counters["duplicates_suppressed"] += 1
                    continue
            elif last is not None and local:
                # Those in between that arrived unwanted (another type) are no gap.
                top = max(last, self._passed.get(stream, 0))
                if sequence > top + 1:
                    reason = "history" if origin is not None else self._skip_reasons.get(peer_id)
                    self._gap(
                        local, topic, source_id, source_name, top + 1, sequence - top - 1, reason
                    )
                    run = None
            if keeping and source_id != self.endpoint_id:
                depth = self._keep_depth(topic)
                expires_at = math.inf if expiries is None else expiries[index]
                refresh = _retained(head.get("r"))
                if refresh:
                    expires_at = math.inf  # kept until replaced, as its publisher keeps it
                if depth and expires_at > now:
                    payload = data[end + 1 :] if body is None else body
                    line = data[:end] if origin is not None else _with_origin(data[:end], peer)
                    self._keep_message(
                        topic,
                        source_id,
                        stream[1],
                        source_name,
                        sequence,
                        line,
                        payload,
                        expires_at,
                        depth,
                        refresh=refresh,
                    )
            if not local:
                # Not marked as seen: history may bring it again for a later subscription.
                if not (keeping and self._keep_depth(topic)) and not self._mismatched(names):
                    self.counters["received_unwanted"] += 1
                    self._warn_once(
                        ("unwanted", topic),
                        "messages on %r arrive from %s, but no subscription here takes that "
                        "topic any more: dropped (topics_received_unwanted counts them)",
                        topic,
                        source_name,
                    )
                if last is not None:  # but no gap for those who want the stream
                    if len(self._passed) >= self.config.max_streams:
                        self._passed.clear()
                    self._passed[stream] = sequence
                continue
            if last is None and len(seen) >= self.config.max_streams:
                forgotten = next(iter(seen))
                del seen[forgotten]
                aheads.pop(forgotten, None)
                self.counters["streams_forgotten"] += 1
            if ahead is None and origin is None:
                seen[stream] = sequence
            elif origin is not None:
                if ahead is None:
                    ahead = aheads[stream] = _Ahead(last or 0)
                ahead.add(sequence)
                seen[stream] = sequence
            else:
                assert ahead is not None  # (for the type checker)
                if ahead.advance(sequence):
                    del aheads[stream]
                if sequence > seen[stream]:
                    seen[stream] = sequence
            message = Message(
                topic,
                topic_type,
                data[end + 1 :] if body is None else body,
                source_id,
                source_name,
                sequence,
                sent_at,
                received_at,
                math.inf if expiries is None else expiries[index] + self.wall_offset,
            )
            if run is not None and local is run_local:
                run.append(message)
            else:
                run, run_local = [message], local
                emit(TopicDelivery(run, local))
            received += 1
        self._received += received

    def _direct(
        self,
        peer: Peer,
        head: dict[str, Any],
        payload: bytes,
        received_at: float,
        expires_at: float,
    ) -> None:
        """A direct message: its envelope gives its type (``y``) and when it was sent (``w``)."""
        message_type = head.get("y", "")
        if type(message_type) is not str:
            self._drop("bad_envelope", peer, "a direct message with a bad type")
            return
        if message_type and message_type not in self._valid_types:
            try:
                validate_topic_type(message_type, "message_type")
            except UsageError:
                self._drop("bad_envelope", peer, "a direct message with a bad type")
                return
            if len(self._valid_types) >= _CACHE_ENTRIES:
                self._valid_types.clear()
            self._valid_types.add(message_type)
        sent_at = head.get("w", received_at)
        if type(sent_at) is not float:
            sent_at = float(sent_at) if type(sent_at) is int else received_at
        self._emit(MessageReceived(peer, payload, received_at, message_type, sent_at, expires_at))

    def _gap(
        self,
        local: tuple[int, ...],
        topic: str,
        source_id: EndpointId,
        source_name: str,
        first: int,
        count: int,
        reason: GapReason | None,
    ) -> None:
        """Messages ``first`` .. ``first + count - 1`` of ``source_id`` on ``topic`` will never
        come: count them, and tell those of the ``local`` subscriptions that asked."""
        self.counters["gaps"] += 1
        self.counters["gap_messages"] += count
        subscriptions = self._subscriptions
        asked = tuple(number for number in local if subscriptions[number].gaps)
        if asked:
            gap = Gap(topic, source_id, source_name, first, count, reason or "history")
            self._emit(TopicGap(gap, asked))

    def fold_counters(self) -> Counter[str]:
        """The counters, with the hot-path ones folded in."""
        counters = self.counters
        if self._published:
            counters["published"] += self._published
            self._published = 0
        if self._received:
            counters["received"] += self._received
            self._received = 0
        return counters

    # --- internals ------------------------------------------------------------------------------

    def _mismatched(self, names: tuple[str, str]) -> bool:
        """Whether subscriptions took ``(topic, type)``'s topic, but for another type (counted
        and warned about as a type mismatch already)."""
        return bool(self._local_cache.get(names, _NO_MISMATCH)[1])

    def _local_matches(self, topic: str, topic_type: str) -> tuple[int, ...]:
        key = (topic, topic_type)
        found = self._local_cache.get(key)
        if found is None:
            found = self._match_locally(topic, topic_type)
            if len(self._local_cache) >= _CACHE_ENTRIES:
                self._local_cache.clear()
            self._local_cache[key] = found
        ids, mismatched = found
        if mismatched:
            self.counters["type_mismatches"] += mismatched
        return ids

    def _match_locally(self, topic: str, topic_type: str) -> tuple[tuple[int, ...], int]:
        ids: list[int] = []
        mismatched = 0
        for subscription, entry in self._subscriptions.items():
            if entry.group is not None or not matches(entry.pattern, topic):
                continue  # (a group member gets only the grouped messages given to it)
            if entry.topic_type == topic_type:
                ids.append(subscription)
                continue
            mismatched += 1
            self._warn_once(
                ("type", topic, topic_type, entry.topic_type),
                "a message on %r has type %r; subscription %r wants %r: not delivered",
                topic,
                topic_type,
                entry.pattern,
                entry.topic_type,
            )
        return tuple(ids), mismatched

    def _targets(self, topic: str) -> tuple[EndpointId, ...]:
        if topic[0] == SERVED:  # a served name: only served patterns (see ``serve``)
            found = _responders(self._interest, topic[1:])
        else:
            found = tuple(
                peer
                for peer, interest in self._interest.items()
                if any_matches(interest.patterns, topic)
            )
        if len(self._target_cache) >= _CACHE_ENTRIES:
            self._target_cache.clear()
        self._target_cache[topic] = found
        return found

    def _queue(self, peer: EndpointId, envelope: Outbound, expires_at: float) -> None:
        """Put a message for ``peer`` in the outbox (``take_sends``), counting its bytes."""
        self._outbox_bytes[peer] = self._outbox_bytes.get(peer, 0) + outbound_size(envelope)
        self._outbox.append((peer, envelope, expires_at))

    def _send_optional(self, peer: EndpointId, envelope: Outbound, expires_at: float) -> bool:
        """Queue a message ``peer`` may do without for now (a history replay, an answer to its
        ``ask``) if its send queue has room for it and for what the outbox holds for it already;
        False if not."""
        if not self.room(peer, self._outbox_bytes.get(peer, 0) + outbound_size(envelope)):
            return False
        self._queue(peer, envelope, expires_at)
        return True

    def _send_full(self, peer: EndpointId, *, ask: bool, answer: bool = False) -> bool:
        """Our whole interest to ``peer``; whether it was queued.

        Sent only while the peer's send queue has room when ``answer`` (it asked: it asks again
        while it sees our interest's version is newer than what it holds) or when ``ask`` (we
        ask again at its next announcement, or next delta out of step): a peer could drive either
        as often as it likes, and one that never acknowledges must not make them pile up. Only
        the set sent to a newcomer is sent whatever the queue holds (once per peer added)."""
        patterns, served = _split_served(self._pattern_counts)
        head: dict[str, Any] = {"i": self._version, "set": patterns}
        if served:
            head["sv"] = served
        if self._group_counts:
            head["gset"] = sorted(self._group_counts)
        if ask:
            head["ask"] = True
        envelope = orjson.dumps(head) + b"\n"
        if not answer and not ask:
            self._queue(peer, envelope, float("inf"))
        elif not self._send_optional(peer, envelope, float("inf")):
            what = "answers" if answer else "asks"
            self.counters[f"interest_{what}_not_sent_queue_full"] += 1
            return False
        self.counters["interest_sent"] += 1
        return True

    def _send_delta(self) -> None:
        self._version += 1
        added, serve_added = _split_served(self._added)
        removed, serve_removed = _split_served(self._removed)
        delta: dict[str, Any] = {"i": self._version, "add": added, "del": removed}
        if serve_added or serve_removed:  # (older peers ignore these keys)
            delta["sva"], delta["svd"] = serve_added, serve_removed
        if self._groups_added or self._groups_removed:  # (older peers ignore these keys)
            delta["gadd"] = sorted(self._groups_added)
            delta["gdel"] = sorted(self._groups_removed)
            self._groups_added.clear()
            self._groups_removed.clear()
        head = orjson.dumps(delta)
        self._added.clear()
        self._removed.clear()
        envelope = head + b"\n"
        # Only to peers with room: changes made while one never acknowledges must not pile up
        # for it. One that missed a change sees our newer version in our announcements (or a
        # later change out of step) and asks for the whole set, sent when it has room.
        sent = 0
        for peer in self._peers:
            if self._send_optional(peer, envelope, float("inf")):
                sent += 1
            else:
                self.counters["interest_deltas_not_sent_queue_full"] += 1
        self.counters["interest_sent"] += sent

    def _receive_interest(self, peer: Peer, head: dict[str, Any], now: float) -> None:
        interest = self._interest.get(peer.endpoint_id)
        if interest is None:
            self.counters["interest_from_unknown_peer"] += 1
            return
        try:
            version = head["i"]
            if type(version) is not int:
                raise TypeError("version")
            if "set" in head:
                patterns = _patterns(head["set"]) | _served(head.get("sv"))
                groups = group_pairs(head.get("gset", []), validate_pattern)
                if version < interest.version:
                    self.counters["interest_stale"] += 1
                    return
                new = patterns
            else:
                added, removed = _patterns(head["add"]), _patterns(head["del"])
                groups = (
                    interest.groups - group_pairs(head.get("gdel", []), validate_pattern)
                ) | group_pairs(head.get("gadd", []), validate_pattern)
                if version <= interest.version:
                    self.counters["interest_stale"] += 1  # the whole set we hold includes it
                    return
                if version != interest.version + 1:
                    # Not the next version: we lost track (cannot happen on one stream, but a
                    # resumed stream may deliver older deltas): ask for the whole set once.
                    self.counters["interest_out_of_step"] += 1
                    if not interest.asked and self._send_full(peer.endpoint_id, ask=True):
                        interest.asked = True
                    return
                if "sva" in head or "svd" in head:
                    added |= _served(head.get("sva"))
                    removed |= _served(head.get("svd"))
                new = (interest.patterns - removed) | added
        except (KeyError, TypeError, UsageError):
            self._drop("bad_interest", peer, "a malformed interest message")
            return
        if len(new) > self.config.max_peer_patterns:
            self.counters["interest_patterns_over_limit"] += 1
            self._warn_once(
                ("patterns", peer.endpoint_id),
                "peer %s subscribes to %d patterns; only %d are accepted",
                peer.name,
                len(new),
                self.config.max_peer_patterns,
            )
            new = frozenset(sorted(new)[: self.config.max_peer_patterns])
        if len(groups) > self.config.max_peer_patterns:
            self.counters["interest_patterns_over_limit"] += 1
            groups = frozenset(sorted(groups)[: self.config.max_peer_patterns])
        old_groups, interest.groups = interest.groups, groups
        old = interest.patterns
        interest.patterns = new
        interest.version = version
        interest.asked = False
        self.counters["interest_received"] += 1
        if head.get("ask") is True:
            self._send_full(peer.endpoint_id, ask=False, answer=True)
        if groups != old_groups:
            jobs = self._groups.set_member(peer.endpoint_id, by_group(groups), now)
            self._send_jobs(jobs, now)
        if new != old or groups != old_groups:
            self._target_cache.clear()
            self._replay(peer.endpoint_id, old, new, now)
            self._emit(InterestChanged(peer.endpoint_id))

    def _replay(
        self, peer: EndpointId, old: frozenset[str], new: frozenset[str], now: float
    ) -> None:
        """Send ``peer`` the history of topics its interest now matches and did not before."""
        added = new - old
        if not added:
            return
        for topic, history in self._history.items():
            if not history.entries or not any_matches(added, topic):
                continue
            if any_matches(old, topic):
                continue  # it has been getting this topic all along
            for _, envelope, expires_at, _, refresh in history.entries:
                if refresh:  # retained: sent with its whole time to live again
                    expires_at = now + refresh
                if expires_at > now:  # expired history is never sent
                    if not self._send_optional(peer, envelope, expires_at):
                        self._replay_refused(peer)
                        return
                    self.counters["history_sent"] += 1
        for (topic, publisher), kept in self._kept.items():
            if publisher == peer or not any_matches(added, topic) or any_matches(old, topic):
                continue  # (its own messages, or a topic it has been getting all along)
            for _, envelope, expires_at, _, refresh in kept.entries:
                if refresh:
                    expires_at = now + refresh
                if expires_at > now:
                    if not self._send_optional(peer, envelope, expires_at):
                        self._replay_refused(peer)
                        return
                    self.counters["kept_sent"] += 1

    def _replay_refused(self, peer: EndpointId) -> None:
        self.counters["history_not_sent_queue_full"] += 1
        known = self._peers.get(peer)
        self._warn_once(
            ("replay", peer),
            "history for %s not sent: its send queue is full (it does not acknowledge)",
            f"{known.name} ({peer})" if known is not None else peer,
        )

    def prune_history(self, now: float) -> None:
        """Drop expired history entries (called on timers; expired ones are never sent), and
        the topics left without any. Nothing to scan before the earliest entry expires."""
        self._now = now
        if now >= self._groups.prune_at:
            self._groups.prune(now)
        if now >= self._kept_prune_at:
            self._prune_kept(now)
        if now < self._prune_at:
            return
        earliest = math.inf
        emptied = []
        expired = 0
        for topic, history in self._history.items():
            entries = history.entries
            while entries and entries[0][2] <= now:
                self._history_bytes -= entries.popleft()[3]
                expired += 1
            if entries:
                earliest = min(earliest, entries[0][2])
            else:
                emptied.append(topic)
        for topic in emptied:
            self._rest(topic, self._history.pop(topic))
        self._prune_at = earliest
        if expired:
            self.counters["history_expired"] += expired

    def history_topics(self) -> int:
        """How many topics hold retained messages now (the map timers scan)."""
        return len(self._history)

    def _revive(self, topic: str) -> _History:
        """The history of a topic about to be published: new, or numbering on where it was."""
        history = _History(self.config.history_depth)
        kept = self._dormant.pop(topic, None)
        if kept is None:
            history.sequence = self._sequence_floor
        else:
            history.sequence, history.depth = kept
        return history

    def _rest(self, topic: str, history: _History) -> None:
        """``topic`` holds no history now: keep its numbering only (bounded, oldest forgotten).

        A topic must never number a message again with a sequence it used: subscribers would
        drop it as a duplicate. So one published anew after being forgotten starts above the
        highest sequence ever forgotten.
        """
        dormant = self._dormant
        dormant[topic] = (history.sequence, history.depth)
        if len(dormant) > self.config.max_dormant_topics:
            sequence, _ = dormant.pop(next(iter(dormant)))
            self._sequence_floor = max(self._sequence_floor, sequence)
            self.counters["history_topics_forgotten"] += 1

    def _trim_history(self) -> None:
        limit = self.config.history_max_bytes
        emptied = []
        for topic, history in self._history.items():  # least recently published first
            entries = history.entries
            while entries and self._history_bytes > limit:
                self._history_bytes -= entries.popleft()[3]
                self.counters["history_evicted_for_space"] += 1
            if not entries:
                emptied.append(topic)
            if self._history_bytes <= limit:
                break
        for topic in emptied:
            self._rest(topic, self._history.pop(topic))

    def _drop(self, reason: str, peer: Peer, what: str) -> None:
        self.counters[f"dropped_{reason}"] += 1
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("dropped %s from %s", what, peer.name)

    def _warn_once(self, key: object, message: str, *args: object) -> None:
        warn_once(logger, self._warned, key, message, *args)

    # --- served names (request/reply, glue.requests) ----------------------------------------------

    def serve(self, pattern: str) -> None:
        """Advertise that this endpoint answers requests to names matching ``pattern``: it joins
        our interest, apart from the topic patterns (``sv`` in docs/PROTOCOL.md)."""
        validate_pattern(pattern, "name")
        self._want(SERVED + pattern)

    def unserve(self, pattern: str) -> None:
        """Withdraw one ``serve`` of ``pattern``."""
        if self._pattern_counts.get(SERVED + pattern):
            self._unwant(SERVED + pattern)

    def responders(self, name: str) -> tuple[EndpointId, ...]:
        """The peers that serve a pattern matching the name ``name``."""
        return self.subscribers(SERVED + name)

    def interest_unknown(self) -> bool:
        """Whether a peer announced interest we have not received yet (it may serve a name)."""
        return any(i.announced > i.version for i in self._interest.values())


def _count_in(counts: Counter[K], key: K, added: set[K], removed: set[K]) -> bool:
    """One more user of ``key`` in an interest with pending changes ``added``/``removed``;
    True when it is new (a change to announce, unless it undoes a pending removal)."""
    counts[key] += 1
    if counts[key] != 1:
        return False
    if key in removed:
        removed.discard(key)
    else:
        added.add(key)
    return True


def _count_out(counts: Counter[K], key: K, added: set[K], removed: set[K]) -> bool:
    """One user of ``key`` fewer (see :func:`_count_in`); True when it is gone."""
    counts[key] -= 1
    if counts[key] != 0:
        return False
    del counts[key]
    if key in added:
        added.discard(key)
    else:
        removed.add(key)
    return True


def _retained(raw: object) -> float:
    """The time to live a retained message is sent again with (its ``r``), 0.0 if none (or not
    a number of seconds in (0, one day])."""
    if (type(raw) is float or type(raw) is int) and 0 < raw <= _MAX_RETAIN_S:
        return float(raw)
    return 0.0


def _origin(raw: object) -> tuple[EndpointId, int, str] | None:
    """A kept message's origin, ``[publisher id, incarnation, name]``, or None if malformed."""
    if type(raw) is not list or len(raw) != 3:
        return None
    publisher, incarnation, name = raw
    if (
        type(publisher) is not int
        or not 0 < publisher <= MAX_ID
        or type(incarnation) is not int
        or not 0 <= incarnation <= MAX_ID
        or type(name) is not str
        or not 0 < len(name) <= MAX_NAME_CHARS
    ):
        return None
    return EndpointId(publisher), incarnation, name


def _with_origin(line: bytes, peer: Peer) -> bytes:
    """An envelope line (JSON, no LF) with its publisher ``peer`` as origin, to relay it."""
    origin = orjson.dumps([peer.endpoint_id, peer.incarnation, peer.name])
    return b'%s,"o":%s}' % (line[:-1], origin)


def _split_served(patterns: Iterable[str]) -> tuple[list[str], list[str]]:
    """Topic patterns and served patterns (without their mark), each sorted, for the wire."""
    topics: list[str] = []
    served: list[str] = []
    for pattern in patterns:
        if pattern[0] == SERVED:
            served.append(pattern[1:])
        else:
            topics.append(pattern)
    return sorted(topics), sorted(served)


def _served(raw: object) -> frozenset[str]:
    """Served patterns from the wire (absent: none), marked as such."""
    if raw is None:
        return frozenset()
    return frozenset(SERVED + pattern for pattern in _patterns(raw))


def _responders(interests: dict[EndpointId, _Interest], name: str) -> tuple[EndpointId, ...]:
    return tuple(
        peer
        for peer, interest in interests.items()
        if any(p[0] == SERVED and matches(p[1:], name) for p in interest.patterns)
    )


def _patterns(raw: object) -> frozenset[str]:
    if type(raw) is not list:
        raise TypeError("patterns")
    for pattern in raw:
        validate_pattern(pattern)
    return frozenset(raw)
