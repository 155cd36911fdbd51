"""``python -m glue.bench``: glue against raw UDP, between two processes, in one run.

Every figure is measured at the receiving process: raw UDP counts the datagrams that arrived
(the sender blasts one datagram per message, as fast as Python can, so this is the ceiling of
one-datagram-per-message in Python), glue counts whole messages delivered through the transport
(exactly once, in order, checked). Each glue case runs with the blocking API
(``EndpointManager``, the thread runtime) and with the asyncio API (``AsyncEndpointManager`` at
both ends): messages sent to the peer directly (``send``), and published on a topic the receiver
subscribes to (``publish``/``subscribe``, callbacks on the callback pool or on a task); and
publish/subscribe with a network key (``sealed``). The round trip is a 64-byte ping answered by
the other process, the same ways, plus the blocking API with the answering callback inline
(``subscribe(..., inline=True)``); its median and 99th percentile are kept per round.

The machine's speed drifts between rounds, so every round measures raw UDP next to each case and
every ratio is taken within its round; the table shows the median of the rounds' ratios and their
range. Sealed publish/subscribe is measured right next to unsealed, in turn first and second, and
their ratio per round is shown against issue 13's goals. ``--json`` prints all of it (each round's
figures too) as one JSON document.

Everything runs on 127.0.0.1 with a unicast rendezvous (no multicast), so it is safe anywhere;
still, run it inside ``tools/isolated-net`` like every test.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, Final

import orjson

__all__ = ["add_options", "main", "run"]

_MB = 1_000_000
_RAW_MAX_DATAGRAM = 65507
_RTT_WARMUP = 200
#: Receivers' queues: large enough that nothing is dropped for a consumer that lags behind a
#: burst (the figures count messages delivered; glue's default bounds would drop beyond them).
_QUEUE_SIZE = 10_000_000
_QUEUE_BYTES = 1 << 34
_RTT_SAMPLES = 2000


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark (or one of its receiver roles, when started by itself)."""
    parser = argparse.ArgumentParser(prog="python -m glue.bench", description=__doc__)
    add_options(parser)
    parser.add_argument(
        "--role",
        choices=["raw-receiver", "glue-receiver", "glue-async-receiver", "glue-async-echo"],
        help=argparse.SUPPRESS,
    )
    parser.add_argument("--inline", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--echo", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--pubsub", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--request", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--key", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--busy-poll", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--warmup", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.role == "raw-receiver":
        return _raw_receiver(args.count, args.echo)
    if args.role == "glue-receiver":
        return _glue_receiver(
            args.port,
            args.count,
            args.echo,
            args.pubsub,
            args.key,
            inline=args.inline,
            request=args.request,
            busy_poll=args.busy_poll,
            warmup=args.warmup,
        )
    if args.role == "glue-async-receiver":
        return asyncio.run(_glue_async_receiver(args.port, args.count, args.pubsub))
    if args.role == "glue-async-echo":
        return asyncio.run(
            _glue_async_echo(args.port, args.pubsub, args.request, busy_poll=args.busy_poll)
        )
    return run(args, parser)


def add_options(parser: argparse.ArgumentParser) -> None:
    """The benchmark's options (``glue bench`` takes the same)."""
    parser.add_argument(
        "--seconds", type=float, default=2.0, help="time budget of each throughput measurement"
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="rounds; each measures every case once, raw UDP next to glue (medians are printed)",
    )
    parser.add_argument(
        "--sizes",
        default="64,65536,1048576",
        help="message sizes in bytes, comma-separated (default: 64 B, 64 KiB and 1 MiB)",
    )
    parser.add_argument(
        "--loss",
        type=float,
        default=None,
        metavar="P",
        help="instead: goodput of publish/subscribe with a fraction P of datagrams dropped at "
        "random (iptables, both directions), next to none, in the same rounds; needs a private "
        "network namespace (tools/isolated-net)",
    )
    parser.add_argument(
        "--rate",
        default=None,
        metavar="RATE",
        help="with --loss: the datagrams pass a link of RATE (tc tbf on lo, e.g. 1gbit) with a "
        "5 ms queue, as through a switch port, with and without the loss; the link, not the "
        "CPU, is then the limit",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print the results as one JSON document on standard output (progress goes to "
        "standard error)",
    )


def run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """Run the benchmark ``add_options``' options ask for (``parser`` reports a bad one)."""
    try:
        sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    except ValueError:
        parser.error(f"--sizes must be comma-separated byte counts, not {args.sizes!r}")
    if not sizes or min(sizes) < 1 or args.repeat < 1 or not args.seconds > 0:
        parser.error("--sizes must be positive byte counts, --repeat >= 1 and --seconds > 0")
    if args.loss is not None:
        if not 0 < args.loss < 1:
            parser.error(f"--loss must be a fraction between 0 and 1, e.g. 0.1, not {args.loss}")
        problem = _loss_problem()
        if problem:
            print(f"glue bench --loss: {problem}", file=sys.stderr)
            return 2
        if args.rate is not None and not re.fullmatch(r"\d+(\.\d+)?[kmg]?bit", args.rate):
            parser.error(
                f"--rate must be a rate as tc writes it, e.g. 1gbit or 100mbit, not {args.rate!r}"
            )
        return _run_loss(args.seconds, args.repeat, sizes, args.loss, args.rate)
    if args.rate is not None:
        parser.error("--rate goes with --loss")
    return _run(args.seconds, args.repeat, sizes, as_json=args.json)


# --- the driver ----------------------------------------------------------------------------------

#: One measurement: messages/s, MB/s, and CPU seconds per message of the sending and the
#: receiving process (``nan`` where not measured).
_Figures = tuple[float, float, float, float]
#: Throughput variants, each measured in every round next to raw UDP. "send": direct messages
#: to one peer; "pub/sub": publish on a topic the receiver subscribes to (callbacks on the
#: callback pool for the blocking API, on a task for asyncio); "batches": the same pub/sub with
#: ``publish_many``, ``_batch(size)`` messages a call; "sealed": with a network key.
_VARIANTS = (
    "raw UDP",
    "blocking send",
    "blocking pub/sub",
    "blocking batches",
    "asyncio send",
    "asyncio pub/sub",
    "blocking sealed",
)
#: Round-trip variants: a 64-byte ping answered by the other process. "inline": the answering
#: subscription's callback runs on the network thread (``subscribe(..., inline=True)``);
#: "request": ``request`` answered by a ``serve`` handler (on the callback pool, or a task).
#: "busy": pub/sub with GLUE_BUSY_POLL_MICROSECONDS (``_BUSY_POLL_US``) at both ends, the
#: answer inline (blocking) or from a task (asyncio).
_TRIP_VARIANTS = (
    "raw UDP",
    "blocking send",
    "blocking pub/sub",
    "blocking inline",
    "blocking request",
    "asyncio send",
    "asyncio pub/sub",
    "asyncio request",
    "blocking sealed",
    "blocking busy",
    "asyncio busy",
)
#: GLUE_BUSY_POLL_MICROSECONDS of the "busy" round trips.
_BUSY_POLL_US = 500
#: Request/reply's goal: at most this many times the pub/sub round trip of the same API.
_REQUEST_GOAL = 1.1
#: Issue 13's goals for sealed publish/subscribe, as a fraction of unsealed, by message size.
_SEALED_GOALS = {"64": 0.9, "65536": 0.85}
#: A network key for the sealed variants (both ends), made once per run.
_KEY = ""


def _round_order(round_number: int) -> list[str]:
    """The variants in the order a round measures them: sealed right next to the unsealed
    pub/sub it is compared with, first one then the other in turn, so that neither always runs
    after the other and the machine's drift in a round enters their ratio as little as it can."""
    order = [v for v in _VARIANTS if v != "blocking sealed"]
    pair = ["blocking pub/sub", "blocking sealed"]
    if round_number % 2 == 0:
        pair.reverse()
    at = order.index("blocking pub/sub")
    return [*order[:at], *pair, *order[at + 1 :]]


def _sealed_ratios(figures: dict[tuple[int, str], list[_Figures]], size: int) -> list[float]:
    """Each round's sealed publish/subscribe rate over the unsealed one (measured back to back)."""
    sealed = [r[0] for r in figures[(size, "blocking sealed")]]
    return _ratios(sealed, [r[0] for r in figures[(size, "blocking pub/sub")]])


def _batch(size: int) -> int:
    """Messages per ``publish_many`` call of the "batches" variant: 100, or 1 MiB's worth."""
    return max(1, min(100, (1 << 20) // size))


def _label(size: int) -> str:
    for unit, scale in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale and size % scale == 0:
            return f"{size // scale} {unit}"
    return f"{size} B"


def _measure(variant: str, size: int, count: int, seconds: float) -> _Figures:
    if variant == "raw UDP":
        return _raw_throughput(size, count, seconds)
    if variant.startswith("asyncio"):
        pubsub = variant.endswith("pub/sub")
        return asyncio.run(_glue_async_throughput(size, count, seconds, pubsub=pubsub))
    key = _KEY if variant.endswith("sealed") else None
    batch = _batch(size) if variant.endswith("batches") else 0
    return _glue_throughput(
        size, count, seconds, pubsub=variant != "blocking send", key=key, batch=batch
    )


def _trip(variant: str) -> tuple[float, float]:
    if variant == "raw UDP":
        return _raw_round_trip()
    request = variant.endswith("request")
    busy = variant.endswith("busy")
    busy_poll = _BUSY_POLL_US if busy else 0
    if variant.startswith("asyncio"):
        return asyncio.run(
            _glue_async_round_trip(
                pubsub=variant.endswith(("pub/sub", "busy")), request=request, busy_poll=busy_poll
            )
        )
    return _glue_round_trip(
        pubsub=variant not in ("blocking send", "blocking request"),
        key=_KEY if variant.endswith("sealed") else None,
        inline=variant.endswith(("inline", "busy")),
        request=request,
        busy_poll=busy_poll,
    )


def _run(seconds: float, repeat: int, sizes: Sequence[int], *, as_json: bool = False) -> int:
    progress = sys.stderr if as_json else sys.stdout
    print(
        f"glue benchmark: two processes on 127.0.0.1, Python {sys.version.split()[0]}, "
        f"{os.cpu_count()} CPUs; {repeat} round(s), each measuring every case once with raw "
        f"UDP next to glue, {seconds:g} s per measurement",
        file=progress,
        flush=True,
    )
    global _KEY
    from glue.security import generate_key

    _KEY = generate_key()
    figures: dict[tuple[int, str], list[_Figures]] = {}
    round_trips: dict[str, list[tuple[float, float]]] = {}
    for round_number in range(1, repeat + 1):
        for size in sizes:
            # Enough messages that every measurement runs for its whole time budget.
            count = max(100, int(min(600_000 * seconds, 6e9 * seconds / size)))
            measured = {v: _measure(v, size, count, seconds) for v in _round_order(round_number)}
            for variant, result in measured.items():
                figures.setdefault((size, variant), []).append(result)
            print(
                f"round {round_number}/{repeat} {_label(size):>7}: "
                + ", ".join(f"{v} {r[0]:,.0f} msg/s" for v, r in measured.items()),
                file=progress,
                flush=True,
            )
        trips = {v: _trip(v) for v in _TRIP_VARIANTS}
        for variant, taken in trips.items():
            round_trips.setdefault(variant, []).append(taken)
        print(
            f"round {round_number}/{repeat} round trip p50: "
            + ", ".join(f"{v} {s[0] * 1e6:.0f} us" for v, s in trips.items()),
            file=progress,
            flush=True,
        )
    if as_json:
        print(orjson.dumps(_summary(figures, round_trips, sizes, seconds)).decode())
    else:
        print()
        print(_table(figures, round_trips, sizes, repeat))
    return 0


def _ratios(values: Sequence[float], bases: Sequence[float]) -> list[float]:
    """Per-round ratios (the machine drifts between rounds; within one, both saw the same)."""
    return [v / b if b else float("nan") for v, b in zip(values, bases, strict=True)]


def _spread(values: Sequence[float]) -> dict[str, float]:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
    }


def _summary(
    figures: dict[tuple[int, str], list[_Figures]],
    round_trips: dict[str, list[tuple[float, float]]],
    sizes: Sequence[int],
    seconds: float,
) -> dict[str, Any]:
    """Everything the table shows, and each round's figures, for ``--json``."""
    throughput = []
    for size in sizes:
        raw = [r[0] for r in figures[(size, "raw UDP")]]
        for variant in _VARIANTS:
            runs = figures[(size, variant)]
            rates = [r[0] for r in runs]
            throughput.append(
                {
                    "size_bytes": size,
                    "variant": variant,
                    "messages_per_s": _spread(rates),
                    "mb_per_s": _spread([r[1] for r in runs]),
                    "ratio_to_raw": _spread(_ratios(rates, raw)),
                    "cpu_us_per_message_sender": statistics.median(r[2] for r in runs) * 1e6,
                    "cpu_us_per_message_receiver": statistics.median(r[3] for r in runs) * 1e6,
                    "rounds": [list(r) for r in runs],
                }
            )
    raw_p50 = [p50 for p50, _ in round_trips["raw UDP"]]
    trips = []
    for variant, samples in round_trips.items():
        p50s = [p50 for p50, _ in samples]
        trips.append(
            {
                "variant": variant,
                "p50_us": _spread([s * 1e6 for s in p50s]),
                "p99_us": _spread([p99 * 1e6 for _, p99 in samples]),
                "ratio_to_raw": _spread(_ratios(p50s, raw_p50)),
            }
        )
    return {
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
        "seconds_per_measurement": seconds,
        "rounds": len(raw_p50),
        "throughput": throughput,
        "round_trip": trips,
        "sealed_to_unsealed": [
            {"size_bytes": size, **_spread(_sealed_ratios(figures, size))} for size in sizes
        ],
        "sealed_goal": _SEALED_GOALS,
        "request_to_pubsub": {
            api: _spread(ratios) for api, ratios in _request_ratios(round_trips).items()
        },
        "request_goal": _REQUEST_GOAL,
    }


def _request_ratios(round_trips: dict[str, list[tuple[float, float]]]) -> dict[str, list[float]]:
    """Per API, each round's request/reply p50 over its pub/sub p50 (the same round)."""
    found = {}
    for api in ("blocking", "asyncio"):
        requests, pubsub = round_trips.get(f"{api} request"), round_trips.get(f"{api} pub/sub")
        if requests and pubsub:
            found[api] = _ratios([r[0] for r in requests], [p[0] for p in pubsub])
    return found


def _table(
    figures: dict[tuple[int, str], list[_Figures]],
    round_trips: dict[str, list[tuple[float, float]]],
    sizes: Sequence[int],
    repeat: int,
) -> str:
    """Medians over the rounds; ratios are taken within each round, then their median (and
    range) is shown, so the machine's drift between rounds does not enter a ratio."""
    spread = " (range)" if repeat > 1 else ""

    def ratio(values: Sequence[float], bases: Sequence[float]) -> str:
        ratios = _ratios(values, bases)
        text = f"{statistics.median(ratios):.2f} x raw"
        if repeat > 1:
            text += f" ({min(ratios):.2f}-{max(ratios):.2f})"
        return text

    lines = [
        f"{'size':>7}  {'variant':<17} {'msg/s':>11} {'MB/s':>9}  {'ratio' + spread:<24}"
        f" CPU us/msg sender / receiver",
    ]
    for size in sizes:
        raw = [r[0] for r in figures[(size, "raw UDP")]]
        for variant in _VARIANTS:
            runs = figures[(size, variant)]
            rates = [r[0] for r in runs]
            rate = statistics.median(rates)
            mb = statistics.median(r[1] for r in runs)
            shown = "" if variant == "raw UDP" else ratio(rates, raw)
            cpu = ""
            if variant != "raw UDP":
                send = statistics.median(r[2] for r in runs) * 1e6
                receive = statistics.median(r[3] for r in runs) * 1e6
                cpu = f"{send:8.1f} / {receive:.1f}"
            lines.append(
                f"{_label(size):>7}  {variant:<17} {rate:>11,.0f} {mb:>9.1f}  {shown:<24} {cpu}"
            )
    for size in sizes:
        ratios = _sealed_ratios(figures, size)
        text = f"{statistics.median(ratios):.2f} x"
        if repeat > 1:
            text += f" ({min(ratios):.2f}-{max(ratios):.2f})"
        goal = _SEALED_GOALS.get(str(size))
        lines.append(
            f"sealed / unsealed pub/sub, {_label(size)}: {text}"
            + (f" (goal: at least {goal} x)" if goal else "")
        )
    lines.append("")
    lines.append(
        f"round trip, 64 B (per round: median and 99th percentile of {_RTT_SAMPLES}; "
        "medians of rounds shown)"
    )
    lines.append(f"{'variant':<17} {'p50 us':>8} {'p99 us':>8}  ratio of p50{spread}")
    raw_p50 = [p50 for p50, _ in round_trips["raw UDP"]]
    for variant, samples in round_trips.items():
        p50s = [p50 for p50, _ in samples]
        p50 = statistics.median(p50s) * 1e6
        p99 = statistics.median(p99 for _, p99 in samples) * 1e6
        shown = "" if variant == "raw UDP" else ratio(p50s, raw_p50)
        lines.append(f"{variant:<17} {p50:>8.0f} {p99:>8.0f}  {shown}")
    for api, ratios in _request_ratios(round_trips).items():
        text = f"{statistics.median(ratios):.2f} x"
        if repeat > 1:
            text += f" ({min(ratios):.2f}-{max(ratios):.2f})"
        lines.append(
            f"request/reply round trip, {api}: {text} its pub/sub round trip "
            f"(goal: at most {_REQUEST_GOAL} x)"
        )
    return "\n".join(lines)


# --- under loss ----------------------------------------------------------------------------------

#: The share of each measurement's sending time left out at its start (slow start, the first
#: round trips): goodput under loss is the steady figure, and a run of a few seconds would
#: otherwise weigh its start-up more than a long stream does. The tail (the last losses repaired
#: after sending stops) stays in.
_LOSS_WARMUP_FRACTION: Final = 1 / 8
#: Tags the iptables rule the loss benchmark adds (and removes), so it never touches another.
_LOSS_COMMENT = "glue-bench-loss"


def _loss_problem() -> str | None:
    """Why random loss cannot be set up here, or None. It is set with iptables on ``lo``, so only
    in a network namespace of our own: never on the machine's."""
    try:
        isolated = os.stat("/proc/self/ns/net").st_ino != os.stat("/proc/1/ns/net").st_ino
    except PermissionError:
        # Not allowed to look at init's namespace: not the machine's root, so any iptables we
        # may change are those of a namespace of our own (unshare --map-root-user).
        isolated = True
    except OSError as exc:
        return f"cannot tell which network namespace this is ({exc})"
    if not isolated:
        return "run it in a private network namespace (tools/isolated-net glue bench --loss P)"
    if subprocess.run(["iptables", "-L", "INPUT", "-n"], capture_output=True).returncode != 0:
        return "iptables is missing or not permitted here (apt-get install iptables)"
    return None


def _set_loss(probability: float | None) -> None:
    """Drop ``probability`` of the datagrams arriving on ``lo`` (every datagram of both
    directions passes there once), or stop dropping (None)."""
    rule = [
        "INPUT", "-i", "lo", "-p", "udp",
        "-m", "comment", "--comment", _LOSS_COMMENT,
        "-m", "statistic", "--mode", "random", "--probability", "",
        "-j", "DROP",
    ]  # fmt: skip
    listed = subprocess.run(["iptables", "-S", "INPUT"], capture_output=True, text=True).stdout
    for line in listed.splitlines():  # ours from this run or one that was interrupted
        if _LOSS_COMMENT in line:
            subprocess.run(["iptables", "-D", *line.split()[1:]], check=True)
    if probability is not None:
        rule[rule.index("--probability") + 1] = str(probability)
        subprocess.run(["iptables", "-A", *rule], check=True)


def _set_rate(rate: str | None) -> None:
    """Pass every datagram on ``lo`` through a link of ``rate`` with a 5 ms queue (``tc tbf``;
    beyond the queue datagrams are dropped, as a switch port drops them), or stop (None)."""
    subprocess.run(["tc", "qdisc", "del", "dev", "lo", "root"], capture_output=True)
    if rate is not None:
        subprocess.run(
            ["tc", "qdisc", "add", "dev", "lo", "root", "tbf", "rate", rate, "burst", "256kb",
             "latency", "5ms"],
            check=True,
        )  # fmt: skip


def _run_loss(
    seconds: float, repeat: int, sizes: Sequence[int], loss: float, rate: str | None = None
) -> int:
    warmup = seconds * _LOSS_WARMUP_FRACTION
    link = f"through a {rate} link with a 5 ms queue (tc tbf), " if rate else ""
    print(
        f"glue benchmark under loss: publish/subscribe between two processes on 127.0.0.1, "
        f"{link}{loss:.0%} of datagrams dropped at random both ways (data, acks, announcements) "
        f"next to none; {repeat} round(s), {seconds:g} s of sending per measurement, every "
        f"message delivered once and in order (checked); goodput from {warmup:g} s after the "
        f"first arrival to the last, the lossy and lossless runs of a round taking turns to go "
        f"first",
        flush=True,
    )
    results: dict[int, list[tuple[_Figures, _Figures]]] = {}
    try:
        _set_rate(rate)
        for round_number in range(1, repeat + 1):
            for size in sizes:
                count = max(100, int(min(600_000 * seconds, 6e9 * seconds / size)))
                measured: dict[float | None, _Figures] = {}
                # Alternate which goes first, so that a machine speeding up or slowing down
                # within a round does not favour one of them every time.
                for probability in (None, loss) if round_number % 2 else (loss, None):
                    _set_loss(probability)
                    measured[probability] = _glue_throughput(
                        size, count, seconds, pubsub=True, warmup=warmup
                    )
                    _set_loss(None)
                clean, lossy = measured[None], measured[loss]
                results.setdefault(size, []).append((clean, lossy))
                print(
                    f"round {round_number}/{repeat} {_label(size):>7}: no loss "
                    f"{clean[0]:,.0f} msg/s, {loss:.0%} loss {lossy[0]:,.0f} msg/s",
                    flush=True,
                )
    finally:
        _set_loss(None)
        if rate is not None:
            _set_rate(None)
    print()
    spread = " (range)" if repeat > 1 else ""
    print(
        f"{'size':>7}  {'no loss MB/s':>12}  {f'{loss:.0%} loss MB/s':>14}  "
        f"{f'goodput ratio{spread}':<24}  CPU us/msg, sender  receiver (no loss -> loss)"
    )
    for size in sizes:
        runs = results[size]
        ratios = [lossy[0] / clean[0] if clean[0] else float("nan") for clean, lossy in runs]
        ratio = f"{statistics.median(ratios):.2f}"
        if repeat > 1:
            ratio += f" ({min(ratios):.2f}-{max(ratios):.2f})"
        clean_mb = statistics.median(clean[1] for clean, _ in runs)
        lossy_mb = statistics.median(lossy[1] for _, lossy in runs)
        cpu = [
            f"{statistics.median(c[i] for c, _ in runs) * 1e6:.1f} -> "
            f"{statistics.median(x[i] for _, x in runs) * 1e6:.1f}"
            for i in (2, 3)
        ]
        print(
            f"{_label(size):>7}  {clean_mb:>12.1f}  {lossy_mb:>14.1f}  {ratio:<24}  "
            f"{cpu[0]:>16}  {cpu[1]:>16}"
        )
    return 0


def _spawn(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "glue.bench", *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("GLUE_")},
    )


def _tell(process: subprocess.Popen[str], line: str) -> None:
    """Write ``line`` to a role's standard input (how the driver talks to it)."""
    assert process.stdin is not None
    process.stdin.write(line)
    process.stdin.flush()


def _read_json(process: subprocess.Popen[str]) -> dict[str, Any]:
    assert process.stdout is not None
    line = process.stdout.readline()
    if not line:
        raise RuntimeError("the receiver process ended without a result")
    result: dict[str, Any] = orjson.loads(line)
    return result


def _finish(process: subprocess.Popen[str]) -> dict[str, Any]:
    result = _read_json(process)
    process.wait(timeout=30)
    return result


def _rates(result: dict[str, Any], size: int, sender_cpu: float = float("nan")) -> _Figures:
    """Figures from a receiver's result and the sender's CPU seconds (over the whole send); the
    rates after the warm-up when the receiver measured one."""
    count, elapsed = result["count"], result["elapsed"]
    sender_cpu /= count or 1
    count = result.get("measured_count", count)
    elapsed = result.get("measured_elapsed", elapsed)
    if not count or elapsed <= 0:
        return 0.0, 0.0, float("nan"), float("nan")
    receiver_cpu = result.get("cpu_per_message")
    return (
        count / elapsed,
        count * size / elapsed / _MB,
        sender_cpu,
        float("nan") if receiver_cpu is None else receiver_cpu,
    )


# --- raw UDP -------------------------------------------------------------------------------------


def _raw_throughput(size: int, count: int, seconds: float) -> _Figures:
    """Datagrams of at most 65507 bytes: a larger message is cut into full datagrams and the
    rest (64 KiB is one of 65507 bytes and one of 29), sent from views, so no copy in Python."""
    message = memoryview(os.urandom(size))
    pieces = [message[i : i + _RAW_MAX_DATAGRAM] for i in range(0, size, _RAW_MAX_DATAGRAM)]
    per_message = len(pieces)
    receiver = _spawn("--role", "raw-receiver", "--count", str(count * per_message))
    port = _read_json(receiver)["port"]
    batch = pieces * max(1, 256 // per_message)  # one Python loop iteration per datagram
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * 1024 * 1024)
        deadline = time.perf_counter() + seconds
        destination = ("127.0.0.1", port)
        sent = 0
        while sent < count * per_message and time.perf_counter() < deadline:
            for piece in batch:
                sock.sendto(piece, destination)
            sent += len(batch)
        sock.sendto(b"", destination)  # end marker
    assert receiver.stdin is not None
    receiver.stdin.close()
    result = _finish(receiver)
    result["count"] //= per_message
    return _rates(result, size)


def _raw_receiver(count: int, echo: bool) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 * 1024 * 1024)
        sock.bind(("127.0.0.1", 0))
        print(orjson.dumps({"port": sock.getsockname()[1]}).decode(), flush=True)
        if echo:
            while True:
                data, source = sock.recvfrom(65536)
                if not data:
                    return 0
                sock.sendto(data, source)
        buffer = bytearray(65536)
        got = 0
        first = last = 0.0
        sock.settimeout(2.0)
        while got < count:
            try:
                n = sock.recv_into(buffer)
            except TimeoutError:
                break
            if n == 0:
                break
            last = time.perf_counter()
            if got == 0:
                first = last
            got += 1
    print(orjson.dumps({"count": got, "elapsed": last - first}).decode(), flush=True)
    return 0


def _percentiles(samples: list[float]) -> tuple[float, float]:
    """The median and the 99th percentile of the samples after the warm-up."""
    kept = sorted(samples[_RTT_WARMUP:])
    return statistics.median(kept), kept[min(len(kept) - 1, int(len(kept) * 0.99))]


def _raw_round_trip() -> tuple[float, float]:
    echo = _spawn("--role", "raw-receiver", "--echo")
    port = _read_json(echo)["port"]
    samples = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect(("127.0.0.1", port))
        payload = b"x" * 64
        for _ in range(_RTT_WARMUP + _RTT_SAMPLES):
            started = time.perf_counter()
            sock.send(payload)
            sock.recv(65536)
            samples.append(time.perf_counter() - started)
        sock.send(b"")
    echo.wait(timeout=30)
    return _percentiles(samples)


# --- glue ----------------------------------------------------------------------------------------


def _glue_settings(**extra: Any) -> Any:
    from glue.settings import load_settings

    return load_settings(
        listen_address="127.0.0.1:0",
        listen_interface="lo",
        discovery_rate_milliseconds=200,
        **extra,
    )


def _glue_throughput(
    size: int,
    count: int,
    seconds: float,
    *,
    pubsub: bool = False,
    key: str | None = None,
    batch: int = 0,
    warmup: float = 0.0,
) -> _Figures:
    from glue.manager import EndpointManager

    port = _free_port()
    mode = (
        *(("--pubsub",) if pubsub else ()),
        *((f"--key={key}",) if key else ()),
        *((f"--warmup={warmup}",) if warmup else ()),
    )
    receiver = _spawn("--role", "glue-receiver", "--port", str(port), "--count", str(count), *mode)
    _read_json(receiver)  # ready
    settings = _glue_settings(
        discovery_target_address=f"127.0.0.1:{port}",
        discovery_listen_address="0",
        **({"network_key": key} if key else {}),
    )
    payload = os.urandom(size)
    with EndpointManager(settings) as sender:
        [peer] = sender.wait_for_peers(1, timeout=10)
        if pubsub:
            sender.wait_for_subscribers("bench/data", timeout=10)
        cpu = time.process_time()  # every thread of this process
        deadline = time.perf_counter() + seconds
        sent = 0
        payloads = [payload] * batch
        while sent < count and time.perf_counter() < deadline:
            if batch:
                batch = min(batch, count - sent)
                sender.publish_many(
                    "bench/data", "bench", payloads[:batch], expiry=60.0, timeout=30.0
                )
                sent += batch
                continue
            if pubsub:
                sender.publish("bench/data", "bench", payload, expiry=60.0, timeout=30.0)
            else:
                sender.send(payload, to=[peer.endpoint_id], expiry=60.0, timeout=30.0)
            sent += 1
        # Everything acknowledged before the receiver is told to stop: under loss the acks of
        # the last frames may still be on their way (the receiver's measure ends at its last
        # arrival, so this adds nothing to it), and stopping without them would warn of frames
        # left unacknowledged.
        sender.flush(timeout=60.0)
        _tell(receiver, f"{sent}\n")
        result = _finish(receiver)
        cpu = time.process_time() - cpu
    if not result["in_order"]:
        raise RuntimeError("glue delivered messages out of order")
    if result["count"] != sent:
        raise RuntimeError(f"glue delivered {result['count']} of {sent} messages")
    return _rates(result, size, cpu)


def _glue_receiver(
    port: int,
    count: int,
    echo: bool,
    pubsub: bool = False,
    key: str | None = None,
    *,
    inline: bool = False,
    request: bool = False,
    busy_poll: int = 0,
    warmup: float = 0.0,
) -> int:
    from glue.manager import EndpointManager

    settings = _glue_settings(
        discovery_target_address="0",
        discovery_listen_address=f"127.0.0.1:{port}",
        busy_poll_microseconds=busy_poll,
        **({"network_key": key} if key else {}),
    )
    done = threading.Event()
    tally = _Tally(count, done.set, warmup)
    with EndpointManager(settings) as endpoint:
        if echo and request:
            endpoint.serve("bench/ping", lambda r: r.payload)
        elif echo and pubsub:
            endpoint.subscribe(
                "bench/ping",
                "bench",
                lambda m: endpoint.publish("bench/pong", "bench", m.payload, expiry=10.0),
                inline=inline,
            )
        elif echo:
            endpoint.on_message(
                lambda m: endpoint.send(m.payload, to=[m.source.endpoint_id], expiry=10)
            )
        elif pubsub:
            # Every one, once, in order: the n-th message is the publisher's n-th on the topic.
            endpoint.subscribe(
                "bench/data",
                "bench",
                lambda m: tally.arrived(m.sequence),
                queue_size=_QUEUE_SIZE,
                queue_bytes=_QUEUE_BYTES,
            )
        else:
            stream = endpoint.messages(queue_size=_QUEUE_SIZE, queue_bytes=_QUEUE_BYTES)
            threading.Thread(target=_count, args=(stream, tally), daemon=True).start()
        print(orjson.dumps({"ready": True}).decode(), flush=True)
        sent = int(sys.stdin.readline() or 0)  # the sender says how many it sent, then waits
        if echo:
            with contextlib.suppress(Exception):  # (the last answer's ack, before the goodbye)
                endpoint.flush(timeout=2.0)
            return 0
        if not tally.expect(sent):
            done.wait(timeout=120)
    print(orjson.dumps(tally.result()).decode(), flush=True)
    return 0


def _count(stream: Any, tally: _Tally) -> None:
    for _ in stream:
        tally.arrived()


class _Tally:
    """What a receiving role counts: messages, first and last arrival, order; ``done()`` is
    called when the expected count has arrived. With ``warmup`` (seconds), also the messages
    from the first arrival that many seconds after the first one to the last (``measured``)."""

    def __init__(self, expected: int, done: Callable[[], object], warmup: float = 0.0) -> None:
        self.expected = expected
        self.got = 0
        self.first = self.last = 0.0
        self.warmup = warmup
        self.warm_at: float | None = None if warmup > 0 else 0.0
        self.warm_got = 0
        # Process CPU time (every thread) at the first arrival and at a later one (sampled: the
        # clock is a system call).
        self.cpu_first = self.cpu_last = 0.0
        self.cpu_count = 0
        self.in_order = True
        self._done = done

    def arrived(self, sequence: int | None = None) -> None:
        now = time.perf_counter()
        if self.got == 0:
            self.first = now
            self.cpu_first = time.process_time()
        self.got += 1
        self.last = now
        if self.warm_at is None and now - self.first >= self.warmup:
            self.warm_at, self.warm_got = now, self.got
        if not self.got & 255:
            self.cpu_last, self.cpu_count = time.process_time(), self.got
        if sequence is not None and sequence != self.got:
            self.in_order = False
        if self.got >= self.expected:
            self.cpu_last, self.cpu_count = time.process_time(), self.got
            self._done()

    def expect(self, count: int) -> bool:
        """The sender's final count; whether all of it has arrived already."""
        self.expected = count
        return self.got >= count

    def result(self) -> dict[str, Any]:
        measured = {}
        if self.warmup > 0 and self.warm_at is not None and self.last > self.warm_at:
            measured = {
                "measured_count": self.got - self.warm_got,
                "measured_elapsed": self.last - self.warm_at,
            }
        return {
            **measured,
            "count": self.got,
            "elapsed": self.last - self.first,
            "in_order": self.in_order,
            "cpu_per_message": (
                (self.cpu_last - self.cpu_first) / (self.cpu_count - 1)
                if self.cpu_count > 1
                else None
            ),
        }


def _glue_round_trip(
    *,
    pubsub: bool = False,
    key: str | None = None,
    inline: bool = False,
    request: bool = False,
    busy_poll: int = 0,
) -> tuple[float, float]:
    from glue.manager import EndpointManager

    port = _free_port()
    mode = (
        *(("--pubsub",) if pubsub else ()),
        *((f"--key={key}",) if key else ()),
        *(("--inline",) if inline else ()),
        *(("--request",) if request else ()),
        f"--busy-poll={busy_poll}",
    )
    echo = _spawn("--role", "glue-receiver", "--port", str(port), "--echo", *mode)
    _read_json(echo)
    settings = _glue_settings(
        discovery_target_address=f"127.0.0.1:{port}",
        discovery_listen_address="0",
        busy_poll_microseconds=busy_poll,
        **({"network_key": key} if key else {}),
    )
    samples = []
    with EndpointManager(settings) as pinger:
        [peer] = pinger.wait_for_peers(1, timeout=10)
        payload = b"x" * 64
        if request:
            pinger.wait_for_responders("bench/ping", timeout=10)
            for _ in range(_RTT_WARMUP + _RTT_SAMPLES):
                started = time.perf_counter()
                pinger.request("bench/ping", payload, timeout=5.0)
                samples.append(time.perf_counter() - started)
        elif pubsub:
            pongs = pinger.subscribe("bench/pong", "bench")
            pinger.wait_for_subscribers("bench/ping", timeout=10)
            for _ in range(_RTT_WARMUP + _RTT_SAMPLES):
                started = time.perf_counter()
                pinger.publish("bench/ping", "bench", payload, expiry=5.0)
                pongs.get(timeout=5)
                samples.append(time.perf_counter() - started)
        else:
            replies = pinger.messages(timeout=5)
            for _ in range(_RTT_WARMUP + _RTT_SAMPLES):
                started = time.perf_counter()
                pinger.send(payload, to=[peer.endpoint_id], expiry=5.0)
                next(replies)
                samples.append(time.perf_counter() - started)
        with contextlib.suppress(Exception):  # (the last ping's ack, before the goodbye)
            pinger.flush(timeout=2.0)
        _tell(echo, "0\n")
    echo.wait(timeout=30)
    return _percentiles(samples)


async def _glue_async_round_trip(
    *, pubsub: bool = False, request: bool = False, busy_poll: int = 0
) -> tuple[float, float]:
    """The same ping-pong with ``AsyncEndpointManager`` at both ends (no threads involved)."""
    from glue.manager import AsyncEndpointManager

    port = _free_port()
    mode = (*(("--pubsub",) if pubsub else ()), *(("--request",) if request else ()))
    echo = _spawn(
        "--role", "glue-async-echo", "--port", str(port), *mode, f"--busy-poll={busy_poll}"
    )
    _read_json(echo)
    settings = _glue_settings(
        discovery_target_address=f"127.0.0.1:{port}",
        discovery_listen_address="0",
        busy_poll_microseconds=busy_poll,
    )
    samples = []
    async with AsyncEndpointManager(settings) as pinger:
        [peer] = await pinger.wait_for_peers(1, timeout=10)
        payload = b"x" * 64
        if request:
            await pinger.wait_for_responders("bench/ping", timeout=10)
            for _ in range(_RTT_WARMUP + _RTT_SAMPLES):
                started = time.perf_counter()
                await pinger.request("bench/ping", payload, timeout=5.0)
                samples.append(time.perf_counter() - started)
        if pubsub:
            pongs = pinger.subscribe("bench/pong", "bench")
            await pinger.wait_for_subscribers("bench/ping", timeout=10)
            replies: Any = aiter(pongs)
        else:
            replies = pinger.messages()
        for _ in range(0 if request else _RTT_WARMUP + _RTT_SAMPLES):
            started = time.perf_counter()
            if pubsub:
                await pinger.publish("bench/ping", "bench", payload, expiry=5.0)
            else:
                await pinger.send(payload, to=[peer.endpoint_id], expiry=5.0)
            async with asyncio.timeout(5):  # (wait_for would start a task per reply)
                await anext(replies)
            samples.append(time.perf_counter() - started)
        with contextlib.suppress(Exception):  # (the last ping's ack, before the goodbye)
            await pinger.flush(timeout=2.0)
        _tell(echo, "0\n")
    echo.wait(timeout=30)
    return _percentiles(samples)


async def _glue_async_throughput(
    size: int, count: int, seconds: float, *, pubsub: bool = False
) -> _Figures:
    """``_glue_throughput`` with ``AsyncEndpointManager`` at both ends (no threads involved)."""
    from glue.manager import AsyncEndpointManager

    port = _free_port()
    receiver = _spawn(
        "--role",
        "glue-async-receiver",
        "--port",
        str(port),
        "--count",
        str(count),
        *(("--pubsub",) if pubsub else ()),
    )
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, _read_json, receiver)  # ready
    settings = _glue_settings(
        discovery_target_address=f"127.0.0.1:{port}", discovery_listen_address="0"
    )
    payload = os.urandom(size)
    async with AsyncEndpointManager(settings) as sender:
        [peer] = await sender.wait_for_peers(1, timeout=10)
        if pubsub:
            await sender.wait_for_subscribers("bench/data", timeout=10)
        to = [peer.endpoint_id]
        cpu = time.process_time()
        deadline = time.perf_counter() + seconds
        sent = 0
        while sent < count and time.perf_counter() < deadline:
            if pubsub:
                await sender.publish("bench/data", "bench", payload, expiry=60.0, timeout=30.0)
            else:
                await sender.send(payload, to=to, expiry=60.0, timeout=30.0)
            sent += 1
        _tell(receiver, f"{sent}\n")
        result = await loop.run_in_executor(None, _finish, receiver)
        cpu = time.process_time() - cpu
    if not result["in_order"]:
        raise RuntimeError("glue delivered messages out of order")
    if result["count"] != sent:
        raise RuntimeError(f"glue delivered {result['count']} of {sent} messages")
    return _rates(result, size, cpu)


async def _glue_async_receiver(port: int, count: int, pubsub: bool = False) -> int:
    from glue.manager import AsyncEndpointManager

    settings = _glue_settings(
        discovery_target_address="0", discovery_listen_address=f"127.0.0.1:{port}"
    )
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    tally = _Tally(count, done.set)
    async with AsyncEndpointManager(settings) as endpoint:
        counting = None
        if pubsub:
            endpoint.subscribe(
                "bench/data",
                "bench",
                lambda m: tally.arrived(m.sequence),
                queue_size=_QUEUE_SIZE,
                queue_bytes=_QUEUE_BYTES,
            )
        else:
            stream = endpoint.messages(queue_size=_QUEUE_SIZE, queue_bytes=_QUEUE_BYTES)

            async def tally_stream() -> None:
                async for _ in stream:
                    tally.arrived()

            counting = loop.create_task(tally_stream())
        print(orjson.dumps({"ready": True}).decode(), flush=True)
        # The sender says how many it sent, then waits for the result.
        sent = int(await loop.run_in_executor(None, sys.stdin.readline) or 0)
        if not tally.expect(sent):
            done.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), 120)
        if counting is not None:
            counting.cancel()
            await asyncio.gather(counting, return_exceptions=True)
    print(orjson.dumps(tally.result()).decode(), flush=True)
    return 0


async def _glue_async_echo(
    port: int, pubsub: bool = False, request: bool = False, *, busy_poll: int = 0
) -> int:
    from glue.manager import AsyncEndpointManager

    settings = _glue_settings(
        discovery_target_address="0",
        discovery_listen_address=f"127.0.0.1:{port}",
        busy_poll_microseconds=busy_poll,
    )
    loop = asyncio.get_running_loop()
    async with AsyncEndpointManager(settings) as endpoint:

        async def answer() -> None:
            if request:
                endpoint.serve("bench/ping", lambda r: r.payload)
                return
            if pubsub:
                async for ping in endpoint.subscribe("bench/ping", "bench"):
                    await endpoint.publish("bench/pong", "bench", ping.payload, expiry=10.0)
                return
            async for message in endpoint.messages():
                await endpoint.send(message.payload, to=[message.source.endpoint_id], expiry=10.0)

        answering = loop.create_task(answer())
        print(orjson.dumps({"ready": True}).decode(), flush=True)
        await loop.run_in_executor(None, sys.stdin.readline)  # the pinger says when it is done
        with contextlib.suppress(Exception):  # (the last answer's ack, before the goodbye)
            await endpoint.flush(timeout=2.0)
        answering.cancel()
        await asyncio.gather(answering, return_exceptions=True)
    return 0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


if __name__ == "__main__":
    sys.exit(main())
