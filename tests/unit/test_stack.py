"""The layers wired together (no sockets): bundles of small messages, order with large ones."""

from __future__ import annotations

import random

import pytest

from glue import wire
from glue.discovery import DiscoveryConfig
from glue.events import MessageReceived, PeerRemoved
from glue.outbox import Outgoing, Publications
from glue.sim import Simulation
from glue.stack import FRAME_OVERHEAD_BYTES, LIVENESS_SIGNALS, Stack, StackConfig
from glue.topics import DIRECT_ENVELOPE as E
from glue.topics import TopicsConfig
from glue.transport import TransportConfig
from glue.wire import Data, EndpointId

A, B = EndpointId(1), EndpointId(2)


def _stack(
    endpoint_id: EndpointId,
    datagram_bytes: int = 1472,
    *,
    topics: TopicsConfig | None = None,
    seed: int = 1,
    **transport: float,
) -> Stack:
    identity = DiscoveryConfig(
        endpoint_id=endpoint_id,
        incarnation=int(endpoint_id),
        name=f"n{endpoint_id}",
        port=40000 + endpoint_id,
        host=f"10.0.0.{endpoint_id}",
    )
    config = StackConfig(
        network_id=1,
        discovery=identity,
        transport=TransportConfig(**transport),  # type: ignore[arg-type]
        topics=TopicsConfig() if topics is None else topics,
        datagram_bytes=datagram_bytes,
    )
    return Stack(config, rng=random.Random(seed), now=0.0)


def _address(stack: Stack) -> tuple[str, int]:
    config = stack.config.discovery
    return (config.host, config.port)


def _pair(datagram_bytes: int = 1472, **transport: float) -> tuple[Stack, Stack]:
    a, b = _stack(A, datagram_bytes, **transport), _stack(B, datagram_bytes, **transport)
    for sender, receiver in ((a, b), (b, a)):
        config = sender.config.discovery
        announce = wire.Announce(
            config.endpoint_id, config.incarnation, config.name, config.host, config.port, 1000
        )
        header = wire.Header(1, config.endpoint_id, config.incarnation)
        receiver.receive_datagram(
            wire.encode(header, [announce]), _address(sender), multicast=True, now=0.0
        )
    for stack in (a, b):
        stack.datagrams_to_send(now=0.0)
        while stack.next_event() is not None:
            pass
    return a, b


def _frames(datagrams: list[tuple[bytes, tuple[str, int]]]) -> list[wire.Frame]:
    return [f for data, _ in datagrams for f in wire.decode(data, network_id=1).frames]


def _deliver(
    datagrams: list[tuple[bytes, tuple[str, int]]], sender: Stack, to: Stack, now: float
) -> list[bytes]:
    for data, _ in datagrams:
        to.receive_datagram(data, _address(sender), multicast=False, now=now)
    got = []
    while (event := to.next_event()) is not None:
        if isinstance(event, MessageReceived):
            got.append(event.payload)
    return got


def test_small_messages_of_one_burst_travel_as_one_bundle_frame() -> None:
    a, b = _pair()
    for payload in (b"one", b"two", b"three"):
        assert a.send(B, E + payload, expires_at=10.0, now=0.0)
    datagrams = a.datagrams_to_send(now=0.0)
    [frame] = [f for f in _frames(datagrams) if isinstance(f, Data)]
    assert frame.messages == ((6, frame.ttl_ms), (6, frame.ttl_ms), (8, frame.ttl_ms))
    assert frame.payload == E + b"one" + E + b"two" + E + b"three"
    assert _deliver(datagrams, a, b, now=0.001) == [b"one", b"two", b"three"]


def test_a_large_message_keeps_its_place_between_small_ones() -> None:
    a, b = _pair()
    large = bytes(range(256)) * 20  # 5120 bytes: fragmented, never bundled
    for payload in (b"before", large, b"after"):
        a.send(B, E + payload, expires_at=10.0, now=0.0)
    datagrams = a.datagrams_to_send(now=0.0)
    assert _deliver(datagrams, a, b, now=0.001) == [b"before", large, b"after"]


@pytest.mark.parametrize(("datagram_bytes", "size"), [(65507, 65536), (1472, 1300), (1472, 5000)])
def test_large_messages_of_one_burst_share_datagrams_at_their_edges(
    datagram_bytes: int, size: int
) -> None:
    a, b = _pair(datagram_bytes)
    messages = [bytes([n]) * size for n in range(12)]  # within the first congestion window
    for message in messages:
        a.send(B, (E, message), expires_at=10.0, now=0.0)  # (envelope, payload): not copied
    datagrams = a.datagrams_to_send(now=0.0)
    assert all(len(d) <= datagram_bytes for d, _ in datagrams)
    alone = -(-(size + len(E)) // (datagram_bytes - FRAME_OVERHEAD_BYTES))  # each on its own
    assert len(datagrams) < 12 * alone
    if datagram_bytes == 65507:
        assert len(datagrams) == 13  # one each, and one more, where two each were needed
    assert _deliver(datagrams, a, b, now=0.001) == messages
    # A burst starts afresh: no tail is carried into the next one.
    a.send(B, (E, messages[0]), expires_at=10.0, now=0.0)
    assert _deliver(a.datagrams_to_send(now=0.0), a, b, now=0.002) == messages[:1]


@pytest.mark.parametrize("envelope_bytes", [9, 200, 256, 257, 258, 300, 600])
def test_an_envelope_as_long_as_a_small_datagram_still_fragments_right(envelope_bytes: int) -> None:
    a, b = _pair(576)  # the smallest datagram size: 320 bytes of room per fragment
    envelope = b'{"x":"' + b"e" * (envelope_bytes - 9) + b'"}\n'  # a direct message's, padded
    assert len(envelope) == envelope_bytes
    payload = bytes(range(256)) * 20
    a.send(B, (envelope, payload), expires_at=10.0, now=0.0)
    a.send(B, (envelope, payload[::-1]), expires_at=10.0, now=0.0)
    datagrams = a.datagrams_to_send(now=0.0)
    assert all(len(d) <= 576 for d, _ in datagrams)
    assert _deliver(datagrams, a, b, now=0.001) == [payload, payload[::-1]]


def test_a_bundled_message_that_expired_before_a_resend_is_dropped_alone() -> None:
    a, b = _pair(initial_rto_s=0.05)
    a.send(B, E + b"short", expires_at=0.03, now=0.0)
    a.send(B, E + b"long", expires_at=10.0, now=0.0)
    lost = a.datagrams_to_send(now=0.0)  # never delivered
    assert next(f.messages for f in _frames(lost) if isinstance(f, Data))[0][0] == 8
    deadline = a.transport.next_deadline()  # the retransmission timer
    assert deadline is not None
    a.handle_timer(now=deadline)
    resent = a.datagrams_to_send(now=deadline)
    [frame] = [f for f in _frames(resent) if isinstance(f, Data)]
    assert frame.messages == ((8, 0), (7, frame.ttl_ms))  # "short" has no time left
    assert _deliver(resent, a, b, now=deadline + 0.001) == [b"long"]
    assert b.all_counters()["messages_expired_in_bundle"] == 1


def test_bundled_bytes_count_against_the_send_queue() -> None:
    a, _ = _pair(queue_bytes=2000)
    assert a.can_send(B, 1000)
    a.send(B, b"x" * 1000, expires_at=10.0, now=0.0)
    assert a.can_send(B, 1000)
    a.send(B, b"y" * 1000, expires_at=10.0, now=0.0)
    assert not a.can_send(B, 1)  # still waiting in the bundle, not yet in the transport


# --- peers taken for gone -------------------------------------------------------------------------


def _announce(sender: Stack, receiver: Stack, now: float) -> list[object]:
    """``sender``'s announcement reaches ``receiver``; returns the events it caused."""
    config = sender.config.discovery
    announce = wire.Announce(
        config.endpoint_id, config.incarnation, config.name, config.host, config.port, 1000
    )
    header = wire.Header(1, config.endpoint_id, config.incarnation)
    receiver.receive_datagram(
        wire.encode(header, [announce]), _address(sender), multicast=True, now=now
    )
    return _events(receiver)


def _events(stack: Stack) -> list[object]:
    events = []
    while (event := stack.next_event()) is not None:
        events.append(event)
    return events


def _removals(events: list[object]) -> list[tuple[str, str]]:
    return [(e.peer.name, e.reason) for e in events if isinstance(e, PeerRemoved)]


def test_the_resend_timeout_stays_under_a_quarter_of_the_discovery_timeout() -> None:
    # Announcements every 1 s, a peer dropped after 2 s: a sender waiting for acks resends at
    # least every 0.5 s, so the peer hears it (and it hears the acks) between announcements.
    a = _stack(A)
    assert a.transport.config.max_rto_s == pytest.approx(2.0 / LIVENESS_SIGNALS)
    assert _stack(A, max_rto_s=0.1).transport.config.max_rto_s == 0.1  # already lower: kept


def test_a_message_half_received_when_its_sender_was_taken_for_gone_is_still_delivered() -> None:
    a, b = _pair()
    large = bytes(range(256)) * 20  # 5120 bytes: four fragments at 1472
    a.send(B, E + large, expires_at=60.0, now=0.0)
    datagrams = a.datagrams_to_send(now=0.0)
    assert len(datagrams) >= 3
    assert _deliver(datagrams[:1], a, b, now=0.1) == []
    b.handle_timer(now=2.1)  # nothing heard from A for its timeout (1 s x 2)
    assert _removals(_events(b)) == [("n1", "expired")]
    _announce(a, b, now=2.2)  # A was only silent: same incarnation
    assert _deliver(datagrams[1:], a, b, now=2.3) == [large]
    assert b.reassembler.counters == {"messages_reassembled": 1}


def test_a_receiver_taken_for_gone_gets_its_messages_when_it_returns() -> None:
    a, b = _pair()
    a.send(B, E + b"held", expires_at=60.0, now=0.0)
    a.datagrams_to_send(now=0.0)  # lost
    a.handle_timer(now=2.0)  # B silent for its timeout
    assert _removals(_events(a)) == [("n2", "expired")]
    assert not a.idle()  # the message is held for B's return, not dropped
    assert a.take_delivery_failures() == []
    assert a.silent_peers(3.9) == []
    assert a.next_silent_at(2.0) == 4.0  # counted as silent one more timeout later
    assert [(peer.name, count) for peer, count, _ in a.silent_peers(4.0)] == [("n2", 1)]
    _announce(b, a, now=4.5)  # it comes back, same incarnation
    assert a.silent_peers(4.5) == []
    a.handle_timer(now=4.5)
    assert _deliver(a.datagrams_to_send(now=4.5), a, b, now=4.5) == [b"held"]
    b.handle_timer(now=4.6)
    _deliver(b.datagrams_to_send(now=4.6), b, a, now=4.6)
    assert a.idle()
    assert a.take_delivery_failures() == []


def test_a_peer_that_leaves_with_messages_unacknowledged_is_reported_once() -> None:
    a, b = _pair()
    a.send(B, E + b"one", expires_at=60.0, now=0.0)
    a.send(B, E + b"two", expires_at=60.0, now=0.0)
    a.datagrams_to_send(now=0.0)  # lost
    goodbye = wire.encode(wire.Header(1, B, int(B)), [wire.Goodbye()])
    a.receive_datagram(goodbye, _address(b), multicast=False, now=0.5)
    assert _removals(_events(a)) == [("n2", "left")]
    assert a.idle()  # nothing is held for a peer that said goodbye
    assert [(peer.name, count) for peer, count in a.take_delivery_failures()] == [("n2", 2)]
    assert a.take_delivery_failures() == []


def test_messages_held_for_a_silent_peer_are_reported_when_they_expire() -> None:
    a, _b = _pair()
    a.send(B, E + b"short-lived", expires_at=5.0, now=0.0)
    a.datagrams_to_send(now=0.0)  # lost
    a.handle_timer(now=2.0)
    _events(a)
    a.handle_timer(now=5.0)
    assert a.idle()
    assert [(peer.name, count) for peer, count in a.take_delivery_failures()] == [("n2", 1)]
    assert a.silent_peers(5.0) == []


def test_leaving_acknowledges_what_arrived_before_saying_goodbye() -> None:
    # A subscriber that stops right after a message must not leave its publisher believing the
    # message was lost: its ack (otherwise delayed) goes first, then the goodbye.
    a, b = _pair()
    a.send(B, E + b"last", expires_at=60.0, now=0.0)
    assert _deliver(a.datagrams_to_send(now=0.0), a, b, now=0.001) == [b"last"]
    b.leave()
    datagrams = b.datagrams_to_send(now=0.001)
    kinds = [type(frame).__name__ for frame in _frames(datagrams)]
    assert kinds[0] == "Ack"
    assert "Goodbye" in kinds[1:]
    for data, _ in datagrams:
        a.receive_datagram(data, _address(b), multicast=False, now=0.002)
    assert _removals(_events(a)) == [("n2", "left")]
    assert a.take_delivery_failures() == []


def test_the_datagram_size_follows_the_path_to_each_peer() -> None:
    sizes = {"10.0.0.2": 8972}  # B is reached through a jumbo-frame interface
    identity = DiscoveryConfig(endpoint_id=A, incarnation=1, name="n1", port=40001)
    config = StackConfig(
        network_id=1, discovery=identity, datagram_bytes=1472, path_datagram_bytes=sizes.get
    )
    a = Stack(config, rng=random.Random(1), now=0.0)
    for peer_id, host in (
        (B, "10.0.0.2"),
        (EndpointId(3), "10.0.0.3"),
        (EndpointId(4), "127.0.0.9"),
    ):
        announce = wire.Announce(peer_id, 7, f"p{peer_id}", host, 40000, 1000)
        header = wire.Header(1, peer_id, 7)
        a.receive_datagram(wire.encode(header, [announce]), (host, 40000), multicast=True, now=0.0)
    assert {peer: route.datagram_bytes for peer, route in a._routes.items()} == {
        B: 8972,  # the path says so
        EndpointId(3): 1472,  # no route known: the chosen interface's
        EndpointId(4): wire.MAX_DATAGRAM_BYTES,  # loopback
    }


def test_not_served_answers_wait_for_room_in_the_requesters_send_queue() -> None:
    # Any peer may send requests to names nobody serves here; each is answered by the layer
    # itself. One that never acknowledges must not make those answers pile up for it.
    sim = Simulation(seed=3)
    asker, server = sim.add_node("asker"), sim.add_node("server")
    assert sim.run_until(lambda: asker.knows(server) and server.knows(asker), timeout=5)
    to = (server.endpoint_id,)

    def ask(count: int) -> None:
        for _ in range(count):
            now = sim.now
            _, sends = asker.stack.requests.open(
                "nobody/here", b"", to, everyone=False, deadline=now + 5, now=now
            )
            for peer, message, deadline in sends:
                asker.stack.send(peer, message, expires_at=deadline, now=now)
            sim._touched[asker] = None
        sim.run_for(0.5)

    full = server.stack.transport
    original = full.has_room
    full.has_room = lambda peer, size: False  # type: ignore[method-assign]
    ask(20)
    assert server.stack.counters["requests_answers_not_sent_queue_full"] == 20
    assert full.in_flight(asker.endpoint_id) == 0  # nothing queued for it
    assert asker.stack.requests.counters["replies_unserved"] == 0
    full.has_room = original  # type: ignore[method-assign]
    ask(3)  # with room, answered as before
    assert asker.stack.requests.counters["replies_unserved"] == 3


# --- runs of publications (Stack.submit_many) -----------------------------------------------------


def _interested_pair(**transport: float) -> tuple[Stack, Stack]:
    """A pair where B subscribes to ``s/#`` and A knows it, and A subscribes to ``s/a`` itself."""
    a, b = _pair(**transport)
    b.subscribe("s/#", "t")
    a.subscribe("s/a", "t")
    for _ in range(3):
        for sender, receiver in ((a, b), (b, a)):
            for data, _ in sender.datagrams_to_send(now=0.0):
                receiver.receive_datagram(data, _address(sender), multicast=False, now=0.0)
            _events(sender)
    assert a.topics.subscribers("s/a") == (B,)
    return a, b


def _outputs(stack: Stack, now: float) -> tuple[list[bytes], list[object], object]:
    datagrams = [bytes(d) for d, _ in stack.datagrams_to_send(now=now)]
    messages = [
        (m.topic_name, m.sequence, m.payload, m.expires_at)
        for e in _events(stack)
        for m in getattr(e, "messages", ())
    ]
    history = {t: (h.sequence, list(h.entries)) for t, h in stack.topics._history.items()}
    return datagrams, messages, (history, stack.topics._history_bytes, stack.all_counters())


@pytest.mark.parametrize(
    ("count", "size", "queue_bytes", "depth"),
    [(50, 64, 1 << 20, None), (50, 64, 1 << 20, 3), (50, 64, 2000, 0), (5, 3000, 1 << 20, 2)],
)
def test_a_run_of_publications_is_placed_as_one_publish_after_another(
    count: int, size: int, queue_bytes: int, depth: int | None
) -> None:
    # Same numbering, envelopes, bundles, local deliveries, history, holds and counters as
    # submitting them one by one; the second message expired before it was placed.
    payloads = [bytes([n]) * size for n in range(count)]
    expiries = [10.0 + n for n in range(count)]
    expiries[1] = 0.5
    one_by_one, _ = _interested_pair(queue_bytes=queue_bytes)
    together, _ = _interested_pair(queue_bytes=queue_bytes)
    for stack in (one_by_one, together):  # (a topic published before: its caches are warm)
        stack.submit(Outgoing(b"first", None, 20.0, ("s/a", "t", depth, False)), 1.0)
    for payload, expires_at in zip(payloads, expiries, strict=True):
        one_by_one.submit(Outgoing(payload, None, expires_at, ("s/a", "t", depth, False)), 1.0)
    run = Publications(("s/a", "t", depth, False), payloads, expiries, size * count)
    placed = together.submit_many(run, 1.0)
    assert _outputs(together, 1.0) == _outputs(one_by_one, 1.0)
    held = together.outbox.held.get(B, ())
    assert placed == size * (count - len(held))
    if queue_bytes < size * count:
        assert held, "B's queue is full: the rest of the run waits for it, in order"
        assert [item.payload for item in held] == [
            item.payload for item in one_by_one.outbox.held[B]
        ]
