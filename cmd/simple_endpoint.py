"""A port of the Go reference's ``cmd/simple_endpoint``: one endpoint, configured by GLUE_*.

Every endpoint subscribes to ``--topic-name`` and logs each message it receives with its
sequence number, size and latency, and every gap in a publisher's sequence (messages that
expired before they could be delivered). With ``--send-messages`` it also publishes a random
64 KiB payload every 50 ms with a 50 ms expiry, as the reference does.

The reference's two scenarios, each command in its own terminal (add ``GLUE_LISTEN_INTERFACE``
to choose the interface; multicast needs one that carries it):

    # 3 subscribers and 1 publisher on multicast
    python cmd/simple_endpoint.py
    python cmd/simple_endpoint.py
    python cmd/simple_endpoint.py
    python cmd/simple_endpoint.py --send-messages

    # the same through a unicast rendezvous (no multicast needed)
    GLUE_DISCOVERY_TARGET_ADDRESS=0 GLUE_DISCOVERY_LISTEN_ADDRESS=127.0.0.1:27320 \\
        python cmd/simple_endpoint.py
    GLUE_DISCOVERY_TARGET_ADDRESS=127.0.0.1:27320 GLUE_DISCOVERY_LISTEN_ADDRESS=0 \\
        python cmd/simple_endpoint.py        # x3, then once more with --send-messages

It serves with ``endpoint.run_forever()``: SIGTERM or SIGINT (``docker stop``, Ctrl-C) stops it
with a goodbye, so its peers see it leave at once, then it prints a last summary.

Output lines are ``key=value`` pairs, easy to grep (the compose tests read them):
``event=received topic=... seq=... source=... bytes=... latency_ms=...``, ``event=gap ...``,
``event=peer_added ...``, ``event=published ...`` and a ``event=summary`` every 5 s.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
import time
from typing import Any

from glue import ConfigError, EndpointManager, GlueError, Message, Peer, UsageError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="simple_endpoint",
        description="Subscribe to a topic and log what arrives; optionally publish to it too.",
    )
    parser.add_argument("--send-messages", "-sendMessages", action="store_true")
    parser.add_argument("--topic-name", "-topicName", default="some_topic")
    parser.add_argument("--topic-type", default="some_type")
    parser.add_argument("--size", type=int, default=64 * 1024, help="payload bytes")
    parser.add_argument("--interval-ms", type=float, default=50.0, help="time between messages")
    parser.add_argument("--expiry-ms", type=float, default=50.0, help="expiry of each message")
    parser.add_argument(
        "--count", type=int, default=0, help="stop publishing after this many (0: never)"
    )
    parser.add_argument(
        "--duration", type=float, default=0.0, help="exit after this many seconds (0: never)"
    )
    parser.add_argument(
        "--history-depth",
        type=int,
        default=None,
        help="messages kept for late joiners (default: GLUE_HISTORY_DEPTH)",
    )
    parser.add_argument("--quiet", action="store_true", help="log only gaps and summaries")
    return parser


class Receiver:
    """Logs each message and each sequence gap, per publisher."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.received = 0
        self.gaps = 0
        self.missed = 0
        self._last: dict[int, int] = {}
        self._lock = threading.Lock()

    def __call__(self, message: Message) -> None:
        latency_ms = (message.received_at - message.sent_at) * 1000.0
        with self._lock:
            self.received += 1
            last = self._last.get(message.source_id)
            self._last[message.source_id] = message.sequence
            if last is not None and message.sequence > last + 1:
                missed = message.sequence - last - 1
                self.gaps += 1
                self.missed += missed
                _emit(
                    event="gap",
                    topic=message.topic_name,
                    source=message.source_name,
                    missed=missed,
                    first=last + 1,
                    last=message.sequence - 1,
                )
        if not self.quiet:
            _emit(
                event="received",
                topic=message.topic_name,
                type=message.topic_type,
                seq=message.sequence,
                source=message.source_name,
                bytes=len(message.payload),
                latency_ms=f"{latency_ms:.3f}",
            )


def _emit(**fields: Any) -> None:
    line = " ".join(f"{key}={value}" for key, value in fields.items())
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    level = os.environ.get("GLUE_LOG_LEVEL", "INFO").upper()
    logging.basicConfig(
        level=level if level in logging.getLevelNamesMapping() else "INFO",
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        endpoint = EndpointManager.from_env()
    except ConfigError as exc:
        print(f"simple_endpoint: {exc}", file=sys.stderr)
        return 2
    receiver = Receiver(args.quiet)
    # Before start: a rendezvous answers at once, so peers may be met during start itself.
    endpoint.on_peer_added(lambda p: _peer("peer_added", p))
    endpoint.on_peer_removed(lambda p: _peer("peer_removed", p))
    try:
        endpoint.start()
    except GlueError as exc:
        print(f"simple_endpoint: {exc}", file=sys.stderr)
        return 2
    _emit(
        event="started",
        name=endpoint.name,
        id=endpoint.endpoint_id,
        address="{}:{}".format(*endpoint.data_address),
        topic=args.topic_name,
        publisher=args.send_messages,
    )
    endpoint.subscribe(args.topic_name, args.topic_type, receiver)
    done = threading.Event()
    counts = {"sent": 0, "peers": 0}
    worker = threading.Thread(
        target=_work, args=(endpoint, args, receiver, counts, done), name="simple-endpoint"
    )
    worker.start()
    try:
        # Until SIGTERM or SIGINT (or --duration): then stopped, goodbye sent, so peers see
        # this endpoint leave at once.
        endpoint.run_forever(timeout=args.duration or None)
    finally:
        done.set()
        worker.join()
        endpoint.stop()
    _summary(counts, receiver)
    return 0


def _work(
    endpoint: EndpointManager,
    args: argparse.Namespace,
    receiver: Receiver,
    counts: dict[str, int],
    done: threading.Event,
) -> None:
    """Publish at the configured pace (with --send-messages) and print a summary every 5 s,
    until ``done``."""
    started = time.monotonic()
    next_summary = started + 5.0
    next_send = started
    while not done.is_set():
        now = time.monotonic()
        sending = args.send_messages and (not args.count or counts["sent"] < args.count)
        try:
            if sending and now >= next_send:
                counts["sent"] += _publish(endpoint, args)
                next_send += args.interval_ms / 1000.0
                if next_send < now:  # fell behind (a slow machine): do not burst to catch up
                    next_send = now + args.interval_ms / 1000.0
            if now >= next_summary:
                counts["peers"] = len(endpoint.peers())
                _summary(counts, receiver)
                next_summary += 5.0
        except UsageError:  # stopped under us (a signal): the main thread reports the end
            return
        wait = next_summary - now
        if sending:
            wait = min(wait, next_send - now)
        done.wait(max(0.0, wait))


def _publish(endpoint: EndpointManager, args: argparse.Namespace) -> int:
    payload = os.urandom(args.size)
    try:
        endpoint.publish(
            args.topic_name,
            args.topic_type,
            payload,
            expiry=args.expiry_ms / 1000.0,
            history_depth=args.history_depth,
            timeout=args.interval_ms / 1000.0,
        )
    except UsageError:
        raise  # stopped (a signal): the caller ends
    except GlueError as exc:  # e.g. BackpressureError: a subscriber is not keeping up
        _emit(event="publish_failed", error=type(exc).__name__)
        return 0
    _emit(event="published", topic=args.topic_name, bytes=len(payload))
    return 1


def _peer(event: str, peer: Peer) -> None:
    _emit(event=event, name=peer.name, id=peer.endpoint_id, address=f"{peer.host}:{peer.port}")


def _summary(counts: dict[str, int], receiver: Receiver) -> None:
    _emit(
        event="summary",
        peers=counts["peers"],
        published=counts["sent"],
        received=receiver.received,
        gaps=receiver.gaps,
        missed=receiver.missed,
    )


if __name__ == "__main__":
    sys.exit(main())
