"""docs/model.md and examples/shared_config.py are true: every Python block of the page runs as a
program (on loopback, checking itself), its links lead somewhere, and the example's three
processes agree."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.endpoint_process import base_env
from tests.helpers import free_udp_port

ROOT = Path(__file__).parents[2]
PAGE = ROOT / "docs" / "model.md"
_BLOCK = re.compile(r"^```python\n(.*?)^```$", re.DOTALL | re.MULTILINE)


def run(args: list[str], env: dict[str, str]) -> str:
    result = subprocess.run(
        [sys.executable, *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


BLOCKS = _BLOCK.findall(PAGE.read_text(encoding="utf-8"))


@pytest.mark.parametrize("code", BLOCKS, ids=[f"model.md#{n}" for n in range(1, len(BLOCKS) + 1)])
def test_the_python_blocks_of_the_page_run(code: str) -> None:
    group = f"239.192.137.1:{free_udp_port()}"
    env = base_env(
        listen_address="127.0.0.1:0",
        listen_interface="lo",
        discovery_target_address=group,
        discovery_listen_address=group,
        discovery_rate_milliseconds=200,
    )
    run(["-c", code], env)


def test_the_page_has_runnable_examples_and_its_links_exist() -> None:
    assert len(BLOCKS) >= 2
    text = PAGE.read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if "://" not in target:
            assert (PAGE.parent / target).exists(), target


def test_the_shared_config_example_converges_in_three_processes() -> None:
    lines = run(["examples/shared_config.py", str(free_udp_port())], base_env()).splitlines()
    assert lines[0] == "all 3 processes see the same configuration:"
    config = json.loads(lines[1])
    assert config["pump-1"] == {"on": True, "rate": "5/min"}
    assert config["pump-2"] == {"on": False, "rate": "10/min"}
    assert config["pump-3"] == {"on": True, "rate": "15/min"}
    assert config["mode"] in {f"manual, set by process {n}" for n in (1, 2, 3)}
