"""Expert load against the REPA similarity per token (issue 26, analysis): the metrics against a
hand-computed example, the probe's per-token similarity against the model's own REPA term, and
`moedit analyze routing --probe` end to end on a tiny REPA run trained with `moedit train` (the
report's REPA section in JSON, Markdown and HTML, replayed from a trace), the section of a run
trained with train.repa.encoder (targets the probe computes from the pixels); no section without REPA."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import yaml

from moedit.analysis.routing import metrics as rm
from moedit.analysis.routing.accumulate import RoutingAccumulator
from moedit.cli import main as moedit_main
from conftest import write_config  # tests/conftest.py

# Six tokens, E = 2, three quantile bins of two tokens each (cells 49, 80 | 110, 130 | 160, 190).
SIMILARITY = np.array([-0.505, -0.195, 0.105, 0.305, 0.605, 0.905])
SELECTED = np.array([[0, 0], [1, 0], [1, 0], [0, 1], [1, 1], [0, 1]], bool)  # experts per token 0,1,1,1,2,1


def _record(selected, block=1):
    tokens = selected.shape[0]
    return {"block": block, "router": "diffmoe", "num_experts": selected.shape[1], "selected": selected,
            "noise_level": np.full(tokens, 0.5), "labels": np.zeros(tokens), "scores": None}


def test_metrics_against_a_hand_computed_example():
    acc = RoutingAccumulator([0.0, 1.0], capacity=1.0, similarity_bins=3)
    # two forwards of three tokens: the counters are sums over forwards
    acc.update([_record(SELECTED[:3])], similarity=SIMILARITY[:3])
    acc.update([_record(SELECTED[3:])], similarity=torch.tensor(SIMILARITY[3:]))
    repa = acc.result()["repa"]
    assert repa["bins"] == 3 and repa["tokens_by_bin"] == [2, 2, 2]
    assert repa["similarity_edges"] == [-0.51, -0.19, 0.31, 0.91]  # lower cell edges, 0.01 grid
    assert repa["mean_similarity"] == pytest.approx(SIMILARITY.mean())
    layer = repa["layers"][0]
    assert layer["load_by_bin"] == [[1, 0], [1, 1], [1, 2]]
    assert np.allclose(layer["share_by_bin"], [[2, 0], [1, 1], [2 / 3, 4 / 3]])  # x E: 1 = fair share
    assert layer["experts_per_token_by_bin"] == [0.5, 1.0, 1.5]
    # expert 0 takes tokens 1, 2, 4; expert 1 tokens 3, 4, 5
    assert layer["mean_similarity_by_expert"] == pytest.approx([(-0.195 + 0.105 + 0.605) / 3,
                                                                (0.305 + 0.605 + 0.905) / 3])
    # k - mean(k) is -1 at token 0, +1 at token 4, 0 elsewhere: cov = (s4 - s0) / 6, var k = 1/3
    r = (0.605 + 0.505) / 6 / math.sqrt(np.var(SIMILARITY) / 3)
    assert layer["corr_similarity_experts"] == pytest.approx(r)
    # joint (bin, expert) = [[1, 0], [1, 1], [1, 2]] / 6; rows 1/6, 2/6, 3/6; columns 1/2, 1/2
    mi = math.log(2) / 6 + math.log(2 / 3) / 6 + math.log(4 / 3) / 3
    assert layer["mi_nats"] == pytest.approx(mi)


def test_quantile_bins_merge_ties_and_constant_expert_counts_have_no_correlation():
    assert rm.quantile_bin_cells(np.zeros(rm.SIMILARITY_CELLS), 4) == []
    tokens = np.zeros(rm.SIMILARITY_CELLS)
    tokens[150] = 10  # every token at s = 0.5: one bin, however many are asked for
    assert rm.quantile_bin_cells(tokens, 5) == [150, 151]
    tokens[20] = 10  # half at -0.8: two bins
    assert rm.quantile_bin_cells(tokens, 4) == [20, 21, 151]
    # top-1 token choice: every token has one expert, r(s, k) is undefined; MI is 0 for a
    # choice independent of the bin and log 2 for expert = bin
    acc = RoutingAccumulator([0.0, 1.0], top_k=1, similarity_bins=2)
    s = np.array([-0.3, -0.2, 0.4, 0.5])
    acc.update([_record(np.eye(2, dtype=bool)[[0, 1, 0, 1]]), _record(np.eye(2, dtype=bool)[[0, 0, 1, 1]], 3)],
               similarity=s)
    independent, bijection = acc.result()["repa"]["layers"]
    assert independent["corr_similarity_experts"] is None
    assert independent["mi_nats"] == pytest.approx(0.0, abs=1e-12)
    assert bijection["mi_nats"] == pytest.approx(math.log(2))
    with pytest.raises(ValueError, match="REPA similarities"):
        acc.update([_record(SELECTED)], similarity=s)


def _write_config(tmp_path, name, repa: bool):
    cfg = {"model": {"flavor": "tiny-diffmoe", "input_size": 8, "in_channels": 1, "patch_size": 1,
                     "learn_sigma": False},
           "data": {"path": str(tmp_path / "digits_repa"), "prepare": "digits_repa", "num_workers": 0},
           "train": {"run_dir": str(tmp_path / name), "steps": 4, "global_batch_size": 8,
                     "num_sample_images": 0, "sample_every": 0,
                     "repa": {"enabled": repa, "projector_hidden": 32}},
           "optim": {"lr": 2e-3},
           "checkpoint": {"every": 4},
           "logging": {"log_every": 2, "tensorboard": False, "progress": "none"}}
    return write_config(tmp_path / f"{name}.yaml", cfg)


@pytest.fixture(scope="module")
def repa_run(tmp_path_factory):
    """A tiny DiffMoE trained 4 steps with REPA on the digits with random:32 features."""
    tmp = tmp_path_factory.mktemp("routing_repa")
    assert moedit_main(["train", str(_write_config(tmp, "repa", True))]) == 0
    return tmp / "repa"


def _analyze(capsys, *argv):
    rc = moedit_main(["analyze", "routing", *map(str, argv)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    return captured


def test_probe_similarity_matches_the_models_repa_term(repa_run):
    """The probe loads the projector from the checkpoint (inference loads strip it) and its per-token
    similarity averages to minus the term the model's own forward computes with the same target."""
    from moedit.analysis.routing import probe as routing_probe

    model, cfg = routing_probe.load_model(repa_run, torch.device("cpu"))
    assert cfg.model.has_repa and model.repa_projector is not None
    g = torch.Generator().manual_seed(0)
    m = cfg.model
    x = torch.randn(3, m.in_channels, m.input_size, m.input_size, generator=g)
    target = torch.randn(3, m.num_tokens, m.repa_dim, generator=g)
    repa = routing_probe.RepaSimilarity(model)
    repa.target = target
    with torch.no_grad():
        model(x, torch.full((3,), 0.4), torch.tensor([1, 2, 3]), repa_target=target)
    similarity = repa.take()
    repa.close()
    assert similarity.shape == (3 * m.num_tokens,) and repa.take() is None
    assert float(similarity.mean()) == pytest.approx(-float(model.last_repa), abs=1e-6)
    assert float(similarity.abs().max()) <= 1.0 + 1e-6


def test_report_has_a_repa_section_with_consistent_numbers(repa_run, tmp_path, capsys):
    trace = tmp_path / "trace.npz"
    _analyze(capsys, repa_run, "--out", tmp_path / "report", "--probe", "--noise-levels", "0.25,0.75",
             "--num-samples", 16, "--batch-size", 8, "--device", "cpu", "--repa-bins", 4, "--trace", trace)
    report = json.loads((tmp_path / "report" / "routing_report.json").read_text())
    probe = report["runs"][0]["probe"]
    repa = probe["repa"]
    assert repa["depth"] == 1 and repa["field"] == "repa"  # tiny-diffmoe: max(1, round(depth * 8 / 28))
    tokens = 16 * 2 * 64  # samples x noise levels x tokens
    assert repa["tokens"] == tokens and sum(repa["tokens_by_bin"]) == tokens
    assert 1 <= repa["bins"] <= 4 and len(repa["similarity_edges"]) == repa["bins"] + 1
    assert all(-1 <= e <= 1 for e in repa["similarity_edges"]) and -1 <= repa["mean_similarity"] <= 1
    assert [m["block"] for m in repa["layers"]] == [m["block"] for m in probe["layers"]]
    for section, layer in zip(repa["layers"], probe["layers"]):
        load_by_bin = np.array(section["load_by_bin"])  # (bins, E)
        # every (token, expert) assignment falls in exactly one similarity bin
        assert load_by_bin.sum(axis=0).tolist() == layer["load"]
        assert load_by_bin.sum() == sum(layer["load"])
        assert section["tokens"] == layer["tokens"] == tokens
        shares = np.array(section["share_by_bin"], dtype=float)
        assert np.allclose(shares.sum(axis=1), layer["num_experts"])  # each row: shares x E
        per_token = np.array(section["experts_per_token_by_bin"]) * np.array(repa["tokens_by_bin"])
        assert np.allclose(per_token, load_by_bin.sum(axis=1))
        means = [v for v in section["mean_similarity_by_expert"] if v is not None]
        assert means and all(-1 <= v <= 1 for v in means)
        assert section["corr_similarity_experts"] is None or -1 <= section["corr_similarity_experts"] <= 1
        assert section["mi_nats"] >= 0
    markdown = (tmp_path / "report" / "routing_report.md").read_text()
    assert "### REPA similarity" in markdown and "| s bin | similarity | tokens | experts/token |" in markdown
    html = (tmp_path / "report" / "routing_report.html").read_text()
    assert "<h3>REPA similarity</h3>" in html and "REPA similarity bin x expert routing share" in html
    # the trace keeps each token's similarity: the replay gives the same section
    _analyze(capsys, repa_run, "--from-trace", trace, "--out", tmp_path / "replay", "--no-html", "--repa-bins", 4)
    replay = json.loads((tmp_path / "replay" / "routing_report.json").read_text())["runs"][0]["probe"]["repa"]
    assert replay["depth"] == 1 and replay["similarity_edges"] == repa["similarity_edges"]
    assert [m["load_by_bin"] for m in replay["layers"]] == [m["load_by_bin"] for m in repa["layers"]]


def test_no_repa_section_without_repa(repa_run, tmp_path, capsys):
    """A run trained without REPA (on the same shards, which hold the field), the exported (stripped)
    REPA model and a trajectory probe (no clean images) have no REPA section."""
    from moedit.train.checkpoint import export_safetensors, latest_checkpoint

    assert moedit_main(["train", str(_write_config(repa_run.parent, "plain", False))]) == 0
    exported = export_safetensors(latest_checkpoint(repa_run / "checkpoints"), tmp_path / "m.safetensors")
    cases = {"plain": [repa_run.parent / "plain"], "exported": [repa_run, "--checkpoint", exported],
             "trajectory": [repa_run, "--trajectory", "--sampling-steps", 2]}
    for name, argv in cases.items():
        captured = _analyze(capsys, *argv, "--out", tmp_path / name, "--probe", "--num-samples", 4,
                            "--batch-size", 4, "--device", "cpu", "--noise-levels", "0.5")
        probe = json.loads((tmp_path / name / "routing_report.json").read_text())["runs"][0]["probe"]
        assert probe["layers"] and "repa" not in probe, name
        assert "REPA similarity" not in (tmp_path / name / "routing_report.md").read_text(), name
        assert ("no REPA similarity for sampling trajectories" in captured.err) == (name == "trajectory")


def test_probe_computes_the_targets_of_a_run_trained_with_an_encoder(repa_run, tmp_path, capsys):
    """A run trained with train.repa.encoder = random:32 on plain digits (no feature field) gets the
    section: the probe computes the targets from the clean pixels as the trainer does, the features
    digits_repa stores (float16 there), so its mean similarity equals the shards' for the same checkpoint."""
    import dataclasses

    from moedit.analysis.routing import probe as routing_probe

    config = yaml.safe_load(_write_config(tmp_path, "fly", True).read_text())
    config["data"].update(path=str(tmp_path / "digits"), prepare="digits")
    config["train"].update(steps=2, repa={"enabled": True, "projector_hidden": 32, "encoder": "random:32"})
    config["checkpoint"]["every"] = 2
    (tmp_path / "fly.yaml").write_text(yaml.safe_dump(config))
    assert moedit_main(["train", str(tmp_path / "fly.yaml")]) == 0
    captured = _analyze(capsys, tmp_path / "fly", "--out", tmp_path / "report", "--probe", "--noise-levels", 0.25,
                        "--num-samples", 16, "--batch-size", 8, "--device", "cpu", "--repa-bins", 4)
    assert "no REPA similarity" not in captured.err
    probe = json.loads((tmp_path / "report" / "routing_report.json").read_text())["runs"][0]["probe"]
    repa = probe["repa"]
    assert repa["field"] is None and repa["encoder"] == "random:32" and repa["tokens"] == 16 * 64
    assert -1 <= repa["mean_similarity"] <= 1 and all(-1 <= e <= 1 for e in repa["similarity_edges"])
    for section, layer in zip(repa["layers"], probe["layers"], strict=True):
        assert np.array(section["load_by_bin"]).sum(axis=0).tolist() == layer["load"]
        assert all(-1 <= v <= 1 for v in section["mean_similarity_by_expert"] if v is not None)
    # the same checkpoint over digits_repa's stored targets (the run's config without the encoder)
    model, cfg = routing_probe.load_model(tmp_path / "fly", torch.device("cpu"))
    shard_cfg = dataclasses.replace(cfg, train=dataclasses.replace(
        cfg.train, repa=dataclasses.replace(cfg.train.repa, encoder=None)))
    options = routing_probe.ProbeOptions(noise_levels=[0.25], num_samples=16, batch_size=8, device="cpu",
                                         shards=str(repa_run.parent / "digits_repa"), repa_bins=4)
    stored = routing_probe.probe(tmp_path / "fly", [0.0, 1.0], options, loaded=(model, shard_cfg))["repa"]
    assert stored["field"] == "repa" and stored["encoder"] is None
    assert stored["mean_similarity"] == pytest.approx(repa["mean_similarity"], rel=1e-3, abs=1e-4)
    assert stored["mean_similarity"] != repa["mean_similarity"]  # float16 targets there, float32 here
