"""`moedit analyze <scaling|routing>`: each subcommand's module is imported only when it runs.

A subcommand module defines add_arguments(parser) and main(args) -> int. A module
that cannot be imported (not built yet) turns into a one-line error for that
subcommand alone; the other keeps working.
"""

from __future__ import annotations

import argparse
import importlib

from moedit.errors import MoeditError

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "scaling": ("moedit.analysis.scaling.cli", "fit scaling laws (envelope, Chinchilla, isoFLOP, MoE) to a sweep"),
    "routing": ("moedit.analysis.routing.cli", "expert-routing statistics and reports from a run"),
}


class _LazyParser(argparse.ArgumentParser):
    """A subparser whose arguments come from its module, imported on first parse (or help)."""

    def __init__(self, *args, module_name: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._module_name = module_name
        self._loaded = module_name is None

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        try:
            module = importlib.import_module(self._module_name)
        except ModuleNotFoundError as exc:
            if exc.name != self._module_name:  # the module exists but one of its imports is missing: a real bug
                raise
            self.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
            self.set_defaults(_analysis_main=_missing(self.prog, self._module_name))
            return
        module.add_arguments(self)
        self.set_defaults(_analysis_main=module.main)

    def parse_known_args(self, args=None, namespace=None):
        self._load()
        return super().parse_known_args(args, namespace)

    def format_help(self):
        self._load()
        return super().format_help()


def _missing(prog: str, module_name: str):
    def main(args: argparse.Namespace) -> int:
        raise MoeditError(f"'{prog}' is not available: module {module_name} is not installed in this checkout")

    return main


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="analysis", metavar="ANALYSIS", parser_class=_LazyParser)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        sub.add_parser(name, help=help_text, description=help_text, module_name=module_name)
    parser.set_defaults(_analysis_parser=parser)


def main(args: argparse.Namespace) -> int:
    run = getattr(args, "_analysis_main", None)
    if run is None:
        args._analysis_parser.print_help()
        return 2
    return int(run(args) or 0)
