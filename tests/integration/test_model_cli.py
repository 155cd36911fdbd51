"""``glue model`` (show, edit, follow a model) and the model stage of ``glue demo``."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import orjson

from tests.endpoint_process import base_env
from tests.helpers import free_udp_port


def glue(*args: str, timeout: float = 60, **settings: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "glue", *args],
        env=base_env(**settings),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_glue_model_edits_and_a_watcher_sees_each_change() -> None:
    group = f"239.192.137.1:{free_udp_port()}"
    settings = {
        "discovery_target_address": group,
        "discovery_listen_address": group,
        "discovery_rate_milliseconds": 200,
        "listen_address": "127.0.0.1:0",
    }
    watcher = subprocess.Popen(
        [sys.executable, "-m", "glue", "model", "site/config", "--watch", "--json"],
        env=base_env(**settings),
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert watcher.stdout is not None
        first = orjson.loads(watcher.stdout.readline())  # printed once open: the watcher is up
        assert first["snapshot"] == {}
        edit = glue(
            "model", "site/config", "--peers", "1", "--timeout", "10",
            "--set", "mode=auto", "--set", 'limits={"max": 3}', "--set", "note=plain text",
            **settings,
        )  # fmt: skip
        assert edit.returncode == 0, edit.stderr
        assert orjson.loads(edit.stdout) == {
            "limits": {"max": 3.0},
            "mode": "auto",
            "note": "plain text",
        }
        assert "left behind" not in edit.stderr  # model.flush, then the endpoint's
        delete = glue("model", "site/config", "--peers", "1", "--delete", "mode", **settings)
        assert delete.returncode == 0, delete.stderr
        assert "mode" not in orjson.loads(delete.stdout)
        changes = [orjson.loads(watcher.stdout.readline()) for _ in range(2)]
        # Without --peers it shows what the holders found within a discovery timeout hold.
        show = glue("model", "site/config", **settings)
        assert show.returncode == 0, show.stderr
        assert orjson.loads(show.stdout) == {"limits": {"max": 3.0}, "note": "plain text"}
    finally:
        watcher.terminate()
        watcher.wait(timeout=10)
        if watcher.stdout is not None:
            watcher.stdout.close()
    assert changes[0]["keys"] == ["limits", "mode", "note"]
    assert changes[0]["local"] is False
    assert changes[1]["keys"] == ["mode"]
    assert changes[1]["snapshot"] == {"limits": {"max": 3.0}, "note": "plain text"}


def test_glue_model_without_the_peers_asked_for_fails_with_a_message() -> None:
    result = glue(
        "model", "lonely", "--peers", "1", "--timeout", "0.5",
        discovery_target_address="0", discovery_listen_address="0",
    )  # fmt: skip
    assert result.returncode == 1
    assert "not synced" in result.stderr or "peers holding it" in result.stderr


def test_the_demo_shows_a_model_converging() -> None:
    result = glue("demo", "--rate-ms", "200", timeout=90)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "==> the three replicas agree" in result.stdout
    assert "==> the fourth replica holds the same state" in result.stdout


def test_glue_model_has_a_description_in_its_help() -> None:
    result = glue("model", "--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: glue model")
    assert "exchanged state with the peers" in result.stdout
