"""``serve(config)``: the one place where the listening socket is opened."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys

from .config import Config
from .node import Node
from .supervisor import REUSE_PORT_ENV, supervise

__all__ = ["run", "serve"]

log = logging.getLogger("wshub")


async def serve(config: Config, *, stop: asyncio.Event | None = None) -> None:
    """Serve until SIGTERM or SIGINT (or *stop* is set), then drain.

    Draining stops accepting, closes every client with 1001 and returns within
    ``config.drain_timeout``.
    """
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    node = Node(config, loop)
    await node.start()
    server = await loop.create_server(
        node.new_connection,
        config.host,
        config.port,
        backlog=4096,
        reuse_address=True,
        # Only workers of one supervisor share a port; a second server started
        # by mistake on a taken port must fail, not split the traffic.
        reuse_port=os.environ.get(REUSE_PORT_ENV) == "1",
    )
    for sock in server.sockets:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    addresses = ", ".join(_address(sock) for sock in server.sockets)
    log.info("listening on %s node=%s", addresses, node.node_id)
    # A line on stdout that scripts and tests can wait for.
    print(f"wshub listening on {addresses}", flush=True)
    try:
        await stop.wait()
    finally:
        log.info("shutting down: draining %d connections", len(node.connections))
        server.close()
        # The promise is to exit within --drain-timeout, whatever a client or
        # the backplane does meanwhile: a drain that overruns is abandoned
        # (shielded, so an inner await that ignores cancellation can't hold us).
        drain = asyncio.ensure_future(node.drain(config.drain_timeout))
        try:
            await asyncio.wait_for(asyncio.shield(drain), config.drain_timeout + 1.0)
        except TimeoutError:
            log.warning("drain overran --drain-timeout: exiting anyway")
            logging.shutdown()
            os._exit(0)
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
        log.info("stopped")


def _address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def run(config: Config, argv: list[str] | None = None) -> int:
    """Run :func:`serve` on uvloop when available (or supervise workers)."""
    if config.workers > 1:
        return supervise(config, argv or [])
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux and macOS
        runner = asyncio.run
    else:
        runner = uvloop.run
    try:
        runner(serve(config))
    except OSError as exc:
        print(
            f"wshub: cannot listen on {config.host}:{config.port}: {exc.strerror}", file=sys.stderr
        )
        return 1
    return 0
