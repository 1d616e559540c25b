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

Sliding-window layers may keep a ring buffer instead of every position (`init_cache(...,
ring_chunk_len=C)`, `jaxchunk.load(..., ring_chunk_len=C)`; llama.cpp's iSWA cache, transformers'
sliding-window layers): a local layer attends to at most its last `window` keys, so it needs only
window - 1 + C slots when chunks hold at most C tokens: position p lives in slot p % ring_len, and
the chunk written into the ring overwrites only positions no query of that chunk still sees.
Global layers keep every position. `ring_layout` says which layer lives in which stack.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
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

    With a ring for the sliding-window layers (`init_cache(..., ring_chunk_len=C)`):
    keys, values (and scales): the global layers only, [global_layers, batch, max_seq_len, ...].
    ring_keys, ring_values, ring_key_scales, ring_value_scales: the sliding-window layers,
                  [local_layers, batch, ring_len, kv_heads, ...] in the same formats; position p of
                  a row is in slot p % ring_len (positions are derived, not stored: a row's
                  positions are 0 .. lengths - 1). None without a ring.
    ring_chunk_len: the longest chunk the ring takes (static); None without a ring.
    `ring_layout(config)` maps each layer to its stack.
    """

    keys: jax.Array
    values: jax.Array
    lengths: jax.Array
    key_scales: Optional[jax.Array] = None
    value_scales: Optional[jax.Array] = None
    key_quant: Optional[KVQuant] = struct.field(pytree_node=False, default=None)
    value_quant: Optional[KVQuant] = struct.field(pytree_node=False, default=None)
    ring_keys: Optional[jax.Array] = None
    ring_values: Optional[jax.Array] = None
    ring_key_scales: Optional[jax.Array] = None
    ring_value_scales: Optional[jax.Array] = None
    ring_chunk_len: Optional[int] = struct.field(pytree_node=False, default=None)

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
    def has_ring(self) -> bool:
        """Whether the sliding-window layers keep a ring buffer (`init_cache(ring_chunk_len=)`)."""
        return self.ring_keys is not None

    @property
    def ring_len(self) -> Optional[int]:
        """Slots per sliding-window layer in the ring (None without a ring)."""
        return None if self.ring_keys is None else self.ring_keys.shape[2]

    def _arrays(self, ring: bool) -> list:
        names = ("ring_keys", "ring_values", "ring_key_scales", "ring_value_scales") if ring else \
            ("keys", "values", "key_scales", "value_scales")
        return [a for a in (getattr(self, n) for n in names) if a is not None]

    @property
    def bytes_per_token(self) -> int:
        """Bytes of K/V (scales included) per position of capacity: all stored K/V bytes divided
        by batch * max_seq_len. Without a ring, what one cached token takes across all layers; with
        one, the average at full capacity (`growing_bytes_per_token` + `ring_bytes` spread over
        max_seq_len)."""
        return sum(x.nbytes for x in self._arrays(False) + self._arrays(True)) // (self.batch * self.max_seq_len)

    @property
    def growing_bytes_per_token(self) -> int:
        """Bytes each further token of capacity adds: the full-length layers' K/V per position (all
        layers without a ring, the global ones with it)."""
        return sum(x.nbytes for x in self._arrays(False)) // (self.batch * self.max_seq_len)

    @property
    def ring_bytes(self) -> int:
        """Bytes of the sliding-window layers' ring (fixed, whatever max_seq_len); 0 without a ring."""
        return sum(x.nbytes for x in self._arrays(True))


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


def init_cache(config: LlamaConfig, batch: int, max_seq_len: int, dtype="f32",
               ring_chunk_len: Optional[int] = None) -> KVCache:
    """A zeroed cache. `max_seq_len` may not exceed the model's context (RoPE was trained up to it).
    `dtype`: the storage format of keys and values, see `resolve_cache_formats`.

    ring_chunk_len: None (default): every layer keeps max_seq_len positions. An int C: the
    sliding-window layers keep a ring of min(max window - 1 + C, max_seq_len) slots instead (global
    layers keep max_seq_len), and the steps then take chunks of at most C tokens (InputError
    otherwise). InputError for a config without sliding-window layers. Contiguous cache only
    (the paged cache has no ring)."""
    for name, value in (("batch", batch), ("max_seq_len", max_seq_len)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise InputError(f"{name} must be a positive int, got {value!r}")
    if max_seq_len > config.max_position_embeddings:
        raise InputError(f"max_seq_len={max_seq_len} exceeds the model's context length "
                         f"{config.max_position_embeddings}")
    key_quant, value_quant = resolve_cache_formats(dtype)
    if ring_chunk_len is None:
        lead = (config.num_layers, batch, max_seq_len, config.num_kv_heads)
        keys, values, key_scales, value_scales = zero_cache_arrays(lead, config.head_dim, key_quant, value_quant)
        return KVCache(keys=keys, values=values, lengths=jnp.zeros((batch,), jnp.int32), key_scales=key_scales,
                       value_scales=value_scales, key_quant=key_quant, value_quant=value_quant)
    layout = ring_layout(config, ring_chunk_len)
    ring_len = min(layout.ring_len, max_seq_len)
    full_lead = (layout.num_full, batch, max_seq_len, config.num_kv_heads)
    ring_lead = (layout.num_ring, batch, ring_len, config.num_kv_heads)
    keys, values, key_scales, value_scales = zero_cache_arrays(full_lead, config.head_dim, key_quant, value_quant)
    ring_keys, ring_values, ring_key_scales, ring_value_scales = zero_cache_arrays(
        ring_lead, config.head_dim, key_quant, value_quant)
    return KVCache(keys=keys, values=values, lengths=jnp.zeros((batch,), jnp.int32), key_scales=key_scales,
                   value_scales=value_scales, key_quant=key_quant, value_quant=value_quant,
                   ring_keys=ring_keys, ring_values=ring_values, ring_key_scales=ring_key_scales,
                   ring_value_scales=ring_value_scales, ring_chunk_len=ring_chunk_len)


@dataclasses.dataclass(frozen=True)
class RingLayout:
    """Where each layer's K/V live in a cache with a ring (`ring_layout`).

    full_index [layers]: the layer's index in the full-length stack (`keys`), num_full for a
    sliding-window layer; ring_index [layers]: its index in the ring (`ring_keys`), num_ring for a
    global layer. The out-of-range entry makes a write to the other stack a dropped scatter, so one
    scanned layer body writes either stack. ring_len: max window - 1 + ring_chunk_len (a cache
    clamps it to max_seq_len, where the ring never wraps)."""

    full_index: tuple[int, ...]
    ring_index: tuple[int, ...]
    num_full: int
    num_ring: int
    ring_len: int


def ring_layout(config: LlamaConfig, ring_chunk_len: int) -> RingLayout:
    """The `RingLayout` of `config` for chunks of at most `ring_chunk_len` tokens. InputError when
    ring_chunk_len is not a positive int or the config has no sliding-window layer."""
    if not isinstance(ring_chunk_len, (int, np.integer)) or isinstance(ring_chunk_len, bool) or ring_chunk_len <= 0:
        raise InputError(f"ring_chunk_len must be a positive int (the longest chunk the ring takes), "
                         f"got {ring_chunk_len!r}")
    windows = [config.layer_window(i) for i in range(config.num_layers)]
    local = [w is not None for w in windows]
    if not any(local):
        raise InputError("ring_chunk_len: this model has no sliding-window layers (every layer attends "
                         "globally), so a ring buffer has nothing to hold; leave ring_chunk_len=None")
    num_ring = sum(local)
    num_full = config.num_layers - num_ring
    full_index, ring_index, f, r = [], [], 0, 0
    for is_local in local:
        full_index.append(num_full if is_local else f)
        ring_index.append(r if is_local else num_ring)
        f, r = f + (not is_local), r + is_local
    ring_len = max(w for w in windows if w is not None) - 1 + int(ring_chunk_len)
    return RingLayout(tuple(full_index), tuple(ring_index), num_full, num_ring, ring_len)


def check_chunk_fits_ring(kv_cache: KVCache, chunk_len: int) -> None:
    """InputError when a chunk of `chunk_len` tokens is longer than the cache's ring takes (its
    writes would overwrite keys its own queries still need). A cache without a ring takes any."""
    if kv_cache.ring_chunk_len is not None and chunk_len > kv_cache.ring_chunk_len:
        raise InputError(f"chunk of {chunk_len} tokens: this cache's sliding-window ring was built for chunks of "
                         f"at most ring_chunk_len={kv_cache.ring_chunk_len}; use a smaller chunk_size or a "
                         f"cache with a larger ring_chunk_len")


def ring_view(stored: jax.Array, scales, layer, slots: jax.Array):
    """One layer of a ring, in position order: stored [ring_layers, batch, ring_len, kv_heads, dim]
    (scales alike or None), slots [batch, ring_len] the slot of each view index (`ring_slots`).
    Returns (view [batch, ring_len, kv_heads, dim], scales view or None): what the attention
    backends read as a contiguous one-layer cache."""
    rows = jnp.arange(stored.shape[1])[:, None]
    view = stored[layer, rows, slots]
    return view, (None if scales is None else scales[layer, rows, slots])


def ring_slots(kv_len: jax.Array, ring_len: int) -> tuple[jax.Array, jax.Array]:
    """(base [batch], slots [batch, ring_len]) after a step that leaves kv_len [batch] tokens:
    view index i of a row holds position base + i, base = max(kv_len - ring_len, 0), in slot
    (base + i) % ring_len. Every position in [base, kv_len) is then in the view."""
    base = jnp.maximum(kv_len - ring_len, 0)
    return base, (base[:, None] + jnp.arange(ring_len, dtype=jnp.int32)[None, :]) % ring_len


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
