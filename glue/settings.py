"""``GlueSettings``: every ``GLUE_*`` variable, read from the environment and an optional ``.env``.

Names and defaults follow the Go reference (``initialed85/glue``). :func:`load_settings` turns any
validation failure into one :class:`~glue.errors.ConfigError` whose message names each bad
variable, the value it had and the form expected, so a bad deployment fails at start-up with a
readable line instead of a traceback.
"""

from __future__ import annotations

import difflib
import ipaddress
import logging
import math
import os
import secrets
from pathlib import Path
from typing import Annotated, Any, Final, Literal, NamedTuple

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from glue.errors import ConfigError

__all__ = [
    "DEFAULT_DISCOVERY_ADDRESS",
    "DEFAULT_DISCOVERY_PORT",
    "GlueSettings",
    "HostPort",
    "load_settings",
]

logger = logging.getLogger(__name__)

DEFAULT_DISCOVERY_PORT: Final = 27320
DEFAULT_DISCOVERY_ADDRESS: Final = f"239.192.137.1:{DEFAULT_DISCOVERY_PORT}"
_MAX_ID: Final = 2**53 - 1
_LOG_LEVELS: Final = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class HostPort(NamedTuple):
    """A UDP address: ``host`` is an IPv4 literal or (for discovery targets) a DNS name."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


#: The form each variable expects, quoted in error messages and mirrored in ``.env.example``.
EXPECTED: Final[dict[str, str]] = {
    "network_id": f"an integer from 0 to {_MAX_ID}, the same on every endpoint that talks",
    "endpoint_id": f"an integer from 1 to {_MAX_ID}, or unset for a random one",
    "endpoint_name": "1 to 255 printable characters without spaces, or unset",
    "listen_address": "IPV4:PORT, e.g. 0.0.0.0:0 (port 0 picks a free port)",
    "listen_interface": "the name of a network interface of this host, e.g. eth0, or unset",
    "discovery_target_address": (
        "0 (do not announce), or a comma-separated list of HOST[:PORT] where HOST is an IPv4 "
        f"address or a DNS name and PORT defaults to {DEFAULT_DISCOVERY_PORT}"
    ),
    "discovery_listen_address": (
        "0 (do not listen), or IPV4:PORT: a multicast group, a broadcast or unicast address"
    ),
    "discovery_rate_milliseconds": "an integer from 10 to 3600000 (milliseconds)",
    "discovery_rate_timeout_multiplier": "a number from 1.0 to 1000, e.g. 2.0",
    "discovery_multicast_ttl": "an integer from 0 to 255 (1 keeps multicast on the local segment)",
    "max_peers": "an integer from 1 to 1000000",
    "max_message_bytes": "an integer from 1024 to 1073741824 (bytes; default 16 MiB)",
    "max_datagram_bytes": (
        "0 (from the interface MTU: MTU - 28, and 65507 to peers on 127.0.0.0/8), "
        "or an integer from 576 to 65507"
    ),
    "send_queue_bytes": "an integer from 65536 to 1099511627776 (bytes per peer)",
    "slow_peer": "block or drop (what a full send queue to one peer does)",
    "history_depth": "an integer from 0 to 1000000 (messages kept per topic for late joiners)",
    "history_max_bytes": "an integer from 0 to 1099511627776 (bytes of history in total)",
    "history_keep": (
        "a comma-separated list of topic patterns, each optionally with =DEPTH, e.g. "
        "sensors/#,config/#=10 (depth 1 to 1000000; GLUE_HISTORY_DEPTH when not given)"
    ),
    "history_path": "the path of an SQLite file for kept history, e.g. /var/lib/glue/history.db",
    "group_window": (
        "an integer from 1 to 1000000 (grouped messages a member may have unfinished from one "
        "publisher)"
    ),
    "group_hold_bytes": (
        "an integer from 0 to 1099511627776 (bytes of grouped messages held for a member with room)"
    ),
    "callback_threads": "an integer from 1 to 256 (threads running subscription callbacks)",
    "busy_poll_microseconds": (
        "an integer from 0 to 100000 (microseconds the network thread polls for datagrams "
        "before sleeping; 0: off)"
    ),
    "log_level": "one of " + ", ".join(_LOG_LEVELS),
    "strict_settings": "1 or true (an unknown GLUE_* variable is an error), 0 or false",
    "network_key": (
        "a comma-separated list of keys from `glue keygen` (32 bytes in base64url each); the "
        "first seals, every one opens"
    ),
    "network_key_file": "the path of a readable file holding what GLUE_NETWORK_KEY would",
    "metrics_address": (
        "0 or unset (no metrics), or IPV4:PORT to serve Prometheus metrics on, e.g. 0.0.0.0:9464"
    ),
}


class GlueSettings(BaseSettings):
    """Configuration of one endpoint; every field is the ``GLUE_<FIELD>`` environment variable.

    Build it with :func:`load_settings` (environment + ``.env``) or directly with keyword
    arguments; unset ``endpoint_id``/``endpoint_name`` are filled with random unique values.
    """

    model_config = SettingsConfigDict(
        env_prefix="GLUE_",
        env_file=".env",
        env_file_encoding="utf-8",
        env_ignore_empty=True,
        extra="ignore",
        frozen=True,
    )

    network_id: int = Field(1, ge=0, le=_MAX_ID)
    endpoint_id: int | None = Field(None, ge=1, le=_MAX_ID)
    endpoint_name: str | None = Field(None, min_length=1, max_length=255, pattern=r"^[!-~]+$")
    listen_address: Annotated[HostPort, NoDecode] = HostPort("0.0.0.0", 0)
    listen_interface: str | None = None
    discovery_target_address: Annotated[tuple[HostPort, ...], NoDecode] = (
        HostPort("239.192.137.1", DEFAULT_DISCOVERY_PORT),
    )
    discovery_listen_address: Annotated[HostPort | None, NoDecode] = HostPort(
        "239.192.137.1", DEFAULT_DISCOVERY_PORT
    )
    discovery_rate_milliseconds: int = Field(1000, ge=10, le=3_600_000)
    discovery_rate_timeout_multiplier: float = Field(2.0, ge=1.0, le=1000.0)
    discovery_multicast_ttl: int = Field(1, ge=0, le=255)
    max_peers: int = Field(1000, ge=1, le=1_000_000)
    max_message_bytes: int = Field(16 * 1024 * 1024, ge=1024, le=1024**3)
    max_datagram_bytes: int = Field(0, ge=0, le=65507)
    send_queue_bytes: int = Field(64 * 1024 * 1024, ge=65536, le=1024**4)
    #: A peer whose send queue is full: "block" holds its messages (the others' go on) until the
    #: hand-off queue is full too, then publish and send wait up to their timeout and raise
    #: BackpressureError naming it; "drop" drops its unsent backlog instead (a gap for it).
    slow_peer: Literal["block", "drop"] = "block"
    history_depth: int = Field(1, ge=0, le=1_000_000)
    history_max_bytes: int = Field(64 * 1024 * 1024, ge=0, le=1024**4)
    #: Topic patterns whose history this endpoint keeps for others (docs/history.md), each with
    #: its depth (None: history_depth).
    history_keep: Annotated[tuple[tuple[str, int | None], ...], NoDecode] = ()
    #: Where kept history is persisted (SQLite), so that a restarted keeper still serves it.
    history_path: Path | None = None
    #: Work queues (docs/work-queues.md): grouped messages one member may have unfinished from
    #: this publisher, per group; beyond, they wait here for a member with room.
    group_window: int = Field(64, ge=1, le=1_000_000)
    #: Bytes of grouped messages waiting here for a member with room; beyond, the oldest go.
    group_hold_bytes: int = Field(64 * 1024 * 1024, ge=0, le=1024**4)
    callback_threads: int = Field(4, ge=1, le=256)
    #: After traffic, the network thread (or the asyncio loop) keeps polling its sockets for this
    #: long before it sleeps: a reply that comes back within it finds a thread already running,
    #: at the price of that much CPU per burst (README, "Performance"). 0: off.
    busy_poll_microseconds: int = Field(0, ge=0, le=100_000)
    log_level: str = "INFO"
    strict_settings: bool = False
    metrics_address: Annotated[HostPort | None, NoDecode] = None
    #: The network key(s): comma-separated, the first seals, every one opens (docs/security.md).
    network_key: SecretStr | None = None
    network_key_file: Path | None = None

    @field_validator("listen_address", mode="before")
    @classmethod
    def _parse_listen(cls, value: Any) -> HostPort:
        return _host_port(value, allow_names=False, default_port=None)

    @field_validator("network_key", mode="after")
    @classmethod
    def _check_key(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            from glue.security import parse_keys  # cryptography: only when a key is set

            parse_keys(value.get_secret_value())
        return value

    @field_validator("network_key_file", mode="after")
    @classmethod
    def _check_key_file(cls, value: Path | None) -> Path | None:
        if value is not None:
            from glue.security import parse_keys

            try:
                text = value.read_text(encoding="utf-8")
            except OSError as exc:
                raise ValueError(f"cannot read it: {exc.strerror}") from None
            parse_keys(text)
        return value

    @field_validator("history_keep", mode="before")
    @classmethod
    def _parse_keep(cls, value: Any) -> tuple[tuple[str, int | None], ...]:
        from glue.errors import UsageError
        from glue.topics import validate_pattern

        if value is None:
            return ()
        items = value.split(",") if isinstance(value, str) else list(value)
        kept: dict[str, int | None] = {}
        for item in items:
            if isinstance(item, tuple | list):
                pattern, depth = item
            else:
                pattern, _, raw = str(item).strip().partition("=")
                depth = None
                if raw:
                    if not raw.strip().isdigit() or not 1 <= int(raw) <= 1_000_000:
                        raise ValueError(f"{item.strip()!r}: the depth is not 1 to 1000000")
                    depth = int(raw)
            pattern = pattern.strip()
            if not pattern:
                if isinstance(value, str) and not value.strip():
                    continue
                raise ValueError("empty entry in the list")
            try:
                validate_pattern(pattern, "pattern")
            except UsageError as exc:
                raise ValueError(str(exc)) from None
            kept[pattern] = depth
        return tuple(kept.items())

    @field_validator("history_path", mode="after")
    @classmethod
    def _check_history_path(cls, value: Path | None) -> Path | None:
        if value is None:
            return None
        if value.is_dir():
            raise ValueError("it is a directory")
        parent = value.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
            raise ValueError(f"cannot create it: {parent} is not a writable directory")
        return value

    @field_validator("metrics_address", mode="before")
    @classmethod
    def _parse_metrics(cls, value: Any) -> HostPort | None:
        if value is None or str(value).strip() in ("", "0"):
            return None
        return _host_port(value, allow_names=False, default_port=None)

    @field_validator("discovery_listen_address", mode="before")
    @classmethod
    def _parse_discovery_listen(cls, value: Any) -> HostPort | None:
        if value is None or str(value).strip() == "0":
            return None
        return _host_port(value, allow_names=False, default_port=None)

    @field_validator("discovery_target_address", mode="before")
    @classmethod
    def _parse_targets(cls, value: Any) -> tuple[HostPort, ...]:
        if value is None:
            return ()
        if isinstance(value, str):
            if value.strip() == "0":
                return ()
            parts = [part.strip() for part in value.split(",")]
            if not all(parts):
                raise ValueError("empty entry in the list")
            return tuple(
                _host_port(p, allow_names=True, default_port=DEFAULT_DISCOVERY_PORT) for p in parts
            )
        return tuple(
            _host_port(p, allow_names=True, default_port=DEFAULT_DISCOVERY_PORT) for p in value
        )

    @field_validator("discovery_rate_timeout_multiplier", mode="before")
    @classmethod
    def _finite(cls, value: Any) -> Any:
        try:
            number = float(value)
        except (TypeError, ValueError):
            return value  # pydantic reports "not a valid number"
        if not math.isfinite(number):
            raise ValueError("must be a finite number")
        return value

    @field_validator("max_datagram_bytes")
    @classmethod
    def _datagram(cls, value: int) -> int:
        if 0 < value < 576:
            raise ValueError("too small for a fragment")
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _level(cls, value: Any) -> str:
        level = str(value).strip().upper()
        if level not in _LOG_LEVELS:
            raise ValueError("unknown level")
        return level

    @field_validator("listen_interface", mode="before")
    @classmethod
    def _interface(cls, value: Any) -> str | None:
        if value is None:
            return None
        name = str(value).strip()
        if not name or len(name) > 15 or any(c in name for c in " /\0"):
            raise ValueError("not an interface name")
        return name

    @model_validator(mode="after")
    def _one_key_source(self) -> GlueSettings:
        if self.network_key is not None and self.network_key_file is not None:
            raise ValueError(
                "GLUE_NETWORK_KEY and GLUE_NETWORK_KEY_FILE are both set: set one of them"
            )
        return self

    def network_keys(self) -> list[bytes] | None:
        """The network keys (the first seals), from the variable or the file; None: no key."""
        from glue.security import parse_keys

        if self.network_key is not None:
            return parse_keys(self.network_key.get_secret_value())
        if self.network_key_file is not None:
            return parse_keys(self.network_key_file.read_text(encoding="utf-8"))
        return None

    @model_validator(mode="after")
    def _fill_identity(self) -> GlueSettings:
        # Frozen model: the random defaults are filled in once, at validation time.
        if self.endpoint_id is None:
            object.__setattr__(self, "endpoint_id", 1 + secrets.randbelow(_MAX_ID))
        if self.endpoint_name is None:
            name = f"Endpoint_{self.endpoint_id}_{secrets.token_hex(3)}"
            object.__setattr__(self, "endpoint_name", name)
        return self

    # Convenience views with the defaults already resolved.

    @property
    def id(self) -> int:
        """``endpoint_id``, always set after validation."""
        assert self.endpoint_id is not None
        return self.endpoint_id

    @property
    def name(self) -> str:
        """``endpoint_name``, always set after validation."""
        assert self.endpoint_name is not None
        return self.endpoint_name

    @property
    def discovery_rate_s(self) -> float:
        """The announcement period in seconds."""
        return self.discovery_rate_milliseconds / 1000.0


def load_settings(**overrides: Any) -> GlueSettings:
    """Read ``GLUE_*`` from the environment and ``.env``; keyword arguments override both.

    Raises:
        ConfigError: one line per bad variable, naming it, its value and the form expected.
    """
    try:
        settings = GlueSettings(**overrides)
    except ValidationError as exc:
        raise config_error_from(exc) from None
    _check_unknown(settings)
    return settings


#: Unknown variables already warned about, so that each is reported once per process.
_warned_unknown: set[tuple[str, str]] = set()


def unknown_variables() -> list[tuple[str, str, str | None]]:
    """``GLUE_*`` names in the environment or ``.env`` that are no setting: (name, where, the
    closest setting's name or None)."""
    known = [f"GLUE_{field.upper()}" for field in GlueSettings.model_fields]
    sources: list[tuple[str, list[str]]] = [("the environment", list(os.environ))]
    env_file = Path(str(GlueSettings.model_config.get("env_file") or ".env"))
    if env_file.is_file():
        from dotenv import dotenv_values  # pydantic-settings' own reader of .env files

        sources.append((str(env_file), list(dotenv_values(env_file))))
    found = []
    for where, names in sources:
        for name in names:
            upper = name.upper()
            if upper.startswith("GLUE_") and upper not in known:
                close = difflib.get_close_matches(upper, known, n=1, cutoff=0.8)
                found.append((name, where, close[0] if close else None))
    return found


def _check_unknown(settings: GlueSettings) -> None:
    unknown = unknown_variables()
    if not unknown:
        return
    lines = [
        f"{name} (in {where}) is not a glue setting" + (f"; did you mean {close}?" if close else "")
        for name, where, close in unknown
    ]
    if settings.strict_settings:
        raise ConfigError(
            "\n".join(lines) + "\n(GLUE_STRICT_SETTINGS is on: unknown GLUE_* names are errors)",
            variable=unknown[0][0],
        )
    for (name, where, _), line in zip(unknown, lines, strict=True):
        if (name, where) in _warned_unknown:
            continue
        if len(_warned_unknown) < 256:
            _warned_unknown.add((name, where))
        logger.warning("%s; it is ignored (see .env.example for every setting)", line)


def config_error_from(exc: ValidationError) -> ConfigError:
    """Turn a pydantic ``ValidationError`` on ``GlueSettings`` into a readable ``ConfigError``."""
    lines = []
    first: str | None = None
    for error in exc.errors():
        reason = str(error["msg"]).removeprefix("Value error, ")
        if not error["loc"]:  # a check across variables: its message names them
            first = first or "GLUE_NETWORK_KEY"
            lines.append(reason)
            continue
        field = str(error["loc"][0])
        variable = f"GLUE_{field.upper()}"
        first = first or variable
        expected = EXPECTED.get(field, "a valid value")
        value = error.get("input")
        shown = "(hidden)" if field == "network_key" else repr(value)  # never log a secret
        lines.append(f"{variable}={shown} is invalid ({reason}); expected {expected}")
    return ConfigError("\n".join(lines), variable=first)


def _host_port(value: Any, *, allow_names: bool, default_port: int | None) -> HostPort:
    if isinstance(value, tuple) and len(value) == 2:
        host, port_text = str(value[0]), str(value[1])
    else:
        text = str(value).strip()
        host, sep, port_text = text.rpartition(":")
        if not sep:
            if default_port is None:
                raise ValueError("missing ':PORT'")
            host, port_text = text, str(default_port)
    host = host.strip()
    if not host:
        if allow_names:  # a target must say where to go; a listen address may mean "any"
            raise ValueError("missing host")
        host = "0.0.0.0"
    port_text = port_text.strip()
    if not (port_text.isascii() and port_text.isdigit()) or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"port {port_text!r} is not 0..65535")
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        if not allow_names:
            raise ValueError(f"{host!r} is not an IPv4 address") from None
        if not _is_dns_name(host):
            raise ValueError(f"{host!r} is neither an IPv4 address nor a DNS name") from None
    port = int(port_text)
    if default_port is not None and port == 0:
        raise ValueError("a target needs a port other than 0")
    return HostPort(host, port)


def _is_dns_name(host: str) -> bool:
    labels = host.rstrip(".").split(".")
    if labels[-1].isdigit():
        return False  # an all-numeric top label is a mistyped IPv4 address (RFC 3696, 2)
    return len(host) <= 253 and all(
        0 < len(label) <= 63
        and label.replace("-", "").replace("_", "").isalnum()
        and label.isascii()
        and not label.startswith("-")
        for label in labels
    )
