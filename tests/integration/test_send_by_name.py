"""send(to=[...]) takes peer names as well as ids (issue 17, item 4): a name resolves among
the peers known now, and one nobody has fails at once, not after a timeout."""

from __future__ import annotations

import pytest

from glue import AsyncEndpointManager, EndpointManager, UnknownPeerError
from tests.helpers import Inbox, async_wait_until, free_udp_port, multicast_settings


def test_a_direct_message_goes_to_a_peer_named_in_to() -> None:
    settings = multicast_settings(f"239.192.137.21:{free_udp_port()}")
    with (
        EndpointManager.from_env(**settings, endpoint_name="controller") as controller,
        EndpointManager.from_env(**settings, endpoint_name="robot-7") as robot,
    ):
        inbox = Inbox()
        robot.on_message(inbox)
        controller.wait_for_peers(1, timeout=10)
        controller.send(b"home", to=["robot-7"])
        controller.send(b"twice", to=[robot.endpoint_id, "robot-7"])  # both name one peer
        assert inbox.wait_for_count(3, timeout=10)
        assert [m.payload for m in inbox.messages] == [b"home", b"twice", b"twice"]
        with pytest.raises(UnknownPeerError, match="robot-8") as caught:
            controller.send(b"home", to=["robot-8"])
        assert caught.value.name == "robot-8"
        assert isinstance(caught.value, LookupError)
        assert "robot-7" in str(caught.value)  # the names it knows


async def test_the_asyncio_api_takes_names_too() -> None:
    settings = multicast_settings(f"239.192.137.22:{free_udp_port()}")
    async with (
        AsyncEndpointManager.from_env(**settings, endpoint_name="controller") as controller,
        AsyncEndpointManager.from_env(**settings, endpoint_name="robot-7") as robot,
    ):
        got: list[bytes] = []
        robot.on_message(lambda m: got.append(m.payload))
        await controller.wait_for_peers(1, timeout=10)
        await controller.send(b"home", to=["robot-7"])
        assert await async_wait_until(lambda: got == [b"home"], timeout=10)
        with pytest.raises(UnknownPeerError):
            await controller.send(b"home", to=["robot-8"])
