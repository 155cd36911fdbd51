"""The asyncio runtime: the one module that reads the clock and touches sockets.

``Endpoint`` runs on the asyncio loop it is started in. On every wake-up it reads *every* datagram
waiting on a socket (non-blocking reads until ``EAGAIN``), decodes them, feeds the frames to the
layers, then pulls the layers' outputs once: frames to send (packed per destination into as few
datagrams as possible), events, and the next deadline. One timer per endpoint is re-armed only when
the earliest deadline changes. A datagram that does not decode is dropped, counted by reason and
logged at debug level; nothing a peer sends can raise out of here.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import socket
import time
from collections import Counter
from collections.abc import Callable
from typing import Final

from glue import network, wire
from glue.discovery import Address, Discovery, DiscoveryConfig, Target
from glue.errors import ConfigError, DecodeError, UsageError
from glue.events import Peer, PeerEvent
from glue.settings import GlueSettings

__all__ = ["DISCOVERY_DATAGRAM_BYTES", "Endpoint", "PeerListener"]

logger = logging.getLogger(__name__)

#: Announcements are packed into datagrams that fit a 1500-byte Ethernet MTU, so a rendezvous
#: answer never relies on IP fragmentation (one lost fragment would lose all of it).
DISCOVERY_DATAGRAM_BYTES: Final = 1400
_RECV_BYTES: Final = 65536
_MAX_READS_PER_WAKEUP: Final = 1024

PeerListener = Callable[[PeerEvent], None]


class Endpoint:
    """One glue endpoint: sockets, discovery, timers, on the running asyncio loop."""

    def __init__(self, settings: GlueSettings) -> None:
        self.settings = settings
        self.endpoint_id = wire.EndpointId(settings.id)
        self.name = settings.name
        # A restart of the same endpoint id gets a larger incarnation (milliseconds since the
        # epoch, scaled, plus randomness), so peers can tell the new instance from the old one.
        self.incarnation = int(time.time() * 1000) * 1000 + secrets.randbelow(1000)
        self.counters: Counter[str] = Counter()
        self._header = wire.Header(settings.network_id, self.endpoint_id, self.incarnation)
        self._listeners: list[PeerListener] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._data: socket.socket | None = None
        self._discovery_sockets: network.DiscoverySockets | None = None
        self._discovery: Discovery | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._resolver: asyncio.Task[None] | None = None
        self._warned: set[object] = set()
        self._state = "new"

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the sockets and start discovery.

        Raises:
            ConfigError: an interface, address or group from the settings cannot be used.
            UsageError: the endpoint was already started.
        """
        if self._state != "new":
            raise UsageError(f"endpoint {self.name} was already started")
        self._state = "starting"
        loop = self._loop = asyncio.get_running_loop()
        settings = self.settings
        interface, interface_ip = self._choose_interface()
        listen = settings.listen_address
        try:
            self._data = network.open_data_socket(
                listen.host,
                listen.port,
                interface_ip=interface_ip,
                multicast_ttl=settings.discovery_multicast_ttl,
            )
            announces = bool(settings.discovery_target_address)
            if settings.discovery_listen_address is not None:
                group = settings.discovery_listen_address
                self._discovery_sockets = network.open_discovery_sockets(
                    group.host,
                    group.port,
                    interface=interface,
                    interface_ip=interface_ip,
                    rendezvous=not announces,
                )
        except BaseException:
            self._close_sockets()
            self._state = "stopped"
            raise
        host, port = self._data.getsockname()
        self.data_address: Address = (host, port)
        self._discovery = Discovery(
            DiscoveryConfig(
                endpoint_id=self.endpoint_id,
                incarnation=self.incarnation,
                name=self.name,
                port=port,
                host="" if host == "0.0.0.0" else host,
                rate_s=settings.discovery_rate_s,
                multiplier=settings.discovery_rate_timeout_multiplier,
                max_peers=settings.max_peers,
                announce=announces,
            ),
            rng=random.Random(),
            now=loop.time(),
        )
        self._interface = interface
        loop.add_reader(self._data.fileno(), self._on_readable, self._data, False)
        for sock, multicast in self._discovery_sockets.sockets if self._discovery_sockets else ():
            loop.add_reader(sock.fileno(), self._on_readable, sock, multicast)
        if settings.discovery_target_address:
            self._discovery.set_targets(await self._resolve_targets())
            self._resolver = loop.create_task(self._resolve_forever(), name=f"glue-dns-{self.name}")
        self._state = "running"
        logger.info(
            "endpoint %s (%d) started: data on %s:%d, interface %s, discovery %s -> %s",
            self.name,
            self.endpoint_id,
            host,
            port,
            interface,
            settings.discovery_listen_address or "off",
            ",".join(map(str, settings.discovery_target_address)) or "off",
        )
        self._service(loop.time())

    def _choose_interface(self) -> tuple[str, str]:
        """``GLUE_LISTEN_INTERFACE``, else the default route's interface, else ``lo``."""
        if self.settings.listen_interface:
            name = self.settings.listen_interface
            return name, network.interface_address(name, variable="GLUE_LISTEN_INTERFACE")
        name = network.default_interface()
        try:
            return name, network.interface_address(name, variable="GLUE_LISTEN_INTERFACE")
        except ConfigError:
            logger.warning("default-route interface %s has no IPv4 address; using lo", name)
            return "lo", "127.0.0.1"

    async def stop(self) -> None:
        """Say goodbye to peers, close the sockets. Idempotent."""
        if self._state in ("stopped", "new"):
            self._state = "stopped"
            return
        self._state = "stopped"
        if self._discovery is not None:
            self._discovery.leave()
            self._flush()
        if self._resolver is not None:
            self._resolver.cancel()
            await asyncio.gather(self._resolver, return_exceptions=True)
        if self._timer is not None:
            self._timer.cancel()
        self._close_sockets()
        logger.info("endpoint %s (%d) stopped", self.name, self.endpoint_id)

    @property
    def running(self) -> bool:
        """Whether the endpoint is started and not yet stopped."""
        return self._state == "running"

    # --- queries and listeners --------------------------------------------------------------------

    def peers(self) -> list[Peer]:
        """The peers discovery knows now (call on the loop thread)."""
        return self._discovery.peers() if self._discovery else []

    def add_listener(self, listener: PeerListener) -> None:
        """Call ``listener(event)`` on the loop for every peer event; it must not block."""
        self._listeners.append(listener)

    def all_counters(self) -> dict[str, int]:
        """Runtime and layer counters, merged (call on the loop thread)."""
        merged = Counter(self.counters)
        if self._discovery is not None:
            merged.update({f"discovery_{k}": v for k, v in self._discovery.counters.items()})
        return dict(sorted(merged.items()))

    # --- receive path -------------------------------------------------------------------------

    def _on_readable(self, sock: socket.socket, multicast: bool) -> None:
        assert self._loop is not None
        if self._state != "running":
            return
        now = self._loop.time()
        for _ in range(_MAX_READS_PER_WAKEUP):
            try:
                data, source = sock.recvfrom(_RECV_BYTES)
            except BlockingIOError:
                break
            except OSError as exc:  # e.g. an ICMP error reported on the socket
                self.counters["receive_errors"] += 1
                logger.debug("receive error on %s: %s", sock.getsockname(), exc)
                continue
            self.counters["datagrams_received"] += 1
            self.counters["bytes_received"] += len(data)
            self._handle_datagram(data, source, multicast, now)
        self._service(now)

    def _handle_datagram(self, data: bytes, source: Address, multicast: bool, now: float) -> None:
        try:
            datagram = wire.decode(data, network_id=self.settings.network_id)
        except DecodeError as exc:
            self.counters[f"dropped_{exc.reason}"] += 1
            if logger.isEnabledFor(logging.DEBUG):
                logger.debug("dropped %d bytes from %s:%d: %s", len(data), *source, exc)
            return
        header = datagram.header
        if header.source_id == self.endpoint_id and header.incarnation == self.incarnation:
            self.counters["own_datagrams_ignored"] += 1  # our own multicast, looped back
            return
        discovery = self._discovery
        assert discovery is not None
        for frame in datagram.frames:
            if isinstance(frame, wire.Announce | wire.Goodbye):
                discovery.receive(frame, header, source, multicast=multicast, now=now)
            else:
                self.counters["frames_unhandled"] += 1

    # --- outputs, timers ------------------------------------------------------------------------

    def _service(self, now: float) -> None:
        """Pull every layer's outputs after a burst of inputs, then re-arm the timer."""
        self._flush()
        self._dispatch_events()
        self._rearm(now)

    def _flush(self) -> None:
        discovery, sock = self._discovery, self._data
        if discovery is None or sock is None:
            return
        by_destination: dict[Address, list[wire.Frame]] = {}
        for frame, destination in discovery.frames_to_send():
            by_destination.setdefault(destination, []).append(frame)
        for destination, frames in by_destination.items():
            for datagram in wire.pack(self._header, frames, max_bytes=DISCOVERY_DATAGRAM_BYTES):
                self._send(sock, datagram, destination)

    def _send(self, sock: socket.socket, datagram: bytes, destination: Address) -> None:
        try:
            sock.sendto(datagram, destination)
        except OSError as exc:
            # UDP is best effort; the protocol resends what matters. Warn once per cause.
            self.counters["send_errors"] += 1
            key = (destination, exc.errno)
            log = logger.debug if key in self._warned else logger.warning
            if len(self._warned) < 256:
                self._warned.add(key)
            log("cannot send to %s:%d: %s", *destination, exc.strerror or exc)
            return
        self.counters["datagrams_sent"] += 1
        self.counters["bytes_sent"] += len(datagram)

    def _dispatch_events(self) -> None:
        discovery = self._discovery
        assert discovery is not None
        while (event := discovery.next_event()) is not None:
            for listener in self._listeners:
                try:
                    listener(event)
                except Exception:  # a listener's bug must not break the network loop
                    logger.exception("peer listener %r failed", listener)

    def _rearm(self, now: float) -> None:
        assert self._loop is not None
        assert self._discovery is not None
        if self._state != "running":
            return
        deadline = self._discovery.next_deadline()
        if deadline == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = deadline
        if deadline is not None:
            self._timer = self._loop.call_at(deadline, self._on_timer, deadline)

    def _on_timer(self, deadline: float) -> None:
        assert self._loop is not None
        assert self._discovery is not None
        self._timer = self._timer_at = None
        if self._state != "running":
            return
        now = max(deadline, self._loop.time())
        self._discovery.handle_timer(now=now)
        self._service(now)

    # --- discovery targets ----------------------------------------------------------------------

    async def _resolve_forever(self) -> None:
        assert self._discovery is not None
        while True:
            await asyncio.sleep(self.settings.discovery_rate_s)
            self._discovery.set_targets(await self._resolve_targets())

    async def _resolve_targets(self) -> list[Target]:
        """Resolve every target (DNS names each time, so DNS changes are followed)."""
        assert self._loop is not None
        targets: list[Target] = []
        for entry in self.settings.discovery_target_address:
            for host in await self._resolve(entry.host):
                kind = network.address_kind(host, self._interface)
                targets.append(((host, entry.port), kind == "unicast"))
        return list(dict.fromkeys(targets))

    async def _resolve(self, host: str) -> list[str]:
        assert self._loop is not None
        try:
            socket.inet_aton(host)
        except OSError:
            pass
        else:
            if host.count(".") == 3:
                return [host]
        try:
            async with asyncio.timeout(max(1.0, self.settings.discovery_rate_s)):
                infos = await self._loop.getaddrinfo(
                    host, None, family=socket.AF_INET, type=socket.SOCK_DGRAM
                )
        except (OSError, TimeoutError) as exc:
            self.counters["resolve_errors"] += 1
            key = ("dns", host)
            log = logger.debug if key in self._warned else logger.warning
            self._warned.add(key)
            log("cannot resolve discovery target %r: %s", host, exc)
            return []
        return sorted({str(info[4][0]) for info in infos})

    def _close_sockets(self) -> None:
        loop = self._loop
        if self._data is not None:
            if loop is not None and not loop.is_closed():
                loop.remove_reader(self._data.fileno())
            self._data.close()
            self._data = None
        if self._discovery_sockets is not None:
            for sock, _ in self._discovery_sockets.sockets:
                if loop is not None and not loop.is_closed():
                    loop.remove_reader(sock.fileno())
            self._discovery_sockets.close()
            self._discovery_sockets = None
