"""`moedit evaluate` end to end on a real tiny trained run, with the random test network:
the JSON and TensorBoard scalars, 2 gloo processes = 1 process, and resume after a crash
without sampling anything twice."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from moedit.eval import FEATURES
from moedit.eval.cli import cli
from moedit.eval.features import RandomTestFeatures
from moedit.eval.sampling import SamplingPlan

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
SETTINGS = ["--features", "random-test", "--num-samples", "64", "--steps", "4", "--chunk-size", "16",
            "--batch-size", "8", "--ref-num-samples", "200", "--pr-num-samples", "32", "--quiet"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, digits_dir):
    run = tmp_path_factory.mktemp("eval") / "run"
    subprocess.run(
        [sys.executable, "-m", "moedit.cli", "train", "configs/quickstart.yaml", f"train.run_dir={run}",
         f"data.path={digits_dir}", "train.steps=20", "model.depth=2", "logging.tensorboard=false",
         "train.num_sample_images=0", "train.sample_every=0", "checkpoint.every=20"],
        check=True, capture_output=True, env=ENV, cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    return run


@pytest.fixture(scope="module")
def baseline(tiny_run):
    """One uninterrupted single-process evaluation through the command line."""
    proc = subprocess.run([sys.executable, "-m", "moedit.eval.cli", str(tiny_run), *SETTINGS, "--name", "base"],
                          capture_output=True, text=True, env=ENV)
    assert proc.returncode == 0, proc.stderr
    return tiny_run / "eval" / "base" / "step_0000020"


def load_npz(path):
    with np.load(path) as data:
        return {key: data[key] for key in data.files}


def test_evaluate_writes_json_statistics_and_tensorboard_scalars(tiny_run, baseline):
    result = json.loads(baseline.with_suffix(".json").read_text())
    metrics = result["metrics"]
    assert set(metrics) == {"fid", "sfid", "inception_score", "inception_score_std", "precision", "recall"}
    assert metrics["fid"] > 0 and metrics["sfid"] > 0 and metrics["inception_score"] >= 1
    assert 0 <= metrics["precision"] <= 1 and 0 <= metrics["recall"] <= 1
    info = json.loads((tiny_run / "model_info.json").read_text())
    assert (result["step"], result["images_seen"], result["num_samples"]) == (20, 20 * 64, 64)
    # the batch and guidance batching decide a DiffMoE layer's routing pool: both are part of the result
    assert (result["batch_size"], result["cfg_batching"], result["cfg_scale"]) == (8, "joint", 3.0)
    assert result["train_flops"] == pytest.approx(info["train_gflops_per_image"] * 1e9 * 20 * 64)
    assert result["reference"]["num_samples"] == 200 and result["reference"]["kind"] == "shards"
    stats = load_npz(baseline.with_suffix(".npz"))
    assert int(stats["count"]) == 64 and stats["pool_features"].shape == (32, 16)
    assert not baseline.with_suffix(".work").exists()  # the resume state is removed once the result is written

    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    scalars = {}
    for events in (tiny_run / "tb").glob("events.*"):
        for event in EventFileLoader(str(events)).Load():
            for value in event.summary.value:
                number = value.tensor.float_val[0] if value.tensor.float_val else value.simple_value
                scalars[value.tag] = (event.step, float(number))
    assert scalars["eval/base/fid"] == (20, pytest.approx(metrics["fid"], rel=1e-6))


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_gloo_processes_give_the_statistics_of_one(tiny_run, baseline, tmp_path):
    port = str(free_port())
    procs = [
        subprocess.Popen([sys.executable, "-m", "moedit.eval.cli", str(tiny_run), *SETTINGS, "--name", "ws2",
                          "--ref-cache", str(tmp_path / "ref2")],
                         env={**ENV, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
                              "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for rank in range(2)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    two = tiny_run / "eval" / "ws2" / "step_0000020"
    # Samples (chunks 0, 2 on rank 0; 1, 3 on rank 1) and the reference (split by index) match.
    references = (next((tmp_path / "ref2").glob("*.npz")), next((tiny_run / "eval" / "reference").glob("*.npz")))
    for ours, theirs in ((two.with_suffix(".npz"), baseline.with_suffix(".npz")), references):
        a, b = load_npz(ours), load_npz(theirs)
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_allclose(a[key], b[key], rtol=1e-9, atol=1e-12, err_msg=key)
    got = json.loads(two.with_suffix(".json").read_text())
    want = json.loads(baseline.with_suffix(".json").read_text())
    assert got["world_size"] == 2
    for key, value in want["metrics"].items():
        assert got["metrics"][key] == pytest.approx(value, rel=1e-7, abs=1e-12), key


class CountingFeatures(RandomTestFeatures):
    """The test network, counting images; raises on the `crash_at`-th call (a simulated crash)."""

    def __init__(self, crash_at=None):
        super().__init__()
        self.calls, self.images, self.crash_at = 0, 0, crash_at

    def forward(self, images):
        self.calls += 1
        if self.calls == self.crash_at:
            raise RuntimeError("simulated crash")
        self.images += len(images)
        return super().forward(images)


def test_resume_after_a_crash_samples_each_image_once(tiny_run, baseline, monkeypatch, capsys):
    args = [str(tiny_run), *SETTINGS, "--name", "resumed", "--no-tensorboard"]
    work = tiny_run / "eval" / "resumed" / "step_0000020.work"
    # The reference is cached by the baseline, so every network call is a sampling batch:
    # 2 batches per chunk; the 6th call is the second batch of chunk 2.
    crashing = CountingFeatures(crash_at=6)
    monkeypatch.setitem(FEATURES, "random-test", lambda weights: crashing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        cli(args)
    state = torch.load(work / "state_rank00000.pt", weights_only=True)
    assert state["chunks"] == [0, 1] and int(state["stats"]["pool_count"]) == 32

    assert cli([*args[:-1], "--batch-size", "16"]) == 2  # resuming with other settings is refused
    assert "batch_size" in capsys.readouterr().err

    resuming = CountingFeatures()
    monkeypatch.setitem(FEATURES, "random-test", lambda weights: resuming)
    assert cli(args) == 0
    assert resuming.images == 32  # chunks 2 and 3 only: the half-done chunk 2 is redone whole
    resumed, base = load_npz(work.with_suffix(".npz")), load_npz(baseline.with_suffix(".npz"))
    for key in base:
        np.testing.assert_allclose(resumed[key], base[key], rtol=1e-12, atol=1e-12, err_msg=key)


def test_chunks_cover_every_index_once_with_class_balanced_labels():
    plan = SamplingPlan(num_samples=53, chunk_size=8, batch_size=4, seed=3, num_classes=10, latent_shape=(1, 8, 8),
                        sampler="euler", steps=2, cfg_scale=1.0, guidance_channels=None)
    for world in (1, 2, 3, 8):
        indices = [i for rank in range(world) for c in plan.chunks_of(rank, world) for i in range(*plan.chunk_range(c))]
        assert sorted(indices) == list(range(53))
    labels = torch.cat([plan.labels(*plan.chunk_range(c)) for c in range(plan.num_chunks)])
    assert torch.bincount(labels).tolist() == [6, 6, 6, 5, 5, 5, 5, 5, 5, 5]
    assert len({plan.chunk_seed(c) for c in range(plan.num_chunks)}) == plan.num_chunks
