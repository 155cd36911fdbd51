"""A work-queue worker or watcher process for the integration tests (docs/work-queues.md).

    python -m tests.work_process worker|watcher sync|async [DELAY_S]

Settings come from ``GLUE_*``. A *worker* joins group ``workers`` on ``jobs/#`` and, for each
job (after ``DELAY_S`` of work), sends the job's publisher a direct message
``{"job": n, "worker": name, "redelivered": bool}``. A *watcher* subscribes to ``jobs/#`` as an
ordinary subscriber and prints each job number it gets, one a line. Each prints ``ready`` once
subscribed and runs until SIGTERM (``run_forever``).
"""

from __future__ import annotations

import asyncio
import sys
import time

import orjson

from glue import AsyncEndpointManager, EndpointManager, Message

TOPIC = "jobs/#"
KIND = "job"
GROUP = "workers"


def _result(message: Message, name: str) -> bytes:
    job = message.json()["job"]
    return orjson.dumps({"job": job, "worker": name, "redelivered": message.redelivered})


def run_sync(role: str, delay_s: float) -> None:
    with EndpointManager() as endpoint:
        if role == "worker":

            def work(message: Message) -> None:
                time.sleep(delay_s)
                endpoint.send(_result(message, endpoint.name), to=[message.source_id], expiry=60.0)

            endpoint.subscribe(TOPIC, KIND, work, group=GROUP)
        else:
            endpoint.subscribe(TOPIC, KIND, lambda m: print(m.json()["job"], flush=True))
        print("ready", flush=True)
        endpoint.run_forever()


async def run_async(role: str, delay_s: float) -> None:
    async with AsyncEndpointManager() as endpoint:
        if role == "worker":

            async def work(message: Message) -> None:
                await asyncio.sleep(delay_s)
                payload = _result(message, endpoint.name)
                await endpoint.send(payload, to=[message.source_id], expiry=60.0)

            endpoint.subscribe(TOPIC, KIND, work, group=GROUP)
        else:
            endpoint.subscribe(TOPIC, KIND, lambda m: print(m.json()["job"], flush=True))
        print("ready", flush=True)
        await endpoint.run_forever()


def main() -> None:
    role, api = sys.argv[1], sys.argv[2]
    delay_s = float(sys.argv[3]) if len(sys.argv) > 3 else 0.0
    if api == "sync":
        run_sync(role, delay_s)
    else:
        asyncio.run(run_async(role, delay_s))


if __name__ == "__main__":
    main()
