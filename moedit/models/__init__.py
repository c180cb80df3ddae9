"""Model zoo: DiT backbone, MoE layers (routers, experts), flavor registry, accounting.

    from moedit.models import ModelConfig, MoEConfig, build_model, get_flavor, FLAVORS
"""

from moedit.models.config import ModelConfig, MoEConfig, override
from moedit.models.flavors import FLAVORS, get_flavor
from moedit.lazy import lazy_attributes


# the torch-backed model loads on first use: configs and `moedit models --help` stay light
__getattr__ = lazy_attributes(__name__, {"DiT": "moedit.models.dit", "build_model": "moedit.models.dit"})

__all__ = ["DiT", "FLAVORS", "ModelConfig", "MoEConfig", "build_model", "get_flavor", "override"]
