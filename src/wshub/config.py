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
from urllib.parse import urlsplit

from .api import key_problem
from .errors import WshubError

__all__ = [
    "REDIS_SENTINEL_SCHEME",
    "Config",
    "ConfigError",
    "OPTIONS",
    "Option",
    "load_config",
    "option_reference",
    "split_host_port",
]


REDIS_SENTINEL_SCHEME = "redis+sentinel://"
"""How :attr:`Config.redis_target` spells the sentinels and the primary's name."""


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


def _prefix(bits: int) -> Callable[[Any], int]:
    def parse(raw: Any) -> int:
        value = _count(raw)
        if not 1 <= value <= bits:
            raise ValueError(f"expected a prefix length between 1 and {bits}")
        return value

    return parse


def _server_names(raw: Any) -> tuple[str, ...]:
    names = []
    for item in _items(raw):
        item = item.lower()
        if "/" in item or "@" in item or item.startswith(":"):
            raise ValueError(f"{item!r} is not a host name (host or host:port, no scheme)")
        names.append(item)
    return tuple(names)


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


def _path(raw: Any) -> str:
    return str(raw).strip()


def _redis_url(raw: Any) -> str:
    value = str(raw).strip()
    cluster = ("redis+cluster://", "rediss+cluster://")
    if value and not value.startswith(("redis://", "rediss://", "unix://", *cluster)):
        raise ValueError(
            "expected redis://HOST:PORT[/DB], rediss://..., unix://PATH or "
            "redis+cluster://HOST:PORT[,HOST:PORT...] (a Redis Cluster)"
        )
    if value.startswith(cluster):
        seeds = value.partition("://")[2].rpartition("@")[2].split("/", 1)[0]
        if not all(item.strip() for item in seeds.split(",")):
            raise ValueError("a Redis Cluster URL needs HOST:PORT seed nodes")
        for seed in seeds.split(","):
            port = urlsplit(f"//{seed.strip()}").port  # ValueError: out of range, not a number
            if port == 0:
                raise ValueError(f"a seed node needs a port other than 0: {seed.strip()!r}")
    elif value:
        redis_url_options(value)
    return value


def redis_url_options(url: str) -> dict[str, Any]:
    """What redis-py makes of a ``redis://``, ``rediss://`` or ``unix://`` URL;
    ValueError for what it would refuse only when connecting (a port out of
    range) and for a database that is not a number, which it would silently
    take as database 0."""
    from redis.connection import parse_url

    options: dict[str, Any] = parse_url(url)  # type: ignore[no-untyped-call]
    if not url.startswith("unix://"):
        database = urlsplit(url).path.strip("/")
        if database and not database.isdigit():
            raise ValueError(f"the database is a number (redis://HOST:PORT/DB), not {database!r}")
    return options


def _host_ports(raw: Any) -> tuple[str, ...]:
    items = _items(raw)
    for item in items:
        try:
            split_host_port(item)
        except ValueError as exc:
            raise ValueError(f"{item!r}: {exc}") from None
    return tuple(items)


def _name(raw: Any) -> str:
    value = str(raw).strip()
    if not value or not all(c.isalnum() or c in "-_." for c in value):
        raise ValueError("expected letters, digits, '-', '_' or '.'")
    return value


def _name_or_empty(raw: Any) -> str:
    return "" if str(raw).strip() == "" else _name(raw)


def _api_keys(raw: Any) -> tuple[str, ...]:
    keys = _items(raw)
    for key in keys:
        problem = key_problem(key)
        if problem is not None:
            raise ValueError(problem)  # never the key itself: the message is printed
    return tuple(keys)


def _path_or_empty(raw: Any) -> str:
    return str(raw).strip()


def split_host_port(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[ADDR]:PORT`` for IPv6) as ``(host, port)``; ValueError if not."""
    host, sep, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if not host:
            raise ValueError("expected HOST:PORT, e.g. 127.0.0.1:8788 or [::1]:8788")
    elif ":" in host:
        raise ValueError("an IPv6 address goes in brackets: [::1]:8788")
    if not sep or not host or not (port.isascii() and port.isdigit()):
        raise ValueError("expected HOST:PORT, e.g. 127.0.0.1:8788 or [::1]:8788")
    if int(port) > 65535:
        raise ValueError("expected a port between 0 and 65535")
    return host, int(port)


def _listen_address(raw: Any) -> str:
    value = str(raw).strip()
    if value:
        split_host_port(value)
    return value


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


def _text(raw: Any) -> str:
    return str(raw).strip()


def _secret(raw: Any) -> str:
    # Not stripped: white space at either end of a secret is part of it.
    return str(raw)


def _opt(
    default: Any,
    help: str,
    parse: Callable[[Any], Any],
    metavar: str = "",
    *,
    secret: bool = False,
) -> Any:
    """A :class:`Config` field. A *secret* one is left out of the repr and of
    error messages, which are printed and logged."""
    return field(
        default=default,
        repr=not secret,
        metadata={"help": help, "parse": parse, "metavar": metavar, "secret": secret},
    )


@dataclass(frozen=True, slots=True)
class Config:
    """Settings of one wshub node. Durations in seconds, sizes in bytes."""

    # Listening
    host: str = _opt("127.0.0.1", "Address to listen on.", _host, "ADDR")
    port: int = _opt(8787, "TCP port to listen on (0 picks a free one).", _port, "PORT")
    tls_cert: str = _opt(
        "",
        "PEM certificate chain (leaf first): serve wss:// and https:// on --port instead of "
        "ws:// and http:// (TLS 1.2 or later). Needs --tls-key. Read again on SIGHUP.",
        _path,
        "FILE",
    )
    tls_key: str = _opt(
        "",
        "PEM private key of --tls-cert (unencrypted). Read again on SIGHUP.",
        _path,
        "FILE",
    )

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
        "Frames per second each connection may send: every data frame, continuations and"
        " control frames included (token bucket; 0: unlimited).",
        _rate,
        "PER_SECOND",
    )
    message_burst: int = _opt(
        40,
        "Token bucket size: frames a connection may send at once.",
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
    max_rooms: int = _opt(
        10000,
        "Rooms with members on this node, the default room not counted; a connection "
        "that would open one more gets 503 (0: unlimited).",
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
    # Signed connect tokens (decisions.md 15; docs/auth.md)
    auth: str = _opt(
        "off",
        "off: anonymous connections, as the seed has them. optional: a connection without a "
        "token is anonymous, one with a token must pass. required: every connection needs a "
        "valid JWT; a refused one gets an error and close 4401.",
        _choice("off", "optional", "required"),
        "off|optional|required",
    )
    auth_secret: str = _opt(
        "",
        "HS256 secret that tokens are signed with (prefer the environment variable: a flag "
        "shows in the process list). Not together with --auth-public-key.",
        _secret,
        "SECRET",
        secret=True,
    )
    auth_public_key: str = _opt(
        "",
        "PEM file of the public key tokens are verified with; its type pins the algorithm: "
        "RSA (2048 bits or more) RS256, EC P-256 ES256, Ed25519 EdDSA.",
        _text,
        "FILE",
    )
    auth_audience: str = _opt(
        "",
        "The aud a token must carry. Empty: a token that carries an aud is refused.",
        _text,
        "AUDIENCE",
    )
    auth_issuer: str = _opt("", "The iss a token must carry (empty: not checked).", _text, "ISSUER")
    auth_query_token: str = _opt(
        "off",
        "on: also accept the token as ?token= in the URL (URLs end up in logs and browser "
        "history; the subprotocol or Authorization header is better).",
        _choice("off", "on"),
        "off|on",
    )
    max_connections_per_user: int = _opt(
        0,
        "Open connections per token sub across the cluster; one more gets close 4429 "
        "(0: unlimited).",
        _count,
        "N",
    )
    trusted_proxies: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = _opt(
        (),
        "Comma-separated addresses or networks of reverse proxies whose X-Forwarded-For "
        "is believed.",
        _networks,
        "NETWORKS",
    )
    # The five options below: issue 19 (per-IP keys, pre-upgrade caps, Origin).
    ipv4_prefix: int = _opt(
        32,
        "Per-IP limits count IPv4 clients by this network prefix (32: each address).",
        _prefix(32),
        "BITS",
    )
    ipv6_prefix: int = _opt(
        64,
        "Per-IP limits count IPv6 clients by this network prefix (64: a subscriber's "
        "usual allocation; 128: each address).",
        _prefix(128),
        "BITS",
    )
    max_handshakes: int | None = _opt(
        None,
        "Sockets on this node that have not finished the upgrade; past it new sockets are "
        "answered 503 at accept (default: --max-connections plus a tenth, so that a storm "
        "of --max-connections upgrades leaves room for health checks; 0: unlimited).",
        _optional_count,
        "N",
    )
    max_handshakes_per_ip: int | None = _opt(
        None,
        "Sockets per client IP (the socket peer; trusted proxies exempt) that have not "
        "finished the upgrade (with TLS: from the TCP accept on, the TLS handshake too); "
        "past it 429 at accept, or closed at once before TLS (default: "
        "--max-connections-per-ip; 0: unlimited).",
        _optional_count,
        "N",
    )
    server_names: tuple[str, ...] = _opt(
        (),
        "Comma-separated host[:port] names this server is reached at. Set: the same-host "
        "Origin rule accepts only these (a foreign Host header, as under DNS rebinding, no "
        "longer matches). Empty: an Origin matching the Host header passes.",
        _server_names,
        "HOSTS",
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

    # History and recovery (decisions.md 13)
    history_size: int = _opt(
        100,
        "Messages and broadcasts kept per room for recovery (?since=) and ?history=; "
        "0 turns history, offsets and recovery off.",
        _count,
        "N",
    )
    history_ttl: float = _opt(
        120.0,
        "Seconds a message is kept in its room's history.",
        _duration,
        "SECONDS",
    )
    history_epoch_ttl: float = _opt(
        3600.0,
        "Seconds a room's epoch and last offset outlive the room's last member and its "
        "last message or join, so that a client that left can still come back with "
        "since (recovered, nothing missed) until then; a room with members keeps its "
        "epoch (in a cluster each node refreshes the Redis key of the rooms it has "
        "members in every third of this). Never less than --history-ttl.",
        _duration,
        "SECONDS",
    )
    history_memory: int = _opt(
        67108864,
        "Bytes of history this node keeps for all rooms together; past it the oldest "
        "entries go first (a Redis history is bounded by Redis' own maxmemory).",
        _size,
        "BYTES",
    )

    # Lifecycle
    drain_timeout: float = _opt(
        10.0,
        "Seconds a SIGTERM/SIGINT shutdown may take before the process exits anyway.",
        _duration,
        "SECONDS",
    )

    # Backend API (docs/api.md)
    api_keys: tuple[str, ...] = _opt(
        (),
        "Comma-separated keys that open the backend API under /api/ (Authorization: Bearer "
        "KEY); several allow rotation. No key: the API is off. A flag is visible in the "
        "process list: prefer the environment or --api-keys-file.",
        _api_keys,
        "KEYS",
        secret=True,
    )
    api_keys_file: str = _opt(
        "",
        "File of API keys, one per line (blank lines and # comments ignored), read again "
        "on SIGHUP; used together with --api-keys.",
        _path_or_empty,
        "FILE",
    )
    api_listen: str = _opt(
        "",
        "Serve the API on this address of its own (HOST:PORT, [ADDR]:PORT for IPv6; a "
        "private address is best) instead of under /api/ on the public port, which then "
        "answers 404 there.",
        _listen_address,
        "HOST:PORT",
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
    io_uring: str = _opt(
        "auto",
        "auto: with --direct-send on, the sends of a run of up to 64 clients go to the "
        "kernel in one io_uring_enter instead of one send(2) each (~10 % less server CPU "
        "per delivery in fan-out; same bytes, order and error handling), where the kernel "
        "offers io_uring (Linux 5.6+, not disabled, not blocked by seccomp), else send(2) "
        "without a word; /stats and /metrics say which. off: always send(2).",
        _choice("auto", "off"),
        "auto|off",
    )

    # Cluster
    redis_url: str = _opt(
        "",
        "Redis (or Valkey) URL, e.g. redis://localhost:6379/0: run as one node of a "
        "cluster. redis+cluster://HOST:PORT[,HOST:PORT...] (rediss+cluster:// for TLS): "
        "a Redis Cluster (Redis 7), given by seed nodes; rooms spread over its shards "
        "with sharded pub/sub. Empty: one process, everything in memory.",
        _redis_url,
        "URL",
    )
    redis_sentinels: tuple[str, ...] = _opt(
        (),
        "Redis Sentinel addresses (HOST:PORT,HOST:PORT,...) instead of --redis-url: every "
        "Redis connection goes to the primary they name for --redis-master, and after an "
        "error to whichever primary they name then (a failover).",
        _host_ports,
        "HOST:PORT,...",
    )
    redis_master: str = _opt(
        "",
        "With --redis-sentinels: the name the sentinels monitor the primary under "
        "(their `sentinel monitor NAME ...`).",
        _name_or_empty,
        "NAME",
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
        "Prefix of every Redis key and channel (NAME@dbN on a --redis-url database N "
        "other than 0): clusters with different names, or on different databases, can "
        "share one Redis.",
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
    def redis_target(self) -> str:
        """Where this node's Redis connections go (see backplane/redisconn.py):
        ``--redis-url``, or the sentinels and primary name as one target;
        empty without a cluster."""
        if self.redis_sentinels:
            return REDIS_SENTINEL_SCHEME + ",".join(self.redis_sentinels) + "/" + self.redis_master
        return self.redis_url

    @property
    def redis_prefix(self) -> str:
        """The prefix of every Redis key and channel: ``--cluster-name``, and
        the database of ``--redis-url`` when it is not 0. Redis keeps keys per
        database but pub/sub channels for the whole server, so two clusters of
        one name on databases 1 and 2 would otherwise hear each other's rooms.
        (A cluster name holds no ``@``, so no other cluster has this prefix.)"""
        url = self.redis_url
        if self.redis_sentinels or not url or url.startswith(("redis+", "rediss+")):
            return self.cluster_name
        database = int(redis_url_options(url).get("db") or 0)
        return f"{self.cluster_name}@db{database}" if database else self.cluster_name

    @property
    def api_listen_address(self) -> tuple[str, int] | None:
        """``--api-listen`` as ``(host, port)``, or None to serve the API on the public port."""
        return split_host_port(self.api_listen) if self.api_listen else None

    @property
    def effective_max_handshakes(self) -> int:
        if self.max_handshakes is not None:
            return self.max_handshakes
        # A tenth over the node's connections: a storm of --max-connections
        # sockets all upgrading at once (decisions.md 18) must not fill the
        # cap, or /healthz, refused at accept before its path is read, is 503.
        return self.max_connections + self.max_connections // 10

    @property
    def effective_max_handshakes_per_ip(self) -> int:
        if self.max_handshakes_per_ip is not None:
            return self.max_handshakes_per_ip
        return self.max_connections_per_ip

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
    secret: bool = False
    """The value is a secret: never printed."""

    @property
    def flag(self) -> str:
        return "--" + self.attr.replace("_", "-")

    @property
    def env(self) -> str:
        return "WSHUB_" + self.attr.upper()


OPTIONS: tuple[Option, ...] = tuple(
    Option(
        f.name,
        f.default,
        f.metadata["help"],
        f.metadata["parse"],
        f.metadata["metavar"],
        f.metadata["secret"],
    )
    for f in dataclasses.fields(Config)
)
_BY_ATTR = {option.attr: option for option in OPTIONS}


def _parse(option: Option, raw: Any, source: str) -> Any:
    try:
        return option.parse(raw)
    except (ValueError, TypeError) as exc:
        shown = "" if option.secret else f" {raw!r}"
        raise ConfigError(f"{option.flag} ({source}): invalid value{shown}: {exc}") from None


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
    if config.redis_sentinels and config.redis_url:
        raise ConfigError(
            "--redis-sentinels and --redis-url: give one of them (the sentinels name the "
            "primary to connect to)"
        )
    if config.redis_sentinels and not config.redis_master:
        raise ConfigError(
            "--redis-sentinels: needs --redis-master NAME too (the name the sentinels "
            "monitor the primary under)"
        )
    if config.redis_master and not config.redis_sentinels:
        raise ConfigError("--redis-master: only means something with --redis-sentinels")
    if config.workers > 1 and not config.redis_target:
        raise ConfigError(
            f"--workers: {config.workers} workers need --redis-url or --redis-sentinels "
            "(workers share one hub through Redis; without it each would be a separate hub)"
        )
    if bool(config.tls_cert) != bool(config.tls_key):
        given, missing = ("--tls-cert", "--tls-key")
        if not config.tls_cert:
            given, missing = missing, given
        raise ConfigError(f"{missing}: {given} needs {missing} too (TLS takes both or neither)")
    if config.message_rate > 0 and config.message_burst < 1:
        raise ConfigError("--message-burst: must be at least 1 while --message-rate is set")
    if config.api_listen and not (config.api_keys or config.api_keys_file):
        raise ConfigError(
            "--api-listen: the API is off without --api-keys or --api-keys-file, so there "
            "would be nothing to serve there"
        )
    api_address = config.api_listen_address
    if (
        api_address is not None
        and api_address[1] != 0
        and api_address
        == (
            config.host,
            config.port,
        )
    ):
        raise ConfigError("--api-listen: must differ from --host and --port")
    if config.auth_secret and config.auth_public_key:
        raise ConfigError("--auth-secret and --auth-public-key: give one of them, not both")
    if config.auth != "off" and not (config.auth_secret or config.auth_public_key):
        raise ConfigError(
            f"--auth: {config.auth} needs --auth-secret (HS256) or --auth-public-key FILE"
        )
    if config.max_connections_per_user and config.auth == "off":
        raise ConfigError(
            "--max-connections-per-user: counts connections by token sub, so it needs "
            "--auth optional or required"
        )
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
