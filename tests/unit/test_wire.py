"""glue.wire: round trips, greedy packing, the pinned byte format, every decode error, fuzzing."""

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
    MAX_AGE_MS,
    MAX_DATAGRAM_BYTES,
    MAX_ID,
    MAX_NAME_CHARS,
    MAX_RATE_MS,
    Announce,
    Data,
    Datagram,
    EndpointId,
    Frame,
    Goodbye,
    Header,
)

HEADER = Header(network_id=1, source_id=EndpointId(42), incarnation=7)
OWN = Announce(EndpointId(42), 7, "alpha", "", 5000, 1000)
ASK = Announce(EndpointId(42), 7, "alpha", "10.0.0.1", 5000, 1000, ask=True)
FORWARDED = Announce(EndpointId(99), 3, "beta", "10.0.0.2", 6000, 500, forwarded=True, age_ms=250)
#: The reasons ``DecodeError`` documents; counters are keyed by them, so no other may appear.
REASONS = {"oversized", "truncated", "malformed", "version", "network", "foreign"}


def roundtrip(frames: list[Frame], header: Header = HEADER) -> Datagram:
    return wire.decode(wire.encode(header, frames), network_id=header.network_id)


# --- round trips ------------------------------------------------------------------------------


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
        pytest.param(Data(0, b""), id="data-empty"),
        pytest.param(Data(MAX_ID, b"line\nbreak\x00nul\n"), id="data-lf-nul"),
        pytest.param(Data(5, bytes(range(256)) * 4), id="data-every-byte"),
    ],
)
def test_every_frame_kind_round_trips(frame: Frame) -> None:
    assert roundtrip([frame]) == Datagram(HEADER, (frame,))


def test_own_announcement_round_trips_with_the_limits_of_the_header() -> None:
    header = Header(network_id=MAX_ID, source_id=EndpointId(MAX_ID), incarnation=MAX_ID)
    own = Announce(EndpointId(MAX_ID), MAX_ID, "z", "", 1, 1)
    assert roundtrip([own], header) == Datagram(header, (own,))


def test_several_frames_round_trip_in_order_with_payloads_in_frame_order() -> None:
    frames: list[Frame] = [
        OWN,
        Data(1, b"first\n"),
        FORWARDED,
        Data(2, b""),
        Data(3, b"\x00\n\x00"),
        Goodbye(),
        Data(4, b"{not json}\n"),
    ]
    datagram = roundtrip(frames)
    assert datagram.frames == tuple(frames)
    payloads = [f.payload for f in datagram.frames if isinstance(f, Data)]
    assert all(type(p) is bytes for p in payloads)


def test_names_with_line_feeds_stay_in_the_header() -> None:
    own = Announce(EndpointId(42), 7, "two\nlines \u00e9\u6f22\U0001f600", "", 5000, 1000)
    encoded = wire.encode(HEADER, [own, Data(1, b"\n")])
    assert encoded.count(b"\n") == 2  # the header terminator and the payload, never the name
    assert roundtrip([own]).frames == (own,)


def test_the_format_is_pinned_byte_for_byte() -> None:
    encoded = wire.encode(HEADER, [OWN, Data(3, b"hi\n"), Goodbye(), Data(4, b"\x00")])
    assert encoded == (
        b'{"glue":1,"net":1,"src":42,"inc":7,"f":['
        b'{"t":"ann","id":42,"inc":7,"name":"alpha","host":"","port":5000,"rate":1000},'
        b'{"t":"d","seq":3,"n":3},{"t":"bye"},{"t":"d","seq":4,"n":1}]}\nhi\n\x00'
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
    frames: list[Frame] = [OWN, Data(1, b"a\n"), Goodbye()]
    assert wire.pack(HEADER, frames) == [wire.encode(HEADER, frames)]


@pytest.mark.parametrize("max_bytes", [146, 147, 150, 199, 200, 333, 1400])
def test_pack_splits_greedily_below_max_bytes(max_bytes: int) -> None:
    frames: list[Frame] = [Data(i, bytes([i]) * (i % 40)) for i in range(60)]
    frames[10:10] = [OWN, FORWARDED, Goodbye()]
    datagrams = wire.pack(HEADER, frames, max_bytes=max_bytes)
    assert len(datagrams) > 1
    _assert_packed(frames, datagrams, max_bytes)


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


def _head(frames: Any = _MISSING, **fields: Any) -> dict[str, Any]:
    head = {"glue": 1, "net": 1, "src": 42, "inc": 7, "f": [_ann()]}
    if frames is not _MISSING:
        head["f"] = frames
    return _with(head, fields)


def _raw(head: Any, payload: bytes = b"") -> bytes:
    return orjson.dumps(head) + b"\n" + payload


def test_the_helpers_build_a_valid_datagram() -> None:
    head = _head([_ann(), _fwd(), {"t": "d", "seq": 1, "n": 2}, {"t": "bye"}])
    forwarded = Announce(
        EndpointId(99), 3, "beta", "10.0.0.2", 5000, 1000, forwarded=True, age_ms=5
    )
    assert wire.decode(_raw(head, b"ok"), network_id=1).frames == (
        OWN,
        forwarded,
        Data(1, b"ok"),
        Goodbye(),
    )


_VALID = wire.encode(HEADER, [OWN, Data(1, b"payload\n")])

DECODE_ERRORS = [
    # size and framing
    pytest.param(b"x" * (MAX_DATAGRAM_BYTES + 1), "oversized", id="oversized"),
    pytest.param(_VALID[:30], "truncated", id="header-without-lf"),
    pytest.param(b"{", "truncated", id="only-a-brace"),
    pytest.param(_VALID[:-1], "truncated", id="payload-cut"),
    pytest.param(
        _raw(_head([{"t": "d", "seq": 1, "n": 5}]), b"abcd"),
        "truncated",
        id="payload-length-beyond-data",
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
    pytest.param(_raw(_head([{"seq": 1}])), "malformed", id="missing-kind"),
    pytest.param(_raw(_head([{"t": None}])), "malformed", id="null-kind"),
    pytest.param(_raw(_head([{"t": "BYE"}])), "malformed", id="kind-wrong-case"),
    pytest.param(_raw(_head([{"t": "bye"}, {"t": "x"}])), "malformed", id="unknown-after-bye"),
    # data frames
    pytest.param(_raw(_head([{"t": "d", "n": 1}]), b"x"), "malformed", id="data-missing-seq"),
    pytest.param(_raw(_head([{"t": "d", "seq": 1}]), b"x"), "malformed", id="data-missing-n"),
    pytest.param(
        _raw(_head([{"t": "d", "seq": -1, "n": 1}]), b"x"), "malformed", id="data-negative-seq"
    ),
    pytest.param(
        _raw(_head([{"t": "d", "seq": True, "n": 1}]), b"x"), "malformed", id="data-bool-seq"
    ),
    pytest.param(
        _raw(_head([{"t": "d", "seq": 1, "n": True}]), b"x"), "malformed", id="data-bool-n"
    ),
    pytest.param(
        _raw(_head([{"t": "d", "seq": 1, "n": 1.0}]), b"x"), "malformed", id="data-float-n"
    ),
    pytest.param(
        _raw(_head([{"t": "d", "seq": 1, "n": -1}]), b"x"), "malformed", id="data-negative-n"
    ),
    pytest.param(
        _raw(_head([{"t": "d", "seq": 1, "n": MAX_DATAGRAM_BYTES + 1}]), b"x"),
        "malformed",
        id="data-n-too-big",
    ),
    pytest.param(
        _raw(_head([{"t": "d", "seq": 1, "n": "1"}]), b"x"), "malformed", id="data-string-n"
    ),
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
]


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
headers = st.builds(Header, st.integers(0, MAX_ID), endpoint_ids, incarnations)
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
data_frames = st.builds(Data, st.integers(0, MAX_ID), st.binary(max_size=1000))


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
    kinds = own_announces(header) | forwarded_announces | goodbyes | data_frames
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
]


def _fuzz_seeds() -> list[bytes]:
    header = Header(1, EndpointId(42), 7)
    return [
        wire.encode(header, [OWN]),
        wire.encode(header, [ASK]),
        wire.encode(header, [OWN, FORWARDED, FORWARDED]),
        wire.encode(header, [Goodbye()]),
        wire.encode(header, [Data(1, b"hello\n\x00world")]),
        wire.encode(header, [Data(1, b"a"), Data(2, b""), Data(3, b"\n\n"), Goodbye()]),
        wire.encode(header, [OWN, Data(9, bytes(range(64)))]),
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
    """Decode ``cases`` mutated datagrams; count the outcomes ("decoded" or the reason)."""
    rng = random.Random(seed)
    seeds = _fuzz_seeds()
    outcomes: Counter[str] = Counter()
    for case in range(cases):
        data = _mutate(rng, seeds)
        try:
            wire.decode(data, network_id=1)
        except DecodeError as exc:
            if exc.reason not in REASONS:
                pytest.fail(f"seed {seed} case {case}: decode({data!r}) gave reason {exc.reason!r}")
            outcomes[exc.reason] += 1
        except Exception as exc:  # anything but DecodeError is a bug in wire.decode
            pytest.fail(f"seed {seed} case {case}: decode({data!r}) raised {exc!r}")
        else:
            outcomes["decoded"] += 1
    return outcomes


def test_fuzz_decode_raises_only_decode_error() -> None:
    outcomes = _fuzz(FUZZ_CASES, FUZZ_SEED)
    assert sum(outcomes.values()) == FUZZ_CASES


def test_the_examples_in_protocol_md_are_true() -> None:
    protocol = Path(__file__).parents[2] / "docs" / "PROTOCOL.md"
    examples = re.findall(r"```python\n(b'.*?')\n```", protocol.read_text(encoding="utf-8"))
    assert len(examples) >= 5
    for example in examples:
        data = ast.literal_eval(example)
        datagram = wire.decode(data, network_id=1)
        assert wire.encode(datagram.header, datagram.frames) == data
