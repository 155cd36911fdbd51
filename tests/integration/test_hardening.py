"""Without a network key: what the protocol itself refuses, played with a raw UDP socket.

Issue 13's first attack: a datagram in the publisher's name (its id and incarnation read from
an announcement) carrying a Skip far ahead and a data frame. Sent from another port than the
publisher's, it must neither be delivered nor move the stream: every real message still arrives,
once, in order.
"""

from __future__ import annotations

import socket

from glue import EndpointManager
from tests.helpers import free_udp_port, multicast_settings
from tests.integration.test_network_key import Collector, _forged_datagrams, _stream


def test_transport_frames_from_another_address_than_the_peers_are_refused() -> None:
    group = f"239.192.137.1:{free_udp_port()}"
    settings = multicast_settings(group, discovery_rate_milliseconds=100)
    with EndpointManager.from_env(**settings) as tx, EndpointManager.from_env(**settings) as rx:
        inbox = Collector()
        rx.subscribe("k/#", "t", inbox)
        tx.wait_for_subscribers("k/a", timeout=5)
        skip_and_data = _forged_datagrams(tx, rx._async._endpoint.incarnation)[0]
        sent = _stream(300)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as attacker:
            for index, payload in enumerate(sent):
                tx.publish("k/a", "t", payload, expiry=30)
                if index % 30 == 0:
                    attacker.sendto(skip_and_data, ("127.0.0.1", rx.data_address[1]))
        tx.flush(timeout=20)
        assert inbox.wait_for(300, 10)
        counters = rx.counters()
    assert inbox.payloads == sent  # nothing forged delivered, nothing skipped
    assert counters["dropped_wrong_address"] >= 10
