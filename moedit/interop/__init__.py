"""Checkpoint interop: import published DiT / DiffMoE / DiT-MoE weights, upcycle dense models to
MoE, export to diffusers and to plain safetensors. See docs/interop.md.

    from moedit.interop import convert_checkpoint, upcycle_checkpoint, export_diffusers

Commands: `moedit convert`, `moedit upcycle`, `moedit export`.
"""

from moedit.lazy import lazy_attributes

# Loaded on first use, so that the command modules (`moedit convert --help`) need no torch.
_LAZY = {"convert_checkpoint": "moedit.interop.convert", "write_checkpoint": "moedit.interop.convert",
         "export_diffusers": "moedit.interop.export", "export_official": "moedit.interop.export",
         "patch_diffusers_time_embedding": "moedit.interop.export",
         "upcycle_checkpoint": "moedit.interop.upcycle", "upcycle_state_dict": "moedit.interop.upcycle"}

__getattr__ = lazy_attributes(__name__, _LAZY)

__all__ = ["convert_checkpoint", "export_diffusers", "export_official", "patch_diffusers_time_embedding",
           "upcycle_checkpoint", "upcycle_state_dict", "write_checkpoint"]
