"""Scaling-law fits to a sweep of runs (`moedit analyze scaling`, docs/scaling.md).

Modules: `collect` (runs from a sweep directory or a CSV), `lse` (the log-space fitting
engine), `laws` (Chinchilla approach 3, compute envelope, MoE laws), `isoflop` (isoFLOP
profiles), `report` (every fit, extrapolation, JSON), `plots` (figures) and `cli` (the
subcommand). Import the module you need; nothing is imported here.
"""
