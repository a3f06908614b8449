"""What bench/run.py and bench/candidates/run.py share: the machine record a
benchmark page gives (CPU, kernel, versions) and waiting for a server's port."""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import time
from pathlib import Path

NODE_DIR = Path(__file__).resolve().parent / "servers"


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return ""


def output(cmd: list[str]) -> str:
    """A command's standard output, stripped; "?" when it cannot run."""
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "?"


def python_package(python: str, name: str) -> str:
    """The installed version of distribution *name* for interpreter *python*."""
    return output([python, "-c", f"import importlib.metadata as m; print(m.version({name!r}))"])


def npm_package(name: str) -> str:
    try:
        return json.loads((NODE_DIR / "node_modules" / name / "package.json").read_text())[
            "version"
        ]
    except (OSError, ValueError, KeyError):
        return "?"


def basics() -> dict:
    """Cores, CPU, kernel, Python and Node: the start of every machine record."""
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu_model(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "node": output(["node", "--version"]),
    }


def wait_port(port: int, proc: subprocess.Popen | None = None, timeout: float = 20.0) -> None:
    """Return once 127.0.0.1:*port* accepts; fail early if *proc* exits first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"server did not listen on {port} within {timeout}s")
