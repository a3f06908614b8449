"""The HTTP endpoints as a table, without sockets (pure).

A :class:`Route` names a path (exact, or a prefix ending in ``/``), the
endpoint that answers it and the methods it accepts; :class:`Router` finds the
route of a request: ``404`` when no route matches, ``405`` with ``Allow`` when
one matches but not for this method. A route that accepts a body says how
large one may be (``max_body``); the connection reads it before calling the
endpoint (``413`` past it). Adding an endpoint is adding a row.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from .http import HttpError, Request

__all__ = ["Route", "Router"]

E = TypeVar("E")


@dataclass(frozen=True, slots=True)
class Route(Generic[E]):
    path: str
    """An exact path, or with ``prefix=True`` every path under it."""
    endpoint: Callable[[E, Request], None]
    """Called with the connection and the request (its body read)."""
    methods: tuple[str, ...] = ("GET", "HEAD")
    """The methods accepted; ``()``: every method (the endpoint decides)."""
    prefix: bool = False
    max_body: int = 0
    """Largest request body accepted; 0: no body."""
    reads_body: bool = False
    """The endpoint decides about the body itself and reads it
    (``Connection.read_body``): for answers of its own, like the API's JSON errors."""


class Router(Generic[E]):
    def __init__(self, routes: Sequence[Route[E]]) -> None:
        self._exact = {route.path: route for route in routes if not route.prefix}
        # Longest prefix first, so that /api/rooms/ wins over /api/.
        self._prefixes = sorted(
            (route for route in routes if route.prefix), key=lambda r: -len(r.path)
        )

    def match(self, request: Request) -> Route[E]:
        """The route for *request*.

        Raises:
            HttpError: 404 for a path no route serves, 405 for a method the
                route does not accept.
        """
        path = request.path
        route = self._exact.get(path)
        if route is None:
            route = next((r for r in self._prefixes if path.startswith(r.path)), None)
        if route is None:
            raise HttpError(404, "not found")
        if route.methods and request.method not in route.methods:
            allow = ", ".join(route.methods)
            raise HttpError(405, f"method {request.method} not allowed here", (("Allow", allow),))
        return route
