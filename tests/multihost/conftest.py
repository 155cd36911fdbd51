"""The ``lan`` fixture: hosts (network namespaces) on one bridge, removed even when a test fails.

See ``docs/testing-lan.md`` and ``tests/multihost/lan.py``.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator

import netifaces
import pytest

from tests.multihost.lan import Lan, remove_stale


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/multihost/" in str(item.path).replace("\\", "/"):
            item.add_marker(pytest.mark.multihost)


def _real_root() -> bool:
    """Root of the initial user namespace: needed to mount namespaces under /run/netns."""
    try:
        with open("/proc/self/uid_map", encoding="ascii") as file:
            first = file.read().split()
    except OSError:
        return False
    return first[:3] == ["0", "0", "4294967295"]


@pytest.fixture(scope="session")
def _lan_host() -> None:
    """Checks once per session: a private namespace (as the integration tests), real root, the
    tools; and removes LANs left by runs that were killed before their finalizers ran."""
    others = [name for name in netifaces.interfaces() if name != "lo"]
    if others:
        pytest.fail(
            "multihost tests must run inside a private network namespace, but this one has "
            f"{', '.join(others)}: run `tools/isolated-net .venv/bin/python -m pytest` (README)",
            pytrace=False,
        )
    if not _real_root():
        pytest.skip("the test LAN needs real root (ip netns add mounts under /run/netns)")
    missing = [tool for tool in ("ip", "iptables") if not shutil.which(tool)]
    if missing:
        pytest.fail(f"the test LAN needs {', '.join(missing)}", pytrace=False)
    remove_stale()


@pytest.fixture
def lan(_lan_host: None) -> Iterator[Callable[..., Lan]]:
    """``lan(n, default_route=True)`` makes a LAN of ``n`` hosts; every LAN made in the test
    (its processes, namespaces, hosts files, iptables rules) is removed when the test ends,
    passed or failed."""
    made: list[Lan] = []

    def make(count: int, *, default_route: bool = True) -> Lan:
        network = Lan.create(count, default_route=default_route)
        made.append(network)
        return network

    yield make
    errors = []
    for network in reversed(made):
        try:
            network.close()
        except Exception as exc:  # remove the other LANs all the same
            errors.append(exc)
    if errors:
        raise errors[0]
