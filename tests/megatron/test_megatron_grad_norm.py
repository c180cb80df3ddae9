"""The Megatron trainer's gradient norm equals the single-device gradient norm (issue 6): float32,
1e-5 relative, at TP=2, EP=2, PP=2 and DP=2 (2 gloo ranks each).

Each rank loads its slice of the single-device weights, runs one Megatron step's forward and
backward (Megatron DDP, the pipeline schedule, finalize_model_grads) on the parity test's
micro-batches and computes the norm with the trainer's own `owned_params` / `global_grad_norm`.
The reference is the norm of the single-device gradients of the same loss: the mean over every
data-parallel replica's micro-batches, so at DP=2 (and EP=2, which is carved out of the
data-parallel ranks) it is the norm of the averaged gradient. Counting a replicated shard twice
(a TP copy, a pipeline-shared embedder, a data-parallel copy) makes the norm too large.
"""

from __future__ import annotations

import math

import pytest

pytest.importorskip("megatron.core")
pytest.importorskip("psutil")

import torch  # noqa: E402

from harness import init_model_parallel, run_distributed  # noqa: E402
from test_megatron_model import MICRO_BATCH, NUM_MICRO, _batches, _config, _reference  # noqa: E402


def _grad_norm_worker(rank, world_size, layouts, seed):
    """{layout: (norm, single-device norm)}: the layouts one after another in the same processes
    (importing Megatron costs more than a step)."""
    from megatron.core import parallel_state

    out = {}
    for name, (tp, pp, ep) in layouts.items():
        out[name] = _grad_norms(tp, pp, ep, seed)
        parallel_state.destroy_model_parallel()
    return out


def _grad_norms(tp, pp, ep, seed):
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from moedit.engines.megatron.convert import load_canonical
    from moedit.engines.megatron.model import build_megatron_model, transformer_config
    from moedit.engines.megatron.engine import global_grad_norm, owned_params

    init_model_parallel(tp=tp, pp=pp, ep=ep)
    cfg = _config("tiny-diffmoe")
    ref = _reference(cfg, seed)
    config = transformer_config(cfg, tensor=tp, pipeline=pp, expert=ep, sequence_parallel=tp > 1,
                                use_cpu_initialization=True)
    model = build_megatron_model(cfg, config)
    load_canonical(model, ref.state_dict(), cfg)
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
    ddp.train()

    batches = _batches(cfg, parallel_state.get_data_parallel_world_size(), seed)

    def forward_step(data_iterator, module):
        b = next(data_iterator)
        out = module(b["x"], b["t"], **b["cond"])
        return out, lambda output: ((output - b["target"]).pow(2).mean(), {})

    get_forward_backward_func()(forward_step_func=forward_step,
                                data_iterator=iter(batches[parallel_state.get_data_parallel_rank()]), model=[ddp],
                                num_microbatches=NUM_MICRO, seq_length=cfg.num_tokens, micro_batch_size=MICRO_BATCH,
                                forward_only=False)
    finalize_model_grads([ddp])
    # as MegatronEngine.optimizer_step: the reduced float32 main_grad is the gradient it norms
    norm = global_grad_norm([p.main_grad for p in owned_params(model)], torch.device("cpu"))

    # single-device reference: mean over replicas and micro-batches of loss + weighted aux losses
    coefs = ref.aux_loss_coefs()
    total = 0.0
    for micro in batches:
        for b in micro:
            out = ref(b["x"], b["t"], **b["cond"])
            aux = ref.aux_losses()
            total = total + (out - b["target"]).pow(2).mean() + sum(coefs[k] * v for k, v in aux.items())
    (total / (len(batches) * NUM_MICRO)).backward()
    ref_norm = torch.stack([p.grad.double().pow(2).sum() for p in ref.parameters() if p.grad is not None]).sum().sqrt()
    return float(norm), float(ref_norm)


# layout -> (TP, PP, EP); 2 ranks each, EP is carved out of the data-parallel ranks
LAYOUTS = {"tp2": (2, 1, 1), "ep2": (1, 1, 2), "pp2": (1, 2, 1), "dp2": (1, 1, 1)}


def test_megatron_grad_norm_matches_single_device():
    results = run_distributed(_grad_norm_worker, 2, LAYOUTS, 0, timeout=240)
    wrong = []
    for layout in LAYOUTS:
        ref_norm = results[0][layout][1]
        assert ref_norm > 0 and all(r[layout][1] == ref_norm for r in results)
        for rank, r in enumerate(results):  # all-reduced: every rank reports the global norm
            if not math.isclose(r[layout][0], ref_norm, rel_tol=1e-5):
                wrong.append(f"{layout} rank {rank}: {r[layout][0]:.9g} != single-device {ref_norm:.9g}")
    assert not wrong, "; ".join(wrong)
