#!/usr/bin/env python3
"""Micro-benchmark of sealing and opening, no sockets: us per datagram, median (and minimum)
of the rounds. Usage: .venv/bin/python tools/bench-seal.py [--rounds N]

Sizes: 64 B and 1.4 KB sealed whole (as the endpoint seals a small datagram: ``seal``), 64 KiB
(the largest sealed datagram's plaintext) sealed from two pieces, a JSON header and a
payload view (as the endpoint seals a gathered large datagram: ``seal_pieces``). Opening is
timed as the endpoint does it: the sealed datagram is copied into the receive buffer (as
``recv_into`` leaves it, warm in the cache), then opened (``open_received``, small ones
``open_received_bytes``; with an older glue.security, ``open_into`` of a view of a scratch
buffer); the time of sealing and copying
alone is subtracted. The AES-GCM columns are the floor: ``encrypt_into``/``decrypt_into``
alone. Times are this thread's CPU time, so that other processes sharing the cores count less.
"""

# ruff: noqa: T201  (a command-line tool: it prints)

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from glue.security import SEAL_OVERHEAD, NetworkKeys, Opener, Sealer, generate_key, parse_keys

NOW = 1_760_000_000_000
SIZES = {"64 B": 64, "1.4 KB": 1400, "64 KiB": 65_507 - SEAL_OVERHEAD}
_HEADER = b'{"glue":1,"net":1,"src":123456789,"inc":1,"f":[{"t":"d","s":1,"n":65453}]}\n'


def _per_call_us(call: Callable[[], object], count: int) -> float:
    # CPU time of this thread, not wall time: other processes on the machine take turns on
    # its cores, and their time would be counted as ours.
    start = time.thread_time()
    for _ in range(count):
        call()
    return (time.thread_time() - start) / count * 1e6


def _cases(size: int) -> dict[str, Callable[[], object]]:
    keys = NetworkKeys(parse_keys(generate_key()), 1)
    sealer, opener = Sealer(keys), Opener(keys)
    datagram = (_HEADER + bytes(size))[:size]
    out = bytearray(65_536)
    if size > 4096:
        pieces = (datagram[: len(_HEADER)], memoryview(datagram)[len(_HEADER) :])
        seal: Callable[[], memoryview | bytes] = lambda: sealer.seal_pieces(pieces, NOW)  # noqa: E731
    else:
        seal = lambda: sealer.seal(datagram, NOW)  # noqa: E731
    received = getattr(opener, "buffer", bytearray(65_536))

    def receive() -> int:  # what recv_into does
        sealed = seal()
        received[: len(sealed)] = sealed
        return len(sealed)

    def receive_and_open() -> object:
        n = receive()
        if size <= 4096 and hasattr(opener, "open_received_bytes"):  # small: into bytes
            return opener.open_received_bytes(n, NOW)
        if hasattr(opener, "open_received"):
            return opener.open_received(n, NOW, out)
        with memoryview(received) as view, view[:n] as sealed:  # the endpoint, before
            return opener.open_into(sealed, NOW, out)

    aead = AESGCM(bytes(32))
    nonce, ad = bytes(12), bytes(38)
    ciphertext, plain = bytearray(size + 16), bytearray(size)
    aead.encrypt_into(nonce, datagram, ad, ciphertext)
    return {
        "seal": seal,
        "receive": receive,
        "receive+open": receive_and_open,
        "gcm enc": lambda: aead.encrypt_into(nonce, datagram, ad, ciphertext),
        "gcm dec": lambda: aead.decrypt_into(nonce, ciphertext, ad, plain),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    print(f"{'size':>7} {'seal':>13} {'open':>13} {'gcm enc':>13} {'gcm dec':>13}")
    print(f"{'':>7}" + " median (min)" * 4 + "  us per datagram")
    for label, size in SIZES.items():
        cases = _cases(size)
        count = 20_000 if size < 4096 else 2_000
        samples: dict[str, list[float]] = {name: [] for name in cases}
        for _ in range(args.rounds):  # interleaved, so that drift in the machine's load is shared
            for name, call in cases.items():
                samples[name].append(_per_call_us(call, count))
        pairs = zip(samples["receive"], samples["receive+open"], strict=True)
        opened = [both - alone for alone, both in pairs]
        columns = [samples["seal"], opened, samples["gcm enc"], samples["gcm dec"]]
        print(
            f"{label:>7}"
            + "".join(f" {statistics.median(c):6.2f} ({min(c):4.2f})" for c in columns)
        )


if __name__ == "__main__":
    main()
