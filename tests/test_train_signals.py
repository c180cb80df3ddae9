"""Ctrl-C, the end-of-run samples and loss spikes through the real CLI (issue 27, items 6, 22, 12).

A first Ctrl-C (SIGINT) finishes the step in flight, checkpoints it and exits 130 saying how to
resume; rerunning the same command continues bitwise as the uninterrupted run. A second Ctrl-C
aborts at once. The sample grid at the end of a run is announced with its size and steps."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from test_train_e2e import losses, moedit, tiny_config


def _start(cfg, run, *overrides):
    return subprocess.Popen([sys.executable, "-m", "moedit.cli", "train", str(cfg), f"train.run_dir={run}",
                             *overrides], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def _wait_for_step(proc, run, step: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    path = run / "metrics.jsonl"
    while True:
        rows = path.read_text().splitlines() if path.exists() else []
        if rows and json.loads(rows[-1])["step"] >= step:
            return
        assert proc.poll() is None and time.time() < deadline, "the run ended before the signal could be sent"
        time.sleep(0.01)


def test_first_ctrl_c_checkpoints_and_the_same_command_resumes_exactly(tmp_path, digits_dir):
    cfg = tiny_config(tmp_path, digits_dir, train={"steps": 30, "num_sample_images": 0},
                      checkpoint={"every": 100})  # no periodic checkpoint before the interrupt
    full = tmp_path / "full"
    moedit("train", cfg, f"train.run_dir={full}")
    reference = losses(full)

    run = tmp_path / "interrupted"
    proc = _start(cfg, run)
    _wait_for_step(proc, run, 3)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, out + err
    saved = sorted(p.name for p in (run / "checkpoints").glob("step_*"))
    assert len(saved) == 1 and not (run / "DONE").exists(), saved  # the step in flight, checkpointed
    stopped_at = int(saved[0].split("_")[1])
    assert 3 <= stopped_at < 30
    assert "Ctrl-C again to abort" in err
    assert f"interrupted (Ctrl-C) at step {stopped_at}" in out and "rerun the same command to resume" in out
    assert not (run / "PREEMPTED").exists()  # not a preemption: nothing for the requeue logic

    resumed = moedit("train", cfg, f"train.run_dir={run}")
    assert f"resumed from {run / 'checkpoints' / saved[0]} at step {stopped_at}" in resumed.stdout
    assert losses(run) == reference  # exact: same floats, every step once
    assert (run / "DONE").exists()


def test_second_ctrl_c_aborts_at_once(tmp_path, digits_dir):
    # Large batches make a step last long (about a second on two cores) so the second Ctrl-C lands
    # inside the step the first one asked to finish; it is sent once the first has been acknowledged.
    cfg = tiny_config(tmp_path, digits_dir, train={"steps": 100000, "num_sample_images": 0,
                                                   "global_batch_size": 8192}, checkpoint={"every": 100000})
    run = tmp_path / "run"
    proc = _start(cfg, run)
    _wait_for_step(proc, run, 1)
    proc.send_signal(signal.SIGINT)
    seen = []
    while not any("Ctrl-C: finishing" in line for line in seen):
        line = proc.stderr.readline()
        assert line, "".join(seen)  # stderr closed: the run ended before acknowledging the first Ctrl-C
        seen.append(line)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    err = "".join(seen) + err
    assert proc.returncode == 130, out + err
    assert "moedit train: interrupted" in err
    assert not list((run / "checkpoints").glob("step_*"))  # aborted: no checkpoint of the step in flight


def test_end_of_run_samples_are_announced(tmp_path, digits_dir):
    cfg = tiny_config(tmp_path, digits_dir, train={"steps": 2, "num_sample_images": 4})
    out = moedit("train", cfg, f"train.run_dir={tmp_path / 'run'}").stdout
    assert "sampling 4 images (4 euler steps, EMA weights)" in out  # diffusion.sample_steps = 4
    assert f"samples written to {tmp_path / 'run' / 'samples' / 'step_0000002.png'}" in out


def test_a_diverging_loss_is_reported_once_per_order_of_magnitude(tmp_path, digits_dir):
    # lr 1e4 with clipping: the loss grows by 20 orders of magnitude yet stays finite (measured)
    cfg = tiny_config(tmp_path, digits_dir, train={"steps": 12, "num_sample_images": 0},
                      optim={"lr": 1e4, "grad_clip": 1.0})
    out = moedit("train", cfg, f"train.run_dir={tmp_path / 'run'}").stdout
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert max(r["loss"] for r in rows) > 1e3 * min(r["loss"] for r in rows)  # it did diverge
    warnings = [line for line in out.splitlines() if line.startswith("warning: loss")]
    assert warnings and "check optim.lr (now 1e+04)" in warnings[0]
    assert len(warnings) < len(rows)  # not once per log line
    sane = moedit("train", cfg, f"train.run_dir={tmp_path / 'sane'}", "optim.lr=1e-3").stdout
    assert "warning: loss" not in sane


def test_a_fresh_start_sets_the_earlier_attempts_logs_aside(tmp_path, digits_dir):
    cfg = tiny_config(tmp_path, digits_dir, train={"steps": 4, "num_sample_images": 0},
                      logging={"log_every": 1, "tensorboard": True, "progress": "lines"})
    run = tmp_path / "run"
    moedit("train", cfg, f"train.run_dir={run}", "optim.lr=1e-2")
    first = (run / "metrics.jsonl").read_text()
    events = sorted(p.name for p in (run / "tb").iterdir())
    out = moedit("train", cfg, f"train.run_dir={run}", "train.resume=never").stdout
    previous = sorted((run / "previous").iterdir())
    assert len(previous) == 1 and f"were moved to {previous[0]}" in out and "logged up to step 4" in out
    assert (previous[0] / "metrics.jsonl").read_text() == first  # kept whole, not truncated
    assert sorted(p.name for p in (previous[0] / "tb").iterdir()) == events  # TensorBoard shows one attempt
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert first != (run / "metrics.jsonl").read_text()  # the new attempt's rows (another lr)


def test_a_resume_says_which_rows_past_its_checkpoint_it_drops(tmp_path, digits_dir):
    cfg = tiny_config(tmp_path, digits_dir, train={"steps": 8, "num_sample_images": 0},
                      checkpoint={"every": 4, "keep_last": 5})
    run = tmp_path / "run"
    moedit("train", cfg, f"train.run_dir={run}")
    reference = losses(run)
    import shutil

    # as if the attempt had been killed after logging step 7, before its step-8 checkpoint
    shutil.rmtree(run / "checkpoints" / "step_0000008")
    (run / "checkpoints" / "latest").write_text("step_0000004\n")
    (run / "DONE").unlink()
    out = moedit("train", cfg, f"train.run_dir={run}").stdout
    assert "resuming at step 4: dropped 4 metrics row(s) past it" in out
    assert losses(run) == reference  # every step once, the same numbers
