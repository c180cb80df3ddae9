"""`moedit convert --from dit|diffmoe|ditmoe|diffusers SRC --out DIR [--flavor NAME] [--set KEY=VALUE ...]`.

    moedit convert --from dit DiT-XL-2-256x256.pt --flavor DiT-XL/2 --out ckpts/dit_xl2 --set data.path=/data/in1k
    moedit convert --from diffmoe 0700000.pt --flavor DiffMoE-L-E16 --out ckpts/diffmoe_l_e16
"""

from __future__ import annotations

import argparse

# Spelled out so that `--help` needs no torch (moedit.interop.convert loads it); tests/test_hardening_cli.py
# checks them against moedit.interop.convert.SOURCES and moedit.interop.sources.WEIGHT_CHOICES.
SOURCES = ("dit", "diffmoe", "ditmoe", "diffusers")
WEIGHT_CHOICES = ("both", "ema", "raw")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="SRC", help="checkpoint file (.pt/.pth/.bin/.safetensors) or, with "
                        "--from diffusers, a DiTTransformer2DModel directory")
    parser.add_argument("--from", dest="layout", required=True, choices=SOURCES, help="layout of SRC")
    parser.add_argument("--out", required=True, help="new checkpoint directory to write")
    parser.add_argument("--flavor", default=None, help="moedit flavor SRC was trained as (see `moedit models`)")
    parser.add_argument("--config", default=None, help="training YAML whose sections (data, diffusion, ...) the "
                        "checkpoint's config.yaml should carry; its model.flavor is used unless --flavor is given")
    parser.add_argument("--weights", default="both", choices=WEIGHT_CHOICES,
                        help="training checkpoints: both (default: raw -> model.safetensors, EMA -> ema.safetensors), "
                        "or ema / raw in both files")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="allow arbitrary objects in a pickled SRC (runs code from the file; only for trusted files)")
    parser.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="dotted config overrides, e.g. diffusion.objective=flow "
                        "model.learn_sigma=false data.path=/data/in1k")


def main(args: argparse.Namespace) -> int:
    import json

    import yaml

    from moedit.interop.convert import convert_checkpoint

    out = convert_checkpoint(args.source, args.layout, args.out, flavor=args.flavor, config=args.config,
                             overrides=args.overrides, weights=args.weights, trust_pickle=args.trust_pickle)
    source = json.loads((out / "meta.json").read_text())["source"]
    diffusion = yaml.safe_load((out / "config.yaml").read_text())["diffusion"]
    sampling = {k: diffusion.get(k) for k in ("sampler", "sample_steps", "cfg_scale", "guidance_channels",
                                               "cfg_batching")}
    print(f"architecture assumed: {source['architecture']}")
    print(f"  heads and shape: {source['architecture_check']}")
    print(f"sampling defaults: objective {source['objective']}, "
          + ", ".join(f"{k} {v}" for k, v in sampling.items()) + f" ({source['sampling_defaults_from']})")
    print(f"wrote {out} (moedit checkpoint; `moedit sample {out}` reads it)")
    return 0
