"""A glue endpoint running in one LAN host, driven by JSON lines on stdin.

Run as ``ip netns exec <host> python -m tests.multihost.host_process`` (configured by ``GLUE_*``
variables). Like ``tests/integration/topic_process.py``, but every line it prints is stamped
with ``time.monotonic()`` (``"t"``; CLOCK_MONOTONIC is one clock for every network namespace, so
the test compares it with its own) and it reports peer events, which is what the LAN tests time.

Lines printed: ``{"event": "started", "id", "name", "t"}``; ``{"event": "peer_added" |
"peer_removed", "peer": id, "host": ip, "t"}``; ``{"event": "message", "topic", "sequence",
"source", "digest", "t"}``; replies ``{"reply": id, ...}``. Commands (``"id"`` echoed as
``"reply"``):

- ``{"op": "subscribe", "pattern": p, "type": t}``
- ``{"op": "publish", "topic": t, "type": y, "count": n, "large_every": k, "history_depth": d,
  "expiry": s}`` -> ``{"published": [digest, ...], "first": sequence}``; message *i* is ``b"<i>:"``
  plus 200 random bytes, or 64 KiB (fragmented) when *i* is a multiple of ``k``
- ``{"op": "wait_subscribers", "topic": t, "count": n, "timeout": s}`` -> ``{"peers": [id, ...]}``
- ``{"op": "peers"}`` -> ``{"peers": {id: ip}}``; ``{"op": "counters"}`` -> ``{"counters": {...},
  "peer_counters": {id: {...}}}``; ``{"op": "stop"}`` or end of input: stop and exit.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import logging
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import orjson

REPO = Path(__file__).resolve().parents[2]
SMALL_BYTES = 200
LARGE_BYTES = 64 * 1024


def digest(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()[:16]


def main() -> None:
    from glue import EndpointManager, Message, Peer

    # glue's warnings and (with GLUE_LOG_LEVEL=INFO) its choices, on stderr for the test to read.
    logging.basicConfig(
        level=os.environ.get("GLUE_LOG_LEVEL", "WARNING"),
        format="%(levelname)s %(name)s: %(message)s",
    )

    lock = threading.Lock()

    def write(line: dict[str, Any]) -> None:
        data = orjson.dumps({**line, "t": time.monotonic()}, option=orjson.OPT_NON_STR_KEYS)
        with lock:
            sys.stdout.buffer.write(data + b"\n")
            sys.stdout.buffer.flush()

    def on_message(message: Message) -> None:
        write(
            {
                "event": "message",
                "topic": message.topic_name,
                "sequence": message.sequence,
                "source": message.source_id,
                "digest": digest(message.payload),
            }
        )

    def on_peer(event: str) -> Callable[[Peer], None]:
        return lambda peer: write({"event": event, "peer": peer.endpoint_id, "host": peer.host})

    published: Counter[str] = Counter()

    def handle(endpoint: EndpointManager, op: str, command: dict[str, Any]) -> dict[str, Any]:
        if op == "subscribe":
            endpoint.subscribe(command["pattern"], command["type"], on_message)
            return {}
        if op == "publish":
            topic, large_every = command["topic"], command.get("large_every", 0)
            first, digests = published[topic] + 1, []
            for number in range(1, command["count"] + 1):
                size = LARGE_BYTES if large_every and number % large_every == 0 else SMALL_BYTES
                payload = b"%d:" % number + os.urandom(size)
                endpoint.publish(
                    topic,
                    command["type"],
                    payload,
                    expiry=command.get("expiry", 60.0),
                    history_depth=command.get("history_depth"),
                    timeout=20.0,
                )
                published[topic] += 1
                digests.append(digest(payload))
            return {"published": digests, "first": first}
        if op == "wait_subscribers":
            peers = endpoint.wait_for_subscribers(
                command["topic"], command["count"], timeout=command["timeout"]
            )
            return {"peers": [p.endpoint_id for p in peers]}
        if op == "peers":
            return {"peers": {p.endpoint_id: p.host for p in endpoint.peers()}}
        if op == "counters":
            return {"counters": endpoint.counters(), "peer_counters": endpoint.peer_counters()}
        raise ValueError(f"unknown op {op!r}")

    endpoint = EndpointManager.from_env()
    # Before start: a peer met in the first milliseconds must not be missed.
    endpoint.on_peer_added(on_peer("peer_added"))
    endpoint.on_peer_removed(on_peer("peer_removed"))
    with endpoint:
        write({"event": "started", "id": endpoint.endpoint_id, "name": endpoint.name})
        for raw in sys.stdin.buffer:
            command = orjson.loads(raw)
            if command["op"] == "stop":
                break
            try:
                reply = {"event": "reply", **handle(endpoint, command["op"], command)}
            except Exception as exc:  # reported to the test, which fails with it
                reply = {"event": "error", "error": repr(exc)}
            write({"reply": command.get("id"), **reply})
    write({"event": "stopped"})


class HostProcess:
    """One ``host_process`` child started with ``prefix`` (e.g. ``ip netns exec <host>``).

    Starting does not wait: call :meth:`wait_started` (start several, then wait for all)."""

    def __init__(self, prefix: Sequence[str], label: str, **glue: str | int | float) -> None:
        self.label = label
        env = {k: v for k, v in os.environ.items() if not k.startswith("GLUE_")}
        env["PYTHONUNBUFFERED"] = "1"
        env.update({f"GLUE_{key.upper()}": str(value) for key, value in glue.items()})
        self.stderr = tempfile.TemporaryFile(mode="w+")
        # Append mode: reading it moves the offset the child shares; the child must not then
        # overwrite earlier lines.
        flags = fcntl.fcntl(self.stderr.fileno(), fcntl.F_GETFL)
        fcntl.fcntl(self.stderr.fileno(), fcntl.F_SETFL, flags | os.O_APPEND)
        self.process = subprocess.Popen(
            [*prefix, sys.executable, "-m", "tests.multihost.host_process"],
            cwd=REPO,
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
        self.endpoint_id = 0
        self.started_at = 0.0

    def __repr__(self) -> str:
        return f"<HostProcess {self.label} id={self.endpoint_id}>"

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
        """Wait until ``predicate`` holds (checked on every line), at most ``timeout`` s."""
        with self._changed:
            return self._changed.wait_for(predicate, timeout)

    def wait_started(self, timeout: float = 30) -> None:
        started = self.wait_for(lambda: bool(self.events("started")), timeout)
        assert started, f"{self.label}: did not start:\n{self.log()}"
        info = self.events("started")[0]
        self.endpoint_id, self.started_at = info["id"], info["t"]

    def events(self, kind: str, **match: Any) -> list[dict[str, Any]]:
        """Lines of event ``kind`` whose fields equal ``match``, in order."""
        with self._changed:
            return [
                line
                for line in self.lines
                if line.get("event") == kind and all(line.get(k) == v for k, v in match.items())
            ]

    def messages(self, topic: str | None = None) -> list[dict[str, Any]]:
        return self.events("message", **({"topic": topic} if topic else {}))

    def request(self, op: str, *, wait: float = 30.0, **fields: Any) -> dict[str, Any]:
        request_id = next(self._ids)
        assert self.process.stdin is not None
        self.process.stdin.write(orjson.dumps({"op": op, "id": request_id, **fields}) + b"\n")
        self.process.stdin.flush()

        def reply() -> dict[str, Any] | None:
            return next((e for e in self.lines if e.get("reply") == request_id), None)

        assert self.wait_for(lambda: reply() is not None, wait), (
            f"{self.label}: no reply to {op} within {wait} s:\n{self.log()}"
        )
        answer = reply()
        assert answer is not None
        assert answer["event"] != "error", f"{self.label}: {answer}"
        return answer

    def peers(self) -> dict[int, str]:
        return {int(k): v for k, v in self.request("peers")["peers"].items()}

    def counters(self) -> tuple[dict[str, int], dict[int, dict[str, int]]]:
        reply = self.request("counters")
        return reply["counters"], {int(k): v for k, v in reply["peer_counters"].items()}

    def log(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read()[-5000:]

    def close(self) -> None:
        """Ask it to stop; terminate, then kill it if it does not."""
        stdin = self.process.stdin
        if stdin is not None:
            with contextlib.suppress(BrokenPipeError, ValueError):
                if self.process.poll() is None:
                    stdin.write(b'{"op": "stop"}\n')
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
