"""The ``glue`` command: ``peers``, ``sub``, ``pub``, ``model``, ``keygen``, ``doctor``, ``demo``,
``bench``.

The only module of the package that prints.

``glue peers`` joins the network described by the ``GLUE_*`` settings and lists the endpoints it
sees (``--watch`` follows them live, ``--json`` prints one JSON object per line for scripts;
``--subscribe``/``--publish`` add topic traffic to a watch, for the demo). ``glue sub`` prints
the messages of a topic pattern and ``glue pub`` publishes, like ``mosquitto_sub``/``_pub``
without a broker; ``glue model`` shows, edits or follows a shared model. ``glue demo`` starts a
rendezvous and several endpoint processes on 127.0.0.1 only, with no multicast at all, so it is
safe on any machine, and narrates discovery, publish/subscribe, expiry of a killed endpoint, a
late joiner served from history, a model converging, and the mesh surviving the loss of its
rendezvous.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import itertools
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TextIO

import orjson

from glue.errors import ConfigError, GlueError
from glue.events import Message, Peer, PeerAdded, PeerRemoved
from glue.manager import AsyncEndpointManager
from glue.settings import load_settings

__all__ = ["main"]

logger = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``glue`` console script."""
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "needs_settings", True):  # keygen works without any GLUE_* set
        result: int = args.run(args)
        return result
    try:
        settings = load_settings()
        # The command prints what happens itself: glue's INFO lines would repeat it, so they
        # show only when asked for (-v, --log-level, or GLUE_LOG_LEVEL set explicitly).
        level = args.log_level or ("INFO" if args.verbose else None)
        if level is None:
            level = settings.log_level if "log_level" in settings.model_fields_set else "WARNING"
        logging.basicConfig(
            level=level,
            format="%(asctime)s %(levelname)s %(name)s: %(message)s",
            stream=sys.stderr,
        )
        outcome: int = args.run(args)
        return outcome
    except ConfigError as exc:
        print(f"glue: configuration error:\n{exc}", file=sys.stderr)
        return 2
    except (GlueError, TimeoutError) as exc:
        print(f"glue: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="glue",
        description="Brokerless publish/subscribe over UDP. Configure with GLUE_* variables.",
    )
    parser.add_argument(
        "--log-level",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging level on stderr (default: GLUE_LOG_LEVEL if set, else WARNING)",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log glue's INFO lines too (--log-level INFO)"
    )
    commands = parser.add_subparsers(dest="command", required=True)

    peers = commands.add_parser(
        "peers",
        help="join the network and list the endpoints seen",
        description="Join the network described by the GLUE_* settings and list the endpoints "
        "seen within one discovery timeout (--wait to listen longer), or follow them as they "
        "come and go (--watch).",
    )
    peers.add_argument(
        "--wait",
        type=float,
        help="seconds to listen before listing (default: one discovery timeout)",
    )
    peers.add_argument("--watch", action="store_true", help="print peers as they come and go")
    peers.add_argument("--duration", type=float, help="with --watch: stop after this many seconds")
    peers.add_argument("--json", action="store_true", help="one JSON object per line")
    peers.add_argument(
        "--subscribe", metavar="PATTERN", help="with --watch: also print messages of PATTERN"
    )
    peers.add_argument(
        "--publish", metavar="TOPIC", help="with --watch: also publish a counter on TOPIC"
    )
    peers.add_argument("--interval-ms", type=float, default=200.0, help="with --publish")
    peers.add_argument("--type", default="demo", help="topic type for --subscribe/--publish")
    peers.set_defaults(run=_run_peers)

    sub = commands.add_parser(
        "sub",
        help="print the messages published on a topic pattern",
        description="Subscribe to a topic pattern and print each message as it arrives: "
        "'TOPIC [SOURCE #SEQUENCE] PAYLOAD', or one JSON object per line with --json. Exit 0 "
        "after --count messages, 1 when --timeout passes first.",
    )
    sub.add_argument("pattern", help="topic name or pattern: #, a/b/#, a/+/c")
    sub.add_argument("--type", default="text", help="topic type (default: text)")
    sub.add_argument("--count", type=int, default=0, help="exit after this many (0: never)")
    sub.add_argument("--timeout", type=float, help="exit after this many seconds")
    sub.add_argument("--json", action="store_true", help="one JSON object per line")
    sub.set_defaults(run=_run_sub)

    pub = commands.add_parser(
        "pub",
        help="publish a message on a topic",
        description="Publish one message on a topic. By default: wait up to one discovery "
        "timeout for a subscriber of the topic, publish, wait until every subscriber "
        "acknowledged it, exit 0. Exit 3 when no subscriber appeared (nothing is published), 1 "
        "when a subscriber did not acknowledge it.",
    )
    pub.add_argument("topic", help="topic name")
    pub.add_argument("payload", help="message text (UTF-8), or - to read stdin")
    pub.add_argument("--type", default="text", help="topic type (default: text)")
    pub.add_argument(
        "--expiry",
        type=_expiry,
        default=5.0,
        help="seconds before it expires (more than 0, at most 86400)",
    )
    pub.add_argument("--history-depth", type=int, help="messages kept for late joiners")
    pub.add_argument(
        "--wait-for-subscribers",
        type=int,
        default=1,
        metavar="N",
        help="wait (up to --timeout) until N peers subscribe to the topic (default 1)",
    )
    pub.add_argument(
        "--timeout",
        type=float,
        help="seconds to wait for subscribers (default: one discovery timeout, "
        "GLUE_DISCOVERY_RATE_MILLISECONDS x GLUE_DISCOVERY_RATE_TIMEOUT_MULTIPLIER)",
    )
    pub.add_argument(
        "--no-wait",
        action="store_true",
        help="do not wait for subscribers: publish to those already known (none, just after "
        "start), wait for their acknowledgements, exit 0",
    )
    pub.add_argument(
        "--linger",
        type=float,
        default=0.0,
        help="seconds to stay up after the subscribers acknowledged it, so that late joiners "
        "get it from history (default 0)",
    )
    pub.set_defaults(run=_run_pub)

    model = commands.add_parser(
        "model",
        help="show or edit a shared model (docs/model.md)",
        description="Open the model NAME, wait until it has exchanged state with the peers "
        "holding it (at least --peers of them; without --peers, those found within one "
        "discovery timeout), apply --set and --delete in one transaction, "
        "print the model as JSON and exit; with --watch, print it again after every change "
        "(--json: one JSON object per line with the change and a digest of the state).",
    )
    model.add_argument("name", help="the model's name (a topic name)")
    model.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set KEY of the root map to VALUE (JSON if it parses, else the string)",
    )
    model.add_argument("--delete", action="append", default=[], metavar="KEY", help="delete KEY")
    model.add_argument("--peers", type=int, default=0, help="wait to be synced with this many")
    model.add_argument(
        "--timeout", type=float, help="seconds to wait for them (default: one discovery timeout)"
    )
    model.add_argument("--watch", action="store_true", help="print the model after each change")
    model.add_argument("--duration", type=float, help="with --watch: stop after this many seconds")
    model.add_argument("--json", action="store_true", help="one JSON object per line")
    model.set_defaults(run=_run_model)

    keygen = commands.add_parser(
        "keygen",
        help="print a new network key (for GLUE_NETWORK_KEY)",
        description="Print a new random network key on one line, in the form GLUE_NETWORK_KEY "
        "takes (32 bytes, base64url). Give the same key to every endpoint of the network, e.g. "
        "GLUE_NETWORK_KEY=$(glue keygen), or keep it in a file for GLUE_NETWORK_KEY_FILE "
        "(docs/security.md).",
    )
    keygen.set_defaults(run=_run_keygen, needs_settings=False)

    doctor = commands.add_parser(
        "doctor",
        help="check why nothing is discovered: settings, interface, multicast, rendezvous, peers",
        description="Run the checks a user needs when nothing is discovered, one line each: the "
        "settings in effect and where each came from, the interface chosen and why (MTU, "
        "datagram size), a multicast self-test on it (this process and a second one), each "
        "rendezvous target resolved and asked for an answer, the network key, and the peers "
        "seen within two discovery periods. Exit 0 when every check passes, 1 otherwise.",
    )
    doctor.add_argument(
        "--wait", type=float, help="seconds to listen for peers (default: two discovery periods)"
    )
    doctor.set_defaults(run=_run_doctor)

    demo = commands.add_parser(
        "demo",
        help="several endpoints discovering each other on 127.0.0.1",
        description="Start a rendezvous and several endpoint processes on 127.0.0.1 only (no "
        "multicast, nothing leaves this host) and narrate discovery, publish/subscribe, the "
        "removal of a killed endpoint, a late joiner served from history, a shared model "
        "converging, and the mesh surviving the loss of its rendezvous.",
    )
    demo.add_argument(
        "--nodes", type=int, default=3, help="endpoints besides the rendezvous (the last publishes)"
    )
    demo.add_argument("--rate-ms", type=int, default=500, help="announcement period")
    demo.set_defaults(run=_run_demo)

    bench = commands.add_parser(
        "bench",
        help="glue against raw UDP between two processes (run it in tools/isolated-net)",
        description="Measure glue's throughput (64 B, 64 KiB, 1 MiB messages) and round trip "
        "between two processes on 127.0.0.1, with the blocking and the asyncio API, direct sends "
        "and publish/subscribe, with and without a network key, next to raw UDP in the same "
        "rounds, and print the ratios with their range and the CPU time per message on each side.",
    )
    from glue import bench as bench_module  # its options (8 ms to import; runs nothing)

    bench_module.add_options(bench)
    bench.set_defaults(run=_run_bench, bench_parser=bench)
    return parser


def _expiry(text: str) -> float:
    """``--expiry``: what ``publish`` accepts (finite seconds in (0, 86400]), or a usage error."""
    from glue.manager import MAX_EXPIRY_S

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0.0 < value <= MAX_EXPIRY_S:  # (nan and inf fail here too)
        raise argparse.ArgumentTypeError(
            f"must be more than 0 and at most {MAX_EXPIRY_S:g} seconds, not {text}"
        )
    return value


def _run_bench(args: argparse.Namespace) -> int:
    from glue import bench

    if args.log_level is None:  # the benchmark's endpoints starting and stopping is noise here
        logging.getLogger("glue").setLevel(logging.WARNING)
    return bench.run(args, args.bench_parser)


def _run_peers(args: argparse.Namespace) -> int:
    return asyncio.run(_peers(args))


async def _peers(args: argparse.Namespace) -> int:
    async with AsyncEndpointManager.from_env() as endpoint:
        settings = endpoint.settings
        emit = _json_line if args.json else _text_line
        host, port = endpoint.data_address
        emit(
            "started", {"id": endpoint.endpoint_id, "name": endpoint.name, "data": f"{host}:{port}"}
        )
        if not args.watch:
            timeout = settings.discovery_rate_s * settings.discovery_rate_timeout_multiplier
            await _wait_quietly(args.wait if args.wait is not None else timeout)
            peers = await endpoint.peers()
            if args.json:
                for peer in peers:
                    _json_line("peer", _peer_fields(peer))
            else:
                _print_table(peers)
            return 0
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        tasks = [asyncio.create_task(_watch(endpoint, emit))]
        if args.subscribe:
            endpoint.subscribe(
                args.subscribe, args.type, lambda message: emit("message", _message_fields(message))
            )
        if args.publish:
            tasks.append(asyncio.create_task(_publish_counter(endpoint, args)))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), args.duration)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        emit("stopping", {"id": endpoint.endpoint_id, "name": endpoint.name})
    return 0


async def _watch(
    endpoint: AsyncEndpointManager, emit: Callable[[str, dict[str, Any]], None]
) -> None:
    async for event in endpoint.peer_events():
        match event:
            case PeerAdded(peer=peer):
                emit("added", _peer_fields(peer))
            case PeerRemoved(peer=peer, reason=reason):
                emit("removed", {**_peer_fields(peer), "reason": reason})


async def _publish_counter(endpoint: AsyncEndpointManager, args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    period = args.interval_ms / 1000.0
    number = 0
    next_at = loop.time()
    while True:
        number += 1
        await endpoint.publish_json(args.publish, args.type, {"n": number}, expiry=10 * period)
        next_at += period
        await asyncio.sleep(max(0.0, next_at - loop.time()))


def _message_fields(message: Message) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "topic": message.topic_name,
        "type": message.topic_type,
        "seq": message.sequence,
        "source": message.source_name,
        "source_id": message.source_id,
        "latency_ms": round((message.received_at - message.sent_at) * 1000, 3),
        "bytes": len(message.payload),
    }
    try:
        fields["payload"] = message.payload.decode()
    except UnicodeDecodeError:
        fields["payload_hex"] = message.payload[:64].hex()
    return fields


# --- glue model ----------------------------------------------------------------------------------


def _run_model(args: argparse.Namespace) -> int:
    return asyncio.run(_model(args))


async def _model(args: argparse.Namespace) -> int:
    from glue.modelsync import state_topic  # pycrdt only for this command

    edits = [_model_assignment(text) for text in args.set]
    async with AsyncEndpointManager.from_env() as endpoint:
        settings = endpoint.settings
        model = endpoint.model(args.name)
        timeout = args.timeout
        if timeout is None:
            timeout = settings.discovery_rate_s * settings.discovery_rate_timeout_multiplier
        if not args.peers:  # holders, if any, are known once discovery has found them
            with contextlib.suppress(TimeoutError):
                await endpoint.wait_for_subscribers(state_topic(args.name), timeout=timeout)
        try:
            synced = await model.wait_synced(timeout=timeout, peers=args.peers)
        except TimeoutError as exc:
            print(f"glue model: {exc}", file=sys.stderr)
            return 1
        if edits or args.delete:
            with model.transaction() as root:
                for key, value in edits:
                    root[key] = value
                for key in args.delete:
                    if key in root:
                        del root[key]

        def show(change: Any = None) -> None:
            snapshot = model.snapshot()
            if not args.json:
                print(orjson.dumps(snapshot, option=orjson.OPT_SORT_KEYS).decode(), flush=True)
                return
            fields: dict[str, Any] = {
                "name": args.name,
                "id": endpoint.endpoint_id,
                "synced": synced,
                "digest": _digest(snapshot),
                "snapshot": snapshot,
            }
            if change is not None:
                fields.update(local=change.local, source_id=change.source_id, keys=change.keys)
            _json_line("model", fields)

        show()
        if args.watch:
            loop = asyncio.get_running_loop()
            stop = asyncio.Event()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            model.on_change(show)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), args.duration)
        else:
            with contextlib.suppress(GlueError, TimeoutError):
                await model.flush(timeout=timeout)  # the edits reached the holders
        model.close()
        with contextlib.suppress(GlueError, TimeoutError):
            await endpoint.flush(timeout=timeout)  # (its last announcement, say)
    return 0


def _model_assignment(text: str) -> tuple[str, Any]:
    key, equals, value = text.partition("=")
    if not equals or not key:
        raise ConfigError(f"--set wants KEY=VALUE, not {text!r}")
    try:
        return key, orjson.loads(value)
    except orjson.JSONDecodeError:
        return key, value


def _digest(value: Any) -> str:
    return hashlib.sha256(orjson.dumps(value, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]


# --- glue sub / glue pub -------------------------------------------------------------------------


def _run_sub(args: argparse.Namespace) -> int:
    return asyncio.run(_sub(args))


async def _sub(args: argparse.Namespace) -> int:
    async with AsyncEndpointManager.from_env() as endpoint:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        received = 0

        async def show() -> None:
            nonlocal received
            async for message in endpoint.subscribe(args.pattern, args.type):
                if args.json:
                    _json_line("message", _message_fields(message))
                else:
                    text = message.payload.decode(errors="replace")
                    print(
                        f"{message.topic_name} [{message.source_name} #{message.sequence}] {text}"
                    )
                    sys.stdout.flush()
                received += 1
                if args.count and received >= args.count:
                    stop.set()
                    return

        task = asyncio.create_task(show())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), args.timeout)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    return 0 if not args.count or received >= args.count else 1


def _run_pub(args: argparse.Namespace) -> int:
    return asyncio.run(_pub(args))


#: Exit status of ``glue pub`` when no subscriber appeared (nothing was published).
EXIT_NO_SUBSCRIBER = 3


async def _pub(args: argparse.Namespace) -> int:
    payload = sys.stdin.buffer.read() if args.payload == "-" else args.payload.encode()
    async with AsyncEndpointManager.from_env() as endpoint:
        settings = endpoint.settings
        if not args.no_wait and args.wait_for_subscribers > 0:
            timeout = args.timeout
            if timeout is None:
                timeout = settings.discovery_rate_s * settings.discovery_rate_timeout_multiplier
            try:
                await endpoint.wait_for_subscribers(
                    args.topic, args.wait_for_subscribers, timeout=timeout
                )
            except TimeoutError:
                print(
                    f"glue pub: no subscriber to {args.topic!r} within {timeout:g} s: nothing "
                    "published (--timeout to wait longer, --no-wait to publish anyway)",
                    file=sys.stderr,
                )
                return EXIT_NO_SUBSCRIBER
        await endpoint.publish(
            args.topic,
            args.type,
            payload,
            expiry=args.expiry,
            history_depth=args.history_depth,
        )
        try:
            await endpoint.flush(timeout=args.expiry)
        except TimeoutError:
            raise TimeoutError(
                f"not acknowledged by every subscriber within its expiry ({args.expiry:g} s)"
            ) from None
        if args.linger:
            await asyncio.sleep(args.linger)  # serving late joiners from history meanwhile
    return 0


async def _wait_quietly(seconds: float) -> None:
    # Listening for a window is what `glue peers` is for: every live peer announces within it.
    await asyncio.sleep(seconds)


def _peer_fields(peer: Peer) -> dict[str, Any]:
    return {
        "id": peer.endpoint_id,
        "name": peer.name,
        "address": f"{peer.host}:{peer.port}",
        "incarnation": peer.incarnation,
        "rate_ms": round(peer.rate_s * 1000),
    }


def _json_line(event: str, fields: dict[str, Any]) -> None:
    line = orjson.dumps({"event": event, "time": time.time(), **fields})
    sys.stdout.write(line.decode() + "\n")
    sys.stdout.flush()


def _text_line(event: str, fields: dict[str, Any]) -> None:
    details = " ".join(f"{key}={value}" for key, value in fields.items())
    print(f"{time.strftime('%H:%M:%S')} {event:8} {details}", flush=True)


def _print_table(peers: list[Peer]) -> None:
    if not peers:
        print("no peers seen")
        return
    print(f"{'NAME':40} {'ID':>17} {'ADDRESS':21} RATE")
    for peer in peers:
        address = f"{peer.host}:{peer.port}"
        print(f"{peer.name:40} {peer.endpoint_id:>17} {address:21} {peer.rate_s * 1000:.0f} ms")


# --- glue keygen ---------------------------------------------------------------------------------


def _run_keygen(args: argparse.Namespace) -> int:
    from glue.security import generate_key

    print(generate_key())
    return 0


# --- glue doctor ---------------------------------------------------------------------------------


def _run_doctor(args: argparse.Namespace) -> int:
    return asyncio.run(_doctor(args))


async def _doctor(args: argparse.Namespace) -> int:
    from glue import doctor  # only when asked

    checks = []
    async for check in doctor.run_checks(wait_s=args.wait):
        checks.append(check)
        print(doctor.format_check(check), flush=True)
    failed, warned = doctor.verdicts(checks)
    if failed or warned:
        print(f"\nglue doctor: {failed} failed, {warned} warnings (-> what to do)")
        return 1
    print("\nglue doctor: every check passed")
    return 0


# --- glue demo -----------------------------------------------------------------------------------


class _Node:
    """One endpoint process of the demo, running ``glue peers --watch --json`` (+ topics)."""

    def __init__(
        self,
        label: str,
        env: dict[str, str],
        board: _Board,
        *extra: str,
        command: Sequence[str] = ("peers", "--watch", "--json"),
    ) -> None:
        self.label = label
        self.endpoint_id = int(env["GLUE_ENDPOINT_ID"])
        self.process = subprocess.Popen(
            [sys.executable, "-m", "glue", "--log-level", "WARNING", *command, *extra],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, args=(board,), daemon=True)
        self._reader.start()

    def _read(self, board: _Board) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with contextlib.suppress(orjson.JSONDecodeError):
                board.record(self, orjson.loads(line))

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        self.process.wait(timeout=10)


class _Board:
    """What each demo node reports seeing, with a condition to wait on."""

    def __init__(self, out: TextIO, labels: dict[int, str]) -> None:
        self.out = out
        self.labels = labels
        self.seen: dict[str, set[int]] = {}
        self.received: dict[str, list[dict[str, Any]]] = {}
        self.models: dict[str, dict[str, Any]] = {}  # each model node's last state
        self.changed = threading.Condition()
        self.started = time.monotonic()
        self.quiet = False

    def record(self, node: _Node, message: dict[str, Any]) -> None:
        event = message.get("event")
        with self.changed:
            seen = self.seen.setdefault(node.label, set())
            other = self.labels.get(message.get("id", 0), message.get("name", "?"))
            if event == "added":
                seen.add(message["id"])
                self._say(f"{node.label:12} discovered {other}")
            elif event == "removed":
                seen.discard(message["id"])
                self._say(f"{node.label:12} lost       {other} ({message.get('reason')})")
            elif event == "model":
                self.models[node.label] = message
                change = "" if "keys" not in message else f" after a change of {message['keys']}"
                self._say(
                    f"{node.label:12} model {message['name']} {message['digest']}{change}: "
                    f"{orjson.dumps(message['snapshot'], option=orjson.OPT_SORT_KEYS).decode()}"
                )
            elif event == "message":
                got = self.received.setdefault(node.label, [])
                got.append(message)
                if len(got) == 1:
                    self._say(
                        f"{node.label:12} received   {message['topic']} #{message['seq']} "
                        f"{message.get('payload', '')} from {message['source']} "
                        f"({message['latency_ms']:.2f} ms after it was published)"
                    )
            self.changed.notify_all()

    def wait(self, predicate: Callable[[], bool], timeout: float) -> bool:
        with self.changed:
            return self.changed.wait_for(predicate, timeout)

    def knows(self, label: str, ids: set[int]) -> bool:
        return ids <= self.seen.get(label, set())

    def model_digests(self, labels: list[str]) -> set[str | None]:
        return {self.models.get(label, {}).get("digest") for label in labels}

    def count(self, label: str) -> int:
        return len(self.received.get(label, []))

    def in_order(self, label: str) -> bool:
        """Whether each publisher's messages on each topic came in order, with no gap."""
        streams: dict[tuple[str, str], list[int]] = {}
        for message in self.received.get(label, []):
            streams.setdefault((message["topic"], message["source"]), []).append(message["seq"])
        return all(
            b == a + 1 for sequences in streams.values() for a, b in itertools.pairwise(sequences)
        )

    def _say(self, text: str) -> None:
        if self.quiet:
            return
        print(f"[{time.monotonic() - self.started:6.2f}s] {text}", file=self.out, flush=True)


def _run_demo(args: argparse.Namespace) -> int:
    if args.nodes < 3:
        raise ConfigError("glue demo needs --nodes 3 or more")
    rate_ms = args.rate_ms
    timeout_s = rate_ms / 1000 * 2.0
    port = _free_udp_port()
    base = {key: value for key, value in os.environ.items() if not key.startswith("GLUE_")}
    common = {
        **base,
        "GLUE_LISTEN_INTERFACE": "lo",
        "GLUE_LISTEN_ADDRESS": "127.0.0.1:0",
        "GLUE_DISCOVERY_RATE_MILLISECONDS": str(rate_ms),
        "GLUE_DISCOVERY_RATE_TIMEOUT_MULTIPLIER": "2.0",
        "PYTHONUNBUFFERED": "1",
    }
    labels = {
        1: "rendezvous",
        **{100 + n: f"node-{n}" for n in range(1, args.nodes + 1)},
        999: "late-joiner",
        **{200 + n: f"model-{n}" for n in range(1, 5)},
        300: "keeper",
        301: "sensor",
        302: "reader",
    }
    board = _Board(sys.stdout, labels)
    print(
        f"glue demo: a rendezvous on 127.0.0.1:{port} and {args.nodes} endpoints, announcing every "
        f"{rate_ms} ms; node-{args.nodes} publishes a counter on demo/counter every 200 ms, the "
        "others subscribe to demo/#.\nAll traffic stays on 127.0.0.1 (unicast only).\n"
    )

    def start(
        endpoint_id: int,
        *extra: str,
        command: Sequence[str] = ("peers", "--watch", "--json"),
        **glue: str,
    ) -> _Node:
        env = {**common, "GLUE_ENDPOINT_ID": str(endpoint_id), **glue}
        env["GLUE_ENDPOINT_NAME"] = labels[endpoint_id]
        return _Node(labels[endpoint_id], env, board, *extra, command=command)

    rendezvous = start(
        1, GLUE_DISCOVERY_TARGET_ADDRESS="0", GLUE_DISCOVERY_LISTEN_ADDRESS=f"127.0.0.1:{port}"
    )
    node_env = {
        "GLUE_DISCOVERY_TARGET_ADDRESS": f"127.0.0.1:{port}",
        "GLUE_DISCOVERY_LISTEN_ADDRESS": "0",
    }
    subscribe = ("--subscribe", "demo/#")
    nodes = [start(100 + n, *subscribe, **node_env) for n in range(1, args.nodes)]
    publisher = start(100 + args.nodes, "--publish", "demo/counter", **node_env)
    everyone = [rendezvous, *nodes, publisher]
    try:
        ids = {node.endpoint_id for node in everyone}
        t0 = time.monotonic()
        if not board.wait(
            lambda: all(board.knows(n.label, ids - {n.endpoint_id}) for n in everyone), timeout=10
        ):
            print("\nglue demo: FAILED, the endpoints did not all meet within 10 s")
            return 1
        print(
            f"\n==> all {len(everyone)} endpoints know each other "
            f"({time.monotonic() - t0:.2f} s after start)\n"
        )
        if not board.wait(lambda: all(board.count(n.label) >= 5 for n in nodes), timeout=10):
            print("\nglue demo: FAILED, the subscribers did not receive the counter")
            return 1
        print(
            "\n==> every subscriber receives the counter from when it subscribed, in order and "
            "once each (earlier numbers were published before anyone listened)\n"
        )

        victim, survivors = nodes[0], nodes[1:]
        print(
            f"==> kill -9 {victim.label}: the others drop it once it has been silent for "
            f"{timeout_s:.1f} s, counted from its last announcement (so at most {timeout_s:.1f} s "
            "after the kill)\n"
        )
        victim.stop(signal.SIGKILL)
        t0 = time.monotonic()
        if not board.wait(
            lambda: all(
                victim.endpoint_id not in board.seen[n.label]
                for n in [rendezvous, *survivors, publisher]
            ),
            timeout=timeout_s + 5,
        ):
            print("\nglue demo: FAILED, the killed endpoint was not removed")
            return 1
        print(f"\n==> removed {time.monotonic() - t0:.2f} s after the kill\n")

        print("==> a late joiner subscribes: it gets the latest counter from history at once\n")
        late = start(999, *subscribe, **node_env)
        everyone.append(late)
        if not board.wait(lambda: board.count(late.label) >= 3, timeout=10):
            print("\nglue demo: FAILED, the late joiner received nothing")
            return 1

        # Every demo/# subscriber so far (survivors and the late joiner), and the keeper.
        if not _demo_keeper(start, board, node_env, subscribers=len(survivors) + 2):
            return 1

        if not _demo_model(start, board, node_env):
            return 1

        print(
            "\n==> stop the rendezvous: the remaining endpoints announce to each other directly\n"
        )
        rendezvous.stop()
        remaining = [*survivors, publisher, late]
        remaining_ids = {n.endpoint_id for n in remaining}
        counts = {n.label: board.count(n.label) for n in [*survivors, late]}
        board.wait(lambda: False, timeout=3 * timeout_s)
        intact = all(board.knows(n.label, remaining_ids - {n.endpoint_id}) for n in remaining)
        flowing = all(board.count(label) > count for label, count in counts.items())
        ordered = all(board.in_order(n.label) for n in [*survivors, late])
        print(
            f"\n==> {3 * timeout_s:.1f} s later the mesh is {'intact' if intact else 'BROKEN'} "
            f"and messages {'still flow' if flowing else 'STOPPED'}"
            f"{', in order, no gaps' if ordered else ', WITH GAPS'}: "
            + ", ".join(f"{label} got {board.count(label)}" for label in counts)
            + "\n"
        )
        return 0 if intact and flowing and ordered else 1
    finally:
        board.quiet = True
        for node in everyone:
            node.stop()


def _demo_keeper(
    start: Callable[..., _Node], board: _Board, node_env: dict[str, str], *, subscribers: int
) -> bool:
    """A sensor publishes a retained reading and exits; a keeper serves it to a later reader.
    ``subscribers``: the endpoints taking demo/status, keeper included, that the sensor waits for.
    """
    print(
        "\n==> a history keeper (docs/history.md): 'keeper' keeps demo/status "
        "(GLUE_HISTORY_KEEP); 'sensor' publishes one reading there and exits\n"
    )
    keeper = start(300, GLUE_HISTORY_KEEP="demo/status=5", **node_env)
    started = [keeper]
    try:
        sensor = start(
            301,
            "demo/status",
            "boiler at 71.5 C",
            "--type",
            "demo",
            "--expiry",
            "600",
            "--history-depth",
            "5",
            "--wait-for-subscribers",
            str(subscribers),
            "--timeout",
            "10",
            command=("pub",),
            **node_env,
        )
        started.append(sensor)
        try:
            sensor.process.wait(timeout=15)  # published, acknowledged, gone
        except subprocess.TimeoutExpired:
            print("\nglue demo: FAILED, the sensor did not publish within 15 s")
            return False
        if sensor.process.returncode != 0:
            print(f"\nglue demo: FAILED, glue pub exited with {sensor.process.returncode}")
            return False
        print("==> the sensor has exited; a new reader subscribes to demo/status\n")
        reader = start(302, "--subscribe", "demo/status", **node_env)
        started.append(reader)
        if not board.wait(lambda: board.count(reader.label) >= 1, timeout=10):
            print("\nglue demo: FAILED, the reader got nothing from the keeper")
            return False
        got = board.received[reader.label][0]
        print(
            f"\n==> the reader got the reading the exited sensor published ({got['topic']} "
            f"#{got['seq']} from {got['source']}: {got.get('payload', '')!r}), served by the "
            "keeper under the sensor's name\n"
        )
        return bool(got["source"] == "sensor")
    finally:
        for node in reversed(started):  # the reader first: the keeper owes it nothing then
            node.stop()


def _demo_model(start: Callable[..., _Node], board: _Board, node_env: dict[str, str]) -> bool:
    """Three processes edit one model at once and converge; a fourth, started later, too."""
    print(
        "\n==> a shared model (docs/model.md): three new endpoints open demo/config at once; "
        "each adds a key of its own and sets 'mode', all three concurrently\n"
    )
    # (--timeout: the processes start at once and take a while to import, find each other)
    watch = ("model", "demo/config", "--watch", "--json", "--timeout", "10")
    editors = [
        start(
            200 + n,
            "--set",
            f'model-{n}={{"rate": {n * 5}}}',
            "--set",
            f"mode=set by model-{n}",
            command=(*watch, "--peers", "2"),
            **node_env,
        )
        for n in range(1, 4)
    ]
    labels = [node.label for node in editors]
    t0 = time.monotonic()
    try:

        def agreed(labels: list[str]) -> bool:
            digests = board.model_digests(labels)
            snapshot = board.models.get(labels[0], {}).get("snapshot", {})
            return len(digests) == 1 and None not in digests and len(snapshot) == 4

        if not board.wait(lambda: agreed(labels), timeout=15):
            print("\nglue demo: FAILED, the model replicas did not converge")
            return False
        winner = board.models[labels[0]]["snapshot"]["mode"]
        print(
            f"\n==> the three replicas agree ({time.monotonic() - t0:.2f} s after they started, "
            f"imports included): every key is there, and the concurrent writes of 'mode' ended "
            f"with the same winner everywhere ({winner!r})\n"
        )
        print("==> a fourth endpoint opens the model later: it pulls the state, once\n")
        late = start(204, command=(*watch, "--peers", "3"), **node_env)
        editors.append(late)
        if not board.wait(lambda: agreed([*labels, late.label]), timeout=15):
            print("\nglue demo: FAILED, the late model replica did not converge")
            return False
        print("\n==> the fourth replica holds the same state\n")
        return True
    finally:
        for node in editors:
            node.stop()


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
