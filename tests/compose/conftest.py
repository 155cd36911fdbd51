"""Fixtures for the compose demos' tests: a Docker engine (else skip), the image built once.

See ``tests/compose/stack.py``. The engine is reached through ``/var/run/docker.sock`` (or
``DOCKER_HOST``), which works from inside ``tools/isolated-net``. ``.ci/run`` installs and starts
the engine (``tools/docker-engine``), builds the base image (``tools/build-base-image``) and
downloads the wheels (``tools/compose-wheels``); ``BASE_IMAGE`` names the base image to use.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import docker
import docker.errors
import pytest
import requests

from tests.compose import stack


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/compose/" in str(item.path).replace("\\", "/"):
            item.add_marker(pytest.mark.compose)


def _unreachable_engine() -> str | None:
    """Why the local engine's socket cannot be reached, or None (also when DOCKER_HOST is TCP).

    Checked with a plain socket first: when no engine answers, docker-py raises from its
    constructor or ``ping`` with its socket left open, and pytest then fails the run over it.
    """
    host = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
    if not host.startswith("unix://"):
        return None
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(5)
        try:
            probe.connect(host.removeprefix("unix://"))
        except OSError as exc:
            return f"{host}: {exc.strerror or exc}"
    return None


@pytest.fixture(scope="session")
def docker_client() -> Iterator[docker.DockerClient]:
    """A client of a reachable Docker engine; the tests are skipped when there is none."""
    advice = "start one with tools/docker-engine (.ci/run installs docker.io and does)"
    reason = _unreachable_engine()
    if reason is not None:
        pytest.skip(f"no Docker engine can be reached ({reason}); {advice}")
    try:
        client = docker.from_env(timeout=120)
        client.ping()
    except (docker.errors.DockerException, requests.RequestException, OSError) as exc:
        pytest.skip(f"no Docker engine can be reached ({exc}); {advice}")
    try:
        yield client
    finally:
        client.close()


@pytest.fixture(scope="session")
def glue_image(docker_client: docker.DockerClient) -> str:
    """Builds compose/Dockerfile into the compose files' image, once per session, with no
    network; removes leftovers of killed runs first. Fails (does not skip) when something the
    build needs is missing: an engine is there, so the tests must run."""
    problem = stack.check_isolation_possible()
    if problem:
        pytest.fail(f"cannot fence the compose networks off: {problem}", pytrace=False)
    removed = stack.remove_stale(docker_client)
    if removed:
        print(f"\ncompose: removed leftovers of killed runs: {', '.join(removed)}")
    if not stack.wheels():
        pytest.fail(
            f"no wheels in {stack.WHEELS}: run tools/compose-wheels on the host first (it needs "
            "the package index; the image build here has no network)",
            pytrace=False,
        )
    base = stack.pick_base_image(docker_client)
    if base is None:
        pytest.fail(
            f"no base image ({' or '.join(stack.DEFAULT_BASES)}): run tools/build-base-image "
            "(or set BASE_IMAGE)",
            pytrace=False,
        )
    seconds, output = stack.build_image(docker_client, base)
    cached = sum("Using cache" in line for line in output)
    print(
        f"\ncompose: built {stack.IMAGE} on {base} from {len(stack.wheels())} wheels, no "
        f"network: {seconds:.1f}s ({cached} steps from cache)"
    )
    return stack.IMAGE
