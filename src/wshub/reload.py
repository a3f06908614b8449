"""What SIGHUP reloads: one named reloader per feature that reads files.

SIGHUP never ends the process (decisions.md 19). Each feature that can take
new files without a restart registers a reloader here (the TLS certificate
today; the API keys file next); :func:`wshub.server.serve` runs them all on
SIGHUP and logs each outcome.

A reloader returns a short text saying what it loaded (for the log) or
raises to say it loaded nothing: it must then leave the state it had. One
reloader failing does not keep the others from running.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Outcome", "Reloader", "Reloaders"]

Reloader = Callable[[], str]


@dataclass(frozen=True, slots=True)
class Outcome:
    name: str
    ok: bool
    detail: str
    """What was loaded, or why nothing was."""


class Reloaders:
    """The registry, in the order reloaders were added."""

    def __init__(self) -> None:
        self._reloaders: dict[str, Reloader] = {}

    def add(self, name: str, reloader: Reloader) -> None:
        if name in self._reloaders:
            raise ValueError(f"a reloader named {name!r} is registered already")
        self._reloaders[name] = reloader

    @property
    def names(self) -> list[str]:
        return list(self._reloaders)

    def reload_all(self) -> list[Outcome]:
        outcomes = []
        for name, reloader in self._reloaders.items():
            try:
                detail = reloader()
            except Exception as exc:  # any failure is logged; the old state stays
                outcomes.append(Outcome(name, False, str(exc) or type(exc).__name__))
            else:
                outcomes.append(Outcome(name, True, detail))
        return outcomes
