"""benchmarks/train.py's table: each row's ratios come from the right other rows (no GPU, no runs)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_train", ROOT / "benchmarks" / "train.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    sys.path.insert(0, str(ROOT / "benchmarks"))  # its sibling runner.py, as when run as a script
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return module


def result(bench, spec: str, step_ms: float) -> dict:
    row = bench.parse_row(spec, 1)
    return {"row": row.spec, "flavor": row.flavor, "batch": row.batch, "engine": row.engine, "nproc": row.nproc,
            "overrides": row.overrides, "step_ms": step_ms, "images_per_s": 1000.0 * row.batch / step_ms,
            "mfu": None, "peak_gib": None, "exit": 0}


def cells(table: str, spec: str) -> list[str]:
    line = next(ln for ln in table.splitlines() if ln.startswith(f"| {spec} |"))
    return [c.strip() for c in line.strip("|").split("|")]


def test_repa_row_is_compared_with_the_same_row_without_repa(bench):
    rows = [result(bench, "DiffMoE-L-E8:32:local", 160.0),
            result(bench, "DiffMoE-L-E8:32:local:train.cuda_graph=true", 90.0),
            result(bench, "DiffMoE-L-E8:32:local:train.repa.enabled=true:train.cuda_graph=true", 94.5),
            result(bench, "DiffMoE-L-E8:32:local:train.repa.enabled=true", 176.0),
            result(bench, "DiT-L/2:32:local", 80.0)]
    table = bench.table(rows)
    header_cells = [c.strip() for c in table.splitlines()[0].strip("|").split("|")]
    column = header_cells.index("step vs no REPA")
    dense = header_cells.index("step vs dense (text: vs class)")
    assert cells(table, "DiffMoE-L-E8:32:local:train.repa.enabled=true:train.cuda_graph=true")[column] == "1.050x"
    assert cells(table, "DiffMoE-L-E8:32:local:train.repa.enabled=true")[column] == "1.100x"
    assert cells(table, "DiffMoE-L-E8:32:local")[column] == "-"  # no REPA: nothing to compare
    assert cells(table, "DiffMoE-L-E8:32:local")[dense] == "2.000x"  # against DiT-L/2 at the same batch
    assert cells(table, "DiffMoE-L-E8:32:local:train.cuda_graph=true")[dense] == "-"  # no dense row with the graph
