"""Simulation tests: ``--sim-runs N`` sets how many seeded runs the randomized suites make."""

from __future__ import annotations

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--sim-runs",
        type=int,
        default=1000,
        help="seeded runs of each randomized simulation suite (CI: 1000; on demand: 100000)",
    )
    parser.addoption("--sim-seed", type=int, default=None, help="run only this seed")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    runs = config.getoption("--sim-runs")
    for item in items:
        if "tests/sim/" in str(item.path).replace("\\", "/"):
            item.add_marker(pytest.mark.sim)
            # Up to 150 ms a run on these machines (the reliability runs deliver more since
            # streams to silent peers keep what is sent to them); leave room for slower ones.
            item.add_marker(pytest.mark.timeout(120 + runs * 0.5))
