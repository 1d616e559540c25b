"""One attention op, several backends behind its signature (tokamax-style; see backends.py).

`BACKENDS` (name -> `Backend`), in the order impl="auto" tries them:
  "pallas"     - the Pallas kernels: split-K decode (decode_attention.py) for q_len <= 8, flash
                 (flash_attention.py) otherwise. Takes every call: every cache format, any
                 head_dim; off a GPU it runs in interpret mode (slow: tests). auto: GPU only.
  "native_cpu" - the native CPU decode kernel (native_cpu.py), reading a stacked cache in place.
                 Takes q_len <= 8, a plain f32 cache or the bf16 cache's uint16 bits, head_dim in
                 native_cpu.ATTENTION_HEAD_DIMS, the CPU backend, and a kernel that built.
                 auto: CPU only, where it supports the call.
  "native_flash" - the native CPU flash kernel for prefill chunks (native_cpu.flash_attention_cpu),
                 reading a stacked cache in place. Takes any q_len, a plain f32 cache or the bf16
                 cache's uint16 bits, head_dim a multiple of 16 (up to 512), the CPU backend, a
                 kernel that built. auto: see NATIVE_FLASH_AUTO_PLATFORMS.
  "xla"        - blockwise online-softmax XLA (blockwise_attention.py): fast on CPU, cost follows
                 kv_len, reads a stacked cache in place. Takes every call. auto: the fallback.
  "reference"  - full masked attention in f32 over the whole cache. Takes every call; never auto.

impl="auto" thus means: Pallas on a GPU; on CPU the native decode kernel for decode, the native
flash kernel for chunks (where NATIVE_FLASH_AUTO_PLATFORMS allows it), where they take the cache;
blockwise XLA otherwise. impl=NAME takes that backend, and raises ValueError with its reason when it cannot
take the call. A new backend (e.g. paged attention) is one more `Backend` entry in `BACKENDS`.
"""
from __future__ import annotations

import functools

import jax

from pallas_kernels import native_cpu
from pallas_kernels.attention_reference import attention_reference
from pallas_kernels.backends import Backend, choose_backend, impl_names, supports_everything
from pallas_kernels.blockwise_attention import blockwise_attention
from pallas_kernels.common import check_inputs, default_sm_scale
from pallas_kernels.decode_attention import decode_attention, decode_attention_supports
from pallas_kernels.flash_attention import flash_attention
from pallas_kernels.kv_quant import kv_quant_pair

def _one_layer(layer, k, v, k_scales, v_scales):
    """The cache of `layer` when k, v (and scales) are the whole stacked cache; else as given."""
    if layer is None:
        return k, v, k_scales, v_scales
    k_scales = None if k_scales is None else k_scales[layer]
    v_scales = None if v_scales is None else v_scales[layer]
    return k[layer], v[layer], k_scales, v_scales


# ----------------------------------------------------------------------------- backends
# Every backend function has the op's signature (less impl); see `attention` for the arguments.
def _pallas(q, k, v, q_offset, kv_len, *, layer=None, sm_scale=None, sliding_window=None,
            soft_cap=None, block_sizes=None, interpret=None, kv_quant=None, k_scales=None,
            v_scales=None):
    k, v, k_scales, v_scales = _one_layer(layer, k, v, k_scales, v_scales)
    kernel = decode_attention if decode_attention_supports(q) is None else flash_attention
    return kernel(q, k, v, q_offset, kv_len, sm_scale=sm_scale, sliding_window=sliding_window,
                  soft_cap=soft_cap, block_sizes=block_sizes, interpret=interpret,
                  kv_quant=kv_quant, k_scales=k_scales, v_scales=v_scales)


def _native(kernel, q, k, v, q_offset, kv_len, *, layer=None, sm_scale=None, sliding_window=None,
            soft_cap=None, block_sizes=None, interpret=None, kv_quant=None, k_scales=None, v_scales=None):
    """A native CPU attention kernel (`native_cpu.decode_attention_cpu` or `flash_attention_cpu`:
    the same operands) behind the op's signature, the inputs checked as every backend checks them."""
    del block_sizes, interpret, k_scales, v_scales  # fixed tiles; plain caches have no scales
    one_layer = (lambda a: a[0]) if layer is not None else (lambda a: a)
    q_offset, kv_len = check_inputs(q, one_layer(k), one_layer(v), q_offset, kv_len,
                                    sliding_window, soft_cap, kv_quant)
    scale = default_sm_scale(q.shape[-1]) if sm_scale is None else sm_scale
    return kernel(q, k, v, q_offset, kv_len, layer=layer, sm_scale=scale, soft_cap=soft_cap,
                  sliding_window=sliding_window)


_native_cpu = functools.partial(_native, native_cpu.decode_attention_cpu)
_native_flash = functools.partial(_native, native_cpu.flash_attention_cpu)


def _native_cpu_supports(q, k, v, q_offset, kv_len, *, kv_quant=None, **unused) -> str | None:
    del q_offset, kv_len, unused
    if jax.default_backend() == "cpu" and (why := decode_attention_supports(q)) is not None:
        return why
    return native_cpu.attention_supports(q.shape[-1], k.dtype, v.dtype, kv_quant)


def _native_flash_supports(q, k, v, q_offset, kv_len, *, kv_quant=None, **unused) -> str | None:
    del q_offset, kv_len, unused
    return native_cpu.attention_supports(q.shape[-1], k.dtype, v.dtype, kv_quant, flash=True)


def _xla(q, k, v, q_offset, kv_len, *, layer=None, sm_scale=None, sliding_window=None,
         soft_cap=None, block_sizes=None, interpret=None, kv_quant=None, k_scales=None,
         v_scales=None):
    del interpret
    return blockwise_attention(q, k, v, q_offset, kv_len, layer=layer, sm_scale=sm_scale,
                               sliding_window=sliding_window, soft_cap=soft_cap,
                               block_sizes=block_sizes, kv_quant=kv_quant, k_scales=k_scales,
                               v_scales=v_scales)


def _reference(q, k, v, q_offset, kv_len, *, layer=None, sm_scale=None, sliding_window=None,
               soft_cap=None, block_sizes=None, interpret=None, kv_quant=None, k_scales=None,
               v_scales=None):
    del block_sizes, interpret
    k, v, k_scales, v_scales = _one_layer(layer, k, v, k_scales, v_scales)
    return attention_reference(q, k, v, q_offset, kv_len, sm_scale=sm_scale,
                               sliding_window=sliding_window, soft_cap=soft_cap,
                               kv_quant=kv_quant, k_scales=k_scales, v_scales=v_scales)


# Where impl="auto" takes the native flash kernel for chunks (native_cpu takes decode first).
# Measured (`python -m experiments.bench_attention --q-lens 512 2048 --kvs 2048 8192 --only
# xla_q768_k256 native_flash`, SmolLM2 shapes, 2-core AMD EPYC with AVX2 and no AVX-512, load 2.0,
# median of 5): f32 chunk 512 x 2048 / 8192 keys 16.6 / 77.5 ms vs blockwise XLA 24.1 / 99.4 ms;
# chunk 2048 x 2048 / 8192: 38.7 / 271 vs 59.1 / 354 ms (1.28-1.53x); bf16 cache alike (16.8 /
# 73.8 / 39.4 / 265 vs 25.1 / 98.4 / 59.2 / 350 ms), both using both cores.
NATIVE_FLASH_AUTO_PLATFORMS: tuple[str, ...] = ("cpu",)

BACKENDS: dict[str, Backend] = {b.name: b for b in (
    Backend("pallas", _pallas, supports_everything,
            "Pallas split-K decode (q_len <= 8) / flash kernels; interpret mode off a GPU",
            auto_platforms=("gpu",)),
    Backend("native_cpu", _native_cpu, _native_cpu_supports,
            "native CPU decode kernel: q_len <= 8, f32 / bf16 cache, compiled head sizes",
            auto_platforms=("cpu",)),
    Backend("native_flash", _native_flash, _native_flash_supports,
            "native CPU flash kernel for chunks: f32 / bf16 cache, head_dim a multiple of 16",
            auto_platforms=NATIVE_FLASH_AUTO_PLATFORMS),
    Backend("xla", _xla, supports_everything,
            "blockwise online-softmax XLA: every call, cost follows kv_len"),
    Backend("reference", _reference, supports_everything,
            "full masked attention in f32 over the whole cache (the oracle)", auto_platforms=()),
)}
IMPLS = impl_names(BACKENDS)  # the valid impl= values: "auto" and the backend names


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
    impl: "auto" or a `BACKENDS` name (see the module docstring).
    layer: with k, v the whole cache [layers, batch, max_seq, kv_heads, head_dim],
    the (traced) layer to attend to. The XLA and native CPU backends read that layer
    in place; the others slice it out first (a copy of one layer).
    block_sizes: `BlockSizes` for the chosen backend (None: its default).
    interpret: Pallas only; None = interpret unless running on a GPU.
    kv_quant: a `pallas_kernels.kv_quant.KVQuant` (or its name) when k, v hold that cache
    format: last dim stored_dim, and for the integer formats k_scales / v_scales shaped like k
    with last dim head_dim / 32 (also per layer when `layer` is given). Every backend
    dequantizes on read; None means plain float K/V. A (key format, value format) pair stores
    keys and values each in its own format (q8 keys, q4 values; either side None for plain
    floats), each with its own scales (or None for a float side); see `kv_quant.kv_quant_pair`.
    """
    if kv_quant is not None:
        kv_quant = kv_quant_pair(kv_quant)
    args = (q, k, v, q_offset, kv_len)
    kwargs = dict(layer=layer, sm_scale=sm_scale, sliding_window=sliding_window, soft_cap=soft_cap,
                  block_sizes=block_sizes, interpret=interpret, kv_quant=kv_quant,
                  k_scales=k_scales, v_scales=v_scales)
    return choose_backend(BACKENDS, impl, *args, **kwargs).fn(*args, **kwargs)
