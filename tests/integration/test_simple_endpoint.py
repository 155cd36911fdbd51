"""The Go reference's two demo scenarios with ``cmd/simple_endpoint.py``, as real processes.

3 subscribers and 1 publisher, once on multicast and once through a unicast rendezvous, each
configured only through GLUE_* variables, as the README shows: every subscriber logs every
message the publisher sent, exactly once and in order, and no gap.
"""

from __future__ import annotations

import fcntl
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO

import pytest

from tests.endpoint_process import base_env
from tests.helpers import free_udp_port, wait_until

SCRIPT = Path(__file__).resolve().parents[2] / "cmd" / "simple_endpoint.py"
COUNT = 40


class Process:
    def __init__(self, env: dict[str, str], *args: str) -> None:
        self.out: IO[str] = tempfile.TemporaryFile(mode="w+")
        # The child shares this file's offset: reading it (seek 0) would make the child's next
        # lines overwrite the first ones. In append mode every write goes to the end.
        flags = fcntl.fcntl(self.out.fileno(), fcntl.F_GETFL)
        fcntl.fcntl(self.out.fileno(), fcntl.F_SETFL, flags | os.O_APPEND)
        self.process = subprocess.Popen(
            [sys.executable, str(SCRIPT), *args],
            env=env,
            stdout=self.out,
            stderr=subprocess.STDOUT,
            text=True,
        )

        self.final: list[str] | None = None

    def lines(self) -> list[str]:
        if self.final is not None:
            return self.final
        self.out.seek(0)
        return self.out.read().splitlines()

    def events(self, name: str) -> list[dict[str, str]]:
        found = []
        for line in self.lines():
            if line.startswith(f"event={name} "):
                found.append(dict(re.findall(r"(\w+)=(\S+)", line)))
        return found

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.final is None:
            self.final = self.lines()
            self.out.close()


def _env(**glue: str | int) -> dict[str, str]:
    return base_env(**{"listen_interface": "lo", "discovery_rate_milliseconds": 200, **glue})


@pytest.mark.parametrize("scenario", ["multicast", "rendezvous"])
def test_three_subscribers_get_every_message_of_the_publisher(scenario: str) -> None:
    port = free_udp_port()
    if scenario == "multicast":
        group = f"239.192.137.{40 + port % 200}:{port}"
        node_env = _env(discovery_target_address=group, discovery_listen_address=group)
        extra: list[Process] = []
    else:
        rendezvous = f"127.0.0.1:{port}"
        extra = [
            Process(
                _env(discovery_target_address="0", discovery_listen_address=rendezvous), "--quiet"
            )
        ]
        node_env = _env(discovery_target_address=rendezvous, discovery_listen_address="0")
    subscribers = [Process(node_env) for _ in range(3)]
    publisher = None
    processes = [*extra, *subscribers]
    try:
        others = len(processes) - 1
        assert wait_until(
            lambda: all(len(p.events("peer_added")) >= others for p in subscribers), timeout=30
        ), [p.lines()[-5:] for p in processes]
        started = time.monotonic()
        # Long expiry and a history as deep as the run: every message is owed to everyone.
        publisher = Process(
            node_env,
            "--send-messages",
            "--count",
            str(COUNT),
            "--expiry-ms",
            "10000",
            "--history-depth",
            str(COUNT),
        )
        processes.append(publisher)
        assert wait_until(
            lambda: all(len(p.events("received")) >= COUNT for p in subscribers), timeout=60
        ), [(len(p.events("received")), p.lines()[-3:]) for p in subscribers]
        elapsed = time.monotonic() - started
        for subscriber in subscribers:
            received = subscriber.events("received")
            assert [int(r["seq"]) for r in received] == list(range(1, COUNT + 1))
            assert {r["bytes"] for r in received} == {str(64 * 1024)}
            assert subscriber.events("gap") == []
        print(f"\n{scenario}: 3 subscribers got all {COUNT} x 64 KiB in {elapsed:.2f} s")
    finally:
        for process in reversed(processes):
            process.stop()
    for process in processes:
        assert process.process.returncode == 0, process.lines()[-10:]
        assert process.events("summary"), process.lines()[-5:]


def test_a_bad_variable_is_named_at_start_up() -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT)],
        env=_env(discovery_rate_milliseconds="fast"),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert "GLUE_DISCOVERY_RATE_MILLISECONDS" in result.stderr
    assert "Traceback" not in result.stderr
