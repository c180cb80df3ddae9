"""Map official state dicts (facebookresearch/DiT, DiffMoE, DiT-MoE) onto moedit's names.

DiT checkpoints load as they are. MoE checkpoints need two changes: router tensors move under
`mlp.router.`, and per-expert Linear weights (`experts.<i>.<proj>.weight`) are stacked into
moedit's batched `experts.<proj>_weight` (E, out, in). DiffMoE's `ema_decay` buffer is dropped
(the decay lives in MoEConfig.threshold_decay).
"""

from __future__ import annotations

import re
from collections import defaultdict

import torch

_RENAMES = [  # (pattern, replacement) applied in order to each key
    (re.compile(r"^(blocks\.\d+)\.moe\."), r"\1.mlp."),  # DiT-MoE calls its FFN `moe`
    (re.compile(r"^(blocks\.\d+\.mlp)\.gate_weight$"), r"\1.router.gate.weight"),  # DiffMoE
    (re.compile(r"^(blocks\.\d+\.mlp)\.gate\.weight$"), r"\1.router.gate.weight"),  # DiT-MoE
    (re.compile(r"^(blocks\.\d+\.mlp)\.(capacity_predictor\..*|expert_threshold)$"), r"\1.router.\2"),
]
_EXPERT = re.compile(r"^(blocks\.\d+\.mlp\.experts)\.(\d+)\.(\w+)\.(weight|bias)$")
_DROP = re.compile(r"^blocks\.\d+\.mlp\.ema_decay$")


def convert_official_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An official DiT / DiffMoE / DiT-MoE state dict in moedit's naming (tensors are not copied
    except where experts are stacked)."""
    out: dict[str, torch.Tensor] = {}
    experts: dict[str, dict[int, torch.Tensor]] = defaultdict(dict)
    for key, value in state.items():
        if _DROP.match(key):
            continue
        for pattern, repl in _RENAMES:
            key = pattern.sub(repl, key)
        match = _EXPERT.match(key)
        if match:
            prefix, index, proj, kind = match.groups()
            experts[f"{prefix}.{proj}_{kind}"][int(index)] = value
        else:
            out[key] = value
    for key, per_expert in experts.items():
        if sorted(per_expert) != list(range(len(per_expert))):
            raise ValueError(f"state dict: experts of {key} are not numbered 0..{len(per_expert) - 1}")
        out[key] = torch.stack([per_expert[i] for i in range(len(per_expert))])
    return out
