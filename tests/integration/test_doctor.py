"""``glue doctor`` as a user runs it: healthy, multicast dropped by iptables, rendezvous targets."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import pytest

from tests.endpoint_process import EndpointProcess
from tests.helpers import free_udp_port
from tests.integration.test_cli import _glue


def _lines(output: str) -> dict[str, list[str]]:
    """The report's lines by check name (first word after the verdict)."""
    found: dict[str, list[str]] = {}
    for line in output.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] in ("OK", "WARN", "FAIL"):
            found.setdefault(words[1], []).append(line)
    return found


@pytest.fixture
def group() -> str:
    return f"239.192.137.1:{free_udp_port()}"


def _settings(group: str) -> dict[str, str | int]:
    return {
        "discovery_target_address": group,
        "discovery_listen_address": group,
        "discovery_rate_milliseconds": 200,
    }


def test_a_healthy_network_passes_every_check(group: str) -> None:
    peer = EndpointProcess(**_settings(group), endpoint_name="healthy-peer")
    try:
        result = _glue("doctor", **_settings(group), network_id=1)
    finally:
        peer.close()
    assert result.returncode == 0, result.stdout + result.stderr
    lines = _lines(result.stdout)
    assert set(lines) == {"settings", "interface", "multicast", "network", "peers"}, result.stdout
    assert all(line.startswith("OK") for found in lines.values() for line in found), result.stdout
    assert "GLUE_DISCOVERY_RATE_MILLISECONDS=200 (environment)" in lines["settings"][0]
    assert "lo (127.0.0.1): the kernel routes to 239.192.137.1" in lines["interface"][0]
    assert "heard back from this process and another one" in lines["multicast"][0]
    assert "healthy-peer at 127.0.0.1:" in lines["peers"][0]
    assert result.stdout.rstrip().endswith("glue doctor: every check passed")


@pytest.fixture
def multicast_dropped(group: str) -> Iterator[str]:
    port = group.rsplit(":", 1)[1]
    rule = ["INPUT", "-d", "224.0.0.0/4", "-p", "udp", "--dport", port, "-j", "DROP"]
    subprocess.run(["iptables", "-A", *rule], check=True)
    try:
        yield group
    finally:
        subprocess.run(["iptables", "-D", *rule], check=True)


def test_multicast_dropped_by_iptables_is_named_and_fails(multicast_dropped: str) -> None:
    result = _glue("doctor", "--wait", "0.5", **_settings(multicast_dropped))
    assert result.returncode == 1, result.stdout
    lines = _lines(result.stdout)
    [multicast] = lines["multicast"]
    assert multicast.startswith("FAIL"), result.stdout
    assert "did not come back from this process and a second process" in multicast
    assert "multicast is blocked or not routed here" in result.stdout
    assert lines["peers"][0].startswith("FAIL")
    assert "1 failed" in result.stdout or "2 failed" in result.stdout


def test_a_rendezvous_that_answers_and_one_that_does_not(group: str) -> None:
    port = free_udp_port()
    rendezvous = EndpointProcess(
        discovery_rate_milliseconds=500,
        discovery_target_address="0",
        discovery_listen_address=f"127.0.0.1:{port}",
        endpoint_name="the-rendezvous",
    )
    nobody = free_udp_port()
    try:
        result = _glue(
            "doctor",
            "--wait",
            "0.5",
            discovery_target_address=f"127.0.0.1:{port},127.0.0.1:{nobody}",
            discovery_listen_address="0",
            discovery_rate_milliseconds=200,
            discovery_rate_milisecond=5,  # misspelt: named as a warning
        )
        # The doctor said goodbye: the rendezvous forgot it at once.
        assert rendezvous.wait_for(
            lambda: bool(rendezvous.events("peer_removed", reason="left")), 5
        )
    finally:
        rendezvous.close()
    assert result.returncode == 1, result.stdout
    lines = _lines(result.stdout)
    answered, silent = lines["rendezvous"]
    assert answered.startswith("OK"), result.stdout
    assert f"127.0.0.1:{port}: answered by 127.0.0.1 (the-rendezvous)" in answered
    assert silent.startswith("FAIL"), result.stdout
    assert f"127.0.0.1:{nobody}: no answer within" in silent
    assert "multicast" not in lines  # unicast only: no group to test
    [misspelt] = [line for line in lines["settings"] if line.startswith("WARN")]
    assert "GLUE_DISCOVERY_RATE_MILISECOND (in the environment)" in misspelt
    assert "did you mean GLUE_DISCOVERY_RATE_MILLISECONDS?" in result.stdout


def test_a_key_mismatch_is_named_with_the_key_ids(group: str) -> None:
    from glue.security import generate_key

    peer = EndpointProcess(
        **_settings(group), network_key=generate_key(), endpoint_name="other-key"
    )
    try:
        result = _glue("doctor", "--wait", "1", **_settings(group), network_key=generate_key())
    finally:
        peer.close()
    assert result.returncode == 1, result.stdout
    lines = _lines(result.stdout)
    assert "seals with key id" in lines["network"][0]
    [peers] = lines["peers"]
    assert peers.startswith("FAIL")
    assert "0 seen; datagrams refused:" in peers
    assert "key" in peers
    assert "compare key ids" in result.stdout
    assert "**********" in lines["settings"][0]  # the key itself is never shown
