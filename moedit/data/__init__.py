"""Latent datasets: the shard format, `moedit prepare`, and the streaming loader with exact resume."""

from moedit.data.config import DataConfig
from moedit.data.manifest import Manifest, ShardInfo, load_manifest
from moedit.data.samples import DataError

# torch-backed parts load on first use, so that configs and `moedit prepare --help` stay light
_LAZY = {"build_decoder": "moedit.data.encoders", "ShardLoader": "moedit.data.loader",
         "build_loader": "moedit.data.loader"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "DataConfig", "DataError", "Manifest", "ShardInfo", "ShardLoader",
    "build_decoder", "build_loader", "load_manifest",
]
