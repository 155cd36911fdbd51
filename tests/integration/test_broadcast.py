"""Discovery through a subnet broadcast address, on a veth link in a nested network namespace."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import subprocess, sys
    for command in (
        "ip link set lo up",
        "ip link add glue0 type veth peer name glue1",
        "ip addr add 10.99.0.1/24 brd + dev glue0",
        "ip link set glue0 up",
        "ip link set glue1 up",
    ):
        subprocess.run(command.split(), check=True)
    from glue import EndpointManager
    settings = dict(
        discovery_target_address="10.99.0.255:27400",
        discovery_listen_address="10.99.0.255:27400",
        listen_interface="glue0",
        discovery_rate_milliseconds=200,
    )
    with EndpointManager.from_env(**settings) as a, EndpointManager.from_env(**settings) as b:
        [peer] = a.wait_for_peers(1, timeout=2)
        assert peer.endpoint_id == b.endpoint_id, peer
        assert peer.host == "10.99.0.1", peer
        assert [p.endpoint_id for p in b.wait_for_peers(1, timeout=2)] == [a.endpoint_id]
    print("met over broadcast")
    """
)


def test_two_endpoints_meet_through_a_broadcast_address() -> None:
    # A namespace of its own, so the veth link exists only for this test and dies with it.
    result = subprocess.run(
        ["unshare", "--net", "--", sys.executable, "-c", SCRIPT],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "met over broadcast" in result.stdout
