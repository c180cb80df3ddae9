"""Model zoo: DiT backbone, MoE layers (routers, experts), flavor registry, accounting.

    from moedit.models import ModelConfig, MoEConfig, build_model, get_flavor, FLAVORS
"""

from moedit.models.config import ModelConfig, MoEConfig, override
from moedit.models.dit import DiT, build_model
from moedit.models.flavors import FLAVORS, get_flavor

__all__ = ["DiT", "FLAVORS", "ModelConfig", "MoEConfig", "build_model", "get_flavor", "override"]
