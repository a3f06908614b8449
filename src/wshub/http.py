"""HTTP/1.1 at the edge, without sockets: request heads in, responses out.

wshub answers a handful of endpoints (:mod:`wshub.routes`) and the WebSocket
upgrade (RFC 6455 section 4.2), so it parses request heads itself, within
strict limits, and closes every plain HTTP connection after one response.

* :func:`parse_request_head` reads one request head from a buffer, or says it
  needs more bytes, or raises :class:`HttpError` with the status to answer.
* :func:`expect_no_body` refuses a body where the route takes none.
* :func:`check_upgrade` validates a WebSocket upgrade and returns the
  ``Sec-WebSocket-Accept`` value.
* :func:`response` serializes a response.
* :func:`body_framing` decides from a request head how its body is delimited
  (``Content-Length`` or chunked) and refuses one over a limit (413) before a
  byte of it is read; :class:`BodyReader` then reads that body incrementally
  from whatever bytes arrive, refusing a chunked body the moment its running
  total would pass the limit.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from dataclasses import dataclass
from typing import Final

__all__ = [
    "MAX_HEADERS",
    "MAX_HEAD_SIZE",
    "BodyFraming",
    "BodyReader",
    "HttpError",
    "Request",
    "body_framing",
    "expect_no_body",
    "check_upgrade",
    "page_headers",
    "parse_request_head",
    "refusal_reason",
    "response",
]

MAX_HEAD_SIZE: Final = 16 * 1024
"""Largest request head (request line and headers) accepted: 431 past it."""
MAX_HEADERS: Final = 100
"""Most header fields accepted: 431 past it."""

_WS_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"

_REASONS: Final = {
    101: "Switching Protocols",
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    413: "Content Too Large",
    426: "Upgrade Required",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}

_TOKEN_CHARS: Final = frozenset(
    b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
)
# The byte-by-byte checks of a head as one regex scan each: a kept-alive API
# client sends a head per request, and a Python loop per byte cost more than
# the rest of the request's handling.
# Visible ASCII but "#": a fragment is never sent (RFC 9112 3.2, RFC 3986 3.5).
_BAD_TARGET: Final = re.compile(rb"[^\x21-\x22\x24-\x7e]")
_BAD_VALUE: Final = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_BARE_LF: Final = re.compile(rb"(?<!\r)\n")
# RFC 9110 7.2 / RFC 3986 3.2.2: Host is uri-host [ ":" port ], uri-host an IP
# literal in brackets or a reg-name (unreserved, percent-escapes, sub-delims).
# An http URI's host is never empty (RFC 9110 4.2.1: "MUST reject it as invalid").
_HOST: Final = re.compile(
    r"(?:\[(?:[0-9A-Fa-f:.]+|v[0-9A-Fa-f]+\.[A-Za-z0-9._~!$&'()*+,;=:-]+)\]"
    r"|(?:[A-Za-z0-9._~!$&'()*+,;=-]|%[0-9A-Fa-f]{2})+)"
    r"(?::[0-9]*)?"
)


class HttpError(Exception):
    """A request refused with *status* and a short plain-text *body*."""

    def __init__(self, status: int, body: str, headers: tuple[tuple[str, str], ...] = ()):
        super().__init__(f"{status} {body}")
        self.status = status
        self.body = body
        self.headers = headers


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    target: str
    headers: tuple[tuple[str, str], ...]  # names lower-cased, in order
    body: bytes = b""
    version: str = "HTTP/1.1"  # or "HTTP/1.0": served, never kept alive, never upgraded

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]

    def get_all(self, name: str) -> list[str]:
        return [value for key, value in self.headers if key == name]

    def get(self, name: str) -> str | None:
        """The single value of header *name*; 400 if it appears twice."""
        values = self.get_all(name)
        if len(values) > 1:
            raise HttpError(400, f"duplicate {name} header")
        return values[0] if values else None


def _origin_form(target: bytes) -> tuple[str, bytes]:
    """``(authority, path_and_query)`` of an absolute-form *target*.

    RFC 9112 3.2.2: a server MUST accept ``GET http://host/path HTTP/1.1``
    (clients configured as if the server were a proxy send it); the rest of
    the server routes the origin form.

    Raises:
        HttpError: 400 for any other form (authority or asterisk form, a
            scheme other than http/https, userinfo, no host).
    """
    scheme, sep, rest = target.partition(b"://")
    if not sep or scheme.lower() not in (b"http", b"https"):
        raise HttpError(400, "malformed request target")
    cut = min((i for i in (rest.find(b"/"), rest.find(b"?")) if i != -1), default=len(rest))
    authority, path = rest[:cut], rest[cut:]
    if _HOST.fullmatch(authority.decode("ascii")) is None:  # no userinfo, no empty host
        raise HttpError(400, "malformed request target")
    if not path.startswith(b"/"):
        path = b"/" + path
    return authority.decode("ascii"), path


def parse_request_head(buffer: bytes | bytearray) -> tuple[Request, int] | None:
    """Parse the request head at the start of *buffer*.

    Returns ``(request, head_length)``, or None when the head is incomplete
    (the caller reads more, up to :data:`MAX_HEAD_SIZE`).

    Raises:
        HttpError: the request is malformed (400) or too large (431).
            HTTP/1.0 is parsed (health checkers and load balancers still
            speak it; ``Host`` is optional there): :func:`check_upgrade`
            refuses it with 505, the plain endpoints answer it and close.
    """
    end = buffer.find(b"\r\n\r\n", 0, MAX_HEAD_SIZE + 4)
    if end == -1:
        if len(buffer) > MAX_HEAD_SIZE:
            raise HttpError(431, "request head too large")
        if _BARE_LF.search(buffer):
            # Lines ended by LF alone: the head would never end, and the
            # client would wait out the handshake deadline for no answer.
            raise HttpError(400, "malformed request: a line not ended by CRLF")
        return None
    head = bytes(buffer[:end])
    lines = head.split(b"\r\n")
    if len(lines) - 1 > MAX_HEADERS:
        raise HttpError(431, "too many header fields")
    parts = lines[0].split(b" ")
    if len(parts) != 3:
        raise HttpError(400, "malformed request line")
    method, target, version = parts
    if not method or not set(method) <= _TOKEN_CHARS:
        raise HttpError(400, "malformed request method")
    if _BAD_TARGET.search(target):
        raise HttpError(400, "malformed request target")
    authority = None
    if target == b"*" and method == b"OPTIONS":
        # The asterisk form (RFC 9112 3.2.4): the server as a whole. A valid
        # request, answered by the route table like any path it has no row
        # for: 404 (decisions.md 1, "anything else"); 405 would need an Allow
        # naming the methods of a resource, and "*" is none.
        pass
    elif not target.startswith(b"/"):
        authority, target = _origin_form(target)
    if version != b"HTTP/1.1" and version != b"HTTP/1.0":
        raise HttpError(400, "malformed HTTP version")
    headers = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or not set(name) <= _TOKEN_CHARS:
            # Also refuses obsolete line folding (a line starting with white space).
            raise HttpError(400, "malformed header field")
        if _BAD_VALUE.search(value):
            raise HttpError(400, "control character in header field")
        headers.append((name.decode("ascii").lower(), value.strip(b" \t").decode("latin-1")))
    # RFC 9112 3.2: 400 for more than one Host or an invalid one (any
    # version, the absolute form too: its Host is then ignored, but a request
    # that carries a broken one is broken), and for none in HTTP/1.1.
    hosts = [value for key, value in headers if key == "host"]
    if len(hosts) > 1:
        raise HttpError(400, "duplicate host header")
    if hosts and _HOST.fullmatch(hosts[0]) is None:
        raise HttpError(400, "invalid Host header")
    if not hosts and version == b"HTTP/1.1":
        raise HttpError(400, "missing Host header")
    if authority is not None:
        # The target URI is the absolute form's (RFC 9112 3.3), so its
        # authority is the host every later check (origin, server names) sees.
        headers = [(key, authority if key == "host" else value) for key, value in headers]
    request = Request(
        method.decode("ascii"), target.decode("ascii"), tuple(headers), version=version.decode()
    )
    return request, end + 4


def expect_no_body(request: Request) -> None:
    """Refuse a body on a route that takes none (every route but those with
    a ``max_body``: a body there would be taken for the next request).

    Raises:
        HttpError: 400 when *request* announces a body.
    """
    if request.get_all("transfer-encoding") or request.get("content-length") not in (None, "0"):
        raise HttpError(400, "a request body is not expected")


_REFUSAL_REASONS: Final = {
    405: "method",
    413: "too_large",
    426: "upgrade_required",
    431: "too_large",
    505: "http_version",
}


def refusal_reason(status: int) -> str:
    """The ``reason`` label of wshub_connections_refused_total for *status*."""
    return _REFUSAL_REASONS.get(status, "bad_request")


def _tokens(values: list[str]) -> set[str]:
    return {token.strip().lower() for value in values for token in value.split(",")}


def check_upgrade(request: Request) -> str:
    """Validate a WebSocket upgrade request; return ``Sec-WebSocket-Accept``.

    Raises:
        HttpError: 505 for HTTP/1.0 (RFC 6455 4.1: at least 1.1), 426
            without the upgrade headers (or for another version of the
            protocol), 400 for a malformed key.
    """
    if request.version != "HTTP/1.1":
        raise HttpError(505, "a WebSocket upgrade needs HTTP/1.1")
    upgrade_headers = (("Upgrade", "websocket"), ("Sec-WebSocket-Version", "13"))
    if "websocket" not in _tokens(request.get_all("upgrade")) or "upgrade" not in _tokens(
        request.get_all("connection")
    ):
        raise HttpError(426, "this endpoint speaks WebSocket: upgrade required", upgrade_headers)
    if request.method != "GET":
        raise HttpError(405, "a WebSocket upgrade must use GET", (("Allow", "GET"),))
    if request.get("sec-websocket-version") != "13":
        raise HttpError(426, "unsupported WebSocket version: 13 required", upgrade_headers)
    key = request.get("sec-websocket-key")
    if key is None:
        raise HttpError(400, "missing Sec-WebSocket-Key")
    try:
        raw_key = base64.b64decode(key.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raw_key = b""
    if len(raw_key) != 16:
        raise HttpError(400, "invalid Sec-WebSocket-Key")
    digest = hashlib.sha1(key.encode("ascii") + _WS_GUID).digest()
    return base64.b64encode(digest).decode("ascii")


def response(
    status: int,
    body: bytes | str = b"",
    *,
    content_type: str = "text/plain; charset=utf-8",
    headers: tuple[tuple[str, str], ...] = (),
    head_only: bool = False,
    keep_alive: bool = False,
) -> bytes:
    """A complete HTTP/1.1 response that closes the connection after it (or,
    with *keep_alive*, says the connection stays for the next request)."""
    if isinstance(body, str):
        body = body.encode("utf-8")
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}"]
    if status != 101:
        lines.append(f"Content-Type: {content_type}")
        lines.append(f"Content-Length: {len(body)}")
        lines.append("Connection: keep-alive" if keep_alive else "Connection: close")
        lines.append("Cache-Control: no-store")
        # No response of ours is meant to be sniffed into another type.
        lines.append("X-Content-Type-Options: nosniff")
    lines.extend(f"{name}: {value}" for name, value in headers)
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only or status == 101 else head + body


def switching_protocols(
    accept: str, extensions: str | None, *, subprotocol: str | None = None
) -> bytes:
    headers = [
        ("Upgrade", "websocket"),
        ("Connection", "Upgrade"),
        ("Sec-WebSocket-Accept", accept),
    ]
    if extensions:
        headers.append(("Sec-WebSocket-Extensions", extensions))
    if subprotocol:
        headers.append(("Sec-WebSocket-Protocol", subprotocol))
    return response(101, headers=tuple(headers))


# -- Request bodies (RFC 9112 section 6) ----------------------------------------
#
# A request with a body is delimited by Content-Length or by the chunked
# transfer coding; one with neither has no body (RFC 9112 6.3, rule 7). Every
# doubt about where a body ends is a 400, never a guess: two parsers that
# guess differently (a proxy and this server) are how requests are smuggled.
# After any refusal here the caller answers and closes the connection, since
# the unread rest of the body would be taken for the next request.

CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
"""The interim answer to ``Expect: 100-continue`` (RFC 9110 10.1.1)."""

_MAX_CHUNK_LINE: Final = 4096
"""Longest line of a chunked body (a chunk size with its extensions, a trailer)."""
_HEX: Final = frozenset(b"0123456789abcdefABCDEF")


@dataclass(frozen=True, slots=True)
class BodyFraming:
    """How the body of one request is delimited, decided from its head."""

    length: int | None
    """The ``Content-Length`` (0 when the request has no body); None when chunked."""
    expect_continue: bool
    """The client waits for :data:`CONTINUE` before it sends the body."""

    @property
    def chunked(self) -> bool:
        return self.length is None


def _digits(value: str) -> bool:
    # str.isdigit() alone accepts superscripts and other scripts' digits.
    return value.isascii() and value.isdigit()


def body_framing(request: Request, limit: int) -> BodyFraming:
    """Decide from *request*'s head how its body is delimited.

    Raises:
        HttpError: 413 when ``Content-Length`` is over *limit*; 400 when the
            framing is malformed or ambiguous (``Content-Length`` that is not
            one decimal number, a transfer coding other than ``chunked``
            alone, or both headers at once).
    """
    codings = [
        token.strip().lower()
        for value in request.get_all("transfer-encoding")
        for token in value.split(",")
    ]
    lengths = [
        item.strip() for value in request.get_all("content-length") for item in value.split(",")
    ]
    expect = [value.strip().lower() for value in request.get_all("expect")]
    expect_continue = "100-continue" in expect
    if codings:
        if lengths:
            raise HttpError(400, "both Transfer-Encoding and Content-Length")
        if codings != ["chunked"]:
            raise HttpError(400, "unsupported Transfer-Encoding: only chunked is accepted")
        return BodyFraming(None, expect_continue)
    if not lengths:
        return BodyFraming(0, False)
    if len(lengths) > 1 or not _digits(lengths[0]):
        raise HttpError(400, "malformed Content-Length")
    # A digit string past the limit's width is over it; int() would also
    # refuse one past Python's digit limit.
    digits = lengths[0].lstrip("0") or "0"
    if len(digits) > len(str(limit)) or int(digits) > limit:
        raise HttpError(413, f"request body over {limit} bytes")
    length = int(digits)
    return BodyFraming(length, expect_continue and length > 0)


class BodyReader:
    """Read one request body, framed as *framing* says, from bytes as they come.

    Call :meth:`feed` with each piece of data received after the head; it
    returns how many bytes it took (the rest belongs to the next request on
    the connection). When :attr:`done` is true, :meth:`body` is the whole
    body. At most *limit* bytes of body are ever held.
    """

    __slots__ = ("_body", "_chunk_left", "_limit", "_line", "_overhead", "_remaining", "_state")

    # States of a chunked body: a chunk-size line, chunk data, the CRLF after
    # the data, trailer lines, done.
    _SIZE, _DATA, _DATA_END, _TRAILERS, _DONE = range(5)

    def __init__(self, framing: BodyFraming, limit: int) -> None:
        self._limit = limit
        self._body = bytearray()
        self._line = bytearray()  # a partial line of a chunked body
        self._chunk_left = 0
        # Bytes of chunked framing (sizes, extensions, CRLFs, trailers) taken:
        # bounded too, or one-byte chunks with long extensions could make a
        # body within the limit cost hundreds of megabytes to read.
        self._overhead = 0
        self._remaining = framing.length  # None: chunked
        if framing.length is None:
            self._state = self._SIZE
        elif framing.length > limit:
            raise HttpError(413, f"request body over {limit} bytes")
        else:
            self._state = self._DONE if framing.length == 0 else self._DATA

    @property
    def done(self) -> bool:
        return self._state == self._DONE

    def body(self) -> bytes:
        if not self.done:
            raise AssertionError("body() before the body is complete")
        return bytes(self._body)

    def feed(self, data: bytes | bytearray | memoryview) -> int:
        """Take the bytes of *data* that belong to this body; return how many.

        Raises:
            HttpError: 400 for a malformed chunked body, 413 when the chunks
                announced add up to more than the limit (or their framing to
                more than the limit again).
        """
        if self._state == self._DONE:
            return 0
        if self._remaining is not None:  # Content-Length
            taken = min(self._remaining, len(data))
            self._body += data[:taken]
            self._remaining -= taken
            if self._remaining == 0:
                self._state = self._DONE
            return taken
        data = bytes(data)
        used = 0
        while used < len(data) and self._state != self._DONE:
            if self._state == self._DATA:
                taken = min(self._chunk_left, len(data) - used)
                self._body += data[used : used + taken]
                self._chunk_left -= taken
                used += taken
                if self._chunk_left == 0:
                    self._state = self._DATA_END
                continue
            end = data.find(b"\n", used)
            stop = len(data) if end == -1 else end + 1
            self._overhead += stop - used
            self._line += data[used:stop]
            if len(self._line) > _MAX_CHUNK_LINE:
                raise HttpError(400, "malformed chunked body: line too long")
            if self._overhead > self._limit:
                raise HttpError(413, f"chunked framing over {self._limit} bytes")
            used = stop
            if end == -1:
                break
            if not self._line.endswith(b"\r\n"):
                raise HttpError(400, "malformed chunked body: a line not ended by CRLF")
            line = bytes(self._line[:-2])
            self._line.clear()
            if self._state == self._SIZE:
                self._chunk_size(line)
            elif self._state == self._DATA_END:
                if line:
                    raise HttpError(400, "malformed chunked body: data longer than its size")
                self._state = self._SIZE
            elif not line:  # _TRAILERS: an empty line ends the body
                self._state = self._DONE
        return used

    def _chunk_size(self, line: bytes) -> None:
        # chunk-size [ chunk-ext ]: extensions are allowed and ignored.
        size = line.partition(b";")[0].rstrip(b" \t")
        if not size or not set(size) <= _HEX:
            raise HttpError(400, "malformed chunked body: bad chunk size")
        size = size.lstrip(b"0") or b"0"
        if len(size) > 16 or len(self._body) + int(size, 16) > self._limit:
            raise HttpError(413, f"request body over {self._limit} bytes")
        self._chunk_left = int(size, 16)
        self._state = self._DATA if self._chunk_left else self._TRAILERS


# A bare <script> or <style>, or a module script (the page's, which carries wshub.js).
_INLINE = re.compile(rb'<(script|style)(?: type="module")?>(.*?)</\1>', re.DOTALL)


def page_headers(html: bytes) -> tuple[tuple[str, str], ...]:
    """Hardening headers for the chat page (issue 19.11).

    The page's inline ``<script>`` (also ``type="module"``) and ``<style>`` blocks are allowed by
    their SHA-256 hashes, computed from the page itself, so an edit to the
    page can't silently break it; nothing else may run or load. The page
    talks only to its own server (``connect-src 'self'`` covers ``ws:``/``wss:``
    of the same host), cannot be framed (clickjacking of the Send button),
    and sends no referrer.
    """
    hashes: dict[bytes, list[str]] = {b"script": [], b"style": []}
    for match in _INLINE.finditer(html):
        digest = base64.b64encode(hashlib.sha256(match.group(2)).digest()).decode("ascii")
        hashes[match.group(1)].append(f"'sha256-{digest}'")
    csp = "; ".join(
        [
            "default-src 'none'",
            "script-src " + (" ".join(hashes[b"script"]) or "'none'"),
            "style-src " + (" ".join(hashes[b"style"]) or "'none'"),
            "connect-src 'self'",
            "img-src 'self' data:",
            "base-uri 'none'",
            "form-action 'none'",
            "frame-ancestors 'none'",
        ]
    )
    return (
        ("Content-Security-Policy", csp),
        ("X-Frame-Options", "DENY"),
        ("Referrer-Policy", "no-referrer"),
    )
