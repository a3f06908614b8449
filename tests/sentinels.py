"""A Redis primary, a replica and three sentinels on loopback: a real failover.

Used by ``tests/test_sentinel.py`` and ``bench/sentinel_failover.py``. Every
process is a real ``redis-server`` on a port the OS picked, with its files in
a temporary directory of its own; :meth:`SentinelGroup.stop` ends each one by
its PID. Nothing here imports pytest (the benchmark uses it too).
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import redis

__all__ = ["SentinelGroup"]

DOWN_AFTER_MS = 1000
"""How long the sentinels wait for a silent primary before calling it down."""
FAILOVER_TIMEOUT_MS = 5000


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _wait(predicate: Callable[[], bool], what: str, timeout: float) -> float:
    start = time.monotonic()
    while True:
        try:
            if predicate():
                return time.monotonic() - start
        except (redis.RedisError, OSError):
            pass  # not up yet
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout:.1f} s waiting for {what}")
        time.sleep(0.02)


class SentinelGroup:
    """Primary on :attr:`primary_port`, replica on :attr:`replica_port`,
    sentinels on :attr:`sentinel_ports`, monitoring the primary as :attr:`name`
    with a quorum of 2."""

    def __init__(self, name: str = "wshubprimary", *, timeout: float = 30.0) -> None:
        self.name = name
        self.timeout = timeout
        self.dir = Path(tempfile.mkdtemp(prefix="wshub-sentinel-"))
        self.binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.primary_port = _free_port()
        self.replica_port = _free_port()
        self.sentinel_ports = [_free_port() for _ in range(3)]

    @property
    def sentinels(self) -> str:
        """The ``--redis-sentinels`` value."""
        return ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)

    def _redis(self, role: str, port: int, *extra: str) -> None:
        workdir = self.dir / role
        workdir.mkdir()
        self.procs[role] = subprocess.Popen(
            [self.binary, "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
            + ["--appendonly", "no", "--protected-mode", "no", "--dir", str(workdir), *extra],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def start(self) -> None:
        """Start everything; return once the sentinels agree on the primary,
        know the replica and each other (so that a failover can happen).
        Stops what it started if it fails."""
        try:
            self._start()
        except BaseException:
            self.stop()
            raise

    def _start(self) -> None:
        self._redis("primary", self.primary_port)
        _wait(lambda: bool(self.ask(self.primary_port, "PING")), "the primary", self.timeout)
        self._redis(
            "replica", self.replica_port, "--replicaof", "127.0.0.1", str(self.primary_port)
        )
        _wait(self._replica_in_sync, "the replica to sync", self.timeout)
        for i, port in enumerate(self.sentinel_ports):
            workdir = self.dir / f"sentinel{i}"
            workdir.mkdir()
            conf = workdir / "sentinel.conf"
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\nprotected-mode no\ndir {workdir}\n"
                f"sentinel monitor {self.name} 127.0.0.1 {self.primary_port} 2\n"
                f"sentinel down-after-milliseconds {self.name} {DOWN_AFTER_MS}\n"
                f"sentinel failover-timeout {self.name} {FAILOVER_TIMEOUT_MS}\n"
                f"sentinel parallel-syncs {self.name} 1\n"
            )
            self.procs[f"sentinel{i}"] = subprocess.Popen(
                [self.binary, str(conf), "--sentinel"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        _wait(self._sentinels_ready, "the sentinels to see the replica and each other", 60.0)

    def ask(self, port: int, *command: str) -> object:
        """One command to the process on *port*, on a connection of its own."""
        with redis.Redis(port=port, socket_timeout=1.0, socket_connect_timeout=0.5) as client:
            return client.execute_command(*command)

    def _replica_in_sync(self) -> bool:
        info = self.ask(self.replica_port, "INFO", "replication")
        return isinstance(info, dict) and info.get("master_link_status") == "up"

    def _sentinels_ready(self) -> bool:
        for port in self.sentinel_ports:
            state = self.ask(port, "SENTINEL", "MASTER", self.name)
            assert isinstance(state, dict)
            if int(state[b"num-other-sentinels"]) < 2 or int(state[b"num-slaves"]) < 1:
                return False
        return True

    def _named_by(self, port: int) -> int:
        reply = self.ask(port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.name)
        assert isinstance(reply, list | tuple)
        return int(reply[1])

    def named_primary(self) -> int | None:
        """The primary's port as the first sentinel that answers names it."""
        for port in self.sentinel_ports:
            try:
                return self._named_by(port)
            except (redis.RedisError, OSError):
                continue
        return None

    def kill_primary(self) -> float:
        """SIGKILL the primary; return when (time.monotonic()) it was sent."""
        proc = self.procs["primary"]
        proc.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        proc.wait(10)
        return killed_at

    def wait_promoted(self) -> float:
        """Wait until every sentinel names the replica; the seconds it took."""

        def promoted() -> bool:
            if any(self._named_by(port) != self.replica_port for port in self.sentinel_ports):
                return False
            role = self.ask(self.replica_port, "ROLE")
            return isinstance(role, list) and role[0] == b"master"

        return _wait(promoted, "the sentinels to promote the replica", self.timeout)

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)
