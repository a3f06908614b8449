"""The node's plain HTTP endpoints, as rows of the route table.

``/`` (the chat page), ``/healthz``, ``/readyz``, ``/metrics`` and ``/stats``
(decisions.md 1), and ``/wshub.js``, the browser client library
(decisions.md 17). The WebSocket endpoints are the gateway's own
(:mod:`wshub.gateway`); the backend API (decisions.md 14) adds its rows here.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Protocol

from . import http
from .connection import Connection
from .page import build_page
from .routes import Route

__all__ = ["Introspection", "node_routes"]


class Introspection(Protocol):
    """What the endpoints read from the node."""

    def readiness(self) -> tuple[bool, str]: ...

    def stats(self) -> dict[str, object]: ...

    def metrics_text(self) -> str: ...


def node_routes(node: Introspection) -> list[Route[Connection]]:
    page: list[tuple[bytes, tuple[tuple[str, str], ...]]] = []  # read once, on first use

    def chat_page(conn: Connection, request: http.Request) -> None:
        if not page:
            static = resources.files("wshub").joinpath("static")
            html = build_page(
                static.joinpath("index.html").read_bytes(), static.joinpath("wshub.js").read_bytes()
            )
            page.append((html, http.page_headers(html)))
        html, headers = page[0]
        conn.respond(
            http.response(
                200,
                html,
                content_type="text/html; charset=utf-8",
                headers=headers,
                head_only=request.method == "HEAD",
            )
        )

    library: list[bytes] = []  # read once, on first use

    def client_library(conn: Connection, request: http.Request) -> None:
        # An ES module: browsers refuse to run one served as anything but JavaScript,
        # and fetch one from another origin in CORS mode: an app's page on its own
        # origin imports it from the hub. The file is public and no credentials go
        # with it, so any origin may read it.
        if not library:
            library.append(resources.files("wshub").joinpath("static/wshub.js").read_bytes())
        conn.respond(
            http.response(
                200,
                library[0],
                content_type="text/javascript; charset=utf-8",
                headers=(("Access-Control-Allow-Origin", "*"),),
                head_only=request.method == "HEAD",
            )
        )

    def healthz(conn: Connection, request: http.Request) -> None:
        conn.respond(http.response(200, "ok\n", head_only=request.method == "HEAD"))

    def readyz(conn: Connection, request: http.Request) -> None:
        ready, reason = node.readiness()
        conn.respond(
            http.response(200 if ready else 503, reason + "\n", head_only=request.method == "HEAD")
        )

    def metrics(conn: Connection, request: http.Request) -> None:
        conn.respond(
            http.response(
                200,
                node.metrics_text(),
                content_type="text/plain; version=0.0.4; charset=utf-8",
                head_only=request.method == "HEAD",
            )
        )

    def stats(conn: Connection, request: http.Request) -> None:
        conn.respond(
            http.response(
                200,
                json.dumps(node.stats(), indent=2) + "\n",
                content_type="application/json",
                head_only=request.method == "HEAD",
            )
        )

    return [
        Route("/", chat_page),
        Route("/wshub.js", client_library),
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", metrics),
        Route("/stats", stats),
    ]
