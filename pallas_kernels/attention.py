"""One attention op, several backends (tokamax-style dispatcher).

impl:
  "auto"      - Pallas on GPU (decode kernel for q_len <= 8, flash otherwise),
                blockwise XLA elsewhere.
  "xla"       - blockwise online-softmax XLA (fast on CPU, cost follows kv_len).
  "pallas"    - the Pallas kernels; on CPU they run in interpret mode (slow, tests).
  "reference" - full masked attention in f32 over the whole cache.
"""
from __future__ import annotations

import jax

from pallas_kernels._common import BlockSizes
from pallas_kernels.attention_reference import attention_reference
from pallas_kernels.blockwise_attention import blockwise_attention
from pallas_kernels.decode_attention import MAX_DECODE_Q_LEN, decode_attention
from pallas_kernels.flash_attention import flash_attention
from pallas_kernels.kv_quant import kv_quant_spec

IMPLS = ("auto", "xla", "pallas", "reference")


def attention(q, k, v, q_offset, kv_len, *, layer=None, sm_scale=None, impl="auto",
              sliding_window=None, soft_cap=None, block_sizes=None, interpret=None,
              kv_quant=None, k_scales=None, v_scales=None):
    """Chunk-prefill / decode attention against a preallocated KV cache.

    q [batch, q_len, num_heads, head_dim]; k, v [batch, max_seq, num_kv_heads,
    head_dim] (one layer's cache; num_heads = num_kv_heads * G); q_offset [batch]
    int32 (absolute position of query 0); kv_len [batch] int32 (valid keys).
    Query i of row b at p = q_offset[b] + i sees key j iff j <= p, j < kv_len[b]
    and, with a window, j > p - sliding_window. soft_cap: logits = c*tanh(s/c).
    Returns [batch, q_len, num_heads, head_dim] in q.dtype; rows that see no key
    are zeros. Cache contents at j >= kv_len are never read into the result.
    layer: with k, v the whole cache [layers, batch, max_seq, kv_heads, head_dim],
    the (traced) layer to attend to. The XLA backend reads that layer's blocks in
    place; the others slice it out first (a copy of one layer).
    block_sizes: `BlockSizes` for the chosen backend (None: its default).
    interpret: Pallas only; None = interpret unless running on a GPU.
    kv_quant: a `pallas_kernels.kv_quant.KVQuant` (or its name) when k, v hold that cache
    format: last dim stored_dim, and for the integer formats k_scales / v_scales shaped like k
    with last dim head_dim / 32 (also per layer when `layer` is given). Every backend
    dequantizes on read; None means plain float K/V.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        impl = "pallas" if jax.default_backend() == "gpu" else "xla"
    if kv_quant is not None:
        kv_quant = kv_quant_spec(kv_quant)
    common = dict(sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap,
                  kv_quant=kv_quant, k_scales=k_scales, v_scales=v_scales)
    if layer is not None and impl == "xla":
        return blockwise_attention(q, k, v, q_offset, kv_len, layer=layer,
                                   block_sizes=block_sizes, **common)
    if layer is not None:
        k, v = k[layer], v[layer]
        if k_scales is not None:
            common.update(k_scales=k_scales[layer], v_scales=v_scales[layer])
    if impl == "reference":
        return attention_reference(q, k, v, q_offset, kv_len, **common)
    if impl == "xla":
        return blockwise_attention(q, k, v, q_offset, kv_len, block_sizes=block_sizes,
                                   **common)
    kernel = decode_attention if q.shape[1] <= MAX_DECODE_Q_LEN else flash_attention
    return kernel(q, k, v, q_offset, kv_len, block_sizes=block_sizes,
                  interpret=interpret, **common)
