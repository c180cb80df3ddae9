"""Checkpoint interop: import published DiT / DiffMoE / DiT-MoE weights, upcycle dense models to
MoE, export to diffusers and to plain safetensors. See docs/interop.md.

    from moedit.interop import convert_checkpoint, upcycle_checkpoint, export_diffusers

Commands: `moedit convert`, `moedit upcycle`, `moedit export`.
"""

from moedit.interop.convert import convert_checkpoint, write_checkpoint
from moedit.interop.export import export_diffusers, export_official, patch_diffusers_time_embedding
from moedit.interop.upcycle import upcycle_checkpoint, upcycle_state_dict

__all__ = ["convert_checkpoint", "export_diffusers", "export_official", "patch_diffusers_time_embedding",
           "upcycle_checkpoint", "upcycle_state_dict", "write_checkpoint"]
