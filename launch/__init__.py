"""Launching training: SLURM sbatch jobs with requeue, sweeps as job arrays, torchrun locally.

See docs/launch.md. `moedit launch` is `moedit.launch.cli`, `moedit sweep` is `moedit.launch.sweep_cli`.
"""
