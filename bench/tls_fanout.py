"""The fan-out cost of TLS, in one run: wshub over wss:// against wshub over
ws:// (with its direct sends, and with ``--direct-send off`` as TLS sockets
always are) and against uWebSockets.js with TLS (``SSLApp``, bench/servers/
uws_tls_relay.js) and without (uws_relay.js), rounds interleaved.

Encryption is per recipient (each socket has its own keys), so a frame sent
to N clients is encrypted N times whoever the server is: this measures what
that costs each server per delivery, and what it leaves of the fan-out rate.

Generator: ``wshub bench fanout`` with its Python engine (the native C engine
speaks no TLS), one sender and N-1 recipients, closed loop, 32 in flight;
the same engine for the plain runs, so the five are comparable. It reports
its own CPU (``generator_cpu``, in cores): when it is near one core, the
generator, not the server, sets the rate, and the server's CPU per delivery
(read from /proc with --server-pid) is the figure to compare.

Usage: .venv/bin/python bench/tls_fanout.py [--rounds 3] [-n 500] [--duration 8]
       [--json bench/results/tls-fanout.json]
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from shared import NODE_DIR, basics, npm_package, wait_port

PY = sys.executable
WSHUB_FLAGS = [
    "--ip-connect-rate",
    "0",
    "--max-connections-per-ip",
    "0",
    "--message-rate",
    "0",
    "--max-connections",
    "20000",
    "--log-level",
    "warning",
]


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed P-256 certificate for 127.0.0.1 (the client trusts it
    with --ca-file): the usual choice of a modern deployment."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "cert.pem", directory / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def servers(cert: Path, key: Path) -> dict[str, tuple[str, str, object]]:
    """name: (scheme, protocol, command builder)."""
    wshub = [PY, "-m", "wshub", "serve", "--host", "127.0.0.1", *WSHUB_FLAGS]
    tls = ["--tls-cert", str(cert), "--tls-key", str(key)]
    return {
        "wshub-wss": ("wss", "wshub", lambda port: [*wshub, "--port", str(port), *tls]),
        "wshub-ws": ("ws", "wshub", lambda port: [*wshub, "--port", str(port)]),
        # TLS sockets always go through the event loop's transport: this one
        # too, so wss against it is the encryption alone.
        "wshub-ws-transport": (
            "ws",
            "wshub",
            lambda port: [*wshub, "--port", str(port), "--direct-send", "off"],
        ),
        "uws-tls": (
            "wss",
            "raw",
            lambda port: [
                "node",
                str(NODE_DIR / "uws_tls_relay.js"),
                str(port),
                str(cert),
                str(key),
            ],
        ),
        "uws": ("ws", "raw", lambda port: ["node", str(NODE_DIR / "uws_relay.js"), str(port)]),
    }


def one(name: str, spec: tuple[str, str, object], args: argparse.Namespace, ca: Path) -> dict:
    scheme, protocol, command = spec
    port = free_port()
    proc = subprocess.Popen(
        command(port),  # type: ignore[operator]
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_port(port, proc)
        cmd = [PY, "-m", "wshub", "bench", "fanout", "--json", "--protocol", protocol]
        cmd += ["--url", f"{scheme}://127.0.0.1:{port}/websocket", "--server-pid", str(proc.pid)]
        cmd += ["-n", str(args.connections), "--duration", str(args.duration)]
        cmd += ["--warmup", str(args.warmup)]
        if scheme == "wss":
            cmd += ["--ca-file", str(ca)]
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=args.duration * 10 + 120)
        try:
            result = json.loads(run.stdout)
        except ValueError:
            result = {"error": (run.stderr or run.stdout)[-400:]}
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        stderr = proc.stderr.read() if proc.stderr else ""
    if "Traceback" in stderr:
        result["server_traceback"] = stderr[-400:]
    keys = (
        "deliveries_per_s",
        "server_cpu_us_per_delivery",
        "server_cpu",
        "generator_cpu",
        "latency_ms_p50",
        "latency_ms_p99",
        "connections_open",
        "closed_early",
        "error",
        "errors",
        "server_traceback",
    )
    return {k: result[k] for k in keys if k in result}


def median(values: list[float | None]) -> float | None:
    clean = [v for v in values if isinstance(v, int | float)]
    return round(statistics.median(clean), 3) if clean else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("-n", "--connections", type=int, default=500)
    parser.add_argument("--duration", type=float, default=8.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--json", type=Path, help="write every run and the medians here")
    args = parser.parse_args()
    if not (NODE_DIR / "node_modules" / "uwebsockets").exists():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, check=True)
    runs: dict[str, list[dict]] = {}
    started = datetime.datetime.now(datetime.UTC)
    with tempfile.TemporaryDirectory() as tmp:
        cert, key = make_certificate(Path(tmp))
        specs = servers(cert, key)
        names = list(specs)
        for r in range(args.rounds):
            order = names[r % len(names) :] + names[: r % len(names)]  # rotate: no fixed slot
            for name in order:
                result = one(name, specs[name], args, cert)
                runs.setdefault(name, []).append(result)
                print(f"round {r + 1} {name:10} {json.dumps(result)}", file=sys.stderr, flush=True)
                time.sleep(1)
    summary = {
        name: {
            key: median([run.get(key) for run in results])
            for key in (
                "deliveries_per_s",
                "server_cpu_us_per_delivery",
                "server_cpu",
                "generator_cpu",
                "latency_ms_p50",
                "latency_ms_p99",
            )
        }
        for name, results in runs.items()
    }
    record = {
        "started": started.isoformat(timespec="seconds"),
        "command": " ".join(["bench/tls_fanout.py", *sys.argv[1:]]),
        "machine": {**basics(), "uwebsockets": npm_package("uwebsockets")},
        "load_avg_at_end": os.getloadavg(),
        "connections": args.connections,
        "duration_s": args.duration,
        "rounds": args.rounds,
        "median": summary,
        "runs": runs,
    }
    print(json.dumps(record["median"], indent=2))
    if args.json:
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
