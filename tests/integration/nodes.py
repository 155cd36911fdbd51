"""Endpoint processes for integration tests: ``python -m glue peers --watch --json``."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import Any

import orjson

RATE_MS = 500
MULTIPLIER = 2.0
RATE_S = RATE_MS / 1000
TIMEOUT_S = RATE_S * MULTIPLIER


def base_env(**glue: str | int) -> dict[str, str]:
    """The parent's environment without GLUE_*, plus the given GLUE_* settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GLUE_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update({f"GLUE_{key.upper()}": str(value) for key, value in glue.items()})
    return env


class Node:
    """One endpoint process; records every JSON line it prints, with the time it was read."""

    def __init__(self, **glue: str | int) -> None:
        glue.setdefault("discovery_rate_milliseconds", RATE_MS)
        glue.setdefault("discovery_rate_timeout_multiplier", MULTIPLIER)
        self.stderr = tempfile.TemporaryFile(mode="w+")
        # Append mode: reading it moves the offset the child shares; the child must not then
        # overwrite earlier lines.
        flags = fcntl.fcntl(self.stderr.fileno(), fcntl.F_GETFL)
        fcntl.fcntl(self.stderr.fileno(), fcntl.F_SETFL, flags | os.O_APPEND)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "glue", "--log-level", "DEBUG", "peers", "--watch", "--json"],
            env=base_env(**glue),
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
        )
        self.events: list[tuple[float, dict[str, Any]]] = []
        self.known: dict[int, str] = {}
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        started = self.wait_for(lambda: any(e["event"] == "started" for _, e in self.events), 15)
        assert started, f"node did not start:\n{self.log()}"
        info = next(e for _, e in self.events if e["event"] == "started")
        self.endpoint_id: int = info["id"]
        self.name: str = info["name"]
        self.started_at = time.monotonic()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            event = orjson.loads(line)
            with self._changed:
                self.events.append((time.monotonic(), event))
                if event["event"] == "added":
                    self.known[event["id"]] = event["name"]
                elif event["event"] == "removed":
                    self.known.pop(event["id"], None)
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_for(self, predicate: Callable[[], bool], timeout: float) -> bool:
        """Wait until ``predicate`` holds (re-checked on every event), at most ``timeout`` s."""
        with self._changed:
            return self._changed.wait_for(predicate, timeout)

    def knows(self, *others: Node) -> bool:
        return all(other.endpoint_id in self.known for other in others)

    def removals(self, other: Node) -> list[tuple[float, str]]:
        """(time, reason) of every removal of ``other`` this node reported."""
        with self._changed:
            return [
                (t, e["reason"])
                for t, e in self.events
                if e["event"] == "removed" and e["id"] == other.endpoint_id
            ]

    def kill(self, sig: signal.Signals = signal.SIGKILL) -> float:
        """Send ``sig``; return the time it was sent."""
        sent = time.monotonic()
        self.process.send_signal(sig)
        self.process.wait(timeout=10)
        return sent

    def log(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read()[-5000:]

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._reader.join(timeout=10)
        if self.process.stdout is not None:
            self.process.stdout.close()
        self.stderr.close()


def wait_all(nodes: list[Node], predicate: Callable[[Node], bool], timeout: float) -> bool:
    """Wait until ``predicate(node)`` holds for every node, within one shared deadline."""
    deadline = time.monotonic() + timeout
    return all(
        node.wait_for(lambda n=node: predicate(n), max(0.0, deadline - time.monotonic()))
        for node in nodes
    )
