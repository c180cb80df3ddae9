"""Packaging: every package directory is installed, and only under the `moedit` name."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_directory_is_listed_under_the_moedit_name():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    assert all(name == "moedit" or name.startswith("moedit.") for name in listed)
    found = set()
    for top, prefix in (("moedit", "moedit"), ("launch", "moedit.launch"), ("analysis", "moedit.analysis")):
        for init in (ROOT / top).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / top).parts
            found.add(".".join((prefix, *rel)))
    assert found == listed
    assert cfg["package-dir"] == {"moedit": "moedit", "moedit.launch": "launch", "moedit.analysis": "analysis"}
