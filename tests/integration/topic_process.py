"""A topics endpoint process for integration tests, driven by JSON lines on stdin.

Run as ``python -m tests.integration.topic_process`` (configured by ``GLUE_*`` variables). It prints
``{"event": "started", "id": ..., "name": ...}``, then one JSON line per reply and per message a
subscription of it receives. Commands (each may carry an ``"id"``, echoed as ``"reply"``):

- ``{"op": "subscribe", "pattern": p, "type": t}`` -> ``{"event": "subscribed"}``
- ``{"op": "publish", "topic": t, "type": y, "count": n, "large_every": k, "history_depth": d,
  "expiry": s}`` -> ``{"event": "published", "first": sequence, "digests": [...]}``: message *i*
  is ``b"<i>:"`` plus random bytes, 64 KiB when *i* is a multiple of ``k`` (fragmented), else 200 B
- ``{"op": "wait_peers", "count": n, "timeout": s}`` -> ``{"event": "peers", "ids": [...]}``
- ``{"op": "peers"}`` -> ``{"event": "peers", "ids": [...]}`` (known now)
- ``{"op": "counters"}`` -> ``{"event": "counters", "counters": {...}, "peers": {id: {...}}}``
- ``{"op": "stop"}`` or end of input: stop the endpoint and exit.

Each received message: ``{"event": "message", "topic", "type", "sequence", "source", "size",
"digest"}``; the digest is the first 16 hex digits of the payload's SHA-256.

:class:`TopicProcess` starts one (optionally under a command prefix such as ``nsenter``) and
collects its lines.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import os
import subprocess
import sys
import tempfile
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import orjson

LARGE_BYTES = 64 * 1024
SMALL_BYTES = 200


def digest(payload: bytes) -> str:
    """What both sides compare: the first 16 hex digits of SHA-256."""
    return hashlib.sha256(payload).hexdigest()[:16]


def main() -> None:
    from glue import EndpointManager, Message

    lock = threading.Lock()

    def write(line: dict[str, Any]) -> None:
        data = orjson.dumps(line, option=orjson.OPT_NON_STR_KEYS) + b"\n"
        with lock:
            sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()

    def on_message(message: Message) -> None:
        write(
            {
                "event": "message",
                "topic": message.topic_name,
                "type": message.topic_type,
                "sequence": message.sequence,
                "source": message.source_id,
                "size": len(message.payload),
                "digest": digest(message.payload),
            }
        )

    published: Counter[str] = Counter()

    def handle(endpoint: EndpointManager, op: str, command: dict[str, Any]) -> dict[str, Any]:
        if op == "subscribe":
            endpoint.subscribe(command["pattern"], command["type"], on_message)
            return {"event": "subscribed"}
        if op == "publish":
            topic = command["topic"]
            large_every = command.get("large_every", 0)
            first = published[topic] + 1
            digests = []
            for number in range(1, command["count"] + 1):
                size = LARGE_BYTES if large_every and number % large_every == 0 else SMALL_BYTES
                payload = b"%d:" % number + os.urandom(size)
                endpoint.publish(
                    topic,
                    command["type"],
                    payload,
                    expiry=command.get("expiry", 30.0),
                    history_depth=command.get("history_depth"),
                    timeout=10.0,
                )
                published[topic] += 1
                digests.append(digest(payload))
            return {"event": "published", "first": first, "digests": digests}
        if op == "wait_peers":
            peers = endpoint.wait_for_peers(command["count"], timeout=command["timeout"])
            return {"event": "peers", "ids": [p.endpoint_id for p in peers]}
        if op == "peers":
            return {"event": "peers", "ids": [p.endpoint_id for p in endpoint.peers()]}
        if op == "counters":
            counters, peers = endpoint.counters(), endpoint.peer_counters()
            return {"event": "counters", "counters": counters, "peers": peers}
        return {"event": "error", "error": f"unknown op {op!r}"}

    with EndpointManager.from_env() as endpoint:
        write({"event": "started", "id": endpoint.endpoint_id, "name": endpoint.name})
        for raw in sys.stdin.buffer:
            command = orjson.loads(raw)
            if command["op"] == "stop":
                break
            try:
                reply = handle(endpoint, command["op"], command)
            except Exception as exc:  # reported to the test, which fails with it
                reply = {"event": "error", "error": repr(exc)}
            write({"reply": command.get("id"), **reply})
    write({"event": "stopped"})


class TopicProcess:
    """One ``topic_process`` child; records its lines, answers requests, stops on ``close``."""

    def __init__(self, prefix: Sequence[str] = (), **glue: str | int) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GLUE_")}
        env["PYTHONUNBUFFERED"] = "1"
        env.update({f"GLUE_{key.upper()}": str(value) for key, value in glue.items()})
        self.stderr = tempfile.TemporaryFile(mode="w+")
        # Append mode: reading it moves the offset the child shares; the child must not then
        # overwrite earlier lines.
        flags = fcntl.fcntl(self.stderr.fileno(), fcntl.F_GETFL)
        fcntl.fcntl(self.stderr.fileno(), fcntl.F_SETFL, flags | os.O_APPEND)
        self.process = subprocess.Popen(
            [*prefix, sys.executable, "-m", "tests.integration.topic_process"],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
        )
        self.lines: list[dict[str, Any]] = []
        self._changed = threading.Condition()
        self._ids = itertools.count(1)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        started = self.wait_for(lambda: any(e["event"] == "started" for e in self.lines), 20)
        assert started, f"topic process did not start:\n{self.log()}"
        info = next(e for e in self.lines if e["event"] == "started")
        self.endpoint_id: int = info["id"]
        self.name: str = info["name"]

    def _read(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            line = orjson.loads(raw)
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait until ``predicate`` holds (re-checked on every line), at most ``timeout`` s."""
        with self._changed:
            return self._changed.wait_for(predicate, timeout)

    def request(self, op: str, *, wait: float = 30.0, **fields: Any) -> dict[str, Any]:
        """Send one command and return its reply."""
        request_id = next(self._ids)
        assert self.process.stdin is not None
        self.process.stdin.write(orjson.dumps({"op": op, "id": request_id, **fields}) + b"\n")
        self.process.stdin.flush()

        def replied() -> dict[str, Any] | None:
            return next((e for e in self.lines if e.get("reply") == request_id), None)

        assert self.wait_for(lambda: replied() is not None, wait), (
            f"no reply to {op} within {wait} s:\n{self.log()}"
        )
        reply = replied()
        assert reply is not None
        assert reply["event"] != "error", reply
        return reply

    def messages(self, topic: str | None = None) -> list[dict[str, Any]]:
        """The messages received so far (on ``topic``, if given), in arrival order."""
        with self._changed:
            return [
                e
                for e in self.lines
                if e["event"] == "message" and (topic is None or e["topic"] == topic)
            ]

    def counters(self) -> tuple[dict[str, int], dict[int, dict[str, int]]]:
        """The endpoint's counters and its per-peer counters (peer ids as ints)."""
        reply = self.request("counters")
        return reply["counters"], {int(k): v for k, v in reply["peers"].items()}

    def log(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read()[-5000:]

    def close(self) -> None:
        """Ask it to stop; terminate, then kill it if it does not."""
        stdin = self.process.stdin
        if stdin is not None:
            if self.process.poll() is None:
                with contextlib.suppress(BrokenPipeError):
                    stdin.write(b'{"op": "stop"}\n')
            with contextlib.suppress(BrokenPipeError):
                stdin.close()
        try:
            self.process.wait(timeout=10)
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


if __name__ == "__main__":
    main()
