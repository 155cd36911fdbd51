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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import netifaces

from glue.errors import ConfigError

__all__ = [
    "SOCKET_BUFFER_BYTES",
    "AddressKind",
    "DiscoverySockets",
    "InterfaceChoice",
    "address_kind",
    "choose_interface",
    "interface_address",
    "interface_mtu",
    "open_data_socket",
    "open_discovery_sockets",
    "path_datagram_bytes",
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


_UDP_IP_OVERHEAD: Final = 28
_IFF_UP: Final = 0x1
_IFF_LOOPBACK: Final = 0x8
_IFF_MULTICAST: Final = 0x1000


@dataclass(frozen=True, slots=True)
class InterfaceChoice:
    """The interface glue uses, its IPv4 address, why it was chosen, and what else could be."""

    name: str
    address: str
    reason: str
    candidates: tuple[str, ...] = ()
    #: Set when the choice is a guess the operator should confirm (``GLUE_LISTEN_INTERFACE``).
    warning: str | None = None


def choose_interface(route_hints: Sequence[str] = ()) -> InterfaceChoice:
    """The interface to use when ``GLUE_LISTEN_INTERFACE`` is not set, and why.

    In order: the interface the kernel would send to the first of ``route_hints`` (IPv4
    literals: the discovery targets and group) through; else that of any IPv4 default route,
    one without a gateway (``default dev eth0``) included; else the only non-loopback interface
    that is up with an IPv4 address and multicast; else, with several such interfaces, the first
    by name, with a warning; else ``lo``, with a warning that multicast will not leave the host.
    Nothing is sent: routes are asked with a connected UDP socket, or read from ``/proc``.
    """
    candidates = _multicast_candidates()
    for host in route_hints:
        name = _route_interface(host)
        if name is not None:
            return _choice(name, f"the kernel routes to {host} through it", candidates)
    name = _default_route_interface()
    if name is not None:
        return _choice(name, "it carries the default route", candidates)
    if len(candidates) == 1:
        return _choice(
            candidates[0], "the only interface up with IPv4 and multicast (no route)", candidates
        )
    if candidates:
        first = candidates[0]
        return _choice(
            first,
            "the first by name of several (no route says which)",
            candidates,
            warning=(
                f"several interfaces could carry glue ({', '.join(candidates)}) and no route "
                f"says which; using {first}. Set GLUE_LISTEN_INTERFACE to the one your peers "
                "are on"
            ),
        )
    return InterfaceChoice(
        "lo",
        "127.0.0.1",
        "no other interface is up with IPv4 and multicast",
        warning=(
            "no network interface but lo is up with IPv4 and multicast: multicast discovery "
            "will not leave this host. Set GLUE_LISTEN_INTERFACE to the interface your peers "
            "are on, or GLUE_DISCOVERY_TARGET_ADDRESS to a unicast rendezvous"
        ),
    )


def path_datagram_bytes(host: str, *, limit: int) -> int | None:
    """The largest UDP payload toward ``host`` in one IP packet: the MTU of the interface the
    kernel routes to it through, less 28 bytes of IPv4 and UDP headers, at most ``limit``
    (None when no route is known)."""
    name = _route_interface(host)
    if name is None:
        return None
    return min(limit, interface_mtu(name) - _UDP_IP_OVERHEAD)


def _choice(
    name: str, reason: str, candidates: Sequence[str], *, warning: str | None = None
) -> InterfaceChoice:
    address = _ipv4(name)
    if address is None:  # e.g. a route through an interface that has no IPv4 address of its own
        return InterfaceChoice(
            "lo",
            "127.0.0.1",
            f"{name} was chosen ({reason}) but has no IPv4 address",
            tuple(candidates),
            warning=f"interface {name} has no IPv4 address; using lo (set GLUE_LISTEN_INTERFACE)",
        )
    return InterfaceChoice(name, address, reason, tuple(candidates), warning)


def _route_interface(host: str) -> str | None:
    """The interface the kernel would send a datagram to ``host`` through (None: no route)."""
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((host, 9))  # a route lookup only: a UDP connect sends nothing
            source = str(probe.getsockname()[0])
        except OSError:
            return None
    for name in netifaces.interfaces():
        if source != "0.0.0.0" and any(a.get("addr") == source for a in _addresses(name)):
            return str(name)
    # No source address (e.g. a link-scope route through lo, whose address is host-scope): the
    # most specific route of the main table says which interface.
    return _table_route_interface(host)


def _routes(table: str = "/proc/net/route") -> list[tuple[str, int, int]]:
    """The main table's IPv4 routes that are up: (interface, destination, mask), as integers in
    the table's byte order (``/proc/net/route`` writes them little-endian)."""
    try:
        with open(table, encoding="ascii") as file:
            rows = [line.split() for line in file.readlines()[1:]]
    except OSError:
        return []
    # Iface Destination Gateway Flags RefCnt Use Metric Mask ...; RTF_UP is flag 0x1.
    return [
        (row[0], int(row[1], 16), int(row[7], 16))
        for row in rows
        if len(row) >= 8 and int(row[3], 16) & 0x1
    ]


def _table_route_interface(host: str, table: str = "/proc/net/route") -> str | None:
    """The interface of the most specific route to ``host`` in the main table, if any."""
    (address,) = struct.unpack("<I", socket.inet_aton(host))
    best: tuple[int, str] | None = None
    for name, destination, mask in _routes(table):
        if address & mask == destination:
            length = bin(mask).count("1")
            if best is None or length > best[0]:
                best = (length, name)
    return best[1] if best else None


def _default_route_interface(table: str = "/proc/net/route") -> str | None:
    """The interface of the first IPv4 default route, with or without a gateway."""
    for name, destination, mask in _routes(table):
        if destination == 0 and mask == 0:
            return name
    return None


def _multicast_candidates() -> list[str]:
    """Non-loopback interfaces that are up, have an IPv4 address and can multicast, by name."""
    found = []
    for name in sorted(map(str, netifaces.interfaces())):
        flags = _flags(name)
        if flags is None or flags & _IFF_LOOPBACK or not flags & _IFF_UP:
            continue
        if flags & _IFF_MULTICAST and _ipv4(name) is not None:
            found.append(name)
    return found


def _flags(name: str) -> int | None:
    try:
        with open(f"/sys/class/net/{name}/flags", encoding="ascii") as file:
            return int(file.read().strip(), 16)
    except (OSError, ValueError):
        return None


def _addresses(name: str) -> list[dict[str, str]]:
    try:
        return list(netifaces.ifaddresses(name).get(netifaces.AF_INET, []))
    except ValueError:
        return []


def _ipv4(name: str) -> str | None:
    addresses = _addresses(name)
    return str(addresses[0]["addr"]) if addresses else None


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
