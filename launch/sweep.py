"""Sweep files: grid and zip over dotted config keys, expanded to named runs.

A sweep file (YAML):

    name: lr-width                     # also the SLURM job name (moedit-<name>)
    config: configs/quickstart.yaml    # relative paths resolve from the current directory
    sweep_dir: runs/sweeps/lr-width    # default runs/sweeps/<name>
    fixed: {train.steps: 2000}         # overrides every run gets (nested mappings allowed)
    grid:                              # cartesian product, first key varies slowest
      optim.lr: [1.0e-4, 3.0e-4]
      model.flavor: [S-E16, B-E16]
    zip:                               # advanced together: one more axis, varies fastest
      model.depth: [6, 12]
      model.num_heads: [4, 6]
    name_template: "{model.flavor}-lr{optim.lr:g}"   # default: leaf=value for each swept key
    max_concurrent: 4                  # array throttle (%4)
    slurm: {gpus_per_node: 8, time: "24:00:00"}      # same names as `moedit launch slurm` flags

Expansion is a pure function of the file: expanding twice gives the same runs in
the same order with the same names.
"""

from __future__ import annotations

import difflib
import itertools
import os
import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from moedit.errors import MoeditError

SWEEP_KEYS = ("name", "config", "sweep_dir", "fixed", "grid", "zip", "name_template", "max_concurrent", "slurm")
_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_PLACEHOLDER = re.compile(r"\{([^{}:]*)(?::([^{}]*))?\}")
_NAME_UNSAFE = re.compile(r"[^A-Za-z0-9._=+-]")


@dataclass
class SweepRun:
    index: int
    name: str
    overrides: dict[str, Any]
    """Every override of the run (fixed and swept), dotted key -> value."""

    def args(self) -> list[str]:
        return [f"{key}={format_value(value)}" for key, value in self.overrides.items()]


@dataclass
class Sweep:
    name: str
    config: str
    sweep_dir: str
    runs: list[SweepRun]
    slurm: dict = field(default_factory=dict)
    max_concurrent: int | None = None


def format_value(value: Any) -> str:
    """An override value as a YAML scalar, so `yaml.safe_load` gives the value back
    (3e-4 renders as 0.0003 and the string '1' as '1' in quotes)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 30).strip()
    if text.endswith("\n..."):
        text = text[: -len("\n...")]
    elif text.endswith("..."):
        text = text[:-3].strip()
    return text


def load_sweep(path: str, sweep_dir: str | None = None) -> Sweep:
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise MoeditError(f"sweep file {path}: no such file") from None
    except yaml.YAMLError as exc:
        raise MoeditError(f"sweep file {path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise MoeditError(f"sweep file {path}: expected a mapping with keys {', '.join(SWEEP_KEYS)}")
    return sweep_from_dict(data, source=path, sweep_dir=sweep_dir)


def sweep_from_dict(data: dict, *, source: str = "sweep", sweep_dir: str | None = None) -> Sweep:
    for key in data:
        if key not in SWEEP_KEYS:
            close = difflib.get_close_matches(str(key), SWEEP_KEYS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(SWEEP_KEYS)})"
            raise MoeditError(f"{source}: unknown key {key!r}{hint}")
    name = data.get("name")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise MoeditError(f"{source}: name = {name!r}: give the sweep a name of letters, digits, . _ -")
    config = data.get("config")
    if not isinstance(config, str):
        raise MoeditError(f"{source}: config = {config!r}: name the training config file")
    max_concurrent = data.get("max_concurrent")
    if max_concurrent is not None and (not isinstance(max_concurrent, int) or max_concurrent < 1):
        raise MoeditError(f"{source}: max_concurrent = {max_concurrent!r}: must be a positive integer")
    slurm = data.get("slurm") or {}
    if not isinstance(slurm, dict):
        raise MoeditError(f"{source}: slurm = {slurm!r}: expected a mapping of launch options")
    runs = expand(data, source=source)
    directory = sweep_dir or data.get("sweep_dir") or os.path.join("runs", "sweeps", name)
    return Sweep(name=name, config=os.path.abspath(config), sweep_dir=os.path.abspath(directory),
                 runs=runs, slurm=dict(slurm), max_concurrent=max_concurrent)


def expand(data: dict, *, source: str = "sweep") -> list[SweepRun]:
    """The runs of a sweep: fixed overrides plus one point of grid x zip each."""
    fixed = flatten(data.get("fixed") or {}, source=f"{source}: fixed")
    grid = _axes(data.get("grid") or {}, f"{source}: grid")
    zipped = _axes(data.get("zip") or {}, f"{source}: zip")
    if not grid and not zipped:
        raise MoeditError(f"{source}: empty sweep: no grid or zip keys (use `moedit launch slurm` for one run)")
    for key, values in {**grid, **zipped}.items():
        if not values:
            raise MoeditError(f"{source}: empty sweep: {key} has an empty list of values")
    lengths = {key: len(values) for key, values in zipped.items()}
    if len(set(lengths.values())) > 1:
        raise MoeditError(f"{source}: zip lists differ in length: "
                          + ", ".join(f"{k} has {n}" for k, n in lengths.items()))
    clash = (set(grid) & set(zipped)) | ((set(grid) | set(zipped)) & set(fixed))
    if clash:
        raise MoeditError(f"{source}: key {sorted(clash)[0]} appears in more than one of fixed/grid/zip")

    axes = [[{key: value} for value in values] for key, values in grid.items()]
    if zipped:
        count = next(iter(lengths.values()))
        axes.append([{key: values[i] for key, values in zipped.items()} for i in range(count)])
    swept_keys = list(grid) + list(zipped)
    template = data.get("name_template") or default_template(swept_keys)
    if not isinstance(template, str):
        raise MoeditError(f"{source}: name_template = {template!r}: expected a string")

    runs = []
    for index, point in enumerate(itertools.product(*axes)):
        overrides = dict(fixed)
        for part in point:
            overrides.update(part)
        name = render_name(template, overrides, index=index, sweep=str(data.get("name")), source=source)
        runs.append(SweepRun(index=index, name=name, overrides=overrides))
    seen: dict[str, int] = {}
    for run in runs:
        if run.name in seen:
            raise MoeditError(f"{source}: name_template {template!r} gives runs {seen[run.name]} and {run.index} "
                              f"the same name {run.name!r}: add the swept keys to the template")
        seen[run.name] = run.index
    return runs


def flatten(mapping: dict, *, source: str, prefix: str = "") -> dict[str, Any]:
    """{'train': {'steps': 5}, 'optim.lr': 1} -> {'train.steps': 5, 'optim.lr': 1}."""
    if not isinstance(mapping, dict):
        raise MoeditError(f"{source}: expected a mapping of dotted keys, got {mapping!r}")
    out = {}
    for key, value in mapping.items():
        full = f"{prefix}{key}"
        if not _KEY_RE.match(full):
            raise MoeditError(f"{source}: {full!r} is not a dotted config key")
        if isinstance(value, dict):
            out.update(flatten(value, source=source, prefix=full + "."))
        else:
            out[full] = value
    return out


def _axes(mapping: dict, source: str) -> dict[str, list]:
    if not isinstance(mapping, dict):
        raise MoeditError(f"{source}: expected a mapping of dotted key -> list of values")
    out = {}
    for key, values in mapping.items():
        if not isinstance(key, str) or not _KEY_RE.match(key):
            raise MoeditError(f"{source}: {key!r} is not a dotted config key")
        if not isinstance(values, list):
            raise MoeditError(f"{source}: {key} = {values!r}: expected a list of values")
        out[key] = values
    return out


def default_template(swept_keys: list[str]) -> str:
    leaves = [key.rsplit(".", 1)[-1] for key in swept_keys]
    labels = [leaf if leaves.count(leaf) == 1 else key for leaf, key in zip(leaves, swept_keys)]
    return "_".join(f"{label}={{{key}}}" for label, key in zip(labels, swept_keys))


def render_name(template: str, overrides: dict[str, Any], *, index: int, sweep: str, source: str) -> str:
    values = {**overrides, "index": index, "sweep": sweep}

    def substitute(match: re.Match) -> str:
        key, spec = match.group(1), match.group(2)
        if key not in values:
            known = ", ".join(["index", "sweep", *overrides])
            raise MoeditError(f"{source}: name_template placeholder {{{key}}} is not a key of the run (known: {known})")
        value = values[key]
        if spec:
            try:
                return format(value, spec)
            except (ValueError, TypeError) as exc:
                raise MoeditError(f"{source}: name_template {{{key}:{spec}}}: {exc}") from None
        return format_value(value) if not isinstance(value, str) else value

    name = _NAME_UNSAFE.sub("_", _PLACEHOLDER.sub(substitute, template)).strip("._")
    if not name:
        raise MoeditError(f"{source}: name_template {template!r} gives run {index} an empty name")
    return name
