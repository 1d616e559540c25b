"""Quantized weights kept quantized in memory: GGUF Q4_0 / Q4_1 / Q8_0 blocks repacked for the
quantized matmul (pallas_kernels.quant_matmul), never expanded to a float matrix at load.

`QuantizedWeight` stands in for a float weight W [in, out] (params orientation, `x @ W`) anywhere
in the params pytree; `jaxchunk.model.linear` dispatches on it. Its leaves carry any leading axes
the float array would (the stacked layer axis [L, ...]), so `lax.scan` over layers slices it like
any other leaf. Layout (see pallas_kernels/quant_matmul.py for the details):

    qs:     Q4_*: uint8 [..., tiles, in // 2, tile]   (two 4-bit weights a byte)
            Q8_0: int8  [..., tiles, in, tile]
    scales: float16 [..., tiles, in // 32, tile]      (the file's f16 scales, unchanged)
    mins:   float16 [..., tiles, in // 32, tile]      (Q4_1's mins; Q4_0: -8 * scale), None for Q8_0

with out = tiles * tile. Packing permutes bytes only: the float matrix never exists, and the f16
scales / mins are the file's own bits (Q4_0's -8 * d is exact in f16), so the weights the quantized
model computes with are exactly the ones the dequantizing loader produces.

The tied embedding [vocab, hidden] is stored as the LM head's W [hidden, vocab]: `embed_rows`
gathers and dequantizes only the looked-up token columns.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from pallas_kernels.quant_matmul import QUANT_BLOCK, choose_tile, quant_matmul

QTYPES = ("Q4_0", "Q4_1", "Q8_0")
# Bytes of one 32-weight GGUF block: f16 scale [+ f16 min] + packed weights.
BLOCK_BYTES = {"Q4_0": 2 + 16, "Q4_1": 2 + 2 + 16, "Q8_0": 2 + 32}


@struct.dataclass
class QuantizedWeight:
    """A weight W [..., in, out] kept in GGUF quant blocks (32 weights along `in`)."""

    qs: jax.Array
    scales: jax.Array
    mins: Optional[jax.Array]
    qtype: str = struct.field(pytree_node=False)
    # A traced layer index into the leading (stacked) axis: this stands for W[layer] (see at_layer).
    layer: Optional[jax.Array] = None
    # How x is multiplied (pallas_kernels.quant_matmul): "float" as given, or "q8": rounded to 8 bits
    # per 32-block first, llama.cpp's arithmetic for these weight types (integer products on CPU).
    activations: str = struct.field(pytree_node=False, default="float")
    # How jaxchunk.sharding split it over the mesh's model axis: "out" (columns), "in" (rows, the
    # partial products summed), or None (replicated / one device). Read by its shard_map.
    split: Optional[str] = struct.field(pytree_node=False, default=None)

    @property
    def shape(self) -> tuple[int, ...]:
        """Logical shape [..., in, out] of the float matrix this stands for."""
        *lead, tiles, rows, tile = self.qs.shape
        if self.layer is not None:
            lead = lead[1:]
        return (*lead, rows * (2 if self.qtype != "Q8_0" else 1), tiles * tile)

    def at_layer(self, index: jax.Array) -> "QuantizedWeight":
        """Layer `index` of a stacked [layers, ...] weight, without slicing: the leaves stay whole
        and the matmul reads that layer in place."""
        return self.replace(layer=index)

    @property
    def nbytes(self) -> int:
        return sum(int(leaf.nbytes) for leaf in jax.tree.leaves(self))


def is_quantized(w) -> bool:
    return isinstance(w, QuantizedWeight)


# ----------------------------------------------------------------------------- packing (NumPy, at load)
def pack_gguf_rows(blocks: np.ndarray, qtype: str, shape: tuple[int, int],
                   tile: Optional[int] = None) -> QuantizedWeight:
    """Repack a GGUF tensor of logical shape [out, in] (file orientation, `blocks` uint8
    [out, in // 32 * BLOCK_BYTES]) into a QuantizedWeight for W = tensor.T [in, out] (NumPy leaves).

    Bytes are only moved: no float matrix is formed. tile: column tile width (default
    `choose_tile(out)`).
    """
    if qtype not in QTYPES:
        raise ValueError(f"qtype must be one of {QTYPES}, got {qtype!r}")
    out, inp = shape
    if inp % QUANT_BLOCK:
        raise ValueError(f"{qtype} rows need a multiple of {QUANT_BLOCK} columns, got {inp}")
    nb = inp // QUANT_BLOCK
    blocks = np.asarray(blocks, np.uint8).reshape(out, nb, BLOCK_BYTES[qtype])
    tile = choose_tile(out) if tile is None else tile
    if out % tile:
        raise ValueError(f"tile {tile} does not divide out = {out}")
    tiles = out // tile

    def to_layout(a: np.ndarray) -> np.ndarray:
        """[out, r] -> [tiles, r, tile] (W's orientation, columns split into tiles)."""
        return np.ascontiguousarray(a.reshape(tiles, tile, a.shape[-1]).transpose(0, 2, 1))

    scales = blocks[:, :, 0:2].copy().view(np.float16)[..., 0]  # [out, nb]
    if qtype == "Q8_0":
        qs = blocks[:, :, 2:].view(np.int8).reshape(out, inp)
        return QuantizedWeight(to_layout(qs), to_layout(scales), None, qtype)
    if qtype == "Q4_1":
        mins = blocks[:, :, 2:4].copy().view(np.float16)[..., 0]
        packed = blocks[:, :, 4:]
    else:  # Q4_0: W = d * (q - 8) = d * q + (-8 d)
        mins = (scales * np.float16(-8)).astype(np.float16)
        packed = blocks[:, :, 2:]
    qs = packed.reshape(out, inp // 2)
    return QuantizedWeight(to_layout(qs), to_layout(scales), to_layout(mins), qtype)


def quantize(w: np.ndarray, qtype: str, tile: Optional[int] = None) -> QuantizedWeight:
    """Quantize a float W [in, out] with the `gguf` package's quantizer (llama.cpp's rounding) and
    pack it. For tests and random models; real models arrive quantized."""
    from gguf import GGMLQuantizationType
    from gguf.quants import quantize as gguf_quantize
    w = np.asarray(w, np.float32)
    blocks = gguf_quantize(np.ascontiguousarray(w.T), GGMLQuantizationType[qtype])
    return pack_gguf_rows(blocks, qtype, (w.shape[1], w.shape[0]), tile)


def quantize_params(params: dict, qtype: str = "Q4_1", embed_qtype: str = "Q8_0") -> dict:
    """A float params pytree with every linear weight quantized (`qtype`) and the embedding as a
    quantized LM-head matrix (`embed_qtype`); norms unchanged. For tests of random models."""
    params = jax.tree.map(np.asarray, params)
    layers = dict(params["layers"])
    for key in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"):
        per_layer = [quantize(w, qtype) for w in layers[key]]
        layers[key] = jax.tree.map(lambda *a: np.stack(a), *per_layer)
    out = dict(params, layers=layers, embed=quantize(params["embed"].T, embed_qtype))
    if "lm_head" in params:
        out["lm_head"] = quantize(params["lm_head"], qtype)
    return out


# ----------------------------------------------------------------------------- use (JAX)
def quantized_linear(x: jax.Array, w: QuantizedWeight) -> jax.Array:
    """x [..., in] @ W [in, out] -> [..., out] in x.dtype (W 2-D, or one layer of a stacked W
    through `at_layer`)."""
    return quant_matmul(x, w.qs, w.scales, w.mins, layer=w.layer, activations=w.activations)


def with_activations(params, activations: str):
    """params with every QuantizedWeight multiplying its input as `activations` ("float" / "q8")."""
    return jax.tree.map(lambda w: w.replace(activations=activations) if isinstance(w, QuantizedWeight) else w,
                        params, is_leaf=lambda w: isinstance(w, QuantizedWeight))


def dequantize(w: QuantizedWeight, dtype=jnp.float32) -> jax.Array:
    """The float W [..., in, out] (tests and debugging; the model never builds it)."""
    from pallas_kernels.quant_matmul import dequantize as dequantize_2d
    lead = w.qs.shape[:-3]
    flat = jax.tree.map(lambda a: a.reshape(-1, *a.shape[-3:]), w)
    mats = [dequantize_2d(flat.qs[i], flat.scales[i], None if flat.mins is None else flat.mins[i], dtype)
            for i in range(flat.qs.shape[0])]
    return jnp.stack(mats).reshape(*lead, *w.shape[-2:])


def embed_rows(w: QuantizedWeight, tokens: jax.Array, dtype) -> jax.Array:
    """Rows `tokens` [...] of the embedding E = W.T [vocab, hidden] -> [..., hidden] in `dtype`:
    only the looked-up columns of W are gathered and dequantized."""
    tiles, rows, tile = w.qs.shape
    t, c = tokens // tile, tokens % tile
    q = w.qs[t, :, c]            # [..., rows]
    d = w.scales[t, :, c].astype(jnp.float32)  # [..., in // 32]
    if w.mins is None:
        vals = q.reshape(*q.shape[:-1], -1, QUANT_BLOCK).astype(jnp.float32) * d[..., None]
    else:
        q = q.reshape(*q.shape[:-1], -1, QUANT_BLOCK // 2)
        nibbles = jnp.concatenate([q & 15, q >> 4], axis=-1).astype(jnp.float32)
        vals = nibbles * d[..., None] + w.mins[t, :, c].astype(jnp.float32)[..., None]
    return vals.reshape(*tokens.shape, -1).astype(dtype)
