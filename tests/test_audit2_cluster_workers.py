"""``--workers`` at the edges an operator reaches (decisions.md 9): a real
supervisor with real worker processes on a real redis-server, clients over
real sockets.

Found by the second cluster audit: the supervisor SIGKILLed (the OOM killer,
a ``kill -9``, a container runtime that gave up waiting) left its workers
running on the port with no one to stop or restart them; a supervisor
started again then added workers next to the orphans (``SO_REUSEPORT``), so
the port was served by processes nothing managed. A worker now drains and
exits when its supervisor dies.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
from websockets.exceptions import ConnectionClosed

from .conftest import TIMEOUT, Client, RedisServer, free_port
from .test_cluster import Supervised, _worker_pids, departures_until_pong, spread
from .test_cluster_rooms import count
from .waiting import wait_until


def supervisor(redis: RedisServer, port: int, *extra: str) -> Supervised:
    """A supervisor of two workers, once both listen. (The cluster's name is
    the port's unless *extra* names one: a later ``--cluster-name`` wins.)"""
    sup = Supervised(
        port,
        *("--redis-url", redis.url, "--cluster-name", f"sv{port}"),
        *("--ip-connect-rate", "0", "--max-connections-per-ip", "0", *extra),
    )
    with sup.explaining():
        sup.wait_listening(2)
    return sup


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its new parent) is gone too.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_workers_drain_and_exit_when_their_supervisor_is_killed(
    redis_server: RedisServer,
) -> None:
    port = free_port()
    sup = supervisor(redis_server, port, "--drain-timeout", "3")
    proc = sup.proc
    workers = _worker_pids(proc.pid)
    try:
        assert len(workers) == 2
        server = sup.server()
        clients: list[Client] = [server.client() for _ in range(4)]
        proc.kill()
        proc.wait()
        wait_until(
            lambda: not any(alive(pid) for pid in workers),
            "both workers to exit",
            timeout=3 + TIMEOUT,
        )
        for client in clients:
            with pytest.raises(ConnectionClosed) as info:
                while True:
                    client.recv(timeout=TIMEOUT)
            # Drained as on SIGTERM: 1001, not a dropped socket.
            assert info.value.rcvd is not None and info.value.rcvd.code == 1001
    finally:
        for pid in workers:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        sup.stop()  # killed already: its exit code is -9


def test_a_killed_workers_clients_are_announced_gone_once_and_counted_out(
    redis_server: RedisServer,
) -> None:
    """SIGKILL to one of two workers: the other worker's clients hear one
    ``user_left`` for each of its clients (the supervisor's reaping), and no
    second one when the node TTL and a resync have passed; counts heal."""
    port = free_port()
    sup = supervisor(redis_server, port, "--node-ttl", "2")
    try:
        with sup.explaining():
            server = sup.server()
            pids = _worker_pids(sup.proc.pid)
            clients = spread(server, redis_server, f"sv{port}", pids, "w")
            for client in clients:
                client.roundtrip()
            os.kill(pids[0], signal.SIGKILL)
            # Which clients lived on it, and every user_left each survivor hears.
            heard: dict[str, list[str]] = {}
            dead: set[str] = set()
            for client in clients:
                try:
                    heard[client.id] = presence_until_pong(client)
                except ConnectionClosed:
                    dead.add(client.id)
            assert 0 < len(dead) < len(clients)
            survivors = [c for c in clients if c.id in heard]
            for client in survivors:
                while len(heard[client.id]) < len(dead):
                    heard[client.id].append(
                        client.recv_type("user_left", timeout=3 * TIMEOUT)["connectionId"]
                    )
            sup.wait_listening(3)  # the replacement worker
            # Past a node TTL and a resync (every TTL) after the reaping: nothing more.
            since = time.monotonic()
            wait_until(lambda: time.monotonic() - since > 2 * 2 + 1, "two node TTLs", timeout=10)
            for client in survivors:
                heard[client.id] += presence_until_pong(client)
                assert sorted(heard[client.id]) == sorted(dead), "announced twice"
                assert count(client) == len(survivors)
    finally:
        assert sup.stop() == 0, sup.log()


def presence_until_pong(client: Client) -> list[str]:
    """The ids of the ``user_left`` *client* gets before the answer to a ping."""
    return [frame["connectionId"] for frame in departures_until_pong(client)]


def test_a_second_supervisor_under_the_same_node_id_reaps_none_of_the_firsts_workers(
    redis_server: RedisServer,
) -> None:
    """Two machines started from one configuration, ``--workers 2 --node-id
    same`` on both (here two ports of one machine, one Redis): the second
    supervisor's workers find their ids in use and refuse to start; the
    supervisor must not then reap those ids (they are the first one's live
    workers, whose clients would all be announced gone), and its restarted
    workers, under ids of their own, join the cluster."""
    port1, port2 = free_port(), free_port()
    name = f"sv{port1}"
    same = ("--node-id", "same", "--cluster-name", name, "--node-ttl", "3")
    first = supervisor(redis_server, port1, *same)
    second: Supervised | None = None
    try:
        server1 = first.server()
        watchers = [server1.client("s") for _ in range(6)]
        for watcher in watchers:
            watcher.roundtrip()
        second = supervisor(redis_server, port2, *same)
        server2 = second.server()
        newcomer = server2.client("s")
        for watcher in watchers:
            # Each watcher hears the newcomer join, and nobody leave first
            # (the later watchers' joins, from the other worker through
            # Redis, may still be on their way: they are not the point).
            earlier = {w.id for w in watchers}
            frame = watcher.recv_type("user_joined", "user_left")
            while frame["type"] == "user_joined" and frame["connectionId"] in earlier:
                frame = watcher.recv_type("user_joined", "user_left")
            assert frame["type"] == "user_joined", frame
            assert frame["connectionId"] == newcomer.id
            assert presence_until_pong(watcher) == []
            assert count(watcher) == 7
        assert newcomer.welcome["connectionCount"] == 7
        # And past two lease refreshes (every TTL / 3) of the first one's
        # workers: none of them finds itself reaped and closes its clients.
        since = time.monotonic()
        wait_until(lambda: time.monotonic() - since > 2.5, "two lease refreshes", timeout=5)
        for watcher in watchers:
            assert presence_until_pong(watcher) == []
        assert count(newcomer) == 7
    except (AssertionError, TimeoutError, ConnectionClosed) as exc:
        logs = "".join(f"\n{sup.log()}" for sup in (first, second) if sup is not None)
        raise AssertionError(f"{exc!r}; the supervisors' logs:{logs}") from exc
    finally:
        for sup in (first, second):
            if sup is not None:
                sup.stop()
