"""One side of a topic stream under loss, as a process (configured by ``GLUE_*`` variables).

``python -m tests.integration.stream_process sub PATTERN``: subscribes and prints one JSON line per
message (``{"event": "message", "topic": ..., "n": <number>, "ok": <payload intact>}``) until its
standard input closes, then its counters (``{"event": "counters", ...}``).

``python -m tests.integration.stream_process pub TOPIC COUNT SIZE [FLUSH_TIMEOUT]``: waits for a
subscriber, publishes COUNT messages of SIZE bytes (payload ``b"<n>:"`` then a pattern derived
from n, so the receiver can check it) with a 30 s expiry as fast as it can, then flushes and prints
``{"event": "flushed"}`` or ``{"event": "flush_failed", "error": ..., "peers": [...]}``.

Both print ``{"event": "started", "id": ..., "name": ...}`` first, and peer events
(``peer_added``/``peer_removed`` with the peer's name) as they happen.
"""

from __future__ import annotations

import sys
import threading
from typing import Any

import orjson

TOPIC_TYPE = "stream"


def payload(number: int, size: int) -> bytes:
    """Message ``number``: its number, then a pattern that depends on it, ``size`` bytes."""
    head = b"%d:" % number
    return head + bytes([number % 251]) * (size - len(head))


def intact(data: bytes) -> tuple[int, bool]:
    number = int(data.split(b":", 1)[0])
    return number, data == payload(number, len(data))


def main(argv: list[str]) -> int:
    from glue import DeliveryError, EndpointManager, Message

    lock = threading.Lock()

    def write(line: dict[str, Any]) -> None:
        data = orjson.dumps(line) + b"\n"
        with lock:
            sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()

    role, topic = argv[0], argv[1]
    with EndpointManager.from_env() as endpoint:
        endpoint.on_peer_added(lambda peer: write({"event": "peer_added", "name": peer.name}))
        endpoint.on_peer_removed(lambda peer: write({"event": "peer_removed", "name": peer.name}))
        write({"event": "started", "id": endpoint.endpoint_id, "name": endpoint.name})
        if role == "sub":

            def on_message(message: Message) -> None:
                number, ok = intact(message.payload)
                write({"event": "message", "topic": message.topic_name, "n": number, "ok": ok})

            endpoint.subscribe(topic, TOPIC_TYPE, on_message)
            sys.stdin.read()  # until the test closes our input
            write({"event": "counters", "counters": endpoint.counters()})
            return 0
        count, size = int(argv[2]), int(argv[3])
        flush_timeout = float(argv[4]) if len(argv) > 4 else 30.0
        endpoint.wait_for_subscribers(topic, timeout=30)
        for number in range(1, count + 1):
            endpoint.publish(topic, TOPIC_TYPE, payload(number, size), expiry=30.0, timeout=30)
        write({"event": "published", "count": count})
        try:
            endpoint.flush(timeout=flush_timeout)
        except DeliveryError as exc:
            write({"event": "flush_failed", "error": str(exc), "peers": sorted(exc.peers)})
            return 1
        except TimeoutError as exc:
            write({"event": "flush_timeout", "error": str(exc)})
            return 1
        write({"event": "flushed"})
        return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
