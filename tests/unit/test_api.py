"""wshub.api and the API's pieces of wshub.http: keys, heads, bodies, answers.

Synchronous and table-driven: every row of issue 14 that can be decided
without the hub (keys, each error code, each field's bad values, the 413
decisions, the constant-time comparison), plus properties over arbitrary
bytes and header values. The end-to-end rows come with the wiring.
"""

from __future__ import annotations

import hmac
import json
import re
import statistics
import time
from collections.abc import Callable

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wshub import api, protocol
from wshub.api import (
    MAX_BODY_SIZE,
    ApiError,
    ApiErrorCode,
    ApiHead,
    ApiKeys,
    ApiKeysError,
    ConnectionInfo,
    DisconnectRequest,
    Endpoint,
    PublishRequest,
    RoomCount,
    RoomRequest,
    RoomsRequest,
    check_head,
    encode_error,
    parse_command,
    parse_disconnect,
    parse_publish,
)
from wshub.cli import build_config
from wshub.config import Config, ConfigError
from wshub.http import BodyFraming, BodyReader, HttpError, Request, body_framing
from wshub.protocol import RelayKind

KEY = "k-0123456789abcdef"
OTHER_KEY = "rotated-key-fedcba9876543210"
AUTH = ("authorization", f"Bearer {KEY}")


def keys(*values: str) -> ApiKeys:
    return ApiKeys(values or (KEY,))


def request(
    method: str = "POST",
    target: str = "/api/publish",
    *headers: tuple[str, str],
    auth: bool = True,
) -> Request:
    return Request(method, target, (("host", "h"), *((AUTH,) if auth else ()), *headers))


def error(result: object) -> ApiError:
    assert isinstance(result, ApiError), result
    return result


def body(obj: object) -> bytes:
    return json.dumps(obj).encode()


# -- Keys -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "ok"),
    [
        (f"Bearer {KEY}", True),
        (f"bearer {KEY}", True),  # the scheme is case-insensitive (RFC 9110 11.1)
        (f"BEARER   {KEY}  ", True),
        (f"Bearer {OTHER_KEY}", True),  # the second key: rotation
        (None, False),
        ("", False),
        ("Bearer", False),
        ("Bearer ", False),
        (KEY, False),  # no scheme
        (f"Basic {KEY}", False),
        (f"Bearer {KEY}x", False),
        (f"Bearer {KEY[:-1]}", False),  # a prefix of a key
        (f"Bearer {KEY.upper()}", False),  # keys are case-sensitive
        (f"Bearer {KEY} {KEY}", False),
        (f"Bearer {KEY},{OTHER_KEY}", False),
        ("Bearer \udcff\ud800é", False),  # never raises, whatever the text
    ],
)
def test_check_key(header: str | None, ok: bool) -> None:
    assert ApiKeys([KEY, OTHER_KEY]).check(header) is ok


def test_check_compares_digests_of_equal_length_against_every_key(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Constant time: hmac.compare_digest on 32-byte digests, all keys every time,
    whether the header is missing, wrong, or matches the first key."""
    calls: list[tuple[int, int]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    three = ApiKeys([KEY, OTHER_KEY, "third-key"])
    for header in (None, "Bearer x", f"Bearer {'y' * 5000}", f"Bearer {KEY}", "Basic abc"):
        calls.clear()
        three.check(header)
        assert calls == [(32, 32)] * 3, header


def test_check_time_does_not_depend_on_the_guess() -> None:
    """Interleaved medians: the right key, a wrong key sharing all but its last
    character, and one sharing nothing cost the same, within a generous bound."""
    checker = ApiKeys([KEY, OTHER_KEY])
    headers = {
        "right": f"Bearer {KEY}",
        "near": f"Bearer {KEY[:-1]}?",
        "far": f"Bearer {'?' * len(KEY)}",
        "missing": None,
    }
    samples: dict[str, list[int]] = {name: [] for name in headers}
    for _ in range(3000):
        for name, header in headers.items():
            start = time.perf_counter_ns()
            checker.check(header)
            samples[name].append(time.perf_counter_ns() - start)
    medians = {name: statistics.median(values) for name, values in samples.items()}
    assert max(medians.values()) < 2.0 * min(medians.values()), medians


def test_keys_never_shown() -> None:
    checker = ApiKeys([KEY], "/etc/wshub/keys", read=lambda _: OTHER_KEY.encode())
    assert KEY not in repr(checker) and OTHER_KEY not in repr(checker)
    assert repr(checker) == "ApiKeys(2 keys, file='/etc/wshub/keys')"


def test_off_without_keys() -> None:
    """No key configured: the API is off and every /api/ path is 404."""
    off = ApiKeys()
    assert not off.enabled and not off.check(f"Bearer {KEY}")
    for target in ("/api/publish", "/api/rooms", "/api/nope"):
        for method in ("GET", "POST"):
            assert error(check_head(request(method, target), off)).status == 404


def test_keys_file(tmp_path) -> None:
    """One key per line; blank lines, # comments, CRLF and indentation ignored;
    flag keys and file keys together, each once."""
    path = tmp_path / "keys"
    path.write_bytes(f"# rotated 2026-12\r\n\r\n  {OTHER_KEY}  \r\n{KEY}\n#{KEY}x\n".encode())
    both = ApiKeys([KEY], str(path))
    assert len(both) == 2
    assert both.check(f"Bearer {OTHER_KEY}") and both.check(f"Bearer {KEY}")
    assert not both.check(f"Bearer #{KEY}x")


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"good-key\nbad key\n", "line 2"),
        (b"good-key\n\xffkey\n", "not UTF-8"),
        ("k\u00e9y\n".encode(), "line 1"),
    ],
)
def test_keys_file_refused_without_showing_the_line(tmp_path, content: bytes, match: str) -> None:
    path = tmp_path / "keys"
    path.write_bytes(content)
    with pytest.raises(ApiKeysError, match=match) as info:
        ApiKeys((), str(path))
    assert "bad key" not in str(info.value) and "good-key" not in str(info.value)


def test_keys_file_missing_at_start(tmp_path) -> None:
    with pytest.raises(ApiKeysError, match="cannot read"):
        ApiKeys((), str(tmp_path / "missing"))


@pytest.mark.parametrize("bad", ["", "two words", "tab\tkey", "k\u00e9y", "new\nline"])
def test_flag_key_refused(bad: str) -> None:
    with pytest.raises(ApiKeysError):
        ApiKeys([bad])


def test_reload_rotates_and_keeps_old_keys_on_failure(tmp_path) -> None:
    """SIGHUP: a new file replaces the file's keys; an unreadable or bad file
    leaves the keys in use, and says so without naming a key."""
    path = tmp_path / "keys"
    path.write_text(f"{KEY}\n")
    checker = ApiKeys(["flag-key"], str(path))
    path.write_text(f"{OTHER_KEY}\n")
    result = checker.reload()
    assert result.ok and result.keys == 2
    assert checker.check(f"Bearer {OTHER_KEY}") and not checker.check(f"Bearer {KEY}")
    assert checker.check("Bearer flag-key")  # flag keys stay
    path.write_text("not a key\n")
    result = checker.reload()
    assert not result.ok and result.keys == 2 and "keeping the 2 keys" in result.message
    path.unlink()
    result = checker.reload()
    assert not result.ok and "cannot read" in result.message
    assert checker.check(f"Bearer {OTHER_KEY}")
    for message in (result.message, repr(checker)):
        assert OTHER_KEY not in message and "flag-key" not in message


def test_reload_to_an_empty_file_turns_the_api_off(tmp_path) -> None:
    path = tmp_path / "keys"
    path.write_text(f"{KEY}\n")
    checker = ApiKeys((), str(path))
    path.write_text("# all revoked\n")
    result = checker.reload()
    assert result.ok and result.keys == 0 and "off" in result.message
    assert not checker.enabled
    path.write_text(f"{OTHER_KEY}\n")
    assert checker.reload().ok and checker.enabled


def test_reload_without_file() -> None:
    checker = keys()
    assert checker.reload().ok and checker.check(f"Bearer {KEY}")


# -- Request heads ----------------------------------------------------------------


def test_unauthorized_carries_www_authenticate() -> None:
    for auth_header in ((), (("authorization", "Bearer wrong"),), (AUTH, AUTH)):
        result = error(check_head(Request("POST", "/api/publish", auth_header), keys()))
        assert (result.status, result.code) == (401, ApiErrorCode.UNAUTHORIZED)
        assert ("WWW-Authenticate", "Bearer") in result.headers


def test_key_is_checked_before_the_path() -> None:
    """Without a key nothing is revealed, not even which paths exist."""
    assert error(check_head(request("GET", "/api/nope", auth=False), keys())).status == 401
    assert error(check_head(request("GET", "/api/nope"), keys())).status == 404


@pytest.mark.parametrize(
    ("method", "target", "endpoint", "room"),
    [
        ("POST", "/api/publish", Endpoint.PUBLISH, ""),
        ("POST", "/api/publish?x=1", Endpoint.PUBLISH, ""),
        ("POST", "/api/disconnect", Endpoint.DISCONNECT, ""),
        ("GET", "/api/rooms", Endpoint.ROOMS, ""),
        ("HEAD", "/api/rooms", Endpoint.ROOMS, ""),
        ("GET", "/api/rooms/", Endpoint.ROOM, ""),  # the default room (decisions.md 19)
        ("GET", "/api/rooms/Lobby", Endpoint.ROOM, "Lobby"),
        ("GET", "/api/rooms/a.b_c~d-9", Endpoint.ROOM, "a.b_c~d-9"),
        ("GET", "/api/rooms/" + "r" * 64, Endpoint.ROOM, "r" * 64),
    ],
)
def test_routes(method: str, target: str, endpoint: Endpoint, room: str) -> None:
    head = check_head(request(method, target), keys())
    assert isinstance(head, ApiHead)
    assert (head.endpoint, head.room, head.head_only) == (endpoint, room, method == "HEAD")


@pytest.mark.parametrize(
    ("method", "target", "status", "allow"),
    [
        ("GET", "/api", 404, None),
        ("GET", "/api/", 404, None),
        ("POST", "/api/publish/", 404, None),
        ("POST", "/api/Publish", 404, None),
        ("GET", "/api/room", 404, None),
        ("GET", "/api/publish", 405, "POST"),
        ("PUT", "/api/publish", 405, "POST"),
        ("GET", "/api/disconnect", 405, "POST"),
        ("POST", "/api/rooms", 405, "GET, HEAD"),
        ("DELETE", "/api/rooms/x", 405, "GET, HEAD"),
        ("OPTIONS", "/api/rooms/", 405, "GET, HEAD"),
        ("GET", "/api/rooms/" + "r" * 65, 400, None),
        ("GET", "/api/rooms/a%20b", 400, None),  # no decoding
        ("GET", "/api/rooms/%41", 400, None),
        ("GET", "/api/rooms/a/b", 400, None),
        ("GET", "/api/rooms/a+b", 400, None),
    ],
)
def test_route_errors(method: str, target: str, status: int, allow: str | None) -> None:
    result = error(check_head(request(method, target), keys()))
    assert result.status == status
    expected_code = {
        400: ApiErrorCode.INVALID_REQUEST,
        404: ApiErrorCode.NOT_FOUND,
        405: ApiErrorCode.METHOD_NOT_ALLOWED,
    }[status]
    assert result.code == expected_code
    assert dict(result.headers).get("Allow") == allow


# -- Body framing: 413 before the body is read --------------------------------------


@pytest.mark.parametrize(
    ("headers", "status", "length"),
    [
        ((), None, 0),  # neither header: no body (RFC 9112 6.3)
        ((("content-length", "0"),), None, 0),
        ((("content-length", "17"),), None, 17),
        ((("content-length", "0017"),), None, 17),
        ((("content-length", str(MAX_BODY_SIZE)),), None, MAX_BODY_SIZE),
        ((("content-length", str(MAX_BODY_SIZE + 1)),), 413, None),
        ((("content-length", "9" * 30),), 413, None),
        ((("content-length", "9" * 5000),), 413, None),  # past int()'s digit limit
        ((("content-length", "0" * 5000 + "5"),), None, 5),
        ((("content-length", "-1"),), 400, None),
        ((("content-length", "+5"),), 400, None),
        ((("content-length", "5 5"),), 400, None),
        ((("content-length", "1_000"),), 400, None),
        ((("content-length", "0x10"),), 400, None),
        ((("content-length", "\u00b2"),), 400, None),  # a superscript two: isdigit()
        ((("content-length", "\u0665"),), 400, None),  # an Arabic-Indic five
        ((("content-length", ""),), 400, None),
        ((("content-length", "5, 5"),), 400, None),
        ((("content-length", "5"), ("content-length", "5")), 400, None),
        ((("content-length", "5"), ("content-length", "6")), 400, None),
        ((("transfer-encoding", "chunked"),), None, None),
        ((("transfer-encoding", "Chunked"),), None, None),
        ((("transfer-encoding", "gzip, chunked"),), 400, None),
        ((("transfer-encoding", "chunked, chunked"),), 400, None),
        ((("transfer-encoding", "chunked"), ("transfer-encoding", "chunked")), 400, None),
        ((("transfer-encoding", "identity"),), 400, None),
        ((("transfer-encoding", ""),), 400, None),
        ((("transfer-encoding", "chunked"), ("content-length", "5")), 400, None),
        ((("content-length", "5"), ("transfer-encoding", "chunked")), 400, None),
    ],
)
def test_body_framing(headers: tuple[tuple[str, str], ...], status: int | None, length) -> None:
    result = check_head(request("POST", "/api/publish", *headers), keys())
    if status is None:
        assert isinstance(result, ApiHead)
        assert result.framing.length == length
        assert result.framing.chunked is (length is None)
    else:
        result = error(result)
        assert result.status == status
        code = ApiErrorCode.BODY_TOO_LARGE if status == 413 else ApiErrorCode.INVALID_REQUEST
        assert result.code == code


def test_over_limit_refused_before_anything_else_is_read() -> None:
    """A 413 comes from the head alone, also with Expect: 100-continue (the
    client then never sends the body)."""
    head = (("content-length", str(10 * 1024 * 1024)), ("expect", "100-continue"))
    result = error(check_head(request("POST", "/api/publish", *head), keys()))
    assert result.status == 413


def test_expect_continue() -> None:
    with_body = check_head(
        request("POST", "/api/publish", ("content-length", "5"), ("expect", "100-Continue")),
        keys(),
    )
    assert isinstance(with_body, ApiHead) and with_body.framing.expect_continue
    chunked = check_head(
        request(
            "POST", "/api/publish", ("transfer-encoding", "chunked"), ("expect", "100-continue")
        ),
        keys(),
    )
    assert isinstance(chunked, ApiHead) and chunked.framing.expect_continue
    empty = check_head(
        request("POST", "/api/publish", ("content-length", "0"), ("expect", "100-continue")),
        keys(),
    )
    assert isinstance(empty, ApiHead) and not empty.framing.expect_continue


@pytest.mark.parametrize(
    "headers",
    [(("content-length", "5"),), (("transfer-encoding", "chunked"),)],
)
def test_get_takes_no_body(headers: tuple[tuple[str, str], ...]) -> None:
    assert error(check_head(request("GET", "/api/rooms", *headers), keys())).status == 400
    head = check_head(request("GET", "/api/rooms", ("content-length", "0")), keys())
    assert isinstance(head, ApiHead)


def read_all(reader: BodyReader, data: bytes, step: int) -> int:
    """Feed *data* in pieces of *step* bytes; return the bytes taken."""
    used = 0
    for start in range(0, len(data), step):
        piece = data[start : start + step]
        taken = reader.feed(piece)
        used += taken
        if taken < len(piece):
            break
    return used


@pytest.mark.parametrize("step", [1, 2, 7, 1000])
def test_content_length_body_and_the_next_request(step: int) -> None:
    """The reader takes exactly the body; the rest is the next request's."""
    data = b'{"content":"hi"}GET / HTTP/1.1\r\n'
    reader = BodyReader(BodyFraming(16, False), MAX_BODY_SIZE)
    assert read_all(reader, data, step) == 16
    assert reader.done and reader.body() == b'{"content":"hi"}'
    assert reader.feed(b"more") == 0


@pytest.mark.parametrize("step", [1, 3, 5, 1000])
def test_chunked_body(step: int) -> None:
    data = (
        b"4\r\n"
        b'{"co\r\n'
        b"C;name=value;other\r\n"
        b'ntent":"hi"}\r\n'
        b"0000 \r\n"
        b"Trailer-Field: x\r\n"
        b"\r\n"
        b"POST /api/publish HTTP/1.1\r\n"
    )
    reader = BodyReader(BodyFraming(None, False), MAX_BODY_SIZE)
    used = read_all(reader, data, step)
    assert reader.done and reader.body() == b'{"content":"hi"}'
    assert data[used:] == b"POST /api/publish HTTP/1.1\r\n"


def test_empty_body_is_done_at_once() -> None:
    reader = BodyReader(BodyFraming(0, False), MAX_BODY_SIZE)
    assert reader.done and reader.body() == b""
    with pytest.raises(AssertionError):
        BodyReader(BodyFraming(3, False), MAX_BODY_SIZE).body()


def test_chunked_over_limit_refused_at_the_chunk_size() -> None:
    """413 as soon as a chunk size would take the total past the limit, before
    its data is read; a first chunk within it is read."""
    first = BodyReader(BodyFraming(None, False), MAX_BODY_SIZE)
    with pytest.raises(HttpError) as info:
        first.feed(b"10001\r\n")
    assert info.value.status == 413
    running = BodyReader(BodyFraming(None, False), MAX_BODY_SIZE)
    running.feed(b"8000\r\n" + b"x" * 0x8000 + b"\r\n")
    with pytest.raises(HttpError) as info:
        running.feed(b"8001\r\n")
    assert info.value.status == 413
    exact = BodyReader(BodyFraming(None, False), MAX_BODY_SIZE)
    exact.feed(b"8000\r\n" + b"x" * 0x8000 + b"\r\n8000\r\n" + b"y" * 0x8000 + b"\r\n0\r\n\r\n")
    assert exact.done and len(exact.body()) == MAX_BODY_SIZE
    with pytest.raises(HttpError) as info:
        BodyReader(BodyFraming(None, False), MAX_BODY_SIZE).feed(b"f" * 17 + b"\r\n")
    assert info.value.status == 413


def test_chunked_framing_is_bounded_too() -> None:
    """One-byte chunks with long extensions: refused once their framing alone
    passes the limit, though the body is tiny."""
    reader = BodyReader(BodyFraming(None, False), MAX_BODY_SIZE)
    chunk = b"1;" + b"e" * 2000 + b"\r\nx\r\n"
    with pytest.raises(HttpError) as info:
        for _ in range(MAX_BODY_SIZE // len(chunk) + 2):
            reader.feed(chunk)
    assert info.value.status == 413


@pytest.mark.parametrize(
    "data",
    [
        b"zz\r\n",
        b"\r\n",
        b"-1\r\n",
        b"0x5\r\n",
        b"+5\r\n",
        b" 5\r\n",
        b"5\n",  # a bare LF
        b"5\rx\n",
        b"2\r\nabc\r\n",  # data longer than its size
        b"2\r\nab\n",
        b"5" * 5000,  # a size line that never ends
        b"0\r\n" + b"T: " + b"v" * 5000 + b"\r\n",
    ],
)
def test_malformed_chunked_body(data: bytes) -> None:
    reader = BodyReader(BodyFraming(None, False), MAX_BODY_SIZE)
    with pytest.raises(HttpError) as info:
        reader.feed(data)
    assert info.value.status == 400
    assert api.error_from_http(info.value).code == ApiErrorCode.INVALID_REQUEST


@settings(max_examples=200, deadline=None)
@given(
    payload=st.binary(max_size=3000),
    sizes=st.lists(st.integers(1, 700), min_size=1, max_size=20),
    cuts=st.lists(st.integers(1, 500), min_size=1, max_size=50),
)
def test_chunked_any_split_reads_the_same_body(
    payload: bytes, sizes: list[int], cuts: list[int]
) -> None:
    """However the chunks are sized and the bytes arrive, the body is the payload."""
    encoded = bytearray()
    rest, index = payload, 0
    while rest:
        size = sizes[index % len(sizes)]
        index += 1
        chunk, rest = rest[:size], rest[size:]
        encoded += f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
    encoded += b"0\r\n\r\nNEXT"
    reader = BodyReader(BodyFraming(None, False), MAX_BODY_SIZE)
    used, position, index = 0, 0, 0
    while position < len(encoded) and not reader.done:
        piece = bytes(encoded[position : position + cuts[index % len(cuts)]])
        index += 1
        used += reader.feed(piece)
        position += len(piece)
    assert reader.done and reader.body() == payload and encoded[used:] == b"NEXT"


def test_framing_function_raises_http_errors() -> None:
    """wshub.http keeps its style (HttpError); wshub.api turns it into an ApiError."""
    with pytest.raises(HttpError) as info:
        body_framing(request("POST", "/", ("content-length", "70000")), MAX_BODY_SIZE)
    mapped = api.error_from_http(info.value)
    assert (mapped.status, mapped.code) == (413, ApiErrorCode.BODY_TOO_LARGE)


# -- POST /api/publish ------------------------------------------------------------


def test_publish_defaults() -> None:
    assert parse_publish(body({"content": "hi"})) == PublishRequest(
        RelayKind.BROADCAST, "", "hi", "server", None
    )


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"type": "message"}, {"kind": RelayKind.MESSAGE}),
        ({"type": "broadcast"}, {"kind": RelayKind.BROADCAST}),
        ({"type": None}, {"kind": RelayKind.BROADCAST}),
        ({"room": "Lobby"}, {"room": "Lobby"}),
        ({"room": "r" * 64}, {"room": "r" * 64}),
        ({"room": ""}, {"room": ""}),
        ({"room": None}, {"room": ""}),
        ({"connectionId": "backend-1"}, {"sender": "backend-1"}),
        ({"connectionId": "A.b_c-9"}, {"sender": "A.b_c-9"}),
        ({"connectionId": "s" * 64}, {"sender": "s" * 64}),
        ({"connectionId": "ws"}, {"sender": "ws"}),
        ({"connectionId": "wsx-1"}, {"sender": "wsx-1"}),
        ({"connectionId": "WS-1"}, {"sender": "WS-1"}),  # only ws- is a client's prefix
        ({"connectionId": None}, {"sender": "server"}),
        (
            {"type": "message", "exclude": "ws-1-abcdefghi"},
            {"kind": RelayKind.MESSAGE, "exclude": "ws-1-abcdefghi"},
        ),
        ({"type": "message", "exclude": "x"}, {"kind": RelayKind.MESSAGE, "exclude": "x"}),
        ({"type": "broadcast", "exclude": "ws-1-abcdefghi"}, {"exclude": None}),
        ({"exclude": None}, {"exclude": None}),
        ({"extra": {"deep": [1, 2.5, None]}, "offset": "x"}, {}),  # unknown fields ignored
    ],
)
def test_publish_fields(fields: dict[str, object], expected: dict[str, object]) -> None:
    result = parse_publish(body({"content": "hi", **fields}))
    assert isinstance(result, PublishRequest), result
    values = {"kind": RelayKind.BROADCAST, "room": "", "sender": "server", "exclude": None}
    values.update(expected)
    assert result == PublishRequest(
        values["kind"], values["room"], "hi", values["sender"], values["exclude"]
    )  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({"type": "Message"}, "invalid_request"),
        ({"type": "ping"}, "invalid_request"),
        ({"type": "welcome"}, "invalid_request"),
        ({"type": ""}, "invalid_request"),
        ({"type": 1}, "invalid_request"),
        ({"type": ["message"]}, "invalid_request"),
        ({"room": "r" * 65}, "invalid_request"),
        ({"room": "a b"}, "invalid_request"),
        ({"room": "a/b"}, "invalid_request"),
        ({"room": "%41"}, "invalid_request"),
        ({"room": "caf\u00e9"}, "invalid_request"),
        ({"room": "\ud800"}, "invalid_request"),
        ({"room": 5}, "invalid_request"),
        ({"room": ["x"]}, "invalid_request"),
        ({"connectionId": "ws-1795646809131-y7s0l8kxu"}, "invalid_sender"),
        ({"connectionId": "ws-"}, "invalid_sender"),
        ({"connectionId": "ws-server"}, "invalid_sender"),
        ({"connectionId": ""}, "invalid_sender"),
        ({"connectionId": "s" * 65}, "invalid_sender"),
        ({"connectionId": "a b"}, "invalid_sender"),
        ({"connectionId": "a~b"}, "invalid_sender"),
        ({"connectionId": "a/b"}, "invalid_sender"),
        ({"connectionId": "caf\u00e9"}, "invalid_sender"),
        ({"connectionId": 'a"b'}, "invalid_sender"),
        ({"connectionId": "\ud800"}, "invalid_sender"),
        ({"connectionId": 5}, "invalid_sender"),
        ({"connectionId": True}, "invalid_sender"),
        ({"type": "message", "exclude": 5}, "invalid_request"),
        ({"type": "message", "exclude": ""}, "invalid_request"),
        ({"type": "message", "exclude": "\ud800"}, "invalid_request"),
        ({"exclude": ["ws-1-abcdefghi"]}, "invalid_request"),
    ],
)
def test_publish_field_refused(fields: dict[str, object], code: str) -> None:
    result = error(parse_publish(body({"content": "hi", **fields})))
    assert (result.status, result.code.value) == (400, code)


@pytest.mark.parametrize(
    ("content", "code"),
    [
        (None, "invalid_content"),
        (5, "invalid_content"),
        (True, "invalid_content"),
        (["hi"], "invalid_content"),
        ({"text": "hi"}, "invalid_content"),
        ("", "empty_content"),
        ("   ", "empty_content"),
        ("\n\t \r", "empty_content"),
        ("\u3000", "empty_content"),  # white space by str.strip(), as for clients
        ("x" * 1001, "content_too_long"),
        ("\U0001f600" * 1001, "content_too_long"),
        ("ok \ud800", "invalid_content"),
        ("\udfff", "invalid_content"),
    ],
)
def test_publish_content_refused(content: object, code: str) -> None:
    """Section 5's checks, with section 3's codes, as for a client's frame."""
    result = error(parse_publish(body({"content": content})))
    assert (result.status, result.code.value) == (400, code)


def test_publish_missing_content() -> None:
    result = error(parse_publish(b'{"type":"broadcast"}'))
    assert result.code == ApiErrorCode.INVALID_CONTENT and "missing" in result.message


@pytest.mark.parametrize(
    "content",
    [
        "x" * 1000,
        "\U0001f600" * 1000,  # 1000 code points pass
        "<script>alert(1)</script>",
        "\x00\x1b[31m\u202e",  # data, relayed as it came
        " padded ",
        "\ud83d\ude00",  # a surrogate pair escaped in JSON is one real character
    ],
)
def test_publish_content_accepted(content: str) -> None:
    result = parse_publish(body({"content": content}))
    assert isinstance(result, PublishRequest)
    assert result.content == json.loads(json.dumps(content))


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"   ",
        b"not json",
        b"[]",
        b'["content"]',
        b'"hi"',
        b"null",
        b"1",
        b"true",
        b'{"content":"hi"',
        b'{"content":"hi"}}',
        b'{"content":"hi"} {}',
        b"{'content':'hi'}",
        b'{"content":"hi",}',
        b'{"content":"a\nb"}',  # a raw control character inside a string
        b'{"content":"hi","x":NaN}',
        b'{"content":"hi","x":Infinity}',
        b'{"content":"hi","x":-Infinity}',
        b'{"content":"hi","content":"again"}',  # duplicate keys
        b'{"content":"hi","x":{"a":1,"a":2}}',
        b'\xef\xbb\xbf{"content":"hi"}',  # a byte order mark
        b'{"content":"\xff"}',  # not UTF-8
        b'{"content":"\xed\xa0\x80"}',  # a UTF-8-encoded surrogate: not UTF-8
        '{"content":"hi"}'.encode("utf-16"),
        b'{"content":"hi","x":' + b"[" * 60000 + b"]" * 60000 + b"}",  # deep nesting
        b'{"content":"hi","x":' + b"9" * 5000 + b"}",  # past int()'s digit limit
    ],
)
def test_publish_malformed_body(raw: bytes) -> None:
    result = error(parse_publish(raw))
    assert (result.status, result.code) == (400, ApiErrorCode.INVALID_REQUEST)


def test_publish_json_white_space_allowed() -> None:
    assert isinstance(parse_publish(b' \r\n\t{"content" : "hi"}\n'), PublishRequest)


def test_publication_frame_is_a_clients_frame() -> None:
    """The frame members get: a client's message/broadcast, sender as connectionId."""
    now = 1795646809.131
    content = 'say "hi" \\ <b>\u00e9\U0001f600\n'
    for kind in RelayKind:
        publication = PublishRequest(kind, "Lobby", content, "backend-1.x_y", None)
        frame = api.encode_publication(publication, now)
        assert frame == protocol.encode_relay(kind, "backend-1.x_y", content, now)  # type: ignore[arg-type]
        assert json.loads(frame) == {
            "type": kind.value,
            "connectionId": "backend-1.x_y",
            "content": content,
            "timestamp": "2026-11-25T22:46:49.131Z",
        }


# -- POST /api/disconnect -----------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"connectionId": "ws-1-abcdefghi"}, DisconnectRequest("ws-1-abcdefghi", None, 4000, "")),
        ({"userId": "alice"}, DisconnectRequest(None, "alice", 4000, "")),
        (
            {"userId": "alice", "code": 4999, "reason": "bye"},
            DisconnectRequest(None, "alice", 4999, "bye"),
        ),
        (
            {"connectionId": "x", "userId": None, "code": None},
            DisconnectRequest("x", None, 4000, ""),
        ),
        (
            {"userId": "u", "reason": "\u00e9" * 61 + "a"},
            DisconnectRequest(None, "u", 4000, "\u00e9" * 61 + "a"),
        ),
        (
            {"userId": "u", "reason": "\u20ac" * 41},
            DisconnectRequest(None, "u", 4000, "\u20ac" * 41),
        ),
        ({"userId": "u", "code": 4000, "extra": [1]}, DisconnectRequest(None, "u", 4000, "")),
    ],
)
def test_disconnect_accepted(fields: dict[str, object], expected: DisconnectRequest) -> None:
    assert parse_disconnect(body(fields)) == expected


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"connectionId": None, "userId": None},
        {"connectionId": "ws-1-abcdefghi", "userId": "alice"},
        {"connectionId": ""},
        {"userId": ""},
        {"connectionId": 5},
        {"userId": ["alice"]},
        {"userId": "\ud800"},
        {"userId": "u", "code": 3999},
        {"userId": "u", "code": 5000},
        {"userId": "u", "code": 1000},
        {"userId": "u", "code": -4000},
        {"userId": "u", "code": 4000.0},
        {"userId": "u", "code": "4000"},
        {"userId": "u", "code": True},
        {"userId": "u", "reason": 5},
        {"userId": "u", "reason": "x" * 124},
        {"userId": "u", "reason": "\u20ac" * 42},  # 126 bytes
        {"userId": "u", "reason": "\ud800"},
    ],
)
def test_disconnect_refused(fields: dict[str, object]) -> None:
    result = error(parse_disconnect(body(fields)))
    assert (result.status, result.code) == (400, ApiErrorCode.INVALID_REQUEST)


@pytest.mark.parametrize("raw", [b"", b"[]", b'{"userId":"u","userId":"v"}', b"\xff"])
def test_disconnect_malformed_body(raw: bytes) -> None:
    assert error(parse_disconnect(raw)).code == ApiErrorCode.INVALID_REQUEST


def test_parse_command_by_endpoint() -> None:
    def head(endpoint: Endpoint, room: str = "") -> ApiHead:
        return ApiHead(endpoint, room, BodyFraming(0, False), False)

    assert isinstance(parse_command(head(Endpoint.PUBLISH), body({"content": "x"})), PublishRequest)
    assert isinstance(
        parse_command(head(Endpoint.DISCONNECT), body({"userId": "u"})), DisconnectRequest
    )
    assert parse_command(head(Endpoint.ROOMS), b"") == RoomsRequest()
    assert parse_command(head(Endpoint.ROOM, "Lobby"), b"") == RoomRequest("Lobby")


# -- Errors and answers ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "status"),
    [
        ("unauthorized", 401),
        ("not_found", 404),
        ("method_not_allowed", 405),
        ("body_too_large", 413),
        ("invalid_request", 400),
        ("invalid_sender", 400),
        ("empty_content", 400),
        ("content_too_long", 400),
        ("invalid_content", 400),
        ("unavailable", 503),
    ],
)
def test_error_status_and_body(code: str, status: int) -> None:
    err = ApiError.of(ApiErrorCode(code), 'why \u00e9 "quoted"')
    assert err.status == status
    assert json.loads(encode_error(err)) == {"error": {"code": code, "message": 'why é "quoted"'}}


def test_error_status_must_match_code() -> None:
    with pytest.raises(AssertionError):
        ApiError(400, ApiErrorCode.UNAUTHORIZED, "x")
    assert api.unavailable("backplane down").status == 503


def test_error_messages_do_not_echo_long_values() -> None:
    result = error(check_head(request("GET", "/api/rooms/" + "%" * 5000), keys()))
    assert len(result.message) < 200


def test_answers() -> None:
    assert json.loads(api.encode_published("Lobby", 42, "e-1")) == {
        "room": "Lobby",
        "offset": 42,
        "epoch": "e-1",
    }
    assert json.loads(api.encode_published("", None, None)) == {
        "room": "",
        "offset": None,
        "epoch": None,
    }
    assert json.loads(
        api.encode_rooms([RoomCount("b", 2), RoomCount("", 1), RoomCount("a", 5)])
    ) == {
        "rooms": [
            {"room": "", "connectionCount": 1},
            {"room": "a", "connectionCount": 5},
            {"room": "b", "connectionCount": 2},
        ]
    }
    assert json.loads(api.encode_rooms([])) == {"rooms": []}
    detail = api.encode_room(
        "Lobby",
        [
            ConnectionInfo("ws-1-aaaaaaaaa", "alice", "node-a"),
            ConnectionInfo("ws-2-bbbbbbbbb", None, "node-b"),
        ],
    )
    assert json.loads(detail) == {
        "room": "Lobby",
        "connectionCount": 2,
        "connections": [
            {"connectionId": "ws-1-aaaaaaaaa", "userId": "alice", "node": "node-a"},
            {"connectionId": "ws-2-bbbbbbbbb", "node": "node-b"},  # no userId: anonymous
        ],
    }
    assert json.loads(api.encode_room("", [])) == {
        "room": "",
        "connectionCount": 0,
        "connections": [],
    }
    assert json.loads(api.encode_disconnected(["ws-1-aaaaaaaaa"])) == {
        "disconnected": 1,
        "connections": ["ws-1-aaaaaaaaa"],
    }


@pytest.mark.parametrize(
    ("name", "room", "sender"),
    [
        ("", True, False),
        ("a", True, True),
        ("r" * 64, True, True),
        ("r" * 65, False, False),
        ("a~b", True, False),
        ("ws-x", True, False),
        ("caf\u00e9", False, False),
        ("a\x00", False, False),
    ],
)
def test_names(name: str, room: bool, sender: bool) -> None:
    assert api.is_room_name(name) is room
    assert api.is_sender_name(name) is sender


def test_is_api_path() -> None:
    assert api.is_api_path("/api") and api.is_api_path("/api/") and api.is_api_path("/api/x")
    assert (
        not api.is_api_path("/apix") and not api.is_api_path("/") and not api.is_api_path("/a/api/")
    )


# -- Properties ----------------------------------------------------------------------

FIELD_NAMES = ["type", "room", "content", "connectionId", "exclude", "userId", "code", "reason"]
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**20), max_value=10**20)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=80)
    | st.sampled_from(["message", "broadcast", "Lobby", "ws-1-abcdefghi", "server", 4000]),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3)
    ),
    max_leaves=8,
)
api_objects = st.dictionaries(
    st.sampled_from(FIELD_NAMES) | st.text(max_size=8), json_values, max_size=6
)
bodies = (
    st.binary(max_size=2000)
    | api_objects.map(lambda obj: json.dumps(obj).encode())
    | api_objects.map(
        lambda obj: json.dumps(obj, ensure_ascii=False).encode("utf-8", "surrogatepass")
    )
    | st.builds(lambda obj, cut: json.dumps(obj).encode()[:cut], api_objects, st.integers(0, 60))
)
header_values = st.text(max_size=60) | st.sampled_from(
    [f"Bearer {KEY}", "Bearer wrong", "chunked", "0", "17", "70000", "100-continue", "-1"]
)
header_lists = st.lists(
    st.tuples(
        st.sampled_from(
            ["authorization", "content-length", "transfer-encoding", "expect", "content-type", "x"]
        ),
        header_values,
    ),
    max_size=6,
)
targets = st.sampled_from(
    ["/api/publish", "/api/disconnect", "/api/rooms", "/api/rooms/", "/api/rooms/Lobby", "/api"]
) | st.text(max_size=30).map(lambda t: "/api/" + t)
methods = st.sampled_from(["GET", "POST", "HEAD", "PUT", "DELETE", "OPTIONS"]) | st.text(max_size=8)


def assert_valid_command(command: object) -> None:
    """A command is valid once constructed: every field within its rules."""
    if isinstance(command, PublishRequest):
        assert api.is_room_name(command.room) and api.is_sender_name(command.sender)
        assert isinstance(protocol.check_content(command.kind, command.content), protocol.Relay)
        assert command.exclude is None or command.kind is RelayKind.MESSAGE
    elif isinstance(command, DisconnectRequest):
        assert (command.connection_id is None) != (command.user_id is None)
        assert 4000 <= command.code <= 4999
        assert len(command.reason.encode("utf-8")) <= api.MAX_REASON_BYTES
    else:
        assert isinstance(command, RoomsRequest | RoomRequest)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    method=methods,
    target=targets,
    headers=header_lists,
    raw=bodies,
    with_key=st.booleans(),
    with_length=st.booleans(),
)
def test_any_request_gives_a_command_or_an_api_error(
    method: str,
    target: str,
    headers: list[tuple[str, str]],
    raw: bytes,
    with_key: bool,
    with_length: bool,
) -> None:
    """Arbitrary heads and bodies never raise: a valid command, or an ApiError
    with a status in {400, 401, 404, 405, 413} and a JSON body."""
    if with_length:  # a well-framed body, so that its content is what is tested
        headers = [*headers, ("content-length", str(len(raw)))]
    req = Request(method, target, (("host", "h"), *((AUTH,) if with_key else ()), *headers))
    result: object = check_head(req, keys())
    if isinstance(result, ApiHead):
        reader = result.reader()
        try:
            used = reader.feed(raw)
        except HttpError as exc:
            result = api.error_from_http(exc)
        else:
            assert 0 <= used <= len(raw)
            if reader.done:
                result = parse_command(result, reader.body())
            else:
                result = None  # waiting for more of the body: a valid state
    if isinstance(result, ApiError):
        assert result.status in {400, 401, 404, 405, 413}
        assert result.status == {
            ApiErrorCode.UNAUTHORIZED: 401,
            ApiErrorCode.NOT_FOUND: 404,
            ApiErrorCode.METHOD_NOT_ALLOWED: 405,
            ApiErrorCode.BODY_TOO_LARGE: 413,
        }.get(result.code, 400)
        assert json.loads(encode_error(result))["error"]["code"] == result.code.value
    elif result is not None:
        assert_valid_command(result)
    if not any(name == "authorization" for name, _ in req.headers):
        assert isinstance(result, ApiError) and result.status == 401


@settings(max_examples=400, deadline=None)
@given(raw=bodies, parse=st.sampled_from([parse_publish, parse_disconnect]))
def test_any_body_gives_a_valid_command_or_a_400(
    raw: bytes, parse: Callable[[bytes], object]
) -> None:
    result = parse(raw)
    if isinstance(result, ApiError):
        assert result.status == 400
    else:
        assert_valid_command(result)


BEARER = re.compile(rf"[ \t]*(?i:bearer) [ \t]*{re.escape(KEY)}[ \t]*", re.ASCII)


@settings(max_examples=300, deadline=None)
@given(
    header=st.none()
    | st.text(max_size=200)
    | st.builds(
        lambda before, scheme, gap, key, after: f"{before}{scheme}{gap}{key}{after}",
        st.sampled_from(["", " ", "\t", "x"]),
        st.sampled_from(["Bearer", "bearer", "BEARER", "Bearer:", "Basic", ""]),
        st.sampled_from([" ", "  ", "\t", "", " \t"]),
        st.sampled_from([KEY, KEY[:-1], KEY + "x", KEY.upper(), ""]),
        st.sampled_from(["", " ", "\t", "\n", "x", " x"]),
    )
)
def test_any_authorization_header_is_checked_without_raising(header: str | None) -> None:
    expected = header is not None and BEARER.fullmatch(header) is not None
    assert keys().check(header) is expected


# -- Options --------------------------------------------------------------------------


def test_api_options_from_every_source(tmp_path) -> None:
    toml = tmp_path / "wshub.toml"
    toml.write_text(f'api-keys = ["{KEY}", "{OTHER_KEY}"]\napi-listen = "10.0.0.5:8788"\n')
    c = build_config(["--config", str(toml)], {})
    assert c.api_keys == (KEY, OTHER_KEY) and c.api_listen_address == ("10.0.0.5", 8788)
    c = build_config([], {"WSHUB_API_KEYS": f"{KEY}, {OTHER_KEY}", "WSHUB_API_KEYS_FILE": "/k"})
    assert c.api_keys == (KEY, OTHER_KEY) and c.api_keys_file == "/k"
    c = build_config(["--api-keys", KEY, "--api-listen", "[::1]:0"], {})
    assert c.api_listen_address == ("::1", 0)
    assert Config().api_keys == () and Config().api_listen_address is None


@pytest.mark.parametrize(
    "value",
    [
        "8788",
        "host",
        "host:",
        ":8788",
        "host:port",
        "host:70000",
        "::1:8788",
        "[]:80",
        "h:-1",
        "h:8\u0668",
    ],
)
def test_api_listen_refused(value: str) -> None:
    with pytest.raises(ConfigError, match="--api-listen"):
        build_config(["--api-keys", KEY, "--api-listen", value], {})


def test_api_listen_needs_a_key_and_its_own_address() -> None:
    with pytest.raises(ConfigError, match="--api-listen: the API is off"):
        build_config(["--api-listen", "127.0.0.1:8788"], {})
    with pytest.raises(ConfigError, match="must differ"):
        build_config(["--api-keys", KEY, "--api-listen", "127.0.0.1:8787"], {})
    assert build_config(["--api-keys-file", "/k", "--api-listen", "127.0.0.1:8788"], {})


def test_keys_never_printed_by_the_config() -> None:
    """Not in the repr (what a log line of the config would show), not in an
    error about a bad key, from a flag, the environment or a file."""
    config = build_config(["--api-keys", f"{KEY},{OTHER_KEY}"], {})
    assert KEY not in repr(config) and KEY not in str(config) and OTHER_KEY not in repr(config)
    for flags, env in (
        (["--api-keys", f"{KEY},bad key"], {}),
        ([], {"WSHUB_API_KEYS": f"{KEY},bad\u00e9key"}),
    ):
        with pytest.raises(ConfigError, match="--api-keys") as info:
            build_config(flags, env)
        assert KEY not in str(info.value) and "bad" not in str(info.value)


def test_serving_with_keys_keeps_them_out_of_logs_and_stats(make_server) -> None:
    """A real server started with keys (debug logging, JSON logs): the keys
    appear in no log line and not in /stats."""
    server = make_server(
        "--api-keys",
        f"{KEY},{OTHER_KEY}",
        "--log-level",
        "debug",
        "--log-format",
        "json",
    )
    client = server.client()
    client.send({"type": "broadcast", "content": "hi"})
    client.recv_type("broadcast")
    stats = json.dumps(server.stats())
    _, _, metrics = server.get("/metrics")
    client.close()
    server.stop()
    logs = "".join(server.stderr_lines)
    assert "listening" in logs and '"open"' in logs  # the log did write
    for text in (stats, metrics.decode(), logs):
        assert KEY not in text and OTHER_KEY not in text
