"""Quantized weights kept quantized in memory: GGUF blocks of every type in
`gguf_quants.QUANT_TYPES` (Q4_0 .. Q8_0, Q2_K .. Q6_K) repacked for the quantized matmul
(pallas_kernels.quant_matmul), never expanded to a float matrix at load.

`QuantizedWeight` stands in for a float weight W [in, out] (params orientation, `x @ W`) anywhere
in the params pytree; `jaxchunk.model.linear` dispatches on it. Its leaves carry any leading axes
the float array would (the stacked layer axis [L, ...]), so `lax.scan` over layers slices it like
any other leaf. Layout (see pallas_kernels/quant_matmul.py for the details):

    qs:     4-bit: uint8 [..., tiles, in // 2, tile]   (two 4-bit codes a byte)
            8-bit: int8  [..., tiles, in, tile]
    scales: float16 or float32 [..., tiles, in // group, tile]   (group 32 or 16)
    mins:   like scales, or None

with out = tiles * tile. Each GGUF type goes into the smallest such layout that holds it exactly
(`ResidentFormat`, `resident_format`):

    Q4_0, Q4_1           4-bit, group 32, f16 scales + mins (Q4_0: min = -8 d)  = the file's bytes
    Q8_0, Q5_0           8-bit, group 32, f16 scales (Q5_0: code q - 16)          Q5_0: 8.5 / 5.5 bits
    Q5_1                 8-bit, group 32, f16 scales + mins
    Q4_K                 4-bit, group 32, f32 scales d * sc + mins -dmin * m      6 / 4.5 bits
    Q5_K                 8-bit, group 32, f32 scales + mins
    Q6_K                 8-bit, group 16, f32 scales d * sc                      10 / 6.56 bits
    Q2_K, Q3_K           4-bit, group 16, f32 scales + mins (Q3_K: code + 4, min = -4 scale)

(f16 cannot hold the k-quants' products d * sc exactly; f32 can.) A stacked weight whose layers
differ in type (Gemma 3's Q4_K_M mixes Q4_K / Q6_K in ffn_down, Q5_0 / Q8_0 in attn_v) takes the
one layout that holds all of them (`resident_format(types)`: 8 bits if any needs them, the smaller
group, f32 if any needs it, mins if any has them). Packing only moves codes and widens scales, so
the weights the quantized model computes with are exactly the ones the dequantizing loader
produces (up to the sign of zero: a zero min added to -0.0 gives +0.0).

The tied embedding [vocab, hidden] is stored as the LM head's W [hidden, vocab]: `embed_rows`
gathers and dequantizes only the looked-up token columns.
"""
from __future__ import annotations

from typing import Optional

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxchunk.weights.gguf_quants import QUANT_TYPES, BlockCodes, decode_blocks
from pallas_kernels.quant_matmul import QUANT_BLOCK, choose_tile, merge_tiles, quant_group, quant_matmul

QTYPES = tuple(QUANT_TYPES)
"""GGUF types a quantized load keeps quantized: every block type gguf_quants decodes."""
# Bytes of one 32-weight GGUF block of the types packed by moving bytes (no decoding).
BLOCK_BYTES = {"Q4_0": 2 + 16, "Q4_1": 2 + 2 + 16, "Q8_0": 2 + 32}


@dataclasses.dataclass(frozen=True)
class ResidentFormat:
    """One layout of pallas_kernels.quant_matmul: code bits (4 / 8), weights per scale (16 / 32),
    the scales' dtype ("float16" / "float32"), and whether there are mins."""

    bits: int
    group: int
    scale_dtype: str
    has_mins: bool

    def bits_per_weight(self) -> float:
        scale_bits = 8 * np.dtype(self.scale_dtype).itemsize * (2 if self.has_mins else 1)
        return self.bits + scale_bits / self.group


def resident_format(qtypes) -> ResidentFormat:
    """The smallest layout that holds every GGUF type in `qtypes` (names) exactly."""
    types = [QUANT_TYPES[q] for q in qtypes]
    if not types:
        raise ValueError("resident_format needs at least one type")
    bits = 4 if all(t.code_range[1] - t.code_range[0] <= 15 for t in types) else 8
    f16 = all(t.block_size == QUANT_BLOCK for t in types)  # the legacy types' scales are f16 themselves
    return ResidentFormat(bits, min(t.group for t in types), "float16" if f16 else "float32",
                          bits == 4 or any(t.has_mins for t in types))


@struct.dataclass
class QuantizedWeight:
    """A weight W [..., in, out] kept in GGUF quant blocks (32 weights along `in`). qtype: the GGUF
    type(s) it came from ("Q4_1", or "Q4_K+Q6_K" for a stack of both)."""

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
        return (*lead, rows * (2 if self.qs.dtype == np.uint8 else 1), tiles * tile)

    def at_layer(self, index: jax.Array) -> "QuantizedWeight":
        """Layer `index` of a stacked [layers, ...] weight, without slicing: the leaves stay whole
        and the matmul reads that layer in place."""
        return self.replace(layer=index)

    @property
    def nbytes(self) -> int:
        return sum(int(leaf.nbytes) for leaf in jax.tree.leaves(self))


def retile(w: QuantizedWeight, tile: int) -> QuantizedWeight:
    """The same W with column tiles `tile` wide: a lossless relayout of qs / scales / mins (the
    sharding planner uses it where W's tiles do not divide over the devices but its columns do)."""
    n = w.qs.shape[-3] * w.qs.shape[-1]
    if tile <= 0 or n % tile:
        raise ValueError(f"tile {tile} does not divide the weight's {n} columns")

    def one(a):  # [..., tiles, r, t] -> [..., r, n] -> [..., n // tile, r, tile]
        merged = merge_tiles(a)
        return jnp.swapaxes(merged.reshape(*merged.shape[:-1], n // tile, tile), -3, -2)

    return w.replace(qs=one(w.qs), scales=one(w.scales), mins=None if w.mins is None else one(w.mins))


def is_quantized(w) -> bool:
    return isinstance(w, QuantizedWeight)


# ----------------------------------------------------------------------------- packing (NumPy, at load)
def pack_gguf_rows(blocks: np.ndarray, qtype: str, shape: tuple[int, int], tile: Optional[int] = None,
                   fmt: Optional[ResidentFormat] = None, label: Optional[str] = None) -> QuantizedWeight:
    """Repack a GGUF tensor of logical shape [out, in] (file orientation, `blocks` uint8
    [out, bytes per row]) of type `qtype` into a QuantizedWeight for W = tensor.T [in, out]
    (NumPy leaves), in layout `fmt` (default: `resident_format([qtype])`; a stack of layers of
    several types passes the format of all of them, and one `label` for all, e.g. "Q4_K+Q6_K").

    No float matrix is formed: Q4_0 / Q4_1 / Q8_0 in their own layout move bytes only; every other
    case decodes the codes (`gguf_quants.decode_blocks`) and re-packs them (`pack_codes`).
    tile: column tile width (default `choose_tile(out)`).
    """
    if qtype not in QTYPES:
        raise ValueError(f"qtype must be one of {QTYPES}, got {qtype!r}")
    out, inp = shape
    block_size, type_size = QUANT_TYPES[qtype].block_size, QUANT_TYPES[qtype].type_size
    if inp % block_size:
        raise ValueError(f"{qtype} rows need a multiple of {block_size} columns, got {inp}")
    fmt = resident_format([qtype]) if fmt is None else fmt
    label = qtype if label is None else label
    blocks = np.asarray(blocks, np.uint8).reshape(out, inp // block_size * type_size)
    tile = choose_tile(out) if tile is None else tile
    if out % tile:
        raise ValueError(f"tile {tile} does not divide out = {out}")
    if qtype not in BLOCK_BYTES or fmt != resident_format([qtype]):
        shift = max(0, -QUANT_TYPES[qtype].code_range[0]) if fmt.bits == 4 else 0
        return pack_codes(decode_blocks(qtype, blocks), fmt, tile, label, shift)
    nb = inp // QUANT_BLOCK
    blocks = blocks.reshape(out, nb, BLOCK_BYTES[qtype])
    tiles = out // tile

    def to_layout(a: np.ndarray) -> np.ndarray:
        """[out, r] -> [tiles, r, tile] (W's orientation, columns split into tiles)."""
        return np.ascontiguousarray(a.reshape(tiles, tile, a.shape[-1]).transpose(0, 2, 1))

    scales = blocks[:, :, 0:2].copy().view(np.float16)[..., 0]  # [out, nb]
    if qtype == "Q8_0":
        qs = blocks[:, :, 2:].view(np.int8).reshape(out, inp)
        return QuantizedWeight(to_layout(qs), to_layout(scales), None, label)
    if qtype == "Q4_1":
        mins = blocks[:, :, 2:4].copy().view(np.float16)[..., 0]
        packed = blocks[:, :, 4:]
    else:  # Q4_0: W = d * (q - 8) = d * q + (-8 d)
        mins = (scales * np.float16(-8)).astype(np.float16)
        packed = blocks[:, :, 2:]
    qs = packed.reshape(out, inp // 2)
    return QuantizedWeight(to_layout(qs), to_layout(scales), to_layout(mins), label)


def pack_stacked(tensors, tile: Optional[int] = None) -> QuantizedWeight:
    """The layers `tensors` (a sequence of `gguf_file.RawTensor`, one per layer, each [out, in]
    in file orientation, any mix of block types) as one stacked QuantizedWeight W [layers, in, out]
    (NumPy leaves) in the layout that holds all their types (`resident_format`), labelled with
    their type names ("Q4_K+Q6_K"). Name-agnostic: any architecture's stack of matrices; the
    Llama loader stacks per layer the same way (gguf.quantized_formats + pack_gguf_rows)."""
    tensors = list(tensors)
    if not tensors or len({t.shape for t in tensors}) != 1:
        raise ValueError(f"pack_stacked needs layers of one shape, got {[t.shape for t in tensors]}")
    types = sorted({t.qtype for t in tensors})
    fmt, label = resident_format(types), "+".join(types)
    layers = [pack_gguf_rows(t.blocks, t.qtype, t.shape, tile, fmt=fmt, label=label) for t in tensors]
    return jax.tree.map(lambda *a: np.stack(a), *layers)


def pack_codes(c: BlockCodes, fmt: ResidentFormat, tile: int, label: str, shift: int = 0) -> QuantizedWeight:
    """Decoded blocks `c` of a tensor [out, in] (file orientation) -> a QuantizedWeight for
    W [in, out] in layout `fmt`. shift: added to every code (4-bit layouts hold 0..15: Q4_0 / Q3_K
    codes + 8 / + 4) and taken back off through the min (min - shift * scale: exact, shift is a
    power of two and the min it meets is zero). ValueError if `fmt` cannot hold `c` exactly."""
    out, inp = c.codes.shape
    if fmt.group > c.group or c.group % fmt.group or inp % QUANT_BLOCK:
        raise ValueError(f"a layout with groups of {fmt.group} cannot hold groups of {c.group} ({inp} columns)")
    scales, mins = c.scales, c.mins
    if fmt.group < c.group:  # every scale (min) covers c.group // fmt.group groups of the layout
        scales = np.repeat(scales, c.group // fmt.group, axis=1)
        mins = None if mins is None else np.repeat(mins, c.group // fmt.group, axis=1)
    codes = c.codes
    if shift:
        codes = codes + np.int8(shift)
        mins = (np.zeros_like(scales) if mins is None else mins) - np.float32(shift) * scales
    if mins is not None and not fmt.has_mins:
        raise ValueError(f"label {label}: a layout without mins cannot hold these weights (they have mins)")
    if fmt.has_mins and mins is None:
        mins = np.zeros_like(scales)
    lo, hi = (0, 15) if fmt.bits == 4 else (-128, 127)
    if codes.size and (int(codes.min()) < lo or int(codes.max()) > hi):
        raise ValueError(f"{label}: codes {codes.min()}..{codes.max()} do not fit {fmt.bits} bits")
    dtype = np.dtype(fmt.scale_dtype)
    narrowed = [None if a is None else a.astype(dtype) for a in (scales, mins)]
    for name, a, n in (("scales", scales, narrowed[0]), ("mins", mins, narrowed[1])):
        if a is not None and not np.array_equal(n.astype(np.float32), a):
            raise ValueError(f"{label}: {name} are not exact in {dtype.name}")
    scales, mins = narrowed
    tiles = out // tile

    def to_layout(a: np.ndarray) -> np.ndarray:
        """[out, r] -> [tiles, r, tile] (W's orientation, columns split into tiles)."""
        return np.ascontiguousarray(a.reshape(tiles, tile, a.shape[-1]).transpose(0, 2, 1))

    if fmt.bits == 4:  # byte i of a 32-block: code i (low nibble), code 16 + i (high)
        u = codes.view(np.uint8).reshape(out, inp // QUANT_BLOCK, 2, QUANT_BLOCK // 2)
        qs = (u[:, :, 0] | (u[:, :, 1] << np.uint8(4))).reshape(out, inp // 2)
    else:
        qs = codes
    return QuantizedWeight(to_layout(qs), to_layout(scales), None if mins is None else to_layout(mins), label)


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
    group = quant_group(w.qs, w.scales)
    t, c = tokens // tile, tokens % tile
    q = w.qs[t, :, c]            # [..., rows]
    d = w.scales[t, :, c].astype(jnp.float32)  # [..., in // group]
    if w.qs.dtype == jnp.uint8:  # nibble pairs -> codes in natural order
        q = q.reshape(*q.shape[:-1], -1, QUANT_BLOCK // 2)
        q = jnp.concatenate([q & 15, q >> 4], axis=-1).reshape(*tokens.shape, -1)
    vals = q.reshape(*q.shape[:-1], -1, group).astype(jnp.float32) * d[..., None]
    if w.mins is not None:
        vals = vals + w.mins[t, :, c].astype(jnp.float32)[..., None]
    return vals.reshape(*tokens.shape, -1).astype(dtype)
