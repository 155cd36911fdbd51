"""A stream through a link slower than its sender, with a short queue: a switch port's few
hundred KB at 1 Gbit/s, played by ``tc tbf`` on the namespace's ``lo`` (5 ms of queue).

Before, the congestion window took a loss for congestion only when the round trip showed a
queue of more than 8 ms, which a 5 ms queue never does: every overflow read as random loss, the
window stayed at 4 MiB and a 64 KiB stream was resent twice over (31,944 resends for 16,000
frames; 18,206 datagrams dropped by the link) while using the link no better. Now half a round
trip lost counts as congestion too, and a loss episode ends with the frames sent (not with the
whole send queue): 5,551 resends and 3,104 drops at the same rate.

Rates are printed, not asserted (they belong to benchmarks: ``glue bench --loss P --rate R``);
what is asserted is what the protocol does: every message once and in order, and resends well
under the frames sent.
"""

from __future__ import annotations

import contextlib

import pytest

from glue import EndpointManager, wire
from tests.helpers import (
    Inbox,
    fake_peer,
    free_udp_port,
    link_drops,
    link_rate,
    multicast_settings,
    random_loss,
)

SIZE = 64 * 1024
COUNT = 2000  # 131 MB: about a second of a 1 Gbit/s link


@pytest.mark.parametrize("loss", [0.0, 0.1])
def test_a_stream_through_a_shallow_bottleneck_is_not_resent_over_and_over(loss: float) -> None:
    group_port = free_udp_port()
    settings = multicast_settings(f"239.192.137.1:{group_port}", discovery_rate_milliseconds=200)
    payloads = [b"%d:" % n + bytes([n % 251]) * SIZE for n in range(COUNT)]
    with (
        EndpointManager.from_env(**settings) as tx,
        EndpointManager.from_env(**settings) as rx,
    ):
        inbox = Inbox()
        rx.subscribe("k/#", "t", inbox)
        tx.wait_for_subscribers("k/a", timeout=5)
        ports = [group_port, tx.data_address[1], rx.data_address[1]]
        lossy = random_loss(ports, loss) if loss else contextlib.nullcontext()
        with link_rate("1gbit"), lossy:
            for payload in payloads:
                tx.publish("k/a", "t", payload, expiry=60)
            tx.flush(timeout=60)
            assert inbox.wait_for_count(COUNT, timeout=20)
            dropped = link_drops()
        sent = tx.counters()
    assert inbox.payloads() == payloads  # every message, once, in order
    frames, resent = sent["transport_frames_sent"], sent["transport_frames_resent"]
    # Random loss alone makes about loss / (1 - loss) resends per frame (11 % at 10 %); a window
    # overflowing the link's queue over and over made 2 per frame.
    assert resent < 0.5 * frames + loss / (1 - loss) * frames, (resent, frames, dropped)
    print(
        f"\n1 Gbit/s link, 5 ms queue, {loss:.0%} random loss: {COUNT} x 64 KiB once in order; "
        f"{resent} resends for {frames} frames, {dropped} datagrams dropped by the link"
    )


def test_acks_due_in_the_middle_of_a_burst_go_out_before_the_burst_is_read() -> None:
    # A receiver reads a burst of datagrams in one wake-up. Its acks used to go out only at the
    # end of it, one per wake-up whatever was due: a sender was clocked in half-megabyte steps
    # (64 B bundles through a 1 Gbit/s link with a 5 ms queue: 244-506 of 1,630-1,900
    # datagrams dropped by the link with no random loss) and heard of a hole only once the
    # whole burst was read. Here a fake peer's 64 frames wait in the socket while the network
    # thread is held; the ack due at the 32nd (``ack_every``) must leave before the 64th is read.
    group = f"239.192.137.1:{free_udp_port()}"
    settings = multicast_settings(group, discovery_rate_milliseconds=100)
    fake = wire.EndpointId(10**12 + 9)
    with (
        EndpointManager.from_env(**settings) as rx,
        fake_peer(fake, "burst", to=rx) as (peer, _, target),
    ):
        peer.settimeout(5)
        assert len(rx.peers()) == 1
        header = wire.Header(1, fake, 1, destination=rx._endpoint.incarnation)
        burst = [wire.encode(header, [wire.Data(seq, b"{}\nx")]) for seq in range(1, 65)]
        with rx._endpoint._lock:  # type: ignore[attr-defined]  # (the thread runtime's)
            for datagram in burst:
                peer.sendto(datagram, target)
        cumulative: list[int] = []
        while not cumulative or cumulative[-1] < 64:
            data, _ = peer.recvfrom(65536)
            decoded = wire.decode(data, network_id=1)
            cumulative += [f.cumulative for f in decoded.frames if isinstance(f, wire.Ack)]
    assert cumulative[0] <= 32, cumulative  # the ack due mid-burst, not one for all 64 after it
