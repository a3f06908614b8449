"""wshub.protocol: client frames to commands, server messages to bytes."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wshub import protocol
from wshub.ids import ConnectionId
from wshub.protocol import ErrorCode, Refusal, Relay, RelayKind, parse_client_text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"type":"message","content":"hi"}', Relay(RelayKind.MESSAGE, "hi")),
        ('{"type":"broadcast","content":"all","x":1}', Relay(RelayKind.BROADCAST, "all")),
        ('  {"type":"ping"}  ', protocol.PING),
        ('{"type":"pong","timestamp":1}', protocol.PONG),
        ('{"type":"user_info"}', protocol.USER_INFO),
        ("plain", Relay(RelayKind.MESSAGE, "plain")),
        ('"json string"', Relay(RelayKind.MESSAGE, '"json string"')),
        ("[1]", Relay(RelayKind.MESSAGE, "[1]")),
        ("null", Relay(RelayKind.MESSAGE, "null")),
        (
            '{"type":"message","content":Infinity}',
            Relay(RelayKind.MESSAGE, '{"type":"message","content":Infinity}'),
        ),
        ('{"type":"ping","type":"user_info"}', protocol.USER_INFO),  # last duplicate wins
        ('\r\n\t {"type":"message","content":"ws"}\n', Relay(RelayKind.MESSAGE, "ws")),
        ('{"type":"ping"} x', Relay(RelayKind.MESSAGE, '{"type":"ping"} x')),  # extra data
        ('{"type":"ping"}{}', Relay(RelayKind.MESSAGE, '{"type":"ping"}{}')),
        ('{"type":"ping"', Relay(RelayKind.MESSAGE, '{"type":"ping"')),  # unfinished
        ('\ufeff{"type":"ping"}', Relay(RelayKind.MESSAGE, '\ufeff{"type":"ping"}')),  # BOM
        ('{"type":"message","content":"\\u00e9"}', Relay(RelayKind.MESSAGE, "é")),
    ],
)
def test_parse_valid(text: str, expected: object) -> None:
    assert parse_client_text(text) == expected


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("{}", ErrorCode.MISSING_TYPE),
        ('{"type":1}', ErrorCode.MISSING_TYPE),
        ('{"type":"nope"}', ErrorCode.UNKNOWN_TYPE),
        ('{"type":"user_joined"}', ErrorCode.UNKNOWN_TYPE),
        ('{"type":"message","content":{}}', ErrorCode.INVALID_CONTENT),
        ('{"type":"message","content":"\\ud83d"}', ErrorCode.INVALID_CONTENT),
        ('{"type":"broadcast","content":"a\\uDC00b"}', ErrorCode.INVALID_CONTENT),
        ('{"type":"message","content":"  "}', ErrorCode.EMPTY_CONTENT),
        ("\n", ErrorCode.EMPTY_CONTENT),
        ("a" * 1001, ErrorCode.CONTENT_TOO_LONG),
    ],
)
def test_parse_refused(text: str, code: ErrorCode) -> None:
    result = parse_client_text(text)
    assert isinstance(result, Refusal) and result.code is code and result.message


def test_surrogate_pair_escape_is_a_real_character() -> None:
    assert parse_client_text('{"type":"message","content":"\\ud83d\\ude00"}') == Relay(
        RelayKind.MESSAGE, "😀"
    )


def test_hostile_json_is_plain_text() -> None:
    deep = "[" * 100_000 + "]" * 100_000
    result = parse_client_text(deep)
    assert isinstance(result, Refusal) and result.code is ErrorCode.CONTENT_TOO_LONG
    deep_object = '{"a":' * 100_000 + "1" + "}" * 100_000
    assert isinstance(parse_client_text(deep_object), Refusal)  # plain text, too long
    long_number = '{"type":"message","content":"x","n":' + "9" * 5000 + "}"
    assert isinstance(parse_client_text(long_number), Refusal)  # plain text, too long
    short_deep = '{"a":' * 300 + "1" + "}" * 300
    assert isinstance(parse_client_text(short_deep[:1000]), Relay)


def test_unknown_type_is_named_but_bounded() -> None:
    result = parse_client_text(json.dumps({"type": "x" * 500}))
    assert isinstance(result, Refusal) and len(result.message) < 120
    lone = parse_client_text('{"type":"\\ud800"}')
    assert isinstance(lone, Refusal)
    lone.message.encode("utf-8")  # safe to send


def test_iso_timestamp() -> None:
    assert protocol.iso_timestamp(0) == "1970-01-01T00:00:00.000Z"
    assert protocol.iso_timestamp(1795638000.1239) == "2026-11-25T20:20:00.123Z"


def test_encoders_match_the_seed_shapes() -> None:
    cid = ConnectionId("ws-1-abcdefghi")
    now = 1795638000.5
    welcome = json.loads(protocol.encode_welcome(cid, 3, now))
    assert welcome == {
        "type": "welcome",
        "connectionId": cid,
        "timestamp": "2026-11-25T20:20:00.500Z",
        "connectionCount": 3,
        "room": "",  # the seed's fields, and the room (decisions.md 12)
    }
    assert json.loads(protocol.encode_welcome(cid, 3, now, "Lobby"))["room"] == "Lobby"
    info = json.loads(protocol.encode_user_info_response(cid, 2, now, "Lobby"))
    assert info["room"] == "Lobby" and info["connectionCount"] == 2
    assert json.loads(protocol.encode_user_joined(cid, 4, now))["totalUsers"] == 4
    assert json.loads(protocol.encode_user_left(cid, 2, now))["type"] == "user_left"
    assert json.loads(protocol.encode_ping(now)) == {"type": "ping", "timestamp": 1795638000500}
    assert json.loads(protocol.encode_pong(now)) == {"type": "pong", "timestamp": 1795638000500}
    message = protocol.encode_relay(RelayKind.MESSAGE, cid, "é\u0000<b>", now)
    assert json.loads(message)["content"] == "é\u0000<b>"
    message.decode("utf-8")
    error = json.loads(protocol.encode_error(Refusal(ErrorCode.RATE_LIMITED, "slow")))
    assert error == {"type": "error", "message": "slow", "code": "rate_limited"}
    info = json.loads(protocol.encode_user_info_response(cid, 7, now))
    assert info["connectionCount"] == 7 and info["type"] == "user_info_response"


def test_relay_fast_path_matches_generic_encoding() -> None:
    """encode_relay's hand-built JSON equals what json.dumps gives."""
    import json as _json

    cid = ConnectionId("ws-1795650196889-6lzccbwhy")
    for content in ["plain", 'quote " and \\ backslash', "é😀\u2028\u0000\x1f</script>", "\ud7ff"]:
        for kind in RelayKind:
            fast = protocol.encode_relay(kind, cid, content, 1795650196.889)
            generic = _json.dumps(
                {
                    "type": kind.value,
                    "connectionId": cid,
                    "content": content,
                    "timestamp": protocol.iso_timestamp(1795650196.889),
                },
                ensure_ascii=False,
                separators=(",", ":"),
            ).encode()
            assert fast == generic


def test_iso_timestamp_cache_keeps_to_its_millisecond() -> None:
    assert protocol.iso_timestamp(100.0011) == "1970-01-01T00:01:40.001Z"
    assert protocol.iso_timestamp(100.0019) == "1970-01-01T00:01:40.001Z"  # the same one
    assert protocol.iso_timestamp(100.002) == "1970-01-01T00:01:40.002Z"
    assert protocol.iso_timestamp(99.0011) == "1970-01-01T00:01:39.001Z"  # same ms, other s
    assert protocol.iso_timestamp(100.0011) == "1970-01-01T00:01:40.001Z"


def test_iso_timestamp_cache_crosses_seconds() -> None:
    assert protocol.iso_timestamp(59.999) == "1970-01-01T00:00:59.999Z"
    assert protocol.iso_timestamp(60.0) == "1970-01-01T00:01:00.000Z"
    assert protocol.iso_timestamp(59.5) == "1970-01-01T00:00:59.500Z"


# The plain relay's shortcut (protocol._plain_relay) must give exactly what the
# JSON path gives, for any text that looks like it: the characters below are
# those where the two could part (quotes, escapes, controls, white space, DEL,
# non-ASCII, a lone surrogate's escape).
_EDGE_CHARS = ' !"#\\[]~\x7f\x00\x1f\t\n\r\x0b\x0c\x1c\x85\xa0\u2028\u3000éx/ud80'


@given(
    head=st.sampled_from(
        [
            '{"type":"message","content":"',
            '{"type":"broadcast","content":"',
            '{"type":"message", "content":"',
            '{"type":"messages","content":"',
        ]
    ),
    content=st.text(alphabet=_EDGE_CHARS, max_size=12) | st.text(max_size=12),
    tail=st.sampled_from(['"}', '"} ', '"}}', "}", '","x":1}', '"']),
    long=st.sampled_from([0, 1, 990, 1000]),
)
@settings(max_examples=800, deadline=None)
def test_plain_relay_shortcut_agrees_with_json(
    head: str, content: str, tail: str, long: int
) -> None:
    text = head + "y" * long + content + tail
    assert parse_client_text(text) == protocol._parse_full(text, False)
    assert parse_client_text(text, refresh=True) == protocol._parse_full(text, True)


@pytest.mark.parametrize(
    "content",
    ["hi", "~#1764112345678901234 s123 c0 " + "x" * 70, "a b!#[]~", "x" * 1000],
)
def test_plain_relay_takes_the_shortcut(content: str) -> None:
    for kind in RelayKind:
        text = f'{{"type":"{kind.value}","content":"{content}"}}'
        assert protocol._plain_relay(text) == Relay(kind, content)
        assert parse_client_text(text) == Relay(kind, content)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("", Refusal(ErrorCode.EMPTY_CONTENT, "Message content cannot be empty")),
        (" \\t ", Refusal(ErrorCode.EMPTY_CONTENT, "Message content cannot be empty")),
        (
            "x" * 1001,
            Refusal(
                ErrorCode.CONTENT_TOO_LONG, "Message too long: 1001 characters, the limit is 1000"
            ),
        ),
        (
            "\\ud800",
            Refusal(
                ErrorCode.INVALID_CONTENT,
                "Message content holds a lone surrogate, which is not a character",
            ),
        ),
        ('a\\"b', Relay(RelayKind.MESSAGE, 'a"b')),
        ("a\\u00e9", Relay(RelayKind.MESSAGE, "aé")),
        ("é", Relay(RelayKind.MESSAGE, "é")),
    ],
)
def test_plain_relay_gives_the_full_paths_outcome(content: str, expected: object) -> None:
    """Escapes decoded, refusals given: the shortcut's answer is the full path's."""
    text = f'{{"type":"message","content":"{content}"}}'
    assert protocol._plain_relay(text) == expected
    assert parse_client_text(text) == expected == protocol._parse_full(text, False)


@pytest.mark.parametrize(
    "text",
    [
        '{"type":"message","content":"a\tb"}',  # a raw control character: plain text
        '{"type":"message","content":"a"b"}',  # the string ends early
        '{"type":"message","content":"a" }',
        '{"type":"message","content":"a","x":1}',
        '{"type":"message","content":"a\\"}',  # an escaped quote: unfinished
    ],
)
def test_plain_relay_leaves_the_rest_to_the_json_path(text: str) -> None:
    assert protocol._plain_relay(text) is None
    assert parse_client_text(text) == protocol._parse_full(text, False)
