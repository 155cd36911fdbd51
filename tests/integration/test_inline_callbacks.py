"""Inline subscription callbacks (``subscribe(..., inline=True)``, issue 15) over real sockets.

An inline callback runs on the endpoint's network thread as each burst arrives: no queue, no
thread switch. These tests show what the documentation promises: messages come in order, once;
an exception in a callback is logged and the next message still comes; a callback may publish
(to peers and to its own endpoint) and close its subscription; ``stop`` returns in bounded time
while a callback runs, from another thread or from the callback itself, and starts no callback
after it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator

import pytest

from glue import EndpointManager, Message, UsageTypeError, UsageValueError
from tests.helpers import Inbox, wait_until

KIND = "inline"
STOP_TIMEOUT_S = 1.0
#: What stop() may take beyond its timeout (joining, handing the report over).
SLACK_S = 1.0


@pytest.fixture
def release() -> Iterator[threading.Event]:
    """What blocked callbacks wait on; set at the end whatever happens, so no thread is left."""
    event = threading.Event()
    yield event
    event.set()


@pytest.fixture
def pair(settings: dict[str, object]) -> Iterator[tuple[EndpointManager, EndpointManager]]:
    with (
        EndpointManager.from_env(**settings) as publisher,
        EndpointManager.from_env(**settings) as subscriber,
    ):
        yield publisher, subscriber


def test_inline_callbacks_run_on_the_network_thread_in_order_once(
    pair: tuple[EndpointManager, EndpointManager],
) -> None:
    publisher, subscriber = pair
    inbox = Inbox()
    threads: set[str] = set()

    def record(message: Message) -> None:
        threads.add(threading.current_thread().name)
        inbox(message)

    subscriber.subscribe("inline/order", KIND, record, inline=True)
    publisher.wait_for_subscribers("inline/order", timeout=5)
    for n in range(2000):
        publisher.publish("inline/order", KIND, b"%d" % n)
    assert inbox.wait_for_count(2000, timeout=20)
    assert inbox.sequences() == list(range(1, 2001))
    assert inbox.payloads() == [b"%d" % n for n in range(2000)]
    assert threads == {f"glue-net-{subscriber.name}"}


def test_an_exception_in_an_inline_callback_is_logged_and_the_next_message_comes(
    pair: tuple[EndpointManager, EndpointManager], caplog: pytest.LogCaptureFixture
) -> None:
    publisher, subscriber = pair
    inbox = Inbox()

    def odd_ones_fail(message: Message) -> None:
        inbox(message)
        if message.sequence % 2:
            raise RuntimeError(f"failing on {message.sequence}")

    with caplog.at_level(logging.ERROR, logger="glue.subscription"):
        subscriber.subscribe("inline/fail", KIND, odd_ones_fail, inline=True)
        publisher.wait_for_subscribers("inline/fail", timeout=5)
        for n in range(10):
            publisher.publish("inline/fail", KIND, b"%d" % n)
        assert inbox.wait_for_count(10, timeout=5)
    assert inbox.sequences() == list(range(1, 11))
    failures = [r for r in caplog.records if "callback of subscription" in r.getMessage()]
    assert len(failures) == 5
    assert all(r.exc_info is not None for r in failures)
    # The network thread carried on: acks, announcements and later messages still flow.
    publisher.publish("inline/fail", KIND, b"after")
    assert inbox.wait_for_count(11, timeout=5)
    publisher.flush(timeout=5)


def test_an_inline_callback_may_publish_to_peers_and_to_its_own_endpoint(
    pair: tuple[EndpointManager, EndpointManager],
) -> None:
    publisher, subscriber = pair
    pongs = Inbox()
    local = Inbox()
    publisher.subscribe("inline/pong", KIND, pongs)
    subscriber.subscribe("inline/local", KIND, local, inline=True)

    def answer(message: Message) -> None:
        subscriber.publish("inline/pong", KIND, message.payload)  # to the peer
        subscriber.publish("inline/local", KIND, message.payload)  # to itself, inline again

    subscriber.subscribe("inline/ping", KIND, answer, inline=True)
    publisher.wait_for_subscribers("inline/ping", timeout=5)
    subscriber.wait_for_subscribers("inline/pong", timeout=5)
    for n in range(300):
        publisher.publish("inline/ping", KIND, b"%d" % n)
    assert pongs.wait_for_count(300, timeout=20)
    assert local.wait_for_count(300, timeout=5)
    assert pongs.payloads() == [b"%d" % n for n in range(300)]
    assert local.payloads() == [b"%d" % n for n in range(300)]
    subscriber.flush(timeout=5)


def test_an_inline_callback_may_close_its_own_subscription(
    pair: tuple[EndpointManager, EndpointManager],
) -> None:
    publisher, subscriber = pair
    inbox = Inbox()
    subscriptions = []

    def take_three(message: Message) -> None:
        inbox(message)
        if message.sequence == 3:
            subscriptions[0].close()  # from the network thread, inside its own callback

    subscriptions.append(subscriber.subscribe("inline/close", KIND, take_three, inline=True))
    publisher.wait_for_subscribers("inline/close", timeout=5)
    for n in range(10):
        publisher.publish("inline/close", KIND, b"%d" % n)
    # Once closed it is unsubscribed: peers stop sending to it, and nothing more is called.
    assert wait_until(lambda: not publisher.subscribers("inline/close"), timeout=5)
    assert inbox.sequences() == [1, 2, 3]
    assert subscriptions[0].closed


def test_stop_returns_in_time_while_an_inline_callback_is_blocked(
    settings: dict[str, object], release: threading.Event
) -> None:
    entered = threading.Event()
    calls: list[bytes] = []

    def blocked(message: Message) -> None:
        calls.append(message.payload)
        entered.set()
        release.wait()

    with EndpointManager.from_env(**settings) as publisher:
        subscriber = EndpointManager.from_env(**settings)
        subscriber.start()
        subscriber.subscribe("inline/stuck", KIND, blocked, inline=True)
        publisher.wait_for_subscribers("inline/stuck", timeout=5)
        for n in range(5):
            publisher.publish("inline/stuck", KIND, b"%d" % n)
        assert entered.wait(5)
        started = time.monotonic()
        report = subscriber.stop(timeout=STOP_TIMEOUT_S)
        taken = time.monotonic() - started
    assert taken < STOP_TIMEOUT_S + SLACK_S, taken
    assert any("inline/stuck" in running for running in report.running), report
    release.set()
    # The callback returns: no other message of the burst is called back after stop.
    assert wait_until(
        lambda: not [t for t in threading.enumerate() if t.name.startswith("glue-net-")],
        timeout=5,
    )
    assert calls == [b"0"]


def test_an_inline_callback_may_stop_its_endpoint(settings: dict[str, object]) -> None:
    reports = []
    calls = []
    with EndpointManager.from_env(**settings) as publisher:
        subscriber = EndpointManager.from_env(**settings)
        subscriber.start()

        def stop_here(message: Message) -> None:
            calls.append(message.sequence)
            reports.append(subscriber.stop(timeout=STOP_TIMEOUT_S))

        subscriber.subscribe("inline/stop", KIND, stop_here, inline=True)
        publisher.wait_for_subscribers("inline/stop", timeout=5)
        for n in range(5):
            publisher.publish("inline/stop", KIND, b"%d" % n)
        assert wait_until(lambda: bool(reports), timeout=5)
    assert calls == [1]
    assert not reports[0].running, reports[0]
    assert subscriber.stop() == type(reports[0])()  # idempotent: nothing more to report
    assert wait_until(
        lambda: not [t for t in threading.enumerate() if t.name.startswith("glue-")], timeout=5
    )


def test_inline_needs_a_callback_and_a_bool(settings: dict[str, object]) -> None:
    with EndpointManager.from_env(**settings) as endpoint:
        with pytest.raises(UsageValueError, match="inline"):
            endpoint.subscribe("inline/none", KIND, inline=True)
        with pytest.raises(UsageTypeError, match="inline"):
            endpoint.subscribe("inline/none", KIND, print, inline="yes")  # type: ignore[arg-type]
