"""Weights between the canonical single-device DiT and the Megatron model.

Three forms of the same weights:
- canonical: `moedit.models.DiT.state_dict()` (what `moedit sample` and the analysis tools read);
- global: Megatron's sharded-state-dict keys (layers by global index, experts stacked (E, ...)),
  full tensors, in Megatron's layouts (fused qkv rows interleaved per head: [q_h, k_h, v_h]);
- local: what one rank's `MegatronDiT` holds, a slice of the global form that the model's own
  `sharded_state_dict()` describes (offsets for TP, EP and the pipeline stage's layers).

canonical <-> global is a renaming plus the row order of the fused projections (self-attention's
qkv, a text model's cross-attention kv: canonical [k (all heads), v], Megatron per head [k_h, v_h]);
non-block modules (embedders, the caption embedder, the final layer, the training-only REPA
projector `repa_projector.fc{1,2,3}.*` on the stage that holds block repa_depth) keep their names,
so canonical checkpoints hold the projector and `strip_training_only` drops it as on one device. global ->
local slices by the offsets Megatron computes, so no layout logic is repeated here.
"""

from __future__ import annotations

import re

import torch
import torch.distributed as dist

from moedit.models.config import ModelConfig

# (canonical suffix inside blocks.i., megatron suffix inside decoder.layers.i.)
_BLOCK_RENAMES = (
    ("attn.qkv.", "self_attention.linear_qkv."),
    ("attn.proj.", "self_attention.linear_proj."),
    ("attn.q_norm.", "self_attention.q_layernorm."),
    ("attn.k_norm.", "self_attention.k_layernorm."),
    ("cross_attn.q.", "cross_attention.linear_q."),
    ("cross_attn.kv.", "cross_attention.linear_kv."),
    ("cross_attn.proj.", "cross_attention.linear_proj."),
    ("cross_attn.q_norm.", "cross_attention.q_layernorm."),
    ("cross_attn.k_norm.", "cross_attention.k_layernorm."),
    ("mlp.fc1.", "mlp.linear_fc1."),
    ("mlp.fc2.", "mlp.linear_fc2."),
    ("mlp.router.", "mlp.router.impl."),
    ("mlp.experts.", "mlp.experts.impl."),
    ("adaLN_modulation.", "adaLN_modulation."),
)


# Fused projections: (canonical prefix, Megatron prefix, parts: q/k/v or k/v)
_FUSED = (("attn.qkv.", "self_attention.linear_qkv.", 3), ("cross_attn.kv.", "cross_attention.linear_kv.", 2))


def _fused_to_megatron(t: torch.Tensor, heads: int, parts: int) -> torch.Tensor:
    """Rows [q (all heads), k, v] -> [per head: q_h, k_h, v_h] (weight (parts*D, D) or bias (parts*D,));
    parts = 2: kv rows [k, v] -> [per head: k_h, v_h]."""
    rest = t.shape[1:]
    return t.reshape(parts, heads, -1, *rest).transpose(0, 1).reshape(t.shape)


def _fused_to_canonical(t: torch.Tensor, heads: int, parts: int) -> torch.Tensor:
    rest = t.shape[1:]
    return t.reshape(heads, parts, -1, *rest).transpose(0, 1).reshape(t.shape)


def _rename_blocks(state: dict[str, torch.Tensor], src: str, dst: str, pairs, reorder) -> dict[str, torch.Tensor]:
    """Keys `{src}.{i}.{a}...` -> `{dst}.{i}.{b}...` for (a, b) in `pairs`, fused rows reordered by
    `reorder(tensor, parts)`; keys outside the blocks keep their names; Megatron's `_extra_state`
    entries are dropped."""
    fused = {prefix: parts for canonical, megatron, parts in _FUSED for prefix in (canonical, megatron)}
    out = {}
    for key, value in state.items():
        if key.endswith("_extra_state"):
            continue
        m = re.match(rf"{re.escape(src)}\.(\d+)\.(.*)", key)
        if m is None:
            out[key] = value
            continue
        index, rest = m.groups()
        for old, new in pairs:
            if rest.startswith(old):
                out[f"{dst}.{index}.{new}{rest[len(old):]}"] = reorder(value, fused[old]) if old in fused else value
                break
        else:
            raise KeyError(f"{key!r} has no counterpart in the {'Megatron' if src == 'blocks' else 'canonical'} model")
    return out


def canonical_to_global(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    return _rename_blocks(state, "blocks", "decoder.layers", _BLOCK_RENAMES,
                          lambda t, parts: _fused_to_megatron(t, cfg.num_heads, parts))


def global_to_canonical(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    return _rename_blocks(state, "decoder.layers", "blocks", [(b, a) for a, b in _BLOCK_RENAMES],
                          lambda t, parts: _fused_to_canonical(t, cfg.num_heads, parts))


def _sharded_tensors(model) -> list:
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    return [sh for sh in model.sharded_state_dict().values() if isinstance(sh, ShardedTensor)]


@torch.no_grad()
def load_global(model, state: dict[str, torch.Tensor]) -> None:
    """Copy this rank's slices of the global-form `state` into `model` (every tensor must be there)."""
    missing = []
    for sh in _sharded_tensors(model):
        if sh.key not in state:
            missing.append(sh.key)
            continue
        full = state[sh.key]
        if tuple(full.shape) != tuple(sh.global_shape[sh.prepend_axis_num:]) and sh.prepend_axis_num == 0:
            raise ValueError(f"{sh.key}: checkpoint shape {tuple(full.shape)} != model shape {tuple(sh.global_shape)}")
        piece = full[_offsets_slice(sh)]
        sh.data.copy_(piece.reshape(sh.data.shape))
    if missing:
        raise KeyError(f"weights missing for {len(missing)} tensors, e.g. {missing[:3]}")


def _offsets_slice(sh) -> tuple[slice, ...]:
    """Slice of the global tensor held by this shard (prepended axes index single positions)."""
    pre = sh.prepend_axis_num
    idx = [slice(o, o + 1) for o in sh.global_offset[:pre]]
    idx += [slice(o, o + n) for o, n in zip(sh.global_offset[pre:], sh.local_shape)]
    return tuple(idx)


def load_canonical(model, state: dict[str, torch.Tensor], cfg: ModelConfig) -> None:
    """This rank's slices of a canonical (single-device) state dict into the Megatron model."""
    load_global(model, canonical_to_global(state, cfg))


def _is_main_replica(sh) -> bool:
    replica = sh.replica_id if isinstance(sh.replica_id, tuple) else (sh.replica_id,)
    return not any(replica)


@torch.no_grad()
def gather_global(model, what: str = "data", group=None, dst: int | None = None) -> dict[str, torch.Tensor]:
    """The full global-form tensors assembled from every rank (`what` = "data" or "grad"; a grad is
    read from `main_grad` under Megatron DDP), as float32 CPU tensors. Collective. With `dst` only that
    global rank assembles them (the others return {}, holding no copy of the model); else every rank.

    Only main replicas travel (replica id all zeros: one copy of each slice, whatever the data-parallel
    size), one tensor at a time: a point-to-point send to `dst`, or a broadcast from its owner. So no
    rank ever holds more than one slice in flight, and nothing is pickled (a 2B-parameter model
    through `gather_object` took minutes and a world-size multiple of its size in memory)."""
    pieces = []  # (key, global shape, index into the global tensor, local tensor)
    for sh in _sharded_tensors(model):
        if not _is_main_replica(sh):
            continue
        tensor = sh.data
        if what == "grad":
            param = _param_of(model, sh.data)
            grad = getattr(param, "main_grad", None) if param is not None else None
            if grad is None and param is not None:
                grad = param.grad
            if grad is None:
                continue
            tensor = grad
        pieces.append((sh.key, tuple(sh.global_shape), _offsets_slice(sh), tensor.detach()))
    if not (dist.is_initialized() and dist.get_world_size(group) > 1):
        return _assemble([(key, shape, index, t.float().cpu()) for key, shape, index, t in pieces])
    me = dist.get_rank()
    ranks = dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))
    metadata = [None] * len(ranks)
    dist.all_gather_object(metadata, [(key, shape, index, tuple(t.shape)) for key, shape, index, t in pieces],
                           group=group)
    nccl = "nccl" in str(dist.get_backend(group))  # "nccl", or a per-device list such as "cpu:gloo,cuda:nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
    received = []
    for owner, owner_pieces in zip(ranks, metadata):
        for i, (key, shape, index, local_shape) in enumerate(owner_pieces):
            if me == owner:
                buffer = pieces[i][3].to(device, torch.float32).contiguous()
            elif dst is None or me == dst:
                buffer = torch.empty(local_shape, dtype=torch.float32, device=device)
            else:
                continue
            if dst is None:
                dist.broadcast(buffer, src=owner, group=group)
            elif owner != dst:
                (dist.send if me == owner else dist.recv)(buffer, owner if me == dst else dst, group=group)
            if dst is None or me == dst:
                received.append((key, shape, index, buffer.cpu()))
    return _assemble(received) if dst is None or me == dst else {}


def _assemble(pieces) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for key, shape, index, tensor in pieces:
        if key not in out:
            out[key] = torch.zeros(shape)
        out[key][index] = tensor.reshape(out[key][index].shape)
    return out


def _param_of(model, tensor: torch.Tensor):
    for p in model.parameters():
        if p is tensor or (p.data_ptr() == tensor.data_ptr() and p.shape == tensor.shape):
            return p
    return None


__all__ = ["canonical_to_global", "gather_global", "global_to_canonical", "load_canonical", "load_global"]
