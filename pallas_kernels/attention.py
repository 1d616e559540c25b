"""One attention op, several backends (tokamax-style dispatcher).

impl:
  "auto"      - Pallas on GPU (decode kernel for q_len <= 8, flash otherwise); on CPU the native
                decode kernel for q_len <= 8 over an f32 / bf16 cache when it builds, blockwise
                XLA otherwise.
  "xla"       - blockwise online-softmax XLA (fast on CPU, cost follows kv_len).
  "cpu"       - the native CPU decode kernel (pallas_kernels/native_cpu.py): f32 / bf16 cache.
  "pallas"    - the Pallas kernels; on CPU they run in interpret mode (slow, tests).
  "reference" - full masked attention in f32 over the whole cache.
"""
from __future__ import annotations

import jax

from pallas_kernels import native_cpu
from pallas_kernels.common import BlockSizes, check_inputs, default_sm_scale
from pallas_kernels.attention_reference import attention_reference
from pallas_kernels.blockwise_attention import blockwise_attention
from pallas_kernels.decode_attention import MAX_DECODE_Q_LEN, decode_attention
from pallas_kernels.flash_attention import flash_attention
from pallas_kernels.kv_quant import KVQuant, kv_quant_spec

IMPLS = ("auto", "xla", "pallas", "reference", "cpu")
NATIVE_STORAGE = {"float32": "float32", "bfloat16": "uint16"}  # cache format -> array dtype


def _native_fits(q, k, kv_quant: KVQuant | None) -> bool:
    """Whether the native CPU decode kernel takes this call (short q, plain f32 / bf16 cache, a
    head size it is compiled for)."""
    storage = "float32" if kv_quant is None else kv_quant.storage
    return (q.shape[1] <= MAX_DECODE_Q_LEN and storage in NATIVE_STORAGE
            and str(k.dtype) == NATIVE_STORAGE[storage] and q.shape[-1] in native_cpu.ATTENTION_HEAD_DIMS)


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
    if kv_quant is not None:
        kv_quant = kv_quant_spec(kv_quant)
    if impl == "auto":
        if jax.default_backend() == "gpu":
            impl = "pallas"
        else:
            impl = "cpu" if _native_fits(q, k, kv_quant) and native_cpu.available() else "xla"
    if impl == "cpu":
        if not _native_fits(q, k, kv_quant):
            raise ValueError(f"impl='cpu' takes q_len <= {MAX_DECODE_Q_LEN}, a plain f32 / bf16 cache and "
                             f"head_dim in {native_cpu.ATTENTION_HEAD_DIMS}; got q_len {q.shape[1]}, cache "
                             f"{kv_quant.name if kv_quant else k.dtype}, head_dim {q.shape[-1]}")
        one_layer = (lambda a: a[0]) if layer is not None else (lambda a: a)
        q_offset, kv_len = check_inputs(q, one_layer(k), one_layer(v), q_offset, kv_len,
                                        sliding_window, soft_cap, kv_quant)
        scale = default_sm_scale(q.shape[-1]) if sm_scale is None else sm_scale
        return native_cpu.decode_attention_cpu(q, k, v, q_offset, kv_len, layer=layer, sm_scale=scale,
                                               soft_cap=soft_cap, sliding_window=sliding_window)
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
