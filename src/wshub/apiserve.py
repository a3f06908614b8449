"""The backend API served (decisions.md 14 and 19): its route, its answers.

:mod:`wshub.api` decides everything about a request that needs neither
sockets nor the hub; this module is the thin adapter around it. One route,
``/api/`` and everything under it, every method (the API answers 404 and 405
itself, as JSON, and only after the key: a caller without one learns
nothing). Per request:

1. :func:`wshub.api.check_head` on the head. An error is answered at once;
   when the request announced a body, that body is never read and the
   connection is closed (its bytes would be taken for the next request).
2. The body, bounded at 64 KiB (413 from the head's ``Content-Length``, or
   at the chunk-size line that would pass it), read with the handshake
   deadline running: a client that sends a byte a second is dropped.
3. :func:`wshub.api.parse_command`, then the command. A publication goes
   through the room's :meth:`~wshub.hub.Hub.publish_backend` (so, through
   ``Hub.publish``: an offset, the history, the backplane) and is answered
   in the same loop pass. Listings and disconnects ask every node of the
   cluster (:mod:`wshub.backplane.control`) and are answered when the
   answers are in.

Keep-alive: every answer after a whole request keeps the connection for the
next one (pipelined requests wait their turn in the connection's buffer),
with the handshake deadline from each answer to the next request whole, and
at most :data:`MAX_REQUESTS` requests per connection (the last answer says
``Connection: close``). A request that says ``Connection: close`` is answered
and the connection closed.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Iterable
from typing import Protocol, cast

from . import api, http
from .api import ApiError, ApiErrorCode, ApiKeys
from .backplane.control import Answer, Control, ControlError, IncompleteAnswers, Query
from .connection import Connection
from .errors import CloseCode, Disconnect
from .hub import Hub
from .ids import ConnectionId, NodeId
from .logs import log_event
from .rooms import RoomName
from .routes import Route

__all__ = ["MAX_REQUESTS", "ApiNode", "ApiService"]

log = logging.getLogger("wshub")

MAX_REQUESTS = 1000
"""Requests served on one kept-alive connection; the last answer closes it."""


class ApiNode(Protocol):
    """What the API asks of the node it runs on."""

    node_id: NodeId
    rooms: dict[RoomName, Hub]
    connections: dict[ConnectionId, Connection]

    def backend_hub(self, room: RoomName) -> Hub:
        """The hub a backend publishes into *room* through (members or not)."""
        ...

    def readiness(self) -> tuple[bool, str]: ...


def _user_id(conn: Connection) -> str | None:
    """The verified token's subject (decisions.md 15); None for an anonymous connection."""
    return None if conn.identity is None else conn.identity.user_id


def _announces_body(request: http.Request) -> bool:
    return bool(request.get_all("transfer-encoding")) or any(
        value != "0" for value in request.get_all("content-length")
    )


def _wants_close(request: http.Request) -> bool:
    if request.version != "HTTP/1.1":
        return True  # HTTP/1.0 keep-alive is an extension we do not offer
    return any(
        token.strip().lower() == "close"
        for value in request.get_all("connection")
        for token in value.split(",")
    )


class ApiService:
    """The API of one node: its route, and its answers to other nodes' questions."""

    def __init__(self, keys: ApiKeys, node: ApiNode, control: Control) -> None:
        self.keys = keys
        self._node = node
        self._control = control
        self._tasks: set[asyncio.Task[None]] = set()

    def routes(self) -> list[Route[Connection]]:
        return [Route("/api/", self._serve, methods=(), prefix=True, reads_body=True)]

    async def start(self) -> None:
        await self._control.start(self)

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await self._control.stop()

    def reload(self) -> str:
        """SIGHUP: read the keys file again (a :mod:`wshub.reload` reloader)."""
        result = self.keys.reload()
        if not result.ok:
            raise RuntimeError(result.message)
        return result.message

    # -- One request ---------------------------------------------------------------

    def _serve(self, conn: Connection, request: http.Request) -> None:
        head = api.check_head(request, self.keys)
        if isinstance(head, ApiError):
            self._refused(conn, head)
            self._answer_error(conn, request, head, close=_announces_body(request))
            return
        if head.framing.length == 0:
            self._run(conn, request, head, b"")
            return

        def refused(exc: http.HttpError) -> bytes:
            error = api.error_from_http(exc)
            self._refused(conn, error)
            return self._error_response(error, head_only=False, close=True)

        conn.read_body(
            head.reader(),
            lambda body: self._run(conn, request, head, body),
            head.framing.expect_continue,
            refused=refused,
        )

    def _run(self, conn: Connection, request: http.Request, head: api.ApiHead, body: bytes) -> None:
        command = api.parse_command(head, body)
        if isinstance(command, ApiError):
            self._answer_error(conn, request, command)
            return
        ready, why = self._node.readiness()
        if not ready and not why.startswith("full"):
            # Draining, or the backplane down: a publication would reach only
            # this node's members, a listing would be this node's only.
            self._answer_error(conn, request, api.unavailable(f"not ready: {why}"))
            return
        if isinstance(command, api.PublishRequest):
            room = RoomName(command.room)
            exclude = None if command.exclude is None else ConnectionId(command.exclude)
            hub = self._node.backend_hub(room)
            if hub.history_in_redis:
                # History on Redis: the offset is the room script's, answered
                # once Redis gave it.
                recorded = hub.publish_backend_recorded(
                    command.kind, ConnectionId(command.sender), command.content, exclude
                )
                task = asyncio.get_running_loop().create_task(
                    self._answer_recorded(conn, request, room, recorded)
                )
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
                return
            offset, epoch = hub.publish_backend(
                command.kind, ConnectionId(command.sender), command.content, exclude
            )
            self._answer(conn, request, 200, api.encode_published(room, offset, epoch))
            return
        task = asyncio.get_running_loop().create_task(self._ask(conn, request, head, command))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer_recorded(
        self,
        conn: Connection,
        request: http.Request,
        room: RoomName,
        recorded: asyncio.Future[tuple[str, int]] | None,
    ) -> None:
        if recorded is None:  # Redis unreachable: served to this node's members only
            self._answer(conn, request, 200, api.encode_published(room, None, None))
            return
        try:
            epoch, offset = await recorded
        except Exception:  # not recorded: lost, at most once
            self._answer_error(conn, request, api.unavailable("Redis did not record it"))
            return
        self._answer(conn, request, 200, api.encode_published(room, offset, epoch))

    async def _ask(
        self, conn: Connection, request: http.Request, head: api.ApiHead, command: api.ApiCommand
    ) -> None:
        try:
            if isinstance(command, api.RoomsRequest):
                answers = await self._control.ask({"q": "rooms"})
                counts: Counter[str] = Counter()
                for answer in answers:
                    for room, count in dict(answer.get("rooms", {})).items():
                        counts[str(room)] += int(count)
                rooms = (api.RoomCount(room, count) for room, count in counts.items() if count)
                body = api.encode_rooms(rooms)
            elif isinstance(command, api.RoomRequest):
                answers = await self._control.ask({"q": "room", "room": command.room})
                listed = sorted(
                    api.ConnectionInfo(str(cid), None if user is None else str(user), node)
                    for answer in answers
                    for node in (str(answer.get("node", "")),)
                    for cid, user in answer.get("connections", [])
                )
                body = api.encode_room(command.room, listed)
            else:
                assert isinstance(command, api.DisconnectRequest)
                query: Query = {"q": "disconnect", "code": command.code, "reason": command.reason}
                if command.connection_id is not None:
                    query["connectionId"] = command.connection_id
                else:
                    query["userId"] = command.user_id
                try:
                    answers = await self._control.ask(query)
                except IncompleteAnswers as exc:
                    # What closed, closed; "none found" is not known (503).
                    if not any(answer.get("closed") for answer in exc.answers):
                        raise
                    answers = exc.answers
                closed = sorted(str(c) for answer in answers for c in answer.get("closed", []))
                if not closed:
                    who = "connection" if command.connection_id is not None else "user"
                    error = ApiError.of(ApiErrorCode.NOT_FOUND, f"no such {who} is connected")
                    self._answer_error(conn, request, error)
                    return
                log_event(log, logging.INFO, "api_disconnect", connections=len(closed))
                body = api.encode_disconnected(closed)
        except ControlError as exc:
            self._answer_error(conn, request, api.unavailable(str(exc)))
            return
        except (TypeError, ValueError, AttributeError):
            # A node that answered nonsense (another version): say so, not 500.
            log.exception("api: malformed answer from the cluster")
            self._answer_error(conn, request, api.unavailable("the cluster answered nonsense"))
            return
        self._answer(conn, request, 200, body, head_only=head.head_only)

    # -- Answers ---------------------------------------------------------------------

    def _must_close(self, conn: Connection, request: http.Request) -> bool:
        return _wants_close(request) or conn.requests_served + 1 >= MAX_REQUESTS

    def _answer(
        self,
        conn: Connection,
        request: http.Request,
        status: int,
        body: bytes,
        headers: tuple[tuple[str, str], ...] = (),
        *,
        head_only: bool = False,
        close: bool = False,
    ) -> None:
        if conn.transport.is_closing():
            return  # the client left while the cluster was asked
        close = close or self._must_close(conn, request)
        response = http.response(
            status,
            body,
            content_type=api.CONTENT_TYPE,
            headers=headers,
            head_only=head_only,
            keep_alive=not close,
        )
        if close:
            conn.respond(response)
        else:
            conn.respond_keep_alive(response)

    def _error_response(self, error: ApiError, *, head_only: bool, close: bool) -> bytes:
        return http.response(
            error.status,
            api.encode_error(error),
            content_type=api.CONTENT_TYPE,
            headers=error.headers,
            head_only=head_only,
            keep_alive=not close,
        )

    def _answer_error(
        self, conn: Connection, request: http.Request, error: ApiError, *, close: bool = False
    ) -> None:
        self._answer(
            conn,
            request,
            error.status,
            api.encode_error(error),
            error.headers,
            head_only=request.method == "HEAD",
            close=close,
        )

    def _refused(self, conn: Connection, error: ApiError) -> None:
        if error.status in (401, 413):  # counted and logged (rate-limited) like any refusal
            conn.owner.on_refused(conn, error.status, f"api_{error.code}", error.message)

    # -- Answers to the cluster's questions (ControlHandler) ------------------------

    def on_control(self, query: Query) -> Answer:
        node = self._node
        kind = query.get("q")
        if kind == "rooms":
            return {
                "rooms": {hub.room: len(hub.members) for hub in node.rooms.values() if hub.members}
            }
        if kind == "room":
            hub = node.rooms.get(RoomName(str(query.get("room", ""))))
            members: Iterable[Connection] = () if hub is None else hub.members.values()
            return {
                "node": node.node_id,
                "connections": [[conn.id, _user_id(conn)] for conn in members],
            }
        if kind == "disconnect":
            return {"closed": self._disconnect(query)}
        return {}

    def _disconnect(self, query: Query) -> list[str]:
        code, reason = query.get("code"), query.get("reason")
        if not isinstance(code, int) or not 4000 <= code <= 4999 or not isinstance(reason, str):
            return []
        wanted_id, wanted_user = query.get("connectionId"), query.get("userId")
        connections = self._node.connections
        if isinstance(wanted_id, str):
            found = connections.get(ConnectionId(wanted_id))
            targets = [] if found is None else [found]
        elif isinstance(wanted_user, str):
            targets = [c for c in connections.values() if _user_id(c) == wanted_user]
        else:
            return []
        disconnect = Disconnect(cast(CloseCode, code), reason)
        for conn in targets:
            # Its hub announces user_left once, as for any close.
            conn.close(disconnect)
        return [conn.id for conn in targets]
