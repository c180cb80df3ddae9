"""REPA on Megatron-Core (issue 26) equals the single-device model.

- Model level (float32, the base model's 1e-5 relative; tests/megatron/test_megatron_model.py's
  worker): tiny-diffmoe with the aligned block 3 of 4 at PP=2 (block 3 on the second stage, 1F1B,
  2 micro-batches) and at TP=2 with sequence parallelism (the hook gathers the tokens): outputs,
  every gradient (the projector's included) and the `repa` term per micro-batch, where it is
  computed (the second stage; every TP rank); lambda = 0 on one rank: the term is reported, the
  projector is frozen and gets no gradient, the rest matches.
- Trainer level: 4 steps on digits_repa (2 micro-batches per step) on the local and the megatron
  engine (TP = PP = EP = 1) log the same `loss`, `loss/repa` and other terms to 1e-6, for
  tiny-diffmoe and for the dense tiny model (whose REPA gradient needs the engine to set the
  weight of MoEAuxLossAutoScaler, which Megatron's schedule sets for MoE models only); the
  gathered canonical checkpoints hold the same weights, the projector's under its canonical name,
  and load_for_inference strips it.
"""

from __future__ import annotations

import json
import os

import pytest
from safetensors.torch import load_file

pytest.importorskip("megatron.core")
pytest.importorskip("psutil")

from harness import run_distributed  # noqa: E402
from test_megatron_model import NUM_MICRO, _check, _parity_worker  # noqa: E402

REPA_FIELDS = {"repa_depth": 3, "repa_dim": 8, "repa_hidden": 16, "repa_coef": 0.5}
PROJECTOR = "repa_projector."


def _check_terms(results, holders):
    """The `repa` term of every micro-batch equals the single-device one on the ranks in `holders`
    (and is absent elsewhere); other auxiliary terms are compared by the caller's layout tests."""
    for rank, r in enumerate(results):
        assert len(r["aux"]) == NUM_MICRO
        for mine, ref in zip(r["aux"], r["ref_aux"], strict=True):
            if rank not in holders:
                assert "repa" not in mine
                continue
            assert abs(float(mine["repa"]) - float(ref["repa"])) <= 1e-6, (rank, mine["repa"], ref["repa"])
            assert not mine["repa"].requires_grad


# layout -> (TP, PP, ranks that hold the projector and report the term)
LAYOUTS = {"pp2": (2, 1, [1]), "tp2": (1, 2, [0, 1])}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_repa_matches_single_device_at_pp2_and_tp2(layout):
    pp, tp, holders = LAYOUTS[layout]
    results = run_distributed(_parity_worker, tp * pp, "tiny-diffmoe", tp, pp, 1, 0, False, REPA_FIELDS,
                              timeout=240)
    _check(results)  # outputs and every gradient, 1e-5 relative; one main replica per element
    _check_terms(results, holders)
    grads = results[0]["grads"]
    projector = [k for k in grads if k.startswith(PROJECTOR)]
    assert len(projector) == 6 and all(float(grads[k].abs().max()) > 0 for k in projector)
    stage_keys = [{key for key, _, _ in r["main_replicas"] if key.startswith(PROJECTOR)} for r in results]
    assert [bool(keys) for keys in stage_keys] == [rank == holders[0] for rank in range(tp * pp)]


def test_lambda_zero_reports_the_term_and_trains_nothing_through_it():
    fields = {**REPA_FIELDS, "repa_coef": 0.0}
    (result,) = run_distributed(_parity_worker, 1, "tiny-diffmoe", 1, 1, 1, 0, False, fields, timeout=240)
    _check([result])  # the rest of the model as the single-device one with lambda = 0
    _check_terms([result], [0])
    assert not any(k.startswith(PROJECTOR) for k in result["grads"])


# --- through the Trainer ----------------------------------------------------------------------------------
STEPS = 4


def _train(rank, world_size, data, run_dir, engine, flavor):
    os.environ["MOEDIT_MEGATRON_CPU"] = "1"  # the harness has stubbed Megatron's CUDA calls
    from moedit.train.config import config_from_dict
    from moedit.train.trainer import Trainer

    parallel = {"engine": engine, "micro_batch": 4, "num_microbatches": 2} if engine == "megatron" else {}
    moe = {"moe": {"every": 2, "first": 1, "predictor_coef": 0.7}} if flavor != "tiny-dense" else {}
    cfg = config_from_dict({
        "model": {"flavor": flavor, "input_size": 8, "in_channels": 1, "patch_size": 1, "num_classes": 10,
                  "learn_sigma": False, "depth": 4, "hidden_size": 32, "num_heads": 2},
        **moe,
        "diffusion": {"objective": "flow", "sample_steps": 2},
        "data": {"path": str(data), "num_workers": 0, "shuffle_buffer": 64},
        "optim": {"lr": 1e-3, "grad_clip": 1.0},
        "train": {"steps": STEPS, "global_batch_size": 8, "micro_batch_size": 4 if engine == "local" else 0,
                  "ema_decay": 0.9, "num_sample_images": 0, "run_dir": str(run_dir), "device": "cpu",
                  "precision": "fp32", "repa": {"enabled": True, "depth": 3, "projector_hidden": 16, "coef": 0.5}},
        "logging": {"log_every": 1, "tensorboard": False, "progress": "none"},
        "checkpoint": {"every": STEPS, "keep_last": 1},
        "parallel": parallel,
    })
    trainer = Trainer(cfg).setup()
    return {"code": trainer.fit(), "engine": trainer.engine.name, "repa_depth": trainer.cfg.model.repa_depth}


@pytest.mark.parametrize("flavor", ["tiny-diffmoe", "tiny-dense"])
def test_trainer_logs_the_same_terms_on_local_and_megatron(flavor, tmp_path, repa_digits):
    rows = {}
    for engine in ("local", "megatron"):
        (result,) = run_distributed(_train, 1, repa_digits, tmp_path / engine, engine, flavor, timeout=300)
        assert result == {"code": 0, "engine": engine, "repa_depth": 3}
        lines = (tmp_path / engine / "metrics.jsonl").read_text().splitlines()
        rows[engine] = [{k: v for k, v in json.loads(line).items() if k.startswith("loss") or k == "grad_norm"}
                        for line in lines]
    keys = {"loss", "loss/mse", "loss/repa", "grad_norm"} | ({"loss/predictor"} if flavor == "tiny-diffmoe" else set())
    assert len(rows["local"]) == STEPS and set(rows["local"][0]) == keys
    for a, b in zip(rows["local"], rows["megatron"], strict=True):
        assert a.keys() == b.keys()
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=1e-6, abs=1e-6), (k, a, b)
    repa = [r["loss/repa"] for r in rows["local"]]
    assert all(-1 < v < 0.5 for v in repa) and len(set(repa)) == STEPS  # a live term, not a constant placeholder
    # the gathered canonical files hold the projector (trained, as on one device) under its canonical name
    for name in ("model.safetensors", "ema.safetensors"):
        local, megatron = (load_file(tmp_path / e / "checkpoints" / f"step_{STEPS:07d}" / name)
                           for e in ("local", "megatron"))
        assert local.keys() == megatron.keys() and sum(k.startswith(PROJECTOR) for k in local) == 6
        for k, tensor in local.items():
            assert (megatron[k] - tensor).abs().max() <= 1e-5 * (1 + tensor.abs().max()), (name, k)
    from moedit.train.checkpoint import load_for_inference

    model, cfg = load_for_inference(tmp_path / "megatron")  # strip_training_only, as for a local run
    assert model.repa_projector is None and not cfg.model.has_repa
