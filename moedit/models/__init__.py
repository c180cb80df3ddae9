"""Model zoo: DiT backbone, MoE layers (routers, experts), flavor registry, accounting.

    from moedit.models import ModelConfig, MoEConfig, build_model, get_flavor, FLAVORS
"""

from moedit.models.config import ModelConfig, MoEConfig, override
from moedit.models.flavors import FLAVORS, get_flavor


def __getattr__(name: str):
    # the torch-backed model loads on first use: configs and `moedit models --help` stay light
    if name in ("DiT", "build_model"):
        from moedit.models import dit

        globals()[name] = getattr(dit, name)
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = ["DiT", "FLAVORS", "ModelConfig", "MoEConfig", "build_model", "get_flavor", "override"]
