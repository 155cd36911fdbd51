"""GLUE_NETWORK_KEY over real sockets: sealed traffic flows; forged, replayed and foreign
datagrams are refused before any parser, counted, and logged once per source.

The attacker is a raw UDP socket in the same namespace; replayed datagrams are really captured
from the namespace's ``lo`` with an ``AF_PACKET`` socket and sent again.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from glue import EndpointManager, MessageReceived, wire
from glue.security import generate_key
from tests.helpers import Inbox, free_udp_port, multicast_settings, wait_until

KEY = generate_key()


@pytest.fixture
def group() -> str:
    return f"239.192.137.1:{free_udp_port()}"


def _settings(group: str, **extra: object) -> dict[str, object]:
    return multicast_settings(group, discovery_rate_milliseconds=100, **extra)


def _stream(count: int) -> list[bytes]:
    return [b"%d:" % n + bytes([n % 251]) * (70_000 if n % 50 == 0 else 100) for n in range(count)]


def test_sealed_endpoints_exchange_small_and_large_messages_in_order(group: str) -> None:
    with (
        EndpointManager.from_env(**_settings(group, network_key=KEY)) as tx,
        EndpointManager.from_env(**_settings(group, network_key=KEY)) as rx,
    ):
        inbox = Inbox()
        rx.subscribe("k/#", "t", inbox)
        tx.wait_for_subscribers("k/a", timeout=5)
        sent = _stream(500)
        for payload in sent:
            tx.publish("k/a", "t", payload, expiry=30)
        tx.flush(timeout=20)
        assert inbox.wait_for_count(500, timeout=10)
        counters = rx.counters()
    assert inbox.payloads() == sent
    assert not {k: v for k, v in counters.items() if k.startswith("dropped_")}


def test_a_key_from_a_file_works_and_the_file_is_checked(group: str, tmp_path: Path) -> None:
    path = tmp_path / "glue.key"
    path.write_text(KEY + "\n", encoding="utf-8")
    with (
        EndpointManager.from_env(**_settings(group, network_key_file=str(path))) as a,
        EndpointManager.from_env(**_settings(group, network_key=KEY)) as b,
    ):
        assert a.wait_for_peers(1, timeout=5)[0].endpoint_id == b.endpoint_id


def _warnings(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


def test_a_key_mismatch_hides_each_from_the_other_and_is_logged_once(
    group: str, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        caplog.at_level(logging.WARNING, logger="glue.endpoint"),
        EndpointManager.from_env(**_settings(group, network_key=KEY)) as a,
        EndpointManager.from_env(**_settings(group, network_key=generate_key())) as b,
    ):
        # Both announce every 100 ms: wait until each refused many of the other's datagrams.
        assert wait_until(lambda: a.counters().get("dropped_key", 0) >= 10, timeout=5)
        assert wait_until(lambda: b.counters().get("dropped_key", 0) >= 10, timeout=5)
        assert a.peers() == []
        assert b.peers() == []
    said = _warnings(caplog, "sealed with a key this endpoint does not have")
    # Once per source address and endpoint: b's datagrams come from its data socket only (the
    # group is its destination); a's likewise. So exactly two lines, one logged by each.
    assert len(said) == 2, said


def test_keyed_and_unkeyed_endpoints_do_not_meet_and_say_why(
    group: str, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        caplog.at_level(logging.WARNING, logger="glue.endpoint"),
        EndpointManager.from_env(**_settings(group, network_key=KEY)) as keyed,
        EndpointManager.from_env(**_settings(group)) as plain,
    ):
        assert wait_until(lambda: keyed.counters().get("dropped_unsealed", 0) >= 5, timeout=5)
        assert wait_until(lambda: plain.counters().get("dropped_sealed", 0) >= 5, timeout=5)
        assert keyed.peers() == []
        assert plain.peers() == []
    assert len(_warnings(caplog, "are not sealed")) == 1
    assert len(_warnings(caplog, "this endpoint has no GLUE_NETWORK_KEY")) == 1


def _forged_datagrams(publisher: EndpointManager, subscriber_incarnation: int) -> list[bytes]:
    """What an attacker without the key builds from what announcements reveal: a Skip far
    ahead and a data frame in the publisher's name, and an announcement taking its place."""
    header = wire.Header(
        1, wire.EndpointId(publisher.endpoint_id), publisher._endpoint.incarnation,
        destination=subscriber_incarnation,
    )  # fmt: skip
    envelope = b'{"t":"k/a","y":"t","s":999999,"w":1.0}\n'
    skip_and_data = wire.encode(
        header, [wire.Skip(10**15), wire.Data(10**15, envelope + b"FORGED", 60_000)]
    )
    evict = wire.encode(
        wire.Header(1, wire.EndpointId(publisher.endpoint_id), 2**53 - 1),
        [
            wire.Announce(
                wire.EndpointId(publisher.endpoint_id), 2**53 - 1, "evil", "", 9, 3_600_000
            )
        ],
    )
    return [skip_and_data, evict]


def test_with_a_key_forged_datagrams_change_nothing(group: str) -> None:
    with (
        EndpointManager.from_env(**_settings(group, network_key=KEY)) as tx,
        EndpointManager.from_env(**_settings(group, network_key=KEY)) as rx,
    ):
        inbox = Inbox()
        rx.subscribe("k/#", "t", inbox)
        tx.wait_for_subscribers("k/a", timeout=5)
        target = ("127.0.0.1", rx.data_address[1])
        group_address = (group.split(":")[0], int(group.split(":")[1]))
        forged = _forged_datagrams(tx, rx._endpoint.incarnation)
        sent = _stream(300)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as attacker:
            attacker.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
            for index, payload in enumerate(sent):
                tx.publish("k/a", "t", payload, expiry=30)
                if index % 30 == 0:
                    for datagram in forged:
                        attacker.sendto(datagram, target)
                        attacker.sendto(datagram, group_address)
        tx.flush(timeout=20)
        assert inbox.wait_for_count(300, timeout=10)
        counters = rx.counters()
        peers = [p.name for p in rx.peers()]
    assert inbox.payloads() == sent  # nothing forged, nothing lost, in order
    assert peers == [tx.name]  # never evicted
    assert counters["dropped_unsealed"] >= 20


def _capture(port: int, stop: threading.Event, out: list[bytes]) -> socket.socket:
    """Capture, from lo, the UDP payloads of datagrams sent to ``port``."""
    raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
    raw.bind(("lo", 0))
    raw.settimeout(0.1)

    def run() -> None:
        seen = set()
        while not stop.is_set():
            try:
                frame = raw.recv(70_000)
            except TimeoutError:
                continue
            except OSError:
                return
            ip = frame[14:]
            if len(ip) < 28 or ip[9] != socket.IPPROTO_UDP:
                continue
            header_bytes = (ip[0] & 0x0F) * 4
            udp = ip[header_bytes:]
            if struct.unpack("!H", udp[2:4])[0] != port:
                continue
            payload = bytes(udp[8:])
            if payload not in seen:  # lo shows each packet going out and coming in
                seen.add(payload)
                out.append(payload)

    threading.Thread(target=run, daemon=True).start()
    return raw


@pytest.fixture
def stop_capture() -> Iterator[threading.Event]:
    stop = threading.Event()
    yield stop
    stop.set()


def test_with_a_key_captured_datagrams_sent_again_are_refused(
    group: str, stop_capture: threading.Event
) -> None:
    with (
        EndpointManager.from_env(**_settings(group, network_key=KEY)) as tx,
        EndpointManager.from_env(**_settings(group, network_key=KEY)) as rx,
    ):
        got: list[MessageReceived] = []
        rx.on_message(got.append)
        [peer] = tx.wait_for_peers(1, timeout=5)
        port = rx.data_address[1]
        captured: list[bytes] = []
        raw = _capture(port, stop_capture, captured)
        try:
            for n in range(200):
                tx.send(b"m%d" % n, to=[peer.endpoint_id], expiry=30)
            tx.flush(timeout=10)
            assert wait_until(lambda: len(got) == 200, timeout=10)
            assert wait_until(lambda: len(captured) >= 1, timeout=5)
        finally:
            stop_capture.set()
            raw.close()
        assert all(datagram[:2] == b"\xc7\x01" for datagram in captured)  # all sealed
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as attacker:
            for datagram in captured:
                attacker.sendto(datagram, ("127.0.0.1", port))
        replayed = len(captured)
        assert wait_until(lambda: rx.counters().get("dropped_replay", 0) >= replayed, timeout=5)
        tx.send(b"after", to=[peer.endpoint_id], expiry=30)
        tx.flush(timeout=10)
        assert wait_until(lambda: len(got) == 201, timeout=10)
    assert [m.payload for m in got] == [b"m%d" % n for n in range(200)] + [b"after"]


def test_rotation_endpoints_at_either_step_understand_each_other(group: str) -> None:
    old, new = KEY, generate_key()
    steps = [f"{old}", f"{old},{new}", f"{new},{old}"]  # before, step 1, step 2
    with (
        EndpointManager.from_env(**_settings(group, network_key=steps[0])) as before,
        EndpointManager.from_env(**_settings(group, network_key=steps[1])) as first,
        EndpointManager.from_env(**_settings(group, network_key=steps[2])) as second,
    ):
        inboxes = {name: Inbox() for name in ("before", "first", "second")}
        for name, endpoint in (("before", before), ("first", first), ("second", second)):
            endpoint.subscribe("rot/#", "t", inboxes[name])
        # Step 2 seals with the new key: the step-1 endpoint opens it; the one not yet rotated
        # must not (it never got the new key), which is why step 2 waits for step 1 everywhere.
        second.wait_for_subscribers("rot/x", 1, timeout=5)
        first.wait_for_subscribers("rot/x", 2, timeout=5)
        for n in range(50):
            first.publish("rot/x", "t", b"%d" % n, expiry=30)
            second.publish("rot/x", "t", b"%d" % (100 + n), expiry=30)
        first.flush(timeout=10)
        second.flush(timeout=10)
        # Each gets its own messages locally, and the other's over the network.
        assert inboxes["second"].wait_for_count(100, timeout=5)
        assert inboxes["first"].wait_for_count(100, timeout=5)
        assert inboxes["before"].wait_for_count(50, timeout=5)
    from_first = [b"%d" % n for n in range(50)]
    from_second = [b"%d" % (100 + n) for n in range(50)]
    assert [p for p in inboxes["second"].payloads() if p in from_first] == from_first
    assert [p for p in inboxes["first"].payloads() if p in from_second] == from_second
    assert inboxes["before"].payloads() == from_first  # from step 1 only, none from step 2
