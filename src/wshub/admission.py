"""Who may open a WebSocket, decided before the upgrade (decisions.md 8).

The client address is the socket peer, or the address in ``X-Forwarded-For``
when (and only when) the peer is a configured trusted proxy. Then, in order:

1. the node is draining or full (``--max-connections``): 503;
2. the client IP has ``--max-connections-per-ip`` open: 429;
3. the client IP opened more than ``--ip-connect-rate`` per second: 429.

A refusal costs the client nothing it could use later: only connections
that pass every check take a token from the IP's bucket.

Per-IP limits apply to an address *key*: an IPv4 address (or its
``--ipv4-prefix`` network) and an IPv6 address's ``--ipv6-prefix`` network
(default /64: one subscriber usually gets a whole /64, so keying by the exact
address would give one client 2^64 budgets).

Before any of that, at accept time, a socket that has not finished its
upgrade counts toward ``--max-handshakes-per-ip`` (keyed by its peer, except
a trusted proxy, whose clients are told apart only later) and
``--max-handshakes`` on the node: past either it is answered 429/503 at once
(issue 19.2).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .ratelimit import KeyedBuckets

__all__ = [
    "Admission",
    "BadForwardedFor",
    "Refused",
    "address_key",
    "client_address",
    "is_trusted",
    "parse_hop",
]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class BadForwardedFor(ValueError):
    """An ``X-Forwarded-For`` hop a trusted proxy vouches for does not parse:
    the request is refused (400) rather than charged to the proxy's address."""


def parse_hop(hop: str) -> Address | None:
    """One ``X-Forwarded-For`` hop as an address, or None.

    Besides a bare address, the forms some proxies write are accepted:
    ``1.2.3.4:5678``, ``[2001:db8::1]`` and ``[2001:db8::1]:5678`` (the port
    is not part of the client's identity).
    """
    hop = hop.strip()
    if hop.startswith("["):
        end = hop.find("]")
        rest = hop[end + 1 :]
        if end == -1 or (rest and not (rest[0] == ":" and rest[1:].isdigit())):
            return None
        hop = hop[1:end]
    elif hop.count(":") == 1:
        host, _, port = hop.partition(":")
        if not port.isdigit():
            return None
        hop = host
    try:
        return ipaddress.ip_address(hop)
    except ValueError:
        return None


def address_key(address: str, ipv4_prefix: int = 32, ipv6_prefix: int = 64) -> str:
    """What the per-IP limits count: the address's network of the given
    prefix length (an IPv4-mapped IPv6 address counts as IPv4)."""
    if ipv4_prefix >= 32 and ":" not in address:
        return address  # an IPv4 peer as the kernel wrote it (the common case, no parsing)
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address  # "unknown" (a peer without an address): one shared key
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if isinstance(ip, ipaddress.IPv4Address):
        if ipv4_prefix >= 32:
            return str(ip)
        return str(ipaddress.IPv4Network((ip, ipv4_prefix), strict=False))
    if ipv6_prefix >= 128:
        return str(ip)
    return str(ipaddress.IPv6Network((ip, ipv6_prefix), strict=False))


def is_trusted(address: str, proxies: Sequence[Network]) -> bool:
    if not proxies:
        return False
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in network for network in proxies)


def client_address(
    peer: str, forwarded_for: Iterable[str], trusted_proxies: Sequence[Network]
) -> str:
    """The address to apply per-IP limits to.

    ``X-Forwarded-For`` lists the client first and each proxy appends the
    address it received from. Walking it from the right and skipping our own
    trusted proxies gives the first address no trusted party vouches against;
    anything to its left could have been written by the client itself.

    Raises:
        BadForwardedFor: the hop where the client should be does not parse
            (``unknown``, ``6.6.6.6:x``): falling back to the proxy's own
            address would put every client of the proxy in one budget.
    """
    if not trusted_proxies or not is_trusted(peer, trusted_proxies):
        return peer
    hops = [hop.strip() for header in forwarded_for for hop in header.split(",")]
    client = peer
    for hop in reversed(hops):
        ip = parse_hop(hop)
        if ip is None:
            raise BadForwardedFor(f"X-Forwarded-For hop {hop[:64]!r} is not an address")
        client = str(ip)
        if not is_trusted(client, trusted_proxies):
            break
    return client


@dataclass(frozen=True, slots=True)
class Refused:
    status: int  # 429 or 503
    reason: str


class Admission:
    def __init__(
        self,
        *,
        max_connections: int,
        max_connections_per_ip: int,
        ip_connect_rate: float,
        max_handshakes: int = 0,
        max_handshakes_per_ip: int = 0,
        ipv4_prefix: int = 32,
        ipv6_prefix: int = 64,
        trusted_proxies: Sequence[Network] = (),
    ) -> None:
        self.max_connections = max_connections
        self.max_per_ip = max_connections_per_ip
        # Burst of one second's worth: a page that opens a few tabs at once
        # is fine, a script opening hundreds is not.
        self.connects = KeyedBuckets(ip_connect_rate, max(1.0, ip_connect_rate))
        self.open_by_ip: dict[str, int] = {}
        self.open_total = 0
        self.draining = False
        self.max_handshakes = max_handshakes
        self.max_handshakes_per_ip = max_handshakes_per_ip
        self.ipv4_prefix = ipv4_prefix
        self.ipv6_prefix = ipv6_prefix
        self.trusted_proxies = tuple(trusted_proxies)
        self.handshakes_by_ip: dict[str, int] = {}
        self.handshakes_total = 0

    def key(self, ip: str) -> str:
        return address_key(ip, self.ipv4_prefix, self.ipv6_prefix)

    def begin_handshake(self, peer: str) -> Refused | None:
        """A socket from *peer* was accepted: count it until its upgrade ends
        (:meth:`end_handshake`), or say why it is refused at once."""
        if self.max_handshakes and self.handshakes_total >= self.max_handshakes:
            return Refused(503, "too many connections still handshaking")
        key = "" if is_trusted(peer, self.trusted_proxies) else self.key(peer)
        if key and self.max_handshakes_per_ip:
            if self.handshakes_by_ip.get(key, 0) >= self.max_handshakes_per_ip:
                return Refused(429, "too many unfinished handshakes from this address")
        if key:
            self.handshakes_by_ip[key] = self.handshakes_by_ip.get(key, 0) + 1
        self.handshakes_total += 1
        return None

    def end_handshake(self, peer: str) -> None:
        self.handshakes_total -= 1
        if is_trusted(peer, self.trusted_proxies):
            return
        key = self.key(peer)
        count = self.handshakes_by_ip.get(key, 0) - 1
        if count > 0:
            self.handshakes_by_ip[key] = count
        else:
            self.handshakes_by_ip.pop(key, None)

    def check(self, ip: str, now: float) -> Refused | None:
        """Admit a new connection from *ip*, or say why not. On success the
        connection is counted as open; call :meth:`release` when it ends."""
        ip = self.key(ip)
        if self.draining:
            return Refused(503, "server is shutting down")
        if self.max_connections and self.open_total >= self.max_connections:
            return Refused(503, "server is at its connection limit")
        open_here = self.open_by_ip.get(ip, 0)
        if self.max_per_ip and open_here >= self.max_per_ip:
            return Refused(429, "too many open connections from this address")
        if not self.connects.take(ip, now):
            return Refused(429, "too many new connections from this address")
        self.open_by_ip[ip] = open_here + 1
        self.open_total += 1
        return None

    def release(self, ip: str) -> None:
        ip = self.key(ip)
        count = self.open_by_ip.get(ip, 0) - 1
        if count > 0:
            self.open_by_ip[ip] = count
        else:
            self.open_by_ip.pop(ip, None)
        self.open_total -= 1

    def purge(self, now: float) -> None:
        self.connects.purge(now)
