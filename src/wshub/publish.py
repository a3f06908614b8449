"""``wshub publish URL CONTENT``: the command-line client of ``POST /api/publish``.

It sends one publication to a hub's backend API (docs/api.md) and prints the
JSON answer on standard output: ``{"room", "offset", "epoch"}``, or the
``{"error": {...}}`` the server gave, with a one-line explanation on standard
error.

The key comes from ``--api-key`` or, better (a flag shows in the process
list), the ``WSHUB_API_KEY`` environment variable. ``CONTENT`` ``-`` reads the
content from standard input.

Exit status: 0 when the publication was accepted; 1 when the server refused
it (the error code is printed) or could not be reached; 2 for a usage error.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import ssl
import sys
from dataclasses import dataclass
from typing import TextIO
from urllib.parse import urlsplit

from . import __version__
from .api import key_problem
from .client import add_tls_arguments, tls_context

__all__ = ["PublishAnswer", "main", "publish", "publish_url"]

KEY_ENV = "WSHUB_API_KEY"
_PUBLISH_PATH = "/api/publish"
# The end of a clients' URL (/websocket, /websocket/ROOM): the API is beside it.
_WEBSOCKET_PATH = re.compile(r"/websocket(?:/(?P<room>[^/]+))?$")


@dataclass(frozen=True, slots=True)
class PublishAnswer:
    status: int
    body: bytes
    content_type: str


def url_room(url: str) -> str | None:
    """The room a WebSocket URL names (``.../websocket/ROOM``), which
    ``wshub publish`` publishes into without ``--room``; None for the default
    room (``.../websocket``) and for a URL naming no WebSocket endpoint."""
    if "://" not in url:
        return None
    endpoint = _WEBSOCKET_PATH.search(urlsplit(url).path.rstrip("/"))
    return None if endpoint is None else endpoint.group("room")


def publish_url(url: str) -> tuple[str, str, int | None, str]:
    """``(scheme, host, port, path)`` of the publish endpoint for *url*.

    Accepts ``HOST:PORT``, ``http(s)://`` and ``ws(s)://`` URLs (the same
    address as the WebSocket endpoint, ``/websocket`` or ``/websocket/ROOM``
    included: that part is dropped, see :func:`url_room`); a URL whose path
    does not already end in ``/api/publish`` gets it appended, so a hub behind
    a path prefix works.

    Raises:
        ValueError: not a URL of a server.
    """
    if "://" not in url:
        url = "http://" + url
    parts = urlsplit(url)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme.lower(), parts.scheme.lower())
    if scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s):// URL of a server: {url!r}")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"bad port in {url!r}") from None
    path = parts.path.rstrip("/")
    endpoint = _WEBSOCKET_PATH.search(path)
    if endpoint is not None:  # the clients' address: the API is beside it
        path = path[: endpoint.start()]
    if not path.endswith(_PUBLISH_PATH):
        path += _PUBLISH_PATH
    return scheme, parts.hostname, port, path


def publish(
    url: str,
    fields: dict[str, str],
    api_key: str,
    *,
    timeout: float = 10.0,
    tls_context: ssl.SSLContext | None = None,
) -> PublishAnswer:
    """POST *fields* as the JSON body of ``/api/publish`` at *url*.

    *tls_context* is used for ``https://`` (default: the system's trusted
    certificates); ``--ca-file`` and ``--insecure`` make it.

    Raises:
        ValueError: *url* is not a server's URL.
        OSError: the server could not be reached (http.client's errors too).
    """
    scheme, host, port, path = publish_url(url)
    connection: http.client.HTTPConnection
    if scheme == "https":
        context = tls_context or ssl.create_default_context()
        connection = http.client.HTTPSConnection(host, port, timeout=timeout, context=context)
    else:
        connection = http.client.HTTPConnection(host, port, timeout=timeout)
    body = json.dumps(fields, ensure_ascii=False).encode("utf-8", "surrogatepass")
    try:
        connection.request(
            "POST",
            path,
            body=body,
            headers={
                "Authorization": f"Bearer {api_key}",
                "Content-Type": "application/json",
                "User-Agent": f"wshub-publish/{__version__}",
            },
        )
        response = connection.getresponse()
        return PublishAnswer(
            response.status, response.read(), response.getheader("Content-Type", "")
        )
    finally:
        connection.close()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wshub publish",
        description="Publish CONTENT into a room through a hub's backend API "
        "(POST /api/publish) and print the JSON answer.",
    )
    parser.add_argument(
        "url",
        metavar="URL",
        help="the hub, e.g. http://127.0.0.1:8787, or a clients' URL such as "
        "ws://127.0.0.1:8787/websocket/ROOM (then ROOM is the default of --room)",
    )
    parser.add_argument("content", metavar="CONTENT", help="the text to publish; - reads stdin")
    parser.add_argument("--room", help="the room (default: the default room)")
    parser.add_argument(
        "--type",
        choices=("broadcast", "message"),
        default="broadcast",
        help="broadcast reaches every member; message every member but --exclude",
    )
    parser.add_argument(
        "--api-key",
        metavar="KEY",
        help=f"the API key (default: ${KEY_ENV}, which does not show in the process list)",
    )
    parser.add_argument(
        "--sender",
        metavar="NAME",
        help="the connectionId clients see (default: server; never starting ws-)",
    )
    parser.add_argument("--exclude", metavar="ID", help="a connection a message skips")
    parser.add_argument(
        "--timeout", type=float, default=10.0, metavar="SECONDS", help="default: 10"
    )
    add_tls_arguments(parser)  # --ca-file, --insecure: the same as wshub client's
    return parser


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def _explain(answer: PublishAnswer) -> str:
    """One line saying why the server refused the publication."""
    try:
        error = json.loads(answer.body)["error"]
        return f"{error['code']} ({answer.status}): {error['message']}"
    except (ValueError, KeyError, TypeError):
        pass
    text = answer.body[:200].decode("utf-8", "replace").strip()
    hint = " (is the API on? it needs --api-keys on the server)" if answer.status == 404 else ""
    return f"HTTP {answer.status}, not an API answer{hint}: {text!r}"


def main(
    argv: list[str] | None = None,
    *,
    environ: dict[str, str] | None = None,
    stdin: TextIO | None = None,
) -> int:
    """Run ``wshub publish``; return the exit status."""
    args = _parser().parse_args(argv)
    environ = dict(os.environ) if environ is None else environ
    key = args.api_key or environ.get(KEY_ENV, "")
    if not key:
        print(f"wshub publish: no API key: give --api-key or set {KEY_ENV}", file=sys.stderr)
        return 2
    problem = key_problem(key)
    if problem is not None:
        print(f"wshub publish: {problem}", file=sys.stderr)
        return 2
    if not args.timeout > 0:
        print("wshub publish: --timeout must be a positive number of seconds", file=sys.stderr)
        return 2
    content = args.content
    if content == "-":
        content = (stdin or sys.stdin).read().removesuffix("\n")
    fields = {"type": args.type, "content": content}
    room = args.room if args.room is not None else url_room(args.url)
    for name, value in (("room", room), ("connectionId", args.sender)):
        if value is not None:
            fields[name] = value
    if args.exclude is not None:
        fields["exclude"] = args.exclude
    try:
        secure = publish_url(args.url)[0] == "https"
        if (args.ca_file or args.insecure) and not secure:
            raise ValueError("--ca-file and --insecure need an https:// or wss:// URL")
        context = tls_context(args.ca_file, args.insecure) if secure else None
    except ValueError as exc:
        print(f"wshub publish: {exc}", file=sys.stderr)
        return 2
    try:
        answer = publish(args.url, fields, key, timeout=args.timeout, tls_context=context)
    except (OSError, http.client.HTTPException) as exc:
        # An untrusted certificate (ssl.SSLCertVerificationError, an OSError and a
        # ValueError both) is a server that could not be reached, not a usage error.
        hint = ""
        if isinstance(exc, ssl.SSLCertVerificationError):
            hint = " (--ca-file FILE trusts a private CA; --insecure skips the check)"
        print(f"wshub publish: cannot reach {args.url}: {exc}{hint}", file=sys.stderr)
        return 1
    text = answer.body.decode("utf-8", "replace").rstrip("\n")
    if _is_json(text):
        print(text)
    if answer.status != 200:
        print(f"wshub publish: refused: {_explain(answer)}", file=sys.stderr)
        return 1
    return 0
