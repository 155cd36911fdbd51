"""Integration tests open real UDP sockets and send real multicast: only in a private netns."""

from __future__ import annotations

import netifaces
import pytest


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/integration/" in str(item.path).replace("\\", "/"):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session", autouse=True)
def _private_network_namespace() -> None:
    others = [name for name in netifaces.interfaces() if name != "lo"]
    if others:
        pytest.fail(
            "integration tests send real multicast and must run inside a private network "
            f"namespace, but this one has {', '.join(others)}: run "
            "`tools/isolated-net .venv/bin/python -m pytest` (see README)",
            pytrace=False,
        )
