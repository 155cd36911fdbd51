"""Sealing and opening datagrams: keys, forgery, replay, staleness, rotation (no sockets)."""

from __future__ import annotations

import random

import pytest

from glue.security import (
    SEAL_OVERHEAD,
    NetworkKeys,
    Opener,
    Rejected,
    Sealer,
    generate_key,
    parse_keys,
)

NOW = 1_760_000_000_000  # ms since the epoch
DATAGRAM = b'{"v":1,"n":1,"f":[]}\n'


def _keys(*texts: str, network_id: int = 1) -> NetworkKeys:
    return NetworkKeys([k for t in texts for k in parse_keys(t)], network_id)


def _open(opener: Opener, sealed: bytes, now: int = NOW) -> bytes:
    out = bytearray(len(sealed))
    size = opener.open_into(sealed, now, out)
    return bytes(out[:size])


def _reason(opener: Opener, sealed: bytes, now: int = NOW) -> str:
    with pytest.raises(Rejected) as caught:
        _open(opener, sealed, now)
    return caught.value.reason


KEY = generate_key()
OTHER = generate_key()


def test_keygen_makes_a_key_that_parses_and_keys_are_checked() -> None:
    assert len(KEY) == 43
    assert KEY != OTHER
    assert parse_keys(f" {KEY} ,\n{OTHER} ") == [*parse_keys(KEY), *parse_keys(OTHER)]
    with pytest.raises(ValueError, match="key 2 is 3 bytes, not 32"):
        parse_keys(f"{KEY},AAAA")
    with pytest.raises(ValueError, match="key 1 is not base64url"):
        parse_keys("!!!!")
    with pytest.raises(ValueError, match="no key"):
        parse_keys(" , ")


def test_a_sealed_datagram_opens_once_and_is_hidden() -> None:
    keys = _keys(KEY)
    sealed = Sealer(keys).seal(DATAGRAM, NOW)
    assert len(sealed) == len(DATAGRAM) + SEAL_OVERHEAD
    assert DATAGRAM not in sealed  # encrypted, not only signed
    opener = Opener(keys)
    assert _open(opener, sealed) == DATAGRAM
    assert _reason(opener, sealed) == "replay"


def test_every_datagram_uses_a_fresh_nonce_and_processes_differ_by_salt() -> None:
    keys = _keys(KEY)
    one, two = Sealer(keys), Sealer(keys)
    assert one.salt != two.salt
    a, b = one.seal(DATAGRAM, NOW), one.seal(DATAGRAM, NOW)
    c = two.seal(DATAGRAM, NOW)
    assert len({a, b, c}) == 3
    assert a[22:30] == (1).to_bytes(8, "big")
    assert b[22:30] == (2).to_bytes(8, "big")


def test_another_key_or_another_network_does_not_open() -> None:
    sealed = Sealer(_keys(KEY)).seal(DATAGRAM, NOW)
    assert _reason(Opener(_keys(OTHER)), sealed) == "key"
    assert _reason(Opener(_keys(KEY, network_id=2)), sealed) == "key"


def test_any_change_to_a_sealed_datagram_fails_authentication() -> None:
    sealed = Sealer(_keys(KEY)).seal(DATAGRAM, NOW)
    rng = random.Random(7)
    for _ in range(200):
        position = rng.randrange(6, len(sealed))  # past magic and key id
        forged = bytearray(sealed)
        forged[position] ^= 1 << rng.randrange(8)
        opener = Opener(_keys(KEY))
        assert _reason(opener, bytes(forged)) in ("auth", "stale"), position
    assert _reason(Opener(_keys(KEY)), sealed[:-1]) == "auth"
    assert _reason(Opener(_keys(KEY)), sealed[:20]) == "unsealed"
    assert _reason(Opener(_keys(KEY)), DATAGRAM) == "unsealed"
    assert _reason(Opener(_keys(KEY)), b"\x00" * 80) == "truncated"


def test_a_stale_or_future_datagram_is_refused_even_by_a_fresh_receiver() -> None:
    sealer = Sealer(_keys(KEY))
    captured = sealer.seal(DATAGRAM, NOW)
    # A receiver that never heard this sender (or restarted since) and a replay 61 s later.
    assert _reason(Opener(_keys(KEY)), captured, now=NOW + 61_000) == "stale"
    assert _reason(Opener(_keys(KEY)), captured, now=NOW - 61_000) == "stale"
    assert _open(Opener(_keys(KEY)), captured, now=NOW + 59_000) == DATAGRAM


def test_the_replay_window_takes_reordering_and_refuses_repeats() -> None:
    sealer = Sealer(_keys(KEY))
    sealed = [sealer.seal(b"%d" % n, NOW) for n in range(1, 5001)]
    opener = Opener(_keys(KEY))
    order = list(range(5000))
    random.Random(3).shuffle(order[:4000])  # reordered within the window
    accepted = set()
    for index in order[:4000]:
        assert _open(opener, sealed[index]) == b"%d" % (index + 1)
        accepted.add(index)
    for index in range(4000):
        assert _reason(opener, sealed[index]) == "replay"
    for index in range(4000, 5000):
        _open(opener, sealed[index])
    # Older than the window below the highest (5000): refused, although never seen.
    fresh_but_old = Opener(_keys(KEY))
    _open(fresh_but_old, sealed[4999])
    assert _reason(fresh_but_old, sealed[0]) == "replay"


def test_rotation_the_first_key_seals_every_key_opens() -> None:
    old, new = KEY, OTHER
    before = Sealer(_keys(old))  # not yet rotated
    during = Sealer(_keys(new, old))  # step 2: seals with the new key
    step_one = Opener(_keys(old, new))  # step 1: opens both, still seals with old
    assert _open(step_one, before.seal(b"a", NOW)) == b"a"
    assert _open(step_one, during.seal(b"b", NOW)) == b"b"
    assert _reason(Opener(_keys(new)), before.seal(b"c", NOW)) == "key"  # after cleanup


def test_forged_senders_take_no_memory_and_real_ones_are_bounded() -> None:
    keys = _keys(KEY)
    opener = Opener(keys, max_senders=8)
    rng = random.Random(1)
    real = Sealer(keys)
    for _ in range(1000):  # datagrams with the right key id and random salts, counters, bytes
        forged = bytearray(real.seal(rng.randbytes(40), NOW))
        forged[6:22] = rng.randbytes(16)
        assert _reason(opener, bytes(forged)) == "auth"
    assert len(opener._senders) == 0
    for _ in range(20):
        _open(opener, Sealer(keys).seal(DATAGRAM, NOW))
    assert len(opener._senders) == 8


def test_pieces_sealed_into_the_reused_buffer_open_like_the_whole() -> None:
    keys = _keys(KEY)
    sealer = Sealer(keys)
    opener = Opener(keys)
    pieces = [b'{"v":1}\n', memoryview(bytes(range(256)) * 200), b"tail"]
    sealed = bytes(sealer.seal_pieces(pieces, NOW))
    assert _open(opener, sealed) == b"".join(bytes(p) for p in pieces)
    second = bytes(sealer.seal_pieces([b"again"], NOW))  # the buffer is reused
    assert _open(opener, second) == b"again"
    big = [bytes(70_000)]  # larger than the reused buffer: sealed whole
    assert _open(opener, bytes(sealer.seal_pieces(big, NOW))) == big[0]


def test_the_replay_window_matches_its_definition_under_jumps_and_wraps() -> None:
    """Accepted exactly when above highest - 4096 and not accepted before, whatever the jumps
    (the window is a ring of bytes: jumps of about its length and of a byte are the edges)."""
    keys = _keys(KEY)
    sealer = Sealer(keys)
    opener = Opener(keys)
    rng = random.Random(11)
    accepted: set[int] = set()
    highest = 0
    for _ in range(20_000):
        kind = rng.random()
        if kind < 0.5:
            counter = highest + 1
        elif kind < 0.6:
            counter = highest + rng.choice([8, 9, 4095, 4096, 4097, 4104, 4105, 8192, 10_000])
        elif kind < 0.7:
            counter = highest + rng.randrange(1, 600)
        else:  # behind: within the window, at its edge, or beyond it
            counter = max(1, highest - rng.choice([0, 1, 7, 8, 4095, 4096, rng.randrange(5000)]))
        sealer._counter = counter - 1
        sealed = sealer.seal(b"x", NOW)
        if counter > highest - 4096 and counter not in accepted:
            assert _open(opener, sealed) == b"x", counter
            accepted.add(counter)
            highest = max(highest, counter)
        else:
            assert _reason(opener, sealed) == "replay", counter


def test_pieces_seal_like_the_whole_datagram_and_the_buffer_is_reused() -> None:
    keys = _keys(KEY)
    one, two = Sealer(keys, salt=bytes(16)), Sealer(keys, salt=bytes(16))
    pieces = [b'{"v":1}\n', memoryview(bytes(range(256)) * 200)]
    first = one.seal_pieces(pieces, NOW)
    whole = two.seal(b"".join(pieces), NOW)
    assert bytes(first) == whole  # the same bytes (same salt, same counter)
    assert bytes(one.seal_pieces([DATAGRAM], NOW)) == two.seal(DATAGRAM, NOW)
    assert bytes(first[:38]) != whole[:38]  # the buffer is reused: valid until the next call
    opener = Opener(keys)
    for big in ([bytes(70_000)], [b"{", bytes(65_535), b"}"]):  # past the reused buffer
        assert _open(opener, bytes(one.seal_pieces(big, NOW))) == b"".join(big)


def test_opening_leaves_the_output_buffer_free_to_resize() -> None:
    """The endpoint shrinks and regrows its receive buffers: no view may outlive open_into."""
    keys = _keys(KEY)
    sealer, opener = Sealer(keys), Opener(keys)
    out = bytearray(1000)
    sealed = bytearray(sealer.seal(DATAGRAM, NOW))
    assert opener.open_into(memoryview(sealed), NOW, out) == len(DATAGRAM)
    del out[len(DATAGRAM) :]
    out.extend(bytes(1000))
    sealed = bytearray(sealer.seal(DATAGRAM, NOW))
    sealed[-20] ^= 1
    with pytest.raises(Rejected) as caught:
        opener.open_into(sealed, NOW, out)
    del out[10:]  # (while the exception, and the frames it holds, are still alive)
    sealed.extend(b"!")  # nor of the sealed datagram, when it was not a view already
    assert caught.value.reason == "auth"


def test_open_received_opens_what_was_read_into_the_openers_buffer_like_open_into() -> None:
    """Both ways of opening what was read into the buffer (into the caller's buffer, for large
    datagrams; into bytes, for small ones) accept and refuse what open_into does."""
    keys = _keys(KEY)
    sealer = Sealer(keys)
    good = sealer.seal(DATAGRAM, NOW)
    forged = bytearray(sealer.seal(DATAGRAM, NOW))
    forged[-1] ^= 1
    cases = [
        good,
        good,
        bytes(forged),
        DATAGRAM,
        b"\x00" * 80,
        good[:20],
        Sealer(_keys(OTHER)).seal(DATAGRAM, NOW),
    ]
    by_view, by_buffer, by_bytes = Opener(keys), Opener(keys), Opener(keys)

    def received(datagram: bytes) -> bytes | str:
        """The plaintext, or the refusal, of ``datagram`` read into the opener's buffer."""
        out = bytearray(100)
        by_buffer.buffer[: len(datagram)] = datagram  # as recv_into leaves it
        try:
            return bytes(out[: by_buffer.open_received(len(datagram), NOW, out)])
        except Rejected as exc:
            return exc.reason

    def received_bytes(datagram: bytes) -> bytes | str:
        by_bytes.buffer[: len(datagram)] = datagram
        try:
            opened = by_bytes.open_received_bytes(len(datagram), NOW)
        except Rejected as exc:
            return exc.reason
        assert type(opened) is bytes
        return opened

    results = [received(datagram) for datagram in cases]
    assert results == [DATAGRAM, "replay", "auth", "unsealed", "truncated", "unsealed", "key"]
    assert [received_bytes(datagram) for datagram in cases] == results
    stale = sealer.seal(DATAGRAM, NOW - 3_600_000)
    by_bytes.buffer[: len(stale)] = stale
    with pytest.raises(Rejected, match="stale"):
        by_bytes.open_received_bytes(len(stale), NOW)
    for datagram, result in zip(cases, results, strict=True):  # open_into: the same
        if result == DATAGRAM:
            assert _open(by_view, datagram) == result
        else:
            assert _reason(by_view, datagram) == result
    assert len(by_buffer.buffer) == 65_536  # the largest datagram fits
