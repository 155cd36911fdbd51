"""Prometheus metrics served on GLUE_METRICS_ADDRESS, scraped over HTTP while messages flow."""

from __future__ import annotations

import asyncio
import socket
import sys
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from glue import AsyncEndpointManager, ConfigError, EndpointManager
from tests.helpers import free_udp_port, multicast_settings, wait_until


def _scrape(address: tuple[str, int]) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of one scrape: (name, sorted labels) -> value, parsed as Prometheus does."""
    with urllib.request.urlopen(f"http://{address[0]}:{address[1]}/metrics", timeout=5) as reply:
        assert reply.status == 200
        text = reply.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def _value(samples: dict, name: str, **labels: str) -> float:
    found = [v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls)]
    assert len(found) == 1, (name, labels, [k for k in samples if k[0] == name])
    return found[0]


def test_counters_rise_while_messages_flow_and_peers_are_labelled() -> None:
    group = f"239.192.137.1:{free_udp_port()}"
    settings = multicast_settings(group, metrics_address="127.0.0.1:0")
    with (
        EndpointManager.from_env(**settings, endpoint_name="tx") as tx,
        EndpointManager.from_env(**multicast_settings(group), endpoint_name="rx") as rx,
    ):
        got: list[bytes] = []
        rx.subscribe("m/#", "t", lambda m: got.append(m.payload))
        tx.wait_for_subscribers("m/a", timeout=5)
        address = tx.metrics_address
        assert address is not None
        assert address[1] != 0
        for n in range(100):
            tx.publish("m/a", "t", b"%d" % n)
        tx.flush(timeout=10)
        first = _scrape(address)
        for n in range(100, 300):
            tx.publish("m/a", "t", b"%d" % n)
        tx.flush(timeout=10)
        assert wait_until(lambda: len(got) == 300, timeout=10)
        second = _scrape(address)
    total = "glue_transport_frames_sent_total"
    assert _value(second, total, endpoint="tx") > _value(first, total, endpoint="tx") > 0
    published = "glue_topics_published_total"
    assert _value(first, published, endpoint="tx") == 100
    assert _value(second, published, endpoint="tx") == 300
    assert _value(second, "glue_peers", endpoint="tx") == 1
    peer = {"endpoint": "tx", "peer": "rx"}
    assert _value(second, "glue_peer_frames_acked_total", **peer) > _value(
        first, "glue_peer_frames_acked_total", **peer
    )
    assert 0 < _value(second, "glue_peer_rtt_seconds", **peer) < 1
    assert _value(second, "glue_peer_unacknowledged_frames", **peer) == 0
    # What the topics layer holds: the last message of m/a in history (default depth 1).
    assert _value(second, "glue_history_topics", endpoint="tx") == 1
    assert 0 < _value(second, "glue_history_bytes", endpoint="tx") < 100
    assert _value(second, "glue_kept_bytes", endpoint="tx") == 0
    assert _value(second, "glue_group_jobs_unfinished", endpoint="tx") == 0


def test_a_forged_datagram_shows_as_a_drop_by_reason() -> None:
    group = f"239.192.137.1:{free_udp_port()}"
    with EndpointManager.from_env(**multicast_settings(group, metrics_address="127.0.0.1:0")) as ep:
        address = ep.metrics_address
        assert address is not None
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as attacker:
            attacker.sendto(b"\x00not glue", ("127.0.0.1", ep.data_address[1]))

        def dropped() -> float:
            samples = _scrape(address)
            return sum(v for (n, _), v in samples.items() if n == "glue_datagrams_dropped_total")

        assert wait_until(lambda: dropped() >= 1, timeout=5)


async def test_the_asyncio_manager_serves_metrics_too() -> None:
    group = f"239.192.137.1:{free_udp_port()}"
    settings = multicast_settings(group, metrics_address="127.0.0.1:0")
    async with AsyncEndpointManager.from_env(**settings, endpoint_name="solo") as endpoint:
        address = endpoint.metrics_address
        assert address is not None
        samples = await asyncio.to_thread(_scrape, address)
        assert _value(samples, "glue_peers", endpoint="solo") == 0
    # Stopped: the port is closed.
    with pytest.raises(urllib.error.URLError, match="refused"):
        _scrape(address)


def test_metrics_without_prometheus_client_is_a_clear_configuration_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # as if not installed
    group = f"239.192.137.1:{free_udp_port()}"
    settings = multicast_settings(group, metrics_address="127.0.0.1:0")
    with pytest.raises(ConfigError, match=r"pip install 'glue-pubsub\[metrics\]'"):
        EndpointManager.from_env(**settings).start()
