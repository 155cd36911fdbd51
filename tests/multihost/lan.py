"""A test LAN: hosts in network namespaces, each with a veth into one Linux bridge.

One LAN is a "switch" namespace ``glan<X>-sw`` holding a bridge ``br0`` (10.77.X.254/24,
multicast snooping off so multicast floods to every port), and N host namespaces
``glan<X>-h1`` .. ``glan<X>-hN``, each with ``lo`` and one veth ``lan0`` (10.77.X.<i>/24) whose
other end ``p<i>`` is a port of the bridge. X (1..254) is picked per LAN among the free ones,
so several LANs (concurrent test runs) never share a name or a subnet. Nothing is created in the
caller's namespace and nothing connects to the machine's own interfaces: every link is made with
``ip -n <namespace>`` directly between the switch and a host.

The namespaces are named (``ip netns add``, bind-mounted under ``/run/netns``) so that
``ip netns exec`` works, including its per-namespace ``/etc/netns/<name>/hosts``, which is how
the hosts get DNS names. The bridge's alias records who made the LAN (``owner=<pid>`` or
``owner=cli``), so leftovers of a crashed run can be told from a LAN in use.

Used by ``tests/multihost/conftest.py`` (the ``lan`` fixture) and by ``tools/testlan`` (run this
file: ``up N``, ``down``, ``list``, ``exec HOST cmd...``, ``loss``, ``cut``, ``heal``,
``block-multicast``). Standard library only; needs real root (CAP_SYS_ADMIN over the mounts).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

PREFIX = "glan"
INTERFACE = "lan0"
BRIDGE = "br0"
GATEWAY = 254  # the bridge's host number: the hosts' default route points at it
MULTICAST = "224.0.0.0/4"
_NAME = re.compile(rf"^{PREFIX}(\d+)-(sw|h\d+)$")
_COMMENT = "glan"  # iptables comment on every rule added here


class LanError(RuntimeError):
    """A command building or changing the LAN failed (message: the command and its stderr)."""


def run(args: Sequence[str], *, check: bool = True, timeout: float = 20) -> str:
    """Run a command; return its stdout; raise :class:`LanError` with stderr if it fails."""
    result = subprocess.run(
        list(args), capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and result.returncode != 0:
        raise LanError(f"{' '.join(args)}: exit {result.returncode}: {result.stderr.strip()}")
    return result.stdout


def iptables_path() -> str:
    return shutil.which("iptables") or "/usr/sbin/iptables"


class Stoppable(Protocol):
    def close(self) -> None: ...


@dataclass
class Host:
    """One host of a LAN: its namespace, address and switch port."""

    lan: Lan
    index: int
    address: str

    @property
    def name(self) -> str:
        """Short name, ``h<i>``."""
        return f"h{self.index}"

    @property
    def netns(self) -> str:
        return f"{self.lan.prefix}{self.name}"

    @property
    def interface(self) -> str:
        return INTERFACE

    @property
    def port(self) -> str:
        """The bridge port (in the switch namespace) this host's veth plugs into."""
        return f"p{self.index}"

    @property
    def enter(self) -> list[str]:
        """Command prefix that runs a program in this host (with its /etc/netns files)."""
        return ["ip", "netns", "exec", self.netns]

    def run(self, *args: str, check: bool = True) -> str:
        """Run a command inside this host."""
        return run([*self.enter, *args], check=check)

    def ip(self, *args: str) -> str:
        return run(["ip", "-n", self.netns, *args])

    def iptables(self, *args: str, check: bool = True) -> str:
        return self.run(iptables_path(), "-w", *args, check=check)

    def resolve(self, name: str) -> list[str]:
        """IPv4 addresses ``getaddrinfo`` returns for ``name`` inside this host, in order."""
        code = (
            "import json, socket, sys\n"
            "infos = socket.getaddrinfo(sys.argv[1], None, socket.AF_INET, socket.SOCK_DGRAM)\n"
            "print(json.dumps([i[4][0] for i in infos]))\n"
        )
        return list(json.loads(self.run(sys.executable, "-c", code, name)))

    def __str__(self) -> str:
        return f"{self.name} ({self.netns}, {self.address})"


@dataclass
class Lan:
    """A LAN of ``len(hosts)`` hosts on subnet 10.77.``number``.0/24; ``close`` removes it all."""

    number: int
    hosts: list[Host] = field(default_factory=list)
    _rules: list[tuple[Host, tuple[str, ...]]] = field(default_factory=list)
    _processes: list[Stoppable] = field(default_factory=list)
    _cut: dict[str, str] = field(default_factory=dict)

    @property
    def prefix(self) -> str:
        return f"{PREFIX}{self.number}-"

    @property
    def switch(self) -> str:
        return f"{self.prefix}sw"

    @property
    def subnet(self) -> str:
        return f"10.77.{self.number}.0/24"

    @property
    def gateway(self) -> str:
        return f"10.77.{self.number}.{GATEWAY}"

    def host(self, name: str) -> Host:
        return next(h for h in self.hosts if name in (h.name, h.netns))

    # --- building -------------------------------------------------------------------------------

    @classmethod
    def create(cls, count: int, *, default_route: bool = True, owner: str | None = None) -> Lan:
        """Make a LAN of ``count`` hosts (1..253); on any failure remove what was made."""
        if not 1 <= count < GATEWAY:
            raise ValueError(f"1..{GATEWAY - 1} hosts, not {count}")
        os.makedirs("/run/netns", exist_ok=True)
        lan = _claim()
        try:
            lan._build(count, default_route=default_route, owner=owner or f"owner={os.getpid()}")
        except BaseException:
            lan.close()
            raise
        return lan

    def _build(self, count: int, *, default_route: bool, owner: str) -> None:
        sw = ["ip", "-n", self.switch]
        run([*sw, "link", "set", "lo", "up"])
        run([*sw, "link", "add", BRIDGE, "type", "bridge", "mcast_snooping", "0"])
        run([*sw, "link", "set", BRIDGE, "alias", owner])
        run([*sw, "addr", "add", f"{self.gateway}/24", "dev", BRIDGE])
        run([*sw, "link", "set", BRIDGE, "up"])
        for index in range(1, count + 1):
            host = Host(self, index, f"10.77.{self.number}.{index}")
            run(["ip", "netns", "add", host.netns])
            self.hosts.append(host)
            # Both ends are made where they live: nothing ever exists in the caller's namespace.
            run([*sw, "link", "add", host.port, "type", "veth", "peer", "name", INTERFACE,
                 "netns", host.netns])  # fmt: skip
            run([*sw, "link", "set", host.port, "master", BRIDGE])
            run([*sw, "link", "set", host.port, "up"])
            host.ip("link", "set", "lo", "up")
            host.ip("addr", "add", f"{host.address}/24", "dev", INTERFACE)
            host.ip("link", "set", INTERFACE, "multicast", "on")
            host.ip("link", "set", INTERFACE, "up")
            if default_route:
                host.ip("route", "add", "default", "via", self.gateway, "dev", INTERFACE)

    def close(self) -> None:
        """Stop the processes started here, then remove every namespace and hosts file."""
        errors: list[str] = []
        for process in reversed(self._processes):
            try:
                process.close()
            except Exception as exc:  # keep tearing down; report at the end
                errors.append(f"stopping {process!r}: {exc!r}")
        self._processes.clear()
        errors += remove_lan(self.number)
        if errors:
            raise LanError("; ".join(errors))

    # --- running things in hosts ----------------------------------------------------------------

    def adopt(self, process: Stoppable) -> None:
        """Have ``close`` stop ``process`` before the namespaces go (latest first)."""
        self._processes.append(process)

    def start(self, hosts: Iterable[Host], **glue: Any) -> list[Any]:
        """Start ``tests/endpoint_process.py`` in each of ``hosts`` with ``GLUE_*`` settings
        ``glue`` (a callable value is called with the host), all at once, then wait until each
        is ready. ``close`` stops them."""
        from tests.endpoint_process import EndpointProcess  # not needed by tools/testlan

        processes = []
        for host in hosts:
            settings = {k: v(host) if callable(v) else v for k, v in glue.items()}
            process = EndpointProcess(host.enter, label=host.name, wait=False, **settings)
            self.adopt(process)
            processes.append(process)
        for process in processes:
            process.wait_ready()
        return processes

    def set_hosts_file(self, host: Host, names: dict[str, Iterable[str]]) -> None:
        """Write ``/etc/netns/<host>/hosts`` (seen as /etc/hosts under ``ip netns exec``):
        localhost and, for each name, one line per address. Rewritten in place, so a running
        process sees the change at its next lookup."""
        lines = ["127.0.0.1 localhost", f"{host.address} {host.name}"]
        for name, addresses in names.items():
            lines += [f"{address} {name}" for address in addresses]
        directory = f"/etc/netns/{host.netns}"
        os.makedirs(directory, exist_ok=True)
        with open(f"{directory}/hosts", "w", encoding="ascii") as file:
            file.write("\n".join(lines) + "\n")

    # --- impairments ----------------------------------------------------------------------------

    def _rule(self, host: Host, chain: str, *spec: str) -> None:
        rule = (chain, *spec, "-m", "comment", "--comment", _COMMENT, "-j", "DROP")
        host.iptables("-I", *rule)
        self._rules.append((host, rule))

    def _unrule(self, host: Host, keep: Callable[[tuple[str, ...]], bool]) -> None:
        for entry in [e for e in self._rules if e[0] is host and not keep(e[1])]:
            host.iptables("-D", *entry[1])
            self._rules.remove(entry)

    def add_loss(
        self, host: Host, probability: float, chains: Sequence[str] = ("INPUT", "OUTPUT")
    ) -> None:
        """Drop each packet into (INPUT) and out of (OUTPUT) ``host`` with ``probability``."""
        for chain in chains:
            self._rule(
                host, chain, "-m", "statistic", "--mode", "random",
                "--probability", f"{probability}",
            )  # fmt: skip

    def clear_loss(self, host: Host) -> None:
        self._unrule(host, lambda rule: "statistic" not in rule)

    def block_multicast(self, *hosts: Host) -> None:
        """Drop multicast (224.0.0.0/4) into and out of ``hosts`` (default: all), as on networks
        where only unicast passes."""
        for host in hosts or self.hosts:
            self._rule(host, "INPUT", "-d", MULTICAST)
            self._rule(host, "OUTPUT", "-d", MULTICAST)

    def unblock_multicast(self, *hosts: Host) -> None:
        for host in hosts or self.hosts:
            self._unrule(host, lambda rule: MULTICAST not in rule)

    def dropped(self, host: Host) -> int:
        """Packets dropped so far by this module's rules in ``host``."""
        out = host.iptables("-L", "-v", "-n", "-x")
        return sum(int(line.split()[0]) for line in out.splitlines() if f"/* {_COMMENT} */" in line)

    def udp_stats(self, host: Host) -> dict[str, int]:
        """The kernel's UDP counters in ``host`` (/proc/net/snmp), e.g. ``RcvbufErrors``:
        datagrams dropped because a socket's receive buffer was full."""
        rows = [line.split()[1:] for line in host.run("cat", "/proc/net/snmp").splitlines()
                if line.startswith("Udp:")]  # fmt: skip
        return {name: int(value) for name, value in zip(rows[0], rows[1], strict=True)}

    def cut(self, host: Host, how: str = "link") -> None:
        """Disconnect ``host``: ``link`` sets its bridge port down (its ``lan0`` loses carrier,
        as when a cable is pulled); ``iptables`` drops everything in and out of it."""
        if host.name in self._cut:
            raise LanError(f"{host} is already cut")
        if how == "link":
            run(["ip", "-n", self.switch, "link", "set", host.port, "down"])
        elif how == "iptables":
            self._rule(host, "INPUT", "-i", INTERFACE)
            self._rule(host, "OUTPUT", "-o", INTERFACE)
        else:
            raise ValueError(f"cut how={how!r}: 'link' or 'iptables'")
        self._cut[host.name] = how

    def heal(self, host: Host) -> None:
        """Undo :meth:`cut`."""
        how = self._cut.pop(host.name)
        if how == "link":
            run(["ip", "-n", self.switch, "link", "set", host.port, "up"])
        else:
            self._unrule(host, lambda rule: "-i" not in rule and "-o" not in rule)

    def describe(self) -> str:
        lines = [f"LAN {self.number}: switch {self.switch}, bridge {BRIDGE} {self.gateway}/24"]
        lines += [f"  {host}: {INTERFACE} <-> {self.switch}:{host.port}" for host in self.hosts]
        return "\n".join(lines)


def wait_full_mesh(processes: Sequence[Any], timeout: float) -> float:
    """Wait until every process has had a ``peer_added`` for every other one; return the
    seconds from the last start to the last first meeting. Fails naming who misses whom."""
    ids = {p.endpoint_id for p in processes}

    def met(process: Any) -> bool:
        return {e["peer"] for e in process.events("peer_added")} >= ids - {process.endpoint_id}

    for process in processes:
        if not process.wait_for(lambda p=process: met(p), timeout):
            seen = {e["peer"] for e in process.events("peer_added")}
            raise AssertionError(
                f"{process.label} met {len(seen)} of {len(ids) - 1} peers within {timeout} s "
                f"(missing {sorted(ids - seen - {process.endpoint_id})}):\n{process.log()}"
            )
    last_start = max(p.started_at for p in processes)
    met_at = max(
        min(e["t"] for e in p.events("peer_added", peer=other.endpoint_id))
        for p in processes
        for other in processes
        if other is not p
    )
    return max(0.0, met_at - last_start)


# --- finding and removing LANs ------------------------------------------------------------------


def namespaces() -> list[str]:
    """Names of every namespace made by this module (any LAN, any run)."""
    out = run(["ip", "netns", "list"], check=False)
    names = [line.split()[0] for line in out.splitlines() if line.strip()]
    return sorted(name for name in names if _NAME.match(name))


def lans() -> dict[int, list[str]]:
    """LAN number -> its namespaces."""
    found: dict[int, list[str]] = {}
    for name in namespaces():
        match = _NAME.match(name)
        assert match is not None
        found.setdefault(int(match.group(1)), []).append(name)
    return found


def owner(number: int) -> str:
    """``owner=<pid>``, ``owner=cli`` or ``?`` (no switch left)."""
    out = run(["ip", "-n", f"{PREFIX}{number}-sw", "-j", "link", "show", BRIDGE], check=False)
    with contextlib.suppress(ValueError, IndexError, KeyError):
        return str(json.loads(out)[0].get("ifalias", "?"))
    return "?"


def is_stale(number: int) -> bool:
    """No process owns LAN ``number`` any more (its owner pid is gone, or it has no switch)."""
    who = owner(number)
    if who.startswith("owner=") and who[6:].isdigit():
        return not os.path.exists(f"/proc/{who[6:]}")
    return who == "?"


def remove_lan(number: int) -> list[str]:
    """Delete LAN ``number``'s namespaces (hosts first) and hosts files; return the errors.

    Deleting a namespace deletes its veths and iptables rules with it. Any process still running
    in a host keeps that namespace alive but unreachable (the switch end of its veth is gone)."""
    errors = []
    names = lans().get(number, [])
    for name in sorted(names, key=lambda n: n.endswith("-sw")):
        try:
            run(["ip", "netns", "delete", name])
        except LanError as exc:
            errors.append(str(exc))
    for directory in _hosts_dirs(number):
        shutil.rmtree(directory, ignore_errors=True)
    return errors


def _hosts_dirs(number: int) -> list[str]:
    with contextlib.suppress(FileNotFoundError):
        return [
            f"/etc/netns/{name}"
            for name in os.listdir("/etc/netns")
            if name.startswith(f"{PREFIX}{number}-") and _NAME.match(name)
        ]
    return []


def remove_stale() -> list[int]:
    """Remove every LAN whose owner is gone (leftovers of killed runs); return their numbers."""
    stale = [number for number in lans() if is_stale(number)]
    for number in stale:
        remove_lan(number)
    return stale


def _claim() -> Lan:
    """Create the switch namespace of a free LAN number; ``ip netns add`` refuses a name that
    exists, so two runs racing for one number cannot both get it."""
    taken = set(lans())
    free = [n for n in range(1, GATEWAY) if n not in taken]
    random.shuffle(free)
    for number in free[:20]:
        lan = Lan(number)
        try:
            run(["ip", "netns", "add", lan.switch])
        except LanError:
            continue
        return lan
    raise LanError("no free LAN number (tools/testlan list; tools/testlan down --all)")


# --- the tools/testlan command --------------------------------------------------------------------


def _cli_lan(number: int | None) -> Lan:
    if number is None:
        ours = [n for n in lans() if owner(n) == "owner=cli"]
        if len(ours) != 1:
            raise SystemExit(f"{len(ours)} LANs made by `up`; say which with --lan N")
        number = ours[0]
    lan = Lan(number)
    names = lans().get(number, [])
    if not names:
        raise SystemExit(f"no LAN {number}")
    indexes = sorted(int(n.rsplit("-h", 1)[1]) for n in names if not n.endswith("-sw"))
    lan.hosts = [Host(lan, i, f"10.77.{number}.{i}") for i in indexes]
    return lan


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tools/testlan", description=__doc__.split("\n")[0])
    parser.add_argument("--lan", type=int, help="LAN number (default: the one made by `up`)")
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="make a LAN of N hosts")
    up.add_argument("count", type=int)
    up.add_argument("--no-default-route", action="store_true")
    down = sub.add_parser("down", help="remove LANs made by `up` and leftovers of dead runs")
    down.add_argument("--all", action="store_true", help="every LAN, even one a test is using")
    sub.add_parser("list", help="LANs, their owner and namespaces")
    execute = sub.add_parser("exec", help="run a command in a host (h1, h2, ...)")
    execute.add_argument("host")
    execute.add_argument("cmd", nargs=argparse.REMAINDER)
    loss = sub.add_parser("loss", help="random loss in and out of a host (0 clears it)")
    loss.add_argument("host")
    loss.add_argument("probability", type=float)
    for name, text in (("cut", "disconnect a host (its bridge port down)"), ("heal", "undo cut")):
        sub.add_parser(name, help=text).add_argument("host")
    block = sub.add_parser("block-multicast", help="drop 224.0.0.0/4 in and out of hosts")
    block.add_argument("hosts", nargs="*")
    args = parser.parse_args(argv)

    if args.command == "up":
        lan = Lan.create(args.count, default_route=not args.no_default_route, owner="owner=cli")
        print(lan.describe())
        return 0
    if args.command == "down":
        numbers = list(lans()) if args.all else [
            n for n in lans() if owner(n) == "owner=cli" or is_stale(n)
        ]  # fmt: skip
        for number in numbers:
            for error in remove_lan(number):
                print(error, file=sys.stderr)
        print(f"removed {len(numbers)} LAN(s): {', '.join(map(str, numbers)) or '-'}")
        return 0
    if args.command == "list":
        for number, names in sorted(lans().items()):
            state = "stale" if is_stale(number) else "live"
            print(f"LAN {number} (10.77.{number}.0/24) {owner(number)} {state}: {' '.join(names)}")
        return 0
    lan = _cli_lan(args.lan)
    if args.command == "exec":
        host = lan.host(args.host)
        command = args.cmd or [os.environ.get("SHELL", "/bin/bash")]
        os.execvp("ip", [*host.enter, *command])
    if args.command in ("cut", "heal"):
        up_down = "down" if args.command == "cut" else "up"
        run(["ip", "-n", lan.switch, "link", "set", lan.host(args.host).port, up_down])
    elif args.command == "loss":
        host = lan.host(args.host)
        # Rules of an earlier `loss` call: found by their comment in the listing.
        for chain in ("INPUT", "OUTPUT"):
            for line in host.iptables("-S", chain).splitlines():
                if "statistic" in line and _COMMENT in line:
                    host.iptables("-D", *line.split()[1:])
        if args.probability > 0:
            lan.add_loss(host, args.probability)
    elif args.command == "block-multicast":
        lan.block_multicast(*(lan.host(h) for h in args.hosts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
