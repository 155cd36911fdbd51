"""``glue doctor``: what a user runs when nothing is discovered.

Each check yields one :class:`Check` (``ok``, ``warn`` or ``fail``, a name, one line of detail and,
for a problem, what to do), as soon as it is done, so the command shows progress:

1. **settings**: every ``GLUE_*`` value in effect and where it came from (environment, ``.env``,
   default); misspelt names.
2. **interface**: the one chosen and why, its MTU and the datagram size that follows.
3. **multicast** (when discovery listens on a group): a datagram sent to the group on that
   interface must come back to a socket joined to it, from this process and from a second one.
   The probe is not a glue datagram: endpoints listening there drop it (``dropped_malformed``).
4. **rendezvous** (each unicast discovery target): resolved, then asked, as an endpoint asks, for
   an answer; a glue announcement must come back. A goodbye follows, so it forgets the doctor.
5. **network key**: whether one is set, and the id of the key it seals with (compare ids).
6. **peers**: a real endpoint joins for two discovery periods and lists who it met, and what it
   refused: datagrams sealed with another key, unsealed ones, stale ones (a key mismatch).

Only the CLI prints; this module returns the checks. It opens sockets like the runtime does, so
run it where the endpoint would run (the same host, container or pod, with the same ``GLUE_*``).
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from glue import network, wire
from glue.errors import ConfigError, DecodeError
from glue.manager import AsyncEndpointManager
from glue.settings import GlueSettings, load_settings, unknown_variables

__all__ = ["Check", "run_checks"]

Verdict = Literal["ok", "warn", "fail"]

_PROBE = b"glue-doctor multicast probe "


@dataclass(frozen=True, slots=True)
class Check:
    """One line of the report: a verdict, what was checked, what was found, what to do."""

    verdict: Verdict
    name: str
    detail: str
    advice: str = ""


async def run_checks(*, wait_s: float | None = None) -> AsyncIterator[Check]:
    """Every check, in order, each as soon as it is done (see the module docstring)."""
    try:
        settings = load_settings()
    except ConfigError as exc:
        yield Check("fail", "settings", str(exc).replace("\n", "; "), "fix the variable named")
        return
    for check in _settings_checks(settings):
        yield check
    interface, interface_ip, checks = _interface_checks(settings)
    for check in checks:
        yield check
    group = settings.discovery_listen_address
    if group is not None and network.address_kind(group.host, interface) == "multicast":
        yield await asyncio.to_thread(_multicast_check, group.host, group.port, interface_ip)
    for target in settings.discovery_target_address:
        if network.address_kind(target.host, interface) == "unicast":
            yield await _rendezvous_check(settings, target.host, target.port)
    yield _key_check(settings)
    yield await _peers_check(settings, wait_s)


# --- settings and interface ---------------------------------------------------------------------


def _settings_checks(settings: GlueSettings) -> list[Check]:
    from_env_file: set[str] = set()
    env_file = Path(".env")
    if env_file.is_file():
        from dotenv import dotenv_values

        from_env_file = {name.upper() for name in dotenv_values(env_file)}
    environment = {name.upper() for name in os.environ}
    parts = []
    defaults = 0
    for field in type(settings).model_fields:
        variable = f"GLUE_{field.upper()}"
        if variable in environment:
            source = "environment"
        elif variable in from_env_file:
            source = ".env"
        else:
            defaults += 1
            continue
        value = getattr(settings, field)
        if isinstance(value, tuple) and value and isinstance(value[0], tuple):
            value = ",".join(str(v) for v in value)
        parts.append(f"{variable}={'' if value is None else value} ({source})")
    parts.append(f"{defaults} others at their defaults (.env.example lists them)")
    checks = [Check("ok", "settings", "; ".join(parts))]
    for name, where, close in unknown_variables():
        hint = f"did you mean {close}?" if close else "see .env.example for every setting"
        checks.append(Check("warn", "settings", f"{name} (in {where}) is not a glue setting", hint))
    return checks


def _interface_checks(settings: GlueSettings) -> tuple[str, str, list[Check]]:
    if settings.listen_interface:
        name = settings.listen_interface
        try:
            address = network.interface_address(name)
        except ConfigError as exc:
            return "lo", "127.0.0.1", [Check("fail", "interface", str(exc), "fix it or unset it")]
        reason = "GLUE_LISTEN_INTERFACE"
        warning = None
    else:
        hints = [t.host for t in settings.discovery_target_address]
        if settings.discovery_listen_address is not None:
            hints.append(settings.discovery_listen_address.host)
        resolved: list[str] = []
        for host in hints:
            try:
                infos = socket.getaddrinfo(host, None, socket.AF_INET)
            except OSError:
                continue
            resolved += sorted({str(info[4][0]) for info in infos})
        choice = network.choose_interface([h for h in resolved if not h.startswith("0.")])
        name, address, reason, warning = choice.name, choice.address, choice.reason, choice.warning
    mtu = network.interface_mtu(name)
    size = settings.max_datagram_bytes or min(wire.MAX_DATAGRAM_BYTES, mtu - 28)
    detail = f"{name} ({address}): {reason}; MTU {mtu}, datagrams of {size} bytes"
    if warning:
        return name, address, [Check("warn", "interface", detail, warning)]
    return name, address, [Check("ok", "interface", detail)]


# --- multicast ----------------------------------------------------------------------------------


def _multicast_check(group: str, port: int, interface_ip: str) -> Check:
    try:
        listener = _joined_socket(group, port, interface_ip)
    except OSError as exc:
        return Check(
            "fail",
            "multicast",
            f"cannot join {group}:{port} on {interface_ip}: {exc.strerror}",
            "is multicast enabled on the interface (ip link set DEV multicast on) and routed?",
        )
    with listener:
        here = _probe(listener, group, port, interface_ip, second_process=False)
        there = _probe(listener, group, port, interface_ip, second_process=True)
    if here and there:
        return Check(
            "ok",
            "multicast",
            f"{group}:{port} on {interface_ip}: heard back from this process and another one",
        )
    missing = " and ".join(
        what for what, heard in (("this process", here), ("a second process", there)) if not heard
    )
    return Check(
        "fail",
        "multicast",
        f"a datagram sent to {group}:{port} on {interface_ip} did not come back from {missing}",
        "multicast is blocked or not routed here: check firewalls (iptables -L -n; drops of "
        "224.0.0.0/4 or of the port), the interface's multicast flag, or use a unicast "
        "rendezvous (GLUE_DISCOVERY_TARGET_ADDRESS=HOST:PORT)",
    )


def _joined_socket(group: str, port: int, interface_ip: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((group, port))
        membership = struct.pack("4s4s", socket.inet_aton(group), socket.inet_aton(interface_ip))
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, membership)
    except OSError:
        sock.close()
        raise
    return sock


def _probe(
    listener: socket.socket, group: str, port: int, interface_ip: str, *, second_process: bool
) -> bool:
    nonce = secrets.token_hex(8).encode()
    if second_process:
        code = (
            "import sys; from glue.doctor import send_probe; "
            "send_probe(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4].encode())"
        )
        args = [group, str(port), interface_ip, nonce.decode()]
        subprocess.run([sys.executable, "-c", code, *args], check=False, timeout=20)
    else:
        send_probe(group, port, interface_ip, nonce)
    deadline = time.monotonic() + 1.0
    while (remaining := deadline - time.monotonic()) > 0:
        listener.settimeout(remaining)
        try:
            data = listener.recv(2048)
        except (TimeoutError, OSError):
            return False
        if data == _PROBE + nonce:
            return True
    return False


def send_probe(group: str, port: int, interface_ip: str, nonce: bytes) -> None:
    """Send the multicast probe (also run in a second process by the multicast check)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        sender.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(interface_ip))
        sender.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
        sender.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 1)
        for _ in range(3):  # three copies: one lost datagram is not a verdict
            sender.sendto(_PROBE + nonce, (group, port))


# --- rendezvous ---------------------------------------------------------------------------------


async def _rendezvous_check(settings: GlueSettings, host: str, port: int) -> Check:
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, family=socket.AF_INET, type=socket.SOCK_DGRAM)
    except OSError as exc:
        return Check(
            "fail",
            "rendezvous",
            f"{host}:{port}: cannot resolve: {exc}",
            "check the name (and DNS) in GLUE_DISCOVERY_TARGET_ADDRESS",
        )
    addresses = sorted({str(info[4][0]) for info in infos})
    wait_s = max(1.0, 2 * settings.discovery_rate_s)
    results = await asyncio.gather(
        *(asyncio.to_thread(_ask, settings, a, port, wait_s) for a in addresses)
    )
    answered = [f"{a} ({name})" for a, name in zip(addresses, results, strict=True) if name]
    silent = [a for a, name in zip(addresses, results, strict=True) if not name]
    label = f"{host}:{port}" + (f" -> {', '.join(addresses)}" if addresses != [host] else "")
    if not silent:
        return Check("ok", "rendezvous", f"{label}: answered by {', '.join(answered)}")
    verdict: Verdict = "warn" if answered else "fail"
    return Check(
        verdict,
        "rendezvous",
        f"{label}: no answer within {wait_s:g} s from {', '.join(silent)}"
        + (f"; answered by {', '.join(answered)}" if answered else ""),
        "is an endpoint listening there (GLUE_DISCOVERY_LISTEN_ADDRESS on its side), with the "
        f"same GLUE_NETWORK_ID ({settings.network_id}), and is UDP {port} open on the way?",
    )


def _ask(settings: GlueSettings, address: str, port: int, wait_s: float) -> str | None:
    """Ask ``address:port`` as an endpoint does; the name of whoever answers, if anyone."""
    endpoint_id = wire.EndpointId(1 + secrets.randbelow(2**53 - 1))
    incarnation = int(time.time() * 1000) * 1000 + secrets.randbelow(1000)
    header = wire.Header(settings.network_id, endpoint_id, incarnation)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("0.0.0.0", 0))
        own_port = sock.getsockname()[1]
        ask = wire.Announce(
            endpoint_id,
            incarnation,
            f"glue-doctor-{secrets.token_hex(3)}",
            "",
            own_port,
            settings.discovery_rate_milliseconds,
            ask=True,
        )
        sock.sendto(wire.encode(header, [ask]), (address, port))
        deadline = time.monotonic() + wait_s
        answer: str | None = None
        while answer is None and (remaining := deadline - time.monotonic()) > 0:
            sock.settimeout(remaining)
            try:
                data = sock.recv(wire.MAX_DATAGRAM_BYTES)
            except (TimeoutError, OSError):
                break
            try:
                datagram = wire.decode(data, network_id=settings.network_id)
            except DecodeError:
                continue
            names = [
                f.name for f in datagram.frames if isinstance(f, wire.Announce) and not f.forwarded
            ]
            answer = names[0] if names else None
        sock.sendto(wire.encode(header, [wire.Goodbye()]), (address, port))
    return answer


# --- key and peers ------------------------------------------------------------------------------


def _key_check(settings: GlueSettings) -> Check:
    keys = settings.network_keys()
    if not keys:
        return Check(
            "ok",
            "network key",
            "none: datagrams are not sealed (anyone on the segment can read and send them)",
        )
    from glue.security import NetworkKeys

    ids = NetworkKeys(keys, settings.network_id).key_ids
    source = "GLUE_NETWORK_KEY" if settings.network_key is not None else "GLUE_NETWORK_KEY_FILE"
    rotation = f"; {len(ids) - 1} more opening only" if len(ids) > 1 else ""
    return Check(
        "ok",
        "network key",
        f"from {source}: seals with key id {ids[0]}{rotation} (compare ids across endpoints)",
    )


async def _peers_check(settings: GlueSettings, wait_s: float | None) -> Check:
    seconds = wait_s if wait_s is not None else 2 * settings.discovery_rate_s
    try:
        async with AsyncEndpointManager(settings) as endpoint:
            await asyncio.sleep(seconds)  # every live peer announces within the window
            peers = await endpoint.peers()
            counters = endpoint.counters()
    except ConfigError as exc:
        return Check("fail", "peers", f"cannot start an endpoint: {exc}", "fix the variable named")
    refused = {
        reason: counters.get(f"dropped_{reason}", 0)
        for reason in ("key", "auth", "unsealed", "sealed", "stale")
        if counters.get(f"dropped_{reason}", 0)
    }
    if refused:
        hint = {
            "key": "other endpoints seal with a key this one does not have (compare key ids)",
            "auth": "datagrams fail authentication: another key, or forged",
            "unsealed": "other endpoints send unsealed datagrams: they have no network key",
            "sealed": "other endpoints seal their datagrams: set the network's key here",
            "stale": "datagrams are over 60 s old or ahead: synchronise the clocks (NTP)",
        }
        return Check(
            "fail",
            "peers",
            f"{len(peers)} seen; datagrams refused: "
            + ", ".join(f"{n} {reason}" for reason, n in refused.items()),
            "; ".join(hint[reason] for reason in refused),
        )
    if not peers:
        return Check(
            "fail",
            "peers",
            f"no peer seen within {seconds:g} s (two discovery periods)",
            "the checks above say why if they failed; otherwise no endpoint of network "
            f"{settings.network_id} runs where this one can hear it",
        )
    names = ", ".join(f"{p.name} at {p.host}:{p.port}" for p in peers)
    return Check("ok", "peers", f"{len(peers)} seen within {seconds:g} s: {names}")


def format_check(check: Check) -> str:
    """One report line (and an indented advice line for a problem)."""
    line = f"{check.verdict.upper():4}  {check.name:12} {check.detail}"
    return line + (f"\n      {'':12} -> {check.advice}" if check.advice else "")


def verdicts(checks: Sequence[Check]) -> tuple[int, int]:
    """How many checks failed and how many warned."""
    return sum(c.verdict == "fail" for c in checks), sum(c.verdict == "warn" for c in checks)
