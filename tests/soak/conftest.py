"""Soak tests carry the ``soak`` marker and a timeout that follows ``--soak-seconds``
(tests/conftest.py: how long the soak publishes; 60 s unless asked)."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    seconds = config.getoption("--soak-seconds")
    for item in items:
        if "tests/soak/" in str(item.path).replace("\\", "/"):
            item.add_marker(pytest.mark.soak)
            # Publishing, then starting up, draining and stopping: a few minutes at most.
            item.add_marker(pytest.mark.timeout(seconds + 300))


@pytest.fixture
def soak_seconds(request: pytest.FixtureRequest) -> float:
    return float(request.config.getoption("--soak-seconds"))
