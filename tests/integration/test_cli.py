"""The ``glue`` command as a user runs it: a subprocess, configured only by GLUE_* variables."""

from __future__ import annotations

import subprocess
import sys

import orjson
import pytest

from glue import EndpointManager
from tests.endpoint_process import EndpointProcess, base_env
from tests.helpers import free_udp_port


def _glue(*args: str, timeout: float = 60, **glue: str | int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "glue", *args],
        env=base_env(**glue),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_glue_peers_lists_the_endpoints_it_sees() -> None:
    group = f"239.192.137.1:{free_udp_port()}"
    settings = {
        "discovery_target_address": group,
        "discovery_listen_address": group,
        "discovery_rate_milliseconds": 200,
    }
    others = [EndpointProcess(**settings, endpoint_name=f"sensor-{n}") for n in range(2)]
    try:
        table = _glue("peers", **settings)
        assert table.returncode == 0, table.stderr
        assert "sensor-0" in table.stdout
        assert "sensor-1" in table.stdout
        lines = _glue("peers", "--json", "--wait", "1", **settings)
        assert lines.returncode == 0, lines.stderr
        records = [orjson.loads(line) for line in lines.stdout.splitlines()]
        assert {r["name"] for r in records if r["event"] == "peer"} == {"sensor-0", "sensor-1"}
        [started] = [r for r in records if r["event"] == "started"]
        host, _, port = started["data"].rpartition(":")  # host:port, not a Python tuple
        assert host == "0.0.0.0"
        assert port.isdigit()
    finally:
        for node in others:
            node.close()


def test_bad_variable_fails_at_start_with_a_clear_message_and_no_traceback() -> None:
    result = _glue("peers", discovery_rate_milliseconds="fast")
    assert result.returncode == 2
    assert "GLUE_DISCOVERY_RATE_MILLISECONDS='fast'" in result.stderr
    assert "expected" in result.stderr
    assert "Traceback" not in result.stderr


def test_demo_runs_to_completion_on_loopback() -> None:
    result = _glue("demo", "--rate-ms", "200", timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "endpoints know each other" in result.stdout
    assert "every subscriber receives the counter" in result.stdout
    assert "late-joiner  received   demo/counter" in result.stdout
    assert "the mesh is intact and messages still flow, in order, no gaps" in result.stdout


def test_glue_sub_prints_what_glue_pub_publishes_and_late_joiners_get_history() -> None:
    group = f"239.192.137.1:{free_udp_port()}"
    settings = {
        "discovery_target_address": group,
        "discovery_listen_address": group,
        "discovery_rate_milliseconds": 200,
        "listen_interface": "lo",
    }
    subscriber = subprocess.Popen(
        [sys.executable, "-m", "glue", "sub", "sensors/#", "--count", "2", "--timeout", "30"],
        env=base_env(**settings),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # Once `glue sub` is up (seen from here), `glue pub` with no flags delivers: it waits for
        # the subscriber (one discovery timeout at most), publishes, flushes, exits 0.
        with EndpointManager.from_env(**settings) as watcher:
            watcher.wait_for_subscribers("sensors/kitchen", timeout=20)
        for topic, text in (("sensors/kitchen", "21.5 C"), ("sensors/hall", "19 C")):
            published = _glue("pub", topic, text, **settings)
            assert published.returncode == 0, published.stderr
            assert published.stderr == ""  # glue's INFO lines only with -v
        out, err = subscriber.communicate(timeout=30)
    finally:
        if subscriber.poll() is None:
            subscriber.kill()
            subscriber.communicate()
    assert subscriber.returncode == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("sensors/kitchen [")
    assert lines[0].endswith("#1] 21.5 C")
    assert lines[1].startswith("sensors/hall [")
    assert lines[1].endswith("#1] 19 C")
    # A retained value: published with nobody listening, kept while the publisher lingers.
    publisher = subprocess.Popen(
        [
            *[sys.executable, "-m", "glue", "pub", "door", "open", "--no-wait"],
            *["--expiry", "60", "--linger", "20"],
        ],
        env=base_env(**settings),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        late = _glue("sub", "door", "--count", "1", "--timeout", "20", "--json", **settings)
    finally:
        publisher.terminate()
        publisher.communicate(timeout=10)
    assert late.returncode == 0, late.stderr
    record = orjson.loads(late.stdout.splitlines()[0])
    assert (record["topic"], record["payload"], record["seq"]) == ("door", "open", 1)


@pytest.mark.parametrize("flags", [(), ("--wait-for-subscribers", "1", "--timeout", "0.5")])
def test_glue_pub_without_subscribers_exits_3_and_says_so(flags: tuple[str, ...]) -> None:
    result = _glue(
        "pub",
        "nobody/here",
        "x",
        *flags,
        discovery_rate_milliseconds=100,
        discovery_target_address="0",
        discovery_listen_address="0",
    )
    assert result.returncode == 3, result.stderr
    assert "no subscriber to 'nobody/here'" in result.stderr
    assert "nothing published" in result.stderr
    assert "Traceback" not in result.stderr


def test_glue_pub_no_wait_publishes_to_nobody_and_exits_0() -> None:
    result = _glue(
        "pub", "nobody/here", "x", "--no-wait",
        discovery_target_address="0", discovery_listen_address="0",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("command", ["peers", "sub", "pub", "keygen", "doctor", "demo", "bench"])
def test_every_command_has_a_description_in_its_help(command: str) -> None:
    result = _glue(command, "--help")
    assert result.returncode == 0, result.stderr
    usage, _, rest = result.stdout.partition("\n\n")
    assert usage.startswith(f"usage: glue {command}")
    description = rest.split("\n\n", 1)[0]
    assert not description.startswith(("positional", "options")), result.stdout
    assert len(description) > 40, result.stdout


def test_bench_runs_and_prints_every_figure() -> None:
    result = _glue("bench", "--seconds", "0.3", "--repeat", "2", timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    table = result.stdout[result.stdout.index("variant") :]
    for label in ("64 B", "64 KiB", "1 MiB"):
        rows = [line.split() for line in table.splitlines() if line.lstrip().startswith(label)]
        # raw UDP; send and pub/sub with both APIs; pub/sub in batches; sealed pub/sub
        assert len(rows) == 7, table
    # Every glue row, throughput and round trip, against raw UDP with its range.
    assert table.count("x raw (") == 3 * 6 + 10
    for variant in (
        "blocking pub/sub",
        "asyncio pub/sub",
        "blocking sealed",
        "blocking inline",
        "blocking busy",
        "asyncio busy",
    ):
        assert variant in table
    # Request/reply beside pub/sub, each API's ratio of the two printed.
    for api in ("blocking", "asyncio"):
        assert f"{api} request" in table
        assert f"request/reply round trip, {api}: " in table
    assert "nan" not in table  # CPU per message measured on both sides of every glue case
    # Sealed against unsealed pub/sub, measured back to back in each round, per size.
    assert table.count("sealed / unsealed pub/sub, ") == 3
    assert "(goal: at least 0.85 x)" in table
    assert "round trip, 64 B" in table
    assert result.stdout.count("round 2/2") == 4  # three sizes and the round trip, twice
    assert "INFO" not in result.stderr  # the endpoints' start and stop are not logged


def test_bench_json_holds_every_row_with_its_range() -> None:
    result = _glue(
        "bench", "--seconds", "0.2", "--repeat", "2", "--sizes", "64", "--json", timeout=180
    )
    assert result.returncode == 0, result.stdout + result.stderr
    summary = orjson.loads(result.stdout)
    assert summary["rounds"] == 2
    rows = {row["variant"]: row for row in summary["throughput"]}
    assert set(rows) == {
        "raw UDP",
        "blocking send",
        "blocking pub/sub",
        "blocking batches",
        "asyncio send",
        "asyncio pub/sub",
        "blocking sealed",
    }
    for row in rows.values():
        assert row["size_bytes"] == 64
        assert len(row["rounds"]) == 2
        spread = row["ratio_to_raw"]
        assert spread["min"] <= spread["median"] <= spread["max"]
    trips = {row["variant"]: row for row in summary["round_trip"]}
    assert {"blocking inline", "blocking busy", "asyncio busy"} <= set(trips)
    assert {"blocking request", "asyncio request"} <= set(trips)
    ratios = summary["request_to_pubsub"]
    assert set(ratios) == {"blocking", "asyncio"}
    assert all(r["min"] <= r["median"] <= r["max"] for r in ratios.values())
    assert all(t["p50_us"]["median"] <= t["p99_us"]["median"] for t in trips.values())
    [sealed] = summary["sealed_to_unsealed"]
    assert sealed["size_bytes"] == 64
    assert 0 < sealed["min"] <= sealed["median"] <= sealed["max"]
    assert "round 2/2" in result.stderr  # progress goes to standard error


def test_bench_under_loss_through_a_link_prints_goodput_and_leaves_nothing_behind() -> None:
    result = _glue(
        "bench", "--loss", "0.1", "--rate", "1gbit", "--sizes", "65536", "--repeat", "1",
        "--seconds", "0.5", timeout=180,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "through a 1gbit link with a 5 ms queue" in result.stdout
    [row] = [line for line in result.stdout.splitlines() if line.strip().startswith("64 KiB")]
    ratio = float(row.split()[4])
    assert 0 < ratio <= 1.5, row
    # The link and the loss are gone with the benchmark.
    shown = subprocess.run(["tc", "qdisc", "show", "dev", "lo"], capture_output=True, text=True)
    assert "tbf" not in shown.stdout
    rules = subprocess.run(["iptables", "-S", "INPUT"], capture_output=True, text=True)
    assert "glue-bench-loss" not in rules.stdout


def test_bench_rate_needs_loss_and_a_rate() -> None:
    alone = _glue("bench", "--rate", "1gbit", timeout=30)
    assert alone.returncode == 2
    assert "--rate goes with --loss" in alone.stderr
    wrong = _glue("bench", "--loss", "0.1", "--rate", "fast", timeout=30)
    assert wrong.returncode == 2
    assert "--rate must be a rate as tc writes it" in wrong.stderr
