"""Latent datasets: the shard format, `moedit prepare`, and the streaming loader with exact resume."""

from moedit.data.config import DataConfig
from moedit.data.manifest import Manifest, ShardInfo, load_manifest
from moedit.data.samples import DataError
from moedit.lazy import lazy_attributes

# torch-backed parts load on first use, so that configs and `moedit prepare --help` stay light
_LAZY = {"build_decoder": "moedit.data.encoders", "ShardLoader": "moedit.data.loader",
         "build_loader": "moedit.data.loader"}

__getattr__ = lazy_attributes(__name__, _LAZY)

__all__ = [
    "DataConfig", "DataError", "Manifest", "ShardInfo", "ShardLoader",
    "build_decoder", "build_loader", "load_manifest",
]
