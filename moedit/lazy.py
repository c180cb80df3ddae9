"""`torch = LazyModule("torch")` in a command module: `moedit X --help` parses arguments without
importing torch (seconds); the module is imported on first attribute access, in main()."""

from __future__ import annotations

import importlib


class LazyModule:
    """`torch = LazyModule("torch")` in a command module: the module is imported on the first
    attribute access (in main()), not when `moedit X --help` imports the command module.
    Annotations are unaffected where the module uses `from __future__ import annotations`."""

    def __init__(self, name: str):
        self.__dict__["_name"] = name

    def __getattr__(self, attr: str):
        module = importlib.import_module(self.__dict__["_name"])
        return getattr(module, attr)
