#!/usr/bin/env python3
"""Parity of the DiT on Megatron-Core with the single-device DiT on GPUs (NCCL): bf16, fp32, autocast.

    torchrun --nproc_per_node 2 scripts/megatron_gpu_parity.py --layouts tp2  # or ep2, pp2, dp2
    torchrun --nproc_per_node 2 scripts/megatron_gpu_parity.py                # all four in one run
    torchrun --nproc_per_node 1 scripts/megatron_gpu_parity.py --layouts one  # TP=EP=PP=1

For each layout, flavor and precision every rank builds the same single-device reference
(`moedit.models.build_model`, one seed; the zero-initialised adaLN/output weights are perturbed so
every path carries signal), loads its slice into the Megatron model, runs one Megatron training
step's forward and backward (Megatron DDP, the layout's schedule - 1F1B with 2 micro-batches for
PP - and finalize_model_grads) and gathers the gradients back into the canonical layout. The
reference (float32, TF32 off) runs every data-parallel replica's micro-batches and averages
their losses (+ weighted auxiliary losses), which is what the Megatron step computes.

Precision of the Megatron side (`--dtypes`, default all three):
- bf16: Megatron's own mixed precision - bf16 parameters through `Float16Module` (it casts the
  first stage's positional inputs to bf16 and the last stage's output back to fp32), gradients
  accumulated and reduced in fp32 (`grad_reduce_in_fp32`), which is what Megatron's bf16 /
  distributed optimizer expects (fp32 master weights live in the optimizer). The timesteps are
  passed as a keyword so Float16Module does not round them to bf16; floating buffers (DiffMoE
  thresholds, noise-bin edges) are kept in fp32. Tolerance 2e-2.
- autocast: float32 parameters and a bf16 `torch.autocast` around the forward (the recipe of
  moedit's ddp engine and of the megatron trainer). Tolerance 2e-2. At TP > 1 (sequence
  parallel) this works because the adaLN layer hands the tensor-parallel linears their autocast
  dtype (Megatron's sequence-parallel backward reduce-scatters the input gradient into a buffer
  of the input's dtype); `--no-autocast-sequence-parallel` skips those rows.
- fp32: the same step in float32 with TF32 off. Tolerance 1e-4: the exact check of the GPU code
  paths (NCCL collectives, CUDA kernels).

Error = max |megatron - reference| / max |reference| per tensor (each output micro-batch, each
canonical gradient); the table shows the worst one and names the gradient.

bf16 baseline: router gradients come out of a softmax Jacobian and a sum over tokens, both
cancelling, so bf16 rounding alone can put them near 2e-2 of their largest entry. Each bf16 and
autocast case therefore also runs the single-device model under bf16 autocast (the ddp engine's
recipe) on the same batches and routing ("1-GPU bf16 grad err"). A tensor passes if its error
is < 2e-2, or at most 2x the single-device bf16 model's error on that tensor - bf16 itself, not
the engine, costs that much; such rows say "PASS (bf16-limited)". fp32 rows have no allowance.

Routing replay (default on): routing is discontinuous. In bf16 the router inputs differ from the
fp32 reference by rounding, so near-tied tokens switch experts, and one switched token moves an
expert's gradient by about 1/K (K tokens per expert). With replay the reference takes the Megatron
model's routing decisions (which tokens each expert processes), computes its own combine weights
from its own scores, and its routing-dependent auxiliary terms (DiffMoE predictor target,
token-choice balance counts) for that selection, so the comparison measures the arithmetic; the
`flips` column counts the assignments (in % of all) the reference's own routing would have chosen
differently. `--no-replay` compares free-running routing.

Rows are printed as they finish (rank 0); exit status 1 if any row fails. A numerical failure is
a row and the run goes on; an exception ends the run at once (the rank that raised may have left
a collective pending on its peers, so nothing after it could be trusted): run one layout per
invocation to keep the others.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import sys
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, for `moedit`

# name -> (tensor, pipeline, expert, world size)
LAYOUTS = {"tp2": (2, 1, 1, 2), "ep2": (1, 1, 2, 2), "pp2": (1, 2, 1, 2), "dp2": (1, 1, 1, 2), "one": (1, 1, 1, 1),
           # issue 12: the pairs on 4 GPUs, all three on 8 (scripts/megatron_3d_check.sh)
           "tp2-ep2": (2, 1, 2, 4), "pp2-ep2": (1, 2, 2, 4), "tp2-pp2": (2, 2, 1, 4), "tp2-pp2-ep2": (2, 2, 2, 8)}
DEFAULT_FLAVORS = ("DiffMoE-S-E16", "tiny-tc", "tiny-dense")
TOLERANCE = {"bf16": 2e-2, "autocast": 2e-2, "fp32": 1e-4}
BASELINE_FACTOR = 2.0  # bf16: a tensor over the tolerance passes within this factor of single-device bf16's error
# precision -> Megatron parameter dtype (autocast: fp32 parameters, bf16 autocast around the forward)
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "autocast": torch.float32}
AUTOCAST_SP_SKIP = "skipped by --no-autocast-sequence-parallel"


@dataclasses.dataclass
class Row:
    layout: str
    flavor: str
    dtype: str
    output_err: float = float("nan")
    grad_err: float = float("nan")
    grad_name: str = ""
    flips: float = float("nan")  # % of routing assignments the reference would have chosen differently
    seconds: float = float("nan")
    baseline_grad_err: float = float("nan")  # bf16: the single-device model's own worst grad error
    within_tolerance: bool = False  # every tensor < tol, or (bf16) <= BASELINE_FACTOR x the baseline's error
    strict: bool = False  # every tensor < tol
    skipped: str = ""
    error: str = ""

    @property
    def passed(self) -> bool:
        return not self.error and (bool(self.skipped) or self.within_tolerance)

    @property
    def verdict(self) -> str:
        if self.error or not self.passed:
            return "FAIL"
        if self.skipped:
            return "SKIP"
        return "PASS" if self.strict else "PASS (bf16-limited)"


# ----- model and data --------------------------------------------------------------------------------
def model_config(flavor: str, depth: int = 4, input_size: int | None = None):
    """The flavor at `depth` blocks, no label dropout, MoE in blocks 1 and 3 (one per PP stage)."""
    from moedit.models import get_flavor

    cfg = get_flavor(flavor)
    changes = {"depth": depth, "class_dropout_prob": 0.0}
    if input_size is not None:
        changes["input_size"] = input_size
    cfg = dataclasses.replace(cfg, **changes)
    if cfg.moe is not None:
        cfg = dataclasses.replace(cfg, moe=dataclasses.replace(cfg.moe, every=2, first=1))
    return cfg


def reference_model(cfg, seed: int, device: torch.device):
    """The single-device DiT from `seed` (built on the CPU: identical on every rank), perturbed."""
    from moedit.models import build_model

    torch.manual_seed(seed)
    ref = build_model(cfg)
    with torch.no_grad():  # leave no zero-init weight: every path must carry signal
        for p in ref.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return ref.to(device).train()


def make_batches(cfg, replicas: int, micro_batch: int, num_micro: int, seed: int, device: torch.device):
    """[replica][micro] -> dict(x, t, y, target): the global batch, identical on every rank."""
    g = torch.Generator().manual_seed(seed + 1)
    s, c = cfg.input_size, cfg.in_channels
    out = []
    for _ in range(replicas):
        micro = []
        for _ in range(num_micro):
            b = dict(x=torch.randn(micro_batch, c, s, s, generator=g), t=torch.rand(micro_batch, generator=g),
                     y=torch.randint(0, max(cfg.num_classes, 1), (micro_batch,), generator=g),
                     target=torch.randn(micro_batch, cfg.out_channels, s, s, generator=g))
            micro.append({k: v.to(device) for k, v in b.items()})
        out.append(micro)
    return out


def wrap_precision(model, config, dtype: torch.dtype):
    """bf16: Megatron's Float16Module (bf16 parameters), float buffers kept in fp32; fp32: as is."""
    if dtype == torch.float32:
        return model
    from moedit.engines.megatron.precision import to_bf16_module

    return to_bf16_module(model, config)


# ----- routing record / replay --------------------------------------------------------------------------
def selection(stats_module, decision) -> torch.Tensor:
    """(S, E) bool: which pool rows each expert processes in a RoutingDecision."""
    S, E = decision.probs.shape
    row_expert = stats_module._row_expert(decision)
    token = decision.token_index
    if decision.valid is not None:
        token, row_expert = token[decision.valid], row_expert[decision.valid]
    sel = torch.zeros(S, E, dtype=torch.bool, device=token.device)
    sel[token, row_expert] = True
    return sel


def replay_supported(moe) -> bool:
    """The combine weight of assignment (token, expert) is probs[token, expert] for these routers."""
    if moe.router in ("diffmoe", "expert_choice"):
        return True
    return moe.router == "token_choice" and moe.score_func == "softmax" and not moe.renormalize


def forced_decision(decision, forced: torch.Tensor, router, x: torch.Tensor):
    """`decision` with the assignments of `forced` (S, E): combine weights from the decision's own
    probs, and the routing-dependent auxiliary terms recomputed for the forced selection (the
    DiffMoE predictor's BCE target, the token-choice balance counts) - as routers.py defines them."""
    import torch.nn.functional as F

    from moedit.models.routers import router_float

    pairs = forced.t().nonzero()  # (N, 2) rows (expert, token), expert-major
    expert, token = pairs[:, 0], pairs[:, 1]
    counts = forced.sum(dim=0).long()  # (E,)
    uniform = bool((counts == counts[0]).all()) and int(counts[0]) > 0
    aux = dict(decision.aux)
    if "predictor" in aux:
        pred_logits = router_float(router.logits(x.detach())[1])  # (S, E), as the model computes them
        aux["predictor"] = F.binary_cross_entropy_with_logits(pred_logits.t(), forced.t().to(pred_logits.dtype))
    if "balance" in aux:
        S, E = forced.shape
        aux["balance"] = (counts.float() * (E / (S * router.cfg.top_k)) * decision.probs.mean(dim=0)).sum()
    return dataclasses.replace(
        decision, token_index=token, weight=decision.probs[token, expert], tokens_per_expert=counts,
        capacity=int(counts[0]) if uniform else None, valid=None, tokens_per_sample=None,
        predictor_hits=decision.predictor_hits if uniform else None, aux=aux)


def record_routing(model, records: list, keep: bool, dp_rank: int) -> None:
    """Wrap each Megatron router's decision so it appends (dp_rank, block, call, selection) to
    `records` (only where `keep`: one tensor-parallel rank; TP ranks decide identically)."""
    for router in model.moe_layers():
        original, calls = router.impl.forward, itertools.count()

        def forward(x, batch_size, _original=original, _router=router, _calls=calls):
            decision = _original(x, batch_size)
            call = next(_calls)
            if keep:
                records.append((dp_rank, _router.block_index, call, selection(_router, decision).cpu()))
            return decision

        router.impl.forward = forward


class Replay:
    """Reference-side routing: forces the recorded Megatron selection (if `enabled`) and counts flips."""

    def __init__(self, ref, enabled: bool):
        self.forced: dict[int, torch.Tensor] = {}
        self.flips = self.assignments = 0
        self.enabled = enabled
        if enabled and not replay_supported(ref.cfg.moe):
            raise ValueError(f"routing replay supports diffmoe, expert_choice and softmax token choice without "
                             f"renormalisation; flavor {ref.cfg.name} has router {ref.cfg.moe.router}: run with "
                             f"--no-replay")
        for layer in ref.moe_layers():
            if enabled:
                # forced_decision takes the combine weights from decision.probs: DiffMoE's fused tail
                # returns them without a gradient (its `weight` output carries it), so the reference
                # side runs the PyTorch tail, whose probs are differentiable
                layer.router.kernel_options = layer.router.kernel_options.replace(fused_router_tail=False)
            original = layer.router.forward

            def forward(x, batch_size, _original=original, _layer=layer):
                decision = _original(x, batch_size)
                forced = self.forced.get(_layer.block_index)
                if forced is None:
                    return decision
                natural = selection(_layer, decision)
                if natural.shape != forced.shape:
                    raise RuntimeError(f"block {_layer.block_index}: reference pool {tuple(natural.shape)} != "
                                       f"Megatron pool {tuple(forced.shape)}")
                self.flips += int((natural & ~forced).sum())
                self.assignments += int(forced.sum())
                return forced_decision(decision, forced, _layer.router, x) if self.enabled else decision

            layer.router.forward = forward


# ----- one layout x flavor x dtype -------------------------------------------------------------------------
def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float().cpu(), b.float().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def init_layout(layout: str, seed: int) -> None:
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    tp, pp, ep, world = LAYOUTS[layout]
    if dist.get_world_size() != world:
        raise ValueError(f"layout {layout} needs {world} ranks; this run has {dist.get_world_size()}: "
                         f"use torchrun --nproc_per_node {world} ... --layouts {layout}")
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                             expert_model_parallel_size=ep, expert_tensor_parallel_size=1)
    model_parallel_cuda_manual_seed(seed)


def megatron_step(cfg, layout: str, precision: str, ref, batches, device: torch.device,
                  micro_batch: int, num_micro: int):
    """One Megatron forward/backward of this rank's replica. Returns (last-stage outputs, canonical
    grads (full, every rank), routing records of every rank)."""
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from moedit.engines.megatron.convert import gather_global, global_to_canonical, load_canonical
    from moedit.engines.megatron.model import build_megatron_model, drop_graph_references, transformer_config

    tp, pp, ep, _ = LAYOUTS[layout]
    dtype = DTYPES[precision]
    config = transformer_config(cfg, tensor=tp, pipeline=pp, expert=ep, sequence_parallel=tp > 1, dtype=dtype,
                                use_cpu_initialization=device.type == "cpu")
    model = build_megatron_model(cfg, config).to(device)
    load_canonical(model, ref.state_dict(), cfg)
    module = wrap_precision(model, config, dtype)
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), module)
    ddp.train()

    dp_rank = parallel_state.get_data_parallel_rank()
    records: list = []
    record_routing(model, records, parallel_state.get_tensor_model_parallel_rank() == 0, dp_rank)
    outputs: list[torch.Tensor] = []

    def forward_step(data_iterator, chunk):
        b = next(data_iterator)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "autocast"):
            out = chunk(b["x"], t=b["t"], y=b["y"])  # t, y by keyword: Float16Module casts positional inputs

        def loss_func(output):
            outputs.append(output.detach().float())
            loss = (output.float() - b["target"]).pow(2).mean()
            return loss, {"loss": loss.detach()}

        return out, loss_func

    get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter(batches[dp_rank]), model=[ddp],
                                num_microbatches=num_micro, seq_length=cfg.num_tokens, micro_batch_size=micro_batch,
                                forward_only=False)
    finalize_model_grads([ddp])
    grads = global_to_canonical(gather_global(model, "grad"), cfg)
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, records)
    decisions = {(r, block, call): sel for rank_records in gathered for r, block, call, sel in rank_records}
    drop_graph_references(model)
    return outputs, grads, decisions


def reference_step(ref, batches, decisions, dp_rank: int, device: torch.device, replay: bool,
                   autocast: bool = False):
    """The single-device model on every replica's micro-batches: mean of loss + weighted aux losses.
    Returns (outputs of replica `dp_rank`, grads, routing flips in % or nan)."""
    state = Replay(ref, replay) if ref.cfg.moe is not None else None
    coefs = ref.aux_loss_coefs()
    total, outputs = 0.0, []
    for r, micro in enumerate(batches):
        for m, b in enumerate(micro):
            if state is not None:
                state.forced = {layer.block_index: decisions[(r, layer.block_index, m)].to(device)
                                for layer in ref.moe_layers()}
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                out = ref(b["x"], b["t"], b["y"]).float()
                aux = ref.aux_losses()
                total = total + (out - b["target"]).pow(2).mean() + sum(coefs[k] * v.float() for k, v in aux.items())
            if r == dp_rank:
                outputs.append(out.detach())
    (total / sum(len(micro) for micro in batches)).backward()
    grads = {k: p.grad.float() for k, p in ref.named_parameters() if p.grad is not None}
    flips = 100.0 * state.flips / state.assignments if state is not None and state.assignments else float("nan")
    return outputs, grads, flips


def _worst(errors: dict[str, float], baseline: dict[str, float] | None, tol: float):
    """(max error, its name, whether every entry is within tol or within 2x the bf16 baseline's)."""
    err, name = max(((e, k) for k, e in errors.items()), key=lambda v: v[0])
    ok = all(e < tol or (baseline is not None and e <= BASELINE_FACTOR * baseline[k]) for k, e in errors.items())
    return err, name, ok


def run_case(layout: str, flavor: str, dtype_name: str, device: torch.device, *, micro_batch: int = 4,
             num_micro: int = 2, seed: int = 0, replay: bool = True, depth: int = 4,
             input_size: int | None = None, autocast_sequence_parallel: bool = False) -> Row:
    """One Megatron step against the reference (model parallel state already initialised for `layout`).
    Returns the same Row on every rank."""
    from megatron.core import parallel_state

    start = time.perf_counter()
    tol = TOLERANCE[dtype_name]
    cfg = model_config(flavor, depth, input_size)
    if LAYOUTS[layout][2] > 1 and cfg.moe is None:
        return Row(layout, flavor, dtype_name, skipped="dense flavor: no experts to split")
    if dtype_name == "autocast" and LAYOUTS[layout][0] > 1 and not autocast_sequence_parallel:
        return Row(layout, flavor, dtype_name, skipped=AUTOCAST_SP_SKIP)
    dp_rank = parallel_state.get_data_parallel_rank()
    batches = make_batches(cfg, parallel_state.get_data_parallel_world_size(), micro_batch, num_micro, seed, device)
    ref = reference_model(cfg, seed, device)
    outputs, grads, decisions = megatron_step(cfg, layout, dtype_name, ref, batches, device, micro_batch, num_micro)
    ref_outputs, ref_grads, flips = reference_step(ref, batches, decisions, dp_rank, device, replay)

    missing = set(grads) ^ set(ref_grads)
    if missing:
        raise RuntimeError(f"gradient keys differ between Megatron and the reference: {sorted(missing)[:6]}")
    grad_errors = {k: relative_error(grads[k], ref_grads[k]) for k in ref_grads}
    out_errors = {str(i): relative_error(o, r) for i, (o, r) in enumerate(zip(outputs, ref_outputs))}
    base_grads = base_out = None
    if dtype_name != "fp32":  # what bf16 costs the single-device model (autocast, the ddp engine's recipe)
        base = reference_model(cfg, seed, device)
        base_outputs, base_grad_tensors, _ = reference_step(base, batches, decisions, dp_rank, device, replay,
                                                            autocast=True)
        base_grads = {k: relative_error(base_grad_tensors[k], ref_grads[k]) for k in ref_grads}
        base_out = {str(i): relative_error(o, r) for i, (o, r) in enumerate(zip(base_outputs, ref_outputs))}
    grad_err, grad_name, grad_ok = _worst(grad_errors, base_grads, tol)
    out_err, _, out_ok = _worst(out_errors, base_out, tol) if out_errors else (0.0, "", True)

    # outputs exist on last-stage ranks only: combine over ranks; at least num_micro must be compared
    worst = torch.tensor([out_err, 0.0 if out_ok else 1.0], dtype=torch.float64, device=device)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    compared = torch.tensor([float(len(outputs))], dtype=torch.float64, device=device)
    dist.all_reduce(compared)
    if compared.item() < num_micro:
        raise RuntimeError(f"only {int(compared.item())} output micro-batches were compared (expected >= {num_micro})")
    base_grad_err = max(base_grads.values()) if base_grads else float("nan")
    return Row(layout, flavor, dtype_name, float(worst[0]), grad_err, grad_name, flips, time.perf_counter() - start,
               baseline_grad_err=base_grad_err, within_tolerance=grad_ok and worst[1].item() == 0.0,
               strict=grad_err < tol and float(worst[0]) < tol)


class Aborted(Exception):
    """A case raised: the ranks' collectives may be out of step, so no further case can run."""

    def __init__(self, rows: list[Row]):
        super().__init__(rows[-1].error)
        self.rows = rows


def run_layout(layout: str, flavors, dtypes, device: torch.device, *, print_rows: bool = False, **kwargs) -> list[Row]:
    """Every precision x flavor at one layout (precision-major: bf16 and fp32 before autocast).
    A numerical failure is a row and the next case runs; an exception ends the layout with
    `Aborted` (a rank that raised mid-step may leave a collective pending on its peers)."""
    from megatron.core import parallel_state

    rows = []
    init_layout(layout, kwargs.get("seed", 0))
    try:
        for dtype_name, flavor in itertools.product(dtypes, flavors):
            try:
                row = run_case(layout, flavor, dtype_name, device, **kwargs)
            except Exception as exc:  # noqa: BLE001 - reported as a failed row, then the run stops
                print(f"[rank {dist.get_rank()}] {layout} {flavor} {dtype_name} failed:\n{traceback.format_exc()}",
                      file=sys.stderr, flush=True)
                rows.append(Row(layout, flavor, dtype_name, error=f"{type(exc).__name__}: {exc}"))
                print(format_row(rows[-1]), flush=True)  # from every rank: the peer may never print
                raise Aborted(rows) from exc
            rows.append(row)
            if print_rows and dist.get_rank() == 0:
                print(format_row(row), flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        parallel_state.destroy_model_parallel()
    return rows


# ----- report ------------------------------------------------------------------------------------------------
HEADER = ("| layout | flavor | dtype | max output rel err | max grad rel err | worst grad | 1-GPU bf16 grad err "
          "| routing flips % | tol | s | result |")


def format_row(row: Row) -> str:
    tol = f"{TOLERANCE[row.dtype]:.0e}"
    if row.error or row.skipped:
        what = f"FAIL: {row.error[:200]}" if row.error else f"SKIP: {row.skipped[:90]}"
        return f"| {row.layout} | {row.flavor} | {row.dtype} | - | - | - | - | - | {tol} | - | {what} |"

    def num(v: float, fmt: str) -> str:
        return "-" if v != v else format(v, fmt)

    return (f"| {row.layout} | {row.flavor} | {row.dtype} | {row.output_err:.2e} | {row.grad_err:.2e} | "
            f"{row.grad_name} | {num(row.baseline_grad_err, '.2e')} | {num(row.flips, '.2f')} | {tol} | "
            f"{row.seconds:.1f} | {row.verdict} |")


def table(rows: list[Row]) -> str:
    return "\n".join([HEADER, "|" + "---|" * (HEADER.count("|") - 1)] + [format_row(r) for r in rows])


# ----- entry point ---------------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layouts", nargs="+", choices=list(LAYOUTS), default=None,
                        help="default: every layout of this world size (2: tp2 ep2 pp2 dp2; 1: one)")
    parser.add_argument("--flavors", nargs="+", default=list(DEFAULT_FLAVORS))
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--depth", type=int, default=4, help="blocks (MoE in 1 and 3)")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--num-micro", type=int, default=2, help="micro-batches per step (every layout)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-replay", action="store_true", help="reference routes on its own (see docstring)")
    parser.add_argument("--no-autocast-sequence-parallel", dest="autocast_sequence_parallel", action="store_false",
                        help="skip autocast at TP > 1 (sequence parallel)")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file (rank 0)")
    parser.add_argument("--timeout", type=float, default=300.0, help="collective timeout in seconds (a hung "
                        "rank ends the run instead of blocking the machine)")
    return parser.parse_args(argv)


def init_distributed(timeout: float) -> torch.device:
    if "RANK" not in os.environ:
        raise SystemExit("run under torchrun: torchrun --nproc_per_node 2 scripts/megatron_gpu_parity.py")
    if not torch.cuda.is_available():
        raise SystemExit("megatron_gpu_parity.py needs CUDA GPUs (the CPU parity is tests/megatron/)")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl", timeout=timedelta(seconds=timeout))
    # the reference is float32: no TF32 anywhere (the fp32 Megatron rows need it off too)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return torch.device("cuda", local_rank)


def main(argv=None, exit_on_abort: bool = True) -> int:
    args = parse_args(argv)
    device = init_distributed(args.timeout)
    world = dist.get_world_size()
    layouts = args.layouts or [name for name, spec in LAYOUTS.items() if spec[3] == world]
    if dist.get_rank() == 0:
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
        print(f"# Megatron DiT parity: {name} x {world}, torch {torch.__version__}, "
              f"layouts {' '.join(layouts)}, micro-batch {args.micro_batch} x {args.num_micro}, "
              f"replay {'off' if args.no_replay else 'on'}", flush=True)
        print(HEADER, flush=True)
    rows: list[Row] = []
    aborted = False
    for layout in layouts:
        try:
            rows += run_layout(layout, args.flavors, args.dtypes, device, print_rows=True,
                               micro_batch=args.micro_batch, num_micro=args.num_micro, seed=args.seed,
                               replay=not args.no_replay, depth=args.depth,
                               autocast_sequence_parallel=args.autocast_sequence_parallel)
        except Aborted as exc:
            rows += exc.rows
            aborted = True
            break
    failed = [r for r in rows if not r.passed]
    if dist.get_rank() == 0 or aborted:
        print(f"\n[rank {dist.get_rank()}]\n" + table(rows))
        skipped = sum(1 for r in rows if r.skipped)
        print(f"\n{len(rows) - len(failed) - skipped} PASS, {skipped} SKIP, {len(failed)} FAIL"
              + (f": {', '.join(f'{r.layout}/{r.flavor}/{r.dtype}' for r in failed)}" if failed else "")
              + ("; stopped at the exception (later cases not run)" if aborted else ""), flush=True)
        if args.json:
            path = Path(args.json) if dist.get_rank() == 0 else Path(f"{args.json}.rank{dist.get_rank()}")
            path.write_text(json.dumps([dataclasses.asdict(r) | {"verdict": r.verdict} for r in rows], indent=1))
    if aborted:
        # no collective: a peer may be waiting in another one. Under torchrun this rank's exit
        # stops the others at once (instead of a collective timeout).
        sys.stdout.flush()
        sys.stderr.flush()
        if exit_on_abort:
            os._exit(1)
        return 1
    any_failed = torch.tensor([float(len(failed))], device=device)
    dist.all_reduce(any_failed, op=dist.ReduceOp.MAX)  # one exit status on every rank
    dist.destroy_process_group()
    return 1 if any_failed.item() > 0 else 0


if __name__ == "__main__":
    sys.exit(main())
