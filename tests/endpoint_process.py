"""The test endpoint: one glue endpoint in a process of its own, driven by JSON lines.

Every process test drives this one module: ``python -m tests.endpoint_process [--api
sync|async] [--log-level LEVEL]`` (or the file by path), configured by ``GLUE_*`` variables.
It reads one JSON command per line on stdin and writes one JSON event per line on stdout; glue's
log goes to stderr. Every event carries ``"t"``, ``time.monotonic()`` when it was written
(CLOCK_MONOTONIC is one clock for every process and network namespace of the machine, so a test
compares it with its own).

Events written unasked:

- ``{"event": "ready", "id", "name", "address": [host, port], "pid", "run", "t"}`` once started
- ``{"event": "peer_added", "peer": id, "name", "host", "port"}``, ``{"event": "peer_removed",
  "peer", "name", "host", "port", "reason"}`` (``expired``, ``left``, ``restarted``, ``evicted``)
- ``{"event": "message", "subscription": k, "topic", "type", "sequence", "source", "n", "run",
  "size", "digest", "intact", "t"}`` per message of a subscription with ``"report": "each"``
  (``subscription`` 0, ``topic``, ``type`` and ``sequence`` null: a direct message, see
  ``receive``)
- ``{"event": "stopped", "streams": [...]}`` last, after a ``stop`` command, end of input or
  SIGTERM (a clean stop: peers are told goodbye), with the final ``summary``

Commands: ``{"op": ..., "id": ...}``; the reply to one carries ``"reply": id``. They run one at a
time, in order, unless ``"background": true`` (``publish`` and ``send``): then the next command
runs at once and the reply comes when the background one ends. Background commands share one
thread, which sends each message when due, as an application publishing from one thread would
(a publish blocked by back-pressure holds up the others); those given another ``"thread":
name`` run on that thread. One ``publish`` per topic, and one ``send``, at a time. A command
that raised replies ``{"event": "error", "error": repr}``, unknown fields included.

- ``subscribe`` ``pattern``, ``type`` (default ``test``), ``report`` (``each`` or ``summary``),
  ``delay`` (s the callback takes per message: a slow consumer), ``gaps`` (true: report each
  Gap as ``{"event": "gap", "subscription", "topic", "source", "first", "count", "reason"}``)
  -> ``subscribed``, ``"subscription": k``; ``unsubscribe`` ``subscription`` -> ``unsubscribed``
- ``receive`` ``report``: direct messages (``send``) too -> ``receiving``
- ``publish`` ``topic``, ``type``, ``count`` (1), ``size`` (200) or ``sizes`` (cycled), ``rate``
  (messages/s, paced from the start; none: as fast as it can), ``offset`` (s before the first),
  ``expiry`` (30 s; a string such as ``"inf"`` is passed as float), ``history_depth``,
  ``timeout`` (10 s), ``digests`` (true) ->
  ``published`` ``{"topic", "first", "count", "digests", "started_at", "finished_at"}``
  (``first``: the sequence of the first, counted per topic from 1 in this process); on an error,
  ``error`` with the same fields for what went out before it
- ``send`` ``to`` (ids; none: every peer), ``count``, ``size``/``sizes``, ``rate``, ``offset``,
  ``expiry``, ``timeout``, ``digests`` -> ``sent`` ``{"first", "count", "digests", ...}``
  (numbered per process)
- ``flush`` ``timeout`` -> ``flushed``, ``flush_failed`` ``{"error", "peers", "unacknowledged"}``
  or ``flush_timeout``
- ``peers`` (``count`` and ``timeout``: wait for that many first) -> ``peers`` ``{"peers": [{"id",
  "name", "host", "port", "incarnation"}]}``; ``subscribers`` ``topic``, ``count``, ``timeout``
  -> ``subscribers`` ``{"peers": [...]}``
- ``counters`` -> ``counters`` ``{"counters": {...}, "peers": {id: {...}}, "rss_bytes"}``;
  ``memory`` (``top``: 10) -> ``memory`` ``{"rss_bytes"}``, and when it runs with
  ``PYTHONTRACEMALLOC=1``: ``"traced_bytes"``, ``"traced_peak_bytes"`` and ``"top"``, the
  ``[line, bytes, blocks]`` holding the most memory
- ``summary`` -> ``summary`` ``{"streams": [{"subscription", "topic", "source", "run", "count",
  "ranges", "duplicates", "reordered", "misnumbered", "corrupt"}]}``: per subscription, topic,
  source and run, the sequences received as ``[first, last]`` ranges, messages whose sequence
  had come before (``duplicates``) or came after a higher one (``reordered``), whose payload
  number is not their sequence (``misnumbered``) or whose payload is damaged (``corrupt``).
  Direct messages are numbered by their payload.
- ``stop``: end background commands, stop the endpoint (goodbye), exit.

Payloads are ``b"<n>:<run>:"`` then bytes derived from that header and the size, ``size`` bytes
in all (the header alone if it is longer): ``n`` counts the messages (per topic, or sends) and
``run`` is six hex digits drawn at start, so a receiver checks each payload by itself (a damaged
or cut one fails) and tells apart two runs with the same endpoint id. ``digest`` is the first
16 hex digits of the payload's SHA-256; ``intact`` is null for a payload not of this form (one a
test built).

:class:`EndpointProcess` starts one (under a command prefix such as ``ip netns exec h1``) and
collects its events.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import fcntl
import hashlib
import heapq
import inspect
import itertools
import logging
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable, Generator, Iterable, Sequence
from pathlib import Path
from typing import Any

import orjson

REPO = Path(__file__).resolve().parents[1]
TOPIC_TYPE = "test"
SMALL_BYTES = 200
LARGE_BYTES = 64 * 1024


# --- payloads -----------------------------------------------------------------------------------


def payload(number: int, size: int, run: str) -> bytes:
    """Message ``number`` of ``run``: its header, then bytes derived from it, ``size`` in all."""
    header = b"%d:%s:" % (number, run.encode())
    block = _block(header, max(size, len(header)))
    whole, part = divmod(max(0, size - len(header)), len(block))
    return b"".join((header, block * whole, block[:part]))


def parse(data: bytes) -> tuple[int | None, str | None, bool | None]:
    """``(n, run, intact)`` of a payload; ``intact`` is None if it is not of our form."""
    number, _, rest = data.partition(b":")
    if not number.isdigit():
        return None, None, None
    run = rest[:6]
    if rest[6:7] != b":" or any(c not in b"0123456789abcdef" for c in run):
        return int(number), None, None
    header = b"%s:%s:" % (number, run)
    block = _block(header, len(data))
    # Compared in place, not against a rebuilt copy: a 1 MiB message costs no 1 MiB more.
    body = memoryview(data)[len(header) :]
    return (
        int(number),
        run.decode(),
        body[: len(block)] == block[: len(body)]
        and (body[len(block) :] == body[: max(0, len(body) - len(block))]),
    )


def _block(header: bytes, size: int) -> bytes:
    """What the rest of a payload repeats: derived from its header and its size (so a payload
    cut short does not pass either)."""
    return hashlib.blake2b(b"%s%d" % (header, size)).digest()


def digest(data: bytes) -> str:
    """What both sides compare: the first 16 hex digits of SHA-256."""
    return hashlib.sha256(data).hexdigest()[:16]


# --- the process --------------------------------------------------------------------------------


class Tally:
    """What one stream (subscription, topic, source, run) delivered, as sequence ranges."""

    def __init__(self) -> None:
        self.count = self.duplicates = self.reordered = self.misnumbered = self.corrupt = 0
        self.ranges: list[list[int]] = []

    def add(self, sequence: int) -> None:
        self.count += 1
        ranges = self.ranges
        if ranges and sequence == ranges[-1][1] + 1:  # in order: the usual case
            ranges[-1][1] = sequence
            return
        at = bisect.bisect_right(ranges, sequence, key=lambda r: r[0])
        if at and ranges[at - 1][1] >= sequence:
            self.duplicates += 1
            return
        if at < len(ranges):
            self.reordered += 1
        ranges.insert(at, [sequence, sequence])
        for index in (at, at - 1):  # merge with the neighbours it now touches
            if 0 <= index < len(ranges) - 1 and ranges[index][1] + 1 >= ranges[index + 1][0]:
                ranges[index][1] = ranges.pop(index + 1)[1]


class _SyncManager:
    """An ``EndpointManager``, plus peer events written from a thread as they come."""

    def __init__(self) -> None:
        from glue import EndpointManager

        self._manager = EndpointManager.from_env()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._manager, name)

    def watch_peers(self, write: Callable[[Any], None]) -> threading.Thread:
        events = self._manager.peer_events()  # registered now, before start

        def watch() -> None:
            for event in events:
                write(event)

        thread = threading.Thread(target=watch, name="endpoint-process-peers", daemon=True)
        thread.start()
        return thread


class _AsyncManager:
    """The blocking method names, over an ``AsyncEndpointManager`` running on a thread's loop."""

    def __init__(self) -> None:
        from glue import AsyncEndpointManager

        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()

        async def make() -> AsyncEndpointManager:
            return AsyncEndpointManager.from_env()

        self._manager = asyncio.run_coroutine_threadsafe(make(), self._loop).result()
        self.endpoint_id, self.name = self._manager.endpoint_id, self._manager.name

    def __getattr__(self, name: str) -> Callable[..., Any]:
        method = getattr(self._manager, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            async def run() -> Any:
                result = method(*args, **kwargs)
                return await result if inspect.isawaitable(result) else result

            return asyncio.run_coroutine_threadsafe(run(), self._loop).result()

        return call

    @property
    def data_address(self) -> tuple[str, int]:
        return self._manager.data_address

    def watch_peers(self, write: Callable[[Any], None]) -> Any:
        async def watch() -> None:
            async for event in self._manager.peer_events():
                write(event)

        async def begin() -> asyncio.Task[None]:
            return asyncio.get_running_loop().create_task(watch())

        return asyncio.run_coroutine_threadsafe(begin(), self._loop).result()

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.__getattr__("stop")()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()


class _Stop(Exception):
    """SIGTERM: leave the command loop and stop cleanly."""


#: The fields each command takes (besides ``op`` and ``id``): another one is an error, not
#: silently ignored.
FIELDS = {
    "subscribe": {"pattern", "type", "report", "delay", "gaps"},
    "unsubscribe": {"subscription"},
    "receive": {"report", "delay"},
    "publish": {"topic", "type", "count", "size", "sizes", "rate", "offset", "expiry",
                "history_depth", "timeout", "digests", "background", "thread"},
    "send": {"to", "count", "size", "sizes", "rate", "offset", "expiry", "timeout", "digests",
             "background", "thread"},
    "flush": {"timeout"},
    "peers": {"count", "timeout"},
    "subscribers": {"topic", "count", "timeout"},
    "counters": set(),
    "memory": {"top"},
    "summary": set(),
}  # fmt: skip


class Background:
    """Background ``publish`` and ``send`` commands run by one thread (as an application that
    publishes from one thread): each job is a generator that yields when its next message is
    due; the earliest due goes first. A job whose emit blocks (back-pressure) holds the others
    up. On a stop, every job is run on at once: each sees it, stops and replies."""

    def __init__(
        self, name: str, stopping: threading.Event, write: Callable[[dict[str, Any]], None]
    ) -> None:
        self._stopping, self._write = stopping, write
        self._jobs: list[tuple[float, int, Generator[float, None, dict[str, Any]], Any]] = []
        self._order = itertools.count()
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._run, name=f"endpoint-process-{name}")
        self._thread.start()

    def add(self, job: Generator[float, None, dict[str, Any]], reply: Any) -> None:
        with self._changed:
            heapq.heappush(self._jobs, (time.monotonic(), next(self._order), job, reply))
            self._changed.notify()

    def finish(self) -> None:
        """Once ``stopping`` is set: every job replies, then the thread ends."""
        with self._changed:
            self._changed.notify()
        self._thread.join()

    def _run(self) -> None:
        while True:
            with self._changed:
                while True:
                    if not self._jobs:
                        if self._stopping.is_set():
                            return
                        self._changed.wait()
                        continue
                    wait = self._jobs[0][0] - time.monotonic()
                    if wait <= 0 or self._stopping.is_set():
                        break
                    self._changed.wait(wait)
                _, _, job, reply = heapq.heappop(self._jobs)
            try:
                due = job.send(None)
            except StopIteration as done:
                self._write({"reply": reply, **done.value})
                continue
            with self._changed:
                heapq.heappush(self._jobs, (due, next(self._order), job, reply))


class Runner:
    """Runs the commands against one endpoint and writes the events."""

    def __init__(self, endpoint: Any, api: str, run: str) -> None:
        self.endpoint, self.api, self.run = endpoint, api, run
        self.stopping = threading.Event()
        self._lock = threading.Lock()  # stdout and the tallies
        self._published: Counter[str] = Counter()
        self._sent = 0
        self._busy: set[str] = set()  # topics (and "send") with a job running
        self._threads: dict[str, Background] = {}  # by the "thread" of background commands
        self._subscriptions: dict[int, Any] = {}
        self._numbers = itertools.count(1)
        self._tallies: dict[tuple[int, str | None, int, str | None], Tally] = {}

    def write(self, line: dict[str, Any]) -> None:
        data = orjson.dumps({**line, "t": time.monotonic()}, option=orjson.OPT_NON_STR_KEYS)
        with self._lock:
            sys.stdout.buffer.write(data + b"\n")
            sys.stdout.buffer.flush()

    def on_peer_event(self, event: Any) -> None:
        """Write a peer event (``PeerAdded`` or ``PeerRemoved``, whose reason it gives)."""
        reason = getattr(event, "reason", None)
        kind = "peer_removed" if reason else "peer_added"
        peer = event.peer
        line = {"event": kind, "peer": peer.endpoint_id, "name": peer.name, "host": peer.host}
        self.write({**line, "port": peer.port, **({"reason": reason} if reason else {})})

    def dispatch(self, command: dict[str, Any]) -> None:
        """Run one command; a background ``publish`` or ``send`` only starts here."""
        op = command["op"]
        try:
            if op not in FIELDS:
                raise ValueError(f"unknown op {op!r}")
            if unknown := set(command) - FIELDS[op] - {"op", "id"}:
                raise ValueError(f"{op} takes no {', '.join(sorted(unknown))}")
            result = getattr(self, f"_op_{op}")(command)
            if isinstance(result, Generator):
                if command.get("background"):
                    name = command.get("thread", "publisher")
                    if name not in self._threads:
                        self._threads[name] = Background(name, self.stopping, self.write)
                    self._threads[name].add(result, command.get("id"))
                    return
                result = self._drive(result)
        except Exception as exc:  # reported to the test, which fails with it
            result = {"event": "error", "error": repr(exc)}
        self.write({"reply": command.get("id"), **result})

    def finish(self) -> None:
        """End background commands (each replies with what it did) before the endpoint stops."""
        self.stopping.set()
        for thread in self._threads.values():
            thread.finish()

    def _drive(self, job: Generator[float, None, dict[str, Any]]) -> dict[str, Any]:
        """Run a job here: wait until each of its messages is due (or a stop), then emit it."""
        try:
            while True:
                self.stopping.wait(max(0.0, job.send(None) - time.monotonic()))
        except StopIteration as done:
            return done.value

    # --- receiving ------------------------------------------------------------------------------

    def _op_subscribe(self, command: dict[str, Any]) -> dict[str, Any]:
        number = next(self._numbers)
        callback = self._callback(number, command)
        options: dict[str, Any] = {}
        if command.get("gaps"):

            def gap(gap: Any) -> None:
                self.write(
                    {
                        "event": "gap", "subscription": number, "topic": gap.topic_name,
                        "source": gap.source_id, "first": gap.first_sequence,
                        "count": gap.count, "reason": gap.reason,
                    }
                )  # fmt: skip

            options["on_gap"] = gap
        self._subscriptions[number] = self.endpoint.subscribe(
            command["pattern"], command.get("type", TOPIC_TYPE), callback, **options
        )
        return {"event": "subscribed", "subscription": number}

    def _op_unsubscribe(self, command: dict[str, Any]) -> dict[str, Any]:
        self.endpoint.unsubscribe(self._subscriptions.pop(command["subscription"]))
        return {"event": "unsubscribed"}

    def _op_receive(self, command: dict[str, Any]) -> dict[str, Any]:
        self.endpoint.on_message(self._callback(0, command))
        return {"event": "receiving"}

    def _callback(self, subscription: int, command: dict[str, Any]) -> Callable[[Any], Any]:
        each, delay = command.get("report", "each") == "each", command.get("delay", 0)

        def record(message: Any) -> None:
            data = message.payload
            number, run, intact = parse(data)
            if subscription:
                topic, kind, sequence = message.topic_name, message.topic_type, message.sequence
                source = message.source_id
            else:
                topic = kind = sequence = None
                source = message.source.endpoint_id
            with self._lock:
                self._tally(subscription, topic, source, run, sequence, number, intact)
            if each:
                self.write(
                    {
                        "event": "message", "subscription": subscription, "topic": topic,
                        "type": kind, "sequence": sequence, "source": source, "n": number,
                        "run": run, "size": len(data), "digest": digest(data), "intact": intact,
                    }
                )  # fmt: skip

        if not delay:
            return record
        if self.api == "async":

            async def slow_async(message: Any) -> None:
                record(message)
                await asyncio.sleep(delay)

            return slow_async

        def slow(message: Any) -> None:
            record(message)
            time.sleep(delay)  # the consumer is slow: the point of ``delay``

        return slow

    def _tally(
        self,
        subscription: int,
        topic: str | None,
        source: int,
        run: str | None,
        sequence: int | None,
        number: int | None,
        intact: bool | None,
    ) -> None:
        tally = self._tallies.setdefault((subscription, topic, source, run), Tally())
        if intact is False:
            tally.corrupt += 1
        if sequence is not None and number is not None and intact and number != sequence:
            tally.misnumbered += 1
        if (position := sequence if sequence is not None else number) is not None:
            tally.add(position)

    def _op_summary(self, command: dict[str, Any]) -> dict[str, Any]:
        return {"event": "summary", "streams": self.streams()}

    def streams(self) -> list[dict[str, Any]]:
        """The tallies, as ``summary`` reports them."""
        with self._lock:
            streams = [
                {
                    "subscription": subscription, "topic": topic, "source": source, "run": run,
                    "count": t.count, "ranges": [list(r) for r in t.ranges],
                    "duplicates": t.duplicates, "reordered": t.reordered,
                    "misnumbered": t.misnumbered, "corrupt": t.corrupt,
                }
                for (subscription, topic, source, run), t in self._tallies.items()
            ]  # fmt: skip
        return streams

    # --- sending --------------------------------------------------------------------------------

    def _op_publish(self, command: dict[str, Any]) -> Generator[float, None, dict[str, Any]]:
        topic, kind = command["topic"], command.get("type", TOPIC_TYPE)
        depth = command.get("history_depth")

        def publish(number: int, data: bytes, expiry: float, timeout: float) -> None:
            self.endpoint.publish(
                topic, kind, data, expiry=expiry, history_depth=depth, timeout=timeout
            )
            self._published[topic] = number

        job = self._emit(
            command, f"publish on {topic}", lambda: self._published[topic] + 1, publish
        )
        return self._then(job, topic=topic, event="published")

    def _op_send(self, command: dict[str, Any]) -> Generator[float, None, dict[str, Any]]:
        to = command.get("to")

        def send(number: int, data: bytes, expiry: float, timeout: float) -> None:
            self.endpoint.send(data, to=to, expiry=expiry, timeout=timeout)
            self._sent = number

        return self._then(self._emit(command, "send", lambda: self._sent + 1, send), event="sent")

    def _emit(
        self,
        command: dict[str, Any],
        key: str,
        first: Callable[[], int],
        emit: Callable[[int, bytes, float, float], None],
    ) -> Generator[float, None, dict[str, Any]]:
        """A job: ``count`` payloads numbered from ``first()``, each emitted when due (it yields
        when), paced at ``rate``. One job per topic (and one send) at a time, so its numbers
        are consecutive."""
        with self._lock:
            if key in self._busy:
                raise ValueError(f"a {key} is still running")
            self._busy.add(key)
        return self._steps(command, key, first(), emit)

    def _steps(
        self,
        command: dict[str, Any],
        key: str,
        first: int,
        emit: Callable[[int, bytes, float, float], None],
    ) -> Generator[float, None, dict[str, Any]]:
        sizes = command.get("sizes") or [command.get("size", SMALL_BYTES)]
        count, rate, offset = command.get("count", 1), command.get("rate"), command.get("offset", 0)
        expiry, timeout = float(command.get("expiry", 30.0)), command.get("timeout", 10.0)
        keep = command.get("digests", True)
        digests: list[str] = []
        started_at = time.monotonic() + offset
        reply: dict[str, Any] = {"count": 0}
        try:
            for index in range(count):
                yield started_at + (index / rate if rate else 0.0)
                if self.stopping.is_set():
                    break
                data = payload(first + index, sizes[index % len(sizes)], self.run)
                try:
                    emit(first + index, data, expiry, timeout)
                except Exception as exc:
                    reply.update(event="error", error=repr(exc))  # "count" says what went out
                    break
                if keep:
                    digests.append(digest(data))
                reply["count"] = index + 1
        finally:
            with self._lock:
                self._busy.discard(key)
        return {
            "first": first, "digests": digests, "started_at": started_at,
            "finished_at": time.monotonic(), **reply,
        }  # fmt: skip

    @staticmethod
    def _then(
        job: Generator[float, None, dict[str, Any]], **fields: Any
    ) -> Generator[float, None, dict[str, Any]]:
        """``job``, its reply completed with ``fields`` (an ``error`` event stays one)."""
        reply = yield from job
        return {**fields, **reply}

    def _op_flush(self, command: dict[str, Any]) -> dict[str, Any]:
        from glue import DeliveryError

        try:
            self.endpoint.flush(timeout=command.get("timeout", 30.0))
        except DeliveryError as exc:
            unacknowledged = getattr(exc, "unacknowledged", {})
            return {
                "event": "flush_failed", "error": str(exc), "peers": sorted(exc.peers),
                "unacknowledged": unacknowledged,
            }  # fmt: skip
        except TimeoutError as exc:
            return {"event": "flush_timeout", "error": str(exc)}
        return {"event": "flushed"}

    # --- state ----------------------------------------------------------------------------------

    def _op_peers(self, command: dict[str, Any]) -> dict[str, Any]:
        if command.get("count") is not None:
            peers = self.endpoint.wait_for_peers(command["count"], timeout=command["timeout"])
        else:
            peers = self.endpoint.peers()
        return {"event": "peers", "peers": _peer_list(peers)}

    def _op_subscribers(self, command: dict[str, Any]) -> dict[str, Any]:
        peers = self.endpoint.wait_for_subscribers(
            command["topic"], command.get("count", 1), timeout=command["timeout"]
        )
        return {"event": "subscribers", "peers": _peer_list(peers)}

    def _op_counters(self, command: dict[str, Any]) -> dict[str, Any]:
        return {
            "event": "counters",
            "counters": self.endpoint.counters(),
            "peers": self.endpoint.peer_counters(),
            "rss_bytes": rss_bytes(os.getpid()),
        }

    def _op_memory(self, command: dict[str, Any]) -> dict[str, Any]:
        reply: dict[str, Any] = {"event": "memory", "rss_bytes": rss_bytes(os.getpid())}
        if tracemalloc.is_tracing():
            reply["traced_bytes"], reply["traced_peak_bytes"] = tracemalloc.get_traced_memory()
            stats = tracemalloc.take_snapshot().statistics("lineno")[: command.get("top", 10)]
            reply["top"] = [[str(stat.traceback[0]), stat.size, stat.count] for stat in stats]
        return reply


def _peer_list(peers: Iterable[Any]) -> list[dict[str, Any]]:
    return [
        {"id": p.endpoint_id, "name": p.name, "host": p.host, "port": p.port,
         "incarnation": p.incarnation}
        for p in peers
    ]  # fmt: skip


def rss_bytes(pid: int) -> int:
    """Resident memory of process ``pid`` (VmRSS), 0 once it is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.endpoint_process")
    parser.add_argument("--api", choices=["sync", "async"], default="sync")
    parser.add_argument("--log-level", default=os.environ.get("GLUE_LOG_LEVEL", "WARNING"))
    args = parser.parse_args(argv)
    logging.basicConfig(
        stream=sys.stderr,
        level=args.log_level.upper(),
        format="%(levelname)s %(name)s: %(message)s",
    )

    def terminate(*_: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one clean stop, not interrupted
        raise _Stop

    signal.signal(signal.SIGTERM, terminate)
    endpoint: Any = _SyncManager() if args.api == "sync" else _AsyncManager()
    runner = Runner(endpoint, args.api, secrets.token_hex(3))
    # Before start: a peer met in the first milliseconds is not missed.
    watcher = endpoint.watch_peers(runner.on_peer_event)
    try:
        endpoint.start()
        runner.write(
            {
                "event": "ready", "id": endpoint.endpoint_id, "name": endpoint.name,
                "address": list(endpoint.data_address), "pid": os.getpid(), "run": runner.run,
            }
        )  # fmt: skip
        for raw in sys.stdin.buffer:
            command = orjson.loads(raw)
            if command["op"] == "stop":
                break
            runner.dispatch(command)
    except _Stop:
        pass
    finally:
        runner.finish()
        endpoint.stop()
        if isinstance(watcher, threading.Thread):
            watcher.join()  # its iteration ended with the endpoint
    runner.write({"event": "stopped", "streams": runner.streams()})
    return 0


# --- the test side ------------------------------------------------------------------------------


def base_env(**glue: Any) -> dict[str, str]:
    """The parent's environment without GLUE_*, plus the given GLUE_* settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GLUE_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update({f"GLUE_{key.upper()}": str(value) for key, value in glue.items()})
    return env


class EndpointProcess:
    """One ``endpoint_process`` child: its events as they come, commands, and a clean stop.

    ``prefix`` runs it elsewhere (``ip netns exec h1``); ``glue`` are ``GLUE_*`` settings
    (``discovery_rate_milliseconds=200``). With ``wait=False`` call :meth:`wait_ready` later
    (start several, then wait for all)."""

    def __init__(
        self,
        prefix: Sequence[str] = (),
        *,
        label: str = "",
        api: str = "sync",
        log_level: str | None = None,
        wait: bool = True,
        **glue: Any,
    ) -> None:
        self.label = label
        self.stderr = tempfile.TemporaryFile(mode="w+")
        # Append mode: reading it moves the offset the child shares; the child must not then
        # overwrite earlier lines.
        flags = fcntl.fcntl(self.stderr.fileno(), fcntl.F_GETFL)
        fcntl.fcntl(self.stderr.fileno(), fcntl.F_SETFL, flags | os.O_APPEND)
        options = ["--api", api, *(["--log-level", log_level] if log_level else [])]
        self.process = subprocess.Popen(
            [*prefix, sys.executable, "-m", "tests.endpoint_process", *options],
            cwd=REPO,
            env=base_env(**glue),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
        )
        self.lines: list[dict[str, Any]] = []
        self.known: dict[int, str] = {}  # peer id -> name, as its peer events say now
        self.endpoint_id, self.name, self.pid, self.run, self.started_at = 0, "", 0, "", 0.0
        self._changed = threading.Condition()
        self._ids = itertools.count(1)
        self._stdin_lock = threading.Lock()
        self._closed = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if wait:
            self.wait_ready()

    def __repr__(self) -> str:
        return f"<EndpointProcess {self.label or self.name} id={self.endpoint_id}>"

    def wait_ready(self, timeout: float = 30) -> None:
        """Wait for its ``ready`` event; fail with its log if it does not come."""
        ready = self.wait_for(lambda: bool(self.events("ready")), timeout)
        assert ready, f"{self.label}: not ready within {timeout} s:\n{self.log()}"
        info = self.events("ready")[0]
        self.endpoint_id, self.name, self.pid = info["id"], info["name"], info["pid"]
        self.run = info["run"]  # in its payloads: tells its messages from an earlier run's
        self.started_at = info["t"]

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait until ``predicate`` holds (checked on every event), at most ``timeout`` s."""
        with self._changed:
            return self._changed.wait_for(predicate, timeout)

    def events(self, kind: str, **match: Any) -> list[dict[str, Any]]:
        """Events ``kind`` whose fields equal ``match``, in order."""
        with self._changed:
            return [
                line
                for line in self.lines
                if line.get("event") == kind and all(line.get(k) == v for k, v in match.items())
            ]

    def messages(self, topic: str | None = None) -> list[dict[str, Any]]:
        """Messages received so far (on ``topic``, if given), in arrival order."""
        return self.events("message", **({"topic": topic} if topic else {}))

    def knows(self, *others: EndpointProcess) -> bool:
        return all(other.endpoint_id in self.known for other in others)

    def removals(self, other: EndpointProcess) -> list[tuple[float, str]]:
        """(time, reason) of every removal of ``other`` it reported."""
        return [(e["t"], e["reason"]) for e in self.events("peer_removed", peer=other.endpoint_id)]

    def command(self, op: str, **fields: Any) -> int:
        """Send one command without waiting; returns its id (see :meth:`result`)."""
        number = next(self._ids)
        assert self.process.stdin is not None
        with self._stdin_lock:
            self.process.stdin.write(orjson.dumps({"op": op, "id": number, **fields}) + b"\n")
            self.process.stdin.flush()
        return number

    def result(self, number: int, timeout: float = 30.0) -> dict[str, Any]:
        """The reply to command ``number`` (an ``error`` one too), waiting at most ``timeout``."""

        def reply() -> dict[str, Any] | None:
            return next((e for e in self.lines if e.get("reply") == number), None)

        assert self.wait_for(lambda: reply() is not None, timeout), (
            f"{self.label}: no reply to command {number} within {timeout} s:\n{self.log()}"
        )
        answer = reply()
        assert answer is not None
        return answer

    def request(self, op: str, *, wait: float = 30.0, **fields: Any) -> dict[str, Any]:
        """Send one command and return its reply, which must not be an error."""
        answer = self.result(self.command(op, **fields), wait)
        assert answer["event"] != "error", f"{self.label}: {op}: {answer}\n{self.log()}"
        return answer

    def peers(self) -> dict[int, str]:
        """Peers known now: id -> host."""
        return {p["id"]: p["host"] for p in self.request("peers")["peers"]}

    def counters(self) -> tuple[dict[str, int], dict[int, dict[str, int]]]:
        """The endpoint's counters and its per-peer counters (peer ids as ints)."""
        reply = self.request("counters")
        return reply["counters"], {int(k): v for k, v in reply["peers"].items()}

    def summary(self) -> list[dict[str, Any]]:
        return list(self.request("summary")["streams"])

    def rss_bytes(self) -> int:
        """Its resident memory now (0 once it exited)."""
        return rss_bytes(self.pid) if self.process.poll() is None else 0

    def send_signal(self, sig: signal.Signals) -> None:
        """Send ``sig`` (SIGSTOP, SIGCONT, ...) without waiting."""
        self.process.send_signal(sig)

    def freeze(self, timeout: float = 10.0) -> None:
        """SIGSTOP, then wait until every thread of the process is stopped: the kernel wakes
        one thread to take a process-wide stop, and until it runs (later on a busy machine)
        the others go on, e.g. receiving and acknowledging."""
        self.process.send_signal(signal.SIGSTOP)
        tasks = f"/proc/{self.process.pid}/task"

        def stopped() -> bool:
            states = []
            for task in os.listdir(tasks):
                with open(f"{tasks}/{task}/stat") as stat:
                    states.append(stat.read().rsplit(")", 1)[1].split()[0])
            return all(state in ("T", "t") for state in states)

        deadline = time.monotonic() + timeout
        while not stopped():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.label or self.process.pid} did not stop")
            time.sleep(0.001)

    def kill(self, sig: signal.Signals = signal.SIGKILL) -> float:
        """Send ``sig`` and wait until it exits; return when it was sent."""
        sent = time.monotonic()
        self.process.send_signal(sig)
        self.process.wait(timeout=20)
        return sent

    def log(self) -> str:
        """The end of its stderr (glue's log)."""
        if self.stderr.closed:
            return ""
        self.stderr.seek(0)
        return self.stderr.read()[-5000:]

    def close(self) -> None:
        """Ask it to stop; terminate, then kill it if it does not. Idempotent."""
        if self._closed:
            return
        self._closed = True
        stdin = self.process.stdin
        if stdin is not None:
            with contextlib.suppress(BrokenPipeError, ValueError), self._stdin_lock:
                if self.process.poll() is None:
                    stdin.write(b'{"op": "stop"}\n')
                stdin.close()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._reader.join(timeout=10)
        if self.process.stdout is not None:
            self.process.stdout.close()
        self.stderr.close()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            line = orjson.loads(raw)
            with self._changed:
                self.lines.append(line)
                if line.get("event") == "peer_added":
                    self.known[line["peer"]] = line["name"]
                elif line.get("event") == "peer_removed":
                    self.known.pop(line["peer"], None)
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()


def wait_all(
    processes: Sequence[EndpointProcess],
    predicate: Callable[[EndpointProcess], bool],
    timeout: float,
) -> bool:
    """Wait until ``predicate(process)`` holds for every process, within one shared deadline."""
    deadline = time.monotonic() + timeout
    return all(
        process.wait_for(lambda p=process: predicate(p), max(0.0, deadline - time.monotonic()))
        for process in processes
    )


if __name__ == "__main__":
    sys.exit(main())
