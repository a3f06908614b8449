"""The cost of verifying one connect token, in-process, one core, warm.

For each algorithm wshub pins (HS256, RS256, ES256, EdDSA) a typical token
(sub, iat, exp, a short rooms list) is verified again and again through
:meth:`wshub.auth.TokenVerifier.verify`; the figure is the best of several
rounds (least disturbed by other work on the machine). Also shown: a refused
token of the same algorithm (a bad signature, what a flood of forged tokens
costs) and the extraction of the token from the upgrade request's headers.
Keys are generated at start; nothing touches a socket.

    .venv/bin/python bench/auth_verify.py [--rounds 7] [--seconds 0.3] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from wshub.auth import AuthRefusal, Identity, TokenVerifier, token_offer

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
    batch = 1
    while True:  # size a batch to ~seconds
        start = time.perf_counter()
        for _ in range(batch):
            call()
        elapsed = time.perf_counter() - start
        if elapsed >= seconds / 4:
            break
        batch *= 2
    batch = max(1, int(batch * seconds / max(elapsed, 1e-9)))
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(batch):
            call()
        best = min(best, (time.perf_counter() - start) / batch)
    return 1.0 / best


def cases() -> list[tuple[str, TokenVerifier, str, str]]:
    """(algorithm, verifier, a good token, a token with a forged signature)."""
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    ed_key = ed25519.Ed25519PrivateKey.generate()
    made = [
        ("HS256", TokenVerifier(secret=SECRET), jwt.encode(CLAIMS, SECRET, algorithm="HS256")),
        (
            "RS256",
            TokenVerifier(public_key=rsa_key.public_key()),
            jwt.encode(CLAIMS, rsa_key, algorithm="RS256"),
        ),
        (
            "ES256",
            TokenVerifier(public_key=ec_key.public_key()),
            jwt.encode(CLAIMS, ec_key, algorithm="ES256"),
        ),
        (
            "EdDSA",
            TokenVerifier(public_key=ed_key.public_key()),
            jwt.encode(CLAIMS, ed_key, algorithm="EdDSA"),
        ),
    ]
    out = []
    for name, verifier, token in made:
        head, _, signature = token.rpartition(".")
        forged = f"{head}.{'A' * len(signature)}"
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
        good = per_second(lambda v=verifier, t=token: v.verify(t, NOW), a.rounds, a.seconds)
        bad = per_second(lambda v=verifier, t=forged: v.verify(t, NOW), a.rounds, a.seconds)
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
