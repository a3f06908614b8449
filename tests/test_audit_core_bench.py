"""``wshub bench`` (decisions.md 11) against a server with its default limits."""

from __future__ import annotations

import json

from wshub.bench import main as bench_main


def test_fanout_that_delivers_nothing_fails_and_says_why(make_server, capsys) -> None:
    """With wshub's defaults the fan-out sender is closed 1008 by the rate
    limit within its warm-up; its socket stays open until the run ends, so it
    is not "closed early". A run that measured no delivery is a failed run that
    says what to change, not a figure of 0 deliveries/s with exit status 0."""
    srv = make_server("--ip-connect-rate", "0")  # the message rate left at its default
    rc = bench_main(
        ["fanout", "--json", "-n", "5", "--duration", "1", "--warmup", "0.5", "--url", srv.ws_url]
    )
    captured = capsys.readouterr()
    res = json.loads(captured.out)
    assert res["deliveries"] == 0 and res["closed_early"] == 0
    assert rc == 1
    assert "--message-rate 0" in captured.err
