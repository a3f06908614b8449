"""``wshub client URL``: talk to a server of this protocol from a terminal.

Two modes, chosen by whether standard input is a terminal:

* **interactive** (a TTY): every line typed is sent as a ``message``; commands
  start with a slash (``/broadcast TEXT``, ``/info``, ``/ping``, ``/raw FRAME``,
  ``/quit``, ``/help``; ``//text`` sends a message that starts with a slash).
  Incoming messages are printed readably, with local time and sender.
* **scripted** (a pipe or file): each line of standard input is handled the
  same way (or sent verbatim with ``--raw``). At the end of input the client
  sends a ``ping`` and waits for its ``pong``, so every answer to what was sent
  has arrived, then keeps printing for ``--wait`` seconds and closes.

With ``--json`` every received message is printed as one JSON line instead
(the client's own end-of-input ping and its pong excepted). The server's JSON
``ping`` is always answered with ``{"type":"pong"}``.

Exit status: 0 after a normal end, 1 when the connection cannot be opened or
the server closes it before the client is done, 2 for a usage error, 130 on
Ctrl-C.

``--token TOKEN`` (or ``WSHUB_TOKEN`` in the environment, which the process
list does not show) presents a connect token the way a browser does, as the
subprotocols ``wshub`` and ``bearer.TOKEN`` (decisions.md 15); frames then
show each sender's ``userId``, ``/refresh TOKEN`` sends a later token, and a
close with 4401, 4403 or 4429 says that retrying with the same token will not
help.

Offsets (decisions.md 13): each ``message`` and ``broadcast`` is shown with
its room offset (``#42``), replayed ones marked; the ``welcome`` line names the
room's history position. With ``--recover``, a connection the server closed
with a code that allows a retry (1001, 1006, 1011-1013, 4000-4399), or that
dropped, is opened again (with backoff, for up to ``--timeout`` seconds) with
``?since=EPOCH:OFFSET&previous=ID`` from the last frame seen, so what was
missed meanwhile is replayed, or the client is told it has a gap.

``wss://`` (and ``https://``) URLs verify the server's certificate against the
system's CAs, or only against ``--ca-file``; ``--insecure`` skips the check.
:func:`add_tls_arguments` and :func:`tls_context` give ``wshub bench`` (and
``wshub publish``) the same two flags.

Text from the server is printed with control characters and bidirectional
overrides escaped (``\\x1b``, ``\\u202e``), so a message cannot move the
cursor, recolour the terminal or reorder what is shown.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import ssl
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from datetime import datetime
from typing import Any, TextIO
from urllib.parse import quote, urlsplit, urlunsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI
from websockets.typing import Origin, Subprotocol

from .rooms import is_room_name

__all__ = ["add_tls_arguments", "main", "normalize_url", "printable", "tls_context"]

HELP = """\
commands:
  TEXT              send TEXT as a message to everyone else
  /broadcast TEXT   send TEXT to everyone, you included (also /b)
  /info             ask the server who you are and how many are online
  /ping             measure the round trip to the server
  /raw FRAME        send FRAME as it is (e.g. a JSON protocol message)
  /refresh TOKEN    hand the server a later token before this one expires
  //TEXT            send a message that starts with a slash
  /quit             close the connection and exit (also /q, Ctrl-D)"""

# Characters that could drive the terminal or reorder the line: C0 and C1
# controls and the Unicode bidirectional formatting characters.
_BIDI = "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
_ESCAPES = {c: f"\\x{c:02x}" for c in [*range(0x20), *range(0x7F, 0xA0)]}
_ESCAPES.update({ord(c): f"\\u{ord(c):04x}" for c in _BIDI})
_ESCAPES[ord("\t")] = "    "


def printable(text: str) -> str:
    """*text* safe to print on a terminal: controls and bidi marks escaped,
    line breaks kept as indented continuation lines."""
    lines = text.split("\n")
    return "\n    ".join(line.translate(_ESCAPES) for line in lines)


def normalize_url(url: str, room: str | None = None) -> str:
    """Accept ``host:port``, ``http(s)://`` and ``ws(s)://`` URLs; a URL
    without a path, or with the page's ``/``, gets the protocol's
    ``/websocket``, or ``/websocket/ROOM`` with *room*.

    Raises:
        ValueError: *room* is not a room name, or the URL names another path.
    """
    if "://" not in url:
        url = "ws://" + url
    parts = urlsplit(url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme.lower(), parts.scheme.lower())
    # "/" too: the page's address (http://HOST:PORT/), which a person copies
    # from the browser, serves HTML, never the protocol.
    path = parts.path if parts.path not in ("", "/") else "/websocket"
    if room is not None:
        if not is_room_name(room):
            raise ValueError(f"--room {room!r}: a room name is 1-64 of A-Z a-z 0-9 . _ ~ -")
        if path.rstrip("/") != "/websocket":
            raise ValueError(f"--room with a URL whose path is {path!r}, not /websocket")
        path = "/websocket/" + room
    return urlunsplit((scheme, parts.netloc, path, parts.query, ""))


def add_tls_arguments(parser: argparse.ArgumentParser) -> None:
    """``--ca-file`` and ``--insecure``, for every command that connects."""
    group = parser.add_argument_group("TLS (wss:// and https:// URLs)")
    group.add_argument(
        "--ca-file",
        metavar="FILE",
        help="trust server certificates signed by the CA certificates in this PEM file "
        "(instead of the system's)",
    )
    group.add_argument(
        "--insecure",
        action="store_true",
        help="do not verify the server's certificate or host name (tests only: anyone on "
        "the path can then read and change the traffic)",
    )


def tls_context(ca_file: str | None, insecure: bool) -> ssl.SSLContext:
    """The client context for ``--ca-file``/``--insecure``.

    Raises:
        ValueError: both were given, or the CA file does not load.
    """
    if ca_file and insecure:
        raise ValueError("--ca-file and --insecure: choose one")
    try:
        context = ssl.create_default_context(cafile=ca_file or None)
    except ssl.SSLError as exc:
        raise ValueError(f"--ca-file: {ca_file} holds no PEM certificate ({exc})") from None
    except OSError as exc:
        raise ValueError(f"--ca-file: cannot read {ca_file}: {exc.strerror or exc}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wshub client",
        description="Connect to a WebSocket server of the wshub protocol. On a terminal, type "
        "to chat (/help lists the commands); with standard input from a pipe or file, each "
        "line is sent and the client exits after the input ends.",
        epilog=HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "url",
        help="ws://HOST:PORT/websocket (wss://, http:// and HOST:PORT "
        "work too; a URL without a path, or the page's http://HOST:PORT/, gets /websocket)",
    )
    parser.add_argument(
        "--room",
        metavar="NAME",
        help="join room NAME (the URL's path becomes /websocket/NAME); without it, "
        "the room the URL names (/websocket: the default room)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print every received message as one JSON line"
    )
    parser.add_argument(
        "--raw",
        action="store_true",
        help="send each input line verbatim as one text frame (no commands)",
    )
    parser.add_argument(
        "--wait",
        type=float,
        default=0.5,
        metavar="SECONDS",
        help="scripted mode: after the input ends and the server has answered "
        "it, keep printing incoming messages this long (default 0.5)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="give up opening the connection, or waiting for the server to "
        "answer at the end of input, after this long (default 10)",
    )
    parser.add_argument(
        "--recover",
        action="store_true",
        help="when the connection drops or the server asks for a reconnect, connect "
        "again with ?since= and ?previous= so that what was missed is replayed",
    )
    parser.add_argument("--origin", metavar="ORIGIN", help="send this Origin header")
    parser.add_argument(
        "--token",
        metavar="TOKEN",
        default=os.environ.get("WSHUB_TOKEN") or None,
        help="a connect token (JWT) for a server run with --auth, sent as the subprotocol "
        "bearer.TOKEN (default: $WSHUB_TOKEN, which stays out of the process list)",
    )
    parser.add_argument(
        "-H",
        "--header",
        action="append",
        default=[],
        metavar="'NAME: VALUE'",
        help="an extra HTTP header for the upgrade request (repeatable)",
    )
    add_tls_arguments(parser)
    return parser


class Output:
    """Where lines go: stdout for messages, stderr for status; on an
    interactive terminal the prompt and the half-typed line are redrawn
    after each incoming line."""

    PROMPT = "> "

    def __init__(self, interactive: bool, out: TextIO, err: TextIO) -> None:
        self.interactive = interactive
        self.out = out
        self.err = err
        self.lock = threading.Lock()
        self.color = interactive and out.isatty() and "NO_COLOR" not in os.environ
        self.readline: Any = None
        self.prompting = False  # input() is showing the prompt
        if interactive:
            try:
                import readline  # line editing and history for input()

                self.readline = readline
            except ImportError:  # pragma: no cover - platforms without readline
                pass

    def style(self, text: str, code: str) -> str:
        return f"\x1b[{code}m{text}\x1b[0m" if self.color else text

    def line(self, text: str, *, to_err: bool = False) -> None:
        stream = self.err if to_err else self.out
        with self.lock:
            if self.interactive:
                buffer = self.readline.get_line_buffer() if self.readline else ""
                stream.write(f"\r\x1b[K{text}\n")
                stream.flush()
                if self.prompting:
                    self.out.write(self.PROMPT + buffer)
                    self.out.flush()
            else:
                stream.write(text + "\n")
                stream.flush()


def _clock(timestamp: object) -> str:
    """A server timestamp (ISO 8601 or Unix ms) as local HH:MM:SS."""
    try:
        if isinstance(timestamp, int | float):
            moment = datetime.fromtimestamp(timestamp / 1000)
        else:
            moment = datetime.fromisoformat(str(timestamp)).astimezone()
        return moment.strftime("%H:%M:%S")
    except (ValueError, OverflowError, OSError):
        return datetime.now().strftime("%H:%M:%S")


class Session:
    def __init__(self, ws: ClientConnection, args: argparse.Namespace, output: Output) -> None:
        self.ws = ws
        self.args = args
        self.output = output
        self.me: str | None = None
        # Pings in flight, oldest first: (sent at, who asked). The server
        # answers in order, so each pong belongs to the oldest ping.
        self.pings: deque[tuple[float, str]] = deque()
        self.drained = asyncio.Event()
        self.welcomed = asyncio.Event()
        # The room's history position: the welcome's epoch, and the last
        # offset seen (welcome or frame), for --recover.
        self.epoch: str | None = None
        self.offset: int | None = None

    def position(self) -> str | None:
        """The query that recovers from where this session is, if it can."""
        if self.epoch is None or self.offset is None:
            return None
        query = f"since={quote(self.epoch, safe='')}:{self.offset}"
        return query + (f"&previous={self.me}" if self.me else "")

    # -- Incoming -------------------------------------------------------------

    async def receive(self) -> None:
        try:
            async for frame in self.ws:
                await self.handle(frame)
        except ConnectionClosed:
            pass

    async def handle(self, frame: str | bytes) -> None:
        message: Any
        if isinstance(frame, bytes):
            message = {"binary": base64.b64encode(frame).decode()}
        else:
            try:
                message = json.loads(frame)
            except ValueError:
                message = frame
        kind = message.get("type") if isinstance(message, dict) else None
        if kind == "ping":
            await self.ws.send('{"type":"pong"}')
        if kind == "welcome" and isinstance(message.get("connectionId"), str):
            self.me = message["connectionId"]
            epoch, offset = message.get("epoch"), message.get("offset")
            if isinstance(epoch, str) and type(offset) is int:
                if epoch != self.epoch or self.offset is None or offset < self.offset:
                    self.offset = offset  # a new history, or a position not yet shown
                self.epoch = epoch
            else:
                self.epoch = self.offset = None  # history off: nothing to recover from
            self.welcomed.set()
        if kind in ("message", "broadcast") and type(message.get("offset")) is int:
            if self.offset is None or message["offset"] > self.offset:
                self.offset = message["offset"]
        asker = None
        if kind == "pong" and self.pings:
            sent_at, asker = self.pings.popleft()
            if asker == "drain":
                self.drained.set()
                return
        if self.args.json:
            self.output.line(json.dumps(message, ensure_ascii=False, separators=(",", ":")))
            return
        text = self.describe(message, kind)
        if kind == "pong" and asker == "user":
            text = f"pong: round trip {(time.perf_counter() - sent_at) * 1000:.1f} ms"
        if text is not None:
            self.output.line(text)

    def who(self, connection_id: object, user_id: object = None) -> str:
        if connection_id == self.me:
            return "you"
        if isinstance(user_id, str):  # an authenticated sender (decisions.md 15)
            return f"{printable(user_id)} ({printable(str(connection_id))})"
        return printable(str(connection_id))

    def describe(self, m: Any, kind: object) -> str | None:
        """One readable line (or None to show nothing) for a server message."""
        if not isinstance(m, dict):
            return "? " + printable(m if isinstance(m, str) else json.dumps(m))
        style = self.output.style
        at = _clock(m.get("timestamp"))
        if kind == "welcome":
            room = m.get("room")
            where = f" in room {printable(str(room))}" if room else ""
            user = m.get("userId")
            who = f" ({printable(user)})" if isinstance(user, str) else ""
            history = ""
            if "epoch" in m:
                history = f", history {printable(str(m['epoch']))} at #{m.get('offset')}"
            if "recovered" in m:
                history += (
                    f", recovered {m.get('missed')} missed"
                    if m["recovered"]
                    else ", NOT recovered: messages may be missing"
                )
            return style(
                f"welcome: you are {printable(str(m.get('connectionId')))}{who}{where} "
                f"({m.get('connectionCount')} online{history})",
                "1",
            )
        if kind == "user_joined":
            return style(
                f"{at} {self.who(m.get('connectionId'), m.get('userId'))} joined "
                f"({m.get('totalUsers')} online)",
                "2",
            )
        if kind == "user_left":
            return style(
                f"{at} {self.who(m.get('connectionId'), m.get('userId'))} left "
                f"({m.get('totalUsers')} online)",
                "2",
            )
        if kind in ("message", "broadcast"):
            tag = " [broadcast]" if kind == "broadcast" else ""
            if m.get("replayed") is True:
                tag += " [replayed]"
            offset = f"#{m['offset']} " if "offset" in m else ""
            sender = style(self.who(m.get("connectionId"), m.get("userId")), "1")
            return f"{at} {offset}{sender}{tag}: {printable(str(m.get('content')))}"
        if kind == "user_info_response":
            return (
                f"{at} user info: you are {printable(str(m.get('connectionId')))}, "
                f"{m.get('connectionCount')} online"
            )
        if kind == "error":
            code = f" ({printable(str(m['code']))})" if "code" in m else ""
            return style(f"{at} error{code}: {printable(str(m.get('message')))}", "31")
        if kind == "refreshed":
            return f"{at} token refreshed: valid until {printable(str(m.get('expiresAt')))}"
        if kind in ("ping", "pong"):
            return None
        return "? " + printable(json.dumps(m, ensure_ascii=False))

    # -- Outgoing -------------------------------------------------------------

    async def ping(self, asker: str) -> None:
        self.pings.append((time.perf_counter(), asker))
        await self.ws.send('{"type":"ping"}')

    async def command(self, line: str) -> bool:
        """Act on one input line; False when it asks to quit."""
        if self.args.raw:
            await self.ws.send(line)
            return True
        if not line.strip():
            return True
        if line.startswith("//"):
            await self.send("message", line[1:])
            return True
        if not line.startswith("/"):
            await self.send("message", line)
            return True
        name, _, rest = line[1:].partition(" ")
        if "/" + name in QUIT:
            return False
        if name in ("broadcast", "b"):
            if rest.strip():
                await self.send("broadcast", rest)
            else:
                self.output.line("usage: /broadcast TEXT", to_err=True)
        elif name == "info":
            await self.ws.send('{"type":"user_info"}')
        elif name == "ping":
            await self.ping("user")
        elif name == "raw":
            await self.ws.send(rest)
        elif name == "refresh":
            if rest.strip():
                await self.ws.send(json.dumps({"type": "refresh", "token": rest.strip()}))
            else:
                self.output.line("usage: /refresh TOKEN", to_err=True)
        elif name == "help":
            self.output.line(HELP)
        else:
            self.output.line(f"unknown command /{printable(name)} (try /help)", to_err=True)
        return True

    async def send(self, kind: str, content: str) -> None:
        await self.ws.send(json.dumps({"type": kind, "content": content}, ensure_ascii=False))


QUIT = ("/quit", "/q", "/exit")


def _read_lines(output: Output, deliver: Callable[[str | None], None], raw: bool) -> None:
    """In a thread: read standard input line by line; None at its end."""
    try:
        if output.interactive:
            while True:
                output.prompting = True
                try:
                    line = input(output.PROMPT)
                except EOFError:
                    break
                finally:
                    output.prompting = False
                deliver(line)
                if not raw and line.strip() in QUIT:
                    return  # no prompt again while the client exits
        else:
            for line in sys.stdin:
                deliver(line.rstrip("\r\n"))
    except (OSError, ValueError):  # stdin closed under us
        pass
    except RuntimeError:  # the event loop is gone: we are exiting
        return
    deliver(None)


def _describe_failure(exc: BaseException) -> str:
    if isinstance(exc, InvalidStatus):
        response = exc.response
        body = response.body.decode("utf-8", "replace").strip() if response.body else ""
        detail = f": {printable(body[:200])}" if body else ""
        return f"the server answered {response.status_code} {response.reason_phrase}{detail}"
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (
            f"{printable(exc.verify_message or str(exc))}: its certificate is not trusted "
            "(--ca-file FILE trusts a private CA; --insecure skips the check)"
        )
    return printable(str(exc) or type(exc).__name__)


async def _run(args: argparse.Namespace, output: Output) -> int:
    try:
        url = normalize_url(args.url, args.room)
    except ValueError as exc:
        output.line(f"wshub client: {exc}", to_err=True)
        return 2
    headers = []
    for header in args.header:
        name, sep, value = header.partition(":")
        if not sep or not name.strip():
            output.line(f"wshub client: bad --header {header!r} (want 'Name: value')", to_err=True)
            return 2
        headers.append((name.strip(), value.strip()))
    secure = url.startswith("wss://")
    if (args.ca_file or args.insecure) and not secure:
        output.line("wshub client: --ca-file and --insecure need a wss:// URL", to_err=True)
        return 2
    try:
        context = tls_context(args.ca_file, args.insecure) if secure else None
    except ValueError as exc:
        output.line(f"wshub client: {exc}", to_err=True)
        return 2
    subprotocols = None
    if args.token is not None:
        token = args.token.strip()
        if not token or any(c in token for c in ", \t\r\n"):
            output.line("wshub client: --token: empty, or not one token", to_err=True)
            return 2
        subprotocols = [Subprotocol("wshub"), Subprotocol("bearer." + token)]

    async def open_connection(query: str | None) -> ClientConnection:
        target = url if query is None else f"{url}{'&' if '?' in url else '?'}{query}"
        return await connect(
            target,
            ssl=context,
            subprotocols=subprotocols,
            additional_headers=headers,
            origin=Origin(args.origin) if args.origin else None,
            open_timeout=args.timeout,
            max_size=None,
            max_queue=None,
        )

    try:
        ws = await open_connection(None)
    except _OPEN_ERRORS as exc:
        print(f"wshub client: cannot connect to {url}: {_describe_failure(exc)}", file=sys.stderr)
        return 1

    session = Session(ws, args, output)
    interactive = output.interactive
    if interactive:
        output.line(
            f"connected to {url}; /help lists the commands, /quit or Ctrl-D exits", to_err=True
        )
    loop = asyncio.get_running_loop()
    lines: asyncio.Queue[str | None] = asyncio.Queue()
    reader = threading.Thread(
        target=_read_lines,
        args=(output, lambda line: loop.call_soon_threadsafe(lines.put_nowait, line), args.raw),
        daemon=True,
    )
    receiving = asyncio.create_task(session.receive())
    if interactive:
        # Show the welcome before the first prompt (a server of this protocol
        # sends it at once; do not wait long for one that does not).
        await asyncio.wait(
            {asyncio.ensure_future(session.welcomed.wait()), receiving},
            timeout=1.0,
            return_when=asyncio.FIRST_COMPLETED,
        )
    reader.start()

    try:
        # Until the input ends (or /quit): send what comes in.
        next_line = asyncio.ensure_future(lines.get())
        while True:
            await asyncio.wait({next_line, receiving}, return_when=asyncio.FIRST_COMPLETED)
            if receiving.done():
                again = await _reconnect(args, session, output, open_connection)
                if again is None:
                    next_line.cancel()
                    return _closed_by_server(ws, output)
                ws = session.ws = again
                receiving = asyncio.create_task(session.receive())
                continue
            line = next_line.result()
            if line is None or not await session.command(line):
                break
            next_line = asyncio.ensure_future(lines.get())

        # Drain: the pong to this ping comes after every answer to what was sent.
        await session.ping("drain")
        drained = asyncio.ensure_future(session.drained.wait())
        await asyncio.wait(
            {drained, receiving}, timeout=args.timeout, return_when=asyncio.FIRST_COMPLETED
        )
        drained.cancel()
        if receiving.done():
            return _closed_by_server(ws, output)
        if not session.drained.is_set():
            output.line("wshub client: the server did not answer the final ping", to_err=True)
        if not interactive and args.wait > 0:
            await asyncio.wait({receiving}, timeout=args.wait)
            if receiving.done():
                return _closed_by_server(ws, output)
    except ConnectionClosed:
        await asyncio.wait({receiving}, timeout=args.timeout)
        return _closed_by_server(ws, output)
    finally:
        if interactive:
            output.out.write("\r\x1b[K")  # no prompt left dangling
            output.out.flush()

    await ws.close()
    await asyncio.wait({receiving}, timeout=args.timeout)
    return 0


_OPEN_ERRORS = (OSError, InvalidHandshake, InvalidURI, TimeoutError, ValueError)


def may_reconnect(code: int | None) -> bool:
    """Whether a close with *code* invites a reconnect (decisions.md 19: not
    1008/1009 nor 4400-4499, which need a change on the client's side)."""
    if code is None:
        return True  # dropped without a close frame
    return code in (1001, 1006, 1011, 1012, 1013) or 4000 <= code <= 4399


async def _reconnect(
    args: argparse.Namespace,
    session: Session,
    output: Output,
    open_connection: Callable[[str | None], Any],
) -> ClientConnection | None:
    """With --recover: open the connection again from the session's position,
    with backoff, for up to --timeout seconds; None when not to or not able."""
    code = session.ws.close_code
    if not args.recover or not may_reconnect(code):
        return None
    deadline = time.monotonic() + args.timeout
    delay = 0.1
    query = session.position()
    where = f" with {query}" if query else ""
    # Said once: each failed attempt is not another close (a restarting
    # server refuses several attempts in a row).
    output.line(
        f"wshub client: connection closed ({code or 1006}): reconnecting{where}", to_err=True
    )
    failures = 0
    while True:
        try:
            ws: ClientConnection = await open_connection(query)
            return ws
        except _OPEN_ERRORS as exc:
            if time.monotonic() + delay > deadline:
                output.line(
                    f"wshub client: cannot reconnect: {_describe_failure(exc)}", to_err=True
                )
                return None
            failures += 1
            if failures == 1:
                output.line(
                    f"wshub client: not back yet ({_describe_failure(exc)}); "
                    f"trying again for up to {args.timeout:g} s",
                    to_err=True,
                )
        await asyncio.sleep(delay)
        delay = min(2.0, delay * 2)


def _closed_by_server(ws: ClientConnection, output: Output) -> int:
    code = ws.close_code if ws.close_code is not None else 1006
    reason = f" {printable(ws.close_reason)}" if ws.close_reason else ""
    # 4400-4499: not without new credentials (decisions.md 19).
    hint = CREDENTIAL_HINTS.get(code, "")
    output.line(f"wshub client: connection closed by the server: {code}{reason}{hint}", to_err=True)
    return 1


CREDENTIAL_HINTS = {
    4401: " (the token was refused or expired: get a new one, --token)",
    4403: " (this token does not open this room)",
    4429: " (too many connections for this user: close one first)",
}


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    if args.wait < 0 or args.timeout <= 0:
        print("wshub client: --wait must be >= 0 and --timeout > 0", file=sys.stderr)
        return 2
    interactive = sys.stdin.isatty()
    output = Output(interactive, sys.stdout, sys.stderr)
    saved_tty = None
    if interactive:
        try:
            import termios

            saved_tty = termios.tcgetattr(sys.stdin.fileno())
        except (ImportError, OSError):
            saved_tty = None
    try:
        return asyncio.run(_run(args, output))
    except KeyboardInterrupt:
        return 130
    finally:
        if saved_tty is not None:
            import termios

            termios.tcsetattr(sys.stdin.fileno(), termios.TCSADRAIN, saved_tty)
