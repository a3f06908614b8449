"""wshub.logs, metrics labels and page headers: the pure parts of issue 19."""

from __future__ import annotations

import json
import logging

import pytest

from wshub.http import page_headers
from wshub.logs import MAX_FIELD, JsonFormatter, LineLimiter, TextFormatter, escape_unprintable
from wshub.metrics import close_code_label


@pytest.mark.parametrize(
    "char", ["\u2028", "\u2029", "\u0085", "\u009b", "\x1b", "\x00", "\r", "\n", "\x7f", "\u202e"]
)
def test_every_unprintable_character_is_escaped(char: str) -> None:
    out = escape_unprintable(f"a{char}b")
    assert out == f"a\\u{ord(char):04x}b" and out.isprintable()


def test_printable_text_is_left_alone() -> None:
    assert escape_unprintable("héllo wörld 中文 😀") == "héllo wörld 中文 😀"


def _record(message: str, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("wshub", logging.INFO, __file__, 1, message, (), None)
    for key, value in extra.items():
        setattr(record, key, value)
    return record


def test_formatters_write_one_line_whatever_the_message() -> None:
    forged = "x\u2028INFO forged\u0085line\u009b31m"
    text = TextFormatter("%(message)s").format(_record(forged))
    assert text.isprintable()
    line = JsonFormatter().format(_record(forged, event="e", fields={"v": forged}))
    assert line.isprintable() and json.loads(line)["v"] == forged


def test_line_limiter_counts_what_it_suppressed() -> None:
    limiter = LineLimiter(rate=1.0, burst=2.0)
    assert [limiter.allow("origin", 0.0) for _ in range(5)] == [0, 0, None, None, None]
    assert limiter.allow("other", 0.0) == 0  # one bucket per kind
    assert limiter.allow("origin", 1.0) == 3
    limiter.allow("origin", 1.0)
    limiter.allow("origin", 1.0)
    assert limiter.take_suppressed() == {"origin": 2}
    assert limiter.take_suppressed() == {}


def test_max_field_is_a_few_hundred_characters() -> None:
    assert 100 <= MAX_FIELD <= 500


@pytest.mark.parametrize(
    ("code", "label"),
    [
        (1000, "1000"),
        (1008, "1008"),
        (1015, "1015"),
        (4401, "4401"),
        (3000, "3000-3999"),
        (3999, "3000-3999"),
        (4000, "4000-4999"),
        (4998, "4000-4999"),
        (2999, "other"),
        (5000, "other"),
        (1016, "other"),
    ],
)
def test_close_code_labels_are_bounded(code: int, label: str) -> None:
    assert close_code_label(code) == label


def test_page_headers_hash_the_inline_blocks() -> None:
    headers = dict(page_headers(b"<style>a{}</style><script>x()</script>"))
    csp = headers["Content-Security-Policy"]
    assert "script-src 'sha256-" in csp and "style-src 'sha256-" in csp
    assert "frame-ancestors 'none'" in csp and "default-src 'none'" in csp
    assert headers["X-Frame-Options"] == "DENY"
