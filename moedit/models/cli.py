"""`moedit models`: the flavor registry with parameter and FLOP counts.

    moedit models                                  # table of every flavor
    moedit models --json                           # the same, as JSON
    moedit models --flavor DiT-XL/2 input_size=64  # one flavor with dotted overrides
    moedit models --flavor DiffMoE-L-E16-T text_len=77  # a text flavor counted at 77 caption tokens

Text flavors are counted with cross-attention at their `text_len` caption tokens (the `condition`
column: text LxW = L tokens of encoder width W).
"""

from __future__ import annotations

import argparse
import json

COLUMNS = [  # (header, key or function of the info dict, format)
    ("flavor", "flavor", "{}"),
    ("blocks x D", lambda i: f"{i['depth']} x {i['hidden_size']}", "{}"),
    ("heads", "num_heads", "{}"),
    ("p", "patch_size", "{}"),
    ("router", lambda i: i["router"] or "dense", "{}"),
    ("condition", lambda i: f"text {i['text_len']}x{i['text_dim']}" if i["condition"] == "text" else "class", "{}"),
    ("E / act", lambda i: f"{i['num_experts']} / {i['activated_experts']:g}" if i["num_experts"] else "-", "{}"),
    ("params", lambda i: _human(i["total_params"]), "{}"),
    ("activated", lambda i: _human(i["activated_params"]), "{}"),
    ("GFLOPs (DiT)", lambda i: _gflops(i["fwd_gflops_dit"]), "{}"),
    ("GFLOPs (DiT-MoE)", lambda i: _gflops(i["fwd_gflops_ditmoe"]), "{}"),
]


def _gflops(value: float) -> str:
    return f"{value:.2f}" if value >= 0.1 else f"{value:.2g}"


def _human(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--flavor", help="show one flavor (see the table for names)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted overrides of the flavor, e.g. input_size=64 moe.num_experts=8")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def format_table(infos: list[dict]) -> str:
    rows = []
    for info in infos:
        cells = []
        for _, key, fmt in COLUMNS:
            value = key(info) if callable(key) else info[key]
            cells.append(fmt.format(value))
        rows.append(cells)
    headers = [c[0] for c in COLUMNS]
    widths = [max(len(h), *(len(r[j]) for r in rows)) for j, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(r, widths))) for r in rows]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    # imported here: the model zoo loads torch, which `moedit models --help` does not need
    from moedit.models.config import override
    from moedit.models.flavors import FLAVORS, get_flavor
    from moedit.models.flops import model_info

    if args.overrides and not args.flavor:
        raise ValueError("overrides need --flavor NAME (e.g. moedit models --flavor DiT-XL/2 input_size=64)")
    if args.flavor:
        cfg = override(get_flavor(args.flavor), list(args.overrides))
        infos = [model_info(cfg)]
    else:
        infos = [model_info(get_flavor(name)) for name in FLAVORS]
    if args.json:
        print(json.dumps(infos[0] if args.flavor else infos, indent=2))
    else:
        print(format_table(infos))
    return 0
