"""The native engine of ``wshub bench`` (``--engine native``): fanout, rate, chat and sink in C.

``native.c`` (shipped next to this file) is compiled on first use with
``cc -O2 -Wall -Wextra -Werror`` into a cache directory (``$XDG_CACHE_HOME/wshub``
or ``~/.cache/wshub``), under a name keyed by a hash of the source and of the
compiler command, so an edited source is rebuilt. The program gets the parsed
:class:`~wshub.bench.runner.Config` as arguments, runs the scenario with the same
semantics as the Python engine and prints one JSON object with the same keys;
:func:`run` adds the header the Python engine puts first and ``"engine": "native"``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from importlib import resources
from pathlib import Path

from .runner import Config

SCENARIOS = ("fanout", "rate", "chat", "sink")
CFLAGS = ["-O2", "-Wall", "-Wextra", "-Werror"]
SOURCE = "native.c"


class NativeError(RuntimeError):
    """The native engine could not be built or run."""


def _source() -> bytes:
    return resources.files(__package__).joinpath(SOURCE).read_bytes()


def compiler() -> str:
    """The C compiler: ``$CC``, else cc, gcc or clang on PATH."""
    names = [os.environ["CC"]] if os.environ.get("CC") else ["cc", "gcc", "clang"]
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    raise NativeError(
        "the native engine (--engine native) is built from C on first use, but no C compiler "
        f"was found ({', '.join(names)} not on PATH). Install one (e.g. `apt-get install gcc`) "
        "or use --engine python."
    )


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "wshub"


def binary() -> Path:
    """The compiled engine, built now unless the cache holds this source's build."""
    src = _source()
    cc = compiler()
    key = hashlib.sha256(src + "\0".join([cc, *CFLAGS]).encode()).hexdigest()[:16]
    out = cache_dir() / f"bench-native-{key}"
    if out.is_file() and os.access(out, os.X_OK):
        return out
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        where = out.parent
    except OSError:
        where = Path(tempfile.gettempdir())
        out = where / out.name
        if out.is_file() and os.access(out, os.X_OK):
            return out
    with tempfile.TemporaryDirectory(prefix="wshub-native-", dir=where) as tmp:
        c_file = Path(tmp) / SOURCE
        c_file.write_bytes(src)
        tmp_bin = Path(tmp) / out.name
        proc = subprocess.run(
            [cc, *CFLAGS, "-o", str(tmp_bin), str(c_file)], capture_output=True, text=True
        )
        if proc.returncode != 0:
            raise NativeError(
                f"building the native engine failed ({cc} {' '.join(CFLAGS)}):\n"
                f"{proc.stderr.strip()[-3000:]}"
            )
        os.replace(tmp_bin, out)  # atomic: concurrent builds each put a whole file
    return out


def command(cfg: Config, read_size: int | None = None) -> list[str]:
    """The engine's arguments for ``cfg`` (the binary first)."""
    if cfg.scenario not in SCENARIOS:
        raise NativeError(
            f"the native engine runs {', '.join(SCENARIOS)}, not {cfg.scenario}; "
            "use --engine python"
        )
    args = [str(binary()), "--scenario", cfg.scenario, "--protocol", cfg.protocol]
    for url, (host, port, path) in zip(cfg.urls, cfg.targets, strict=True):
        args += ["--target", host, str(port), path, url]
    args += [
        "--placement",
        cfg.placement,
        "-n",
        str(cfg.connections),
        "--inflight",
        str(cfg.inflight),
        "--rate",
        repr(float(cfg.rate)),
        "--size",
        str(cfg.size),
        "--duration",
        repr(float(cfg.duration)),
        "--warmup",
        repr(float(cfg.warmup)),
        "--source-ips",
        str(cfg.source_ips),
        "--connect-concurrency",
        str(cfg.connect_concurrency),
        "--connect-timeout",
        repr(float(cfg.connect_timeout)),
        "--open-deadline",
        repr(float(cfg.open_deadline)),
        "--probes",
        str(cfg.probes),
        "--keepalive",
        repr(float(cfg.keepalive)),
        "--nap-us",
        str(cfg.nap_us),
        "--progress",
        "1" if cfg.progress else "0",
    ]
    if cfg.server_pid:
        args += ["--server-pid", str(cfg.server_pid)]
    args += ["--reader", cfg.reader]
    if cfg.rooms:
        args += ["--rooms", str(cfg.rooms)]
    if read_size:
        args += ["--read-size", str(read_size)]  # tests: at most this many bytes per read
    return args


def run(cfg: Config, *, read_size: int | None = None) -> dict:
    """Run one scenario on the native engine; the result dict of the Python engine."""
    cmd = command(cfg, read_size)
    # stderr stays the terminal's (the progress line); the result comes on stdout
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None, text=True)
    try:
        body = json.loads(proc.stdout)
    except json.JSONDecodeError:
        raise NativeError(
            f"the native engine exited with {proc.returncode} without a result "
            f"(stdout: {proc.stdout[-300:]!r})"
        ) from None
    if "error" in body:  # what the Python engine raises as RuntimeError (or a fatal error)
        raise RuntimeError(body["error"])
    if proc.returncode != 0:
        raise NativeError(f"the native engine exited with {proc.returncode}")
    return {
        "scenario": cfg.scenario,
        "protocol": cfg.protocol,
        "url": cfg.url,
        **({"urls": cfg.urls, "placement": cfg.placement} if len(cfg.urls) > 1 else {}),
        "size": cfg.size,
        "engine": "native",
        **body,
    }


if __name__ == "__main__":  # print where the engine is (building it if needed)
    print(binary())
    sys.exit(0)
