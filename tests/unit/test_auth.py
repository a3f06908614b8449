"""wshub.auth: connect tokens verified, refused (fail closed), found in requests, refreshed."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from wshub import protocol
from wshub.auth import (
    MAX_TOKEN_BYTES,
    AuthMode,
    AuthRefusal,
    Identity,
    TokenOffer,
    TokenVerifier,
    load_public_key,
    mint_token,
    room_allowed,
    token_offer,
)
from wshub.cli import main
from wshub.config import Config, ConfigError, load_config
from wshub.errors import (
    FORBIDDEN_ROOM,
    TOKEN_EXPIRED,
    TOO_MANY_CONNECTIONS,
    UNAUTHORIZED,
    CloseCode,
)
from wshub.protocol import ErrorCode, RefreshRequest, Refusal, parse_client_text

NOW = 1_800_000_000.0
SECRET = "a-test-secret-of-at-least-32-bytes!!"
SHORT_SECRET = "s3cret"  # what people type when trying things out

RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OTHER_RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())
OTHER_EC_KEY = ec.generate_private_key(ec.SECP256R1())
ED_KEY = ed25519.Ed25519PrivateKey.generate()
OTHER_ED_KEY = ed25519.Ed25519PrivateKey.generate()

UNAUTH = ErrorCode.UNAUTHORIZED
EXPIRED = ErrorCode.TOKEN_EXPIRED


def pem(public_key: Any) -> bytes:
    return bytes(
        public_key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def claims(**extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"sub": "alice", "iat": int(NOW) - 10, "exp": int(NOW) + 3600}
    base.update(extra)
    return {k: v for k, v in base.items() if v is not DROP}


DROP = object()  # claims(exp=DROP): leave the claim out


def hs(payload: dict[str, Any], secret: str = SECRET, alg: str = "HS256", **kw: Any) -> str:
    return jwt.encode(payload, secret.encode().ljust(64, b"\0"), algorithm=alg, **kw)


def forge_hmac(header: dict[str, Any], payload: bytes | dict[str, Any], key: bytes) -> str:
    """A token signed with HMAC-SHA256 over any header and payload bytes, by hand:
    PyJWT itself refuses to sign with a PEM as an HMAC secret."""
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(body)}"
    signature = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


def hs_raw(payload: bytes, secret: str = SECRET) -> str:
    """An HS256 token over raw payload bytes (JSON PyJWT's encoder would not write)."""
    return forge_hmac({"alg": "HS256", "typ": "JWT"}, payload, secret.encode())


HS = TokenVerifier(secret=SECRET)
RS = TokenVerifier(public_key=RSA_KEY.public_key())
ES = TokenVerifier(public_key=EC_KEY.public_key())
ED = TokenVerifier(public_key=ED_KEY.public_key())
HS_AUD = TokenVerifier(secret=SECRET, audience="chat", issuer="https://login.example")


def refused(result: Identity | AuthRefusal, code: ErrorCode = UNAUTH) -> bool:
    return isinstance(result, AuthRefusal) and result.code is code


# -- Good tokens -------------------------------------------------------------


@pytest.mark.parametrize(
    ("verifier", "token", "algorithm"),
    [
        (HS, hs(claims()), "HS256"),
        (RS, jwt.encode(claims(), RSA_KEY, algorithm="RS256"), "RS256"),
        (ES, jwt.encode(claims(), EC_KEY, algorithm="ES256"), "ES256"),
        (ED, jwt.encode(claims(), ED_KEY, algorithm="EdDSA"), "EdDSA"),
        (
            HS_AUD,
            hs(claims(aud="chat", iss="https://login.example")),
            "HS256",
        ),
        (HS_AUD, hs(claims(aud=["other", "chat"], iss="https://login.example")), "HS256"),
    ],
)
def test_good_token_of_each_algorithm_passes(
    verifier: TokenVerifier, token: str, algorithm: str
) -> None:
    """A token signed with the configured key and algorithm gives sub and exp."""
    assert verifier.algorithm == algorithm
    assert verifier.verify(token, NOW) == Identity("alice", NOW + 3600, None)


def test_short_secret_verifies_what_pyjwt_signs_with_it() -> None:
    """A secret under 32 bytes works (padding it keeps HMAC's result) and warns nothing."""
    verifier = TokenVerifier(secret=SHORT_SECRET)
    assert verifier.weak_secret and not HS.weak_secret
    token = forge_hmac({"alg": "HS256"}, claims(), SHORT_SECRET.encode())
    assert verifier.verify(token, NOW) == Identity("alice", NOW + 3600, None)
    assert refused(HS.verify(token, NOW))


def test_identity_keeps_rooms_and_a_missing_exp() -> None:
    """rooms is kept as given; a token without exp never expires."""
    identity = HS.verify(hs(claims(exp=DROP, rooms=["", "game-*"])), NOW)
    assert identity == Identity("alice", None, ("", "game-*"))
    assert isinstance(identity, Identity) and not identity.expired(NOW + 10**9)
    timed = HS.verify(hs(claims()), NOW)
    assert isinstance(timed, Identity)
    assert not timed.expired(NOW + 3599.9) and timed.expired(NOW + 3600)


def test_sub_limits_are_code_points() -> None:
    """128 characters pass, emoji included; 129 do not."""
    assert HS.verify(hs(claims(sub="x" * 128)), NOW) == Identity("x" * 128, NOW + 3600, None)
    assert isinstance(HS.verify(hs(claims(sub="😀" * 128)), NOW), Identity)
    assert refused(HS.verify(hs(claims(sub="x" * 129)), NOW))


def test_time_boundaries() -> None:
    """exp == now is expired; nbf == now is valid; the leeway widens both."""
    assert refused(HS.verify(hs(claims(exp=int(NOW))), NOW), EXPIRED)
    assert isinstance(HS.verify(hs(claims(exp=int(NOW) + 1)), NOW), Identity)
    assert isinstance(HS.verify(hs(claims(nbf=int(NOW))), NOW), Identity)
    assert refused(HS.verify(hs(claims(nbf=int(NOW) + 1)), NOW))
    lenient = TokenVerifier(secret=SECRET, leeway=30)
    assert isinstance(lenient.verify(hs(claims(exp=int(NOW) - 29)), NOW), Identity)
    assert isinstance(lenient.verify(hs(claims(nbf=int(NOW) + 29)), NOW), Identity)
    assert refused(lenient.verify(hs(claims(exp=int(NOW) - 30)), NOW), EXPIRED)


# -- Attacks: every one fails closed ---------------------------------------------

_SIGNED = hs(claims())
_HEADER, _PAYLOAD, _SIGNATURE = _SIGNED.split(".")
_NONE_HEADER = b64(json.dumps({"alg": "none", "typ": "JWT"}).encode())
_FILLER = "x" * (MAX_TOKEN_BYTES)
# What PyJWT itself writes for algorithm="none": an empty signature.
_NONE_TOKEN = f"{_NONE_HEADER}.{b64(json.dumps(claims()).encode())}."


def _cases() -> list[tuple[str, TokenVerifier, str, ErrorCode]]:
    rsa_pem = pem(RSA_KEY.public_key())
    cases = [
        # alg none, in its spellings, with and without a signature
        ("alg none", HS, _NONE_TOKEN, UNAUTH),
        ("alg none, RS", RS, _NONE_TOKEN, UNAUTH),
        ("alg none + old sig", HS, f"{_NONE_HEADER}.{_PAYLOAD}.{_SIGNATURE}", UNAUTH),
        *(
            (
                f"alg {alg!r}",
                HS,
                f"{b64(json.dumps({'alg': alg}).encode())}.{_PAYLOAD}.{_SIGNATURE}",
                UNAUTH,
            )
            for alg in ("None", "NONE", "nOnE", "", None, 0, ["HS256"])
        ),
        ("no alg", HS, forge_hmac({"typ": "JWT"}, claims(), SECRET.encode()), UNAUTH),
        # algorithm confusion: the public key used as an HMAC secret
        ("HS256 with RSA pem", RS, forge_hmac({"alg": "HS256"}, claims(), rsa_pem), UNAUTH),
        (
            "HS256 with EC pem",
            ES,
            forge_hmac({"alg": "HS256"}, claims(), pem(EC_KEY.public_key())),
            UNAUTH,
        ),
        (
            "HS256 with Ed pem",
            ED,
            forge_hmac({"alg": "HS256"}, claims(), pem(ED_KEY.public_key())),
            UNAUTH,
        ),
        # any algorithm but the pinned one, even with the right key material
        ("HS384", HS, hs(claims(), alg="HS384"), UNAUTH),
        ("HS512", HS, hs(claims(), alg="HS512"), UNAUTH),
        ("PS256 same key", RS, jwt.encode(claims(), RSA_KEY, algorithm="PS256"), UNAUTH),
        ("RS512 same key", RS, jwt.encode(claims(), RSA_KEY, algorithm="RS512"), UNAUTH),
        ("RS256 to ES", ES, jwt.encode(claims(), RSA_KEY, algorithm="RS256"), UNAUTH),
        ("ES256 to RS", RS, jwt.encode(claims(), EC_KEY, algorithm="ES256"), UNAUTH),
        ("EdDSA to ES", ES, jwt.encode(claims(), ED_KEY, algorithm="EdDSA"), UNAUTH),
        ("ES256 to HS", HS, jwt.encode(claims(), EC_KEY, algorithm="ES256"), UNAUTH),
        # the right algorithm, another key
        ("other secret", HS, hs(claims(), secret="another-secret-of-32-bytes-or-more"), UNAUTH),
        ("other RSA", RS, jwt.encode(claims(), OTHER_RSA_KEY, algorithm="RS256"), UNAUTH),
        ("other EC", ES, jwt.encode(claims(), OTHER_EC_KEY, algorithm="ES256"), UNAUTH),
        ("other Ed", ED, jwt.encode(claims(), OTHER_ED_KEY, algorithm="EdDSA"), UNAUTH),
        (
            "own key in jwk header",
            RS,
            jwt.encode(
                claims(),
                OTHER_RSA_KEY,
                algorithm="RS256",
                headers={"jwk": json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(OTHER_RSA_KEY))},
            ),
            UNAUTH,
        ),
        (
            "payload swapped",
            HS,
            f"{_HEADER}.{hs(claims(sub='bob')).split('.')[1]}.{_SIGNATURE}",
            UNAUTH,
        ),
        ("signature dropped", HS, f"{_HEADER}.{_PAYLOAD}.", UNAUTH),
        (
            "b64 false",
            HS,
            forge_hmac({"alg": "HS256", "b64": False, "crit": ["b64"]}, b"", SECRET.encode()),
            UNAUTH,
        ),
        (
            "unknown crit",
            HS,
            forge_hmac({"alg": "HS256", "crit": ["exp"]}, claims(), SECRET.encode()),
            UNAUTH,
        ),
        (
            "kid not a string",
            HS,
            forge_hmac({"alg": "HS256", "kid": 7}, claims(), SECRET.encode()),
            UNAUTH,
        ),
        # audience and issuer
        ("aud without audience", HS, hs(claims(aud="chat")), UNAUTH),
        ("aud list without audience", HS, hs(claims(aud=["chat"])), UNAUTH),
        ("wrong aud", HS_AUD, hs(claims(aud="billing", iss="https://login.example")), UNAUTH),
        ("no aud", HS_AUD, hs(claims(iss="https://login.example")), UNAUTH),
        ("aud not str", HS_AUD, hs(claims(aud=5, iss="https://login.example")), UNAUTH),
        ("wrong iss", HS_AUD, hs(claims(aud="chat", iss="https://evil.example")), UNAUTH),
        ("no iss", HS_AUD, hs(claims(aud="chat")), UNAUTH),
        (
            "iss not str",
            HS_AUD,
            forge_hmac({"alg": "HS256"}, claims(aud="chat", iss=["x"]), SECRET.encode()),
            UNAUTH,
        ),
        # time
        ("expired", HS, hs(claims(exp=int(NOW) - 1)), EXPIRED),
        ("expired long ago", ES, jwt.encode(claims(exp=1), EC_KEY, algorithm="ES256"), EXPIRED),
        ("nbf in the future", HS, hs(claims(nbf=int(NOW) + 60)), UNAUTH),
        ("exp a string", HS, hs(claims(exp=str(int(NOW) + 60))), UNAUTH),
        ("exp true", HS, hs(claims(exp=True)), UNAUTH),
        ("exp null", HS, hs(claims(exp=None)), UNAUTH),
        ("exp past year 9999", HS, hs(claims(exp=10**20)), UNAUTH),
        ("exp huge float", HS, hs(claims(exp=1e308)), UNAUTH),
        ("exp negative", HS, hs(claims(exp=-5)), UNAUTH),
        ("exp NaN", HS, hs_raw(b'{"sub":"alice","exp":NaN}'), UNAUTH),
        ("exp Infinity", HS, hs_raw(b'{"sub":"alice","exp":Infinity}'), UNAUTH),
        ("exp 1e400", HS, hs_raw(b'{"sub":"alice","exp":1e400}'), UNAUTH),
        ("nbf a string", HS, hs(claims(nbf="yesterday")), UNAUTH),
        ("iat a string", HS, hs(claims(iat="now")), UNAUTH),
        # sub
        ("no sub", HS, hs(claims(sub=DROP)), UNAUTH),
        ("sub null", HS, hs(claims(sub=None)), UNAUTH),
        ("sub a number", HS, hs(claims(sub=42)), UNAUTH),
        ("sub a list", HS, hs(claims(sub=["alice"])), UNAUTH),
        ("sub an object", HS, hs(claims(sub={"id": "alice"})), UNAUTH),
        ("sub empty", HS, hs(claims(sub="")), UNAUTH),
        ("sub too long", HS, hs(claims(sub="a" * 129)), UNAUTH),
        ("sub lone surrogate", HS, hs_raw(b'{"sub":"\\ud800","exp":1900000000}'), UNAUTH),
        # rooms
        ("rooms a string", HS, hs(claims(rooms="lobby")), UNAUTH),
        ("rooms null", HS, hs(claims(rooms=None)), UNAUTH),
        ("rooms with a number", HS, hs(claims(rooms=["lobby", 1])), UNAUTH),
        # shape
        ("payload an array", HS, hs_raw(b'["sub","alice"]'), UNAUTH),
        ("payload not JSON", HS, hs_raw(b"sub=alice"), UNAUTH),
        ("payload deep", HS, hs_raw(b'{"sub":"a","x":' + b"[" * 3000 + b"]" * 3000 + b"}"), UNAUTH),
        ("truncated by one", HS, _SIGNED[:-1], UNAUTH),
        ("truncated by five", HS, _SIGNED[:-5], UNAUTH),
        ("header and payload", HS, f"{_HEADER}.{_PAYLOAD}", UNAUTH),
        ("header only", HS, _HEADER, UNAUTH),
        ("four segments", HS, _SIGNED + ".AAAA", UNAUTH),
        ("padded", HS, _SIGNED + "=", UNAUTH),
        ("space inside", HS, _SIGNED[:20] + " " + _SIGNED[20:], UNAUTH),
        ("leading space", HS, " " + _SIGNED, UNAUTH),
        ("non-ascii", HS, _SIGNED[:-2] + "é", UNAUTH),
        ("stray bytes skipped by lax base64", HS, _SIGNED.replace(".", "!.", 1), UNAUTH),
        ("empty", HS, "", UNAUTH),
        ("dots", HS, "..", UNAUTH),
        ("garbage", HS, "not a token at all", UNAUTH),
        ("bearer inside", HS, "Bearer " + _SIGNED, UNAUTH),
        # size, bounded before parsing
        ("huge garbage", HS, "A" * (MAX_TOKEN_BYTES + 1), UNAUTH),
        ("huge and signed", HS, hs(claims(pad=_FILLER)), UNAUTH),
        ("a megabyte", HS, "a." * 500_000 + "b", UNAUTH),
    ]
    return cases


@pytest.mark.parametrize(
    ("verifier", "token", "code"),
    [case[1:] for case in _cases()],
    ids=[case[0] for case in _cases()],
)
def test_attack_fails_closed(verifier: TokenVerifier, token: str, code: ErrorCode) -> None:
    """Each classic token attack is refused with the code decisions.md 15/19 name."""
    result = verifier.verify(token, NOW)
    assert isinstance(result, AuthRefusal), result
    assert result.code is code, result
    assert result.disconnect.code == CloseCode.UNAUTHORIZED == 4401
    assert result.refusal == Refusal(code, result.message)
    assert token[:40] not in result.message or not token  # the token is never echoed


@pytest.mark.parametrize("value", [None, 5, b"abc.def.ghi", ["a.b.c"], {"token": 1}])
def test_verify_refuses_a_non_string(value: Any) -> None:
    """A value that is not a string at all (a caller's slip) is refused, not an exception."""
    assert refused(HS.verify(value, NOW))


def test_size_bound_comes_before_the_signature() -> None:
    """Signed tokens: 8192 bytes pass, 8193 are refused as too large, before any parsing."""
    by_length = {
        len(token): token for n in range(5900, 6200) for token in [hs(claims(pad="x" * n))]
    }
    assert isinstance(HS.verify(by_length[MAX_TOKEN_BYTES], NOW), Identity)
    result = HS.verify(by_length[MAX_TOKEN_BYTES + 1], NOW)
    assert isinstance(result, AuthRefusal) and "longer" in result.message


def test_refusal_close_reasons() -> None:
    """Expired closes 4401 'token expired', the rest 4401 'unauthorized'."""
    assert HS.verify(hs(claims(exp=1)), NOW) == AuthRefusal(EXPIRED, "Token expired")
    assert AuthRefusal(EXPIRED, "x").disconnect == TOKEN_EXPIRED
    assert AuthRefusal(UNAUTH, "x").disconnect == UNAUTHORIZED
    assert (TOKEN_EXPIRED.code, TOKEN_EXPIRED.reason) == (4401, "token expired")
    assert (UNAUTHORIZED.code, FORBIDDEN_ROOM.code, TOO_MANY_CONNECTIONS.code) == (4401, 4403, 4429)
    assert {ErrorCode.FORBIDDEN_ROOM.value, ErrorCode.TOO_MANY_CONNECTIONS.value} == {
        "forbidden_room",
        "too_many_connections",
    }


# -- Keys and construction ----------------------------------------------------------


def test_key_type_pins_the_algorithm(tmp_path: Path) -> None:
    """The PEM file's key type decides the algorithm; a certificate's key counts too."""
    for key, algorithm in ((RSA_KEY, "RS256"), (EC_KEY, "ES256"), (ED_KEY, "EdDSA")):
        path = tmp_path / f"{algorithm}.pem"
        path.write_bytes(pem(key.public_key()))
        config = Config(auth="required", auth_public_key=str(path))
        verifier = TokenVerifier.from_config(config)
        assert verifier.algorithm == algorithm
        token = jwt.encode(claims(), key, algorithm=algorithm)
        assert isinstance(verifier.verify(token, NOW), Identity)


def test_certificate_public_key_is_accepted() -> None:
    """An X.509 certificate's public key is the key (what many identity providers hand out)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "login.example")])
    start = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(EC_KEY.public_key())
        .serial_number(1)
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=30))
        .sign(EC_KEY, hashes.SHA256())
    )
    key = load_public_key(cert.public_bytes(serialization.Encoding.PEM))
    verifier = TokenVerifier(public_key=key)
    assert isinstance(
        verifier.verify(jwt.encode(claims(), EC_KEY, algorithm="ES256"), NOW), Identity
    )


def _private_pem(key: Any) -> bytes:
    return bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (pem(rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()), "1024"),
        (pem(ec.generate_private_key(ec.SECP384R1()).public_key()), "secp384r1"),
        (pem(ed448.Ed448PrivateKey.generate().public_key()), "Ed448"),
        (_private_pem(EC_KEY), "private key"),
        (b"-----BEGIN PUBLIC KEY-----\nnot base64\n-----END PUBLIC KEY-----\n", "usable"),
        (b"just some text", "usable"),
        (b"", "usable"),
    ],
)
def test_unusable_key_file_is_a_config_error(tmp_path: Path, content: bytes, fragment: str) -> None:
    """A weak, unsupported, private or broken key is refused at start, naming the option."""
    path = tmp_path / "key.pem"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match="--auth-public-key") as info:
        TokenVerifier.from_config(Config(auth="required", auth_public_key=str(path)))
    assert fragment in str(info.value)


def test_missing_key_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        TokenVerifier.from_config(
            Config(auth="optional", auth_public_key=str(tmp_path / "nope.pem"))
        )


def test_constructor_refusals() -> None:
    """No key with auth on, both kinds of key, or a key posing as a secret: refused."""
    with pytest.raises(ValueError, match="needs a secret"):
        TokenVerifier(AuthMode.REQUIRED)
    with pytest.raises(ValueError, match="not both"):
        TokenVerifier(secret=SECRET, public_key=EC_KEY.public_key())
    with pytest.raises(ValueError, match="HS256 secret"):
        TokenVerifier(secret=pem(RSA_KEY.public_key()).decode())
    with pytest.raises(ConfigError, match="--auth"):
        TokenVerifier.from_config(Config(auth="required", auth_secret='{"kty": "oct"}'))


def test_off_verifier_without_key_refuses_every_token() -> None:
    off = TokenVerifier(AuthMode.OFF)
    assert off.algorithm is None
    assert refused(off.verify(_SIGNED, NOW))
    assert off.authenticate(_SIGNED, NOW) is None  # and off means anonymous


# -- Modes -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "token", "expected"),
    [
        (AuthMode.OFF, None, None),
        (AuthMode.OFF, "garbage", None),
        (AuthMode.OFF, _SIGNED, None),
        (AuthMode.OPTIONAL, None, None),
        (AuthMode.OPTIONAL, _SIGNED, Identity("alice", NOW + 3600, None)),
        (AuthMode.OPTIONAL, "garbage", UNAUTH),
        (AuthMode.OPTIONAL, "", UNAUTH),  # an unusable offer is not "no token"
        (AuthMode.OPTIONAL, hs(claims(exp=1)), EXPIRED),
        (AuthMode.REQUIRED, None, UNAUTH),
        (AuthMode.REQUIRED, "", UNAUTH),
        (AuthMode.REQUIRED, _SIGNED, Identity("alice", NOW + 3600, None)),
        (AuthMode.REQUIRED, hs(claims(exp=1)), EXPIRED),
    ],
)
def test_authenticate_applies_the_mode(
    mode: AuthMode, token: str | None, expected: Identity | ErrorCode | None
) -> None:
    """off: anonymous always; optional: anonymous only without a token; required: a token."""
    result = TokenVerifier(mode, secret=SECRET).authenticate(token, NOW)
    if isinstance(expected, ErrorCode):
        assert isinstance(result, AuthRefusal) and result.code is expected
    else:
        assert result == expected


# -- Rooms -----------------------------------------------------------------------------


def _with_rooms(*rooms: str) -> Identity:
    return Identity("alice", None, rooms)


@pytest.mark.parametrize(
    ("identity", "room", "allowed"),
    [
        (None, "", True),
        (None, "anything", True),
        (Identity("alice", None, None), "x", True),
        (_with_rooms(), "", False),
        (_with_rooms(), "lobby", False),
        (_with_rooms("*"), "", True),
        (_with_rooms("*"), "lobby", True),
        (_with_rooms(""), "", True),
        (_with_rooms(""), "lobby", False),
        (_with_rooms("lobby"), "lobby", True),
        (_with_rooms("lobby"), "Lobby", False),
        (_with_rooms("lobby"), "lobby2", False),
        (_with_rooms("lobby"), "", False),
        (_with_rooms("game-*"), "game-1", True),
        (_with_rooms("game-*"), "game-", True),
        (_with_rooms("game-*"), "game", False),
        (_with_rooms("game-*"), "", False),
        (_with_rooms("game-*"), "xgame-1", False),
        (_with_rooms("*-eu"), "chat-eu", True),
        (_with_rooms("*-eu"), "chat-us", False),
        (_with_rooms("a*b*c"), "abc", True),
        (_with_rooms("a*b*c"), "a-b-c", True),
        (_with_rooms("a*b*c"), "acb", False),
        (_with_rooms("a*a"), "a", False),  # prefix and suffix may not overlap
        (_with_rooms("a*a"), "aa", True),
        (_with_rooms("ab*ba"), "aba", False),
        (_with_rooms("**"), "", True),
        (_with_rooms("a?c"), "abc", False),  # only * is special
        (_with_rooms("[a]"), "a", False),
        (_with_rooms("team.*"), "team.x", True),
        (_with_rooms("team.*"), "teamxx", False),  # "." is literal
        (_with_rooms("x", "", "y*"), "", True),
        (_with_rooms("x", "", "y*"), "yes", True),
        (_with_rooms("x", "", "y*"), "no", False),
    ],
)
def test_room_allowed(identity: Identity | None, room: str, allowed: bool) -> None:
    """rooms: exact names and * patterns; "" is the default room; * matches it too."""
    assert room_allowed(identity, room) is allowed


# -- Refresh -----------------------------------------------------------------------------

CURRENT = Identity("alice", NOW + 60, None)


@pytest.mark.parametrize(
    ("identity", "token", "room", "expected"),
    [
        (CURRENT, hs(claims(exp=int(NOW) + 7200)), None, Identity("alice", NOW + 7200, None)),
        (
            CURRENT,
            hs(claims(exp=int(NOW) + 7200, rooms=["game-*"])),
            "game-1",
            Identity("alice", NOW + 7200, ("game-*",)),
        ),
        (CURRENT, hs(claims(sub="bob", exp=int(NOW) + 7200)), None, "another"),
        (CURRENT, hs(claims(exp=int(NOW) + 60)), None, "later"),  # not later
        (CURRENT, hs(claims(exp=int(NOW) + 30)), None, "later"),
        (CURRENT, hs(claims(exp=DROP)), None, "later"),  # a token without exp replaces none
        (CURRENT, hs(claims(exp=int(NOW) - 1)), None, "expired"),  # unauthorized, not expired
        (CURRENT, hs(claims(nbf=int(NOW) + 10, exp=int(NOW) + 7200)), None, "valid"),
        (CURRENT, "garbage", None, "malformed"),
        (
            CURRENT,
            hs(claims(exp=int(NOW) + 7200), secret="a-different-secret-of-32-bytes!!"),
            None,
            "signature",
        ),
        (CURRENT, hs(claims(exp=int(NOW) + 7200, rooms=["other"])), "game-1", "room"),
        (None, hs(claims(exp=int(NOW) + 7200)), None, "anonymous"),
        (Identity("alice", None, None), hs(claims(exp=int(NOW) + 7200)), None, "not expire"),
    ],
)
def test_verify_refresh(
    identity: Identity | None, token: str, room: str | None, expected: Identity | str
) -> None:
    """A refresh needs a valid token for the same sub that expires later; else unauthorized."""
    result = HS.verify_refresh(identity, token, NOW, room=room)
    if isinstance(expected, Identity):
        assert result == expected
    else:
        assert isinstance(result, AuthRefusal) and result.code is UNAUTH, result
        assert expected in result.message


# -- Finding the token in a request ----------------------------------------------------


@pytest.mark.parametrize(
    ("protocols", "authorizations", "query", "query_token", "expected"),
    [
        ([], [], "", False, (None, None)),
        (["wshub, bearer.T1"], [], "", False, ("T1", "wshub")),
        (["bearer.T1, wshub"], [], "", False, ("T1", "wshub")),
        (["wshub,bearer.T1"], [], "", False, ("T1", "wshub")),
        (["  wshub ,\tbearer.T1  "], [], "", False, ("T1", "wshub")),
        (["wshub", "bearer.T1"], [], "", False, ("T1", "wshub")),  # two headers
        (["chat, wshub", "bearer.T1, v2"], [], "", False, ("T1", "wshub")),
        (["wshub"], [], "", False, (None, "wshub")),
        (["chat"], [], "", False, (None, None)),
        (["bearer.T1"], [], "", False, ("T1", None)),  # no wshub: used, nothing answered
        (["wshub, bearer."], [], "", False, ("", "wshub")),  # empty token: unusable
        (["wshub, bearer.T1, bearer.T2"], [], "", False, ("", "wshub")),
        (["wshub, bearer.T1, bearer.T1"], [], "", False, ("T1", "wshub")),
        (["wshub, Bearer.T1"], [], "", False, (None, "wshub")),  # names are case-sensitive
        (["WSHUB, bearer.T1"], [], "", False, ("T1", None)),
        (["wshub, bearer.T1"], ["Bearer T1"], "", False, ("T1", "wshub")),  # agree
        (["wshub, bearer.T1"], ["Bearer T2"], "", False, ("", "wshub")),  # conflict
        ([], ["Bearer T1"], "", False, ("T1", None)),
        ([], ["bearer T1"], "", False, ("T1", None)),
        ([], ["BEARER   T1  "], "", False, ("T1", None)),
        ([], ["  Bearer\tT1"], "", False, (None, None)),  # a tab is no separator after scheme
        ([], ["Bearer"], "", False, ("", None)),
        ([], ["Bearer "], "", False, ("", None)),
        ([], ["Bearer T1 T2"], "", False, ("", None)),
        ([], ["Bearer T1", "Bearer T2"], "", False, ("", None)),
        ([], ["Basic dXNlcjpwYXNz"], "", False, (None, None)),
        ([], ["Basic dXNlcjpwYXNz", "Bearer T1"], "", False, ("T1", None)),
        ([], ["BearerT1"], "", False, (None, None)),
        ([], [], "token=T1", False, (None, None)),  # off: ignored
        ([], [], "token=T1", True, ("T1", None)),
        ([], [], "since=e:1&token=T1&history=5", True, ("T1", None)),
        ([], [], "token=", True, ("", None)),
        ([], [], "token", True, ("", None)),
        ([], [], "token=T1&token=T2", True, ("", None)),
        ([], [], "%74oken=T1", True, ("T1", None)),
        ([], [], "tokens=T1", True, (None, None)),
        (["wshub, bearer.T1"], [], "token=T2", False, ("T1", "wshub")),  # off: not a conflict
        (["wshub, bearer.T1"], [], "token=T2", True, ("", "wshub")),
        (["wshub, bearer.T1"], ["Bearer T1"], "token=T1", True, ("T1", "wshub")),
        ([""], [""], "", True, (None, None)),
        ([",,,"], [], "&&&", True, (None, None)),
    ],
)
def test_token_offer(
    protocols: list[str],
    authorizations: list[str],
    query: str,
    query_token: bool,
    expected: tuple[str | None, str | None],
) -> None:
    """Subprotocol, Authorization and ?token= give one token, "" when unusable, or None."""
    offer = token_offer(protocols, authorizations, query, query_token=query_token)
    assert offer == TokenOffer(*expected)


def test_offered_token_is_what_verify_accepts() -> None:
    """The subprotocol carries a real token unchanged (base64url and dots are token chars)."""
    token, answer = token_offer([f"wshub, bearer.{_SIGNED}"], [], "", query_token=False)
    assert answer == "wshub" and token is not None
    assert isinstance(HS.verify(token, NOW), Identity)


# -- Properties: nothing raises, nothing unsigned passes -----------------------------------

_TOKENISH = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.=")


@settings(max_examples=500, deadline=None)
@given(token=st.one_of(st.text(), _TOKENISH))
def test_arbitrary_token_never_raises_or_passes(token: str) -> None:
    """Any string is refused by every verifier, and nothing raises."""
    for verifier in (HS, RS, ES, ED):
        assert isinstance(verifier.verify(token, NOW), AuthRefusal)
        assert isinstance(verifier.verify_refresh(CURRENT, token, NOW), AuthRefusal)


@settings(max_examples=300, deadline=None)
@given(
    header=st.dictionaries(
        st.text(max_size=5), st.one_of(st.text(max_size=8), st.integers(), st.none())
    ),
    payload=st.dictionaries(
        st.sampled_from(["sub", "exp", "nbf", "iat", "aud", "iss", "rooms", "x"]),
        st.one_of(
            st.text(), st.integers(), st.floats(), st.booleans(), st.none(), st.lists(st.text())
        ),
    ),
    signature=st.binary(max_size=300),
)
def test_forged_structure_never_passes(
    header: dict[str, Any], payload: dict[str, Any], signature: bytes
) -> None:
    """Well-formed JWS segments with any header, claims and signature bytes: refused."""
    header.setdefault("alg", "HS256")
    body = json.dumps(payload).encode()
    token = f"{b64(json.dumps(header).encode())}.{b64(body)}.{b64(signature)}"
    for verifier in (HS, RS, ES, ED):
        assert isinstance(verifier.verify(token, NOW), AuthRefusal)


_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_GOOD = {
    "HS256": (HS, hs(claims())),
    "RS256": (RS, jwt.encode(claims(), RSA_KEY, algorithm="RS256")),
    "ES256": (ES, jwt.encode(claims(), EC_KEY, algorithm="ES256")),
    "EdDSA": (ED, jwt.encode(claims(), ED_KEY, algorithm="EdDSA")),
}


@settings(max_examples=300, deadline=None)
@given(algorithm=st.sampled_from(sorted(_GOOD)), data=st.data())
def test_one_changed_character_never_passes(algorithm: str, data: st.DataObject) -> None:
    """A valid token with any one character changed is refused (no malleable encoding)."""
    verifier, token = _GOOD[algorithm]
    index = data.draw(st.integers(0, len(token) - 1))
    if token[index] == ".":
        return
    new = data.draw(st.sampled_from(_ALPHABET.replace(token[index], "")))
    mutated = token[:index] + new + token[index + 1 :]
    assert isinstance(verifier.verify(mutated, NOW), AuthRefusal)


@settings(max_examples=500, deadline=None)
@given(
    protocols=st.lists(st.text(max_size=40), max_size=4),
    authorizations=st.lists(
        st.one_of(st.text(max_size=40), st.text(max_size=30).map(lambda t: "Bearer " + t)),
        max_size=3,
    ),
    query=st.text(max_size=60),
    query_token=st.booleans(),
)
def test_arbitrary_headers_never_raise_or_pass(
    protocols: list[str], authorizations: list[str], query: str, query_token: bool
) -> None:
    """Any header values and query: an offer comes back, and its token never verifies."""
    offer = token_offer(protocols, authorizations, query, query_token=query_token)
    assert offer.subprotocol in (None, "wshub")
    assert offer.token is None or isinstance(offer.token, str)
    for mode in AuthMode:
        result = TokenVerifier(mode, secret=SECRET).authenticate(offer.token, NOW)
        assert not isinstance(result, Identity)


# -- Protocol additions ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"type":"refresh","token":"abc.def.ghi"}', RefreshRequest("abc.def.ghi")),
        ('{"type":"refresh","token":"t","extra":1}', RefreshRequest("t")),
        ('{"type":"refresh"}', UNAUTH),
        ('{"type":"refresh","token":""}', UNAUTH),
        ('{"type":"refresh","token":5}', UNAUTH),
        ('{"type":"refresh","token":null}', UNAUTH),
        ('{"type":"refresh","token":["t"]}', UNAUTH),
    ],
)
def test_parse_refresh(text: str, expected: RefreshRequest | ErrorCode) -> None:
    """A refresh is a command when auth is on; a malformed one is unauthorized."""
    result = parse_client_text(text, refresh=True)
    if isinstance(expected, ErrorCode):
        assert isinstance(result, Refusal) and result.code is expected
    else:
        assert result == expected


def test_refresh_is_an_unknown_type_with_auth_off() -> None:
    """Without auth a refresh is an unknown type, as the seed says; other types unchanged."""
    result = parse_client_text('{"type":"refresh","token":"t"}')
    assert isinstance(result, Refusal) and result.code is ErrorCode.UNKNOWN_TYPE
    assert parse_client_text('{"type":"ping"}', refresh=True) is protocol.PING


def test_encode_refreshed() -> None:
    """expiresAt in the timestamp format of section 3; the hot path's cache untouched."""
    stamp = protocol.iso_timestamp(NOW)
    assert json.loads(protocol.encode_refreshed(NOW + 3600.5)) == {
        "type": "refreshed",
        "expiresAt": "2027-01-15T09:00:00.500Z",
    }
    assert protocol.encode_refreshed(NOW - 1_800_000_000) == (
        b'{"type":"refreshed","expiresAt":"1970-01-01T00:00:00.000Z"}'
    )
    assert protocol._second_cache[0] == int(NOW) and protocol.iso_timestamp(NOW) == stamp


def test_every_accepted_exp_can_be_encoded() -> None:
    """The latest exp a token may carry still encodes as a refreshed message."""
    identity = HS.verify(hs(claims(exp=253402300799)), NOW)
    assert isinstance(identity, Identity) and identity.expires_at is not None
    assert b"9999-12-31T23:59:59.000Z" in protocol.encode_refreshed(identity.expires_at)


# -- Configuration ---------------------------------------------------------------------------


def test_auth_options_defaults_and_place() -> None:
    """Auth options default to off and follow --allowed-origins in the reference."""
    c = Config()
    assert (c.auth, c.auth_secret, c.auth_public_key) == ("off", "", "")
    assert (c.auth_audience, c.auth_issuer, c.auth_query_token) == ("", "", "off")
    assert c.max_connections_per_user == 0
    from wshub.config import OPTIONS

    names = [option.attr for option in OPTIONS]
    start = names.index("allowed_origins") + 1
    assert names[start : start + 7] == [
        "auth",
        "auth_secret",
        "auth_public_key",
        "auth_audience",
        "auth_issuer",
        "auth_query_token",
        "max_connections_per_user",
    ]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"auth": "required"}, "needs --auth-secret"),
        ({"auth": "optional"}, "needs --auth-secret"),
        ({"auth": "required", "auth_secret": ""}, "needs --auth-secret"),
        ({"auth": "required", "auth_secret": "s", "auth_public_key": "k.pem"}, "not both"),
        ({"auth_secret": "s", "auth_public_key": "k.pem"}, "not both"),
        ({"max_connections_per_user": "3"}, "needs --auth"),
        ({"auth": "sometimes"}, "expected one of off, optional, required"),
        ({"auth": "required", "auth_secret": "s", "auth_query_token": "yes"}, "off, on"),
        ({"auth": "required", "auth_secret": "s", "max_connections_per_user": "-1"}, ">= 0"),
    ],
)
def test_auth_config_refusals(flags: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(flags, {})


def test_per_user_limit_is_allowed_in_a_cluster() -> None:
    """Counted on Redis across the nodes (tests/test_auth_cluster.py)."""
    config = load_config(
        {
            "auth": "required",
            "auth_secret": "s",
            "max_connections_per_user": "3",
            "redis_url": "redis://127.0.0.1:6379",
        },
        {},
    )
    assert (config.max_connections_per_user, config.redis_url) == (3, "redis://127.0.0.1:6379")


def test_auth_config_from_env_keeps_secret_out_of_repr() -> None:
    """WSHUB_AUTH_* work; the secret is kept as given and never shown in repr()."""
    config = load_config(
        {"max_connections_per_user": "2"},
        {
            "WSHUB_AUTH": "Required",
            "WSHUB_AUTH_SECRET": " top secret ",
            "WSHUB_AUTH_AUDIENCE": "chat",
            "WSHUB_AUTH_QUERY_TOKEN": "on",
        },
    )
    assert (config.auth, config.auth_secret, config.auth_audience) == (
        "required",
        " top secret ",
        "chat",
    )
    assert config.auth_query_token == "on" and config.max_connections_per_user == 2
    assert "top secret" not in repr(config)
    verifier = TokenVerifier.from_config(config)
    token = mint_token(" top secret ", "alice", NOW, 60, audience="chat")
    assert verifier.verify(token, NOW) == Identity("alice", NOW + 60, None)


# -- wshub token ------------------------------------------------------------------------------


def test_cli_token_mints_what_the_server_verifies(capsys: pytest.CaptureFixture[str]) -> None:
    """`wshub token` prints one token with sub, exp, rooms, aud and iss that verifies."""
    import time

    argv = ["token", "--secret", SHORT_SECRET, "--sub", "alice", "--ttl", "120"]
    argv += ["--rooms", ",game-*", "--aud", "chat", "--iss", "me"]
    before = time.time()
    assert main(argv) == 0
    token = capsys.readouterr().out.strip()
    verifier = TokenVerifier(secret=SHORT_SECRET, audience="chat", issuer="me")
    identity = verifier.verify(token, time.time())
    assert isinstance(identity, Identity)
    assert identity.user_id == "alice" and identity.rooms == ("", "game-*")
    assert identity.expires_at is not None
    assert int(before) + 120 <= identity.expires_at <= time.time() + 120
    assert refused(verifier.verify(token, time.time() + 121), EXPIRED)
    assert room_allowed(identity, "") and room_allowed(identity, "game-7")
    assert not room_allowed(identity, "lobby")


def test_cli_token_as_a_command(tmp_path: Path) -> None:
    """The real command line, secret from the environment, no rooms claim by default."""
    run: Callable[..., subprocess.CompletedProcess[str]] = subprocess.run
    done = run(
        [sys.executable, "-m", "wshub", "token", "--sub", "bob"],
        capture_output=True,
        text=True,
        env={"WSHUB_AUTH_SECRET": SECRET, "PATH": "/usr/bin:/bin"},
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    import time

    identity = HS.verify(done.stdout.strip(), time.time())
    assert isinstance(identity, Identity) and identity.user_id == "bob"
    assert identity.rooms is None


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["token", "--sub", "a"], "--secret is required"),
        (["token", "--secret", "s"], "--sub"),
        (["token", "--secret", "s", "--sub", ""], "1 to 128"),
        (["token", "--secret", "s", "--sub", "a" * 129], "1 to 128"),
        (["token", "--secret", "s", "--sub", "a", "--ttl", "0"], "positive"),
        (["token", "--secret", "s", "--sub", "a", "--ttl", "nan"], "positive"),
        (["token", "--secret", "s", "--sub", "a", "--ttl", "0.5"], "positive"),
    ],
)
def test_cli_token_refusals(
    argv: list[str],
    message: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("WSHUB_AUTH_SECRET", raising=False)
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert message in capsys.readouterr().err


def test_serve_with_a_bad_key_refuses_to_start(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """The key file is read and checked before anything listens: exit 2, naming the option."""
    missing = str(tmp_path / "missing.pem")
    assert main(["serve", "--auth", "required", "--auth-public-key", missing, "--port", "0"]) == 2
    assert "--auth-public-key" in capsys.readouterr().err
