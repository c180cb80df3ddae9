"""`moedit sample` and `moedit evaluate` on a real tiny text-to-image run (tiny-diffmoe-t trained 2 steps
by `moedit train` on the built-in digits_text, whose captions the random stand-in encoder encodes):
prompts in the grid and JSON, determinism, prompt p's images equal moedit.eval.sampling's with that
prompt exactly, --prompts-file = the same --prompt list, the named errors, evaluate's prompts, and
the per-prompt expert load summing to the model's own count."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from moedit import cli
from moedit.eval.cli import cli as evaluate_cli

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
PROMPTS = ["a handwritten 7", "the digit three"]
SAMPLE = ["--per-prompt", "3", "--steps", "2", "--batch-size", "2", "--seed", "5"]


def train(path, model: dict, data: dict):
    config = {
        "model": {"input_size": 8, "in_channels": 1, "patch_size": 2, "learn_sigma": False, **model},
        "diffusion": {"objective": "flow", "sample_steps": 2, "cfg_scale": 2.0},
        "data": {"num_workers": 0, **data},
        "optim": {"lr": 3.0e-2, "warmup_steps": 0},  # 2 large steps: the zero-initialised cross-attention moves
        "train": {"run_dir": str(path / "run"), "steps": 2, "global_batch_size": 8, "num_sample_images": 0},
        "checkpoint": {"every": 2},
        "logging": {"log_every": 1, "tensorboard": False, "progress": "none"},
    }
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    proc = subprocess.run([sys.executable, "-m", "moedit.cli", "train", str(path / "config.yaml")],
                          capture_output=True, text=True, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return path / "run"


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("t2i")
    return train(path, {"flavor": "tiny-diffmoe-t"}, {"path": str(path / "data"), "prepare": "digits_text"})


@pytest.fixture(scope="module")
def class_run(tmp_path_factory, digits_dir):
    return train(tmp_path_factory.mktemp("class"), {"flavor": "tiny-diffmoe", "num_classes": 10},
                 {"path": str(digits_dir)})


def sample(run, out, *args) -> int:
    return cli.main(["sample", str(run), "--out", str(out), *args])


def prompt_args(prompts=PROMPTS) -> list[str]:
    return [a for p in prompts for a in ("--prompt", p)]


def npz(path) -> dict:
    with np.load(path) as data:
        return {key: data[key] for key in data.files}


@pytest.fixture(scope="module")
def sampled(text_run, tmp_path_factory):
    """Two invocations with the same settings and seed, one with another seed."""
    out = tmp_path_factory.mktemp("samples")
    for name, seed in (("a", "5"), ("b", "5"), ("c", "6")):
        args = [*SAMPLE[:-1], seed, "--save-npz", str(out / f"{name}.npz")]
        assert sample(text_run, out / f"{name}.png", *prompt_args(), *args) == 0
    return out


def test_sample_writes_a_captioned_grid_and_json_with_the_prompts(text_run, sampled):
    info = json.loads((sampled / "a.json").read_text())
    assert info["prompts"] == PROMPTS and info["per_prompt"] == 3 and info["num_samples"] == 6
    assert info["prompt_index"] == [0, 0, 0, 1, 1, 1] and info["classes"] is None
    manifest = json.loads((text_run.parent / "data" / "dataset.json").read_text())
    assert info["text_encoder"]["path"] == manifest["text_encoder"]["path"]
    assert info["text_encoder"]["max_length"] == manifest["text_encoder"]["max_length"] == 16
    assert (info["cfg_scale"], info["cfg_batching"], info["batch_size"], info["steps"]) == (2.0, "joint", 2, 2)
    # per prompt: batches of 2 + 1 images x 2 Euler steps, each a joint call of 2B rows, half of them null
    calls = info["capacity_per_call"]
    assert [(c["prompt"], c["batch"], c["rows"], c["null_rows"]) for c in calls] == \
        [(p, 2 * p + b, rows, rows // 2) for p in (0, 1) for b, rows in ((0, 4), (1, 2)) for _ in range(2)]
    grid = np.asarray(Image.open(sampled / "a.png"))
    tile = 8 * 8  # 8x8 digits enlarged to 64 px
    strip = tile + 2 * 2  # one row of images with its padding
    assert grid.shape[0] == 2 * (16 + strip) and grid.shape[1] >= 3 * (tile + 2) + 2
    label = grid[:16]  # prompt 0's caption line: dark text on white
    assert (label < 128).any() and (label == 255).mean() > 0.5
    saved = npz(sampled / "a.npz")
    assert saved["images"].shape == (6, 1, 8, 8) and saved["latents"].shape == (6, 1, 8, 8)
    assert saved["prompt_index"].tolist() == info["prompt_index"] and saved["prompts"].tolist() == PROMPTS


def test_the_same_seed_gives_the_same_images(sampled):
    a, b, c = (npz(sampled / f"{n}.npz") for n in "abc")
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert (sampled / "a.png").read_bytes() == (sampled / "b.png").read_bytes()
    assert not np.array_equal(a["latents"], c["latents"])


def test_prompt_images_equal_eval_sampling_with_that_prompt(text_run, sampled):
    from moedit.data.text import encode_captions
    from moedit.diffusion import build_diffusion
    from moedit.eval.sampling import Captions, SamplingPlan, sample_chunk
    from moedit.train.checkpoint import load_for_inference

    model, cfg = load_for_inference(str(text_run), use_ema=True, device="cpu")
    diffusion = build_diffusion(cfg.diffusion)
    encoder = json.loads((text_run.parent / "data" / "dataset.json").read_text())["text_encoder"]
    saved = npz(sampled / "a.npz")
    for p, prompt in enumerate(PROMPTS):
        text, mask = encode_captions(encoder["path"], [prompt], max_length=encoder["max_length"])
        captions = Captions(text.half(), mask)
        plan = SamplingPlan(num_samples=3, chunk_size=3, batch_size=2, seed=5, num_classes=0, latent_shape=(1, 8, 8),
                            sampler="euler", steps=2, cfg_scale=2.0, guidance_channels=None,
                            captions=captions.digest())
        latents = torch.cat([z for z, _ in sample_chunk(plan, 0, model.eval(), diffusion, lambda z: z,
                                                        torch.device("cpu"), captions)])
        assert torch.equal(torch.from_numpy(saved["latents"][3 * p:3 * p + 3]), latents), prompt
    # the caption matters: the same noise under the two prompts gives other latents
    assert not np.array_equal(saved["latents"][:3], saved["latents"][3:])


def test_prompts_file_equals_the_same_prompt_list(text_run, sampled, tmp_path):
    listed = tmp_path / "prompts.txt"
    listed.write_text(f"# digits\n\n{PROMPTS[0]}\n   \n# another\n{PROMPTS[1]}\n")
    assert sample(text_run, tmp_path / "f.png", "--prompts-file", str(listed), *SAMPLE,
                  "--save-npz", str(tmp_path / "f.npz")) == 0
    assert (tmp_path / "f.png").read_bytes() == (sampled / "a.png").read_bytes()
    a, f = npz(sampled / "a.npz"), npz(tmp_path / "f.npz")
    assert all(np.array_equal(a[k], f[k]) for k in a)
    # --prompt first, then the file; --num-samples must split evenly over the prompts
    assert sample(text_run, tmp_path / "g.png", "--prompt", "a handwritten 1", "--prompts-file", str(listed),
                  "--num-samples", "3", "--steps", "1") == 0
    info = json.loads((tmp_path / "g.json").read_text())
    assert info["prompts"] == ["a handwritten 1", *PROMPTS] and info["per_prompt"] == 1


@pytest.mark.parametrize("run_name, args, message", [
    ("class_run", ["--prompt", "a handwritten 7"], "--prompt/--prompts-file: this run is conditioned on class"),
    ("text_run", ["--classes", "1,2"], "--classes 1,2: this run is a text-to-image model"),
    ("text_run", [], "give captions with --prompt TEXT or --prompts-file FILE"),
    ("text_run", ["--prompt", "a 7", "--text-encoder", "/no/such/encoder"],
     "text encoder /no/such/encoder (from --text-encoder) not found: pass --text-encoder DIR"),
    ("text_run", ["--prompt", "a 7", "--prompt", "a 1", "--num-samples", "3"],
     "--num-samples 3: a text run samples the same number of images for each of its 2 prompt(s)"),
    ("text_run", ["--prompts-file", "/no/such/prompts.txt"], "--prompts-file /no/such/prompts.txt: no such file"),
])
def test_named_errors(request, run_name, args, message, tmp_path, capsys):
    run = request.getfixturevalue(run_name)
    assert sample(run, tmp_path / "x.png", "--steps", "1", *args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "x.png").exists()


def test_missing_manifest_encoder_names_the_path_and_the_flag(text_run, tmp_path, capsys):
    manifest_file = text_run.parent / "data" / "dataset.json"
    original = manifest_file.read_text()
    manifest = json.loads(original)
    manifest["text_encoder"]["path"] = str(tmp_path / "moved")
    manifest_file.write_text(json.dumps(manifest))
    try:
        assert sample(text_run, tmp_path / "x.png", "--prompt", "a 7", "--steps", "1") == 2
    finally:
        manifest_file.write_text(original)
    err = capsys.readouterr().err
    assert f"text encoder {tmp_path / 'moved'} (from {manifest_file}) not found: pass --text-encoder DIR" in err
    # the flag overrides the manifest's entry
    manifest_file.write_text(json.dumps(manifest))
    try:
        assert sample(text_run, tmp_path / "y.png", "--prompt", "a 7", "--steps", "1", "--per-prompt", "1",
                      "--text-encoder", json.loads(original)["text_encoder"]["path"]) == 0
    finally:
        manifest_file.write_text(original)
    assert json.loads((tmp_path / "y.json").read_text())["text_encoder"]["source"] == "--text-encoder"


def test_per_prompt_expert_load_sums_to_the_total(sampled):
    info = json.loads((sampled / "a.json").read_text())
    layers = info["routing"]["layers"]
    assert layers and all(layer["tokens_per_expert_by_class"] is None for layer in layers)
    tokens = 16  # (8 / 2)^2 tokens per image
    forwards = 2 * 2 * 3 * 2  # prompts x steps x images per prompt x (conditional + null)
    for layer in layers:
        by_prompt = np.asarray(layer["tokens_per_expert_by_prompt"])  # (P + 1, E), the last row the null caption
        assert by_prompt.shape == (len(PROMPTS) + 1, layer["num_experts"])
        # captured per token vs the layer's own running count: the split adds up to the total load
        assert by_prompt.sum(axis=0).tolist() == layer["tokens_per_expert"]
        assert layer["tokens"] == forwards * tokens
        assert all(by_prompt[p].sum() > 0 for p in range(len(PROMPTS) + 1))


def test_evaluate_takes_a_prompts_file_for_text_runs(text_run, class_run, tmp_path, capsys):
    from moedit.eval.sampling import Captions
    from moedit.data.text import encode_captions

    listed = tmp_path / "prompts.txt"
    listed.write_text("\n".join(["# two digits", *PROMPTS]) + "\n")
    common = ["--features", "random-test", "--num-samples", "6", "--steps", "1", "--chunk-size", "3",
              "--batch-size", "3", "--ref-num-samples", "40", "--pr-num-samples", "6", "--quiet",
              "--no-tensorboard", "--out-dir", str(tmp_path / "eval")]
    assert evaluate_cli([str(text_run), *common, "--name", "p", "--prompts-file", str(listed)]) == 0
    result = json.loads((tmp_path / "eval" / "p" / "step_0000002.json").read_text())
    encoder = json.loads((text_run.parent / "data" / "dataset.json").read_text())["text_encoder"]
    text, mask = encode_captions(encoder["path"], PROMPTS, max_length=encoder["max_length"])
    assert result["prompts"] == PROMPTS and result["prompts_file"] == str(listed.resolve())
    assert result["captions"] == Captions(text.half(), mask).digest() and result["text_encoder"] == encoder["path"]
    assert result["num_samples"] == 6 and result["metrics"]["fid"] is not None
    capsys.readouterr()
    assert evaluate_cli([str(text_run), *common, "--name", "q"]) == 2
    assert "text-to-image model (model.condition = text): pass --prompts-file FILE" in capsys.readouterr().err
    assert evaluate_cli([str(class_run), *common, "--name", "r", "--prompts-file", str(listed)]) == 2
    assert "--prompt/--prompts-file: this run is conditioned on class" in capsys.readouterr().err


def test_routing_report_shows_the_expert_load_by_prompt(text_run, sampled, tmp_path, capsys):
    info = json.loads((sampled / "a.json").read_text())
    assert cli.main(["analyze", "routing", str(text_run), "--samples", str(sampled / "a.json"),
                     "--out", str(tmp_path / "report")]) == 0
    report = json.loads((tmp_path / "report" / "routing_report.json").read_text())
    samples = report["runs"][0]["samples"]
    assert samples["prompts"] == PROMPTS and samples["num_samples"] == 6
    recorded = [layer["tokens_per_expert_by_prompt"] for layer in info["routing"]["layers"]]
    assert [layer["tokens_per_expert_by_prompt"] for layer in samples["layers"]] == recorded
    assert all(layer["mi_prompt_nats"] is not None for layer in samples["layers"])
    markdown = (tmp_path / "report" / "routing_report.md").read_text()
    total = np.sum([np.asarray(t) for t in recorded], axis=0)  # (P + 1, E) over layers
    for name, row in zip([*PROMPTS, "(null caption)"], total):
        assert f"| {name} | {int(row.sum())} |" in markdown
    assert "Prompt x expert routing share" in (tmp_path / "report" / "routing_report.html").read_text()
    capsys.readouterr()
    assert cli.main(["analyze", "routing", str(text_run), "--samples", str(tmp_path / "none.json")]) == 2
    assert "--samples" in capsys.readouterr().err
