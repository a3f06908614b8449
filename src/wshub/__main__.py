import signal
import sys

# SIGHUP never ends the server (decisions.md 19), not even while it starts: the
# imports before the event loop's own handler take half a second on a loaded
# machine, and the default action of SIGHUP is to exit. Ignored from here on
# (serve() installs the reload handler); other commands keep the default, so that
# a closed terminal still ends `wshub client`.
if sys.argv[1:2] == ["serve"]:
    signal.signal(signal.SIGHUP, signal.SIG_IGN)

from .cli import main  # noqa: E402 (after the line above, on purpose)

raise SystemExit(main())
