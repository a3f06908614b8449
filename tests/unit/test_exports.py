"""Every public module declares __all__, and every name in it exists."""

from __future__ import annotations

import importlib
import pkgutil

import wshub


def test_all_names_exist() -> None:
    for info in pkgutil.walk_packages(wshub.__path__, "wshub."):
        if info.name.startswith("wshub.bench") or info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        exported = getattr(module, "__all__", None)
        assert exported is not None, f"{info.name} has no __all__"
        for name in exported:
            assert hasattr(module, name), f"{info.name}.__all__ names missing {name}"
