"""Loss that used to be silent reaches the user once, even when the application configured no
logging at all: a program as a user writes it, in a process of its own, with nothing but glue."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from tests.endpoint_process import REPO, base_env
from tests.helpers import free_udp_port

PROGRAM = textwrap.dedent(
    """
    import threading
    from glue import EndpointManager

    got = threading.Event()
    with EndpointManager.from_env() as subscriber, EndpointManager.from_env() as publisher:
        subscriber.subscribe("sensors/+/temperature", "reading", lambda m: got.set())
        publisher.wait_for_subscribers("sensors/a/temperature", count=1, timeout=10)
        for _ in range(5):  # the type is misspelt: nothing is delivered
            publisher.publish("sensors/a/temperature", "Reading", b"21.5")
        publisher.flush(timeout=10)
        assert not got.is_set()
        counters = subscriber.counters()
        print("mismatches", counters.get("topics_type_mismatches", 0))
    """
)


def test_a_type_mismatch_is_visible_on_stderr_without_any_logging_configured() -> None:
    group = f"239.192.137.13:{free_udp_port()}"
    env = base_env(
        discovery_target_address=group,
        discovery_listen_address=group,
        discovery_rate_milliseconds=200,
    )
    done = subprocess.run(
        [sys.executable, "-c", PROGRAM],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "mismatches 5" in done.stdout  # counted, each time
    warnings = [line for line in done.stderr.splitlines() if "has type 'Reading'" in line]
    assert len(warnings) == 1, done.stderr  # said once, on stderr, with no logging set up
    assert "wants 'reading'" in warnings[0]
