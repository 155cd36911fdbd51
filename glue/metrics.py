"""Prometheus metrics of one endpoint, served over HTTP on ``GLUE_METRICS_ADDRESS``.

Optional: it needs ``prometheus-client`` (``pip install glue-pubsub[metrics]``), imported only
when the address is set, so an endpoint without metrics pays nothing for them. Each endpoint has
its own registry and HTTP server (several endpoints in one process each serve their own port).

A scrape runs on the server's thread; the counters live on the endpoint's loop. So a scrape asks
the loop for a snapshot (``snapshot``, a thread-safe callable given by the runtime) and turns it
into metric families; the loop never waits for a scrape. Names follow Prometheus' conventions:
``glue_`` prefix, snake case, ``_total`` for counters, base units (seconds, bytes), and one family
with a ``reason`` label for the datagrams dropped for each reason. See ``docs/observability.md``.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from glue.errors import ConfigError

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

__all__ = ["MetricsServer", "MetricsSnapshot", "PeerMetrics"]

logger = logging.getLogger(__name__)

_UNSAFE = re.compile(r"[^a-zA-Z0-9_]")


@dataclass(frozen=True, slots=True)
class PeerMetrics:
    """One peer's transport counters and stream gauges at the time of a snapshot."""

    name: str
    endpoint_id: int
    counters: dict[str, int]
    gauges: dict[str, float]


@dataclass(frozen=True, slots=True)
class MetricsSnapshot:
    """What a scrape reports: the endpoint's counters and gauges, in total and per peer."""

    endpoint: str
    counters: dict[str, int]
    gauges: dict[str, float]
    peers: list[PeerMetrics]


class MetricsServer:
    """An HTTP server of ``/metrics`` for one endpoint, on its own registry and thread."""

    def __init__(self, snapshot: Callable[[], MetricsSnapshot]) -> None:
        self._snapshot = snapshot
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None
        self.address: tuple[str, int] | None = None

    def start(self, host: str, port: int) -> None:
        """Serve on ``host:port`` (port 0: any free one, see ``address``).

        Raises:
            ConfigError: prometheus-client is not installed, or the address cannot be bound.
        """
        try:
            from prometheus_client import CollectorRegistry, start_http_server
        except ImportError as exc:
            raise ConfigError(
                f"GLUE_METRICS_ADDRESS={host}:{port} needs prometheus-client: "
                "pip install 'glue-pubsub[metrics]'",
                variable="GLUE_METRICS_ADDRESS",
            ) from exc
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(self._snapshot))
        try:
            server, thread = start_http_server(port, addr=host, registry=registry)
        except OSError as exc:
            raise ConfigError(
                f"GLUE_METRICS_ADDRESS={host}:{port}: cannot serve metrics: {exc.strerror}",
                variable="GLUE_METRICS_ADDRESS",
            ) from exc
        self._server, self._thread = server, thread
        bound = server.server_address
        self.address = (str(bound[0]), int(bound[1]))
        logger.info("metrics on http://%s:%d/metrics", *self.address)

    def stop(self) -> None:
        """Stop serving; idempotent."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None


class _Collector:
    """Turns a snapshot into metric families at each scrape."""

    def __init__(self, snapshot: Callable[[], MetricsSnapshot]) -> None:
        self._snapshot = snapshot

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        try:
            snap = self._snapshot()
        except Exception:  # a scrape must answer (empty) rather than fail the server thread
            logger.debug("metrics snapshot failed", exc_info=True)
            return
        endpoint = [snap.endpoint]
        dropped = CounterMetricFamily(
            "glue_datagrams_dropped",
            "Datagrams dropped before any layer used them, by reason",
            labels=["endpoint", "reason"],
        )
        for key, value in sorted(snap.counters.items()):
            if key.startswith("dropped_"):
                dropped.add_metric([*endpoint, key.removeprefix("dropped_")], value)
                continue
            family = CounterMetricFamily(
                f"glue_{_safe(key)}", f"glue counter {key}", labels=["endpoint"]
            )
            family.add_metric(endpoint, value)
            yield family
        yield dropped
        for key, level in sorted(snap.gauges.items()):
            gauge = GaugeMetricFamily(f"glue_{_safe(key)}", f"glue {key} now", labels=["endpoint"])
            gauge.add_metric(endpoint, level)
            yield gauge
        yield from _peer_families(snap, CounterMetricFamily, GaugeMetricFamily)


def _peer_families(snap: MetricsSnapshot, counter: Any, gauge: Any) -> Iterator[Any]:
    labels = ["endpoint", "peer", "peer_id"]
    families: dict[str, Any] = {}
    for peer in snap.peers:
        values = [snap.endpoint, peer.name, str(peer.endpoint_id)]
        for key, value in peer.counters.items():
            name = f"glue_peer_{_safe(key)}"
            if name not in families:
                families[name] = counter(name, f"glue per-peer counter {key}", labels=labels)
            families[name].add_metric(values, value)
        for key, level in peer.gauges.items():
            name = f"glue_peer_{_safe(key)}"
            if name not in families:
                families[name] = gauge(name, f"glue per-peer {key} now", labels=labels)
            families[name].add_metric(values, level)
    yield from families.values()


def _safe(key: str) -> str:
    return _UNSAFE.sub("_", key)
