"""Pallas flash-attention prefill kernel (Triton on GPU, interpret mode on CPU).

Modelled on jax.experimental.pallas.ops.gpu.attention.mha, changed for chunked
prefill against a fixed-shape KV cache:
  * bottom-right causal offset from traced per-row q_offset / kv_len inputs;
  * GQA folded into query rows: grid (batch, kv_heads, row tiles), a tile holds
    block_q (position, head-in-group) rows, so each K/V tile feeds G heads;
  * the key loop has traced bounds: it starts at the first block the sliding
    window lets the tile see and stops at min(cdiv(kv_len, bk),
    cdiv(last position in tile + 1, bk));
  * optional soft-cap; cache garbage (NaN/inf) past kv_len never leaks;
  * quantized cache (pallas_kernels.kv_quant): the codes and their scales come in as
    extra refs and each K/V tile is dequantized as it is loaded (`load_kv_tile`), keys
    and values each in its own format; rotated keys are handled by rotating q before
    the kernel, rotated values by rotating the output after it.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.common import (BlockSizes, cap_logits, cdiv, check_inputs,
                                    check_triton_blocks, default_sm_scale, from_rows,
                                    next_pow2, to_rows, visible)
from pallas_kernels.compat import default_interpret, triton_compiler_params
from pallas_kernels.kv_quant import dequantize_fields, float_values, kv_quant_pair, rotate


def _dot_nt(a, b):
    """a [m, d] @ b[n, d].T in f32 (2-D only: what the Triton lowering takes).
    No precision flag: f32 inputs lower to IEEE, not TF32."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())),
                           preferred_element_type=jnp.float32)


def online_softmax_step(q, k, v, q_pos, k_pos, first_new_key, kv_len, carry, *,
                        sm_scale, sliding_window, soft_cap):
    """One key tile of the online softmax, shared by the flash and decode kernels.

    q [rows, d]; k, v [bk, d] as loaded (garbage allowed past kv_len);
    q_pos [rows], k_pos [bk] absolute positions; keys below first_new_key were
    already counted (tile start clamped at the cache end). carry = (acc [rows, d],
    m [rows], l [rows]) f32; m is -inf while a row has seen no key.
    """
    acc, m, l = carry
    s = cap_logits(_dot_nt(q, k) * sm_scale, soft_cap)
    mask = visible(q_pos[:, None], k_pos[None, :], kv_len, sliding_window)
    mask = mask & (k_pos >= first_new_key)[None, :]
    s = jnp.where(mask, s, -jnp.inf)  # before exp: drops NaN/inf garbage too
    m_new = jnp.maximum(m, jnp.max(s, axis=1))
    m_use = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # avoid -inf - -inf
    alpha = jnp.exp(m - m_use)
    p = jnp.exp(s - m_use[:, None])
    l = alpha * l + jnp.sum(p, axis=1)
    v = jnp.where((k_pos < kv_len)[:, None], v, jnp.zeros_like(v))  # 0 * NaN guard
    pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                         preferred_element_type=jnp.float32)
    return alpha[:, None] * acc + pv, m_new, l


def load_kv_tile(ref, scale_ref, start, block_k: int, kv_quant, dtype, lead=()):
    """Rows [start, start + block_k) of one head's cache ref, as [block_k, d] in `dtype`.

    ref [*lead dims, max_seq, stored_dim]: plain values, or packed codes of `kv_quant` with
    scale_ref [*lead dims, max_seq, d / 32]; each packed field is loaded as its own (power-of-two
    wide) tile. lead: (traced) scalar indices of the leading dims (the paged kernel's layer and
    page), part of the same load: the Triton lowering takes one indexer per load, not a ref view
    (`ref.at[...]`) indexed again."""
    rows = pl.ds(start, block_k)
    if kv_quant is None:
        return ref[(*lead, rows, slice(None))].astype(dtype)
    if not kv_quant.packed:
        return float_values(ref[(*lead, rows, slice(None))], kv_quant, dtype)
    head_dim = ref.shape[-1] * 8 // kv_quant.bits
    fields = [ref[(*lead, rows, pl.ds(off, n))] for off, n in kv_quant.field_slices(head_dim)]
    return dequantize_fields(fields, scale_ref[(*lead, rows, slice(None))], kv_quant, dtype)


def split_scale_refs(refs, k_quant, v_quant):
    """(k_scale_ref?, v_scale_ref?, *outputs) -> (k_scale_ref, v_scale_ref, outputs); each scale
    ref is present only when its side's format is scaled (None otherwise)."""
    refs = list(refs)
    k_scale_ref = refs.pop(0) if k_quant is not None and k_quant.scaled else None
    v_scale_ref = refs.pop(0) if v_quant is not None and v_quant.scaled else None
    return k_scale_ref, v_scale_ref, refs


def _flash_kernel(q_offset_ref, kv_len_ref, q_ref, k_ref, v_ref, *refs,
                  sm_scale, sliding_window, soft_cap, block_k, group, num_rows, k_quant, v_quant):
    ks_ref, vs_ref, (o_ref,) = split_scale_refs(refs, k_quant, v_quant)
    block_q = q_ref.shape[0]
    max_seq = k_ref.shape[0]
    tile = pl.program_id(2)
    q_offset = q_offset_ref[0]
    kv_len = kv_len_ref[0]
    row0 = tile * block_q
    q_pos = q_offset + lax.div(row0 + jnp.arange(block_q, dtype=jnp.int32), group)
    # Bounds from the tile's real (unpadded) first/last positions.
    last_pos = q_offset + lax.div(jnp.minimum(row0 + block_q, num_rows) - 1, group)
    hi = cdiv(jnp.maximum(jnp.minimum(kv_len, last_pos + 1), 0), block_k)
    if sliding_window is None:
        lo = jnp.int32(0)
    else:
        first_pos = q_offset + lax.div(row0, group)
        lo = lax.div(jnp.maximum(first_pos - sliding_window + 1, 0), block_k)

    q = q_ref[...]

    def body(j, carry):
        start = j * block_k
        load = jnp.minimum(start, max_seq - block_k)  # wrapper ensures max_seq >= bk
        k_pos = load + jnp.arange(block_k, dtype=jnp.int32)
        k = load_kv_tile(k_ref, ks_ref, load, block_k, k_quant, q.dtype)
        v = load_kv_tile(v_ref, vs_ref, load, block_k, v_quant, q.dtype)
        return online_softmax_step(q, k, v, q_pos, k_pos, start, kv_len, carry,
                                   sm_scale=sm_scale, sliding_window=sliding_window,
                                   soft_cap=soft_cap)

    d = q_ref.shape[1]
    init = (jnp.zeros((block_q, d), jnp.float32),
            jnp.full((block_q,), -jnp.inf, jnp.float32),
            jnp.zeros((block_q,), jnp.float32))
    acc, _, l = lax.fori_loop(lo, hi, body, init)
    ok = l > 0  # rows that saw no key (padding, kv_len == 0) -> exact zeros
    out = jnp.where(ok[:, None], acc / jnp.where(ok, l, 1.0)[:, None], 0.0)
    o_ref[...] = out.astype(o_ref.dtype)


def pad_cache(k, v, block_k: int, k_scales=None, v_scales=None, kv_quant=None,
              interpret: bool = True, *, head_dim: int):
    """Pads head_dim to a power of two (Triton tiles) and the cache to >= block_k
    keys (the clamped tile load needs one full tile). Both are no-ops for the
    usual shapes (head_dim 64/128, max_seq >= block_k); padding head_dim copies
    the cache, so keep head_dim a power of two for speed. Packed (integer) formats
    are never padded along head_dim (nor is the other side, so K, V and q keep one
    width): compiled, they need a power-of-two head_dim. kv_quant: see
    `kv_quant_pair`. Returns (k, v, k_scales, v_scales, padded head_dim)."""
    max_seq, d = k.shape[1], head_dim
    pad_s = max(0, block_k - max_seq)
    packed = [spec for spec in kv_quant_pair(kv_quant) if spec is not None and spec.packed]
    if packed and not interpret and d != next_pow2(d):
        raise ValueError(f"the compiled kernels read a {packed[0].name!r} cache only with a "
                         f"power-of-two head_dim, got {d}")
    pad_d = 0 if packed else next_pow2(d) - d
    if pad_d or pad_s:
        widths = ((0, 0), (0, pad_s), (0, 0), (0, pad_d))
        seq_only = ((0, 0), (0, pad_s), (0, 0), (0, 0))
        k, v = jnp.pad(k, widths), jnp.pad(v, widths)
        k_scales = None if k_scales is None else jnp.pad(k_scales, seq_only)
        v_scales = None if v_scales is None else jnp.pad(v_scales, seq_only)
    return k, v, k_scales, v_scales, d + pad_d


def cache_operands(k, v, k_scales, v_scales, index_map):
    """(BlockSpecs, arrays) for k, v and whichever scales exist (the order `split_scale_refs`
    reads): one head's whole [max_seq, last dim] of each."""
    arrays = [x for x in (k, v, k_scales, v_scales) if x is not None]
    specs = [pl.BlockSpec((None, x.shape[1], None, x.shape[3]), index_map) for x in arrays]
    return specs, arrays


@functools.partial(jax.jit, static_argnames=(
    "sm_scale", "sliding_window", "soft_cap", "block_sizes", "interpret",
    "num_warps", "num_stages", "kv_quant"))
def flash_attention(q, k, v, q_offset, kv_len, *, sm_scale=None, sliding_window=None,
                    soft_cap=None, block_sizes=None, interpret=None, num_warps=None,
                    num_stages=2, kv_quant=None, k_scales=None, v_scales=None):
    """q [b, q_len, heads, d]; k, v [b, max_seq, kv_heads, d]; q_offset, kv_len
    int32 [b] -> [b, q_len, heads, d] in q.dtype. block_q counts query rows
    (q_len * G of them per KV head); on GPU both block sizes must be powers of 2.
    kv_quant / k_scales / v_scales: a quantized cache, as in `blockwise_attention` (keys and values
    may each have their own format)."""
    q_offset, kv_len = check_inputs(q, k, v, q_offset, kv_len, sliding_window, soft_cap,
                                    kv_quant, k_scales, v_scales)
    b, ql, nh, d = q.shape
    kvh = k.shape[2]
    g = nh // kvh
    bs = block_sizes or BlockSizes.flash_default(d)
    interpret = default_interpret() if interpret is None else interpret
    scale = default_sm_scale(d) if sm_scale is None else sm_scale

    rows = ql * g
    # Never a tile much bigger than the work; stay a power of two >= 16 for Triton.
    block_q = min(bs.block_q, max(16, next_pow2(rows)))
    block_k = bs.block_k
    if not interpret:
        check_triton_blocks(bs.block_q, block_k)
    k_quant, v_quant = kv_quant_pair(kv_quant)
    k, v, k_scales, v_scales, dp = pad_cache(k, v, block_k, k_scales, v_scales, kv_quant,
                                             interpret, head_dim=d)
    qr = to_rows(rotate(q, k_quant), kvh)
    n_tiles = pl.cdiv(rows, block_q)
    qr = jnp.pad(qr, ((0, 0), (0, 0), (0, n_tiles * block_q - rows), (0, dp - d)))

    kernel = functools.partial(
        _flash_kernel, sm_scale=scale, sliding_window=sliding_window,
        soft_cap=soft_cap, block_k=block_k, group=g, num_rows=rows, k_quant=k_quant, v_quant=v_quant)
    scalar_spec = pl.BlockSpec((None, 1), lambda i, h, t: (i, 0))
    rows_spec = pl.BlockSpec((None, None, block_q, dp), lambda i, h, t: (i, h, t, 0))
    cache_specs, cache_arrays = cache_operands(k, v, k_scales, v_scales, lambda i, h, t: (i, 0, h, 0))
    out = pl.pallas_call(
        kernel,
        grid=(b, kvh, n_tiles),
        in_specs=[scalar_spec, scalar_spec, rows_spec, *cache_specs],
        out_specs=rows_spec,
        out_shape=jax.ShapeDtypeStruct(qr.shape, q.dtype),
        compiler_params=triton_compiler_params(
            num_warps=num_warps or (4 if dp <= 64 else 8), num_stages=num_stages),
        interpret=interpret,
        name="jaxchunk_flash_prefill",
    )(q_offset[:, None], kv_len[:, None], qr, *cache_arrays)
    return rotate(from_rows(out[..., :d], ql, nh), v_quant)
