"""Latent datasets: the shard format, `moedit prepare`, and the streaming loader with exact resume."""

from moedit.data.config import DataConfig
from moedit.data.encoders import build_decoder
from moedit.data.loader import ShardLoader, build_loader
from moedit.data.manifest import Manifest, ShardInfo, load_manifest
from moedit.data.samples import DataError

__all__ = [
    "DataConfig", "DataError", "Manifest", "ShardInfo", "ShardLoader",
    "build_decoder", "build_loader", "load_manifest",
]
