"""UDP sockets: binding, multicast membership, interface lookup. No protocol logic here.

Every socket is non-blocking, IPv4, with large kernel buffers (Python pays per datagram, so a
burst must queue in the kernel rather than be dropped). ``IP_MULTICAST_ALL`` is switched off so a
socket only receives the groups *it* joined, not every group any socket on the host joined.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import struct
from dataclasses import dataclass
from typing import Final

import netifaces

from glue.errors import ConfigError

__all__ = [
    "SOCKET_BUFFER_BYTES",
    "AddressKind",
    "DiscoverySockets",
    "address_kind",
    "default_interface",
    "interface_address",
    "interface_mtu",
    "open_data_socket",
    "open_discovery_sockets",
]

logger = logging.getLogger(__name__)

SOCKET_BUFFER_BYTES: Final = 4 * 1024 * 1024
_IP_MULTICAST_ALL: Final = getattr(socket, "IP_MULTICAST_ALL", 49)  # Linux value

AddressKind = str  # "multicast" | "broadcast" | "unicast"


def address_kind(host: str, interface: str | None = None) -> AddressKind:
    """Classify an IPv4 literal as multicast, broadcast (limited or the interface's) or unicast."""
    address = ipaddress.IPv4Address(host)
    if address.is_multicast:
        return "multicast"
    if host == "255.255.255.255":
        return "broadcast"
    if interface is not None and host in _broadcast_addresses(interface):
        return "broadcast"
    return "unicast"


def default_interface() -> str:
    """The interface of the IPv4 default route, or ``lo`` when there is none."""
    try:
        defaults = netifaces.gateways().get("default", {})
    except (OSError, ValueError):  # pragma: no cover - netifaces reads /proc; be defensive
        return "lo"
    gateway = defaults.get(netifaces.AF_INET) if isinstance(defaults, dict) else None
    return str(gateway[1]) if gateway else "lo"


def interface_mtu(interface: str) -> int:
    """The MTU of ``interface`` (1500 when it cannot be read)."""
    try:
        with open(f"/sys/class/net/{interface}/mtu", encoding="ascii") as file:
            return int(file.read().strip())
    except (OSError, ValueError):
        return 1500


def interface_address(interface: str, *, variable: str = "GLUE_LISTEN_INTERFACE") -> str:
    """The first IPv4 address of ``interface``.

    Raises:
        ConfigError: the interface does not exist or has no IPv4 address.
    """
    names = netifaces.interfaces()
    if interface not in names:
        raise ConfigError(
            f"{variable}={interface!r}: no such interface; this host has {', '.join(names)}",
            variable=variable,
        )
    addresses = netifaces.ifaddresses(interface).get(netifaces.AF_INET, [])
    if not addresses:
        raise ConfigError(
            f"{variable}={interface!r}: the interface has no IPv4 address", variable=variable
        )
    return str(addresses[0]["addr"])


def open_data_socket(
    host: str, port: int, *, interface_ip: str, multicast_ttl: int
) -> socket.socket:
    """The unicast socket this endpoint receives data on and sends everything from.

    Raises:
        ConfigError: the address cannot be bound (in use, not local).
    """
    sock = _udp_socket()
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(interface_ip))
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, multicast_ttl)
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
        _bind(sock, host, port, variable="GLUE_LISTEN_ADDRESS")
    except BaseException:
        sock.close()
        raise
    return sock


@dataclass(slots=True)
class DiscoverySockets:
    """The sockets that receive announcements; ``multicast`` tells which ones carry a group."""

    sockets: list[tuple[socket.socket, bool]]

    def close(self) -> None:
        """Close every socket."""
        for sock, _ in self.sockets:
            sock.close()


def open_discovery_sockets(
    host: str, port: int, *, interface: str, interface_ip: str, rendezvous: bool
) -> DiscoverySockets:
    """Sockets listening for announcements at ``host:port``.

    A multicast group is bound as ``group:port`` (so the socket sees only that group) with
    ``SO_REUSEPORT``, letting every endpoint on the host hear it. A rendezvous (one that does not
    announce) also binds ``0.0.0.0:port`` so that unicast announcements reach it, and only it,
    even with other endpoints of the same host listening to the group. A unicast or broadcast
    address is bound as given.

    Raises:
        ConfigError: the address cannot be bound or the group cannot be joined.
    """
    variable = "GLUE_DISCOVERY_LISTEN_ADDRESS"
    kind = address_kind(host, interface)
    opened: list[tuple[socket.socket, bool]] = []
    try:
        if kind == "multicast":
            sock = _udp_socket(reuse_port=True)
            opened.append((sock, True))
            _bind(sock, host, port, variable=variable)
            membership = struct.pack("4s4s", socket.inet_aton(host), socket.inet_aton(interface_ip))
            try:
                sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, membership)
            except OSError as exc:
                raise ConfigError(
                    f"{variable}={host}:{port}: cannot join the group on {interface} "
                    f"({interface_ip}): {exc.strerror}; is multicast enabled and routed there?",
                    variable=variable,
                ) from exc
            if rendezvous:
                unicast = _udp_socket()
                opened.append((unicast, False))
                _bind(unicast, "0.0.0.0", port, variable=variable)
        else:
            sock = _udp_socket(reuse_port=kind == "broadcast")
            opened.append((sock, False))
            _bind(sock, host, port, variable=variable)
    except BaseException:
        for sock, _ in opened:
            sock.close()
        raise
    return DiscoverySockets(opened)


def _udp_socket(*, reuse_port: bool = False) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    # SO_REUSEADDR lets a unicast listener share the port with the group listeners of other
    # endpoints on this host; SO_REUSEPORT lets those group listeners share it with each other.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    with contextlib.suppress(OSError):  # Linux only; elsewhere the option does not exist
        sock.setsockopt(socket.IPPROTO_IP, _IP_MULTICAST_ALL, 0)
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, SOCKET_BUFFER_BYTES)
        except OSError:  # pragma: no cover - capped by the kernel, never fatal
            logger.debug("could not set socket buffer option %d", option)
    return sock


def _bind(sock: socket.socket, host: str, port: int, *, variable: str) -> None:
    try:
        sock.bind((host, port))
    except OSError as exc:
        raise ConfigError(
            f"{variable}={host}:{port}: cannot bind: {exc.strerror}", variable=variable
        ) from exc


def _broadcast_addresses(interface: str) -> set[str]:
    try:
        entries = netifaces.ifaddresses(interface).get(netifaces.AF_INET, [])
    except ValueError:
        return set()
    return {str(entry["broadcast"]) for entry in entries if "broadcast" in entry}
