"""Who may open a WebSocket, decided before the upgrade (decisions.md 8).

The client address is the socket peer, or the address in ``X-Forwarded-For``
when (and only when) the peer is a configured trusted proxy. Then, in order:

1. the node is draining or full (``--max-connections``): 503;
2. the client IP has ``--max-connections-per-ip`` open: 429;
3. the client IP opened more than ``--ip-connect-rate`` per second: 429.

A refusal costs the client nothing it could use later: only connections
that pass every check take a token from the IP's bucket.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .ratelimit import KeyedBuckets

__all__ = ["Admission", "Refused", "client_address"]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def _is_trusted(address: str, proxies: Sequence[Network]) -> bool:
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
    """
    if not trusted_proxies or not _is_trusted(peer, trusted_proxies):
        return peer
    hops = [hop.strip() for header in forwarded_for for hop in header.split(",")]
    client = peer
    for hop in reversed(hops):
        try:
            ipaddress.ip_address(hop)
        except ValueError:
            break  # garbage from here on: trust what we had
        client = hop
        if not _is_trusted(hop, trusted_proxies):
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
    ) -> None:
        self.max_connections = max_connections
        self.max_per_ip = max_connections_per_ip
        # Burst of one second's worth: a page that opens a few tabs at once
        # is fine, a script opening hundreds is not.
        self.connects = KeyedBuckets(ip_connect_rate, max(1.0, ip_connect_rate))
        self.open_by_ip: dict[str, int] = {}
        self.open_total = 0
        self.draining = False

    def check(self, ip: str, now: float) -> Refused | None:
        """Admit a new connection from *ip*, or say why not. On success the
        connection is counted as open; call :meth:`release` when it ends."""
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
        count = self.open_by_ip.get(ip, 0) - 1
        if count > 0:
            self.open_by_ip[ip] = count
        else:
            self.open_by_ip.pop(ip, None)
        self.open_total -= 1

    def purge(self, now: float) -> None:
        self.connects.purge(now)
