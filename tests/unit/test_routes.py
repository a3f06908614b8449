"""wshub.routes, room names, and the no-body rule of wshub.http (pure).

Bodies that a route takes are read by wshub.http.BodyReader (tests/unit/test_api.py).
"""

from __future__ import annotations

import pytest

from wshub.http import HttpError, Request, expect_no_body
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
    "headers",
    [
        (("content-length", "5"),),
        (("transfer-encoding", "chunked"),),
        (("content-length", "1"), ("content-length", "2")),
    ],
)
def test_a_route_without_max_body_refuses_any_body(headers) -> None:
    with pytest.raises(HttpError) as info:
        expect_no_body(request("GET", "/", *headers))
    assert info.value.status == 400


def test_no_body_is_no_body() -> None:
    expect_no_body(request("GET", "/"))
    expect_no_body(request("GET", "/", ("content-length", "0")))


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
