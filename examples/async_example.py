"""Publish and subscribe with ``AsyncEndpointManager``: two endpoints in one asyncio loop.

    python examples/async_example.py [DISCOVERY_PORT]

Both endpoints subscribe to ``chat/#`` and publish one line each: every endpoint receives its
own line (delivered locally, without the network) and the other's. Then one sends the other a
direct message, outside any topic. The endpoints stay on loopback (data sockets on 127.0.0.1,
discovery on the multicast group 239.192.137.1 over ``lo``); the port comes from the argument,
else ``EXAMPLE_DISCOVERY_PORT``, else 27392.
"""

# ruff: noqa: T201 - an example prints what it received

from __future__ import annotations

import asyncio
import os
import sys

from glue import AsyncEndpointManager, AsyncSubscription, GlueSettings, Message, load_settings

DEFAULT_PORT = 27392


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


async def collect(subscription: AsyncSubscription, count: int) -> list[Message]:
    """The first ``count`` messages of an iterator subscription."""
    received: list[Message] = []
    async for message in subscription:
        received.append(message)
        if len(received) == count:
            break
    return received


async def main(port: int) -> int:
    async with (
        AsyncEndpointManager(settings(port, "alice")) as alice,
        AsyncEndpointManager(settings(port, "bob")) as bob,
    ):
        alice_chat = alice.subscribe("chat/#", "line")
        bob_chat = bob.subscribe("chat/#", "line")
        direct = bob.messages()  # registered now: nothing sent from here on is missed

        await alice.wait_for_peers(1, timeout=5)
        # Each publishes once; history (GLUE_HISTORY_DEPTH, 1 by default) covers the moment
        # before the other's interest has arrived.
        await alice.publish("chat/alice", "line", b"hello from alice")
        await bob.publish("chat/bob", "line", b"hello from bob")
        await alice.send(b"a direct word", to=[bob.endpoint_id])

        async with asyncio.timeout(5):
            for name, subscription in (("alice", alice_chat), ("bob", bob_chat)):
                lines = await collect(subscription, 2)
                for message in sorted(lines, key=lambda m: m.topic_name):
                    print(
                        f"{name} received {message.topic_name} from {message.source_name}: "
                        f"{message.payload.decode()}"
                    )
            received = await anext(direct)
            print(
                f"bob received a direct message from {received.source.name}: "
                f"{received.payload.decode()}"
            )
    print("done")
    return 0


if __name__ == "__main__":
    chosen = int(
        sys.argv[1] if len(sys.argv) > 1 else os.environ.get("EXAMPLE_DISCOVERY_PORT", DEFAULT_PORT)
    )
    sys.exit(asyncio.run(main(chosen)))
