"""Ragged paged attention: one op over a flat batch of many sequences' queries (prefill chunks and
decode tokens mixed) whose K/V live in pages of one shared pool; several backends behind its
signature (see backends.py).

The step layout is that of jax's TPU `ragged_paged_attention`:
  q          [tokens, heads, head_dim]       the step's queries, sequence after sequence, then padding
  cu_q_lens  [max_seqs + 1] int32            sequence s owns query rows cu_q_lens[s] .. cu_q_lens[s+1]-1
  kv_lens    [max_seqs] int32                keys cached for s after this step (its new ones included)
  page_table [max_seqs, pages_per_seq] int32 the pool pages of s, in order: key j is at
                                             (page_table[s, j // page_size], j % page_size)
  num_seqs   [] int32                        sequences in use; slots >= num_seqs are ignored
Query i of s sits at position kv_lens[s] - q_len[s] + i (bottom-right aligned) and sees key j iff
j <= its position (and, with a window, j > position - sliding_window). Rows past
cu_q_lens[num_seqs] (padding) see nothing and give zeros. Pages hold [num_pages, page_size,
kv_heads, stored_dim] (or the whole pool [layers, ...] with a traced `layer`) in any
`kv_quant` cache format (keys and values each in its own, see kv_quant.kv_quant_pair), dequantized
on read.

`BACKENDS`, in the order impl="auto" tries them:
  "pallas"     - the Pallas mixed kernel (paged_flash_attention.py): prefill chunks and decode rows
                 in one call, grid (sequence, KV head, row tile), one page per key tile, every cache
                 format. Compiled on a GPU (Triton; power-of-two head_dim and page_size >= 16),
                 interpret mode elsewhere (slow: tests). auto: GPU only.
  "native_cpu" - the native CPU kernels over the page table in one call (native_cpu.paged_attention_cpu,
                 the contiguous kernels' C++ templates over a paged Layout): the decode kernel for
                 the rows of sequences with q_len <= NATIVE_MAX_Q_LEN (decode rows), the flash
                 kernel for longer ones (prefill chunks). Takes f32 / bf16
                 pools (keys and values in one format), head_dim in native_cpu.ATTENTION_HEAD_DIMS,
                 the CPU backend, a kernel that built. auto: never (measured not faster than
                 xla's one-page decode blocks: the "native CPU" section below), only as
                 impl="native_cpu".
  "xla"        - per sequence, per query block (`Q_BLOCKS`: 1, 8 or 128 tokens by q_len), an
                 online-softmax loop over its key pages (`PAGES_PER_BLOCK` per tier and page size)
                 with traced bounds: the work follows each sequence's q_len and kv_len (not the
                 pages allocated, nor tokens x max context); only the pages it needs are read,
                 straight from the whole pool (no copy of a layer). Takes every call. auto:
                 everywhere but where pallas takes the call (on CPU: every pool format).
  "reference"  - gathers each sequence's pages and runs full masked attention in f32 (the oracle;
                 cost and memory tokens x pages_per_seq x page_size). Never auto.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import native_cpu
from pallas_kernels.backends import Backend, choose_backend, impl_names, supports_everything
from pallas_kernels.blockwise_attention import (attend_key_block, key_block_range, online_softmax_init,
                                                online_softmax_result)
from pallas_kernels.common import (as_layer_stack, cap_logits, cdiv, default_sm_scale, from_rows, to_rows,
                                   token_sequences, visible)
from pallas_kernels.compat import default_interpret
from pallas_kernels.kv_quant import check_quantized_cache, decode, dequantize, kv_quant_pair, rotate
from pallas_kernels.paged_flash_attention import paged_flash_attention, paged_flash_supports

# Query tokens per block of the XLA backend: a sequence takes the smallest block >= its q_len (the
# largest for longer ones), so a decode row costs one token's scores, not a block of 8 or 128
# (the timing difference is within this shared machine's noise; the work is 8x less).
Q_BLOCKS = (1, 8, 128)
# Keys per step of the XLA backend's loop, per query tier (measured: `python -m experiments.paged_step
# --sections blocks,attention`, SmolLM2-135M shapes, one layer, 2 shared cores; two runs at load
# 7-9 and the issue-16 run at load 2.6-3.5; the fastest by minimum time):
#   decode tier (block_q 1): one page per step at every page size. At page 16 / 64 a 256-key block
#     gathers 16 / 4 separate pages and was the slowest (batch 32 x 513 keys: 14.0 / 13.0 ms vs 9.6 /
#     6.3 ms with one page; under load at page 16: one page 10.0 ms, 2-32 pages 8.4-12.3 ms, one
#     page first again by the other run's medians).
#   small tier (block_q 8): 64 keys (4 pages of 16, one page of 64 or 256): 0.31 ms at page 16 vs
#     0.38 (1 page) and 0.39 (16 pages), 0.30 ms at page 64 (1 or 2 pages alike).
#   large tier (block_q 128, prefill chunks): 256 keys, as the contiguous blockwise backend: one page
#     per step at page 16 / 64 was 0.55-0.85x as fast (q_len 128 / 512); under load 128 and 256
#     keys were within noise of each other (2.96 vs 3.04 ms at page 16).
# The decode tier matters on CPU for the pools the native kernel does not read (q8, q4, fp8, mixed
# formats); f32 / bf16 decode rows go to the native kernel ("native_cpu").
KEYS_PER_BLOCK = 256            # the large tier
SMALL_TIER_KEYS_PER_BLOCK = 64  # block_q 2..8


def default_pages_per_block(page_size: int, block_q: int = Q_BLOCKS[-1]) -> int:
    """Pages per key block of the XLA loop for a query tier of `block_q` tokens (table above)."""
    if block_q == 1:
        return 1
    keys = SMALL_TIER_KEYS_PER_BLOCK if block_q <= 8 else KEYS_PER_BLOCK
    return max(1, keys // page_size)


def check_paged_inputs(q, k_pages, v_pages, cu_q_lens, kv_lens, page_table, num_seqs, *, layer=None,
                       sm_scale=None, sliding_window=None, soft_cap=None, kv_quant=None, k_scales=None, v_scales=None):
    """Shapes and static arguments of a paged-attention call; ValueError naming the problem."""
    pool_rank = 4 if layer is None else 5
    if q.ndim != 3:
        raise ValueError(f"q must be [tokens, heads, head_dim], got {q.shape}")
    # k and v pages agree but for the last dim, which each side's format sets.
    if k_pages.ndim != pool_rank or v_pages.shape[:-1] != k_pages.shape[:-1]:
        what = "[num_pages, page_size, kv_heads, d]" if layer is None else "[layers, num_pages, page_size, kv_heads, d]"
        raise ValueError(f"k_pages, v_pages must be {what}; got k {k_pages.shape}, v {v_pages.shape}")
    # One layer's shapes (no slicing: this also runs on ShapeDtypeStructs).
    one = (lambda a: a) if layer is None else (lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype))
    check_quantized_cache(kv_quant, q.shape[-1], one(k_pages), one(v_pages),
                          None if k_scales is None else one(k_scales), None if v_scales is None else one(v_scales))
    if q.shape[1] % k_pages.shape[-2]:
        raise ValueError(f"num_heads {q.shape[1]} not a multiple of num_kv_heads {k_pages.shape[-2]}")
    if page_table.ndim != 2 or kv_lens.shape != page_table.shape[:1] or cu_q_lens.shape != (page_table.shape[0] + 1,):
        raise ValueError(f"expected page_table [max_seqs, pages_per_seq], kv_lens [max_seqs], cu_q_lens "
                         f"[max_seqs + 1]; got {page_table.shape}, {kv_lens.shape}, {cu_q_lens.shape}")
    if jnp.shape(num_seqs) != ():
        raise ValueError(f"num_seqs must be a scalar, got shape {jnp.shape(num_seqs)}")
    if sliding_window is not None and sliding_window < 1:
        raise ValueError(f"sliding_window must be >= 1, got {sliding_window}")
    if soft_cap is not None and not soft_cap > 0:
        raise ValueError(f"soft_cap must be > 0, got {soft_cap}")


# ----------------------------------------------------------------------------- reference
@functools.partial(jax.jit, static_argnames=("sm_scale", "sliding_window", "soft_cap", "kv_quant"))
def paged_attention_reference(q, k_pages, v_pages, cu_q_lens, kv_lens, page_table, num_seqs, *, layer=None,
                              sm_scale=None, sliding_window=None, soft_cap=None, kv_quant=None,
                              k_scales=None, v_scales=None):
    """The plain oracle: gather each sequence's pages into [max_seqs, pages_per_seq * page_size, ...],
    decode them to the original basis, and run full masked attention in f32 for every query row
    against its own sequence's keys. Arguments as `paged_attention`; returns [tokens, heads, d]."""
    if layer is not None:
        k_pages, v_pages = k_pages[layer], v_pages[layer]
        k_scales = None if k_scales is None else k_scales[layer]
        v_scales = None if v_scales is None else v_scales[layer]
    k_quant, v_quant = kv_quant_pair(kv_quant)
    num_tokens, nh, d = q.shape
    max_seqs, pages_per_seq = page_table.shape
    page_size, kvh = k_pages.shape[1], k_pages.shape[2]
    context = pages_per_seq * page_size
    scale = default_sm_scale(d) if sm_scale is None else sm_scale

    def gather(pages, scales, spec):
        x = pages[page_table].reshape(max_seqs, context, kvh, pages.shape[-1])
        if spec is None:
            return x.astype(jnp.float32)
        if scales is not None:
            scales = scales[page_table].reshape(max_seqs, context, kvh, scales.shape[-1])
        return decode(x, scales, spec)

    k, v = gather(k_pages, k_scales, k_quant), gather(v_pages, v_scales, v_quant)  # [S, context, kvh, d] f32
    seq, pos, real = token_sequences(cu_q_lens, kv_lens, num_seqs, num_tokens)
    k_pos = jnp.arange(context)
    hi = lax.Precision.HIGHEST  # no TF32 on GPU: this is the oracle
    qf = q.astype(jnp.float32).reshape(num_tokens, kvh, nh // kvh, d)
    s = jnp.einsum("thgd,tkhd->thgk", qf, k[seq], precision=hi)
    s = cap_logits(s * scale, soft_cap)
    mask = visible(pos[:, None], k_pos[None, :], kv_lens[seq][:, None], sliding_window) & real[:, None]
    s = jnp.where(mask[:, None, None, :], s, -jnp.inf)  # also drops garbage past kv_len
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))
    l = jnp.sum(p, axis=-1, keepdims=True)
    # 0 * NaN = NaN: zero the garbage values, not just their weights.
    vf = jnp.where((k_pos[None, :] < kv_lens[seq][:, None])[:, :, None, None], v[seq], 0.0)
    o = jnp.einsum("thgk,tkhd->thgd", p, vf, precision=hi)
    o = jnp.where(l > 0, o / jnp.where(l > 0, l, 1.0), 0.0)
    return o.reshape(num_tokens, nh, d).astype(q.dtype)


# ----------------------------------------------------------------------------- blockwise XLA
@functools.partial(jax.jit, static_argnames=("sm_scale", "sliding_window", "soft_cap", "kv_quant", "q_blocks",
                                             "pages_per_block", "min_q_len"))
def paged_attention_xla(q, k_pages, v_pages, cu_q_lens, kv_lens, page_table, num_seqs, *, layer=None,
                        sm_scale=None, sliding_window=None, soft_cap=None, kv_quant=None, k_scales=None,
                        v_scales=None, q_blocks=Q_BLOCKS, pages_per_block=None, min_q_len=1):
    """Online softmax over key blocks of `pages_per_block` pages (None: per query tier,
    `default_pages_per_block(page_size, block_q)`), loops with traced bounds: for s < num_seqs, for
    each block of its query rows, over the key blocks its rows can see (`key_block_range`; the
    interior blocks unmasked). q_blocks: query tokens per block, ascending; a sequence takes the
    first >= its q_len, else the last. min_q_len: sequences with fewer new tokens are skipped
    (their rows are zero: another backend's, see "native_cpu"). Arguments as `paged_attention`;
    returns [tokens, heads, d] in q.dtype."""
    layer, k_pages, v_pages, k_scales, v_scales = as_layer_stack(layer, k_pages, v_pages, k_scales, v_scales)
    k_quant, v_quant = kv_quant_pair(kv_quant)
    num_tokens, nh, d = q.shape
    page_size, kvh = k_pages.shape[2], k_pages.shape[3]
    q_blocks = tuple(dict.fromkeys(min(b, num_tokens) for b in q_blocks))
    per_tier = {b: pages_per_block or default_pages_per_block(page_size, b) for b in q_blocks}
    # Pad the table so a block's slice of it never runs off the end (dynamic_slice would clamp it
    # onto other pages); the padding's keys are past kv_len, masked.
    page_table = jnp.pad(page_table, ((0, 0), (0, -page_table.shape[1] % math.lcm(*per_tier.values()))))
    g = nh // kvh
    scale = default_sm_scale(d) if sm_scale is None else sm_scale
    large = q_blocks[-1]
    # Scale (and rotate, for rotated keys) once; pad so every block's slice is in range.
    qr = rotate(q.astype(jnp.float32), k_quant) * scale
    qr = jnp.pad(qr, ((0, large), (0, 0), (0, 0)))
    out = jnp.zeros_like(qr)

    def read_block(stored, scales, spec, pages):
        """Key block of `pages` [per_block] of one layer, gathered from the pool (not a copy of the
        layer): f32 [1, per_block * page_size, kvh, d]."""
        block_k = pages.shape[0] * page_size
        block = stored[layer, pages].reshape(1, block_k, kvh, stored.shape[-1])
        if spec is None:
            return block.astype(jnp.float32)
        if scales is not None:
            scales = scales[layer, pages].reshape(1, block_k, kvh, scales.shape[-1])
        return dequantize(block, scales, spec)

    def sequence(s, out, block_q: int):
        per_block = per_tier[block_q]
        block_k = per_block * page_size
        q_start = cu_q_lens[s]
        q_len = cu_q_lens[s + 1] - q_start
        kv_len = kv_lens[s]
        first_pos = kv_len - q_len

        def query_block(i, out):
            t0 = q_start + i * block_q
            rows_valid = jnp.minimum(block_q, q_len - i * block_q)  # tokens of s in this block
            qb = to_rows(lax.dynamic_slice_in_dim(qr, t0, block_q)[None], kvh)  # [1, kvh, block_q * g, d]
            block_pos = first_pos + i * block_q
            q_pos = block_pos + jnp.arange(block_q * g, dtype=jnp.int32)[None, :] // g  # [1, rows]
            lo, full_lo, full_hi, hi = key_block_range(block_pos[None], kv_len[None], 0, rows_valid * g - 1, g,
                                                       block_k, sliding_window)

            def key_block(j, carry, masked: bool):
                pages = lax.dynamic_slice_in_dim(page_table[s], j * per_block, per_block)
                kb, vb = read_block(k_pages, k_scales, k_quant, pages), read_block(v_pages, v_scales, v_quant, pages)
                mask = key_valid = None
                if masked:
                    k_pos = j * block_k + jnp.arange(block_k, dtype=jnp.int32)
                    mask = visible(q_pos[:, :, None], k_pos[None, None, :], kv_len, sliding_window)
                    key_valid = (k_pos < kv_len)[None]
                return attend_key_block(carry, qb, kb, vb, mask=mask, key_valid=key_valid, soft_cap=soft_cap)

            masked = functools.partial(key_block, masked=True)
            carry = online_softmax_init(1, kvh, block_q * g, d)
            carry = lax.fori_loop(full_lo, full_hi, functools.partial(key_block, masked=False), carry)
            carry = lax.fori_loop(lo, full_lo, masked, carry)
            o = from_rows(online_softmax_result(lax.fori_loop(full_hi, hi, masked, carry)), block_q, nh)[0]
            # A block may run past s into its neighbours' rows: keep only s's own.
            old = lax.dynamic_slice_in_dim(out, t0, block_q)
            mine = (jnp.arange(block_q) < rows_valid)[:, None, None]
            return lax.dynamic_update_slice_in_dim(out, jnp.where(mine, o, old), t0, 0)

        num_blocks = jnp.where(q_len >= min_q_len, cdiv(q_len, block_q), 0)
        return lax.fori_loop(0, num_blocks, query_block, out)

    def each_sequence(s, out):
        q_len = cu_q_lens[s + 1] - cu_q_lens[s]
        tier = sum((q_len > b).astype(jnp.int32) for b in q_blocks[:-1])
        return lax.switch(tier, [functools.partial(sequence, block_q=b) for b in q_blocks], s, out)

    out = lax.fori_loop(0, num_seqs, each_sequence, out)[:num_tokens]
    return rotate(out, v_quant).astype(q.dtype)


# ----------------------------------------------------------------------------- native CPU
# Why "native_cpu" is not auto (the issue: auto where it measures faster than xla). One layer of
# SmolLM2-135M decode attention, 513 keys, `python -m experiments.paged_step --sections attention
# --repeats 7`, minimum of the rounds, 2 shared cores at load 8.9-9.2: batch 32 at page 16 / 64 / 256
# native 20.2 / 20.6 / 18.2 ms vs xla (one page per key block for decode rows) 17.6 / 11.5 / 16.9 ms;
# batch 8: 2.6 / 2.4 / 2.6 vs 3.8 / 1.4 / 2.3 ms; batch 1: 0.33 / 0.32 / 0.33 vs 0.27 / 0.19 / 0.29
# ms. Against xla's earlier 256-key blocks it had won (batch 32: 7.4 / 10.5 vs 14.7 / 13.9 ms, page 16
# / 64); at the step level (decode batch 1 / 8 / 32) the two were within this load's noise. The native
# kernel shares two cores with XLA's threads (its helpers wait on descheduled ones under load): a
# quieter machine should re-measure before making it auto.

# Sequences with at most this many new tokens (decode rows, speculative drafts) go to the native
# decode kernel; longer ones (prefill chunks) to the native flash kernel, in the same call.
NATIVE_MAX_Q_LEN = 8


def paged_attention_native_cpu(q, k_pages, v_pages, cu_q_lens, kv_lens, page_table, num_seqs, *, layer=None,
                               sm_scale=None, sliding_window=None, soft_cap=None, kv_quant=None, k_scales=None,
                               v_scales=None):
    """The native CPU kernels over the page table, reading the pool in place, in one call
    (native_cpu.paged_attention_cpu): the decode kernel for the rows of sequences with q_len <=
    NATIVE_MAX_Q_LEN, the flash kernel for longer ones. Arguments as `paged_attention` (an f32 /
    bf16 pool, see `native_cpu.attention_supports`)."""
    del kv_quant, k_scales, v_scales  # plain formats only (supports), which have no scales
    scale = default_sm_scale(q.shape[-1]) if sm_scale is None else sm_scale
    return native_cpu.paged_attention_cpu(q, k_pages, v_pages, cu_q_lens, kv_lens, page_table, num_seqs,
                                          layer=layer, sm_scale=scale, soft_cap=soft_cap,
                                          sliding_window=sliding_window, max_q_len=NATIVE_MAX_Q_LEN)


def _native_cpu_supports(q, k_pages, v_pages, *args, kv_quant=None, **unused) -> str | None:
    del args, unused
    return native_cpu.attention_supports(q.shape[-1], k_pages.dtype, v_pages.dtype, kv_quant)


# ----------------------------------------------------------------------------- the op
# Every backend function has the op's signature (less impl); see `paged_attention` for the arguments.
def _pallas(q, k_pages, v_pages, cu_q_lens, kv_lens, page_table, num_seqs, **kwargs):
    return paged_flash_attention(q, k_pages, v_pages, cu_q_lens, kv_lens, page_table, num_seqs, **kwargs)


def _pallas_supports(q, k_pages, *args, **kwargs) -> str | None:
    del args, kwargs
    return paged_flash_supports(q, k_pages, interpret=default_interpret())


def _xla(q, k_pages, v_pages, cu_q_lens, kv_lens, page_table, num_seqs, **kwargs):
    return paged_attention_xla(q, k_pages, v_pages, cu_q_lens, kv_lens, page_table, num_seqs, **kwargs)


def _reference(q, k_pages, v_pages, cu_q_lens, kv_lens, page_table, num_seqs, **kwargs):
    return paged_attention_reference(q, k_pages, v_pages, cu_q_lens, kv_lens, page_table, num_seqs, **kwargs)


BACKENDS: dict[str, Backend] = {b.name: b for b in (
    Backend("pallas", _pallas, _pallas_supports,
            "Pallas mixed kernel (paged_flash_attention.py): prefill chunks and decode rows in one call, every "
            "cache format; compiled on GPU (power-of-two head_dim and page_size >= 16), interpret mode "
            "elsewhere (slow: tests)", auto_platforms=("gpu",)),
    Backend("native_cpu", paged_attention_native_cpu, _native_cpu_supports,
            "native CPU kernels over the page table: decode kernel for rows of q_len <= 8, flash kernel for "
            "longer ones: f32 / bf16 pool (one format), compiled head sizes; never auto (decode not faster "
            "than xla's one-page decode blocks, measured: see the native CPU section)", auto_platforms=()),
    Backend("xla", _xla, supports_everything,
            "per-sequence online softmax over its pages (XLA loops, traced bounds): every call, cost "
            "follows q_len and kv_len"),
    Backend("reference", _reference, supports_everything,
            "gather each sequence's pages, full masked attention in f32 (the oracle)", auto_platforms=()),
)}
IMPLS = impl_names(BACKENDS)  # the valid impl= values: "auto" and the backend names


def paged_attention(q, k_pages, v_pages, cu_q_lens, kv_lens, page_table, num_seqs, *, layer=None,
                    sm_scale=None, sliding_window=None, soft_cap=None, kv_quant=None, k_scales=None,
                    v_scales=None, impl="auto"):
    """Attention of a flat, ragged batch of query rows against paged K/V (layout: module docstring).

    q [tokens, heads, head_dim]; k_pages, v_pages [num_pages, page_size, kv_heads, stored_dim], or the
    whole pool [layers, num_pages, ...] with a traced `layer`; cu_q_lens [max_seqs + 1], kv_lens
    [max_seqs], page_table [max_seqs, pages_per_seq], num_seqs [] (int32, traced). kv_quant: the pool's
    format (a `KVQuant` or its name; None: plain floats), or a (key format, value format) pair
    (`kv_quant_pair`), with k_scales / v_scales shaped like the pages with last dim head_dim / 32 for
    each integer side (None for a float side). soft_cap: logits = c * tanh(s / c).
    Returns [tokens, heads, head_dim] in q.dtype; padding rows are zeros. The caller guarantees the
    contents (host checks: page ids in range, kv_len within the pages, q_len <= kv_len): gathers are
    clamped, never checked, on the device.
    impl: "auto" or a `BACKENDS` name; ValueError when that backend cannot take the call.
    """
    if kv_quant is not None:
        kv_quant = kv_quant_pair(kv_quant)
    args = (q, k_pages, v_pages, cu_q_lens, kv_lens, page_table, num_seqs)
    kwargs = dict(layer=layer, sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap,
                  kv_quant=kv_quant, k_scales=k_scales, v_scales=v_scales)
    check_paged_inputs(*args, **kwargs)
    return choose_backend(BACKENDS, impl, *args, **kwargs).fn(*args, **kwargs)
