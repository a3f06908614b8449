"""Which browser origins may open a WebSocket (decisions.md 7).

* No ``Origin`` header: a non-browser client, allowed.
* An origin whose scheme, host and port are the request's own: the page
  served by wshub itself, always allowed. The scheme is the one the request
  came in with (``https`` over TLS, or as a trusted proxy's
  ``X-Forwarded-Proto`` says; else ``http``): an ``https://`` page is not
  "the same host" as a plain-HTTP server (issue 19.7). With
  ``--server-names``, the host and port must also be one of those names,
  whatever the ``Host`` header says: under DNS rebinding a visitor's browser
  sends ``Host: attacker.example`` with a matching ``Origin``, and only a
  list of our own names tells the two apart.
* Otherwise the allow-list decides: exact origins, ``https://*.example.com``
  (any subdomain of example.com over https, not example.com itself), or ``*``.
  An empty allow-list refuses every other origin.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["OriginPolicy"]

_DEFAULT_PORTS = {"http": "80", "https": "443", "ws": "80", "wss": "443"}

# A serialized origin's host (RFC 6454 6.2: browsers send names in their ASCII
# form) and port. Anything else (a "?", "#", "\\" or space in the host) is no
# origin a browser sends, and must not pass a wildcard by its suffix:
# "https://evil.com#.example.com" is not a subdomain of example.com.
_HOST = re.compile(r"[a-z0-9_.-]+|\[[0-9a-f:.]+\]")
_PORT = re.compile(r"[0-9]*")


def _split_origin(origin: str, *, wildcard: bool = False) -> tuple[str, str, str] | None:
    """(scheme, host, port) of a serialized origin, lower-cased, or None.
    With *wildcard* (an allow-list entry), the host may start with ``*.``."""
    scheme, sep, rest = origin.strip().lower().partition("://")
    if not sep or not scheme or not rest or "/" in rest or "@" in rest:
        return None
    host, port = _split_host_port(rest)
    name = host[2:] if wildcard and host.startswith("*.") else host
    if not _HOST.fullmatch(name) or not _PORT.fullmatch(port):
        return None
    return scheme, host, port or _DEFAULT_PORTS.get(scheme, "")


def _split_host_port(netloc: str) -> tuple[str, str]:
    if netloc.startswith("["):  # IPv6 literal
        end = netloc.find("]")
        if end == -1:
            return "", ""
        host, rest = netloc[: end + 1], netloc[end + 1 :]
        return host, rest[1:] if rest.startswith(":") else ""
    host, _, port = netloc.partition(":")
    return host, port


_SECURE = {"http": "http", "ws": "http", "https": "https", "wss": "https"}


class OriginPolicy:
    def __init__(self, allowed: Iterable[str] = (), server_names: Iterable[str] = ()) -> None:
        # (host, port or "") of --server-names; empty: trust the Host header.
        self.server_names = {_split_host_port(name.strip().lower()) for name in server_names}
        self.any = False
        self.exact: set[tuple[str, str, str]] = set()
        self.wildcards: list[tuple[str, str, str]] = []  # (scheme, ".suffix", port)
        for entry in allowed:
            if entry == "*":
                self.any = True
                continue
            parts = _split_origin(entry, wildcard=True)
            if parts is None:
                raise ValueError(f"not an origin: {entry!r}")
            scheme, host, port = parts
            if host.startswith("*."):
                self.wildcards.append((scheme, host[1:], port))
            else:
                self.exact.add(parts)

    def allows(self, origin: str | None, host: str | None, scheme: str | None = None) -> bool:
        """May a request with this ``Origin`` and ``Host`` header upgrade?

        *scheme* is the request's own (``http`` or ``https``); None compares
        host and port only.
        """
        if origin is None:
            return True
        if self.any:
            return True
        parts = _split_origin(origin)
        if parts is None:  # "null" (sandboxed pages, file://) or garbage
            return False
        origin_scheme, origin_host, origin_port = parts
        if host is not None and self._same_host(parts, host, scheme):
            return True
        if parts in self.exact:
            return True
        for w_scheme, suffix, w_port in self.wildcards:
            if (
                origin_scheme == w_scheme
                and origin_port == w_port
                and origin_host.endswith(suffix)
                and len(origin_host) > len(suffix)
            ):
                return True
        return False

    def _same_host(self, parts: tuple[str, str, str], host: str, scheme: str | None) -> bool:
        origin_scheme, origin_host, origin_port = parts
        if scheme is not None and _SECURE.get(origin_scheme) != scheme:
            return False
        req_host, req_port = _split_host_port(host.strip().lower())
        req_port = req_port or _DEFAULT_PORTS.get(scheme or origin_scheme, "")
        if (req_host, req_port) != (origin_host, origin_port):
            return False
        if not self.server_names:
            return True
        default = _DEFAULT_PORTS.get(scheme or origin_scheme, "")
        return any(
            name == req_host and (port or default) == req_port for name, port in self.server_names
        )
