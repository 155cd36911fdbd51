"""The Kubernetes manifests' containers, run on the image as each manifest runs them.

No cluster here, so each pod of ``deploy/kubernetes`` (both modes) becomes one container of the
image built from ``compose/Dockerfile``, started exactly as its manifest says: command and args
(or the image's entrypoint), working directory, user and group, read-only root filesystem,
dropped capabilities, no privilege escalation, the environment of its ConfigMap and ``env``, and
its Secret volume (the network key) as a read-only bind mount of a directory laid out as the
kubelet lays it out: a key from :func:`glue.security.generate_key`, the manifest's mode, owned by
root and the pod's ``fsGroup``. Each Service that selects a pod becomes a network alias of its
container, so the headless Service's name resolves to every pod, as cluster DNS does. The
containers must keep running, discover each other, exchange messages and seal with one key id.
The network is a plain bridge fenced off by the same ``DOCKER-USER`` rule as the compose tests.
A container whose Secret is absent (an empty directory, what an optional Secret volume would be)
must exit at once naming ``GLUE_NETWORK_KEY_FILE``: why the manifests make the Secret required.

This is what caught the pods that crash-looped: the manifests ran ``python
cmd/simple_endpoint.py`` in ``/app``, where the image has ``/app/simple_endpoint.py`` only.
"""

from __future__ import annotations

import itertools
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import docker
import pytest
from docker.models.containers import Container as DockerContainer

from glue.security import generate_key
from tests.compose import stack
from tests.compose.stack import Event, parse_events, wait_for
from tests.unit.test_kubernetes_manifests import (
    KEY_SECRET,
    MODES,
    SECRET_DEFAULT_MODE,
    Build,
    Container,
    build,
    containers,
    matches,
)

DEADLINE = 60.0
MIN_MESSAGES = 20
#: Seconds within which every container of a mode exits when its key file is missing.
QUICK_EXIT = 20.0

_runs = itertools.count(1)

pytestmark = pytest.mark.timeout(600)  # the first compose test also builds the image


def _aliases(built: Build, container: Container) -> list[str]:
    """The Services whose selector picks this pod: the names it is reached by."""
    return [
        service["metadata"]["name"]
        for service in built.of_kind("Service")
        if matches(service["spec"].get("selector", {}), container.labels)
    ]


def _secret_volume(
    container: Container, mount: dict[str, Any], host: Path, key: str | None
) -> None:
    """Lay out ``host`` as the kubelet lays out the Secret volume of ``mount``: each item a
    symlink through ``..data`` to a file of a timestamped directory, owned by root and the pod's
    ``fsGroup`` (root without one), its mode the item's or ``defaultMode``, to which an
    ``fsGroup`` adds group read. With ``key`` None the Secret is absent: the directory is empty,
    what an optional Secret volume gives."""
    pod = container.pod
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    source = volume["secret"]
    fs_group = pod.get("securityContext", {}).get("fsGroup")
    group = 0 if fs_group is None else int(fs_group)
    host.mkdir(mode=0o755)
    os.chown(host, 0, group)
    host.chmod(0o755)
    if key is None:
        return
    data = host / time.strftime("..%Y_%m_%d_%H_%M_%S.000000000")
    data.mkdir(mode=0o755)
    os.chown(data, 0, group)
    data.chmod(0o755)
    (host / "..data").symlink_to(data.name)
    for item in source["items"]:
        assert (source["secretName"], item["key"]) == KEY_SECRET, item  # the only Secret here
        mode = int(item.get("mode", source.get("defaultMode", SECRET_DEFAULT_MODE)))
        mode |= 0o440 if fs_group is not None else 0
        file = data / item["path"]
        file.write_text(key + "\n", encoding="utf-8")
        os.chown(file, 0, group)
        file.chmod(mode)
        (host / item["path"]).symlink_to(f"..data/{item['path']}")


def _run_options(container: Container, secrets: Path, key: str | None) -> dict[str, Any]:
    """docker run options for what the manifest says about the container and its pod; its Secret
    volumes made under ``secrets`` (see :func:`_secret_volume`), holding ``key`` if not None."""
    spec = container.spec
    pod = container.pod
    pod_security = pod.get("securityContext", {})
    security = spec.get("securityContext", {})
    volumes: dict[str, dict[str, str]] = {}
    for number, mount in enumerate(spec.get("volumeMounts", [])):
        host = secrets / f"{container.deployment['metadata']['name']}-{number}"
        _secret_volume(container, mount, host, key)
        mode = "ro" if mount.get("readOnly") else "rw"
        volumes[str(host)] = {"bind": mount["mountPath"], "mode": mode}
    options: dict[str, Any] = {
        "environment": dict(container.env),
        "volumes": volumes,
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
    # The kubelet adds fsGroup (the group of the volumes' files) and supplementalGroups to the
    # groups of the container's process.
    extra = [*pod_security.get("supplementalGroups", [])]
    extra += [] if pod_security.get("fsGroup") is None else [pod_security["fsGroup"]]
    if extra:
        options["group_add"] = [str(g) for g in extra]
    if "command" in spec:
        options["entrypoint"] = spec["command"]  # Kubernetes' command replaces ENTRYPOINT
    if "args" in spec:
        options["command"] = spec["args"]  # and args replaces CMD
    if "workingDir" in spec:
        options["working_dir"] = spec["workingDir"]
    return options


class Pods:
    """The containers of one mode on one fenced bridge; removed with their network and rule."""

    def __init__(self, client: docker.DockerClient, image: str, mode: str, secrets: Path) -> None:
        self.client = client
        self.project = f"{stack.PROJECT_PREFIX}{os.getpid()}x9{next(_runs)}"
        labels = {stack.PROJECT_LABEL: self.project}
        self.network = client.networks.create(self.project, driver="bridge", labels=labels)
        self.bridge = f"br-{self.network.id[:12]}"
        stack.add_isolation(self.bridge)
        self.containers: dict[str, DockerContainer] = {}
        self.built = build(MODES[mode])
        key = generate_key()
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
                **_run_options(container, secrets, key),
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


@pytest.fixture(params=sorted(MODES))
def pods(
    request: pytest.FixtureRequest,
    docker_client: docker.DockerClient,
    glue_image: str,
    tmp_path: Path,
) -> Iterator[Pods]:
    running = Pods(docker_client, glue_image, request.param, tmp_path)
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
        mounts = [(m["Destination"], m["RW"]) for m in created.attrs["Mounts"]]
        assert mounts == [("/var/run/secrets/glue", False)], mounts
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
    # Every pod read the key from the mounted file and seals with it: one key id for all.
    logs = "\n".join(c.logs().decode("utf-8", "replace") for c in pods.containers.values())
    ids = re.findall(r"sealed \(key id ([^)]+)\)", logs)
    assert len(ids) == len(pods.containers), logs[-3000:]
    assert len(set(ids)) == 1, ids
    assert "no network key" not in logs
    print(
        f"\n{sorted(names)}: met and exchanged messages sealed with key id {ids[0]}; fence "
        f"dropped {drops} packets"
    )


@pytest.mark.parametrize("mode", sorted(MODES))
def test_a_pod_whose_key_file_is_missing_exits_at_once_naming_the_variable(
    mode: str, docker_client: docker.DockerClient, glue_image: str, tmp_path: Path
) -> None:
    """What a pod would do if the Secret volume were optional and the Secret absent: an empty
    directory where the key file should be. The manifests make the Secret required so that the
    pod waits for it instead (ContainerCreating) of crash-looping on this."""
    project = f"{stack.PROJECT_PREFIX}{os.getpid()}x9{next(_runs)}"
    created: list[DockerContainer] = []
    try:
        for container in containers(build(MODES[mode])):
            options = _run_options(container, tmp_path, None)
            # It stops before opening any socket; no network at all, to be sure of it.
            created.append(
                docker_client.containers.create(
                    glue_image,
                    name=f"{project}-{container.deployment['metadata']['name']}",
                    labels={stack.PROJECT_LABEL: project},
                    network_mode="none",
                    **options,
                )
            )
        began = time.monotonic()
        for one in created:
            one.start()
        for one in created:
            result = one.wait(timeout=DEADLINE)
            output = one.logs().decode("utf-8", "replace")
            assert result["StatusCode"] != 0, f"{one.name}: exited 0\n{output}"
            assert "GLUE_NETWORK_KEY_FILE='/var/run/secrets/glue/network-key'" in output, output
            assert "cannot read it: No such file or directory" in output, output
            assert "started" not in output, f"{one.name}: the endpoint started\n{output}"
        seconds = time.monotonic() - began
        # Python's start and glue's imports, nothing more: no wait, no retry.
        assert seconds < QUICK_EXIT, f"{len(created)} containers took {seconds:.1f}s to exit"
        print(f"\n{mode}: {len(created)} containers exited naming the key file in {seconds:.1f}s")
    finally:
        for one in created:
            one.remove(force=True)
