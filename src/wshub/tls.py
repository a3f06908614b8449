"""The server's certificate: loaded from ``--tls-cert``/``--tls-key``, replaced
on reload, and how long it has left.

Each accepted socket starts its TLS handshake with the context of the
certificate loaded at that moment (:mod:`wshub.tlsaccept` asks
:attr:`ServerTLS.context` once per socket). A reload builds a whole new
context and swaps one reference:

* a file that does not load changes nothing (the old certificate stays);
* connections already open keep the session they negotiated;
* every handshake after the swap sees the new certificate.

This is what OpenSSL's maintainers advise over loading new files into a live
context (openssl/openssl#2147: "create and configure a new SSL_CTX, and then
switch to using that new SSL_CTX"). No SNI hook is set: Python decodes the
ClientHello's server name as ASCII before calling one, and a name that is not
ASCII made it print an "Exception ignored" traceback on every such handshake.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass

from cryptography import x509

from .errors import WshubError

__all__ = ["Certificate", "ServerTLS", "TLSError", "load_certificate", "server_context"]


class TLSError(WshubError):
    """The certificate or key did not load; the message names the file and why."""


def server_context() -> ssl.SSLContext:
    """A server context with Python's vetted defaults (ciphers, no compression,
    no renegotiation), nothing older than TLS 1.2 and no TLS 1.3 session
    tickets (see below)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # TLS 1.2 renegotiation asked by a client costs the server a handshake
    # each time, on an already open socket no cap counts again. OpenSSL 3
    # refuses it by default, 1.1.1 (still the system library of some
    # distributions) does not: said here, whichever library Python has.
    context.options |= ssl.OP_NO_RENEGOTIATION
    # OpenSSL sends TLS 1.3 tickets unasked right after the handshake, while
    # the client writes its upgrade request. A client already reading on a
    # thread of its own while another writes the request (websockets' sync
    # client starts its reader before the handshake; any such client over
    # OpenSSL) then runs SSL_read, which processes the tickets, alongside
    # SSL_write on one SSL object, which OpenSSL does not support
    # (openssl/openssl#20446): now and then the request never left such a
    # client (5 in 300 with websockets' client, three test loops at once), and
    # its upgrade hung until the handshake deadline (408). Without tickets
    # nothing reaches the client before our answer. The cost: a TLS 1.3 client
    # that reconnects makes a full handshake (docs/operations.md, TLS).
    context.num_tickets = 0
    return context


@dataclass(frozen=True, slots=True)
class Certificate:
    """One loaded certificate and key, with the context that serves them."""

    context: ssl.SSLContext
    serial: int
    subject: str
    not_after: float
    """Unix seconds."""

    def seconds_left(self, now: float) -> float:
        """Seconds from *now* (Unix seconds) until it expires; negative once expired."""
        return self.not_after - now

    def describe(self) -> str:
        return f"serial={self.serial:x} subject={self.subject} not_after={int(self.not_after)}"


def _refuse_password(*_: object) -> bytes:
    # Without a callback OpenSSL would prompt on the terminal for the
    # passphrase of an encrypted key and block the server (at a reload too).
    raise TLSError("the key is encrypted: give an unencrypted key file")


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise TLSError(f"{what}: cannot read {path}: {exc.strerror or exc}") from None


def load_certificate(cert_file: str, key_file: str) -> Certificate:
    """Load the pair into a new server context.

    Raises:
        TLSError: a file is missing or unreadable, is not PEM, the key is
            encrypted or does not match the certificate.
    """
    pem = _read(cert_file, "--tls-cert")
    _read(key_file, "--tls-key")
    try:
        leaf = x509.load_pem_x509_certificates(pem)[0]
    except ValueError:
        raise TLSError(f"--tls-cert: {cert_file} holds no PEM certificate") from None
    context = server_context()
    try:
        context.load_cert_chain(cert_file, key_file, password=_refuse_password)
    except TLSError as exc:
        raise TLSError(f"--tls-key: {key_file}: {exc}") from None
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise TLSError(f"--tls-key: {key_file} is not the key of {cert_file}") from None
        raise TLSError(f"--tls-key: {key_file} holds no usable PEM private key ({exc})") from None
    except OSError as exc:  # a file removed since it was read
        raise TLSError(f"--tls-cert/--tls-key: cannot load: {exc.strerror or exc}") from None
    # OpenSSL read the files itself: if the certificate changed between our
    # read and its own, the serial and expiry shown would be another's.
    if _read(cert_file, "--tls-cert") != pem:
        raise TLSError(f"--tls-cert: {cert_file} changed while it was loaded: reload again")
    return Certificate(
        context=context,
        serial=leaf.serial_number,
        subject=leaf.subject.rfc4514_string() or "-",
        not_after=leaf.not_valid_after_utc.timestamp(),
    )


class ServerTLS:
    """The listening context and the certificate it currently hands out."""

    def __init__(self, cert_file: str, key_file: str) -> None:
        """Load the files (raises :class:`TLSError` when they do not load)."""
        self.cert_file = cert_file
        self.key_file = key_file
        self.certificate = load_certificate(cert_file, key_file)

    @property
    def context(self) -> ssl.SSLContext:
        """The context a handshake starting now uses (the certificate loaded last)."""
        return self.certificate.context

    def reload(self) -> str:
        """Load the files again and use them for every new handshake.

        Returns what changed, for the log. Raises :class:`TLSError` (the
        certificate in use stays) when they do not load.
        """
        new = load_certificate(self.cert_file, self.key_file)
        old, self.certificate = self.certificate, new
        return f"certificate {new.describe()} (was serial={old.serial:x})"

    def expiry_seconds(self, now: float) -> float:
        """Seconds until the certificate in use expires (*now* in Unix seconds)."""
        return round(self.certificate.seconds_left(now), 3)
