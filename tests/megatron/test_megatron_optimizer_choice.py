"""parallel.megatron_optimizer (issue 6): which optimizer the Megatron trainer picks, the errors
for impossible choices, the bf16 module wrapper keeping moedit's float buffers, and a checkpoint
of bf16 parameters resumed by a run with fp32 parameters (CPU: through the canonical files), and
the EMA view of the parameters that keeps Megatron DDP's gradient hooks.

Megatron's distributed optimizer itself allocates on CUDA: its training, exact resume and
resharding are checked on GPUs by scripts/megatron_gpu_check.sh (PHASE=train) and
tests/megatron/test_megatron_gpu_optimizer.py."""

from __future__ import annotations

import json
import os
import re
from types import SimpleNamespace

import pytest

pytest.importorskip("megatron.core")
pytest.importorskip("psutil")

import torch  # noqa: E402

from harness import run_distributed  # noqa: E402


def _cfg(**sections):
    from moedit.train.config import config_from_dict

    data = {"model": {"flavor": "tiny-diffmoe", "input_size": 8, "in_channels": 1, "patch_size": 2,
                      "num_classes": 10, "learn_sigma": False, "depth": 2, "hidden_size": 32, "num_heads": 2},
            "diffusion": {"objective": "flow"}, "parallel": {"engine": "megatron"}}
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return config_from_dict(data)


def test_distributed_optimizer_on_cpu_is_a_config_error_naming_the_key_and_the_fix():
    from moedit.configtools import ConfigError

    with pytest.raises(ConfigError, match=r"parallel\.megatron_optimizer = distributed.*train\.device = cpu.*"
                                          r"parallel\.megatron_optimizer=torch"):
        _cfg(parallel={"megatron_optimizer": "distributed"}, train={"device": "cpu"})


def test_megatron_optimizer_is_a_megatron_only_key():
    from moedit.configtools import ConfigError

    with pytest.raises(ConfigError, match=r"parallel\.megatron_optimizer = torch: only parallel\.engine = megatron"):
        _cfg(parallel={"engine": "ddp", "megatron_optimizer": "torch"})
    with pytest.raises(ConfigError, match="megatron_optimizer"):
        _cfg(parallel={"megatron_optimizer": "adam"})


@pytest.mark.parametrize("choice, precision, device, expected", [
    ("auto", "auto", "cuda", "torch"),  # until a distributed-optimizer resume is shown exact
    ("auto", "bf16", "cuda", "torch"),
    ("auto", "fp32", "cuda", "torch"),
    ("auto", "auto", "cpu", "torch"),
    ("torch", "bf16", "cuda", "torch"),
    ("distributed", "fp32", "cuda", "distributed"),
])
def test_optimizer_kind_resolution(choice, precision, device, expected):
    from moedit.engines.megatron.engine import MegatronEngine

    cfg = _cfg(parallel={"megatron_optimizer": choice}, train={"precision": precision})
    stub = SimpleNamespace(parallel_cfg=cfg.parallel, device=torch.device(device))
    assert MegatronEngine._resolve_optimizer_kind(stub) == expected


def test_distributed_optimizer_without_cuda_at_run_time_names_the_key():
    from moedit.engines.megatron.engine import MegatronEngine
    from moedit.errors import MoeditError

    cfg = _cfg(parallel={"megatron_optimizer": "distributed"})  # train.device auto, resolved to the CPU
    with pytest.raises(MoeditError, match=r"parallel\.megatron_optimizer = distributed on cpu.*=torch"):
        MegatronEngine._resolve_optimizer_kind(SimpleNamespace(parallel_cfg=cfg.parallel, device=torch.device("cpu")))


class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 4)
        self.register_buffer("threshold", torch.tensor([0.1234567, 1e-9], dtype=torch.float32))
        self.register_buffer("counts", torch.tensor([16777217.0], dtype=torch.float64))
        self.register_buffer("edges", torch.tensor([0.3333333]), persistent=False)

    def forward(self, x, t=None, y=None):
        return self.linear(x) + t.to(x.dtype)[:, None], t


def _bf16_module_worker(rank, world_size):
    from megatron.core.transformer import TransformerConfig

    from harness import init_model_parallel
    from moedit.engines.megatron.precision import to_bf16_module

    init_model_parallel()
    net = _Net()
    before = dict(net.named_buffers())
    values = {name: buf.clone() for name, buf in before.items()}
    config = TransformerConfig(num_layers=1, hidden_size=4, num_attention_heads=1, bf16=True,
                               params_dtype=torch.bfloat16)
    module = to_bf16_module(net, config)
    t = torch.tensor([0.1234567, 0.7654321])
    out, t_seen = module(torch.ones(2, 4), t=t)
    return {"param_dtypes": {p.dtype for p in net.parameters()}, "t": t, "t_seen": t_seen, "out_dtype": out.dtype,
            "same_objects": all(buf is before[name] for name, buf in net.named_buffers()),
            "buffers": dict(net.named_buffers()), "values": values}


def test_bf16_module_casts_parameters_and_keeps_float_buffers_exactly():
    r = run_distributed(_bf16_module_worker, 1)[0]
    assert r["param_dtypes"] == {torch.bfloat16}
    assert r["same_objects"]
    for name, value in r["values"].items():  # not cast to bf16 and back
        assert r["buffers"][name].dtype == value.dtype and torch.equal(r["buffers"][name], value)
    assert r["t_seen"].dtype == torch.float32 and torch.equal(r["t_seen"], r["t"])  # keyword inputs stay as given
    assert r["out_dtype"] == torch.float32  # the last stage returns fp32


def _train(rank, world_size, digits_dir, run_dir, steps):
    os.environ["MOEDIT_MEGATRON_CPU"] = "1"
    from moedit.train.trainer import Trainer
    from test_megatron_train import _config

    cfg = _config(digits_dir, run_dir, steps, depth=2, batch=4)
    trainer = Trainer(cfg).setup()
    engine = trainer.engine
    first = {"step": trainer.step, "kind": engine.optimizer_kind,
             "weights": {k: v.clone() for k, v in engine.canonical_state().items()},
             "ema": {k: v.clone() for k, v in engine.canonical_state(ema=True).items()}}
    trainer.fit()
    return first


def test_checkpoint_of_bf16_parameters_resumes_an_fp32_run_through_the_canonical_files(tmp_path, digits_dir, capfd):
    from safetensors.torch import load_file

    from moedit.train.checkpoint import checksum_files

    run = tmp_path / "run"
    run_distributed(_train, 1, digits_dir, run, 2, timeout=300)
    ckpt = run / "checkpoints" / "step_0000002"
    state = torch.load(ckpt / "state.pt", weights_only=True)
    assert (state["megatron_optimizer"], state["param_dtype"], state["optimizer_state"]) == ("torch", "float32", True)
    for name in ("model", "ema"):
        assert {v.dtype for v in load_file(str(ckpt / f"{name}.safetensors")).values()} == {torch.float32}
    # as a GPU run with bf16 parameters and the distributed optimizer would have written it
    state.update(megatron_optimizer="distributed", param_dtype="bfloat16")
    torch.save(state, ckpt / "state.pt")
    meta = json.loads((ckpt / "meta.json").read_text())  # re-seal: the edit is deliberate, not damage
    meta["files"] = checksum_files(ckpt)
    (ckpt / "meta.json").write_text(json.dumps(meta))
    capfd.readouterr()
    resumed = run_distributed(_train, 1, digits_dir, run, 3, timeout=300)[0]
    out = capfd.readouterr().out
    assert re.search(r"initialised from the canonical weights of .*step_0000002 \(bfloat16 parameters\); "
                     r"optimizer state starts fresh", out), out
    assert resumed["step"] == 2 and resumed["kind"] == "torch"
    for name, key in (("model", "weights"), ("ema", "ema")):
        saved = load_file(str(ckpt / f"{name}.safetensors"))
        for k, v in resumed[key].items():
            torch.testing.assert_close(v, saved[k], rtol=0, atol=0)


def _hooked_bf16_model():
    """A bf16 module whose parameters carry gradient-accumulator hooks, registered the way Megatron
    DDP registers the hook that moves each gradient into its buffer."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 2)).to(torch.bfloat16)
    fired, accumulators = [], []
    for p in model.parameters():
        accumulator = p.expand_as(p).grad_fn.next_functions[0][0]
        accumulator.register_hook(lambda *_, name=len(accumulators): fired.append(name))
        accumulators.append(accumulator)
    return model, fired, accumulators


def test_ema_view_of_the_parameters_keeps_their_gradient_hooks():
    from moedit.engines.megatron.engine import MegatronEngine

    model, fired, _accumulators = _hooked_bf16_model()
    params = list(model.parameters())
    pairs = [(p.detach().float() + 0.123456789, p) for p in params]  # fp32 EMA, not representable in bf16
    with MegatronEngine._parameters_as_ema(SimpleNamespace(model=model, _ema_pairs=pairs)):
        state = model.state_dict(keep_vars=True)
        assert all(state[k] is e for k, (e, _) in zip(("0.weight", "0.bias"), pairs))  # the fp32 tensors themselves
    assert list(model.parameters()) == params and all(p.dtype == torch.bfloat16 for p in params)
    model(torch.ones(1, 3, dtype=torch.bfloat16)).sum().backward()
    assert sorted(fired) == [0, 1]  # the hooks still fire after the swap


def test_setting_parameter_data_to_another_dtype_drops_the_hooks():
    """Why the EMA view swaps module slots: `p.data = fp32` on a bf16 parameter (and back) loses the
    hooks, so Megatron DDP would never see another gradient."""
    model, fired, _accumulators = _hooked_bf16_model()
    for p in model.parameters():
        saved = p.data
        p.data = saved.float()
        p.data = saved
    model(torch.ones(1, 3, dtype=torch.bfloat16)).sum().backward()
    assert fired == []
