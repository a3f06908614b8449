"""The wshub message protocol, without sockets or clocks.

Client side: :func:`parse_client_text` turns the text of one WebSocket text
message into a :data:`Command` (valid once constructed) or a :class:`Refusal`
(an ``error`` reply that leaves the connection open). The rules are those of
decisions.md sections 4 and 5:

* a JSON **object** is a protocol message, dispatched on its ``type``;
* anything else (invalid JSON, or JSON that is not an object) is plain text,
  relayed as the ``content`` of a ``message`` after the content checks;
* nothing a client sends can make parsing raise.

Server side: the ``encode_*`` functions build the UTF-8 JSON payload of each
server message once; the fan-out frames and writes those bytes unchanged for
every recipient. Time is passed in as Unix seconds (``now``).
"""

from __future__ import annotations

import enum
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Final, NamedTuple, cast

from .ids import ConnectionId

__all__ = [
    "MAX_CONTENT_CHARS",
    "Command",
    "ErrorCode",
    "PingRequest",
    "PongReceived",
    "RefreshRequest",
    "Refusal",
    "Relay",
    "RelayKind",
    "UserInfoRequest",
    "check_content",
    "encode_error",
    "encode_ping",
    "encode_pong",
    "encode_refreshed",
    "encode_plain_relay",
    "encode_relay",
    "encode_user_info_response",
    "encode_user_joined",
    "encode_user_left",
    "encode_welcome",
    "iso_timestamp",
    "plain_relay_head",
    "plain_relay_tail",
    "replayed",
    "with_offset",
    "parse_client_text",
    "unix_ms",
]

MAX_CONTENT_CHARS: Final = 1000
"""Longest content in Unicode code points (``len()`` of a ``str``)."""


class ErrorCode(enum.StrEnum):
    """The machine-readable ``code`` of an ``error`` message."""

    EMPTY_CONTENT = "empty_content"
    CONTENT_TOO_LONG = "content_too_long"
    UNKNOWN_TYPE = "unknown_type"
    MISSING_TYPE = "missing_type"
    INVALID_CONTENT = "invalid_content"
    BINARY_NOT_SUPPORTED = "binary_not_supported"
    RATE_LIMITED = "rate_limited"
    # Signed connect tokens (decisions.md 15 and 19).
    UNAUTHORIZED = "unauthorized"
    TOKEN_EXPIRED = "token_expired"
    FORBIDDEN_ROOM = "forbidden_room"
    TOO_MANY_CONNECTIONS = "too_many_connections"


class RelayKind(enum.StrEnum):
    MESSAGE = "message"
    """To every open connection except the sender."""
    BROADCAST = "broadcast"
    """To every open connection, the sender included."""


class Relay(NamedTuple):
    """A validated ``message`` or ``broadcast`` (or plain text, as a message).

    A named tuple, not a frozen dataclass: one is made per message, and a
    frozen dataclass costs three times as much to build.
    """

    kind: RelayKind
    content: str


# Relay(kind, content) without the named tuple's Python-level constructor
# (the same object, built in C; one per relayed message).
_new_relay = cast("Callable[[tuple[RelayKind, str]], Relay]", partial(tuple.__new__, Relay))


@dataclass(frozen=True, slots=True)
class PingRequest:
    """``{"type":"ping"}``: answer with ``pong``."""


@dataclass(frozen=True, slots=True)
class PongReceived:
    """``{"type":"pong"}``: a sign of life, accepted silently."""


@dataclass(frozen=True, slots=True)
class UserInfoRequest:
    """``{"type":"user_info"}``: answer with ``user_info_response``."""


@dataclass(frozen=True, slots=True)
class RefreshRequest:
    """``{"type":"refresh","token":"..."}``: replace the connection's token before it expires."""

    token: str


Command = Relay | PingRequest | PongReceived | UserInfoRequest | RefreshRequest


@dataclass(frozen=True, slots=True)
class Refusal:
    """A frame refused with an ``error`` reply; the connection stays open."""

    code: ErrorCode
    message: str


PING: Final = PingRequest()
PONG: Final = PongReceived()
USER_INFO: Final = UserInfoRequest()

_SIMPLE_COMMANDS: Final[dict[str, Command]] = {
    "ping": PING,
    "pong": PONG,
    "user_info": USER_INFO,
}

# The longest type name echoed back in an unknown_type error: a client must
# not be able to make the server write its own payload back at length.
_MAX_ECHOED_TYPE: Final = 64


def _refuse_constant(name: str) -> object:
    # json.loads accepts NaN, Infinity and -Infinity by default; they are not
    # JSON (decisions.md 4.4), so such a frame is plain text.
    raise ValueError(f"{name} is not JSON")


_decoder = json.JSONDecoder(parse_constant=_refuse_constant)
# The C scanner that JSONDecoder.__init__ sets (typeshed does not declare it).
_scan_once: Callable[[str, int], tuple[Any, int]] = vars(_decoder)["scan_once"]
_JSON_WS: Final = " \t\n\r"


def _json_object(text: str) -> dict[str, object] | None:
    """The JSON object in *text*, or None when *text* is anything else.

    Whatever the parser refuses (bad syntax, a byte order mark, nesting too
    deep for the recursion limit, an integer past Python's digit limit) is not
    an object, by decisions.md 4.4.
    """
    # A JSON object starts with "{" after optional white space. The C
    # scanner is called directly: JSONDecoder.decode() adds two regular
    # expression matches for the white space around the value.
    start = 0
    if not text.startswith("{"):
        start = len(text) - len(text.lstrip(_JSON_WS))
        if not text.startswith("{", start):
            return None
    try:
        value, end = _scan_once(text, start)
    except (StopIteration, ValueError, RecursionError):
        return None
    if end != len(text) and text[end:].strip(_JSON_WS):
        return None  # something after the value
    return value if isinstance(value, dict) else None


def _check_content(kind: RelayKind, content: str, escaped: bool) -> Relay | Refusal:
    if not content.strip():
        return Refusal(ErrorCode.EMPTY_CONTENT, "Message content cannot be empty")
    if len(content) > MAX_CONTENT_CHARS:
        return Refusal(
            ErrorCode.CONTENT_TOO_LONG,
            f"Message too long: {len(content)} characters, the limit is {MAX_CONTENT_CHARS}",
        )
    if escaped:
        # Only a JSON escape (\uD800) can give a lone UTF-16 surrogate: text
        # that arrived as UTF-8 can't hold one.
        try:
            content.encode("utf-8")
        except UnicodeEncodeError:
            return Refusal(
                ErrorCode.INVALID_CONTENT,
                "Message content holds a lone surrogate, which is not a character",
            )
    return _new_relay((kind, content))


def check_content(kind: RelayKind, content: str) -> Relay | Refusal:
    """The checks of decisions.md 5 on *content* from any source (the backend
    API's publications too), where it may hold lone surrogates."""
    return _check_content(kind, content, True)


_RELAY_KINDS: Final = {kind.value: kind for kind in RelayKind}


# The plain relay as every client library writes it, tested before any JSON
# parse: ``{"type":"message","content":"..."}`` (or ``broadcast``) with
# nothing before, between or after. Its content is read by the JSON
# decoder's own C string scanner (strict: control characters refused,
# escapes decoded), so it is the string the full parse would give; the
# object has exactly these two members, so the outcome is the full path's,
# refusals included. Anything else (white space, other members or their
# order, a string the scanner refuses) takes the full path below.
_PLAIN_HEADS: Final = (
    ('{"type":"message","content":"', RelayKind.MESSAGE),
    ('{"type":"broadcast","content":"', RelayKind.BROADCAST),
)
_scanstring: Callable[[str, int, bool], tuple[str, int]] = json.decoder.scanstring  # type: ignore[attr-defined]


def _plain_relay(text: str) -> Relay | Refusal | None:
    for head, kind in _PLAIN_HEADS:  # noqa: B007 (kind: the one whose head matched)
        if text.startswith(head):
            break
    else:
        return None
    if not text.endswith('"}'):
        return None
    try:
        content, end = _scanstring(text, len(head), True)
    except ValueError:
        return None
    if end != len(text) - 1:
        return None  # something after the string but the closing brace
    return _check_content(kind, content, "\\u" in text)


def parse_client_text(text: str, *, refresh: bool = False) -> Command | Refusal:
    """Interpret the text of one client text message (decisions.md 4 and 5).

    *refresh*: ``{"type":"refresh"}`` is a command (``--auth`` optional or
    required, decisions.md 15); otherwise it is an unknown type, as the seed has it.
    """
    if text.startswith('{"type":"'):
        relay = _plain_relay(text)
        if relay is not None:
            return relay
    return _parse_full(text, refresh)


def _parse_full(text: str, refresh: bool) -> Command | Refusal:
    """:func:`parse_client_text` without the plain relay's shortcut."""
    obj = _json_object(text)
    if obj is None:
        return _check_content(RelayKind.MESSAGE, text, False)
    kind = obj.get("type")
    if not isinstance(kind, str):
        return Refusal(ErrorCode.MISSING_TYPE, "Message needs a string field 'type'")
    relay = _RELAY_KINDS.get(kind)
    if relay is not None:
        content = obj.get("content")
        if not isinstance(content, str):
            return Refusal(ErrorCode.INVALID_CONTENT, "Field 'content' must be a string")
        return _check_content(relay, content, "\\u" in text)
    command = _SIMPLE_COMMANDS.get(kind)
    if command is not None:
        return command
    if refresh and kind == "refresh":
        return _parse_refresh(obj)
    shown = kind[:_MAX_ECHOED_TYPE].encode("utf-8", "replace").decode("utf-8")
    return Refusal(ErrorCode.UNKNOWN_TYPE, f"Unknown message type: {shown!r}")


def _parse_refresh(obj: dict[str, object]) -> RefreshRequest | Refusal:
    # A refused refresh is an "unauthorized" error that changes nothing
    # (decisions.md 19), a malformed one included.
    token = obj.get("token")
    if not isinstance(token, str) or not token:
        return Refusal(ErrorCode.UNAUTHORIZED, "Field 'token' must be a non-empty string")
    return RefreshRequest(token)


# -- Server messages ---------------------------------------------------------


def unix_ms(now: float) -> int:
    return int(now * 1000)


_second_cache: list[object] = [None, ""]  # [unix second, its "%Y-%m-%dT%H:%M:%S"]
_milli_cache: list[object] = [None, ""]  # [unix millisecond, its whole timestamp]


def iso_timestamp(now: float) -> str:
    """ISO 8601 in UTC with milliseconds and ``Z``: ``2026-11-25T20:17:58.123Z``."""
    ms = int(now * 1000)  # unix_ms(), inlined
    # Messages come in bursts: the 32 of one read share their millisecond,
    # and the string built for the first serves the others.
    if _milli_cache[0] == ms:
        return _milli_cache[1]  # type: ignore[return-value]
    seconds, millis = divmod(ms, 1000)
    # strftime costs microseconds; messages come in bursts within one second.
    if _second_cache[0] != seconds:
        _second_cache[0] = seconds
        _second_cache[1] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    stamp = f"{_second_cache[1]}.{millis:03d}Z"
    _milli_cache[0] = ms
    _milli_cache[1] = stamp
    return stamp


_escape_string = json.encoder.encode_basestring  # C, non-ASCII kept as is
_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode


def _payload(obj: dict[str, object]) -> bytes:
    return _dumps(obj).encode("utf-8")


def encode_welcome(
    connection_id: ConnectionId,
    connection_count: int,
    now: float,
    room: str = "",
    *,
    epoch: str | None = None,
    offset: int | None = None,
    recovered: bool | None = None,
    missed: int | None = None,
    user_id: str | None = None,
) -> bytes:
    """``welcome``, naming the *room* (``""``: the default room); with
    history on it names the room's ``epoch`` and last ``offset``, and after a
    ``since`` request whether it was ``recovered`` and how many frames were
    ``missed`` (decisions.md 13 and 19)."""
    welcome: dict[str, object] = {
        "type": "welcome",
        "connectionId": connection_id,
        "timestamp": iso_timestamp(now),
        "connectionCount": connection_count,
        "room": room,
    }
    if epoch is not None:
        welcome["epoch"] = epoch
    if offset is not None:
        welcome["offset"] = offset
    if recovered is not None:
        welcome["recovered"] = recovered
    if missed is not None:
        welcome["missed"] = missed
    if user_id is not None:
        welcome["userId"] = user_id
    return _payload(welcome)


def encode_user_joined(
    connection_id: ConnectionId, total_users: int, now: float, *, user_id: str | None = None
) -> bytes:
    event: dict[str, object] = {
        "type": "user_joined",
        "connectionId": connection_id,
        "timestamp": iso_timestamp(now),
        "totalUsers": total_users,
    }
    if user_id is not None:  # an authenticated member (decisions.md 15)
        event["userId"] = user_id
    return _payload(event)


def encode_user_left(
    connection_id: ConnectionId, total_users: int, now: float, *, user_id: str | None = None
) -> bytes:
    event: dict[str, object] = {
        "type": "user_left",
        "connectionId": connection_id,
        "timestamp": iso_timestamp(now),
        "totalUsers": total_users,
    }
    if user_id is not None:
        event["userId"] = user_id
    return _payload(event)


_RELAY_HEADS: Final = {kind: f'{{"type":"{kind.value}","connectionId":"' for kind in RelayKind}


def encode_relay(
    kind: RelayKind, sender: ConnectionId, content: str, now: float, offset: int | None = None
) -> bytes:
    # The hot path: built by hand around the C string escaper, the same bytes
    # as _payload() would give (the sender needs no escaping: a connection id is
    # [a-z0-9-], an API sender name [A-Za-z0-9._-]).
    # Measured (bench/history_cost.py): the offset=None branch costs nothing
    # against the function without it (883 vs 887 ns); with one, ~120 ns more.
    if offset is None:
        return (
            f'{_RELAY_HEADS[kind]}{sender}","content":'
            f'{_escape_string(content)},"timestamp":"{iso_timestamp(now)}"}}'
        ).encode()
    return (
        f'{_RELAY_HEADS[kind]}{sender}","content":'
        f'{_escape_string(content)},"timestamp":"{iso_timestamp(now)}","offset":{offset}}}'
    ).encode()


_RELAY_HEADS_BYTES: Final = {kind: head.encode() for kind, head in _RELAY_HEADS.items()}


def encode_plain_relay(
    kind: RelayKind,
    sender: ConnectionId,
    content: bytes,
    now: float,
    offset: int | None = None,
    user_id: str | None = None,
) -> bytes:
    """:func:`encode_relay` (or, with *user_id*, :func:`encode_relay_from_user`)
    of a content that is bytes already JSON-escaped as ``_escape_string``
    writes it, without the quotes (what wshub._ingest gives): the same
    bytes, with one format and no str."""
    head = plain_relay_head(kind, sender, user_id)
    if offset is None:
        return b"%b%b%b}" % (head, content, plain_relay_tail(now))
    return b'%b%b%b,"offset":%d}' % (head, content, plain_relay_tail(now), offset)


def plain_relay_head(kind: RelayKind, sender: ConnectionId, user_id: str | None) -> bytes:
    """What comes before the content in :func:`encode_plain_relay` (and in
    ``wshub._ingest.stamp``, which writes a read's relays at once)."""
    head = _RELAY_HEADS_BYTES[kind] + sender.encode()
    if user_id is not None:
        return b'%b","userId":%b,"content":"' % (head, _escape_string(user_id).encode())
    return head + b'","content":"'


def plain_relay_tail(now: float) -> bytes:
    """What follows the content in :func:`encode_plain_relay`, before the
    offset: the closing quote and the timestamp field."""
    return b'","timestamp":"%b"' % iso_timestamp(now).encode()


def encode_relay_from_user(
    kind: RelayKind,
    sender: ConnectionId,
    user_id: str,
    content: str,
    now: float,
    offset: int | None = None,
) -> bytes:
    """A relay from an authenticated sender: ``userId`` after ``connectionId``
    (decisions.md 15), ``offset`` last as in :func:`encode_relay`. Its own
    function so the anonymous hot path above has no extra branch; the sub is
    escaped, unlike the connection id."""
    head = (
        f'{_RELAY_HEADS[kind]}{sender}","userId":{_escape_string(user_id)},"content":'
        f'{_escape_string(content)},"timestamp":"{iso_timestamp(now)}"'
    )
    if offset is None:
        return f"{head}}}".encode()
    return f'{head},"offset":{offset}}}'.encode()


def with_offset(payload: bytes, offset: int) -> bytes:
    """*payload* (a relay without offset) with ``"offset"`` added last: the
    bytes ``encode_relay(..., offset=offset)`` gives. The Redis history's
    script does the same splice in Lua, where the offset is assigned."""
    return b'%b,"offset":%d}' % (payload[:-1], offset)


def replayed(payload: bytes) -> bytes:
    """A stored relay as replayed on recovery: as first sent plus
    ``"replayed":true``, spliced before the closing brace (every server
    payload is one JSON object, so it ends with ``}``) without decoding it."""
    return payload[:-1] + b',"replayed":true}'


def encode_ping(now: float) -> bytes:
    return _payload({"type": "ping", "timestamp": unix_ms(now)})


def encode_pong(now: float) -> bytes:
    return _payload({"type": "pong", "timestamp": unix_ms(now)})


def encode_user_info_response(
    connection_id: ConnectionId, connection_count: int, now: float, room: str = ""
) -> bytes:
    return _payload(
        {
            "type": "user_info_response",
            "connectionId": connection_id,
            "connectionCount": connection_count,
            "timestamp": iso_timestamp(now),
            "room": room,
        }
    )


def encode_error(refusal: Refusal) -> bytes:
    return _payload({"type": "error", "message": refusal.message, "code": refusal.code.value})


def encode_refreshed(expires_at: float) -> bytes:
    """``{"type":"refreshed","expiresAt":ISO}``: the new token's ``exp``.

    Not :func:`iso_timestamp`: its one-second cache serves the hot path's
    "now", and a time hours away would only evict it.
    """
    seconds, millis = divmod(int(expires_at * 1000), 1000)
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
    return _payload({"type": "refreshed", "expiresAt": f"{stamp}.{millis:03d}Z"})
