"""Every option of ``wshub serve``, defined once.

The :class:`Config` dataclass is the single source of truth: each field carries
its help text and its parser in ``metadata``, and the command line, the
environment (``WSHUB_`` + the flag name in capitals) and the TOML file given by
``--config`` are all derived from it, so the three can't drift apart.

Precedence: a flag wins over the environment, the environment over the file,
the file over the default. A bad value is refused with a :class:`ConfigError`
that names the option and where the value came from.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import tomllib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import WshubError

__all__ = ["Config", "ConfigError", "OPTIONS", "Option", "load_config", "option_reference"]


class ConfigError(WshubError, ValueError):
    """A configuration value was refused; the message names the option."""


# Parsers turn a raw value (a string from a flag or the environment, or a
# native TOML value) into the field's type, or raise ValueError saying why.


def _duration(raw: Any) -> float:
    if isinstance(raw, bool):
        raise ValueError("expected a number of seconds")
    value = float(raw)
    if not math.isfinite(value) or value <= 0:
        raise ValueError("expected a positive number of seconds")
    return value


def _optional_duration(raw: Any) -> float | None:
    if raw is None or raw == "":
        return None
    return _duration(raw)


def _optional_count(raw: Any) -> int | None:
    if raw is None or raw == "":
        return None
    return _count(raw)


def _count(raw: Any) -> int:
    """A non-negative integer; 0 disables the limit it sets."""
    if isinstance(raw, bool):
        raise ValueError("expected an integer")
    if isinstance(raw, float):
        if not raw.is_integer():
            raise ValueError("expected an integer")
        raw = int(raw)
    value = int(raw)
    if value < 0:
        raise ValueError("expected an integer >= 0 (0 disables the limit)")
    return value


def _rate(raw: Any) -> float:
    """A non-negative number per second; 0 disables the limit it sets."""
    if isinstance(raw, bool):
        raise ValueError("expected a number")
    value = float(raw)
    if not math.isfinite(value) or value < 0:
        raise ValueError("expected a number >= 0 (0 disables the limit)")
    return value


def _size(raw: Any) -> int:
    value = _count(raw)
    if value < 1:
        raise ValueError("expected a size in bytes >= 1")
    return value


def _port(raw: Any) -> int:
    value = _count(raw)
    if value > 65535:
        raise ValueError("expected a port between 0 and 65535")
    return value


def _host(raw: Any) -> str:
    value = str(raw).strip()
    if not value:
        raise ValueError("expected a host name or address")
    return value


def _items(raw: Any) -> list[str]:
    if isinstance(raw, str):
        return [item.strip() for item in raw.split(",") if item.strip()]
    if isinstance(raw, Iterable):
        return [str(item).strip() for item in raw if str(item).strip()]
    raise ValueError("expected a comma-separated list")


def _origins(raw: Any) -> tuple[str, ...]:
    origins = []
    for item in _items(raw):
        if item == "*":
            origins.append(item)
            continue
        scheme, sep, rest = item.partition("://")
        if not sep or not scheme or not rest or "/" in rest:
            raise ValueError(
                f"{item!r} is not an origin (scheme://host[:port], https://*.example.com or *)"
            )
        origins.append(item.lower())
    return tuple(origins)


def _networks(raw: Any) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    networks = []
    for item in _items(raw):
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"{item!r} is not an IP address or network") from None
    return tuple(networks)


def _redis_url(raw: Any) -> str:
    value = str(raw).strip()
    if value and not value.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError("expected redis://HOST:PORT[/DB], rediss://... or unix://PATH")
    return value


def _name(raw: Any) -> str:
    value = str(raw).strip()
    if not value or not all(c.isalnum() or c in "-_." for c in value):
        raise ValueError("expected letters, digits, '-', '_' or '.'")
    return value


def _name_or_empty(raw: Any) -> str:
    return "" if str(raw).strip() == "" else _name(raw)


def _workers(raw: Any) -> int:
    value = _count(raw)
    if value < 1:
        raise ValueError("expected at least 1")
    return value


def _choice(*choices: str) -> Callable[[Any], str]:
    def parse(raw: Any) -> str:
        value = str(raw).strip().lower()
        if value not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return value

    return parse


def _opt(default: Any, help: str, parse: Callable[[Any], Any], metavar: str = "") -> Any:
    return field(default=default, metadata={"help": help, "parse": parse, "metavar": metavar})


@dataclass(frozen=True, slots=True)
class Config:
    """Settings of one wshub node. Durations in seconds, sizes in bytes."""

    # Listening
    host: str = _opt("127.0.0.1", "Address to listen on.", _host, "ADDR")
    port: int = _opt(8787, "TCP port to listen on (0 picks a free one).", _port, "PORT")

    # Heartbeat and cleanup
    heartbeat_interval: float = _opt(
        30.0,
        "Seconds between the JSON ping and protocol Ping sent to each client.",
        _duration,
        "SECONDS",
    )
    heartbeat_timeout: float | None = _opt(
        None,
        "Seconds without any frame from a client before it is closed with 1011 "
        "(default: 2 heartbeat intervals + 10 s).",
        _optional_duration,
        "SECONDS",
    )
    sweep_interval: float = _opt(
        30.0,
        "Seconds between sweeps that purge closed connections and idle rate buckets.",
        _duration,
        "SECONDS",
    )

    # Per-connection message rate
    message_rate: float = _opt(
        20.0,
        "Data frames per second each connection may send (token bucket; 0: unlimited).",
        _rate,
        "PER_SECOND",
    )
    message_burst: int = _opt(
        40,
        "Token bucket size: data frames a connection may send at once.",
        _count,
        "FRAMES",
    )
    rate_limit_refusals: int = _opt(
        10,
        "Refused frames within --rate-limit-window that close the connection with 1008 "
        "(0: never close).",
        _count,
        "FRAMES",
    )
    rate_limit_window: float = _opt(
        10.0,
        "Window in seconds for --rate-limit-refusals.",
        _duration,
        "SECONDS",
    )

    # Admission
    ip_connect_rate: float = _opt(
        20.0,
        "New connections per second per client IP; over it, 429 (0: unlimited).",
        _rate,
        "PER_SECOND",
    )
    max_connections_per_ip: int = _opt(
        200,
        "Open connections per client IP; over it, 429 (0: unlimited).",
        _count,
        "N",
    )
    max_connections: int = _opt(
        10000,
        "Open connections on this node; over it, 503 (0: unlimited).",
        _count,
        "N",
    )
    allowed_origins: tuple[str, ...] = _opt(
        (),
        "Comma-separated browser origins allowed besides the server's own host: exact "
        "origins, https://*.example.com wildcards, or * for any.",
        _origins,
        "ORIGINS",
    )
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = _opt(
        (),
        "Comma-separated addresses or networks of reverse proxies whose X-Forwarded-For "
        "is believed.",
        _networks,
        "NETWORKS",
    )
    handshake_timeout: float = _opt(
        10.0,
        "Seconds a client has to complete the HTTP upgrade before it is dropped.",
        _duration,
        "SECONDS",
    )

    # Sizes and buffers
    max_message_size: int = _opt(
        65536,
        "Largest incoming WebSocket message in bytes (after decompression); "
        "larger closes with 1009.",
        _size,
        "BYTES",
    )
    send_buffer_limit: int = _opt(
        1048576,
        "Outgoing bytes buffered for one client before it is closed with 1008 'slow consumer'.",
        _size,
        "BYTES",
    )
    send_buffer_total: int = _opt(
        268435456,
        "Outgoing bytes buffered for all clients of this node together; past it, the "
        "clients holding the most are closed with 1008 'slow consumer' until it is under "
        "again (0: no node-wide bound).",
        _count,
        "BYTES",
    )
    max_message_frames: int | None = _opt(
        None,
        "Most frames one incoming message may have; more closes with 1009 (default: "
        "--max-message-size / 16, at least 1024; 0: no limit).",
        _optional_count,
        "FRAMES",
    )
    close_timeout: float = _opt(
        5.0,
        "Seconds to wait for the client's side of a closing handshake before dropping the socket.",
        _duration,
        "SECONDS",
    )

    # Lifecycle
    drain_timeout: float = _opt(
        10.0,
        "Seconds a SIGTERM/SIGINT shutdown may take before the process exits anyway.",
        _duration,
        "SECONDS",
    )

    # Wire
    compression: str = _opt(
        "off",
        "permessage-deflate: off or on.",
        _choice("off", "on"),
        "off|on",
    )
    direct_send: str = _opt(
        "on",
        "on: a frame for many clients is sent to each idle client's socket from one C "
        "call (the compiled wshub._directsend) instead of through the event loop's transport "
        "one by one; same bytes and order, ~1.3 us less CPU per delivery. off: always through "
        "the transport. Without the compiled module this is off, with a warning at start.",
        _choice("off", "on"),
        "off|on",
    )

    # Cluster
    redis_url: str = _opt(
        "",
        "Redis (or Valkey) URL, e.g. redis://localhost:6379/0: run as one node of a "
        "cluster. Empty: one process, everything in memory.",
        _redis_url,
        "URL",
    )
    node_ttl: float = _opt(
        30.0,
        "Seconds a node's presence lease lasts in Redis; a node that stops refreshing "
        "it is reaped and its clients announced as gone within 2 x this.",
        _duration,
        "SECONDS",
    )
    cluster_name: str = _opt(
        "wshub",
        "Prefix of every Redis key and channel: clusters with different names can share one Redis.",
        _name,
        "NAME",
    )
    node_id: str = _opt(
        "",
        "This node's name in the cluster (default: random at each start).",
        _name_or_empty,
        "NAME",
    )
    workers: int = _opt(
        1,
        "Processes to run on this machine, sharing the port; more than one needs "
        "--redis-url. A worker that dies is restarted.",
        _workers,
        "N",
    )

    # Testing
    echo_endpoint: str = _opt(
        "off",
        "on: also serve /echo, which sends every message back as it came, with this "
        "node's WebSocket layer and limits (for conformance suites such as Autobahn; never "
        "in production).",
        _choice("off", "on"),
        "off|on",
    )

    # Logging
    log_level: str = _opt(
        "info",
        "debug, info, warning or error.",
        _choice("debug", "info", "warning", "error"),
        "LEVEL",
    )
    log_format: str = _opt("text", "text or json.", _choice("text", "json"), "FORMAT")

    @property
    def effective_max_message_frames(self) -> float:
        if self.max_message_frames is None:
            # A 64 KiB message in 4096 frames: 16 bytes a frame on average,
            # far below what any client library sends (Autobahn's smallest
            # fragments are 64 bytes), and 100,000 empty ones are refused.
            return max(1024, self.max_message_size // 16)
        return self.max_message_frames or math.inf

    @property
    def effective_heartbeat_timeout(self) -> float:
        if self.heartbeat_timeout is not None:
            return self.heartbeat_timeout
        return 2 * self.heartbeat_interval + 10.0


@dataclass(frozen=True, slots=True)
class Option:
    """One option as the outside world sees it."""

    attr: str
    default: Any
    help: str
    parse: Callable[[Any], Any]
    metavar: str

    @property
    def flag(self) -> str:
        return "--" + self.attr.replace("_", "-")

    @property
    def env(self) -> str:
        return "WSHUB_" + self.attr.upper()

    @property
    def toml_key(self) -> str:
        return self.attr.replace("_", "-")


OPTIONS: tuple[Option, ...] = tuple(
    Option(f.name, f.default, f.metadata["help"], f.metadata["parse"], f.metadata["metavar"])
    for f in dataclasses.fields(Config)
)
_BY_ATTR = {option.attr: option for option in OPTIONS}


def _parse(option: Option, raw: Any, source: str) -> Any:
    try:
        return option.parse(raw)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{option.flag} ({source}): invalid value {raw!r}: {exc}") from None


def read_toml(path: str) -> dict[str, Any]:
    """Read a TOML config file: keys are flag names (``heartbeat-interval``) or
    attribute names (``heartbeat_interval``), at the top level or under ``[wshub]``."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"--config: cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"--config: {path} is not valid TOML: {exc}") from None
    if isinstance(data.get("wshub"), dict):
        data = data["wshub"]
    return data


def load_config(
    flags: Mapping[str, Any],
    environ: Mapping[str, str],
    file_values: Mapping[str, Any] | None = None,
    *,
    file_name: str = "config file",
) -> Config:
    """Merge the three sources into a validated :class:`Config`.

    Args:
        flags: attribute name -> raw string, only for flags actually given.
        environ: the process environment (only ``WSHUB_*`` keys are read).
        file_values: the parsed TOML file, if any.
    """
    values: dict[str, Any] = {}
    for key, raw in (file_values or {}).items():
        option = _BY_ATTR.get(str(key).replace("-", "_"))
        if option is None:
            raise ConfigError(f"{file_name}: unknown option {key!r}")
        values[option.attr] = _parse(option, raw, file_name)
    for option in OPTIONS:
        if option.env in environ:
            values[option.attr] = _parse(option, environ[option.env], option.env)
    for attr, raw in flags.items():
        option = _BY_ATTR[attr]
        values[attr] = _parse(option, raw, "flag")
    config = Config(**values)
    _check_together(config)
    return config


def _check_together(config: Config) -> None:
    if config.workers > 1 and not config.redis_url:
        raise ConfigError(
            f"--workers: {config.workers} workers need --redis-url (workers share one hub "
            "through Redis; without it each would be a separate hub)"
        )
    if config.message_rate > 0 and config.message_burst < 1:
        raise ConfigError("--message-burst: must be at least 1 while --message-rate is set")
    if config.effective_heartbeat_timeout <= config.heartbeat_interval:
        raise ConfigError(
            "--heartbeat-timeout: must be longer than --heartbeat-interval "
            f"({config.effective_heartbeat_timeout} <= {config.heartbeat_interval})"
        )


def option_reference() -> str:
    """The options as a Markdown table (docs/configuration.md is generated from it)."""
    lines = [
        "| flag | environment | default | meaning |",
        "| --- | --- | --- | --- |",
    ]
    for option in OPTIONS:
        default = option.default
        if isinstance(default, tuple):
            default = ",".join(map(str, default)) or "(none)"
        elif default is None:
            default = "(derived)"
        lines.append(f"| `{option.flag}` | `{option.env}` | `{default}` | {option.help} |")
    return "\n".join(lines) + "\n"
