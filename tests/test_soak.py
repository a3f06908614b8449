"""The soak for one minute in CI: ``scripts/soak --minutes 1``.

Mixed traffic with joins and leaves (300 client slots, sessions of 5-40 s,
messages, broadcasts, pings, user_info, invalid and binary frames, clean
closes and dropped sockets) against a real server; see tests/soakrun.py for
how every message is accounted for. Asserted: no errors, every message
received by exactly the sessions that had to receive it (and by no one who
could not have), joins and leaves each announced once, the server's own
counters equal to what was sent, and memory flat after warm-up.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FLAT_TOLERANCE_KIB = 2048
"""End RSS may exceed the RSS after warm-up by this much: allocator noise is
a few hundred KiB; a leak of even 1 KiB per session (~1,400 sessions a
minute) would not fit."""


def test_soak_one_minute() -> None:
    result = subprocess.run(
        [
            str(ROOT / "scripts" / "soak"),
            "--minutes",
            "1",
            "--clients",
            "300",
            "--warmup",
            "15",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
    )
    assert result.stdout.strip(), result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    from tests.soakrun import summary_text

    print("\n" + summary_text(summary))
    assert summary["errors"] == [] and summary["error_count"] == 0, summary["errors"]
    assert summary["server_tracebacks"] == 0 and summary["server_exit"] == 0
    # Load actually happened, with joins and leaves throughout.
    assert summary["sessions"] > 2 * summary["clients"]
    assert summary["dropped_sockets"] > 0 and summary["clean_closes"] > summary["clients"]
    assert summary["deliveries_required"] > 100_000
    # Every message accounted for.
    for key in ("missing", "duplicates", "unexpected", "unconfirmed", "out_of_order"):
        assert summary[key] == 0, key
    assert summary["deliveries_received"] == summary["deliveries_required"]
    assert summary["server_incoming"] == summary["data_frames_sent"]
    assert summary["error_replies"] == summary["expected_error_replies"]
    observer = summary["observer"]
    assert observer["not_joined"] == observer["not_left"] == observer["announced_twice"] == 0
    assert observer["joined"] == observer["left"] == summary["sessions"] - 1
    # Memory flat.
    rss = summary["rss"]
    assert rss["end_kib"] - rss["warm_kib"] < FLAT_TOLERANCE_KIB, rss
    assert result.returncode == 0
