"""`torch = LazyModule("torch")` in a command module: `moedit X --help` parses arguments without
importing torch (seconds); the module is imported on first attribute access, in main()."""

from __future__ import annotations

import importlib
import sys


class LazyModule:
    """`torch = LazyModule("torch")` in a command module: the module is imported on the first
    attribute access (in main()), not when `moedit X --help` imports the command module.
    Annotations are unaffected where the module uses `from __future__ import annotations`."""

    def __init__(self, name: str):
        self.__dict__["_name"] = name

    def __getattr__(self, attr: str):
        module = importlib.import_module(self.__dict__["_name"])
        return getattr(module, attr)


def lazy_attributes(package: str, names: dict[str, str]):
    """A module `__getattr__` for `package` that imports `names[attr]` (a module path) on the first
    access of `attr` and keeps the value: `__getattr__ = lazy_attributes(__name__, {...})` lets a
    package export torch-backed names without importing torch when it is imported."""

    def __getattr__(name: str):
        if name in names:
            value = getattr(importlib.import_module(names[name]), name)
            setattr(sys.modules[package], name, value)
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
