"""Attacks on the Origin rule (decisions.md 7) found by the outside-tester audit."""

from __future__ import annotations

import pytest

from .rawws import RawClient


@pytest.fixture(scope="module")
def wildcard_server():
    from .conftest import start_server

    srv = start_server("--allowed-origins", "https://*.example.com", "--ip-connect-rate", "0")
    yield srv
    srv.stop()


def upgrade_status(server, origin: str) -> int:
    raw, status, _ = RawClient.open(server.host, server.port, headers={"Origin": origin})
    raw.close()
    return status


@pytest.mark.parametrize(
    "origin",
    [
        "https://evil.com#.example.com",
        "https://evil.com?.example.com",
        "https://evil.com\\.example.com",
        "https://evil.com .example.com",
        "https://*.example.com",  # the pattern itself is no origin
        "https://a.example.com:x",
    ],
)
def test_a_wildcard_is_not_passed_by_a_host_that_only_ends_like_it(
    wildcard_server, origin: str
) -> None:
    """``https://*.example.com`` admits subdomains of example.com only: an
    origin whose host is not a host name, but ends with ``.example.com``, is 403."""
    assert upgrade_status(wildcard_server, origin) == 403


@pytest.mark.parametrize(
    "origin", ["https://a.example.com", "https://a.b.example.com", "https://A.Example.COM:443"]
)
def test_a_wildcard_admits_its_subdomains(wildcard_server, origin: str) -> None:
    assert upgrade_status(wildcard_server, origin) == 101
