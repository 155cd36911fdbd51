"""Command one robot by name and get its reply within 200 ms (request/reply, blocking API).

    python examples/robot_command.py [DISCOVERY_PORT]

Two robots serve ``robots/<name>/move``; a controller commands each by name with
``request(..., timeout=0.2)`` and tells apart every way a command can end: a reply, a robot
that refuses (its handler raised: ``RemoteError``), a robot that does not answer in time
(``TimeoutError``: the command will never start on the robot after its 200 ms), and a robot
that does not exist (``NoResponderError``, at once). See docs/request-reply.md.

Everything stays on loopback (data sockets on 127.0.0.1, discovery on the multicast group
239.192.137.1 over ``lo``); the port comes from the argument, else ``EXAMPLE_DISCOVERY_PORT``,
else 27396. Run it where ``lo`` carries multicast (``tools/isolated-net``).
"""

# ruff: noqa: T201 - an example prints what happened

from __future__ import annotations

import os
import sys
import threading

import orjson

from glue import (
    EndpointManager,
    GlueSettings,
    NoResponderError,
    RemoteError,
    Request,
    load_settings,
)

DEFAULT_PORT = 27396
REACH_M = 10.0
COMMANDS = [
    ("robot-1", {"x": 1.5, "y": 2.0}),
    ("robot-1", {"x": 99.0, "y": 0.0}),  # out of reach: the robot refuses
    ("robot-2", {"x": 0.5, "y": 0.5, "slow": True}),  # busy too long: no reply in 200 ms
    ("robot-9", {"x": 0.0, "y": 0.0}),  # no such robot
]


def settings(port: int, name: str) -> GlueSettings:
    """Settings that keep everything on loopback."""
    group = f"239.192.137.1:{port}"
    return load_settings(
        endpoint_name=name,
        listen_address="127.0.0.1:0",
        listen_interface="lo",
        discovery_target_address=group,
        discovery_listen_address=group,
    )


def robot(name: str, release: threading.Event):
    """A robot's move handler: moves within reach, refuses beyond it."""

    def move(request: Request) -> bytes:
        # Runs on a callback thread; never after the request's deadline (request.expires_at).
        target = request.json()
        if target.get("slow"):
            release.wait(2.0)  # a move that takes longer than the controller waits
        if max(abs(target["x"]), abs(target["y"])) > REACH_M:
            raise ValueError(f"x={target['x']}, y={target['y']} is out of reach")
        return orjson.dumps({"robot": name, "at": [target["x"], target["y"]]})

    return move


def main() -> int:
    port = int(
        sys.argv[1] if len(sys.argv) > 1 else os.environ.get("EXAMPLE_DISCOVERY_PORT", DEFAULT_PORT)
    )
    release = threading.Event()
    with (
        EndpointManager(settings(port, "robot-1")) as robot_1,
        EndpointManager(settings(port, "robot-2")) as robot_2,
        EndpointManager(settings(port, "controller")) as controller,
    ):
        robot_1.serve("robots/robot-1/move", robot("robot-1", release))
        robot_2.serve("robots/robot-2/move", robot("robot-2", release))
        for name in ("robot-1", "robot-2"):
            controller.wait_for_responders(f"robots/{name}/move", timeout=5)
        for name, target in COMMANDS:
            try:
                reply = controller.request(f"robots/{name}/move", orjson.dumps(target), timeout=0.2)
            except NoResponderError:
                print(f"{name}: no such robot")
            except TimeoutError:
                print(f"{name}: no reply within 200 ms")
            except RemoteError as error:
                print(f"{name}: refused: {error.remote_type}: {error.remote_message}")
            else:
                print(f"{reply.responder_name}: moved to {reply.json()['at']}")
        release.set()
    print("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
