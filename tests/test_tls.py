"""TLS (decisions.md 16) and SIGHUP (decisions.md 19): real ``wshub serve``
processes with certificates made by a test CA at test time, real TLS clients.

What an operator and an attacker would try: wss:// and https:// on one port;
a certificate renewed under a running server (SIGHUP), a broken renewal, the
expiry metric; plain HTTP and old TLS versions sent to the TLS port; sockets
that never finish the TLS handshake; a TLS client that stops reading; SIGHUP
to a server without TLS and to a supervisor of workers.
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from websockets.sync.client import ClientConnection, connect

from wshub.reload import Reloaders
from wshub.tls import ServerTLS, TLSError, load_certificate

from .conftest import TIMEOUT, Client, Server, free_port
from .rawws import encode_frame

LOOSE = ("--ip-connect-rate", "0", "--max-connections-per-ip", "0", "--message-rate", "0")

# -- A test CA and the certificates it signs ------------------------------------------


@dataclass
class Issued:
    cert_pem: bytes
    key_pem: bytes
    serial: int
    not_after: datetime.datetime


class TestCA:
    __test__ = False  # not a test class

    def __init__(self, directory: Path) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "wshub test CA")])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(self.key.public_key()), critical=False
            )
            .sign(self.key, hashes.SHA256())
        )
        self.path = directory / "ca.pem"
        self.path.write_bytes(self.cert.public_bytes(serialization.Encoding.PEM))

    def issue(self, serial: int, days: float) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        not_after = (now + datetime.timedelta(days=days)).replace(microsecond=0)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(serial)
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(not_after)
            .add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.DNSName("localhost"),
                        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    ]
                ),
                critical=False,
            )
            .add_extension(
                x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return Issued(cert.public_bytes(serialization.Encoding.PEM), key_pem, serial, not_after)

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.path))


@dataclass
class Files:
    cert: Path
    key: Path

    def install(self, issued: Issued) -> None:
        """Replace both files atomically, as a renewal tool does."""
        for path, data in ((self.key, issued.key_pem), (self.cert, issued.cert_pem)):
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)

    @property
    def flags(self) -> tuple[str, ...]:
        return ("--tls-cert", str(self.cert), "--tls-key", str(self.key))


@pytest.fixture
def ca(tmp_path: Path) -> TestCA:
    return TestCA(tmp_path)


@pytest.fixture
def files(tmp_path: Path, ca: TestCA) -> Files:
    files = Files(tmp_path / "cert.pem", tmp_path / "key.pem")
    files.install(ca.issue(1001, days=10))
    return files


@pytest.fixture
def tls_server(make_server: Callable[..., Server], files: Files) -> Server:
    return make_server(*LOOSE, *files.flags, "--log-level", "info")


# -- Helpers --------------------------------------------------------------------------


def wss_url(server: Server, host: str = "127.0.0.1") -> str:
    return f"wss://{host}:{server.port}/websocket"


def wss_connect(server: Server, ca: TestCA, host: str = "127.0.0.1") -> ClientConnection:
    return connect(
        wss_url(server, host),
        ssl=ca.client_context(),
        # An upper bound: a TLS handshake and the upgrade, on a busy 2-core machine.
        open_timeout=3 * TIMEOUT,
        close_timeout=TIMEOUT,
        max_queue=None,
        legacy=True,  # a connection held across calls, not a with-block
    )


def wss_client(server: Server, ca: TestCA, host: str = "127.0.0.1") -> Client:
    ws = wss_connect(server, ca, host)
    welcome = json.loads(ws.recv(timeout=TIMEOUT))
    assert welcome["type"] == "welcome", welcome
    return Client(ws, welcome["connectionId"], welcome)


def peer_serial(server: Server, ca: TestCA, server_name: str | None = None) -> int:
    """The serial of the certificate a new handshake sees (by IP: no SNI; by
    name: with SNI)."""
    context = ca.client_context()
    with socket.create_connection((server.host, server.port), timeout=TIMEOUT) as raw:
        with context.wrap_socket(raw, server_hostname=server_name or server.host) as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def https_get(server: Server, ca: TestCA, path: str) -> tuple[int, bytes]:
    import urllib.request

    url = f"https://127.0.0.1:{server.port}{path}"
    with urllib.request.urlopen(url, timeout=TIMEOUT, context=ca.client_context()) as response:
        return response.status, response.read()


def metric(server: Server, ca: TestCA, name: str) -> float | None:
    _, body = https_get(server, ca, "/metrics")
    match = re.search(rf"^{re.escape(name)} (\S+)$", body.decode(), re.MULTILINE)
    return float(match.group(1)) if match else None


def wait_for_log(server: Server, pattern: str, count: int = 1) -> list[str]:
    found: list[str] = []

    def seen() -> bool:
        found[:] = [line for line in list(server.stderr_lines) if re.search(pattern, line)]
        return len(found) >= count

    server.wait_for(seen, f"{count} log lines matching {pattern!r}")
    return found


def chat(a: Client, b: Client, text: str) -> None:
    """*a* sends a message and *b* receives it, intact."""
    a.send({"type": "message", "content": text})
    got = b.recv_type("message")
    assert (got["connectionId"], got["content"]) == (a.id, text)


# -- wss:// and https:// --------------------------------------------------------------


def test_wss_messages_between_clients_never_use_the_plain_socket(
    tls_server: Server, ca: TestCA
) -> None:
    """Over wss:// (verified against the test CA), messages and broadcasts
    reach every client intact; the fan-out never writes to a TLS socket
    directly (--direct-send is on by default)."""
    clients = [wss_client(tls_server, ca) for _ in range(4)]
    tls_object = clients[0].ws.socket
    assert isinstance(tls_object, ssl.SSLSocket)
    assert tls_object.version() in ("TLSv1.2", "TLSv1.3")
    clients[0].send({"type": "message", "content": "hello over TLS ✓"})
    for client in clients[1:]:
        got = client.recv_type("message")
        assert (got["connectionId"], got["content"]) == (clients[0].id, "hello over TLS ✓")
    for round_ in range(20):  # enough fan-out passes for the direct path to be tried
        clients[1].send({"type": "broadcast", "content": f"to all {round_}"})
        for client in clients:
            assert client.recv_type("broadcast")["content"] == f"to all {round_}"
    assert metric(tls_server, ca, "wshub_direct_sends_total") == 0
    for client in clients:
        client.close()


def test_https_health_and_expiry_metric(tls_server: Server, ca: TestCA) -> None:
    """/healthz answers over https://; the expiry metric is the seconds until
    the certificate's notAfter (10 days here)."""
    assert https_get(tls_server, ca, "/healthz") == (200, b"ok\n")
    left = metric(tls_server, ca, "wshub_tls_certificate_expiry_seconds")
    assert left is not None
    assert abs(left - 10 * 86400) < 120, left


def test_tls_below_1_2_is_refused(tls_server: Server, ca: TestCA) -> None:
    """A client limited to TLS 1.1 gets no session; the same client allowed
    TLS 1.2 does (so the refusal is the server's)."""

    def handshake(version: ssl.TLSVersion) -> str:
        context = ca.client_context()
        context.set_ciphers("DEFAULT:@SECLEVEL=0")  # let this client offer TLS 1.1
        with warnings.catch_warnings():  # TLS 1.0 and 1.1 are deprecated: that is the point
            warnings.simplefilter("ignore", DeprecationWarning)
            context.minimum_version = ssl.TLSVersion.TLSv1
            context.maximum_version = version
        with socket.create_connection((tls_server.host, tls_server.port), timeout=TIMEOUT) as raw:
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                return str(tls.version())

    assert handshake(ssl.TLSVersion.TLSv1_2) == "TLSv1.2"
    with pytest.raises(ssl.SSLError):
        handshake(ssl.TLSVersion.TLSv1_1)
    assert https_get(tls_server, ca, "/healthz")[0] == 200


UPGRADE = (
    b"GET /websocket HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n\r\n"
)


def _answer_head(tls: ssl.SSLSocket, into: bytearray) -> None:
    """Read into *into* until the end of the HTTP answer's head (or EOF)."""
    while b"\r\n\r\n" not in into:
        chunk = tls.recv(4096)
        if not chunk:
            return
        into += chunk


def test_tls13_sends_no_session_ticket_before_the_upgrade_answer(
    tls_server: Server, ca: TestCA
) -> None:
    """OpenSSL would send two TLS 1.3 session tickets unasked right after the
    handshake, while the client writes its request: a client that reads on a
    thread of its own then lost its request now and then (the next test). So
    the server sends none: once a TLS 1.3 client has read the 101, it holds
    no ticket (it would, had any come: they precede the 101 on the wire)."""
    with socket.create_connection((tls_server.host, tls_server.port), timeout=TIMEOUT) as raw:
        with ca.client_context().wrap_socket(raw, server_hostname="localhost") as tls:
            assert tls.version() == "TLSv1.3"
            tls.sendall(UPGRADE)
            head = bytearray()
            _answer_head(tls, head)
            assert head.startswith(b"HTTP/1.1 101"), bytes(head)
            assert tls.session is not None and not tls.session.has_ticket


def _upgrade_read_on_another_thread(server: Server, context: ssl.SSLContext) -> bytes:
    """One upgrade as a threaded client makes it: a thread reads the socket
    from the end of the TLS handshake on while this one writes the request.
    Returns the answer's head (empty if none came within TIMEOUT)."""
    with socket.create_connection((server.host, server.port), timeout=TIMEOUT) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            tls.settimeout(None)  # blocking, as websockets' sync client runs it
            head = bytearray()
            answered = threading.Event()

            def read() -> None:
                try:
                    _answer_head(tls, head)
                except OSError:
                    pass
                answered.set()

            reader = threading.Thread(target=read, daemon=True)
            reader.start()
            try:
                tls.sendall(UPGRADE)
                if not answered.wait(TIMEOUT):
                    return b""
            finally:
                tls.shutdown(socket.SHUT_RDWR)  # wakes the reader if it still waits
                reader.join(TIMEOUT)
            return bytes(head)


def test_a_client_reading_on_its_own_thread_gets_every_upgrade_answered(
    tls_server: Server, ca: TestCA
) -> None:
    """The hang a threaded client saw (websockets' sync client, which the
    other tests here use, reads on a thread from the end of the TLS handshake
    on): its SSL_read, taking in the tickets OpenSSL sent after the
    handshake, ran alongside its SSL_write of the upgrade request on the same
    SSL object, and now and then the request never left the client (TCP_INFO:
    not one byte sent past its Finished); it waited out the handshake deadline
    for a 408. Here 40 such upgrades in a row are all answered 101."""
    context = ca.client_context()
    for attempt in range(40):
        head = _upgrade_read_on_another_thread(tls_server, context)
        assert head.startswith(b"HTTP/1.1 101"), f"upgrade {attempt + 1} of 40: {head!r}"


# -- SIGHUP -----------------------------------------------------------------------------


def test_sighup_new_certificate_keeps_connections_and_serves_the_new_one(
    tls_server: Server, ca: TestCA, files: Files
) -> None:
    """After a renewal and SIGHUP, an open connection keeps chatting, every new
    handshake (with or without SNI) sees the new certificate, and the expiry
    metric follows it."""
    old = wss_client(tls_server, ca)
    assert peer_serial(tls_server, ca) == 1001
    files.install(ca.issue(1002, days=40))
    tls_server.proc.send_signal(signal.SIGHUP)
    (line,) = wait_for_log(tls_server, r"reload what=tls")
    assert "serial=3ea" in line and "was serial=3e9" in line, line  # 1002, 1001 in hex
    assert peer_serial(tls_server, ca) == 1002
    assert peer_serial(tls_server, ca, server_name="localhost") == 1002
    new = wss_client(tls_server, ca, host="localhost")
    assert new.ws.socket.getpeercert()["serialNumber"] == "03EA"  # type: ignore[union-attr]
    assert old.recv_type("user_joined")["connectionId"] == new.id
    chat(old, new, "still here")
    chat(new, old, "welcome back")
    left = metric(tls_server, ca, "wshub_tls_certificate_expiry_seconds")
    assert left is not None and abs(left - 40 * 86400) < 120, left
    assert tls_server.proc.poll() is None


def _garbage(files: Files, ca: TestCA) -> None:
    files.cert.write_bytes(b"-----BEGIN CERTIFICATE-----\nnot base64 at all\n")


def _key_of_another(files: Files, ca: TestCA) -> None:
    files.cert.write_bytes(ca.issue(2001, days=5).cert_pem)  # the key file stays the old one


def _missing(files: Files, ca: TestCA) -> None:
    files.key.unlink()


def _encrypted_key(files: Files, ca: TestCA) -> None:
    issued = ca.issue(2002, days=5)
    key = serialization.load_pem_private_key(issued.key_pem, None)
    files.cert.write_bytes(issued.cert_pem)
    files.key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )


@pytest.mark.parametrize(
    "breakage",
    [_garbage, _key_of_another, _missing, _encrypted_key],
    ids=["garbage", "mismatched-key", "missing-key", "encrypted-key"],
)
def test_sighup_with_broken_files_keeps_the_old_certificate(
    tls_server: Server, ca: TestCA, files: Files, breakage: Callable[[Files, TestCA], None]
) -> None:
    """A renewal that does not load: an error is logged naming the file, the
    process lives, open and new connections get the old certificate."""
    before = wss_client(tls_server, ca)
    breakage(files, ca)
    tls_server.proc.send_signal(signal.SIGHUP)
    (line,) = wait_for_log(tls_server, r"ERROR wshub reload_failed what=tls")
    assert str(files.cert.name) in line or str(files.key.name) in line, line
    assert tls_server.proc.poll() is None
    assert peer_serial(tls_server, ca) == 1001
    after = wss_client(tls_server, ca)
    chat(before, after, "the old certificate still serves")
    assert https_get(tls_server, ca, "/healthz")[0] == 200
    left = metric(tls_server, ca, "wshub_tls_certificate_expiry_seconds")
    assert left is not None and abs(left - 10 * 86400) < 120, left


def test_sighup_without_tls_keeps_serving_and_logs(make_server: Callable[..., Server]) -> None:
    """SIGHUP to a server without TLS: it logs that there was nothing to
    reload, the process lives and open connections keep working (before this,
    SIGHUP ended the process with no 1001)."""
    server = make_server(*LOOSE, "--log-level", "info")
    a, b = server.client(), server.client()
    for count in range(1, 4):  # one at a time: signals sent together may merge into one
        server.proc.send_signal(signal.SIGHUP)
        wait_for_log(server, r"INFO wshub reload what=nothing", count=count)
    assert server.proc.poll() is None
    a.recv_type("user_joined")
    chat(a, b, "after the hangup")
    assert server.get("/healthz")[0] == 200


def test_sighup_to_the_supervisor_reaches_every_worker(
    redis_server, ca: TestCA, files: Files
) -> None:
    """--workers 2: SIGHUP to the supervisor is passed on; both workers load
    the new certificate and every new handshake sees it; nobody exits."""
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "wshub",
            "serve",
            "--workers",
            "2",
            "--port",
            str(port),
            "--redis-url",
            redis_server.url,
            "--cluster-name",
            f"tls{port}",
            *LOOSE,
            *files.flags,
            "--log-level",
            "info",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    server = Server(proc, "127.0.0.1", port, [])

    def pump() -> None:
        assert proc.stderr is not None
        for text in proc.stderr:
            server.stderr_lines.append(text)

    pumping = threading.Thread(target=pump, daemon=True)
    pumping.start()
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(2)]
        assert all("listening on" in line and "(TLS)" in line for line in lines), lines
        assert {peer_serial(server, ca) for _ in range(10)} == {1001}
        files.install(ca.issue(1003, days=20))
        proc.send_signal(signal.SIGHUP)
        wait_for_log(server, r"SIGHUP passed on to 2 workers")
        wait_for_log(server, r"reload what=tls .*serial=3eb", count=2)
        assert {peer_serial(server, ca) for _ in range(10)} == {1003}
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(TIMEOUT * 3) == 0
        proc.stdout.close()  # type: ignore[union-attr]
        pumping.join(TIMEOUT)
        proc.stderr.close()  # type: ignore[union-attr]
    assert not [line for line in server.stderr_lines if "Traceback" in line]


# -- What should not be sent to a TLS port ----------------------------------------------


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n",
        b"GET /websocket HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\n\r\n",
        b"\x16\x03\x01\x00\x05\x01\x00\x00\x01\x00" * 50,  # a malformed ClientHello
    ],
    ids=["http", "ws-upgrade", "bad-hello"],
)
def test_plain_http_to_the_tls_port_is_dropped_quietly(
    tls_server: Server, ca: TestCA, request_bytes: bytes
) -> None:
    """Plain HTTP, a ws:// upgrade or a malformed ClientHello on the TLS port:
    the socket is closed at once (no plaintext answer), nothing is logged by
    asyncio or as a traceback, and the server keeps serving TLS clients."""
    a = wss_client(tls_server, ca)
    for _ in range(5):
        with socket.create_connection((tls_server.host, tls_server.port), timeout=TIMEOUT) as s:
            s.sendall(request_bytes)
            received = b""
            start = time.monotonic()
            while chunk := _recv_or_reset(s):
                received += chunk
            assert time.monotonic() - start < TIMEOUT
            assert b"HTTP/" not in received
    b = wss_client(tls_server, ca)
    chat(b, a, "still serving")
    assert https_get(tls_server, ca, "/healthz")[0] == 200
    noise = [line for line in tls_server.stderr_lines if "asyncio" in line or "Traceback" in line]
    assert not noise, noise


def _recv_or_reset(sock: socket.socket) -> bytes:
    try:
        return sock.recv(65536)
    except ConnectionResetError:
        return b""


def _client_hello() -> bytes:
    """The first flight of a real TLS client, made without a socket."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


@pytest.mark.parametrize("sent", ["nothing", "half-hello", "whole-hello"])
def test_unfinished_tls_handshake_is_dropped_by_the_handshake_deadline(
    make_server: Callable[..., Server], files: Files, ca: TestCA, sent: str
) -> None:
    """A TCP connection that sends no ClientHello, half of one, or a whole one
    and then nothing more, is closed by --handshake-timeout (1 s here): not
    before it, and not long after; meanwhile others connect as usual."""
    server = make_server(*LOOSE, *files.flags, "--handshake-timeout", "1")
    hello = _client_hello()
    data = {"nothing": b"", "half-hello": hello[: len(hello) // 2], "whole-hello": hello}[sent]
    with socket.create_connection((server.host, server.port), timeout=TIMEOUT * 2) as s:
        start = time.monotonic()
        if data:
            s.sendall(data)
        other = wss_client(server, ca)  # the stalled socket holds nobody up
        while _recv_or_reset(s):  # a whole hello gets the server's first flight, then EOF
            pass
        elapsed = time.monotonic() - start
    assert 0.9 <= elapsed < 1.0 + TIMEOUT / 2, elapsed
    other.roundtrip()
    other.close()


def test_tls_client_that_stops_reading_is_closed_as_a_slow_consumer(
    make_server: Callable[..., Server], files: Files, ca: TestCA
) -> None:
    """Over TLS the send buffer limit holds too: a client that upgrades and
    never reads again is closed with 1008 once its backlog passes the limit,
    and the others keep receiving everything in order."""
    server = make_server(
        *LOOSE, *files.flags, "--send-buffer-limit", "65536", "--close-timeout", "1"
    )
    raw = socket.create_connection((server.host, server.port), timeout=TIMEOUT)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled = ca.client_context().wrap_socket(raw, server_hostname="localhost")
    stalled.sendall(
        b"GET /websocket HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\n\r\n"
    )
    assert stalled.recv(4096).startswith(b"HTTP/1.1 101")
    sender, watcher = wss_client(server, ca), wss_client(server, ca)
    sender.recv_type("user_joined")
    pad = "x" * 900
    sent = 0
    deadline = time.monotonic() + TIMEOUT * 2
    while metric(server, ca, "wshub_slow_consumer_closes_total") != 1:
        assert time.monotonic() < deadline, "the stalled TLS client was never closed"
        for _ in range(50):
            sender.send({"type": "message", "content": f"{sent} {pad}"})
            sent += 1
        for expected in range(sent - 50, sent):
            assert watcher.recv_type("message")["content"].split(" ")[0] == str(expected)
    # Counted once the socket is gone: the client never answers the Close,
    # so after --close-timeout.
    server.wait_for(
        lambda: metric(server, ca, 'wshub_closes_total{code="1008"}') == 1, "the 1008 close"
    )
    stalled.close()


# -- Configuration and start ---------------------------------------------------------------


def _serve_fails(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "wshub", "serve", "--port", "0", *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 2,
    )


def test_tls_cert_and_key_go_together(files: Files) -> None:
    """One of the two files alone is refused at start with exit 2 and a
    message naming the missing flag."""
    alone = _serve_fails("--tls-cert", str(files.cert))
    assert alone.returncode == 2
    assert "--tls-key: --tls-cert needs --tls-key too" in alone.stderr
    alone = _serve_fails("--tls-key", str(files.key))
    assert alone.returncode == 2 and "--tls-cert: --tls-key needs --tls-cert too" in alone.stderr


def test_files_that_do_not_load_stop_the_start(files: Files, ca: TestCA, tmp_path: Path) -> None:
    """Files that do not load: exit 2, a message naming the file, no traceback."""
    files.key.write_bytes(ca.issue(3001, days=1).key_pem)  # not the certificate's key
    result = _serve_fails(*files.flags)
    assert result.returncode == 2, result.stderr
    assert f"--tls-key: {files.key} is not the key of {files.cert}" in result.stderr
    assert "Traceback" not in result.stderr
    result = _serve_fails("--tls-cert", str(tmp_path / "nope.pem"), "--tls-key", str(files.key))
    assert result.returncode == 2 and "cannot read" in result.stderr, result.stderr


def test_load_certificate_reads_serial_and_expiry(files: Files, ca: TestCA) -> None:
    """The loaded certificate's serial and notAfter are the file's."""
    issued = ca.issue(4242, days=3)
    files.install(issued)
    certificate = load_certificate(str(files.cert), str(files.key))
    assert certificate.serial == 4242
    assert certificate.not_after == issued.not_after.timestamp()
    assert certificate.seconds_left(issued.not_after.timestamp() - 5) == 5
    tls = ServerTLS(str(files.cert), str(files.key))
    files.cert.write_bytes(b"nothing")
    with pytest.raises(TLSError, match="holds no PEM certificate"):
        tls.reload()
    assert tls.certificate is not None and tls.certificate.serial == 4242


def test_reloaders_run_every_one_and_report_each() -> None:
    """A failing reloader is reported and does not stop the next one; names
    are unique."""
    reloaders = Reloaders()
    calls: list[str] = []

    def broken() -> str:
        calls.append("broken")
        raise OSError("disk on fire")

    reloaders.add("first", broken)
    reloaders.add("second", lambda: calls.append("second") or "loaded 3 keys")
    with pytest.raises(ValueError):
        reloaders.add("first", broken)
    outcomes = reloaders.reload_all()
    assert calls == ["broken", "second"]
    assert [(o.name, o.ok, o.detail) for o in outcomes] == [
        ("first", False, "disk on fire"),
        ("second", True, "loaded 3 keys"),
    ]


# -- Clients: wshub client and wshub bench over wss:// -------------------------------------


def _client(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "wshub", "client", *args],
        input="/info\nhello\n",
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 3,
    )


def test_wshub_client_speaks_wss(tls_server: Server, ca: TestCA) -> None:
    """`wshub client` over wss:// with --ca-file and with --insecure; without
    either, a private CA is not trusted and it says how to fix that."""
    peer = wss_client(tls_server, ca)
    for url, flags in (
        (wss_url(tls_server), ("--ca-file", str(ca.path))),
        (f"https://localhost:{tls_server.port}", ("--ca-file", str(ca.path))),
        (wss_url(tls_server), ("--insecure",)),
    ):
        result = _client(url, "--json", "--wait", "0", *flags)
        assert result.returncode == 0, result.stderr
        kinds = [json.loads(line)["type"] for line in result.stdout.splitlines()]
        assert kinds == ["welcome", "user_info_response"], result.stdout
        assert peer.recv_type("message")["content"] == "hello"
    untrusted = _client(wss_url(tls_server), "--json")
    assert untrusted.returncode == 1
    assert "certificate is not trusted" in untrusted.stderr and "--ca-file" in untrusted.stderr
    plain = _client(wss_url(tls_server).replace("wss", "ws"), "--insecure")
    assert plain.returncode == 2 and "need a wss:// URL" in plain.stderr


def test_wshub_bench_python_engine_speaks_wss(tls_server: Server, ca: TestCA) -> None:
    """`wshub bench fanout` over wss:// verified by --ca-file delivers; the
    native engine, which has no TLS, refuses the URL instead of sending
    plaintext."""
    url = wss_url(tls_server)
    result = subprocess.run(
        [sys.executable, "-m", "wshub", "bench", "fanout", "--url", url, "--ca-file", str(ca.path)]
        + ["-n", "20", "--duration", "1", "--warmup", "0.5", "--json"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 6,
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["connections_open"] == 20 and report["deliveries_per_s"] > 0, report
    native = subprocess.run(
        [sys.executable, "-m", "wshub", "bench", "fanout", "--engine", "native", "--url", url],
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 2,
    )
    assert native.returncode == 2 and "speaks ws:// only" in native.stderr


def test_tls_close_from_a_client_that_stopped_reading_ends_within_the_close_timeout(
    make_server: Callable[..., Server], files: Files, ca: TestCA
) -> None:
    """A TLS client that stopped reading with data still queued for it sends
    a Close: the TLS close cannot flush, and the socket is dropped within
    --close-timeout (asyncio's own default would hold it 30 s)."""
    server = make_server(
        *LOOSE, *files.flags, "--close-timeout", "1", "--send-buffer-limit", str(8 << 20)
    )
    raw = socket.create_connection((server.host, server.port), timeout=TIMEOUT)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled = ca.client_context().wrap_socket(raw, server_hostname="localhost")
    stalled.sendall(
        b"GET /websocket HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\n\r\n"
    )
    assert stalled.recv(4096).startswith(b"HTTP/1.1 101")
    sender, watcher = wss_client(server, ca), wss_client(server, ca)
    sender.recv_type("user_joined")
    pad = "x" * 900
    for n in range(1000):  # about 1 MB for the stalled client: far more than its windows
        sender.send({"type": "message", "content": f"{n} {pad}"})
    for n in range(1000):
        assert watcher.recv_type("message")["content"].startswith(f"{n} ")
    assert metric(server, ca, "wshub_slow_consumer_closes_total") == 0
    stalled.sendall(encode_frame(0x8, b"\x03\xe8"))  # Close 1000, and still no reading
    start = time.monotonic()
    server.wait_for(
        lambda: metric(server, ca, 'wshub_closes_total{code="1000"}') == 1, "the socket dropped"
    )
    assert time.monotonic() - start < 1 + TIMEOUT / 2
    assert metric(server, ca, 'wshub_connections{state="closing"}') == 0
    stalled.close()
