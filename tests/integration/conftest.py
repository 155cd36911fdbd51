"""Integration tests open real UDP sockets and send real multicast: only in a private netns."""

from __future__ import annotations

import netifaces
import pytest

from tests.helpers import free_udp_port, multicast_settings


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--loss-runs",
        type=int,
        default=3,
        help="runs of the 20 %% loss stream test in test_heavy_loss.py (CI: 3)",
    )


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


@pytest.fixture
def settings() -> dict[str, object]:
    """``GLUE_*`` settings for endpoints that find each other fast on a group of their own
    (announcements every 100 ms, a peer dropped after 1 s of silence)."""
    return multicast_settings(
        f"239.192.137.10:{free_udp_port()}",
        discovery_rate_milliseconds=100,
        discovery_rate_timeout_multiplier=10.0,
    )
