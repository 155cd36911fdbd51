"""The examples and the documentation are true: each runs, and says what the code does.

- ``examples/*.py`` run as processes (their own discovery port each) and print what they
  received;
- every ```` ```python ```` block of the topic pages in ``docs/`` is a complete program, run as a
  process with ``GLUE_*`` variables that keep it on loopback; it checks itself with ``assert``;
- the topic examples of ``docs/PROTOCOL.md`` hold envelopes that the topics layer takes as the
  text says (``tests/unit/test_wire.py`` already checks them as datagrams);
- the relative links of those pages lead to files that exist.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from glue import wire
from glue.events import MessageReceived, Peer, StackEvent, TopicDelivery
from glue.topics import Topics, TopicsConfig
from glue.wire import Data, EndpointId
from tests.endpoint_process import base_env
from tests.helpers import free_udp_port

ROOT = Path(__file__).parents[2]
DOCS = ROOT / "docs"
TOPIC_PAGES = [
    "topics.md",
    "delivery.md",
    "late-joiners.md",
    "partitions.md",
    "work-queues.md",
    "request-reply.md",
]
RUN_TIMEOUT_S = 60
_BLOCK = re.compile(r"^```python\n(.*?)^```$", re.DOTALL | re.MULTILINE)


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
        check=False,
    )
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def _loopback(port: int) -> dict[str, str]:
    """The environment of a program that takes its settings from ``GLUE_*``, kept on loopback."""
    group = f"239.192.137.1:{port}"
    return base_env(
        listen_address="127.0.0.1:0",
        listen_interface="lo",
        discovery_target_address=group,
        discovery_listen_address=group,
    )


# --- examples/ -----------------------------------------------------------------------------------


def test_the_sync_example_prints_what_it_received() -> None:
    result = _run(["examples/sync_example.py", str(free_udp_port())], base_env())
    assert result.stdout.splitlines() == [
        "received sensors/hall/temperature #1: {'celsius': 19.0}",
        "received sensors/kitchen/temperature #1: {'celsius': 21.5}",
        "received sensors/kitchen/temperature #2: {'celsius': 21.7}",
        "received alerts/kitchen #1: smoke in the kitchen",
        "dropped because a subscription fell behind: 0",
        "done",
    ]


def test_the_async_example_prints_what_it_received() -> None:
    # The port from the environment this time (the sync example takes it as an argument).
    env = {**base_env(), "EXAMPLE_DISCOVERY_PORT": str(free_udp_port())}
    result = _run(["examples/async_example.py"], env)
    assert result.stdout.splitlines() == [
        "alice received chat/alice from alice: hello from alice",
        "alice received chat/bob from bob: hello from bob",
        "bob received chat/alice from alice: hello from alice",
        "bob received chat/bob from bob: hello from bob",
        "bob received a direct message from alice: a direct word",
        "done",
    ]


def test_the_telemetry_example_gives_a_late_joiner_every_quiet_sensors_last_reading() -> None:
    # Three sensor processes go quiet past their readings' expiry; the late alerting process
    # still gets each room's last reading (retain=True), the dashboard counted all 60, and every
    # process stops on SIGTERM through run_forever.
    result = _run(["examples/telemetry.py", str(free_udp_port())], base_env())
    lines = result.stdout.splitlines()
    assert lines[0] == "alerting: kitchen 19.9, hall 20.9, attic 21.9", result.stdout
    assert re.fullmatch(r"alerting had them \d+ ms after it started", lines[1]), lines
    assert lines[2:] == ["dashboard: kitchen 20, hall 20, attic 20"], result.stdout


def test_the_work_queue_example_has_each_job_done_once() -> None:
    result = _run(["examples/work_queue.py", str(free_udp_port())], base_env())
    assert result.stdout.splitlines() == [
        "3 workers joined group 'workers'",
        "1000 jobs published",
        "every job done exactly once: yes",
        "each worker did some: yes",
        "done",
    ]


def test_the_robot_command_example_tells_every_ending_apart() -> None:
    result = _run(["examples/robot_command.py", str(free_udp_port())], base_env())
    assert result.stdout.splitlines() == [
        "robot-1: moved to [1.5, 2.0]",
        "robot-1: refused: ValueError: x=99.0, y=0.0 is out of reach",
        "robot-2: no reply within 200 ms",
        "robot-9: no such robot",
        "done",
    ]
    # Seen without any logging configured (the standard library's last resort, on stderr).
    assert result.stderr.count("no endpoint serving that name") == 1


# --- docs/ ---------------------------------------------------------------------------------------


def _doc_blocks() -> list[Any]:
    params = []
    for page in TOPIC_PAGES:
        text = (DOCS / page).read_text(encoding="utf-8")
        for number, block in enumerate(_BLOCK.findall(text), 1):
            params.append(pytest.param(block, id=f"{page}#{number}"))
    return params


def test_every_topic_page_has_runnable_examples() -> None:
    pages = {str(param.id).split("#")[0] for param in _doc_blocks()}
    assert pages == set(TOPIC_PAGES)


@pytest.mark.parametrize("code", _doc_blocks())
def test_the_python_blocks_of_the_docs_run(code: str) -> None:
    _run(["-c", code], _loopback(free_udp_port()))


@pytest.mark.parametrize("page", [*TOPIC_PAGES, "PROTOCOL.md"])
def test_relative_links_lead_to_files_that_exist(page: str) -> None:
    text = (DOCS / page).read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if "://" in target:
            continue
        assert (DOCS / target).exists(), f"{page} links to {target}, which does not exist"


# --- docs/PROTOCOL.md, topics layer --------------------------------------------------------------


def _topic_examples() -> list[bytes]:
    text = (DOCS / "PROTOCOL.md").read_text(encoding="utf-8")
    part = text[text.index("\n## Topics layer") :]
    return [ast.literal_eval(m[1]) for m in re.finditer(r"```python\n(b'.*?')\n```", part)]


def _receiver() -> tuple[Topics, list[StackEvent]]:
    events: list[StackEvent] = []
    topics = Topics(
        TopicsConfig(),
        endpoint_id=EndpointId(5678),
        name="sensor-b",
        incarnation=1732350000500001,
        emit=events.append,
    )
    return topics, events


def _peer(header: wire.Header) -> Peer:
    return Peer(header.source_id, header.incarnation, f"peer-{header.source_id}", "", 1, 1.0)


def _messages(data: bytes) -> tuple[Peer, list[bytes]]:
    """The transport messages of one example datagram (bundles split as the receiver does)."""
    datagram = wire.decode(data, network_id=1)
    messages = []
    for frame in datagram.frames:
        if not isinstance(frame, Data):
            continue
        assert frame.parts == 1
        offset = 0
        for length, _ in frame.messages or ((len(frame.payload), frame.ttl_ms),):
            messages.append(frame.payload[offset : offset + length])
            offset += length
    return _peer(datagram.header), messages


def test_protocol_md_has_one_topic_example_of_each_kind() -> None:
    examples = _topic_examples()
    assert len(examples) == 7
    decoded = [wire.decode(data, network_id=1) for data in examples]
    announcements = [f for d in decoded for f in d.frames if isinstance(f, wire.Announce)]
    assert [a.interest for a in announcements] == [4]
    assert b'"iv":4' in examples[2]


def test_the_topic_message_example_is_delivered_as_described() -> None:
    topics, events = _receiver()
    topics.subscribe("sensors/+/temperature", "reading")
    peer, [message] = _messages(_topic_examples()[0])
    topics.peer_added(peer)
    topics.receive(peer, message, now=0.0)
    topics.receive(peer, message, now=0.0)  # the same again: a duplicate
    [delivery] = [e for e in events if isinstance(e, TopicDelivery)]
    [got] = delivery.messages
    assert (got.topic_name, got.topic_type, got.sequence, got.sent_at) == (
        "sensors/a/temperature",
        "reading",
        6,
        1732350000.25,
    )
    assert got.json() == {"celsius": 21.5}
    assert topics.counters["duplicates_suppressed"] == 1


def test_the_interest_examples_follow_the_state_machine() -> None:
    # sensor-a's view of sensor-b: T2 (whole set, version 3), then T4 (change to version 4).
    sensor_a, _ = _receiver()
    examples = _topic_examples()
    peer, [whole] = _messages(examples[1])
    sensor_a.peer_added(peer)
    sensor_a.receive(peer, whole, now=0.0)
    assert sensor_a.peer_patterns(peer.endpoint_id) == ["alerts/#", "sensors/+/temperature"]
    _, [change] = _messages(examples[3])
    sensor_a.receive(peer, change, now=0.0)
    assert sensor_a.peer_patterns(peer.endpoint_id) == ["plant/#", "sensors/+/temperature"]
    assert sensor_a.counters["interest_out_of_step"] == 0
    # T5 is a whole set with "ask": the receiver takes it and answers with its own.
    asker, [ask] = _messages(examples[4])
    sensor_b, _ = _receiver()
    sensor_b.subscribe("plant/#", "rpm")
    sensor_b.take_sends()  # its own change, version 1
    sensor_b.peer_added(asker)
    sensor_b.take_sends()
    sensor_b.receive(asker, ask, now=0.0)
    [(to, answer, _)] = sensor_b.take_sends()
    assert to == asker.endpoint_id
    assert answer == b'{"i":1,"set":["plant/#"]}\n'


def test_the_history_bundle_and_the_direct_message_examples() -> None:
    topics, events = _receiver()
    topics.subscribe("plant/#", "rpm")
    examples = _topic_examples()
    peer, bundle = _messages(examples[5])
    topics.peer_added(peer)
    for message in bundle:
        topics.receive(peer, message, now=0.0)
    deliveries = [m for e in events if isinstance(e, TopicDelivery) for m in e.messages]
    assert [(m.sequence, m.payload) for m in deliveries] == [
        (4, b"1004"),
        (5, b"1005"),
        (6, b"1006"),
    ]
    _, [direct] = _messages(examples[6])
    topics.receive(peer, direct, now=0.0)
    [received] = [e for e in events if isinstance(e, MessageReceived)]
    assert received.payload == b"ping"
