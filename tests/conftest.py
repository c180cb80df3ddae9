"""Shared fixtures. One torch thread per test process: the suite runs on 2-core machines where
oversubscribed thread pools make tiny models many times slower."""

import os

import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture
def rerun_in_triton_interpreter(request):
    """For Triton kernel tests. Returns a function: off CUDA, it runs the calling test again in a
    child process with TRITON_INTERPRET=1 (Triton reads it at import, so it cannot be switched on
    in this process), asserts that the child passed and returns True; on CUDA, or inside that child,
    it returns False and the test goes on here."""

    def rerun() -> bool:
        import subprocess
        import sys

        if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
            return False
        child = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", request.node.nodeid],
                               cwd=request.config.rootpath, env={**os.environ, "TRITON_INTERPRET": "1"},
                               capture_output=True, text=True, timeout=600)
        assert child.returncode == 0, child.stdout[-4000:] + child.stderr[-2000:]
        return True

    return rerun


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory):
    """The built-in digits prepared once per test session (1,797 real 8x8 images)."""
    from moedit.data.prepare import prepare_builtin

    path = tmp_path_factory.mktemp("digits")
    prepare_builtin("digits", path, progress=False)
    return path


@pytest.fixture(scope="session")
def repa_digits(tmp_path_factory):
    """The built-in digits with `random:32` REPA features on the 8 x 8 grid (data.prepare: digits_repa)."""
    from moedit.data.prepare import prepare_builtin

    path = tmp_path_factory.mktemp("digits_repa")
    prepare_builtin("digits_repa", path, progress=False)
    return path


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory, digits_dir):
    """A short real quickstart run (the shipped config, shortened) trained once per session."""
    import subprocess
    import sys
    from pathlib import Path

    run = tmp_path_factory.mktemp("quickstart") / "run"
    config = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
    subprocess.run(
        [sys.executable, "-m", "moedit.cli", "train", str(config), f"train.run_dir={run}", f"data.path={digits_dir}",
         "train.steps=40", "model.depth=2", "logging.log_every=10", "logging.tensorboard=false",
         "train.sample_every=0", "train.num_sample_images=0", "checkpoint.every=20"],
        check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    return run


def write_config(path, cfg: dict, sections: dict | None = None):
    """Write the training config `cfg` (sections of keys) as YAML at `path`, with the keys of
    `sections` merged over its sections; returns the path."""
    import yaml

    cfg = {k: dict(v) if isinstance(v, dict) else v for k, v in cfg.items()}
    for section, values in (sections or {}).items():
        cfg.setdefault(section, {}).update(values)
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_one_then_two_ranks(module: str, args: list[str], single: list[str], two: list[str],
                            timeout: float = 300) -> None:
    """Run tests/<module>.py's `_train_worker(*args, *single)` in one process, then
    `_train_worker(*args, *two)` on two ranks over gloo (RANK, WORLD_SIZE, MASTER_* set); an
    AssertionError with the ranks' output if any of them fails."""
    import socket
    import subprocess
    import sys
    from pathlib import Path

    tests = str(Path(__file__).parent)
    code = f"import sys; sys.path.insert(0, {tests!r}); import {module} as m; m._train_worker(*sys.argv[1:])"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one = subprocess.run([sys.executable, "-c", code, *args, *single], env=env, capture_output=True, text=True)
    assert one.returncode == 0, one.stdout + one.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, "-c", code, *args, *two],
                              env={**env, "RANK": str(r), "WORLD_SIZE": "2", "LOCAL_RANK": str(r),
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outputs


def sections_from_overrides(overrides, base: dict | None = None) -> dict:
    """Config sections from "section.key=value" strings (values read as YAML), over `base`; the
    entry points of multi-process tests take their settings this way on the command line."""
    import yaml

    sections: dict = {k: dict(v) for k, v in (base or {}).items()}
    for item in overrides:
        key, value = item.split("=", 1)
        section, field = key.split(".")
        sections.setdefault(section, {})[field] = yaml.safe_load(value)
    return sections
