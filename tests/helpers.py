"""Helpers shared by the test suites: waiting on conditions with deadlines, never fixed sleeps."""

from __future__ import annotations

import asyncio
import re
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from glue import EndpointManager


def wait_until(predicate: Callable[[], bool], *, timeout: float, interval: float = 0.01) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` seconds pass; return its last value."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return bool(predicate())
        time.sleep(interval)


@contextmanager
def random_loss(ports: Sequence[int], probability: float) -> Iterator[None]:
    """iptables drops ``probability`` of the UDP datagrams arriving on ``ports``, at random, until
    the block ends (only in the tests' private network namespace: tools/isolated-net)."""
    rule = [
        "INPUT", "-p", "udp", "-m", "multiport", "--dports", ",".join(map(str, ports)),
        "-m", "statistic", "--mode", "random", "--probability", str(probability), "-j", "DROP",
    ]  # fmt: skip
    subprocess.run(["iptables", "-A", *rule], check=True)
    try:
        yield
    finally:
        subprocess.run(["iptables", "-D", *rule], check=True)


@contextmanager
def link_rate(rate: str, *, queue: str = "5ms", burst: str = "256kb") -> Iterator[None]:
    """Every datagram on ``lo`` passes a link of ``rate`` (e.g. "1gbit") with a queue of
    ``queue`` (``tc tbf``: beyond it, datagrams are dropped, as a switch port drops them), until
    the block ends (only in the tests' private network namespace: tools/isolated-net)."""
    subprocess.run(
        ["tc", "qdisc", "add", "dev", "lo", "root", "tbf", "rate", rate, "burst", burst,
         "latency", queue],
        check=True,
    )  # fmt: skip
    try:
        yield
    finally:
        subprocess.run(["tc", "qdisc", "del", "dev", "lo", "root"], check=True)


def link_drops() -> int:
    """Datagrams the ``link_rate`` link dropped so far (its queue full)."""
    shown = subprocess.run(
        ["tc", "-s", "qdisc", "show", "dev", "lo"], capture_output=True, text=True, check=True
    ).stdout
    found = re.search(r"dropped (\d+)", shown)
    return int(found.group(1)) if found else 0


async def async_wait_until(
    predicate: Callable[[], bool], *, timeout: float, interval: float = 0.01
) -> bool:
    """``wait_until`` for asyncio tests."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        if predicate():
            return True
        if loop.time() >= deadline:
            return bool(predicate())
        await asyncio.sleep(interval)


def multicast_settings(group: str, **extra: object) -> dict[str, object]:
    """Keyword settings for an endpoint on the multicast ``group`` ("ip:port"), 200 ms period."""
    return {
        "discovery_target_address": group,
        "discovery_listen_address": group,
        "discovery_rate_milliseconds": 200,
        **extra,
    }


def free_udp_port() -> int:
    """A UDP port free on 127.0.0.1 right now (used for per-test discovery ports)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def fake_peer(
    endpoint_id: int, name: str, to: EndpointManager
) -> Iterator[tuple[socket.socket, bytes, tuple[str, int]]]:
    """A raw UDP socket on 127.0.0.1 playing peer ``endpoint_id`` (incarnation 1), announced to
    ``to`` (on its data address) and known to it once this enters: the socket, the announcing
    datagram (to send again) and ``to``'s data address. ``to`` takes the socket's transport
    frames (they come from the address it announced)."""
    from glue import wire

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        fake = wire.EndpointId(endpoint_id)
        announce = wire.encode(
            wire.Header(1, fake, 1),
            [wire.Announce(fake, 1, name, "", sock.getsockname()[1], 1000)],
        )
        target = ("127.0.0.1", to.data_address[1])
        sock.sendto(announce, target)
        known = wait_until(lambda: fake in [p.endpoint_id for p in to.peers()], timeout=5)
        assert known, f"{to.name} did not take the fake peer {name!r} for a peer"
        yield sock, announce, target


class Inbox:
    """A subscription callback that keeps what it gets; waits on conditions, never sleeps."""

    def __init__(self) -> None:
        self.messages: list[Any] = []
        self.changed = threading.Condition()

    def __call__(self, message: Any) -> None:
        with self.changed:
            self.messages.append(message)
            self.changed.notify_all()

    def wait_for_count(self, count: int, *, timeout: float) -> bool:
        """Wait until at least ``count`` messages arrived, at most ``timeout`` seconds."""
        with self.changed:
            return self.changed.wait_for(lambda: len(self.messages) >= count, timeout)

    def sequences(self) -> list[int]:
        with self.changed:
            return [m.sequence for m in self.messages]

    def payloads(self) -> list[bytes]:
        with self.changed:
            return [m.payload for m in self.messages]
