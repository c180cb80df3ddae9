"""`moedit export SRC --format diffusers|official|safetensors --out PATH`.

    moedit export runs/dit_s2 --format diffusers --out exports/dit_s2_diffusers
    moedit export runs/diffmoe --format official --layout diffmoe --out exports/diffmoe.pt
    moedit export runs/diffmoe --format safetensors --out exports/diffmoe.safetensors
"""

from __future__ import annotations

import argparse

# Spelled out so that `--help` needs no torch (moedit.interop.export loads it); tests/test_hardening_cli.py
# checks them against moedit.interop.export.FORMATS and moedit.interop.layouts.LAYOUTS.
FORMATS = ("diffusers", "official", "safetensors")
LAYOUTS = ("dit", "diffmoe", "ditmoe")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="SRC", help="run directory (newest checkpoint), checkpoint directory "
                        "or (for diffusers / official) an exported .safetensors file")
    parser.add_argument("--format", required=True, choices=FORMATS, help="what to write")
    parser.add_argument("--out", required=True, help="diffusers: new directory; official: .pt file; "
                        "safetensors: .safetensors file (its config goes beside it as .json)")
    parser.add_argument("--layout", default=None, choices=LAYOUTS, help="official format: dit, diffmoe or ditmoe")
    parser.add_argument("--raw", action="store_true", help="export the raw weights instead of the EMA weights")


def main(args: argparse.Namespace) -> int:
    from moedit.interop import export

    use_ema = not args.raw
    if args.format == "official" and args.layout is None:
        raise ValueError("--format official needs --layout dit|diffmoe|ditmoe")
    if args.format != "official" and args.layout is not None:
        raise ValueError(f"--layout applies to --format official only, not {args.format}")
    if args.format == "diffusers":
        out = export.export_diffusers(args.source, args.out, use_ema)
    elif args.format == "official":
        out = export.export_official(args.source, args.out, args.layout, use_ema)
    else:
        out = export.export_moedit_safetensors(args.source, args.out, use_ema)
    print(f"wrote {out}")
    return 0
