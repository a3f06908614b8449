"""wshub.routes and the request-body rules of wshub.http (pure)."""

from __future__ import annotations

import pytest

from wshub.http import HttpError, Request, body_length
from wshub.rooms import is_room_name, room_from_path
from wshub.routes import Route, Router


def request(method: str, target: str, *headers: tuple[str, str]) -> Request:
    return Request(method, target, (("host", "h"), *headers))


def endpoint(name: str):
    def answer(conn: list[str], req: Request) -> None:
        conn.append(name)

    return answer


ROUTER: Router[list[str]] = Router(
    [
        Route("/", endpoint("page")),
        Route("/api/publish", endpoint("publish"), methods=("POST",), max_body=64),
        Route("/api/", endpoint("api"), prefix=True),
        Route("/api/rooms/", endpoint("room"), prefix=True),
    ]
)


def test_exact_paths_and_the_longest_prefix_win() -> None:
    for target, name in [
        ("/", "page"),
        ("/?room=x", "page"),
        ("/api/rooms/lobby", "room"),
        ("/api/other", "api"),
    ]:
        conn: list[str] = []
        ROUTER.match(request("GET", target)).endpoint(conn, request("GET", target))
        assert conn == [name], target
    assert ROUTER.match(request("POST", "/api/publish")).max_body == 64


def test_unknown_paths_are_404_and_wrong_methods_405_with_allow() -> None:
    with pytest.raises(HttpError) as info:
        ROUTER.match(request("GET", "/nothing"))
    assert info.value.status == 404
    with pytest.raises(HttpError) as info:
        ROUTER.match(request("DELETE", "/"))
    assert info.value.status == 405 and dict(info.value.headers)["Allow"] == "GET, HEAD"
    with pytest.raises(HttpError) as info:
        ROUTER.match(request("GET", "/api/publish"))
    assert info.value.status == 405 and dict(info.value.headers)["Allow"] == "POST"


@pytest.mark.parametrize(
    ("headers", "max_body", "status"),
    [
        ((("content-length", "5"),), 0, 400),  # no body expected
        ((("transfer-encoding", "chunked"),), 0, 400),
        ((("transfer-encoding", "chunked"),), 64, 411),
        ((("content-length", "65"),), 64, 413),
        ((("content-length", "-1"),), 64, 400),
        ((("content-length", "1e3"),), 64, 400),
        ((("content-length", "1"), ("content-length", "2")), 64, 400),
    ],
)
def test_bodies_are_bounded_by_their_route(headers, max_body: int, status: int) -> None:
    with pytest.raises(HttpError) as info:
        body_length(request("POST", "/api/publish", *headers), max_body)
    assert info.value.status == status


def test_body_lengths_within_the_bound() -> None:
    assert body_length(request("GET", "/"), 0) == 0
    assert body_length(request("GET", "/", ("content-length", "0")), 0) == 0
    assert body_length(request("POST", "/", ("content-length", "64")), 64) == 64


@pytest.mark.parametrize(
    ("path", "room"),
    [
        ("/websocket", ""),
        ("/websocket/lobby", "lobby"),
        ("/websocket/Lobby", "Lobby"),
        ("/websocket/a.b_c~d-e", "a.b_c~d-e"),
        ("/websocket/" + "x" * 64, "x" * 64),
        ("/websocket/", None),
        ("/websocket/" + "x" * 65, None),
        ("/websocket/a%20b", None),
        ("/websocket/%41", None),
        ("/websocket/a/b", None),
        ("/websocket/é", None),
        ("/websocket/a+b", None),
        ("/websocketx", None),
        ("/other", None),
    ],
)
def test_room_names(path: str, room: str | None) -> None:
    assert room_from_path(path) == room
    if room:
        assert is_room_name(room)
