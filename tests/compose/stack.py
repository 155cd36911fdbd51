"""A compose stack of ``compose/`` brought up by the compose CLI, fenced off, read, torn down.

* The image is built with the Docker SDK from a context holding only what
  ``compose/Dockerfile`` copies, with ``network_mode="none"``: with the host's wheels in
  ``compose/wheels`` (``tools/compose-wheels``) the build needs no network, and this proves it.
* A stack is created first (``up --no-start``), then an iptables rule in Docker's
  ``DOCKER-USER`` chain drops whatever would leave its bridge for another interface, and only
  then are its containers started: nothing they send can leave the compose network. The rule
  carries the comment ``glue-compose-test``; it is removed after ``down``.
* The tests run inside ``tools/isolated-net`` (a private network namespace), where iptables
  would change the wrong namespace: rules go into dockerd's namespace through ``nsenter``.
* Project names are ``gluetest<pid>x<n>``: stacks (and rules) left by a killed run are found by
  their dead pid and removed by :func:`remove_stale`, while a concurrent run's are left alone.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
import subprocess
import tarfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import docker
import docker.errors
from docker.models.containers import Container

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose"
WHEELS = COMPOSE / "wheels"
IMAGE = "glue-simple-endpoint"  # the compose files' image:
DEFAULT_BASES = ("glue-base:bookworm", "python:3.11-slim")
PROJECT_PREFIX = "gluetest"
COMMENT = "glue-compose-test"
_PROJECT = re.compile(rf"^{PROJECT_PREFIX}(\d+)x\d+$")
PROJECT_LABEL = "com.docker.compose.project"
SERVICE_LABEL = "com.docker.compose.service"


class ComposeError(RuntimeError):
    """A compose or iptables command failed (message: the command and its output)."""


# --- the compose CLIs -------------------------------------------------------------------------


@dataclass(frozen=True)
class ComposeCli:
    """One way to run compose: ``docker compose`` (v2) or ``docker-compose`` (v1)."""

    label: str  # "v2" or "v1"
    command: tuple[str, ...]
    version: str


def available_clis() -> list[ComposeCli]:
    """The compose CLIs on this machine, one per major version (v2 first)."""
    found: dict[str, ComposeCli] = {}
    for command in (("docker", "compose"), ("docker-compose",)):
        if not shutil.which(command[0]):
            continue
        try:
            result = subprocess.run(
                [*command, "version", "--short"],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        version = result.stdout.strip().lstrip("v")
        if result.returncode != 0 or not version[:1].isdigit():
            continue
        label = "v1" if version.startswith("1.") else "v2"
        found.setdefault(label, ComposeCli(label, command, version))
    return [found[label] for label in ("v2", "v1") if label in found]


# --- the engine's network namespace: iptables there ---------------------------------------------


def _engine_netns() -> str:
    """dockerd's network namespace (where its bridges and DOCKER-USER are)."""
    try:
        pid = int(Path("/var/run/docker.pid").read_text().strip())
    except (OSError, ValueError):
        pid = 1
    path = f"/proc/{pid}/ns/net"
    if not os.path.exists(path):
        path = "/proc/1/ns/net"
    return path


def in_engine_netns(args: Sequence[str], *, check: bool = True) -> str:
    """Run ``args`` in dockerd's network namespace; return stdout."""
    command = ["nsenter", f"--net={_engine_netns()}", *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
    if check and result.returncode != 0:
        raise ComposeError(
            f"{' '.join(command)}: exit {result.returncode}: {result.stderr.strip()}"
        )
    return result.stdout


def _rule(bridge: str) -> list[str]:
    return ["-i", bridge, "!", "-o", bridge, "-m", "comment", "--comment", COMMENT, "-j", "DROP"]


def add_isolation(bridge: str) -> None:
    """Drop everything entering from ``bridge`` that would leave by another interface."""
    in_engine_netns(["iptables", "-w", "-I", "DOCKER-USER", *_rule(bridge)])


def remove_isolation(bridge: str) -> None:
    in_engine_netns(["iptables", "-w", "-D", "DOCKER-USER", *_rule(bridge)])


def isolation_drops(bridge: str) -> int | None:
    """Packets the bridge's rule dropped so far (None: no such rule)."""
    listing = in_engine_netns(["iptables", "-w", "-L", "DOCKER-USER", "-v", "-x", "-n"])
    for line in listing.splitlines():
        words = line.split()
        if "DROP" in words and bridge in words and COMMENT in line:
            return int(words[0])
    return None


def check_isolation_possible() -> str | None:
    """Why isolation rules cannot be added here, or None."""
    for tool in ("nsenter", "iptables"):
        if not shutil.which(tool) and not os.path.exists(f"/usr/sbin/{tool}"):
            return f"{tool} is not installed"
    try:
        in_engine_netns(["iptables", "-w", "-S", "DOCKER-USER"])
    except (ComposeError, OSError) as exc:
        return f"cannot read Docker's DOCKER-USER chain ({exc})"
    return None


# --- the image ----------------------------------------------------------------------------------


def pick_base_image(client: docker.DockerClient) -> str | None:
    """``$BASE_IMAGE`` if set, else the first of DEFAULT_BASES present in the engine."""
    if os.environ.get("BASE_IMAGE"):
        return os.environ["BASE_IMAGE"]
    for name in DEFAULT_BASES:
        try:
            client.images.get(name)
        except docker.errors.ImageNotFound:
            continue
        return name
    return None


def wheels() -> list[Path]:
    return sorted(WHEELS.glob("*.whl"))


def _context() -> io.BytesIO:
    """A build context with what compose/Dockerfile copies (as Dockerfile.dockerignore keeps)."""
    buffer = io.BytesIO()

    def skip(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
        return None if "__pycache__" in info.name or info.name.endswith(".pyc") else info

    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name in (
            "pyproject.toml",
            "README.md",
            "glue",
            "cmd/simple_endpoint.py",
            "compose/Dockerfile",
            "compose/wheels",
        ):
            tar.add(ROOT / name, arcname=name, filter=skip)
    buffer.seek(0)
    return buffer


def build_image(client: docker.DockerClient, base: str) -> tuple[float, list[str]]:
    """Build IMAGE from compose/Dockerfile with no network; return (seconds, output lines)."""
    started = time.monotonic()
    output: list[str] = []
    for chunk in client.api.build(
        fileobj=_context(),
        custom_context=True,
        dockerfile="compose/Dockerfile",
        buildargs={"BASE_IMAGE": base},
        tag=IMAGE,
        network_mode="none",
        rm=True,
        forcerm=True,
        decode=True,
    ):
        if "stream" in chunk:
            output.extend(chunk["stream"].rstrip("\n").splitlines())
        if "error" in chunk:
            tail = "\n".join(output[-30:])
            raise ComposeError(f"image build failed: {chunk['error']}\n{tail}")
    return time.monotonic() - started, output


# --- a stack ------------------------------------------------------------------------------------


@dataclass
class Event:
    """One ``key=value`` line of simple_endpoint.py, with Docker's timestamp of the line."""

    at: datetime
    fields: dict[str, str]

    @property
    def kind(self) -> str:
        return self.fields.get("event", "")


def _parse_time(stamp: str) -> datetime:
    # Docker: 2026-11-23T14:12:18.141234567Z (nanoseconds; fromisoformat takes microseconds).
    main, _, fraction = stamp.rstrip("Z").partition(".")
    return datetime.fromisoformat(f"{main}.{(fraction + '000000')[:6]}+00:00")


_LIBRARY_PEER = re.compile(r"glue\.discovery: peer added: (\S+) \((\d+)\)")


def parse_events(raw: bytes) -> list[Event]:
    """simple_endpoint.py's ``event=...`` lines (stdout), and glue's own ``peer added: NAME``
    log lines (stderr) as ``event=library_peer_added``, to tell a peer glue met from one the
    demo reported (a callback registered too late misses peers a rendezvous gives at once)."""
    events = []
    for line in raw.decode("utf-8", "replace").splitlines():
        stamp, _, text = line.partition(" ")
        if text.startswith("event="):
            fields = dict(word.split("=", 1) for word in text.split() if "=" in word)
        elif match := _LIBRARY_PEER.search(text):
            fields = {"event": "library_peer_added", "name": match[1], "id": match[2]}
        else:
            continue
        events.append(Event(_parse_time(stamp), fields))
    return events


@dataclass
class Stack:
    client: docker.DockerClient
    cli: ComposeCli
    file: Path
    project: str
    bridge: str | None = None
    #: GLUE_* variables for the compose command line (the files interpolate GLUE_NETWORK_KEY).
    glue_env: dict[str, str] = field(default_factory=dict)
    _up: bool = field(default=False, repr=False)

    def compose(self, *args: str, timeout: float = 120) -> str:
        command = [*self.cli.command, "-p", self.project, "-f", str(self.file), *args]
        env = {k: v for k, v in os.environ.items() if not k.upper().startswith("GLUE_")}
        env.update(self.glue_env)
        result = subprocess.run(
            command,
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if result.returncode != 0:
            raise ComposeError(
                f"{' '.join(command)}: exit {result.returncode}\n"
                f"{result.stdout[-3000:]}{result.stderr[-3000:]}"
            )
        return result.stdout + result.stderr

    def up(self) -> None:
        """Create everything, fence the network off, then start the containers."""
        self._up = True
        self.compose("up", "--no-start", "--no-build")
        networks = self.client.networks.list(filters={"label": f"{PROJECT_LABEL}={self.project}"})
        if len(networks) != 1:
            raise ComposeError(f"{self.project}: expected one network, found {len(networks)}")
        network = networks[0]
        options = network.attrs.get("Options") or {}
        self.bridge = options.get("com.docker.network.bridge.name") or f"br-{network.id[:12]}"
        add_isolation(self.bridge)
        self.compose("up", "-d", "--no-build")

    def down(self) -> None:
        """Remove the containers and the network, then the rule (even if ``down`` failed)."""
        if not self._up:
            return
        try:
            self.compose("down", "--remove-orphans", "-t", "5")
        finally:
            if self.bridge:
                remove_isolation(self.bridge)
                self.bridge = None
            self._up = False

    def containers(self) -> dict[str, Container]:
        found = self.client.containers.list(
            all=True, filters={"label": f"{PROJECT_LABEL}={self.project}"}
        )
        return {c.labels[SERVICE_LABEL]: c for c in found}

    def events(self) -> dict[str, list[Event]]:
        return {
            service: parse_events(container.logs(stdout=True, stderr=True, timestamps=True))
            for service, container in self.containers().items()
        }

    def log_tails(self, lines: int = 15) -> str:
        """Each container's state, every log line but the per-message ones (discovery, gaps,
        warnings, summaries: what explains a failure), and its last ``lines`` lines."""
        noisy = ("event=received", "event=published")
        parts = []
        for service, container in sorted(self.containers().items()):
            container.reload()
            text = container.logs(timestamps=True).decode("utf-8", "replace").splitlines()
            quiet = [line for line in text if not any(word in line for word in noisy)]
            parts.append(
                f"--- {service} ({container.status}): {len(text)} lines, all but messages ---\n"
                + "\n".join(quiet[-60:])
                + f"\n--- {service}: last {lines} ---\n"
                + "\n".join(text[-lines:])
            )
        return "\n".join(parts)


def wait_for(predicate: Callable[[], bool], timeout: float, interval: float = 0.25) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return predicate()
        time.sleep(interval)
    return True


@contextlib.contextmanager
def running(
    client: docker.DockerClient,
    cli: ComposeCli,
    file: Path,
    project: str,
    glue_env: dict[str, str] | None = None,
) -> Iterator[Stack]:
    """A stack that is up inside the block and torn down after it, whatever happened."""
    stack = Stack(client, cli, file, project, glue_env=dict(glue_env or {}))
    try:
        stack.up()
        yield stack
    finally:
        stack.down()


# --- leftovers of killed runs -------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(client: docker.DockerClient) -> list[str]:
    """Remove containers, networks and rules of test stacks whose run is gone; return what."""
    removed: list[str] = []
    stale: set[str] = set()
    projects = [c.labels.get(PROJECT_LABEL, "") for c in client.containers.list(all=True)]
    projects += [
        (n.attrs.get("Labels") or {}).get(PROJECT_LABEL, "") for n in client.networks.list()
    ]
    for project in projects:
        match = _PROJECT.match(project)
        if match and not _pid_alive(int(match.group(1))):
            stale.add(project)
    for project in sorted(stale):
        for container in client.containers.list(
            all=True, filters={"label": f"{PROJECT_LABEL}={project}"}
        ):
            container.remove(force=True)
        for network in client.networks.list(filters={"label": f"{PROJECT_LABEL}={project}"}):
            network.remove()
        removed.append(project)
    # Rules whose bridge is gone (its network was removed, or a run died before `down`).
    for line in in_engine_netns(["iptables", "-w", "-S", "DOCKER-USER"]).splitlines():
        match = re.search(r"-i (\S+) ! -o \1 .*--comment " + COMMENT, line)
        if not match:
            continue
        bridge = match.group(1)
        if in_engine_netns(["ip", "link", "show", "dev", bridge], check=False):
            continue
        remove_isolation(bridge)
        removed.append(f"rule for {bridge}")
    return removed


def summarize(values: Sequence[float]) -> str:
    if not values:
        return "-"
    ordered = sorted(values)
    return f"median {ordered[len(ordered) // 2]:.1f}, max {ordered[-1]:.1f}"


def counts(events: Sequence[Event], kind: str, **match: Any) -> int:
    return sum(
        1
        for event in events
        if event.kind == kind and all(event.fields.get(k) == v for k, v in match.items())
    )
