"""A deterministic simulator: virtual clock, seeded lossy network, partitions that heal.

Each simulated node is an unmodified :class:`~glue.stack.Stack` (the same discovery, transport
and fragmentation code the asyncio runtime drives over real sockets), given datagrams as bytes
and asked for datagrams as bytes, so the wire format is exercised too. The network between them
drops, duplicates, delays (and so reorders) datagrams with probabilities drawn from one
``random.Random(seed)``; multicast reaches every member, each copy with its own fate; a
partition drops everything between two groups until it heals. Time moves only when the simulator
advances it, to the next delivery or the next deadline any node asked for, so a run of minutes of
virtual time takes milliseconds, and a seed reproduces a run exactly. Datagrams due at one
instant reach a node as a burst, as a runtime reads them in one wake-up: acks that fall due in
the middle of it go at once (``Stack.due_acks``), the rest after it.

    sim = Simulation(seed=7, loss=0.2)
    a, b = sim.add_node("a"), sim.add_node("b")
    sim.run_until(lambda: b.knows(a), timeout=5)
    a.send(b, b"hello", expiry=1.0)
    sim.run_for(1.0)
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from glue.discovery import Address, DiscoveryConfig
from glue.events import Message, MessageReceived, PeerAdded, PeerRemoved, StackEvent, TopicDelivery
from glue.outbox import Outgoing, Publications
from glue.stack import Stack, StackConfig
from glue.topics import direct_message
from glue.transport import TransportConfig
from glue.wire import EndpointId, OutDatagram

__all__ = ["NetworkProfile", "SimNode", "Simulation"]

GROUP: Address = ("239.192.137.1", 27320)


@dataclass(frozen=True, slots=True)
class NetworkProfile:
    """The fate of each datagram copy: lost, duplicated, and how long it takes."""

    loss: float = 0.0
    duplicate: float = 0.0
    min_delay_s: float = 0.0002
    max_delay_s: float = 0.002


@dataclass(slots=True, eq=False)
class SimNode:
    """One endpoint in the simulation."""

    name: str
    address: Address
    stack: Stack
    sim: Simulation
    events: list[tuple[float, StackEvent]] = field(default_factory=list)
    received: list[MessageReceived] = field(default_factory=list)
    #: Topic messages delivered to this node's subscriptions (once per message).
    topic_messages: list[Message] = field(default_factory=list)

    @property
    def endpoint_id(self) -> EndpointId:
        """The node's endpoint id."""
        return self.stack.endpoint_id

    def knows(self, *others: SimNode) -> bool:
        """Whether discovery on this node knows every one of ``others``."""
        return all(self.stack.discovery.peer(o.endpoint_id) is not None for o in others)

    def send(self, to: SimNode, payload: bytes, *, expiry: float) -> bool:
        """Queue ``payload`` to ``to`` (False if ``to`` is not a known peer)."""
        now = self.sim.now
        peer = to.endpoint_id
        if peer not in self.stack.recipients():
            return False
        # Stack.submit, as the runtimes place every message (holding it if the queue is full).
        self.stack.submit(Outgoing(direct_message(payload), (peer,), now + expiry), now)
        self.sim._touched[self] = None
        return True

    def publish(
        self,
        topic: str,
        topic_type: str,
        payload: bytes,
        *,
        expiry: float,
        history_depth: int | None = None,
        retain: bool = False,
    ) -> int:
        """Publish on ``topic`` to every interested peer; returns how many peers it went to."""
        now = self.sim.now
        item = Outgoing(payload, None, now + expiry, (topic, topic_type, history_depth, retain))
        self.stack.submit(item, now)  # numbered by the topics layer, as the runtimes do
        self.sim._touched[self] = None
        return len(item.targets or ())

    def publish_many(
        self,
        topic: str,
        topic_type: str,
        payloads: list[bytes],
        *,
        expiry: float,
        history_depth: int | None = None,
        retain: bool = False,
    ) -> None:
        """Publish each of ``payloads`` on ``topic``, in order, as one run (``Stack.submit_many``:
        how the runtimes place consecutive publications on a topic while frames are in flight,
        and ``publish_many``'s)."""
        now = self.sim.now
        run = Publications(
            (topic, topic_type, history_depth, retain),
            list(payloads),
            [now + expiry] * len(payloads),
            sum(map(len, payloads)),
        )
        self.stack.submit_many(run, now)
        self.sim._touched[self] = None

    def subscribe(self, pattern: str, topic_type: str, *, group: str | None = None) -> int:
        """Subscribe to ``pattern`` (a member of work-queue ``group`` if given); returns the
        subscription id."""
        subscription = self.stack.subscribe(pattern, topic_type, group=group)
        self.sim._touched[self] = None
        return subscription

    def done(self, message: Message) -> None:
        """A grouped message's callback returned (what a subscription reports)."""
        assert message.job is not None
        self.stack.topics.done(message.source_id, message.job, self.sim.now)
        self.sim._touched[self] = None

    def removals(self, other: SimNode) -> list[PeerRemoved]:
        """Every removal of ``other`` this node reported."""
        return [
            e
            for _, e in self.events
            if isinstance(e, PeerRemoved) and e.peer.endpoint_id == other.endpoint_id
        ]


class Simulation:
    """Nodes on one virtual layer-2 segment with a virtual clock."""

    def __init__(
        self,
        *,
        seed: int,
        profile: NetworkProfile | None = None,
        rate_s: float = 0.5,
        multiplier: float = 2.0,
        transport: TransportConfig | None = None,
        datagram_bytes: int = 1472,
        max_message_bytes: int = 4 * 1024 * 1024,
        slow_peer: str = "block",
    ) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.profile = profile or NetworkProfile()
        self.now = 0.0
        self.nodes: list[SimNode] = []
        self.datagrams_delivered = 0
        self._rate_s = rate_s
        self._multiplier = multiplier
        self._transport = transport or TransportConfig()
        self._datagram_bytes = datagram_bytes
        self._max_message_bytes = max_message_bytes
        self._drop_slow_peer = slow_peer == "drop"  # GLUE_SLOW_PEER
        self._queue: list[tuple[float, int, SimNode, bytes, Address, bool]] = []
        self._order = 0
        self._by_address: dict[Address, SimNode] = {}
        self._cut: set[frozenset[str]] = set()
        self._touched: dict[SimNode, None] = {}  # ordered, so runs are reproducible

    # --- building -------------------------------------------------------------------------------

    def add_node(self, name: str, *, endpoint_id: int | None = None) -> SimNode:
        """A node on 10.0.0.N announcing to, and listening on, the multicast group."""
        index = len(self.nodes) + 1
        address = (f"10.0.0.{index}", 40000 + index)
        config = StackConfig(
            network_id=1,
            discovery=DiscoveryConfig(
                endpoint_id=EndpointId(endpoint_id or index),
                incarnation=index,
                name=name,
                port=address[1],
                host=address[0],
                rate_s=self._rate_s,
                multiplier=self._multiplier,
            ),
            transport=self._transport,
            datagram_bytes=self._datagram_bytes,
            max_message_bytes=self._max_message_bytes,
            drop_slow_peer=self._drop_slow_peer,
        )
        stack = Stack(config, rng=random.Random(self.rng.random()), now=self.now)
        stack.set_targets([(GROUP, False)])
        node = SimNode(name, address, stack, self)
        self.nodes.append(node)
        self._by_address[address] = node
        self._touched[node] = None
        return node

    # --- faults ---------------------------------------------------------------------------------

    def partition(self, side: Iterable[SimNode], other: Iterable[SimNode]) -> None:
        """Drop every datagram between ``side`` and ``other`` until :meth:`heal`."""
        for a in side:
            for b in other:
                self._cut.add(frozenset((a.name, b.name)))

    def heal(self) -> None:
        """Remove every partition."""
        self._cut.clear()

    # --- running --------------------------------------------------------------------------------

    def run_for(self, seconds: float) -> None:
        """Advance the clock by ``seconds``, processing everything that happens."""
        self._run(self.now + seconds, None)

    def run_until(self, condition: Callable[[], bool], *, timeout: float) -> bool:
        """Advance until ``condition()`` holds (checked after each step) or ``timeout`` passes."""
        return self._run(self.now + timeout, condition)

    def _run(self, end: float, condition: Callable[[], bool] | None) -> bool:
        self._flush()
        while True:
            if condition is not None and condition():
                return True
            upcoming = self._next_time()
            if upcoming is None or upcoming > end:
                self.now = max(self.now, end)
                return condition() if condition is not None else True
            self.now = max(self.now, upcoming)
            self._step()

    def _next_time(self) -> float | None:
        times = [self._queue[0][0]] if self._queue else []
        for node in self.nodes:
            deadline = node.stack.next_deadline()
            if deadline is not None:
                times.append(deadline)
        return min(times, default=None)

    def _step(self) -> None:
        now = self.now
        while self._queue and self._queue[0][0] <= now:
            _, _, node, data, source, multicast = heapq.heappop(self._queue)
            stack = node.stack
            stack.receive_datagram(data, source, multicast=multicast, now=now)
            self.datagrams_delivered += 1
            self._touched[node] = None
            if now >= stack.transport.ack_due:  # as the runtimes do between two datagrams
                self._send(node, stack.due_acks(now=now))
        for node in self.nodes:
            deadline = node.stack.next_deadline()
            if deadline is not None and deadline <= now:
                node.stack.handle_timer(now=now)
                self._touched[node] = None
        self._flush()

    def _flush(self) -> None:
        while self._touched:
            node = next(iter(self._touched))
            del self._touched[node]
            stack = node.stack
            self._send(node, stack.datagrams_to_send(now=self.now))
            while (event := stack.next_event()) is not None:
                if isinstance(event, PeerAdded | PeerRemoved | MessageReceived):
                    node.events.append((self.now, event))
                if isinstance(event, MessageReceived):
                    node.received.append(event)
                elif isinstance(event, TopicDelivery):
                    node.topic_messages.extend(event.messages)

    def _send(self, node: SimNode, datagrams: list[tuple[OutDatagram, Address]]) -> None:
        for pieces, destination in datagrams:
            datagram = pieces if isinstance(pieces, bytes) else b"".join(pieces)
            if destination == GROUP:
                for member in self.nodes:
                    if member is not node:
                        self._transmit(node, member, datagram, multicast=True)
            else:
                target = self._by_address.get(destination)
                if target is not None:
                    self._transmit(node, target, datagram, multicast=False)

    def _transmit(self, sender: SimNode, to: SimNode, datagram: bytes, *, multicast: bool) -> None:
        if frozenset((sender.name, to.name)) in self._cut:
            return
        profile, rng = self.profile, self.rng
        copies = 0 if rng.random() < profile.loss else 1
        if copies and rng.random() < profile.duplicate:
            copies = 2
        for _ in range(copies):
            delay = rng.uniform(profile.min_delay_s, profile.max_delay_s)
            self._order += 1
            entry = (self.now + delay, self._order, to, datagram, sender.address, multicast)
            heapq.heappush(self._queue, entry)
