"""DiffMoE's selection step alone: ways to take the top-K of S scores for 2E rows (H100 timing aid).

    python benchmarks/topk_variants.py   # CUDA; prints microseconds per call from CUDA-graph replays
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, for `moedit`

from moedit.models.kernels.cuda_graph import replay_time_us  # noqa: E402


def main() -> None:
    torch.manual_seed(0)
    for E in (8, 16):
        S = 8192
        K = S // E
        probs = torch.randn(S, E, device="cuda").softmax(-1)
        pred = torch.rand(S, E, device="cuda")
        stacked_t = torch.cat([probs, pred], 1).t().contiguous()
        variants = {
            "cat.t().topk(sorted=False) [current]": lambda: torch.cat([probs, pred], 1).t().topk(
                K, dim=1, sorted=False),
            "cat.t().contiguous().topk(sorted=False)": lambda: torch.cat([probs, pred], 1).t().contiguous().topk(
                K, dim=1, sorted=False),
            "topk only (contiguous input)": lambda: stacked_t.topk(K, dim=1, sorted=False),
            "topk sorted (contiguous input)": lambda: stacked_t.topk(K, dim=1, sorted=True),
            "sort(descending)[:, :K] (contiguous input)": lambda: stacked_t.sort(dim=1, descending=True),
            "probs.t().topk + pred kthvalue": lambda: (probs.t().topk(K, dim=1, sorted=False),
                                                       pred.t().kthvalue(S - K + 1, dim=1)),
        }
        ref = stacked_t.topk(K, dim=1, sorted=True).values
        for name, fn in variants.items():
            print(f"E={E:2d} K={K:4d} {name:45s} {replay_time_us(fn, iters=200):8.1f} us")
        s = stacked_t.sort(dim=1, descending=True).values[:, :K]
        assert torch.equal(s, ref)


if __name__ == "__main__":
    main()
