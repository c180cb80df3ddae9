"""Collecting runs from sweep directories and CSVs, and `moedit analyze scaling` end to end.

The run directories are synthetic but follow docs/DESIGN.md and the keys the trainer
writes (model_info.json: total_params, activated_params, train_gflops_per_image in
multiply-adds, tokens_per_image, num_experts; metrics.jsonl: loss, loss/mse, images_seen).
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import yaml

from moedit.analysis import cli as analysis_cli
from moedit.analysis.scaling.collect import collect, check_single_distribution, ema, read_runs_csv
from moedit.cli import main as moedit_main
from moedit.errors import MoeditError

TOKENS = 16  # input 8, patch 2
# Loss law on N params and D tokens; B is chosen so that N_opt(1e14 FLOP) = 5e4, inside the swept sizes.
LAW = {"E": 0.2, "A": 30.0, "alpha": 0.3, "beta": 0.35}
LAW["B"] = LAW["alpha"] * LAW["A"] / (LAW["beta"] * (5e4 / (1e14 / 6) ** (0.35 / 0.65)) ** 0.65)
DATA = Path(__file__).parent / "data" / "chinchilla_svg_extracted.csv"


def law_loss(N, D, experts=1):
    return (LAW["E"] + LAW["A"] / N ** LAW["alpha"] + LAW["B"] / D ** LAW["beta"]) * experts ** -0.03


def write_run(path: Path, *, params: float, images: int, experts: int = 1, lines: int = 12, done: bool = True,
              t_sampling: str = "uniform", noise: float = 0.0, seed: int = 0, aux: float = 0.05,
              with_images_seen: bool = True) -> list[float]:
    """A run directory whose loss/mse follows LAW along training; returns the logged loss/mse values."""
    path.mkdir(parents=True)
    moe = {"router": "diffmoe", "num_experts": experts, "granularity": 2, "capacity": 1.0} if experts > 1 else None
    config = {"model": {"flavor": "tiny", "input_size": 8, "patch_size": 2}, "moe": moe,
              "diffusion": {"objective": "flow", "t_sampling": t_sampling, "t_mean": 0.0, "t_std": 1.0,
                            "sampler": "euler", "sample_steps": 250, "cfg_scale": 1.0},
              "train": {"steps": lines * 10, "global_batch_size": images // (lines * 10)}}
    if not with_images_seen:  # as the trainer logs today: step only, images = step x global batch
        assert images % (lines * 10) == 0
    (path / "config.yaml").write_text(yaml.safe_dump(config))
    info = {"flavor": "tiny", "total_params": params * max(experts, 1), "activated_params": params,
            "fwd_gflops_per_image": params * TOKENS / 1e9, "train_gflops_per_image": 3 * params * TOKENS / 1e9,
            "tokens_per_image": TOKENS, "num_experts": experts if experts > 1 else 0}
    (path / "model_info.json").write_text(json.dumps(info))
    rng = np.random.default_rng(seed)
    mse = []
    with open(path / "metrics.jsonl", "w") as handle:
        for i in range(1, lines + 1):
            seen = images * i // lines
            value = law_loss(params, seen * TOKENS, experts) * np.exp(noise * rng.standard_normal())
            mse.append(value)
            record = {"step": i * 10, "epoch": 0, "images_seen": seen, "loss": value + aux, "loss/mse": value,
                      "loss/predictor": aux, "lr": 1e-4, "grad_norm": 1.0, "images_per_s": 100.0}
            if not with_images_seen:
                del record["images_seen"], record["epoch"]
            handle.write(json.dumps(record) + "\n")
    (path / "routing.jsonl").write_text("")
    if done:
        (path / "DONE").write_text("")
    return mse


def write_sweep(root: Path) -> None:
    """dense/: 4 sizes x 3 compute budgets (C = 6 N D exactly); moe/: 2 sizes x 4 expert counts, equal data."""
    for budget in (1e13, 1e14, 1e15):
        for params in (1e4, 3e4, 1e5, 3e5):
            images = int(round(budget / (6 * params * TOKENS)))
            write_run(root / "dense" / f"c{budget:.0e}_n{params:.0e}", params=params, images=images)
    for params in (1e4, 1e5):
        for experts in (1, 4, 16, 64):
            write_run(root / "moe" / f"n{params:.0e}_e{experts}", params=params, images=120_000, experts=experts)


def test_collect_reads_the_design_layout(tmp_path):
    mse = write_run(tmp_path / "sweep" / "a", params=1e5, images=48_000, experts=4, lines=6)
    write_run(tmp_path / "sweep" / "b", params=1e5, images=48_000, done=False)
    runs, skipped = collect(tmp_path / "sweep", loss_ema=0.9)
    assert [r.name for r in runs] == ["a"]
    assert skipped[0]["path"].endswith("b") and "DONE" in skipped[0]["reason"]
    run = runs[0]
    # C = train multiply-adds per image x 2 FLOPs per multiply-add x images seen.
    assert run.flops == pytest.approx(3 * 1e5 * TOKENS * 2 * 48_000, rel=1e-12)
    assert run.tokens == 48_000 * TOKENS and run.images == 48_000
    assert (run.activated_params, run.total_params, run.experts, run.granularity, run.capacity) == \
        (1e5, 4e5, 4, 2.0, 1.0)
    # Final loss: bias-corrected EMA of loss/mse (the objective without the MoE predictor term).
    acc = weight = 0.0
    for value in mse:
        acc, weight = 0.9 * acc + 0.1 * value, 0.9 * weight + 0.1
    assert run.loss == pytest.approx(acc / weight, rel=1e-12)
    assert run.loss_source == "train_ema:loss/mse"
    assert json.loads(run.t_sampling) == {"objective": "flow", "t_sampling": "uniform", "t_mean": 0.0, "t_std": 1.0}


def test_images_seen_falls_back_to_steps_times_global_batch(tmp_path):
    write_run(tmp_path / "r", params=1e4, images=48_000, lines=6, with_images_seen=False)
    runs, _ = collect(tmp_path)
    assert runs[0].images == 48_000  # 60 steps x global batch 800
    assert runs[0].flops == pytest.approx(3 * 1e4 * TOKENS * 2 * 48_000, rel=1e-12)
    np.testing.assert_allclose(runs[0].curve_flops, 3 * 1e4 * TOKENS * 2 * 8_000 * np.arange(1, 7), rtol=1e-12)


def test_eval_loss_wins_and_ema_is_bias_corrected(tmp_path):
    write_run(tmp_path / "r", params=1e4, images=1200, lines=3)
    with open(tmp_path / "r" / "metrics.jsonl", "a") as handle:
        handle.write(json.dumps({"step": 40, "images_seen": 1600, "loss/mse": 0.5, "eval/loss": 0.4321}) + "\n")
    runs, _ = collect(tmp_path)
    assert runs[0].loss == 0.4321 and runs[0].loss_source == "eval"
    np.testing.assert_allclose(ema(np.array([2.0, np.nan, 4.0]), 0.5), [2.0, 2.0, (0.25 * 2 + 0.5 * 4) / 0.75])


def test_mixed_t_sampling_is_refused_unless_forced(tmp_path):
    write_run(tmp_path / "u", params=1e4, images=1200)
    write_run(tmp_path / "l", params=1e4, images=1200, t_sampling="logit_normal")
    runs, _ = collect(tmp_path)
    with pytest.raises(MoeditError, match="2 diffusion t-sampling settings.*--force"):
        check_single_distribution(runs)
    assert check_single_distribution(runs, force=True) is None


def test_bad_metrics_and_model_info_name_the_file(tmp_path):
    write_run(tmp_path / "r", params=1e4, images=1200)
    with open(tmp_path / "r" / "metrics.jsonl", "a") as handle:
        handle.write("{not json\n")
    with pytest.raises(MoeditError, match=r"metrics.jsonl:13: not valid JSON"):
        collect(tmp_path)
    write_run(tmp_path / "s", params=1e4, images=1200)
    (tmp_path / "s" / "model_info.json").write_text(json.dumps({"total_params": 5}))
    with pytest.raises(MoeditError, match=r"s/model_info.json: no 'train_gflops_per_image'.*'train_flops_per_image'"):
        collect(tmp_path / "s")


def test_csv_columns_mapping_and_missing_column(tmp_path):
    runs = read_runs_csv(DATA, columns={"params": "Model Size", "flops": "Training FLOP"})
    assert len(runs) == 245
    assert runs[0].tokens == pytest.approx(runs[0].flops / (6 * runs[0].activated_params))
    with pytest.raises(MoeditError, match=r"missing column 'params'.*--column params="):
        read_runs_csv(DATA)


def test_analyze_scaling_end_to_end(tmp_path):
    write_sweep(tmp_path / "sweep")
    out = tmp_path / "dense_out"
    rc = moedit_main(["analyze", "scaling", str(tmp_path / "sweep" / "dense"), "--out", str(out), "--grid", "small",
                      "--bootstrap", "40", "--loss-ema", "0", "--extrapolate", "1e17", "--quiet"])
    assert rc == 0
    report = json.loads((out / "scaling.json").read_text())
    assert report["num_runs"] == 12
    assert report["flops_per_param_token"]["value"] == pytest.approx(6.0)
    a3 = report["fits"]["approach3"]["params"]
    for name in ("E", "alpha", "beta"):  # noise-free data generated from LAW
        assert a3[name] == pytest.approx(LAW[name], rel=1e-3), name
    isof = report["fits"]["isoflop"]
    assert isof["gof"]["n_budgets"] == 3 and all(b["num_runs"] == 4 for b in isof["budgets"])
    assert report["fits"]["envelope"]["gof"]["n"] >= 3
    ex = report["extrapolation"][0]["approach3"]
    assert ex["N_opt"]["value"] * ex["D_opt"]["value"] * 6 == pytest.approx(1e17, rel=1e-9)
    assert ex["N_opt"]["ci"][0] <= ex["N_opt"]["value"] <= ex["N_opt"]["ci"][1]
    for stem in ("loss_vs_compute", "isoflop", "n_opt_vs_compute"):
        for ext in ("png", "pdf"):
            assert (out / f"{stem}.{ext}").stat().st_size > 1000

    # MoE runs at equal data: loss ~ E^-0.03 at both sizes, so b = -0.03 and c = 0 in the bilinear law.
    out_moe = tmp_path / "moe_out"
    assert moedit_main(["analyze", "scaling", str(tmp_path / "sweep" / "moe"), "--out", str(out_moe),
                        "--bootstrap", "20", "--loss-ema", "0", "--fits", "moe_bilinear", "--quiet"]) == 0
    report = json.loads((out_moe / "scaling.json").read_text())
    assert report["num_runs"] == 8
    assert report["fits"]["moe_bilinear"]["params"]["b"] == pytest.approx(-0.03, rel=1e-6)
    assert report["fits"]["moe_bilinear"]["params"]["c"] == pytest.approx(0.0, abs=1e-9)
    assert {r["experts"] for r in report["runs"]} == {1, 4, 16, 64}
    assert (out_moe / "loss_vs_experts.png").exists() and (out_moe / "loss_vs_experts.pdf").exists()


def test_cli_errors_are_one_line(tmp_path, capsys):
    bad_csv = tmp_path / "runs.csv"
    bad_csv.write_text("params,loss\n1e6,2.0\n")
    assert moedit_main(["analyze", "scaling", str(bad_csv), "--quiet"]) == 2
    assert "missing column 'flops'" in capsys.readouterr().err
    rows = "params,flops,loss\n" + "".join(f"{n},{6 * n * 20 * n},{2 + 1 / n}\n" for n in (1e6, 2e6, 4e6))
    few = tmp_path / "few.csv"
    few.write_text(rows)
    assert moedit_main(["analyze", "scaling", str(few), "--fits", "approach3", "--quiet", "--no-plots"]) == 2
    assert "3 runs for 5 parameters" in capsys.readouterr().err
    neg = tmp_path / "neg.csv"
    neg.write_text(rows.replace(",2.000001\n", ",-1\n"))
    assert moedit_main(["analyze", "scaling", str(neg), "--quiet", "--no-plots"]) == 2
    assert "non-positive loss" in capsys.readouterr().err


def test_missing_analysis_module_fails_only_its_subcommand(monkeypatch, capsys):
    monkeypatch.setitem(analysis_cli.SUBCOMMANDS, "routing", ("moedit.analysis.no_such_module", "missing"))
    assert moedit_main(["analyze", "routing", "anything", "--flag"]) == 2
    assert "module moedit.analysis.no_such_module is not installed" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("MOEDIT_SCALING_SWEEP"), reason="set MOEDIT_SCALING_SWEEP to a real sweep")
def test_real_sweep_from_the_trainer(tmp_path):
    """Point MOEDIT_SCALING_SWEEP at a directory of finished `moedit train` runs (>= 3 spanning compute)."""
    sweep = Path(os.environ["MOEDIT_SCALING_SWEEP"])
    out = tmp_path / "out"
    assert moedit_main(["analyze", "scaling", str(sweep), "--out", str(out), "--grid", "small", "--bootstrap", "50",
                        "--quiet", "--force"]) == 0
    report = json.loads((out / "scaling.json").read_text())
    done = sorted(p.parent for p in sweep.rglob("DONE") if (p.parent / "metrics.jsonl").exists())
    assert report["num_runs"] == len(done)
    by_name = {r["name"]: r for r in report["runs"]}
    for run_dir in done:
        info = json.loads((run_dir / "model_info.json").read_text())
        last = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()][-1]
        batch = yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["global_batch_size"]
        images = last.get("images_seen", last["step"] * batch)
        run = by_name[str(run_dir.relative_to(sweep))]
        assert run["flops"] == pytest.approx(info["train_gflops_per_image"] * 2e9 * images, rel=1e-9)
        assert run["tokens"] == images * info["tokens_per_image"]
    assert (out / "loss_vs_compute.png").exists() and (out / "loss_vs_compute.pdf").exists()
