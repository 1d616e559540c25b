"""Plain masked attention over the whole cache, in f32: the obviously-right oracle.

Cost is O(q_len * max_seq) whatever kv_len is; use it for tests, not for speed. A quantized cache
is decoded whole first (dequantized and un-rotated back to the original basis), so this path does
not rely on the rotate-q trick the other backends use.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.common import cap_logits, check_inputs, default_sm_scale, visible
from pallas_kernels.kv_quant import decode, kv_quant_pair


@functools.partial(jax.jit, static_argnames=("sm_scale", "sliding_window", "soft_cap", "kv_quant"))
def attention_reference(q, k, v, q_offset, kv_len, *, sm_scale=None,
                        sliding_window=None, soft_cap=None, kv_quant=None, k_scales=None,
                        v_scales=None):
    """q [b, q_len, heads, d]; k, v [b, max_seq, kv_heads, d]; q_offset, kv_len [b]
    int32. Returns [b, q_len, heads, d] in q.dtype (rows seeing no key -> 0).

    kv_quant: a `KVQuant` spec when k, v are stored in that format ([b, max_seq, kv_heads,
    stored_dim], with k_scales / v_scales [b, max_seq, kv_heads, d / 32] for the integer formats),
    or a (key format, value format) pair (`kv_quant.kv_quant_pair`); each side decoded with its own.
    """
    q_offset, kv_len = check_inputs(q, k, v, q_offset, kv_len, sliding_window, soft_cap,
                                    kv_quant, k_scales, v_scales)
    k_quant, v_quant = kv_quant_pair(kv_quant)
    k = k if k_quant is None else decode(k, k_scales, k_quant)
    v = v if v_quant is None else decode(v, v_scales, v_quant)
    b, ql, nh, d = q.shape
    max_seq, kvh = k.shape[1], k.shape[2]
    scale = default_sm_scale(d) if sm_scale is None else sm_scale
    hi = lax.Precision.HIGHEST  # no TF32 on GPU: this is the oracle

    qf = q.astype(jnp.float32).reshape(b, ql, kvh, nh // kvh, d)
    s = jnp.einsum("bqhgd,bkhd->bhgqk", qf, k.astype(jnp.float32), precision=hi)
    s = cap_logits(s * scale, soft_cap)
    q_pos = (q_offset[:, None] + jnp.arange(ql))[:, None, None, :, None]
    k_pos = jnp.arange(max_seq)
    mask = visible(q_pos, k_pos, kv_len[:, None, None, None, None], sliding_window)
    s = jnp.where(mask, s, -jnp.inf)  # also drops NaN/inf garbage past kv_len
    m = jnp.max(s, axis=-1, keepdims=True)
    p = jnp.exp(s - jnp.where(jnp.isfinite(m), m, 0.0))  # masked -> exp(-inf) = 0
    l = jnp.sum(p, axis=-1)
    # 0 * NaN = NaN: zero the garbage values, not just their weights.
    vf = jnp.where((k_pos[None, :] < kv_len[:, None])[:, :, None, None],
                   v.astype(jnp.float32), 0.0)
    o = jnp.einsum("bhgqk,bkhd->bqhgd", p, vf, precision=hi)
    l = l.transpose(0, 3, 1, 2)[..., None]  # [b, q, kvh, g, 1]
    o = jnp.where(l > 0, o / jnp.where(l > 0, l, 1.0), 0.0)
    return o.reshape(b, ql, nh, d).astype(q.dtype)
