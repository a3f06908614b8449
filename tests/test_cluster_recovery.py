"""History and recovery on both engines (decisions.md 13 and 19), over real sockets.

Every case runs twice: against the memory history (one ``wshub serve``) and
against the Redis history (two ``wshub serve`` nodes on a real
``redis-server``). On Redis a client joins one node and recovers on the other,
so what it gets back can only come from Redis. ``Engine.node(i)`` is the i-th
node (the same one on the memory engine).
"""

from __future__ import annotations

import itertools
import json
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
import redis

from .conftest import TIMEOUT, Client, RedisServer, Server, start_server
from .test_cluster import FAST_REAP, STEADY_LEASE
from .waiting import wait_until

_names = itertools.count()
OPEN = ("--ip-connect-rate", "0", "--max-connections-per-ip", "0", "--message-rate", "0")
SIZE = 5


@dataclass
class Engine:
    name: str
    args: list[str]
    nodes: list[Server] = field(default_factory=list)
    redis: RedisServer | None = None

    @property
    def on_redis(self) -> bool:
        return self.redis is not None

    def node(self, i: int) -> Server:
        return self.nodes[i % len(self.nodes)]

    def start(self) -> None:
        count = 2 if self.on_redis else 1
        self.nodes = [start_server(*self.args) for _ in range(count)]

    def restart(self, i: int, sig: int = signal.SIGTERM) -> None:
        """Stop node *i* (with *sig*) and start it again: a new process."""
        i %= len(self.nodes)
        self.nodes[i].stop(sig)
        self.nodes[i] = start_server(*self.args)

    def stop(self) -> None:
        for srv in self.nodes:
            srv.stop()
        lines = [line for srv in self.nodes for line in srv.stderr_lines]
        assert not [line for line in lines if "Traceback" in line], "".join(lines)


def make_engine(name: str, redis_server: RedisServer | None, *extra: str) -> Engine:
    """One node, or two on Redis (at --node-ttl 1, unless *extra*, which
    comes last, says otherwise)."""
    args = [*OPEN, "--history-size", str(SIZE)]
    if name == "redis":
        assert redis_server is not None
        args += ["--redis-url", redis_server.url, "--cluster-name", f"rh{next(_names)}"]
        args += [*FAST_REAP, *extra]
        engine = Engine(name, args, redis=redis_server)
    else:
        engine = Engine(name, [*args, *extra])
    engine.start()
    return engine


@pytest.fixture(scope="module", params=["memory", "redis"])
def engine(request: pytest.FixtureRequest, redis_server: RedisServer) -> Iterator[Engine]:
    """Shared by the cases that change nothing but their own room. It lives
    for the whole module and no node of it is reaped: STEADY_LEASE, so that a
    node stalled ~0.7 s on a busy machine is not reaped (1012) meanwhile."""
    eng = make_engine(request.param, redis_server, *STEADY_LEASE)
    yield eng
    eng.stop()


@pytest.fixture(params=["memory", "redis"])
def own_engine(
    request: pytest.FixtureRequest, redis_server: RedisServer
) -> Iterator[Callable[..., Engine]]:
    """An engine of the test's own (restarted, killed, or with other options)."""
    made: list[Engine] = []

    def make(*extra: str, redis: RedisServer | None = None) -> Engine:
        eng = make_engine(request.param, redis or redis_server, *extra)
        made.append(eng)
        return eng

    yield make
    for eng in made:
        eng.stop()


def new_room() -> str:
    return f"cr{next(_names)}"


def relays(client: Client, count: int) -> list[dict]:
    return [client.recv_type("message", "broadcast") for _ in range(count)]


def join(server: Server, room: str, query: str) -> tuple[Client, list[dict]]:
    """Connect with *query*: the welcome, then the frames before a pong."""
    client = server.client(f"{room}?{query}" if query else room)
    client.send({"type": "ping"})
    frames = []
    while True:
        frame = client.recv()
        if frame["type"] == "pong":
            return client, frames
        if frame["type"] in ("message", "broadcast"):
            frames.append(frame)


def seeded(engine: Engine, count: int, room: str | None = None) -> tuple[str, Client, Client]:
    """A room with *count* messages sent on node 0, read on node 1:
    (room, sender, reader); the reader's welcome names the epoch."""
    room = room or new_room()
    reader = engine.node(1).client(room)
    sender = engine.node(0).client(room)
    reader.recv_type("user_joined")
    for i in range(1, count + 1):
        sender.send({"type": "message", "content": f"m{i}"})
    got = relays(reader, count)
    assert [frame["offset"] for frame in got] == list(range(1, count + 1))
    return room, sender, reader


def offsets(frames: list[dict]) -> list[int]:
    return [frame["offset"] for frame in frames]


# -- One order per room ---------------------------------------------------------------


def test_one_order_per_room_across_nodes(engine: Engine) -> None:
    """Two senders on two nodes at once: every member, on every node, the
    senders too, sees the same offsets 1..N in the same order, each once."""
    room = new_room()
    a = engine.node(0).client(room)
    b = engine.node(1).client(room)
    watcher = engine.node(1).client(room)
    per_sender = 40

    def send(client: Client, tag: str) -> None:
        for i in range(per_sender):
            client.send({"type": "broadcast", "content": f"{tag}{i}"})

    a.recv_type("user_joined")
    threads = [threading.Thread(target=send, args=(c, t)) for c, t in ((a, "a"), (b, "b"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)
    seen = {name: relays(c, 2 * per_sender) for name, c in (("a", a), ("b", b), ("w", watcher))}
    expected = list(range(1, 2 * per_sender + 1))
    for frames in seen.values():
        assert offsets(frames) == expected
    orders = {name: [f["content"] for f in frames] for name, frames in seen.items()}
    assert orders["a"] == orders["b"] == orders["w"]
    for tag in "ab":  # one sender's messages keep their order
        assert [c for c in orders["a"] if c[0] == tag] == [f"{tag}{i}" for i in range(per_sender)]


def test_the_sender_of_a_message_gets_none_back_and_offsets_count_both_kinds(
    engine: Engine,
) -> None:
    room = new_room()
    a = engine.node(0).client(room)
    b = engine.node(1).client(room)
    a.recv_type("user_joined")
    a.send({"type": "message", "content": "m"})
    a.send({"type": "broadcast", "content": "b"})
    assert b.recv_type("message")["offset"] == 1
    assert b.recv_type("broadcast")["offset"] == 2
    own = a.recv_type("message", "broadcast")  # its broadcast, not its message
    assert (own["type"], own["content"], own["offset"]) == ("broadcast", "b", 2)
    late = engine.node(0).client(room)
    assert late.welcome["offset"] == 2 and late.welcome["epoch"] == a.welcome["epoch"]
    assert a.welcome["epoch"] == b.welcome["epoch"]


# -- Recovery ---------------------------------------------------------------------------

RECOVER_CASES = [
    # (published, since, recovered, replayed offsets)
    pytest.param(5, 0, True, [1, 2, 3, 4, 5], id="from-the-start"),
    pytest.param(5, 2, True, [3, 4, 5], id="from-the-middle"),
    pytest.param(5, 5, True, [], id="from-the-top"),
    pytest.param(5, 6, False, [], id="above-the-top"),
    pytest.param(5, 10**30, False, [], id="far-above-the-top"),  # digits: a number, not 400
    pytest.param(8, 1, False, [], id="past-the-window"),
    pytest.param(8, 3, True, [4, 5, 6, 7, 8], id="window-edge"),
]


@pytest.mark.parametrize(("published", "since", "recovered", "replayed"), RECOVER_CASES)
@pytest.mark.parametrize("where", [0, 1], ids=["other-node", "same-node"])
def test_recover(
    engine: Engine, published: int, since: int, recovered: bool, replayed: list[int], where: int
) -> None:
    """The reader was on node 1; it recovers on node 0 (another node, on
    Redis) or on node 1 again."""
    room, _, reader = seeded(engine, published)
    epoch = reader.welcome["epoch"]
    reader.close()
    client, frames = join(engine.node(where), room, f"since={epoch}:{since}")
    assert client.welcome["recovered"] is recovered
    assert client.welcome["missed"] == len(replayed)
    assert client.welcome["epoch"] == epoch and client.welcome["offset"] == published
    assert offsets(frames) == replayed
    assert all(frame["replayed"] is True for frame in frames)
    assert [frame["content"] for frame in frames] == [f"m{i}" for i in replayed]


def test_wrong_epoch(engine: Engine) -> None:
    room, _, reader = seeded(engine, 3)
    client, frames = join(engine.node(0), room, "since=notthisone:0")
    assert client.welcome["recovered"] is False and client.welcome["missed"] == 0
    assert client.welcome["epoch"] == reader.welcome["epoch"] and frames == []


def test_previous_leaves_out_own_messages_keeps_own_broadcasts(engine: Engine) -> None:
    room = new_room()
    a = engine.node(0).client(room)
    watcher = engine.node(1).client(room)
    a.recv_type("user_joined")
    epoch = a.welcome["epoch"]
    a.send({"type": "message", "content": "mine"})
    a.send({"type": "broadcast", "content": "mine too"})
    assert offsets(relays(watcher, 2)) == [1, 2]
    watcher.send({"type": "message", "content": "theirs"})
    assert offsets(relays(a, 2)) == [2, 3]  # its own broadcast, not its own message
    a.close()
    with_previous, frames = join(engine.node(1), room, f"since={epoch}:0&previous={a.id}")
    assert with_previous.welcome["missed"] == 2 and offsets(frames) == [2, 3]
    without, frames = join(engine.node(1), room, f"since={epoch}:0")
    assert without.welcome["missed"] == 3 and offsets(frames) == [1, 2, 3]


@pytest.mark.parametrize(("asked", "replayed"), [(2, [4, 5]), (0, []), (99, [1, 2, 3, 4, 5])])
def test_history_n(engine: Engine, asked: int, replayed: list[int]) -> None:
    room, _, _ = seeded(engine, 5)
    client, frames = join(engine.node(0), room, f"history={asked}")
    assert offsets(frames) == replayed and all(f["replayed"] for f in frames)
    assert "recovered" not in client.welcome and client.welcome["offset"] == 5


@pytest.mark.parametrize(
    "query",
    ["since=nocolon", "since=e:-1", "since=e:1.5", "history=-1", "history=x", "previous=nope"],
)
def test_bad_query_is_400(engine: Engine, query: str) -> None:
    for i in (0, 1):
        srv = engine.node(i)
        with socket.create_connection((srv.host, srv.port), timeout=TIMEOUT) as sock:
            sock.sendall(
                f"GET /websocket/r?{query} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n".encode()
            )
            assert sock.recv(64).startswith(b"HTTP/1.1 400"), query


# -- Losing things ------------------------------------------------------------------------


def test_after_the_history_ttl(own_engine: Callable[..., Engine]) -> None:
    eng = own_engine("--history-ttl", "0.3", "--sweep-interval", "0.1")
    room, _, reader = seeded(eng, 3)
    epoch = reader.welcome["epoch"]

    def expired() -> bool:
        client, _ = join(eng.node(0), room, f"since={epoch}:0")
        client.close()
        return client.welcome["recovered"] is False

    wait_until(expired, "the entries to expire")
    top, frames = join(eng.node(0), room, f"since={epoch}:3")  # nothing missed: still fine
    assert top.welcome["recovered"] is True and top.welcome["missed"] == 0 and frames == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["restarted", "killed"])
def test_the_node_it_was_on_goes_away(own_engine: Callable[..., Engine], sig: int) -> None:
    """The reader's node stops (or is killed) and comes back; meanwhile the
    room goes on. One node: its history is gone with it (a new epoch). On
    Redis the history is the cluster's: the reader recovers everything."""
    eng = own_engine()
    room, sender, reader = seeded(eng, 2)
    epoch = reader.welcome["epoch"]
    if eng.on_redis:
        eng.restart(1, sig)  # the reader's node; the sender's goes on
        # A member on the sender's node hears each message once Redis gave it
        # its offset (the history's script): then both are in the room's
        # stream. (A pong to the sender says only that its node read them:
        # their publication may wait behind the reaping's presence updates.)
        witness = eng.node(0).client(room)
        for i in (3, 4):
            sender.send({"type": "message", "content": f"m{i}"})
        assert offsets(relays(witness, 2)) == [3, 4]
        for where in (0, 1):  # the surviving node, and the one restarted
            client, frames = join(eng.node(where), room, f"since={epoch}:2&previous={reader.id}")
            assert client.welcome["recovered"] is True, where
            assert offsets(frames) == [3, 4] and client.welcome["epoch"] == epoch
    else:
        eng.restart(0, sig)
        client, frames = join(eng.node(0), room, f"since={epoch}:2")
        assert client.welcome["recovered"] is False and frames == []
        assert client.welcome["epoch"] != epoch and client.welcome["offset"] == 0


def test_after_redis_was_emptied(own_redis: RedisServer) -> None:
    """FLUSHALL: every room's history is gone. A member still connected is
    closed with 1012 as soon as the room's offsets restart under it (it
    reconnects and learns it has a gap); a since of the old epoch is
    recovered:false; the new epoch is another."""
    eng = make_engine("redis", own_redis)
    try:
        room, sender, reader = seeded(eng, 3)
        epoch = reader.welcome["epoch"]
        redis.Redis(port=own_redis.port).flushall()
        sender.send({"type": "broadcast", "content": "after"})
        closed = None
        try:
            while True:
                reader.recv(timeout=TIMEOUT)
        except Exception as exc:  # the close
            closed = exc
        assert reader.ws.close_code == 1012, closed
        client, frames = join(eng.node(1), room, f"since={epoch}:3")
        assert client.welcome["recovered"] is False and frames == []
        assert client.welcome["epoch"] != epoch
    finally:
        eng.stop()


EPOCH_TTL = 2.0


def epochs_held(eng: Engine, rooms: list[str]) -> int:
    """How many of *rooms* (every room the engine ever had) still have their
    epoch: their meta key on Redis, their state in the memory history."""
    if eng.redis is None:
        return int(eng.node(0).metric("wshub_history_rooms"))
    prefix = eng.args[eng.args.index("--cluster-name") + 1]
    keys = [f"{prefix}:history:{{r.{room}}}:meta" for room in rooms]
    return int(redis.Redis(port=eng.redis.port).exists(*keys))


def test_an_idle_room_with_members_keeps_its_epoch(own_engine: Callable[..., Engine]) -> None:
    """decisions.md 13: the epoch changes only when the history is lost. A
    room whose members stay but say nothing for longer than
    --history-epoch-ttl has lost nothing: a member that comes back with
    since gets recovered:true and the room's offsets go on, on every node.
    Once everyone left and the TTL passed, the history is gone: a new epoch.

    The wait is for an event, not a time: a witness room, used after this
    one and then left by all, losing its epoch shows that this room's would
    have expired by then too (on Redis, its meta key), had nobody kept it."""
    eng = own_engine(
        "--history-ttl", "0.5", "--history-epoch-ttl", str(EPOCH_TTL), "--sweep-interval", "0.1"
    )
    room, sender, reader = seeded(eng, 2)
    epoch = reader.welcome["epoch"]
    witness, *used = seeded(eng, 1)
    for client in used:
        client.close()
    rooms = [room, witness]
    wait_until(lambda: epochs_held(eng, rooms) == 1, "the witness to lose its epoch", 4 * TIMEOUT)
    back, frames = join(eng.node(0), room, f"since={epoch}:2")
    assert back.welcome["recovered"] is True and back.welcome["missed"] == 0 and frames == []
    assert back.welcome["epoch"] == epoch and back.welcome["offset"] == 2
    sender.send({"type": "broadcast", "content": "still here"})
    for client in (reader, back):  # not closed with 1012: the offsets go on
        frame = client.recv_type("broadcast")
        assert (frame["content"], frame["offset"]) == ("still here", 3)
    for client in (sender, reader, back):
        client.close()
    wait_until(lambda: epochs_held(eng, rooms) == 0, "the room to lose its epoch", 4 * TIMEOUT)
    again, frames = join(eng.node(1), room, f"since={epoch}:3")
    assert again.welcome["recovered"] is False and frames == []
    assert again.welcome["epoch"] != epoch and again.welcome["offset"] == 0


# -- The seam ---------------------------------------------------------------------------


@pytest.mark.parametrize("previous", [True, False], ids=["previous", "no-previous"])
def test_seam_while_messages_keep_arriving(
    own_engine: Callable[..., Engine], previous: bool
) -> None:
    """A sender on node 0 keeps broadcasting; a client on node 1 reads some,
    drops, and reconnects with since (on node 0: another node on Redis)
    while the flow goes on: it gets every offset after its position exactly
    once, in order, the first `missed` replayed and the rest live."""
    engine = own_engine("--history-size", "1000")
    room = new_room()
    sender = engine.node(0).client(room)
    client = engine.node(1).client(room)
    watcher = engine.node(1).client(room)
    sender.recv_type("user_joined")
    reconnecting = threading.Event()
    before, total = 200, 600

    def flow() -> None:
        for i in range(1, total + 1):
            if i == before + 1:  # the rest flows while the client reconnects
                reconnecting.wait(TIMEOUT)
            sender.send({"type": "broadcast", "content": f"f{i}"})
            if i % 10 == 0:
                time.sleep(0.001)  # a steady flow, not one burst

    thread = threading.Thread(target=flow)
    thread.start()
    try:
        seen = relays(client, 10)[-1]["offset"]
        epoch = client.welcome["epoch"]
        query = f"since={epoch}:{seen}" + (f"&previous={client.id}" if previous else "")
        client.close()
        relays(watcher, 60)  # the room went on meanwhile
        reconnecting.set()
        again = engine.node(0).client(f"{room}?{query}")
        assert again.welcome["recovered"] is True
        missed = again.welcome["missed"]
        frames = relays(again, total - seen)  # the replay, then live traffic
    finally:
        reconnecting.set()
        thread.join(TIMEOUT)
    assert missed >= 50 and again.welcome["offset"] == seen + missed
    assert offsets(frames) == list(range(seen + 1, total + 1))
    assert all(f.get("replayed") is True for f in frames[:missed])
    assert not any("replayed" in f for f in frames[missed:])
    assert [f["content"] for f in frames] == [f"f{o}" for o in offsets(frames)]


def test_welcome_frames_are_json(engine: Engine) -> None:
    room, _, reader = seeded(engine, 1)
    client = engine.node(0).client(f"{room}?since={reader.welcome['epoch']}:0")
    assert json.loads(client.ws.recv(timeout=TIMEOUT))["replayed"] is True


def test_a_redis_restart_asks_members_to_reconnect(own_redis: RedisServer) -> None:
    """Redis restarted (empty, no persistence) mid-conversation: while it is
    down the node serves its own members (without offsets, none can be
    assigned); once it is back the room's history is a new epoch, so the
    members that hold positions in the old one are closed with 1012, and
    reconnecting with since tells them recovered:false; then all is one
    order again."""
    eng = make_engine("redis", own_redis)
    try:
        room, sender, reader = seeded(eng, 2)
        neighbour = eng.node(0).client(room)
        sender.recv_type("user_joined")
        epoch = reader.welcome["epoch"]
        own_redis.stop()
        srv = eng.node(0)
        srv.wait_for(lambda: srv.get("/readyz")[0] == 503, "readyz 503")
        sender.send({"type": "broadcast", "content": "during"})
        during = neighbour.recv_type("broadcast")
        assert during["content"] == "during" and "offset" not in during
        own_redis.start()
        for node in eng.nodes:
            node.wait_for(lambda node=node: node.get("/readyz")[0] == 200, "readyz 200")

        def closed(client: Client) -> int | None:
            try:
                while True:
                    client.recv(timeout=TIMEOUT)
            except Exception:
                return client.ws.close_code

        sender.send({"type": "broadcast", "content": "after"})
        codes = [closed(c) for c in (sender, neighbour, reader)]
        assert codes == [1012] * 3, "".join(eng.node(0).stderr_lines + eng.node(1).stderr_lines)
        client, frames = join(eng.node(1), room, f"since={epoch}:3")
        assert client.welcome["recovered"] is False and client.welcome["epoch"] != epoch
        other = eng.node(0).client(room)
        # A node whose link to Redis flaps on a busy machine serves a broadcast
        # locally only (no offset taken): send until one crosses.
        for attempt in range(20):
            other.send({"type": "broadcast", "content": f"new {attempt}"})
            try:
                first = client.recv_type("broadcast", timeout=TIMEOUT / 5)
                break
            except TimeoutError:
                continue
        else:
            raise AssertionError("no broadcast crossed: " + "".join(eng.node(0).stderr_lines))
        assert first["offset"] == client.welcome["offset"] + 1  # one order again, no gap
    finally:
        eng.stop()
