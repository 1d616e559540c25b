"""The KV cache: one preallocated, fixed-shape pytree, donated to every step so it is updated in place."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from jaxchunk.config import LlamaConfig
from jaxchunk.errors import InputError

CACHE_DTYPES = {"f32": jnp.float32, "float32": jnp.float32, "bf16": jnp.bfloat16, "bfloat16": jnp.bfloat16}


@struct.dataclass
class KVCache:
    """Keys/values of every layer for `batch` rows of up to `max_seq_len` tokens.

    keys, values: [layers, batch, max_seq_len, kv_heads, head_dim]
    lengths:      [batch] int32, tokens already written per row (the next write position).
    """

    keys: jax.Array
    values: jax.Array
    lengths: jax.Array

    @property
    def batch(self) -> int:
        return self.keys.shape[1]

    @property
    def max_seq_len(self) -> int:
        return self.keys.shape[2]

    @property
    def nbytes(self) -> int:
        return self.keys.nbytes + self.values.nbytes + self.lengths.nbytes


def resolve_cache_dtype(dtype) -> jnp.dtype:
    if isinstance(dtype, str):
        if dtype not in CACHE_DTYPES:
            raise InputError(f"unknown cache dtype {dtype!r}; choose one of {sorted(set(CACHE_DTYPES))}")
        return jnp.dtype(CACHE_DTYPES[dtype])
    return jnp.dtype(dtype)


def init_cache(config: LlamaConfig, batch: int, max_seq_len: int, dtype="f32") -> KVCache:
    """A zeroed cache. `max_seq_len` may not exceed the model's context (RoPE was trained up to it)."""
    for name, value in (("batch", batch), ("max_seq_len", max_seq_len)):
        if not isinstance(value, int) or value <= 0:
            raise InputError(f"{name} must be a positive int, got {value!r}")
    if max_seq_len > config.max_position_embeddings:
        raise InputError(f"max_seq_len={max_seq_len} exceeds the model's context length "
                         f"{config.max_position_embeddings}")
    shape = (config.num_layers, batch, max_seq_len, config.num_kv_heads, config.head_dim)
    dtype = resolve_cache_dtype(dtype)
    return KVCache(keys=jnp.zeros(shape, dtype), values=jnp.zeros(shape, dtype),
                   lengths=jnp.zeros((batch,), jnp.int32))
