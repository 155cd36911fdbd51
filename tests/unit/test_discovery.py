"""Unit and property tests of the ``Discovery`` state machine, driven by hand with explicit ``now``.

Single-instance tests feed frames with ``receive`` and fire ``handle_timer`` at the deadlines the
layer asks for; multi-endpoint tests use the virtual LAN in ``discovery_net``. Jitter comes from an
injected ``random.Random(seed)``, so every expected deadline is computed exactly.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import pytest
from discovery_net import DATA_PORT, GROUP, Node, VirtualLan
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from glue import wire
from glue.discovery import Address, Discovery, DiscoveryConfig, Target
from glue.events import Peer, PeerAdded, PeerEvent, PeerRemoved
from glue.wire import Announce, EndpointId, Goodbye, Header

NET = 1
ME = EndpointId(100)
LOGGER = "glue.discovery"
RENDEZVOUS: Address = ("10.0.0.9", DATA_PORT)
BROADCAST: Address = ("10.0.0.255", 27320)


# --- helpers ------------------------------------------------------------------------------------


def make(
    *, now: float = 0.0, seed: int = 0, targets: list[Target] | None = None, **fields: Any
) -> Discovery:
    """A Discovery called "me" (id 100) at data port 7400, rate 1 s, multiplier 2."""
    config: dict[str, Any] = {
        "endpoint_id": ME,
        "incarnation": 1,
        "name": "me",
        "port": DATA_PORT,
        "rate_s": 1.0,
        "multiplier": 2.0,
    }
    discovery = Discovery(DiscoveryConfig(**(config | fields)), rng=random.Random(seed), now=now)
    discovery.set_targets(targets or [])
    return discovery


def own(**fields: Any) -> Announce:
    """The announcement ``make()`` sends."""
    return replace(Announce(ME, 1, "me", "", DATA_PORT, 1000), **fields)


def addr(n: int, port: int = DATA_PORT) -> Address:
    """The data address of endpoint ``n``."""
    return (f"10.0.0.{n}", port)


def ann(
    n: int, *, name: str | None = None, incarnation: int = 1, rate_ms: int = 1000, **fields: Any
) -> Announce:
    """Endpoint ``n``'s own announcement (name ``p<n>`` unless given)."""
    host, port = fields.pop("host", ""), fields.pop("port", DATA_PORT)
    return Announce(EndpointId(n), incarnation, name or f"p{n}", host, port, rate_ms, **fields)


def fwd(
    n: int, age_ms: int, *, name: str | None = None, rate_ms: int = 1000, **fields: Any
) -> Announce:
    """Endpoint ``n``'s announcement as a rendezvous forwards it."""
    return replace(
        ann(n, name=name, rate_ms=rate_ms, host=f"10.0.0.{n}", **fields),
        forwarded=True,
        age_ms=age_ms,
    )


def peer(
    n: int, *, name: str | None = None, incarnation: int = 1, rate_s: float = 1.0, **fields: Any
) -> Peer:
    """The Peer that ``ann(n, ...)`` heard from ``addr(n)`` becomes."""
    host, port = fields.get("host", f"10.0.0.{n}"), fields.get("port", DATA_PORT)
    return Peer(EndpointId(n), incarnation, name or f"p{n}", host, port, rate_s)


def hear(
    d: Discovery,
    frame: Announce | Goodbye,
    *,
    now: float,
    multicast: bool = True,
    via: int | None = None,
    source: Address | None = None,
    incarnation: int = 1,
) -> None:
    """Deliver ``frame`` as the runtime would: sent by its own endpoint, or ``via`` a forwarder."""
    if via is None:
        assert isinstance(frame, Announce)
        sender, incarnation = int(frame.endpoint_id), frame.incarnation
    else:
        sender = via
    header = Header(NET, EndpointId(sender), incarnation)
    d.receive(frame, header, source or addr(sender), multicast=multicast, now=now)


def goodbye(d: Discovery, n: int, *, now: float, incarnation: int = 1) -> None:
    """Deliver endpoint ``n``'s goodbye (on multicast)."""
    hear(d, Goodbye(), now=now, via=n, incarnation=incarnation)


def events(d: Discovery) -> list[PeerEvent]:
    """Drain ``d``'s events."""
    out = []
    while (event := d.next_event()) is not None:
        out.append(event)
    return out


def periods(seed: int, rate_s: float, count: int) -> list[float]:
    """The jittered periods a Discovery seeded with ``seed`` will use, in order."""
    rng = random.Random(seed)
    return [rate_s * rng.uniform(0.9, 1.0) for _ in range(count)]


def log_messages(caplog: pytest.LogCaptureFixture, level: int) -> list[str]:
    """Messages discovery logged at exactly ``level``."""
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == level]


# --- start and periodic announcements -----------------------------------------------------------


def test_start_announces_at_once_to_every_target_asking_only_unicast_ones() -> None:
    targets = [(GROUP, False), (RENDEZVOUS, True), (BROADCAST, False), (addr(10), True)]
    d = make(now=5.0, seed=7, targets=targets)

    assert d.next_deadline() == 5.0
    assert d.frames_to_send() == []  # nothing is sent from the constructor

    d.handle_timer(now=5.0)

    assert d.frames_to_send() == [
        (own(), GROUP),
        (own(ask=True), RENDEZVOUS),
        (own(), BROADCAST),
        (own(ask=True), addr(10)),
    ]
    deadline = d.next_deadline()
    assert deadline == 5.0 + periods(7, 1.0, 1)[0]
    assert 5.9 <= deadline <= 6.0
    assert events(d) == []


def test_periodic_announcements_are_jittered_between_090_and_100_of_the_rate() -> None:
    d = make(seed=11, rate_s=0.5, targets=[(GROUP, False)])
    announced = own(rate_ms=500)
    now = 0.0
    for period in periods(11, 0.5, 20):
        assert d.next_deadline() == now
        d.handle_timer(now=now)
        assert d.frames_to_send() == [(announced, GROUP)]
        deadline = d.next_deadline()
        assert deadline == now + period
        assert 0.45 <= deadline - now <= 0.5
        now += period


def test_different_seeds_do_not_synchronise() -> None:
    first, second = make(seed=1), make(seed=2)
    first.handle_timer(now=0.0)
    second.handle_timer(now=0.0)
    assert first.next_deadline() != second.next_deadline()


def test_a_late_timer_announces_once_and_does_not_burst() -> None:
    d = make(seed=3, targets=[(GROUP, False)])
    d.handle_timer(now=0.0)
    d.frames_to_send()
    due = d.next_deadline()
    assert due is not None

    d.handle_timer(now=due + 5.0)  # the loop was blocked for five periods

    assert d.frames_to_send() == [(own(), GROUP)]
    assert d.next_deadline() == due + 5.0 + periods(3, 1.0, 2)[1] / 2


def test_a_timer_before_the_deadline_sends_nothing() -> None:
    d = make(targets=[(GROUP, False)])
    d.handle_timer(now=0.0)
    d.frames_to_send()
    due = d.next_deadline()
    assert due is not None
    d.handle_timer(now=due - 0.001)
    assert d.frames_to_send() == []
    assert d.next_deadline() == due


def test_set_targets_replaces_the_targets_for_the_next_announcement() -> None:
    d = make(targets=[(GROUP, False)])
    d.handle_timer(now=0.0)
    assert d.frames_to_send() == [(own(), GROUP)]
    d.set_targets([(RENDEZVOUS, True)])
    due = d.next_deadline()
    assert due is not None
    d.handle_timer(now=due)
    assert d.frames_to_send() == [(own(ask=True), RENDEZVOUS)]


def test_announce_false_never_announces_and_has_no_deadline() -> None:
    d = make(announce=False, targets=[(GROUP, False)])
    assert d.next_deadline() is None
    d.handle_timer(now=0.0)
    d.handle_timer(now=10.0)
    assert d.frames_to_send() == []


def test_own_announcement_carries_host_port_and_rate_in_milliseconds() -> None:
    d = make(host="10.1.2.3", port=7777, rate_s=0.25, targets=[(GROUP, False)])
    d.handle_timer(now=0.0)
    assert d.frames_to_send() == [(Announce(ME, 1, "me", "10.1.2.3", 7777, 250), GROUP)]


# --- newcomers --------------------------------------------------------------------------------


def test_newcomer_heard_on_multicast_is_added_and_introduced_to_at_once() -> None:
    d = make(targets=[(GROUP, False)])
    d.handle_timer(now=0.0)
    d.frames_to_send()

    hear(d, ann(2, rate_ms=500), now=0.25)

    assert events(d) == [PeerAdded(peer(2, rate_s=0.5))]
    assert d.frames_to_send() == [(own(), addr(2))]  # unicast, not a multicast announcement
    assert d.peers() == [peer(2, rate_s=0.5)]
    assert d.peer(EndpointId(2)) == peer(2, rate_s=0.5)
    assert d.counters["peers_added"] == 1


def test_known_peer_announcing_again_is_neither_added_nor_introduced_again() -> None:
    d = make(announce=False)
    hear(d, ann(2), now=0.25)
    assert events(d) == [PeerAdded(peer(2))]
    hear(d, ann(2), now=0.5)
    hear(d, ann(2), now=0.75, multicast=False)
    assert events(d) == []
    assert d.frames_to_send() == []


def test_host_in_the_announcement_wins_over_the_source_address() -> None:
    d = make(announce=False)
    hear(d, ann(2, host="10.9.9.9", port=7500), now=0.0, source=("172.16.0.1", 40000))
    assert events(d) == [PeerAdded(peer(2, host="10.9.9.9", port=7500))]


def test_a_peer_heard_from_another_address_is_not_moved_until_it_expires_there() -> None:
    # Without a key anyone can announce a live peer's id from elsewhere: taking the new address
    # at once would divert its traffic (and count the forger as hearing the peer).
    d = make(announce=False)
    hear(d, ann(2), now=0.0)
    events(d)
    hear(d, ann(2, port=7600), now=0.5, source=("10.0.0.22", 7600))
    hear(d, ann(2, port=7600), now=1.5, source=("10.0.0.22", 7600))
    assert events(d) == []
    assert d.peers() == [peer(2)]
    assert d.counters["move_deferred"] == 2
    d.handle_timer(now=2.0)  # silent at its old address for its timeout: gone
    assert events(d) == [PeerRemoved(peer(2), "expired")]
    hear(d, ann(2, port=7600), now=2.1, source=("10.0.0.22", 7600))  # a real move
    assert events(d) == [PeerAdded(peer(2, host="10.0.0.22", port=7600))]


def test_a_goodbye_from_another_address_is_ignored() -> None:
    d = make(announce=False)
    hear(d, ann(2), now=0.0)
    events(d)
    d.receive(Goodbye(), Header(1, EndpointId(2), 1), ("10.0.0.66", 7400), multicast=False, now=0.5)
    assert events(d) == []
    assert d.counters["goodbye_from_elsewhere_ignored"] == 1


def test_peers_are_listed_by_name() -> None:
    d = make(announce=False)
    for n, name in ((2, "zulu"), (3, "alpha"), (4, "mike")):
        hear(d, ann(n, name=name), now=0.0)
    assert [p.name for p in d.peers()] == ["alpha", "mike", "zulu"]
    assert d.peer(EndpointId(5)) is None


def test_two_endpoints_meet_within_one_exchange() -> None:
    lan = VirtualLan()
    a = lan.add("a", 1)
    lan.run_until(0.3)
    assert a.take() == []
    b = lan.add("b", 2)
    lan.run_until(0.3)

    own_a = Announce(EndpointId(1), 1, "a", "", DATA_PORT, 1000)
    own_b = Announce(EndpointId(2), 1, "b", "", DATA_PORT, 1000)
    assert lan.sent_at(0.3) == [
        ("b", GROUP, (own_b,)),  # b starts: its first announcement
        ("a", b.address, (own_a,)),  # a hears a newcomer and introduces itself
        ("b", a.address, (own_b,)),  # b hears a newcomer (a) and introduces itself
    ]
    assert a.take() == [PeerAdded(b.peer)]
    assert b.take() == [PeerAdded(a.peer)]

    lan.run_until(10.0)
    assert a.take() == b.take() == []
    # Both hear each other on multicast, so no periodic unicast announcements follow.
    assert [s for s in lan.sent if s.at > 0.3 and s.destination != GROUP] == []


# --- expiry -----------------------------------------------------------------------------------


def test_peer_expires_exactly_when_silence_reaches_its_rate_times_our_multiplier() -> None:
    d = make(multiplier=3.0, announce=False)
    hear(d, ann(2, rate_ms=250), now=2.0)
    assert events(d) == [PeerAdded(peer(2, rate_s=0.25))]
    assert d.next_deadline() == 2.0 + 0.25 * 3.0 == 2.75

    d.handle_timer(now=2.75 - 1e-9)
    assert events(d) == []
    assert d.peer(EndpointId(2)) is not None
    assert d.next_deadline() == 2.75

    d.handle_timer(now=2.75)
    assert events(d) == [PeerRemoved(peer(2, rate_s=0.25), "expired")]
    assert d.peers() == []
    assert d.next_deadline() is None
    assert d.counters["peers_removed"] == 1


def test_expiry_uses_the_senders_rate_not_ours() -> None:
    d = make(rate_s=0.1, multiplier=2.0, announce=False)
    hear(d, ann(2, rate_ms=2000), now=1.0)
    events(d)
    assert d.next_deadline() == 1.0 + 2.0 * 2.0

    d.handle_timer(now=1.0 + 0.1 * 2.0)  # our own rate x multiplier: irrelevant
    d.handle_timer(now=4.999)
    assert events(d) == []

    d.handle_timer(now=5.0)
    assert events(d) == [PeerRemoved(peer(2, rate_s=2.0), "expired")]


def test_each_announcement_moves_the_expiry_and_a_new_rate_applies_at_once() -> None:
    d = make(announce=False)
    hear(d, ann(2), now=1.0)
    assert d.next_deadline() == 3.0
    hear(d, ann(2), now=1.5)
    # The deadline is a lower bound kept without rescanning peers on every input: waking at
    # the old expiry finds nothing due, and then the moved expiry is the deadline.
    assert d.next_deadline() == 3.0
    d.handle_timer(now=3.0)
    assert d.peers() == [peer(2)]
    assert d.next_deadline() == 3.5
    hear(d, ann(2, rate_ms=100), now=3.25)
    assert d.next_deadline() == 3.25 + 0.1 * 2.0  # a faster rate brings it forward at once
    assert d.peers() == [peer(2, rate_s=0.1)]
    assert events(d) == [PeerAdded(peer(2))]


def test_next_deadline_is_the_earliest_of_announcement_and_expiries() -> None:
    d = make(seed=5, targets=[(GROUP, False)])
    d.handle_timer(now=0.0)
    announce_at = periods(5, 1.0, 1)[0]
    hear(d, ann(2, rate_ms=100), now=0.25)
    hear(d, ann(3, rate_ms=5000), now=0.25)
    assert d.next_deadline() == 0.25 + 0.1 * 2.0
    d.handle_timer(now=0.25 + 0.1 * 2.0)
    assert events(d)[-1] == PeerRemoved(peer(2, rate_s=0.1), "expired")
    assert d.next_deadline() == announce_at


def test_a_silent_endpoint_on_the_lan_expires_at_its_last_announcement_plus_timeout() -> None:
    lan = VirtualLan()
    a = lan.add("a", 1, rate_s=0.5)
    b = lan.add("b", 2, rate_s=0.2, multiplier=3.0)
    lan.run_until(3.0)
    assert a.take() == [PeerAdded(b.peer)]
    assert b.take() == [PeerAdded(a.peer)]

    lan.remove(a)  # a crashes: no goodbye
    last = b.heard[a.endpoint_id]
    lan.run_until(10.0)

    assert b.events[-1] == (last + 0.5 * 3.0, PeerRemoved(a.peer, "expired"))
    assert b.take() == [PeerRemoved(a.peer, "expired")]


# --- goodbye and leave ------------------------------------------------------------------------


def test_goodbye_removes_the_peer_at_once() -> None:
    d = make(announce=False)
    hear(d, ann(2), now=1.0)
    events(d)
    goodbye(d, 2, now=1.25)
    assert events(d) == [PeerRemoved(peer(2), "left")]
    assert d.peers() == []
    assert d.next_deadline() is None
    assert d.counters["goodbyes_received"] == 1


def test_an_announcement_read_after_the_goodbye_does_not_add_the_peer_back() -> None:
    # A goodbye goes to the group and to each peer; a slow reader can take the first, then an
    # announcement of the same incarnation still queued on its other socket (sent before the
    # goodbye). Before, that added the peer back, and the second goodbye removed it again.
    d = make(announce=False)  # rate 1 s, multiplier 2: the peer's expiry period is 2 s
    hear(d, ann(2), now=1.0)
    events(d)
    goodbye(d, 2, now=1.25)
    hear(d, ann(2), now=1.26, multicast=False)  # the stale one, on the unicast socket
    hear(d, fwd(2, age_ms=100), now=1.3)  # or forwarded by a rendezvous not yet told
    goodbye(d, 2, now=1.27)  # the copy sent to us directly
    assert events(d) == [PeerRemoved(peer(2), "left")]  # once, and not added back
    assert d.peers() == []
    assert d.counters["departed_announcements_ignored"] == 2
    # A restart is a newcomer at once.
    hear(d, ann(2, incarnation=2), now=1.5)
    assert events(d) == [PeerAdded(peer(2, incarnation=2))]


def test_a_departed_incarnation_is_heard_again_after_its_expiry_period() -> None:
    # Without a network key a goodbye could be forged from the peer's own address: it keeps the
    # peer out no longer than a silent peer takes to expire.
    d = make(announce=False)
    hear(d, ann(2), now=1.0)
    goodbye(d, 2, now=1.25)
    events(d)
    hear(d, ann(2), now=3.2)  # 1.25 + 2 s not yet reached
    assert events(d) == []
    hear(d, ann(2), now=3.25)
    assert events(d) == [PeerAdded(peer(2))]


def test_the_goodbyes_remembered_are_bounded_by_max_peers() -> None:
    d = make(announce=False, max_peers=3)
    for n in range(2, 7):
        hear(d, ann(n), now=1.0)
        goodbye(d, n, now=1.1)
    events(d)
    for n in range(2, 7):
        hear(d, ann(n), now=1.2)
    assert [e.peer.endpoint_id for e in events(d)] == [2, 3]


def test_goodbye_from_another_incarnation_or_an_unknown_endpoint_is_ignored() -> None:
    d = make(announce=False)
    hear(d, ann(2, incarnation=5), now=1.0)
    events(d)
    goodbye(d, 2, now=1.1, incarnation=4)
    goodbye(d, 3, now=1.2)
    assert events(d) == []
    assert d.peers() == [peer(2, incarnation=5)]
    assert d.counters["goodbyes_received"] == 2


def test_leave_says_goodbye_to_every_target_and_peer_once_then_is_inert() -> None:
    targets = [(GROUP, False), (RENDEZVOUS, True), (addr(2), True)]
    d = make(targets=targets)
    d.handle_timer(now=0.0)
    hear(d, ann(2), now=0.1, multicast=False)  # a peer that is also a target
    hear(d, ann(3), now=0.2)
    hear(d, ann(4, host="10.0.1.4", port=7500), now=0.3)
    d.frames_to_send()
    events(d)

    d.leave()

    assert d.frames_to_send() == [
        (Goodbye(), ("10.0.0.2", DATA_PORT)),
        (Goodbye(), ("10.0.0.3", DATA_PORT)),
        (Goodbye(), ("10.0.0.9", DATA_PORT)),
        (Goodbye(), ("10.0.1.4", 7500)),
        (Goodbye(), GROUP),
    ]
    assert d.peers() == []
    assert d.next_deadline() is None
    assert events(d) == []  # the runtime is stopping; it reports the stop itself

    counters = dict(d.counters)
    hear(d, ann(5), now=0.5)
    hear(d, ann(6, ask=True), now=0.5, multicast=False)
    goodbye(d, 3, now=0.5)
    d.handle_timer(now=5.0)
    d.leave()
    assert d.frames_to_send() == []
    assert events(d) == []
    assert d.peers() == []
    assert d.next_deadline() is None
    assert dict(d.counters) == counters


def test_leave_on_the_lan_removes_the_endpoint_everywhere_at_once() -> None:
    lan = VirtualLan()
    a, b, c = (lan.add(name, n) for n, name in enumerate("abc", start=1))
    lan.run_until(2.0)
    for node in (a, b, c):
        node.take()

    lan.leave(b)

    assert lan.sent_at(2.0) == [
        ("b", a.address, (Goodbye(),)),
        ("b", c.address, (Goodbye(),)),
        ("b", GROUP, (Goodbye(),)),
    ]
    assert a.take() == [PeerRemoved(b.peer, "left")]
    assert c.take() == [PeerRemoved(b.peer, "left")]
    lan.run_until(10.0)
    assert [s for s in lan.sent if s.sender == "b" and s.at > 2.0] == []
    assert a.known() == {"c"}
    assert c.known() == {"a"}
    assert a.take() == c.take() == []


# --- restarts ---------------------------------------------------------------------------------


def test_higher_incarnation_replaces_the_peer_at_once() -> None:
    d = make(targets=[(GROUP, False)])
    d.handle_timer(now=0.0)
    d.frames_to_send()
    hear(d, ann(2, incarnation=5), now=0.5)
    assert events(d) == [PeerAdded(peer(2, incarnation=5))]
    d.frames_to_send()

    hear(d, ann(2, incarnation=6, port=7401), now=0.75, source=addr(2, 7401))

    assert events(d) == [
        PeerRemoved(peer(2, incarnation=5), "restarted"),
        PeerAdded(peer(2, incarnation=6, port=7401)),
    ]
    assert d.frames_to_send() == [(own(), addr(2, 7401))]  # a restarted peer is a newcomer
    assert d.counters["peers_added"] == 2
    assert d.counters["peers_removed"] == 1


def test_lower_incarnation_is_stale_and_ignored() -> None:
    d = make(announce=False)
    hear(d, ann(2, incarnation=6), now=1.0)
    events(d)

    hear(d, ann(2, incarnation=5, port=7401), now=1.5)
    goodbye(d, 2, now=1.6, incarnation=5)

    assert events(d) == []
    assert d.peers() == [peer(2, incarnation=6)]
    assert d.next_deadline() == 3.0  # the stale announcement did not refresh the peer
    assert d.counters["stale_ignored"] == 1


def test_a_restart_on_the_same_host_replaces_the_peer_at_once() -> None:
    lan = VirtualLan()
    a = lan.add("a", 1)
    b = lan.add("b", 2)
    lan.run_until(1.5)
    a.take()
    lan.remove(b)
    b2 = lan.add("b", 2, endpoint_id=2, incarnation=2)  # same host (10.0.0.2), new incarnation
    lan.run_until(1.5)
    assert a.take() == [PeerRemoved(b.peer, "restarted"), PeerAdded(b2.peer)]
    assert b2.take() == [PeerAdded(a.peer)]


def test_a_restart_on_another_host_waits_until_the_old_one_is_gone() -> None:
    # A forged announcement with a higher incarnation, from another host, must not evict a live
    # peer; a real move (the old instance is gone) is taken once the old one expires.
    lan = VirtualLan()
    a = lan.add("a", 1)
    b = lan.add("b", 2)
    lan.run_until(1.5)
    a.take()
    lan.remove(b)  # b goes silent; the same endpoint id restarts on 10.0.0.3
    b2 = lan.add("b", 3, endpoint_id=2, incarnation=2)
    lan.run_until(1.6)
    assert a.take() == []  # deferred: the old one has not been silent for its timeout yet
    assert a.discovery.counters["restart_elsewhere_deferred"] >= 1
    lan.run_until(5.0)
    assert a.take() == [PeerRemoved(b.peer, "expired"), PeerAdded(b2.peer)]
    assert b2.peer.host == "10.0.0.3"


# --- name and id clashes -----------------------------------------------------------------------


def test_another_endpoint_with_a_known_peers_name_is_added_and_warned_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Names are labels: an endpoint that took a name first (a squatter, or a previous instance
    # not yet expired) must not lock out another endpoint announcing it.
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    d = make(targets=[(GROUP, False)])
    d.handle_timer(now=0.0)
    hear(d, ann(2, name="cam"), now=0.5)
    assert events(d) == [PeerAdded(peer(2, name="cam"))]
    d.frames_to_send()
    caplog.clear()

    hear(d, ann(3, name="cam"), now=0.6)
    hear(d, ann(3, name="cam", ask=True), now=0.7, multicast=False)

    assert events(d) == [PeerAdded(peer(3, name="cam"))]
    assert d.peers() == [peer(2, name="cam"), peer(3, name="cam")]
    assert d.counters["name_clash"] == 1
    message = (
        "endpoint 3 at 10.0.0.3:7400 announces the name 'cam' already in use; both are kept, "
        "told apart by id"
    )
    assert log_messages(caplog, logging.WARNING) == [message]

    goodbye(d, 3, now=0.8)  # the second leaving does not free the name of the first
    assert events(d) == [PeerRemoved(peer(3, name="cam"), "left")]
    hear(d, ann(4, name="cam"), now=0.9)
    assert d.counters["name_clash"] == 2


def test_another_endpoint_with_our_own_name_is_added_and_warned_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    d = make(announce=False)
    for now in (0.0, 1.0, 2.0):
        hear(d, ann(3, name="me"), now=now)
    assert events(d) == [PeerAdded(peer(3, name="me"))]
    assert d.counters["name_clash"] == 1
    message = (
        "endpoint 3 at 10.0.0.3:7400 announces the name 'me' already in use; both are kept, "
        "told apart by id"
    )
    assert log_messages(caplog, logging.WARNING) == [message]


def test_another_endpoint_claiming_our_id_is_ignored_and_warned_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    d = make(announce=False)
    impostor = Announce(ME, 2, "other", "", DATA_PORT, 1000)
    hear(d, impostor, now=0.0, source=addr(7))
    hear(d, impostor, now=1.0, source=addr(7))
    hear(d, replace(impostor, ask=True), now=1.1, source=addr(7), multicast=False)
    assert events(d) == []
    assert d.frames_to_send() == []
    assert d.peers() == []
    assert d.counters["id_clash"] == 3
    message = "endpoint 'other' at 10.0.0.7:7400 uses our endpoint id 100; ignoring it"
    assert log_messages(caplog, logging.WARNING) == [message]
    assert log_messages(caplog, logging.DEBUG).count(message) == 2


def test_our_own_announcement_looped_back_or_forwarded_is_silently_ignored(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    d = make(announce=False)
    hear(d, own(), now=0.0, source=addr(100))  # our multicast, looped back
    hear(d, replace(own(), host="10.0.0.100", forwarded=True, age_ms=5), now=0.0, via=9)
    older = replace(own(), incarnation=0, host="10.0.0.100", forwarded=True, age_ms=5)
    hear(d, older, now=0.0, via=9)  # a rendezvous still remembers our previous incarnation
    assert events(d) == []
    assert d.peers() == []
    assert d.frames_to_send() == []
    assert d.counters["id_clash"] == 0
    assert log_messages(caplog, logging.WARNING) == []


# --- rendezvous -------------------------------------------------------------------------------


def rendezvous(**fields: Any) -> Discovery:
    """A pure rendezvous: id 9, name "r", no targets, does not announce."""
    return make(endpoint_id=EndpointId(9), name="r", announce=False, **fields)


OWN_R = Announce(EndpointId(9), 1, "r", "", DATA_PORT, 1000)


def test_ask_is_answered_with_our_announcement_and_every_other_peer_with_its_age() -> None:
    r = rendezvous()
    hear(r, ann(2, name="b"), now=1.0, multicast=False)
    hear(r, ann(3, name="c", rate_ms=500), now=1.25, multicast=False)
    events(r)
    assert r.frames_to_send() == []  # announce=False: no introductions either

    hear(r, ann(1, name="a", ask=True), now=2.0, multicast=False)

    assert events(r) == [PeerAdded(peer(1, name="a"))]
    answer = r.frames_to_send()
    assert answer == [
        (OWN_R, addr(1)),
        (fwd(2, 1000, name="b"), addr(1)),
        (fwd(3, 750, name="c", rate_ms=500), addr(1)),
    ]
    assert r.counters["asks_answered"] == 1
    # What the rendezvous sends is a valid datagram from it.
    header = Header(NET, EndpointId(9), 1)
    frames = [frame for frame, _ in answer]
    datagrams = wire.pack(header, frames, max_bytes=1400)
    assert [f for d in datagrams for f in wire.decode(d, network_id=NET).frames] == frames


def test_an_asker_that_knows_everyone_already_gets_only_the_answerer() -> None:
    r = rendezvous()  # id 9
    hear(r, ann(2, name="b"), now=1.0, multicast=False)
    hear(r, ann(3, name="c"), now=1.0, multicast=False)
    # b knows c and the rendezvous (digest = 3 ^ 9): nothing to tell it but our own news.
    hear(r, ann(2, name="b", ask=True, peers_digest=3 ^ 9), now=2.0, multicast=False)
    assert r.frames_to_send() == [(OWN_R, addr(2))]
    assert r.counters["asks_answered_briefly"] == 1
    # a newcomer that knows only the rendezvous (digest 9) gets the whole list.
    hear(r, ann(1, name="a", ask=True, peers_digest=9), now=2.0, multicast=False)
    assert [frame.endpoint_id for frame, _ in r.frames_to_send()] == [9, 2, 3]
    # b missing one of them (it knows only the rendezvous) gets the list too.
    hear(r, ann(2, name="b", ask=True, peers_digest=9), now=3.0, multicast=False)
    assert [frame.endpoint_id for frame, _ in r.frames_to_send()] == [9, 3, 1]


def test_asks_carry_the_digest_of_the_peers_known() -> None:
    d = make(targets=[(RENDEZVOUS, True)])
    d.handle_timer(now=0.0)
    [(first, _)] = d.frames_to_send()
    assert first.ask
    assert first.peers_digest == 0
    hear(d, ann(2), now=0.5)
    hear(d, ann(5), now=0.5)
    d.frames_to_send()
    d.handle_timer(now=1.0)
    asks = [frame for frame, address in d.frames_to_send() if address == RENDEZVOUS]
    assert [(a.ask, a.peers_digest) for a in asks] == [(True, 2 ^ 5)]


def test_an_announcing_endpoint_answers_too_after_introducing_itself() -> None:
    d = make(seed=4, targets=[(GROUP, False)])
    d.handle_timer(now=0.0)
    d.frames_to_send()
    hear(d, ann(2), now=0.5)
    d.frames_to_send()

    hear(d, ann(1, ask=True), now=0.75, multicast=False)

    frames = d.frames_to_send()
    assert {destination for _, destination in frames} == {addr(1)}
    assert {f for f, _ in frames if isinstance(f, Announce) and not f.forwarded} == {own()}
    assert frames[-1] == (fwd(2, 250), addr(1))


def test_the_answer_goes_to_the_source_address_not_the_announced_one() -> None:
    r = rendezvous()
    nat: Address = ("192.168.7.7", 40001)
    hear(r, ann(1, name="a", host="10.0.0.1", ask=True), now=0.0, multicast=False, source=nat)
    assert events(r) == [PeerAdded(peer(1, name="a"))]
    assert r.frames_to_send() == [(OWN_R, nat)]


def test_forwarded_announcements_are_never_answered() -> None:
    r = rendezvous()
    asking = replace(fwd(2, 0), ask=True)  # wire refuses this; discovery must not loop either
    hear(r, asking, now=0.0, via=8, multicast=False)
    assert events(r) == [PeerAdded(peer(2))]
    assert r.frames_to_send() == []
    assert r.counters["asks_answered"] == 0
    assert r.counters["forwarded_received"] == 1


def test_answers_to_one_asker_are_limited_to_one_per_half_period() -> None:
    r = rendezvous(rate_s=1.0)
    answered = []
    for now, n in ((2.0, 1), (2.49, 1), (2.49, 2), (2.5, 1), (2.75, 1), (2.8, 2), (3.0, 1)):
        hear(r, ann(n, ask=True), now=now, multicast=False)
        if any(frame == OWN_R for frame, _ in r.frames_to_send()):
            answered.append((now, n))
    assert answered == [(2.0, 1), (2.49, 2), (2.5, 1), (3.0, 1)]
    assert r.counters["asks_answered"] == 4


def test_forwarded_unknown_peer_is_added_as_heard_age_ago() -> None:
    a = make(now=10.0, rate_s=5.0, targets=[(RENDEZVOUS, True)])
    a.handle_timer(now=10.0)
    assert a.frames_to_send() == [(own(ask=True, rate_ms=5000), RENDEZVOUS)]

    hear(a, OWN_R, now=10.0, multicast=False)  # the answer: the rendezvous itself ...
    hear(a, fwd(2, 300), now=10.0, via=9, multicast=False)  # ... and what it knows
    hear(a, fwd(3, 2000), now=10.0, via=9, multicast=False)  # silent for a whole timeout

    assert events(a) == [PeerAdded(peer(9, name="r")), PeerAdded(peer(2))]
    assert a.frames_to_send() == [  # introductions, so that 2 need not wait for a period
        (own(rate_ms=5000), RENDEZVOUS),
        (own(rate_ms=5000), addr(2)),
    ]
    assert a.next_deadline() == (10.0 - 0.3) + 2.0  # expires 300 ms earlier than if heard now

    a.handle_timer(now=(10.0 - 0.3) + 2.0 - 1e-9)
    assert events(a) == []
    a.handle_timer(now=(10.0 - 0.3) + 2.0)
    assert events(a) == [PeerRemoved(peer(2), "expired")]
    assert a.next_deadline() == 12.0  # the rendezvous, heard directly at 10.0


@pytest.mark.parametrize("age_ms", [2000, 2001, 5000, wire.MAX_AGE_MS])
def test_forwarded_announcement_already_too_old_does_not_add(age_ms: int) -> None:
    d = make(now=10.0, announce=False)
    hear(d, fwd(2, age_ms), now=10.0, via=9, multicast=False)
    assert events(d) == []
    assert d.peers() == []
    assert d.frames_to_send() == []
    assert d.next_deadline() is None


def test_forwarded_announcement_just_young_enough_adds() -> None:
    d = make(now=10.0, announce=False)
    hear(d, fwd(2, 1999), now=10.0, via=9, multicast=False)
    assert events(d) == [PeerAdded(peer(2))]
    assert d.next_deadline() == (10.0 - 1.999) + 2.0


def test_forwarded_announcement_aged_exactly_the_timeout_does_not_add() -> None:
    d = make(now=1.0, seed=1, targets=[(GROUP, False)])
    d.handle_timer(now=1.0)
    d.frames_to_send()

    # rate 100 ms x multiplier 2 = 200 ms of silence: expired, as at any other ``now``.
    hear(d, fwd(2, 200, rate_ms=100), now=1.0, via=9, multicast=False)

    assert events(d) == []
    assert d.frames_to_send() == []
    deadline = d.next_deadline()
    assert deadline is not None
    assert deadline > 1.0


def test_forwarded_announcement_of_a_known_peer_only_moves_its_expiry_forward() -> None:
    d = make(now=9.9, announce=False)
    hear(d, ann(2), now=9.9)
    events(d)
    moved = fwd(2, 300, port=9999, rate_ms=100)
    hear(d, moved, now=10.0, via=9, multicast=False)  # heard at 9.7: older than what we know
    assert d.next_deadline() == 9.9 + 2.0
    hear(d, replace(moved, age_ms=50), now=10.0, via=9, multicast=False)
    d.handle_timer(now=9.9 + 2.0)  # the old expiry passes: the newer news keeps it
    assert d.next_deadline() == (10.0 - 0.05) + 2.0
    assert d.peers() == [peer(2)]  # address and rate come only from the peer itself
    assert events(d) == []


def test_forwarded_higher_incarnation_restarts_and_lower_is_stale() -> None:
    d = make(announce=False)
    hear(d, ann(2, incarnation=5), now=1.0)
    events(d)
    hear(d, fwd(2, 100, incarnation=4), now=1.5, via=9, multicast=False)
    assert events(d) == []
    assert d.counters["stale_ignored"] == 1
    hear(d, fwd(2, 100, incarnation=6), now=1.5, via=9, multicast=False)
    assert events(d) == [
        PeerRemoved(peer(2, incarnation=5), "restarted"),
        PeerAdded(peer(2, incarnation=6)),
    ]
    assert d.next_deadline() == (1.5 - 0.1) + 2.0


def rendezvous_lan(
    *, start_ms: tuple[int, ...] = (0, 100, 200)
) -> tuple[VirtualLan, Node, list[Node]]:
    """A rendezvous ``r`` (announce=False, no targets) and clients a, b, c that target only it."""
    lan = VirtualLan()
    r = lan.add("r", 9, targets=[], join=False, announce=False)
    clients = []
    for n, (name, start) in enumerate(zip("abc", start_ms, strict=True), start=1):
        lan.run_until(start / 1000)
        clients.append(lan.add(name, n, targets=[(r.address, True)], join=False))
    return lan, r, clients


def test_clients_of_a_rendezvous_learn_each_other() -> None:
    lan, r, (a, b, c) = rendezvous_lan()
    lan.run_until(0.2)
    assert r.known() == {"a", "b", "c"}
    assert a.known() == {"r", "b", "c"}
    assert b.known() == {"r", "a", "c"}
    assert c.known() == {"r", "a", "b"}
    assert c.take() == [PeerAdded(r.peer), PeerAdded(a.peer), PeerAdded(b.peer)]
    assert a.take() == [PeerAdded(r.peer), PeerAdded(b.peer), PeerAdded(c.peer)]
    assert r.take() == [PeerAdded(a.peer), PeerAdded(b.peer), PeerAdded(c.peer)]
    # c learned a and b from the answer, with their age, and introduced itself directly.
    ask_c = Announce(EndpointId(3), 1, "c", "", DATA_PORT, 1000, ask=True)
    answer = (OWN_R, fwd(1, 200, name="a"), fwd(2, 100, name="b"))
    sent = lan.sent_at(0.2)
    assert sent[:2] == [("c", r.address, (ask_c,)), ("r", c.address, answer)]
    assert {destination for sender, destination, _ in sent if sender == "c"} == {
        r.address,
        a.address,
        b.address,
    }


def test_peer_set_sharing_survives_the_rendezvous_going_away() -> None:
    lan, r, clients = rendezvous_lan()
    lan.run_until(1.0)
    for client in clients:
        client.take()
        assert client.known() == {"r", "a", "b", "c"} - {client.name}

    lan.remove(r)
    timeout = 1.0 * 2.0
    lan.run_until(1.0 + 3 * timeout)

    for client in clients:
        assert client.known() == {"a", "b", "c"} - {client.name}
        assert client.take() == [PeerRemoved(r.peer, "expired")]
        removed_at = client.events[-1][0]
        assert removed_at == client.heard[r.endpoint_id] + timeout
    # Without the rendezvous the clients keep announcing to each other directly.
    later = [s for s in lan.sent if s.at > 1.0 + timeout]
    assert {(s.sender, s.destination) for s in later if s.destination != r.address} == {
        (x.name, y.address) for x in clients for y in clients if x is not y
    }


def test_a_fast_rendezvous_does_not_flap_at_a_slower_client() -> None:
    lan = VirtualLan()
    r = lan.add("r", 9, targets=[], join=False, announce=False, rate_s=0.1)
    a = lan.add("a", 1, targets=[(r.address, True)], join=False, rate_s=1.0)
    lan.run_until(10.0)
    # One PeerAdded, no removal: r advertises a's slower rate in its answers to a.
    assert a.take() == [PeerAdded(replace(r.peer, rate_s=1.0))]


# --- multicast and direct announcements ----------------------------------------------------------


def test_peers_heard_on_multicast_lately_get_no_direct_announcements() -> None:
    d = make(seed=1, targets=[(GROUP, False)])
    d.handle_timer(now=0.0)
    d.frames_to_send()
    hear(d, ann(2), now=0.1, multicast=False)  # 2 is heard by unicast only
    hear(d, ann(3), now=0.1, multicast=True)  # 3 is heard on multicast
    assert d.frames_to_send() == [(own(), addr(2)), (own(), addr(3))]  # introductions

    announcements = 0
    while (now := d.next_deadline()) is not None and now < 6.0:
        d.handle_timer(now=now)
        assert d.frames_to_send() == [(own(), GROUP), (own(), addr(2))]
        hear(d, ann(2), now=now + 0.01, multicast=False)
        hear(d, ann(3), now=now + 0.01, multicast=True)
        announcements += 1
    assert announcements >= 5
    assert events(d) == [PeerAdded(peer(2)), PeerAdded(peer(3))]


def test_direct_announcements_resume_when_multicast_from_a_peer_stops() -> None:
    d = make(seed=2, targets=[(GROUP, False)])
    d.handle_timer(now=0.0)
    hear(d, ann(2), now=0.1, multicast=True)
    d.frames_to_send()
    while (now := d.next_deadline()) is not None and now < 6.0:
        d.handle_timer(now=now)
        direct = [dest for frame, dest in d.frames_to_send() if dest != GROUP]
        # Heard on multicast at 0.1 only; then by unicast only: direct once 2 s have passed.
        assert direct == ([addr(2)] if now - 0.1 > 2.0 else [])
        hear(d, ann(2), now=now + 0.01, multicast=False)


# --- bounds -----------------------------------------------------------------------------------


def test_newcomers_beyond_max_peers_are_dropped_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    d = make(max_peers=2, targets=[(GROUP, False)])
    d.handle_timer(now=0.0)
    d.frames_to_send()
    hear(d, ann(2), now=0.1)
    hear(d, ann(3), now=0.1)
    assert events(d) == [PeerAdded(peer(2)), PeerAdded(peer(3))]
    d.frames_to_send()
    d.prove(EndpointId(2), 1)  # both answered what we sent them: they keep their places
    d.prove(EndpointId(3), 1)

    hear(d, ann(4), now=0.2)
    hear(d, ann(4, ask=True), now=0.3, multicast=False)
    hear(d, fwd(5, 0), now=0.3, via=3, multicast=False)

    assert events(d) == []
    assert d.frames_to_send() == []
    assert d.counters["peers_full"] == 3
    assert log_messages(caplog, logging.WARNING) == ["peer table full (2); ignoring newcomers"]

    hear(d, ann(3, incarnation=2), now=0.4)  # a restart is not a newcomer
    assert events(d) == [PeerRemoved(peer(3), "restarted"), PeerAdded(peer(3, incarnation=2))]
    d.prove(EndpointId(3), 2)
    goodbye(d, 2, now=0.5)
    hear(d, ann(4), now=0.6)
    assert events(d) == [PeerRemoved(peer(2), "left"), PeerAdded(peer(4))]
    assert d.counters["peers_full"] == 3


def test_a_full_table_gives_the_place_of_an_unproven_peer_to_a_newcomer() -> None:
    # 100,000 fake endpoints announced and never answering fill the table; a real newcomer must
    # still get in, and, once it answered (proven), keep its place while the flood goes on.
    d = make(max_peers=10, targets=[(GROUP, False)])
    for n in range(1000, 1100):  # the flood: only the 10 most recent stay
        hear(d, ann(n), now=0.001 * (n - 1000))
    assert len(d.peers()) == 10
    assert d.counters["unproven_evicted"] == 90
    assert d.counters["peers_full"] == 0
    events(d)
    hear(d, ann(2, name="real"), now=0.2)
    assert PeerAdded(peer(2, name="real")) in events(d)
    d.prove(EndpointId(2), 1)
    for n in range(2000, 2100):  # the flood goes on
        hear(d, ann(n), now=0.3 + 0.001 * (n - 2000))
    assert any(p.name == "real" for p in d.peers())
    removed = [e for e in events(d) if isinstance(e, PeerRemoved)]
    assert {e.reason for e in removed} == {"evicted"}
    assert all(e.peer.name != "real" for e in removed)


def test_two_network_ids_on_one_lan_never_see_each_other() -> None:
    lan = VirtualLan()
    a = lan.add("a", 1, network_id=1)
    b = lan.add("b", 2, network_id=1)
    c = lan.add("c", 3, network_id=2)
    d = lan.add("d", 4, network_id=2)
    e = lan.add("e", 5, network_id=2, targets=[(GROUP, False), (a.address, True)])
    lan.run_until(10.0)
    assert a.known() == {"b"}
    assert b.known() == {"a"}
    assert c.known() == {"d", "e"}
    assert d.known() == {"c", "e"}
    assert e.known() == {"c", "d"}
    assert lan.counters["foreign_network"] > 0
    assert not [s for s in lan.sent if s.sender == "a" and s.destination == e.address]


# --- properties -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spec:
    """One endpoint of a generated scenario."""

    rate_ms: int
    multiplier: float
    start_ms: int


@dataclass(frozen=True)
class Scenario:
    """A generated LAN: endpoints, loss, how long to run after convergence, the seed of it all."""

    specs: tuple[Spec, ...]
    loss: float
    extra_ms: int
    seed: int


def scenarios(max_endpoints: int) -> st.SearchStrategy[Scenario]:
    """Random endpoints (rate 50..2000 ms, multiplier 1.5..5, start 0..3 s), loss 0..30 %."""
    spec = st.builds(
        Spec,
        rate_ms=st.integers(50, 2000),
        multiplier=st.floats(1.5, 5.0),
        start_ms=st.integers(0, 3000),
    )
    return st.builds(
        Scenario,
        specs=st.lists(spec, min_size=2, max_size=max_endpoints).map(tuple),
        loss=st.one_of(st.just(0.0), st.floats(0.0, 0.3)),
        extra_ms=st.integers(0, 10_000),
        seed=st.integers(0, 2**32 - 1),
    )


PROPERTY_SETTINGS = settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


class Invariants:
    """Checks what must hold at every instant of a virtual LAN run."""

    def __init__(
        self, lan: VirtualLan, last_heard: Callable[[Node, EndpointId], float], slack: float
    ) -> None:
        self.lan = lan
        self.last_heard = last_heard
        self.slack = slack
        lan.after_timer.append(self.after_timer)
        lan.after_step.append(self.after_step)

    def after_timer(self, node: Node, now: float) -> None:
        deadline = node.discovery.next_deadline()
        assert deadline is None or deadline > now, (node.name, now, deadline)

    def after_step(self, now: float) -> None:
        for node in self.lan.nodes:
            if not node.up:
                continue
            config = node.discovery.config
            for known in node.discovery.peers():
                silence = now - self.last_heard(node, known.endpoint_id)
                timeout = known.rate_s * config.multiplier
                context = (node.name, known.name, now, silence, timeout)
                assert silence < timeout + self.slack, context
            deadline = node.discovery.next_deadline()
            if deadline is not None and node.timer_calls:
                assert deadline >= node.timer_calls[-1], (node.name, deadline, node.timer_calls[-1])

    def check_events(self) -> None:
        """Added and Removed alternate per peer, starting with Added; the table matches them."""
        for node in self.lan.nodes:
            last: dict[EndpointId, PeerEvent] = {}
            for _, event in node.events:
                endpoint_id = event.peer.endpoint_id
                previous = last.get(endpoint_id)
                if isinstance(event, PeerAdded):
                    assert not isinstance(previous, PeerAdded), (node.name, event)
                else:
                    assert isinstance(previous, PeerAdded), (node.name, event)
                    assert previous.peer.incarnation == event.peer.incarnation
                last[endpoint_id] = event
            if node.up:
                added = {i for i, event in last.items() if isinstance(event, PeerAdded)}
                assert {p.endpoint_id for p in node.discovery.peers()} == added


def start_all(lan: VirtualLan, scenario: Scenario, **add: Any) -> list[Node]:
    """Start the endpoints of ``scenario`` at their times; return them in start order."""
    nodes = []
    order = sorted(range(len(scenario.specs)), key=lambda i: scenario.specs[i].start_ms)
    for i in order:
        spec = scenario.specs[i]
        lan.run_until(spec.start_ms / 1000)
        name = f"e{i}"
        node = lan.add(
            name,
            i + 1,
            rate_s=spec.rate_ms / 1000,
            multiplier=spec.multiplier,
            seed=scenario.seed + i,
            **add,
        )
        nodes.append(node)
    return nodes


@PROPERTY_SETTINGS
@given(scenarios(max_endpoints=8))
def test_multicast_lan_invariants(scenario: Scenario) -> None:
    lan = VirtualLan(loss=scenario.loss, seed=scenario.seed)
    checks = Invariants(lan, lambda node, endpoint_id: node.heard[endpoint_id], slack=0.0)
    nodes = start_all(lan, scenario)
    last = nodes[-1]
    converged_at = lan.now + 2 * last.discovery.config.rate_s
    names = {node.name for node in nodes}

    lan.run_until(converged_at)
    if scenario.loss == 0.0:
        for node in nodes:
            assert node.known() == names - {node.name}, (node.name, lan.now)

    lan.run_until(converged_at + scenario.extra_ms / 1000)
    checks.check_events()
    if scenario.loss == 0.0:
        assert not [e for _, _, e in lan.events if isinstance(e, PeerRemoved)]
        for node in nodes:
            assert node.known() == names - {node.name}


@PROPERTY_SETTINGS
@given(scenarios(max_endpoints=6), st.integers(50, 2000))
def test_rendezvous_lan_invariants(scenario: Scenario, rendezvous_rate_ms: int) -> None:
    lan = VirtualLan(loss=scenario.loss, seed=scenario.seed)
    r = lan.add("r", 99, targets=[], join=False, announce=False, rate_s=rendezvous_rate_ms / 1000)

    def last_heard(node: Node, endpoint_id: EndpointId) -> float:
        # What a client knows second hand, the rendezvous heard first hand.
        return max(node.heard.get(endpoint_id, -math.inf), r.heard.get(endpoint_id, -math.inf))

    # Ages travel in whole milliseconds, so second-hand news can look up to 0.5 ms younger.
    checks = Invariants(lan, last_heard, slack=0.0005 + 1e-9)
    nodes = start_all(lan, scenario, targets=[(r.address, True)], join=False)
    last = nodes[-1]
    converged_at = lan.now + 2 * last.discovery.config.rate_s
    names = {node.name for node in nodes}

    lan.run_until(converged_at)
    if scenario.loss == 0.0:
        assert r.known() == names
        for node in nodes:
            assert node.known() - {"r"} == names - {node.name}, (node.name, lan.now)

    lan.run_until(converged_at + scenario.extra_ms / 1000)
    checks.check_events()
    if scenario.loss == 0.0:
        # Nobody loses anybody, the rendezvous included (it advertises the asker's rate).
        removed = [e for _, _, e in lan.events if isinstance(e, PeerRemoved)]
        assert removed == []
        for node in nodes:
            assert node.known() == (names | {"r"}) - {node.name}


def test_event_history_checker_catches_a_double_add() -> None:
    lan = VirtualLan()
    checks = Invariants(lan, lambda node, endpoint_id: lan.now, slack=0.0)
    node = lan.add("a", 1)
    node.events.extend([(0.0, PeerAdded(peer(2))), (0.1, PeerAdded(peer(2)))])
    with pytest.raises(AssertionError):
        checks.check_events()


def test_implausible_incarnations_are_refused_and_long_rates_capped() -> None:
    # A forged incarnation of 2**53 - 1 would look newer than any real restart to come; a rate
    # of an hour would keep a forged peer for two hours after its last word.
    d = make(announce=False)  # our rate: 1 s
    hear(d, ann(2, incarnation=2**53 - 1), now=0.0)
    assert events(d) == []
    assert d.counters["implausible_incarnation"] == 1
    hear(d, ann(3, rate_ms=3_600_000), now=0.0)
    assert events(d) == [PeerAdded(peer(3, rate_s=60.0))]  # max(10 x 1 s, 60 s)
    d.handle_timer(now=119.0)
    assert events(d) == []
    d.handle_timer(now=120.0)
    assert events(d) == [PeerRemoved(peer(3, rate_s=60.0), "expired")]
