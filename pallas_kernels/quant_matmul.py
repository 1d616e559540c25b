"""Quantized matmul `x[m, k] @ dequant(W)[k, n]` for GGUF block-quantized weights: the legacy types
(Q4_0, Q4_1, Q5_0, Q8_0, ...) and the k-quants (Q4_K, Q6_K, ...), in one resident layout.

Weights stay quantized in memory; every backend dequantizes on the fly. `quant_matmul` is one op
with several backends behind its signature (see backends.py); `BACKENDS`, in the order
impl="auto" tries them:
  "pallas"     - `quant_matmul_pallas`: Pallas kernel (Triton on GPU, interpret mode elsewhere),
                 tiled over m and n, looping over k one 32-weight quant block at a time,
                 dequantizing in registers. Takes every call. auto: GPU only.
  "native_cpu" - the native CPU kernels (native_cpu.py): the quantized matrix-vector kernel for
                 decode-shaped products (<= DECODE_ROWS rows), native dequantization + XLA's dot
                 for more; both read a stacked W in place. Takes every layout (the integer q8
                 products only for the legacy ones: f16 scales, group 32; the k-quant layouts
                 multiply the rounded x' in floats), the CPU backend, and kernels that built.
                 auto: CPU only, where it supports the call.
  "xla"        - `quant_matmul_xla`: XLA:CPU fuses no int -> float conversion into a dot, and its
                 fused multiply-reduce over the quantized bytes runs at a fraction of a dot's speed
                 (see experiments/bench_quant_matmul.py), so it dequantizes one block of whole
                 column tiles (<= BLOCK_COLS columns, a few MB of floats that stay in cache) at a
                 time and feeds it to a plain dot. Inside the model's layer scan this means the
                 float copy is one column block of one layer, never the model. Takes every call.
                 auto: the fallback.
  "reference"  - `quant_matmul_reference`: dequantize everything to float32 and do one float32 dot
                 (the oracle). Takes every call; never auto.

Layout (what `jaxchunk.weights.quantized` repacks GGUF blocks into). W is [k, n] (x @ W), quant
blocks of 32 run along k, each with one or two scale groups (`group` = 32 or 16 weights along k),
and the n columns are split into `tiles` tiles of `tile` columns:

    qs:     4-bit: uint8 [tiles, k // 2, tile]. Row b * 16 + i holds W[b * 32 + i] in its low nibble
            and W[b * 32 + 16 + i] in its high nibble (GGUF's own order within a block; with
            group 16 the low nibbles are group 2b, the high ones group 2b + 1).
            8-bit: int8 [tiles, k, tile].
    scales: [tiles, k // group, tile], float16 (the legacy types' own f16 scales) or float32 (the
            k-quants' d * sc, exact in f32 but not in f16). group = k // scales.shape[1].
    mins:   None or [tiles, k // group, tile], scales' dtype: W = scale * q + min. 4-bit weights
            always have mins (q in 0..15; Q4_0's W = d * (q - 8) is stored as min = -8 d); 8-bit
            ones may (Q5_K, or a stack mixing Q4_K and Q6_K layers) or not (W = scale * q).

Every value scale * q (+ min) is computed in float32: scale * q is exact for every GGUF type (at
most 21 significant bits), so W is bit-identical to the gguf package's dequantization.

Activations: `activations="float"` (default) multiplies x as given. `activations="q8"` first rounds
each 32-element block of x to 8 bits, as llama.cpp does for these weight types (its Q8_0 / Q8_1
"vec_dot" formats): x' = d * round(x / d), d = max|x_block| / 127; every backend then computes
x' @ W, so chunk sizes and backends still agree up to float summation order. The native CPU kernel
does the q8 products in integers (AVX2 / AVX-512 VNNI), about 4x fewer instructions per weight than
dequantizing to float, which is what makes decode memory-bound.

Column j of W is column j % tile of tile j // tile. Tiles are narrow (`choose_tile`: 64 columns
where n allows) because a tile's rows are one contiguous run of bytes: the native decode kernel
streams a whole tile front to back (a SmolLM2-sized decode step's weights on 2 cores: 7.5 ms at
tiles of n or 1024 columns, 5.0 ms at 64). The dots of the other paths see blocks of whole tiles
(`column_blocks`), not single tiles. Leading axes beyond these (the layer axis) are
not taken here: the model's layer scan slices them off.

Self-contained: imports nothing from jaxchunk.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import native_cpu
from pallas_kernels.backends import Backend, choose_backend, impl_names, supports_everything
from pallas_kernels.common import check_triton_blocks, next_pow2
from pallas_kernels.compat import default_interpret, triton_compiler_params

QUANT_BLOCK = 32          # weights per quant block along k (a 4-bit block's 16 bytes of nibble pairs)
GROUPS = (16, 32)         # weights per scale (and min) along k: k-quants Q2_K / Q3_K / Q6_K use 16
TILE_COLS = 64            # column tile width the loader aims for (see choose_tile)
BLOCK_COLS = 1024         # columns of W dequantized at once by the dot paths (see column_blocks)
ACTIVATIONS = ("float", "q8")


# ----------------------------------------------------------------------------- layout helpers
def choose_tile(n: int, max_cols: int = TILE_COLS) -> int:
    """Column tile width for an n-column weight: the largest divisor of n that is <= max_cols and
    a multiple of 32 (the native kernels' vector width), else of 16, else n itself."""
    for multiple in (32, 16):
        for t in range(min(max_cols, n) // multiple * multiple, 0, -multiple):
            if n % t == 0:
                return t
    return n


def column_blocks(tiles: int, tile: int, max_cols: int = BLOCK_COLS) -> int:
    """Tiles per column block, so a dot sees blocks of about max_cols columns however narrow the
    tiles are: all of them when W has <= 2 * max_cols columns (one block, as a layer's matrices),
    else the largest divisor g of `tiles` with g * tile <= max(max_cols, tile)."""
    if tiles * tile <= 2 * max_cols:
        return tiles
    g = max(1, min(tiles, max_cols // tile))
    while tiles % g:
        g -= 1
    return g


def merge_tiles(a: jax.Array) -> jax.Array:
    """[..., g, rows, tile] -> [..., rows, g * tile]: g adjacent tiles as one (columns in W's order)."""
    *lead, g, rows, tile = a.shape
    return jnp.swapaxes(a, -3, -2).reshape(*lead, rows, g * tile)


def quant_bits(qs: jax.Array) -> int:
    """4 for packed nibbles (uint8), 8 for int8."""
    if qs.dtype == jnp.uint8:
        return 4
    if qs.dtype == jnp.int8:
        return 8
    raise ValueError(f"qs must be uint8 (packed 4-bit) or int8 (8-bit), got {qs.dtype}")


def quant_group(qs, scales) -> int:
    """Weights per scale along k: k // scales.shape[-2] (16 or 32)."""
    k = qs.shape[-2] * (2 if quant_bits(qs) == 4 else 1)
    return k // scales.shape[-2] if scales.shape[-2] else 0


def check_quant_inputs(x, qs, scales, mins) -> tuple[int, int]:
    """Validates shapes and dtypes; returns (k, n)."""
    bits = quant_bits(qs)
    if qs.ndim != 3 or scales.ndim != 3:
        raise ValueError(f"expected qs [tiles, rows, tile] and scales [tiles, k // group, tile], got "
                         f"qs {qs.shape}, scales {scales.shape}")
    tiles, rows, tile = qs.shape
    k = rows * (2 if bits == 4 else 1)
    group = quant_group(qs, scales)
    if k % QUANT_BLOCK or group not in GROUPS or scales.shape != (tiles, k // group, tile):
        raise ValueError(f"scales {scales.shape} do not match qs {qs.shape} ({bits}-bit, k = {k}: blocks of "
                         f"{QUANT_BLOCK}, one scale per {' or '.join(map(str, GROUPS))} weights)")
    if scales.dtype not in (jnp.float16, jnp.float32):
        raise ValueError(f"scales must be float16 or float32, got {scales.dtype}")
    if mins is None and bits == 4:
        raise ValueError("4-bit weights need mins")
    if mins is not None and (mins.shape != scales.shape or mins.dtype != scales.dtype):
        raise ValueError(f"mins {mins.shape} {mins.dtype} != scales {scales.shape} {scales.dtype}")
    if x.shape[-1] != k:
        raise ValueError(f"x [..., {x.shape[-1]}] does not match the weight's k = {k}")
    return k, tiles * tile


def dequantize(qs, scales, mins, dtype=jnp.float32) -> jax.Array:
    """The float matrix W [k, n] (the reference; the model never materialises all of it)."""
    return jnp.concatenate(_dequantize_tiles(qs, scales, mins, dtype), axis=-1)


def _codes(qs) -> jax.Array:
    """The codes of W [tiles, k, tile] in natural row order, as stored (int8 or uint8 0..15)."""
    if quant_bits(qs) == 8:
        return qs
    tiles, rows, tile = qs.shape
    q = qs.reshape(tiles, rows // (QUANT_BLOCK // 2), QUANT_BLOCK // 2, tile)
    return jnp.concatenate([q & 15, q >> 4], axis=2).reshape(tiles, 2 * rows, tile)


def _dequantize_tiles(qs, scales, mins, dtype):
    """W's column tiles, each [k, tile], in natural row order."""
    tiles, _, tile = qs.shape
    ng, group = scales.shape[1], quant_group(qs, scales)
    w = _codes(qs).reshape(tiles, ng, group, tile).astype(jnp.float32) * scales.astype(jnp.float32)[:, :, None, :]
    if mins is not None:
        w = w + mins.astype(jnp.float32)[:, :, None, :]
    w = w.reshape(tiles, ng * group, tile).astype(dtype)
    return [w[t] for t in range(tiles)]


def quantize_activations(x: jax.Array) -> jax.Array:
    """x [..., k] -> x' = d * round(x / d) per 32-block along k, d = max|x_block| / 127 (f32, ties
    to even; all-zero blocks stay zero): the values the "q8" activation mode multiplies, in x.dtype."""
    x32 = x.astype(jnp.float32)
    blocks = x32.reshape(*x.shape[:-1], x.shape[-1] // QUANT_BLOCK, QUANT_BLOCK)
    d = jnp.max(jnp.abs(blocks), axis=-1, keepdims=True) / jnp.float32(127)
    q = jnp.round(blocks / jnp.where(d > 0, d, 1.0))
    return (q * d).reshape(x.shape).astype(x.dtype)


# ----------------------------------------------------------------------------- reference
def quant_matmul_reference(x: jax.Array, qs, scales, mins=None) -> jax.Array:
    """x [..., k] @ dequantize(W) [k, n] -> [..., n] in x.dtype, computed in float32."""
    check_quant_inputs(x, qs, scales, mins)
    w = dequantize(qs, scales, mins, jnp.float32)
    y = jnp.einsum("...k,kn->...n", x.astype(jnp.float32), w, precision=lax.Precision.HIGHEST)
    return y.astype(x.dtype)


# ----------------------------------------------------------------------------- CPU (XLA) path
# Per column tile: x2 [rows, k] (rows = flattened leading dims), q [k or k // 2, tile], d / m
# [k // 32, tile] -> [rows, tile] float32. Weights are dequantized to x's dtype; dots accumulate in
# float32 (Q4_1's min term cancels much of the rest: a bf16 sum of the two loses it). Measured by
# experiments/bench_quant_matmul.py.
def _dot(a, b):
    return jnp.matmul(a, b, preferred_element_type=jnp.float32)


def _tile_dequant_dot(x2, q, d, m):
    """Dequantize the tile to x's dtype in natural row order, one dot."""
    w = _dequantize_tiles(q[None], d[None], None if m is None else m[None], x2.dtype)[0]  # [k, tile]
    return _dot(x2, w)


def _tile_split_dot(x2, q, d, m):
    """4-bit: split x into the halves that meet the low and the high nibbles (x_lo, x_hi
    [rows, k // 2]) so the nibbles are never interleaved back:
    y = x_lo @ (d_lo * lo) + x_hi @ (d_hi * hi) + groupsum(x) @ mins (d_lo = d_hi = d for group
    32; the even / odd groups for group 16). 8-bit: as _tile_dequant_dot."""
    if q.dtype != jnp.uint8:
        return _tile_dequant_dot(x2, q, d, m)
    dtype, tile, nb = x2.dtype, q.shape[-1], q.shape[0] * 2 // QUANT_BLOCK
    xb = x2.reshape(-1, nb, 2, QUANT_BLOCK // 2)
    x_lo = xb[:, :, 0].reshape(-1, nb * QUANT_BLOCK // 2)
    x_hi = xb[:, :, 1].reshape(-1, nb * QUANT_BLOCK // 2)
    q = q.reshape(nb, QUANT_BLOCK // 2, tile)
    if d.shape[0] == nb:  # group 32
        d_lo = d_hi = d.astype(dtype)[:, None, :]
        min_term = _dot(jnp.sum(xb.astype(jnp.float32), axis=(2, 3)), m.astype(jnp.float32))
    else:  # group 16: [nb, 2, tile] (low-nibble group, high-nibble group)
        d2, m2 = d.reshape(nb, 2, tile).astype(dtype), m.reshape(nb, 2, tile).astype(jnp.float32)
        d_lo, d_hi = d2[:, 0:1], d2[:, 1:2]
        x_sum = jnp.sum(xb.astype(jnp.float32), axis=3)  # [rows, nb, 2]
        min_term = _dot(x_sum[:, :, 0], m2[:, 0]) + _dot(x_sum[:, :, 1], m2[:, 1])
    lo = ((q & 15).astype(dtype) * d_lo).reshape(-1, tile)
    hi = ((q >> 4).astype(dtype) * d_hi).reshape(-1, tile)
    return _dot(x_lo, lo) + _dot(x_hi, hi) + min_term


def _tile_multiply_reduce(x2, q, d, m):
    """No dot: per-group partial sums of x * q (the int -> float conversion inside one
    multiply-reduce fusion), then d * partial (+ min * groupsum(x))."""
    tile, ng = q.shape[-1], d.shape[0]
    qf = _codes(q[None])[0].astype(jnp.float32)  # [k, tile]
    group = qf.shape[0] // ng
    xb = x2.astype(jnp.float32).reshape(-1, ng, group)
    part = jnp.sum(xb[..., None] * qf.reshape(ng, group, tile), axis=2)  # [rows, ng, tile]
    y = part * d.astype(jnp.float32)
    if m is not None:
        y = y + xb.sum(-1)[..., None] * m.astype(jnp.float32)
    return jnp.sum(y, axis=1)


XLA_FORMULATIONS = {"dequant_dot": _tile_dequant_dot, "split_dot": _tile_split_dot,
                    "multiply_reduce": _tile_multiply_reduce}
DECODE_ROWS = 16  # at most this many rows (decode): DECODE_FORMULATION; more (prefill): dequant_dot
DECODE_FORMULATION = "split_dot"


def quant_matmul_xla(x: jax.Array, qs, scales, mins=None, *, formulation: str | None = None) -> jax.Array:
    """x [..., k] @ W -> [..., n] in x.dtype, one column tile dequantized at a time (a lax.map
    over the tiles, so only one tile's floats exist at once).

    formulation: a key of XLA_FORMULATIONS; default by row count (DECODE_ROWS).
    """
    check_quant_inputs(x, qs, scales, mins)
    if formulation is None:
        formulation = DECODE_FORMULATION if math.prod(x.shape[:-1]) <= DECODE_ROWS else "dequant_dot"
    return _per_column_block(x, qs, scales, mins, XLA_FORMULATIONS[formulation])


def _per_column_block(x, qs, scales, mins, tile_product):
    """x [..., k] @ W -> [..., n] in x.dtype, as tile_product(x2 [rows, k], q, d, m) -> [rows, cols]
    over blocks of whole column tiles (`column_blocks`), each merged into one [.., cols] tile (a
    lax.map over the blocks, so one block's floats exist at a time)."""
    lead, k = x.shape[:-1], x.shape[-1]
    tiles, _, tile = qs.shape
    g = column_blocks(tiles, tile)
    x2 = x.reshape(-1, k)

    def block_product(q, d, m):  # leaves [g, ., tile]
        return tile_product(x2, merge_tiles(q), merge_tiles(d), None if m is None else merge_tiles(m))

    if g == tiles:
        y = block_product(qs, scales, mins)
    else:
        blocks = jax.tree.map(lambda a: None if a is None else a.reshape(tiles // g, g, *a.shape[1:]),
                              (qs, scales, mins))
        y = lax.map(lambda a: block_product(*a), blocks)  # [blocks, rows, g * tile]
        y = jnp.moveaxis(y, 0, 1).reshape(-1, tiles * tile)
    return y.reshape(*lead, tiles * tile).astype(x.dtype)


def _layer_of(qs, scales, mins, layer):
    """W's leaves at `layer` of stacked ones (None: already 2-D)."""
    if layer is None:
        return qs, scales, mins
    return tuple(None if a is None else lax.dynamic_index_in_dim(a, layer, keepdims=False)
                 for a in (qs, scales, mins))


# ----------------------------------------------------------------------------- Pallas kernel
def _quant_matmul_kernel(x_ref, qs_ref, scales_ref, *rest, bits, num_blocks, group, has_mins):
    """One [block_m, block_n] output tile; loops over k one quant block (32 weights) at a time,
    as two halves of 16 (4-bit: the low and the high nibbles; 8-bit group 16: the two groups) or,
    for 8-bit group 32, whole."""
    if has_mins:
        mins_ref, o_ref = rest
    else:
        (o_ref,) = rest
        mins_ref = None
    x_dtype = x_ref.dtype
    dot_dtype = jnp.float32 if x_dtype == jnp.float32 else x_dtype  # bf16 x: bf16 tensor-core dot
    half = QUANT_BLOCK // 2

    def dot(a, b):
        return lax.dot_general(a.astype(dot_dtype), b.astype(dot_dtype), (((1,), (0,)), ((), ())),
                               preferred_element_type=jnp.float32)

    per_block = QUANT_BLOCK // group  # scale rows per block: 1 or 2

    def scale_rows(b, h):
        """(scale, min or None) of half h of block b, each [1, bn] float32."""
        row = b * per_block + (h if per_block == 2 else 0)
        d = scales_ref[pl.ds(row, 1), :].astype(jnp.float32)
        return d, None if mins_ref is None else mins_ref[pl.ds(row, 1), :].astype(jnp.float32)

    def value(q, d, m):
        w = q.astype(jnp.float32) * d
        return w if m is None else w + m

    def body(b, acc):
        if bits == 8 and group == QUANT_BLOCK:
            q = qs_ref[pl.ds(b * QUANT_BLOCK, QUANT_BLOCK), :]        # [32, bn] int8
            x = x_ref[:, pl.ds(b * QUANT_BLOCK, QUANT_BLOCK)]         # [bm, 32]
            return acc + dot(x, value(q, *scale_rows(b, 0)))
        x_lo = x_ref[:, pl.ds(b * QUANT_BLOCK, half)]                 # [bm, 16]: the first half's x
        x_hi = x_ref[:, pl.ds(b * QUANT_BLOCK + half, half)]
        if bits == 8:                                                  # group 16: two int8 halves
            q_lo = qs_ref[pl.ds(b * QUANT_BLOCK, half), :]
            q_hi = qs_ref[pl.ds(b * QUANT_BLOCK + half, half), :]
        else:
            q = qs_ref[pl.ds(b * half, half), :]                      # [16, bn] uint8
            q_lo, q_hi = q & 15, q >> 4
        return acc + dot(x_lo, value(q_lo, *scale_rows(b, 0))) + dot(x_hi, value(q_hi, *scale_rows(b, 1)))

    acc = jnp.zeros(o_ref.shape, jnp.float32)
    acc = lax.fori_loop(0, num_blocks, body, acc)
    o_ref[...] = acc.astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("block_m", "block_n", "interpret", "num_warps", "num_stages"))
def quant_matmul_pallas(x: jax.Array, qs, scales, mins=None, *, block_m: int = 16, block_n: int = 64,
                        interpret: bool | None = None, num_warps: int = 4, num_stages: int = 2) -> jax.Array:
    """x [..., k] @ W -> [..., n] in x.dtype, accumulated in float32.

    Grid: (cdiv(rows, block_m), tiles, cdiv(tile, block_n)); rows and tile need not be multiples of
    the blocks (partial edge blocks are masked). block_n is capped at the tile width rounded up to a
    power of two. On GPU (interpret=False) both blocks must be powers of two >= 16.
    """
    check_quant_inputs(x, qs, scales, mins)
    if interpret is None:
        interpret = default_interpret()
    bits, group = quant_bits(qs), quant_group(qs, scales)
    lead, k = x.shape[:-1], x.shape[-1]
    tiles, rows_q, tile = qs.shape
    nb, ng = k // QUANT_BLOCK, k // group
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    block_n = min(block_n, next_pow2(tile))
    block_m = min(block_m, max(16, next_pow2(m))) if not interpret else min(block_m, next_pow2(m))
    if not interpret:
        check_triton_blocks(block_m, block_n)
    grid = (pl.cdiv(m, block_m), tiles, pl.cdiv(tile, block_n))
    in_specs = [
        pl.BlockSpec((block_m, k), lambda i, t, j: (i, 0)),
        pl.BlockSpec((None, rows_q, block_n), lambda i, t, j: (t, 0, j)),
        pl.BlockSpec((None, ng, block_n), lambda i, t, j: (t, 0, j)),
    ]
    operands = [x2, qs, scales]
    if mins is not None:
        in_specs.append(pl.BlockSpec((None, ng, block_n), lambda i, t, j: (t, 0, j)))
        operands.append(mins)
    kernel = functools.partial(_quant_matmul_kernel, bits=bits, num_blocks=nb, group=group,
                               has_mins=mins is not None)
    out = pl.pallas_call(
        kernel,
        grid=grid,
        in_specs=in_specs,
        out_specs=pl.BlockSpec((block_m, None, block_n), lambda i, t, j: (i, t, j)),
        out_shape=jax.ShapeDtypeStruct((m, tiles, tile), x.dtype),
        interpret=interpret,
        compiler_params=triton_compiler_params(num_warps, num_stages),
        name=f"quant_matmul_q{bits}_g{group}",
    )(*operands)
    return out.reshape(*lead, tiles * tile)


# ----------------------------------------------------------------------------- backends
# Every backend function has the op's signature (less impl): x [..., k], W's packed leaves (2-D, or
# stacked [layers, ...] with a traced `layer`), activations "float" / "q8" -> [..., n] in x.dtype.
def _rows(x) -> int:
    return math.prod(x.shape[:-1])


def _pallas(x, qs, scales, mins=None, *, layer=None, activations="float"):
    if activations == "q8":
        x = quantize_activations(x)
    qs, scales, mins = _layer_of(qs, scales, mins, layer)
    return quant_matmul_pallas(x, qs, scales, mins, block_m=16 if _rows(x) <= DECODE_ROWS else 64)


def _native_cpu(x, qs, scales, mins=None, *, layer=None, activations="float"):
    """Decode-shaped products (<= DECODE_ROWS rows): the quantized matrix-vector kernel, which
    reads a stacked W in place; more rows: native dequantization of one layer, then XLA's dot."""
    if _rows(x) <= DECODE_ROWS:
        return native_cpu.quant_matmul_cpu(x, qs, scales, mins, layer=layer, quantize_x=activations == "q8")
    if activations == "q8":
        x = quantize_activations(x)
    return _dequantize_cpu_dot(x, qs, scales, mins, layer)


def _dequantize_cpu_dot(x, qs, scales, mins, layer):
    """x [..., k] @ W for many rows: W dequantized by the native kernel (~3x faster than XLA's own
    dequantization fusion), then XLA's dot. A weight of one column block is dequantized whole, read
    in place at its layer; wider ones (the LM head) one block at a time, so the float copy stays a
    few MB."""
    tiles, _, tile = qs.shape[-3:]
    if column_blocks(tiles, tile) == tiles:
        w = native_cpu.dequantize_cpu(qs, scales, mins, layer=layer).astype(x.dtype)
        return _dot(x.reshape(-1, x.shape[-1]), w).reshape(*x.shape[:-1], -1).astype(x.dtype)
    return _per_column_block(x, *_layer_of(qs, scales, mins, layer),
                     lambda x2, q, d, m: _dot(x2, native_cpu.dequantize_cpu(
                         q[None], d[None], None if m is None else m[None]).astype(x.dtype)))  # a block as a one-tile W


def _native_cpu_supports(x, qs, scales, mins=None, *, layer=None, activations="float") -> str | None:
    del x, qs, layer, activations
    platform = jax.default_backend()
    if platform != "cpu":
        return f"the native kernels run on the CPU backend, this is {platform!r}"
    for name, a in (("scales", scales), ("mins", mins)):
        if a is not None and a.dtype not in (jnp.float16, jnp.float32):
            return f"{name} are {a.dtype}: the native kernels take float16 or float32 scales / mins"
    if not native_cpu.available():
        return f"the native CPU kernels did not build: {native_cpu.unavailable_reason()}"
    return None


def _xla(x, qs, scales, mins=None, *, layer=None, activations="float"):
    if activations == "q8":
        x = quantize_activations(x)
    return quant_matmul_xla(x, *_layer_of(qs, scales, mins, layer))


def _reference(x, qs, scales, mins=None, *, layer=None, activations="float"):
    if activations == "q8":
        x = quantize_activations(x)
    return quant_matmul_reference(x, *_layer_of(qs, scales, mins, layer))


BACKENDS: dict[str, Backend] = {b.name: b for b in (
    Backend("pallas", _pallas, supports_everything,
            "Pallas kernel, dequantizing in registers; interpret mode off a GPU", auto_platforms=("gpu",)),
    Backend("native_cpu", _native_cpu, _native_cpu_supports,
            "native CPU kernels: quantized gemv for decode, native dequantize + dot for prefill",
            auto_platforms=("cpu",)),
    Backend("xla", _xla, supports_everything, "XLA, one column tile dequantized at a time"),
    Backend("reference", _reference, supports_everything,
            "everything dequantized to float32, one float32 dot (the oracle)", auto_platforms=()),
)}
IMPLS = impl_names(BACKENDS)  # the valid impl= values: "auto" and the backend names


def quant_matmul(x: jax.Array, qs, scales, mins=None, *, impl: str = "auto", layer=None,
                 activations: str = "float") -> jax.Array:
    """x [..., k] @ W [k, n] -> [..., n] in x.dtype.

    impl: "auto" or a `BACKENDS` name. "auto": the Pallas kernel on a GPU backend; on CPU
    "native_cpu" where it supports the call (the kernels built: the quantized
    matrix-vector kernel for <= DECODE_ROWS rows, native dequantization + XLA's dot for more),
    else "xla". An explicit name that cannot take the call raises ValueError with the reason.

    activations: "float" (x as given) or "q8" (x rounded to 8 bits per 32-block first, llama.cpp's
    scheme: see the module docstring), for every impl.

    layer: None, or a (traced) index when qs / scales / mins are stacked [layers, ...]: W is that
    layer. The native CPU kernels read it in place; the other backends slice it (inside their
    fusions).
    """
    if activations not in ACTIVATIONS:
        raise ValueError(f"activations must be one of {ACTIVATIONS}, got {activations!r}")
    args = (x, qs, scales, mins)
    kwargs = dict(layer=layer, activations=activations)
    return choose_backend(BACKENDS, impl, *args, **kwargs).fn(*args, **kwargs)

