"""The KV cache: one preallocated, fixed-shape pytree, donated to every step so it is updated in place.

The storage format is a `pallas_kernels.kv_quant.KVQuant` spec (static metadata of the pytree):
plain f32 / bf16, fp8 (e4m3, e5m2), or exllamav2-style q8 / q6 / q4 (blocks of 32 along head_dim,
Hadamard-rotated, one float16 absmax scale per block, codes packed into uint8). K/V are quantized
as they are written (`write_kv`, inside `jaxchunk.model.model_step`) and dequantized as attention
reads them (pallas_kernels), so the cache never exists in full precision.

Keys and values each have their own format (llama.cpp's --cache-type-k / --cache-type-v): one name
sets both, "k8v4" (k<bits>v<bits>, over q8 / q6 / q4) or "bf16/q4" (KEY/VALUE, any two names) or a
(key, value) tuple sets them apart; see `resolve_cache_formats`. Keys carry most of the loss (an
error in a score is exponentiated by the softmax, one in a value is averaged), so q8 keys with q4
values cost about what q8 does at nearly q4's size.
"""
from __future__ import annotations

import re
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


INT_BITS = {8: "q8", 6: "q6", 4: "q4"}  # the k<bits>v<bits> shorthand ("k8v4" = q8 keys, q4 values)
SHORT_NAME = re.compile(r"k(\d+)v(\d+)")


@struct.dataclass
class KVCache:
    """Keys/values of every layer for `batch` rows of up to `max_seq_len` tokens.

    keys:         [layers, batch, max_seq_len, kv_heads, key stored_dim] in key_quant.dtype
                  (stored_dim = head_dim, or head_dim * bits / 8 for the packed integer formats;
                  bf16 / fp8 as raw bits in uint16 / uint8, see pallas_kernels/kv_quant.py).
    values:       the same in value_quant's format (its own stored_dim and dtype).
    key_scales, value_scales: [layers, batch, max_seq_len, kv_heads, head_dim / 32] float16 for an
                  integer key / value format, None otherwise (each side on its own).
    lengths:      [batch] int32, tokens already written per row (the next write position).
    key_quant, value_quant: the storage formats of keys and values (static: part of the pytree
                  structure, not leaves); None for plain float arrays of any dtype (a cache built by
                  hand).
    """

    keys: jax.Array
    values: jax.Array
    lengths: jax.Array
    key_scales: Optional[jax.Array] = None
    value_scales: Optional[jax.Array] = None
    key_quant: Optional[KVQuant] = struct.field(pytree_node=False, default=None)
    value_quant: Optional[KVQuant] = struct.field(pytree_node=False, default=None)

    @property
    def kv_quant(self) -> tuple[Optional[KVQuant], Optional[KVQuant]]:
        """(key format, value format): the attention ops' `kv_quant`."""
        return self.key_quant, self.value_quant

    @property
    def batch(self) -> int:
        return self.keys.shape[1]

    @property
    def max_seq_len(self) -> int:
        return self.keys.shape[2]

    @property
    def dtype(self):
        """The element format of the cached keys (bfloat16 for a bf16 cache, whose arrays hold the
        raw bits as uint16; uint8 for the packed integer formats). Values: `value_quant`."""
        return self.keys.dtype if self.key_quant is None else self.key_quant.element_dtype

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
            raise InputError(f"unknown cache dtype {dtype!r}; choose one of {list(CACHE_DTYPES)}, a "
                             f"k<bits>v<bits> pair such as 'k8v4' (bits {sorted(INT_BITS, reverse=True)}), "
                             f"or KEY/VALUE such as 'bf16/q4'")
        return KV_QUANTS[name]
    try:
        dtype = jnp.dtype(dtype)
    except TypeError:
        raise InputError(f"unknown cache dtype {dtype!r}; choose one of {list(CACHE_DTYPES)}") from None
    for spec in KV_QUANTS.values():
        if not spec.packed and spec.element_dtype == dtype:
            return spec
    raise InputError(f"unsupported cache dtype {dtype}; choose one of {list(CACHE_DTYPES)}")


def resolve_cache_formats(cache_dtype) -> tuple[KVQuant, KVQuant]:
    """(key format, value format) for a `cache_dtype`:
      - one format for both: a name, `KVQuant` or float dtype (`resolve_cache_dtype`);
      - "k<bits>v<bits>": q<bits> keys and values, bits in 8 / 6 / 4 ("k8v4": q8 keys, q4 values);
      - "KEY/VALUE": any two names ("bf16/q4", "q8_norot/q4");
      - a (key, value) tuple or list of any two of the above single formats.
    InputError naming the problem otherwise."""
    if isinstance(cache_dtype, (tuple, list)):
        if len(cache_dtype) != 2:
            raise InputError(f"a cache dtype pair is (key format, value format), got {cache_dtype!r}")
        return resolve_cache_dtype(cache_dtype[0]), resolve_cache_dtype(cache_dtype[1])
    if isinstance(cache_dtype, str) and "/" in cache_dtype:
        parts = cache_dtype.split("/")
        if len(parts) != 2:
            raise InputError(f"cache dtype {cache_dtype!r}: KEY/VALUE takes exactly two formats")
        return resolve_cache_formats(tuple(parts))
    if isinstance(cache_dtype, str) and (short := SHORT_NAME.fullmatch(cache_dtype)):
        bits = [int(b) for b in short.groups()]
        bad = [f"{side} bits {b}" for side, b in zip(("key", "value"), bits) if b not in INT_BITS]
        if bad:
            raise InputError(f"cache dtype {cache_dtype!r}: {', '.join(bad)} not one of "
                             f"{sorted(INT_BITS, reverse=True)} (k<bits>v<bits> names q8 / q6 / q4 pairs)")
        return KV_QUANTS[INT_BITS[bits[0]]], KV_QUANTS[INT_BITS[bits[1]]]
    spec = resolve_cache_dtype(cache_dtype)
    return spec, spec


def zero_cache_arrays(lead: tuple[int, ...], head_dim: int, key_quant: KVQuant, value_quant: KVQuant):
    """Zeroed (keys, values, key_scales, value_scales) of shape [*lead, stored_dim] (scales
    [*lead, head_dim / 32] float16, None for a float format), each side in its own format.
    InputError when a format does not fit head_dim."""
    arrays = []
    for spec in (key_quant, value_quant):
        try:
            stored_dim = spec.stored_dim(head_dim)
        except ValueError as e:
            raise InputError(str(e)) from None
        scales = jnp.zeros((*lead, spec.num_scales(head_dim)), SCALE_DTYPE) if spec.scaled else None
        arrays.append((jnp.zeros((*lead, stored_dim), spec.dtype), scales))
    (keys, key_scales), (values, value_scales) = arrays
    return keys, values, key_scales, value_scales


def init_cache(config: LlamaConfig, batch: int, max_seq_len: int, dtype="f32") -> KVCache:
    """A zeroed cache. `max_seq_len` may not exceed the model's context (RoPE was trained up to it).
    `dtype`: the storage format of keys and values, see `resolve_cache_formats`."""
    for name, value in (("batch", batch), ("max_seq_len", max_seq_len)):
        if not isinstance(value, int) or value <= 0:
            raise InputError(f"{name} must be a positive int, got {value!r}")
    if max_seq_len > config.max_position_embeddings:
        raise InputError(f"max_seq_len={max_seq_len} exceeds the model's context length "
                         f"{config.max_position_embeddings}")
    key_quant, value_quant = resolve_cache_formats(dtype)
    lead = (config.num_layers, batch, max_seq_len, config.num_kv_heads)
    keys, values, key_scales, value_scales = zero_cache_arrays(lead, config.head_dim, key_quant, value_quant)
    return KVCache(keys=keys, values=values, lengths=jnp.zeros((batch,), jnp.int32), key_scales=key_scales,
                   value_scales=value_scales, key_quant=key_quant, value_quant=value_quant)


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
