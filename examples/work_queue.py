"""A work queue (docs/work-queues.md): a producer shares 1,000 jobs among 3 worker processes.

    python examples/work_queue.py [DISCOVERY_PORT]

Starts three worker processes of itself. Each joins the group ``workers`` on ``jobs/#`` and, for
each job it is given, works out the answer and sends it back to the producer (a direct message).
The producer waits for the three, publishes 1,000 jobs, waits until every one is done
(``wait_done``), checks that each was answered exactly once, stops the workers (SIGTERM: they
leave with a goodbye) and prints a summary. Everything stays on loopback (multicast discovery
over ``lo``: run it where ``lo`` carries multicast, such as the project's
``tools/isolated-net``); the port comes from the argument, else ``EXAMPLE_DISCOVERY_PORT``, else
27395.
"""

# ruff: noqa: T201 - an example prints what it sees

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from collections import Counter

import orjson

from glue import EndpointManager, GlueSettings, Message, MessageReceived, load_settings

DEFAULT_PORT = 27395
WORKERS = 3
JOBS = 1000


def settings(port: int) -> GlueSettings:
    """Settings that keep everything on loopback."""
    group = f"239.192.137.1:{port}"
    return load_settings(
        listen_address="127.0.0.1:0",
        listen_interface="lo",
        discovery_target_address=group,
        discovery_listen_address=group,
        discovery_rate_milliseconds=200,
    )


def work(port: int) -> None:
    """One worker: answer each job it is given, until SIGTERM."""
    with EndpointManager(settings(port)) as endpoint:

        def on_job(message: Message) -> None:
            # Runs on a callback thread; when it returns, the job is done. Had this process died
            # first, the producer would have given the job to another worker, redelivered=True.
            job = message.json()
            answer = {"job": job["job"], "square": job["job"] ** 2, "worker": endpoint.name}
            endpoint.send(orjson.dumps(answer), to=[message.source_id], expiry=60.0)

        endpoint.subscribe("jobs/#", "job", on_job, group="workers")
        endpoint.run_forever()  # until SIGTERM or SIGINT, then a clean stop


def produce(port: int) -> int:
    """The producer: start the workers, publish the jobs, check the answers."""
    workers = [
        subprocess.Popen([sys.executable, __file__, "worker", str(port)]) for _ in range(WORKERS)
    ]
    answers: list[dict[str, int | str]] = []
    all_answered = threading.Event()

    def on_answer(message: MessageReceived) -> None:
        answers.append(orjson.loads(message.payload))
        if len(answers) >= JOBS:
            all_answered.set()

    try:
        with EndpointManager(settings(port)) as producer:
            producer.on_message(on_answer)
            found = producer.wait_for_subscribers(
                "jobs/resize", WORKERS, group="workers", timeout=20
            )
            print(f"{len(found)} workers joined group 'workers'")
            for number in range(JOBS):
                # Each job to one worker, the one with the most room (see docs/work-queues.md).
                producer.publish_json("jobs/resize", "job", {"job": number}, expiry=60.0)
            print(f"{JOBS} jobs published")
            producer.wait_done(timeout=60)  # every worker's callback returned for its jobs
            all_answered.wait(timeout=20)
    finally:
        for worker in workers:
            worker.send_signal(signal.SIGTERM)
        for worker in workers:
            worker.wait(20)
    jobs = Counter(int(answer["job"]) for answer in answers)
    by_worker = Counter(str(answer["worker"]) for answer in answers)
    once = jobs == Counter(range(JOBS))
    right = all(answer["square"] == int(answer["job"]) ** 2 for answer in answers)
    print(f"every job done exactly once: {'yes' if once and right else 'no'}")
    print(f"each worker did some: {'yes' if len(by_worker) == WORKERS else 'no'}")
    print("done")
    return 0 if once and right and len(by_worker) == WORKERS else 1


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "worker":
        work(int(sys.argv[2]))
        return 0
    port = int(
        sys.argv[1] if len(sys.argv) > 1 else os.environ.get("EXAMPLE_DISCOVERY_PORT", DEFAULT_PORT)
    )
    return produce(port)


if __name__ == "__main__":
    sys.exit(main())
