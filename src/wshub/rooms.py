"""Room names (decisions.md 12 and 19), without sockets.

``/websocket`` is the default room, whose name is the empty string;
``/websocket/{room}`` is room ``{room}``. A name is 1-64 characters of
``[A-Za-z0-9._~-]``, taken as it is: no percent-decoding, no case folding
(``Lobby`` and ``lobby`` are two rooms). Anything else after ``/websocket/``
(an empty name, a ``%`` escape, a slash, a longer name) is refused with 400.
"""

from __future__ import annotations

from typing import Final, NewType

__all__ = [
    "DEFAULT_ROOM",
    "MAX_ROOM_NAME",
    "ROOM_PATH_PREFIX",
    "RoomName",
    "is_room_name",
    "room_from_path",
]

RoomName = NewType("RoomName", str)

DEFAULT_ROOM: Final = RoomName("")
MAX_ROOM_NAME: Final = 64
ROOM_PATH_PREFIX: Final = "/websocket/"

_NAME_CHARS: Final = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._~-")


def is_room_name(name: str) -> bool:
    """Whether *name* names a room other than the default one."""
    return 0 < len(name) <= MAX_ROOM_NAME and not set(name) - _NAME_CHARS


def room_from_path(path: str) -> RoomName | None:
    """The room of a WebSocket path (``/websocket`` or ``/websocket/{room}``),
    or None when the path names no valid room."""
    if path == "/websocket":
        return DEFAULT_ROOM
    if not path.startswith(ROOM_PATH_PREFIX):
        return None
    name = path[len(ROOM_PATH_PREFIX) :]
    return RoomName(name) if is_room_name(name) else None
