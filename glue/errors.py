"""The exceptions glue raises.

::

    GlueError               base of everything glue raises
    ├── ConfigError         bad GLUE_* value; the message names the variable and the expected form
    ├── UsageError          the caller did something illegal (bad argument, stopped endpoint)
    ├── DeliveryError       a publish that asked for confirmation did not get it
    │   └── BackpressureError  the send queue stayed full for the whole timeout
    └── ProtocolError       a peer sent something illegal; caught by the runtime, never raised
        └── DecodeError     malformed/truncated/oversized/foreign datagram (raised only by wire)

A ``ProtocolError`` never reaches the user: the runtime drops the datagram, counts it, logs it at
debug level and carries on. Foreign exceptions (``OSError``, orjson, pydantic) are translated at the
boundary with ``raise ... from exc``.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = [
    "BackpressureError",
    "ConfigError",
    "DecodeError",
    "DeliveryError",
    "GlueError",
    "ProtocolError",
    "UsageError",
]


class GlueError(Exception):
    """Base of every exception glue raises."""


class ConfigError(GlueError):
    """A ``GLUE_*`` setting (or the equivalent argument) has a value glue cannot use."""

    def __init__(self, message: str, *, variable: str | None = None) -> None:
        super().__init__(message)
        self.variable = variable


class UsageError(GlueError):
    """The caller did something illegal: a bad argument, or a call on a stopped endpoint."""


class DeliveryError(GlueError):
    """A delivery that was asked to be confirmed was not.

    ``peers`` names the peers concerned (ids); ``unacknowledged`` maps each to the number of
    messages it did not acknowledge, where that is known (``flush``).
    """

    def __init__(
        self,
        message: str,
        *,
        peers: tuple[int, ...] = (),
        unacknowledged: Mapping[int, int] | None = None,
    ) -> None:
        super().__init__(message)
        self.peers = peers
        self.unacknowledged: dict[int, int] = dict(unacknowledged or {})


class BackpressureError(DeliveryError):
    """A send waited ``timeout`` seconds for room in a peer's send queue and found none.

    Nothing was queued for the peers named in ``peers`` (ids); earlier messages are unaffected.
    """


class ProtocolError(GlueError):
    """A peer sent something this endpoint cannot accept."""


class DecodeError(ProtocolError):
    """A datagram that is not a well-formed glue datagram for this network.

    ``reason`` is a short stable tag (``"truncated"``, ``"oversized"``, ``"version"``,
    ``"network"``, ``"malformed"``, ``"foreign"``) used as a counter key.
    """

    def __init__(self, message: str, *, reason: str) -> None:
        super().__init__(message)
        self.reason = reason
