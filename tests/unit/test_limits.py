"""wshub.ratelimit, wshub.session and wshub.admission with a hand-made clock."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wshub.admission import Admission, BadForwardedFor, address_key, client_address
from wshub.ratelimit import KeyedBuckets, MessageLimit, Strikes, TokenBucket
from wshub.session import Admit, Session, State


def test_token_bucket_burst_then_rate() -> None:
    bucket = TokenBucket(rate=20, burst=40, now=0.0)
    assert all(bucket.take(0.0) for _ in range(40))
    assert not bucket.take(0.0)
    assert bucket.take(0.05)  # one token per 50 ms
    assert not bucket.take(0.05)
    assert all(bucket.take(10.0) for _ in range(40))  # refilled, capped at burst
    assert not bucket.take(10.0)


def test_unlimited_bucket() -> None:
    bucket = TokenBucket(rate=0, burst=0, now=0.0)
    assert all(bucket.take(0.0) for _ in range(10_000))


def test_strikes_in_window() -> None:
    strikes = Strikes(limit=3, window=10)
    assert not strikes.add(0)
    assert not strikes.add(1)
    assert not strikes.add(20)  # the first two expired
    assert not strikes.add(21)
    assert strikes.add(22)
    assert not Strikes(limit=0, window=10).add(0)


def test_keyed_buckets_purge() -> None:
    buckets = KeyedBuckets(rate=1, burst=1)
    assert buckets.take("a", 0.0) and not buckets.take("a", 0.0)
    assert buckets.take("b", 0.0)
    assert buckets.purge(0.5) == 0
    assert buckets.purge(1.0) == 2 and len(buckets) == 0


def test_session_transitions() -> None:
    session = Session(0.0, MessageLimit(rate=1, burst=1, strike_limit=2, strike_window=10))
    assert session.state is State.CONNECTING
    session.transition(State.OPEN)
    session.transition(State.CLOSING)
    session.transition(State.CLOSED)
    with pytest.raises(AssertionError):
        session.transition(State.OPEN)


def test_session_rate_escalation() -> None:
    session = Session(0.0, MessageLimit(rate=1, burst=1, strike_limit=2, strike_window=10))
    assert session.admit(0.0) is Admit.ACCEPT
    assert session.admit(0.1) is Admit.REFUSE
    assert session.admit(0.2) is Admit.DISCONNECT


def test_session_bucket_burst_then_rate() -> None:
    # the bucket in the session's own slots behaves as a TokenBucket does
    limit = MessageLimit(rate=20, burst=40, strike_limit=0, strike_window=10)
    session = Session(0.0, limit)
    assert all(session.admit(0.0) is Admit.ACCEPT for _ in range(40))
    assert session.admit(0.0) is Admit.REFUSE
    assert session.admit(0.05) is Admit.ACCEPT  # one token per 50 ms
    assert session.admit(0.05) is Admit.REFUSE
    assert all(session.admit(10.0) is Admit.ACCEPT for _ in range(40))  # capped at burst
    assert session.admit(10.0) is Admit.REFUSE


@given(
    st.floats(0.01, 1000),
    st.integers(1, 50),
    st.lists(st.tuples(st.floats(0, 3), st.integers(1, 40)), max_size=12),  # a run is never empty
)
def test_admit_many_takes_what_as_many_admits_take(
    rate: float, burst: int, reads: list[tuple[float, int]]
) -> None:
    """A read's run charged at once (the C ingest path's relays in a row):
    the same frames accepted, and the same tokens left, as one admit() per
    frame at the read's time; the first refused one is then admit()'s."""
    limit = MessageLimit(rate=rate, burst=burst, strike_limit=0, strike_window=1)
    at_once, one_by_one = Session(0.0, limit), Session(0.0, limit)
    now = 0.0
    for gap, count in reads:
        now += gap
        accepted = at_once.admit_many(now, count)
        expected = 0
        while expected < count and one_by_one.admit(now) is Admit.ACCEPT:
            expected += 1
        if expected < count:  # the one refused: at_once charges it by admit() too
            assert at_once.admit(now) is Admit.REFUSE
        assert accepted == expected
        assert (at_once.tokens, at_once.updated) == (one_by_one.tokens, one_by_one.updated)


def test_admit_many_unlimited() -> None:
    session = Session(0.0, MessageLimit(rate=0, burst=1, strike_limit=0, strike_window=1))
    assert session.admit_many(1.0, 40) == 40


def test_session_liveness() -> None:
    session = Session(5.0, MessageLimit(rate=0, burst=0, strike_limit=0, strike_window=1))
    assert session.silent_for(7.0) == 2.0
    session.alive(7.0)
    assert session.silent_for(7.5) == 0.5


NETS = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1/128"))


@pytest.mark.parametrize(
    ("peer", "xff", "expected"),
    [
        ("203.0.113.9", ["1.2.3.4"], "203.0.113.9"),  # untrusted peer: header ignored
        ("10.0.0.2", ["1.2.3.4"], "1.2.3.4"),
        ("10.0.0.2", ["6.6.6.6, 1.2.3.4"], "1.2.3.4"),  # client-written prefix ignored
        ("10.0.0.2", ["1.2.3.4, 10.0.0.7"], "1.2.3.4"),  # our own proxy chain skipped
        ("10.0.0.2", ["1.2.3.4", "10.0.0.7"], "1.2.3.4"),  # two header lines
        ("10.0.0.2", ["garbage, 1.2.3.4"], "1.2.3.4"),  # client-written garbage ignored
        ("10.0.0.2", [], "10.0.0.2"),
        ("::1", ["2001:db8::1"], "2001:db8::1"),
        ("10.0.0.2", ["6.6.6.6:51234"], "6.6.6.6"),  # a port some proxies append
        ("10.0.0.2", ["[2001:db8::1]"], "2001:db8::1"),
        ("10.0.0.2", ["[2001:db8::1]:443"], "2001:db8::1"),
    ],
)
def test_client_address(peer: str, xff: list[str], expected: str) -> None:
    assert client_address(peer, xff, NETS) == expected


@pytest.mark.parametrize(
    "xff",
    [
        ["garbage"],
        ["unknown"],
        ["1.2.3.4, unknown"],
        ["6.6.6.6:x"],
        ["[2001:db8::1"],
        ["1.2.3.4, "],
    ],
)
def test_client_address_refuses_a_vouched_hop_that_does_not_parse(xff: list[str]) -> None:
    """Never the proxy's own address for everyone (issue 19.5): refused."""
    with pytest.raises(BadForwardedFor):
        client_address("10.0.0.2", xff, NETS)


@pytest.mark.parametrize(
    ("address", "v4", "v6", "key"),
    [
        ("203.0.113.9", 32, 64, "203.0.113.9"),
        ("203.0.113.9", 24, 64, "203.0.113.0/24"),
        ("2001:db8:1:2:aaaa::1", 32, 64, "2001:db8:1:2::/64"),
        ("2001:db8:1:2:bbbb::2", 32, 64, "2001:db8:1:2::/64"),
        ("2001:db8:1:2:bbbb::2", 32, 128, "2001:db8:1:2:bbbb::2"),
        ("::ffff:203.0.113.9", 32, 64, "203.0.113.9"),
        ("unknown", 32, 64, "unknown"),
    ],
)
def test_address_key(address: str, v4: int, v6: int, key: str) -> None:
    assert address_key(address, v4, v6) == key


def test_pre_upgrade_caps_per_peer_and_node_trusted_proxy_exempt() -> None:
    admission = Admission(
        max_connections=0,
        max_connections_per_ip=0,
        ip_connect_rate=0,
        max_handshakes=4,
        max_handshakes_per_ip=2,
        trusted_proxies=NETS,
    )
    assert admission.begin_handshake("2001:db8::1") is None
    assert admission.begin_handshake("2001:db8::2") is None  # same /64
    refused = admission.begin_handshake("2001:db8::3")
    assert refused is not None and refused.status == 429
    assert admission.begin_handshake("10.0.0.2") is None  # a proxy: per-IP cap exempt
    assert admission.begin_handshake("10.0.0.2") is None
    refused = admission.begin_handshake("198.51.100.1")
    assert refused is not None and refused.status == 503
    admission.end_handshake("2001:db8::1")
    assert admission.begin_handshake("2001:db8::4") is None
    for peer in ("2001:db8::2", "2001:db8::4", "10.0.0.2", "10.0.0.2"):
        admission.end_handshake(peer)
    assert admission.handshakes_total == 0 and not admission.handshakes_by_ip


def test_admission_order_and_release() -> None:
    admission = Admission(max_connections=3, max_connections_per_ip=2, ip_connect_rate=100)
    assert admission.check("a", 0.0) is None
    assert admission.check("a", 0.0) is None
    refused = admission.check("a", 0.0)
    assert refused is not None and refused.status == 429
    assert admission.check("b", 0.0) is None
    refused = admission.check("c", 0.0)
    assert refused is not None and refused.status == 503
    admission.release("a")
    assert admission.check("c", 0.0) is None
    admission.draining = True
    refused = admission.check("d", 0.0)
    assert refused is not None and refused.status == 503


def test_admission_connect_rate() -> None:
    admission = Admission(max_connections=0, max_connections_per_ip=0, ip_connect_rate=2)
    assert admission.check("a", 0.0) is None
    assert admission.check("a", 0.0) is None
    refused = admission.check("a", 0.0)
    assert refused is not None and refused.status == 429
    assert admission.check("a", 0.5) is None


def test_an_opened_session_keeps_one_time_and_limits_as_before() -> None:
    # The upgrade time is all an idle session holds: the accept time goes.
    limit = MessageLimit(rate=20, burst=2, strike_limit=0, strike_window=10)
    session = Session(1.0, limit)
    upgraded = 3.25
    session.opened(upgraded)
    assert session.state is State.OPEN and session.silent_for(4.25) == 1.0
    assert session.updated is session.last_seen is upgraded
    # The full bucket behaves exactly as it would have: burst, then the rate.
    assert [session.admit(3.25) for _ in range(3)] == [Admit.ACCEPT] * 2 + [Admit.REFUSE]
    assert session.admit(3.5) is Admit.ACCEPT
