"""The dependency rule of docs/DESIGN.md, read from the import statements of every module:

    errors  <-  fileio, lazy  <-  configtools  <-  models  <-  data, diffusion  <-  engines  <-  train  <-  apps  <-  cli
                                                               (apps: eval, interop, analysis, launch)

A module may import its own package and the packages of lower layers, never a higher layer or a
sibling of its own layer (data and diffusion know nothing of each other; the apps are
independent). Imports inside functions count too: a lazy import is still a dependency. Only a
module's `if __name__ == "__main__":` block (a script entry point) is exempt."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# import name -> source directory (pyproject.toml installs launch/ and analysis/ under moedit.)
PACKAGE_DIRS = {"moedit": "moedit", "moedit.launch": "launch", "moedit.analysis": "analysis"}
LAYERS = {
    "moedit": 0, "moedit.errors": 0,
    "moedit.fileio": 1, "moedit.lazy": 1,
    "moedit.configtools": 2,
    "moedit.models": 3,
    "moedit.data": 4, "moedit.diffusion": 4,
    "moedit.engines": 5,
    "moedit.train": 6,
    "moedit.eval": 7, "moedit.interop": 7, "moedit.analysis": 7, "moedit.launch": 7,
    "moedit.cli": 8,
}


def unit(module: str) -> str:
    """The layered unit a dotted module name belongs to (its package, or a top-level module)."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else parts[0]


def modules(root: Path) -> dict[str, Path]:
    found = {}
    for package, directory in PACKAGE_DIRS.items():
        for path in sorted((root / directory).rglob("*.py")):
            rel = path.relative_to(root / directory).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            found[".".join([package, *parts])] = path
    return found


def imported_modules(name: str, path: Path) -> list[tuple[int, str]]:
    """(line, module) for every moedit module that `name` imports, relative imports resolved."""
    out = []
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    # `if __name__ == "__main__":` runs the module as a script (through the CLI): not a dependency
    tree.body = [n for n in tree.body if not (isinstance(n, ast.If) and "__main__" in ast.unparse(n.test))]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base == "moedit":  # `from moedit import models` names the submodules
                out += [(node.lineno, f"moedit.{a.name}") for a in node.names]
            else:
                out.append((node.lineno, base))
    return [(line, m) for line, m in out if m == "moedit" or m.startswith("moedit.")]


def violations(root: Path) -> list[str]:
    bad = []
    for name, path in modules(root).items():
        src = unit(name)
        if src not in LAYERS:
            bad.append(f"{path.relative_to(root)}: package {src} has no layer in tests/test_dependency_rule.py")
            continue
        for line, target in imported_modules(name, path):
            dst = unit(target)
            if dst == src or (dst == "moedit" and target == "moedit"):
                continue
            if dst not in LAYERS:
                bad.append(f"{path.relative_to(root)}:{line}: imports {target}, which has no layer")
            elif LAYERS[dst] >= LAYERS[src]:
                bad.append(f"{path.relative_to(root)}:{line}: {src} (layer {LAYERS[src]}) imports {target} "
                           f"(layer {LAYERS[dst]})")
    return bad


def test_every_module_imports_only_lower_layers():
    assert len(modules(ROOT)) > 100  # the whole tree was read
    assert violations(ROOT) == []


def test_text_encoder_code_sits_in_the_data_layer():
    """moedit.data.text (captions -> features, used by prepare and later by sampling) is data layer 4:
    the eval app may import it, it imports nothing above the model zoo."""
    found = modules(ROOT)
    assert "moedit.data.text" in found and LAYERS[unit("moedit.data.text")] == 4
    assert all(LAYERS[unit(m)] < 4 or unit(m) == "moedit.data" for _, m in imported_modules("moedit.data.text", found["moedit.data.text"]))


def test_a_forbidden_import_is_reported(tmp_path):
    """The checker itself: a copy of the tree where an engine imports the trainer (and a model
    imports an engine through a relative import) fails with both lines named."""
    for directory in PACKAGE_DIRS.values():
        for path in (ROOT / directory).rglob("*.py"):
            target = tmp_path / path.relative_to(ROOT)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(path.read_text())
    assert violations(tmp_path) == []
    engine = tmp_path / "moedit" / "engines" / "local.py"
    engine.write_text(engine.read_text() + "\n\ndef _lazy():\n    from moedit.train.trainer import Trainer\n")
    model = tmp_path / "moedit" / "models" / "layers.py"
    model.write_text("from ..engines import base\n" + model.read_text())
    found = violations(tmp_path)
    assert len(found) == 2
    assert any("moedit/engines/local.py" in v and "imports moedit.train.trainer" in v for v in found)
    assert any("moedit/models/layers.py:1" in v and "imports moedit.engines" in v for v in found)
