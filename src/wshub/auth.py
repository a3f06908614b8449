"""Signed connect tokens (decisions.md 15 and 19), without sockets or clocks.

Theory of operation:

* :func:`token_offer` finds the token a client offered in its upgrade request:
  the two subprotocols ``wshub`` and ``bearer.TOKEN``, ``Authorization: Bearer
  TOKEN``, or ``?token=`` when that is switched on. It says which subprotocol to
  answer, and never raises.
* :class:`TokenVerifier` checks a token with PyJWT, the algorithm pinned by the
  configured key (never read from the token), and turns it into an
  :class:`Identity` or an :class:`AuthRefusal`. Time is passed in (``now``):
  PyJWT's own clock checks are off and ``exp``/``nbf``/``iat`` are checked
  here, so the result depends on nothing but the arguments.
* :meth:`TokenVerifier.authenticate` applies ``--auth off|optional|required``
  to an offer: anonymous (``None``), an identity, or a refusal. A refusal is
  answered after the upgrade with one ``error`` and close ``4401``.
* :func:`room_allowed` applies a token's ``rooms`` claim; a refusal there is
  ``forbidden_room`` and close ``4403``.
* :meth:`TokenVerifier.verify_refresh` checks a ``refresh`` against the
  connection's identity: the same ``sub``, a later ``exp``.

Every refusal fails closed: an input this module does not understand is
``unauthorized``, never an identity.
"""

from __future__ import annotations

import calendar
import enum
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, NamedTuple
from urllib.parse import parse_qsl

import jwt
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from .config import Config, ConfigError
from .errors import TOKEN_EXPIRED, UNAUTHORIZED, Disconnect
from .protocol import ErrorCode, Refusal

__all__ = [
    "MAX_SUB_CHARS",
    "MAX_TOKEN_BYTES",
    "SUBPROTOCOL",
    "AuthMode",
    "AuthRefusal",
    "Identity",
    "PublicKey",
    "TokenOffer",
    "TokenVerifier",
    "load_public_key",
    "mint_token",
    "room_allowed",
    "token_offer",
]

MAX_TOKEN_BYTES: Final = 8 * 1024
"""Longest token looked at; a longer one is refused before any parsing."""
MAX_SUB_CHARS: Final = 128
"""Longest ``sub`` (in code points, like message content)."""
SUBPROTOCOL: Final = "wshub"
"""The subprotocol offered beside ``bearer.TOKEN`` and answered by the server."""
_BEARER_PREFIX: Final = "bearer."

# The latest exp/nbf/iat accepted (9999-12-31T23:59:59Z): a later one could not
# be written as the ISO timestamp of a "refreshed" message.
_MAX_TIME: Final = calendar.timegm((9999, 12, 31, 23, 59, 59, 0, 0, 0))

# A JWS in compact serialization: three base64url segments without padding.
# Checked before PyJWT sees the token, so that garbage, "alg: none" tokens with
# an empty signature and stray characters (which base64 decoders tend to skip)
# never reach a parser.
_COMPACT_JWS: Final = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")

# HMAC pads a key shorter than the hash's block size (64 bytes for SHA-256)
# with zero bytes (RFC 2104 section 2), so padding a short secret to 32 bytes
# with zeros signs and verifies exactly as the secret itself does. It keeps
# PyJWT from warning about the key's length on every single verification: a
# short secret is the operator's choice, reported once by `weak_secret`.
_HS256_MIN_KEY: Final = 32


def _hmac_key(secret: str) -> bytes:
    # surrogateescape: a secret from the environment may hold bytes that are
    # not UTF-8; they are its bytes all the same.
    key = secret.encode("utf-8", "surrogateescape")
    return key.ljust(_HS256_MIN_KEY, b"\0") if len(key) < _HS256_MIN_KEY else key


class AuthMode(enum.StrEnum):
    OFF = "off"
    """Anonymous connections only, as the seed says; tokens are ignored."""
    OPTIONAL = "optional"
    """A connection without a token is anonymous; one with a token must pass."""
    REQUIRED = "required"
    """Every connection needs a valid token."""


@dataclass(frozen=True, slots=True)
class Identity:
    """Who a verified token says the connection is."""

    user_id: str
    """The token's ``sub``: the connection's ``userId``."""
    expires_at: float | None
    """The token's ``exp`` (Unix seconds), or None when it has none."""
    rooms: tuple[str, ...] | None
    """The token's ``rooms`` patterns, or None when it names no limit."""

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and now >= self.expires_at


@dataclass(frozen=True, slots=True)
class AuthRefusal:
    """A token refused: one ``error`` (:attr:`refusal`), then :attr:`disconnect`."""

    code: ErrorCode
    message: str

    @property
    def refusal(self) -> Refusal:
        return Refusal(self.code, self.message)

    @property
    def disconnect(self) -> Disconnect:
        return TOKEN_EXPIRED if self.code is ErrorCode.TOKEN_EXPIRED else UNAUTHORIZED


def _unauthorized(message: str) -> AuthRefusal:
    return AuthRefusal(ErrorCode.UNAUTHORIZED, message)


_TOKEN_REQUIRED: Final = _unauthorized("A token is required")
_MALFORMED: Final = _unauthorized("Token is malformed")
_TOO_LARGE: Final = _unauthorized(f"Token is longer than {MAX_TOKEN_BYTES} bytes")
_BAD_SIGNATURE: Final = _unauthorized("Token signature or algorithm refused")
_EXPIRED: Final = AuthRefusal(ErrorCode.TOKEN_EXPIRED, "Token expired")
_NOT_YET_VALID: Final = _unauthorized("Token is not valid yet")
_AUTH_OFF: Final = _unauthorized("Authentication is off on this server")


# -- Where a token comes from ------------------------------------------------


class TokenOffer(NamedTuple):
    """What an upgrade request offers.

    ``token`` is None only when no token was offered at all (the connection is
    anonymous, if the mode allows it). An offer that can't be used (an empty
    ``bearer.``, two different tokens, a malformed ``Authorization: Bearer``) is
    the empty string, which every verification refuses: a client that tried to
    present a token is never let in as anonymous.
    """

    token: str | None
    subprotocol: str | None
    """The subprotocol to answer (``wshub`` when offered), or None."""


_HTTP_WS: Final = " \t"


def _offered_subprotocols(values: Sequence[str]) -> list[str]:
    # Each header is a comma-separated list (RFC 6455 4.1), and a client may
    # send the header more than once: all of them count, in order.
    return [item.strip(_HTTP_WS) for value in values for item in value.split(",")]


def _bearer_credentials(values: Sequence[str]) -> list[str]:
    tokens = []
    for value in values:
        scheme, _, credentials = value.strip(_HTTP_WS).partition(" ")
        if scheme.lower() != "bearer":
            continue  # another scheme (Basic, ...) is not ours to judge
        credentials = credentials.strip(_HTTP_WS)
        # One token68 (RFC 7235 2.1): anything with white space inside is not one.
        tokens.append("" if any(c in credentials for c in _HTTP_WS) else credentials)
    return tokens


def answered_subprotocol(protocols: Sequence[str]) -> str | None:
    """``wshub`` when the client offered it, else None: answered with ``--auth off``
    too, so that a browser offering a token to a server that ignores tokens still
    completes its handshake (a browser fails one where it offered subprotocols and
    none was answered)."""
    return SUBPROTOCOL if SUBPROTOCOL in _offered_subprotocols(protocols) else None


def token_offer(
    protocols: Sequence[str],
    authorizations: Sequence[str],
    query: str,
    *,
    query_token: bool,
) -> TokenOffer:
    """The token an upgrade request offers, and the subprotocol to answer.

    Args:
        protocols: every ``Sec-WebSocket-Protocol`` header value, in order.
        authorizations: every ``Authorization`` header value.
        query: the request target's query string (after ``?``), or ``""``.
        query_token: ``--auth-query-token on``: ``?token=`` counts.

    A token may come from several places at once only if it is the same token
    everywhere; two different ones are refused rather than one picked (a proxy
    checking one while the server trusts the other is how bypasses happen).
    ``bearer.TOKEN`` offered without ``wshub`` still counts as a token, but no
    subprotocol is answered: the server may only answer one the client offered,
    and echoing ``bearer.TOKEN`` would copy the token into the response.
    """
    offered = _offered_subprotocols(protocols)
    tokens = [item[len(_BEARER_PREFIX) :] for item in offered if item.startswith(_BEARER_PREFIX)]
    tokens += _bearer_credentials(authorizations)
    if query_token:
        tokens += [
            value for name, value in parse_qsl(query, keep_blank_values=True) if name == "token"
        ]
    subprotocol = answered_subprotocol(protocols)
    if not tokens:
        return TokenOffer(None, subprotocol)
    first = tokens[0]
    if any(token != first for token in tokens):
        return TokenOffer("", subprotocol)
    return TokenOffer(first, subprotocol)


# -- Rooms -------------------------------------------------------------------


def _matches(pattern: str, room: str) -> bool:
    # "*" stands for any run of characters, the empty one too; everything else
    # is literal (room names hold no other special character to escape).
    if "*" not in pattern:
        return pattern == room
    first, *middle, last = pattern.split("*")
    if len(room) < len(first) + len(last) or not room.startswith(first):
        return False
    if not room.endswith(last):
        return False
    position, end = len(first), len(room) - len(last)
    for piece in middle:
        found = room.find(piece, position, end)
        if found < 0:
            return False
        position = found + len(piece)
    return True


def room_allowed(identity: Identity | None, room: str) -> bool:
    """Whether *identity* may open *room* (``""`` is the default room).

    An anonymous connection (None) and a token without a ``rooms`` claim may
    open every room; ``*`` in the claim matches every room, the default too.
    """
    if identity is None or identity.rooms is None:
        return True
    return any(_matches(pattern, room) for pattern in identity.rooms)


# -- Keys --------------------------------------------------------------------

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey

_MIN_RSA_BITS: Final = 2048


def _pinned_algorithm(key: object) -> str:
    """The one algorithm a public key verifies, from its type (never from a token)."""
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < _MIN_RSA_BITS:
            raise ValueError(f"an RSA key of {key.key_size} bits is too short (2048 at least)")
        return "RS256"
    if isinstance(key, ec.EllipticCurvePublicKey):
        if not isinstance(key.curve, ec.SECP256R1):
            raise ValueError(f"EC curve {key.curve.name} is not supported (P-256 for ES256)")
        return "ES256"
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "EdDSA"
    raise ValueError(
        f"a {type(key).__name__} is not supported (RSA, EC P-256 or Ed25519 public keys)"
    )


def load_public_key(pem: bytes) -> PublicKey:
    """A PEM public key (or the key of a PEM X.509 certificate), checked.

    Raises:
        ValueError: not a PEM public key of a supported type, or a private key.
    """
    if b"PRIVATE KEY-----" in pem:
        raise ValueError("this is a private key: give the server the public key only")
    if b"-----BEGIN CERTIFICATE-----" in pem:
        key: object = x509.load_pem_x509_certificate(pem).public_key()
    else:
        key = load_pem_public_key(pem)
    _pinned_algorithm(key)
    if not isinstance(key, PublicKey):
        raise AssertionError("_pinned_algorithm accepted an unknown key type")
    return key


# -- Verification ------------------------------------------------------------


def _time_claim(claims: dict[str, Any], name: str) -> float | None:
    """A NumericDate claim (RFC 7519 2), or None when absent.

    Raises:
        ValueError: present but not a finite number within the years 0-9999.
    """
    if name not in claims:
        return None
    value = claims[name]
    # bool is an int in Python; "1700000000" is a string in JSON.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} is not a number")
    if not math.isfinite(value) or not 0 <= value <= _MAX_TIME:
        raise ValueError(f"{name} is out of range")
    return float(value)


def _sub_claim(claims: dict[str, Any]) -> str | AuthRefusal:
    sub = claims.get("sub")
    if not isinstance(sub, str) or not sub:
        return _unauthorized("Token needs a string claim 'sub'")
    if len(sub) > MAX_SUB_CHARS:
        return _unauthorized(f"Token 'sub' is longer than {MAX_SUB_CHARS} characters")
    try:
        # A JSON escape can give a lone surrogate, which could not be written
        # into the frames that carry the userId.
        sub.encode("utf-8")
    except UnicodeEncodeError:
        return _unauthorized("Token 'sub' holds a lone surrogate")
    return sub


def _rooms_claim(claims: dict[str, Any]) -> tuple[str, ...] | None | AuthRefusal:
    if "rooms" not in claims:
        return None
    rooms = claims["rooms"]
    if not isinstance(rooms, list) or not all(isinstance(room, str) for room in rooms):
        return _unauthorized("Token claim 'rooms' must be a list of strings")
    return tuple(rooms)


class TokenVerifier:
    """Verifies connect tokens against one configured key.

    Build it with :meth:`from_config`, or directly (tests, benchmarks):
    exactly one of *secret* (HS256) or *public_key* (RS256, ES256 or EdDSA,
    pinned by the key's type) for any mode but ``off``.
    """

    __slots__ = (
        "_algorithms",
        "_audience",
        "_decoder",
        "_issuer",
        "_key",
        "_leeway",
        "_weak_secret",
        "mode",
    )

    def __init__(
        self,
        mode: AuthMode = AuthMode.REQUIRED,
        *,
        secret: str = "",
        public_key: PublicKey | None = None,
        audience: str = "",
        issuer: str = "",
        leeway: float = 0.0,
    ) -> None:
        if secret and public_key is not None:
            raise ValueError("give a secret or a public key, not both")
        self.mode = mode
        self._key: bytes | PublicKey | None
        self._weak_secret = 0 < len(secret.encode("utf-8", "surrogateescape")) < _HS256_MIN_KEY
        if public_key is not None:
            self._algorithms = [_pinned_algorithm(public_key)]
            self._key = public_key
        elif secret:
            self._algorithms = ["HS256"]
            self._key = _hmac_key(secret)
            # PyJWT refuses a secret that looks like a key (PEM, DER, a JWK) as
            # an HMAC key at each verification; refuse it once, here.
            try:
                jwt.get_algorithm_by_name("HS256").prepare_key(
                    secret.encode("utf-8", "surrogateescape")
                )
            except jwt.InvalidKeyError as exc:
                raise ValueError(f"unusable HS256 secret: {exc}") from None
        elif mode is not AuthMode.OFF:
            raise ValueError(f"--auth {mode.value} needs a secret or a public key")
        else:
            self._algorithms = []
            self._key = None
        self._audience = audience or None
        self._issuer = issuer or None
        self._leeway = leeway
        # Every time-based check is ours (PyJWT would read the wall clock);
        # signature, audience, issuer and the types of sub and jti are PyJWT's.
        self._decoder = jwt.PyJWT(
            options={
                "verify_signature": True,
                "verify_exp": False,
                "verify_nbf": False,
                "verify_iat": False,
                "verify_aud": True,
                "verify_iss": True,
                "require": ["sub"],
                "enforce_minimum_key_length": False,
            }
        )

    @classmethod
    def from_config(cls, config: Config) -> TokenVerifier:
        """The verifier of ``--auth`` and its options; reads the key file.

        Raises:
            ConfigError: naming the option whose value can't be used.
        """
        mode = AuthMode(config.auth)
        public_key = None
        if config.auth_public_key:
            try:
                with open(config.auth_public_key, "rb") as f:
                    pem = f.read()
            except OSError as exc:
                raise ConfigError(
                    f"--auth-public-key: cannot read {config.auth_public_key}: {exc.strerror}"
                ) from None
            try:
                public_key = load_public_key(pem)
            except (ValueError, TypeError) as exc:
                raise ConfigError(
                    f"--auth-public-key: {config.auth_public_key}: not a usable public key: {exc}"
                ) from None
        try:
            return cls(
                mode,
                secret=config.auth_secret,
                public_key=public_key,
                audience=config.auth_audience,
                issuer=config.auth_issuer,
            )
        except ValueError as exc:
            raise ConfigError(f"--auth: {exc}") from None

    @property
    def algorithm(self) -> str | None:
        """The one algorithm tokens must be signed with (None when off without a key)."""
        return self._algorithms[0] if self._algorithms else None

    @property
    def weak_secret(self) -> bool:
        """An HS256 secret shorter than 32 bytes (RFC 7518 3.2): worth a warning at start."""
        return self._weak_secret

    def verify(self, token: str, now: float) -> Identity | AuthRefusal:
        """The identity *token* proves at *now*, or why not. Never raises."""
        if not isinstance(token, str):
            return _MALFORMED  # e.g. a JSON value a caller forgot to check
        if len(token) > MAX_TOKEN_BYTES:
            return _TOO_LARGE
        if self._key is None:
            return _AUTH_OFF
        if not _COMPACT_JWS.fullmatch(token):
            return _MALFORMED
        try:
            claims = self._decoder.decode(
                token,
                self._key,
                algorithms=self._algorithms,
                audience=self._audience,
                issuer=self._issuer,
            )
            return self._identity(claims, now)
        except (jwt.InvalidAlgorithmError, jwt.InvalidSignatureError):
            return _BAD_SIGNATURE
        except jwt.InvalidAudienceError:
            return _unauthorized("Token audience refused")
        except jwt.InvalidIssuerError:
            return _unauthorized("Token issuer refused")
        except jwt.MissingRequiredClaimError as exc:
            return _unauthorized(f"Token needs a claim {exc.claim!r}")
        except jwt.InvalidTokenError:
            return _MALFORMED
        except Exception:
            # Whatever else a crafted token makes a parser or a key raise, it
            # proves nothing: refused, not a server error.
            return _MALFORMED

    def _identity(self, claims: dict[str, Any], now: float) -> Identity | AuthRefusal:
        try:
            exp = _time_claim(claims, "exp")
            nbf = _time_claim(claims, "nbf")
            # iat is only type-checked: refusing one a second ahead would
            # refuse every token of a backend whose clock runs a little fast.
            _time_claim(claims, "iat")
        except ValueError as exc:
            return _unauthorized(f"Token claim {exc}")
        if exp is not None and exp <= now - self._leeway:
            return _EXPIRED
        if nbf is not None and nbf > now + self._leeway:
            return _NOT_YET_VALID
        sub = _sub_claim(claims)
        if isinstance(sub, AuthRefusal):
            return sub
        rooms = _rooms_claim(claims)
        if isinstance(rooms, AuthRefusal):
            return rooms
        return Identity(sub, exp, rooms)

    def authenticate(self, token: str | None, now: float) -> Identity | AuthRefusal | None:
        """Apply ``--auth`` to an offered token: None is an anonymous connection.

        Under ``optional`` only a connection without any token is anonymous; a
        token that fails is refused like under ``required`` (decisions.md 19).
        """
        if self.mode is AuthMode.OFF:
            return None
        if token is None:
            return _TOKEN_REQUIRED if self.mode is AuthMode.REQUIRED else None
        return self.verify(token, now)

    def verify_refresh(
        self, identity: Identity | None, token: str, now: float, *, room: str | None = None
    ) -> Identity | AuthRefusal:
        """The identity a ``refresh`` moves the connection to, or why not.

        The new token must verify, name the same ``sub`` and expire later than
        the current one; when *room* is given it must still open that room. Any
        refusal is ``unauthorized`` (even an expired token) and changes nothing.
        """
        if identity is None:
            return _unauthorized("An anonymous connection has no token to refresh")
        fresh = self.verify(token, now)
        if isinstance(fresh, AuthRefusal):
            if fresh.code is ErrorCode.UNAUTHORIZED:
                return fresh
            return _unauthorized(f"Refresh refused: {fresh.message}")
        if fresh.user_id != identity.user_id:
            return _unauthorized("Refresh token is for another 'sub'")
        if identity.expires_at is None:
            return _unauthorized("Refresh refused: the current token does not expire")
        if fresh.expires_at is None or fresh.expires_at <= identity.expires_at:
            return _unauthorized("Refresh token must expire later than the current one")
        if room is not None and not room_allowed(fresh, room):
            return _unauthorized("Refresh token does not open this room")
        return fresh


# -- Minting (for trying things out) ------------------------------------------


def mint_token(
    secret: str,
    sub: str,
    now: float,
    ttl: float,
    *,
    rooms: Sequence[str] | None = None,
    audience: str = "",
    issuer: str = "",
) -> str:
    """An HS256 token for *sub*, valid from *now* for *ttl* seconds (``wshub token``)."""
    claims: dict[str, Any] = {"sub": sub, "iat": int(now), "exp": int(now + ttl)}
    if rooms is not None:
        claims["rooms"] = list(rooms)
    if audience:
        claims["aud"] = audience
    if issuer:
        claims["iss"] = issuer
    return jwt.encode(claims, _hmac_key(secret), algorithm="HS256")
