"""The compose demos (compose/*.yml) run as a user runs them, through the compose CLI: every
subscriber discovers every peer (``event=peer_added``) and receives the publisher's messages, in
order; and nothing leaves the compose network (an iptables rule drops it; it must drop 0).

Parametrized over the compose CLIs present: ``docker compose`` (v2) and ``docker-compose`` (v1).
Prints what it measured: time to discover every peer and to the first message, counts, gaps.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Sequence

import docker
import pytest

from glue.security import generate_key
from tests.compose import stack
from tests.compose.stack import ComposeCli, Event, counts, running, summarize, wait_for

SUBSCRIBERS = ("subscriber-1", "subscriber-2", "subscriber-3")
PUBLISHER = "publisher"
MIN_MESSAGES = 40  # per subscriber: 2 s of the publisher's 20 messages/s
DEADLINE = 90.0  # seconds for every subscriber to meet every peer and get MIN_MESSAGES
PAYLOAD = str(64 * 1024)

CLIS = stack.available_clis()
_projects = itertools.count(1)

pytestmark = pytest.mark.timeout(600)  # the first test also builds the image


def _peers(events: Sequence[Event]) -> set[str]:
    """Peers met, as simple_endpoint.py reports them (``event=peer_added``)."""
    return {e.fields["name"] for e in events if e.kind == "peer_added"}


def _logged_only(events: Sequence[Event]) -> set[str]:
    """Peers in glue's own log that never got an ``event=peer_added`` line: a callback missed
    (simple_endpoint.py once registered it only after start(), and a rendezvous answers at
    once). Printed to explain a failure."""
    return {e.fields["name"] for e in events if e.kind == "library_peer_added"} - _peers(events)


def _received(events: Sequence[Event]) -> list[Event]:
    return [e for e in events if e.kind == "received" and e.fields.get("source") == PUBLISHER]


def _run(
    client: docker.DockerClient,
    cli: ComposeCli | None,
    file: str,
    nodes: set[str],
    glue_env: dict[str, str] | None = None,
) -> str:
    """Run the stack until every node met every other and subscribers got enough; check it;
    return every line the containers logged."""
    if cli is None:
        pytest.fail(
            "a Docker engine answers but no compose CLI is installed: install docker-compose "
            "(v1, Debian) or the docker compose plugin (v2)",
            pytrace=False,
        )
    project = f"{stack.PROJECT_PREFIX}{os.getpid()}x{next(_projects)}"
    path = stack.COMPOSE / file
    with running(client, cli, path, project, glue_env) as up:
        bridge = up.bridge
        assert bridge is not None
        started = time.monotonic()

        def ready() -> bool:
            events = up.events()
            return all(_peers(events.get(node, [])) >= nodes - {node} for node in nodes) and all(
                len(_received(events.get(name, []))) >= MIN_MESSAGES for name in SUBSCRIBERS
            )

        done = wait_for(ready, DEADLINE)
        waited = time.monotonic() - started
        events = up.events()
        containers = up.containers()
        for container in containers.values():
            container.reload()
        exited = {s: c.status for s, c in containers.items() if c.status != "running"}
        drops = stack.isolation_drops(bridge)
        logs = up.log_tails()
        everything = "\n".join(c.logs().decode("utf-8", "replace") for c in containers.values())

    print(f"\n{file} with {' '.join(cli.command)} {cli.version} ({cli.label}), bridge {bridge}:")
    print(f"  waited {waited:.1f}s for every peer and {MIN_MESSAGES} messages per subscriber")
    publisher = events.get(PUBLISHER, [])
    published = [e for e in publisher if e.kind == "published"]
    print(f"  publisher: published {len(published)}, failed {counts(publisher, 'publish_failed')}")
    first_publish = published[0].at if published else None
    for node in sorted(nodes):
        mine = events.get(node, [])
        start = min(  # glue may log a peer just before simple_endpoint.py says started
            (e.at for e in mine if e.kind in ("started", "library_peer_added")), default=None
        )
        needed = nodes - {node}
        added = [e for e in mine if e.kind == "peer_added" and e.fields.get("name") in needed]
        met = max((e.at for e in added), default=None)
        line = f"  {node}: peers {len(_peers(mine) & needed)}/{len(needed)}"
        if needed - _peers(mine):
            line += f" (never met {', '.join(sorted(needed - _peers(mine)))})"
        if start and met:
            line += f" all met {(met - start).total_seconds():.2f}s after start"
        line += f", removed {counts(mine, 'peer_removed')}"
        if _logged_only(mine):
            missed = ", ".join(sorted(_logged_only(mine)))
            line += f" [in glue's log but no event=peer_added: {missed}]"
        got = _received(mine)
        if node in SUBSCRIBERS and got:
            first = got[0]
            since = (first.at - first_publish).total_seconds() if first_publish else float("nan")
            latencies = [float(e.fields["latency_ms"]) for e in got]
            line += (
                f"; received {len(got)} (first seq {first.fields['seq']}, {since:.2f}s after "
                f"the first publish), gaps {counts(mine, 'gap')}, latency ms "
                f"{summarize(latencies)}"
            )
        print(line)
    print(f"  packets dropped leaving the compose network: {drops}")

    assert done, f"not every subscriber met every peer and got {MIN_MESSAGES} messages\n{logs}"
    assert not exited, f"containers stopped: {exited}\n{logs}"
    for name in SUBSCRIBERS:
        got = _received(events[name])
        sequences = [int(e.fields["seq"]) for e in got]
        assert sequences == sorted(set(sequences)), f"{name}: out of order or duplicated"
        assert {e.fields["bytes"] for e in got} == {PAYLOAD}, f"{name}: wrong sizes"
    assert drops == 0, f"{drops} packets tried to leave the compose network"
    return everything


@pytest.mark.parametrize("cli", CLIS or [None], ids=lambda c: c.label if c else "no-cli")
def test_multicast_stack(
    docker_client: docker.DockerClient, glue_image: str, cli: ComposeCli
) -> None:
    """compose/docker-compose.yml: 3 subscribers and a publisher meet by multicast."""
    _run(docker_client, cli, "docker-compose.yml", {*SUBSCRIBERS, PUBLISHER})


@pytest.mark.parametrize("cli", CLIS or [None], ids=lambda c: c.label if c else "no-cli")
def test_rendezvous_stack(
    docker_client: docker.DockerClient, glue_image: str, cli: ComposeCli
) -> None:
    """compose/docker-compose.rendezvous.yml: the same, meeting through a unicast rendezvous
    found by its service name; the rendezvous meets all four too."""
    _run(
        docker_client, cli, "docker-compose.rendezvous.yml", {*SUBSCRIBERS, PUBLISHER, "rendezvous"}
    )


@pytest.mark.parametrize("file", ["docker-compose.yml", "docker-compose.rendezvous.yml"])
def test_the_stacks_sealed_with_a_network_key_from_the_environment(
    docker_client: docker.DockerClient, glue_image: str, file: str
) -> None:
    """The same stacks with GLUE_NETWORK_KEY given to compose (as from compose/.env): every
    endpoint seals, and they meet and deliver as without a key."""
    from glue.security import NetworkKeys, parse_keys

    key = generate_key()
    nodes = {*SUBSCRIBERS, PUBLISHER} | ({"rendezvous"} if "rendezvous" in file else set())
    logs = _run(docker_client, CLIS[0] if CLIS else None, file, nodes, {"GLUE_NETWORK_KEY": key})
    key_id = NetworkKeys(parse_keys(key), 1).key_ids[0]
    assert logs.count(f"sealed (key id {key_id})") == len(nodes)
