"""Outside-tester attacks on TLS around the server (decisions.md 16): the
command-line tools speak https:// with ``--ca-file`` and ``--insecure``.

Real ``wshub serve`` with a certificate of the test CA of tests/test_tls.py, real
``wshub publish`` processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable

from .conftest import TIMEOUT, Server
from .test_tls import LOOSE, Files, TestCA, ca, files  # noqa: F401  (ca, files: fixtures)

KEY = "audit-ext-tls-key-0123456789"


def _publish(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "wshub", "publish", *args],
        env={**os.environ, "WSHUB_API_KEY": KEY},
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 3,
    )


def test_wshub_publish_speaks_https_with_ca_file_and_insecure(
    make_server: Callable[..., Server],
    files: Files,  # noqa: F811
    ca: TestCA,  # noqa: F811
) -> None:
    """decisions.md 16: `wshub publish` speaks https:// (--ca-file, --insecure).
    Without either, a private CA is not trusted: the server could not be reached
    (status 1, with the hint), not a usage error."""
    server = make_server(*LOOSE, *files.flags, "--api-keys", KEY)
    for url, flags in (
        (f"https://localhost:{server.port}", ("--ca-file", str(ca.path))),
        (f"wss://127.0.0.1:{server.port}", ("--ca-file", str(ca.path))),
        (f"https://127.0.0.1:{server.port}", ("--insecure",)),
    ):
        done = _publish(url, "over tls", "--room", "tls", *flags)
        assert done.returncode == 0, (url, flags, done.stderr)
        assert json.loads(done.stdout)["room"] == "tls"
    untrusted = _publish(f"https://127.0.0.1:{server.port}", "x")
    assert untrusted.returncode == 1, untrusted.stderr
    assert "--ca-file" in untrusted.stderr
    plain = _publish(f"http://127.0.0.1:{server.port}", "x", "--insecure")
    assert plain.returncode == 2 and "https://" in plain.stderr
