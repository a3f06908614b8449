"""wshub.origin: same-host default, exact and wildcard allow-lists."""

from __future__ import annotations

import pytest

from wshub.origin import OriginPolicy


@pytest.mark.parametrize(
    ("origin", "host", "allowed"),
    [
        (None, "example.com", True),
        ("https://example.com", "example.com", True),
        ("https://example.com", "example.com:443", True),
        ("http://example.com:8787", "example.com:8787", True),
        ("http://EXAMPLE.com:8787", "example.COM:8787", True),
        ("http://example.com:8788", "example.com:8787", False),
        ("https://evil.com", "example.com", False),
        ("null", "example.com", False),
        ("http://[::1]:8787", "[::1]:8787", True),
    ],
)
def test_default_policy(origin: str | None, host: str, allowed: bool) -> None:
    assert OriginPolicy().allows(origin, host) is allowed


def test_allow_list() -> None:
    policy = OriginPolicy(["https://app.example.com", "https://*.example.org"])
    assert policy.allows("https://app.example.com", "hub.internal")
    assert policy.allows("https://app.example.com:443", "hub.internal")
    assert not policy.allows("http://app.example.com", "hub.internal")
    assert policy.allows("https://x.example.org", "hub.internal")
    assert not policy.allows("https://example.org", "hub.internal")
    assert not policy.allows("https://xexample.org", "hub.internal")
    assert OriginPolicy(["*"]).allows("http://anything", "h")
    with pytest.raises(ValueError):
        OriginPolicy(["not an origin"])


@pytest.mark.parametrize(
    ("origin", "host", "scheme", "allowed"),
    [
        ("http://hub.example:8787", "hub.example:8787", "http", True),
        ("https://hub.example:8787", "hub.example:8787", "http", False),  # issue 19.7
        ("https://hub.example", "hub.example", "https", True),
        ("http://hub.example", "hub.example", "https", False),
        ("https://hub.example", "hub.example", "http", False),
    ],
)
def test_same_host_compares_the_scheme(origin: str, host: str, scheme: str, allowed: bool) -> None:
    assert OriginPolicy().allows(origin, host, scheme) is allowed


def test_server_names_refuse_a_rebound_host() -> None:
    """DNS rebinding: Host and Origin both name the attacker's host."""
    policy = OriginPolicy(server_names=["hub.example:8787", "chat.example"])
    assert policy.allows("http://hub.example:8787", "hub.example:8787", "http")
    assert policy.allows("https://chat.example", "chat.example", "https")
    assert not policy.allows("http://attacker.example:8787", "attacker.example:8787", "http")
    assert not policy.allows("http://chat.example:8080", "chat.example:8080", "http")
    assert not OriginPolicy().allows("http://a.example:1", "b.example:1", "http")
    assert OriginPolicy().allows("http://attacker.example:1", "attacker.example:1", "http")
