"""A virtual LAN for driving several ``Discovery`` state machines by hand: no sockets, no clock.

Each :class:`Node` is one endpoint: a ``Discovery`` plus the data address ``("10.0.0.N", port)`` its
announcements are sent from. The LAN plays the runtime's part (``glue.endpoint``):

- after every burst of inputs it pulls ``frames_to_send()`` and groups them per destination, one
  datagram per (burst, destination), as ``Endpoint._flush`` does;
- a datagram to a multicast group reaches every node that joined the group (the sender too: the
  runtime drops its own looped-back datagrams, and discovery ignores its own announcements anyway)
  with ``multicast=True``; a datagram to any other address reaches the node whose data address it
  is, with ``multicast=False``;
- the header is ``Header(network_id, endpoint_id, incarnation)`` of the sender and the source
  address is the sender's data address; a datagram from another network id is dropped before
  discovery sees it (``wire.decode`` raises there);
- delivery takes no time; each delivery to one receiver is lost with probability ``loss``
  (seeded); a node taken down with :meth:`VirtualLan.remove` neither sends nor receives;
- time moves only in :meth:`VirtualLan.run_until`: to the earliest ``next_deadline`` of any node,
  where every due node gets ``handle_timer(now=max(deadline, now))``, then the frames are delivered.

Everything that happens is recorded (``sent``, ``events``, per node ``heard``) for assertions.
"""

from __future__ import annotations

import ipaddress
import random
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from glue.discovery import Address, Discovery, DiscoveryConfig, Target
from glue.events import Peer, PeerEvent
from glue.wire import Announce, EndpointId, Frame, Goodbye, Header

__all__ = ["DATA_PORT", "GROUP", "Node", "Sent", "VirtualLan", "peer_of"]

#: The default discovery group (as in the settings' default).
GROUP: Address = ("239.192.137.1", 27320)
DATA_PORT = 7400
#: Deliveries per instant beyond which an announcement storm fails the test instead of hanging.
_MAX_DELIVERIES_PER_INSTANT = 100_000


def is_multicast(address: Address) -> bool:
    """Whether ``address`` is a multicast group."""
    return ipaddress.IPv4Address(address[0]).is_multicast


@dataclass(eq=False)
class Node:
    """One endpoint on the virtual LAN."""

    name: str
    address: Address
    network_id: int
    discovery: Discovery
    joined: bool
    up: bool = True
    #: Every event pulled from discovery, with the time it was pulled.
    events: list[tuple[float, PeerEvent]] = field(default_factory=list)
    #: The ``now`` of every ``handle_timer`` call.
    timer_calls: list[float] = field(default_factory=list)
    #: Per sender id: when its own (not forwarded) announcement was last delivered here.
    heard: dict[EndpointId, float] = field(default_factory=dict)
    _taken: int = 0

    @property
    def endpoint_id(self) -> EndpointId:
        """The node's endpoint id."""
        return self.discovery.config.endpoint_id

    @property
    def header(self) -> Header:
        """The header of every datagram this node sends."""
        config = self.discovery.config
        return Header(self.network_id, config.endpoint_id, config.incarnation)

    @property
    def peer(self) -> Peer:
        """How other nodes on the LAN see this node."""
        return peer_of(self)

    def known(self) -> set[str]:
        """Names of the peers the node's discovery knows now."""
        return {peer.name for peer in self.discovery.peers()}

    def take(self) -> list[PeerEvent]:
        """The events recorded since the last ``take``."""
        events = [event for _, event in self.events[self._taken :]]
        self._taken = len(self.events)
        return events


@dataclass(frozen=True, slots=True)
class Sent:
    """One datagram a node sent (whether or not anybody received it)."""

    at: float
    sender: str
    destination: Address
    frames: tuple[Frame, ...]


def peer_of(node: Node) -> Peer:
    """The ``Peer`` other nodes should report for ``node`` (host taken from its data address)."""
    config = node.discovery.config
    return Peer(
        config.endpoint_id,
        config.incarnation,
        config.name,
        config.host or node.address[0],
        config.port,
        max(1, round(config.rate_s * 1000)) / 1000.0,
    )


class VirtualLan:
    """Several discovery state machines on one simulated segment, moved by a virtual clock."""

    def __init__(self, *, now: float = 0.0, loss: float = 0.0, seed: int = 0) -> None:
        self.now = now
        self.loss = loss
        self.nodes: list[Node] = []
        self.sent: list[Sent] = []
        self.events: list[tuple[float, str, PeerEvent]] = []
        self.counters: dict[str, int] = {"delivered": 0, "lost": 0, "foreign_network": 0}
        #: Called after every ``handle_timer`` with the node and the ``now`` it was given.
        self.after_timer: list[Callable[[Node, float], None]] = []
        #: Called after every instant (all due timers fired, all frames delivered).
        self.after_step: list[Callable[[float], None]] = []
        self._rng = random.Random(seed)
        self._queue: deque[tuple[Node, Address, tuple[Frame, ...]]] = deque()

    # --- building the LAN -----------------------------------------------------------------------

    def add(
        self,
        name: str,
        n: int,
        *,
        endpoint_id: int | None = None,
        incarnation: int = 1,
        rate_s: float = 1.0,
        multiplier: float = 2.0,
        targets: Sequence[Target] | None = None,
        join: bool = True,
        network_id: int = 1,
        announce: bool = True,
        max_peers: int = 1000,
        host: str = "",
        port: int = DATA_PORT,
        seed: int | None = None,
    ) -> Node:
        """Start an endpoint at ``10.0.0.n`` now; by default it joins and announces to ``GROUP``."""
        config = DiscoveryConfig(
            endpoint_id=EndpointId(n if endpoint_id is None else endpoint_id),
            incarnation=incarnation,
            name=name,
            port=port,
            host=host,
            rate_s=rate_s,
            multiplier=multiplier,
            max_peers=max_peers,
            announce=announce,
        )
        discovery = Discovery(config, rng=random.Random(n if seed is None else seed), now=self.now)
        discovery.set_targets([(GROUP, False)] if targets is None else targets)
        node = Node(name, (f"10.0.0.{n}", port), network_id, discovery, joined=join)
        self.nodes.append(node)
        return node

    def remove(self, node: Node) -> None:
        """Take ``node`` off the LAN: from now on nothing reaches it and nothing leaves it."""
        node.up = False

    def leave(self, node: Node) -> None:
        """Stop ``node`` cleanly: its goodbyes go out now."""
        node.discovery.leave()
        self._collect(node)
        self._flush()

    def deliver(self, node: Node) -> None:
        """Send whatever ``node`` has queued (after an input the test fed it by hand)."""
        self._collect(node)
        self._flush()

    # --- time -----------------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """The earliest deadline of any node on the LAN."""
        deadlines = [d for node in self._up() if (d := node.discovery.next_deadline()) is not None]
        return min(deadlines, default=None)

    def run_until(self, until: float) -> None:
        """Fire every deadline up to and including ``until``, then set the clock to ``until``."""
        while (deadline := self.next_deadline()) is not None and deadline <= until:
            self._step(max(deadline, self.now))
        self.now = max(self.now, until)

    def run_for(self, duration: float) -> None:
        """``run_until(now + duration)``."""
        self.run_until(self.now + duration)

    # --- queries --------------------------------------------------------------------------------

    def node(self, name: str) -> Node:
        """The node called ``name``."""
        return next(node for node in self.nodes if node.name == name)

    def sent_at(self, at: float) -> list[tuple[str, Address, tuple[Frame, ...]]]:
        """The datagrams sent at instant ``at``: (sender, destination, frames)."""
        return [(s.sender, s.destination, s.frames) for s in self.sent if s.at == at]

    # --- internals ------------------------------------------------------------------------------

    def _up(self) -> list[Node]:
        return [node for node in self.nodes if node.up]

    def _step(self, now: float) -> None:
        self.now = now
        due = [
            node
            for node in self._up()
            if (deadline := node.discovery.next_deadline()) is not None and deadline <= now
        ]
        for node in sorted(due, key=lambda node: node.address):
            node.discovery.handle_timer(now=now)
            node.timer_calls.append(now)
            self._collect(node)
            for hook in self.after_timer:
                hook(node, now)
        self._flush()
        for step_hook in self.after_step:
            step_hook(now)

    def _collect(self, node: Node) -> None:
        by_destination: dict[Address, list[Frame]] = {}
        for frame, destination in node.discovery.frames_to_send():
            by_destination.setdefault(destination, []).append(frame)
        if node.up:
            for destination, frames in by_destination.items():
                self._queue.append((node, destination, tuple(frames)))
        while (event := node.discovery.next_event()) is not None:
            node.events.append((self.now, event))
            self.events.append((self.now, node.name, event))

    def _receivers(self, destination: Address) -> list[tuple[Node, bool]]:
        if is_multicast(destination):
            return [(node, True) for node in self._up() if node.joined]
        return [(node, False) for node in self._up() if node.address == destination]

    def _flush(self) -> None:
        deliveries = 0
        while self._queue:
            sender, destination, frames = self._queue.popleft()
            if not sender.up:
                continue
            self.sent.append(Sent(self.now, sender.name, destination, frames))
            for receiver, multicast in self._receivers(destination):
                if receiver.network_id != sender.network_id:
                    self.counters["foreign_network"] += 1
                    continue
                if self.loss and self._rng.random() < self.loss:
                    self.counters["lost"] += 1
                    continue
                self._deliver(sender, receiver, frames, multicast=multicast)
                deliveries += 1
                if deliveries > _MAX_DELIVERIES_PER_INSTANT:
                    raise AssertionError(f"announcement storm at t={self.now}")

    def _deliver(
        self, sender: Node, receiver: Node, frames: tuple[Frame, ...], *, multicast: bool
    ) -> None:
        self.counters["delivered"] += 1
        for frame in frames:
            if isinstance(frame, Announce) and not frame.forwarded:
                receiver.heard[frame.endpoint_id] = self.now
            assert isinstance(frame, Announce | Goodbye), frame  # all discovery ever sends
            receiver.discovery.receive(
                frame,
                sender.header,
                sender.address,
                multicast=multicast,
                now=self.now,
            )
        self._collect(receiver)
