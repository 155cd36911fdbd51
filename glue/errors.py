"""The exceptions glue raises.

::

    GlueError               base of everything glue raises
    ├── ConfigError         bad GLUE_* value; the message names the variable and the expected form
    ├── UsageError          the caller did something illegal (bad argument, stopped endpoint)
    │   ├── UsageTypeError  an argument of the wrong type (also a ``TypeError``)
    │   └── UsageValueError an argument of the right type with a bad value (also a ``ValueError``)
    ├── DeliveryError       a publish that asked for confirmation did not get it
    │   └── BackpressureError  the send queue stayed full for the whole timeout
    ├── UnknownPeerError    send(to=[name]) named no peer known now (also a ``LookupError``)
    ├── NoResponderError    request(name): no endpoint serves the name (also a ``LookupError``)
    ├── RemoteError         the handler that served a request raised (its type and message)
    └── ProtocolError       a peer sent something illegal; caught by the runtime, never raised
        └── DecodeError     malformed/truncated/oversized/foreign datagram (raised only by wire)

A ``ProtocolError`` never reaches the user: the runtime drops the datagram, counts it, logs it at
debug level and carries on. Foreign exceptions (``OSError``, orjson, pydantic) are translated at the
boundary with ``raise ... from exc``. A bad argument raises ``UsageTypeError`` or
``UsageValueError``, so ``except TypeError``/``except ValueError`` catch it as they would for any
library; ``argument`` names the argument.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Mapping
from typing import Final

__all__ = [
    "BackpressureError",
    "ConfigError",
    "DecodeError",
    "DeliveryError",
    "GlueError",
    "NoResponderError",
    "ProtocolError",
    "RemoteError",
    "UnknownPeerError",
    "UsageError",
    "UsageTypeError",
    "UsageValueError",
    "check_callable",
    "check_int",
    "check_number",
    "check_payload",
    "check_timeout",
    "warn_once",
]

#: Keys a layer remembers having warned about (past it, it warns again: bounded memory).
MAX_WARNED: Final = 256


def warn_once(
    log: logging.Logger, warned: set[object], key: object, message: str, *args: object
) -> None:
    """Warn about ``key`` the first time only (later, at debug level): a problem a user must see
    even with no logging configured, never a flood. ``warned`` remembers at most ``MAX_WARNED``
    keys."""
    if key in warned:
        log.debug(message, *args)
        return
    if len(warned) < MAX_WARNED:
        warned.add(key)
    log.warning(message, *args)


#: The longest wait a timeout may ask for (the platform's limit for a blocking wait).
MAX_TIMEOUT_S: Final = threading.TIMEOUT_MAX


class GlueError(Exception):
    """Base of every exception glue raises."""


class ConfigError(GlueError):
    """A ``GLUE_*`` setting (or the equivalent argument) has a value glue cannot use."""

    def __init__(self, message: str, *, variable: str | None = None) -> None:
        super().__init__(message)
        self.variable = variable


class UsageError(GlueError):
    """The caller did something illegal: a bad argument, or a call on a stopped endpoint.

    ``argument`` names the argument at fault, when one is (``"payload"``, ``"expiry"``...).
    """

    def __init__(self, message: str, *, argument: str | None = None) -> None:
        super().__init__(message)
        self.argument = argument


class UsageTypeError(UsageError, TypeError):
    """An argument of the wrong type (``payload="text"``, ``expiry="5"``)."""


class UsageValueError(UsageError, ValueError):
    """An argument of an accepted type with a value glue cannot use (``expiry=math.inf``)."""


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


class UnknownPeerError(GlueError, LookupError):
    """``send(to=[...])`` named a peer this endpoint does not know now (``name``)."""

    def __init__(self, message: str, *, name: str) -> None:
        super().__init__(message)
        self.name = name


class NoResponderError(GlueError, LookupError):
    """A request to ``name`` found no endpoint serving it (known from the peers' interest, at
    once; or, while no peer was known at all, at the request's timeout)."""

    def __init__(self, message: str, *, name: str) -> None:
        super().__init__(message)
        self.name = name


class RemoteError(GlueError):
    """The handler that served a request to ``name`` raised: ``remote_type`` is the exception's
    type name (``"ValueError"``), ``remote_message`` its message; ``responder_id`` and
    ``responder_name`` say which endpoint."""

    def __init__(
        self,
        message: str,
        *,
        name: str,
        remote_type: str,
        remote_message: str,
        responder_id: int,
        responder_name: str,
    ) -> None:
        super().__init__(message)
        self.name = name
        self.remote_type = remote_type
        self.remote_message = remote_message
        self.responder_id = responder_id
        self.responder_name = responder_name


class BackpressureError(DeliveryError):
    """A send waited ``timeout`` seconds for room in a peer's send queue and found none.

    Nothing was queued for the peers named in ``peers`` (ids); earlier messages are unaffected.
    From ``publish_many``, ``queued`` says how many of its messages (the first ones, in order)
    were queued before it gave up; the rest were not.
    """

    queued: int | None = None


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


# --- argument checks of the public API ---------------------------------------------------------
# Each returns the value in the form glue uses, or raises UsageTypeError/UsageValueError naming
# the argument. Numbers are ints or floats, never bools (``True`` is not one second).


def check_int(value: object, argument: str, *, minimum: int, maximum: int | None = None) -> int:
    """``value`` if it is an int (not a bool) from ``minimum`` to ``maximum``."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise UsageTypeError(
            f"{argument} must be an int, not {type(value).__name__} ({value!r})",
            argument=argument,
        )
    if value < minimum or (maximum is not None and value > maximum):
        bounds = f">= {minimum}" if maximum is None else f"from {minimum} to {maximum}"
        raise UsageValueError(f"{argument} must be {bounds}, not {value!r}", argument=argument)
    return int(value)


def check_number(
    value: object,
    argument: str,
    *,
    minimum: float,
    maximum: float,
    above: bool = False,
    unit: str = "seconds",
    hint: str = "",
) -> float:
    """``value`` as a float if it is a finite int or float (not a bool) from ``minimum`` (or
    ``above`` it) to ``maximum``."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise UsageTypeError(
            f"{argument} must be a number of {unit}, not {type(value).__name__} ({value!r})",
            argument=argument,
        )
    try:
        number = float(value)
    except OverflowError:  # an int beyond any float
        number = math.inf
    low_ok = number > minimum if above else number >= minimum
    if not (low_ok and number <= maximum and math.isfinite(number)):
        low = f"> {minimum:g}" if above else f">= {minimum:g}"
        raise UsageValueError(
            f"{argument} must be a finite number of {unit} {low} and <= {maximum:g}, "
            f"not {value!r}{hint}",
            argument=argument,
        )
    return number


def check_timeout(value: object, argument: str = "timeout") -> float:
    """``value`` if it is a finite number of seconds >= 0."""
    if type(value) is float and 0.0 <= value <= MAX_TIMEOUT_S:  # the usual case, at once
        return value
    return check_number(value, argument, minimum=0.0, maximum=MAX_TIMEOUT_S)


def check_callable(value: object, argument: str) -> None:
    """Nothing if ``value`` can be called."""
    if not callable(value):
        raise UsageTypeError(
            f"{argument} must be callable, not {type(value).__name__} ({value!r})",
            argument=argument,
        )


def check_payload(value: object, argument: str = "payload", *, json_hint: bool = False) -> bytes:
    """``value`` as ``bytes`` if it is ``bytes``, ``bytearray`` or ``memoryview`` (copied then,
    so the caller may reuse its buffer)."""
    if type(value) is bytes:
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    also = " or publish_json()" if json_hint else ""
    if isinstance(value, str):
        hint = f": encode text first (payload.encode()){also}"
    elif isinstance(value, list | tuple) and json_hint:
        hint = ": bytes(values) for byte values, or publish_json() for a JSON array"
    else:
        hint = " (use publish_json() for JSON values)" if json_hint else ""
    raise UsageTypeError(
        f"{argument} must be bytes, bytearray or memoryview, not {type(value).__name__}{hint}",
        argument=argument,
    )
