#!/usr/bin/env python3
"""User-space instructions per delivery of the fan-out pass, noise-free.

    valgrind --tool=callgrind --callgrind-out-file=/tmp/cg.%p \\
        .venv/bin/python bench/fanout_pass_cost.py --passes 200 --members 1000
    # again with --passes 400; (I(400) - I(200)) / (200 * deliveries per pass)

One process, the real :class:`wshub.fanout.Fanout` and the real C send path
(``wshub._directsend``) to real sockets (socketpairs, drained after each
pass), one 100-byte message per pass, queued and flushed. The recipients are
stand-ins with the slots a Connection has and a transport that is idle, so
what differs between two wshub trees is the work around the sends: Python per
recipient, the C walk. callgrind counts user-space instructions only (the
kernel's send(2) is not in them), and it counts the same on a busy machine:
the difference between two pass counts is the cost of the passes alone
(set-up, imports and draining cancel out, the draining being the same).

``WSHUB_SRC=/tmp/rc-base/src`` runs another tree (the one of main before
the change, with the C extension copied in).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.environ.get("WSHUB_SRC", os.path.join(HERE, "..", "src")))

from wshub import fanout as engine  # noqa: E402


class Transport:
    """Idle: nothing queued, not closing (what send_each/send_ready ask)."""

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0


class Member:
    __slots__ = (
        "pending",
        "joined_at",
        "marked",
        "sealed",
        "gone",
        "is_recipient",
        "audience",
        "deflate",
        "buffered",
        "direct_fd",
        "transport",
        "sock",
    )

    def __init__(self, sock: socket.socket) -> None:
        self.pending = None
        self.joined_at = 0
        self.marked = False
        self.sealed = None
        self.gone = False
        self.is_recipient = True
        self.audience = None
        self.deflate = None
        self.buffered = 0
        self.direct_fd = sock.fileno()
        self.transport = Transport()
        self.sock = sock

    def write(self, data: bytes | memoryview) -> int:
        self.sock.send(data)
        return 0

    def unsent(self) -> int:
        return 0

    def abort(self) -> None:
        pass


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--passes", type=int, default=200)
    ap.add_argument("--members", type=int, default=1000, help="per audience (1000)")
    ap.add_argument("--audiences", type=int, default=1, help="(1; 100 with --members 10: rooms)")
    args = ap.parse_args()
    loop = asyncio.new_event_loop()
    fanout = engine.Fanout(
        loop,
        send_buffer_limit=1 << 20,
        on_slow_consumer=lambda conn: None,
        on_send_failed=lambda conn, exc: None,
        # Under callgrind a pass is ~50 times slower: the whole pass in one
        # slice, as it is at full speed (the clock is still read per chunk).
        slice_seconds=3600.0,
    )
    readers: list[socket.socket] = []
    audiences = []
    for _ in range(args.audiences):
        members: list[Member] = []
        try:
            audience = engine.Audience()  # type: ignore[call-arg]
        except TypeError:  # the tree before the rosters: members() is a callable
            audience = engine.Audience(lambda members=members: members)
        for _ in range(args.members):
            ours, theirs = socket.socketpair()
            ours.setblocking(False)
            theirs.setblocking(False)
            readers.append(theirs)
            conn = Member(ours)
            members.append(conn)
            fanout.joined(audience, conn)
            if hasattr(fanout, "admit"):
                fanout.admit(audience, conn)
        audiences.append((audience, members))
    # A relayed message's size (100 bytes of content in its envelope).
    payload = b'{"type":"message","content":"' + b"a" * 100 + b'","from":"c1","ts":1.0}'
    for _ in range(args.passes):
        for audience, _ in audiences:
            # No exclusion: every member is written alike (a broadcast, or a
            # message whose sender is on another node).
            fanout.to_all(audience, payload)
        fanout.flush()
        for reader in readers:
            reader.recv(65536)
    deliveries = args.passes * args.members * args.audiences
    assert fanout.deliveries == deliveries, (fanout.deliveries, deliveries)
    print(f"{engine.__file__}: deliveries {deliveries} direct_sends {fanout.direct_sends}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
