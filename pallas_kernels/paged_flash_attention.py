"""Pallas mixed paged-attention kernel (Triton on GPU, interpret mode on CPU): prefill chunks and
decode rows of many sequences in one call, K/V read from pages of one shared pool.

The layout is ragged paged attention's (pallas_kernels/paged_attention.py): q [tokens, heads, d],
cu_q_lens [max_seqs + 1], kv_lens [max_seqs], page_table [max_seqs, pages_per_seq], num_seqs [].
There is no ready-made mixed kernel for GPU in JAX: jax's `ops/gpu/paged_attention.py` is
decode-only (one query per sequence, grid over KV heads and key splits, pages gathered by the
block table), and the TPU `ragged_paged_attention` walks flat query blocks that may span several
sequences with scalar prefetch (which the Triton lowering does not have). This kernel keeps the
flash prefill kernel's design (flash_attention.py) and adds the page table:

  * grid (max_seqs, kv_heads, row tiles): GQA folded into query rows as in flash_attention.py (a
    sequence's q_len * G rows of one KV head are contiguous in the folded q), so each K/V tile
    feeds the G heads; tile t of sequence s holds its rows t * block_q ..; tiles past a
    sequence's rows (and slots >= num_seqs, whose q_len is 0) run no key loop;
  * each program writes its own output block ([max_seqs * tiles * block_q] rows per KV head): no
    two programs write the same memory and no masked stores; the sequences' rows are gathered back
    into the flat [tokens, heads, d] after the call (padding rows zero);
  * the key loop has traced bounds (kv_len, the tile's last position, the sliding window) over key
    blocks of `block_k` keys inside one page (block_k divides page_size): page_table[s, j] gives
    the page, read straight from the whole pool [layers, num_pages, page_size, kv_heads, d]
    (traced layer: no copy of a layer);
  * bottom-right causal mask (query i of s at kv_len - q_len + i), window, soft-cap, cache garbage
    past kv_len never leaks (flash_attention.online_softmax_step); every cache format, dequantized
    as each tile is loaded (flash_attention.load_kv_tile; rotated keys: q rotated before, rotated
    values: the output after).

`PagedBlockSizes` sits beside the kernel; its plain reference is paged_attention.py's
`paged_attention_reference` (gather the pages, full masked attention in f32), the op's oracle.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.common import (as_layer_stack, cdiv, check_triton_blocks, default_sm_scale, next_pow2,
                                   token_sequences)
from pallas_kernels.compat import default_interpret, triton_compiler_params
from pallas_kernels.flash_attention import load_kv_tile, online_softmax_step, split_scale_refs
from pallas_kernels.kv_quant import kv_quant_pair, rotate


@dataclasses.dataclass(frozen=True)
class PagedBlockSizes:
    """Tile sizes of the mixed paged kernel (hashable: a static jit argument).

    block_q: query rows per tile (rows: (position, head-in-group) pairs, as flash_attention.py's
        BlockSizes); a call uses min(block_q, next_pow2(tokens * G)), at least 16.
    block_k: keys per step of the key loop, at most one page: a call uses min(block_k, page_size),
        which must divide page_size. On GPU both must be powers of two >= 16.
    The defaults are flash_attention.py's (usual Triton choices; not tuned: no GPU was lent).
    """

    block_q: int = 64
    block_k: int = 64

    def __post_init__(self):
        if self.block_q < 1 or self.block_k < 1:
            raise ValueError(f"block sizes must be positive: {self}")

    @classmethod
    def default(cls, head_dim: int) -> "PagedBlockSizes":
        # The f32 accumulator [block_q, head_dim] lives in registers: shrink block_q as head_dim grows.
        return cls(block_q=64 if head_dim <= 128 else 32, block_k=64 if head_dim <= 128 else 32)


def _paged_flash_kernel(cu_ref, kv_lens_ref, table_ref, layer_ref, q_ref, k_ref, v_ref, *refs, sm_scale,
                        sliding_window, soft_cap, block_k, page_size, group, k_quant, v_quant):
    """One (sequence s, KV head, row tile t): q_ref the folded rows of this KV head [rows + pad, d];
    k_ref / v_ref (and scales) this KV head's pool [layers, num_pages, page_size, stored_dim];
    table_ref [pages_per_seq] of s; out: this tile's block [block_q, d]."""
    ks_ref, vs_ref, (o_ref,) = split_scale_refs(refs, k_quant, v_quant)
    s, t = pl.program_id(0), pl.program_id(2)
    block_q = o_ref.shape[0]
    q_start, q_end = cu_ref[s], cu_ref[s + 1]
    q_len = q_end - q_start
    kv_len = kv_lens_ref[s]
    layer = layer_ref[0]
    num_rows = q_len * group
    row0 = t * block_q
    q_offset = kv_len - q_len  # bottom-right aligned
    q_pos = q_offset + lax.div(row0 + jnp.arange(block_q, dtype=jnp.int32), group)
    last_pos = q_offset + lax.div(jnp.minimum(row0 + block_q, num_rows) - 1, group)
    hi = cdiv(jnp.maximum(jnp.minimum(kv_len, last_pos + 1), 0), block_k)
    hi = jnp.where(row0 < num_rows, hi, 0)  # a tile past the sequence's rows (or an empty slot)
    if sliding_window is None:
        lo = jnp.int32(0)
    else:
        first_pos = q_offset + lax.div(row0, group)
        lo = lax.div(jnp.maximum(first_pos - sliding_window + 1, 0), block_k)

    q = q_ref[pl.ds(q_start * group + row0, block_q), :]

    def body(j, carry):
        start = j * block_k
        page = table_ref[start // page_size]
        offset = start % page_size
        k_pos = start + jnp.arange(block_k, dtype=jnp.int32)
        k = load_kv_tile(k_ref, ks_ref, offset, block_k, k_quant, q.dtype, lead=(layer, page))
        v = load_kv_tile(v_ref, vs_ref, offset, block_k, v_quant, q.dtype, lead=(layer, page))
        return online_softmax_step(q, k, v, q_pos, k_pos, start, kv_len, carry, sm_scale=sm_scale,
                                   sliding_window=sliding_window, soft_cap=soft_cap)

    d = q_ref.shape[1]
    init = (jnp.zeros((block_q, d), jnp.float32), jnp.full((block_q,), -jnp.inf, jnp.float32),
            jnp.zeros((block_q,), jnp.float32))
    acc, _, l = lax.fori_loop(lo, hi, body, init)
    ok = l > 0  # rows that saw no key (past the sequence, empty tiles) -> zeros
    o_ref[...] = jnp.where(ok[:, None], acc / jnp.where(ok, l, 1.0)[:, None], 0.0).astype(o_ref.dtype)


def paged_flash_supports(q, k_pages, *, interpret: bool) -> str | None:
    """None if the compiled (Triton) kernel takes these shapes, else why not; interpret mode takes
    every shape."""
    if interpret:
        return None
    head_dim, page_size = q.shape[-1], k_pages.shape[-3]
    if head_dim != next_pow2(head_dim) or head_dim < 16:
        return f"head_dim {head_dim}: the compiled kernel takes a power of two >= 16 (Triton tiles)"
    if page_size != next_pow2(page_size) or page_size < 16:
        return f"page_size {page_size}: the compiled kernel takes a power of two >= 16 (one key tile per page)"
    return None


@functools.partial(jax.jit, static_argnames=("sm_scale", "sliding_window", "soft_cap", "kv_quant", "block_sizes",
                                             "interpret", "num_warps", "num_stages"))
def paged_flash_attention(q, k_pages, v_pages, cu_q_lens, kv_lens, page_table, num_seqs, *, layer=None,
                          sm_scale=None, sliding_window=None, soft_cap=None, kv_quant=None, k_scales=None,
                          v_scales=None, block_sizes=None, interpret=None, num_warps=None, num_stages=2):
    """Ragged paged attention of a mixed step (arguments and result as
    `pallas_kernels.paged_attention.paged_attention`): q [tokens, heads, d]; k_pages, v_pages
    [num_pages, page_size, kv_heads, stored_dim] or the whole pool [layers, ...] with a traced
    `layer`; returns [tokens, heads, d] in q.dtype, padding rows zero. block_sizes:
    `PagedBlockSizes` (None: its default for head_dim); interpret: None = interpret unless on a GPU."""
    layer, k_pages, v_pages, k_scales, v_scales = as_layer_stack(layer, k_pages, v_pages, k_scales, v_scales)
    k_quant, v_quant = kv_quant_pair(kv_quant)
    num_tokens, nh, d = q.shape
    max_seqs = page_table.shape[0]
    page_size, kvh = k_pages.shape[2], k_pages.shape[3]
    g = nh // kvh
    interpret = default_interpret() if interpret is None else interpret
    if (why := paged_flash_supports(q, k_pages, interpret=interpret)) is not None:
        raise ValueError(f"paged_flash_attention: {why}")
    bs = block_sizes or PagedBlockSizes.default(d)
    block_q = min(bs.block_q, max(16, next_pow2(num_tokens * g)))
    block_k = min(bs.block_k, page_size)
    if page_size % block_k:
        raise ValueError(f"block_k {block_k} must divide page_size {page_size}")
    if not interpret:
        check_triton_blocks(block_q, block_k)
    scale = default_sm_scale(d) if sm_scale is None else sm_scale
    # Rows folded per KV head: [kvh, tokens * G (+ one tile of padding: a tile's load never runs off), d].
    qr = rotate(q, k_quant).reshape(num_tokens, kvh, g, d).transpose(1, 0, 2, 3).reshape(kvh, num_tokens * g, d)
    qr = jnp.pad(qr, ((0, 0), (0, block_q), (0, 0)))
    n_tiles = -(-num_tokens * g // block_q)  # the most a sequence can need (static)

    kernel = functools.partial(_paged_flash_kernel, sm_scale=scale, sliding_window=sliding_window, soft_cap=soft_cap,
                               block_k=block_k, page_size=page_size, group=g, k_quant=k_quant, v_quant=v_quant)
    whole = lambda x: pl.BlockSpec(x.shape, lambda s, h, t: (0,) * x.ndim)
    layer = jnp.asarray(layer, jnp.int32).reshape(1)
    cache = [x for x in (k_pages, v_pages, k_scales, v_scales) if x is not None]
    cache_specs = [pl.BlockSpec((x.shape[0], x.shape[1], x.shape[2], None, x.shape[4]),
                                lambda s, h, t: (0, 0, 0, h, 0)) for x in cache]
    out = pl.pallas_call(
        kernel,
        grid=(max_seqs, kvh, n_tiles),
        in_specs=[whole(cu_q_lens), whole(kv_lens), pl.BlockSpec((None, page_table.shape[1]), lambda s, h, t: (s, 0)),
                  whole(layer), pl.BlockSpec((None, qr.shape[1], d), lambda s, h, t: (h, 0, 0)), *cache_specs],
        out_specs=pl.BlockSpec((None, block_q, d), lambda s, h, t: (h, s * n_tiles + t, 0)),
        out_shape=jax.ShapeDtypeStruct((kvh, max_seqs * n_tiles * block_q, d), q.dtype),
        compiler_params=triton_compiler_params(num_warps=num_warps or (4 if d <= 64 else 8), num_stages=num_stages),
        interpret=interpret,
        name="jaxchunk_paged_flash",
    )(cu_q_lens, kv_lens, page_table, layer, qr, *cache)
    # Back to the flat layout: token t (local index i in its sequence s), head j of KV head h is
    # output row s * n_tiles * block_q + i * G + j of h.
    seq, _, real = token_sequences(cu_q_lens, kv_lens, num_seqs, num_tokens)
    local = jnp.arange(num_tokens, dtype=jnp.int32) - cu_q_lens[seq]
    rows = (seq * n_tiles * block_q + local * g)[:, None] + jnp.arange(g, dtype=jnp.int32)[None, :]  # [T, G]
    o = out[:, jnp.where(real[:, None], rows, 0)]  # [kvh, T, G, d]
    o = jnp.where(real[None, :, None, None], o, 0).transpose(1, 0, 2, 3).reshape(num_tokens, nh, d)
    return rotate(o, v_quant).astype(q.dtype)
