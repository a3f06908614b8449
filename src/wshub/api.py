"""The backend API (decisions.md 14 and 19), without sockets or clocks.

A backend (a dashboard's feeder, a game server) talks to the hub over plain
HTTP under ``/api/``: ``POST /api/publish``, ``GET /api/rooms``,
``GET /api/rooms/{room}`` and ``POST /api/disconnect``, each carrying
``Authorization: Bearer KEY``. This module decides everything about such a
request that does not need the hub; the route endpoint that serves it does
the I/O and asks the hub.

Theory of operation, in the order an endpoint calls it:

1. :func:`check_head` on the request head, before any of the body is read:
   the API off (no key configured) is ``404`` for every ``/api/`` path; then a
   missing or wrong key ``401``; then an unknown path ``404``, a wrong method
   ``405``, and a body whose framing is malformed ``400`` or announced over
   :data:`MAX_BODY_SIZE` ``413``. The key is checked first so that a caller
   without one learns nothing, not even which paths exist.
2. The body, for a ``POST``: ``head.reader()`` is an incremental
   :class:`wshub.http.BodyReader` (write :data:`wshub.http.CONTINUE` first
   when ``head.framing.expect_continue``); its :class:`~wshub.http.HttpError`
   becomes an :class:`ApiError` through :func:`error_from_http`. After any
   error before the body was read whole, close the connection.
3. :func:`parse_command` turns the head and the body into a command, valid
   once constructed (:class:`PublishRequest`, :class:`DisconnectRequest`,
   :class:`RoomsRequest`, :class:`RoomRequest`), or an :class:`ApiError`.
   It never raises, whatever the bytes.
4. The answer: ``encode_published``, ``encode_rooms``, ``encode_room``,
   ``encode_disconnected`` for ``200``; :func:`encode_error` with
   ``error.status`` and ``error.headers`` otherwise, as :data:`CONTENT_TYPE`.

:func:`encode_publication` is the frame clients receive for a publication:
the same ``message``/``broadcast`` as a client's, with ``connectionId`` the
sender name.

Keys (:class:`ApiKeys`) are held only as keyed digests and compared in
constant time; they never appear in a ``repr`` or an error message.
"""

from __future__ import annotations

import enum
import hmac
import json
import secrets
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Final, NamedTuple

from . import http
from .errors import WshubError
from .ids import ConnectionId
from .protocol import Refusal, RelayKind, check_content, encode_relay

__all__ = [
    "CONTENT_TYPE",
    "DEFAULT_DISCONNECT_CODE",
    "DEFAULT_SENDER",
    "MAX_BODY_SIZE",
    "MAX_REASON_BYTES",
    "ApiCommand",
    "ApiError",
    "ApiErrorCode",
    "ApiHead",
    "ApiKeys",
    "ApiKeysError",
    "ConnectionInfo",
    "DisconnectRequest",
    "Endpoint",
    "KeysReload",
    "PublishRequest",
    "RoomCount",
    "RoomRequest",
    "RoomsRequest",
    "check_head",
    "encode_disconnected",
    "encode_error",
    "encode_publication",
    "encode_published",
    "encode_room",
    "encode_rooms",
    "error_from_http",
    "is_api_path",
    "is_room_name",
    "is_sender_name",
    "key_problem",
    "parse_command",
    "parse_disconnect",
    "parse_publish",
    "unavailable",
]

MAX_BODY_SIZE: Final = 64 * 1024
"""Largest request body accepted, in bytes: ``413`` past it."""
MAX_REASON_BYTES: Final = 123
"""Longest close reason in UTF-8 bytes: what fits a Close frame (RFC 6455 5.5)."""
DEFAULT_SENDER: Final = "server"
"""The ``connectionId`` clients see on a publication that names none."""
DEFAULT_DISCONNECT_CODE: Final = 4000
CONTENT_TYPE: Final = "application/json"

_MAX_SENDER: Final = 64
_MAX_ROOM: Final = 64
_MAX_ECHOED: Final = 64  # longest piece of a caller's value quoted back in an error
_ROOM_CHARS: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._~-")
_SENDER_CHARS: Final = _ROOM_CHARS - {"~"}


# -- Errors ---------------------------------------------------------------------


class ApiErrorCode(enum.StrEnum):
    """The ``code`` of an API error: section 19's, and section 3's where they apply."""

    UNAUTHORIZED = "unauthorized"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    BODY_TOO_LARGE = "body_too_large"
    INVALID_REQUEST = "invalid_request"
    INVALID_SENDER = "invalid_sender"
    EMPTY_CONTENT = "empty_content"
    CONTENT_TOO_LONG = "content_too_long"
    INVALID_CONTENT = "invalid_content"
    UNAVAILABLE = "unavailable"


_STATUS: Final = {
    ApiErrorCode.UNAUTHORIZED: 401,
    ApiErrorCode.NOT_FOUND: 404,
    ApiErrorCode.METHOD_NOT_ALLOWED: 405,
    ApiErrorCode.BODY_TOO_LARGE: 413,
    ApiErrorCode.INVALID_REQUEST: 400,
    ApiErrorCode.INVALID_SENDER: 400,
    ApiErrorCode.EMPTY_CONTENT: 400,
    ApiErrorCode.CONTENT_TOO_LONG: 400,
    ApiErrorCode.INVALID_CONTENT: 400,
    ApiErrorCode.UNAVAILABLE: 503,
}


@dataclass(frozen=True, slots=True)
class ApiError:
    """A request refused with an HTTP *status* and ``{"error": {code, message}}``.

    Build one with :meth:`of`, which takes the status from the code.
    """

    status: int
    code: ApiErrorCode
    message: str
    headers: tuple[tuple[str, str], ...] = ()
    """Extra response headers: ``WWW-Authenticate`` on 401, ``Allow`` on 405."""

    def __post_init__(self) -> None:
        if _STATUS[self.code] != self.status:
            raise AssertionError(f"{self.code} is answered with {_STATUS[self.code]}")

    @classmethod
    def of(
        cls, code: ApiErrorCode, message: str, headers: tuple[tuple[str, str], ...] = ()
    ) -> ApiError:
        return cls(_STATUS[code], code, message, headers)


def _invalid(message: str) -> ApiError:
    return ApiError.of(ApiErrorCode.INVALID_REQUEST, message)


_NOT_FOUND: Final = ApiError.of(ApiErrorCode.NOT_FOUND, "no such API endpoint")
_UNAUTHORIZED: Final = ApiError.of(
    ApiErrorCode.UNAUTHORIZED,
    "a valid API key is required: Authorization: Bearer KEY",
    (("WWW-Authenticate", "Bearer"),),
)


def unavailable(message: str) -> ApiError:
    """``503``: the hub cannot serve the request now (e.g. the backplane is down)."""
    return ApiError.of(ApiErrorCode.UNAVAILABLE, message)


def error_from_http(error: http.HttpError) -> ApiError:
    """The API's answer to a refusal of :mod:`wshub.http` (body framing and reading)."""
    if error.status == 413:
        return ApiError.of(ApiErrorCode.BODY_TOO_LARGE, error.body)
    return _invalid(error.body)


_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode


def _json(obj: object) -> bytes:
    return _dumps(obj).encode("utf-8")


def encode_error(error: ApiError) -> bytes:
    return _json({"error": {"code": error.code.value, "message": error.message}})


# -- Keys -----------------------------------------------------------------------


class ApiKeysError(WshubError):
    """The API keys file can't be read or holds something that is not a key.

    The message never quotes a key, or a line that might be one.
    """


def key_problem(key: str) -> str | None:
    """Why *key* can't be an API key, or None when it can.

    A key is sent as ``Authorization: Bearer KEY``, so it is one run of
    printable ASCII without white space.
    """
    if not key:
        return "an API key can't be empty"
    if not all("!" <= c <= "~" for c in key):
        return "an API key is printable ASCII without spaces"
    return None


@dataclass(frozen=True, slots=True)
class KeysReload:
    """What :meth:`ApiKeys.reload` did, to be logged (it never names a key)."""

    ok: bool
    keys: int
    """Keys in use after the reload."""
    message: str


def _read_file(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _keys_from_file(path: str, read: Callable[[str], bytes]) -> list[str]:
    try:
        data = read(path)
    except OSError as exc:
        raise ApiKeysError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiKeysError(f"{path} is not UTF-8 text") from None
    keys = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        problem = key_problem(line)
        if problem is not None:
            raise ApiKeysError(f"{path} line {number}: {problem}")
        keys.append(line)
    return keys


def _bearer_token(authorization: str | None) -> bytes:
    """The credentials of ``Bearer TOKEN`` (RFC 6750 2.1), or b"" when there are none."""
    if authorization is None:
        return b""
    scheme, _, token = authorization.strip(" \t").partition(" ")
    token = token.strip(" \t")
    if scheme.lower() != "bearer" or not token or " " in token or "\t" in token:
        return b""
    return token.encode("utf-8", "surrogatepass")


class ApiKeys:
    """The configured API keys: from ``--api-keys`` and the ``--api-keys-file``.

    Raises:
        ApiKeysError: a flag key is not a key, or the file can't be read or
            holds a line that is not a key.
    """

    __slots__ = ("_digests", "_file", "_flag_keys", "_read", "_salt")

    def __init__(
        self,
        keys: Iterable[str] = (),
        file: str = "",
        *,
        read: Callable[[str], bytes] = _read_file,
    ) -> None:
        # Keys are kept only as HMACs under a secret drawn at start: every
        # comparison is between two 32-byte digests, so neither the length of
        # a guess nor how much of it matches a key can show in the time, and a
        # digest is worthless outside this process.
        self._salt = secrets.token_bytes(32)
        self._file = file
        self._read = read
        self._flag_keys: tuple[str, ...] = tuple(keys)
        for key in self._flag_keys:
            problem = key_problem(key)
            if problem is not None:
                raise ApiKeysError(f"--api-keys: {problem}")
        self._digests: tuple[bytes, ...] = ()
        self._install(_keys_from_file(file, read) if file else [])

    def _install(self, file_keys: list[str]) -> None:
        unique = dict.fromkeys([*self._flag_keys, *file_keys])
        self._digests = tuple(self._digest(key.encode("ascii")) for key in unique)

    def _digest(self, token: bytes) -> bytes:
        return hmac.digest(self._salt, token, "sha256")

    @property
    def enabled(self) -> bool:
        """The API is served: at least one key is configured (decisions.md 14)."""
        return bool(self._digests)

    def __len__(self) -> int:
        return len(self._digests)

    def __repr__(self) -> str:
        file = f", file={self._file!r}" if self._file else ""
        return f"ApiKeys({len(self._digests)} keys{file})"

    def check(self, authorization: str | None) -> bool:
        """Whether the ``Authorization`` header value carries a configured key.

        Constant time: a missing header, another scheme and a wrong key all
        cost one HMAC and a comparison with every key, and the comparisons
        do not stop at the first match.
        """
        guess = self._digest(_bearer_token(authorization))
        matched = False
        for digest in self._digests:
            matched |= hmac.compare_digest(guess, digest)
        return matched

    def reload(self) -> KeysReload:
        """Read the keys file again (on SIGHUP).

        A file that can't be read, or holds a line that is not a key, leaves
        the keys in use as they were; the result says what happened.
        """
        if not self._file:
            return KeysReload(True, len(self), "no --api-keys-file: nothing to reload")
        try:
            file_keys = _keys_from_file(self._file, self._read)
        except ApiKeysError as exc:
            return KeysReload(False, len(self), f"{exc}; keeping the {len(self)} keys in use")
        self._install(file_keys)
        off = "" if self.enabled else " (no key: the API is off)"
        return KeysReload(True, len(self), f"{len(self)} API keys in use{off}")


# -- Names ----------------------------------------------------------------------


def is_room_name(name: str) -> bool:
    """A room name (decisions.md 12): 1-64 of ``[A-Za-z0-9._~-]``, or "" (the default room)."""
    return len(name) <= _MAX_ROOM and set(name) <= _ROOM_CHARS


def is_sender_name(name: str) -> bool:
    """A publication's ``connectionId`` (decisions.md 14): 1-64 of ``[A-Za-z0-9._-]``,
    not starting with ``ws-``, which only a client's id does."""
    return (
        0 < len(name) <= _MAX_SENDER and set(name) <= _SENDER_CHARS and not name.startswith("ws-")
    )


def is_api_path(path: str) -> bool:
    """Whether *path* belongs to the API (and so answers 404 while it is off)."""
    return path == "/api" or path.startswith("/api/")


def _shown(value: str) -> str:
    """*value* safe to quote back in an error: bounded, no lone surrogates."""
    short = value[:_MAX_ECHOED] + ("..." if len(value) > _MAX_ECHOED else "")
    return repr(short.encode("utf-8", "replace").decode("utf-8"))


def _encodable(value: str) -> bool:
    # A JSON escape can give a lone surrogate, which no encoding can carry on.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


# -- Requests -------------------------------------------------------------------


class Endpoint(enum.StrEnum):
    PUBLISH = "publish"
    """``POST /api/publish``"""
    ROOMS = "rooms"
    """``GET /api/rooms``"""
    ROOM = "room"
    """``GET /api/rooms/{room}``"""
    DISCONNECT = "disconnect"
    """``POST /api/disconnect``"""


_METHODS: Final = {
    Endpoint.PUBLISH: ("POST",),
    Endpoint.ROOMS: ("GET", "HEAD"),
    Endpoint.ROOM: ("GET", "HEAD"),
    Endpoint.DISCONNECT: ("POST",),
}
_PATHS: Final = {
    "/api/publish": Endpoint.PUBLISH,
    "/api/rooms": Endpoint.ROOMS,
    "/api/disconnect": Endpoint.DISCONNECT,
}
_ROOM_PREFIX: Final = "/api/rooms/"


@dataclass(frozen=True, slots=True)
class ApiHead:
    """A request head the API accepts: which endpoint, and how to read the body."""

    endpoint: Endpoint
    room: str
    """The room of ``GET /api/rooms/{room}`` ("" otherwise, and for the default room)."""
    framing: http.BodyFraming
    head_only: bool
    """A ``HEAD`` request: answer with the head of the ``GET`` answer only."""

    def reader(self) -> http.BodyReader:
        """A reader for this request's body, bounded by :data:`MAX_BODY_SIZE`."""
        return http.BodyReader(self.framing, MAX_BODY_SIZE)


def check_head(request: http.Request, keys: ApiKeys) -> ApiHead | ApiError:
    """Everything that can be decided about an API request from its head.

    Returns the :class:`ApiHead` to go on with, or the :class:`ApiError` to
    answer (then close the connection if the request has a body). Never raises.
    """
    if not keys.enabled:
        return _NOT_FOUND
    authorization = request.get_all("authorization")
    if not keys.check(authorization[0] if len(authorization) == 1 else None):
        return _UNAUTHORIZED
    path = request.path
    room = ""
    endpoint = _PATHS.get(path)
    if endpoint is None:
        if not path.startswith(_ROOM_PREFIX):
            return _NOT_FOUND
        endpoint, room = Endpoint.ROOM, path[len(_ROOM_PREFIX) :]
    methods = _METHODS[endpoint]
    if request.method not in methods:
        return ApiError.of(
            ApiErrorCode.METHOD_NOT_ALLOWED,
            f"{path} accepts {' or '.join(methods)}",
            (("Allow", ", ".join(methods)),),
        )
    if not is_room_name(room):
        # No decoding: a %-escape is not a room name character (decisions.md 19).
        return _invalid(f"not a room name: {_shown(room)}")
    try:
        framing = http.body_framing(request, MAX_BODY_SIZE)
    except http.HttpError as exc:
        return error_from_http(exc)
    if request.method != "POST" and framing.length != 0:
        return _invalid(f"{request.method} {path} takes no body")
    return ApiHead(endpoint, room, framing, request.method == "HEAD")


@dataclass(frozen=True, slots=True)
class PublishRequest:
    """``POST /api/publish``, validated: publish *content* in *room* as *sender*."""

    kind: RelayKind
    room: str
    content: str
    sender: str
    """The ``connectionId`` clients see: never a client's (no ``ws-`` prefix)."""
    exclude: str | None
    """The connection a ``message`` skips (always None for a ``broadcast``)."""


@dataclass(frozen=True, slots=True)
class DisconnectRequest:
    """``POST /api/disconnect``, validated: exactly one of the two ids is set."""

    connection_id: str | None
    user_id: str | None
    code: int
    """A close code in 4000-4999."""
    reason: str
    """At most :data:`MAX_REASON_BYTES` bytes of UTF-8."""


@dataclass(frozen=True, slots=True)
class RoomsRequest:
    """``GET /api/rooms``"""


@dataclass(frozen=True, slots=True)
class RoomRequest:
    """``GET /api/rooms/{room}``"""

    room: str


ApiCommand = PublishRequest | DisconnectRequest | RoomsRequest | RoomRequest


class _DuplicateKey(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    # Two values for one field would be read differently by different
    # parsers (a proxy's first, Python's last): refuse rather than pick.
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise _DuplicateKey("duplicate field")
    return obj


def _refuse_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


_decoder: Final = json.JSONDecoder(
    parse_constant=_refuse_constant, object_pairs_hook=_no_duplicates
)


def _json_object(body: bytes) -> dict[str, object] | ApiError:
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        return _invalid("the body is not UTF-8")
    if not text.strip(" \t\r\n"):
        return _invalid("the body is empty: a JSON object is needed")
    if text.startswith("\ufeff"):
        return _invalid("the body starts with a byte order mark, which JSON does not allow")
    try:
        value = _decoder.decode(text)
    except _DuplicateKey:
        return _invalid("the body names a field twice")
    except json.JSONDecodeError as exc:
        # Where, not what: the message quotes nothing of the body.
        return _invalid(f"the body is not valid JSON: {exc.msg} at character {exc.pos}")
    except (ValueError, RecursionError):
        # NaN or Infinity, nesting too deep, an integer past Python's digit limit.
        return _invalid("the body is not valid JSON")
    if not isinstance(value, dict):
        return _invalid("the body must be a JSON object")
    return value


def _optional_string(obj: dict[str, object], name: str) -> str | None | ApiError:
    """Field *name* as a string, None when absent or null; an error for another type."""
    value = obj.get(name)
    if value is None or isinstance(value, str):
        return value
    return _invalid(f"{name!r} must be a string")


_KINDS: Final = {kind.value: kind for kind in RelayKind}
_CONTENT_CODES: Final = {
    "empty_content": ApiErrorCode.EMPTY_CONTENT,
    "content_too_long": ApiErrorCode.CONTENT_TOO_LONG,
    "invalid_content": ApiErrorCode.INVALID_CONTENT,
}


def parse_publish(body: bytes) -> PublishRequest | ApiError:
    """The body of ``POST /api/publish``. Never raises."""
    obj = _json_object(body)
    if isinstance(obj, ApiError):
        return obj
    kind_name = _optional_string(obj, "type")
    if isinstance(kind_name, ApiError):
        return kind_name
    kind = RelayKind.BROADCAST if kind_name is None else _KINDS.get(kind_name)
    if kind is None:
        return _invalid("'type' must be 'broadcast' or 'message'")
    room = _optional_string(obj, "room")
    if isinstance(room, ApiError):
        return room
    room = room or ""
    if not is_room_name(room):
        return _invalid(
            f"'room' is not a room name (1-64 of A-Za-z0-9._~-, or \"\" for the default "
            f"room): {_shown(room)}"
        )
    sender = obj.get("connectionId")
    if sender is None:
        sender = DEFAULT_SENDER
    elif not isinstance(sender, str) or not is_sender_name(sender):
        return ApiError.of(
            ApiErrorCode.INVALID_SENDER,
            "'connectionId' must be 1-64 of A-Za-z0-9._- and not start with 'ws-' "
            "(only clients' ids do)",
        )
    exclude = _optional_string(obj, "exclude")
    if isinstance(exclude, ApiError):
        return exclude
    if exclude is not None and (not exclude or not _encodable(exclude)):
        return _invalid("'exclude' must name a connection")
    content = obj.get("content")
    if not isinstance(content, str):
        what = "missing" if "content" not in obj else "not a string"
        return ApiError.of(ApiErrorCode.INVALID_CONTENT, f"'content' is {what}: a string is needed")
    checked = check_content(kind, content)
    if isinstance(checked, Refusal):
        return ApiError.of(_CONTENT_CODES[checked.code.value], checked.message)
    # decisions.md 14: a broadcast reaches every member, exclude or not.
    return PublishRequest(
        kind, room, content, sender, exclude if kind is RelayKind.MESSAGE else None
    )


def parse_disconnect(body: bytes) -> DisconnectRequest | ApiError:
    """The body of ``POST /api/disconnect``. Never raises."""
    obj = _json_object(body)
    if isinstance(obj, ApiError):
        return obj
    ids: dict[str, str | None] = {}
    for name in ("connectionId", "userId"):
        value = _optional_string(obj, name)
        if isinstance(value, ApiError):
            return value
        if value is not None and (not value or not _encodable(value)):
            return _invalid(f"{name!r} must be a non-empty string of characters")
        ids[name] = value
    if (ids["connectionId"] is None) == (ids["userId"] is None):
        return _invalid("give exactly one of 'connectionId' and 'userId'")
    code = obj.get("code", DEFAULT_DISCONNECT_CODE)
    if code is None:
        code = DEFAULT_DISCONNECT_CODE
    if not isinstance(code, int) or isinstance(code, bool) or not 4000 <= code <= 4999:
        return _invalid("'code' must be an integer from 4000 to 4999")
    reason = _optional_string(obj, "reason")
    if isinstance(reason, ApiError):
        return reason
    reason = reason or ""
    if not _encodable(reason):
        return _invalid("'reason' holds a lone surrogate, which is not a character")
    if len(reason.encode("utf-8")) > MAX_REASON_BYTES:
        return _invalid(f"'reason' must fit a Close frame: at most {MAX_REASON_BYTES} bytes")
    return DisconnectRequest(ids["connectionId"], ids["userId"], code, reason)


def parse_command(head: ApiHead, body: bytes) -> ApiCommand | ApiError:
    """The command of a request whose head passed :func:`check_head`. Never raises."""
    endpoint = head.endpoint
    if endpoint is Endpoint.PUBLISH:
        return parse_publish(body)
    if endpoint is Endpoint.DISCONNECT:
        return parse_disconnect(body)
    if endpoint is Endpoint.ROOMS:
        return RoomsRequest()
    return RoomRequest(head.room)


# -- Answers --------------------------------------------------------------------


class RoomCount(NamedTuple):
    room: str
    connection_count: int


class ConnectionInfo(NamedTuple):
    connection_id: str
    user_id: str | None
    node: str


def encode_published(room: str, offset: int | None, epoch: str | None) -> bytes:
    """``200`` to a publish: where the publication stands in the room's history
    (``offset`` and ``epoch`` are null while history is off)."""
    return _json({"room": room, "offset": offset, "epoch": epoch})


def encode_rooms(rooms: Iterable[RoomCount]) -> bytes:
    """``200`` to ``GET /api/rooms``: every room with members, by name."""
    return _json(
        {"rooms": [{"room": room, "connectionCount": count} for room, count in sorted(rooms)]}
    )


def encode_room(room: str, connections: Sequence[ConnectionInfo]) -> bytes:
    """``200`` to ``GET /api/rooms/{room}`` (a room without members too)."""
    listed: list[dict[str, object]] = []
    for connection_id, user_id, node in connections:
        entry: dict[str, object] = {"connectionId": connection_id}
        if user_id is not None:
            entry["userId"] = user_id
        entry["node"] = node
        listed.append(entry)
    return _json({"room": room, "connectionCount": len(listed), "connections": listed})


def encode_disconnected(connection_ids: Sequence[str]) -> bytes:
    """``200`` to a disconnect: the connections closed (answer 404 when none)."""
    return _json({"disconnected": len(connection_ids), "connections": list(connection_ids)})


def encode_publication(request: PublishRequest, now: float) -> bytes:
    """The frame a publication sends to the room's members: a client's
    ``message`` or ``broadcast``, with ``connectionId`` the sender name."""
    return encode_relay(request.kind, ConnectionId(request.sender), request.content, now)
