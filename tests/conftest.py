"""Fixtures for every suite: no test sees a ``GLUE_*`` variable it did not set itself."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--soak-seconds",
        type=float,
        default=60.0,
        help="how long the soak (tests/soak) publishes under churn and loss (default run: 60)",
    )
    parser.addoption(
        "--soak",
        action="store_const",
        const=600.0,
        dest="soak_seconds",
        help="the full soak: 10 minutes (as --soak-seconds 600)",
    )
    parser.addoption(
        "--soak-seed",
        type=int,
        default=None,
        help="seed of the soak's sizes, topics and lifetimes (default: a new one, printed)",
    )


@pytest.fixture(autouse=True)
def _clean_glue_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Remove every ``GLUE_*`` variable, so the developer's shell cannot change a result."""
    for name in list(os.environ):
        if name.upper().startswith("GLUE_"):
            monkeypatch.delenv(name)


@pytest.fixture(autouse=True)
def _no_leaked_threads() -> Iterator[None]:
    """Every endpoint a test starts must be stopped by it: no glue thread may outlive the test."""
    before = set(threading.enumerate())
    yield
    leaked = [
        t
        for t in threading.enumerate()
        if t not in before and t.name.startswith(("glue-", "asyncio_"))
    ]
    for thread in leaked:
        thread.join(timeout=5)
    still = [t.name for t in leaked if t.is_alive()]
    assert not still, f"threads leaked by this test: {still}"
