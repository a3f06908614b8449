"""Log setup: one line per event, as text or JSON.

What is logged (message contents never are):

* INFO: server start and stop; each connection opened (id, peer, client IP,
  origin) and closed (id, peer, close code, duration); each refused request
  (peer, status, reason); heartbeat timeouts and rate-limit closes.
* WARNING: slow consumers, failed sends, backplane state changes.
* ERROR: unexpected exceptions.
"""

from __future__ import annotations

import json
import logging
import sys
import time

__all__ = ["log_event", "setup_logging"]


def log_event(logger: logging.Logger, level: int, event: str, **fields: object) -> None:
    """Log *event* with *fields*: ``event k=v ...`` as text, or keys of the
    JSON object with ``--log-format json``."""
    if not logger.isEnabledFor(level):
        return
    text = " ".join([event, *(f"{key}={_text_value(value)}" for key, value in fields.items())])
    logger.log(level, text, extra={"event": event, "fields": fields})


def _text_value(value: object) -> str:
    if value is None:
        return "-"
    text = str(value)
    if not text or any(c.isspace() or c in '"=' for c in text):
        return json.dumps(text, ensure_ascii=False)
    return text


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
        return json.dumps(entry, ensure_ascii=False, default=str)


def setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        formatter = logging.Formatter(
            "%(asctime)s.%(msecs)03dZ %(levelname)s %(name)s %(message)s", "%Y-%m-%dT%H:%M:%S"
        )
        formatter.converter = time.gmtime
        handler.setFormatter(formatter)
    root = logging.getLogger("wshub")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
