"""A functional Llama (and its Gemma 3 variant): params pytree in, arrays out, no hidden state.

One layer function (`decoder_layer`) serves every entry point; only the attention differs:
- `forward(params, config, ids)`: plain full causal attention, no cache (the reference).
- `model_step(params, config, kv_cache, tokens, n_valid)`: a chunk (or one decode token) written into the
  cache at each row's current length and attending to everything before it with a bottom-right
  causal mask. `jaxchunk.prefill` wraps it into the jitted `prefill_chunk` / `decode_step`.
- `jaxchunk.paged.mixed_step`: many sequences' chunks and decode tokens, flat, over a paged cache.

Layers run under `lax.scan` (`scan_layers`) over the stacked layer params (see jaxchunk/weights/__init__.py for the
layout), so the compiled program does not grow with depth and compiles in seconds.

Layers that differ (Gemma 3: five sliding-window layers with RoPE base 1e4, then a global one with
1e6) still share the one scanned body: the RoPE table is looked up by the traced layer index
(`layer_inv_freq`), and attention runs under `lax.switch` over the config's few distinct windows
(`per_layer_window`), each branch with its window static, as every attention backend takes it.
A config whose layers are all alike (Llama) takes neither lookup nor switch.

A cache with a sliding-window ring (`init_cache(..., ring_chunk_len=C)`) keeps the global and the
local layers in two stacks; the same scanned body writes each layer into its own stack (the write
to the other is dropped) and a local layer attends to its ring read in position order
(`_ring_attend`). Without a ring, `model_step` is exactly what it was.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, Literal, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxchunk.cache import (KVCache, resolve_cache_dtype, resolve_cache_formats, ring_layout, ring_slots, ring_view,
                            write_kv)
from jaxchunk import sharding
from jaxchunk.config import LlamaConfig
from jaxchunk.errors import InputError
from jaxchunk.weights.bf16 import BF16Weight, as_array, dynamic_slice_in_dim
from jaxchunk.weights.dense import DenseLayer, dense_linear, gemv_storage
from jaxchunk.weights.quantized import QuantizedWeight, embed_rows
from pallas_kernels import native_cpu
from pallas_kernels.attention import attention
from pallas_kernels.kv_quant import fake_quantize
from pallas_kernels.quant_matmul import DECODE_ROWS

LogitsMode = Literal["last", "all", "none"]


# ----------------------------------------------------------------------------- building blocks
def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """RMSNorm computed in float32 (bf16 squares lose too much), returned in x's dtype."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (x32 * weight.astype(jnp.float32)).astype(x.dtype)


def rope_inv_freq(config: LlamaConfig, theta: Optional[float] = None) -> np.ndarray:
    """Inverse frequencies [head_dim // 2] (float64 on the host), with Llama-3 / linear scaling.

    theta: the RoPE base (None: config.rope_theta). Scaling applies to config.rope_theta's
    (global) layers only, as in Hugging Face's Gemma 3; a separate local base is never scaled."""
    dim = config.head_dim
    theta = config.rope_theta if theta is None else theta
    inv_freq = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    scaling = config.rope_scaling
    if scaling is None or theta != config.rope_theta:
        return inv_freq
    if scaling.kind == "linear":
        return inv_freq / scaling.factor
    if scaling.kind != "llama3":
        raise ValueError(f"unknown rope scaling {scaling.kind!r}")
    # Same formula as Hugging Face's _compute_llama3_parameters.
    old_len = scaling.original_max_position_embeddings
    low_freq_wavelen = old_len / scaling.low_freq_factor
    high_freq_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled)


def layer_rope_table(config: LlamaConfig) -> np.ndarray:
    """Inverse frequencies for every layer: [head_dim // 2] when all layers share one RoPE base
    (Llama), else [layers, head_dim // 2] (Gemma 3: local and global bases), looked up per layer
    by `layer_inv_freq`."""
    thetas = [config.layer_rope_theta(i) for i in range(config.num_layers)]
    if len(set(thetas)) == 1:
        return rope_inv_freq(config)
    return np.stack([rope_inv_freq(config, theta) for theta in thetas])


def layer_inv_freq(rope_table: np.ndarray, index):
    """The inverse frequencies [head_dim // 2] of layer `index` (traced) in `layer_rope_table`'s table."""
    if rope_table.ndim == 1:
        return rope_table
    return jnp.asarray(rope_table, jnp.float32)[index]


def per_layer_window(config: LlamaConfig, index, attend: Callable[[Optional[int]], jax.Array]) -> jax.Array:
    """attend(window) for layer `index`'s sliding window (None: global), window static.

    With one distinct window (Llama: None) it is a plain call; otherwise `lax.switch` on the traced
    layer index over one branch per distinct window (Gemma 3: two), so every backend keeps its
    static-window code path and the scan body stays one layer. The switch's operands (the cache)
    are only read inside it: the cache write happens before, outside the switch."""
    windows = config.windows
    if len(windows) == 1:
        return attend(windows[0])
    branch = jnp.asarray([windows.index(w) for w in config.layer_windows], jnp.int32)[index]
    return jax.lax.switch(branch, [functools.partial(attend, w) for w in windows])


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
    """Rotate-half RoPE (Hugging Face convention). x: [batch, seq, heads, head_dim]; positions: [batch, seq]."""
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)  # [b, s, d/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)


def linear(x: jax.Array, w) -> jax.Array:
    """x [..., in] @ w [in, out]. The single place a weight matrix is applied.

    w is a float array, a BF16Weight (bf16 held as bits: jaxchunk/weights/bf16.py), or a
    QuantizedWeight (kept 4/8-bit, dequantized inside the quantized matmul:
    see jaxchunk/weights/quantized.py).
    """
    if isinstance(w, QuantizedWeight):
        return sharding.quantized_linear(x, w)  # per shard under a mesh (a custom call / kernel)
    if isinstance(w, DenseLayer):  # decode rows on CPU (scan_layers): the native gemv, in place
        if _gemv_takes(x, w.stack):
            return dense_linear(x, w)
        w = w.value()
    w = as_array(w).astype(x.dtype)
    if x.dtype == jnp.bfloat16 and x.size // x.shape[-1] > DECODE_ROWS and _widen_bf16_dots():
        # A CPU without bf16 dot instructions: the same exact products and f32 sums as one f32 dot
        # of the widened operands, which XLA runs at its f32 speed (bf16 SmolLM2 prefill of 2048
        # tokens on one AVX2 core: 185 -> 265 tok/s, f32 weights: 256). Not for decode rows: the
        # widened copy of W would be written and read again for one row.
        return jnp.einsum("...i,io->...o", x.astype(jnp.float32), w.astype(jnp.float32)).astype(x.dtype)
    # Accumulate in f32 whatever the operands (what bf16 hardware does anyway). On XLA:CPU with
    # bf16 dot instructions it is also the fast path: a bf16-output dot ran ~1.5x slower than the
    # same dot with f32 output (prefill-shaped [512, 576] x [576, 1536] over 30 layers: 94 vs 62 ms).
    return jnp.einsum("...i,io->...o", x, w, preferred_element_type=jnp.float32).astype(x.dtype)


def native_gemv_rows(rows: int | None) -> bool:
    """Whether products with `rows` rows of x go to the native dense gemv
    (`jaxchunk.weights.dense`): decode-shaped (<= DECODE_ROWS rows), on the CPU backend, the
    kernels built, no device mesh (a mesh splits the weights: XLA's dots per shard)."""
    return (rows is not None and rows <= DECODE_ROWS and jax.default_backend() == "cpu"
            and sharding.context_mesh() is None and native_cpu.available())


def _gemv_takes(x: jax.Array, w) -> bool:
    """The (x, W) pairs whose XLA product the native gemv reproduces: f32 W with f32 x (x bf16
    would round W to bf16 first), bf16 W (held as BF16Weight) with bf16 or f32 x."""
    storage = gemv_storage(w)
    return storage is not None and (storage.dtype == jnp.uint16 or x.dtype == jnp.float32) and \
        x.dtype in (jnp.float32, jnp.bfloat16)


def _widen_bf16_dots() -> bool:
    """bf16 dots as widened f32 dots: on a CPU backend whose CPU lacks bf16 dot instructions."""
    return jax.default_backend() == "cpu" and native_cpu.widens_bf16_dots()


ACTIVATIONS = {
    "silu": jax.nn.silu,                                           # SwiGLU (Llama)
    "gelu_tanh": functools.partial(jax.nn.gelu, approximate=True),  # GeGLU (Gemma: gelu_pytorch_tanh)
}


def mlp(layer: dict, x: jax.Array, activation: str = "silu") -> jax.Array:
    """Gated MLP: down(act(gate(x)) * up(x)); act is `ACTIVATIONS[activation]`."""
    act = ACTIVATIONS[activation]
    return linear(act(linear(x, layer["w_gate"])) * linear(x, layer["w_up"]), layer["w_down"])


def qkv(layer: dict, config: LlamaConfig, h: jax.Array, positions: jax.Array, inv_freq):
    """Projections with RoPE applied (after the per-head RMSNorm of q and k when config.qk_norm).
    h: [b, s, hidden] -> q [b, s, heads, d], k/v [b, s, kv_heads, d]."""
    b, s, _ = h.shape
    q = linear(h, layer["wq"]).reshape(b, s, config.num_heads, config.head_dim)
    k = linear(h, layer["wk"]).reshape(b, s, config.num_kv_heads, config.head_dim)
    v = linear(h, layer["wv"]).reshape(b, s, config.num_kv_heads, config.head_dim)
    if config.qk_norm:
        q = rms_norm(q, layer["q_norm"], config.rms_norm_eps)
        k = rms_norm(k, layer["k_norm"], config.rms_norm_eps)
    return apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq), v


def embed(params: dict, tokens: jax.Array, dtype, scale: Optional[float] = None) -> jax.Array:
    """Token embeddings [..., hidden] of tokens [...], times `scale` if given (Gemma: sqrt(hidden),
    applied in float32 before the cast to dtype, as llama.cpp does). A quantized embedding is stored
    as the LM head's W [hidden, vocab]; only the looked-up columns are dequantized."""
    out_dtype = dtype if scale is None else jnp.float32
    if isinstance(params["embed"], QuantizedWeight):
        x = embed_rows(params["embed"], tokens, out_dtype)
    elif isinstance(params["embed"], BF16Weight):
        x = as_array(params["embed"][tokens]).astype(out_dtype)
    else:
        x = jnp.take(params["embed"], tokens, axis=0).astype(out_dtype)
    return x if scale is None else (x * jnp.float32(scale)).astype(dtype)


def embed_tokens(params: dict, config: LlamaConfig, tokens: jax.Array) -> jax.Array:
    """The model's input [..., hidden] in the compute dtype: `embed` with config.embed_scale."""
    return embed(params, tokens, compute_dtype(params), config.embed_scale)


def lm_head(params: dict, config: LlamaConfig, h: jax.Array) -> jax.Array:
    """Final norm and output projection; logits in float32. h: [..., hidden] -> [..., vocab]."""
    h = rms_norm(h, params["final_norm"], config.rms_norm_eps)
    head = params.get("lm_head", params["embed"])
    if isinstance(head, QuantizedWeight):  # a quantized tied embedding is stored as W [hidden, vocab]
        return linear(h, head).astype(jnp.float32)
    # Float: W [hidden, vocab] (lm_head) or the tied embedding [vocab, hidden].
    vocab_axis = 1 if "lm_head" in params else 0
    spec = "...h,hv->...v" if vocab_axis else "...h,vh->...v"
    rows = math.prod(h.shape[:-1])
    if native_gemv_rows(rows) and _gemv_takes(h, head):
        return dense_linear(h.astype(jnp.float32), head, transposed=vocab_axis == 0)  # f32 logits
    tile = _head_tile(head.shape[vocab_axis])
    # On a mesh the head is vocab-split: the tile loop below would gather it; XLA splits the einsum.
    if head.dtype != jnp.bfloat16 or rows > DECODE_ROWS or tile is None or sharding.context_mesh() is not None:
        return jnp.einsum(spec, h, as_array(head).astype(h.dtype), preferred_element_type=jnp.float32)
    # bf16, few rows (decode): XLA:CPU's bf16 matrix-vector product is ~15x slower than converting
    # the weights to f32 and using the f32 one (49152 x 576 head, 1 row: 34.5 vs 2.2 ms). Convert
    # one vocab tile at a time, so the f32 copy is a few MB that stay in cache. Exact: bf16 -> f32
    # loses nothing and the products accumulate in f32 either way.
    h32 = h.astype(jnp.float32)

    def tile_logits(i):
        w = dynamic_slice_in_dim(head, i * tile, tile, axis=vocab_axis)
        return jnp.einsum(spec, h32, as_array(w).astype(jnp.float32))

    logits = jax.lax.map(tile_logits, jnp.arange(head.shape[vocab_axis] // tile))  # [tiles, ..., tile]
    return jnp.moveaxis(logits, 0, -2).reshape(*h.shape[:-1], -1)


HEAD_TILE_MAX = 4096   # vocab rows converted at once by the bf16 decode head


def _head_tile(vocab: int):
    """Largest divisor of vocab in [256, HEAD_TILE_MAX], or None."""
    return next((t for t in range(min(vocab, HEAD_TILE_MAX), 255, -1) if vocab % t == 0), None)


def compute_dtype(params: dict):
    return params["final_norm"].dtype


def scan_layers(layer_fn, carry, layers: dict, rows: int | None = None):
    """`lax.scan` of layer_fn(carry, layer, index) -> (carry, out) over the stacked layer params.

    Float leaves arrive sliced to the layer. QuantizedWeight leaves arrive whole, with the traced
    layer index attached (`QuantizedWeight.at_layer`): the quantized matmul reads that layer in
    place, where a scan slice would be copied out first for the native CPU kernel (a custom call
    takes whole buffers: ~20% of a q4 decode step). rows: the rows of x each matrix multiplies (a
    step's tokens); where they go to the native dense gemv (`native_gemv_rows`: decode on CPU), the
    f32 / BF16Weight matrices arrive whole the same way, as `DenseLayer(stack, index)`.
    """
    stacked = {k: w for k, w in layers.items() if isinstance(w, QuantizedWeight)}
    dense = {k: w for k, w in layers.items()  # the matrices [layers, in, out], not the norms' vectors
             if native_gemv_rows(rows) and gemv_storage(w) is not None and len(w.shape) == 3}
    sliced = {k: w for k, w in layers.items() if k not in stacked and k not in dense}
    num_layers = jax.tree.leaves(layers)[0].shape[0]

    def body(carry, sliced_and_index):
        layer, index = sliced_and_index
        layer = dict(layer, **{k: w.at_layer(index) for k, w in stacked.items()},
                     **{k: DenseLayer(w, index) for k, w in dense.items()})
        return layer_fn(carry, layer, index)

    return jax.lax.scan(body, carry, (sliced, jnp.arange(num_layers, dtype=jnp.int32)))


def decoder_layer(layer: dict, config: LlamaConfig, x: jax.Array, positions: jax.Array, rope_table, attend,
                  index=None):
    """One pre-norm Llama (or Gemma 3) layer, written once for every entry point (`forward`,
    `model_step`, `jaxchunk.paged.mixed_step`); only `attend` differs between them.

    x: [b, s, hidden]; positions: [b, s] (RoPE); rope_table: `layer_rope_table(config)`, index:
    the (traced) layer index, needed when the table is per layer. attend(q [b, s, heads, d], k, v
    [b, s, kv_heads, d]) -> (attn [b, s, heads, d], aux): writes the cache (if any) and attends
    (through `per_layer_window` when layers differ in window); aux (e.g. the updated cache arrays)
    is returned beside the new x: (x [b, s, hidden], aux).

    Gemma 3 (config.sandwich_norms) normalises each sublayer's output before its residual add:
    x + post_attn_norm(attn(attn_norm(x))), then the same with the MLP.
    """
    eps = config.rms_norm_eps
    h = rms_norm(x, layer["attn_norm"], eps)
    q, k, v = qkv(layer, config, h, positions, layer_inv_freq(rope_table, index))
    attn, aux = attend(q, k, v)
    out = linear(attn.reshape(*x.shape[:2], -1), layer["wo"])
    if config.sandwich_norms:
        out = rms_norm(out, layer["post_attn_norm"], eps)
    x = x + out
    out = mlp(layer, rms_norm(x, layer["mlp_norm"], eps), config.mlp_activation)
    if config.sandwich_norms:
        out = rms_norm(out, layer["post_mlp_norm"], eps)
    return x + out, aux


# ----------------------------------------------------------------------------- reference forward
def full_causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, sliding_window: Optional[int] = None,
                          sm_scale: Optional[float] = None) -> jax.Array:
    """Plain causal attention in float32 over the sequence's own keys (no cache), written
    independently of the backends: key j visible to query i iff j <= i and (with a window)
    j > i - sliding_window. sm_scale: None for 1 / sqrt(head_dim).

    q: [b, s, heads, d]; k, v: [b, s, kv_heads, d] -> [b, s, heads, d]
    """
    b, s, heads, d = q.shape
    group = heads // k.shape[2]
    k = jnp.repeat(k, group, axis=2).astype(jnp.float32)
    v = jnp.repeat(v, group, axis=2).astype(jnp.float32)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q.astype(jnp.float32), k)
    scores = scores / math.sqrt(d) if sm_scale is None else scores * sm_scale
    causal = jnp.tril(jnp.ones((s, s), bool))
    if sliding_window is not None:
        causal = causal & ~jnp.tril(jnp.ones((s, s), bool), -sliding_window)
    scores = jnp.where(causal, scores, -jnp.inf)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(scores, axis=-1), v).astype(q.dtype)


def forward(params: dict, config: LlamaConfig, ids: jax.Array, return_kv: bool = False, kv_quant=None):
    """Full-sequence forward with plain causal attention and no cache. ids: [b, s] -> logits [b, s, vocab].

    With return_kv=True also returns (keys, values), each [layers, b, s, kv_heads, head_dim], the K/V a
    cache should hold after prefilling `ids`.
    kv_quant: a cache format (name or `KVQuant`, see jaxchunk.cache): K and V go through that format
    and back (quantize, dequantize) before attention, as a quantized cache would give them; the
    reference for chunked prefill into a quantized cache. A (keys, values) pair of formats (either
    may be None), or a pair's name ("k8v4", "bf16/q4", see `resolve_cache_formats`), quantizes
    them differently.
    None: exact K/V.
    """
    ids = jnp.asarray(ids, jnp.int32)
    if isinstance(kv_quant, tuple):  # either side may be None (exact)
        k_spec, v_spec = (None if s is None else resolve_cache_dtype(s) for s in kv_quant)
    else:
        k_spec, v_spec = (None, None) if kv_quant is None else resolve_cache_formats(kv_quant)
    rope_table = layer_rope_table(config)
    positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    x = embed_tokens(params, config, ids)

    def layer_fn(x, layer, index):
        def attend(q, k, v):
            if k_spec is not None:
                k = fake_quantize(k, k_spec)
            if v_spec is not None:
                v = fake_quantize(v, v_spec)
            attn = per_layer_window(config, index, lambda window: full_causal_attention(
                q, k, v, sliding_window=window, sm_scale=config.sm_scale))
            return attn, (k, v)

        return decoder_layer(layer, config, x, positions, rope_table, attend, index)

    x, kv = scan_layers(layer_fn, x, params["layers"])
    logits = lm_head(params, config, x)
    return (logits, kv) if return_kv else logits


# ----------------------------------------------------------------------------- cached step
def _ring_attend(config: LlamaConfig, kv_cache: KVCache, positions, valid, full_write, pos, kv_len, rows,
                 attention_impl):
    """The per-layer write + attend of `model_step` over a cache with a ring (`init_cache(...,
    ring_chunk_len=)`): attend(q, k, v, arrays, index) -> (attn, arrays), arrays the 8 cache arrays
    (full-length keys, values, key / value scales, then the ring's).

    Every layer writes its chunk into both stacks at its `ring_layout` index; the other stack's
    index is out of range, so that write is dropped (one scanned body, no per-layer branch around
    a write, which would copy the cache). A global layer attends to its full-length stack as
    without a ring. A sliding-window layer attends to its ring read in position order (`ring_view`,
    a copy of ring_len slots): view index i holds position base + i, so the attention runs with
    q_offset pos - base and kv_len - base, and masks by true positions (p - window < j <= p)."""
    layout = ring_layout(config, kv_cache.ring_chunk_len)
    ring_len = kv_cache.ring_len
    built = (kv_cache.keys.shape[0], kv_cache.ring_keys.shape[0], ring_len)
    if built != (layout.num_full, layout.num_ring, min(layout.ring_len, kv_cache.max_seq_len)):
        # A layer index past a stack would make its writes silently dropped scatters.
        raise InputError(f"this ring cache (global, local layers, ring_len = {built}) was not built for this "
                         f"config ({layout.num_full}, {layout.num_ring}, "
                         f"{min(layout.ring_len, kv_cache.max_seq_len)}): use init_cache(config, ...)")
    full_index, ring_index = jnp.asarray(layout.full_index, jnp.int32), jnp.asarray(layout.ring_index, jnp.int32)
    ring_write = jnp.where(valid, positions % ring_len, ring_len)  # the host checked chunk_len <= ring_chunk_len
    base, slots = ring_slots(kv_len, ring_len)
    key_quant, value_quant = kv_cache.kv_quant
    kv_quant = (key_quant, value_quant)

    def attend(q, k, v, arrays, index):
        keys, values, key_scales, value_scales, ring_keys, ring_values, ring_key_scales, ring_value_scales = arrays
        f, r = full_index[index], ring_index[index]
        keys, key_scales = write_kv(keys, key_scales, k, f, rows, full_write, key_quant)
        values, value_scales = write_kv(values, value_scales, v, f, rows, full_write, value_quant)
        ring_keys, ring_key_scales = write_kv(ring_keys, ring_key_scales, k, r, rows, ring_write, key_quant)
        ring_values, ring_value_scales = write_kv(ring_values, ring_value_scales, v, r, rows, ring_write, value_quant)

        def attend_window(window):
            if window is None:
                return sharding.attention_call(
                    attention, config, q, keys, values, pos, kv_len, layer=f, impl=attention_impl,
                    sm_scale=config.sm_scale, sliding_window=None, kv_quant=kv_quant,
                    k_scales=key_scales, v_scales=value_scales)
            view_k, view_k_scales = ring_view(ring_keys, ring_key_scales, r, slots)
            view_v, view_v_scales = ring_view(ring_values, ring_value_scales, r, slots)
            return sharding.attention_call(
                attention, config, q, view_k, view_v, pos - base, kv_len - base, impl=attention_impl,
                sm_scale=config.sm_scale, sliding_window=window, kv_quant=kv_quant,
                k_scales=view_k_scales, v_scales=view_v_scales)

        attn = per_layer_window(config, index, attend_window)
        return attn, (keys, values, key_scales, value_scales, ring_keys, ring_values, ring_key_scales,
                      ring_value_scales)

    return attend


def model_step(params: dict, config: LlamaConfig, kv_cache: KVCache, tokens: jax.Array, n_valid: jax.Array,
               *, attention_impl: str = "auto", logits: LogitsMode = "last"):
    """Run `tokens` through the model, writing K/V at each row's current cache length.

    tokens:  [batch, chunk_len] int32; the first n_valid[b] tokens of row b are real, the rest padding.
    n_valid: [batch] int32 in [0, chunk_len]. A row with n_valid == 0 is left untouched.
    Query i of row b sits at position pos_b + i (pos_b = kv_cache.lengths[b]) and sees keys
    0..pos_b + i of that row (bottom-right-aligned causal mask), never padding.

    Returns (kv_cache with lengths += n_valid, logits): logits [batch, vocab] at each row's last valid
    token for "last" (rows with n_valid == 0 give garbage there), [batch, chunk_len, vocab] for "all",
    None for "none". Padding never reaches the cache: its writes go to an out-of-range index and are
    dropped, as are writes past the cache end (the host checks lengths before calling).
    With a ring cache (`kv_cache.has_ring`) the sliding-window layers use their ring
    (`_ring_attend`); chunk_len must then be <= kv_cache.ring_chunk_len (the host callers check).
    """
    batch, chunk_len = tokens.shape
    pos = kv_cache.lengths
    offsets = jnp.arange(chunk_len, dtype=jnp.int32)
    positions = pos[:, None] + offsets[None, :]  # [batch, chunk_len]
    # Out-of-range rows of the scatter are dropped: padding tokens write nowhere.
    valid = offsets[None, :] < n_valid[:, None]
    write_index = jnp.where(valid, positions, kv_cache.max_seq_len)
    kv_len = pos + n_valid
    rows = jnp.arange(batch)[:, None]
    rope_table = layer_rope_table(config)
    x = embed_tokens(params, config, tokens)
    key_quant, value_quant = kv_cache.kv_quant
    if kv_cache.has_ring:
        attend_layer = _ring_attend(config, kv_cache, positions, valid, write_index, pos, kv_len, rows,
                                    attention_impl)
    else:
        attend_layer = None

    def layer_fn(carry, layer, index):
        x, cache_arrays = carry

        def attend(q, k, v):
            if attend_layer is not None:
                return attend_layer(q, k, v, cache_arrays, index)
            keys, values, key_scales, value_scales = cache_arrays
            # Quantized on write (the chunk's own queries already see the stored K/V), dequantized
            # on read inside attention.
            keys, key_scales = write_kv(keys, key_scales, k, index, rows, write_index, key_quant)
            values, value_scales = write_kv(values, value_scales, v, index, rows, write_index, value_quant)
            attn = per_layer_window(config, index, lambda window: sharding.attention_call(
                attention, config, q, keys, values, pos, kv_len, layer=index, impl=attention_impl,
                sm_scale=config.sm_scale, sliding_window=window, kv_quant=(key_quant, value_quant),
                k_scales=key_scales, v_scales=value_scales))
            return attn, (keys, values, key_scales, value_scales)

        x, cache_arrays = decoder_layer(layer, config, x, positions, rope_table, attend, index)
        return (x, cache_arrays), None

    arrays = (kv_cache.keys, kv_cache.values, kv_cache.key_scales, kv_cache.value_scales)
    if kv_cache.has_ring:
        arrays += (kv_cache.ring_keys, kv_cache.ring_values, kv_cache.ring_key_scales, kv_cache.ring_value_scales)
    (x, arrays), _ = scan_layers(layer_fn, (x, arrays), params["layers"], rows=math.prod(tokens.shape))
    new_cache = kv_cache.replace(keys=arrays[0], values=arrays[1], key_scales=arrays[2], value_scales=arrays[3],
                                 lengths=kv_len)
    if kv_cache.has_ring:
        new_cache = new_cache.replace(ring_keys=arrays[4], ring_values=arrays[5], ring_key_scales=arrays[6],
                                      ring_value_scales=arrays[7])
    new_cache = sharding.constrain_cache(new_cache, config)  # same sharding out as in: donated in place

    if logits == "none":
        return new_cache, None
    if logits == "all":
        return new_cache, lm_head(params, config, x)
    last = jnp.clip(n_valid - 1, 0, chunk_len - 1)
    return new_cache, lm_head(params, config, x[jnp.arange(batch), last])


# ----------------------------------------------------------------------------- random init
def init_params(config: LlamaConfig, seed: int = 0, dtype=jnp.float32, scale: float = 0.02) -> dict:
    """Random params in the standard layout (tests, experiments). Norm weights near 1."""
    rng = np.random.default_rng(seed)
    L, H, F = config.num_layers, config.hidden_size, config.intermediate_size
    q_dim, kv_dim = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim

    def normal(*shape):
        return jnp.asarray(rng.normal(0.0, scale, shape), dtype)

    def norm(*shape):
        return jnp.asarray(1.0 + rng.normal(0.0, 0.1, shape), dtype)

    params = {
        "embed": normal(config.vocab_size, H),
        "final_norm": norm(H),
        "layers": {
            "attn_norm": norm(L, H), "wq": normal(L, H, q_dim), "wk": normal(L, H, kv_dim),
            "wv": normal(L, H, kv_dim), "wo": normal(L, q_dim, H), "mlp_norm": norm(L, H),
            "w_gate": normal(L, H, F), "w_up": normal(L, H, F), "w_down": normal(L, F, H),
        },
    }
    if config.qk_norm:  # drawn after the Llama leaves, so a Llama config's params do not change
        params["layers"].update(q_norm=norm(L, config.head_dim), k_norm=norm(L, config.head_dim))
    if config.sandwich_norms:
        params["layers"].update(post_attn_norm=norm(L, H), post_mlp_norm=norm(L, H))
    if not config.tie_word_embeddings:
        params["lm_head"] = normal(H, config.vocab_size)
    return params
