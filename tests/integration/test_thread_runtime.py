"""The thread runtime under ``EndpointManager`` (issue 15), over real sockets.

The blocking API no longer runs an event loop: callers place messages under the stack's lock and
send their own datagrams when nothing is in flight, and one network thread receives, runs the
timers and hands events over. The rest of the integration suite holds it to every behaviour the
blocking API had (back-pressure, flush, stalls, parked peers, slow peers, metrics, stop with a
timeout); these tests show what is particular to it: a caller's send does not need the network
thread, a stop releases whoever waits on the runtime (a sender waiting for room, a flush), a
listener's failure or a datagram that cannot be sent leaves the network thread running.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator

import pytest

from glue import BackpressureError, EndpointManager, UsageError
from tests.helpers import Inbox, wait_until

KIND = "runtime"


@pytest.fixture
def gate() -> Iterator[threading.Event]:
    """Holds a network thread while unset; set at the end whatever happens."""
    event = threading.Event()
    yield event
    event.set()


def _hold_network_thread(endpoint: EndpointManager, gate: threading.Event) -> None:
    held = threading.Event()
    endpoint._endpoint.call_soon(lambda: (held.set(), gate.wait(10)))
    assert held.wait(5)


def test_a_publish_on_an_idle_endpoint_goes_out_from_the_callers_thread(
    settings: dict[str, object], gate: threading.Event
) -> None:
    with (
        EndpointManager.from_env(**settings) as publisher,
        EndpointManager.from_env(**settings) as subscriber,
    ):
        inbox = Inbox()
        subscriber.subscribe("runtime/direct", KIND, inbox)
        publisher.wait_for_subscribers("runtime/direct", timeout=5)
        # The publisher's network thread is held: only the caller can send the datagram.
        _hold_network_thread(publisher, gate)
        publisher.publish("runtime/direct", KIND, b"from the caller")
        assert inbox.wait_for_count(1, timeout=5)
        assert inbox.payloads() == [b"from the caller"]
        gate.set()
        publisher.flush(timeout=5)


def test_stop_releases_a_sender_waiting_for_room(
    settings: dict[str, object], gate: threading.Event
) -> None:
    with EndpointManager.from_env(**settings, send_queue_bytes=65536) as subscriber:
        subscriber.subscribe("runtime/full", KIND, Inbox())
        publisher = EndpointManager.from_env(**settings, send_queue_bytes=65536)
        publisher.start()
        try:
            publisher.wait_for_subscribers("runtime/full", timeout=5)
            _hold_network_thread(subscriber, gate)  # acknowledges nothing meanwhile
            outcome: list[BaseException | None] = []

            def fill() -> None:
                try:
                    for n in range(1000):  # far beyond two queues of 64 KiB
                        payload = b"%d:" % n + bytes(1000)
                        publisher.publish("runtime/full", KIND, payload, timeout=30.0)
                except BaseException as exc:
                    outcome.append(exc)
                else:
                    outcome.append(None)

            filler = threading.Thread(target=fill)
            filler.start()
            # It waits for room (the queues are full), until the stop.
            assert wait_until(lambda: publisher._endpoint._waiting > 0, timeout=10)
            publisher.stop(timeout=1.0)
            filler.join(5)
            assert not filler.is_alive()
            assert len(outcome) == 1
            assert isinstance(outcome[0], BackpressureError | UsageError), outcome
        finally:
            gate.set()
            publisher.stop()


def test_stop_ends_a_waiting_flush(settings: dict[str, object], gate: threading.Event) -> None:
    with EndpointManager.from_env(**settings) as subscriber:
        subscriber.subscribe("runtime/flush", KIND, Inbox())
        publisher = EndpointManager.from_env(**settings)
        publisher.start()
        try:
            publisher.wait_for_subscribers("runtime/flush", timeout=5)
            _hold_network_thread(subscriber, gate)
            publisher.publish("runtime/flush", KIND, b"never acknowledged")
            outcome: list[BaseException | None] = []

            def flush() -> None:
                try:
                    publisher.flush(timeout=30)
                except BaseException as exc:
                    outcome.append(exc)
                else:
                    outcome.append(None)

            flusher = threading.Thread(target=flush)
            flusher.start()
            assert wait_until(lambda: bool(publisher._endpoint._flushes), timeout=5)
            report = publisher.stop(timeout=1.0)
            flusher.join(5)
            assert not flusher.is_alive()
            assert len(outcome) == 1
            assert isinstance(outcome[0], UsageError), outcome
            assert report.unacknowledged.get(subscriber.endpoint_id, 0) >= 1, report
        finally:
            gate.set()
            publisher.stop()


def test_a_failing_listener_and_unsendable_datagrams_leave_the_network_thread_running(
    settings: dict[str, object], caplog: pytest.LogCaptureFixture
) -> None:
    with (
        EndpointManager.from_env(**settings) as a,
        EndpointManager.from_env(**settings) as b,
    ):
        inbox = Inbox()
        b.subscribe("runtime/faults", KIND, inbox)
        a.wait_for_subscribers("runtime/faults", timeout=5)

        def broken(events: object) -> None:
            raise RuntimeError("a listener's bug")

        with caplog.at_level(logging.ERROR, logger="glue.runtime"):
            b._endpoint.add_listener(broken)
            a.publish("runtime/faults", KIND, b"one")
            assert inbox.wait_for_count(1, timeout=5)
            # (the broken listener runs after the manager's, maybe after the callback)
            assert wait_until(
                lambda: any("event listener" in r.getMessage() for r in caplog.records),
                timeout=5,
            )
        # A datagram the kernel refuses (larger than UDP allows): counted, and nothing stops.
        with b._endpoint.locked():
            b._endpoint._send_datagrams([(bytes(70000), a.data_address)])
        assert b.counters().get("send_errors", 0) == 1
        for n in range(100):
            a.publish("runtime/faults", KIND, b"%d" % n)
        assert inbox.wait_for_count(101, timeout=10)
        a.flush(timeout=5)
