"""Work queues: a publisher's share-out of messages among a group's members (sans-IO; see
``docs/work-queues.md`` and ``docs/PROTOCOL.md``, "Work queues").

How this works
--------------
A subscriber that joins a *group* (``subscribe(..., group="workers")``) says so in its interest
(``[group, pattern]`` pairs beside its plain patterns). For each message it publishes, a publisher
picks one live member of each group whose patterns match the topic, and sends the message to that
member only, marked with the group and a *job number* of its own (per publisher incarnation). The
member's callback returns, and the member says the job is *done* (batched); until then the job is
*unfinished* and kept here, with its payload.

:class:`GroupSender` is that publisher's side. State: each group's members (peer id -> its
patterns in the group; this endpoint's own id for local members), each group's patterns (the
union of its members', remembered after the last one left), the unfinished jobs (number ->
:class:`Job`) with a count per (group, member), and per group the jobs *held* because no member
had room.

Rules:
- A member's *credit* is ``window`` less its unfinished jobs from this publisher in that group.
  The member with the most credit gets the job (ties in turn); with none left anywhere, or no
  live member, the job is held, in order, and goes out when credit frees (a done), or a member
  appears, or is dropped when it expires.
- A member removed (expired, left, restarted, or no longer in the group for that topic) gives
  back its unfinished jobs: each goes, flagged *redelivered*, to another member (before anything
  held). A job the member refused (it had no subscription for it any more) likewise.
- A done from anyone but the member that holds the job is stale and ignored (the job went to
  another member meanwhile): at-least-once per group, never exactly-once.
- An unfinished job whose message expired is released (no redelivery after expiry; its done, if
  it comes, is stale).

Bounds: unfinished jobs by ``window`` per (group, member); held jobs by ``hold_bytes`` in all
(beyond it, the oldest held job of the group is dropped, counted, warned about once); groups
remembered by ``max_groups`` (the oldest without members forgotten, with what it held). Outputs:
the jobs to send now (:attr:`Job.member` set), returned by each input method.
"""

from __future__ import annotations

import logging
import math
import re
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Final

import orjson

from glue.errors import UsageTypeError, UsageValueError
from glue.wire import EndpointId

__all__ = [
    "MAX_GROUP_CHARS",
    "GroupSender",
    "GroupsConfig",
    "Job",
    "by_group",
    "group_pairs",
    "job_envelope",
    "validate_group",
]

logger = logging.getLogger(__name__)

MAX_GROUP_CHARS: Final = 128
_GROUP_RE: Final = re.compile(r"[A-Za-z0-9_.:\-]+")
#: What a held job counts for beside its payload (its envelope and bookkeeping), against
#: ``hold_bytes``.
_JOB_OVERHEAD_BYTES: Final = 256


def validate_group(group: object, argument: str = "group") -> str:
    """Return ``group`` if it names a group: 1 to 128 letters, digits and ``_ . : -``.

    Raises:
        UsageTypeError: not a plain ``str``.
        UsageValueError: not a valid group name.
    """
    if type(group) is not str:
        raise UsageTypeError(
            f"{argument} must be a str, not {type(group).__name__}", argument=argument
        )
    if not 0 < len(group) <= MAX_GROUP_CHARS or not _GROUP_RE.fullmatch(group):
        raise UsageValueError(
            f"invalid group name {group!r} ({argument}): expected 1-{MAX_GROUP_CHARS} letters, "
            "digits and _ . : -",
            argument=argument,
        )
    return group


@dataclass(frozen=True, slots=True)
class GroupsConfig:
    """Bounds of a publisher's work queues."""

    #: Jobs one member may have unfinished from this publisher, per group (its full credit).
    window: int = 64
    #: Bytes of jobs held for want of a member with credit, in all groups.
    hold_bytes: int = 64 * 1024 * 1024
    #: Groups remembered (those without members are forgotten first, oldest first).
    max_groups: int = 1024


class Job:
    """One message published to a group: held, or unfinished at ``member``."""

    __slots__ = (
        "expires_at",
        "group",
        "member",
        "number",
        "payload",
        "redelivered",
        "sent_at",
        "sequence",
        "size",
        "topic",
        "topic_type",
    )

    def __init__(
        self,
        number: int,
        group: str,
        topic: str,
        topic_type: str,
        sequence: int,
        sent_at: float,
        payload: bytes,
        expires_at: float,
    ) -> None:
        self.number = number
        self.group = group
        self.topic = topic
        self.topic_type = topic_type
        self.sequence = sequence
        self.sent_at = sent_at  # the publisher's wall clock at publish
        self.payload = payload
        self.expires_at = expires_at  # the runtime's monotonic clock
        self.member: EndpointId | None = None
        self.redelivered = False
        self.size = len(payload) + _JOB_OVERHEAD_BYTES


class GroupSender:
    """A publisher's work queues: member choice, unfinished jobs, redelivery, held jobs."""

    def __init__(
        self,
        config: GroupsConfig,
        counters: Counter[str],
        matches: Callable[[Iterable[str], str], bool],
    ) -> None:
        self.config = config
        self.counters = counters
        self._matches = matches  # any pattern of the first matches the topic (topics.any_matches)
        self._members: dict[str, dict[EndpointId, frozenset[str]]] = {}
        self._patterns: dict[str, frozenset[str]] = {}  # known groups, oldest first
        self._jobs: dict[int, Job] = {}  # unfinished, by number
        self._load: Counter[tuple[str, EndpointId]] = Counter()
        self._held: dict[str, deque[Job]] = {}
        self._held_bytes = 0
        self._next = 0
        self._turn = 0
        self._for_topic: dict[str, tuple[str, ...]] = {}
        self._candidates: dict[tuple[str, str], tuple[EndpointId, ...]] = {}
        self._warned = False
        #: No unfinished or held job expires before this (``prune`` does nothing earlier).
        self.prune_at = math.inf
        #: Whether a job of ``size`` bytes fits in the send queue to a member now (the
        #: transport's, set by the stack; it says when room frees, and ``retry`` runs): a member
        #: whose queue is full gets nothing more, however much credit it has, so a peer that
        #: joins many groups and never acknowledges cannot make jobs pile up for it.
        self.room: Callable[[EndpointId, int], bool] = lambda member, size: True

    @property
    def known(self) -> bool:
        """Whether any group is known (else ``publish`` has nothing to do)."""
        return bool(self._patterns)

    def idle(self) -> bool:
        """Whether no job is unfinished or held."""
        return not self._jobs and not self._held

    def unfinished(self) -> int:
        """Jobs sent to members and not done."""
        return len(self._jobs)

    def held(self) -> int:
        """Jobs held for want of a member with credit."""
        return sum(len(queue) for queue in self._held.values())

    def held_bytes(self) -> int:
        """Payload bytes of the jobs held (at most ``config.hold_bytes``)."""
        return self._held_bytes

    def members(self, group: str, topic: str) -> tuple[EndpointId, ...]:
        """The live members of ``group`` whose patterns match ``topic``."""
        return self._members_for(group, topic)

    def groups(self, topic: str) -> tuple[str, ...]:
        """The known groups whose patterns match ``topic``."""
        found = self._for_topic.get(topic)
        if found is None:
            found = tuple(g for g, p in self._patterns.items() if self._matches(p, topic))
            if len(self._for_topic) >= 65536:
                self._for_topic.clear()
            self._for_topic[topic] = found
        return found

    # --- inputs ---------------------------------------------------------------------------------

    def publish(
        self,
        topic: str,
        topic_type: str,
        sequence: int,
        sent_at: float,
        payload: bytes,
        expires_at: float,
    ) -> list[Job]:
        """A message published on ``topic``: one job per group that takes it; those to send now."""
        out: list[Job] = []
        for group in self.groups(topic):
            self._next += 1
            job = Job(self._next, group, topic, topic_type, sequence, sent_at, payload, expires_at)
            self.prune_at = min(self.prune_at, expires_at)
            member = None if self._held.get(group) else self._choose(group, topic, job.size)
            if member is None:
                self._hold(job, last=True)
            else:
                self._assign(job, member)
                out.append(job)
        return out

    def set_member(
        self, member: EndpointId, groups: Mapping[str, frozenset[str]], now: float
    ) -> list[Job]:
        """``member``'s groups and patterns are now ``groups`` (empty: it was removed). Its
        unfinished jobs it no longer takes go to others; returns the jobs to send now."""
        touched: set[str] = set()
        for group, members in list(self._members.items()):
            if member in members and groups.get(group) != members[member]:
                del members[member]
                touched.add(group)
                if not members:
                    del self._members[group]
        for group, patterns in groups.items():
            if patterns and self._members.get(group, {}).get(member) != patterns:
                self._members.setdefault(group, {})[member] = patterns
                touched.add(group)
        if not touched:
            return []
        for group in touched:
            patterns_of = self._members.get(group)
            if patterns_of:  # (one left without members keeps its patterns: jobs wait for members)
                self._patterns.pop(group, None)  # (now the most recently changed)
                self._patterns[group] = frozenset().union(*patterns_of.values())
        self._forget_groups()
        self._for_topic.clear()
        self._candidates.clear()
        back = [
            job
            for job in self._jobs.values()
            if job.member == member
            and not self._matches(groups.get(job.group, frozenset()), job.topic)
        ]
        self._give_back(back, "group_redelivered_member_removed")
        for group in touched:
            if member not in self._members.get(group, {}):
                self._load.pop((group, member), None)
        return self._dispatch(touched, now)

    def done(self, member: EndpointId, numbers: Iterable[int], now: float) -> list[Job]:
        """``member`` finished jobs ``numbers``: their credit frees; returns jobs to send now."""
        touched: set[str] = set()
        jobs = self._jobs
        for number in numbers:
            job = jobs.get(number)
            if job is None or job.member != member:
                self.counters["group_done_stale"] += 1
                continue
            del jobs[number]
            self._load[(job.group, member)] -= 1
            touched.add(job.group)
            self.counters["group_done"] += 1
        return self._dispatch(touched, now) if touched else []

    def refused(self, member: EndpointId, numbers: Iterable[int], now: float) -> list[Job]:
        """``member`` had no subscription for jobs ``numbers`` (it left the group meanwhile):
        they go to others; returns the jobs to send now."""
        back = [
            job
            for number in dict.fromkeys(numbers)  # each once, however often it is named
            if (job := self._jobs.get(number)) is not None and job.member == member
        ]
        self.counters["group_refused"] += len(back)
        self._give_back(back, "group_redelivered_refused")
        return self._dispatch({job.group for job in back}, now)

    def retry(self, now: float) -> list[Job]:
        """Room freed in a member's send queue: held jobs that can go now."""
        return self._dispatch(list(self._held), now) if self._held else []

    def prune(self, now: float) -> None:
        """Release unfinished jobs and drop held ones whose message expired (on timers)."""
        if now < self.prune_at:
            return
        earliest = math.inf
        for number, job in list(self._jobs.items()):
            if job.expires_at <= now:
                del self._jobs[number]
                assert job.member is not None
                self._load[(job.group, job.member)] -= 1
                self.counters["group_unfinished_expired"] += 1
            else:
                earliest = min(earliest, job.expires_at)
        for group, queue in list(self._held.items()):
            kept: deque[Job] = deque()
            for job in queue:
                if job.expires_at <= now:
                    self._held_bytes -= job.size
                    self.counters["group_held_expired"] += 1
                else:
                    kept.append(job)
                    earliest = min(earliest, job.expires_at)
            if kept:
                self._held[group] = kept
            else:
                del self._held[group]
        self.prune_at = earliest

    # --- internals ------------------------------------------------------------------------------

    def _members_for(self, group: str, topic: str) -> tuple[EndpointId, ...]:
        key = (group, topic)
        found = self._candidates.get(key)
        if found is None:
            members = self._members.get(group, {})
            found = tuple(m for m, patterns in members.items() if self._matches(patterns, topic))
            if len(self._candidates) >= 65536:
                self._candidates.clear()
            self._candidates[key] = found
        return found

    def _choose(self, group: str, topic: str, size: int) -> EndpointId | None:
        """The member of ``group`` taking ``topic`` with the most credit (ties in turn) and room
        for ``size`` bytes in its send queue."""
        candidates = self._members_for(group, topic)
        count = len(candidates)
        if not count:
            return None
        load = self._load
        window = self.config.window
        start = self._turn % count
        self._turn += 1
        best: EndpointId | None = None
        best_room = 0
        for index in range(count):
            member = candidates[(start + index) % count]
            room = window - load[(group, member)]
            if room > best_room and self.room(member, size):
                best, best_room = member, room
        return best

    def _assign(self, job: Job, member: EndpointId) -> None:
        job.member = member
        self._jobs[job.number] = job
        self._load[(job.group, member)] += 1
        self.counters["group_sent"] += 1
        if job.redelivered:
            self.counters["group_redelivered"] += 1

    def _give_back(self, jobs: list[Job], reason: str) -> None:
        """Unfinished ``jobs`` (in number order) go back to the front of their groups' queues."""
        for job in reversed(jobs):
            del self._jobs[job.number]
            assert job.member is not None
            self._load[(job.group, job.member)] -= 1
            job.member = None
            job.redelivered = True
            self._hold(job, last=False)
        if jobs:
            self.counters[reason] += len(jobs)

    def _hold(self, job: Job, *, last: bool) -> None:
        queue = self._held.get(job.group)
        if queue is None:
            queue = self._held[job.group] = deque()
        if last:
            queue.append(job)
        else:
            queue.appendleft(job)
        self._held_bytes += job.size
        self.counters["group_held"] += 1
        while self._held_bytes > self.config.hold_bytes and queue:
            dropped = queue.popleft()
            self._held_bytes -= dropped.size
            self.counters["group_dropped_over_limit"] += 1
            self._warn_dropped(dropped)
        if not queue:
            del self._held[job.group]

    def _dispatch(self, groups: Iterable[str], now: float) -> list[Job]:
        """Send held jobs of ``groups`` to members with credit, oldest first."""
        out: list[Job] = []
        for group in groups:
            queue = self._held.get(group, deque())
            if not queue:
                continue
            skipped: list[Job] = []
            while queue:
                job = queue[0]
                if job.expires_at <= now:
                    queue.popleft()
                    self._held_bytes -= job.size
                    self.counters["group_held_expired"] += 1
                    continue
                member = self._choose(group, job.topic, job.size)
                if member is None:
                    if not self._has_credit(group, job.size):
                        break
                    skipped.append(queue.popleft())  # no member for its topic has credit
                    continue
                queue.popleft()
                self._held_bytes -= job.size
                self._assign(job, member)
                out.append(job)
            queue.extendleft(reversed(skipped))
            if not queue:
                del self._held[group]
        return out

    def _has_credit(self, group: str, size: int) -> bool:
        """Whether any member of ``group`` (for any topic) could take a job of ``size`` now."""
        window, load, room = self.config.window, self._load, self.room
        return any(
            load[(group, m)] < window and room(m, size) for m in self._members.get(group, {})
        )

    def _forget_groups(self) -> None:
        """Within ``max_groups``: forget the oldest groups without members, and what they held."""
        excess = len(self._patterns) - self.config.max_groups
        for group in list(self._patterns):
            if excess <= 0:
                break
            if group in self._members:
                continue
            del self._patterns[group]
            for job in self._held.pop(group, ()):
                self._held_bytes -= job.size
                self.counters["group_dropped_forgotten"] += 1
            excess -= 1

    def _warn_dropped(self, job: Job) -> None:
        if self._warned:
            logger.debug("held job %d of group %r dropped (over the bound)", job.number, job.group)
            return
        self._warned = True
        logger.warning(
            "messages for group %r wait for a member with room beyond GLUE_GROUP_HOLD_BYTES "
            "(%d bytes): the oldest are dropped (topics_group_dropped_over_limit counts them)",
            job.group,
            self.config.hold_bytes,
        )


def job_envelope(job: Job, apart_bytes: int) -> bytes | tuple[bytes, bytes]:
    """The message a member gets for ``job``: a topic envelope with ``g`` (its group), ``j``
    (its number) and, when it went to another member first, ``rd``; then the payload (kept
    apart when larger than ``apart_bytes``, as ``topics.Outbound``)."""
    head: dict[str, object] = {
        "t": job.topic,
        "y": job.topic_type,
        "s": job.sequence,
        "w": job.sent_at,
        "g": job.group,
        "j": job.number,
    }
    if job.redelivered:
        head["rd"] = True
    line = orjson.dumps(head) + b"\n"
    if len(job.payload) > apart_bytes:
        return (line, job.payload)
    return line + job.payload


def group_pairs(raw: object, validate_pattern: Callable[[str], str]) -> frozenset[tuple[str, str]]:
    """``[[group, pattern], ...]`` from an interest message, checked.

    Raises:
        TypeError: not a list of pairs.
        UsageError: a group or pattern is not valid.
    """
    if type(raw) is not list:
        raise TypeError("groups")
    pairs = []
    for pair in raw:
        if type(pair) is not list or len(pair) != 2:
            raise TypeError("group pair")
        group, pattern = pair
        pairs.append((validate_group(group), validate_pattern(pattern)))
    return frozenset(pairs)


def by_group(pairs: Iterable[tuple[str, str]]) -> dict[str, frozenset[str]]:
    """``(group, pattern)`` pairs as group -> patterns."""
    found: dict[str, set[str]] = {}
    for group, pattern in pairs:
        found.setdefault(group, set()).add(pattern)
    return {group: frozenset(patterns) for group, patterns in found.items()}
