"""``--workers N``: N server processes on one machine, sharing the port.

The supervisor starts each worker as ``wshub serve`` with the same options,
``--workers 1``, a node id of its own and ``SO_REUSEPORT``, so the kernel
spreads new connections across them; the workers form one hub through Redis.
A worker that dies is restarted, and its connections are reaped at once (not
after the node TTL), so every client elsewhere hears ``user_left`` for them.
SIGTERM or SIGINT is passed on to every worker, which drains as usual;
SIGHUP is passed on too, and each worker reloads what it can (a worker started
later reads the files anew anyway). The supervisor itself holds no files.
Should the supervisor die without passing anything on (SIGKILL, the OOM
killer), each worker is sent SIGTERM by the kernel and drains (Linux), rather
than serve on the port with no one to stop or restart it.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable

from .config import Config
from .ids import new_node_id

__all__ = ["follow_supervisor", "supervise"]

log = logging.getLogger("wshub.supervisor")

REUSE_PORT_ENV = "WSHUB_REUSE_PORT"
EXIT_REFUSED = 2
"""A worker's exit code when it refused to start (``wshub serve``'s usage
errors, and a node id in use): it registered nothing in Redis."""
SUPERVISOR_PID_ENV = "WSHUB_SUPERVISOR_PID"
_PR_SET_PDEATHSIG = 1  # prctl(2) option, <linux/prctl.h>


class Worker:
    def __init__(self, index: int, argv: list[str], config: Config) -> None:
        self.index = index
        self.argv = argv
        self.config = config
        self.node_id = ""
        self.proc: asyncio.subprocess.Process | None = None
        self.restarts = 0

    async def spawn(self) -> None:
        base = self.config.node_id or new_node_id()
        self.node_id = f"{base}-w{self.index}-{self.restarts}"
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "wshub",
            "serve",
            *self.argv,
            "--workers",
            "1",
            "--node-id",
            self.node_id,
            env={**os.environ, REUSE_PORT_ENV: "1", SUPERVISOR_PID_ENV: str(os.getpid())},
        )
        log.info("worker %d started pid=%d node=%s", self.index, self.proc.pid, self.node_id)


async def _supervise(config: Config, argv: list[str]) -> int:
    from .backplane.redis import reap_node
    from .backplane.redis_cluster import is_cluster_url, reap_cluster_node

    if is_cluster_url(config.redis_target):
        reap_node = reap_cluster_node

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    workers = [Worker(i, argv, config) for i in range(config.workers)]
    loop.add_signal_handler(signal.SIGHUP, _pass_on_sighup, workers)
    for worker in workers:
        await worker.spawn()
    stopping = asyncio.create_task(stop.wait())
    while not stop.is_set():
        waits = {asyncio.create_task(w.proc.wait()): w for w in workers if w.proc}
        done, _ = await asyncio.wait([*waits, stopping], return_when=asyncio.FIRST_COMPLETED)
        for task in waits:
            if task not in done:
                task.cancel()
        if stop.is_set():
            break
        for task, worker in waits.items():
            if task not in done:
                continue
            log.warning(
                "worker %d (node %s) exited with %s: restarting",
                worker.index,
                worker.node_id,
                task.result(),
            )
            if task.result() == EXIT_REFUSED:
                # It refused to start (its node id is in use: another
                # supervisor started from the same configuration) and
                # registered nothing: the id's presence is the live holder's,
                # and reaping it would announce that one's clients gone.
                log.warning(
                    "worker %d refused to start: node %s not reaped", worker.index, worker.node_id
                )
            else:
                await _reap(reap_node, config, worker.node_id)
            worker.restarts += 1
            # A worker that keeps crashing is restarted at most once a second.
            await asyncio.sleep(min(1.0, 0.1 * worker.restarts))
            await worker.spawn()
    for worker in workers:
        if worker.proc and worker.proc.returncode is None:
            worker.proc.send_signal(signal.SIGTERM)
    deadline = config.drain_timeout + 5
    for worker in workers:
        if worker.proc is None:
            continue
        try:
            await asyncio.wait_for(worker.proc.wait(), deadline)
        except TimeoutError:
            worker.proc.kill()
    return 0


async def _reap(reap_node: Callable[..., Awaitable[list[str]]], config: Config, node: str) -> None:
    """Announce the connections of a worker that died as gone, now."""
    try:
        gone = await reap_node(config.redis_target, node, prefix=config.redis_prefix)
        log.warning("announced %d connections of node %s as gone", len(gone), node)
    except Exception as exc:  # Redis down: the survivors reap it after the TTL
        log.warning("could not reap node %s now: %s", node, exc)


def follow_supervisor() -> None:
    """In a worker, before it serves: have the kernel send it SIGTERM when its
    supervisor dies, so that it drains and exits as when the supervisor is
    stopped, instead of serving on unmanaged (a supervisor started again
    would add its workers next to it on the port). Linux only (prctl
    PR_SET_PDEATHSIG); elsewhere a worker outlives a killed supervisor."""
    supervisor = os.environ.get(SUPERVISOR_PID_ENV)
    if not supervisor:
        return
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux
        return
    prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    if os.getppid() != int(supervisor):
        # It died before the request above: nothing would tell us any more.
        os.kill(os.getpid(), signal.SIGTERM)


def _past_its_interpreter_start(pid: int) -> bool:
    """Whether worker *pid* no longer has SIGHUP at its default action (exit):
    it ignores it (``wshub serve`` from its first line) or catches it (its loop).
    Before that it is still in the interpreter's own start, where a SIGHUP would
    end it; it has read no file yet, so it needs no reload either. Linux's
    /proc; elsewhere every worker is taken as past it."""
    try:
        with open(f"/proc/{pid}/status") as status:
            masks = dict(line.split(":", 1) for line in status if line.startswith("Sig"))
    except (OSError, ValueError):
        return True
    bit = 1 << (signal.SIGHUP - 1)
    return any(int(masks.get(name, "0"), 16) & bit for name in ("SigIgn", "SigCgt"))


def _pass_on_sighup(workers: list[Worker]) -> None:
    alive = [w.proc for w in workers if w.proc is not None and w.proc.returncode is None]
    # A worker just (re)started would die of it (decisions.md 19: SIGHUP never
    # ends the process); it loads the files anew when it starts anyway.
    ready = [proc for proc in alive if _past_its_interpreter_start(proc.pid)]
    for proc in ready:
        proc.send_signal(signal.SIGHUP)
    starting = len(alive) - len(ready)
    more = f" ({starting} still starting, reading the files anew)" if starting else ""
    log.info("SIGHUP passed on to %d workers%s", len(ready), more)


def supervise(config: Config, argv: list[str]) -> int:
    if config.port == 0:
        print(
            "wshub serve: --workers needs a fixed --port (0 would give each worker its own)",
            file=sys.stderr,
        )
        return 2
    return asyncio.run(_supervise(config, argv))
