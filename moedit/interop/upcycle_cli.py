"""`moedit upcycle SRC --out DIR [--flavor MOE_FLAVOR] [--noise-std S] [--set KEY=VALUE ...]`.

    moedit upcycle runs/dit_s2 --flavor DiffMoE-S-E16 --out ckpts/diffmoe_s_e16_upcycled
    moedit upcycle runs/tiny --out up --set moe.router=token_choice moe.num_experts=4 moe.renormalize=true
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="SRC", help="dense run directory, checkpoint directory or exported file")
    parser.add_argument("--out", required=True, help="new checkpoint directory to write")
    parser.add_argument("--flavor", default=None, help="MoE flavor with the dense model's backbone (else give moe.* overrides)")
    parser.add_argument("--noise-std", type=float, default=0.0,
                        help="per-expert Gaussian noise on expert weights, relative to each dense matrix's std (default 0)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the router initialisation and the noise")
    parser.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="dotted config overrides, e.g. moe.num_experts=8 moe.capacity=1")


def main(args: argparse.Namespace) -> int:
    from moedit.interop.upcycle import upcycle_checkpoint

    out = upcycle_checkpoint(args.source, args.out, flavor=args.flavor, overrides=args.overrides,
                             noise_std=args.noise_std, seed=args.seed)
    print(f"wrote {out} (upcycled moedit checkpoint)")
    return 0
