"""The asyncio runtime: the one module that reads the clock and touches sockets.

``Endpoint`` drives one sans-IO :class:`~glue.stack.Stack` on the asyncio loop it is started in.
On every wake-up it reads *every* datagram waiting on a socket (non-blocking reads until
``EAGAIN``), feeds them all to the stack, then pulls the outputs once: datagrams to send (each
destination's frames packed into as few datagrams as possible), events, and the next deadline. One
timer per endpoint is re-armed only when the earliest deadline changes.

Sends are handed over in bulk: ``send`` (from the loop) and ``send_threadsafe`` (from any thread)
append to one bounded hand-off queue and wake the loop only when that queue was empty; the loop
moves everything queued into the stack and flushes once. When a peer's send queue is full the
hand-off queue keeps the message (order is preserved) until acks make room; when the hand-off
queue itself is full, senders wait, then raise :class:`~glue.errors.BackpressureError`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import random
import secrets
import socket
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from typing import Final, NoReturn, cast

from glue import history, network, wire
from glue.discovery import Address, DiscoveryConfig, Target
from glue.errors import BackpressureError, DeliveryError, UsageError
from glue.events import Peer, StackEvent
from glue.metrics import MetricsServer, MetricsSnapshot, PeerMetrics
from glue.outbox import Outgoing
from glue.security import SEAL_OVERHEAD, NetworkKeys, Opener, Rejected, Sealer
from glue.settings import GlueSettings
from glue.stack import Stack, StackConfig
from glue.topics import (
    APART_BYTES,
    DIRECT_ENVELOPE,
    Outbound,
    TopicsConfig,
    validate_topic_name,
    validate_topic_type,
)
from glue.transport import SendSpaceFreed, TransportConfig
from glue.wire import EndpointId

__all__ = ["Endpoint", "EventListener"]

logger = logging.getLogger(__name__)

_RECV_BYTES: Final = 65536
#: Receive buffers kept for reuse, at most (64 KiB each, made only when needed). A datagram's
#: buffer is held while a payload views it: a large message's datagrams until it is whole (17
#: for 1 MiB), and frames out of order behind a loss until it is repaired (up to the transport's
#: reorder_bytes, 8 MiB: 128). With 32, a 1 MiB stream at 10 % loss allocated a fresh buffer
#: for 2 datagrams in 5 after scanning all 32.
_MAX_RECEIVE_BUFFERS: Final = 160
#: Buffers of the ring tried for one datagram before a new one is made: held ones are released
#: mostly in the order they were taken, so the next few are the likely free ones.
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

#: Called on the loop thread with the events of one burst; must not block.
EventListener = Callable[[list[StackEvent]], None]


class Endpoint:
    """One glue endpoint: sockets, the protocol stack and its timer, on the running loop."""

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
        self._loop: asyncio.AbstractEventLoop | None = None
        self._data: socket.socket | None = None
        self._discovery_sockets: network.DiscoverySockets | None = None
        self._stack: Stack | None = None
        self._interface = "lo"
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._resolver: asyncio.Task[None] | None = None
        self._warned: set[object] = set()
        self._state = "new"
        # The hand-off queue between senders and the loop (bounded in bytes).
        self._handoff: deque[Outgoing] = deque()
        self._staged: deque[Outgoing] = deque()  # taken by the loop, not yet in the stack
        # Of both queues, and of the messages the stack's outbox holds for full peers (counted
        # until every target has them: see glue.outbox).
        self._handoff_bytes = 0
        # A plain lock taken on the hot paths (its ``with`` is a C call) and a Condition on the
        # same lock for senders that must wait for room.
        self._handoff_mutex = threading.Lock()
        self._handoff_lock = threading.Condition(self._handoff_mutex)
        self._sleepers = 0  # threads waiting on _handoff_lock (a notify costs even when none do)
        self._space = asyncio.Event()
        self._drain_scheduled = False
        #: Under load, let a wake-up's events wait for the next few (see _on_readable). Worth it
        #: when handing events over is dear (the blocking manager's delivery thread); otherwise
        #: holding the messages longer costs more than it saves (memory handed back to the OS
        #: and faulted in again: +10-20 us of system time per 64 KiB message with asyncio).
        self.coalesce_events = False
        self._deferred = 0  # wake-ups whose events wait in the stack (see _on_readable)
        self._valid_names: set[tuple[str, str]] = set()
        # Datagrams are read into reused buffers (see _receive_buffer), not a new bytes each.
        self._buffers: list[bytearray] = [bytearray(_RECV_BYTES)]  # (not counted)
        self._buffer_index = 0
        self._idle_waiters: list[asyncio.Future[None]] = []
        self._silence_check: asyncio.TimerHandle | None = None
        #: The Prometheus endpoint, when GLUE_METRICS_ADDRESS is set (see glue.metrics).
        self.metrics: MetricsServer | None = None
        # The network key: every datagram sealed on its way out and opened on its way in.
        self._sealer: Sealer | None = None
        self._opener: Opener | None = None  # sealed datagrams are read into its buffer
        #: Kept history on disk, when GLUE_HISTORY_PATH is set (see glue.history).
        self._history: history.HistoryStore | None = None
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
        _prime_allocator()
        loop = self._loop = asyncio.get_running_loop()
        self._space = asyncio.Event()
        settings = self.settings
        interface, interface_ip = await self._choose_interface()
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
        self._stack = Stack(
            self._stack_config(host, port, announces), rng=random.Random(), now=loop.time()
        )
        self._stack.topics.wall_offset = time.time() - loop.time()
        if settings.history_path is not None:
            try:
                self._history = history.open_store(settings.history_path, self._stack.topics)
            except BaseException:
                self._close_sockets()
                self._state = "stopped"
                raise
        loop.add_reader(self._data.fileno(), self._on_readable, self._data, False)
        for sock, multicast in self._discovery_sockets.sockets if self._discovery_sockets else ():
            loop.add_reader(sock.fileno(), self._on_readable, sock, multicast)
        if settings.discovery_target_address:
            self._stack.set_targets(await self._resolve_targets())
            self._resolver = loop.create_task(self._resolve_forever(), name=f"glue-dns-{self.name}")
        if settings.metrics_address is not None:
            metrics = MetricsServer(self._threadsafe_snapshot)
            try:
                metrics.start(*settings.metrics_address)
            except BaseException:
                self._state = "running"  # so that stop() releases what start() opened
                await self.stop()
                raise
            self.metrics = metrics
        self._state = "running"
        logger.info(
            "endpoint %s (%d) started: data on %s:%d, interface %s, discovery %s -> %s, %s",
            self.name,
            self.endpoint_id,
            host,
            port,
            interface,
            settings.discovery_listen_address or "off",
            ",".join(map(str, settings.discovery_target_address)) or "off",
            f"sealed (key id {', '.join(self.key_ids)})" if self.key_ids else "no network key",
        )
        self._service(loop.time())

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

    async def _choose_interface(self) -> tuple[str, str]:
        """``GLUE_LISTEN_INTERFACE``, else what :func:`glue.network.choose_interface` finds
        toward the discovery targets (resolved) and group."""
        settings = self.settings
        if settings.listen_interface:
            name = settings.listen_interface
            return name, network.interface_address(name, variable="GLUE_LISTEN_INTERFACE")
        hints: list[str] = []
        for target in settings.discovery_target_address:
            hints += await self._resolve(target.host)
        if settings.discovery_listen_address is not None:
            hints.append(settings.discovery_listen_address.host)
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

    async def stop(self) -> None:
        """Say goodbye to peers, close the sockets, fail waiting senders. Idempotent."""
        if self._state in ("stopped", "new"):
            self._state = "stopped"
            return
        self._state = "stopped"
        if self._stack is not None:
            self._stack.leave()
            self._flush()
        if self._resolver is not None:
            self._resolver.cancel()
            await asyncio.gather(self._resolver, return_exceptions=True)
        if self._timer is not None:
            self._timer.cancel()
        if self._silence_check is not None:
            self._silence_check.cancel()
            self._silence_check = None
        if self.metrics is not None:
            self.metrics.stop()
            self.metrics = None
        if self._history is not None:
            if self._stack is not None:
                self._history.sync(self._stack.topics)
            self._history.close()
            self._history = None
        self._close_sockets()
        with self._handoff_mutex:
            held = self._stack.outbox.clear() if self._stack is not None else 0
            dropped = len(self._handoff) + len(self._staged) + held
            self._handoff.clear()
            self._staged.clear()
            self._handoff_bytes = 0
            self._handoff_lock.notify_all()
        self._space.set()
        if dropped:
            self.counters["messages_dropped_at_stop"] += dropped
            logger.warning("stopped with %d messages not yet handed to the network", dropped)
        logger.info("endpoint %s (%d) stopped", self.name, self.endpoint_id)

    @property
    def running(self) -> bool:
        """Whether the endpoint is started and not yet stopped."""
        return self._state == "running"

    # --- sending --------------------------------------------------------------------------------

    async def send(
        self,
        payload: bytes,
        *,
        to: Sequence[int] | None,
        expiry_s: float,
        timeout: float,  # noqa: ASYNC109 - the same signature as the blocking twin
    ) -> None:
        """Queue ``payload`` for ``to`` (every peer when ``None``), from the loop thread.

        Raises:
            BackpressureError: the hand-off queue stayed full for ``timeout`` seconds.
            UsageError: the endpoint is not running, or the payload is too large.
        """
        item = self.try_send(payload, to=to, expiry_s=expiry_s)
        if item is not None:
            await self.wait_to_queue(item, timeout)

    def try_send(
        self, payload: bytes, *, to: Sequence[int] | None, expiry_s: float
    ) -> Outgoing | None:
        """:meth:`send` without waiting: ``None`` once queued, else the message, for
        :meth:`wait_to_queue` (the hand-off queue is full). No coroutine on the usual path.

        Raises:
            UsageError: the endpoint is not running, or the payload is too large.
        """
        item = self._outgoing(payload, to, expiry_s)
        return None if self._queue_now(item) else item

    def try_publish(
        self,
        topic: str,
        topic_type: str,
        payload: bytes,
        *,
        expiry_s: float,
        history_depth: int | None,
    ) -> Outgoing | None:
        """:meth:`publish` without waiting (see :meth:`try_send`)."""
        item = self._publication(topic, topic_type, payload, expiry_s, history_depth)
        return None if self._queue_now(item) else item

    async def publish(
        self,
        topic: str,
        topic_type: str,
        payload: bytes,
        *,
        expiry_s: float,
        history_depth: int | None,
        timeout: float,  # noqa: ASYNC109 - the same signature as the blocking twin
    ) -> None:
        """Queue a publication on ``topic``, from the loop thread (see :meth:`send`)."""
        item = self.try_publish(
            topic, topic_type, payload, expiry_s=expiry_s, history_depth=history_depth
        )
        if item is not None:
            await self.wait_to_queue(item, timeout)

    def publish_threadsafe(
        self,
        topic: str,
        topic_type: str,
        payload: bytes,
        *,
        expiry_s: float,
        history_depth: int | None,
        timeout: float,
    ) -> None:
        """Queue a publication on ``topic`` from any thread but the loop's (see
        :meth:`send_threadsafe`)."""
        item = self._publication(topic, topic_type, payload, expiry_s, history_depth)
        with self._handoff_mutex:  # the usual path, inline (see send_threadsafe)
            if self._offer(item, locked=True):
                return
        self._hand_off_threadsafe(item, timeout)

    def subscribe(self, pattern: str, topic_type: str) -> int:
        """Add a subscription (on the loop thread); peers hear of it at once. Returns its id.

        Raises:
            UsageError: the pattern or type is not valid, or the endpoint is not running.
        """
        if not self.running or self._stack is None:
            raise UsageError("the endpoint is not running")
        subscription = self._stack.subscribe(pattern, topic_type)
        self._flush()
        return subscription

    def keep_history(self, pattern: str, depth: int | None) -> None:
        """Keep (depth 0: stop keeping) the history of topics matching ``pattern``, on the loop
        thread (see ``Topics.keep``); ``None``: GLUE_HISTORY_DEPTH.

        Raises:
            UsageError: the pattern or depth is not valid, or the endpoint is not running.
        """
        if not self.running or self._stack is None:
            raise UsageError("the endpoint is not running")
        self._stack.topics.keep(pattern, self.settings.history_depth if depth is None else depth)
        self._flush()

    def unsubscribe(self, subscription: int) -> None:
        """Remove a subscription (on the loop thread); peers hear of it at once."""
        if self._stack is not None:
            self._stack.unsubscribe(subscription)
            if self.running:
                self._flush()

    def _publication(
        self,
        topic: str,
        topic_type: str,
        payload: bytes,
        expiry_s: float,
        history_depth: int | None,
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
            payload, (), time.monotonic() + expiry_s, (topic, topic_type, history_depth)
        )

    def _queue_now(self, item: Outgoing) -> bool:
        """On the loop thread: queue ``item`` if the hand-off queue has room (False if not)."""
        if not self._handoff and not self._staged:
            stack = self._stack
            if stack is not None and stack.idle():
                # Nothing in flight: send at once (one loop turn less on the round trip). While
                # frames are in flight, messages gather in the queue and go out packed.
                with self._handoff_mutex:
                    # Drained right here: the offer must not schedule a drain for the next turn.
                    scheduled, self._drain_scheduled = self._drain_scheduled, True
                    offered = self._offer(item, locked=True)
                    self._drain_scheduled = scheduled
                if offered:
                    self._drain_handoff()
                return offered
        return self._offer(item)

    async def wait_to_queue(self, item: Outgoing, timeout: float) -> None:  # noqa: ASYNC109
        """On the loop thread: wait up to ``timeout`` s for room for ``item``, then queue it.

        Raises:
            BackpressureError: the hand-off queue stayed full for ``timeout`` seconds.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self._offer(item):
            remaining = deadline - loop.time()
            if remaining <= 0 or not self.running:
                raise self._backpressure(timeout, item.size)
            self._space.clear()
            try:
                await asyncio.wait_for(self._space.wait(), remaining)
            except TimeoutError:
                raise self._backpressure(timeout, item.size) from None

    def send_threadsafe(
        self, payload: bytes, *, to: Sequence[int] | None, expiry_s: float, timeout: float
    ) -> None:
        """Queue ``payload`` from any thread but the loop's; blocks at most ``timeout`` s.

        Raises:
            BackpressureError: the hand-off queue stayed full for ``timeout`` seconds.
            UsageError: the endpoint is not running, or the payload is too large.
        """
        item = self._outgoing(payload, to, expiry_s)
        with self._handoff_mutex:  # the usual path, inline: one call less per message
            if self._offer(item, locked=True):
                return
        self._hand_off_threadsafe(item, timeout)

    def _hand_off_threadsafe(self, item: Outgoing, timeout: float) -> None:
        """The waiting path of a send from another thread (its caller tried once already)."""
        with self._handoff_mutex:
            deadline = time.monotonic() + timeout
            while not self._offer(item, locked=True):
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self.running:
                    raise self._backpressure(timeout, item.size)
                self._sleepers += 1
                try:
                    self._handoff_lock.wait(remaining)
                finally:
                    self._sleepers -= 1

    def _outgoing(self, payload: bytes, to: Sequence[int] | None, expiry_s: float) -> Outgoing:
        """A direct message (``send``), with its envelope."""
        if self._state != "running" or len(payload) > self._max_message_bytes or not expiry_s > 0:
            self._refuse(payload, expiry_s)
        # Ids are plain ints on the wire; the NewType is for the type checker only.
        targets: tuple[EndpointId, ...] | None = None if to is None else tuple(to)  # type: ignore[arg-type]
        if type(payload) is not bytes:
            payload = bytes(payload)  # a caller's bytearray must not change under us
        # direct_message(payload), inline (once per message); the loop's clock is
        # time.monotonic(), so the expiry time is valid from any thread.
        message: Outbound = (
            DIRECT_ENVELOPE + payload if len(payload) <= APART_BYTES else (DIRECT_ENVELOPE, payload)
        )
        return Outgoing(message, targets, time.monotonic() + expiry_s)

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

    def _offer(self, item: Outgoing, *, locked: bool = False) -> bool:
        """Append ``item`` to the hand-off queue if it has room; wake the loop if it was empty."""
        if not locked:
            with self._handoff_mutex:
                return self._offer(item, locked=True)
        size = item.size
        waiting = self._handoff or self._staged or self._holding()
        if waiting and self._handoff_bytes + size > self._send_queue_bytes:
            return False
        if len(self._handoff) >= _HANDOFF_SOFT_ITEMS:
            # The loop is behind: let the sender wait (releasing the GIL) until the loop has
            # taken the queue, instead of spinning against it.
            return False
        was_empty = not self._handoff
        self._handoff.append(item)
        self._handoff_bytes += size
        if was_empty and not self._drain_scheduled:
            self._drain_scheduled = True
            loop = self._loop
            assert loop is not None
            if _on_loop_thread(loop):
                loop.call_soon(self._drain_handoff)
            else:
                loop.call_soon_threadsafe(self._drain_handoff)
        return True

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

    def _drain_handoff(self) -> None:
        """On the loop: move queued messages into the stack, in order, as far as room allows.

        The shared queue is swapped out under the lock in O(1), so senders are never held up
        while messages are placed; placing takes a bounded slice per call, so reads, acks and
        timers interleave with a long queue.
        """
        stack, loop = self._stack, self._loop
        staged = self._staged
        with self._handoff_mutex:
            self._drain_scheduled = False
            if self._handoff:
                if staged:
                    staged.extend(self._handoff)
                else:
                    self._staged = staged = self._handoff
                self._handoff = deque()
                if self._sleepers:  # senders waiting on the soft limit may go on
                    self._handoff_lock.notify_all()
        if stack is None or loop is None or self._state != "running" or not staged:
            return  # (nothing staged: a drain scheduled for what an earlier call took)
        now = loop.time()
        freed = 0
        placed_all = False
        everyone = stack.recipients()
        offer = stack.offer
        place = stack.outbox.place  # what Stack.submit calls (one call less per message)
        held = stack.outbox.held
        for _ in range(_MAX_DRAIN_PER_CALL):
            if not staged:
                placed_all = True
                break
            item = staged.popleft()
            targets = item.targets
            if (
                targets is not None
                and len(targets) == 1
                and item.topic is None
                and not held
                and item.expires_at > now
                and offer(targets[0], item.payload, item.expires_at, now)
            ):
                # The usual direct message to one peer, placed: what submit does first, inline
                # (Python pays per call). Otherwise submit holds it for the peers without room
                # (they retry on acks or their removal) and the next messages go on to others.
                freed += item.size
            elif place(item, now, everyone):
                freed += item.size
        else:
            placed_all = not staged
        with self._handoff_mutex:
            if freed:
                self._handoff_bytes -= freed
                # Waiting senders are woken once half the queue is free, not per freed message:
                # each wake-up costs a thread switch, and one that finds no room costs two.
                if self._sleepers and self._handoff_bytes <= self._send_queue_bytes // 2:
                    self._handoff_lock.notify_all()
            more = bool(self._handoff) or (bool(staged) and not placed_all)
            if more and not self._drain_scheduled:
                self._drain_scheduled = True
                loop.call_soon(self._drain_handoff)
        if freed:
            self._space.set()
        self._service(now)

    # --- queries and listeners --------------------------------------------------------------------

    def peers(self) -> list[Peer]:
        """The peers discovery knows now (call on the loop thread)."""
        return self._stack.peers() if self._stack else []

    def subscribers(self, topic: str) -> list[EndpointId]:
        """Ids of the peers a publish on ``topic`` goes to now (call on the loop thread)."""
        return list(self._stack.topics.subscribers(topic)) if self._stack else []

    def add_listener(self, listener: EventListener) -> None:
        """Call ``listener(events)`` on the loop after each burst; it must not block."""
        self._listeners.append(listener)

    def peer_counters(self) -> dict[int, dict[str, int]]:
        """Per-peer transport counters (call on the loop thread)."""
        stack = self._stack
        if stack is None:
            return {}
        return {p.endpoint_id: stack.peer_counters(p.endpoint_id) for p in stack.peers()}

    def _threadsafe_snapshot(self) -> MetricsSnapshot:
        """``metrics_snapshot`` taken on the loop thread, for the metrics server's thread."""
        loop = self._loop
        if loop is None or loop.is_closed() or self._state != "running":
            return MetricsSnapshot(self.name, {}, {}, [])
        done: concurrent.futures.Future[MetricsSnapshot] = concurrent.futures.Future()

        def take() -> None:
            try:
                done.set_result(self.metrics_snapshot())
            except BaseException as exc:  # reported to the scrape, never to the loop
                done.set_exception(exc)

        loop.call_soon_threadsafe(take)
        return done.result(timeout=_SNAPSHOT_TIMEOUT_S)

    def metrics_snapshot(self) -> MetricsSnapshot:
        """Every counter and gauge, in total and per peer, for a scrape (call on the loop
        thread)."""
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
        with self._handoff_mutex:
            queued = self._handoff_bytes
        gauges = {"peers": float(len(peers)), "peers_parked": float(parked), "queued_bytes": queued}
        return MetricsSnapshot(self.name, self.all_counters(), gauges, peers)

    def all_counters(self) -> dict[str, int]:
        """Runtime and layer counters, merged (call on the loop thread)."""
        merged = Counter(self.counters)
        if self._stack is not None:
            merged.update(self._stack.all_counters())
        return dict(sorted(merged.items()))

    # --- receive path ---------------------------------------------------------------------------

    def _on_readable(self, sock: socket.socket, multicast: bool) -> None:
        loop, stack = self._loop, self._stack
        assert loop is not None
        if self._state != "running" or stack is None:
            return
        now = loop.time()
        receive = stack.receive_datagram
        recvfrom_into = sock.recvfrom_into
        count = 0
        size = 0
        drained = False
        data: bytes | bytearray
        buffer = self._buffers[self._buffer_index]
        clock = time.monotonic  # the loop's clock
        deadline = now + _MAX_SECONDS_PER_WAKEUP
        opener = self._opener
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
            if size >= _MAX_BYTES_PER_WAKEUP or clock() >= deadline:
                break
        self.counters["datagrams_received"] += count
        self.counters["bytes_received"] += size
        # More is waiting on the socket: the loop comes straight back, so events may wait for
        # the next wake-ups (a bounded few) and reach the listeners together, when that is
        # cheaper (coalesce_events).
        if drained or not self.coalesce_events or self._deferred >= _MAX_DEFERRED_WAKEUPS:
            self._service(now)
        else:
            self._deferred += 1
            self.counters["event_dispatches_deferred"] += 1
            self._service(now, dispatch=False)

    def _open(self, n: int, source: Address, buffer: bytearray) -> int:
        """Open the sealed datagram of ``n`` bytes in the opener's buffer into ``buffer``; its
        length, or -1 when it was refused (counted, logged once per source and reason)."""
        assert self._opener is not None
        try:
            return self._opener.open_received(n, int(time.time() * 1000), buffer)
        except Rejected as exc:
            self._refused(exc.reason, source)
            return -1

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
        """A receive buffer no decoded payload still views (the current one if it is free).

        Why reuse: a fresh 64 KiB ``bytes`` per datagram, freed soon after, is just the pattern
        that makes glibc's malloc give memory back to the kernel and fault it in again, over and
        over (seen here: 16-18 page faults and +30-45 us of system time per 64 KiB message, in
        some runs). A buffer that a large datagram was decoded in has been shrunk to it; growing
        it back raises ``BufferError`` while a view of it is alive (a partial message, a frame out
        of order), and then the next one in the ring is tried, or a new one is made.
        """
        buffers = self._buffers
        for _ in range(min(len(buffers), _BUFFER_TRIES)):
            index = self._buffer_index = (self._buffer_index + 1) % len(buffers)
            buffer = buffers[index]
            missing = _RECV_BYTES - len(buffer)
            if not missing:
                return buffer
            try:
                buffer += _PAD[:missing]
            except BufferError:
                continue
            return buffer
        buffer = bytearray(_RECV_BYTES)
        self.counters["receive_buffers_allocated"] += 1
        if len(buffers) < _MAX_RECEIVE_BUFFERS:
            buffers.append(buffer)
            self._buffer_index = len(buffers) - 1
        else:  # the one replaced lives on until its views are released
            buffers[self._buffer_index] = buffer
        return buffer

    # --- outputs, timers ------------------------------------------------------------------------

    def _service(self, now: float, *, dispatch: bool = True) -> None:
        """Pull the stack's outputs after a burst of inputs, then re-arm the timer.

        Events wait in the stack when ``dispatch`` is false (datagrams and timers never do).
        """
        self._flush()
        if dispatch:
            self._deferred = 0
            self._dispatch_events()
        if self._history is not None and self._stack is not None:
            self._history.sync(self._stack.topics)
        self._rearm()
        if self._idle_waiters:
            self._settle_flushes(now)

    def _settle_flushes(self, now: float) -> None:
        """Answer waiting ``flush`` calls that can be answered now."""
        failure = self._delivery_failure(now)
        if failure is None and not self._all_sent():
            self._arm_silence_check(now)
            return
        for waiter in self._idle_waiters:
            if not waiter.done():
                if failure is None:
                    waiter.set_result(None)
                else:
                    waiter.set_exception(failure)
        self._idle_waiters.clear()

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

    def _arm_silence_check(self, now: float) -> None:
        """Wake a waiting flush when a peer taken for gone has been silent long enough."""
        stack, loop = self._stack, self._loop
        assert stack is not None
        assert loop is not None
        at = stack.next_silent_at(now)
        if at is not None and (self._silence_check is None or self._silence_check.when() > at):
            if self._silence_check is not None:
                self._silence_check.cancel()
            self._silence_check = loop.call_at(at, self._on_silence_check)

    def _on_silence_check(self) -> None:
        self._silence_check = None
        if self._idle_waiters and self._loop is not None:
            self._settle_flushes(self._loop.time())

    def _all_sent(self) -> bool:
        stack = self._stack
        return not self._handoff and not self._staged and (stack is None or stack.idle())

    async def flush(self, timeout: float) -> None:  # noqa: ASYNC109 - as its blocking twin
        """Wait until everything sent so far is acknowledged (or expired, unacknowledged, while
        its peer was present).

        Raises:
            DeliveryError: messages to a peer were not acknowledged and it is gone: it left,
                restarted, or went silent for a discovery timeout (its messages are still held
                until they expire, in case it returns). A peer that left or restarted is
                reported once; a silent one while its messages are held.
            TimeoutError: still unacknowledged after ``timeout`` seconds.
        """
        if not self.running:
            return
        assert self._loop is not None
        failure = self._delivery_failure(self._loop.time())
        if failure is not None:
            raise failure
        if self._all_sent():
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._idle_waiters.append(waiter)
        try:
            await asyncio.wait_for(waiter, timeout)
        except TimeoutError:
            raise TimeoutError(f"messages still unacknowledged after {timeout} s") from None
        finally:
            if waiter in self._idle_waiters:
                self._idle_waiters.remove(waiter)

    def _flush(self) -> None:
        stack, sock, loop = self._stack, self._data, self._loop
        if stack is None or sock is None or loop is None:
            return
        datagrams = stack.datagrams_to_send(now=loop.time(), gather=True)
        if not datagrams:  # e.g. a burst that only delivered: its ack is delayed
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

    def _dispatch_events(self) -> None:
        stack = self._stack
        assert stack is not None
        pulled, control = stack.take_events()
        if not pulled:
            return
        events: list[StackEvent]
        if control:  # rare: peers came or went, or acks made room
            # Messages the outbox held for a full peer and placed since (room, or it was removed).
            freed = stack.outbox.take_placed_bytes()
            events = [e for e in pulled if not isinstance(e, SendSpaceFreed)]
            if freed:
                with self._handoff_mutex:
                    self._handoff_bytes -= freed
                    if self._sleepers:
                        self._handoff_lock.notify_all()
                self._space.set()
        else:
            events = cast(list[StackEvent], pulled)
        if not events:
            return
        for listener in self._listeners:
            try:
                listener(events)
            except Exception:  # a listener's bug must not break the network loop
                logger.exception("event listener %r failed", listener)

    def _rearm(self) -> None:
        loop, stack = self._loop, self._stack
        assert loop is not None
        assert stack is not None
        if self._state != "running":
            return
        deadline = stack.next_deadline()
        armed = self._timer_at
        if deadline is None or (armed is not None and armed <= deadline):
            # The armed timer fires no later than needed; when it does, the layers find what is
            # due (possibly nothing) and it is re-armed. Re-arming on every burst would churn
            # the loop's timer heap for deadlines (delayed acks, resends) that move constantly.
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = deadline
        if deadline is not None:
            self._timer = loop.call_at(deadline, self._on_timer, deadline)

    def _on_timer(self, deadline: float) -> None:
        loop, stack = self._loop, self._stack
        assert loop is not None
        assert stack is not None
        self._timer = self._timer_at = None
        if self._state != "running":
            return
        now = max(deadline, loop.time())
        if stack.expiry_due(now):
            # A peer is about to be taken for gone: first read what waits in the sockets (a
            # busy loop may be late to them), since any datagram from it there proves it alive.
            self._read_waiting()
            now = max(now, loop.time())
        # Follow wall-clock steps (NTP) for the timestamps of messages; cheap, once per timer.
        stack.topics.wall_offset = time.time() - now
        stack.handle_timer(now=now)
        self._service(now)

    def _read_waiting(self) -> None:
        """Take every datagram already waiting in the data and discovery sockets."""
        sockets: list[tuple[socket.socket, bool]] = []
        if self._data is not None:
            sockets.append((self._data, False))
        if self._discovery_sockets is not None:
            sockets.extend(self._discovery_sockets.sockets)
        for sock, multicast in sockets:
            self._on_readable(sock, multicast)

    # --- discovery targets ----------------------------------------------------------------------

    async def _resolve_forever(self) -> None:
        assert self._stack is not None
        while True:
            await asyncio.sleep(self.settings.discovery_rate_s)
            self._stack.set_targets(await self._resolve_targets())

    async def _resolve_targets(self) -> list[Target]:
        """Resolve every target (DNS names each time, so DNS changes are followed)."""
        targets: list[Target] = []
        for entry in self.settings.discovery_target_address:
            for host in await self._resolve(entry.host):
                kind = network.address_kind(host, self._interface)
                targets.append(((host, entry.port), kind == "unicast"))
        return list(dict.fromkeys(targets))

    async def _resolve(self, host: str) -> list[str]:
        assert self._loop is not None
        if host.count(".") == 3:
            try:
                socket.inet_aton(host)
            except OSError:
                pass
            else:
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


_primed = False


def _path_datagram_bytes(host: str, *, overhead: int) -> int | None:
    """The datagram size toward ``host``, from the MTU of the interface that reaches it, less
    what sealing adds (``overhead``)."""
    size = network.path_datagram_bytes(host, limit=wire.MAX_DATAGRAM_BYTES)
    return None if size is None else size - overhead


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


def _on_loop_thread(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False
