"""Publish and subscribe with the blocking ``EndpointManager``: two endpoints in one process.

    python examples/sync_example.py [DISCOVERY_PORT]

The endpoints stay on loopback (data sockets on 127.0.0.1, discovery on the multicast group
239.192.137.1 over ``lo``); the port comes from the argument, else ``EXAMPLE_DISCOVERY_PORT``,
else 27391. Run it where ``lo`` carries multicast (the project's ``tools/isolated-net`` makes
such a private network namespace). It prints what the subscriber received and exits.
"""

# ruff: noqa: T201 - an example prints what it received

from __future__ import annotations

import os
import sys
import threading

from glue import EndpointManager, GlueSettings, Message, load_settings

DEFAULT_PORT = 27391
READINGS = [
    ("sensors/kitchen/temperature", {"celsius": 21.5}),
    ("sensors/hall/temperature", {"celsius": 19.0}),
    ("sensors/kitchen/temperature", {"celsius": 21.7}),
    ("sensors/kitchen/humidity", {"percent": 40}),  # matches no subscription below
]


def settings(port: int) -> GlueSettings:
    """Settings that keep everything on loopback."""
    group = f"239.192.137.1:{port}"
    return load_settings(
        listen_address="127.0.0.1:0",
        listen_interface="lo",
        discovery_target_address=group,
        discovery_listen_address=group,
    )


def main() -> int:
    port = int(
        sys.argv[1] if len(sys.argv) > 1 else os.environ.get("EXAMPLE_DISCOVERY_PORT", DEFAULT_PORT)
    )
    temperatures: list[Message] = []
    all_there = threading.Event()

    def on_temperature(message: Message) -> None:
        # Runs on a callback thread (GLUE_CALLBACK_THREADS), one message at a time, in order.
        temperatures.append(message)
        if len(temperatures) == 3:
            all_there.set()

    with (
        EndpointManager(settings(port)) as publisher,
        EndpointManager(settings(port)) as subscriber,
    ):
        # '+' stands for one segment: the kitchen and the hall, not the humidity.
        subscriber.subscribe("sensors/+/temperature", "reading", on_temperature)
        # Without a callback a subscription is an iterator (here read with get()).
        alerts = subscriber.subscribe("alerts/#", "text")

        publisher.wait_for_peers(1, timeout=5)
        # The subscriber's interest may reach the publisher a moment after discovery: what is
        # published before that is kept in history (up to history_depth per topic) and sent to
        # the subscriber as soon as its interest arrives, in order and exactly once.
        for topic, value in READINGS:
            publisher.publish_json(topic, "reading", value, history_depth=10)
        publisher.publish("alerts/kitchen", "text", b"smoke in the kitchen", history_depth=10)

        if not all_there.wait(timeout=5):
            print(f"only {len(temperatures)} of 3 readings arrived")
            return 1
        alert = alerts.get(timeout=5)

        # Order is guaranteed per publisher and topic, not across topics: print per topic.
        for message in sorted(temperatures, key=lambda m: (m.topic_name, m.sequence)):
            print(f"received {message.topic_name} #{message.sequence}: {message.json()}")
        print(f"received {alert.topic_name} #{alert.sequence}: {alert.payload.decode()}")
        dropped = subscriber.counters().get("subscription_messages_dropped", 0)
        print(f"dropped because a subscription fell behind: {dropped}")
    print("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
