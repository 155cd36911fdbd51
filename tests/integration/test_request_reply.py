"""Request/reply between real processes (issue 17, item 1): every request answered once, a
handler's exception as RemoteError, a name nobody serves known at once, a deadline that passed
in the queue never starting the handler, and request_all gathering every responder."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from glue import (
    AsyncEndpointManager,
    EndpointManager,
    NoResponderError,
    RemoteError,
    Reply,
)
from tests.endpoint_process import REPO, base_env
from tests.helpers import async_wait_until, free_udp_port, multicast_settings, wait_until

#: A responder process: serves ``argv[2]``, records each payload its handler starts with, and on
#: a line on stdin stops and prints what it started and its request counters. Its handler raises
#: for a payload starting "raise", sleeps the seconds after "sleep:", else answers name:payload.
RESPONDER = """
    import asyncio, json, sys, time
    from glue import AsyncEndpointManager, EndpointManager

    api, pattern = sys.argv[1], sys.argv[2]
    started = []

    def report(endpoint):
        counters = {k: v for k, v in endpoint.counters().items() if k.startswith("requests_")}
        print(json.dumps({"started": started, "counters": counters}), flush=True)

    if api == "sync":
        def handle(request):
            started.append(request.payload.decode())
            if request.payload.startswith(b"raise"):
                raise ValueError("cannot " + request.payload.decode())
            if request.payload.startswith(b"sleep:"):
                time.sleep(float(request.payload[6:]))
            return endpoint.name.encode() + b":" + request.payload

        with EndpointManager.from_env() as endpoint:
            endpoint.serve(pattern, handle)
            print(json.dumps({"id": endpoint.endpoint_id}), flush=True)
            sys.stdin.readline()
            report(endpoint)
    else:
        async def main():
            global endpoint
            async with AsyncEndpointManager.from_env() as endpoint:
                async def handle(request):
                    started.append(request.payload.decode())
                    if request.payload.startswith(b"raise"):
                        raise ValueError("cannot " + request.payload.decode())
                    if request.payload.startswith(b"sleep:"):
                        await asyncio.sleep(float(request.payload[6:]))
                    return endpoint.name.encode() + b":" + request.payload

                endpoint.serve(pattern, handle)
                print(json.dumps({"id": endpoint.endpoint_id}), flush=True)
                await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
                report(endpoint)

        asyncio.run(main())
"""


class Responder:
    """One responder process (see RESPONDER)."""

    def __init__(self, api: str, pattern: str, name: str, glue: dict[str, object]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(RESPONDER), api, pattern],
            cwd=REPO,
            env=base_env(**glue, endpoint_name=name),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        assert line, self._stderr()
        self.id = json.loads(line)["id"]

    def finish(self) -> dict[str, Any]:
        """Stop it; what its handler started and its request counters."""
        out, err = self.process.communicate("stop\n", timeout=30)
        assert self.process.returncode == 0, err
        return json.loads(out.strip().splitlines()[-1])

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.communicate()

    def _stderr(self) -> str:
        self.process.kill()
        return self.process.communicate()[1]


@contextmanager
def responders(api: str, pattern: str, *names: str, glue: dict[str, object]) -> Iterator[list]:
    started: list[Responder] = []
    try:
        for name in names:
            started.append(Responder(api, pattern, name, glue))
        yield started
    finally:
        for responder in started:
            responder.kill()


def _glue() -> dict[str, object]:
    return multicast_settings(f"239.192.137.31:{free_udp_port()}", discovery_rate_milliseconds=100)


@pytest.mark.parametrize("api", ["sync", "async"])
def test_a_thousand_requests_are_answered_once_each(api: str) -> None:
    glue = _glue()
    with (
        responders(api, "robots/+/move", "robot-1", glue=glue) as (robot,),
        EndpointManager.from_env(**glue, endpoint_name="controller") as controller,
    ):
        replies: list[Reply] = []
        lock = threading.Lock()

        def ask(thread: int) -> None:  # 4 requesters' worth of concurrency from one endpoint
            for n in range(250):
                reply = controller.request("robots/r1/move", b"%d-%d" % (thread, n), timeout=10)
                with lock:
                    replies.append(reply)

        threads = [threading.Thread(target=ask, args=(t,)) for t in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        payloads = sorted(r.payload for r in replies)
        expected = sorted(b"robot-1:%d-%d" % (t, n) for t in range(4) for n in range(250))
        assert payloads == expected
        assert {(r.responder_name, r.responder_id) for r in replies} == {("robot-1", robot.id)}
        assert all(r.sent_at <= r.received_at for r in replies)
        counters = controller.counters()
        assert counters["requests_sent"] == counters["requests_replies_received"] == 1000
        assert counters.get("requests_timeouts", 0) == 0
        report = robot.finish()
    handled = Counter(report["started"])
    assert len(handled) == 1000
    assert set(handled.values()) == {1}
    assert report["counters"]["requests_replied"] == 1000


@pytest.mark.parametrize("api", ["sync", "async"])
def test_a_handler_that_raises_gives_a_remote_error(api: str) -> None:
    glue = _glue()
    with (
        responders(api, "robots/+/move", "robot-1", glue=glue) as (robot,),
        EndpointManager.from_env(**glue, endpoint_name="controller") as controller,
    ):
        with pytest.raises(RemoteError) as caught:
            controller.request("robots/r1/move", b"raise now", timeout=10)
        error = caught.value
        assert (error.remote_type, error.remote_message) == ("ValueError", "cannot raise now")
        assert (error.responder_name, error.responder_id, error.name) == (
            "robot-1",
            robot.id,
            "robots/r1/move",
        )
        assert controller.request("robots/r1/move", b"ok", timeout=10).payload == b"robot-1:ok"
        assert controller.counters()["requests_replies_error"] == 1


def test_a_name_nobody_serves_fails_at_once_not_at_the_timeout() -> None:
    glue = _glue()
    with (
        responders("sync", "robots/r1/move", "robot-1", glue=glue),
        EndpointManager.from_env(**glue, endpoint_name="controller") as controller,
    ):
        controller.request("robots/r1/move", b"x", timeout=10)  # its interest is known now
        timeout = 30.0
        started = time.monotonic()
        with pytest.raises(NoResponderError) as caught:
            controller.request("robots/r2/move", b"x", timeout=timeout)
        assert time.monotonic() - started < timeout / 3  # not after the timeout
        assert caught.value.name == "robots/r2/move"
        assert isinstance(caught.value, LookupError)
        with pytest.raises(NoResponderError):
            controller.request_all("robots/r2/move", b"x", timeout=timeout)
        assert controller.counters()["requests_no_responder"] == 2
        assert controller.responders("robots/r2/move") == []
        assert [p.name for p in controller.responders("robots/r1/move")] == ["robot-1"]


@pytest.mark.parametrize("api", ["sync", "async"])
def test_a_handler_busy_past_a_deadline_never_starts_that_request(api: str) -> None:
    glue = _glue()
    with (
        responders(api, "robots/+/move", "robot-1", glue=glue) as (robot,),
        EndpointManager.from_env(**glue, endpoint_name="controller") as controller,
    ):
        controller.request("robots/r1/move", b"warm-up", timeout=10)
        busy: list[Reply] = []
        # One requester's requests run in order: the second waits behind the first's 1.5 s.
        first = threading.Thread(
            target=lambda: busy.append(
                controller.request("robots/r1/move", b"sleep:1.5", timeout=10)
            )
        )
        first.start()
        try:
            assert wait_until(
                lambda: controller.counters().get("requests_sent", 0) == 2, timeout=10
            )
            with pytest.raises(TimeoutError):
                controller.request("robots/r1/move", b"late", timeout=0.3)
        finally:
            first.join(30)
        assert [r.payload for r in busy] == [b"robot-1:sleep:1.5"]
        assert controller.counters()["requests_timeouts"] == 1
        report = robot.finish()
    assert report["started"] == ["warm-up", "sleep:1.5"]  # "late" never started
    assert report["counters"]["requests_expired_before_start"] == 1


def test_request_all_gathers_the_replies_of_three_responders() -> None:
    glue = _glue()
    names = ("robot-1", "robot-2", "robot-3")
    with (
        responders("sync", "fleet/+", *names, glue=glue),
        EndpointManager.from_env(**glue, endpoint_name="controller") as controller,
    ):
        assert len(controller.wait_for_responders("fleet/ping", 3, timeout=10)) == 3
        answers = controller.request_all("fleet/ping", b"hello", timeout=10)
        assert sorted(a.payload for a in answers if isinstance(a, Reply)) == [
            b"%s:hello" % name.encode() for name in names
        ]
        # A responder whose handler raises is in the list as its RemoteError.
        answers = controller.request_all("fleet/ping", b"raise", timeout=10)
        assert len(answers) == 3
        assert all(isinstance(a, RemoteError) for a in answers)


async def test_the_asyncio_api_serves_and_requests() -> None:
    glue = _glue()
    async with (
        AsyncEndpointManager.from_env(**glue, endpoint_name="robot") as robot,
        AsyncEndpointManager.from_env(**glue, endpoint_name="controller") as controller,
    ):

        async def move(request: Any) -> bytes:
            if request.payload == b"raise":
                raise KeyError("arm")
            await asyncio.sleep(0)
            return b"moved " + request.payload

        service = robot.serve("robots/+/move", move)
        await controller.wait_for_responders("robots/r1/move", timeout=10)
        reply = await controller.request("robots/r1/move", b"left", timeout=10)
        assert (reply.payload, reply.responder_name) == (b"moved left", "robot")
        with pytest.raises(RemoteError, match="KeyError"):
            await controller.request("robots/r1/move", b"raise", timeout=10)
        answers = await controller.request_all("robots/r1/move", b"up", timeout=10)
        assert [a.payload for a in answers if isinstance(a, Reply)] == [b"moved up"]
        service.close()
        assert await async_wait_until(
            lambda: controller.responders("robots/r1/move") == [], timeout=10
        )
        with pytest.raises(NoResponderError):
            await controller.request("robots/r1/move", b"x", timeout=10)


def test_an_endpoint_answers_its_own_requests_without_the_network() -> None:
    # As its own subscriptions get its own publications: a name it serves itself is answered
    # here, alone or beside peers that serve it too.
    glue = _glue()
    with EndpointManager.from_env(**glue, endpoint_name="solo") as solo:

        def echo(request: Any) -> bytes:
            if request.payload == b"raise":
                raise ValueError("no")
            return b"solo:" + request.payload

        solo.serve("local/+", echo)
        reply = solo.request("local/echo", b"hi", timeout=10)  # no peer at all
        assert (reply.payload, reply.responder_name) == (b"solo:hi", "solo")
        with pytest.raises(RemoteError, match="ValueError"):
            solo.request("local/echo", b"raise", timeout=10)
        with pytest.raises(NoResponderError):
            solo.request("elsewhere", b"x", timeout=0.5)
        with EndpointManager.from_env(**glue, endpoint_name="peer") as peer:
            peer.serve("local/+", lambda request: b"peer:" + request.payload)
            solo.wait_for_responders("local/echo", 1, timeout=10)
            answers = solo.request_all("local/echo", b"all", timeout=10)
            assert sorted(a.payload for a in answers if isinstance(a, Reply)) == [
                b"peer:all",
                b"solo:all",
            ]
        counters = solo.counters()
    assert counters["requests_received"] == 3  # its own, taken as if they had arrived


async def test_the_asyncio_api_answers_its_own_requests() -> None:
    async with AsyncEndpointManager.from_env(**_glue(), endpoint_name="solo") as solo:

        async def echo(request: Any) -> bytes:
            return b"solo:" + request.payload

        solo.serve("local/echo", echo)
        reply = await solo.request("local/echo", b"hi", timeout=10)
        assert (reply.payload, reply.responder_name) == (b"solo:hi", "solo")
