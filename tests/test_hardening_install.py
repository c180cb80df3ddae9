"""Issue 27, item 14: installing an extra must never change the installed torch.

pytorch-fid (the `eval` extra) depends on torchvision; unpinned, pip resolves the newest
torchvision, which requires another torch, and replaces the installed one (measured: CPU torch
2.13.0 -> CUDA 2.14.1, triton 3.9.0 -> 3.8.0). scripts/env.sh installs the project and its extras
against a constraint that pins the torch and triton installed first.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ENV_SH = REPO / "scripts" / "env.sh"


def _pin_script() -> str:
    match = re.search(r"python - > \"\$pins\" <<'PY'\n(.*?)\nPY\n", ENV_SH.read_text(), re.S)
    assert match, "scripts/env.sh writes no torch/triton pins before installing the project and its extras"
    return match.group(1)


def test_env_sh_installs_extras_against_pins_of_the_installed_torch():
    text = ENV_SH.read_text()
    pins = subprocess.run([sys.executable, "-c", _pin_script()], capture_output=True, text=True, check=True).stdout
    import torch

    assert f"torch=={torch.__version__}" in pins.splitlines()
    install = [line for line in text.splitlines() if "pip install" in line and "$root[" in line]
    assert install and all('-c "$pins"' in line for line in install), install
    assert "MOEDIT_EXTRAS" in text  # the way to ask for `eval` (and others) through env.sh


@pytest.mark.slow
def test_eval_extra_resolves_without_touching_torch(tmp_path):
    """pip's own resolver (a dry run: nothing is installed) against the pins env.sh writes."""
    pins = tmp_path / "pins.txt"
    pins.write_text(subprocess.run([sys.executable, "-c", _pin_script()], capture_output=True, text=True,
                                   check=True).stdout)
    report = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "-q", "--report", str(report),
                           "-c", str(pins), "pytorch-fid>=0.3.0"], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 and not report.exists():
        if "No matching distribution" in proc.stderr or "Could not find" in proc.stderr:
            pytest.skip("pytorch-fid or a torchvision for this torch is not available from this machine's indexes")
        raise AssertionError(proc.stderr[-2000:])
    chosen = {item["metadata"]["name"].lower(): item["metadata"]["version"]
              for item in json.loads(report.read_text())["install"]}
    assert "torch" not in chosen and "triton" not in chosen, chosen
