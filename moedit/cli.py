"""The `moedit` command: one subcommand per module, imported only when used."""

from __future__ import annotations

import argparse
import importlib
import re
import sys

from moedit.errors import MoeditError

# command -> (module, one-line help). Each module defines add_arguments(parser) and main(args) -> int.
COMMANDS: dict[str, tuple[str, str]] = {
    "models": ("moedit.models.cli", "list the model registry with parameter and FLOP counts"),
    "prepare": ("moedit.data.prepare", "encode a dataset into WebDataset latent shards"),
    "train": ("moedit.train.cli", "train a model from a config"),
    "sample": ("moedit.eval.sample_cli", "sample images from a checkpoint"),
    "analyze": ("moedit.analysis.cli", "routing reports and scaling-law fits"),
    "launch": ("moedit.launch.cli", "launch training on SLURM or locally with torchrun"),
    "sweep": ("moedit.launch.sweep_cli", "expand, submit and track sweeps"),
    "evaluate": ("moedit.eval.cli", "FID, sFID, Inception Score and precision/recall of a checkpoint's samples"),
    "convert": ("moedit.interop.convert_cli", "import DiT / DiffMoE / DiT-MoE / diffusers checkpoints"),
    "upcycle": ("moedit.interop.upcycle_cli", "initialise an MoE checkpoint from a dense one"),
    "export": ("moedit.interop.export_cli", "export to diffusers, an official layout or safetensors"),
}


# Commands whose positional `overrides` (dotted key=value) may also come after flags:
# `moedit launch local CFG --nproc 2 train.steps=30`.
OVERRIDES_ANYWHERE = ("train", "launch", "models")
_OVERRIDE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*=")


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("moedit")
    except Exception:  # not installed (run from a checkout)
        return "unknown"


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moedit", description=__doc__)
    parser.add_argument("--version", action="version", version=f"moedit {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:  # import only the module that runs
            importlib.import_module(module_name).add_arguments(sp)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and argv[0] in COMMANDS else None
    parser = build_parser(command)
    args, extras = parser.parse_known_args(argv)
    if extras:
        overrides = [e for e in extras if _OVERRIDE_RE.match(e)]
        unknown = [e for e in extras if not _OVERRIDE_RE.match(e)]
        if unknown or args.command not in OVERRIDES_ANYWHERE or not hasattr(args, "overrides"):
            where = " ".join(["moedit", args.command or ""] + ([args.target] if getattr(args, "target", None) else []))
            print(f"{where.strip()}: error: unrecognized arguments: {' '.join(unknown or extras)}", file=sys.stderr)
            return 2
        # overrides given after a flag apply after those given before it, in command-line order
        args.overrides = list(args.overrides or []) + overrides
    if args.command is None:
        build_parser().print_help()
        return 2
    module = importlib.import_module(COMMANDS[args.command][0])
    try:
        return int(module.main(args) or 0)
    except (MoeditError, ValueError, FileNotFoundError, PermissionError) as exc:
        if isinstance(exc, ValueError) and not isinstance(exc, MoeditError) and _is_internal(exc):
            raise
        print(f"moedit {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"moedit {args.command}: interrupted", file=sys.stderr)
        return 130


def _is_internal(exc: BaseException) -> bool:
    """ValueErrors from torch/numpy internals are bugs, not user errors: keep their traceback."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    filename = tb.tb_frame.f_code.co_filename if tb is not None else ""
    return "site-packages" in filename and "moedit" not in filename


if __name__ == "__main__":
    sys.exit(main())
