"""Shared fixtures: real ``wshub serve`` processes and real clients.

Every integration test talks to a server started as its own process
(``python -m wshub serve --port 0``) over loopback sockets, with the
``websockets`` client library or, for malformed frames, a raw socket
(:mod:`tests.rawws`). Timeouts are upper bounds only: tests wait for events,
never for fixed sleeps. Scale them with ``WSHUB_TEST_TIME_SCALE`` on a slow
machine.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, settings
from websockets.sync.client import ClientConnection, connect

SCALE = float(os.environ.get("WSHUB_TEST_TIME_SCALE", "1"))
TIMEOUT = 5.0 * SCALE
"""Upper bound for anything a test waits for."""

# Every property test runs on machines shared with servers and benchmarks: a
# slow example or a slow draw is the machine's, not a finding. Loaded here,
# before the test modules, so that their own @settings inherit it.
settings.register_profile(
    "wshub", deadline=None, suppress_health_check=[HealthCheck.too_slow], print_blob=True
)
settings.load_profile("wshub")


@dataclass
class Server:
    proc: subprocess.Popen[str]
    host: str
    port: int
    args: list[str]
    stderr_lines: list[str] = field(default_factory=list)
    _pump: threading.Thread | None = None

    @property
    def http_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{self.host}:{self.port}/websocket"

    def connect(self, room: str | None = None, **kwargs: object) -> ClientConnection:
        """A WebSocket to the default room, or to *room* (``/websocket/{room}``)."""
        kwargs.setdefault("open_timeout", TIMEOUT)
        kwargs.setdefault("close_timeout", TIMEOUT)
        kwargs.setdefault("legacy", True)
        # Unbounded client-side queue: with the default, a client that has not
        # read its backlog stops reading the socket and can't see a Close.
        kwargs.setdefault("max_queue", None)  # a connection held across calls, not a with-block
        url = self.ws_url if room is None else f"{self.ws_url}/{room}"
        return connect(url, **kwargs)  # type: ignore[arg-type]

    def client(self, room: str | None = None, **kwargs: object) -> Client:
        """Connect and read the ``welcome``."""
        ws = self.connect(room, **kwargs)
        welcome = json.loads(ws.recv(timeout=TIMEOUT))
        assert welcome["type"] == "welcome", welcome
        return Client(ws, welcome["connectionId"], welcome)

    def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, dict, bytes]:
        request = urllib.request.Request(self.http_url + path, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
                return response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read()

    def stats(self) -> dict:
        status, _, body = self.get("/stats")
        assert status == 200
        return json.loads(body)

    def metric(self, name: str, labels: str = "") -> float:
        """Read one sample from /metrics (0 when absent)."""
        _, _, body = self.get("/metrics")
        pattern = re.escape(name + (f"{{{labels}}}" if labels else "")) + r" (\S+)"
        match = re.search(r"^" + pattern + r"$", body.decode(), re.MULTILINE)
        return float(match.group(1)) if match else 0.0

    def wait_for(self, predicate: Callable[[], bool], what: str) -> None:
        """Poll the server's own introspection until *predicate* holds."""
        from .waiting import wait_until

        wait_until(predicate, what)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=TIMEOUT * 3)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError("server did not exit") from None
        finally:
            assert self.proc.stdout is not None
            self.proc.stdout.close()
            if self._pump is not None:
                self._pump.join(TIMEOUT)
            assert self.proc.stderr is not None
            self.proc.stderr.close()


@dataclass
class Client:
    ws: ClientConnection
    id: str
    welcome: dict

    def send(self, message: dict | str | bytes) -> None:
        if isinstance(message, dict):
            message = json.dumps(message)
        self.ws.send(message)

    def recv(self, timeout: float = TIMEOUT) -> dict:
        return json.loads(self.ws.recv(timeout=timeout))

    def recv_type(self, *types: str, timeout: float = TIMEOUT) -> dict:
        """The next message of one of *types*, skipping heartbeats and other
        clients' comings and goings (unless asked for)."""
        while True:
            message = self.recv(timeout)
            if message["type"] in types:
                return message
            assert message["type"] in ("ping", "user_joined", "user_left"), f"unexpected {message}"

    def roundtrip(self) -> None:
        """Ping and wait for the pong: everything sent before was processed.
        It drops the comings and goings that arrive first: a test counting
        them reads them itself (test_cluster.departures_until_pong)."""
        self.send({"type": "ping"})
        self.recv_type("pong")

    def close(self) -> None:
        self.ws.close()


def start_server(*args: str, env: dict[str, str] | None = None) -> Server:
    cmd = [sys.executable, "-m", "wshub", "serve", "--port", "0", "--log-level", "warning", *args]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()  # blocks until the server listens or dies
    match = re.search(r"listening on (\S+):(\d+)", line)
    if not match:
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError(f"server did not start: {line!r} {err}")
    server = Server(proc, match.group(1), int(match.group(2)), list(args))

    def pump() -> None:
        assert proc.stderr is not None
        for text in proc.stderr:
            server.stderr_lines.append(text)

    server._pump = threading.Thread(target=pump, daemon=True)
    server._pump.start()
    return server


@pytest.fixture
def make_server() -> Iterator[Callable[..., Server]]:
    """Start servers with the given flags; all are stopped after the test."""
    servers: list[Server] = []

    def make(*args: str, env: dict[str, str] | None = None) -> Server:
        server = start_server(*args, env=env)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()
        assert not [line for line in server.stderr_lines if "Traceback" in line], (
            "server logged a traceback:\n" + "".join(server.stderr_lines)
        )


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    """One server per test module with defaults, except limits that would
    throttle a test suite opening many connections from one address."""
    srv = start_server(
        "--ip-connect-rate", "0", "--max-connections-per-ip", "0", "--message-rate", "0"
    )
    yield srv
    srv.stop()
    assert not [line for line in srv.stderr_lines if "Traceback" in line], (
        "server logged a traceback:\n" + "".join(srv.stderr_lines)
    )


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """A real ``redis-server`` on a free loopback port, for cluster tests."""

    def __init__(self) -> None:
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        import shutil

        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.proc = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        import redis

        from .waiting import wait_until

        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)

        def answers() -> bool:
            try:
                return bool(client.ping())
            except redis.ConnectionError:
                return False

        wait_until(answers, "redis-server to start", interval=0.02)
        client.close()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(TIMEOUT)
        self.proc = None


class RedisCluster:
    """A real 3-primary Redis Cluster on free loopback ports (no replicas),
    each primary a ``redis-server`` process in a temp dir of its own (its
    ``nodes.conf`` there, so a primary restarted on its port keeps its slots)."""

    def __init__(self, primaries: int = 3) -> None:
        import shutil
        import tempfile

        self.binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.root = tempfile.mkdtemp(prefix="wshub-rcluster-")
        # The bus port is given too: port + 10000 may be past 65535 or taken.
        self.ports = [(free_port(), free_port()) for _ in range(primaries)]
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * primaries
        for index in range(primaries):
            self.start(index)
        addresses = [f"127.0.0.1:{port}" for port, _ in self.ports]
        subprocess.run(
            ["redis-cli", "--cluster", "create", *addresses, "--cluster-yes"],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=30 * SCALE,
        )
        self.wait_ok()

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{port}" for port, _ in self.ports)

    def start(self, index: int) -> None:
        port, bus = self.ports[index]
        directory = os.path.join(self.root, str(index))
        os.makedirs(directory, exist_ok=True)
        self.procs[index] = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(port),
                "--cluster-port",
                str(bus),
                "--bind",
                "127.0.0.1",
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                "2000",
                "--dir",
                directory,
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        import redis

        from .waiting import wait_until

        client = redis.Redis(port=port, socket_connect_timeout=0.2)

        def answers() -> bool:
            try:
                return bool(client.ping())
            except redis.ConnectionError:
                return False

        wait_until(answers, f"cluster redis-server {index} to start", interval=0.02)
        client.close()

    def info(self, index: int) -> dict[str, str]:
        import redis

        client = redis.Redis(port=self.ports[index][0], socket_connect_timeout=0.5)
        try:
            info = client.cluster("INFO")  # parsed by redis-py
        finally:
            client.close()
        return {str(key): str(value) for key, value in info.items()}

    def wait_ok(self) -> None:
        """Until every primary says the cluster is ok and knows them all."""
        import redis

        from .waiting import wait_until

        def ok() -> bool:
            try:
                return all(
                    self.info(i).get("cluster_state") == "ok"
                    and self.info(i).get("cluster_known_nodes") == str(len(self.ports))
                    for i in range(len(self.ports))
                )
            except redis.RedisError:
                return False

        wait_until(ok, "the Redis Cluster to be ok", timeout=30 * SCALE, interval=0.1)

    def kill(self, index: int) -> None:
        proc = self.procs[index]
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(TIMEOUT)
        self.procs[index] = None

    def stop(self) -> None:
        import shutil

        for index, proc in enumerate(self.procs):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait(TIMEOUT)
            self.procs[index] = None
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    cluster = RedisCluster()
    yield cluster
    cluster.stop()


@pytest.fixture
def own_redis_cluster() -> Iterator[RedisCluster]:
    """A Redis Cluster of this test's own, whose primaries it may kill and restart."""
    cluster = RedisCluster()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    yield server
    server.stop()


@pytest.fixture
def own_redis() -> Iterator[RedisServer]:
    """A Redis of this test's own, which it may stop and restart."""
    server = RedisServer()
    yield server
    server.stop()
