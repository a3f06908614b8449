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
