"""Blockwise "matmul attention" in plain XLA: the CPU default (exllamav2's design).

Online softmax over key blocks in a `lax.fori_loop` whose bounds are *traced*
(from kv_len / q_offset / the window), so the work follows the real prompt, not
the cache capacity: a cache of 8192 with kv_len 600 reads ceil(600 / block_k)
blocks. Peak memory per block is b * heads * q_len * block_k f32 scores.

GQA: q is regrouped to rows [b, kv_heads, q_len*G, d] so one batched matmul per
KV head serves its G query heads; K/V are never repeated.

Quantized cache (pallas_kernels.kv_quant): each key block is dequantized as it is read (codes and
its scales sliced straight from the whole cache), keys and values each with their own format; with
a rotated key format q is rotated once before the loop, with a rotated value format the output once
after it, so the blocks are never un-rotated.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.common import (BlockSizes, as_layer_stack, cap_logits, cdiv, check_inputs,
                                    default_sm_scale, from_rows, to_rows, visible)
from pallas_kernels.kv_quant import dequantize, kv_quant_pair, rotate


def key_block_range(q_offset, kv_len, first_row: int, last_row: int, group: int,
                    block_k: int, sliding_window: int | None):
    """Traced key-block ranges for rows [first_row, last_row] of a tile.

    Returns (lo, full_lo, full_hi, hi), int32 scalars with lo <= full_lo <= full_hi <= hi
    (or full_lo == full_hi when no block is fully visible): blocks in [lo, hi) are
    visible to some row of *any* batch entry; blocks in [full_lo, full_hi) are
    visible to *every* row of every batch entry, so they need no mask.
    """
    first_pos = q_offset + first_row // group  # [b]
    last_pos = q_offset + last_row // group
    hi_key = jnp.max(jnp.minimum(kv_len, last_pos + 1))  # past it: masked for all
    hi = cdiv(jnp.maximum(hi_key, 0), block_k)
    # Keys every row sees: below kv_len and at or before the tile's first position.
    full_hi = jnp.maximum(jnp.min(jnp.minimum(kv_len, first_pos + 1)), 0) // block_k
    if sliding_window is None:
        lo = full_lo = jnp.int32(0)
    else:
        lo = jnp.min(jnp.maximum(first_pos - sliding_window + 1, 0)) // block_k
        full_lo = cdiv(jnp.max(jnp.maximum(last_pos - sliding_window + 1, 0)), block_k)
    full_hi = jnp.clip(full_hi, lo, hi)
    full_lo = jnp.clip(full_lo, lo, full_hi)
    return lo, full_lo, full_hi, hi


# ----------------------------------------------------------------------------- online softmax
# Shared with the paged backend (paged_attention.py): the loop body is written once.
def online_softmax_init(b: int, kvh: int, r: int, d: int):
    """The empty online-softmax state (acc [b, kvh, r, d], running max m [b, kvh, r], sum l [b, kvh, r]),
    f32."""
    return (jnp.zeros((b, kvh, r, d), jnp.float32),
            jnp.full((b, kvh, r), -jnp.inf, jnp.float32),
            jnp.zeros((b, kvh, r), jnp.float32))


def attend_key_block(carry, qr, kb, vb, *, mask=None, key_valid=None, soft_cap=None):
    """Fold one key block into the online-softmax state `carry` (see `online_softmax_init`).

    qr [b, kvh, r, d] f32 (pre-scaled query rows); kb, vb [b, bk, kvh, d] f32; mask [b, r, bk] bool
    (None: every key visible to every row); key_valid [b, bk] bool: keys holding real values (None:
    all). Garbage (NaN / inf) in masked keys and invalid values never reaches the state.
    """
    acc, m, l = carry
    s = jnp.einsum("bhrd,bkhd->bhrk", qr, kb)
    s = cap_logits(s, soft_cap)
    if mask is not None:
        s = jnp.where(mask[:, None], s, -jnp.inf)  # NaN garbage never survives
    if key_valid is not None:
        # 0 * NaN = NaN: zero garbage values past kv_len, not just their weights.
        vb = jnp.where(key_valid[:, :, None, None], vb, 0.0)
    m_new = jnp.maximum(m, jnp.max(s, axis=-1))
    m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # fully masked so far
    alpha = jnp.exp(m - m_use)
    p = jnp.exp(s - m_use[..., None])
    l = alpha * l + jnp.sum(p, axis=-1)
    pv = jnp.einsum("bhrk,bkhd->bhrd", p, vb)
    return alpha[..., None] * acc + pv, m_new, l


def online_softmax_result(carry):
    """The attention output [b, kvh, r, d] f32 of a finished state; rows that saw no key are zeros."""
    acc, _, l = carry
    l = l[..., None]
    return jnp.where(l > 0, acc / jnp.where(l > 0, l, 1.0), 0.0)


def _attend_tile(qr, q_pos, k, v, layer, kv_len, block_range, *, block_k, sliding_window,
                 soft_cap, kv_quant=None, k_scales=None, v_scales=None):
    """Online softmax for one row tile. qr [b, kvh, r, d] f32 (pre-scaled, and rotated for a
    rotated key format); q_pos [b, r] absolute positions; k, v [layers, b, max_seq, kvh,
    stored_dim] (+ scales [layers, b, max_seq, kvh, d / 32]) read at `layer`, in the formats of
    kv_quant (`kv_quant_pair`); block_range from `key_block_range`; returns [b, kvh, r, d] f32 (in
    the rotated basis for a rotated value format)."""
    k_quant, v_quant = kv_quant_pair(kv_quant)
    b, kvh, r, d = qr.shape
    max_seq = k.shape[2]
    kv_len_b = kv_len[:, None]

    def read_block(stored, scales, spec, start_idx):
        """One key block of one layer straight from the whole cache (no layer copy), as f32
        [b, bk, kvh, d]."""
        block = lax.dynamic_slice(stored, start_idx, (1, b, block_k, kvh, stored.shape[-1]))[0]
        if spec is None:
            return block.astype(jnp.float32)
        if scales is not None:
            scales = lax.dynamic_slice(scales, start_idx, (1, b, block_k, kvh, scales.shape[-1]))[0]
        return dequantize(block, scales, spec)

    def body(j, carry, masked: bool):
        acc, m, l = carry
        start = j * block_k
        # dynamic_slice clamps an overhanging start; do it ourselves so we know
        # which keys we got, and mask the ones a previous block already counted.
        load = jnp.minimum(start, max_seq - block_k)
        start_idx = (layer, 0, load, 0, 0)
        kb = read_block(k, k_scales, k_quant, start_idx)  # [b, bk, kvh, d] f32
        # f32 PV (not bf16 p): this is the CPU path, where bf16 dots are slower
        # than upcasting the block (bench: 97 -> 63 ms at q 512 / kv 2048).
        vb = read_block(v, v_scales, v_quant, start_idx)
        mask = key_valid = None
        if masked:
            k_pos = load + jnp.arange(block_k, dtype=jnp.int32)
            mask = visible(q_pos[:, :, None], k_pos[None, None, :], kv_len_b[:, :, None],
                           sliding_window) & (k_pos >= start)
            key_valid = k_pos[None, :] < kv_len_b
        return attend_key_block(carry, qr, kb, vb, mask=mask, key_valid=key_valid, soft_cap=soft_cap)

    masked = functools.partial(body, masked=True)
    lo, full_lo, full_hi, hi = block_range
    carry = online_softmax_init(b, kvh, r, d)
    # Interior blocks skip the mask (most of the work for long prompts); the
    # causal diagonal, kv_len tail and window edge take the masked body.
    carry = lax.fori_loop(full_lo, full_hi, functools.partial(body, masked=False), carry)
    carry = lax.fori_loop(lo, full_lo, masked, carry)
    return online_softmax_result(lax.fori_loop(full_hi, hi, masked, carry))


@functools.partial(jax.jit, static_argnames=("sm_scale", "sliding_window",
                                             "soft_cap", "block_sizes", "kv_quant"))
def blockwise_attention(q, k, v, q_offset, kv_len, *, layer=None, sm_scale=None,
                        sliding_window=None, soft_cap=None, block_sizes=None, kv_quant=None,
                        k_scales=None, v_scales=None):
    """q [b, q_len, heads, d]; k, v [b, max_seq, kv_heads, d] (or the whole cache
    [layers, b, max_seq, kv_heads, d] with a traced `layer` index); q_offset,
    kv_len int32 [b]. -> [b, q_len, heads, d] in q.dtype.

    kv_quant: a `KVQuant` spec when k, v are stored in that format (last dim stored_dim, with
    k_scales / v_scales [..., max_seq, kv_heads, d / 32] for the integer formats, laid out like k),
    or a (key format, value format) pair (`kv_quant_pair`; either side None for plain floats).

    block_sizes.block_k: keys per loop step; block_sizes.block_q: query rows per
    tile (rows = q_len * G). Tiling rows lets early tiles stop at their own causal
    bound; each tile is a separate loop, so only worth it for long chunks.
    """
    layer, k, v, k_scales, v_scales = as_layer_stack(layer, k, v, k_scales, v_scales)
    q_offset, kv_len = check_inputs(
        q, k[0], v[0], q_offset, kv_len, sliding_window, soft_cap, kv_quant,
        None if k_scales is None else k_scales[0], None if v_scales is None else v_scales[0])
    b, ql, nh, d = q.shape
    max_seq, kvh = k.shape[2], k.shape[3]
    g = nh // kvh
    bs = block_sizes or BlockSizes.xla_default(d)
    block_k = min(bs.block_k, max_seq)
    scale = default_sm_scale(d) if sm_scale is None else sm_scale

    k_quant, v_quant = kv_quant_pair(kv_quant)
    # Scale (and rotate, for rotated keys) once, not per block.
    qr = to_rows(rotate(q.astype(jnp.float32), k_quant), kvh) * scale
    rows = ql * g
    q_pos = q_offset[:, None] + jnp.arange(rows, dtype=jnp.int32)[None, :] // g
    tiles = []
    for r0 in range(0, rows, bs.block_q):
        r1 = min(r0 + bs.block_q, rows)
        block_range = key_block_range(q_offset, kv_len, r0, r1 - 1, g, block_k,
                                      sliding_window)
        tiles.append(_attend_tile(qr[:, :, r0:r1], q_pos[:, r0:r1], k, v, layer, kv_len,
                                  block_range, block_k=block_k,
                                  sliding_window=sliding_window, soft_cap=soft_cap,
                                  kv_quant=kv_quant, k_scales=k_scales, v_scales=v_scales))
    o = tiles[0] if len(tiles) == 1 else jnp.concatenate(tiles, axis=2)
    return rotate(from_rows(o, ql, nh), v_quant).astype(q.dtype)
