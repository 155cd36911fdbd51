"""Hostile datagrams that decode: two stacks exchange a real stream while an attacker injects
well-formed datagrams meant to hurt (Skips and data far ahead, acks for frames never sent,
fragments with inconsistent totals, announcements with extreme values, fake peers by the
hundred). Nothing may raise, memory must stay bounded, and the real stream must arrive whole,
once and in order, when the attacker cannot send from the publisher's own address.

One run uses a fixed seed, one a new seed each time (printed, and in the failure message: replay
it with ``GLUE_FUZZ_SEED=N``; that variable is read here only).
"""

from __future__ import annotations

import os
import random
import time

import pytest

from glue import wire
from glue.events import MessageReceived
from glue.stack import Stack
from glue.topics import DIRECT_ENVELOPE
from glue.wire import Ack, Announce, Data, EndpointId, Goodbye, Header, Skip
from tests.unit.test_stack import A, B, _address, _pair

FIXED_SEED = 20261205
STEPS = 400
ATTACKER: tuple[str, int] = ("10.0.0.66", 6666)


def _hostile(rng: random.Random, victim: Stack, named: Stack) -> tuple[bytes, tuple[str, int]]:
    """One decodable datagram aimed at ``victim``, mostly in ``named``'s name."""
    config = named.config.discovery
    victim_incarnation = victim.config.discovery.incarnation
    fake = EndpointId(rng.choice([int(config.endpoint_id), rng.randrange(3, 2**53)]))
    incarnation = rng.choice([config.incarnation, config.incarnation + 1, 2**53 - 1, 0])
    header = Header(1, fake, incarnation, destination=rng.choice([victim_incarnation, 0, 7]))
    big = rng.choice([2**63 - 1, 10**15, rng.randrange(1, 5000)])
    kind = rng.randrange(7)
    if kind == 0:
        frames: list[wire.Frame] = [Skip(big)]
    elif kind == 1:
        frames = [Data(big, DIRECT_ENVELOPE + rng.randbytes(rng.randrange(1, 200)), 60_000)]
    elif kind == 2:
        frames = [Ack(big, ((big + 2, big + 5),)) if big < 2**62 else Ack(big)]
    elif kind == 3:
        parts = rng.choice([2, 3, 1000, 65535])
        frames = [
            Data(rng.randrange(1, 3000), rng.randbytes(1200), 60_000, rng.randrange(parts), parts)
        ]
    elif kind == 4:
        frames = [
            Announce(
                fake,
                incarnation,
                rng.choice([config.name, "x" * 200, f"fake{rng.randrange(10**6)}"]),
                rng.choice(["", "10.0.0.66", "255.255.255.255"]),
                rng.choice([1, 65535, 40001]),
                rng.choice([1, 3_600_000, 1000]),
                ask=rng.random() < 0.3,
                forwarded=rng.random() < 0.3,
                age_ms=rng.choice([0, 86_400_000]),
                interest=rng.choice([0, 1, 2**31]),
                peers_digest=rng.randrange(2**53),
            )
        ]
    elif kind == 5:
        frames = [Goodbye()]
    else:
        frames = [Skip(big), Data(big, DIRECT_ENVELOPE + b"FORGED", 60_000)]
    return wire.encode(header, frames), ATTACKER


def _run(seed: int, *, spoofed: bool) -> None:
    rng = random.Random(seed)
    a, b = _pair(65507)
    sent: list[bytes] = []
    got: list[bytes] = []
    now = 0.0
    for step in range(STEPS):
        now += rng.choice([0.0005, 0.002, 0.01])
        if step < STEPS - 100:
            for _ in range(rng.randrange(0, 4)):
                size = rng.choice([10, 1000, 5000, 70_000])
                payload = b"%d:" % len(sent) + rng.randbytes(size)
                if a.send(B, DIRECT_ENVELOPE + payload, expires_at=now + 60, now=now):
                    sent.append(payload)
        for sender, receiver in ((a, b), (b, a)):
            for data, _ in sender.datagrams_to_send(now=now):
                receiver.receive_datagram(data, _address(sender), multicast=False, now=now)
        for _ in range(rng.randrange(0, 6)):
            data, source = _hostile(rng, b, a)
            if spoofed and rng.random() < 0.5:
                source = _address(a)  # the attacker forges the publisher's own address too
            b.receive_datagram(data, source, multicast=rng.random() < 0.5, now=now)
            data, source = _hostile(rng, a, b)
            a.receive_datagram(data, source, multicast=rng.random() < 0.5, now=now)
        for stack in (a, b):
            deadline = stack.next_deadline()
            if deadline is not None and deadline <= now:
                stack.handle_timer(now=now)
        while (event := b.next_event()) is not None:
            if isinstance(event, MessageReceived) and event.source.endpoint_id == A:
                got.append(event.payload)
        while a.next_event() is not None:
            pass
        # Memory stays bounded whatever arrives.
        for stack in (a, b):
            assert stack.reassembler.buffered_bytes <= stack.reassembler.max_total_bytes
            assert len(stack.discovery.peers()) <= stack.config.discovery.max_peers
    if not spoofed:
        # From another address nothing the attacker sends moves the real stream.
        numbers = [int(payload.split(b":", 1)[0]) for payload in got]
        assert numbers == list(range(len(sent))), f"seed {seed}: {numbers[:20]}..."
        assert got == sent, f"seed {seed}: a payload differs"


@pytest.mark.parametrize("spoofed", [False, True], ids=["other-address", "spoofed-address"])
def test_hostile_datagrams_with_a_fixed_seed(spoofed: bool) -> None:
    _run(FIXED_SEED, spoofed=spoofed)


@pytest.mark.parametrize("spoofed", [False, True], ids=["other-address", "spoofed-address"])
def test_hostile_datagrams_with_a_new_seed_each_run(spoofed: bool) -> None:
    seed = int(os.environ.get("GLUE_FUZZ_SEED", "0")) or time.time_ns() % 2**32
    print(f"\nstack fuzz seed {seed} (replay: GLUE_FUZZ_SEED={seed})")
    try:
        _run(seed, spoofed=spoofed)
    except Exception as exc:
        raise AssertionError(f"stack fuzz failed with seed {seed}: {exc!r}") from exc
