"""``serve(config)``: the one place where the listening socket is opened.

Signals: SIGTERM and SIGINT drain and exit; SIGHUP never ends the process
(decisions.md 19): it runs every reloader (:mod:`wshub.reload`) and logs what
each did. With ``--tls-cert``/``--tls-key`` the same port speaks TLS only
(``wss://`` and ``https://``); the certificate is one of the reloadables.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket
import sys
import time
from asyncio import Server
from collections.abc import Awaitable, Callable
from typing import Any

from .api import ApiKeys, ApiKeysError
from .backplane import NodeIdInUse
from .config import Config
from .connection import Connection
from .logs import log_event
from .node import Node
from .reload import Reloaders
from .supervisor import REUSE_PORT_ENV, follow_supervisor, supervise
from .tls import ServerTLS, TLSError
from .tlsaccept import HandshakeSlots, TlsAccepts

__all__ = ["run", "serve"]

GC_YOUNG_THRESHOLD = 50_000
"""Allocations between two collections of the youngest generation (Python's
default: 700). Every 10 young collections make a middle one, and a full
collection follows whenever the long-lived objects grew by a quarter: a storm
of 5,000 connections (~40 tracked objects each) made three full collections of
0.15-0.4 s each on the 2-core VM, each holding the loop (decisions.md 18: no
pass over ~50 ms). With 50,000, a storm makes at most one, and a young
collection costs a few ms. Cycles are still collected, a little later."""

log = logging.getLogger("wshub")


async def serve(
    config: Config,
    *,
    stop: asyncio.Event | None = None,
    tls: ServerTLS | None = None,
    api_keys: ApiKeys | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT (or *stop* is set), then drain.

    Draining stops accepting, closes every client with 1001 and returns within
    ``config.drain_timeout``. *tls* is the certificate loaded by :func:`run`
    (loaded here from ``config`` when not given).
    """
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    reloaders = Reloaders()
    # Before anything slow (the backplane's connection): a SIGHUP that comes
    # early must not end the process either.
    loop.add_signal_handler(signal.SIGHUP, _reload, reloaders)
    if tls is None and config.tls_cert:
        tls = ServerTLS(config.tls_cert, config.tls_key)
    node = Node(config, loop, api_keys=api_keys)
    if node.api is not None and config.api_keys_file:
        reloaders.add("api_keys", node.api.reload)
    if tls is not None:
        certificate = tls
        reloaders.add("tls", certificate.reload)
        node.metrics.gauge(
            "wshub_tls_certificate_expiry_seconds",
            "Seconds until the certificate in use expires (its notAfter); negative once expired.",
            lambda: certificate.expiry_seconds(time.time()),
        )
    await node.start()
    # What was built to start (modules, config, routes) lives as long as the
    # process: out of every collection from now on.
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])
    accepts: list[TlsAccepts] = []

    def accepted(slots: HandshakeSlots, connection: Callable[[], Connection]) -> Any:
        """The protocol factory of a port: *connection* itself without TLS,
        else a TLS accept that counts the socket in *slots* from the accept on
        (wshub.tlsaccept) and hands it to *connection* once TLS is up."""
        if tls is None:
            return connection
        # Connection's own deadline starts once the TLS handshake is done: a
        # client that never sends a ClientHello, or stops halfway, is dropped
        # by the handshake's. A TLS close waits for the client's close_notify
        # (and for the client to read what is still queued) no longer than a
        # WebSocket close may take.
        server_tls = tls  # (narrowed for the lambda)
        factory = TlsAccepts(
            slots,
            lambda: server_tls.context,
            connection,
            handshake_timeout=config.handshake_timeout,
            shutdown_timeout=config.close_timeout,
        )
        accepts.append(factory)
        return factory

    server = await _listening(
        f"{config.host}:{config.port}",
        loop.create_server,
        accepted(node.gateway, node.new_connection),
        config.host,
        config.port,
        backlog=4096,
        reuse_address=True,
        # Only workers of one supervisor share a port; a second server started
        # by mistake on a taken port must fail, not split the traffic.
        reuse_port=os.environ.get(REUSE_PORT_ENV) == "1",
    )
    servers = [server]
    api_address = config.api_listen_address
    if api_address is not None and node.api_gateway is not None:
        # The API on its own (private) address; the public port has no /api/.
        api_server = await _listening(
            config.api_listen,
            loop.create_server,
            accepted(node.api_gateway, node.new_api_connection),
            api_address[0],
            api_address[1],
            backlog=1024,
            reuse_address=True,
            reuse_port=os.environ.get(REUSE_PORT_ENV) == "1",
        )
        servers.append(api_server)
    for sock in (sock for each in servers for sock in each.sockets):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    addresses = ", ".join(_address(sock) for sock in server.sockets)
    if tls is not None:
        addresses += " (TLS)"
    if len(servers) > 1:
        addresses += ", API on " + ", ".join(_address(sock) for sock in servers[1].sockets)
    log.info("listening on %s node=%s", addresses, node.node_id)
    if tls is not None:
        log_event(log, logging.INFO, "tls_certificate", certificate=tls.certificate.describe())
    # A line on stdout that scripts and tests can wait for.
    print(f"wshub listening on {addresses}", flush=True)
    try:
        await stop.wait()
    finally:
        log.info("shutting down: draining %d connections", len(node.connections))
        # The listeners stay open while the clients close (decisions.md 1):
        # a new upgrade meanwhile is answered 503 and /readyz 503, so a load
        # balancer sees the node leave instead of a refused connection.
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
        for each in servers:
            each.close()
        for factory in accepts:
            factory.cancel()  # TLS handshakes still running: nothing was served
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(signum)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # not the default (exit) while exiting
        log.info("stopped")


class CannotListen(Exception):
    """A listening address that could not be bound (taken, not ours)."""

    def __init__(self, address: str, reason: str) -> None:
        super().__init__(f"cannot listen on {address}: {reason}")


async def _listening(
    address: str, create: Callable[..., Awaitable[Server]], *args: Any, **kwargs: Any
) -> Server:
    """``await create(*args, **kwargs)``, its OSError named by *address*: the
    public port and the --api-listen one fail alike, and the message must
    say which."""
    try:
        return await create(*args, **kwargs)
    except OSError as exc:
        raise CannotListen(address, exc.strerror or str(exc)) from exc


def _reload(reloaders: Reloaders) -> None:
    """SIGHUP: run every reloader and log what each did."""
    if not reloaders.names:
        log_event(log, logging.INFO, "reload", what="nothing", detail="nothing to reload")
        return
    for outcome in reloaders.reload_all():
        if outcome.ok:
            log_event(log, logging.INFO, "reload", what=outcome.name, detail=outcome.detail)
        else:
            log_event(log, logging.ERROR, "reload_failed", what=outcome.name, error=outcome.detail)


def _address(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def run(config: Config, argv: list[str] | None = None) -> int:
    """Run :func:`serve` on uvloop when available (or supervise workers)."""
    # Until the loop's own handler is in place, a SIGHUP must not kill us
    # (inherited by the workers too, until they install theirs).
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    tls = None
    if config.tls_cert:
        try:
            # Checked here, before any worker starts: bad files are a usage
            # error, not a worker that dies and is restarted forever.
            tls = ServerTLS(config.tls_cert, config.tls_key)
        except TLSError as exc:
            print(f"wshub serve: {exc}", file=sys.stderr)
            return 2
    api_keys = None
    if config.api_keys or config.api_keys_file:
        try:
            # Like the certificate: a bad key or keys file is a usage error.
            api_keys = ApiKeys(config.api_keys, config.api_keys_file)
        except ApiKeysError as exc:
            print(f"wshub serve: {exc}", file=sys.stderr)
            return 2
    if config.workers > 1:
        return supervise(config, argv or [])
    follow_supervisor()  # a worker of --workers: stop with the supervisor
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux and macOS
        runner = asyncio.run
    else:
        runner = uvloop.run
    try:
        runner(serve(config, tls=tls, api_keys=api_keys))
    except NodeIdInUse as exc:
        # Logged by the backplane too; a second live node under one id would
        # corrupt the cluster's presence, so it does not start.
        print(f"wshub serve: {exc}", file=sys.stderr)
        return 2
    except CannotListen as exc:
        print(f"wshub: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # anything else the start could not open
        print(f"wshub: cannot start: {exc}", file=sys.stderr)
        return 1
    return 0
