"""glue.wire: round trips, greedy packing, the pinned byte format, every decode error, fuzzing.

Covers the discovery frames (``ann``, ``bye``), the transport frames (``d`` with its time to live
and fragment fields, ``a`` with its selective-ack ranges, ``s``) and the header's optional ``dst``.
"""

from __future__ import annotations

import ast
import itertools
import random
import re
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from glue import wire
from glue.errors import DecodeError, ProtocolError
from glue.wire import (
    MAX_ACK_RANGES,
    MAX_AGE_MS,
    MAX_DATAGRAM_BYTES,
    MAX_ID,
    MAX_NAME_CHARS,
    MAX_PARTS,
    MAX_RATE_MS,
    MAX_TTL_MS,
    Ack,
    Announce,
    Data,
    Datagram,
    EndpointId,
    Frame,
    Goodbye,
    Header,
    Skip,
)

HEADER = Header(network_id=1, source_id=EndpointId(42), incarnation=7)
#: The same sender, addressing the incarnation 99 of its peer (transport datagrams carry ``dst``).
TO_99 = Header(network_id=1, source_id=EndpointId(42), incarnation=7, destination=99)
OWN = Announce(EndpointId(42), 7, "alpha", "", 5000, 1000)
ASK = Announce(EndpointId(42), 7, "alpha", "10.0.0.1", 5000, 1000, ask=True)
FORWARDED = Announce(EndpointId(99), 3, "beta", "10.0.0.2", 6000, 500, forwarded=True, age_ms=250)
#: The reasons ``DecodeError`` documents; counters are keyed by them, so no other may appear.
REASONS = {"oversized", "truncated", "malformed", "version", "network", "foreign"}


def roundtrip(frames: list[Frame], header: Header = HEADER) -> Datagram:
    return wire.decode(wire.encode(header, frames), network_id=header.network_id)


# --- round trips ------------------------------------------------------------------------------


def test_a_fragment_sent_as_a_view_arrives_as_a_view_of_the_datagram() -> None:
    message = b"0123456789" * 100
    frame = Data(5, memoryview(message)[400:700], 900, 1, 4)
    datagram = wire.encode(HEADER, [frame])
    [decoded] = wire.decode(datagram, network_id=1).frames
    assert decoded == Data(5, message[400:700], 900, 1, 4)
    assert isinstance(decoded, Data)
    # Not a copy: the reassembler joins the fragments once, into the message.
    assert type(decoded.payload) is memoryview
    assert decoded.payload.obj is datagram
    assert decoded.payload.readonly


def test_a_payload_that_is_a_small_part_of_its_datagram_is_copied() -> None:
    # Kept as a view, it would hold the whole datagram alive while it waits (out of order, or
    # in a partial message), and the memory bounds count payload bytes.
    small, large = Data(1, b"s" * 10, 900, 0, 2), Data(2, b"L" * 50_000)
    datagram = wire.encode(HEADER, [small, large])
    decoded = wire.decode(datagram, network_id=1).frames
    assert decoded == (small, large)
    assert [type(f.payload) for f in decoded if isinstance(f, Data)] == [bytes, memoryview]


@pytest.mark.parametrize("size", [wire.VIEW_MIN_BYTES, wire.VIEW_MIN_BYTES + 1])
def test_only_large_whole_payloads_arrive_as_views(size: int) -> None:
    [decoded] = roundtrip([Data(1, b"x" * size)]).frames
    assert isinstance(decoded, Data)
    assert decoded.payload == b"x" * size
    assert type(decoded.payload) is (bytes if size <= wire.VIEW_MIN_BYTES else memoryview)


def test_a_reused_receive_buffer_decodes_like_bytes_with_views_of_it() -> None:
    # The endpoint reads datagrams into a bytearray it reuses: what decodes from it must equal
    # what decodes from bytes, small payloads must be bytes of their own, and large ones views of
    # the buffer (which then refuses to be resized, so it is not read into while they live).
    frames: list[Frame] = [
        Data(1, b"s" * 10, 900),
        Data(2, b"L" * 50_000, 900, 0, 3),
        Ack(4, ((6, 9),)),
        Skip(3),
    ]
    datagram = wire.encode(TO_99, frames)
    buffer = bytearray(datagram)
    decoded = wire.decode(buffer, network_id=1)
    assert decoded == wire.decode(datagram, network_id=1) == Datagram(TO_99, tuple(frames))
    small, large = (f for f in decoded.frames if isinstance(f, Data))
    assert type(small.payload) is bytes
    assert type(large.payload) is memoryview
    assert large.payload.obj is buffer
    with pytest.raises(BufferError):
        buffer.append(0)
    del decoded, large
    buffer.append(0)  # the views are gone: the buffer may be reused


def test_a_bundle_decoded_from_a_buffer_is_bytes() -> None:
    bundle = Data(7, b"abcdef", 900, messages=((2, 900), (4, 800)))
    [decoded] = wire.decode(bytearray(wire.encode(TO_99, [bundle])), network_id=1).frames
    assert decoded == bundle
    assert isinstance(decoded, Data)
    assert type(decoded.payload) is bytes


def test_a_prefix_is_sent_as_the_start_of_the_payload() -> None:
    frame = Data(3, memoryview(b"payload"), 500, 0, 2, prefix=b"{}\n")
    [decoded] = roundtrip([frame]).frames
    assert decoded == Data(3, b"{}\npayload", 500, 0, 2)


@pytest.mark.parametrize("gather", [False, True])
def test_pack_gathers_only_datagrams_with_large_payloads(gather: bool) -> None:
    big = b"b" * (wire.GATHER_MIN_BYTES + 1)
    frames: list[wire.Frame] = [Data(1, b"small"), Data(2, memoryview(big), prefix=b"{}\n")]
    small = wire.pack(HEADER, frames[:1], gather=True)
    assert small == [wire.encode(HEADER, frames[:1])]  # little payload: joined even so
    [datagram] = wire.pack(HEADER, frames, gather=gather)
    joined = datagram if isinstance(datagram, bytes) else b"".join(datagram)
    assert joined == wire.encode(HEADER, frames)
    if gather:
        assert isinstance(datagram, tuple)
        assert datagram[-1].obj is big  # type: ignore[union-attr]  # the payload, not a copy
    else:
        assert isinstance(datagram, bytes)


@pytest.mark.parametrize(
    "fields",
    [
        pytest.param(b'"p":4,"ps":4', id="part-past-the-end"),
        pytest.param(b'"p":-1,"ps":4', id="negative-part"),
        pytest.param(b'"p":0,"ps":0', id="no-parts"),
        pytest.param(b'"p":true,"ps":4', id="bool-part"),
    ],
)
def test_a_fragment_with_bad_numbers_is_rejected(fields: bytes) -> None:
    data = wire.encode(HEADER, [Data(1, b"x", 9, 0, 4)])
    data = re.sub(rb'"p":0,"ps":4', fields, data)
    with pytest.raises(DecodeError):
        wire.decode(data, network_id=HEADER.network_id)


@pytest.mark.parametrize(
    "frame",
    [
        pytest.param(OWN, id="announce"),
        pytest.param(ASK, id="announce-ask"),
        pytest.param(FORWARDED, id="announce-forwarded"),
        pytest.param(
            Announce(
                EndpointId(MAX_ID),
                0,
                "x" * MAX_NAME_CHARS,
                "255.255.255.255",
                65535,
                MAX_RATE_MS,
                forwarded=True,
                age_ms=MAX_AGE_MS,
            ),
            id="announce-forwarded-limits",
        ),
        pytest.param(Goodbye(), id="goodbye"),
        pytest.param(Data(1, b""), id="data-empty"),
        pytest.param(Data(MAX_ID, b"line\nbreak\x00nul\n"), id="data-lf-nul"),
        pytest.param(Data(5, bytes(range(256)) * 4), id="data-every-byte"),
        pytest.param(Data(1, b"x", 1), id="data-ttl-1ms"),
        pytest.param(Data(2, b"x", MAX_TTL_MS), id="data-ttl-one-day"),
        pytest.param(Data(3, b"first", 250, 0, 2), id="data-first-of-two"),
        pytest.param(Data(4, b"last", 250, 1, 2), id="data-last-of-two"),
        pytest.param(Data(MAX_ID, b"", MAX_TTL_MS, MAX_PARTS - 1, MAX_PARTS), id="data-limits"),
        pytest.param(Ack(0), id="ack-nothing"),
        pytest.param(Ack(17), id="ack-cumulative"),
        pytest.param(Ack(MAX_ID), id="ack-cumulative-limit"),
        pytest.param(Ack(0, ((2, 2),)), id="ack-one-range"),
        pytest.param(Ack(5, ((7, 9), (11, 11), (13, 20))), id="ack-three-ranges"),
        pytest.param(Ack(0, ((2, MAX_ID),)), id="ack-range-to-limit"),
        pytest.param(Ack(5, ((7, 9),), backlog=True), id="ack-backlog"),
        pytest.param(Ack(5, backlog=True), id="ack-backlog-cumulative"),
        pytest.param(
            Ack(3, tuple((5 + 3 * i, 6 + 3 * i) for i in range(MAX_ACK_RANGES))),
            id="ack-64-ranges",
        ),
        pytest.param(Skip(1), id="skip-1"),
        pytest.param(Skip(MAX_ID), id="skip-limit"),
    ],
)
def test_every_frame_kind_round_trips(frame: Frame) -> None:
    assert roundtrip([frame]) == Datagram(HEADER, (frame,))
    assert roundtrip([frame], TO_99) == Datagram(TO_99, (frame,))


@pytest.mark.parametrize("destination", [0, 1, 99, MAX_ID])
def test_the_destination_incarnation_round_trips(destination: int) -> None:
    header = Header(1, EndpointId(42), 7, destination)
    assert roundtrip([Goodbye()], header).header == header
    assert roundtrip([Data(1, b"x"), Ack(3), Skip(2)], header).header.destination == destination


def test_own_announcement_round_trips_with_the_limits_of_the_header() -> None:
    header = Header(network_id=MAX_ID, source_id=EndpointId(MAX_ID), incarnation=MAX_ID)
    own = Announce(EndpointId(MAX_ID), MAX_ID, "z", "", 1, 1)
    assert roundtrip([own], header) == Datagram(header, (own,))


def test_several_frames_round_trip_in_order_with_payloads_in_frame_order() -> None:
    frames: list[Frame] = [
        OWN,
        Data(1, b"first\n"),
        FORWARDED,
        Ack(9, ((11, 12),)),
        Data(2, b"", 40),
        Skip(3),
        Data(3, b"\x00\n\x00", 1, 2, 3),
        Goodbye(),
        Data(4, b"{not json}\n"),
    ]
    datagram = roundtrip(frames)
    assert datagram.frames == tuple(frames)
    payloads = [f.payload for f in datagram.frames if isinstance(f, Data)]
    # Small payloads are bytes (a fragment too, when it is a small part of its datagram).
    assert [type(p) for p in payloads] == [bytes, bytes, bytes, bytes]


def test_names_with_line_feeds_stay_in_the_header() -> None:
    own = Announce(EndpointId(42), 7, "two\nlines \u00e9\u6f22\U0001f600", "", 5000, 1000)
    encoded = wire.encode(HEADER, [own, Data(1, b"\n")])
    assert encoded.count(b"\n") == 2  # the header terminator and the payload, never the name
    assert roundtrip([own]).frames == (own,)


def test_the_format_is_pinned_byte_for_byte() -> None:
    encoded = wire.encode(HEADER, [OWN, Data(3, b"hi\n", 1500), Goodbye(), Data(4, b"\x00")])
    assert encoded == (
        b'{"glue":1,"net":1,"src":42,"inc":7,"f":['
        b'{"t":"ann","id":42,"inc":7,"name":"alpha","host":"","port":5000,"rate":1000},'
        b'{"t":"d","seq":3,"ttl":1500,"n":3},{"t":"bye"},'
        b'{"t":"d","seq":4,"ttl":86400000,"n":1}]}\nhi\n\x00'
    )


def test_the_transport_frames_are_pinned_byte_for_byte() -> None:
    frames: list[Frame] = [
        Ack(5, ((7, 9), (11, 11))),
        Skip(9),
        Data(10, b"ab", 250, 0, 3),
        Data(11, b"\n", 249, 1, 3),
        Ack(12),
        Data(13, b"", 1),
    ]
    assert wire.encode(TO_99, frames) == (
        b'{"glue":1,"net":1,"src":42,"inc":7,"dst":99,"f":['
        b'{"t":"a","cum":5,"sack":[[7,9],[11,11]]},'
        b'{"t":"s","seq":9},'
        b'{"t":"d","seq":10,"ttl":250,"n":2,"p":0,"ps":3},'
        b'{"t":"d","seq":11,"ttl":249,"n":1,"p":1,"ps":3},'
        b'{"t":"a","cum":12},'
        b'{"t":"d","seq":13,"ttl":1,"n":0}]}\nab\n'
    )


@pytest.mark.parametrize(
    ("frame", "obj"),
    [
        pytest.param(Data(1, b"", 7), b'{"t":"d","seq":1,"ttl":7,"n":0}', id="data-one-part"),
        pytest.param(
            Data(1, b"", 7, 0, 1), b'{"t":"d","seq":1,"ttl":7,"n":0}', id="data-explicit-one-part"
        ),
        pytest.param(
            Data(1, b"", 7, 0, 2), b'{"t":"d","seq":1,"ttl":7,"n":0,"p":0,"ps":2}', id="data-parts"
        ),
        pytest.param(Ack(0), b'{"t":"a","cum":0}', id="ack-without-ranges"),
        pytest.param(Ack(0, ((2, 2),)), b'{"t":"a","cum":0,"sack":[[2,2]]}', id="ack-with-range"),
        pytest.param(Skip(1), b'{"t":"s","seq":1}', id="skip"),
    ],
)
def test_optional_transport_fields_are_written_only_when_needed(frame: Frame, obj: bytes) -> None:
    assert wire.encode(HEADER, [frame]) == (
        b'{"glue":1,"net":1,"src":42,"inc":7,"f":[' + obj + b"]}\n"
    )


def test_the_destination_is_written_after_inc_and_only_when_not_zero() -> None:
    assert wire.encode(Header(1, EndpointId(42), 7, 0), [Goodbye()]) == (
        b'{"glue":1,"net":1,"src":42,"inc":7,"f":[{"t":"bye"}]}\n'
    )
    assert wire.encode(Header(1, EndpointId(42), 7, MAX_ID), [Goodbye()]) == (
        b'{"glue":1,"net":1,"src":42,"inc":7,"dst":9007199254740991,"f":[{"t":"bye"}]}\n'
    )


@pytest.mark.parametrize(
    ("frame", "obj"),
    [
        pytest.param(
            ASK,
            b'{"t":"ann","id":42,"inc":7,"name":"alpha","host":"10.0.0.1","port":5000,'
            b'"rate":1000,"ask":true}',
            id="ask",
        ),
        pytest.param(
            FORWARDED,
            b'{"t":"ann","id":99,"inc":3,"name":"beta","host":"10.0.0.2","port":6000,'
            b'"rate":500,"fwd":true,"age":250}',
            id="forwarded",
        ),
    ],
)
def test_optional_announcement_fields_are_pinned(frame: Announce, obj: bytes) -> None:
    assert wire.encode(HEADER, [frame]) == (
        b'{"glue":1,"net":1,"src":42,"inc":7,"f":[' + obj + b"]}\n"
    )


def test_unknown_keys_in_header_and_frames_are_ignored() -> None:
    head = _head([_ann(extra=1), {"t": "bye", "why": "x"}], later={"a": [1]})
    assert wire.decode(_raw(head), network_id=1).frames == (OWN, Goodbye())


def test_explicit_false_flags_are_accepted() -> None:
    head = _head([_ann(ask=False, fwd=False)])
    assert wire.decode(_raw(head), network_id=1).frames == (OWN,)


def test_explicit_defaults_of_transport_fields_are_accepted() -> None:
    head = _head([_d(p=0, ps=1), _ack(cum=4, sack=[])], dst=0)
    datagram = wire.decode(_raw(head, b"x"), network_id=1)
    assert datagram == Datagram(HEADER, (Data(1, b"x", 500), Ack(4)))
    # The canonical form leaves them out again.
    assert wire.encode(datagram.header, datagram.frames) == (
        b'{"glue":1,"net":1,"src":42,"inc":7,"f":['
        b'{"t":"d","seq":1,"ttl":500,"n":1},{"t":"a","cum":4}]}\nx'
    )


def test_a_part_without_parts_is_an_unknown_key_and_ignored() -> None:
    head = _head([_d(p=3)])
    assert wire.decode(_raw(head, b"x"), network_id=1).frames == (Data(1, b"x", 500),)


def test_sack_ranges_may_be_one_apart_but_not_adjacent() -> None:
    head = _head([_ack(cum=1, sack=[[3, 3], [5, 9], [11, 11]])])
    assert wire.decode(_raw(head), network_id=1).frames == (Ack(1, ((3, 3), (5, 9), (11, 11))),)


# --- pack ---------------------------------------------------------------------------------------


def _unpack(datagrams: list[bytes], max_bytes: int) -> list[Frame]:
    return [
        frame
        for datagram in datagrams
        for frame in wire.decode(datagram, network_id=1, max_bytes=max_bytes).frames
    ]


def _assert_packed(frames: list[Frame], datagrams: list[bytes], max_bytes: int) -> None:
    assert all(len(d) <= max_bytes for d in datagrams)
    assert _unpack(datagrams, max_bytes) == frames
    # Greedy: the first frame of each datagram would not have fitted into the one before.
    for before, after in itertools.pairwise(datagrams):
        first = wire.decode(after, network_id=1, max_bytes=max_bytes).frames[0]
        previous = wire.decode(before, network_id=1, max_bytes=max_bytes).frames
        assert len(wire.encode(HEADER, [*previous, first])) > max_bytes


def test_pack_of_nothing_is_no_datagram() -> None:
    assert wire.pack(HEADER, []) == []


def test_pack_puts_everything_that_fits_in_one_datagram() -> None:
    frames: list[Frame] = [OWN, Data(1, b"a\n"), Goodbye(), Ack(3, ((5, 6),)), Skip(2)]
    assert wire.pack(HEADER, frames) == [wire.encode(HEADER, frames)]
    assert wire.pack(TO_99, frames) == [wire.encode(TO_99, frames)]


@pytest.mark.parametrize("max_bytes", [146, 147, 150, 199, 200, 333, 1400])
def test_pack_splits_greedily_below_max_bytes(max_bytes: int) -> None:
    frames: list[Frame] = [Data(i, bytes([i]) * (i % 40), 100 * i) for i in range(1, 61)]
    frames[10:10] = [OWN, FORWARDED, Goodbye()]
    frames[30:30] = [Ack(4, tuple((6 + 2 * i, 6 + 2 * i) for i in range(5))), Skip(8)]
    datagrams = wire.pack(HEADER, frames, max_bytes=max_bytes)
    assert len(datagrams) > 1
    _assert_packed(frames, datagrams, max_bytes)


@pytest.mark.parametrize("max_bytes", [120, 121, 200, 576, 1472])
def test_pack_splits_transport_frames_and_every_datagram_keeps_the_destination(
    max_bytes: int,
) -> None:
    frames: list[Frame] = [Ack(0, ((2, 2), (4, 9))), Skip(1)]
    frames += [Data(seq, b"\n" * (seq % 7), 1000 - seq, seq % 3, 3) for seq in range(1, 40)]
    datagrams = wire.pack(TO_99, frames, max_bytes=max_bytes)
    assert len(datagrams) > 1
    assert all(len(d) <= max_bytes for d in datagrams)
    decoded = [wire.decode(d, network_id=1, max_bytes=max_bytes) for d in datagrams]
    assert {d.header for d in decoded} == {TO_99}
    assert [f for d in decoded for f in d.frames] == frames
    # Greedy: the first frame of each datagram would not have fitted into the one before.
    for before, after in itertools.pairwise(decoded):
        assert len(wire.encode(TO_99, [*before.frames, after.frames[0]])) > max_bytes


def test_pack_fills_a_datagram_to_exactly_max_bytes() -> None:
    frames: list[Frame] = [Data(1, b"x" * 10), Data(2, b"y" * 10)]
    exact = len(wire.encode(HEADER, frames))
    assert wire.pack(HEADER, frames, max_bytes=exact) == [wire.encode(HEADER, frames)]
    assert len(wire.pack(HEADER, frames, max_bytes=exact - 1)) == 2


def test_pack_refuses_a_frame_that_cannot_fit_alone() -> None:
    frame = Data(1, b"x" * 100)
    alone = len(wire.encode(HEADER, [frame]))
    assert wire.pack(HEADER, [frame], max_bytes=alone) == [wire.encode(HEADER, [frame])]
    with pytest.raises(ValueError, match="Data frame"):
        wire.pack(HEADER, [Goodbye(), frame], max_bytes=alone - 1)
    with pytest.raises(ValueError, match="exceeds 65507"):
        wire.pack(HEADER, [Data(1, b"x" * MAX_DATAGRAM_BYTES)])


def test_pack_counts_the_destination_in_the_size() -> None:
    frame = Ack(1)
    with_dst = len(wire.encode(TO_99, [frame]))
    assert with_dst == len(wire.encode(HEADER, [frame])) + len(b'"dst":99,')
    assert wire.pack(TO_99, [frame], max_bytes=with_dst) == [wire.encode(TO_99, [frame])]
    with pytest.raises(ValueError, match="Ack frame"):
        wire.pack(TO_99, [frame], max_bytes=with_dst - 1)
    with pytest.raises(ValueError, match="Skip frame"):
        wire.pack(TO_99, [Skip(1)], max_bytes=len(wire.encode(TO_99, [Skip(1)])) - 1)


# --- decode errors ------------------------------------------------------------------------------

_MISSING: Any = object()


def _with(obj: dict[str, Any], fields: dict[str, Any]) -> dict[str, Any]:
    result = {**obj, **fields}
    return {key: value for key, value in result.items() if value is not _MISSING}


def _ann(**fields: Any) -> dict[str, Any]:
    base = {"t": "ann", "id": 42, "inc": 7, "name": "alpha", "host": "", "port": 5000}
    return _with({**base, "rate": 1000}, fields)


def _fwd(**fields: Any) -> dict[str, Any]:
    forwarded = {"id": 99, "inc": 3, "name": "beta", "host": "10.0.0.2", "fwd": True, "age": 5}
    return _ann(**{**forwarded, **fields})


def _d(**fields: Any) -> dict[str, Any]:
    """A data frame object: seq 1, ttl 500 ms, a 1-byte payload."""
    return _with({"t": "d", "seq": 1, "ttl": 500, "n": 1}, fields)


def _ack(**fields: Any) -> dict[str, Any]:
    return _with({"t": "a", "cum": 0}, fields)


def _skip(**fields: Any) -> dict[str, Any]:
    return _with({"t": "s", "seq": 1}, fields)


def _head(frames: Any = _MISSING, **fields: Any) -> dict[str, Any]:
    head = {"glue": 1, "net": 1, "src": 42, "inc": 7, "f": [_ann()]}
    if frames is not _MISSING:
        head["f"] = frames
    return _with(head, fields)


def _raw(head: Any, payload: bytes = b"") -> bytes:
    return orjson.dumps(head) + b"\n" + payload


def test_the_helpers_build_a_valid_datagram() -> None:
    head = _head([_ann(), _fwd(), _d(n=2), {"t": "bye"}, _ack(), _skip()])
    forwarded = Announce(
        EndpointId(99), 3, "beta", "10.0.0.2", 5000, 1000, forwarded=True, age_ms=5
    )
    assert wire.decode(_raw(head, b"ok"), network_id=1) == Datagram(
        HEADER, (OWN, forwarded, Data(1, b"ok", 500), Goodbye(), Ack(0), Skip(1))
    )
    assert wire.decode(_raw(_head([_ack()], dst=99)), network_id=1).header == TO_99


_VALID = wire.encode(HEADER, [OWN, Data(1, b"payload\n")])

DECODE_ERRORS = [
    # size and framing
    pytest.param(b"x" * (MAX_DATAGRAM_BYTES + 1), "oversized", id="oversized"),
    pytest.param(_VALID[:30], "truncated", id="header-without-lf"),
    pytest.param(b"{", "truncated", id="only-a-brace"),
    pytest.param(_VALID[:-1], "truncated", id="payload-cut"),
    pytest.param(_raw(_head([_d(n=5)]), b"abcd"), "truncated", id="payload-length-beyond-data"),
    pytest.param(
        _raw(_head([_d(n=2), _ack(), _d(seq=2, n=2)]), b"abc"),
        "truncated",
        id="second-payload-beyond-data",
    ),
    pytest.param(_VALID + b"x", "malformed", id="trailing-byte"),
    pytest.param(_raw(_head([_ann()]), b"\n"), "malformed", id="trailing-lf"),
    # not ours
    pytest.param(b"", "foreign", id="empty"),
    pytest.param(b"hello", "foreign", id="text-without-lf"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "foreign", id="http"),
    pytest.param(b"\x00\x01\x02\n", "foreign", id="binary"),
    pytest.param(b'{"glue":1,\n', "foreign", id="broken-json"),
    pytest.param(b'{"glue":1,"name":"\xff"}\n', "foreign", id="invalid-utf8"),
    pytest.param(b"[1,2]\n", "foreign", id="json-list"),
    pytest.param(b'"glue"\n', "foreign", id="json-string"),
    pytest.param(b'{"net":1}\n', "foreign", id="no-version"),
    pytest.param(b"[" * 2000 + b"\n", "foreign", id="too-deep"),
    # version and network
    pytest.param(_raw(_head(glue=2)), "version", id="version-2"),
    pytest.param(_raw(_head(glue=0)), "version", id="version-0"),
    pytest.param(_raw(_head(glue="1")), "version", id="version-string"),
    pytest.param(_raw(_head(glue=1.0)), "version", id="version-float"),
    pytest.param(_raw(_head(glue=True)), "version", id="version-bool"),
    pytest.param(_raw(_head(glue=None)), "version", id="version-null"),
    pytest.param(_raw(_head(net=2)), "network", id="other-network"),
    pytest.param(_raw(_head(net=0)), "network", id="network-0"),
    # header fields
    pytest.param(_raw(_head(net=_MISSING)), "malformed", id="missing-net"),
    pytest.param(_raw(_head(src=_MISSING)), "malformed", id="missing-src"),
    pytest.param(_raw(_head(inc=_MISSING)), "malformed", id="missing-inc"),
    pytest.param(_raw(_head(f=_MISSING)), "malformed", id="missing-frames"),
    pytest.param(_raw(_head(net=-1)), "malformed", id="negative-net"),
    pytest.param(_raw(_head(net=True)), "malformed", id="bool-net"),
    pytest.param(_raw(_head(net=1.0)), "malformed", id="float-net"),
    pytest.param(_raw(_head(src=0)), "malformed", id="src-0"),
    pytest.param(_raw(_head(src=-42)), "malformed", id="negative-src"),
    pytest.param(_raw(_head(src=MAX_ID + 1)), "malformed", id="src-2**53"),
    pytest.param(_raw(_head(src=42.0)), "malformed", id="float-src"),
    pytest.param(_raw(_head(src=True)), "malformed", id="bool-src"),
    pytest.param(_raw(_head(src="42")), "malformed", id="string-src"),
    pytest.param(_raw(_head(inc=-1)), "malformed", id="negative-inc"),
    pytest.param(_raw(_head(inc=MAX_ID + 1)), "malformed", id="inc-2**53"),
    pytest.param(_raw(_head(dst=-1)), "malformed", id="negative-dst"),
    pytest.param(_raw(_head(dst=MAX_ID + 1)), "malformed", id="dst-2**53"),
    pytest.param(_raw(_head(dst=99.0)), "malformed", id="float-dst"),
    pytest.param(_raw(_head(dst=True)), "malformed", id="bool-dst"),
    pytest.param(_raw(_head(dst="99")), "malformed", id="string-dst"),
    pytest.param(_raw(_head(dst=None)), "malformed", id="null-dst"),
    pytest.param(
        b'{"glue":1,"net":1,"src":42,"inc":1e3,"f":[{"t":"bye"}]}\n', "malformed", id="exponent-inc"
    ),
    pytest.param(
        b'{"glue":1,"net":1,"src":18446744073709551616,"f":[{"t":"bye"}]}\n',
        "malformed",
        id="src-beyond-64-bits",
    ),
    # the frame list
    pytest.param(_raw(_head([])), "malformed", id="empty-frame-list"),
    pytest.param(_raw(_head({"t": "bye"})), "malformed", id="frames-not-a-list"),
    pytest.param(_raw(_head(None)), "malformed", id="frames-null"),
    pytest.param(_raw(_head([1])), "malformed", id="frame-not-an-object"),
    pytest.param(_raw(_head([["t", "bye"]])), "malformed", id="frame-is-a-list"),
    pytest.param(_raw(_head([{"t": "ack"}])), "malformed", id="unknown-kind"),
    pytest.param(_raw(_head([{"t": "data", "seq": 1}])), "malformed", id="unknown-kind-data"),
    pytest.param(_raw(_head([{"t": "S", "seq": 1}])), "malformed", id="kind-wrong-case-skip"),
    pytest.param(_raw(_head([{"seq": 1}])), "malformed", id="missing-kind"),
    pytest.param(_raw(_head([{"t": None}])), "malformed", id="null-kind"),
    pytest.param(_raw(_head([{"t": "BYE"}])), "malformed", id="kind-wrong-case"),
    pytest.param(_raw(_head([{"t": "bye"}, {"t": "x"}])), "malformed", id="unknown-after-bye"),
    # data frames
    pytest.param(_raw(_head([_d(seq=_MISSING)]), b"x"), "malformed", id="data-missing-seq"),
    pytest.param(_raw(_head([_d(n=_MISSING)]), b"x"), "malformed", id="data-missing-n"),
    pytest.param(_raw(_head([_d(ttl=_MISSING)]), b"x"), "malformed", id="data-missing-ttl"),
    pytest.param(_raw(_head([_d(seq=0)]), b"x"), "malformed", id="data-seq-0"),
    pytest.param(_raw(_head([_d(seq=-1)]), b"x"), "malformed", id="data-negative-seq"),
    pytest.param(_raw(_head([_d(seq=MAX_ID + 1)]), b"x"), "malformed", id="data-seq-2**53"),
    pytest.param(_raw(_head([_d(seq=True)]), b"x"), "malformed", id="data-bool-seq"),
    pytest.param(_raw(_head([_d(seq=1.0)]), b"x"), "malformed", id="data-float-seq"),
    pytest.param(_raw(_head([_d(n=True)]), b"x"), "malformed", id="data-bool-n"),
    pytest.param(_raw(_head([_d(n=1.0)]), b"x"), "malformed", id="data-float-n"),
    pytest.param(_raw(_head([_d(n=-1)]), b"x"), "malformed", id="data-negative-n"),
    pytest.param(
        _raw(_head([_d(n=MAX_DATAGRAM_BYTES + 1)]), b"x"), "malformed", id="data-n-too-big"
    ),
    pytest.param(_raw(_head([_d(n="1")]), b"x"), "malformed", id="data-string-n"),
    pytest.param(_raw(_head([_d(ttl=0)]), b"x"), "malformed", id="data-ttl-0"),
    pytest.param(_raw(_head([_d(ttl=-5)]), b"x"), "malformed", id="data-negative-ttl"),
    pytest.param(
        _raw(_head([_d(ttl=MAX_TTL_MS + 1)]), b"x"), "malformed", id="data-ttl-beyond-a-day"
    ),
    pytest.param(_raw(_head([_d(ttl=1.5)]), b"x"), "malformed", id="data-float-ttl"),
    pytest.param(_raw(_head([_d(ttl=True)]), b"x"), "malformed", id="data-bool-ttl"),
    pytest.param(_raw(_head([_d(ttl="500")]), b"x"), "malformed", id="data-string-ttl"),
    pytest.param(_raw(_head([_d(ttl=None)]), b"x"), "malformed", id="data-null-ttl"),
    pytest.param(_raw(_head([_d(p=0, ps=0)]), b"x"), "malformed", id="data-parts-0"),
    pytest.param(
        _raw(_head([_d(p=0, ps=MAX_PARTS + 1)]), b"x"), "malformed", id="data-parts-too-many"
    ),
    pytest.param(_raw(_head([_d(p=0, ps=2.0)]), b"x"), "malformed", id="data-float-parts"),
    pytest.param(_raw(_head([_d(p=0, ps="2")]), b"x"), "malformed", id="data-string-parts"),
    pytest.param(_raw(_head([_d(p=0, ps=None)]), b"x"), "malformed", id="data-null-parts"),
    pytest.param(_raw(_head([_d(ps=2)]), b"x"), "malformed", id="data-parts-without-part"),
    pytest.param(_raw(_head([_d(ps=1)]), b"x"), "malformed", id="data-one-part-without-part"),
    pytest.param(_raw(_head([_d(p=2, ps=2)]), b"x"), "malformed", id="data-part-equals-parts"),
    pytest.param(_raw(_head([_d(p=1, ps=1)]), b"x"), "malformed", id="data-part-1-of-1"),
    pytest.param(_raw(_head([_d(p=-1, ps=2)]), b"x"), "malformed", id="data-negative-part"),
    pytest.param(_raw(_head([_d(p=1.0, ps=2)]), b"x"), "malformed", id="data-float-part"),
    pytest.param(_raw(_head([_d(p=False, ps=2)]), b"x"), "malformed", id="data-bool-part"),
    # acks
    pytest.param(_raw(_head([_ack(cum=_MISSING)])), "malformed", id="ack-missing-cum"),
    pytest.param(_raw(_head([_ack(cum=-1)])), "malformed", id="ack-negative-cum"),
    pytest.param(_raw(_head([_ack(cum=MAX_ID + 1)])), "malformed", id="ack-cum-2**53"),
    pytest.param(_raw(_head([_ack(cum=1.0)])), "malformed", id="ack-float-cum"),
    pytest.param(_raw(_head([_ack(cum=True)])), "malformed", id="ack-bool-cum"),
    pytest.param(_raw(_head([_ack(cum="3")])), "malformed", id="ack-string-cum"),
    pytest.param(_raw(_head([_ack(sack=None)])), "malformed", id="sack-null"),
    pytest.param(_raw(_head([_ack(sack={"2": 3})])), "malformed", id="sack-object"),
    pytest.param(_raw(_head([_ack(sack=2)])), "malformed", id="sack-integer"),
    pytest.param(_raw(_head([_ack(sack=[2, 3])])), "malformed", id="sack-flat-list"),
    pytest.param(_raw(_head([_ack(sack=[[2]])])), "malformed", id="sack-range-of-one"),
    pytest.param(_raw(_head([_ack(sack=[[2, 3, 4]])])), "malformed", id="sack-range-of-three"),
    pytest.param(_raw(_head([_ack(sack=[[]])])), "malformed", id="sack-empty-range"),
    pytest.param(
        _raw(_head([_ack(sack=[{"lo": 2, "hi": 3}])])), "malformed", id="sack-range-object"
    ),
    pytest.param(_raw(_head([_ack(sack=[[2.0, 3]])])), "malformed", id="sack-float-low"),
    pytest.param(_raw(_head([_ack(sack=[[2, 3.0]])])), "malformed", id="sack-float-high"),
    pytest.param(_raw(_head([_ack(sack=[[True, 3]])])), "malformed", id="sack-bool-low"),
    pytest.param(_raw(_head([_ack(sack=[["2", "3"]])])), "malformed", id="sack-strings"),
    pytest.param(_raw(_head([_ack(sack=[[2, None]])])), "malformed", id="sack-null-high"),
    pytest.param(_raw(_head([_ack(sack=[[3, 2]])])), "malformed", id="sack-high-below-low"),
    pytest.param(_raw(_head([_ack(cum=4, sack=[[4, 6]])])), "malformed", id="sack-at-cum"),
    pytest.param(_raw(_head([_ack(cum=4, sack=[[5, 6]])])), "malformed", id="sack-at-cum+1"),
    pytest.param(_raw(_head([_ack(cum=4, sack=[[2, 6]])])), "malformed", id="sack-below-cum"),
    pytest.param(_raw(_head([_ack(sack=[[0, 0]])])), "malformed", id="sack-zero"),
    pytest.param(
        _raw(_head([_ack(sack=[[2, 5], [5, 8]])])), "malformed", id="sack-overlapping-end"
    ),
    pytest.param(
        _raw(_head([_ack(sack=[[2, 5], [3, 4]])])), "malformed", id="sack-overlapping-inside"
    ),
    pytest.param(_raw(_head([_ack(sack=[[2, 5], [6, 8]])])), "malformed", id="sack-adjacent"),
    pytest.param(_raw(_head([_ack(sack=[[8, 9], [2, 5]])])), "malformed", id="sack-decreasing"),
    pytest.param(_raw(_head([_ack(sack=[[2, 2], [2, 2]])])), "malformed", id="sack-repeated"),
    pytest.param(_raw(_head([_ack(sack=[[2, MAX_ID + 1]])])), "malformed", id="sack-high-2**53"),
    pytest.param(
        _raw(_head([_ack(sack=[[2 * i + 2, 2 * i + 2] for i in range(MAX_ACK_RANGES + 1)])])),
        "malformed",
        id="sack-65-ranges",
    ),
    # skips
    pytest.param(_raw(_head([_skip(seq=_MISSING)])), "malformed", id="skip-missing-seq"),
    pytest.param(_raw(_head([_skip(seq=0)])), "malformed", id="skip-seq-0"),
    pytest.param(_raw(_head([_skip(seq=-1)])), "malformed", id="skip-negative-seq"),
    pytest.param(_raw(_head([_skip(seq=MAX_ID + 1)])), "malformed", id="skip-seq-2**53"),
    pytest.param(_raw(_head([_skip(seq=2.0)])), "malformed", id="skip-float-seq"),
    pytest.param(_raw(_head([_skip(seq=True)])), "malformed", id="skip-bool-seq"),
    pytest.param(_raw(_head([_skip(seq="2")])), "malformed", id="skip-string-seq"),
    # announcements: fields
    pytest.param(_raw(_head([_ann(id=_MISSING)])), "malformed", id="ann-missing-id"),
    pytest.param(_raw(_head([_ann(inc=_MISSING)])), "malformed", id="ann-missing-inc"),
    pytest.param(_raw(_head([_ann(name=_MISSING)])), "malformed", id="ann-missing-name"),
    pytest.param(_raw(_head([_ann(port=_MISSING)])), "malformed", id="ann-missing-port"),
    pytest.param(_raw(_head([_ann(rate=_MISSING)])), "malformed", id="ann-missing-rate"),
    pytest.param(_raw(_head([_fwd(age=_MISSING)])), "malformed", id="fwd-missing-age"),
    pytest.param(_raw(_head([_ann(id=True)])), "malformed", id="ann-bool-id"),
    pytest.param(_raw(_head([_ann(id=42.0)])), "malformed", id="ann-float-id"),
    pytest.param(_raw(_head([_fwd(id=0)])), "malformed", id="fwd-id-0"),
    pytest.param(_raw(_head([_fwd(id=-1)])), "malformed", id="fwd-negative-id"),
    pytest.param(_raw(_head([_fwd(inc=-1)])), "malformed", id="fwd-negative-inc"),
    pytest.param(_raw(_head([_ann(port=0)])), "malformed", id="ann-port-0"),
    pytest.param(_raw(_head([_ann(port=65536)])), "malformed", id="ann-port-65536"),
    pytest.param(_raw(_head([_ann(port=True)])), "malformed", id="ann-bool-port"),
    pytest.param(_raw(_head([_ann(port=5000.0)])), "malformed", id="ann-float-port"),
    pytest.param(_raw(_head([_ann(rate=0)])), "malformed", id="ann-rate-0"),
    pytest.param(_raw(_head([_ann(rate=MAX_RATE_MS + 1)])), "malformed", id="ann-rate-too-big"),
    pytest.param(_raw(_head([_ann(rate=1000.5)])), "malformed", id="ann-float-rate"),
    pytest.param(_raw(_head([_fwd(age=-1)])), "malformed", id="fwd-negative-age"),
    pytest.param(_raw(_head([_fwd(age=MAX_AGE_MS + 1)])), "malformed", id="fwd-age-too-big"),
    pytest.param(_raw(_head([_fwd(age=1.5)])), "malformed", id="fwd-float-age"),
    pytest.param(_raw(_head([_ann(ask=1)])), "malformed", id="ann-int-ask"),
    pytest.param(_raw(_head([_ann(ask="yes")])), "malformed", id="ann-string-ask"),
    pytest.param(_raw(_head([_fwd(fwd=1)])), "malformed", id="fwd-int-fwd"),
    pytest.param(_raw(_head([_ann(ask=None)])), "malformed", id="ann-null-ask"),
    # announcements: names
    pytest.param(_raw(_head([_ann(name="")])), "malformed", id="name-empty"),
    pytest.param(
        _raw(_head([_ann(name="x" * (MAX_NAME_CHARS + 1))])), "malformed", id="name-too-long"
    ),
    pytest.param(_raw(_head([_ann(name=5)])), "malformed", id="name-not-a-string"),
    pytest.param(_raw(_head([_ann(name=None)])), "malformed", id="name-null"),
    # announcements: hosts
    pytest.param(_raw(_head([_ann(host="localhost")])), "malformed", id="host-dns-name"),
    pytest.param(_raw(_head([_ann(host="10.0.0")])), "malformed", id="host-three-parts"),
    pytest.param(_raw(_head([_ann(host="10.0.0.256")])), "malformed", id="host-octet-256"),
    pytest.param(_raw(_head([_ann(host="010.0.0.1")])), "malformed", id="host-leading-zero"),
    pytest.param(_raw(_head([_ann(host=" 10.0.0.1")])), "malformed", id="host-space"),
    pytest.param(_raw(_head([_ann(host="10.0.0.1:5000")])), "malformed", id="host-with-port"),
    pytest.param(_raw(_head([_ann(host="::1")])), "malformed", id="host-ipv6"),
    pytest.param(_raw(_head([_ann(host=167772161)])), "malformed", id="host-integer"),
    pytest.param(_raw(_head([_ann(host=None)])), "malformed", id="host-null"),
    # announcements: who may announce whom
    pytest.param(_raw(_head([_ann(id=43)])), "malformed", id="other-id-not-forwarded"),
    pytest.param(_raw(_head([_ann(inc=8)])), "malformed", id="other-inc-not-forwarded"),
    pytest.param(_raw(_head([_fwd(host="")])), "malformed", id="forwarded-empty-host"),
    pytest.param(_raw(_head([_fwd(host=_MISSING)])), "malformed", id="forwarded-no-host"),
    pytest.param(_raw(_head([_fwd(ask=True)])), "malformed", id="forwarded-with-ask"),
    # one bad frame spoils the datagram, whatever comes before it
    pytest.param(
        _raw(_head([_ann(), _d(), _ack(), _skip(seq=0)]), b"x"), "malformed", id="bad-last-frame"
    ),
]


def test_the_largest_ack_is_accepted() -> None:
    sack = [[2 * i + 2, 2 * i + 2] for i in range(MAX_ACK_RANGES - 1)] + [[200, MAX_ID]]
    head = _head([_ack(sack=sack)])
    ack = Ack(0, tuple((low, high) for low, high in sack))
    assert wire.decode(_raw(head), network_id=1).frames == (ack,)
    assert wire.decode(wire.encode(HEADER, [ack]), network_id=1).frames == (ack,)


@pytest.mark.parametrize(("data", "reason"), DECODE_ERRORS)
def test_decode_rejects(data: bytes, reason: str) -> None:
    with pytest.raises(DecodeError) as caught:
        wire.decode(data, network_id=1)
    assert caught.value.reason == reason
    assert isinstance(caught.value, ProtocolError)
    assert str(caught.value)


def test_decode_honours_a_smaller_max_bytes() -> None:
    assert wire.decode(_VALID, network_id=1, max_bytes=len(_VALID)).frames == (
        OWN,
        Data(1, b"payload\n"),
    )
    with pytest.raises(DecodeError) as caught:
        wire.decode(_VALID, network_id=1, max_bytes=len(_VALID) - 1)
    assert caught.value.reason == "oversized"


def test_decode_accepts_exactly_the_largest_udp_payload() -> None:
    empty = len(wire.encode(HEADER, [Data(1, b"")]))
    frame = Data(1, b"\n" * (MAX_DATAGRAM_BYTES - empty + 1 - len(str(MAX_DATAGRAM_BYTES))))
    largest = wire.encode(HEADER, [frame])
    assert len(largest) == MAX_DATAGRAM_BYTES
    assert wire.decode(largest, network_id=1).frames == (frame,)
    with pytest.raises(DecodeError) as caught:
        wire.decode(largest + b"x", network_id=1)
    assert caught.value.reason == "oversized"


def test_decode_checks_the_network_it_is_given() -> None:
    other = wire.encode(Header(0, EndpointId(42), 7), [OWN])
    assert wire.decode(other, network_id=0).header.network_id == 0
    with pytest.raises(DecodeError) as caught:
        wire.decode(other, network_id=1)
    assert caught.value.reason == "network"


# --- properties ---------------------------------------------------------------------------------

endpoint_ids = st.integers(1, MAX_ID).map(EndpointId)
incarnations = st.integers(0, MAX_ID)
names = st.text(min_size=1, max_size=MAX_NAME_CHARS)
hosts = st.ip_addresses(v=4).map(str)
ports = st.integers(1, 65535)
rates = st.integers(1, MAX_RATE_MS)
destinations = st.just(0) | incarnations
headers = st.builds(Header, st.integers(0, MAX_ID), endpoint_ids, incarnations, destinations)
forwarded_announces = st.builds(
    Announce,
    endpoint_ids,
    incarnations,
    names,
    hosts,
    ports,
    rates,
    forwarded=st.just(True),
    age_ms=st.integers(0, MAX_AGE_MS),
)
goodbyes = st.just(Goodbye())
seqs = st.integers(1, MAX_ID)
ttls = st.integers(1, MAX_TTL_MS)
data_frames = st.builds(Data, seqs, st.binary(max_size=1000), ttls)
skips = st.builds(Skip, seqs)


@st.composite
def fragments(draw: st.DrawFn) -> Data:
    """A data frame that is one of several parts of a message."""
    parts = draw(st.integers(2, MAX_PARTS))
    part = draw(st.integers(0, parts - 1))
    return Data(draw(seqs), draw(st.binary(max_size=300)), draw(ttls), part, parts)


@st.composite
def acks(draw: st.DrawFn) -> Ack:
    """A valid ack: each range starts at least two above the end of what comes before it."""
    cumulative = draw(st.integers(0, MAX_ID) | st.integers(0, 1000))
    ranges: list[tuple[int, int]] = []
    floor = cumulative + 1
    for gap, length in draw(
        st.lists(st.tuples(st.integers(1, 1000), st.integers(0, 1000)), max_size=MAX_ACK_RANGES)
    ):
        low = floor + gap
        high = low + length
        if high > MAX_ID:
            break
        ranges.append((low, high))
        floor = high + 1
    return Ack(cumulative, tuple(ranges))


def own_announces(header: Header) -> st.SearchStrategy[Announce]:
    """Announcements about the sender itself: id and incarnation are the header's."""
    return st.builds(
        Announce,
        st.just(header.source_id),
        st.just(header.incarnation),
        names,
        st.just("") | hosts,
        ports,
        rates,
        ask=st.booleans(),
    )


@st.composite
def datagrams(draw: st.DrawFn) -> tuple[Header, list[Frame]]:
    header = draw(headers)
    kinds = (
        own_announces(header)
        | forwarded_announces
        | goodbyes
        | data_frames
        | fragments()
        | acks()
        | skips
    )
    return header, draw(st.lists(kinds, min_size=1, max_size=10))


@given(datagrams())
def test_property_valid_frames_round_trip(datagram: tuple[Header, list[Frame]]) -> None:
    header, frames = datagram
    assert roundtrip(frames, header) == Datagram(header, tuple(frames))


@given(datagrams(), st.integers(0, 3000))
def test_property_pack_respects_max_bytes(datagram: tuple[Header, list[Frame]], slack: int) -> None:
    header, frames = datagram
    largest = max(len(wire.encode(header, [frame])) for frame in frames)
    max_bytes = largest + slack
    packed = wire.pack(header, frames, max_bytes=max_bytes)
    assert all(len(d) <= max_bytes for d in packed)
    decoded = [wire.decode(d, network_id=header.network_id, max_bytes=max_bytes) for d in packed]
    assert all(d.header == header for d in decoded)
    assert [f for d in decoded for f in d.frames] == frames
    with pytest.raises(ValueError, match="exceeds"):
        wire.pack(header, frames, max_bytes=largest - 1)


# --- fuzzing ------------------------------------------------------------------------------------

FUZZ_CASES = 100_000
FUZZ_SEED = 20241123
_VALUE = re.compile(rb':("(?:[^"\\]|\\.)*"|[^,}\]]*)')
_ODD_VALUES = [
    b"0",
    b"-1",
    b"1",
    b"true",
    b"false",
    b"null",
    b'""',
    b'"x"',
    b"1.5",
    b"[]",
    b"{}",
    b"9007199254740992",
    b'"ann"',
    b'"d"',
    b'"bye"',
    b'"10.0.0.1"',
    b"65507",
    b"1e3",
    b'"a"',
    b'"s"',
    b"86400000",
    b"86400001",
    b"1048576",
    b"[[2,2]]",
    b"[[3,2]]",
    b"[[2,3],[4,5]]",
]


def _fuzz_seeds() -> list[bytes]:
    header = Header(1, EndpointId(42), 7)
    to_peer = Header(1, EndpointId(42), 7, destination=1732350000500001)
    return [
        wire.encode(header, [OWN]),
        wire.encode(header, [ASK]),
        wire.encode(header, [OWN, FORWARDED, FORWARDED]),
        wire.encode(header, [Goodbye()]),
        wire.encode(to_peer, [Data(1, b"hello\n\x00world", 1500)]),
        wire.encode(to_peer, [Data(1, b"a"), Data(2, b"", 9), Data(3, b"\n\n", 1), Goodbye()]),
        wire.encode(header, [OWN, Data(9, bytes(range(64)), 250, 3, 5)]),
        wire.encode(to_peer, [Ack(4, ((6, 9), (12, 12))), Data(5, b"xy", 70, 0, 2), Skip(3)]),
        wire.encode(to_peer, [Ack(0), Skip(MAX_ID), Ack(MAX_ID - 3, ((MAX_ID - 1, MAX_ID),))]),
    ]


def _mutate(rng: random.Random, seeds: list[bytes]) -> bytes:
    kind = rng.randrange(6)
    if kind == 0:  # purely random bytes, sometimes made to look like a header
        data = bytearray(rng.randbytes(rng.randrange(120)))
        if rng.random() < 0.5:
            data[:0] = b"{"
        return bytes(data)
    data = bytearray(rng.choice(seeds))
    if kind == 1 or (kind == 5 and rng.random() < 0.5):  # truncation
        del data[rng.randrange(len(data) + 1) :]
    if kind == 2 or (kind == 5 and data and rng.random() < 0.5):  # bit flips
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    if kind == 3 or (kind == 5 and rng.random() < 0.5):  # insertions
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(len(data) + 1)
            data[at:at] = rng.randbytes(rng.randint(1, 3))
    if kind == 4:  # one JSON value swapped for an odd one, to get past the JSON parser
        end = data.index(b"\n")
        values = list(_VALUE.finditer(data, 0, end))
        value = rng.choice(values)
        data[value.start(1) : value.end(1)] = rng.choice(_ODD_VALUES)
    return bytes(data)


def _fuzz(cases: int, seed: int) -> Counter[str]:
    """Decode ``cases`` mutated datagrams; count the outcomes ("decoded" or the reason).

    A datagram that decodes must also re-encode to something that decodes to the same thing
    (the decoder accepts only what the encoder can write), and its frames are counted by kind
    (``frame:Ack``...), to show the mutations reach every frame's decoder.
    """
    rng = random.Random(seed)
    seeds = _fuzz_seeds()
    outcomes: Counter[str] = Counter()
    for case in range(cases):
        data = _mutate(rng, seeds)
        try:
            datagram = wire.decode(data, network_id=1)
        except DecodeError as exc:
            if exc.reason not in REASONS:
                pytest.fail(f"seed {seed} case {case}: decode({data!r}) gave reason {exc.reason!r}")
            outcomes[exc.reason] += 1
        except Exception as exc:  # anything but DecodeError is a bug in wire.decode
            pytest.fail(f"seed {seed} case {case}: decode({data!r}) raised {exc!r}")
        else:
            outcomes["decoded"] += 1
            if data not in seeds:
                outcomes.update(f"frame:{type(frame).__name__}" for frame in datagram.frames)
                outcomes["dst"] += datagram.header.destination != 0
            again = wire.encode(datagram.header, datagram.frames)
            if wire.decode(again, network_id=1, max_bytes=len(again)) != datagram:
                pytest.fail(f"seed {seed} case {case}: {data!r} does not survive a re-encode")
    return outcomes


def test_fuzz_decode_raises_only_decode_error() -> None:
    outcomes = _fuzz(FUZZ_CASES, FUZZ_SEED)
    assert sum(outcomes[key] for key in ("decoded", *REASONS)) == FUZZ_CASES
    # The mutations get past the parser into every frame decoder, and some survive them.
    for key in ("malformed", "truncated", "foreign", "decoded", "dst"):
        assert outcomes[key] > 100, outcomes
    for kind in ("Announce", "Goodbye", "Data", "Ack", "Skip"):
        assert outcomes[f"frame:{kind}"] > 100, outcomes


def test_the_examples_in_protocol_md_are_true() -> None:
    protocol = Path(__file__).parents[2] / "docs" / "PROTOCOL.md"
    text = protocol.read_text(encoding="utf-8")
    examples = list(re.finditer(r"```python\n(b'.*?')\n```", text))
    assert len(examples) >= 8
    seen: set[str] = set()
    for example in examples:
        data = ast.literal_eval(example[1])
        datagram = wire.decode(data, network_id=1)
        assert wire.encode(datagram.header, datagram.frames) == data
        # The text since the previous code block states the example's size: "..., 157 bytes".
        before = text[: example.start()]
        sizes = re.findall(r"(\d+) bytes", before[before.rfind("```") :])
        assert sizes, example[1][:60]
        assert len(data) == int(sizes[-1]), example[1][:60]
        seen.update(type(frame).__name__ for frame in datagram.frames)
        if datagram.header.destination:
            seen.add("dst")
        for frame in datagram.frames:
            if isinstance(frame, Data) and frame.parts > 1:
                seen.add("fragment")
            if isinstance(frame, Ack) and frame.ranges:
                seen.add("sack")
    assert seen >= {"Announce", "Goodbye", "Data", "Ack", "Skip", "dst", "fragment", "sack"}


# --- bundles -------------------------------------------------------------------------------------


def test_a_bundle_round_trips_and_keeps_its_messages_in_order() -> None:
    header = wire.Header(1, wire.EndpointId(7), 3, destination=9)
    frame = Data(4, b"aaabbcccc", 500, messages=((3, 500), (2, 0), (4, 120)))
    data = wire.encode(header, [frame])
    assert b'"m":[[3,500],[2,0],[4,120]]' in data
    assert wire.decode(data, network_id=1).frames == (frame,)
    # A bundle packs like any frame.
    assert [wire.decode(d, network_id=1).frames for d in wire.pack(header, [frame, frame])] == [
        (frame, frame)
    ]


@pytest.mark.parametrize(
    ("m", "n"),
    [
        pytest.param("[]", 0, id="empty"),
        pytest.param("[[1,5],[1,5]]", 3, id="lengths-not-n"),
        pytest.param("[[1,5,7]]", 1, id="triple"),
        pytest.param("[[-1,5],[2,5]]", 1, id="negative-length"),
        pytest.param("[[1,86400001]]", 1, id="ttl-too-long"),
        pytest.param("[[1,-1]]", 1, id="negative-ttl"),
        pytest.param("[[1,true]]", 1, id="bool-ttl"),
        pytest.param('"x"', 1, id="not-a-list"),
        pytest.param("[[1,1]]", 1, id="with-ps"),
    ],
)
def test_a_bad_bundle_is_a_decode_error(m: str, n: int) -> None:
    extra = ',"p":0,"ps":2' if "with-ps" in m or m == "[[1,1]]" else ""
    head = (
        '{"glue":1,"net":1,"src":7,"inc":3,"dst":9,"f":[{"t":"d","seq":1,"ttl":5,"n":%d,"m":%s%s}]}'
    )
    data = (head % (n, m, extra)).encode() + b"\n" + b"x" * n
    with pytest.raises(DecodeError) as caught:
        wire.decode(data, network_id=1)
    assert caught.value.reason == "malformed"


# --- the header cache ----------------------------------------------------------------------------


def test_a_cached_header_gives_what_the_full_parse_gives() -> None:
    header = Header(1, EndpointId(5), 77, destination=3)
    canonical = wire.encode(header, [Data(1, b"a")])
    assert wire.decode(canonical, network_id=1).header == header  # cached from here on
    assert wire.decode(canonical, network_id=1).header == header
    # The same leading bytes, then keys after the frame list: last key wins, as in JSON.
    overridden = canonical.replace(b'"n":1}]}', b'"n":1}],"inc":78}')
    assert wire.decode(overridden, network_id=1).header == Header(1, EndpointId(5), 78, 3)
    # Nor does a cached header cross networks.
    with pytest.raises(DecodeError) as caught:
        wire.decode(canonical, network_id=2)
    assert caught.value.reason == "network"


def test_a_header_with_later_keys_is_not_cached() -> None:
    tricky = b'{"glue":1,"net":1,"src":6,"inc":1,"f":[{"t":"bye"}],"inc":2}\n'
    assert wire.decode(tricky, network_id=1).header.incarnation == 2
    plain = b'{"glue":1,"net":1,"src":6,"inc":1,"f":[{"t":"bye"}]}\n'
    assert wire.decode(plain, network_id=1).header.incarnation == 1


def test_fuzz_a_buffer_decodes_exactly_as_bytes() -> None:
    # The endpoint decodes large datagrams in place, from a bytearray: same result, same errors.
    rng = random.Random(FUZZ_SEED + 1)
    seeds = _fuzz_seeds()
    for case in range(FUZZ_CASES // 10):
        data = _mutate(rng, seeds)
        outcomes = []
        for form in (data, bytearray(data)):
            try:
                outcomes.append(wire.decode(form, network_id=1))
            except DecodeError as exc:
                outcomes.append(exc.reason)
        assert outcomes[0] == outcomes[1], f"case {case}: {data!r}"


def test_fuzz_with_every_seed_header_cached() -> None:
    for data in _fuzz_seeds():
        wire.decode(data, network_id=1)
    test_fuzz_decode_raises_only_decode_error()
