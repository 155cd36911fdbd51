"""Model sync: one replicated CRDT document per name, kept in step over topics (sans-IO; see
``docs/model.md`` and ``docs/PROTOCOL.md``, "Models").

How this layer works
--------------------
A model is a ``pycrdt.Doc`` (Yjs semantics, through Yrs) whose root is the map ``root``. Every
endpoint that opens model ``NAME`` subscribes to three topics of type ``glue.model``:

- ``_model/update/NAME``: each local transaction's update (Yjs update v1), to every holder;
- ``_model/state/NAME``: announcements of this replica's state (its state vector and a digest
  of its delete set), published at open and every ``announce_s``, kept as the topic's history
  (depth 1), so a holder that appears later, or comes back from a partition, receives the
  latest one at once (the topics layer replays history when interest grows);
- ``_model/to/ID/NAME``: this endpoint's inbox (``ID`` its endpoint id): pulls and replies.

Every replica is responsible for its own completeness (pull only): on a holder's announcement
it sends a *pull* (its own state vector: Yjs sync step 1) to that holder's inbox until one pull
to it was answered since it appeared, when the holder's state vector shows something it lacks,
or when their delete-set digests differ (deletions do not move state vectors); the holder
answers with a *reply*, ``doc.get_update(state_vector)`` (sync step 2): what the puller lacks
and the whole delete set. One pull is awaited at a time; the others wait for its reply (for 2
announcement periods at most) and then carry the state it brought, so a newcomer meeting n
holders receives the document once.
Updates merge with Yjs semantics in any order and any number of times, so loss, duplication and
reordering only delay convergence; the periodic announcements repair whatever a removed peer or
an expired message missed.

State: the document; per holder (by endpoint id) whether we met it, the pull awaiting an
answer (its number and when it times out) and whether one was answered since it appeared
(*synced*); local updates not yet sent. Inputs: ``receive`` (a message from a holder),
``peer_removed``, ``set_holders`` (who holds the model now, when the runtime knows),
``handle_timer`` and local transactions, seen through the document's observers. Outputs:
``messages_to_send`` (topic messages), ``next_event`` (a :class:`ModelChange` per transaction,
local or remote), ``next_deadline`` (the next announcement or pull timeout).

Bounds: local updates waiting are merged into messages of at most ``max_update_bytes`` each;
one pull awaited at a time; changes waiting are at most ``max_changes`` (the oldest are
dropped and counted); holders remembered at most ``max_holders``. A malformed message (or one
pycrdt refuses) is dropped, counted and logged at debug.

Threads: this class is not thread-safe; its runtime (``glue.model``) calls it under one lock,
and the document must be edited under the same lock (``Model.transaction()``).
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final, Literal

import orjson
import pycrdt

from glue.errors import UsageValueError
from glue.topics import validate_topic_name

__all__ = [
    "MAX_MODEL_NAME_CHARS",
    "ROOT",
    "TOPIC_TYPE",
    "ModelChange",
    "ModelConfig",
    "ModelSync",
    "Outgoing",
    "decode_state_vector",
    "inbox_topic",
    "state_topic",
    "update_topic",
    "validate_model_name",
]

logger = logging.getLogger(__name__)

#: The type of every model message.
TOPIC_TYPE: Final = "glue.model"
#: The name of the document's root map.
ROOT: Final = "root"
#: Room left in a topic name (256 characters) for ``_model/to/<endpoint id>/``.
MAX_MODEL_NAME_CHARS: Final = 200
_EMPTY_UPDATE: Final = b"\x00\x00"
_MAX_STATE_CLIENTS: Final = 1_000_000

Kind = Literal["update", "announce", "pull", "reply"]
_KINDS: Final[dict[str, Kind]] = {"u": "update", "a": "announce", "p": "pull", "r": "reply"}


def validate_model_name(name: str) -> str:
    """Return ``name`` if it can name a model: a topic name of at most 200 characters.

    Raises:
        UsageTypeError, UsageValueError: it cannot.
    """
    validate_topic_name(name, "name")
    if len(name) > MAX_MODEL_NAME_CHARS:
        raise UsageValueError(
            f"model name of {len(name)} characters: at most {MAX_MODEL_NAME_CHARS}",
            argument="name",
        )
    return name


def state_topic(name: str) -> str:
    """The topic of model ``name``'s state announcements."""
    return f"_model/state/{name}"


def update_topic(name: str) -> str:
    """The topic of model ``name``'s updates."""
    return f"_model/update/{name}"


def inbox_topic(name: str, endpoint_id: int) -> str:
    """The topic of endpoint ``endpoint_id``'s pulls and replies for model ``name``."""
    return f"_model/to/{endpoint_id}/{name}"


def decode_state_vector(data: bytes) -> dict[int, int]:
    """A Yjs state vector (v1: a count, then (client, clock) pairs, all varuints) as a dict.

    Raises:
        ValueError: ``data`` is not one, or has trailing bytes.
    """
    position = 0

    def varuint() -> int:
        nonlocal position
        value = shift = 0
        while True:
            if position >= len(data) or shift > 63:
                raise ValueError("truncated or oversized varuint")
            byte = data[position]
            position += 1
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                return value
            shift += 7

    count = varuint()
    if count > _MAX_STATE_CLIENTS or count * 2 > len(data):
        raise ValueError(f"state vector claims {count} clients")
    state = {}
    for _ in range(count):
        client = varuint()
        state[client] = varuint()
    if position != len(data):
        raise ValueError("trailing bytes after the state vector")
    return state


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Timers and bounds of one model."""

    #: Seconds between state announcements (the runtimes use the discovery period).
    announce_s: float = 1.0
    #: Seconds a pull waits for its reply before another may be sent to that holder.
    pull_timeout_s: float = 30.0
    #: Expiry of updates, pulls and replies (announcements expire after 3 ``announce_s``).
    expiry_s: float = 60.0
    #: Local updates waiting to be sent are merged into messages of at most this size.
    max_update_bytes: int = 1024 * 1024
    #: Changes waiting for ``next_event``; beyond, the oldest are dropped and counted.
    max_changes: int = 100_000
    #: Holders remembered (met, pulls); beyond, the least recently heard is forgotten.
    max_holders: int = 10_000


@dataclass(frozen=True, slots=True)
class ModelChange:
    """One transaction applied to a model: made here (``local``) or received from a peer.

    ``keys`` are the keys of the root map that changed, directly or inside (sorted; None in the
    rare case pycrdt could not tell, counted as ``change_keys_unknown``);
    ``source_id`` is the endpoint id of the peer whose message brought it (this endpoint's
    own for a local change); ``update`` is the transaction as a Yjs update (v1), which
    ``pycrdt.Doc.apply_update`` accepts (to persist a model, say).
    """

    local: bool
    source_id: int
    keys: tuple[str, ...] | None
    update: bytes


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A message to publish on ``topic`` (type :data:`TOPIC_TYPE`): kept as the topic's history
    (depth 1) when ``retain``, else not (depth 0); it expires after ``expiry_s``."""

    topic: str
    payload: bytes
    retain: bool
    expiry_s: float


class _Holder:
    __slots__ = ("met", "pull", "pull_at", "pull_until", "synced")

    def __init__(self) -> None:
        self.met = False
        self.pull = 0  # the number of the pull awaiting a reply, 0 if none
        self.pull_at = 0.0
        self.pull_until = 0.0
        self.synced = False


class ModelSync:
    """The sync state machine of one model on one endpoint."""

    def __init__(
        self,
        name: str,
        *,
        endpoint_id: int,
        doc: pycrdt.Doc[Any],
        config: ModelConfig,
        now: float,
        rng: random.Random | None = None,
    ) -> None:
        self.name = validate_model_name(name)
        self.endpoint_id = endpoint_id
        self.config = config
        self.doc = doc
        self.root: pycrdt.Map[Any] = doc.get(ROOT, type=pycrdt.Map)
        self.counters: Counter[str] = Counter()
        self.state_topic = state_topic(name)
        self.update_topic = update_topic(name)
        self.inbox = inbox_topic(name, endpoint_id)
        self._holders: dict[int, _Holder] = {}
        self._deferred: dict[int, None] = {}  # holders to pull from once the awaited reply came
        # Pull numbers start at random: a reply replayed from history (by a keeper) to a
        # restarted endpoint with the same id must not answer one of its new pulls.
        self._pulls = rng.getrandbits(31) if rng is not None else 0
        self._present: frozenset[int] | None = None  # holders discovered now, if known
        self._local: list[bytes] = []
        self._out: list[Outgoing] = []
        self._changes: deque[ModelChange] = deque()
        self._keys: set[str] = set()
        self._source = 0  # the peer whose update is being applied; 0: a local transaction
        self._announce_at = now
        self._closed = False
        self._keys_unknown = False
        self._cached: tuple[bytes, dict[int, int], str] | None = None
        self._doc_subscription = doc.observe(self._on_update)
        # Yrs's own events, not pycrdt's wrapper of them: the wrapper converts every event in
        # full (old and new values, deltas) and lets a panic of Yrs while doing so (seen when a
        # root key's previous value is gone) unwind through the commit.
        self._deep_subscription = self.root.integrated.observe_deep(self._on_deep)
        self.handle_timer(now=now)  # the first announcement, at once

    # --- inputs ---------------------------------------------------------------------------------

    def receive(self, topic: str, source_id: int, payload: bytes, *, now: float) -> None:
        """Take one message a holder published on one of this model's topics."""
        if source_id == self.endpoint_id:
            return  # our own, delivered locally: nothing to learn
        end = payload.find(b"\n")
        try:
            head = orjson.loads(payload[:end]) if end > 0 else None
        except orjson.JSONDecodeError:
            head = None
        kind = _KINDS.get(str(head.get("k"))) if type(head) is dict else None
        if kind is None or head is None:
            self._drop("bad_header", source_id, "a model message without a valid header")
            return
        body = payload[end + 1 :]
        self.counters[f"received_{kind}"] += 1
        expected = {
            "update": self.update_topic,
            "announce": self.state_topic,
            "pull": self.inbox,
            "reply": self.inbox,
        }[kind]
        if topic != expected:
            self._drop("wrong_topic", source_id, f"a model {kind} on {topic!r}")
        elif kind == "update":
            self._apply(body, source_id)
        elif kind == "announce":
            self._announced(source_id, head, body, now)
        elif kind == "pull":
            self._answer(source_id, head, body)
        else:
            self._replied(source_id, head, body, now)

    def set_holders(self, holders: Iterable[int]) -> None:
        """The peers that hold the model now (subscribed to its state topic): an announcement
        from anyone else (replayed from history by a keeper, its publisher gone) is ignored."""
        self._present = frozenset(holders)

    def peer_removed(self, peer_id: int) -> None:
        """``peer_id`` went away (or restarted): meet it again when it is back."""
        self._holders.pop(peer_id, None)
        self._deferred.pop(peer_id, None)

    def handle_timer(self, *, now: float) -> None:
        """Announce our state when due; let pulls that timed out be sent again."""
        if self._closed:
            return
        for holder in self._holders.values():
            if holder.pull and holder.pull_until <= now:
                holder.pull = 0
                self.counters["pulls_timed_out"] += 1
        self._pull_deferred(now)
        if now >= self._announce_at:
            self._announce_at = now + self.config.announce_s
            state, _, digest = self._summary()
            head = orjson.dumps({"k": "a", "d": digest})
            self._out.append(
                Outgoing(self.state_topic, head + b"\n" + state, True, 3 * self.config.announce_s)
            )
            self.counters["announced"] += 1

    def close(self) -> None:
        """Stop observing the document; nothing more goes out."""
        if self._closed:
            return
        self._closed = True
        self.doc.unobserve(self._doc_subscription)
        self._deep_subscription.drop()

    # --- outputs --------------------------------------------------------------------------------

    def messages_to_send(self) -> list[Outgoing]:
        """Messages to publish (local updates merged, up to ``max_update_bytes`` each)."""
        if self._local:
            self._flush_local()
        out, self._out = self._out, []
        return out

    def next_event(self) -> ModelChange | None:
        """The next change (local or remote), None when there is none."""
        return self._changes.popleft() if self._changes else None

    def next_deadline(self) -> float | None:
        """When :meth:`handle_timer` wants to be called."""
        if self._closed:
            return None
        pulls = [h.pull_until for h in self._holders.values() if h.pull]
        return min(self._announce_at, *pulls) if pulls else self._announce_at

    # --- queries --------------------------------------------------------------------------------

    def digest(self) -> str:
        """A digest of the delete set (what state vectors do not show), 16 hex digits."""
        return self._summary()[2]

    def _summary(self) -> tuple[bytes, dict[int, int], str]:
        """The state vector, decoded, and the delete-set digest: computed once per change of
        the document (every announcement received compares them)."""
        if self._cached is None:
            state = self.doc.get_state()
            deletions = self.doc.get_update(state)
            digest = hashlib.blake2b(deletions, digest_size=8).hexdigest()
            self._cached = (state, decode_state_vector(state), digest)
        return self._cached

    def unsynced(self, holders: Iterable[int]) -> list[int]:
        """Those of ``holders`` (and of the holders heard from) not synced with since they
        appeared: no reply to one of our pulls arrived from them yet."""
        known = self._holders
        wanted = set(holders) | {peer for peer, holder in known.items() if holder.met}
        wanted.discard(self.endpoint_id)
        return sorted(p for p in wanted if p not in known or not known[p].synced)

    def met(self) -> set[int]:
        """The holders heard from (an announcement) since they appeared."""
        return {peer for peer, holder in self._holders.items() if holder.met}

    def synced(self) -> list[int]:
        """The holders synced with since they appeared, sorted."""
        return sorted(peer for peer, holder in self._holders.items() if holder.synced)

    @property
    def applying(self) -> bool:
        """Whether a peer's update is being applied now (the document's observers are called
        for it): a transaction seen now is not a local edit."""
        return bool(self._source)

    def has_work(self) -> bool:
        """Whether messages or changes are waiting."""
        return bool(self._out or self._local or self._changes)

    # --- internals ------------------------------------------------------------------------------

    def _announced(self, peer: int, head: dict[str, Any], body: bytes, now: float) -> None:
        digest = head.get("d")
        try:
            if type(digest) is not str:
                raise ValueError("no digest")
            theirs = decode_state_vector(body)
        except ValueError as exc:
            self._drop("bad_announce", peer, f"a malformed announcement ({exc})")
            return
        if self._present is not None and peer not in self._present:
            self.counters["announcements_from_absent_holders"] += 1
            return  # nobody to pull from: its pulls would wait for a reply that never comes
        holder = self._holder(peer)
        if holder.pull:
            return  # a reply is on its way; the next announcement tells what is left
        _, ours, our_digest = self._summary()
        lacking = any(clock > ours.get(client, 0) for client, clock in theirs.items())
        if holder.synced and not lacking and digest == our_digest:
            return  # in step (a first pull, or one that timed out, goes out regardless)
        holder.met = True
        if self._awaiting(now):
            # One pull at a time: the next one, sent with the state its reply brought, asks
            # only for what is still missing (a newcomer meeting n holders at once would
            # otherwise receive the whole document n times).
            self._deferred[peer] = None
            return
        self._pull(peer, holder, now)

    def _awaiting(self, now: float) -> bool:
        """Whether a pull awaits its reply, sent less than 2 announcement periods ago: one
        overdue (its holder unreachable one way, say) holds up no other pull longer."""
        patience = 2 * self.config.announce_s
        return any(h.pull and now < h.pull_at + patience for h in self._holders.values())

    def _pull(self, peer: int, holder: _Holder, now: float) -> None:
        self._deferred.pop(peer, None)
        self._pulls += 1
        holder.pull = self._pulls
        holder.pull_at = now
        holder.pull_until = now + self.config.pull_timeout_s
        head = orjson.dumps({"k": "p", "n": self._pulls})
        state = self._summary()[0]
        self._out.append(
            Outgoing(inbox_topic(self.name, peer), head + b"\n" + state, False, self._expiry)
        )
        self.counters["pulls_sent"] += 1

    def _pull_deferred(self, now: float) -> None:
        """Send the next deferred pull, if no pull is awaited."""
        while self._deferred and not self._awaiting(now):
            peer = next(iter(self._deferred))
            holder = self._holders.get(peer)
            if holder is None:
                del self._deferred[peer]
            else:
                self._pull(peer, holder, now)

    def _answer(self, peer: int, head: dict[str, Any], body: bytes) -> None:
        number = head.get("n")
        try:
            if type(number) is not int:
                raise ValueError("no pull number")
            decode_state_vector(body)
            update = self.doc.get_update(body)
        except ValueError as exc:
            self._drop("bad_pull", peer, f"a malformed pull ({exc})")
            return
        reply = orjson.dumps({"k": "r", "n": number}) + b"\n" + update
        self._out.append(Outgoing(inbox_topic(self.name, peer), reply, False, self._expiry))
        self.counters["replies_sent"] += 1
        self.counters["reply_bytes"] += len(update)

    def _replied(self, peer: int, head: dict[str, Any], body: bytes, now: float) -> None:
        number = head.get("n")
        if type(number) is not int:
            self._drop("bad_reply", peer, "a reply without a pull number")
            return
        if not self._apply(body, peer):
            return
        self.counters["reply_bytes_received"] += len(body)
        holder = self._holders.get(peer)
        if holder is not None and holder.pull and number == holder.pull:
            holder.pull = 0
            holder.synced = True
            self._pull_deferred(now)

    def _apply(self, update: bytes, peer: int) -> bool:
        self._source = peer
        try:
            self.doc.apply_update(update)
        except BaseException as exc:  # pyo3's PanicException derives from BaseException
            if not isinstance(exc, Exception) and type(exc).__name__ != "PanicException":
                raise
            self._drop("bad_update", peer, f"an update pycrdt refused ({exc})")
            return False
        finally:
            self._source = 0
            self._keys.clear()
            self._keys_unknown = False
            self._cached = None  # (also when nothing was integrated: pending structs count)
        self.counters["updates_applied"] += 1
        return True

    def _on_deep(self, events: list[Any]) -> None:
        """Root observer (during a commit, before :meth:`_on_update`): which keys changed."""
        for event in events:
            try:
                path = event.path
                if path:
                    self._keys.add(str(path[0]))
                elif hasattr(event, "keys"):
                    self._keys.update(event.keys)
            except BaseException as exc:  # a PanicException of Yrs: never into the commit
                if isinstance(exc, KeyboardInterrupt | SystemExit):
                    raise
                self._keys_unknown = True
                self.counters["change_keys_unknown"] += 1
                logger.debug("model %s: which keys changed is unknown: %r", self.name, exc)

    def _on_update(self, event: pycrdt.TransactionEvent) -> None:
        """Document observer (during a commit): a transaction changed the document."""
        update = event.update
        if update == _EMPTY_UPDATE or self._closed:
            return
        self._cached = None
        keys = None if self._keys_unknown else tuple(sorted(self._keys))
        self._keys.clear()
        self._keys_unknown = False
        source = self._source
        if not source:
            self._local.append(update)
            self.counters["local_transactions"] += 1
        if len(self._changes) >= self.config.max_changes:
            self._changes.popleft()
            self.counters["changes_dropped"] += 1
        self._changes.append(ModelChange(not source, source or self.endpoint_id, keys, update))

    def _flush_local(self) -> None:
        """Queue the local updates as few messages as ``max_update_bytes`` allows."""
        limit = self.config.max_update_bytes
        batch: list[bytes] = []
        size = 0
        for update in self._local:
            if batch and size + len(update) > limit:
                self._send_update(batch)
                batch, size = [], 0
            batch.append(update)
            size += len(update)
        if batch:
            self._send_update(batch)
        self._local.clear()

    def _send_update(self, updates: list[bytes]) -> None:
        merged = updates[0] if len(updates) == 1 else pycrdt.merge_updates(*updates)
        self._out.append(Outgoing(self.update_topic, b'{"k":"u"}\n' + merged, False, self._expiry))
        self.counters["updates_sent"] += 1
        self.counters["update_bytes"] += len(merged)

    def _holder(self, peer: int) -> _Holder:
        holder = self._holders.pop(peer, None)
        if holder is None:
            holder = _Holder()
            if len(self._holders) >= self.config.max_holders:
                del self._holders[next(iter(self._holders))]
                self.counters["holders_forgotten"] += 1
        self._holders[peer] = holder  # now the most recently heard
        return holder

    @property
    def _expiry(self) -> float:
        return self.config.expiry_s

    def _drop(self, reason: str, peer: int, what: str) -> None:
        self.counters[f"dropped_{reason}"] += 1
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("model %s: dropped %s from %d", self.name, what, peer)
