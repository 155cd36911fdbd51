"""A receiving endpoint process for integration tests (configured by GLUE_* variables).

Prints one JSON line when started, then one whenever the count changed (checked every 50 ms)
and at stop, with the count and whether every message so far arrived exactly once and in order
(payloads start "<number>:").
"""

from __future__ import annotations

import signal
import sys
import threading

import orjson

from glue import EndpointManager, MessageReceived


def main() -> None:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    state = {"count": 0, "last": 0, "ok": True}

    def report(event: str) -> None:
        line = {"event": event, **state}
        sys.stdout.write(orjson.dumps(line).decode() + "\n")
        sys.stdout.flush()

    def on_message(message: MessageReceived) -> None:
        number = int(message.payload.split(b":", 1)[0])
        if number != state["last"] + 1:
            state["ok"] = False
        state["last"] = number
        state["count"] += 1

    def reporter() -> None:
        reported = -1
        while not stop.wait(0.05):
            if state["count"] != reported:
                reported = state["count"]
                report("progress")

    threading.Thread(target=reporter, daemon=True).start()
    with EndpointManager.from_env() as endpoint:
        endpoint.on_message(on_message)
        sys.stdout.write(orjson.dumps({"event": "started", "id": endpoint.endpoint_id}).decode())
        sys.stdout.write("\n")
        sys.stdout.flush()
        stop.wait()
    report("stopped")


if __name__ == "__main__":
    main()
