"""deploy/kubernetes: the manifests parse, fit together, and every GLUE_* value is accepted.

No cluster is needed. Each mode is built twice: by a small builder that follows the kustomizations
(resources, components, ``configMapGenerator`` with ``behavior: merge``, ``namespace``, ``images``)
as ``kubectl apply -k`` does, and, where ``kubectl`` is installed, by ``kubectl kustomize`` itself
(offline: it renders, it does not talk to a cluster). The same checks run on both. The containers'
environment (``envFrom`` then ``env``, which wins) is loaded by :func:`glue.settings.load_settings`
as a pod would load it, with the files of its Secret volumes (the network key) written where
the pod mounts them. Nothing here opens a socket or resolves a name: the DNS targets are checked
against the Services of the build.
"""

from __future__ import annotations

import contextlib
import importlib.util
import ipaddress
import json
import re
import shutil
import socket
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from glue import cli
from glue.errors import ConfigError
from glue.security import generate_key
from glue.settings import DEFAULT_DISCOVERY_PORT, GlueSettings, HostPort, load_settings

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"
DOC = ROOT / "docs" / "kubernetes.md"
#: Entry points a user applies with ``kubectl apply -k``.
MODES = {"headless": K8S, "rendezvous": K8S / "rendezvous"}
#: The image's working directory holds the repository's files (compose/Dockerfile).
KNOWN_KINDS = {
    ("v1", "Namespace"),
    ("v1", "Service"),
    ("v1", "ConfigMap"),
    ("apps/v1", "Deployment"),
    ("networking.k8s.io/v1", "NetworkPolicy"),
}
KUSTOMIZATION_API = "kustomize.config.k8s.io/v1beta1"
COMPONENT_API = "kustomize.config.k8s.io/v1alpha1"
METRICS_PORT = 9464
GLUE_LABEL = {"app.kubernetes.io/name": "glue"}
#: The Secret holding the network key, and its key (docs/kubernetes.md: created before applying).
KEY_SECRET = ("glue-network-key", "network-key")
#: The mode of a Secret volume's files when neither ``items[].mode`` nor ``defaultMode`` is set.
SECRET_DEFAULT_MODE = 0o644


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Unit tests run anywhere: fail loudly if anything tries the network; never read a .env."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the manifest tests must not use the network")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.chdir(tmp_path)


# --- a minimal kustomize --------------------------------------------------------------------------


def _documents(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as file:
        docs = [doc for doc in yaml.safe_load_all(file) if doc is not None]
    for doc in docs:
        assert isinstance(doc, dict), f"{path}: a document is not a mapping"
    return docs


def _kustomization(directory: Path) -> dict[str, Any]:
    path = directory / "kustomization.yaml"
    assert path.is_file(), f"{directory} has no kustomization.yaml"
    (doc,) = _documents(path)
    return doc


@dataclass
class Build:
    """What ``kubectl kustomize`` would produce, minus name hashes and label transformers."""

    objects: list[dict[str, Any]] = field(default_factory=list)
    config_maps: dict[str, dict[str, str]] = field(default_factory=dict)
    namespace: str | None = None
    images: list[dict[str, Any]] = field(default_factory=list)
    #: "emulated" (this module's builder) or "kubectl" (rendered by ``kubectl kustomize``).
    source: str = "emulated"

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [obj for obj in self.objects if obj["kind"] == kind]

    def named(self, kind: str, name: str) -> dict[str, Any]:
        (obj,) = [obj for obj in self.of_kind(kind) if obj["metadata"]["name"] == name]
        return obj


def build(directory: Path) -> Build:
    kustomization = _kustomization(directory)
    result = Build()
    for entry in kustomization.get("resources", []):
        path = (directory / entry).resolve()
        if path.is_dir():
            inner = build(path)
            result.objects += inner.objects
            result.config_maps.update(inner.config_maps)
            result.namespace = inner.namespace or result.namespace
            result.images += inner.images
        else:
            result.objects += _documents(path)
    for generator in kustomization.get("configMapGenerator", []):
        name = generator["name"]
        literals = dict(item.split("=", 1) for item in generator.get("literals", []))
        assert set(generator) <= {"name", "literals", "behavior"}, generator
        if generator.get("behavior") == "merge":
            assert name in result.config_maps, f"{directory}: merge into unknown {name}"
            result.config_maps[name] = {**result.config_maps[name], **literals}
        else:
            assert name not in result.config_maps, f"{directory}: {name} generated twice"
            result.config_maps[name] = literals
    for entry in kustomization.get("components", []):
        component = _kustomization(directory / entry)
        assert component["kind"] == "Component", entry
        result.namespace = component.get("namespace", result.namespace)
        result.images += component.get("images", [])
    result.namespace = kustomization.get("namespace", result.namespace)
    result.images += kustomization.get("images", [])
    return result


def render(directory: Path) -> Build:
    """The objects ``kubectl kustomize`` renders (ConfigMap names with their hash)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    done = subprocess.run(
        [kubectl, "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    objects = [doc for doc in yaml.safe_load_all(done.stdout) if doc is not None]
    (namespace,) = [obj for obj in objects if obj["kind"] == "Namespace"]
    return Build(objects=objects, namespace=namespace["metadata"]["name"], source="kubectl")


@dataclass(frozen=True)
class SecretFile:
    """A file the kubelet puts in a container from a Secret volume."""

    secret: str
    key: str
    #: The volume, its entry in ``volumeMounts``, and the item, as the manifest has them.
    volume: dict[str, Any]
    mount: dict[str, Any]
    item: dict[str, Any]

    @property
    def mode(self) -> int:
        source = self.volume["secret"]
        return int(self.item.get("mode", source.get("defaultMode", SECRET_DEFAULT_MODE)))


@dataclass
class Container:
    deployment: dict[str, Any]
    spec: dict[str, Any]
    env: dict[str, str]
    #: The files of Secret volumes, by their path in the container.
    secret_files: dict[str, SecretFile] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.deployment['metadata']['name']}/{self.spec['name']}"

    @property
    def pod(self) -> dict[str, Any]:
        return dict(self.deployment["spec"]["template"]["spec"])

    @property
    def labels(self) -> dict[str, str]:
        return dict(self.deployment["spec"]["template"]["metadata"]["labels"])

    @property
    def command(self) -> list[str]:
        return [*self.spec.get("command", []), *self.spec.get("args", [])]


def _secret_files(pod: dict[str, Any], spec: dict[str, Any]) -> dict[str, SecretFile]:
    volumes = {volume["name"]: volume for volume in pod.get("volumes", [])}
    files: dict[str, SecretFile] = {}
    for mount in spec.get("volumeMounts", []):
        volume = volumes[mount["name"]]  # a mount of no volume: the pod is refused
        if "secret" not in volume:
            continue
        # A subPath mount is never updated, and without items the files are whatever the Secret
        # holds: name the files the container reads.
        assert "subPath" not in mount, f"{spec['name']}: subPath on a Secret volume"
        source = volume["secret"]
        assert source.get("items"), f"{spec['name']}: Secret volume {volume['name']} lists no items"
        for item in source["items"]:
            path = f"{mount['mountPath'].rstrip('/')}/{item['path']}"
            files[path] = SecretFile(source["secretName"], item["key"], volume, mount, item)
    return files


def containers(result: Build) -> Iterator[Container]:
    for deployment in result.of_kind("Deployment"):
        pod_name = f"{deployment['metadata']['name']}-6b7f9c8d5-x4k2p"
        pod = deployment["spec"]["template"]["spec"]
        for spec in pod["containers"]:
            env: dict[str, str] = {}
            for source in spec.get("envFrom", []):
                name = source["configMapRef"]["name"]
                if name in result.config_maps:
                    env.update(result.config_maps[name])
                else:
                    env.update(result.named("ConfigMap", name)["data"])
            for variable in spec.get("env", []):  # env wins over envFrom, as in a pod
                if "value" in variable:
                    env[variable["name"]] = str(variable["value"])
                else:
                    # Secrets come as files (volumes), never as variables: no secretKeyRef.
                    field_path = variable["valueFrom"]["fieldRef"]["fieldPath"]
                    assert field_path == "metadata.name", f"unexpected fieldRef {field_path}"
                    env[variable["name"]] = pod_name
            yield Container(deployment, spec, env, _secret_files(pod, spec))


@contextlib.contextmanager
def pod_environment(container: Container, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The container's environment, its Secret files holding a fresh key each (a variable naming
    one names that file here), for the duration of the block."""
    with monkeypatch.context() as patch, tempfile.TemporaryDirectory() as directory:
        here = {}
        for number, path in enumerate(container.secret_files):
            here[path] = Path(directory) / str(number)
            here[path].write_text(generate_key() + "\n", encoding="utf-8")
        for name, value in container.env.items():
            patch.setenv(name, str(here.get(value, value)))
        yield


def settings_of(container: Container, monkeypatch: pytest.MonkeyPatch) -> GlueSettings:
    """The settings the container's endpoint would start with (same parsing as in the pod)."""
    with pod_environment(container, monkeypatch):
        try:
            return load_settings()
        except ConfigError as exc:  # pragma: no cover - the failure message is the point
            pytest.fail(f"{container.name}: {exc}")


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def service_for(result: Build, host: str) -> dict[str, Any] | None:
    """The Service a DNS name in a pod of this build resolves through, if any."""
    for service in result.of_kind("Service"):
        name = service["metadata"]["name"]
        qualified = f"{name}.{result.namespace}.svc"
        if host.rstrip(".") == name or host.rstrip(".").startswith(qualified):
            return service
    return None


@pytest.fixture(params=sorted(MODES), scope="module")
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(params=["emulated", "kubectl"], scope="module")
def built(mode: str, request: pytest.FixtureRequest) -> Build:
    return build(MODES[mode]) if request.param == "emulated" else render(MODES[mode])


# --- files --------------------------------------------------------------------------------------


def _yaml_files() -> list[Path]:
    return sorted([*K8S.rglob("*.yaml"), *K8S.rglob("*.yml")])


def test_every_document_parses_with_a_known_kind() -> None:
    files = _yaml_files()
    assert files
    for path in files:
        docs = _documents(path)
        assert docs, f"{path} is empty"
        for doc in docs:
            if path.name == "kustomization.yaml":
                assert (doc.get("apiVersion"), doc.get("kind")) in {
                    (KUSTOMIZATION_API, "Kustomization"),
                    (COMPONENT_API, "Component"),
                }, path
                continue
            assert (doc.get("apiVersion"), doc.get("kind")) in KNOWN_KINDS, path
            assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"]), path
            assert "namespace" not in doc["metadata"], f"{path}: the kustomization sets it"


def test_every_manifest_is_used_and_every_reference_is_allowed_by_kustomize() -> None:
    used: set[Path] = set()
    for kustomization_path in K8S.rglob("kustomization.yaml"):
        directory = kustomization_path.parent
        kustomization = _kustomization(directory)
        for entry in kustomization.get("components", []):
            path = (directory / entry).resolve()
            assert _kustomization(path)["kind"] == "Component", entry
            assert not directory.resolve().is_relative_to(path), f"{entry}: cycle"
        for entry in kustomization.get("resources", []):
            path = (directory / entry).resolve()
            assert path.exists(), f"{kustomization_path}: {entry} does not exist"
            if path.is_dir():
                assert (path / "kustomization.yaml").is_file(), path
                # kustomize refuses a base that contains the kustomization ("cycle detected").
                assert not directory.resolve().is_relative_to(path), f"{entry}: cycle"
            else:
                # Files outside the kustomization's directory are refused (load restrictions).
                assert path.is_relative_to(directory.resolve()), f"{entry}: outside the root"
                used.add(path)
    manifests = {p.resolve() for p in _yaml_files() if p.name != "kustomization.yaml"}
    assert manifests == used, f"not in any kustomization: {sorted(map(str, manifests - used))}"
    assert (K8S / "kustomization.yaml").is_file(), "kubectl apply -k deploy/kubernetes/"


# --- each mode, as kubectl apply -k builds it ---------------------------------------------------


def test_names_are_unique_and_everything_has_the_glue_labels(built: Build) -> None:
    keys = [(obj["kind"], obj["metadata"]["name"]) for obj in built.objects]
    assert len(keys) == len(set(keys)), keys
    assert built.namespace == "glue"
    for obj in built.objects:
        assert obj["metadata"]["labels"]["app.kubernetes.io/part-of"] == "glue", obj["metadata"]
        if built.source == "kubectl" and obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == built.namespace, obj["metadata"]


def test_deployment_selectors_match_their_pods_and_only_them(built: Build) -> None:
    deployments = built.of_kind("Deployment")
    assert deployments
    for deployment in deployments:
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert set(deployment["spec"]["selector"]) == {"matchLabels"}
        for other in deployments:
            labels = other["spec"]["template"]["metadata"]["labels"]
            assert matches(selector, labels) == (other is deployment), (
                deployment["metadata"]["name"],
                other["metadata"]["name"],
            )
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert matches(GLUE_LABEL, labels)
        assert labels["app.kubernetes.io/component"] == deployment["metadata"]["name"].removeprefix(
            "glue-"
        )


def test_every_service_selects_pods(built: Build) -> None:
    for service in built.of_kind("Service"):
        selector = service["spec"]["selector"]
        pods = [c for c in containers(built) if matches(selector, c.labels)]
        assert pods, f"Service {service['metadata']['name']} selects no pod"
        for port in service["spec"]["ports"]:
            assert port["protocol"] == "UDP"


def test_the_headless_service_lists_every_glue_pod_ready_or_not(built: Build) -> None:
    peers = built.named("Service", "glue-peers")
    spec = peers["spec"]
    assert spec["clusterIP"] == "None"
    assert spec["publishNotReadyAddresses"] is True
    for container in containers(built):
        assert matches(spec["selector"], container.labels), container.name
    assert [(p["protocol"], p["port"], p["targetPort"]) for p in spec["ports"]] == [
        ("UDP", DEFAULT_DISCOVERY_PORT, DEFAULT_DISCOVERY_PORT)
    ]


def test_every_glue_variable_is_a_setting(built: Build) -> None:
    fields = set(GlueSettings.model_fields)
    for container in containers(built):
        names = [name for name in container.env if name.startswith("GLUE_")]
        assert names, container.name
        assert set(names) == set(container.env), f"{container.name}: only GLUE_* is set"
        for name in names:
            assert name.removeprefix("GLUE_").lower() in fields, f"{container.name}: {name}"
    for values in built.config_maps.values():
        for name in values:
            assert name.removeprefix("GLUE_").lower() in fields, name


def test_every_environment_is_accepted_and_uses_unicast_discovery(
    built: Build, monkeypatch: pytest.MonkeyPatch
) -> None:
    for container in containers(built):
        settings = settings_of(container, monkeypatch)
        # Multicast does not cross most CNIs: discovery must be unicast, on the pod's addresses.
        listen = settings.discovery_listen_address
        assert listen is not None, container.name
        assert listen.host == "0.0.0.0", container.name
        assert settings.listen_address == HostPort("0.0.0.0", 0), container.name
        for target in settings.discovery_target_address:
            with_literal = re.fullmatch(r"[0-9.]+", target.host)
            assert not with_literal, f"{container.name}: {target} (use a Service name)"
        assert settings.endpoint_name == container.env["GLUE_ENDPOINT_NAME"]


def test_service_ports_and_targets_match_the_discovery_listeners(
    built: Build, monkeypatch: pytest.MonkeyPatch
) -> None:
    listeners: dict[str, int] = {}
    for container in containers(built):
        settings = settings_of(container, monkeypatch)
        assert settings.discovery_listen_address is not None
        port = settings.discovery_listen_address.port
        listeners[container.name] = port
        declared = [p for p in container.spec["ports"] if p["name"] == "discovery"]
        assert [(p["containerPort"], p["protocol"]) for p in declared] == [(port, "UDP")]
        for service in built.of_kind("Service"):
            if matches(service["spec"]["selector"], container.labels):
                for service_port in service["spec"]["ports"]:
                    assert service_port["targetPort"] == port, service["metadata"]["name"]
    for container in containers(built):
        for target in settings_of(container, monkeypatch).discovery_target_address:
            found = service_for(built, target.host)
            assert found is not None, f"{container.name}: no Service named {target.host}"
            assert target.port in [p["port"] for p in found["spec"]["ports"]]
            selector = found["spec"]["selector"]
            behind = [c for c in containers(built) if matches(selector, c.labels)]
            assert behind
            for pod in behind:
                assert listeners[pod.name] == target.port, (container.name, target, pod.name)


def test_one_publisher_subscribers_and_a_rendezvous_that_does_not_announce(
    built: Build, mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    roles: dict[str, list[Container]] = {}
    for container in containers(built):
        roles.setdefault(container.labels["app.kubernetes.io/component"], []).append(container)
    expected = {"publisher", "subscriber"} | ({"rendezvous"} if mode == "rendezvous" else set())
    assert set(roles) == expected
    (publisher,) = roles["publisher"]
    assert publisher.deployment["spec"]["replicas"] == 1
    assert publisher.deployment["spec"]["strategy"]["type"] == "Recreate"
    assert "--send-messages" in publisher.command
    for subscriber in roles["subscriber"]:
        assert subscriber.deployment["spec"]["replicas"] >= 1
        assert "--send-messages" not in subscriber.command
    if mode == "rendezvous":
        (rendezvous,) = roles["rendezvous"]
        assert rendezvous.deployment["spec"]["replicas"] == 1
        assert settings_of(rendezvous, monkeypatch).discovery_target_address == ()
        service = built.named("Service", "glue-rendezvous")
        assert service["spec"].get("clusterIP") != "None"  # one stable address
        for container in [*roles["publisher"], *roles["subscriber"]]:
            targets = settings_of(container, monkeypatch).discovery_target_address
            assert [service_for(built, t.host) for t in targets] == [service]
    else:
        for container in containers(built):
            targets = settings_of(container, monkeypatch).discovery_target_address
            assert [t.host for t in targets] == ["glue-peers"]


def _simple_endpoint_parser() -> Any:
    path = ROOT / "cmd" / "simple_endpoint.py"
    spec = importlib.util.spec_from_file_location("simple_endpoint", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module._parser()


@dataclass(frozen=True)
class Image:
    """What compose/Dockerfile puts in the image: files (image path -> repository path), the
    entrypoint, the working directory, and the directories of PATH that hold commands."""

    files: dict[str, str]
    entrypoint: list[str]
    workdir: str
    commands: dict[str, list[str]]


def _image() -> Image:
    files: dict[str, str] = {}
    entrypoint: list[str] = []
    workdir = "/"
    for line in (ROOT / "compose" / "Dockerfile").read_text().splitlines():
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        if words[0] == "COPY" and len(words) == 3:
            files[words[2]] = words[1]
        elif words[0] == "ENTRYPOINT":
            entrypoint = json.loads(line.split(None, 1)[1])
        elif words[0] == "WORKDIR":
            workdir = words[1]
    # glue's console scripts, installed in the venv on PATH (pyproject.toml [project.scripts]).
    commands = {"glue": ["python", "-m", "glue"], "python": ["python"]}
    return Image(files, entrypoint, workdir, commands)


def _check_runs_in_image(name: str, spec: dict[str, Any], image: Image) -> None:
    """What the container runs is the manifest's command (or the image's entrypoint) plus its
    args, in the image's working directory unless the manifest sets one: every file it names
    must be one the Dockerfile copies into the image, and its arguments must parse."""
    workdir = spec.get("workingDir", image.workdir)
    argv = [*spec.get("command", image.entrypoint), *spec.get("args", [])]
    assert argv[0] in image.commands, f"{name}: {argv[0]} is not in the image"
    argv = [*image.commands[argv[0]], *argv[1:]]
    if argv[1] == "-m":
        assert argv[2] == "glue", name
        cli._parser().parse_args(argv[3:])
        return
    script = argv[1] if argv[1].startswith("/") else f"{workdir.rstrip('/')}/{argv[1]}"
    assert script in image.files, f"{name}: no {script} in the image"
    assert image.files[script] == "cmd/simple_endpoint.py", name
    _simple_endpoint_parser().parse_args(argv[2:])


def test_commands_run_in_the_image_as_built(built: Build) -> None:
    image = _image()
    assert image.entrypoint[:1] == ["python"]
    for container in containers(built):
        _check_runs_in_image(container.name, container.spec, image)


def test_the_command_that_crash_looped_is_refused() -> None:
    # The manifests once ran `python cmd/simple_endpoint.py` in /app, where the image has
    # /app/simple_endpoint.py only: the pods crash-looped while a check against the repository
    # passed. The check against the image refuses it.
    old = {"workingDir": "/app", "command": ["python", "cmd/simple_endpoint.py"]}
    with pytest.raises(AssertionError, match=r"no /app/cmd/simple_endpoint.py in the image"):
        _check_runs_in_image("old", old, _image())


def test_one_image_changed_in_one_place(built: Build) -> None:
    images = {c.spec["image"] for c in containers(built)}
    assert images == {"glue:latest"}
    if built.source == "emulated":
        assert [image["name"] for image in built.images] == ["glue"]
    for container in containers(built):
        assert container.spec["imagePullPolicy"] == "IfNotPresent"  # a locally loaded image


def test_resources_and_security(built: Build) -> None:
    for container in containers(built):
        resources = container.spec["resources"]
        for kind in ("requests", "limits"):
            assert set(resources[kind]) == {"cpu", "memory"}, container.name
        assert container.spec["securityContext"]["allowPrivilegeEscalation"] is False
        pod = container.deployment["spec"]["template"]["spec"]
        # GLUE_<SERVICE>_* variables injected for Services must not reach the settings.
        assert pod["enableServiceLinks"] is False, container.name


def test_the_network_policy_allows_udp_between_glue_pods_and_dns(built: Build) -> None:
    (policy,) = built.of_kind("NetworkPolicy")
    spec = policy["spec"]
    for container in containers(built):
        assert matches(spec["podSelector"]["matchLabels"], container.labels), container.name
    ingress, scrape = spec["ingress"]
    assert [peer["podSelector"]["matchLabels"] for peer in ingress["from"]] == [GLUE_LABEL]
    assert ingress["ports"] == [{"protocol": "UDP"}]  # data ports are ephemeral: any UDP port
    assert "from" not in scrape  # Prometheus, wherever it runs
    assert scrape["ports"] == [{"protocol": "TCP", "port": METRICS_PORT}]
    to_glue, dns = spec["egress"]
    assert [peer["podSelector"]["matchLabels"] for peer in to_glue["to"]] == [GLUE_LABEL]
    assert to_glue["ports"] == [{"protocol": "UDP"}]
    assert "to" not in dns
    assert {(p["protocol"], p["port"]) for p in dns["ports"]} == {("UDP", 53), ("TCP", 53)}


def readable_by_container_user(container: Container, file: SecretFile) -> bool:
    """Whether the container's process may read the file as the kubelet makes it: owned by root,
    group ``fsGroup`` (root without one), mode ``items[].mode`` or ``defaultMode`` (0644), to
    which an ``fsGroup`` adds group read (the volume is read-only). The process runs as
    ``runAsUser:runAsGroup`` (the container's over the pod's) with ``fsGroup`` and
    ``supplementalGroups`` as extra groups; permissions are those of the first class it is in."""
    pod_security = container.pod.get("securityContext", {})
    security = {**pod_security, **container.spec.get("securityContext", {})}
    fs_group = pod_security.get("fsGroup")
    owner, group = 0, (0 if fs_group is None else fs_group)
    mode = file.mode | (0o440 if fs_group is not None else 0)
    user = security.get("runAsUser")
    assert user is not None, f"{container.name}: the image's user is not known here"
    groups = {security.get("runAsGroup", 0), *pod_security.get("supplementalGroups", [])}
    groups |= set() if fs_group is None else {fs_group}
    if user == owner:
        return bool(mode & stat.S_IRUSR)
    if group in groups:
        return bool(mode & stat.S_IRGRP)
    return bool(mode & stat.S_IROTH)


def test_every_pod_reads_the_network_key_from_the_required_secret_mounted_read_only(
    built: Build, monkeypatch: pytest.MonkeyPatch
) -> None:
    for container in containers(built):
        names = [v["name"] for v in container.spec.get("env", [])]
        # Never a literal, nor from a ConfigMap, nor a secretKeyRef: only the mounted file.
        assert "GLUE_NETWORK_KEY" not in names, container.name
        assert "GLUE_NETWORK_KEY" not in container.env, container.name
        path = container.env["GLUE_NETWORK_KEY_FILE"]
        assert path in container.secret_files, f"{container.name}: {path} is no Secret's file"
        file = container.secret_files[path]
        assert (file.secret, file.key) == KEY_SECRET, container.name
        # Required: without the Secret the pod waits (event: secret "glue-network-key" not
        # found) instead of starting with an empty directory and exiting on the missing file.
        assert file.volume["secret"]["optional"] is False, container.name
        assert file.mount["readOnly"] is True, container.name
        assert readable_by_container_user(container, file), f"{container.name}: {path}"
        assert not file.mode & 0o007, f"{container.name}: {path} is readable by other users"
        # The endpoint reads one key from that file (a fresh one here).
        with pod_environment(container, monkeypatch):
            keys = load_settings().network_keys()
        assert keys is not None
        assert len(keys) == 1, container.name


def test_a_secret_file_unreadable_by_the_container_user_is_seen() -> None:
    # Mode 0440 without fsGroup makes the file root:root 0440, which uid 65532 cannot read.
    volume = {"name": "k", "secret": {"secretName": "s", "defaultMode": 0o440}}
    item = {"key": "k", "path": "k"}
    file = SecretFile("s", "k", volume, {"name": "k", "mountPath": "/k"}, item)
    pod = {"securityContext": {"runAsUser": 65532, "runAsGroup": 65532}}
    deployment = {"metadata": {"name": "d"}, "spec": {"template": {"spec": pod}}}
    container = Container(deployment, {"name": "c"}, {})
    assert not readable_by_container_user(container, file)
    pod["securityContext"]["fsGroup"] = 65532
    assert readable_by_container_user(container, file)
    pod["securityContext"] = {"runAsUser": 65532, "runAsGroup": 65532}
    volume["secret"]["defaultMode"] = 0o444
    assert readable_by_container_user(container, file)


def test_every_pod_serves_metrics_where_its_annotations_say(
    built: Build, monkeypatch: pytest.MonkeyPatch
) -> None:
    for container in containers(built):
        template = container.deployment["spec"]["template"]
        annotations = template["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == str(METRICS_PORT)
        assert annotations["prometheus.io/path"] == "/metrics"
        ports = {p["name"]: p for p in container.spec["ports"]}
        assert ports["metrics"] == {
            "name": "metrics",
            "containerPort": METRICS_PORT,
            "protocol": "TCP",
        }
        settings = settings_of(container, monkeypatch)
        assert settings.metrics_address == HostPort("0.0.0.0", METRICS_PORT), container.name


# --- the documentation --------------------------------------------------------------------------


def test_the_docs_show_how_to_apply_and_their_target_examples_are_valid(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    text = DOC.read_text(encoding="utf-8")
    assert "kubectl apply -k deploy/kubernetes/" in text
    assert "kubectl apply -k deploy/kubernetes/rendezvous/" in text
    for needle in ("event=received", "event=peer_added", "GLUE_MAX_PEERS", "publishNotReady"):
        assert needle in text, needle
    # The quick start creates the Secret every pod requires before it applies.
    run_it = text.split("\n## Run it\n", 1)[1].split("\n## ", 1)[0]
    create = run_it.index(
        f"kubectl -n glue create secret generic {KEY_SECRET[0]} --from-literal={KEY_SECRET[1]}="
    )
    assert create < run_it.index("kubectl apply -k deploy/kubernetes/")
    examples = re.findall(r"GLUE_DISCOVERY_TARGET_ADDRESS=([^\s`'\"]+)", text)
    assert "glue-rendezvous:27320,glue-peers:27320" in examples
    both = build(MODES["rendezvous"])
    for example in examples:
        monkeypatch.setenv("GLUE_DISCOVERY_TARGET_ADDRESS", example)
        settings = load_settings()
        for target in settings.discovery_target_address:
            try:
                ipaddress.IPv4Address(target.host)
            except ValueError:
                assert service_for(both, target.host) is not None, example
