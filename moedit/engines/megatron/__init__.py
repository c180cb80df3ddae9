"""`parallel.engine = megatron`: the DiT on Megatron-Core with tensor, pipeline, expert and data parallelism.

`layout.resolve_layout` checks a parallel layout against the model and the world size before
anything is allocated, and imports no Megatron code; the other modules need `megatron-core`
(`pip install moedit[megatron]`).
"""
