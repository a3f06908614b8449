"""The cost of verifying one connect token, in-process, one core, warm.

For each algorithm wshub pins (HS256, RS256, ES256, EdDSA) a typical token
(sub, iat, exp, a short rooms list) is verified again and again through
:meth:`wshub.auth.TokenVerifier.verify`; the figure is the best of several
rounds, timed in CPU time of this process (so that other work on a shared
machine, which takes the core away, does not count). Also shown: a forged
token of the same algorithm (signed with another key of the same type: what a
flood of forged tokens costs) and the extraction of the token from the upgrade
request's headers. Keys are generated at start; nothing touches a socket.

    .venv/bin/python bench/auth_verify.py [--rounds 7] [--seconds 0.3] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from functools import partial

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from wshub.auth import AuthRefusal, Identity, TokenVerifier, token_offer

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey

NOW = time.time()
CLAIMS = {
    "sub": "user-1234567",
    "iat": int(NOW),
    "exp": int(NOW) + 3600,
    "rooms": ["lobby", "game-*"],
}
SECRET = "a-benchmark-secret-of-at-least-32-bytes"


def per_second(call: Callable[[], object], rounds: int, seconds: float) -> float:
    """Calls per second: the best round of *rounds*, each about *seconds* long."""
    clock = time.process_time
    batch = 1
    while True:  # size a batch to ~seconds
        start = clock()
        for _ in range(batch):
            call()
        elapsed = clock() - start
        if elapsed >= seconds / 4:
            break
        batch *= 2
    batch = max(1, int(batch * seconds / max(elapsed, 1e-9)))
    best = float("inf")
    for _ in range(rounds):
        start = clock()
        for _ in range(batch):
            call()
        best = min(best, (clock() - start) / batch)
    return 1.0 / best


def cases() -> list[tuple[str, TokenVerifier, str, str]]:
    """(algorithm, verifier, a good token, a token with a forged signature)."""

    def rsa_key() -> rsa.RSAPrivateKey:
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)

    keys: dict[str, tuple[PrivateKey, PrivateKey]] = {
        "RS256": (rsa_key(), rsa_key()),
        "ES256": (ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())),
        "EdDSA": (ed25519.Ed25519PrivateKey.generate(), ed25519.Ed25519PrivateKey.generate()),
    }
    made = [
        (
            "HS256",
            TokenVerifier(secret=SECRET),
            jwt.encode(CLAIMS, SECRET, algorithm="HS256"),
            jwt.encode(CLAIMS, SECRET[::-1], algorithm="HS256"),
        )
    ]
    for name, (key, other) in keys.items():
        made.append(
            (
                name,
                TokenVerifier(public_key=key.public_key()),
                jwt.encode(CLAIMS, key, algorithm=name),
                jwt.encode(CLAIMS, other, algorithm=name),
            )
        )
    out = []
    for name, verifier, token, forged in made:
        if not isinstance(verifier.verify(token, NOW), Identity):
            raise SystemExit(f"{name}: the good token did not verify")
        if not isinstance(verifier.verify(forged, NOW), AuthRefusal):
            raise SystemExit(f"{name}: the forged token verified")
        out.append((name, verifier, token, forged))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--seconds", type=float, default=0.3, help="length of one round")
    ap.add_argument("--json", help="also write the figures to this file")
    a = ap.parse_args()
    results: dict[str, dict[str, float]] = {}
    print(f"{'algorithm':10} {'valid /s':>10} {'µs each':>8} {'forged /s':>10} {'µs each':>8}")
    for name, verifier, token, forged in cases():
        good = per_second(partial(verifier.verify, token, NOW), a.rounds, a.seconds)
        bad = per_second(partial(verifier.verify, forged, NOW), a.rounds, a.seconds)
        results[name] = {"valid_per_s": round(good), "forged_per_s": round(bad)}
        print(f"{name:10} {good:10.0f} {1e6 / good:8.1f} {bad:10.0f} {1e6 / bad:8.1f}")
    header = f"wshub, bearer.{jwt.encode(CLAIMS, SECRET, algorithm='HS256')}"
    offer = per_second(
        lambda: token_offer([header], [], "", query_token=False), a.rounds, a.seconds
    )
    results["token_offer"] = {"per_s": round(offer)}
    print(f"token_offer (subprotocol header): {offer:.0f} /s, {1e6 / offer:.2f} µs each")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"pyjwt": jwt.__version__, "results": results}, f, indent=2)
            f.write("\n")


if __name__ == "__main__":
    main()
