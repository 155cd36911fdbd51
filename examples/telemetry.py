"""Telemetry: three sensors, a dashboard and a late-started alerting process, each a process.

    python examples/telemetry.py [DISCOVERY_PORT]

Each sensor publishes 20 readings of its room at 10 Hz on ``sensors/ROOM`` with
``retain=True``, then goes quiet (each reading expires after 0.5 s). The dashboard subscribes
to ``sensors/#`` and counts what arrives. Once every sensor has been quiet for longer than a
reading's expiry, the alerting process starts: it still gets the latest reading of every room
at once, because retained readings stay in the sensors' history until replaced
(docs/late-joiners.md). The sensors and the dashboard serve with ``run_forever()`` until the
parent sends SIGTERM, and say goodbye on the way out. Everything stays on loopback (multicast
discovery over ``lo``: run it where ``lo`` carries multicast, such as the project's
``tools/isolated-net``); the port comes from the argument, else ``EXAMPLE_DISCOVERY_PORT``,
else 27394.
"""

# ruff: noqa: T201 - an example prints what it sees

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

from glue import EndpointManager, Message, load_settings

DEFAULT_PORT = 27394
ROOMS = ("kitchen", "hall", "attic")
READINGS = 20
EXPIRY = 0.5


def _endpoint(port: int) -> EndpointManager:
    group = f"239.192.137.1:{port}"
    return EndpointManager(
        load_settings(
            listen_address="127.0.0.1:0",
            listen_interface="lo",
            discovery_target_address=group,
            discovery_listen_address=group,
            discovery_rate_milliseconds=200,
        )
    )


def sensor(room: str, port: int) -> None:
    """Publish READINGS readings at 10 Hz, then stay quiet until told to stop."""
    with _endpoint(port) as endpoint:
        endpoint.wait_for_subscribers(f"sensors/{room}", count=1, timeout=10)  # the dashboard
        for number in range(READINGS):
            celsius = 18.0 + ROOMS.index(room) + number / 10
            endpoint.publish_json(
                f"sensors/{room}", "reading", {"celsius": round(celsius, 1)}, expiry=EXPIRY,
                retain=True,
            )  # fmt: skip
            time.sleep(0.1)  # (a sensor's own pace, not a wait for the network)
        endpoint.flush(timeout=5)
        print("quiet", flush=True)
        endpoint.run_forever()  # until SIGTERM: goodbye sent, so peers see it leave at once


def dashboard(port: int) -> None:
    """Count the readings of every room until told to stop."""
    counts = dict.fromkeys(ROOMS, 0)
    lock = threading.Lock()

    def on_reading(message: Message) -> None:
        with lock:
            counts[message.topic_name.rsplit("/", 1)[1]] += 1

    with _endpoint(port) as endpoint:
        endpoint.subscribe("sensors/#", "reading", on_reading)
        print("ready", flush=True)
        endpoint.run_forever()
    with lock:
        print("dashboard: " + ", ".join(f"{room} {counts[room]}" for room in ROOMS))


def alerting(port: int) -> None:
    """Started late: read the latest reading of every room, then exit."""
    started = time.monotonic()
    latest: dict[str, float] = {}
    complete = threading.Event()

    def on_reading(message: Message) -> None:
        latest[message.topic_name.rsplit("/", 1)[1]] = message.json()["celsius"]
        if len(latest) == len(ROOMS):
            complete.set()

    with _endpoint(port) as endpoint:
        endpoint.subscribe("sensors/#", "reading", on_reading)
        if not complete.wait(10):
            print(f"alerting: only {sorted(latest)}")
            sys.exit(1)
    took = (time.monotonic() - started) * 1000
    print("alerting: " + ", ".join(f"{room} {latest[room]}" for room in ROOMS))
    print(f"alerting had them {took:.0f} ms after it started")


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--role":
        role, port = sys.argv[2], int(sys.argv[-1])
        if role == "sensor":
            sensor(sys.argv[3], port)
        elif role == "dashboard":
            dashboard(port)
        else:
            alerting(port)
        return 0
    port = int(
        sys.argv[1] if len(sys.argv) > 1 else os.environ.get("EXAMPLE_DISCOVERY_PORT", DEFAULT_PORT)
    )

    def start(*role: str) -> subprocess.Popen[str]:
        command = [sys.executable, __file__, "--role", *role, str(port)]
        return subprocess.Popen(command, stdout=subprocess.PIPE, text=True)

    board = start("dashboard")
    assert board.stdout is not None
    if board.stdout.readline().strip() != "ready":
        return 1
    sensors = [start("sensor", room) for room in ROOMS]
    for process in sensors:
        assert process.stdout is not None
        if process.stdout.readline().strip() != "quiet":
            return 1
    quiet_since = time.monotonic()
    time.sleep(max(0.0, quiet_since + 2 * EXPIRY - time.monotonic()))  # every reading expired
    late = start("alerting")
    out, _ = late.communicate(timeout=30)
    print(out, end="")
    for process in [*sensors, board]:
        process.send_signal(signal.SIGTERM)
    out, _ = board.communicate(timeout=30)
    print(out, end="")
    codes = [late.returncode, board.returncode] + [p.wait(timeout=30) for p in sensors]
    return 0 if codes == [0] * len(codes) else 1


if __name__ == "__main__":
    sys.exit(main())
