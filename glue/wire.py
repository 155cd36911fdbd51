"""Frames <-> datagrams: glue's versioned wire format (see ``docs/PROTOCOL.md``).

A datagram is one JSON object (the header, encoded by orjson), one line feed byte, then the raw
payload bytes of the frames that carry any, concatenated in frame order::

    {"glue":1,"net":1,"src":42,"inc":1732350000123456,"f":[{"t":"d","seq":7,"n":5}]}\\nhello

orjson never writes a raw line feed (it escapes ``\\n`` inside strings), so the first LF ends the
header. Every header field is JSON; payloads are never base64'd. One datagram carries many frames
(announcements, data, and later acks), which is how glue amortises Python's per-datagram cost.

This module is pure: no state, no clock, no sockets. ``decode`` raises only :class:`DecodeError`,
whatever bytes it is given.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final, NewType

import orjson

from glue.errors import DecodeError

__all__ = [
    "MAX_DATAGRAM_BYTES",
    "MAX_ID",
    "MAX_NAME_CHARS",
    "VERSION",
    "Ack",
    "Announce",
    "Data",
    "Datagram",
    "EndpointId",
    "Frame",
    "Goodbye",
    "Header",
    "OutDatagram",
    "Skip",
    "decode",
    "encode",
    "pack",
]

VERSION: Final = 1
#: Largest UDP payload over IPv4 (65535 - 20 IP - 8 UDP).
MAX_DATAGRAM_BYTES: Final = 65507
#: Ids and incarnations stay below 2**53 so that any JSON implementation holds them exactly.
MAX_ID: Final = 2**53 - 1
MAX_NAME_CHARS: Final = 255
MAX_RATE_MS: Final = 3_600_000
MAX_AGE_MS: Final = 86_400_000
MAX_TTL_MS: Final = 86_400_000
MAX_PARTS: Final = 1 << 20
MAX_ACK_RANGES: Final = 64
MAX_BUNDLE: Final = 4096
#: Decoded payloads larger than this (and every fragment's) are views of the datagram, not copies.
VIEW_MIN_BYTES: Final = 4096
#: With ``pack(gather=True)``, a datagram carrying more payload bytes than this is returned as
#: its pieces (for ``socket.sendmsg``), not joined: the payload is never copied in Python.
GATHER_MIN_BYTES: Final = 4096

EndpointId = NewType("EndpointId", int)

_LF: Final = b"\n"


@dataclass(frozen=True, slots=True)
class Header:
    """Who sent a datagram: the fields every datagram carries."""

    network_id: int
    source_id: EndpointId
    incarnation: int
    #: The incarnation of the endpoint this datagram is for; 0 for "whoever hears it" (multicast,
    #: announcements to a target). Transport frames are only accepted by that incarnation, so a
    #: restarted endpoint never takes frames meant for its previous life.
    destination: int = 0


@dataclass(frozen=True, slots=True)
class Announce:
    """ "Endpoint ``endpoint_id`` is alive and takes data at ``host:port``".

    ``host`` is empty when the announcer does not know its own address: the receiver then uses the
    source address of the datagram. ``ask`` asks the receiver to answer with the announcements it
    knows (set when sent to a unicast rendezvous). ``forwarded`` marks an announcement relayed by a
    rendezvous on behalf of another endpoint, heard ``age_ms`` ago; forwarded ones are never
    relayed again and never answered.
    """

    endpoint_id: EndpointId
    incarnation: int
    name: str
    host: str
    port: int
    rate_ms: int
    ask: bool = False
    forwarded: bool = False
    age_ms: int = 0
    #: Version of the announcer's topic interest (0: no subscriptions yet, or unknown when
    #: forwarded); a receiver holding an older version asks for the whole set.
    interest: int = 0
    #: With ``ask``: the XOR of the ids of the peers the asker knows (0: none, or not said). An
    #: answerer that knows exactly those (itself included, the asker excluded) answers with its
    #: own announcement only, not the whole list again.
    peers_digest: int = 0


@dataclass(frozen=True, slots=True)
class Goodbye:
    """The sending endpoint (header ``src``/``inc``) is stopping: drop it now."""


#: Frames made once per datagram or more are not frozen: a frozen dataclass's ``__init__`` costs
#: about four times as much. Treat them as immutable all the same (they stay hashable).
@dataclass(slots=True, unsafe_hash=True)
class Data:
    """One transport frame of application bytes: fragment ``part`` of ``parts`` of a message.

    ``seq`` counts frames of one sender incarnation to one receiver, from 1. ``ttl_ms`` is how long
    the message had left to live when this copy was sent; the receiver never delivers it later.
    ``messages``, when not empty, says the payload is a *bundle* of several small messages:
    ``(length, ttl_ms)`` of each, in order (a ttl of 0: that message expired, drop it); the
    frame's own ``ttl_ms`` is then the longest of them.

    When sending, a fragment's payload (``parts`` > 1) may be a ``memoryview`` of the message it
    was cut from: its bytes are never copied by Python (see :func:`pack`'s ``gather``). Decoded
    payloads are ``bytes`` when small; a fragment's, or any payload over ``VIEW_MIN_BYTES``, is a
    ``memoryview`` of the datagram (read-only, or of the receiver's reused buffer) when it is at
    least half of it, so a large message is copied once, when whole, and a small one never keeps
    a large datagram alive.
    """

    seq: int
    payload: bytes | memoryview
    ttl_ms: int = MAX_TTL_MS
    part: int = 0
    parts: int = 1
    messages: tuple[tuple[int, int], ...] = ()
    #: Sending only: bytes that go on the wire just before ``payload``, as the start of it (a
    #: message's envelope, kept apart so a large payload is not copied to prepend it). Decoding
    #: never sets it: the receiver sees one payload, ``prefix + payload``.
    prefix: bytes = b""


@dataclass(slots=True, unsafe_hash=True)
class Ack:
    """ "I have every frame up to ``cumulative`` and those in ``ranges``" (inclusive pairs);
    ``backlog``: since my previous ack, datagrams waited in my socket (I am the slow end)."""

    cumulative: int
    ranges: tuple[tuple[int, int], ...] = ()
    backlog: bool = False


@dataclass(frozen=True, slots=True)
class Skip:
    """ "Do not wait for any frame below ``seq``": they expired at the sender (SCTP FORWARD-TSN),
    or (``dropped``) some were dropped by its slow-peer policy (``GLUE_SLOW_PEER=drop``)."""

    seq: int
    dropped: bool = False


Frame = Announce | Goodbye | Data | Ack | Skip
#: A datagram to send: its bytes, or (``pack(gather=True)``) its pieces in order, to be sent as
#: one datagram by ``socket.sendmsg``; ``b"".join`` of the pieces is the datagram.
OutDatagram = bytes | tuple[bytes | memoryview, ...]


@dataclass(slots=True, unsafe_hash=True)
class Datagram:
    """A decoded datagram: its header and its frames in order."""

    header: Header
    frames: tuple[Frame, ...]


# --- encoding -----------------------------------------------------------------------------------


def encode(header: Header, frames: Sequence[Frame]) -> bytes:
    """Encode ``frames`` into one datagram (no size check; see :func:`pack`)."""
    objects = []
    payloads: list[bytes | memoryview] = []
    for frame in frames:
        encoded, payload = _encode_frame(frame)
        objects.append(encoded)
        if type(frame) is Data and frame.prefix:
            payloads.append(frame.prefix)
        if payload:
            payloads.append(payload)
    return b"".join((_prefix(header), b",".join(objects), b"]}\n", *payloads))


def pack(
    header: Header,
    frames: Iterable[Frame],
    *,
    max_bytes: int = MAX_DATAGRAM_BYTES,
    gather: bool = False,
) -> list[OutDatagram]:
    """Encode ``frames`` into as few datagrams of at most ``max_bytes`` as greedy packing allows.

    Each frame is serialised once; the datagram is assembled around the encoded frames. With
    ``gather``, a datagram with more than ``GATHER_MIN_BYTES`` of payload is left in pieces (the
    JSON header, then each payload as given) for a scatter-gather send; otherwise every datagram
    is ``bytes``.

    Raises:
        ValueError: a single frame does not fit in ``max_bytes`` (fragment it first).
    """
    prefix = _prefix(header)
    base = len(prefix) + 3  # ']}' and the LF
    datagrams: list[OutDatagram] = []
    objects: list[bytes] = []
    payloads: list[bytes | memoryview] = []
    size = base
    carried = 0  # payload bytes in the datagram being filled
    for frame in frames:
        encoded, payload = _encode_frame(frame)
        head = frame.prefix if type(frame) is Data else b""
        cost = len(encoded) + len(head) + len(payload)
        if base + cost > max_bytes:
            raise ValueError(f"a {type(frame).__name__} frame of {cost} bytes exceeds {max_bytes}")
        separator = 1 if objects else 0  # the comma between frame objects
        if size + separator + cost > max_bytes:
            datagrams.append(_assemble(prefix, objects, payloads, gather, carried))
            objects, payloads, size, separator, carried = [], [], base, 0, 0
        size += separator + cost
        objects.append(encoded)
        if head:
            payloads.append(head)
        if payload:
            payloads.append(payload)
            carried += len(payload)
    if objects:
        datagrams.append(_assemble(prefix, objects, payloads, gather, carried))
    return datagrams


def _assemble(
    prefix: bytes,
    objects: list[bytes],
    payloads: list[bytes | memoryview],
    gather: bool,
    carried: int,
) -> OutDatagram:
    if gather and carried > GATHER_MIN_BYTES:
        return (b"".join((prefix, b",".join(objects), b"]}\n")), *payloads)
    return b"".join((prefix, b",".join(objects), b"]}\n", *payloads))


_dumps = orjson.dumps


@functools.lru_cache(maxsize=4096)
def _prefix(header: Header) -> bytes:
    """The JSON of ``header`` up to the frame list, cached (one per peer and incarnation)."""
    head: dict[str, int] = {
        "glue": VERSION,
        "net": header.network_id,
        "src": header.source_id,
        "inc": header.incarnation,
    }
    if header.destination:
        head["dst"] = header.destination
    return orjson.dumps(head)[:-1] + b',"f":['


def _encode_frame(frame: Frame) -> tuple[bytes, bytes | memoryview]:
    """One frame's JSON object and payload (without ``Data.prefix``, which goes before it);
    data frames skip the dict (the hot path)."""
    if type(frame) is Data and not frame.messages:
        payload = frame.payload
        length = len(frame.prefix) + len(payload)
        if frame.parts == 1:
            return _DATA_FORMAT % (frame.seq, frame.ttl_ms, length), payload
        return _FRAGMENT_FORMAT % (
            frame.seq,
            frame.ttl_ms,
            length,
            frame.part,
            frame.parts,
        ), payload
    obj, payload = _frame_to_wire(frame)
    return _dumps(obj), payload


_DATA_FORMAT: Final = b'{"t":"d","seq":%d,"ttl":%d,"n":%d}'
_FRAGMENT_FORMAT: Final = b'{"t":"d","seq":%d,"ttl":%d,"n":%d,"p":%d,"ps":%d}'


def _frame_to_wire(frame: Frame) -> tuple[dict[str, Any], bytes | memoryview]:
    match frame:
        case Data(seq=seq, payload=payload, ttl_ms=ttl_ms, part=part, parts=parts):
            if frame.messages:
                return {
                    "t": "d",
                    "seq": seq,
                    "ttl": ttl_ms,
                    "n": len(payload),
                    "m": frame.messages,
                }, payload
            if parts == 1:
                return {"t": "d", "seq": seq, "ttl": ttl_ms, "n": len(payload)}, payload
            return {
                "t": "d",
                "seq": seq,
                "ttl": ttl_ms,
                "n": len(payload),
                "p": part,
                "ps": parts,
            }, payload
        case Ack(cumulative=cumulative, ranges=ranges, backlog=backlog):
            ack: dict[str, Any] = {"t": "a", "cum": cumulative}
            if ranges:
                ack["sack"] = ranges
            if backlog:
                ack["q"] = 1
            return ack, b""
        case Skip(seq=seq, dropped=dropped):
            if dropped:
                return {"t": "s", "seq": seq, "why": "d"}, b""
            return {"t": "s", "seq": seq}, b""
        case Announce():
            obj: dict[str, Any] = {
                "t": "ann",
                "id": frame.endpoint_id,
                "inc": frame.incarnation,
                "name": frame.name,
                "host": frame.host,
                "port": frame.port,
                "rate": frame.rate_ms,
            }
            if frame.ask:
                obj["ask"] = True
            if frame.interest:
                obj["iv"] = frame.interest
            if frame.peers_digest:
                obj["pd"] = frame.peers_digest
            if frame.forwarded:
                obj["fwd"] = True
                obj["age"] = frame.age_ms
            return obj, b""
        case Goodbye():
            return {"t": "bye"}, b""
    raise TypeError(f"not a frame: {frame!r}")  # pragma: no cover - guarded by the Frame union


# --- decoding -----------------------------------------------------------------------------------


def decode(
    data: bytes | bytearray, *, network_id: int, max_bytes: int = MAX_DATAGRAM_BYTES
) -> Datagram:
    """Decode one datagram addressed to network ``network_id``.

    ``data`` may be a ``bytearray`` (a reused receive buffer): decoded payloads are then still
    ``bytes``, but large ones and fragments are views of the buffer (see :class:`Data`), so its
    owner must not write to it while a view is alive (resizing it raises ``BufferError`` then).

    Raises:
        DecodeError: for anything that is not a well-formed glue datagram of this version and
            network; ``reason`` says which check failed.
    """
    if len(data) > max_bytes:
        raise DecodeError(f"{len(data)} bytes exceeds {max_bytes}", reason="oversized")
    end = data.find(_LF)
    if end < 0:
        if data[:1] == b"{":
            raise DecodeError("no end of header", reason="truncated")
        raise DecodeError("not a glue datagram", reason="foreign")
    # A peer's datagrams to us all start with the same header fields, up to the frame list: once
    # those bytes passed the checks below, only the frame list is parsed (a cache hit is exactly
    # what the full parse would give, or falls through to it).
    start = data.find(b'"f":[', 0, end)
    if start > 0:
        known = _headers.get(bytes(data[:start]))  # (no copy when data is bytes)
        if known is not None and known.network_id == network_id and data[end - 1] == 125:  # }
            try:
                raw_frames = orjson.loads(data[start + 4 : end - 1])
            except orjson.JSONDecodeError:
                pass
            else:
                if type(raw_frames) is list and raw_frames:
                    return _frames_from_wire(raw_frames, data, end, known)
    try:
        head = orjson.loads(data[:end])
    except orjson.JSONDecodeError as exc:
        raise DecodeError(f"header is not JSON: {exc}", reason="foreign") from exc
    if not isinstance(head, dict) or "glue" not in head:
        raise DecodeError("header has no 'glue' version", reason="foreign")
    version = head["glue"]
    if version != VERSION or type(version) is not int:
        raise DecodeError(f"version {version!r}, expected {VERSION}", reason="version")
    net = _int(head, "net", 0, MAX_ID)
    if net != network_id:
        raise DecodeError(f"network {net}, expected {network_id}", reason="network")
    header = Header(
        net,
        EndpointId(_int(head, "src", 1, MAX_ID)),
        _int(head, "inc", 0, MAX_ID),
        _int(head, "dst", 0, MAX_ID) if "dst" in head else 0,
    )
    raw_frames = head.get("f")
    if not isinstance(raw_frames, list) or not raw_frames:
        raise DecodeError("'f' must be a non-empty list", reason="malformed")
    datagram = _frames_from_wire(raw_frames, data, end, header)
    # Only the exact bytes glue's encoder writes are cached: keys later in the header could
    # otherwise override the cached fields ({"inc":7,"f":[...],"inc":8} has incarnation 8).
    if 0 < start <= _HEADER_CACHE_KEY_BYTES and data[: start + 5] == _prefix(header):
        if len(_headers) >= _HEADER_CACHE_ENTRIES:
            _headers.clear()
        _headers[bytes(data[:start])] = header
    return datagram


#: Header bytes up to ``"f":[`` -> the header they decode to (bounded; cleared when full).
_headers: dict[bytes, Header] = {}
_HEADER_CACHE_ENTRIES: Final = 4096
_HEADER_CACHE_KEY_BYTES: Final = 256  # glue's own headers take about 100


def _frames_from_wire(
    raw_frames: list[Any], data: bytes | bytearray, end: int, header: Header
) -> Datagram:
    frames = []
    offset = end + 1
    for raw in raw_frames:
        frame, offset = _frame_from_wire(raw, data, offset, header)
        frames.append(frame)
    if offset != len(data):
        raise DecodeError(f"{len(data) - offset} bytes after the last payload", reason="malformed")
    return Datagram(header, tuple(frames))


def _frame_from_wire(
    raw: object, data: bytes | bytearray, offset: int, header: Header
) -> tuple[Frame, int]:
    if not isinstance(raw, dict):
        raise DecodeError("a frame must be an object", reason="malformed")
    kind = raw.get("t")
    if kind == "d":
        # Fast paths for the hot frames: every field a plain int in range, not a bundle; a whole
        # message, or a fragment. Anything else takes the general path, which names the problem.
        length, seq, ttl_ms = raw.get("n"), raw.get("seq"), raw.get("ttl")
        if (
            type(length) is int
            and type(seq) is int
            and type(ttl_ms) is int
            and 0 <= length <= MAX_DATAGRAM_BYTES
            and 1 <= seq <= MAX_ID
            and 1 <= ttl_ms <= MAX_TTL_MS
            and "m" not in raw
            and offset + length <= len(data)
        ):
            end = offset + length
            if "ps" not in raw:
                return Data(seq, _payload(data, offset, end), ttl_ms), end
            parts, part = raw["ps"], raw.get("p")
            if (
                type(parts) is int
                and type(part) is int
                and 1 < parts <= MAX_PARTS
                and 0 <= part < parts
            ):
                return Data(
                    seq, _payload(data, offset, end, fragment=True), ttl_ms, part, parts
                ), end
        length = _int(raw, "n", 0, MAX_DATAGRAM_BYTES)
        end = offset + length
        if end > len(data):
            raise DecodeError(f"payload wants {length} bytes, has fewer", reason="truncated")
        seq = _int(raw, "seq", 1, MAX_ID)
        ttl_ms = _int(raw, "ttl", 1, MAX_TTL_MS)
        if "m" in raw:
            if "ps" in raw:
                raise DecodeError("a bundle cannot be a fragment", reason="malformed")
            messages = _bundle_from_wire(raw["m"], length)
            return Data(seq, bytes(data[offset:end]), ttl_ms, messages=messages), end
        if "ps" not in raw:
            return Data(seq, bytes(data[offset:end]), ttl_ms), end
        parts = _int(raw, "ps", 1, MAX_PARTS)
        part = _int(raw, "p", 0, parts - 1)
        return Data(seq, _payload(data, offset, end, fragment=True), ttl_ms, part, parts), end
    if kind == "a":
        return _ack_from_wire(raw), offset
    if kind == "s":
        why = raw.get("why", "e")
        if why not in ("e", "d"):
            raise DecodeError('\'why\' of a skip must be "e" or "d"', reason="malformed")
        return Skip(_int(raw, "seq", 1, MAX_ID), why == "d"), offset
    if kind == "ann":
        return _announce_from_wire(raw, header), offset
    if kind == "bye":
        return Goodbye(), offset
    raise DecodeError(f"unknown frame kind {kind!r}", reason="malformed")


def _payload(
    data: bytes | bytearray, start: int, end: int, *, fragment: bool = False
) -> bytes | memoryview:
    """``data[start:end]``: a view when it is large (or a fragment) and most of the datagram, so
    a large message is copied once, when whole; else a copy (``bytes``), so a small payload kept
    (buffered out of order, or a partial message) never holds a large datagram alive."""
    length = end - start
    if (fragment or length > VIEW_MIN_BYTES) and 2 * length >= len(data):
        return memoryview(data)[start:end]
    return bytes(data[start:end])  # (no second copy when data is bytes)


def _announce_from_wire(raw: dict[str, Any], header: Header) -> Announce:
    forwarded = _bool(raw, "fwd")
    announce = Announce(
        endpoint_id=EndpointId(_int(raw, "id", 1, MAX_ID)),
        incarnation=_int(raw, "inc", 0, MAX_ID),
        name=_name(raw),
        host=_host(raw),
        port=_int(raw, "port", 1, 65535),
        rate_ms=_int(raw, "rate", 1, MAX_RATE_MS),
        ask=_bool(raw, "ask"),
        forwarded=forwarded,
        age_ms=_int(raw, "age", 0, MAX_AGE_MS) if forwarded else 0,
        interest=_int(raw, "iv", 0, MAX_ID) if "iv" in raw else 0,
        peers_digest=_int(raw, "pd", 0, MAX_ID) if "pd" in raw else 0,
    )
    if forwarded:
        if announce.ask:
            raise DecodeError("a forwarded announcement cannot ask", reason="malformed")
        if not announce.host:
            raise DecodeError("a forwarded announcement needs a host", reason="malformed")
    elif (announce.endpoint_id, announce.incarnation) != (header.source_id, header.incarnation):
        raise DecodeError("announcement about another endpoint not marked fwd", reason="malformed")
    return announce


def _bundle_from_wire(raw: object, length: int) -> tuple[tuple[int, int], ...]:
    # Checked with builtins that loop in C: a bundle may list thousands of messages.
    bad = DecodeError("'m' holds [length, ttl] pairs of integers", reason="malformed")
    if not isinstance(raw, list) or not 0 < len(raw) <= MAX_BUNDLE:
        raise DecodeError(f"'m' must be a list of 1..{MAX_BUNDLE} pairs", reason="malformed")
    if set(map(type, raw)) != {list} or set(map(len, raw)) != {2}:
        raise bad
    lengths, ttls = zip(*raw, strict=True)
    if set(map(type, lengths)) != {int} or set(map(type, ttls)) != {int}:
        raise bad
    if min(lengths) < 0 or min(ttls) < 0 or max(ttls) > MAX_TTL_MS:
        raise bad
    if sum(lengths) != length:
        raise DecodeError(f"'m' lengths do not add up to 'n' = {length}", reason="malformed")
    return tuple(zip(lengths, ttls, strict=True))


def _ack_from_wire(raw: dict[str, Any]) -> Ack:
    cumulative = _int(raw, "cum", 0, MAX_ID)
    sack = raw.get("sack", [])
    if not isinstance(sack, list) or len(sack) > MAX_ACK_RANGES:
        raise DecodeError(f"'sack' must be a list of at most {MAX_ACK_RANGES}", reason="malformed")
    ranges = []
    floor = cumulative + 1
    for pair in sack:
        if (
            not isinstance(pair, list)
            or len(pair) != 2
            or type(pair[0]) is not int
            or type(pair[1]) is not int
            or not floor < pair[0] <= pair[1] <= MAX_ID
        ):
            raise DecodeError("'sack' ranges must increase, above 'cum' + 1", reason="malformed")
        ranges.append((pair[0], pair[1]))
        floor = pair[1] + 1
    return Ack(cumulative, tuple(ranges), raw.get("q") == 1)


def _int(obj: dict[str, Any], key: str, low: int, high: int) -> int:
    value = obj.get(key)
    if type(value) is not int or not low <= value <= high:
        raise DecodeError(f"{key!r} must be an integer in [{low}, {high}]", reason="malformed")
    return value


def _bool(obj: dict[str, Any], key: str) -> bool:
    value = obj.get(key, False)
    if type(value) is not bool:
        raise DecodeError(f"{key!r} must be a boolean", reason="malformed")
    return value


def _name(obj: dict[str, Any]) -> str:
    value = obj.get("name")
    if not isinstance(value, str) or not 0 < len(value) <= MAX_NAME_CHARS:
        raise DecodeError(f"'name' must be 1..{MAX_NAME_CHARS} characters", reason="malformed")
    return value


def _host(obj: dict[str, Any]) -> str:
    value = obj.get("host", "")
    if not isinstance(value, str):
        raise DecodeError("'host' must be a string", reason="malformed")
    if value:
        try:
            ipaddress.IPv4Address(value)
        except ValueError as exc:
            raise DecodeError(f"'host' {value!r} is not IPv4", reason="malformed") from exc
    return value
