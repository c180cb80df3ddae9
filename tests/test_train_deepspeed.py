"""The DeepSpeed engine: ZeRO-1/2 against DDP through the real CLI (2 gloo processes), exact resume
after SIGKILL, export and sampling, the quickstart, config generation and a FLOP cross-check."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_train_e2e import ROOT, free_port, losses, moedit, tiny_config

pytest.importorskip("deepspeed")

ENGINES = {
    "ddp": ["parallel.engine=ddp"],
    "zero1": ["parallel.engine=deepspeed", "deepspeed.zero_stage=1"],
    "zero2": ["parallel.engine=deepspeed", "deepspeed.zero_stage=2"],
}


def launch(cfg: Path, run: Path, *overrides: str, world_size: int = 2) -> list[subprocess.Popen]:
    """`moedit train` as `world_size` ranks, started the way torchrun starts them."""
    port = free_port()
    return [
        subprocess.Popen(
            [sys.executable, "-m", "moedit.cli", "train", str(cfg), f"train.run_dir={run}", *overrides],
            env={**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(r), "WORLD_SIZE": str(world_size),
                 "LOCAL_RANK": str(r), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)},
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for r in range(world_size)
    ]


def finish(procs: list[subprocess.Popen]) -> list[str]:
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs
    return outputs


@pytest.fixture(scope="module")
def runs(tmp_path_factory, digits_dir):
    """One 12-step run per engine on 2 ranks, each rank accumulating 2 micro-batches, clipping at 0.5."""
    root = tmp_path_factory.mktemp("engines")
    cfg = tiny_config(root, digits_dir, data={"split": "sample"}, optim={"lr": 1e-3, "grad_clip": 0.5},
                      train={"micro_batch_size": 4}, checkpoint={"every": 4, "keep_last": 5})
    out = {"cfg": cfg}
    for name, overrides in ENGINES.items():
        out[name] = root / name
        outputs = finish(launch(cfg, out[name], *overrides))
        assert f"engine={overrides[0].split('=')[1]} world_size=2 micro_batch=4 accum=2" in outputs[0]
    return out


@pytest.mark.parametrize("stage", ["zero1", "zero2"])
def test_zero_matches_ddp_losses_norms_and_weights(runs, stage):
    ref, ds = runs["ddp"], runs[stage]
    assert sorted(losses(ds)) == list(range(1, 13))
    rows = {n: [json.loads(line) for line in (runs[n] / "metrics.jsonl").read_text().splitlines()]
            for n in ("ddp", stage)}
    for a, b in zip(rows["ddp"], rows[stage]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)
        # DeepSpeed clips to optim.grad_clip and reports the norm before clipping, as the ddp engine does.
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
        assert b["dp/threshold_max_diff"] == 0.0  # DiffMoE thresholds averaged over ranks every step
    assert any(r["grad_norm"] > 0.5 for r in rows["ddp"])  # so clipping took effect
    for weights in ("model", "ema"):
        w_ref = load_file(str(ref / "checkpoints" / "step_0000012" / f"{weights}.safetensors"))
        w_ds = load_file(str(ds / "checkpoints" / "step_0000012" / f"{weights}.safetensors"))
        assert w_ref.keys() == w_ds.keys()
        for name, tensor in w_ref.items():
            assert (w_ds[name] - tensor).abs().max() <= 1e-5 * (1 + tensor.abs().max()), (weights, name)
    meta = json.loads((ds / "checkpoints" / "step_0000012" / "meta.json").read_text())
    assert meta["engine"] == "deepspeed" and meta["engine_files"] == ["deepspeed"]


def test_zero2_sigkill_then_auto_resume_is_exact(runs, tmp_path):
    run = tmp_path / "killed"
    procs = launch(runs["cfg"], run, *ENGINES["zero2"])
    deadline = time.time() + 120
    while not (run / "checkpoints" / "step_0000004" / "meta.json").exists():
        assert all(p.poll() is None for p in procs) and time.time() < deadline, "ended before its first checkpoint"
        time.sleep(0.002)
    for p in procs:
        p.send_signal(signal.SIGKILL)
    for p in procs:
        p.communicate()
    assert not (run / "DONE").exists(), "the run finished before it could be killed"
    outputs = finish(launch(runs["cfg"], run, *ENGINES["zero2"], "train.resume=auto"))
    assert "resumed from" in outputs[0]
    assert losses(run) == losses(runs["zero2"])  # bit-identical floats, every step logged once
    for weights in ("model", "ema"):
        a = load_file(str(run / "checkpoints" / "step_0000012" / f"{weights}.safetensors"))
        b = load_file(str(runs["zero2"] / "checkpoints" / "step_0000012" / f"{weights}.safetensors"))
        assert all(torch.equal(a[k], b[k]) for k in b), weights


def test_exported_deepspeed_checkpoint_samples_like_the_run(runs, tmp_path):
    from moedit.train.checkpoint import export_safetensors, load_for_inference

    ckpt = runs["zero2"] / "checkpoints" / "step_0000012"
    exported = export_safetensors(ckpt, tmp_path / "export" / "zero2.safetensors")
    model, _ = load_for_inference(exported)
    ema = load_file(str(ckpt / "ema.safetensors"))
    assert all(torch.equal(model.state_dict()[k], ema[k]) for k in ema)
    grids = []
    for source, name in ((runs["zero2"], "a.png"), (exported, "b.png")):
        moedit("sample", source, "--num-samples", "4", "--steps", "3", "--seed", "1", "--device", "cpu",
               "--out", tmp_path / name)
        grids.append((tmp_path / name).read_bytes())
    assert grids[0] == grids[1]


def test_quickstart_with_deepspeed_override_matches_the_local_engine(quickstart_run, tmp_path, digits_dir):
    """The shipped quickstart (as conftest's quickstart_run shortens it) with parallel.engine=deepspeed on
    one process: ZeRO-2 over a group of one must train what the local engine trains (warm-up, clipping)."""
    run = tmp_path / "qs"
    moedit("train", ROOT / "configs" / "quickstart.yaml", f"train.run_dir={run}", f"data.path={digits_dir}",
           "train.steps=40", "model.depth=2", "logging.log_every=10", "logging.tensorboard=false",
           "train.sample_every=0", "train.num_sample_images=0", "checkpoint.every=20", "parallel.engine=deepspeed")
    local = [json.loads(line) for line in (quickstart_run / "metrics.jsonl").read_text().splitlines()]
    ds = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in ds] == [r["step"] for r in local] == [10, 20, 30, 40]
    for a, b in zip(local, ds):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["lr"] == a["lr"]
    info = json.loads((run / "model_info.json").read_text())
    assert info["instantiated_params"] == info["total_params"]
    assert (run / "DONE").is_file() and (run / "checkpoints" / "step_0000040" / "deepspeed").is_dir()


def test_skipped_nonfinite_steps_discard_deepspeed_gradients(tmp_path, digits_dir, monkeypatch):
    """ZeRO-2 with train.on_nonfinite=skip trains exactly what the local engine trains: the poisoned
    steps' gradients, already reduced into DeepSpeed's partitions, must not leak into the next step."""
    from test_train_failures import make_trainer, poison

    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(key, value)
    weights = {}
    for engine in ("local", "deepspeed"):
        (tmp_path / engine).mkdir()
        trainer = make_trainer(tmp_path / engine, digits_dir, f"parallel.engine={engine}", "train.on_nonfinite=skip",
                               "optim.grad_clip=0.5", "train.micro_batch_size=4")
        poison(trainer, {1, 3})
        try:
            assert trainer.fit() == 0 and trainer.skipped_steps == 2
        finally:
            trainer.engine.shutdown()
        weights[engine] = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    logged = {}
    for engine in weights:
        rows = [json.loads(line) for line in (tmp_path / engine / "run" / "metrics.jsonl").read_text().splitlines()]
        logged[engine] = {r["step"]: r["loss"] for r in rows if "loss" in r}  # skipped steps log no loss
    assert sorted(logged["local"]) == [1, 3, 5, 6]
    assert logged["deepspeed"] == pytest.approx(logged["local"], rel=1e-5)
    for name, tensor in weights["local"].items():
        assert (weights["deepspeed"][name] - tensor).abs().max() <= 1e-5 * (1 + tensor.abs().max()), name


# --- pure functions: config generation and validation ------------------------------------------


def test_generated_deepspeed_config_maps_moedit_fields():
    from moedit.engines.deepspeed import build_deepspeed_config
    from moedit.engines.config import DeepSpeedConfig

    ds = DeepSpeedConfig(zero_stage=1, offload_optimizer=True, bf16=True,
                         extra={"zero_optimization": {"reduce_bucket_size": 1000}, "prescale_gradients": True})
    config = build_deepspeed_config(ds, micro_batch_size=8, accum_steps=4, world_size=2, grad_clip=1.5)
    assert config["train_batch_size"] == 64 == 8 * 4 * 2
    assert (config["train_micro_batch_size_per_gpu"], config["gradient_accumulation_steps"]) == (8, 4)
    assert config["gradient_clipping"] == 1.5
    assert config["bf16"] == {"enabled": True}
    # extra merges into the generated zero section instead of replacing it.
    assert config["zero_optimization"]["stage"] == 1
    assert config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert config["zero_optimization"]["reduce_bucket_size"] == 1000
    assert config["prescale_gradients"] is True
    assert ds.extra == {"zero_optimization": {"reduce_bucket_size": 1000}, "prescale_gradients": True}
    # bf16 autocast of the trainer is kept on inside DeepSpeed's engine only when asked for.
    assert "torch_autocast" not in config
    kept = build_deepspeed_config(ds, micro_batch_size=8, accum_steps=4, world_size=2, grad_clip=1.5,
                                  autocast_bf16=True)
    assert kept["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"}


@pytest.mark.parametrize("overrides, message", [
    (["parallel.engine=deepspeed", "deepspeed.zero_stage=3"],
     "deepspeed.zero_stage = 3 with the MoE model 'tiny-diffmoe'"),
    (["deepspeed.zero_stage=4"], "deepspeed.zero_stage = 4: must be 0, 1, 2 or 3"),
    (["deepspeed.extra={gradient_accumulation_steps: 3}"], "deepspeed.extra sets gradient_accumulation_steps"),
    (["deepspeed.offload_optimizer=true", "deepspeed.zero_stage=0"], "needs deepspeed.zero_stage >= 1"),
    (["parallel.engine=deepspeed", "deepspeed.bf16=true", "train.precision=fp32"], "train.precision = fp32"),
    (["parallel.engine=deepspeeed"], "parallel.engine"),
])
def test_bad_deepspeed_settings_are_named(tmp_path, digits_dir, overrides, message):
    from moedit.configtools import ConfigError
    from moedit.train.config import load_config

    with pytest.raises(ConfigError) as info:
        load_config(tiny_config(tmp_path, digits_dir), overrides)
    assert message in str(info.value)


def test_zero3_is_allowed_for_a_dense_model(tmp_path, digits_dir):
    from moedit.train.config import load_config

    cfg = load_config(tiny_config(tmp_path, digits_dir), ["parallel.engine=deepspeed", "deepspeed.zero_stage=3",
                                                         "model.flavor=tiny-dense"])
    assert cfg.model.moe is None and cfg.deepspeed.zero_stage == 3


def test_checkpoint_of_another_engine_is_refused_with_the_engine_named(tmp_path):
    from moedit.engines.base import DistEnv
    from moedit.engines.local import LocalEngine
    from moedit.errors import MoeditError

    blob = {"meta": {"engine": "deepspeed"}, "state": {"step": 4}, "model": {}}
    model = torch.nn.Linear(2, 2)
    engine = LocalEngine(DistEnv(), torch.device("cpu"))
    engine.model, engine.ema, engine.optimizer = model, model, torch.optim.AdamW(model.parameters())
    with pytest.raises(MoeditError, match="resume with parallel.engine=deepspeed"):
        engine.load_training_state(tmp_path, blob)


# --- FLOP cross-check ---------------------------------------------------------------------------


@pytest.mark.parametrize("flavor, batch", [("tiny-dense", 3), ("DiT-S/2", 1)])
def test_deepspeed_flops_profiler_agrees_with_moedit_count(flavor, batch):
    """DeepSpeed's profiler and moedit.models.flops on a dense DiT forward.

    MACs: identical. Both count every nn.Linear and the patch conv as in x out multiply-adds per token
    (no bias), and F.scaled_dot_product_attention as the QK^T and AV matmuls (2 T^2 D per image), which
    moedit's `dit` convention includes and its `ditmoe` convention leaves out.
    FLOPs: DeepSpeed reports 2 per MAC plus operations moedit's convention ignores: GELU and SiLU
    (1 per element), LayerNorm without affine (4 per element), the patch conv's bias (1 per output
    element; it counts no Linear bias) and unpatchify's einsum permutation (numpy's path estimate).
    moedit reports one FLOP per multiply-add, so DeepSpeed MACs == moedit "GFLOPs" x 1e9.
    """
    import numpy as np
    from deepspeed.profiling.flops_profiler import get_model_profile

    from moedit.models import build_model, flops, get_flavor

    cfg = get_flavor(flavor)
    model = build_model(cfg).eval()
    torch.manual_seed(0)
    x = torch.randn(batch, cfg.in_channels, cfg.input_size, cfg.input_size)
    t, y = torch.rand(batch), torch.randint(0, cfg.num_classes, (batch,))
    ds_flops, ds_macs, ds_params = get_model_profile(model, args=[x, t, y], print_profile=False, as_string=False,
                                                     warm_up=0)
    assert ds_macs == batch * flops.forward_macs(cfg, "dit")
    assert ds_macs == pytest.approx(batch * flops.forward_gflops(cfg, "dit") * 1e9, rel=1e-12)
    B, T, D, L = batch, cfg.num_tokens, cfg.hidden_size, cfg.depth
    assert ds_macs - batch * flops.forward_macs(cfg, "ditmoe") == B * L * 2 * T * T * D
    p, c_out = cfg.patch_size, cfg.out_channels
    g = cfg.input_size // p
    path = np.einsum_path("nhwpqc->nchpwq", np.zeros((B, g, g, p, p, c_out)), optimize="optimal")[1]
    einsum = int(float(next(line for line in path.split("\n") if "optimized flop" in line.lower()).split(":")[-1]))
    non_mac = (B * T * cfg.ffn_hidden * L  # GELU in every dense FFN
               + B * D * (L + 2)  # SiLU: timestep MLP, every adaLN, the final adaLN
               + 4 * B * T * D * (2 * L + 1)  # LayerNorms without affine: two per block, one final
               + B * T * D  # patch conv bias
               + einsum)
    assert ds_flops == 2 * ds_macs + non_mac
    assert ds_params == flops.count_params(cfg)
