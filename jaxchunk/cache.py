"""The KV cache: one preallocated, fixed-shape pytree, donated to every step so it is updated in place.

The storage format is a `pallas_kernels.kv_quant.KVQuant` spec (static metadata of the pytree):
plain f32 / bf16, fp8 (e4m3, e5m2), or exllamav2-style q8 / q6 / q4 (blocks of 32 along head_dim,
Hadamard-rotated, one float16 absmax scale per block, codes packed into uint8). K/V are quantized
as they are written (`write_kv`, inside `jaxchunk.model.model_step`) and dequantized as attention
reads them (pallas_kernels), so the cache never exists in full precision.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import struct

from jaxchunk.config import LlamaConfig
from jaxchunk.errors import InputError
from pallas_kernels.kv_quant import KV_QUANTS, SCALE_DTYPE, KVQuant, quantize

# Long names accepted for the plain float formats.
ALIASES = {"float32": "f32", "bfloat16": "bf16"}
CACHE_DTYPES = tuple(KV_QUANTS)


@struct.dataclass
class KVCache:
    """Keys/values of every layer for `batch` rows of up to `max_seq_len` tokens.

    keys, values: [layers, batch, max_seq_len, kv_heads, stored_dim] in quant.dtype
                  (stored_dim = head_dim, or head_dim * bits / 8 for the packed integer formats;
                  bf16 / fp8 as raw bits in uint16 / uint8, see pallas_kernels/kv_quant.py).
    key_scales, value_scales: [layers, batch, max_seq_len, kv_heads, head_dim / 32] float16 for the
                  integer formats, None otherwise.
    lengths:      [batch] int32, tokens already written per row (the next write position).
    quant:        the storage format (static: part of the pytree structure, not a leaf); None
                  for plain float arrays of any dtype (a cache built by hand).
    """

    keys: jax.Array
    values: jax.Array
    lengths: jax.Array
    key_scales: Optional[jax.Array] = None
    value_scales: Optional[jax.Array] = None
    quant: Optional[KVQuant] = struct.field(pytree_node=False, default=None)

    @property
    def batch(self) -> int:
        return self.keys.shape[1]

    @property
    def max_seq_len(self) -> int:
        return self.keys.shape[2]

    @property
    def dtype(self):
        """The element format of the cached values (bfloat16 for a bf16 cache, whose arrays hold the
        raw bits as uint16; uint8 for the packed integer formats)."""
        return self.keys.dtype if self.quant is None else self.quant.element_dtype

    @property
    def nbytes(self) -> int:
        return sum(x.nbytes for x in jax.tree.leaves(self))

    @property
    def bytes_per_token(self) -> int:
        """Bytes one cached token takes across all layers (K and V, scales included)."""
        per_position = [x for x in jax.tree.leaves(self) if x.ndim == 5]
        return sum(x.nbytes for x in per_position) // (self.batch * self.max_seq_len)


def resolve_cache_dtype(dtype) -> KVQuant:
    """The cache format for a name ("f32", "bf16", "fp8_e4m3", "fp8_e5m2", "q8", "q6", "q4", and
    the "*_norot" variants without the Hadamard rotation), a `KVQuant`, or a float dtype."""
    if isinstance(dtype, KVQuant):
        return dtype
    if isinstance(dtype, str):
        name = ALIASES.get(dtype, dtype)
        if name not in KV_QUANTS:
            raise InputError(f"unknown cache dtype {dtype!r}; choose one of {list(CACHE_DTYPES)}")
        return KV_QUANTS[name]
    try:
        dtype = jnp.dtype(dtype)
    except TypeError:
        raise InputError(f"unknown cache dtype {dtype!r}; choose one of {list(CACHE_DTYPES)}") from None
    for spec in KV_QUANTS.values():
        if not spec.packed and spec.element_dtype == dtype:
            return spec
    raise InputError(f"unsupported cache dtype {dtype}; choose one of {list(CACHE_DTYPES)}")


def init_cache(config: LlamaConfig, batch: int, max_seq_len: int, dtype="f32") -> KVCache:
    """A zeroed cache. `max_seq_len` may not exceed the model's context (RoPE was trained up to it).
    `dtype`: the storage format, see `resolve_cache_dtype`."""
    for name, value in (("batch", batch), ("max_seq_len", max_seq_len)):
        if not isinstance(value, int) or value <= 0:
            raise InputError(f"{name} must be a positive int, got {value!r}")
    if max_seq_len > config.max_position_embeddings:
        raise InputError(f"max_seq_len={max_seq_len} exceeds the model's context length "
                         f"{config.max_position_embeddings}")
    spec = resolve_cache_dtype(dtype)
    try:
        stored_dim = spec.stored_dim(config.head_dim)
    except ValueError as e:
        raise InputError(str(e)) from None
    lead = (config.num_layers, batch, max_seq_len, config.num_kv_heads)
    scales = None
    if spec.scaled:
        scales = jnp.zeros((*lead, spec.num_scales(config.head_dim)), SCALE_DTYPE)
    return KVCache(keys=jnp.zeros((*lead, stored_dim), spec.dtype),
                   values=jnp.zeros((*lead, stored_dim), spec.dtype),
                   lengths=jnp.zeros((batch,), jnp.int32),
                   key_scales=scales, value_scales=None if scales is None else jnp.zeros_like(scales),
                   quant=spec)


def write_kv(stored: jax.Array, scales, x: jax.Array, layer, rows, positions, spec: KVQuant):
    """Quantize x [batch, chunk_len, kv_heads, head_dim] and scatter it into one layer of the cache
    arrays (stored [layers, batch, max_seq, kv_heads, stored_dim], scales alike or None) at
    [layer, rows [batch, 1], positions [batch, chunk_len]]. Out-of-range positions are dropped
    (padding). spec None: plain float arrays, x is cast to their dtype. Returns the updated
    (stored, scales); in a donated step this is an in-place update."""
    codes, new_scales = (x.astype(stored.dtype), None) if spec is None else quantize(x, spec)
    stored = stored.at[layer, rows, positions].set(codes, mode="drop")
    if scales is not None:
        scales = scales.at[layer, rows, positions].set(new_scales, mode="drop")
    return stored, scales
