"""Models in the simulator: replicas editing at random over a network that loses, duplicates and
reorders datagrams, with partitions that open and heal, all converge to one state; so does a
fifth replica started afterwards.

Each node's :class:`~glue.modelsync.ModelSync` is driven here as the runtimes drive it: its
messages published on its node's topics, the node's topic deliveries and peer removals fed back,
its timers run on the virtual clock (``glue.sim`` knows nothing of models).
"""

from __future__ import annotations

import random
from typing import Any

import pycrdt
import pytest

from glue.events import PeerRemoved
from glue.modelsync import (
    TOPIC_TYPE,
    ModelConfig,
    ModelSync,
    inbox_topic,
    state_topic,
    update_topic,
)
from glue.sim import NetworkProfile, SimNode, Simulation

NAME = "plant/state"
RATE_S = 0.5


class SimModel:
    """One node's model: the sans-IO sync, pumped between simulation steps."""

    def __init__(self, node: SimNode, client_id: int) -> None:
        self.node = node
        self.sync = ModelSync(
            NAME,
            endpoint_id=node.endpoint_id,
            doc=pycrdt.Doc(client_id=client_id),
            config=ModelConfig(announce_s=RATE_S, pull_timeout_s=10 * RATE_S),
            now=node.sim.now,
        )
        for topic in (state_topic(NAME), update_topic(NAME), inbox_topic(NAME, node.endpoint_id)):
            node.subscribe(topic, TOPIC_TYPE)
        self._messages = 0
        self._events = 0

    @property
    def root(self) -> pycrdt.Map[Any]:
        return self.sync.root

    def pending(self) -> bool:
        """Whether the node received something the model has not seen."""
        node = self.node
        return len(node.topic_messages) > self._messages or len(node.events) > self._events

    def pump(self) -> None:
        node, sync, now = self.node, self.sync, self.node.sim.now
        for _, event in node.events[self._events :]:
            if isinstance(event, PeerRemoved):
                sync.peer_removed(event.peer.endpoint_id)
        self._events = len(node.events)
        arrived = node.topic_messages[self._messages :]
        state = state_topic(NAME)
        if any(message.topic_name == state for message in arrived):
            # As the runtimes do: who holds the model now, by the topics layer's interest.
            sync.set_holders(node.stack.topics.subscribers(state))
        for message in arrived:
            sync.receive(message.topic_name, message.source_id, message.payload, now=now)
        self._messages = len(node.topic_messages)
        deadline = sync.next_deadline()
        if deadline is not None and deadline <= now:
            sync.handle_timer(now=now)
        for out in sync.messages_to_send():
            node.publish(
                out.topic,
                TOPIC_TYPE,
                out.payload,
                expiry=out.expiry_s,
                history_depth=1 if out.retain else 0,
            )
        while sync.next_event() is not None:
            pass


def run(sim: Simulation, models: list[SimModel], seconds: float) -> None:
    """Advance ``seconds`` of virtual time, pumping the models whenever something arrives for
    them or a model timer is due."""
    end = sim.now + seconds
    while sim.now < end:
        for model in models:
            model.pump()
        deadlines = [d for m in models if (d := m.sync.next_deadline()) is not None]
        until = min([end, *deadlines])
        sim.run_until(lambda: any(m.pending() for m in models), timeout=max(0.0, until - sim.now))


def edit(rng: random.Random, root: pycrdt.Map[Any]) -> None:
    """One random edit: map sets and deletes, array inserts and deletes, text inserts."""
    roll = rng.random()
    if roll < 0.3:
        root[f"k{rng.randrange(30)}"] = rng.choice([rng.randrange(1000), "v" * rng.randrange(5)])
    elif roll < 0.45:
        keys = [k for k in root if k.startswith("k")]
        if keys:
            del root[rng.choice(keys)]
    elif roll < 0.75:
        items = root["items"]
        items.insert(rng.randint(0, len(items)), rng.randrange(100))
        if len(items) > 5 and rng.random() < 0.2:
            del items[rng.randrange(len(items))]
    else:
        text = root["notes"]
        text.insert(rng.randint(0, len(text)), rng.choice("abcdef"))


def converged(models: list[SimModel]) -> bool:
    first = models[0].sync
    state, digest = first.doc.get_state(), first.digest()
    return all(m.sync.doc.get_state() == state and m.sync.digest() == digest for m in models[1:])


def model_seeds(config: pytest.Config) -> list[int]:
    chosen = config.getoption("--sim-seed")
    if chosen is not None:
        return [chosen]
    # A model run simulates about a minute of four replicas: a twentieth of --sim-runs.
    return list(range(max(1, config.getoption("--sim-runs") // 20)))


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "model_seed" in metafunc.fixturenames:
        metafunc.parametrize("model_seed", model_seeds(metafunc.config))


def test_replicas_converge_under_loss_duplication_reordering_and_partitions(
    model_seed: int,
) -> None:
    rng = random.Random(model_seed)
    profile = NetworkProfile(
        loss=rng.choice([0.0, 0.05, 0.2]),
        duplicate=rng.choice([0.0, 0.05]),
        min_delay_s=0.0002,
        max_delay_s=rng.choice([0.002, 0.05]),  # wide spreads reorder
    )
    sim = Simulation(seed=model_seed, profile=profile, rate_s=RATE_S)
    nodes = [sim.add_node(f"n{i}") for i in range(4)]
    models = [SimModel(node, client_id=1000 + i) for i, node in enumerate(nodes)]
    founder = models[0].root
    founder["items"] = pycrdt.Array([])
    founder["notes"] = pycrdt.Text("")
    run(sim, models, 3.0)
    assert converged(models), f"seed {model_seed}: the replicas did not meet ({profile})"

    cut: list[SimNode] = []
    for _ in range(rng.randint(20, 60)):  # bursts of edits over about a minute
        if not cut and rng.random() < 0.15:
            cut = rng.sample(nodes, rng.randint(1, 2))
            sim.partition(cut, [n for n in nodes if n not in cut])
        elif cut and rng.random() < 0.25:
            sim.heal()
            cut = []
        for model in rng.sample(models, rng.randint(1, len(models))):
            for _ in range(rng.randint(1, 8)):
                edit(rng, model.root)
        run(sim, models, rng.uniform(0.05, 2.0))
    sim.heal()
    holders = [n.endpoint_id for n in nodes]

    def synced() -> bool:
        return all(
            not m.sync.unsynced([h for h in holders if h != m.node.endpoint_id]) for m in models
        )

    settle = 0.0
    while not converged(models) and settle < 30.0:
        run(sim, models, RATE_S / 5)
        settle += RATE_S / 5
    states = [m.root.to_py() for m in models]
    assert converged(models), f"seed {model_seed}: not converged {settle:.1f} s after healing"
    assert all(s == states[0] for s in states), (
        f"seed {model_seed}: not converged {settle:.1f} s after healing ({profile})"
    )
    waited = 0.0
    while not synced() and waited < 30.0:  # pulls made on meeting again may still be answered
        run(sim, models, RATE_S / 5)
        waited += RATE_S / 5
    assert synced(), f"seed {model_seed}: a replica not synced with every other ({profile})"

    late = SimModel(sim.add_node("late"), client_id=2000)  # started afterwards, empty
    models.append(late)
    nodes.append(late.node)
    holders.append(late.node.endpoint_id)
    joined = 0.0
    while not (converged(models) and synced()) and joined < 30.0:
        run(sim, models, RATE_S / 5)
        joined += RATE_S / 5
    assert converged(models), f"seed {model_seed}: the late joiner did not converge ({profile})"
    assert late.root.to_py() == states[0]
    assert synced(), f"seed {model_seed}: the late joiner not synced with every other"
