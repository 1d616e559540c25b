"""`jaxchunk.model.forward` (plain full causal attention, no cache: the tests' reference) under one
`jax.jit`, so it compiles once per (config, ids shape, return_kv, kv_quant).

Called eagerly, `forward` traces its layer scan anew on every call and XLA compiles it again (~1 s
a call on the tiny models, most of a parametrized sweep's runtime when every case re-runs the
reference of the same length). The same function and arguments; only the embedding and head ops
around the scan may be fused differently (float32 rounding, far inside every test's tolerance).
"""
import jax

from jaxchunk import model

forward = jax.jit(model.forward, static_argnames=("config", "return_kv", "kv_quant"))
