"""What both runtimes share: identity, sockets, the stack, the receive and send paths.

A runtime drives one sans-IO :class:`~glue.stack.Stack` over real sockets. Two do so: the asyncio
runtime (:class:`glue.endpoint.Endpoint`, in the caller's loop) and the thread runtime
(:class:`glue.runtime_thread.ThreadRuntime`, under the blocking ``EndpointManager``: a network
thread, and callers that send their own datagrams). :class:`RuntimeCore` is everything that does
not depend on how the runtime waits: it opens the sockets and builds the stack from the settings,
reads every datagram waiting on a socket into reused buffers (opening sealed ones) and feeds them
to the stack, sends what the stack returns (sealing it), builds the messages callers hand over
(checked once), pulls the stack's events for the listeners, and answers queries (peers, counters,
metrics). It never waits, sleeps or takes a lock: each runtime calls it where its own rules (the
loop thread, or the stack's lock) make that safe.
"""

from __future__ import annotations

import functools
import logging
import math
import random
import secrets
import socket
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from typing import Final, NoReturn, cast

import orjson

from glue import history, network, wire
from glue.discovery import Address, DiscoveryConfig, Target
from glue.errors import BackpressureError, DeliveryError, NoResponderError, UsageError
from glue.events import Peer, Request, StackEvent
from glue.groups import GroupsConfig
from glue.metrics import MetricsServer, MetricsSnapshot, PeerMetrics
from glue.outbox import Outgoing
from glue.security import SEAL_OVERHEAD, NetworkKeys, Opener, Rejected, Sealer
from glue.settings import GlueSettings
from glue.stack import Stack, StackConfig
from glue.topics import (
    APART_BYTES,
    Outbound,
    TopicsConfig,
    validate_topic_name,
    validate_topic_type,
)
from glue.transport import SendSpaceFreed, TransportConfig
from glue.wire import EndpointId

__all__ = ["EventListener", "RuntimeCore"]

logger = logging.getLogger(__name__)
_RECV_BYTES: Final = 65536
#: A direct message's ``w`` (wall clock at send) is written again when the clock moved this
#: far: formatting a float costs 400 ns, a cached stamp nothing (topic messages have one
#: stamp per burst).
_STAMP_S: Final = 50e-6
#: Receive buffers kept for reuse, at most (64 KiB each, made only when needed). A datagram's
#: buffer is held while a payload views it: a large message's datagrams until it is whole (17
#: for 1 MiB), and frames out of order behind a loss until it is repaired (up to the transport's
#: reorder_bytes, 8 MiB: 128). With 32, a 1 MiB stream at 10 % loss allocated a fresh buffer
#: for 2 datagrams in 5 after scanning all 32.
_MAX_RECEIVE_BUFFERS: Final = 160
#: Held buffers tried, oldest first, when no spare one is left, before a new one is made: held
#: ones are released mostly in the order they were taken, so the oldest few are the likely free.
_BUFFER_TRIES: Final = 4
#: The first byte of a sealed datagram (glue.security.SEAL_MAGIC); a plain one starts with "{".
_SEALED_FIRST_BYTE: Final = 0xC7
#: What the log says, once per source, of datagrams refused for each reason.
_REFUSALS: Final = {
    "key": "are sealed with a key this endpoint does not have: another network key?",
    "auth": "fail authentication: another network key, or forged",
    "unsealed": "are not sealed: that endpoint has no GLUE_NETWORK_KEY, this one requires it",
    "sealed": "are sealed, but this endpoint has no GLUE_NETWORK_KEY: set the network's key",
    "replay": "repeat datagrams already received: replayed, dropped",
    "stale": "were sent more than 60 s ago or ahead of this clock: are the clocks synchronised?",
    "truncated": "are too short to be sealed datagrams",
}
#: How long a metrics scrape waits for the loop to take a snapshot.
_SNAPSHOT_TIMEOUT_S: Final = 2.0
_PAD: Final = memoryview(bytes(_RECV_BYTES))
_MAX_READS_PER_WAKEUP: Final = 4096
#: Bytes and seconds of reading per wake-up before the stack's outputs are flushed. A wake-up that
#: drained a deep socket buffer of bundles (hundreds of messages per datagram) would otherwise go
#: for hundreds of milliseconds without sending acks or announcements, and the sender would take
#: this endpoint for dead. The socket stays readable, so the loop comes back at once for the rest.
#: Large messages cost little per byte (1 MiB of 64 KiB messages takes ~0.5 ms) and each wake-up
#: costs ~10 us, so the byte bound is large; small ones cost ~50 times more per byte, and the time
#: bound stops them first.
_MAX_BYTES_PER_WAKEUP: Final = 1024 * 1024
_MAX_SECONDS_PER_WAKEUP: Final = 0.005
#: Wake-ups that stopped at a bound may keep their events for the next ones, at most this many.
_MAX_DEFERRED_WAKEUPS: Final = 2
_UDP_IP_OVERHEAD: Final = 28
_MAX_DRAIN_PER_CALL: Final = 4096
_HANDOFF_SOFT_ITEMS: Final = 8192

#: Called on the network thread (the loop's) with the events of one burst; must not block.
EventListener = Callable[[list[StackEvent]], None]


#: Busy polling (GLUE_BUSY_POLL_MICROSECONDS): a pause this long between two polls means the
#: thread was not running (every core taken, or another thread held the GIL); see BusyBackoff.
BUSY_PREEMPTED_S: Final = 0.0002


class BusyBackoff:
    """How long busy polling stops after the thread was kept from running while it polled:
    10 ms, doubling for each such pause within a second of polling again, up to 1 s. Polling on a
    machine without a free core only delays the threads that would answer (measured: a round
    trip of 866-911 us instead of 284-319 with two test suites beside it), while a pause now and
    then (a timer, an interrupt) should cost little of what polling gains."""

    __slots__ = ("_pause", "until")

    def __init__(self) -> None:
        self.until = -math.inf  # no polling before this
        self._pause = 0.0

    def preempted(self, now: float) -> None:
        """The polling thread was kept from running at ``now``."""
        again = now - self.until <= 1.0  # within a second of polling again
        self._pause = min(1.0, self._pause * 2) if again and self._pause else 0.01
        self.until = now + self._pause


class RuntimeCore:
    """The runtime-independent half of an endpoint (see the module docstring)."""

    def __init__(self, settings: GlueSettings) -> None:
        self.settings = settings
        self.endpoint_id = EndpointId(settings.id)
        self.name = settings.name
        # A restart of the same endpoint id gets a larger incarnation (milliseconds since the
        # epoch, scaled, plus randomness), so peers can tell the new instance from the old one.
        self.incarnation = int(time.time() * 1000) * 1000 + secrets.randbelow(1000)
        self.counters: Counter[str] = Counter()
        self.data_address: Address = ("0.0.0.0", 0)
        self._listeners: list[EventListener] = []
        self._data: socket.socket | None = None
        self._discovery_sockets: network.DiscoverySockets | None = None
        self._stack: Stack | None = None
        self._interface = "lo"
        self._warned: set[object] = set()
        self._state = "new"
        #: Under load, let a wake-up's events wait for the next few (see _read). Worth it when
        #: handing events over is dear (threads to wake); otherwise holding the messages longer
        #: costs more than it saves (memory handed back to the OS and faulted in again: +10-20 us
        #: of system time per 64 KiB message with asyncio).
        self.coalesce_events = False
        self._deferred = 0  # wake-ups whose events wait in the stack (see _read)
        self._valid_names: set[tuple[str, str]] = set()
        # Direct envelopes: the start per message type (``{"y":"cmd",``), and the latest wall
        # clock stamp (``"w":1732350000.25}`` LF) with when it was taken (shared by threads: a
        # tuple, replaced whole).
        self._direct_prefixes: dict[str, bytes] = {"": b"{"}
        self._direct_stamp: tuple[float, bytes] = (0.0, b"")
        # Datagrams are read into reused buffers (see _receive_buffer), not a new bytes each.
        self._buffer = bytearray(_RECV_BYTES)  # the one read into now (not counted)
        self._spare: list[bytearray] = []  # free, the most recently used last
        self._lent: deque[bytearray] = deque()  # held by views when last seen, oldest first
        #: The Prometheus endpoint, when GLUE_METRICS_ADDRESS is set (see glue.metrics).
        self.metrics: MetricsServer | None = None
        # The network key: every datagram sealed on its way out and opened on its way in.
        #: Kept history on disk, when GLUE_HISTORY_PATH is set (see glue.history).
        self._history: history.HistoryStore | None = None
        self._sealer: Sealer | None = None
        self._opener: Opener | None = None  # sealed datagrams are read into its buffer
        self.key_ids: list[str] = []
        keys = settings.network_keys()
        if keys:
            network_keys = NetworkKeys(keys, settings.network_id)
            self._sealer = Sealer(network_keys)
            self._opener = Opener(network_keys, max_senders=4 * settings.max_peers)
            self.key_ids = network_keys.key_ids  # logged at start; they reveal nothing
        # Read on every send (plain attributes are cheaper than the settings model's).
        self._max_message_bytes = settings.max_message_bytes
        self._send_queue_bytes = settings.send_queue_bytes
        #: Grouped messages whose callback returned, (publisher id, ``Message.job``), waiting for
        #: the network thread (or loop) to tell their publishers (see ``report_done``).
        self._dones: list[tuple[int, tuple[int, int]]] = []

    @property
    def running(self) -> bool:
        """Whether the endpoint is started and not yet stopped."""
        return self._state == "running"

    # --- start and stop ---------------------------------------------------------------------------

    def _interface_for(self, hints: list[str]) -> tuple[str, str]:
        """``GLUE_LISTEN_INTERFACE``, else what :func:`glue.network.choose_interface` finds
        toward ``hints`` (the discovery targets, resolved, and group)."""
        settings = self.settings
        if settings.listen_interface:
            name = settings.listen_interface
            return name, network.interface_address(name, variable="GLUE_LISTEN_INTERFACE")
        if settings.discovery_listen_address is not None:
            hints = [*hints, settings.discovery_listen_address.host]
        choice = network.choose_interface([h for h in hints if not h.startswith("0.")])
        if choice.warning:
            logger.warning("%s", choice.warning)
        log = logger.info if len(choice.candidates) > 1 else logger.debug
        log(
            "interface %s (%s) chosen: %s%s",
            choice.name,
            choice.address,
            choice.reason,
            f"; candidates {', '.join(choice.candidates)}" if choice.candidates else "",
        )
        return choice.name, choice.address

    def _open_sockets(self, interface: str, interface_ip: str, now: float) -> None:
        """Open the data and discovery sockets and build the stack (``now`` on the runtime's
        clock, ``time.monotonic``). On failure, whatever was opened is closed.

        Raises:
            ConfigError: an address or group from the settings cannot be used.
        """
        _prime_allocator()
        settings = self.settings
        self._interface = interface
        listen = settings.listen_address
        announces = bool(settings.discovery_target_address)
        try:
            self._data = network.open_data_socket(
                listen.host,
                listen.port,
                interface_ip=interface_ip,
                multicast_ttl=settings.discovery_multicast_ttl,
            )
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
        self.data_address = (host, port)
        self._stack = Stack(self._stack_config(host, port, announces), rng=random.Random(), now=now)
        self._stack.topics.wall_offset = time.time() - now
        if settings.history_path is not None:
            try:
                self._history = history.open_store(settings.history_path, self._stack.topics)
            except BaseException:
                self._close_sockets()
                self._state = "stopped"
                raise

    def _log_started(self) -> None:
        settings = self.settings
        logger.info(
            "endpoint %s (%d) started: data on %s:%d, interface %s, discovery %s -> %s, %s",
            self.name,
            self.endpoint_id,
            *self.data_address,
            self._interface,
            settings.discovery_listen_address or "off",
            ",".join(map(str, settings.discovery_target_address)) or "off",
            f"sealed (key id {', '.join(self.key_ids)})" if self.key_ids else "no network key",
        )

    def _close_history(self) -> None:
        """Write what the kept history has not written yet, and close its store."""
        if self._history is not None:
            if self._stack is not None:
                self._history.sync(self._stack.topics)
            self._history.close()
            self._history = None

    def _sync_history(self) -> None:
        """After a burst: queue the kept history's changes for its writer (cheap if none)."""
        if self._history is not None and self._stack is not None:
            self._history.sync(self._stack.topics)

    def _keep_history(self, pattern: str, depth: int | None) -> None:
        """Keep (depth 0: stop keeping) the history of topics matching ``pattern`` (see
        ``Topics.keep``); ``None``: GLUE_HISTORY_DEPTH. The runtime sends what it announces.

        Raises:
            UsageError: the pattern or depth is not valid, or the endpoint is not running.
        """
        if not self.running or self._stack is None:
            raise UsageError("the endpoint is not running")
        self._stack.topics.keep(pattern, self.settings.history_depth if depth is None else depth)

    def _sockets(self) -> list[tuple[socket.socket, bool]]:
        """Every open socket, and whether it receives multicast."""
        sockets: list[tuple[socket.socket, bool]] = []
        if self._data is not None:
            sockets.append((self._data, False))
        if self._discovery_sockets is not None:
            sockets.extend(self._discovery_sockets.sockets)
        return sockets

    def _close_sockets(self) -> None:
        if self._data is not None:
            self._data.close()
            self._data = None
        if self._discovery_sockets is not None:
            self._discovery_sockets.close()
            self._discovery_sockets = None

    def _stack_config(self, host: str, port: int, announces: bool) -> StackConfig:
        settings = self.settings
        overhead = SEAL_OVERHEAD if self._sealer is not None else 0  # a sealed datagram's extra
        datagram_bytes = settings.max_datagram_bytes or min(
            wire.MAX_DATAGRAM_BYTES, network.interface_mtu(self._interface) - _UDP_IP_OVERHEAD
        )
        return StackConfig(
            network_id=settings.network_id,
            discovery=DiscoveryConfig(
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
            transport=TransportConfig(queue_bytes=settings.send_queue_bytes),
            drop_slow_peer=settings.slow_peer == "drop",
            topics=TopicsConfig(
                history_depth=settings.history_depth,
                history_max_bytes=settings.history_max_bytes,
                kept_max_bytes=settings.history_max_bytes,
                keep=tuple(
                    (pattern, settings.history_depth if depth is None else depth)
                    for pattern, depth in settings.history_keep
                ),
                groups=GroupsConfig(
                    window=settings.group_window, hold_bytes=settings.group_hold_bytes
                ),
            ),
            datagram_bytes=datagram_bytes - overhead,
            loopback_datagram_bytes=(settings.max_datagram_bytes or wire.MAX_DATAGRAM_BYTES)
            - overhead,
            path_datagram_bytes=None
            if settings.max_datagram_bytes
            else functools.partial(_path_datagram_bytes, overhead=overhead),
            max_message_bytes=settings.max_message_bytes,
            max_reassembly_bytes=4 * settings.max_message_bytes,
        )

    # --- messages from callers ---------------------------------------------------------------

    def _publication(
        self,
        topic: str,
        topic_type: str,
        payload: bytes,
        expiry_s: float,
        history_depth: int | None,
        retain: bool = False,
    ) -> Outgoing:
        if (topic, topic_type) not in self._valid_names:  # validated once per pair (bounded)
            validate_topic_name(topic)
            validate_topic_type(topic_type)
            if len(self._valid_names) >= 65536:
                self._valid_names.clear()
            self._valid_names.add((topic, topic_type))
        if history_depth is not None and (type(history_depth) is not int or history_depth < 0):
            raise UsageError(f"history_depth must be an int >= 0, not {history_depth!r}")
        if self._state != "running" or len(payload) > self._max_message_bytes or not expiry_s > 0:
            self._refuse(payload, expiry_s)
        if type(payload) is not bytes:
            payload = bytes(payload)  # a caller's bytearray must not change under us
        return Outgoing(
            payload, (), time.monotonic() + expiry_s, (topic, topic_type, history_depth, retain)
        )

    def _publications(
        self,
        topic: str,
        topic_type: str,
        payloads: Sequence[bytes],
        expiry_s: float,
        history_depth: int | None,
        retain: bool = False,
    ) -> list[Outgoing]:
        """``_publication`` of each payload (checked by the caller), the names checked once and
        one clock reading for all: ``publish_many``'s messages, in order."""
        if not payloads:
            return []
        first = self._publication(topic, topic_type, payloads[0], expiry_s, history_depth, retain)
        expires_at, names = first.expires_at, first.topic
        return [first, *[Outgoing(p, (), expires_at, names) for p in payloads[1:]]]

    def _outgoing(
        self, payload: bytes, to: Sequence[int] | None, expiry_s: float, message_type: str = ""
    ) -> Outgoing:
        """A direct message (``send``), with its envelope: ``{"y":TYPE,"w":SENT_AT}``, or
        ``{"w":SENT_AT}`` without a type (PROTOCOL.md, "Direct message")."""
        if self._state != "running" or len(payload) > self._max_message_bytes or not expiry_s > 0:
            self._refuse(payload, expiry_s)
        # Ids are plain ints on the wire; the NewType is for the type checker only.
        targets: tuple[EndpointId, ...] | None = None if to is None else tuple(to)  # type: ignore[arg-type]
        if type(payload) is not bytes:
            payload = bytes(payload)  # a caller's bytearray must not change under us
        prefix = self._direct_prefixes.get(message_type)
        if prefix is None:
            prefix = self._direct_prefix(message_type)
        wall = time.time()
        taken, stamp = self._direct_stamp
        if wall - taken > _STAMP_S or wall < taken:
            stamp = b'"w":%r}\n' % wall
            self._direct_stamp = (wall, stamp)
        # The runtimes' clock is time.monotonic(), so the expiry time is valid from any thread.
        message: Outbound = (
            prefix + stamp + payload if len(payload) <= APART_BYTES else (prefix + stamp, payload)
        )
        return Outgoing(message, targets, time.monotonic() + expiry_s)

    def _direct_prefix(self, message_type: str) -> bytes:
        """The start of a direct envelope for ``message_type`` (checked once, remembered)."""
        validate_topic_type(message_type, "message_type")
        if len(self._direct_prefixes) >= 4096:
            self._direct_prefixes = {"": b"{"}
        prefix = b'{"y":%s,' % orjson.dumps(message_type)
        self._direct_prefixes[message_type] = prefix
        return prefix

    def _refuse(self, payload: bytes, expiry_s: float) -> NoReturn:
        """Raise the error that makes a send or publish impossible (the checks' slow path)."""
        if self._state != "running":
            raise UsageError("the endpoint is not running")
        if len(payload) > self._max_message_bytes:
            raise UsageError(
                f"a message of {len(payload)} bytes exceeds the maximum of "
                f"{self._max_message_bytes} (GLUE_MAX_MESSAGE_BYTES)"
            )
        raise UsageError(f"expiry must be a positive number of seconds, not {expiry_s!r}")

    def _backpressure(self, timeout: float, size: int) -> BackpressureError:
        self.counters["backpressure_errors"] += 1
        stack = self._stack
        full: tuple[EndpointId, ...] = ()
        if stack is not None:
            full = stack.outbox.held_peers()
            if not full:
                full = tuple(p for p in stack.peer_ids() if not stack.can_send(p, size))
        label = stack.outbox.label if stack is not None else str
        names = ", ".join(label(peer) for peer in full) or "none"
        return BackpressureError(
            f"no room to queue a message for {timeout} s: peers not acknowledging fast enough: "
            f"{names} (GLUE_SEND_QUEUE_BYTES bounds what may wait; GLUE_SLOW_PEER=drop drops a "
            "slow peer's backlog instead)",
            peers=full,
        )

    def _holding(self) -> bool:
        """Whether the stack's outbox holds messages for a full peer (read from any thread)."""
        stack = self._stack
        return stack is not None and stack.outbox.holding

    # --- queries and listeners ------------------------------------------------------------------

    def peers(self) -> list[Peer]:
        """The peers discovery knows now (on the network thread, or under the stack's lock)."""
        return self._stack.peers() if self._stack else []

    def subscribers(self, topic: str) -> list[EndpointId]:
        """Ids of the peers a publish on ``topic`` goes to now (on the network thread, or under
        the lock)."""
        return list(self._stack.topics.subscribers(topic)) if self._stack else []

    def members(self, topic: str, group: str) -> list[EndpointId]:
        """Ids of the live members of ``group`` a publish on ``topic`` may go to (this
        endpoint's own id too when it is one; on the network thread, or under the lock)."""
        return list(self._stack.topics.members(topic, group)) if self._stack else []

    def _tell_done(self, dones: list[tuple[int, tuple[int, int]]], now: float) -> None:
        """Hand grouped messages whose callback returned to the topics layer (batched: their
        publishers hear of them at the next send)."""
        stack = self._stack
        if stack is None or self._state != "running":
            return
        done = stack.topics.done
        for source, job in dones:
            done(source, job, now)

    def responders(self, name: str) -> list[EndpointId]:
        """Ids of the peers serving ``name`` now (on the network thread, or under the lock)."""
        return list(self._stack.topics.responders(name)) if self._stack else []

    def peer_counters(self) -> dict[int, dict[str, int]]:
        """Per-peer transport counters (on the network thread, or under the lock)."""
        stack = self._stack
        if stack is None:
            return {}
        return {p.endpoint_id: stack.peer_counters(p.endpoint_id) for p in stack.peers()}

    def metrics_snapshot(self) -> MetricsSnapshot:
        """Every counter and gauge, in total and per peer, for a scrape (call on the loop
        thread, or under the lock)."""
        stack = self._stack
        peers: list[PeerMetrics] = []
        parked = 0
        if stack is not None:
            for peer in stack.peers():
                peer_id = peer.endpoint_id
                peers.append(
                    PeerMetrics(
                        peer.name,
                        peer_id,
                        stack.peer_counters(peer_id),
                        stack.transport.peer_gauges(peer_id),
                    )
                )
            parked = len(stack.transport.parked())
        queued = self._queued_bytes()
        gauges = {"peers": float(len(peers)), "peers_parked": float(parked), "queued_bytes": queued}
        if stack is not None:
            gauges.update(stack.topics.gauges())
        return MetricsSnapshot(self.name, self.all_counters(), gauges, peers)

    def all_counters(self) -> dict[str, int]:
        """Runtime and layer counters, merged (on the network thread, or under the lock)."""
        merged = Counter(self.counters)
        if self._stack is not None:
            merged.update(self._stack.all_counters())
        return dict(sorted(merged.items()))

    def _queued_bytes(self) -> int:
        """Bytes of messages handed over and not yet in every target's stream (a gauge)."""
        raise NotImplementedError

    def add_listener(self, listener: EventListener) -> None:
        """Call ``listener(events)`` after each burst, on the runtime's network thread (the
        loop's, or the thread runtime's); it must not block."""
        self._listeners.append(listener)

    # --- receive path ---------------------------------------------------------------------------

    def _read(self, sock: socket.socket, multicast: bool, now: float) -> bool:
        """Read the datagrams waiting on ``sock`` (non-blocking) into the stack, within this
        wake-up's bounds; whether the socket was drained (else more is waiting)."""
        stack = self._stack
        assert stack is not None
        receive = stack.receive_datagram
        recvfrom_into = sock.recvfrom_into
        count = 0
        size = 0
        drained = False
        data: bytes | bytearray
        buffer = self._buffer
        clock = time.monotonic  # the runtimes' clock
        deadline = now + _MAX_SECONDS_PER_WAKEUP
        opener = self._opener
        transport = stack.transport
        for _ in range(_MAX_READS_PER_WAKEUP):
            if len(buffer) != _RECV_BYTES:
                buffer = self._receive_buffer()
            try:
                # Sealed: read into the opener's buffer, open into the receive buffer.
                n, source = recvfrom_into(buffer if opener is None else opener.buffer)
            except BlockingIOError:
                drained = True
                break
            except OSError as exc:  # e.g. an ICMP error reported on the socket
                self.counters["receive_errors"] += 1
                logger.debug("receive error on %s: %s", sock.getsockname(), exc)
                continue
            count += 1
            size += n
            if opener is not None:
                if 2 * (n - SEAL_OVERHEAD) < _RECV_BYTES:  # small: opened into bytes of its own
                    opened = self._open_small(n, source)
                    if opened is None:
                        continue
                    receive(opened, source, multicast=multicast, now=now)
                    if (current := clock()) >= transport.ack_due:
                        self._send_datagrams(stack.due_acks(now=current))
                    if size >= _MAX_BYTES_PER_WAKEUP or current >= deadline:
                        break
                    continue
                n = self._open(n, source, buffer)
                if n < 0:
                    continue
            elif n and buffer[0] == _SEALED_FIRST_BYTE:
                self._refused("sealed", source)
                continue
            if 2 * n >= _RECV_BYTES:
                # A large datagram is decoded in the buffer: its large payloads are views of it
                # (joined once when whole), and it is not read into again while they live.
                del buffer[n:]  # (less than half: the memory is kept, nothing is copied)
                data = buffer
            else:  # a small one is copied out, so that no view of it can hold 64 KiB
                data = bytes(buffer[:n])
            receive(data, source, multicast=multicast, now=now)
            # Acks due go now, not after the burst (see Transport.ack_due).
            if (current := clock()) >= transport.ack_due:
                self._send_datagrams(stack.due_acks(now=current))
            if size >= _MAX_BYTES_PER_WAKEUP or current >= deadline:
                break
        self.counters["datagrams_received"] += count
        self.counters["bytes_received"] += size
        if not drained and not multicast:
            # More waits: this endpoint is the slow end; its acks say so, so that its senders
            # take the queue in its socket for its own, not for congestion on the path.
            stack.transport.note_backlog(now=now)
        return drained

    def _dispatch_now(self, drained: bool) -> bool:
        """After reading: whether this wake-up's events go to the listeners now. More waiting on
        the socket means the runtime comes straight back, so events may wait for the next few
        wake-ups (a bounded few) and reach the listeners together, when that is cheaper
        (``coalesce_events``)."""
        if drained or not self.coalesce_events or self._deferred >= _MAX_DEFERRED_WAKEUPS:
            self._deferred = 0
            return True
        self._deferred += 1
        self.counters["event_dispatches_deferred"] += 1
        return False

    def _open(self, n: int, source: Address, buffer: bytearray) -> int:
        """Open the sealed datagram of ``n`` bytes in the opener's buffer into ``buffer``; its
        length, or -1 when it was refused (counted, logged once per source and reason)."""
        assert self._opener is not None
        try:
            return self._opener.open_received(n, int(time.time() * 1000), buffer)
        except Rejected as exc:
            self._refused(exc.reason, source)
            return -1

    def _open_small(self, n: int, source: Address) -> bytes | None:
        """:meth:`_open` for a small datagram, its plaintext as bytes (None when refused)."""
        assert self._opener is not None
        try:
            return self._opener.open_received_bytes(n, int(time.time() * 1000))
        except Rejected as exc:
            self._refused(exc.reason, source)
            return None

    def _refused(self, reason: str, source: Address) -> None:
        """A datagram that did not pass the network key: count it, say why once per source."""
        self.counters[f"dropped_{reason}"] += 1
        key = ("refused", source[0], reason)
        if key in self._warned:
            logger.debug("dropped a datagram from %s:%d: %s", *source, reason)
            return
        if len(self._warned) < 256:
            self._warned.add(key)
        logger.warning("datagrams from %s:%d %s", *source, _REFUSALS.get(reason, reason))

    def _receive_buffer(self) -> bytearray:
        """A receive buffer no decoded payload still views: the current one if it is free, else
        the spare one used last, else one of the held ones found free, else a new one.

        Why reuse: a fresh 64 KiB ``bytes`` per datagram, freed soon after, is just the pattern
        that makes glibc's malloc give memory back to the kernel and fault it in again, over and
        over (seen here: 16-18 page faults and +30-45 us of system time per 64 KiB message, in
        some runs). A buffer that a large datagram was decoded in has been shrunk to it; growing
        it back raises ``BufferError`` while a view of it is alive (a partial message, a frame out
        of order).

        Why the one used last: it is in the CPU's caches. Frames held out of order behind a loss
        make the set of buffers grow (to 140 at 10 % loss); going round all of them, as a ring
        did, put every datagram in memory out of cache for good after the first loss: +4-5 us of
        CPU per 64 KiB message at the receiver (+12 %), with no loss at all.
        """
        current = self._buffer
        if _regrow(current):
            return current
        lent = self._lent
        lent.append(current)
        spare = self._spare
        if not spare:
            for _ in range(min(len(lent) - 1, _BUFFER_TRIES)):
                buffer = lent.popleft()
                if _regrow(buffer):
                    spare.append(buffer)
                else:
                    lent.append(buffer)  # still held: tried again after the others
        if spare:
            buffer = spare.pop()
        else:
            buffer = bytearray(_RECV_BYTES)
            self.counters["receive_buffers_allocated"] += 1
            if len(lent) >= _MAX_RECEIVE_BUFFERS:
                lent.popleft()  # no longer kept: it lives on until its views are released
        self._buffer = buffer
        return buffer

    # --- outputs ---------------------------------------------------------------------------------

    def _delivery_failure(self, now: float) -> DeliveryError | None:
        """The error a flush raises now, if messages were lost with their peer (taken once)."""
        stack = self._stack
        if stack is None:
            return None
        gone = [(peer, count, "gone") for peer, count in stack.take_delivery_failures()]
        silent = [
            (peer, count, f"silent for {seconds:.1f} s; held until they expire, in case it returns")
            for peer, count, seconds in stack.silent_peers(now)
        ]
        if not gone and not silent:
            return None
        unacknowledged: dict[int, int] = {p.endpoint_id: n for p, n, _ in gone + silent}
        described = "; ".join(
            f"{count} to {peer.name} ({peer.endpoint_id}, {state})"
            for peer, count, state in gone + silent
        )
        return DeliveryError(
            f"messages not acknowledged: {described}",
            peers=tuple(unacknowledged),
            unacknowledged=unacknowledged,
        )

    def _send_datagrams(self, datagrams: list[tuple[wire.OutDatagram, Address]]) -> None:
        """Send (sealed, with a network key) what the stack returned, in order."""
        sock = self._data
        if sock is None or not datagrams:
            return
        sealer = self._sealer
        now_ms = int(time.time() * 1000) if sealer is not None else 0
        sent = 0
        size = 0
        sendto = sock.sendto
        for datagram, destination in datagrams:
            try:
                if sealer is not None:
                    # Small ones whole; large ones (gathered pieces) into a reused buffer, sent
                    # at once (the next seal_pieces overwrites it).
                    if isinstance(datagram, bytes):
                        size += sendto(sealer.seal(datagram, now_ms), destination)
                    else:
                        size += sendto(sealer.seal_pieces(datagram, now_ms), destination)
                elif isinstance(datagram, bytes):
                    size += sendto(datagram, destination)
                else:  # a large payload, in pieces: the kernel gathers them, Python copies none
                    size += sock.sendmsg(datagram, (), 0, destination)
            except OSError as exc:
                self._send_failed(destination, exc)
                continue
            sent += 1
        counters = self.counters
        counters["datagrams_sent"] += sent
        counters["bytes_sent"] += size

    def _send_failed(self, destination: Address, exc: OSError) -> None:
        # UDP is best effort; the transport resends what matters. Warn once per cause.
        self.counters["send_errors"] += 1
        key = (destination, exc.errno)
        log = logger.debug if key in self._warned else logger.warning
        if len(self._warned) < 256:
            self._warned.add(key)
        log("cannot send to %s:%d: %s", *destination, exc.strerror or exc)

    def _pull_events(self) -> tuple[list[StackEvent], int]:
        """The stack's events for the listeners, and the bytes of held messages placed since the
        last pull (the runtime admits that much more)."""
        stack = self._stack
        assert stack is not None
        pulled, control = stack.take_events()
        if not control:  # the usual case: only messages
            return cast(list[StackEvent], pulled), 0
        # Rare: peers came or went, or acks made room for messages held for a full peer.
        freed = stack.outbox.take_placed_bytes()
        return [e for e in pulled if not isinstance(e, SendSpaceFreed)], freed

    def _notify_listeners(self, events: list[StackEvent]) -> None:
        for listener in self._listeners:
            try:
                listener(events)
            except Exception:  # a listener's bug must not break the network loop
                logger.exception("event listener %r failed", listener)

    # --- discovery targets ----------------------------------------------------------------------

    def _targets(self, resolved: list[list[str]]) -> list[Target]:
        """The discovery targets, given each entry's resolved addresses (in order)."""
        targets: list[Target] = []
        for entry, hosts in zip(self.settings.discovery_target_address, resolved, strict=True):
            for host in hosts:
                kind = network.address_kind(host, self._interface)
                targets.append(((host, entry.port), kind == "unicast"))
        return list(dict.fromkeys(targets))

    def _resolve_failed(self, host: str, exc: Exception) -> None:
        self.counters["resolve_errors"] += 1
        key = ("dns", host)
        log = logger.debug if key in self._warned else logger.warning
        self._warned.add(key)
        log("cannot resolve discovery target %r: %s", host, exc)

    # --- request/reply (glue.requests; on the network thread, or under the stack's lock) --------

    def _serve(self, pattern: str) -> int:
        """Serve ``pattern`` here and advertise it; its serve id (the runtime sends the change).

        Raises:
            UsageError: the pattern is not valid, or the endpoint is not running.
        """
        stack = self._stack
        if not self.running or stack is None:
            raise UsageError("the endpoint is not running")
        serve_id = stack.requests.serve(pattern)
        stack.topics.serve(pattern)
        return serve_id

    def _unserve(self, serve_id: int) -> None:
        stack = self._stack
        if stack is not None:
            pattern = stack.requests.unserve(serve_id)
            if pattern is not None:
                stack.topics.unserve(pattern)

    def _open_request(
        self,
        name: str,
        payload: bytes,
        *,
        everyone: bool,
        deadline: float,
        register: Callable[[int], object],
        excluded: frozenset[EndpointId] = frozenset(),
    ) -> list[Outgoing] | None:
        """Start a request to ``name`` (to one responder, or to ``everyone``): ``register(id)``
        runs before anything is sent, and the messages to send are returned. None while no
        responder is known but one may yet be (no peer known, or a peer's interest not heard).

        Raises:
            NoResponderError: the peers' interest is known and none serves ``name`` (but those
                ``excluded``, which said they no longer do).
            UsageError: the endpoint is not running.
        """
        stack = self._stack
        if not self.running or stack is None:
            raise UsageError("the endpoint is not running")
        topics = stack.topics
        responders = topics.responders(name)
        if stack.requests.serves(name):  # this endpoint too: answered without the network
            responders = (*responders, EndpointId(self.endpoint_id))
        if excluded:
            responders = tuple(p for p in responders if p not in excluded)
        if not responders:
            if not excluded and (not stack.peer_ids() or topics.interest_unknown()):
                return None
            raise self._no_responder(name)
        now = time.monotonic()
        if type(payload) is not bytes:
            payload = bytes(payload)  # a caller's bytearray must not change under us
        request_id, sends = stack.requests.open(
            name, payload, responders, everyone=everyone, deadline=deadline, now=now
        )
        register(request_id)
        me = self.endpoint_id
        for peer, message, expires_at in sends:
            if peer == me:
                self._loop_back(message, expires_at, now)
        return [
            Outgoing(message, (peer,), expires_at)
            for peer, message, expires_at in sends
            if peer != me
        ]

    def _loop_back(self, message: Outbound, expires_at: float, now: float) -> None:
        """A request to this endpoint itself, or its reply: taken as if it had arrived (its
        event is dispatched as soon as the runtime can: ``_local_events``)."""
        stack = self._stack
        assert stack is not None
        if isinstance(message, tuple):
            line, payload = message
        else:
            line, _, payload = message.partition(b"\n")
        head = orjson.loads(line)
        stack.requests.receive(self._myself(), head, payload, now, expires_at)
        self._local_events()

    def _myself(self) -> Peer:
        host, port = self.data_address
        return Peer(EndpointId(self.endpoint_id), self.incarnation, self.name, host, port, 0.0)

    def _local_events(self) -> None:
        """Events were emitted outside a network turn (a request to this endpoint itself):
        have the runtime dispatch them soon. Each runtime says how."""
        raise NotImplementedError

    def _no_responder(self, name: str, waited: float | None = None) -> NoResponderError:
        """The error for a request to ``name`` nobody serves (counted, warned about once)."""
        if self._stack is not None:
            self._stack.requests.no_responder(name)
        if waited is not None:
            return NoResponderError(
                f"no endpoint serving {name!r} was found within {waited} s (no peer, or no "
                "peer's interest, was known)",
                name=name,
            )
        return NoResponderError(f"no endpoint serves {name!r}", name=name)

    def _close_request(self, request_id: int) -> None:
        if self._stack is not None:
            self._stack.requests.close(request_id)

    def _reply(self, request: Request, payload: bytes, error: str | None) -> Outgoing | None:
        """The reply to ``request`` to submit, or None when its deadline passed (counted)."""
        stack = self._stack
        if not self.running or stack is None:
            return None
        now = time.monotonic()
        found = stack.requests.reply(request, payload, error=error, now=now)
        if found is None:
            return None
        peer, message, expires_at = found
        if peer == self.endpoint_id:  # a request this endpoint made to itself
            self._loop_back(message, expires_at, now)
            return None
        return Outgoing(message, (peer,), expires_at)

    def _expired_before_start(self, count: int) -> None:
        if self._stack is not None:
            self._stack.requests.expired_before_start(count)


def literal_address(host: str) -> list[str] | None:
    """``[host]`` if it is a dotted IPv4 address (nothing to resolve), else None."""
    if host.count(".") == 3:
        try:
            socket.inet_aton(host)
        except OSError:
            return None
        return [host]
    return None


_primed = False


def _path_datagram_bytes(host: str, *, overhead: int) -> int | None:
    """The datagram size toward ``host``, from the MTU of the interface that reaches it, less
    what sealing adds (``overhead``)."""
    size = network.path_datagram_bytes(host, limit=wire.MAX_DATAGRAM_BYTES)
    return None if size is None else size - overhead


def _regrow(buffer: bytearray) -> bool:
    """Give a receive buffer back its whole size; False while a payload still views it."""
    missing = _RECV_BYTES - len(buffer)
    if missing:
        try:
            buffer += _PAD[:missing]
        except BufferError:
            return False
    return True


def _prime_allocator() -> None:
    """Free one 4 MiB block, once per process, so glibc's malloc expects large blocks.

    A large message's bytes are allocated by the network thread and freed once its subscribers
    are done with them, often many at a time. With glibc's initial thresholds, freeing more than
    128 KiB at the top of a heap gives the memory back to the kernel, and the next messages fault
    it in again (zeroed): measured here, +5-15 us of system time per 64 KiB message and 16 page
    faults each, in bursts. glibc raises those thresholds by itself the first time a block it
    mapped (128 KiB or more) is freed, to that block's size (documented in mallopt(3), "dynamic
    mmap threshold"); this does it at start instead of after the first large message. Its only
    cost: up to 8 MiB freed at the top of a heap stay with the process. Values set by the user
    (``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_TRIM_THRESHOLD_``) turn glibc's adjustment off, and
    then this changes nothing; with another allocator it is one allocation.
    """
    global _primed
    if not _primed:
        _primed = True
        block = bytes(_PRIME_BYTES)  # calloc: fresh mapped pages, none touched
        del block


_PRIME_BYTES: Final = 4 * 1024 * 1024
