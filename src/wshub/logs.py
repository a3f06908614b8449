"""Log setup: one line per event, as text or JSON.

What is logged (message contents never are):

* INFO: server start and stop; each connection opened (id, peer, client IP,
  origin) and closed (id, peer, close code, duration); each refused request
  (peer, status, reason); heartbeat timeouts and rate-limit closes.
* WARNING: slow consumers, failed sends, backplane state changes.
* ERROR: unexpected exceptions.

What a client controls never forges or floods the log (issue 19.4, 19.8):

* every character that is not printable (C0 and C1 controls, DEL, U+0085,
  U+2028, U+2029, format characters such as bidi overrides) is written as a
  ``\\uXXXX`` escape, in text and JSON alike, and in lines from any logger;
  values are escaped once;
* a string field of :func:`log_event` is cut at :data:`MAX_FIELD` characters
  (its full length noted);
* lines a client can cause at will (refused requests) go through a
  :class:`LineLimiter`: a token bucket per kind, and the next line that passes
  says how many were suppressed.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Hashable

from .ratelimit import TokenBucket

__all__ = ["MAX_FIELD", "LineLimiter", "escape_unprintable", "log_event", "setup_logging"]

MAX_FIELD = 200
"""Characters of one logged string field (a header value, a close reason)."""


def _unprintable_class() -> str:
    """A regex character class of everything ``str.isprintable()`` refuses
    (controls, separators such as U+2028, format characters, unassigned code
    points), as ranges. Built once at import: the regex then scans in C."""
    ranges: list[str] = []
    start = -1
    for code in range(0x110001):
        bad = code < 0x110000 and not chr(code).isprintable()
        if bad and start < 0:
            start = code
        elif not bad and start >= 0:
            end = code - 1
            span = re.escape(chr(start))
            ranges.append(span + "-" + re.escape(chr(end)) if end > start else span)
            start = -1
    return "[" + "".join(ranges) + "]"


_UNPRINTABLE = re.compile(_unprintable_class())


def _escape_char(match: re.Match[str]) -> str:
    code = ord(match.group())
    if code > 0xFFFF:  # as a JSON surrogate pair, so JSON lines stay valid JSON
        code -= 0x10000
        return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"
    return f"\\u{code:04x}"


def escape_unprintable(text: str) -> str:
    """*text* with every non-printable character as a ``\\uXXXX`` escape
    (space stays as it is)."""
    if text.isprintable():
        return text
    return _UNPRINTABLE.sub(_escape_char, text)


def _clip(value: object) -> object:
    if isinstance(value, str) and len(value) > MAX_FIELD:
        return value[:MAX_FIELD] + f"...[{len(value)} chars]"
    return value


class LineLimiter:
    """At most *rate* lines per second (burst *burst*) for each kind of line.

    Pure: the caller passes the time. :meth:`allow` returns None when the
    line is to be dropped, else how many lines of that kind were dropped
    since the last one that passed (to be logged with it).
    """

    def __init__(self, rate: float = 5.0, burst: float = 20.0) -> None:
        self.rate = rate
        self.burst = burst
        self._buckets: dict[Hashable, TokenBucket] = {}
        self._suppressed: dict[Hashable, int] = {}

    def allow(self, kind: Hashable, now: float) -> int | None:
        bucket = self._buckets.get(kind)
        if bucket is None:
            bucket = self._buckets[kind] = TokenBucket(self.rate, self.burst, now)
        if not bucket.take(now):
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            return None
        return self._suppressed.pop(kind, 0)

    def take_suppressed(self) -> dict[Hashable, int]:
        """The counts not reported yet (for a periodic summary line), reset."""
        suppressed, self._suppressed = self._suppressed, {}
        return suppressed


def log_event(logger: logging.Logger, level: int, event: str, **fields: object) -> None:
    """Log *event* with *fields*: ``event k=v ...`` as text, or keys of the
    JSON object with ``--log-format json``."""
    if not logger.isEnabledFor(level):
        return
    fields = {key: _clip(value) for key, value in fields.items()}
    text = " ".join([event, *(f"{key}={_text_value(value)}" for key, value in fields.items())])
    logger.log(level, text, extra={"event": event, "fields": fields})


def _text_value(value: object) -> str:
    if value is None:
        return "-"
    text = str(value)
    if not text or not text.isprintable() or any(c in ' "=' for c in text):
        # json.dumps leaves U+0085, U+2028, C1 controls... as they are.
        return escape_unprintable(json.dumps(text, ensure_ascii=False))
    return text


class TextFormatter(logging.Formatter):
    """The text format; a message from any logger is escaped (see above)."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging's name
        record.message = escape_unprintable(record.message)
        return super().formatMessage(record)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        event = getattr(record, "event", None)
        if event is not None:
            entry["event"] = event
            entry.update(getattr(record, "fields", {}))
        else:
            entry["message"] = record.getMessage()
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        # Non-printable characters can only be inside JSON strings here, so
        # escaping them keeps the line valid JSON and on one line.
        return escape_unprintable(json.dumps(entry, ensure_ascii=False, default=str))


def setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        formatter = TextFormatter(
            "%(asctime)s.%(msecs)03dZ %(levelname)s %(name)s %(message)s", "%Y-%m-%dT%H:%M:%S"
        )
        formatter.converter = time.gmtime
        handler.setFormatter(formatter)
    root = logging.getLogger("wshub")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
