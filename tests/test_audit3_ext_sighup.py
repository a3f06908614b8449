"""decisions.md 19: "SIGHUP never ends the process" -- from the start, too.

A config-management run that starts the hub and reloads it at once, or a
supervisor whose SIGHUP reaches a worker it has just (re)started, sends the
signal while the process is still importing its modules, before the event
loop's handler is in place.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from .conftest import TIMEOUT, free_port
from .waiting import wait_until


def _imports_begun(pid: int) -> bool:
    """The interpreter is up and loading modules: a C extension (lib-dynload or
    site-packages) is mapped. A bare interpreter maps none, so before this
    point a SIGHUP meets the interpreter's own start, which no code can guard."""
    try:
        with open(f"/proc/{pid}/maps") as maps:
            return any("lib-dynload" in line or "site-packages" in line for line in maps)
    except FileNotFoundError:
        return True  # it is gone already: let the test see how


@pytest.mark.parametrize(
    "command",
    [[sys.executable, "-m", "wshub"], [str(Path(sys.executable).parent / "wshub")]],
    ids=["python-m-wshub", "console-script"],
)
def test_sighups_from_the_first_import_to_listening_never_end_the_process(
    command: list[str],
) -> None:
    proc = subprocess.Popen(
        [*command, "serve", "--port", "0", "--log-level", "info"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: _imports_begun(proc.pid), "its imports to begin", interval=0.001)
        listening = threading.Event()
        sent = 0

        def hammer() -> None:
            nonlocal sent
            # Until the server says it listens, and a little after (the
            # handler is installed at the start of serve(), before the bind).
            while not listening.is_set() and proc.poll() is None:
                os.kill(proc.pid, signal.SIGHUP)
                sent += 1
                time.sleep(0.005)

        sender = threading.Thread(target=hammer, daemon=True)
        sender.start()
        assert proc.stdout is not None
        line = proc.stdout.readline()
        listening.set()
        sender.join(TIMEOUT)
        assert proc.poll() is None, f"ended by SIGHUP ({proc.returncode}) after {sent} sent"
        assert re.search(r"listening on \S+:\d+", line), line
        assert sent > 10  # the signals did come while it was starting
        host, port = re.search(r"listening on (\S+):(\d+)", line).groups()  # type: ignore[union-attr]
        with urllib.request.urlopen(f"http://{host}:{port}/healthz", timeout=TIMEOUT) as answer:
            assert answer.status == 200
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=TIMEOUT * 3)
    assert "Traceback" not in err, err


def test_a_sighup_passed_on_to_starting_workers_ends_none_of_them(redis_server) -> None:
    """--workers 2: the supervisor passes SIGHUP on to its workers, some of them
    just (re)started; none of them may die of it."""
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "wshub", "serve", "--port", str(free_port())),
            *("--workers", "2", "--redis-url", redis_server.url, "--cluster-name", "hup3"),
            *("--log-level", "info"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    log: list[str] = []

    def pump() -> None:
        assert proc.stderr is not None
        log.extend(proc.stderr)

    def died() -> bool:
        return any("exited with" in line for line in log)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        # The supervisor's own handler is in place before it spawns a worker.
        wait_until(lambda: any("worker 0 started" in line for line in log), "a worker spawned")
        listening = threading.Event()
        sent = 0

        def hammer() -> None:
            nonlocal sent
            # Until both listen, or a worker died of it (then they can start again).
            while not listening.is_set() and proc.poll() is None and not died():
                os.kill(proc.pid, signal.SIGHUP)
                sent += 1
                time.sleep(0.005)

        sender = threading.Thread(target=hammer, daemon=True)
        sender.start()
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(2)]
        listening.set()
        sender.join(TIMEOUT)
        assert all("listening on" in line for line in lines), (lines, "".join(log))
        assert not died(), "".join(log)
        assert sent > 10
        wait_until(lambda: any("SIGHUP passed on to 2 workers" in x for x in log), "a pass-on")
    finally:
        proc.terminate()
        proc.wait(TIMEOUT * 3)
        reader.join(TIMEOUT)
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()
        proc.stderr.close()
    assert not [line for line in log if "exited with" in line or "Traceback" in line], "".join(log)
