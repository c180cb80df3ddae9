"""Check 2-GPU Megatron training runs of issue 6 from their run directories (prints PASS/FAIL lines).

    python scripts/megatron_train_check.py RUN_DIR --steps 60
    python scripts/megatron_train_check.py --compare RESUMED UNINTERRUPTED --steps 40 --after 20
    python scripts/megatron_train_check.py --compare RUN_A RUN_B --steps 10 --rtol 1e-3

One run: loss falls (mean of the last 3 logged losses < mean of the first 3), the DiffMoE
thresholds are identical across data-parallel ranks at every log (dp/threshold_max_diff == 0
where logged), training reached `--steps`, and the final canonical checkpoint loads as a
single-device model.

--compare: the logged losses and grad norms of both runs at each logged step in (after, steps],
and the canonical model/EMA weights of both step-`steps` checkpoints (float32). With --rtol 0
(default) everything must be bit-identical (a resumed run against an uninterrupted one); else
relative differences up to rtol pass (two optimizers that should agree to rounding).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def check_run(run_dir: Path, steps: int) -> bool:
    rows = _rows(run_dir)
    losses = [r["loss"] for r in rows]
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    spreads = [r["dp/threshold_max_diff"] for r in rows if "dp/threshold_max_diff" in r]
    from moedit.train.checkpoint import list_checkpoints, load_for_inference

    ckpts = [s for s, _ in list_checkpoints(run_dir / "checkpoints")]
    model, _ = load_for_inference(run_dir, use_ema=True)
    checks = {
        "loss falls": last < first,
        "thresholds identical across DP ranks": all(s == 0.0 for s in spreads),
        "reached the last step": rows[-1]["step"] == steps,
        "canonical checkpoint loads": sum(p.numel() for p in model.parameters()) > 0,
    }
    print(f"{run_dir}: logged steps {rows[0]['step']}..{rows[-1]['step']}; loss first3 {first:.4f} last3 {last:.4f}; "
          f"threshold spreads logged {len(spreads)} (max {max(spreads) if spreads else 'n/a'}); checkpoints {ckpts}")
    for r in rows:
        print(f"  step {r['step']:4d} loss {r['loss']:.4f} grad_norm {r.get('grad_norm', 0):.4f} "
              f"img/s {r.get('images_per_s', 0):.0f} mfu {r.get('mfu', 0):.3f} world {r.get('world_size')} "
              f"spread {r.get('dp/threshold_max_diff', '-')}")
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    return all(checks.values())


def _rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(a), abs(b), 1e-12)


def compare_runs(run_a: Path, run_b: Path, steps: int, after: int, rtol: float) -> bool:
    import torch
    from safetensors.torch import load_file

    rows_a = {r["step"]: r for r in _rows(run_a) if after < r["step"] <= steps}
    rows_b = {r["step"]: r for r in _rows(run_b) if after < r["step"] <= steps}
    common = sorted(set(rows_a) & set(rows_b))
    checks = {f"both runs logged steps {after + 1}..{steps} alike": bool(common) and set(rows_a) == set(rows_b)}
    worst = {}
    for key in ("loss", "grad_norm"):
        diffs = [_rel(rows_a[s][key], rows_b[s][key]) for s in common if key in rows_a[s] and key in rows_b[s]]
        worst[key] = max(diffs, default=float("nan"))
        checks[f"{key} per logged step: max relative difference {worst[key]:.3g} <= {rtol:g}"] = \
            bool(diffs) and worst[key] <= rtol
    for s in common:
        a, b = rows_a[s], rows_b[s]
        print(f"  step {s:4d} loss {a['loss']:.6f} {b['loss']:.6f}  grad_norm {a.get('grad_norm', 0):.6f} "
              f"{b.get('grad_norm', 0):.6f}")
    name = f"step_{steps:07d}"
    for weights in ("model", "ema"):
        wa = load_file(str(run_a / "checkpoints" / name / f"{weights}.safetensors"))
        wb = load_file(str(run_b / "checkpoints" / name / f"{weights}.safetensors"))
        dtypes = {v.dtype for v in list(wa.values()) + list(wb.values())}
        same_keys = wa.keys() == wb.keys()
        max_abs = max(((wa[k].double() - wb[k].double()).abs().max().item() for k in wa if k in wb), default=0.0)
        scale = max((wa[k].double().abs().max().item() for k in wa), default=1.0)
        exact = same_keys and all(torch.equal(wa[k], wb[k]) for k in wa)
        checks[f"{weights}.safetensors float32 canonical tensors"] = dtypes == {torch.float32}
        label = "bit-identical" if exact else f"max abs difference {max_abs:.3g} (largest |weight| {scale:.3g})"
        checks[f"{weights} weights at step {steps}: {label}"] = exact if rtol == 0 else (
            same_keys and max_abs <= rtol * scale)
    print(f"compare {run_a} vs {run_b}: steps {after + 1}..{steps}, rtol {rtol:g}")
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    return all(checks.values())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, nargs="?")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--compare", type=Path, nargs=2, metavar=("RUN_A", "RUN_B"))
    parser.add_argument("--after", type=int, default=0, help="--compare: only steps after this one")
    parser.add_argument("--rtol", type=float, default=0.0, help="--compare: 0 = bit-identical")
    args = parser.parse_args()
    if args.compare:
        ok = compare_runs(*args.compare, args.steps, args.after, args.rtol)
    elif args.run_dir is not None:
        ok = check_run(args.run_dir, args.steps)
    else:
        parser.error("give RUN_DIR or --compare RUN_A RUN_B")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
