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

from glue import EndpointManager
from tests.helpers import (
    Inbox,
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
