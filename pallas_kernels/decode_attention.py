"""Split-K flash-decoding for q_len = 1 and short speculative chunks (q_len <= 8).

One query row set per (batch, kv_head) is far too little work for a grid, so the
keys are split too: grid (batch, kv_heads, k_splits); split s owns the contiguous
key range [s * split_len, (s + 1) * split_len) and skips whatever lies past
kv_len / before the window. Each split writes an unnormalised partial
(acc, m, l); a small JAX epilogue merges them with log-sum-exp. Same pattern as
jax.experimental.pallas.ops.gpu.decode_attention.gqa, plus per-row offsets,
several query positions, window and soft-cap.

The G query heads of a KV head and the q_len positions are folded into one row
block (rows = q_len * G, padded to a power of two >= 16 for Triton's dot).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.common import (BlockSizes, cdiv, check_inputs, check_triton_blocks,
                                    default_sm_scale, from_rows, next_pow2, to_rows)
from pallas_kernels.compat import default_interpret, triton_compiler_params
from pallas_kernels.flash_attention import (cache_operands, load_kv_tile, online_softmax_step,
                                            pad_cache, split_scale_refs)
from pallas_kernels.kv_quant import kv_quant_pair, rotate

MAX_DECODE_Q_LEN = 8  # beyond this the flash prefill kernel has enough rows


def decode_attention_supports(q, *args, **kwargs) -> str | None:
    """None if a decode kernel (this one, the native CPU one) takes q [b, q_len, heads, d], else
    why not: they are built for a few query positions (q_len <= MAX_DECODE_Q_LEN). Takes the
    attention op's arguments; only q's shape matters."""
    del args, kwargs
    q_len = q.shape[1]
    if q_len > MAX_DECODE_Q_LEN:
        return f"q_len {q_len} is a prefill chunk: decode kernels take q_len <= {MAX_DECODE_Q_LEN}"
    return None


def _decode_kernel(q_offset_ref, kv_len_ref, q_ref, k_ref, v_ref, *refs, sm_scale,
                   sliding_window, soft_cap, block_k, split_len, group, num_rows, k_quant, v_quant):
    ks_ref, vs_ref, (acc_ref, m_ref, l_ref) = split_scale_refs(refs, k_quant, v_quant)
    rows, d = q_ref.shape
    max_seq = k_ref.shape[0]
    split = pl.program_id(2)
    q_offset = q_offset_ref[0]
    kv_len = kv_len_ref[0]
    q_pos = q_offset + lax.div(jnp.arange(rows, dtype=jnp.int32), group)
    last_pos = q_offset + (num_rows - 1) // group
    split_start = split * split_len
    # split_len is a multiple of block_k, so blocks never straddle two splits.
    hi_key = jnp.minimum(jnp.minimum(kv_len, last_pos + 1), split_start + split_len)
    hi = cdiv(jnp.maximum(hi_key, 0), block_k)
    lo = lax.div(split_start, block_k)
    if sliding_window is not None:
        lo = jnp.maximum(lo, lax.div(jnp.maximum(q_offset - sliding_window + 1, 0),
                                     block_k))
    q = q_ref[...]

    def body(j, carry):
        start = j * block_k
        load = jnp.minimum(start, max_seq - block_k)
        k_pos = load + jnp.arange(block_k, dtype=jnp.int32)
        k = load_kv_tile(k_ref, ks_ref, load, block_k, k_quant, q.dtype)
        v = load_kv_tile(v_ref, vs_ref, load, block_k, v_quant, q.dtype)
        return online_softmax_step(q, k, v, q_pos, k_pos, start, kv_len, carry,
                                   sm_scale=sm_scale, sliding_window=sliding_window,
                                   soft_cap=soft_cap)

    init = (jnp.zeros((rows, d), jnp.float32),
            jnp.full((rows,), -jnp.inf, jnp.float32),
            jnp.zeros((rows,), jnp.float32))
    acc, m, l = lax.fori_loop(lo, hi, body, init)  # empty range: untouched init
    acc_ref[...] = acc
    m_ref[...] = m
    l_ref[...] = l


def merge_splits(acc, m, l):
    """Log-sum-exp merge over axis 2 (splits). acc [b, kvh, s, r, d], m/l [b, kvh,
    s, r] -> normalised [b, kvh, r, d] f32; rows with no key anywhere -> 0."""
    m_all = jnp.max(m, axis=2, keepdims=True)
    w = jnp.exp(m - jnp.where(m_all == -jnp.inf, 0.0, m_all))  # empty split -> 0
    l_all = jnp.sum(l * w, axis=2)
    o = jnp.sum(acc * w[..., None], axis=2)
    ok = (l_all > 0)[..., None]
    return jnp.where(ok, o / jnp.where(ok, l_all[..., None], 1.0), 0.0)


@functools.partial(jax.jit, static_argnames=(
    "sm_scale", "sliding_window", "soft_cap", "block_sizes", "k_splits",
    "interpret", "num_warps", "num_stages", "kv_quant"))
def decode_attention(q, k, v, q_offset, kv_len, *, sm_scale=None, sliding_window=None,
                     soft_cap=None, block_sizes=None, k_splits=16, interpret=None,
                     num_warps=4, num_stages=2, kv_quant=None, k_scales=None, v_scales=None):
    """q [b, q_len <= 8, heads, d]; k, v [b, max_seq, kv_heads, d]; q_offset,
    kv_len int32 [b] -> [b, q_len, heads, d] in q.dtype.

    block_sizes.block_k: keys per tile; block_sizes.block_q: minimum row block.
    k_splits is capped so every split owns at least one key tile.
    kv_quant / k_scales / v_scales: a quantized cache, as in `flash_attention`.
    """
    q_offset, kv_len = check_inputs(q, k, v, q_offset, kv_len, sliding_window, soft_cap,
                                    kv_quant, k_scales, v_scales)
    b, ql, nh, d = q.shape
    if (why := decode_attention_supports(q)) is not None:
        raise ValueError(f"decode_attention: {why}")
    kvh = k.shape[2]
    g = nh // kvh
    bs = block_sizes or BlockSizes.decode_default(d)
    interpret = default_interpret() if interpret is None else interpret
    scale = default_sm_scale(d) if sm_scale is None else sm_scale

    block_k = bs.block_k
    if not interpret:
        check_triton_blocks(bs.block_q, block_k)
    k_quant, v_quant = kv_quant_pair(kv_quant)
    k, v, k_scales, v_scales, dp = pad_cache(k, v, block_k, k_scales, v_scales, kv_quant,
                                             interpret, head_dim=d)
    max_seq = k.shape[1]
    n_blocks = pl.cdiv(max_seq, block_k)
    k_splits = max(1, min(k_splits, n_blocks))
    split_len = pl.cdiv(n_blocks, k_splits) * block_k
    k_splits = pl.cdiv(max_seq, split_len)  # drop splits that would own nothing

    rows = ql * g
    rows_p = max(bs.block_q, next_pow2(rows))
    qr = jnp.pad(to_rows(rotate(q, k_quant), kvh),
                 ((0, 0), (0, 0), (0, rows_p - rows), (0, dp - d)))

    kernel = functools.partial(
        _decode_kernel, sm_scale=scale, sliding_window=sliding_window,
        soft_cap=soft_cap, block_k=block_k, split_len=split_len, group=g,
        num_rows=rows, k_quant=k_quant, v_quant=v_quant)
    scalar_spec = pl.BlockSpec((None, 1), lambda i, h, s: (i, 0))
    cache_specs, cache_arrays = cache_operands(k, v, k_scales, v_scales, lambda i, h, s: (i, 0, h, 0))
    part = (b, kvh, k_splits, rows_p)
    acc, m, l = pl.pallas_call(
        kernel,
        grid=(b, kvh, k_splits),
        in_specs=[scalar_spec, scalar_spec,
                  pl.BlockSpec((None, None, rows_p, dp), lambda i, h, s: (i, h, 0, 0)),
                  *cache_specs],
        out_specs=[
            pl.BlockSpec((None, None, None, rows_p, dp), lambda i, h, s: (i, h, s, 0, 0)),
            pl.BlockSpec((None, None, None, rows_p), lambda i, h, s: (i, h, s, 0)),
            pl.BlockSpec((None, None, None, rows_p), lambda i, h, s: (i, h, s, 0)),
        ],
        out_shape=[jax.ShapeDtypeStruct((*part, dp), jnp.float32),
                   jax.ShapeDtypeStruct(part, jnp.float32),
                   jax.ShapeDtypeStruct(part, jnp.float32)],
        compiler_params=triton_compiler_params(num_warps=num_warps,
                                               num_stages=num_stages),
        interpret=interpret,
        name="jaxchunk_flash_decode",
    )(q_offset[:, None], kv_len[:, None], qr, *cache_arrays)
    o = merge_splits(acc, m, l)
    return rotate(from_rows(o[..., :d], ql, nh), v_quant).astype(q.dtype)

