"""`moedit analyze routing` end to end: JSON/Markdown/HTML, headless Chromium render, bad input.

The run directories are synthetic (analysis/routing/synthetic.py) in the docs/DESIGN.md layout;
the probe runs a real tiny model exported as safetensors.
"""

import base64
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from moedit.analysis.routing.synthetic import make_run_dir
from moedit.cli import main as moedit_main

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars"]



def analyze(capsys, *argv) -> tuple[int, str, str]:
    rc = moedit_main(["analyze", "routing", *map(str, argv)])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _window_sum(run, key, last):
    rows = [json.loads(line) for line in (run / "routing.jsonl").read_text().splitlines()]
    return [np.sum([r["stats"]["layers"][i][key] for r in rows[-last:]], axis=0).tolist()
            for i in range(len(rows[0]["stats"]["layers"]))]


def test_single_run_report(tmp_path, capsys):
    run = make_run_dir(tmp_path / "diffmoe-run", "diffmoe")
    rc, out, err = analyze(capsys, run, "--last", 3)
    assert rc == 0, err
    folder = run / "analysis" / "routing"
    report = json.loads((folder / "routing_report.json").read_text())
    logs = report["runs"][0]["logs"]
    assert logs["window"] == {"first_step": 500, "last_step": 600, "intervals": 3}
    assert [m["load"] for m in logs["layers"]] == _window_sum(run, "tokens_per_expert", 3)
    for layer in logs["layers"]:  # DiffMoE training: every expert takes exactly S / E
        assert layer["cv_population"] == 0.0 and layer["max_violation"] == 0.0
        assert layer["dead_fraction"] == 0.0 and layer["capacity_used"] == 1.0
    assert logs["history"]["steps"] == list(range(50, 601, 50))
    markdown = (folder / "routing_report.md").read_text()
    assert "| block | tokens | CV pop |" in markdown and "diffmoe-run" in markdown
    html = (folder / "routing_report.html").read_text()
    images = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", html)
    assert len(images) == 4  # layer x expert, noise x expert, class x expert, history
    assert all(base64.b64decode(data)[:8] == b"\x89PNG\r\n\x1a\n" for data in images)
    assert "http" not in html  # opens offline: nothing to fetch


def test_comparison_of_routers(tmp_path, capsys):
    runs = [make_run_dir(tmp_path / "dm", "diffmoe"), make_run_dir(tmp_path / "tc", "token_choice")]
    rc, _, err = analyze(capsys, *runs, "--out", tmp_path / "cmp", "--last", 0, "--no-html")
    assert rc == 0, err
    report = json.loads((tmp_path / "cmp" / "routing_report.json").read_text())
    rows = {row["run"]: row for row in report["comparison"]}
    assert rows["dm"]["router"] == "diffmoe" and rows["tc"]["router"] == "token_choice"
    tc = report["runs"][1]["logs"]
    dropped = _window_sum(runs[1], "dropped", 12)
    tokens = _window_sum(runs[1], "tokens", 12)
    assert [m["drop_rate"] for m in tc["layers"]] == pytest.approx(
        [d / (t * 2) for d, t in zip(dropped, tokens)])
    # the synthetic token-choice run starts with one dead expert of 8 in one of 4 layers
    assert tc["history"]["dead_fraction_mean"][0] == pytest.approx(1 / 8 / 4)
    assert tc["history"]["dead_fraction_mean"][-1] == 0.0
    assert not (tmp_path / "cmp" / "routing_report.html").exists()


def _export_tiny(tmp_path, flavor):
    from safetensors.torch import save_file

    from moedit.models import build_model
    from moedit.train.config import config_from_dict, config_to_dict

    cfg = config_from_dict({"model": {"flavor": flavor, "learn_sigma": False},
                            "diffusion": {"objective": "flow"}})
    torch.manual_seed(0)
    path = tmp_path / f"{flavor}.safetensors"
    save_file(build_model(cfg.model).state_dict(), str(path))
    path.with_suffix(".json").write_text(json.dumps(config_to_dict(cfg)))
    return path


def _screenshot(chromium, html, png, tmp_path):
    subprocess.run([chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
                    "--window-size=1200,2400", f"--screenshot={png}", html.as_uri()],
                   check=True, capture_output=True, timeout=40)
    from PIL import Image

    rgb = np.asarray(Image.open(png).convert("RGB"), dtype=np.float64) / 255  # (H, W, 3)
    saturation = rgb.max(axis=2) - rgb.min(axis=2)
    return (rgb.min(axis=2) < 0.9).mean(), (saturation > 0.25).mean()


def test_report_with_probe_renders_in_chromium(tmp_path, capsys, quickstart_run):
    """A real (shortened) quickstart run: logs + trajectory probe of its EMA checkpoint + trace ->
    HTML rendered by headless Chromium. MOEDIT_ROUTING_E2E_RUN=<run dir> uses another run."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    run = Path(os.environ.get("MOEDIT_ROUTING_E2E_RUN", quickstart_run))
    checkpoint = []
    trace = tmp_path / "trace.npz"
    rc, _, err = analyze(capsys, run, "--out", tmp_path / "report", "--probe", *checkpoint,
                         "--trajectory", "--sampling-steps", 4, "--sampler", "euler", "--num-samples", 4,
                         "--batch-size", 4, "--device", "cpu", "--trace", trace)
    assert rc == 0, err
    html = tmp_path / "report" / "routing_report.html"
    report = json.loads(html.with_suffix(".json").read_text())
    probe = report["runs"][0]["probe"]
    assert probe["mode"] == "trajectory" and probe["samples"] == 4 and trace.is_file()
    assert len(probe["layers"][0]["adjacent_steps"]["jaccard"]) == 3
    # the same decisions replayed from the trace give the same loads
    rc, _, err = analyze(capsys, run, "--from-trace", trace, "--out", tmp_path / "replay", "--no-html")
    assert rc == 0, err
    replay = json.loads((tmp_path / "replay" / "routing_report.json").read_text())["runs"][0]
    assert replay["probe"]["layers"][0]["load"] == probe["layers"][0]["load"]
    if chromium is None:
        pytest.skip("chromium not installed (Debian: apt-get install -y chromium); report written")
    ink, colour = _screenshot(chromium, html, tmp_path / "shot.png", tmp_path)
    # control: the same page without its images has text and tables but almost no colour
    blank = tmp_path / "no_images.html"
    blank.write_text(re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", html.read_text()))
    _, colour_without = _screenshot(chromium, blank, tmp_path / "blank.png", tmp_path)
    assert ink > 0.05, f"screenshot nearly blank ({ink:.3f} of pixels drawn)"
    assert colour > 0.05, f"embedded figures did not render ({colour:.3f} coloured pixels)"
    assert colour_without < 0.01 < colour


def _one_line_error(rc, out, err, fragment):
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moedit analyze: error:"), err
    assert fragment in lines[0], lines[0]


def test_bad_inputs_give_one_line_errors(tmp_path, capsys):
    empty = tmp_path / "no_logs"
    empty.mkdir()
    (empty / "config.yaml").write_text("model: {flavor: tiny-dense}\n")
    _one_line_error(*analyze(capsys, empty), "no routing statistics")
    _one_line_error(*analyze(capsys, tmp_path / "missing"), "does not exist")
    run = make_run_dir(tmp_path / "run", "diffmoe", intervals=4)
    lines = (run / "routing.jsonl").read_text().splitlines()
    lines[1] = lines[1][:40]  # a broken line that is not the last one
    (run / "routing.jsonl").write_text("\n".join(lines) + "\n")
    _one_line_error(*analyze(capsys, run), "routing.jsonl:2: not valid JSON")
    _one_line_error(*analyze(capsys, run, run), "--out")
    corrupt = tmp_path / "trace.npz"
    corrupt.write_bytes(b"PK\x03\x04 truncated")
    _one_line_error(*analyze(capsys, empty, "--from-trace", corrupt), "corrupt")
    dense = _export_tiny(tmp_path, "tiny-dense")
    _one_line_error(*analyze(capsys, empty, "--probe", "--checkpoint", dense, "--trajectory",
                             "--num-samples", 1, "--sampling-steps", 1), "dense model")
