#!/usr/bin/env python3
"""Per-GPU images/s and MFU of one training step of the DiT on Megatron-Core (bf16).

    python benchmarks/train_step.py --json train_step_1gpu.json                 # one GPU, TP=EP=PP=1
    torchrun --nproc_per_node 2 benchmarks/train_step.py --expert 2 \\
        --baseline-json train_step_1gpu.json                                     # EP=2 (DP=2 for the rest)

One step = forward + backward + optimizer on a fixed synthetic batch of ImageNet-256 latents
(4x32x32, labels, MSE against a random target), so the data loader is not measured. The model
is `moedit.engines.megatron` at the given layout, by default in Megatron's bf16 recipe: bf16
parameters (`Float16Module`), Megatron DDP with gradients accumulated and reduced in fp32
(`--precision autocast`: fp32 parameters under torch.autocast(bf16), the ddp engine's recipe), and

- `--optimizer megatron` (default): Megatron's distributed optimizer (fp32 master weights and
  Adam states sharded over data-parallel ranks, gradient reduce-scatter, parameter all-gather),
  AdamW from torch underneath (Megatron's fallback without Transformer Engine / Apex), switched
  to torch's fused kernel (`--no-fused-adam` keeps torch's foreach kernel); gradient clipping 1.0;
- `--optimizer torch`: fp32 master copies updated by torch.optim.AdamW(fused=True) from the
  DDP's fp32 main grads (all-reduced), then copied into the bf16 parameters; local clipping 1.0.

Weights are N(0, 0.02) (vectors 0), not the adaLN-Zero init: timing does not depend on values,
but an all-zero gate would make the loss trivial. Each model runs `--warmup` steps, then
`--steps` timed steps between CUDA events. A CUDA out-of-memory error during warmup halves the
batch (all ranks agree) and retries.

MFU = achieved model FLOP/s per GPU / the card's dense bf16 peak (989.4 TFLOP/s for an H100 SXM;
`--peak-tflops` for other cards). Model FLOPs per image = 2 x `moedit.models.flops.train_gflops`
(which counts multiply-adds in the DiT paper's convention, training = 3x forward, attention
matmuls included; MoE experts at their training capacity 1).

Targets (issue 6): DiT-XL/2 MFU >= 40%; DiffMoE-L-E8 step time <= 1.25x DiT-L/2 at the same batch;
EP=2 per-GPU throughput of DiffMoE-L-E16 >= 85% of one GPU's (`--baseline-json` = the 1-GPU JSON).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import itertools
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo, for `moedit`

from moedit.engines.megatron.model import drop_graph_references  # noqa: E402
from moedit.engines.megatron.precision import (  # noqa: E402
    FUSED_DEVICES, ddp_config, distributed_optimizer, set_fused_adam, to_bf16_module)

ONE_GPU_MODELS = ("DiT-XL/2", "DiT-L/2", "DiffMoE-L-E8", "DiffMoE-L-E16")
EP_MODELS = ("DiffMoE-L-E16",)
DEFAULT_BATCH = {"DiT-XL/2": 192, "DiT-L/2": 128, "DiffMoE-L-E8": 128, "DiffMoE-L-E16": 64}
FALLBACK_BATCH = 64
MIN_BATCH = 4
TARGETS = {"xl_mfu": 0.40, "e8_over_dense": 1.25, "ep_efficiency": 0.85}


@dataclasses.dataclass
class Result:
    model: str
    gpus: int
    layout: str
    batch_per_gpu: int
    optimizer: str
    precision: str = "bf16"
    step_ms: float = float("nan")
    images_per_s_per_gpu: float = float("nan")
    tflops_per_gpu: float = float("nan")
    mfu: float = float("nan")
    train_gflop_per_image: float = float("nan")  # FLOPs (2 x multiply-adds), forward + backward
    peak_mem_gib: float = float("nan")
    loss: float = float("nan")
    window_ms: list = dataclasses.field(default_factory=list)  # per timed window (--repeat); step_ms is their median
    note: str = ""
    error: str = ""


# ----- setup -------------------------------------------------------------------------------------------
def peak_tflops(device: torch.device, override: float | None) -> float | None:
    """Dense bf16 peak of the card in TFLOP/s (None where unknown)."""
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device).upper()
    if "H100" in name or "H200" in name or "GH200" in name:
        if "PCIE" in name:
            return 756.0
        if "NVL" in name:
            return 835.0
        return 989.4
    if "A100" in name:
        return 312.0
    return None


def init_distributed(timeout: float) -> torch.device:
    """NCCL from torchrun's environment, or a 1-rank group for a plain `python` run."""
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/train_step.py needs a CUDA GPU")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local_rank)
    if "RANK" in os.environ:
        dist.init_process_group("nccl", timeout=datetime.timedelta(seconds=timeout))
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                                timeout=datetime.timedelta(seconds=timeout))
    return torch.device("cuda", local_rank)


def model_config(name: str):
    from moedit.models import get_flavor

    return get_flavor(name)  # the benchmark's flavors default to ImageNet-256 latents (32x32x4)


@torch.no_grad()
def init_weights(model: torch.nn.Module) -> None:
    """N(0, 0.02) matrices, zero vectors (norm scales 1); the frozen position embedding stays."""
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.dim() >= 2:
            p.normal_(0.0, 0.02)
        elif name.endswith("norm.weight"):
            p.fill_(1.0)
        else:
            p.zero_()


class TorchAdam:
    """torch AdamW on fp32 master weights (copies of bf16 parameters, or the fp32 parameters
    themselves) from the DDP's fp32 main grads; bf16 parameters get the updated masters copied in."""

    def __init__(self, params: list[torch.nn.Parameter], lr: float, fused: bool):
        self.params = params
        self.copies = any(p.dtype != torch.float32 for p in params)  # fp32 parameters are their own masters
        self.masters = [p.detach().float().clone() for p in params] if self.copies else params
        self.optimizer = torch.optim.AdamW(self.masters, lr=lr, weight_decay=0.0, fused=fused or None)

    def zero_grad(self) -> None:
        for m in self.masters:
            m.grad = None

    @torch.no_grad()
    def step(self) -> None:
        for m, p in zip(self.masters, self.params):
            m.grad = p.main_grad  # fp32, already reduced over data-parallel ranks
        torch.nn.utils.clip_grad_norm_(self.masters, 1.0)
        self.optimizer.step()
        if self.copies:
            torch._foreach_copy_(self.params, self.masters)


@dataclasses.dataclass
class Setup:
    cfg: object
    model: torch.nn.Module
    ddp: torch.nn.Module
    optimizer: object
    autocast: bool = False  # fp32 parameters, forward under torch.autocast(bf16)


def build(name: str, expert: int, optimizer_kind: str, device: torch.device, args) -> Setup:
    from megatron.core.distributed import DistributedDataParallel

    from moedit.engines.megatron.model import build_megatron_model, transformer_config

    cfg = model_config(name)
    if expert > 1 and (cfg.moe is None or cfg.moe.num_experts % expert):
        raise ValueError(f"{name}: --expert {expert} needs an MoE flavor with experts divisible by {expert}")
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    config = transformer_config(cfg, expert=expert, dtype=dtype, use_cpu_initialization=device.type == "cpu")
    model = build_megatron_model(cfg, config).to(device)
    init_weights(model)
    module = to_bf16_module(model, config) if args.precision == "bf16" else model
    distributed = optimizer_kind == "megatron"
    ddp = DistributedDataParallel(config, ddp_config(distributed, args.overlap_grad_reduce), module)
    ddp.train()
    if distributed:  # the trainer's (parallel.megatron_optimizer = distributed), weight decay 0
        optimizer = distributed_optimizer(ddp, lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, clip_grad=1.0,
                                          bf16=dtype == torch.bfloat16, fused=args.fused_adam)
    else:
        params = [p for p in ddp.parameters() if p.requires_grad]
        optimizer = TorchAdam(params, 1e-4, fused=args.fused_adam and device.type in FUSED_DEVICES)
    return Setup(cfg, model, ddp, optimizer, autocast=args.precision == "autocast")


def ablate(names: list[str]) -> None:
    """Install moedit's fast paths for Megatron except the named ones (for A/B runs): the foreach
    grad norm / clip kernels (as the trainer does) and the TP=1 paths of moedit/engines/megatron/model.py."""
    from megatron.core.tensor_parallel import ColumnParallelLinear

    from moedit.engines.megatron import model as mm

    if "foreach" not in names:
        from moedit.engines.megatron.foreach import install_foreach_kernels

        install_foreach_kernels()
    if "multi-kernel" in names:
        mm.COMPILE_OPTIONS.clear()
    if "local-linear" in names:
        mm.LocalColumnLinear.forward = ColumnParallelLinear.forward
    if "local-moe" in names:
        init = mm.DiTMoELayer.__init__

        def no_local(self, *a, **k):
            init(self, *a, **k)
            self.local_path = False

        mm.DiTMoELayer.__init__ = no_local


def synthetic_batch(cfg, batch: int, device: torch.device, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(seed)
    s, c = cfg.input_size, cfg.in_channels
    b = dict(x=torch.randn(batch, c, s, s, generator=g), t=torch.rand(batch, generator=g),
             y=torch.randint(0, max(cfg.num_classes, 1), (batch,), generator=g),
             target=torch.randn(batch, cfg.out_channels, s, s, generator=g))
    return {k: v.to(device) for k, v in b.items()}


# ----- the step ----------------------------------------------------------------------------------------------
def train_step(setup: Setup, batch: dict[str, torch.Tensor], losses: list) -> None:
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    B = batch["x"].shape[0]

    def forward_step(data_iterator, chunk):
        b = next(data_iterator)
        with torch.autocast(b["x"].device.type, dtype=torch.bfloat16, enabled=setup.autocast):
            out = chunk(b["x"], t=b["t"], y=b["y"])  # t, y by keyword: Float16Module casts positional inputs

        def loss_func(output):
            loss = (output.float() - b["target"]).pow(2).mean()
            losses.append(loss.detach())
            return loss, {"loss": loss.detach()}

        return out, loss_func

    setup.ddp.zero_grad_buffer()
    setup.optimizer.zero_grad()
    get_forward_backward_func()(forward_step_func=forward_step, data_iterator=itertools.repeat(batch),
                                model=[setup.ddp], num_microbatches=1, seq_length=setup.cfg.num_tokens,
                                micro_batch_size=B, forward_only=False)
    finalize_model_grads([setup.ddp])
    setup.optimizer.step()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _any_rank(flag: bool, device: torch.device) -> bool:
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def _release(setup: Setup | None, device: torch.device) -> None:
    if setup is not None:
        setup.ddp.zero_grad_buffer()
        setup.optimizer.zero_grad()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def warmup(setup: Setup, batch_size: int, steps: int, device: torch.device, seed: int, args) -> tuple[int, dict]:
    """Warm up at `batch_size`, halving on CUDA OOM (decided jointly over ranks). Returns the batch
    size that ran and its batch."""
    while True:
        oom = False
        batch = None
        try:
            batch = synthetic_batch(setup.cfg, batch_size, device, seed)
            for i in range(steps):
                try:
                    train_step(setup, batch, [])
                except torch.cuda.OutOfMemoryError:
                    raise
                except Exception:  # the fused-kernel switch is the one untested-by-Megatron piece: fall back
                    if not (i == 0 and args.optimizer == "megatron" and args.fused_adam):
                        raise
                    set_fused_adam(setup.optimizer, False)
                    args.fused_adam = False
                    print(f"[rank {dist.get_rank()}] the first step failed with fused AdamW; retrying with torch's "
                          f"foreach AdamW (--no-fused-adam)", file=sys.stderr, flush=True)
                    train_step(setup, batch, [])
        except torch.cuda.OutOfMemoryError:
            oom = True
        if not _any_rank(oom, device):
            return batch_size, batch
        del batch
        _release(setup, device)
        if batch_size // 2 < MIN_BATCH:
            raise RuntimeError(f"{setup.cfg.name}: out of memory even at batch {batch_size}")
        if dist.get_rank() == 0:
            print(f"  {setup.cfg.name}: out of memory at batch {batch_size}/GPU; trying {batch_size // 2}", flush=True)
        batch_size //= 2


def print_profile(name: str, setup: Setup, batch: dict[str, torch.Tensor], losses: list, steps: int = 3) -> None:
    """GPU time per step of the top kernels (and their share) over `steps` profiled steps."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            train_step(setup, batch, losses)
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    total = sum(e.self_device_time_total for e in events)
    print(f"## profile {name}: {total / steps / 1000:.1f} ms of kernels per step", flush=True)
    for e in sorted(events, key=lambda e: -e.self_device_time_total)[:25]:
        print(f"  {e.self_device_time_total / steps / 1000:8.2f} ms {100 * e.self_device_time_total / total:5.1f}%"
              f" x{e.count // steps:<5d} {e.key[:110]}", flush=True)


def measure(name: str, batch_size: int, args, device: torch.device) -> Result:
    from moedit.models.flops import train_gflops

    world, expert = dist.get_world_size(), args.expert
    layout = f"EP={expert} DP={world}" if expert > 1 else (f"DP={world}" if world > 1 else "TP=EP=PP=1")
    setup = None
    result = Result(name, world, layout, batch_size, args.optimizer, args.precision)
    try:
        setup = build(name, expert, args.optimizer, device, args)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        batch_size, batch = warmup(setup, batch_size, args.warmup, device, args.seed + dist.get_rank(), args)
        result.batch_per_gpu = batch_size
        losses: list = []
        _synchronize(device)
        dist.barrier()
        windows = []
        for _ in range(args.repeat):  # the median of `repeat` windows of `steps` steps
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(args.steps):
                    train_step(setup, batch, losses)
                end.record()
                end.synchronize()
                windows.append(start.elapsed_time(end) / args.steps)
            else:
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    train_step(setup, batch, losses)
                windows.append(1000 * (time.perf_counter() - t0) / args.steps)
        step_ms = statistics.median(windows)
        result.window_ms = [round(w, 2) for w in windows]
        if args.profile and device.type == "cuda" and dist.get_rank() == 0:
            print_profile(name, setup, batch, losses)
        # the slowest rank sets the pace of a synchronous step
        slowest = torch.tensor([step_ms], device=device, dtype=torch.float64)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        result.step_ms = float(slowest.item())
        result.images_per_s_per_gpu = batch_size / (result.step_ms / 1000)
        result.train_gflop_per_image = 2 * train_gflops(setup.cfg, "dit")  # multiply-adds -> FLOPs
        result.tflops_per_gpu = result.images_per_s_per_gpu * result.train_gflop_per_image / 1000
        peak = peak_tflops(device, args.peak_tflops)
        result.mfu = result.tflops_per_gpu / peak if peak else float("nan")
        result.loss = float(losses[-1]) if losses else float("nan")
        if device.type == "cuda":
            result.peak_mem_gib = torch.cuda.max_memory_allocated(device) / 2**30
    except Exception as exc:  # noqa: BLE001 - reported in the table; the next model runs
        import traceback

        result.error = f"{type(exc).__name__}: {exc}"
        print(f"[rank {dist.get_rank()}] {name} failed:\n{traceback.format_exc()}", file=sys.stderr, flush=True)
    finally:
        if setup is not None:
            drop_graph_references(setup.model)
            del setup
        _release(None, device)
    return result


# ----- report ---------------------------------------------------------------------------------------------------
HEADER = ("| model | GPUs | layout | batch/GPU | step ms | img/s/GPU | TFLOP/s/GPU | MFU | peak GiB "
          "| optimizer, precision | loss |")


def format_row(r: Result) -> str:
    if r.error:
        return f"| {r.model} | {r.gpus} | {r.layout} | {r.batch_per_gpu} | FAILED: {r.error[:200]} | | | | | | |"

    def num(v: float, fmt: str) -> str:
        return "-" if v != v else format(v, fmt)

    return (f"| {r.model}{' (' + r.note + ')' if r.note else ''} | {r.gpus} | {r.layout} | {r.batch_per_gpu} | "
            f"{r.step_ms:.1f} | {r.images_per_s_per_gpu:.1f} | {r.tflops_per_gpu:.1f} | {num(100 * r.mfu, '.1f')}% | "
            f"{num(r.peak_mem_gib, '.1f')} | {r.optimizer}, {r.precision} | {num(r.loss, '.3f')} |")


def targets(results: list[Result], baseline: list[dict] | None) -> dict:
    """The issue's three targets from these rows (and the 1-GPU baseline for EP)."""
    ok = {r.model + ("@" + r.note if r.note else ""): r for r in results if not r.error}
    out = {}
    xl = ok.get("DiT-XL/2")
    if xl and xl.mfu == xl.mfu:
        out["DiT-XL/2 MFU"] = {"value": xl.mfu, "target": f">= {TARGETS['xl_mfu']:.0%}",
                               "met": xl.mfu >= TARGETS["xl_mfu"]}
    e8 = ok.get("DiffMoE-L-E8")
    if e8:
        dense = next((r for r in results
                      if not r.error and r.model == "DiT-L/2" and r.batch_per_gpu == e8.batch_per_gpu), None)
        if dense:
            ratio = e8.step_ms / dense.step_ms
            out["DiffMoE-L-E8 / DiT-L/2 step time"] = {"value": ratio, "batch": e8.batch_per_gpu,
                                                       "target": f"<= {TARGETS['e8_over_dense']}",
                                                       "met": ratio <= TARGETS["e8_over_dense"]}
    if baseline:
        for r in results:
            if r.error or r.gpus == 1:
                continue
            base = next((b for b in baseline if b["model"] == r.model and not b.get("error") and b["gpus"] == 1
                         and not b.get("note") and b.get("precision", "bf16") == r.precision), None)
            if base:
                ratio = r.images_per_s_per_gpu / base["images_per_s_per_gpu"]
                same = base["batch_per_gpu"] == r.batch_per_gpu
                out[f"{r.model} {r.layout} per-GPU throughput / 1 GPU"] = {
                    "value": ratio, "batch": r.batch_per_gpu, "baseline_batch": base["batch_per_gpu"],
                    "target": f">= {TARGETS['ep_efficiency']:.0%}" + ("" if same else " (batches differ)"),
                    "met": ratio >= TARGETS["ep_efficiency"]}
    return out


def format_targets(found: dict) -> str:
    lines = []
    for name, t in found.items():
        value = f"{t['value']:.1%}" if "MFU" in name or "throughput" in name else f"{t['value']:.3f}"
        lines.append(f"- {name}: {value} (target {t['target']}): {'met' if t['met'] else 'NOT met'}")
    return "\n".join(lines) if lines else "- (no target computable from these rows)"


# ----- entry point ---------------------------------------------------------------------------------------------------
def parse_batch(text: str | None) -> dict[str, int]:
    """'128' (every model) or 'DiT-XL/2=128,DiffMoE-L-E16=64' (per model, others by default)."""
    if text is None:
        return dict(DEFAULT_BATCH)
    if "=" not in text:
        return {"*": int(text)}
    out = dict(DEFAULT_BATCH)
    for item in text.split(","):
        name, _, value = item.partition("=")
        out[name.strip()] = int(value)
    return out


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=None,
                        help=f"default: {' '.join(ONE_GPU_MODELS)} (with --expert > 1: {' '.join(EP_MODELS)})")
    parser.add_argument("--batch", default=None, help="per-GPU batch: N for all, or MODEL=N,MODEL=N (default "
                        + ", ".join(f"{k}={v}" for k, v in DEFAULT_BATCH.items())
                        + "; with --baseline-json the baseline's batch)")
    parser.add_argument("--expert", type=int, default=1, help="expert-parallel size (world size must divide by it)")
    parser.add_argument("--optimizer", choices=("megatron", "torch"), default="megatron")
    parser.add_argument("--precision", choices=("bf16", "autocast"), default="bf16",
                        help="bf16: bf16 parameters (Float16Module), Megatron's recipe; autocast: fp32 parameters "
                        "under torch.autocast(bf16), the ddp engine's recipe")
    parser.add_argument("--no-fused-adam", dest="fused_adam", action="store_false",
                        help="torch's foreach AdamW instead of the fused kernel")
    parser.add_argument("--overlap-grad-reduce", dest="overlap_grad_reduce", action="store_true", default=None,
                        help="overlap the DDP gradient reduction with backward (default: on with > 1 GPU)")
    parser.add_argument("--no-overlap-grad-reduce", dest="overlap_grad_reduce", action="store_false")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per window")
    parser.add_argument("--repeat", type=int, default=1, help="timed windows per model; step time = their median")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (>= 2: Adam states allocate "
                        "in the first step)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sdpa", choices=("auto", "cudnn", "flash", "efficient"), default="auto",
                        help="restrict F.scaled_dot_product_attention to one backend (default: PyTorch's choice)")
    parser.add_argument("--ablate", nargs="*", default=[], choices=("foreach", "multi-kernel", "local-linear", "local-moe"),
                        help="switch off, for comparison: foreach (moedit's foreach grad norm / clip scaling for "
                        "Megatron without Apex or TE), multi-kernel (inductor's one-pass choice for the adaLN "
                        "LayerNorm), local-linear (F.linear for column linears at TP=1), local-moe (the "
                        "model zoo's dispatch/combine at EP=TP=1, i.e. use Megatron's token dispatcher)")
    parser.add_argument("--profile", action="store_true", help="print the top GPU kernels of 3 extra steps (rank 0)")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the card if unknown")
    parser.add_argument("--json", default=None, help="write the rows and targets here (rank 0)")
    parser.add_argument("--baseline-json", default=None, help="a 1-GPU run's --json, for the EP=N ratio")
    parser.add_argument("--timeout", type=float, default=300.0, help="collective timeout in seconds")
    args = parser.parse_args(argv)
    if args.warmup < 2:
        parser.error("--warmup must be >= 2 (the first optimizer step allocates the Adam states)")
    return args


def main(argv=None, device: torch.device | None = None) -> int:
    args = parse_args(argv)
    if device is None:
        device = init_distributed(args.timeout)
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    world, rank = dist.get_world_size(), dist.get_rank()
    if world % args.expert:
        raise SystemExit(f"--expert {args.expert} must divide the world size {world}")
    if args.overlap_grad_reduce is None:
        args.overlap_grad_reduce = world > 1
    parallel_state.initialize_model_parallel(expert_model_parallel_size=args.expert, expert_tensor_parallel_size=1)
    model_parallel_cuda_manual_seed(args.seed)

    baseline = json.loads(Path(args.baseline_json).read_text())["rows"] if args.baseline_json else None
    models = args.models or list(EP_MODELS if args.expert > 1 else ONE_GPU_MODELS)
    batches = parse_batch(args.batch)
    if baseline and args.batch is None:  # compare at the baseline's per-GPU batch
        batches.update({b["model"]: b["batch_per_gpu"] for b in baseline if not b.get("error") and not b.get("note")
                        and b.get("precision", "bf16") == args.precision})
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    if rank == 0:
        import megatron.core

        print(f"# train step: {device_name} x {world}, torch {torch.__version__}, megatron-core "
              f"{megatron.core.__version__}, {args.precision}, optimizer {args.optimizer}"
              f"{' (fused AdamW)' if args.fused_adam else ''}, "
              f"overlap_grad_reduce {args.overlap_grad_reduce}, sdpa {args.sdpa}, "
              f"ablated {','.join(args.ablate) or 'none'}, {args.warmup} warmup + {args.repeat} x {args.steps} timed steps (median window)",
              flush=True)
    ablate(args.ablate)
    if args.sdpa != "auto":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                   "efficient": SDPBackend.EFFICIENT_ATTENTION}[args.sdpa]
        sdpa_kernel([backend]).__enter__()  # for the whole run
    results: list[Result] = []
    for name in models:
        result = measure(name, batches.get(name, batches.get("*", FALLBACK_BATCH)), args, device)
        results.append(result)
        if rank == 0:
            print(format_row(result), flush=True)
    # the E8 / dense ratio needs both at one batch: rerun DiT-L/2 at E8's batch if OOM halving split them
    e8 = next((r for r in results if r.model == "DiffMoE-L-E8" and not r.error), None)
    if e8 and any(r.model == "DiT-L/2" for r in results) and not any(
            r.model == "DiT-L/2" and r.batch_per_gpu == e8.batch_per_gpu for r in results if not r.error):
        extra = measure("DiT-L/2", e8.batch_per_gpu, args, device)
        extra.note = "at DiffMoE-L-E8's batch"
        results.append(extra)
        if rank == 0:
            print(format_row(extra), flush=True)
    found = targets(results, baseline)
    if rank == 0:
        print("\n" + "\n".join([HEADER, "|" + "---|" * (HEADER.count("|") - 1)] + [format_row(r) for r in results]))
        print("\n" + format_targets(found), flush=True)
        if args.json:
            record = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                      "device": device_name, "world": world, "expert": args.expert, "torch": torch.__version__,
                      "command": " ".join(sys.argv), "optimizer": args.optimizer, "fused_adam": args.fused_adam,
                      "precision": args.precision, "sdpa": args.sdpa, "ablate": args.ablate,
                      "overlap_grad_reduce": args.overlap_grad_reduce,
                      "rows": [dataclasses.asdict(r) for r in results], "targets": found}
            Path(args.json).write_text(json.dumps(record, indent=1))
    failed = torch.tensor([float(sum(1 for r in results if r.error))], device=device)
    dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()
    return 1 if failed.item() > 0 else 0


if __name__ == "__main__":
    sys.exit(main())
