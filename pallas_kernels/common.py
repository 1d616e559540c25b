"""Pieces shared by every attention backend: block sizes, the visibility rule,
soft-capping, input checks and the GQA "rows" layout.

Everything here is plain `jnp` so it traces both in XLA and inside Pallas kernels.
"""
from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
from jax import lax

from pallas_kernels.kv_quant import check_quantized_cache


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes (hashable: a static jit argument).

    block_q: query *rows* per tile. Rows are (query position, head-in-group) pairs,
        position-major, so one tile covers block_q / G consecutive positions of one
        KV head's G query heads (GQA folded into rows, K/V never repeated).
    block_k: keys per tile of the online-softmax loop.
    Pallas on GPU needs powers of two >= 16 for both.
    """

    block_q: int
    block_k: int

    def __post_init__(self):
        if self.block_q < 1 or self.block_k < 1:
            raise ValueError(f"block sizes must be positive: {self}")

    @classmethod
    def flash_default(cls, head_dim: int) -> "BlockSizes":
        # The f32 accumulator is [block_q, head_dim] in registers: shrink block_q as
        # head_dim grows (usual Triton flash-attention choices, not tuned here).
        if head_dim <= 64:
            return cls(block_q=128, block_k=64)
        if head_dim <= 128:
            return cls(block_q=64, block_k=64)
        return cls(block_q=32, block_k=32)

    @classmethod
    def decode_default(cls, head_dim: int) -> "BlockSizes":
        # block_q is only a lower bound for decode (rows = G * q_len padded up).
        return cls(block_q=16, block_k=64 if head_dim <= 128 else 32)

    @classmethod
    def xla_default(cls, head_dim: int) -> "BlockSizes":
        # Swept on CPU (SmolLM2 9/3 heads, d 64, q_len 512/2048, kv 2048/8192):
        # block_k 256 ~ 512 < 1024; tiling rows at 768 (256 positions at G=3)
        # beats one tile by 1.3-2.5x for q_len 2048 (causal skipping + the
        # [768, 256] f32 score tile stays in cache). See bench_attention.py.
        del head_dim
        return cls(block_q=768, block_k=256)


def default_sm_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


def as_layer_stack(layer, k, v, k_scales=None, v_scales=None):
    """(layer, k, v, k_scales, v_scales) as a stack the kernels index with a traced `layer`: with
    layer None, one layer's arrays get a leading axis of 1 and layer 0 (None scales stay None)."""
    if layer is not None:
        return layer, k, v, k_scales, v_scales
    return 0, k[None], v[None], *(None if a is None else a[None] for a in (k_scales, v_scales))


def cdiv(a, b: int):
    """Ceil-div for non-negative traced int32 scalars (lax.div: Triton-friendly)."""
    return lax.div(a + (b - 1), b)


def cap_logits(s, soft_cap: float | None):
    """Gemma-style soft-cap: soft_cap * tanh(s / soft_cap). s already scaled."""
    if soft_cap is None:
        return s
    return soft_cap * jnp.tanh(s / soft_cap)


def visible(q_pos, k_pos, kv_len, sliding_window: int | None):
    """Bottom-right causal visibility: key j seen by query at absolute position p
    iff j <= p, j < kv_len and (with a window) j > p - window. Broadcasts."""
    mask = (k_pos <= q_pos) & (k_pos < kv_len)
    if sliding_window is not None:
        mask = mask & (k_pos > q_pos - sliding_window)
    return mask


def check_inputs(q, k, v, q_offset, kv_len, sliding_window, soft_cap, kv_quant=None,
                 k_scales=None, v_scales=None):
    """Validates shapes (k, v as stored in kv_quant's formats: see kv_quant.check_quantized_cache); returns
    (q_offset, kv_len) as int32 [batch]."""
    # k and v agree but for the last dim, which each side's format sets (q8 keys, q4 values).
    if q.ndim != 4 or k.ndim != 4 or v.shape[:-1] != k.shape[:-1]:
        raise ValueError(
            f"expected q [b, q_len, heads, d] and k, v [b, max_seq, kv_heads, stored_dim];"
            f" got q {q.shape}, k {k.shape}, v {v.shape}")
    b, _, nh, d = q.shape
    if k.shape[0] != b:
        raise ValueError(f"batch/head_dim mismatch: q {q.shape}, k {k.shape}")
    check_quantized_cache(kv_quant, d, k, v, k_scales, v_scales)
    if nh % k.shape[2]:
        raise ValueError(f"num_heads {nh} not a multiple of num_kv_heads {k.shape[2]}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1, got {sliding_window}")
    if soft_cap is not None and not soft_cap > 0:
        raise ValueError(f"soft_cap must be > 0, got {soft_cap}")
    q_offset = jnp.broadcast_to(jnp.asarray(q_offset, jnp.int32), (b,))
    kv_len = jnp.broadcast_to(jnp.asarray(kv_len, jnp.int32), (b,))
    return q_offset, kv_len


def to_rows(q, num_kv_heads: int):
    """[b, q_len, kv_heads*G, d] -> [b, kv_heads, q_len*G, d]; row r is position
    r // G, head-in-group r % G (position-major so tiles are causal-contiguous)."""
    b, ql, nh, d = q.shape
    g = nh // num_kv_heads
    q = q.reshape(b, ql, num_kv_heads, g, d).transpose(0, 2, 1, 3, 4)
    return q.reshape(b, num_kv_heads, ql * g, d)


def from_rows(o, q_len: int, num_heads: int):
    """Inverse of `to_rows` (drops padded rows): -> [b, q_len, num_heads, d]."""
    b, kvh, _, d = o.shape
    g = num_heads // kvh
    o = o[:, :, : q_len * g].reshape(b, kvh, q_len, g, d).transpose(0, 2, 1, 3, 4)
    return o.reshape(b, q_len, num_heads, d)


def check_triton_blocks(*sizes: int) -> None:
    """Compiled (Triton) tiles must be powers of two >= 16 (tl.dot's minimum);
    say so up front rather than deep inside the lowering."""
    bad = [s for s in sizes if s < 16 or s & (s - 1)]
    if bad:
        raise ValueError(f"GPU (Triton) block sizes must be powers of two >= 16, got {bad}")


def next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def token_sequences(cu_q_lens, kv_lens, num_seqs, num_tokens: int):
    """Per query row t of the flat step: (sequence index [T], absolute position [T], real [T] bool).
    Padding rows (t >= cu_q_lens[num_seqs]) get real False, sequence 0 and position 0."""
    t = jnp.arange(num_tokens, dtype=jnp.int32)
    in_use = jnp.arange(kv_lens.shape[0]) < num_seqs
    # Sequence of t: how many sequences in use end at or before it.
    seq = jnp.sum((cu_q_lens[1:][None, :] <= t[:, None]) & in_use[None, :], axis=1).astype(jnp.int32)
    real = t < cu_q_lens[num_seqs]
    seq = jnp.where(real, seq, 0)
    q_len = cu_q_lens[seq + 1] - cu_q_lens[seq]
    pos = jnp.where(real, kv_lens[seq] - q_len + (t - cu_q_lens[seq]), 0)
    return seq, pos, real
