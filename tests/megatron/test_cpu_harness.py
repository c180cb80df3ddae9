"""The CPU harness runs Megatron-Core's own TP, EP (alltoall MoE), PP (1F1B) and dist_checkpointing
on gloo processes, and each matches an unsplit single-process reference.

Runtime: about 5 s per test on 2 idle cores (spawn + importing Megatron dominates); the
dist_checkpointing test needs three process groups and is marked slow (~20 s).
"""

from __future__ import annotations

import os

import pytest

pytest.importorskip("megatron.core")
pytest.importorskip("psutil")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from harness import DistributedTestError, init_model_parallel, run_distributed  # noqa: E402

SEQ, BATCH, HIDDEN, FFN = 8, 2, 16, 32


def _close(actual, expected, rtol=1e-5, atol=1e-5):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


# ---------------------------------------------------------------- the harness itself


def _fail_on_rank_one(rank, world_size, pid_file):
    if rank == 1:
        raise ValueError("boom on rank 1")
    pid_file.write_text(str(os.getpid()))
    torch.distributed.barrier()  # rank 0 blocks here until the harness ends it


def test_harness_raises_failing_ranks_traceback_and_reaps_the_others(tmp_path):
    import time

    pid_file = tmp_path / "rank0.pid"
    start = time.monotonic()
    with pytest.raises(DistributedTestError, match=r"(?s)rank 1 of 2 failed:.*ValueError: boom on rank 1"):
        run_distributed(_fail_on_rank_one, 2, pid_file, timeout=60)
    assert time.monotonic() - start < 30  # did not wait for the barrier's timeout
    if pid_file.exists():  # rank 0 reached the barrier before rank 1's error arrived
        with pytest.raises(ProcessLookupError):
            os.kill(int(pid_file.read_text()), 0)


# ---------------------------------------------------------------- (a) tensor parallel: column -> row


def _tp_worker(rank, world_size):
    from megatron.core import parallel_state
    from megatron.core.model_parallel_config import ModelParallelConfig
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.tensor_parallel.mappings import (
        gather_from_sequence_parallel_region,
        scatter_to_sequence_parallel_region,
    )

    init_model_parallel(tp=world_size)
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    torch.manual_seed(0)  # identical full weights and inputs on every rank
    w1, b1 = torch.randn(FFN, HIDDEN), torch.randn(FFN)
    w2, b2 = torch.randn(HIDDEN, FFN), torch.randn(HIDDEN)
    x_full = torch.randn(SEQ, BATCH, HIDDEN)
    grad_out = torch.randn(SEQ, BATCH, HIDDEN)
    shard = FFN // world_size
    cols = slice(tp_rank * shard, (tp_rank + 1) * shard)
    out = {}
    for sequence_parallel in (False, True):
        config = ModelParallelConfig(tensor_model_parallel_size=world_size, sequence_parallel=sequence_parallel)
        fc1 = ColumnParallelLinear(HIDDEN, FFN, config=config, init_method=torch.nn.init.xavier_normal_,
                                   bias=True, gather_output=False)
        fc2 = RowParallelLinear(FFN, HIDDEN, config=config, init_method=torch.nn.init.xavier_normal_,
                                bias=True, input_is_parallel=True, skip_bias_add=False)
        with torch.no_grad():
            fc1.weight.copy_(w1[cols])
            fc1.bias.copy_(b1[cols])
            fc2.weight.copy_(w2[:, cols])
            fc2.bias.copy_(b2)
        x = x_full.clone().requires_grad_(True)
        # Sequence parallel: each rank holds SEQ / TP positions between the TP regions.
        inp = scatter_to_sequence_parallel_region(x) if sequence_parallel else x
        hidden, _ = fc1(inp)
        y, _ = fc2(F.gelu(hidden))
        y = gather_from_sequence_parallel_region(y, tensor_parallel_output_grad=False) if sequence_parallel else y
        y.backward(grad_out)
        db2 = fc2.bias.grad.clone()
        if sequence_parallel:
            # The row-parallel bias sees only this rank's positions; Megatron sums such grads over TP
            # in finalize_model_grads (params marked `sequence_parallel`).
            assert getattr(fc2.bias, "sequence_parallel", False)
            torch.distributed.all_reduce(db2, group=parallel_state.get_tensor_model_parallel_group())
        key = "sp" if sequence_parallel else "tp"
        out[key] = {"y": y.detach(), "dx": x.grad, "dw1": fc1.weight.grad.clone(), "dw2": fc2.weight.grad.clone(),
                    "db2": db2}
    out["cols"] = (cols.start, cols.stop)
    return out


def test_tensor_parallel_column_row_matches_unsplit_matmul():
    results = run_distributed(_tp_worker, 2)
    torch.manual_seed(0)
    w1, b1 = torch.randn(FFN, HIDDEN, requires_grad=True), torch.randn(FFN)
    w2, b2 = torch.randn(HIDDEN, FFN, requires_grad=True), torch.randn(HIDDEN, requires_grad=True)
    x = torch.randn(SEQ, BATCH, HIDDEN, requires_grad=True)
    grad_out = torch.randn(SEQ, BATCH, HIDDEN)
    y = F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2)
    y.backward(grad_out)
    for res in results:
        cols = slice(*res["cols"])
        for key in ("tp", "sp"):
            _close(res[key]["y"], y.detach())
            _close(res[key]["dx"], x.grad)
            _close(res[key]["dw1"], w1.grad[cols])
            _close(res[key]["dw2"], w2.grad[:, cols])
            _close(res[key]["db2"], b2.grad)
    assert results[0]["cols"] != results[1]["cols"]


# ---------------------------------------------------------------- (b) expert parallel: MoELayer, alltoall
#
# Dispatcher settings for expert choice (exactly K tokens per expert), all checked below at EP=2:
# - moe_pad_expert_input_to_capacity + moe_expert_capacity_factor: each expert gets
#   capacity = ceil(S * topk / E * factor) slots, filled with its routed tokens in token order (any
#   beyond the capacity are dropped by position, not by prob) and
#   then with unrouted tokens (they add nothing only if the router leaves probs 0 off the map and
#   the expert applies probs to its whole output, bias included). moedit's
#   K = int(S / E * C) floors, so factor = C can give K + 1 slots; factor = (K - 0.5) * E / S
#   gives exactly K whatever the rounding error. Needs moe_router_topk = 1 (then Megatron also
#   insists on moe_router_pre_softmax = True, which a custom router may ignore).
# - factor set without padding: num_out_tokens = routing_map.sum(), any count per expert works.
# - no factor (dropless): works on CPU because the unfused permute ignores num_out_tokens
#   (S * topk); Transformer Engine's fused permute sizes its output from it, so avoid it there.

EXPERTS, TOKENS = 4, SEQ * BATCH  # S = 16 tokens per rank
# (name, routing, K tokens per expert for expert choice, moe_router_topk, capacity factor, pad to capacity)
MOE_MODES = [
    ("token_choice_dropless", "token_choice", None, 2, None, False),
    ("expert_choice_pad_exact", "expert_choice", 4, 1, 1.0, True),      # ceil(16/4 * 1.0) = 4 = K
    ("expert_choice_pad_ceil", "expert_choice", 4, 1, 1.1, True),       # ceil(4.4) = 5 > K: one pad slot
    ("expert_choice_pad_floor_cf", "expert_choice", 3, 1, (3 - 0.5) * EXPERTS / TOKENS, True),  # ceil(2.5) = 3
    ("expert_choice_capacity_no_pad", "expert_choice", 3, 1, 1.0, False),  # num_out_tokens = routing_map.sum()
    ("expert_choice_dropless", "expert_choice", 3, 1, None, False),     # S * topk = 16 != E * K = 12
]


def route(logits, routing, k):
    """probs [S, E] (zero off the map) and a boolean routing_map [S, E]: token choice picks the top-2
    experts of each token, expert choice the top-K tokens of each expert."""
    scores = logits.softmax(dim=-1)
    if routing == "token_choice":
        picked = scores.topk(2, dim=1).indices
        routing_map = torch.zeros_like(scores, dtype=torch.bool).scatter(1, picked, True)
    else:
        picked = scores.topk(k, dim=0).indices  # (K, E)
        routing_map = torch.zeros_like(scores, dtype=torch.bool).scatter(0, picked, True)
    return scores * routing_map, routing_map


def _moe_inputs(rank):
    torch.manual_seed(0)
    full = {"router": torch.randn(EXPERTS, HIDDEN) * 0.5, "w1": torch.randn(EXPERTS, FFN, HIDDEN) * 0.3,
            "w2": torch.randn(EXPERTS, HIDDEN, FFN) * 0.3}
    torch.manual_seed(100 + rank)  # each EP rank holds different tokens
    return full, torch.randn(SEQ, BATCH, HIDDEN), torch.randn(SEQ, BATCH, HIDDEN)


class _RouterFactory:
    """Builds a TopKRouter subclass (defined lazily: megatron is imported only in the workers)."""

    def __init__(self, routing, k):
        self.routing, self.k = routing, k

    def __call__(self, *, config, pg_collection=None):
        from megatron.core.transformer.moe.router import TopKRouter

        routing, k = self.routing, self.k

        class TestRouter(TopKRouter):
            """Gating computed here: 0.16.1's TopKRouter.gating needs Transformer Engine's te_general_gemm."""

            def forward(self, input, padding_mask=None):
                logits = F.linear(input.reshape(-1, input.shape[-1]).float(), self.weight.float())
                return route(logits, routing, k)

        return TestRouter(config=config, pg_collection=pg_collection)


def build_moe_layer(mode, tp=1, ep=1, sequence_parallel=False):
    """Megatron's MoELayer (alltoall dispatcher, SequentialMLP experts, bias-free GELU) with a test router."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer.mlp import MLPSubmodules
    from megatron.core.transformer.moe.experts import SequentialMLP
    from megatron.core.transformer.moe.moe_layer import MoELayer, MoESubmodules
    from megatron.core.transformer.spec_utils import ModuleSpec, build_module
    from megatron.core.transformer.transformer_config import TransformerConfig

    _, routing, k, topk, capacity_factor, pad = next(m for m in MOE_MODES if m[0] == mode)
    config = TransformerConfig(
        num_layers=1, hidden_size=HIDDEN, num_attention_heads=2, ffn_hidden_size=FFN, moe_ffn_hidden_size=FFN,
        num_moe_experts=EXPERTS, moe_router_topk=topk, moe_token_dispatcher_type="alltoall",
        moe_router_load_balancing_type="none", moe_expert_capacity_factor=capacity_factor,
        moe_pad_expert_input_to_capacity=pad, moe_router_pre_softmax=topk == 1,  # required with topk 1
        tensor_model_parallel_size=tp, expert_model_parallel_size=ep, sequence_parallel=sequence_parallel,
        add_bias_linear=False, bias_activation_fusion=False, activation_func=F.gelu,
    )
    spec = ModuleSpec(module=MoELayer, submodules=MoESubmodules(
        router=_RouterFactory(routing, k),
        experts=ModuleSpec(module=SequentialMLP, submodules=MLPSubmodules(
            linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear))))
    return build_module(spec, config=config, layer_number=1)


def _moe_worker(rank, world_size):
    from megatron.core import parallel_state

    init_model_parallel(ep=world_size)
    ep_rank = parallel_state.get_expert_model_parallel_rank()
    full, x_in, grad_out = _moe_inputs(rank)
    out = {}
    for name, *_ in MOE_MODES:
        moe = build_moe_layer(name, ep=world_size)
        local = moe.local_expert_indices
        with torch.no_grad():
            moe.router.weight.copy_(full["router"])
            for i, expert in enumerate(moe.experts.local_experts):
                expert.linear_fc1.weight.copy_(full["w1"][local[i]])
                expert.linear_fc2.weight.copy_(full["w2"][local[i]])
        x = x_in.clone().requires_grad_(True)
        y, bias = moe(x)
        assert bias is None
        y.backward(grad_out)
        out[name] = {
            "y": y.detach(), "dx": x.grad, "drouter": moe.router.weight.grad.clone(), "local": local,
            "dw1": torch.stack([e.linear_fc1.weight.grad for e in moe.experts.local_experts]),
            "dw2": torch.stack([e.linear_fc2.weight.grad for e in moe.experts.local_experts]),
            "capacity": moe.token_dispatcher.capacity, "ep_rank": ep_rank,
        }
    return out


def _moe_reference(routing, k, world_size):
    """Per-token loop on one process with all experts; the loss sums over the ranks' tokens."""
    full, _, _ = _moe_inputs(0)
    params = {key: value.clone().requires_grad_(True) for key, value in full.items()}
    per_rank = []
    for rank in range(world_size):
        _, x_in, grad_out = _moe_inputs(rank)
        x = x_in.clone().requires_grad_(True)
        tokens = x.reshape(-1, HIDDEN)  # (S, D), sequence-major like Megatron's view(-1, D)
        probs, routing_map = route(tokens @ params["router"].T, routing, k)
        rows = []
        for t in range(tokens.shape[0]):
            acc = torch.zeros(HIDDEN)
            for e in range(EXPERTS):
                if routing_map[t, e]:
                    acc = acc + probs[t, e] * (params["w2"][e] @ F.gelu(params["w1"][e] @ tokens[t]))
            rows.append(acc)
        y = torch.stack(rows).view(SEQ, BATCH, HIDDEN)
        (y * grad_out).sum().backward()
        per_rank.append({"y": y.detach(), "dx": x.grad})
    grads = {key: value.grad for key, value in params.items()}
    return per_rank, grads


def test_expert_parallel_moe_layer_alltoall_matches_per_token_loop():
    results = run_distributed(_moe_worker, 2)
    for name, routing, k, _, _, pad in MOE_MODES:
        per_rank, grads = _moe_reference(routing, k, 2)
        for rank, res in enumerate(results):
            got = res[name]
            _close(got["y"], per_rank[rank]["y"])
            _close(got["dx"], per_rank[rank]["dx"])
            _close(got["dw1"], grads["w1"][got["local"]])
            _close(got["dw2"], grads["w2"][got["local"]])
        # The router is replicated over EP ranks: its grads are data-parallel partial sums.
        _close(results[0][name]["drouter"] + results[1][name]["drouter"], grads["router"])
        assert sorted(results[0][name]["local"] + results[1][name]["local"]) == list(range(EXPERTS))
    # Megatron's capacity is ceil(S * topk / E * factor): exact K needs factor <= K * E / S.
    capacities = {name: results[0][name]["capacity"] for name, *_ in MOE_MODES}
    assert capacities["expert_choice_pad_exact"] == 4
    assert capacities["expert_choice_pad_ceil"] == 5
    assert capacities["expert_choice_pad_floor_cf"] == 3


# ---------------------------------------------------------------- (c) pipeline parallel: 1F1B schedule

LAYERS, MICRO_BATCHES = 4, 3


def _pp_data():
    torch.manual_seed(1)
    weights = [torch.randn(HIDDEN, HIDDEN) / HIDDEN**0.5 for _ in range(LAYERS)]
    x = torch.randn(MICRO_BATCHES, SEQ, BATCH, HIDDEN)
    target = torch.randn(MICRO_BATCHES, SEQ, BATCH, HIDDEN)
    return weights, x, target


def _pp_worker(rank, world_size):
    from functools import partial

    from megatron.core import parallel_state
    from megatron.core.enums import ModelType
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.module import MegatronModule
    from megatron.core.transformer.transformer_config import TransformerConfig

    class Stage(MegatronModule):
        """LAYERS / PP tanh-linear layers; stage 0 reads the batch, later stages the received tensor."""

        def __init__(self, config, weights):
            super().__init__(config)
            self.model_type = ModelType.encoder_or_decoder
            self.layers = torch.nn.ModuleList(torch.nn.Linear(HIDDEN, HIDDEN, bias=False) for _ in weights)
            with torch.no_grad():
                for layer, w in zip(self.layers, weights):
                    layer.weight.copy_(w)
            self.input_tensor = None

        def set_input_tensor(self, input_tensor):
            self.input_tensor = input_tensor[0] if isinstance(input_tensor, list) else input_tensor

        def forward(self, x):
            h = x if parallel_state.is_pipeline_first_stage() else self.input_tensor
            for layer in self.layers:
                h = torch.tanh(layer(h))
            return h

    init_model_parallel(pp=world_size)
    stage = parallel_state.get_pipeline_model_parallel_rank()
    weights, x, target = _pp_data()
    per_stage = LAYERS // world_size
    config = TransformerConfig(num_layers=LAYERS, hidden_size=HIDDEN, num_attention_heads=2,
                               pipeline_model_parallel_size=world_size, pipeline_dtype=torch.float32)
    model = Stage(config, weights[stage * per_stage:(stage + 1) * per_stage])
    # Every stage's iterator yields the whole micro-batch; each stage uses what it needs.
    batches = iter([{"x": x[i], "target": target[i]} for i in range(MICRO_BATCHES)])

    def loss_func(target, output):
        loss = F.mse_loss(output, target)
        # clone: the schedule divides the returned loss in place by the number of micro-batches.
        return loss, {"loss": loss.detach().clone()}

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        return model(batch["x"]), partial(loss_func, batch["target"])

    forward_backward = get_forward_backward_func()
    assert forward_backward.__name__ == "forward_backward_pipelining_without_interleaving"
    losses = forward_backward(forward_step_func=forward_step, data_iterator=batches, model=[model],
                              num_microbatches=MICRO_BATCHES, seq_length=SEQ, micro_batch_size=BATCH,
                              forward_only=False)
    return {"stage": stage, "losses": [d["loss"] for d in losses],
            "grads": [layer.weight.grad.clone() for layer in model.layers]}


def test_pipeline_parallel_1f1b_matches_unsplit_model():
    results = run_distributed(_pp_worker, 2)
    weights, x, target = _pp_data()
    params = [w.clone().requires_grad_(True) for w in weights]
    losses = []
    for i in range(MICRO_BATCHES):
        h = x[i]
        for w in params:
            h = torch.tanh(h @ w.T)
        losses.append(F.mse_loss(h, target[i]))
    (torch.stack(losses).sum() / MICRO_BATCHES).backward()  # the schedule averages over micro-batches
    by_stage = sorted(results, key=lambda r: r["stage"])
    assert by_stage[0]["losses"] == []  # only the last stage computes the loss
    _close(torch.stack(by_stage[1]["losses"]), torch.stack(losses).detach())
    _close(torch.stack(by_stage[0]["grads"] + by_stage[1]["grads"]), torch.stack([p.grad for p in params]))


# ---------------------------------------------------------------- (d) dist_checkpointing: save EP=2, load elsewhere

CKPT_MODE = "token_choice_dropless"  # per-token routing: the same tokens route the same in any layout


def _ckpt_tokens():
    torch.manual_seed(7)
    return torch.randn(2, SEQ, BATCH, HIDDEN)  # one block of tokens per EP rank of the saving run


def _expert_weights(moe):
    return {"router": moe.router.weight.detach().clone(), "local": list(moe.local_expert_indices),
            "w1": torch.stack([e.linear_fc1.weight.detach() for e in moe.experts.local_experts]),
            "w2": torch.stack([e.linear_fc2.weight.detach() for e in moe.experts.local_experts])}


def _ckpt_save_worker(rank, world_size, directory):
    from megatron.core import dist_checkpointing, parallel_state

    init_model_parallel(ep=world_size)
    moe = build_moe_layer(CKPT_MODE, ep=world_size)  # Megatron's own init: experts differ per EP rank
    dist_checkpointing.save(moe.sharded_state_dict(), directory, sharded_strategy=("torch_dist", 1))
    x = _ckpt_tokens()[parallel_state.get_expert_model_parallel_rank()]
    return {**_expert_weights(moe), "y": moe(x)[0].detach()}


def _ckpt_load_worker(rank, world_size, directory, tp):
    from megatron.core import dist_checkpointing, parallel_state

    init_model_parallel(tp=tp, seed=999)  # a different seed: the weights must come from the checkpoint
    moe = build_moe_layer(CKPT_MODE, tp=tp, sequence_parallel=tp > 1)
    state = dist_checkpointing.load(moe.sharded_state_dict(), directory)
    moe.load_state_dict(state)
    tokens = _ckpt_tokens()
    if tp > 1:  # sequence parallel: this rank holds SEQ / TP positions of each block
        shard = SEQ // tp
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        tokens = tokens[:, tp_rank * shard:(tp_rank + 1) * shard]
    return {**_expert_weights(moe), "y": torch.stack([moe(block)[0].detach() for block in tokens])}


@pytest.mark.slow  # ~20 s: three process groups, and torch_dist's first save starts a Manager process
def test_dist_checkpoint_saved_at_ep2_loads_at_one_rank_and_tp2(tmp_path):
    directory = tmp_path / "ckpt"
    directory.mkdir()  # dist_checkpointing.save wants an existing, empty directory
    directory = str(directory)
    saved = run_distributed(_ckpt_save_worker, 2, directory)
    assert not torch.equal(saved[0]["w1"], saved[1]["w1"])
    w1 = torch.cat([s["w1"] for s in saved])  # experts 0-1 from EP rank 0, 2-3 from EP rank 1
    w2 = torch.cat([s["w2"] for s in saved])
    y = torch.stack([s["y"] for s in saved])  # (EP rank, SEQ, BATCH, HIDDEN)
    (single,) = run_distributed(_ckpt_load_worker, 1, directory, 1)
    assert single["local"] == list(range(EXPERTS))
    for key, value in (("router", saved[0]["router"]), ("w1", w1), ("w2", w2)):
        assert torch.equal(single[key], value), key
    _close(single["y"], y)
    tp_ranks = run_distributed(_ckpt_load_worker, 2, directory, 2)
    for res in tp_ranks:
        assert torch.equal(res["w1"], w1) and torch.equal(res["w2"], w2)
    _close(torch.cat([res["y"] for res in tp_ranks], dim=1), y)
