"""The Kubernetes manifests' containers, run on the image as each manifest runs them.

No cluster here, so each pod of ``deploy/kubernetes`` (both modes) becomes one container of the
image built from ``compose/Dockerfile``, started exactly as its manifest says: command and args
(or the image's entrypoint), working directory, user and group, read-only root filesystem,
dropped capabilities, no privilege escalation, and the environment of its ConfigMap and ``env``.
Each Service that selects a pod becomes a network alias of its container, so the headless
Service's name resolves to every pod, as cluster DNS does. The containers must keep running,
discover each other and exchange messages. The network is a plain bridge fenced off by the same
``DOCKER-USER`` rule as the compose tests.

This is what caught the pods that crash-looped: the manifests ran ``python
cmd/simple_endpoint.py`` in ``/app``, where the image has ``/app/simple_endpoint.py`` only.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from typing import Any

import docker
import pytest
from docker.models.containers import Container as DockerContainer

from glue.security import generate_key
from tests.compose import stack
from tests.compose.stack import Event, parse_events, wait_for
from tests.unit.test_kubernetes_manifests import MODES, Build, Container, build, containers, matches

DEADLINE = 60.0
MIN_MESSAGES = 20

_runs = itertools.count(1)

pytestmark = pytest.mark.timeout(600)  # the first compose test also builds the image


def _aliases(built: Build, container: Container) -> list[str]:
    """The Services whose selector picks this pod: the names it is reached by."""
    return [
        service["metadata"]["name"]
        for service in built.of_kind("Service")
        if matches(service["spec"].get("selector", {}), container.labels)
    ]


def _run_options(container: Container, secret_key: str | None) -> dict[str, Any]:
    """docker run options for what the manifest says about the container and its pod; with
    ``secret_key``, as if the Secret glue-network-key existed (its env entry refers to it)."""
    spec = container.spec
    environment = dict(container.env)
    for variable in spec.get("env", []):
        ref = variable.get("valueFrom", {}).get("secretKeyRef")
        if ref is not None and secret_key is not None:
            assert (ref["name"], ref["key"]) == ("glue-network-key", "network-key")
            environment[variable["name"]] = secret_key
    pod = container.deployment["spec"]["template"]["spec"]
    pod_security = pod.get("securityContext", {})
    security = spec.get("securityContext", {})
    options: dict[str, Any] = {
        "environment": environment,
        "read_only": bool(security.get("readOnlyRootFilesystem")),
        "cap_drop": security.get("capabilities", {}).get("drop", []),
        "security_opt": []
        if security.get("allowPrivilegeEscalation", True)
        else ["no-new-privileges"],
    }
    user = security.get("runAsUser", pod_security.get("runAsUser"))
    group = security.get("runAsGroup", pod_security.get("runAsGroup"))
    if user is not None:
        options["user"] = f"{user}:{group}" if group is not None else str(user)
    if "command" in spec:
        options["entrypoint"] = spec["command"]  # Kubernetes' command replaces ENTRYPOINT
    if "args" in spec:
        options["command"] = spec["args"]  # and args replaces CMD
    if "workingDir" in spec:
        options["working_dir"] = spec["workingDir"]
    return options


class Pods:
    """The containers of one mode on one fenced bridge; removed with their network and rule."""

    def __init__(
        self, client: docker.DockerClient, image: str, mode: str, secret_key: str | None
    ) -> None:
        self.client = client
        self.project = f"{stack.PROJECT_PREFIX}{os.getpid()}x9{next(_runs)}"
        labels = {stack.PROJECT_LABEL: self.project}
        self.network = client.networks.create(self.project, driver="bridge", labels=labels)
        self.bridge = f"br-{self.network.id[:12]}"
        stack.add_isolation(self.bridge)
        self.containers: dict[str, DockerContainer] = {}
        self.sealed = False
        self.built = build(MODES[mode])
        for container in containers(self.built):
            name = container.env["GLUE_ENDPOINT_NAME"]
            created = client.containers.create(
                image,
                name=f"{self.project}-{container.deployment['metadata']['name']}",
                labels={**labels, stack.SERVICE_LABEL: name},
                network=self.network.name,
                networking_config={
                    self.network.name: client.api.create_endpoint_config(
                        aliases=_aliases(self.built, container)
                    )
                },
                **_run_options(container, secret_key),
            )
            self.containers[name] = created
        # The rendezvous first, as its Service exists before any pod: a name Docker's DNS does
        # not know yet is forwarded to the host's resolver, which the fence drops.
        for name in sorted(self.containers, key=lambda n: not n.startswith("glue-rendezvous")):
            self.containers[name].start()

    def events(self) -> dict[str, list[Event]]:
        return {
            name: parse_events(c.logs(stdout=True, stderr=True, timestamps=True))
            for name, c in self.containers.items()
        }

    def report(self) -> str:
        parts = []
        for name, created in self.containers.items():
            created.reload()
            text = created.logs(timestamps=True).decode("utf-8", "replace").splitlines()
            quiet = [line for line in text if "event=received" not in line]
            parts.append(f"--- {name} ({created.status}) ---\n" + "\n".join(quiet[-25:]))
        return "\n".join(parts)

    def close(self) -> None:
        try:
            for created in self.containers.values():
                created.remove(force=True)
            self.network.remove()
        finally:
            stack.remove_isolation(self.bridge)


def _received(events: list[Event], source: str) -> int:
    return sum(1 for e in events if e.kind == "received" and e.fields.get("source") == source)


@pytest.fixture(
    params=[(mode, sealed) for mode in sorted(MODES) for sealed in (False, True)],
    ids=lambda p: f"{p[0]}-{'with' if p[1] else 'without'}-secret",
)
def pods(
    request: pytest.FixtureRequest, docker_client: docker.DockerClient, glue_image: str
) -> Iterator[Pods]:
    mode, sealed = request.param
    running = Pods(docker_client, glue_image, mode, generate_key() if sealed else None)
    running.sealed = sealed
    try:
        yield running
    finally:
        running.close()


def test_the_manifests_pods_start_discover_each_other_and_exchange_messages(pods: Pods) -> None:
    names = set(pods.containers)
    publisher = next(n for n in names if n.startswith("glue-publisher"))
    endpoints = {n for n in names if not n.startswith("glue-rendezvous")}

    def done() -> bool:
        events = pods.events()
        for name in endpoints:
            met = {e.fields["name"] for e in events[name] if e.kind == "peer_added"}
            if not endpoints - {name} <= met:
                return False
        return all(
            _received(events[name], publisher) >= MIN_MESSAGES for name in endpoints - {publisher}
        )

    ok = wait_for(done, DEADLINE)
    for created in pods.containers.values():
        created.reload()
        assert created.status == "running", f"{created.name} is {created.status}\n{pods.report()}"
        assert list(created.attrs["NetworkSettings"]["Networks"]) == [pods.network.name]
        config = created.attrs["Config"]
        host = created.attrs["HostConfig"]
        assert config["User"] == "65532:65532"
        assert host["ReadonlyRootfs"]
        assert host["CapDrop"] == ["ALL"]
    assert ok, f"the pods did not all meet and exchange {MIN_MESSAGES} messages\n{pods.report()}"
    # Each pod serves Prometheus metrics where its annotations say (scraped from inside it).
    scrape = "import urllib.request as u; print(u.urlopen('http://127.0.0.1:9464/metrics').read().decode())"
    for name, created in pods.containers.items():
        code, output = created.exec_run(["python", "-c", scrape], user="65532:65532")
        text = output.decode()
        assert code == 0, f"{name}: {text[-2000:]}"
        assert "glue_peers{" in text, f"{name}: {text[-2000:]}"
    drops = stack.isolation_drops(pods.bridge)
    assert drops == 0, f"{drops} packets tried to leave the pods' network"
    logs = "\n".join(c.logs().decode("utf-8", "replace") for c in pods.containers.values())
    expected = "sealed (key id" if pods.sealed else "no network key"
    assert logs.count(expected) == len(pods.containers), logs[-3000:]
    print(f"\n{sorted(names)}: met and exchanged messages; fence dropped {drops} packets")
