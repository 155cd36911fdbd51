"""Sealed datagrams: a network key authenticates and encrypts every datagram (``docs/security.md``).

How it works (``docs/PROTOCOL.md``, "Sealed datagrams", is the normative description)
--------------------------------------------------------------------------------------
A network key is 32 random bytes, written as unpadded base64url (``glue keygen``). From each key
and ``GLUE_NETWORK_ID``, HKDF-SHA256 derives a *network key* and a 4-byte *key id*, so one secret
can serve several networks without their traffic being interchangeable.

Each endpoint process picks a random 16-byte *salt* at start and derives its own *sender key*
from the network key and the salt (HKDF again). It seals datagram *n* (counting from 1) with
AES-256-GCM under its sender key, with nonce = *n* as 12 big-endian bytes. A (sender key, nonce)
pair therefore never repeats: the counter never repeats within a process, and another process,
or a restart, has another salt, hence another key (two processes would need the same 128-bit
random salt). The sealed datagram is::

    magic (2: C7 01) | key id (4) | salt (16) | counter (8) | sent at, ms since the epoch (8)
    | AES-256-GCM ciphertext of the glue datagram | tag (16)

the 38-byte header being the associated data. The receiver looks the key id up among its keys
(the first key seals, every key opens: rotation), derives the sender key of the salt (cached for
the senders it has authenticated, a bounded number of them), opens the datagram, then rejects a
replay (a counter already seen, or older than the sender's sliding window of 4096) and a stale
datagram (sent more than ``freshness_s`` before or after its own clock: a datagram captured before
the sender restarted is refused, whatever the receiver remembers). Only then does any parser see
the bytes. Nothing about a sender is stored before it authenticated, so forged datagrams cost CPU
(one key derivation and one failed open each), never memory.
"""

from __future__ import annotations

import base64
import binascii
import os
import struct
from collections import OrderedDict
from collections.abc import Sequence
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = [
    "KEY_BYTES",
    "SEAL_MAGIC",
    "SEAL_OVERHEAD",
    "NetworkKeys",
    "Opener",
    "Rejected",
    "Sealer",
    "generate_key",
    "parse_keys",
]

KEY_BYTES: Final = 32
SEAL_MAGIC: Final = b"\xc7\x01"  # a plain glue datagram starts with "{": the two never mix
_HEADER: Final = struct.Struct(">2s4s16sQQ")  # magic, key id, salt, counter, sent at (ms)
# The same header as read by the opener: the key id and salt together name the sender.
_READ: Final = struct.Struct(">2s20sQQ")
_STAMP: Final = struct.Struct(">QQ")  # what changes per datagram: counter, sent at
_STAMP_AT: Final = 22
_TAG_BYTES: Final = 16
#: Bytes a sealed datagram has beyond the glue datagram it carries.
SEAL_OVERHEAD: Final = _HEADER.size + _TAG_BYTES
_WINDOW: Final = 4096  # counters remembered per sender, below the highest seen
# The window's bitmap is a ring of bytes (RFC 6479): counter c is bit c % 8 of byte c // 8 (mod
# its length), so accepting a counter sets one bit and clears the bytes it moves past, instead of
# shifting a 4096-bit integer. 4096 counters span at most 513 bytes (they need not start on a
# byte boundary): with 513, no two counters in the window share a bit.
_RING_BYTES: Final = _WINDOW // 8 + 1
_HKDF_SALT: Final = b"glue sealed datagrams v1"
_REUSED_BYTES: Final = 65_536  # the largest datagram, and then some
_PLAIN_FIRST: Final = ord("{")


class Rejected(Exception):
    """A datagram that did not open; ``reason`` is the counter key (``dropped_<reason>``)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def generate_key() -> str:
    """A new random network key, in the form ``GLUE_NETWORK_KEY`` takes."""
    return base64.urlsafe_b64encode(os.urandom(KEY_BYTES)).rstrip(b"=").decode()


def parse_keys(text: str) -> list[bytes]:
    """The keys of a comma-separated list (``GLUE_NETWORK_KEY``; spaces and newlines allowed).

    Raises:
        ValueError: a key is not 32 bytes in base64url (or base64); the message says which.
    """
    keys = []
    for index, item in enumerate(text.replace("\n", ",").split(","), start=1):
        word = item.strip()
        if not word:
            continue
        padded = word + "=" * (-len(word) % 4)
        try:
            key = base64.b64decode(padded.replace("+", "-").replace("/", "_"), b"-_", validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"key {index} is not base64url") from None
        if len(key) != KEY_BYTES:
            raise ValueError(f"key {index} is {len(key)} bytes, not {KEY_BYTES}")
        keys.append(key)
    if not keys:
        raise ValueError("no key in it")
    return keys


def _derive(key: bytes, info: bytes, length: int = 32) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=_HKDF_SALT, info=info).derive(key)


class NetworkKeys:
    """The keys of one network: the first seals, every one opens (by its key id)."""

    def __init__(self, keys: Sequence[bytes], network_id: int) -> None:
        if not keys:
            raise ValueError("at least one key")
        self.network_keys: dict[bytes, bytes] = {}
        ids = []
        for key in keys:
            network_key = _derive(key, b"glue network key %d" % network_id)
            key_id = _derive(key, b"glue key id %d" % network_id, 4)
            self.network_keys.setdefault(key_id, network_key)
            ids.append(key_id)
        self.sealing_id = ids[0]

    @property
    def key_ids(self) -> list[str]:
        """The key ids, hex, the sealing one first (safe to log: they reveal nothing)."""
        sealing = self.sealing_id
        return [sealing.hex(), *(k.hex() for k in self.network_keys if k != sealing)]


def _sender_key(network_key: bytes, salt: bytes) -> AESGCM:
    return AESGCM(_derive(network_key, b"glue sender " + salt))


class Sealer:
    """Seals the datagrams of one endpoint process (a fresh salt per instance)."""

    def __init__(self, keys: NetworkKeys, *, salt: bytes | None = None) -> None:
        self.key_id = keys.sealing_id
        self.salt = salt if salt is not None else os.urandom(16)
        self._aead = _sender_key(keys.network_keys[self.key_id], self.salt)
        self._counter = 0
        # Reused: the plaintext gathered from a datagram's pieces, and the sealed datagram, so
        # that sealing a large datagram allocates nothing. Neither is ever resized, so the views
        # of them made here live as long as they do.
        self._plain = memoryview(bytearray(_REUSED_BYTES))
        sealed = bytearray(_REUSED_BYTES + SEAL_OVERHEAD)
        _HEADER.pack_into(sealed, 0, SEAL_MAGIC, self.key_id, self.salt, 0, 0)
        self._sealed_buffer = sealed  # the magic, key id and salt written once, the rest per seal
        self._sealed = memoryview(sealed)
        self._header = self._sealed[: _HEADER.size]
        self._body = self._sealed[_HEADER.size :]

    def seal(self, datagram: bytes | bytearray | memoryview, sent_at_ms: int) -> bytes:
        """``datagram`` sealed under the next counter value."""
        self._counter = counter = self._counter + 1
        header = _HEADER.pack(SEAL_MAGIC, self.key_id, self.salt, counter, sent_at_ms)
        return header + self._aead.encrypt(counter.to_bytes(12, "big"), datagram, header)

    def seal_pieces(self, pieces: Sequence[bytes | memoryview], sent_at_ms: int) -> memoryview:
        """The datagram made of ``pieces``, sealed into a reused buffer: valid until the next
        call (send it at once). Large datagrams take this path: one copy, to gather the pieces
        (AES-GCM in one call wants its plaintext in one buffer), and no allocation."""
        if len(pieces) == 1:  # nothing to gather
            return self._seal_into_buffer(pieces[0], sent_at_ms)
        plain = self._plain
        size = 0
        try:
            for piece in pieces:  # (into a memoryview: twice as fast as into a bytearray)
                end = size + len(piece)
                plain[size:end] = piece
                size = end
        except ValueError:  # past the end of the buffer (the slice came out shorter)
            return memoryview(self.seal(b"".join(pieces), sent_at_ms))
        return self._seal_into_buffer(plain[:size], sent_at_ms)

    def _seal_into_buffer(
        self, datagram: bytes | bytearray | memoryview, sent_at_ms: int
    ) -> memoryview:
        """``datagram`` sealed into the reused buffer. For small datagrams :meth:`seal` is
        cheaper: in CPython, two memoryview slices cost more than a small allocation."""
        size = len(datagram)
        if size > _REUSED_BYTES:
            return memoryview(self.seal(datagram, sent_at_ms))
        self._counter = counter = self._counter + 1
        _STAMP.pack_into(self._sealed_buffer, _STAMP_AT, counter, sent_at_ms)
        self._aead.encrypt_into(
            counter.to_bytes(12, "big"), datagram, self._header, self._body[: size + _TAG_BYTES]
        )
        return self._sealed[: size + SEAL_OVERHEAD]


class _Sender:
    """What is remembered of a sender that authenticated: its key and its replay window."""

    __slots__ = ("aead", "highest", "seen")

    def __init__(self, aead: AESGCM) -> None:
        self.aead = aead
        self.highest = 0
        self.seen = bytearray(_RING_BYTES)  # bit c % 8 of byte c // 8 % _RING_BYTES: c accepted

    def refuses(self, counter: int) -> bool:
        """Whether ``counter`` is a replay: seen, or too far below the highest to tell."""
        highest = self.highest
        if counter > highest:
            return False
        return (
            counter <= highest - _WINDOW
            or self.seen[(counter >> 3) % _RING_BYTES] >> (counter & 7) & 1 == 1
        )

    def accept(self, counter: int) -> None:
        """Record ``counter`` (authentic and not a replay)."""
        byte = counter >> 3
        passed = byte - (self.highest >> 3)
        if passed > 0:  # the window moves past bytes whose bits were counters long gone
            self._clear(byte, passed)
        if counter > self.highest:
            self.highest = counter
        self.seen[byte % _RING_BYTES] |= 1 << (counter & 7)

    def _clear(self, last: int, count: int) -> None:
        """Zero the ``count`` bytes of the ring up to ``last`` (a byte number, not wrapped)."""
        seen = self.seen
        if count == 1:
            seen[last % _RING_BYTES] = 0
        elif count >= _RING_BYTES:
            seen[:] = bytes(_RING_BYTES)
        else:
            first = (last - count + 1) % _RING_BYTES
            end = first + count
            seen[first:end] = bytes(min(end, _RING_BYTES) - first)
            if end > _RING_BYTES:  # wrapped around
                seen[: end - _RING_BYTES] = bytes(end - _RING_BYTES)


class Opener:
    """Opens sealed datagrams, refusing forged, replayed and stale ones (see the module doc)."""

    def __init__(
        self, keys: NetworkKeys, *, max_senders: int = 4096, freshness_s: float = 60.0
    ) -> None:
        self._keys = keys.network_keys
        self._senders: OrderedDict[bytes, _Sender] = OrderedDict()
        self._max_senders = max_senders
        self._freshness_ms = int(freshness_s * 1000)
        #: Where the runtime reads a sealed datagram (``recv_into``) to open it with
        #: :meth:`open_received`: as large as any datagram. Never resized, so the views of it
        #: made here serve every datagram.
        self.buffer = bytearray(_REUSED_BYTES)
        self._received = memoryview(self.buffer)
        self._received_header = self._received[: _HEADER.size]

    def open_into(self, sealed: bytes | bytearray | memoryview, now_ms: int, out: bytearray) -> int:
        """Open ``sealed`` into the start of ``out`` (at least as long); the plaintext length.

        Raises:
            Rejected: ``unsealed``, ``truncated``, ``key`` (no such key id: another network key),
                ``auth`` (forged or corrupted), ``replay`` or ``stale``.
        """
        if len(sealed) < SEAL_OVERHEAD:
            raise Rejected("unsealed")
        # Views released before return, even when it raises (the traceback keeps the frames
        # that hold them): the caller may resize ``sealed``, like ``out``.
        with (
            memoryview(sealed) as view,
            view[: _HEADER.size] as header,
            view[_HEADER.size :] as body,
        ):
            return self._open(header, body, now_ms, out)

    def open_received(self, size: int, now_ms: int, out: bytearray) -> int:
        """:meth:`open_into` for the datagram of ``size`` bytes read into :attr:`buffer`."""
        if size < SEAL_OVERHEAD:
            raise Rejected("unsealed")
        return self._open(self._received_header, self._received[_HEADER.size : size], now_ms, out)

    def open_received_bytes(self, size: int, now_ms: int) -> bytes:
        """:meth:`open_received`, the plaintext returned as new bytes: for small datagrams,
        which the runtime would copy out of its buffer anyway (one copy and two views fewer:
        0.3-0.6 us of the ~2.5 an open of 64 B-1.4 KB costs here)."""
        if size < SEAL_OVERHEAD:
            raise Rejected("unsealed")
        header = self._received_header
        sender, known, sender_id, counter, sent_at = self._sender(header)
        try:
            plain = sender.aead.decrypt(
                counter.to_bytes(12, "big"), self._received[_HEADER.size : size], header
            )
        except InvalidTag:
            raise Rejected("auth") from None
        self._admit(sender, known, sender_id, counter, sent_at, now_ms)
        return plain

    def _open(self, header: memoryview, body: memoryview, now_ms: int, out: bytearray) -> int:
        """Open a datagram given as its header and the rest (a view of each)."""
        sender, known, sender_id, counter, sent_at = self._sender(header)
        size = len(body) - _TAG_BYTES
        # Released before return: ``out`` may be a buffer the caller resizes (the slice passed
        # to decrypt_into is gone once it returns or raises).
        with memoryview(out) as target:
            try:
                sender.aead.decrypt_into(counter.to_bytes(12, "big"), body, header, target[:size])
            except InvalidTag:
                raise Rejected("auth") from None
        self._admit(sender, known, sender_id, counter, sent_at, now_ms)
        return size

    def _sender(self, header: memoryview) -> tuple[_Sender, bool, bytes, int, int]:
        """The sender a sealed header names (known, or new with its key derived: not yet
        stored), whether it is known, its id, the counter and the time sent; a replay is
        refused here, before the tag: it costs no decryption."""
        magic, sender_id, counter, sent_at = _READ.unpack_from(header)
        if magic != SEAL_MAGIC:
            raise Rejected("unsealed" if header[0] == _PLAIN_FIRST else "truncated")
        sender = self._senders.get(sender_id)
        if sender is not None:
            if sender.refuses(counter):
                raise Rejected("replay")
            return sender, True, sender_id, counter, sent_at
        network_key = self._keys.get(sender_id[:4])
        if network_key is None:
            raise Rejected("key")
        return _Sender(_sender_key(network_key, sender_id[4:])), False, sender_id, counter, sent_at

    def _admit(
        self,
        sender: _Sender,
        known: bool,
        sender_id: bytes,
        counter: int,
        sent_at: int,
        now_ms: int,
    ) -> None:
        """After the tag: refuse a stale datagram, else record its counter (checked against the
        window before the tag, and nothing has changed the window since) and its sender."""
        if abs(now_ms - sent_at) > self._freshness_ms:
            raise Rejected("stale")
        senders = self._senders
        if known:
            senders.move_to_end(sender_id)
        else:
            senders[sender_id] = sender
            if len(senders) > self._max_senders:
                senders.popitem(last=False)  # the least recently heard
        sender.accept(counter)
