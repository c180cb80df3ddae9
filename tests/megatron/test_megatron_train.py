"""Training on the Megatron engine (2 gloo processes, real digits): EP=2 and PP=2 runs whose
DiffMoE thresholds stay identical across data-parallel ranks, exact resume, and a checkpoint
saved at EP=2 that loads at TP=2 and on one rank with the canonical model's outputs."""

from __future__ import annotations

import json
import os
import shutil

import pytest

pytest.importorskip("megatron.core")
pytest.importorskip("psutil")

import torch  # noqa: E402

from harness import run_distributed  # noqa: E402


def _config(digits_dir, run_dir, steps=4, depth=4, batch=8, **parallel):
    """A tiny DiffMoE on the digits for the Megatron engine on CPU (also used by the optimizer tests)."""
    from moedit.train.config import config_from_dict

    return config_from_dict({
        "model": {"flavor": "tiny-diffmoe", "input_size": 8, "in_channels": 1, "patch_size": 2, "num_classes": 10,
                  "learn_sigma": False, "depth": depth, "hidden_size": 32, "num_heads": 2},
        "moe": {"every": 2, "first": 1},
        "diffusion": {"objective": "flow", "sample_steps": 2},
        "data": {"path": str(digits_dir), "num_workers": 0, "shuffle_buffer": 64},
        "optim": {"lr": 1e-3},
        "train": {"steps": steps, "global_batch_size": batch, "ema_decay": 0.9, "num_sample_images": 0,
                  "run_dir": str(run_dir), "device": "cpu"},
        "logging": {"log_every": 1, "tensorboard": False, "progress": "none"},
        "checkpoint": {"every": 2, "keep_last": 5},
        "parallel": {"engine": "megatron", **parallel},
    })


def _train(rank, world_size, digits_dir, run_dir, steps, parallel):
    os.environ["MOEDIT_MEGATRON_CPU"] = "1"  # the harness has stubbed Megatron's CUDA calls
    from moedit.train.trainer import Trainer

    trainer = Trainer(_config(digits_dir, run_dir, steps, **parallel)).setup()
    code = trainer.fit()
    thresholds = [t.clone() for t in trainer.model.threshold_buffers()]
    return {"code": code, "thresholds": thresholds, "step": trainer.step}


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _load_outputs(rank, world_size, digits_dir, run_dir, ckpt, parallel):
    """Build the layout `parallel`, resume from `ckpt`'s weights and run one fixed batch."""
    os.environ["MOEDIT_MEGATRON_CPU"] = "1"
    from moedit.train.trainer import Trainer

    cfg = _config(digits_dir, run_dir, 1, **parallel)
    cfg.train.resume = str(ckpt)
    trainer = Trainer(cfg).setup()
    model = trainer.model.eval()
    g = torch.Generator().manual_seed(3)
    x, t, y = torch.randn(2, 1, 8, 8, generator=g), torch.rand(2, generator=g), torch.tensor([1, 7])
    from megatron.core import parallel_state

    out = model(x, t, y) if parallel_state.is_pipeline_last_stage() and parallel_state.get_pipeline_model_parallel_world_size() == 1 else None
    return {"out": out.detach() if out is not None else None, "x": x, "t": t, "y": y}


def test_ep2_training_resume_and_resharding(tmp_path, digits_dir):
    run = tmp_path / "ep2"
    results = run_distributed(_train, 2, digits_dir, run, 4, {"expert": 2}, timeout=300)
    assert all(r["code"] == 0 for r in results)
    for a, b in zip(results[0]["thresholds"], results[1]["thresholds"]):
        assert torch.equal(a, b)  # averaged over the data-parallel group every step
    rows = _metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(r.get("dp/threshold_max_diff", 0.0) == 0.0 for r in rows)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    # the same interval record as the other engines (base Trainer._write_interval): world size = GPUs/ranks
    assert all(r["world_size"] == 2 and r["images_seen"] == r["step"] * 8 for r in rows)
    assert all(any(k.startswith("data/") for k in r) for r in rows)

    # exact resume: from step 2 to 4 equals the uninterrupted run
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(run / "checkpoints" / "step_0000002", resumed / "checkpoints" / "step_0000002")
    (resumed / "checkpoints" / "latest").write_text("step_0000002\n")
    run_distributed(_train, 2, digits_dir, resumed, 4, {"expert": 2}, timeout=300)
    from safetensors.torch import load_file

    a = load_file(str(run / "checkpoints" / "step_0000004" / "model.safetensors"))
    b = load_file(str(resumed / "checkpoints" / "step_0000004" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in _metrics(resumed)] == [r["loss"] for r in rows[2:]]

    # resharding: the EP=2 checkpoint at TP=2 and on one rank gives the canonical model's outputs
    ckpt = run / "checkpoints" / "step_0000004"
    from moedit.train.checkpoint import load_for_inference

    canonical, _ = load_for_inference(ckpt, use_ema=False)
    tp2 = run_distributed(_load_outputs, 2, digits_dir, tmp_path / "tp2", ckpt,
                          {"tensor": 2, "sequence_parallel": True}, timeout=300)
    one = run_distributed(_load_outputs, 1, digits_dir, tmp_path / "one", ckpt, {}, timeout=300)
    for r in tp2 + one:
        expected = canonical.eval()(r["x"], r["t"], r["y"])
        torch.testing.assert_close(r["out"], expected, rtol=1e-5, atol=1e-6)

    # the Megatron run's checkpoint samples with the ordinary tool
    import subprocess
    import sys

    grid = tmp_path / "grid.png"
    subprocess.run([sys.executable, "-m", "moedit.cli", "sample", str(ckpt), "--num-samples", "4", "--steps", "2",
                    "--device", "cpu", "--out", str(grid)], check=True, capture_output=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert grid.stat().st_size > 0


def test_tp2_ep2_checkpoint_reshards_to_ep2_and_resumes(tmp_path, digits_dir):
    """Issue 12 on CPU: TP=2 x EP=2 (4 ranks) saves a checkpoint that EP=2 (2 ranks) loads with the
    canonical model's outputs and trains on from. Before the experts' replica id was fixed, some
    expert slices had no main replica at TP x EP: the canonical files held zeros there."""
    run = tmp_path / "tp2-ep2"
    layout = {"tensor": 2, "expert": 2, "sequence_parallel": True}
    results = run_distributed(_train, 4, digits_dir, run, 2, layout, timeout=400)
    assert all(r["code"] == 0 for r in results)
    ckpt = run / "checkpoints" / "step_0000002"
    from moedit.train.checkpoint import load_for_inference

    canonical, _ = load_for_inference(ckpt, use_ema=False)
    experts = [p for name, p in canonical.named_parameters() if ".experts." in name and name.endswith("weight")]
    assert experts and all(bool((p.abs().amax(dim=tuple(range(1, p.dim()))) > 0).all()) for p in experts)
    ep2 = run_distributed(_load_outputs, 2, digits_dir, tmp_path / "load", ckpt, {"expert": 2}, timeout=300)
    for r in ep2:
        torch.testing.assert_close(r["out"], canonical.eval()(r["x"], r["t"], r["y"]), rtol=1e-5, atol=1e-6)

    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(ckpt, resumed / "checkpoints" / "step_0000002")
    (resumed / "checkpoints" / "latest").write_text("step_0000002\n")
    assert all(r["code"] == 0 and r["step"] == 3
               for r in run_distributed(_train, 2, digits_dir, resumed, 3, {"expert": 2}, timeout=300))
    rows = _metrics(resumed)
    assert [r["step"] for r in rows] == [3] and torch.isfinite(torch.tensor(rows[0]["loss"]))


def test_pp2_training_loss_is_finite_and_thresholds_agree(tmp_path, digits_dir):
    run = tmp_path / "pp2"
    results = run_distributed(_train, 2, digits_dir, run, 2, {"pipeline": 2, "num_microbatches": 2}, timeout=300)
    assert all(r["code"] == 0 for r in results)
    rows = _metrics(run)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["loss"] > 0 for r in rows)
    # the canonical checkpoint holds every block although each rank held half of them
    from moedit.train.checkpoint import load_for_inference

    model, _ = load_for_inference(run / "checkpoints" / "step_0000002", use_ema=False)
    assert len(model.blocks) == 4


def test_megatron_engine_on_cpu_is_refused_with_the_reason(monkeypatch):
    from moedit.engines import build_engine
    from moedit.errors import MoeditError
    from moedit.engines.config import ParallelConfig

    monkeypatch.delenv("MOEDIT_MEGATRON_CPU", raising=False)
    with pytest.raises(MoeditError, match="parallel.engine = megatron needs CUDA"):
        build_engine(ParallelConfig(engine="megatron"), "cpu", environ={})


def test_virtual_pipeline_is_a_named_error(tmp_path, digits_dir):
    """The interleaved schedule needs one model chunk per virtual stage; the engine builds one per stage,
    so it refuses the key before building anything (it used to stop in Megatron with an assertion)."""
    results = run_distributed(_setup_error, 2, digits_dir, tmp_path / "vpp",
                              {"pipeline": 2, "virtual_pipeline": 2, "num_microbatches": 2}, timeout=300)
    assert all(r.startswith("parallel.virtual_pipeline = 2: the megatron engine builds one model chunk")
               for r in results), results


def _setup_error(rank, world_size, digits_dir, run_dir, parallel):
    os.environ["MOEDIT_MEGATRON_CPU"] = "1"
    from moedit.errors import MoeditError
    from moedit.train.trainer import Trainer

    try:
        Trainer(_config(digits_dir, run_dir, 1, **parallel)).setup()
    except MoeditError as exc:
        return str(exc)
    return "no error"


def _static_steps(rank, world_size, digits_dir, run_dir, graphed):
    """Six steps of the megatron engine in one process, the rate in a tensor; `graphed`: after two
    eager steps on static inputs and outputs (the CPU stand-in of train.cuda_graph's replay)."""
    os.environ["MOEDIT_MEGATRON_CPU"] = "1"
    from test_train_failures import poison_batch  # tests/test_train_failures.py

    from moedit.train.trainer import Trainer

    cfg = _config(digits_dir, run_dir, 6)
    cfg.train.on_nonfinite, cfg.checkpoint.every = "skip", 1000
    trainer = Trainer(cfg).setup()
    assert trainer.engine.graph_capturable and trainer._deferred
    if graphed:  # also makes Megatron DDP's gradient hooks anew (engine.prepare_capture): they must fire once
        trainer._step_graph = trainer._new_step_graph(capture=False)
        ddp = trainer.engine.wrapped  # one live accumulator per parameter: the new one, holding the hook
        params = [p for p in ddp.module.parameters() if p.requires_grad]
        assert len(ddp.grad_accs) == len(params)
        assert all(p.expand_as(p).grad_fn.next_functions[0][0] is a for p, a in zip(params, ddp.grad_accs))
    else:  # the rate in a tensor, as the graph holds it (torch's CPU fused AdamW rounds a float one otherwise)
        trainer._rate_in_tensor()
    poison_batch(trainer, {3})
    assert trainer.fit() == 0
    engine = trainer.engine
    state = {f"model.{k}": v.detach().clone() for k, v in trainer.model.state_dict().items() if v is not None}
    state.update({f"ema.{i}": e.clone() for i, (e, _) in enumerate(engine._ema_pairs)})
    for i, moments in enumerate(engine.optimizer.state.values()):
        state.update({f"optim.{i}.{k}": v.clone() for k, v in moments.items()})
    return {"state": state, "skipped": trainer.skipped_steps,
            "rows": [{k: v for k, v in r.items() if "per_s" not in k and "wait" not in k} for r in _metrics(run_dir)]}


def test_megatron_static_step_trains_bitwise_as_its_eager_step(tmp_path, digits_dir):
    """train.cuda_graph on the megatron engine (one process, torch AdamW): the step on static inputs
    and outputs ends in the eager step's weights, EMA, optimizer state, rows and skip count, with a
    NaN batch in a static step."""
    eager, graphed = (run_distributed(_static_steps, 1, digits_dir, tmp_path / str(g), g, timeout=300)[0]
                      for g in (False, True))
    assert eager["skipped"] == graphed["skipped"] == 1 and eager["rows"] == graphed["rows"]
    a, b = eager["state"], graphed["state"]
    assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == []
