"""``wshub bench`` as a person runs it (decisions.md 11 and 16): the report
names the server's memory, and a run that cannot open its connections says why.

Small runs (a few connections, a low rate): what is checked is the report, not
a figure.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable

from .conftest import TIMEOUT, Server
from .test_tls import LOOSE, Files, ca, files  # noqa: F401  (ca, files: fixtures)

SMALL = ("-n", "4", "--rate", "5", "--duration", "1", "--warmup", "0.2")


def _bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "wshub", "bench", *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT * 6,
    )


def test_rate_reports_the_server_memory(make_server: Callable[..., Server]) -> None:
    """decisions.md 11: deliveries per second, latency percentiles and memory.
    With --server-pid, the rate scenario reported CPU but no memory (only the
    idle scenario did)."""
    server = make_server(*LOOSE)
    pid = str(server.proc.pid)
    url = server.ws_url
    report = json.loads(_bench("rate", "--url", url, "--server-pid", pid, *SMALL, "--json").stdout)
    assert report["deliveries_per_s"] > 0 and report["latency_samples"] > 0, report
    assert report["server_rss_kib"] > 1024, report  # a Python process: over a MiB
    table = _bench("rate", "--url", url, "--server-pid", pid, *SMALL)
    assert table.returncode == 0, table.stderr
    assert "MiB at the end of the run" in table.stdout.splitlines()[2], table.stdout


def test_an_untrusted_certificate_is_named(
    make_server: Callable[..., Server],
    files: Files,  # noqa: F811
) -> None:
    """Against wss:// without --ca-file, every connection fails verification:
    the run said only "needs at least 2 open connections", not why."""
    server = make_server(*LOOSE, *files.flags)
    result = _bench("rate", "--url", f"wss://127.0.0.1:{server.port}/websocket", *SMALL)
    assert result.returncode != 0
    assert "CERTIFICATE_VERIFY_FAILED" in result.stderr and "--ca-file" in result.stderr, (
        result.stderr
    )
