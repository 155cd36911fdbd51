"""Reliable transport over real sockets: loss from iptables, a peer killed mid-stream, a flood."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from glue import (
    AsyncEndpointManager,
    BackpressureError,
    EndpointManager,
    MessageReceived,
    UsageError,
    wire,
)
from tests.endpoint_process import EndpointProcess
from tests.helpers import free_udp_port, multicast_settings, random_loss, wait_until


@pytest.fixture
def group() -> str:
    return f"239.192.137.1:{free_udp_port()}"


def _settings(group: str, **extra: object) -> dict[str, object]:
    return multicast_settings(group, discovery_rate_timeout_multiplier=5.0, **extra)


@pytest.fixture
def lossy_port() -> Iterator[int]:
    """A UDP port on which iptables drops 20 % of arriving datagrams, at random."""
    port = free_udp_port()
    with random_loss([port], 0.2):
        yield port


def _collect(endpoint: EndpointManager) -> tuple[list[bytes], threading.Condition]:
    got: list[bytes] = []
    changed = threading.Condition()

    def on_message(message: MessageReceived) -> None:
        with changed:
            got.append(message.payload)
            changed.notify_all()

    endpoint.on_message(on_message)
    return got, changed


def test_everything_arrives_once_and_in_order_through_20_percent_loss(
    group: str, lossy_port: int
) -> None:
    small = [b"%d:" % n + os.urandom(40) for n in range(1, 10_001)]
    large = [b"%d:" % n + os.urandom(1024 * 1024 - 16) for n in range(10_001, 10_201)]
    with (
        EndpointManager.from_env(
            **_settings(group, listen_address=f"127.0.0.1:{lossy_port}")
        ) as rx,
        EndpointManager.from_env(**_settings(group)) as tx,
    ):
        got, changed = _collect(rx)
        [peer] = tx.wait_for_peers(1, timeout=5)
        started = time.perf_counter()
        for payload in small + large:
            tx.send(payload, to=[peer.endpoint_id], expiry=120, timeout=60)
        with changed:
            assert changed.wait_for(lambda: len(got) == len(small) + len(large), timeout=120)
        elapsed = time.perf_counter() - started
        counters = tx.peer_counters()[peer.endpoint_id]
        dropped = rx.counters()
    assert got == small + large  # every message once, in order, intact
    assert counters["frames_resent"] > 0  # the loss was real and was repaired
    print(
        f"\n20 % loss: 10,000 x 64 B + 200 x 1 MiB in {elapsed:.1f} s; "
        f"frames sent {counters['frames_sent']}, resent {counters['frames_resent']}, "
        f"fast resends {counters.get('fast_resends', 0)}, timeouts {counters.get('timeouts', 0)}; "
        f"receiver dropped duplicates {dropped.get('transport_duplicates_dropped', 0)}"
    )


def test_large_datagrams_are_decoded_in_a_few_reused_buffers(group: str) -> None:
    # Datagrams of 64 KB are read into reused buffers and decoded in place; a buffer a partial
    # message still views is never read into (the content check would catch it), and a 1 MiB
    # message holds its 17 datagrams' buffers at most until it is whole.
    sizes = [64 * 1024] * 300 + [1024 * 1024] * 20 + [64 * 1024, 100, 40_000] * 50
    sent = [b"%d:" % n + os.urandom(size) for n, size in enumerate(sizes)]
    with (
        EndpointManager.from_env(**_settings(group, listen_address="127.0.0.1:0")) as rx,
        EndpointManager.from_env(**_settings(group, listen_address="127.0.0.1:0")) as tx,
    ):
        got, changed = _collect(rx)
        [peer] = tx.wait_for_peers(1, timeout=5)
        for payload in sent:
            tx.send(payload, to=[peer.endpoint_id], expiry=60, timeout=30)
        with changed:
            assert changed.wait_for(lambda: len(got) == len(sent), timeout=60)
        counters = rx.counters()
    assert got == sent
    assert counters["datagrams_received"] > len(sent)
    assert 1 <= counters.get("receive_buffers_allocated", 0) <= 32, counters


def _receiver(**glue: object) -> EndpointProcess:
    """An endpoint process that tallies the direct messages it receives."""
    receiver = EndpointProcess(**glue)
    receiver.request("receive", report="summary")
    return receiver


def _received(streams: list[dict]) -> tuple[int, bool]:
    """How many direct messages a receiver's summary counts, and whether they arrived exactly
    once and in order from 1 (payloads start "<number>:")."""
    direct = [stream for stream in streams if stream["subscription"] == 0]
    count = sum(stream["count"] for stream in direct)
    ok = count == 0 or (
        len(direct) == 1
        and direct[0]["ranges"] == [[1, count]]
        and direct[0]["duplicates"] == direct[0]["reordered"] == 0
    )
    return count, ok


def test_a_peer_killed_mid_stream_is_dropped_and_the_others_continue(group: str) -> None:
    glue = {
        "discovery_target_address": group,
        "discovery_listen_address": group,
        "discovery_rate_milliseconds": 200,
        "discovery_rate_timeout_multiplier": 2.0,
    }
    victim = _receiver(**glue)
    victim_id = victim.endpoint_id
    survivor = _receiver(**glue)
    sending = threading.Event()
    stop = threading.Event()
    sent = [0]
    try:
        with EndpointManager.from_env(**glue) as tx:
            tx.wait_for_peers(2, timeout=5)

            def stream() -> None:
                while not stop.is_set():
                    sent[0] += 1
                    tx.send(b"%d:" % sent[0] + b"x" * 500, expiry=60, timeout=10)
                    sending.set()

            streamer = threading.Thread(target=stream)
            streamer.start()
            assert sending.wait(5)
            assert wait_until(lambda: victim_id in tx.peer_counters(), timeout=5)
            assert wait_until(
                lambda: tx.peer_counters()[victim_id].get("frames_acked", 0) > 1000, timeout=10
            )
            victim.send_signal(signal.SIGKILL)
            killed_at = time.monotonic()
            # Its state goes with discovery's timeout (0.2 s x 2); nothing resends to the dead.
            assert wait_until(lambda: victim_id not in tx.peer_counters(), timeout=0.4 + 0.5)
            gone_after = time.monotonic() - killed_at
            at_removal = sent[0]
            assert wait_until(lambda: sent[0] > at_removal + 2000, timeout=10)  # still sending
            stop.set()
            streamer.join(10)
            total = sent[0]
            counters = tx.counters()
            # Everything sent reaches the survivor before the sender closes.
            assert wait_until(
                lambda: _received(survivor.summary())[0] >= total, timeout=20, interval=0.05
            )
        # What was in flight to it is held until it expires, in case it returns; never resent.
        assert counters["transport_streams_parked"] == 1
        print(f"\nkilled peer's state dropped {gone_after:.2f} s after kill -9; {total} sent")
    finally:
        stop.set()
        for process in (victim, survivor):
            process.close()
    # Exactly once, in order: what it had when it stopped.
    assert _received(survivor.events("stopped")[-1]["streams"]) == (total, True)


def _rss_bytes() -> int:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_a_flood_of_fragments_that_never_complete_keeps_memory_bounded(group: str) -> None:
    limit = 1024 * 1024
    with EndpointManager.from_env(**_settings(group, max_message_bytes=limit)) as target:
        port = target.data_address[1]
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as attacker:
            attacker.bind(("127.0.0.1", 0))
            attacker.settimeout(5)
            me = wire.Header(1, wire.EndpointId(777), 1)
            hello = wire.Announce(
                wire.EndpointId(777), 1, "attacker", "", attacker.getsockname()[1], 200
            )
            attacker.sendto(wire.encode(me, [hello]), ("127.0.0.1", port))
            # The target introduces itself back: that tells us its incarnation.
            reply = wire.decode(attacker.recvfrom(65536)[0], network_id=1)
            header = wire.Header(1, wire.EndpointId(777), 1, destination=reply.header.incarnation)
            chunk = os.urandom(60_000)
            baseline = _rss_bytes()
            peak = baseline
            seq = 0
            # 1 GB offered: 300 messages announced as 61 fragments of 60 kB whose last fragment
            # never comes. The first half arrives in order (partial messages grow to the 1 MiB
            # limit and are dropped); the second half leaves holes, so frames pile up in the
            # reorder buffer until it is full.
            for message in range(300):
                holes = message >= 150
                for part in range(60):
                    seq += 1
                    frame_seq = seq + (5000 if holes and part % 7 == 3 else 0)
                    data = wire.Data(frame_seq, chunk, 60_000, part, 61)
                    attacker.sendto(wire.encode(header, [data]), ("127.0.0.1", port))
                if message % 10 == 0:
                    attacker.sendto(wire.encode(me, [hello]), ("127.0.0.1", port))  # stay alive
                    peak = max(peak, _rss_bytes())
            assert wait_until(
                lambda: target.counters().get("transport_frames_beyond_window", 0) > 0, timeout=10
            )
            peak = max(peak, _rss_bytes())
        counters = target.counters()
    growth = peak - baseline
    print(f"\nflood: RSS grew {growth / 1e6:.1f} MB (limit 1 MiB/message, 4 MiB reorder window)")
    assert counters.get("fragmentation_partial_dropped_oversized", 0) > 0
    assert counters.get("transport_frames_beyond_window", 0) > 0
    assert growth < 64 * 1024 * 1024


@contextlib.contextmanager
def _stoppable_receiver(group: str) -> Iterator[tuple[dict[str, object], EndpointProcess]]:
    """A receiver process the test may SIGSTOP (it stays a peer); resumed and stopped after."""
    glue: dict[str, object] = {
        "discovery_target_address": group,
        "discovery_listen_address": group,
        "discovery_rate_milliseconds": 200,
        "discovery_rate_timeout_multiplier": 100.0,  # stopped, not gone
    }
    receiver = _receiver(**glue)
    try:
        yield glue, receiver
    finally:
        if receiver.process.poll() is None:
            receiver.send_signal(signal.SIGCONT)
        receiver.close()


def _assert_received_all(receiver: EndpointProcess, sent: int) -> None:
    # Exactly once, in order, the refused message never sent: what it had when it stopped.
    assert _received(receiver.events("stopped")[-1]["streams"]) == (sent, True)


def test_a_peer_that_stops_acknowledging_gives_backpressure_then_recovers(group: str) -> None:
    with (
        _stoppable_receiver(group) as (glue, receiver),
        EndpointManager.from_env(**glue, send_queue_bytes=65536) as tx,
    ):
        receiver_id = receiver.endpoint_id
        tx.wait_for_peers(1, timeout=5)
        receiver.freeze()  # every thread stopped: none acknowledges
        sent = 0
        started = time.monotonic()
        refused: BackpressureError | None = None
        while refused is None and time.monotonic() - started < 30:
            try:
                tx.send(b"%d:" % (sent + 1) + b"x" * 1000, timeout=0.5)
            except BackpressureError as exc:
                refused = exc
            else:
                sent += 1
        assert refused is not None, "send never reported back-pressure"
        assert refused.peers == (receiver_id,)
        # Bounded: the hand-off queue and the peer's queue, 64 KiB each, and no more.
        assert sent * 1000 <= 2 * 65536 + 2000
        receiver.send_signal(signal.SIGCONT)
        for _ in range(200):  # sending works again once acks flow
            sent += 1
            tx.send(b"%d:" % sent + b"x" * 1000, timeout=10)
        assert wait_until(
            lambda: _received(receiver.summary())[0] >= sent, timeout=20, interval=0.05
        )
    _assert_received_all(receiver, sent)


def test_the_asyncio_api_waits_for_room_then_raises_backpressure_then_recovers(
    group: str,
) -> None:
    async def main(glue: dict[str, object], receiver: EndpointProcess, receiver_id: int) -> int:
        async with AsyncEndpointManager.from_env(**glue, send_queue_bytes=65536) as tx:
            await tx.wait_for_peers(1, timeout=5)
            receiver.freeze()  # every thread stopped: none acknowledges
            sent = 0
            refused: BackpressureError | None = None
            while refused is None and sent < 10_000:
                try:
                    await tx.send(b"%d:" % (sent + 1) + b"x" * 1000, timeout=0.5)
                except BackpressureError as exc:
                    refused = exc
                else:
                    sent += 1
            assert refused is not None, "send never reported back-pressure"
            assert refused.peers == (receiver_id,)
            assert sent * 1000 <= 2 * 65536 + 2000  # bounded, as with the blocking API
            receiver.send_signal(signal.SIGCONT)
            for _ in range(200):  # sending works again once acks flow
                sent += 1
                await tx.send(b"%d:" % sent + b"x" * 1000, timeout=10)
            await tx.flush(timeout=20)
            return sent

    with _stoppable_receiver(group) as (glue, receiver):
        sent = asyncio.run(main(glue, receiver, receiver.endpoint_id))
        assert wait_until(
            lambda: _received(receiver.summary())[0] >= sent, timeout=20, interval=0.05
        )
    _assert_received_all(receiver, sent)


def test_a_message_over_the_maximum_is_refused_at_send(group: str) -> None:
    with EndpointManager.from_env(**_settings(group, max_message_bytes=4096)) as tx:
        with pytest.raises(UsageError, match="GLUE_MAX_MESSAGE_BYTES"):
            tx.send(b"x" * 4097)
        tx.send(b"x" * 4096)  # the maximum itself is fine


def test_a_backlog_is_read_in_bounded_bites_and_delivered_in_order(group: str) -> None:
    """A receiver that falls behind finds more than one wake-up's bytes waiting: it reads them
    in bites of 1 MiB (or 5 ms), sending acks in between, and may hold the events of a few bites
    to hand them over together; every message still arrives once and in order."""
    with (
        EndpointManager.from_env(**_settings(group)) as rx,
        EndpointManager.from_env(**_settings(group)) as tx,
    ):
        got, changed = _collect(rx)
        [peer] = tx.wait_for_peers(1, timeout=5)
        payloads = [b"%04d" % n + os.urandom(65536) for n in range(40)]  # 2.6 MB
        # The receiver's network thread: stall it while the backlog builds.
        rx._endpoint.call_soon(lambda: time.sleep(0.3))
        for payload in payloads:
            tx.send(payload, to=[peer.endpoint_id])
        with changed:
            assert changed.wait_for(lambda: len(got) == len(payloads), timeout=20)
        assert got == payloads
        assert rx.counters().get("event_dispatches_deferred", 0) > 0
