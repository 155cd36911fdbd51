"""run_forever: a service's main ends on SIGTERM or SIGINT with the goodbye sent, so its peers
see it leave at once (reason "left", not an expiry), on both APIs; a timeout ends it too."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from glue import EndpointManager, UsageError
from tests.endpoint_process import REPO, EndpointProcess, base_env
from tests.helpers import free_udp_port, multicast_settings, wait_until

# Prints "serving" once run_forever's handlers have replaced those in place when it is called:
# a signal sent before then is not run_forever's (SIGTERM kills, SIGINT raises
# KeyboardInterrupt), and "ready" comes before run_forever.
WATCH_HANDLERS = """
    import signal, threading
    from tests.helpers import wait_until

    def print_serving_once_handled():
        stops = (signal.SIGINT, signal.SIGTERM)
        before = [signal.getsignal(number) for number in stops]

        def replaced():
            return all(signal.getsignal(n) != b for n, b in zip(stops, before, strict=True))

        def watch():
            ok = wait_until(replaced, timeout=10, interval=0.001)
            print("serving" if ok else "unhandled", flush=True)

        threading.Thread(target=watch, daemon=True).start()
"""

SERVICES = {
    "sync": """
        from glue import EndpointManager
        with EndpointManager.from_env() as endpoint:
            print("ready", endpoint.endpoint_id, flush=True)
            print_serving_once_handled()
            print("stopped", endpoint.run_forever(), flush=True)
    """,
    "async": """
        import asyncio
        from glue import AsyncEndpointManager
        async def main():
            async with AsyncEndpointManager.from_env() as endpoint:
                print("ready", endpoint.endpoint_id, flush=True)
                print_serving_once_handled()
                print("stopped", await endpoint.run_forever(), flush=True)
        asyncio.run(main())
    """,
}


@pytest.mark.parametrize("api", ["sync", "async"])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_service_stopped_by_a_signal_says_goodbye(api: str, signum: signal.Signals) -> None:
    group = f"239.192.137.17:{free_udp_port()}"
    # A long timeout: the observer would take 20 s to expire the service; "left" is the goodbye.
    glue = multicast_settings(group, discovery_rate_timeout_multiplier=100)
    observer = EndpointProcess(label="observer", **glue)
    service = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(WATCH_HANDLERS) + textwrap.dedent(SERVICES[api])],
        cwd=REPO,
        env=base_env(**glue),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert service.stdout is not None
        word, number = service.stdout.readline().split()
        assert word == "ready", service.stderr.read() if service.stderr else ""
        service_id = int(number)
        assert service.stdout.readline() == "serving\n"  # (within 10 s: the child's deadline)
        assert observer.wait_for(lambda: service_id in observer.known, 10)
        service.send_signal(signum)
        out, err = service.communicate(timeout=10)
        assert service.returncode == 0, err
        assert out.strip() == f"stopped {int(signum)}"

        def removals() -> list[str]:
            return [e["reason"] for e in observer.events("peer_removed", peer=service_id)]

        assert observer.wait_for(lambda: bool(removals()), 5)
        assert removals() == ["left"]
    finally:
        if service.poll() is None:
            service.kill()
        observer.close()


def test_run_forever_ends_after_its_timeout_and_stops_the_endpoint() -> None:
    settings = multicast_settings(f"239.192.137.18:{free_udp_port()}")
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with EndpointManager.from_env(**settings) as endpoint:
        assert endpoint.run_forever(timeout=0.05) is None
        with pytest.raises(UsageError):
            endpoint.publish("a", "t", b"x")  # stopped
    # The handlers it set are gone again.
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_run_forever_needs_the_main_thread() -> None:
    settings = multicast_settings(f"239.192.137.19:{free_udp_port()}")
    with EndpointManager.from_env(**settings) as endpoint:
        errors: list[BaseException] = []

        def elsewhere() -> None:
            try:
                endpoint.run_forever(timeout=0)
            except UsageError as exc:
                errors.append(exc)

        thread = threading.Thread(target=elsewhere)
        thread.start()
        thread.join(10)
        assert len(errors) == 1
        assert "main thread" in str(errors[0])
        with pytest.raises(UsageError):
            endpoint.run_forever(timeout=-1)


def test_run_forever_ends_on_a_signal_another_thread_receives() -> None:
    # The kernel hands a process's signal to any thread of it, and Python runs the handler only
    # when the main thread next runs bytecode: a main thread blocked waiting must still wake.
    settings = multicast_settings(f"239.192.137.20:{free_udp_port()}")
    before = signal.getsignal(signal.SIGTERM)
    sent_at: list[float] = []

    def signal_this_thread() -> None:
        if wait_until(lambda: signal.getsignal(signal.SIGTERM) != before, timeout=10):
            sent_at.append(time.monotonic())
            signal.pthread_kill(threading.get_ident(), signal.SIGTERM)

    with EndpointManager.from_env(**settings) as endpoint:
        sender = threading.Thread(target=signal_this_thread)
        sender.start()
        try:
            assert endpoint.run_forever(timeout=20) == signal.SIGTERM
            # Ended by the signal, not at the timeout (by then the handler has run anyway).
            assert time.monotonic() - sent_at[0] < 10
        finally:
            sender.join(10)
    assert signal.getsignal(signal.SIGTERM) == before
