"""Models across real processes (issue 16): three processes each make 1,000 random edits while an
iptables partition separates one of them; after healing, their snapshots converge, and so does a
fourth process started afterwards. One of the three runs on the asyncio API.

The processes find each other by unicast announcements to fixed data ports on 127.0.0.1 (no
multicast), so dropping every datagram to or from one process's port cuts it off from the others
completely, both ways, while they keep talking to each other. Run as a script, this file is that
process (``main``): one endpoint with one model, driven by JSON lines on stdin.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import orjson
import pytest

REPO = Path(__file__).resolve().parents[2]
NAME = "plant/state"
RATE_MS = 500
EDITS = 1000


# --- the process -------------------------------------------------------------------------------


def random_edit(rng: random.Random, root: Any) -> None:
    """Map sets and deletes, array inserts (and a few deletes), text inserts."""
    roll = rng.random()
    config, items, notes = root["config"], root["items"], root["notes"]
    if roll < 0.35:
        config[f"k{rng.randrange(40)}"] = rng.choice([rng.randrange(10_000), "on", "off", None])
    elif roll < 0.5:
        keys = list(config)
        if keys:
            del config[rng.choice(keys)]
    elif roll < 0.75:
        items.insert(rng.randint(0, len(items)), rng.randrange(1000))
        if len(items) > 20 and rng.random() < 0.2:
            del items[rng.randrange(len(items))]
    else:
        notes.insert(rng.randint(0, len(notes)), rng.choice(["a", "bc", "def", " "]))


def digest(snapshot: Any) -> str:
    return hashlib.sha256(orjson.dumps(snapshot, option=orjson.OPT_SORT_KEYS)).hexdigest()[:16]


def say(**event: Any) -> None:
    sys.stdout.write(orjson.dumps({**event, "t": time.monotonic()}).decode() + "\n")
    sys.stdout.flush()


def init(root: Any) -> None:
    import pycrdt

    root["config"] = pycrdt.Map()
    root["items"] = pycrdt.Array()
    root["notes"] = pycrdt.Text()


def main() -> None:
    if sys.argv[1:] == ["async"]:
        asyncio.run(main_async())
        return
    from glue import EndpointManager

    with EndpointManager.from_env() as endpoint:
        model = endpoint.model(NAME)
        say(event="ready", id=endpoint.endpoint_id)
        for line in sys.stdin:
            command = orjson.loads(line)
            op = command["op"]
            try:
                if op == "init":
                    with model.transaction() as root:
                        init(root)
                    say(reply=op)
                elif op == "wait_synced":
                    synced = model.wait_synced(timeout=command["timeout"], peers=command["peers"])
                    say(reply=op, synced=synced)
                elif op == "edit":
                    rng = random.Random(command["seed"])
                    for _ in range(command["count"]):
                        with model.transaction() as root:
                            random_edit(rng, root)
                    say(reply=op)
                elif op == "digest":
                    snapshot = model.snapshot()
                    say(reply=op, digest=digest(snapshot), size=len(orjson.dumps(snapshot)))
                elif op == "peers":
                    say(reply=op, peers=[p.endpoint_id for p in endpoint.peers()])
                elif op == "counters":
                    with model.transaction():  # the model's thread may be applying updates
                        state = len(model.doc.get_update())
                    say(reply=op, counters=model.counters(), state=state)
                elif op == "stop":
                    break
            except Exception as exc:
                say(reply=op, error=repr(exc))
        model.close()


async def main_async() -> None:
    """The same process on the asyncio API: the model is edited on the loop's thread."""
    from glue import AsyncEndpointManager

    loop = asyncio.get_running_loop()
    async with AsyncEndpointManager.from_env() as endpoint:
        model = endpoint.model(NAME)
        say(event="ready", id=endpoint.endpoint_id)
        while line := await loop.run_in_executor(None, sys.stdin.readline):
            command = orjson.loads(line)
            op = command["op"]
            try:
                if op == "init":
                    with model.transaction() as root:
                        init(root)
                    say(reply=op)
                elif op == "wait_synced":
                    synced = await model.wait_synced(
                        timeout=command["timeout"], peers=command["peers"]
                    )
                    say(reply=op, synced=synced)
                elif op == "edit":
                    rng = random.Random(command["seed"])
                    for n in range(command["count"]):
                        with model.transaction() as root:
                            random_edit(rng, root)
                        if n % 10 == 9:
                            await asyncio.sleep(0)  # let the network and the model run
                    say(reply=op)
                elif op == "digest":
                    snapshot = model.snapshot()
                    say(reply=op, digest=digest(snapshot), size=len(orjson.dumps(snapshot)))
                elif op == "peers":
                    say(reply=op, peers=[p.endpoint_id for p in await endpoint.peers()])
                elif op == "counters":
                    say(reply=op, counters=model.counters(), state=len(model.doc.get_update()))
                elif op == "stop":
                    break
            except Exception as exc:
                say(reply=op, error=repr(exc))
        model.close()


# --- the test -----------------------------------------------------------------------------------


class ModelProcess:
    """One model process; ``request`` sends a command and waits for its reply."""

    def __init__(self, port: int, targets: list[int], *, api: str = "sync") -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GLUE_")}
        env.update(
            PYTHONPATH=str(REPO),
            GLUE_LISTEN_INTERFACE="lo",
            GLUE_LISTEN_ADDRESS=f"127.0.0.1:{port}",
            GLUE_DISCOVERY_LISTEN_ADDRESS="0",
            GLUE_DISCOVERY_TARGET_ADDRESS=",".join(f"127.0.0.1:{p}" for p in targets),
            GLUE_DISCOVERY_RATE_MILLISECONDS=str(RATE_MS),
            GLUE_DISCOVERY_RATE_TIMEOUT_MULTIPLIER="2",
            GLUE_LOG_LEVEL="WARNING",
        )
        self.port = port
        self.started_at = time.monotonic()
        self.process = subprocess.Popen(
            [sys.executable, __file__, *(["async"] if api == "async" else [])],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self._lock = threading.Lock()
        ready = self._read()
        assert ready.get("event") == "ready", ready
        self.endpoint_id: int = ready["id"]

    def request(self, op: str, **fields: Any) -> dict[str, Any]:
        with self._lock:
            assert self.process.stdin is not None
            self.process.stdin.write(orjson.dumps({"op": op, **fields}).decode() + "\n")
            self.process.stdin.flush()
            reply = self._read()
        assert reply.get("reply") == op, reply
        assert "error" not in reply, reply
        return reply

    def digest(self) -> str:
        return str(self.request("digest")["digest"])

    def peers(self) -> set[int]:
        return set(self.request("peers")["peers"])

    def close(self) -> None:
        if self.process.poll() is None:
            with suppress(AssertionError, OSError, ValueError):
                self.request("stop")
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None:
                pipe.close()

    def _read(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise AssertionError(f"model process on port {self.port} exited")
        return dict(orjson.loads(line))


@contextmanager
def cut_off(port: int, cut: str) -> Iterator[None]:
    """Drop every UDP datagram to ``port``, and from it unless ``cut`` is ``deaf`` (in this
    test's private namespace)."""
    directions = ["--dport"] if cut == "deaf" else ["--dport", "--sport"]
    rules = [["INPUT", "-p", "udp", way, str(port), "-j", "DROP"] for way in directions]
    for rule in rules:
        subprocess.run(["iptables", "-A", *rule], check=True)
    try:
        yield
    finally:
        for rule in rules:
            subprocess.run(["iptables", "-D", *rule], check=True)


def all_equal(processes: list[ModelProcess]) -> bool:
    digests = {p.digest() for p in processes}
    return len(digests) == 1


@pytest.mark.parametrize("cut", ["both-ways", "deaf"])
def test_three_processes_editing_through_a_partition_converge_and_so_does_a_fourth(
    cut: str,
) -> None:
    """``both-ways``: c and the others lose each other. ``deaf``: c hears nothing, so it loses
    the others, while they still hear it (and keep sending to it, unacknowledged)."""
    from tests.helpers import free_udp_port, wait_until

    period = RATE_MS / 1000
    ports = [free_udp_port() for _ in range(4)]
    # b runs on the asyncio API, the others on the blocking one.
    a, b, c = (
        ModelProcess(port, [p for p in ports[:3] if p != port], api=api)
        for port, api in zip(ports[:3], ("sync", "async", "sync"), strict=True)
    )
    everyone = [a, b, c]
    try:
        a.request("init")
        for process in everyone:
            process.request("wait_synced", peers=2, timeout=20)
        assert wait_until(lambda: all_equal(everyone), timeout=10)

        def separated() -> bool:
            others_lost_c = cut == "deaf" or c.endpoint_id not in a.peers() | b.peers()
            return others_lost_c and not c.peers()

        with cut_off(c.port, cut):
            assert wait_until(separated, timeout=10 * period), "the partition did not separate c"
            editing = [
                threading.Thread(target=p.request, args=("edit",), kwargs={"count": EDITS,
                                 "seed": i}) for i, p in enumerate(everyone)
            ]  # fmt: skip
            for thread in editing:
                thread.start()
            for thread in editing:
                thread.join()
            assert wait_until(lambda: all_equal([a, b]), timeout=30)
            assert not all_equal(everyone)
            assert separated()
            healed_at = time.monotonic()
        converged = wait_until(lambda: all_equal(everyone), timeout=60, interval=0.02)
        converged_after = time.monotonic() - healed_at
        assert converged, f"not converged 60 s after healing: {[p.digest() for p in everyone]}"

        d = ModelProcess(ports[3], ports[:3])
        everyone.append(d)
        synced = d.request("wait_synced", peers=3, timeout=30)
        assert sorted(synced["synced"]) == sorted(p.endpoint_id for p in everyone[:3])
        joined_after = synced["t"] - d.started_at
        assert all_equal(everyone)
        counters = {p.endpoint_id: p.request("counters") for p in everyone}
        size = a.request("digest")["size"]
    finally:
        for process in everyone:
            process.close()

    figures = counters[a.endpoint_id]["counters"]
    print(
        f"\n3 x {EDITS} edits, c cut off ({cut}): converged {converged_after:.2f} s after healing "
        f"({converged_after / period:.1f} announcement periods of {period} s; measured by "
        f"polling every 20 ms); a fourth process synced {joined_after:.2f} s after it was "
        "started (Python and glue imported, endpoint started, peers found, state pulled).\n"
        f"snapshot {size} B of JSON, document {counters[a.endpoint_id]['state']} B as one Yjs "
        f"update; a sent {figures.get('updates_sent', 0)} updates of "
        f"{figures.get('update_bytes', 0) / max(1, figures.get('updates_sent', 1)):.0f} B on "
        f"average, {figures.get('replies_sent', 0)} replies ({figures.get('reply_bytes', 0)} B)"
        f"; d: {counters[d.endpoint_id]['counters']}"
    )


if __name__ == "__main__":
    main()
