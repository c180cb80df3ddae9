"""One training loop for every engine: the same logged terms with the same meaning.

- local and megatron (TP = PP = EP = 1), same seed, tiny DiffMoE, float32, 5 steps: every logged
  `loss`, `loss/<term>` and `grad_norm` equal to 1e-6; at TP = 2 (with sequence parallelism) and at
  PP = 2 too (measured 1.1e-7 on the CPU);
- local, ddp, deepspeed and megatron write metrics.jsonl rows with the same keys, and `loss` is
  the weighted sum of the `loss/<term>` rows (objective terms weight 1, `moe.predictor_coef` for
  the capacity predictor's BCE);
- the tiny text model (captions with padding and caption dropout, tests/test_models_text.py's
  loader) on local and megatron (TP = PP = EP = 1): the same logged terms to 1e-6, the same
  canonical checkpoint files, and the same sampling model.
"""

from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("megatron.core")
pytest.importorskip("deepspeed")
pytest.importorskip("psutil")

from harness import run_distributed  # noqa: E402

STEPS = 5
PREDICTOR_COEF = 0.7  # not 1: a term added with the wrong weight must show


def _config(digits_dir, run_dir, engine, **parallel):
    from moedit.train.config import config_from_dict

    return config_from_dict({
        "model": {"flavor": "tiny-diffmoe", "input_size": 8, "in_channels": 1, "patch_size": 2, "num_classes": 10,
                  "learn_sigma": False, "depth": 4, "hidden_size": 32, "num_heads": 2},
        "moe": {"every": 2, "first": 1, "predictor_coef": PREDICTOR_COEF},
        "diffusion": {"objective": "flow", "sample_steps": 2},
        "data": {"path": str(digits_dir), "num_workers": 0, "shuffle_buffer": 64},
        "optim": {"lr": 1e-3, "grad_clip": 1.0},
        "train": {"steps": STEPS, "global_batch_size": 8, "ema_decay": 0.9, "num_sample_images": 0,
                  "run_dir": str(run_dir), "device": "cpu", "precision": "fp32"},
        "logging": {"log_every": 1, "tensorboard": False, "progress": "none"},
        "checkpoint": {"every": 100, "keep_last": 1},
        "parallel": {"engine": engine, **parallel},
    })


def _train(rank, world_size, digits_dir, run_dir, engine, parallel):
    os.environ["MOEDIT_MEGATRON_CPU"] = "1"  # the harness has stubbed Megatron's CUDA calls
    from moedit.train.trainer import Trainer

    trainer = Trainer(_config(digits_dir, run_dir, engine, **parallel)).setup()
    return {"code": trainer.fit(), "engine": trainer.engine.name}


def _rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, digits_dir):
    root = tmp_path_factory.mktemp("engines")
    plans = {"local": ("local", 1, {}), "ddp": ("ddp", 1, {}), "deepspeed": ("deepspeed", 1, {}),
             "megatron": ("megatron", 1, {}),
             "megatron_tp2": ("megatron", 2, {"tensor": 2, "sequence_parallel": True}),
             "megatron_pp2": ("megatron", 2, {"pipeline": 2})}
    out = {}
    for name, (engine, world, parallel) in plans.items():
        results = run_distributed(_train, world, digits_dir, root / name, engine, parallel, timeout=300)
        assert [r["code"] for r in results] == [0] * world and results[0]["engine"] == engine
        out[name] = _rows(root / name)
    return out


def _logged(rows):
    return [{k: v for k, v in r.items() if k.startswith("loss") or k == "grad_norm"} for r in rows]


def test_local_and_megatron_log_the_same_terms_to_1e6(runs):
    local, megatron = _logged(runs["local"]), _logged(runs["megatron"])
    assert [r["step"] for r in runs["megatron"]] == list(range(1, STEPS + 1))
    assert set(local[0]) == {"loss", "loss/mse", "loss/predictor", "grad_norm"}
    for a, b in zip(local, megatron, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=1e-6, abs=1e-6), (k, a, b)


@pytest.mark.parametrize("layout", ["megatron_tp2", "megatron_pp2"])
def test_tensor_and_pipeline_parallel_log_the_same_terms(runs, layout):
    for a, b in zip(_logged(runs["local"]), _logged(runs[layout]), strict=True):
        assert a.keys() == b.keys()
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=1e-6, abs=1e-6), (k, a, b)  # measured: 1.1e-7


@pytest.mark.parametrize("engine", ["local", "ddp", "deepspeed", "megatron"])
def test_every_engine_logs_the_same_keys_and_loss_is_the_weighted_sum(runs, engine):
    rows = runs[engine]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert all(r.keys() == runs["local"][0].keys() for r in rows), sorted(set(rows[0]) ^ set(runs["local"][0]))
    for r in rows:
        weighted = r["loss/mse"] + PREDICTOR_COEF * r["loss/predictor"]
        assert r["loss"] == pytest.approx(weighted, rel=1e-6)
        assert r["loss/predictor"] > 0.1  # the capacity predictor's BCE, not a zero placeholder


# --- the text model ------------------------------------------------------------------------------------
def _train_text(rank, world_size, tmp, digits_dir, engine):
    """4 steps of tiny-diffmoe-t (global batch 8 in 2 micro-batches of 4), then the sampling model's
    output on a fixed captioned input."""
    import torch

    os.environ["MOEDIT_MEGATRON_CPU"] = "1"
    from test_models_text import make_text_trainer  # its loader: per-label padded captions

    parallel = {"engine": engine, "micro_batch": 4, "num_microbatches": 2} if engine == "megatron" else {}
    # static inference capacity: the sampling model's routing does not read the DiffMoE thresholds,
    # whose EMA copies differ between the engines (see the checkpoint test)
    moe = {"predictor_coef": PREDICTOR_COEF, "inference_mode": "static"}
    trainer = make_text_trainer(tmp, digits_dir, engine, sections={"parallel": parallel, "moe": moe},
                                micro_batch_size=4 if engine == "local" else 0, device="cpu", precision="fp32")
    code = trainer.fit()
    m = trainer.cfg.model
    g = torch.Generator().manual_seed(7)
    x = torch.randn(3, m.in_channels, m.input_size, m.input_size, generator=g)
    cond = {"text": torch.randn(3, m.text_len, m.text_dim, generator=g),
            "text_mask": torch.arange(m.text_len)[None] < torch.tensor([[5], [16], [1]]),
            "drop_text": torch.tensor([False, False, True])}
    with torch.no_grad(), trainer.engine.sampling_model() as model:
        sampled = model.eval()(x, torch.rand(3, generator=g), **cond)
    return {"code": code, "engine": trainer.engine.name, "sampled": sampled}


@pytest.fixture(scope="module")
def text_runs(tmp_path_factory, digits_dir):
    root = tmp_path_factory.mktemp("text_engines")
    out = {}
    for engine in ("local", "megatron"):
        (result,) = run_distributed(_train_text, 1, root, digits_dir, engine, timeout=300)
        assert result["code"] == 0 and result["engine"] == engine
        out[engine] = {"rows": _rows(root / engine), "sampled": result["sampled"],
                       "checkpoint": root / engine / "checkpoints" / f"step_{4:07d}"}
    return out


def test_text_model_logs_the_same_terms_on_local_and_megatron(text_runs):
    local, megatron = _logged(text_runs["local"]["rows"]), _logged(text_runs["megatron"]["rows"])
    assert len(local) == 4 and set(local[0]) == {"loss", "loss/mse", "loss/predictor", "grad_norm"}
    for a, b in zip(local, megatron, strict=True):
        assert a.keys() == b.keys()
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=1e-6, abs=1e-6), (k, a, b)


def test_text_model_checkpoints_and_sampling_model_match_local(text_runs):
    """The gathered canonical files hold every tensor of the single-device text model (caption
    embedder, cross-attention with its kv rows back in canonical order) with the local run's values,
    the EMA's DiffMoE thresholds included (both engines keep an EMA of them)."""
    from safetensors.torch import load_file

    for name in ("model.safetensors", "ema.safetensors"):
        local = load_file(text_runs["local"]["checkpoint"] / name)
        megatron = load_file(text_runs["megatron"]["checkpoint"] / name)
        assert local.keys() == megatron.keys()
        assert any(".cross_attn.kv." in k for k in local) and "caption_embedder.null_caption" in local
        for k, tensor in local.items():
            assert (megatron[k] - tensor).abs().max() <= 1e-5 * (1 + tensor.abs().max()), (name, k)
    a, b = text_runs["local"]["sampled"], text_runs["megatron"]["sampled"]
    assert (b - a).abs().max() <= 1e-5 * (1 + a.abs().max())
