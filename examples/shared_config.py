"""Shared configuration edited from three processes: a model (docs/model.md) that converges.

    python examples/shared_config.py [DISCOVERY_PORT]

Starts three processes of itself. Each opens the model ``site/config``, waits until it has
exchanged state with the other two, then in one transaction adds its own pump and sets the
shared ``mode`` (all three at once: a conflict, which every replica settles the same way), and
waits until it sees all three pumps. Each prints what it sees; the parent checks that the three
are the same and prints it. Everything stays on loopback (multicast discovery over ``lo``: run
it where ``lo`` carries multicast, such as the project's ``tools/isolated-net``); the port comes
from the argument, else ``EXAMPLE_DISCOVERY_PORT``, else 27393.
"""

# ruff: noqa: T201 - an example prints what it sees

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

from glue import EndpointManager, ModelChange, load_settings

DEFAULT_PORT = 27393
PROCESSES = 3


def edit(number: int, port: int) -> None:
    """One process: add pump ``number``, set ``mode``, print the configuration once complete."""
    group = f"239.192.137.1:{port}"
    settings = load_settings(
        listen_address="127.0.0.1:0",
        listen_interface="lo",
        discovery_target_address=group,
        discovery_listen_address=group,
        discovery_rate_milliseconds=200,
    )
    with EndpointManager(settings) as endpoint, endpoint.model("site/config") as config:
        complete = threading.Event()

        def on_change(change: ModelChange) -> None:
            # On the model's thread, after each transaction (ours or a peer's).
            if _pumps(config.snapshot()) == PROCESSES:
                complete.set()

        config.on_change(on_change)
        config.wait_synced(timeout=10, peers=PROCESSES - 1)
        with config.transaction() as root:
            # A key per pump merges with the others' keys; ``mode`` is set by all three at once
            # and ends with the same winner in every replica.
            root[f"pump-{number}"] = {"rate": f"{number * 5}/min", "on": number % 2 == 1}
            root["mode"] = f"manual, set by process {number}"
        if not complete.wait(10):
            print(f"process {number}: incomplete {config.snapshot()}")
            sys.exit(1)
        snapshot = config.snapshot()
        config.flush(timeout=5)  # our edit reached the others before we leave
        print(json.dumps(snapshot, sort_keys=True))  # (a JSON value's keys come in any order)


def _pumps(snapshot: dict[str, object]) -> int:
    return sum(1 for key in snapshot if key.startswith("pump-"))


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--process":
        edit(int(sys.argv[2]), int(sys.argv[3]))
        return 0
    port = int(
        sys.argv[1] if len(sys.argv) > 1 else os.environ.get("EXAMPLE_DISCOVERY_PORT", DEFAULT_PORT)
    )
    children = [
        subprocess.Popen(
            [sys.executable, __file__, "--process", str(n), str(port)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for n in range(1, PROCESSES + 1)
    ]
    seen = []
    for child in children:
        out, _ = child.communicate(timeout=60)
        if child.returncode != 0:
            print(out, end="")
            return 1
        seen.append(out.strip())
    if len(set(seen)) != 1:
        print("the processes disagree:", *seen, sep="\n")
        return 1
    print(f"all {PROCESSES} processes see the same configuration:")
    print(seen[0])
    return 0


if __name__ == "__main__":
    sys.exit(main())
