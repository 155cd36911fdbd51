"""Discovery: who is out there, at which address (sans-IO; see ``docs/PROTOCOL.md``).

How this layer works
--------------------
State: this endpoint's identity, the announcement targets the runtime resolved (each flagged
*ask* when it is a unicast rendezvous rather than a multicast/broadcast group), and a table of
peers, each with the time it was last heard and the time it was last heard *on multicast*.

Inputs: ``receive(frame, header, source, multicast=..., now=...)`` for every ``Announce`` or
``Goodbye`` the runtime decoded; ``set_targets`` whenever DNS was resolved again; ``handle_timer``
when ``next_deadline`` passes; ``leave`` on a clean stop.

Outputs (pulled after each burst of inputs): ``frames_to_send`` (announcements and goodbyes with
their destination), ``next_event`` (``PeerAdded``/``PeerRemoved``), ``next_deadline``.

Rules:
- Announce at once, then every period (jittered 0.9..1.0 x rate so endpoints do not synchronise),
  to every target; also directly to every peer not heard on multicast lately, so peers that met
  through a rendezvous keep each other alive when the rendezvous goes away (peer-set sharing).
- A peer expires after its announced rate x our multiplier of silence (``touch`` says a transport
  datagram from it arrived, which counts as hearing it); a ``Goodbye`` removes it at
  once; a higher incarnation of a known id from the same host replaces the old entry at once
  ("restarted"), from another host only once the old one is gone; a lower one is stale and
  ignored.
- A newcomer gets our announcement at once, by unicast, so two endpoints meet in one round trip.
- An announcement with ``ask`` (sent to us as a unicast target) is answered with our own
  announcement (advertising the slower of our rate and the asker's, since the asker hears it at its
  own pace) plus every peer we know, forwarded with the age of our knowledge of it. A forwarded
  frame is never answered and never relayed as such; what it taught us may appear in our own later
  answers, still with its true age, so knowledge cannot outlive the peer. Answers to one asker are
  rate-limited to one per half period.
- A different endpoint using our name or a known peer's name is added all the same, with one
  warning (the Go reference ignores it: then a squatter could lock the rightful owner out);
  another endpoint claiming our own id is ignored with a warning.

Bounds: at most ``max_peers`` peers. A peer is *proven* once it acknowledged something we sent
it (``prove``, from the stack); when the table is full a newcomer takes the place of the unproven
peer added first, and is counted and dropped only when every peer is proven. The sets
used to log warnings once are bounded too. The layer never reads the clock: ``now`` comes from
the runtime.
"""

from __future__ import annotations

import logging
import random
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Final

from glue.errors import warn_once
from glue.events import Peer, PeerAdded, PeerEvent, PeerRemoved, RemovalReason
from glue.wire import MAX_AGE_MS, Announce, EndpointId, Frame, Goodbye, Header

__all__ = ["Address", "Discovery", "DiscoveryConfig", "Target"]

logger = logging.getLogger(__name__)

Address = tuple[str, int]
#: A place to announce to, and whether announcements sent there ask for an answer (unicast).
Target = tuple[Address, bool]

#: The largest incarnation an endpoint makes before 2100 (milliseconds since the epoch x 1000
#: plus less than 1000; see glue.endpoint); larger ones are refused as forged.
MAX_INCARNATION: Final = 4_102_444_800_000 * 1000 + 999
#: Announced rates are taken up to max(10 x our rate, this) (see Discovery._rate_s).
_MAX_RATE_FLOOR_S: Final = 60.0
_JITTER: Final = 0.1


@dataclass(frozen=True, slots=True)
class DiscoveryConfig:
    """What discovery needs to know about this endpoint."""

    endpoint_id: EndpointId
    incarnation: int
    name: str
    port: int
    host: str = ""
    rate_s: float = 1.0
    multiplier: float = 2.0
    max_peers: int = 1000
    announce: bool = True


class _PeerState:
    __slots__ = ("answered_at", "heard_at", "multicast_at", "peer", "proven")

    def __init__(self, peer: Peer, heard_at: float) -> None:
        self.peer = peer
        self.heard_at = heard_at
        self.multicast_at = float("-inf")
        self.answered_at = float("-inf")
        # Whether it answered something we sent it, from its address (an ack: see ``prove``).
        # Until then it holds its place in the table only while there is room to spare.
        self.proven = False


class Discovery:
    """The discovery state machine of one endpoint."""

    def __init__(self, config: DiscoveryConfig, *, rng: random.Random, now: float) -> None:
        self.config = config
        self.counters: Counter[str] = Counter()
        self._rng = rng
        self._rate_ms = max(1, round(config.rate_s * 1000))
        self._targets: tuple[Target, ...] = ()
        self._peers: dict[EndpointId, _PeerState] = {}
        self._names: dict[str, EndpointId] = {}
        self._unproven: dict[EndpointId, None] = {}  # unproven peers, oldest first
        # Peers that said goodbye: id -> (incarnation, until when its announcements are stale),
        # oldest first, at most max_peers (see _receive_goodbye).
        self._departed: dict[EndpointId, tuple[int, float]] = {}
        self._events: deque[PeerEvent] = deque()
        self._outbox: list[tuple[Frame, Address]] = []
        self._announce_at: float | None = now if config.announce else None
        self._warned: set[object] = set()
        self._left = False
        #: The topics layer's interest version, carried in our announcements.
        self.interest_version = 0
        # No peer expires before this (a lower bound, kept without a scan of every peer on every
        # burst: hearing a peer only moves its expiry later; handle_timer recomputes it).
        self._expiry_hint: float | None = None

    # --- inputs ---------------------------------------------------------------------------------

    def receive(
        self,
        frame: Announce | Goodbye,
        header: Header,
        source: Address,
        *,
        multicast: bool,
        now: float,
    ) -> None:
        """Take one discovery frame that arrived from ``source``."""
        if self._left:
            return
        if isinstance(frame, Goodbye):
            self._receive_goodbye(header, source, now=now)
        else:
            self._receive_announce(frame, source, multicast=multicast, now=now)

    def prove(self, endpoint_id: EndpointId, incarnation: int) -> None:
        """The peer acknowledged something we sent it, from its address: it is reachable there
        (not an address named by a forger). A proven peer keeps its place when the table is full."""
        state = self._peers.get(endpoint_id)
        if state is not None and state.peer.incarnation == incarnation and not state.proven:
            state.proven = True
            self._unproven.pop(endpoint_id, None)

    def touch(self, endpoint_id: EndpointId, incarnation: int, *, now: float) -> None:
        """A valid datagram came from this peer: it is alive even if announcements were lost."""
        state = self._peers.get(endpoint_id)
        if state is not None and state.peer.incarnation == incarnation and now > state.heard_at:
            state.heard_at = now

    def set_targets(self, targets: Sequence[Target]) -> None:
        """Replace the announcement targets (the runtime re-resolves DNS names every period)."""
        self._targets = tuple(targets)

    def handle_timer(self, *, now: float) -> None:
        """Expire silent peers and send the periodic announcement when due."""
        if self._left:
            return
        hint: float | None = None
        for state in list(self._peers.values()):
            expires_at = self._expires_at(state)
            if now >= expires_at:
                self._remove(state, "expired", rescan=False)  # the hint is recomputed here
            elif hint is None or expires_at < hint:
                hint = expires_at
        self._expiry_hint = hint
        if self._announce_at is not None and now >= self._announce_at:
            self._announce(now)
            period = self.config.rate_s * self._rng.uniform(1.0 - _JITTER, 1.0)
            self._announce_at = max(self._announce_at + period, now + period / 2)

    def leave(self) -> None:
        """Say goodbye to every target and peer; the layer is inert afterwards."""
        if self._left:
            return
        destinations = {address for address, _ in self._targets}
        destinations.update(state.peer.address for state in self._peers.values())
        self._outbox.extend((Goodbye(), address) for address in sorted(destinations))
        self._peers.clear()
        self._names.clear()
        self._unproven.clear()
        self._left = True

    # --- outputs --------------------------------------------------------------------------------

    def frames_to_send(self) -> list[tuple[Frame, Address]]:
        """Frames queued since the last call, with their destination."""
        out, self._outbox = self._outbox, []
        return out

    def next_event(self) -> PeerEvent | None:
        """The oldest event not yet pulled, or ``None``."""
        return self._events.popleft() if self._events else None

    def next_deadline(self) -> float | None:
        """When ``handle_timer`` should next be called (absolute), or ``None``."""
        if self._left:
            return None
        hint = self._expiry_hint if self._peers else None
        announce_at = self._announce_at
        if hint is None:
            return announce_at
        return hint if announce_at is None or hint < announce_at else announce_at

    # --- queries --------------------------------------------------------------------------------

    def expiry_due(self, now: float) -> bool:
        """Whether ``handle_timer(now=now)`` may expire a peer (cheap: a lower bound)."""
        hint = self._expiry_hint
        return hint is not None and now >= hint and bool(self._peers)

    def peers(self) -> list[Peer]:
        """The peers known now, ordered by name."""
        return sorted((s.peer for s in self._peers.values()), key=lambda p: p.name)

    def peer(self, endpoint_id: EndpointId) -> Peer | None:
        """The peer with this id, if known."""
        state = self._peers.get(endpoint_id)
        return state.peer if state else None

    # --- internals ------------------------------------------------------------------------------

    def _receive_announce(
        self, announce: Announce, source: Address, *, multicast: bool, now: float
    ) -> None:
        config = self.config
        self.counters["forwarded_received" if announce.forwarded else "announcements_received"] += 1
        if announce.incarnation > MAX_INCARNATION:
            # No endpoint makes one (ms since the epoch x 1000, until 2100): one claiming it would
            # look newer than every real restart to come.
            self.counters["implausible_incarnation"] += 1
            return
        if announce.endpoint_id == config.endpoint_id:
            if announce.incarnation != config.incarnation and not announce.forwarded:
                self._warn_once(
                    ("id", announce.incarnation),
                    "endpoint %r at %s:%d uses our endpoint id %d; ignoring it",
                    announce.name,
                    *source,
                    config.endpoint_id,
                )
                self.counters["id_clash"] += 1
            return
        if announce.forwarded:
            heard_at = now - announce.age_ms / 1000.0
            address = (announce.host, announce.port)
        else:
            heard_at = now
            address = (announce.host or source[0], announce.port)
        state = self._upsert(announce, address, heard_at, now=now)
        if state is None or announce.forwarded:
            return
        if multicast:
            state.multicast_at = now
        if announce.ask:
            self._answer(state, source, now=now, asker_digest=announce.peers_digest)

    def _upsert(
        self, announce: Announce, address: Address, heard_at: float, *, now: float
    ) -> _PeerState | None:
        state = self._peers.get(announce.endpoint_id)
        if state is not None:
            if announce.incarnation < state.peer.incarnation:
                self.counters["stale_ignored"] += 1
                return None
            if announce.incarnation > state.peer.incarnation:
                if address[0] != state.peer.host:
                    # A restart on another host while the live one still speaks is not taken on
                    # trust (a forged announcement would evict the peer): the new incarnation is
                    # added once the old one expires or says goodbye.
                    self.counters["restart_elsewhere_deferred"] += 1
                    self._warn_once(
                        ("moved", announce.endpoint_id),
                        "endpoint %d (%s at %s) announces a new incarnation from %s: deferred "
                        "until the current one goes silent",
                        announce.endpoint_id,
                        state.peer.name,
                        state.peer.host,
                        address[0],
                    )
                    return None
                self._remove(state, "restarted")
                state = None
        if state is None:
            if self._departed and self._left_already(announce, now):
                return None
            return self._add(announce, address, heard_at, now=now)
        if not announce.forwarded and address != state.peer.address:
            # The same incarnation at another address: not taken on trust (a forged one would
            # divert the peer's traffic), nor counted as hearing it. A peer that really moved
            # expires at the old address and is added at the new one.
            self.counters["move_deferred"] += 1
            self._warn_once(
                ("move", announce.endpoint_id),
                "endpoint %d (%s at %s:%d) announced from %s:%d: ignored while it lives there",
                announce.endpoint_id,
                state.peer.name,
                *state.peer.address,
                *address,
            )
            return None
        if heard_at > state.heard_at:
            state.heard_at = heard_at
        if not announce.forwarded:
            peer = state.peer
            rate_s = self._rate_s(announce)
            if peer.rate_s != rate_s:
                state.peer = replace(peer, rate_s=rate_s)
                self._lower_hint(self._expires_at(state))  # a faster rate expires it sooner
        return state

    def _add(
        self, announce: Announce, address: Address, heard_at: float, *, now: float
    ) -> _PeerState | None:
        name = announce.name
        if name == self.config.name or name in self._names:
            # Names are labels, ids are identity: a clash is reported, never a reason to refuse
            # the newcomer (otherwise whoever announces a name first, a squatter included, would
            # lock its rightful owner out for as long as it keeps announcing).
            self.counters["name_clash"] += 1
            self._warn_once(
                ("name", name),
                "endpoint %d at %s:%d announces the name %r already in use; both are kept, "
                "told apart by id",
                announce.endpoint_id,
                *address,
                name,
            )
        if len(self._peers) >= self.config.max_peers and not self._make_room():
            self.counters["peers_full"] += 1
            self._warn_once(
                ("full", None), "peer table full (%d); ignoring newcomers", len(self._peers)
            )
            return None
        if heard_at + self._rate_s(announce) * self.config.multiplier <= now:
            return None  # a forwarded announcement already expired (same test as _expires_at)
        peer = Peer(
            announce.endpoint_id, announce.incarnation, name, *address, self._rate_s(announce)
        )
        state = _PeerState(peer, heard_at)
        self._lower_hint(self._expires_at(state))
        self._peers[peer.endpoint_id] = state
        self._unproven[peer.endpoint_id] = None
        self._names.setdefault(name, peer.endpoint_id)
        self._events.append(PeerAdded(peer))
        self.counters["peers_added"] += 1
        logger.info("peer added: %s (%d) at %s:%d", name, peer.endpoint_id, *address)
        if self.config.announce and not announce.ask:
            # Introduce ourselves at once instead of making the newcomer wait a period (one that
            # asks gets our announcement in the answer anyway).
            self._outbox.append((self._own_announce(), peer.address))
        return state

    def _make_room(self) -> bool:
        """Table full: drop the unproven peer added first, if there is one. A flood of fake
        endpoints (announced, never answering) then churns through the unproven places while
        real newcomers prove themselves within a round trip and stay."""
        if not self._unproven:
            return False
        self.counters["unproven_evicted"] += 1
        self._remove(self._peers[next(iter(self._unproven))], "evicted")
        return True

    def _remove(self, state: _PeerState, reason: RemovalReason, *, rescan: bool = True) -> None:
        peer = state.peer
        del self._peers[peer.endpoint_id]
        self._unproven.pop(peer.endpoint_id, None)
        if self._names.get(peer.name) == peer.endpoint_id:
            del self._names[peer.name]
        if rescan:  # removals are rare: the deadline follows the peers that are left
            self._expiry_hint = min(map(self._expires_at, self._peers.values()), default=None)
        self._events.append(PeerRemoved(peer, reason))
        self.counters["peers_removed"] += 1
        logger.info("peer removed (%s): %s (%d)", reason, peer.name, peer.endpoint_id)

    def _receive_goodbye(self, header: Header, source: Address, *, now: float) -> None:
        self.counters["goodbyes_received"] += 1
        state = self._peers.get(header.source_id)
        if state is None or state.peer.incarnation != header.incarnation:
            return
        if source != state.peer.address:  # a goodbye in its name from elsewhere: forged
            self.counters["goodbye_from_elsewhere_ignored"] += 1
            return
        self._remove(state, "left")
        # A goodbye goes to the group and to each peer, on two sockets here: an announcement of
        # the same incarnation read after it was sent before it (queued on the other socket, or
        # forwarded by a rendezvous that had not yet heard the goodbye), and must not add the
        # peer back ("left", "added", "left" again, or a departed peer kept until it expires).
        # Such announcements are ignored for one expiry period of the peer's; a newer
        # incarnation (a restart) is a newcomer at once. (Without a network key a goodbye forged
        # from the peer's own address would keep it out that long: no longer than it takes a
        # silent peer to expire.)
        departed = self._departed
        departed.pop(header.source_id, None)
        if len(departed) >= self.config.max_peers:
            del departed[next(iter(departed))]
        departed[header.source_id] = (header.incarnation, now + self._timeout_s(state))

    def _left_already(self, announce: Announce, now: float) -> bool:
        """Whether ``announce`` is from an incarnation that said goodbye (see above)."""
        departed = self._departed.get(announce.endpoint_id)
        if departed is None:
            return False
        incarnation, until = departed
        if announce.incarnation > incarnation or now >= until:
            del self._departed[announce.endpoint_id]
            return False
        self.counters["departed_announcements_ignored"] += 1
        return True

    def _digest(self, *, exclude: int = 0) -> int:
        """XOR of the ids of the peers known, and ours, but ``exclude``'s (see ``_answer``)."""
        digest: int = self.config.endpoint_id
        for endpoint_id in self._peers:
            if endpoint_id != exclude:
                digest ^= endpoint_id
        return digest

    def _answer(
        self, asker: _PeerState, source: Address, *, now: float, asker_digest: int = 0
    ) -> None:
        if now - asker.answered_at < self.config.rate_s / 2:
            return
        asker.answered_at = now
        self.counters["asks_answered"] += 1
        # The asker hears us in answers at its own pace, so advertise the slower of the two rates:
        # otherwise a fast rendezvous that never announces expires at a slow asker between asks.
        own = self._own_announce()
        slower_ms = max(own.rate_ms, round(asker.peer.rate_s * 1000))
        self._outbox.append((replace(own, rate_ms=slower_ms), source))
        digest = asker_digest
        if digest and digest == self._digest(exclude=asker.peer.endpoint_id):
            self.counters["asks_answered_briefly"] += 1
            return  # it knows everyone we know: no need to list them again every period
        for state in self._peers.values():
            if state is asker:
                continue
            peer = state.peer
            age_ms = min(MAX_AGE_MS, max(0, round((now - state.heard_at) * 1000)))
            forwarded = Announce(
                peer.endpoint_id,
                peer.incarnation,
                peer.name,
                peer.host,
                peer.port,
                max(1, round(peer.rate_s * 1000)),
                forwarded=True,
                age_ms=age_ms,
            )
            self._outbox.append((forwarded, source))

    def _announce(self, now: float) -> None:
        own = self._own_announce()
        # Asks say which peers we know (as a digest), so an answerer that knows no more than
        # that sends only itself: a headless Service's pods would otherwise each answer every
        # other pod with its whole peer list every period (N^3 datagrams).
        digest = self._digest() ^ self.config.endpoint_id if self._peers else 0
        asking = replace(own, ask=True, peers_digest=digest)
        for address, ask in self._targets:
            self._outbox.append((asking if ask else own, address))
        for state in self._peers.values():
            if now - state.multicast_at > self._timeout_s(state):
                self._outbox.append((own, state.peer.address))

    def _own_announce(self) -> Announce:
        config = self.config
        return Announce(
            config.endpoint_id,
            config.incarnation,
            config.name,
            config.host,
            config.port,
            self._rate_ms,
            interest=self.interest_version,
        )

    def _rate_s(self, announce: Announce) -> float:
        """The announced rate, at most max(10 x ours, 60 s): a peer (or a forger) announcing an
        hour would otherwise keep its place for two hours after its last word."""
        return min(announce.rate_ms / 1000.0, max(10 * self.config.rate_s, _MAX_RATE_FLOOR_S))

    def _timeout_s(self, state: _PeerState) -> float:
        return state.peer.rate_s * self.config.multiplier

    def _expires_at(self, state: _PeerState) -> float:
        return state.heard_at + self._timeout_s(state)

    def _lower_hint(self, expires_at: float) -> None:
        if self._expiry_hint is None or expires_at < self._expiry_hint:
            self._expiry_hint = expires_at

    def _warn_once(self, key: tuple[str, object], message: str, *args: object) -> None:
        warn_once(logger, self._warned, key, message, *args)
