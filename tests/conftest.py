"""Shared fixtures. One torch thread per test process: the suite runs on 2-core machines where
oversubscribed thread pools make tiny models many times slower."""

import os

import pytest
import torch

torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def digits_dir(tmp_path_factory):
    """The built-in digits prepared once per test session (1,797 real 8x8 images)."""
    from moedit.data.prepare import prepare_builtin

    path = tmp_path_factory.mktemp("digits")
    prepare_builtin("digits", path, progress=False)
    return path
