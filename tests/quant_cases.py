"""Quantized-matmul cases shared by test_quant_matmul.py (interpret mode / XLA on CPU) and
test_quant_matmul_gpu.py (compiled on a GPU).

The oracle is independent of the code under test: the `gguf` package quantizes a random float
matrix to GGUF blocks and dequantizes them back (llama.cpp's reference formulas, in NumPy), and
NumPy multiplies in float64. jaxchunk only repacks the blocks.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import numpy as np

QTYPES = ("Q4_0", "Q4_1", "Q8_0")


class Case(NamedTuple):
    m: int
    k: int
    n: int
    tile: Optional[int]  # column tile width of the packed layout (None: the loader's choice)
    block_m: int
    block_n: int

    @property
    def id(self) -> str:
        return f"m{self.m}-k{self.k}-n{self.n}-t{self.tile}-bm{self.block_m}-bn{self.block_n}"


# Non-multiples of the blocks on purpose: m = 5 with block_m 4, n = 48 / 80 with block_n 32, a
# tile (40) that is not a power of two; decode (m = 1) and a prefill-like m.
CASES = [
    Case(1, 64, 48, None, 16, 32),
    Case(5, 96, 80, 40, 4, 32),
    Case(37, 128, 64, 32, 16, 16),
    Case(3, 256, 192, 64, 16, 64),
]

# Relative to max |y|. f32: only summation order differs from the float64 oracle (k <= 256 terms,
# ~sqrt(k) * 2^-24 each). bf16: x is bf16-exact, but dequantized weights are rounded to bf16 for the
# dot (2^-9 relative) and the output to bf16 (2^-9): a few 2^-9 in the worst element.
TOL = {"float32": 2e-5, "bfloat16": 1.5e-2}


def make_weight(case: Case, qtype: str, seed: int = 0):
    """(QuantizedWeight with NumPy leaves, float64 W [k, n] the blocks dequantize to, per gguf)."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    from jaxchunk.weights.quantized import pack_gguf_rows
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 1, (case.k, case.n)).astype(np.float32)
    w += rng.normal(0, 0.5, (1, case.n)).astype(np.float32)  # non-zero block means exercise Q4_1's min
    blocks = quantize(np.ascontiguousarray(w.T), GGMLQuantizationType[qtype])  # [n, k] rows, as in a file
    dequant = dequantize(blocks, GGMLQuantizationType[qtype]).reshape(case.n, case.k).T.astype(np.float64)
    return pack_gguf_rows(blocks, qtype, (case.n, case.k), case.tile), dequant


# Byte offsets of each type's f16 fields within a block, from ggml-common.h (written out here, not
# taken from the code under test).
F16_FIELDS = {
    "Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,),
    "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,),
}


def random_blocks(qtype: str, rows: int, blocks_per_row: int, seed: int = 0, log2_range=(-20, 2)) -> np.ndarray:
    """uint8 [rows, blocks_per_row * type_size] of GGUF type `qtype`: random bytes, and random finite
    f16 super-scales of magnitude 2**log2_range (default down to f16 subnormals, < 2**-14); the
    first three are 0, -0 and the smallest subnormal."""
    from gguf import GGML_QUANT_SIZES
    from gguf import GGMLQuantizationType as Q
    rng = np.random.default_rng(seed)
    block_size, type_size = GGML_QUANT_SIZES[Q[qtype]]
    b = rng.integers(0, 256, (rows * blocks_per_row, type_size), dtype=np.uint8)
    for off in F16_FIELDS[qtype]:
        mag = np.exp2(rng.uniform(*log2_range, b.shape[0]))
        scale = (mag * rng.choice([-1.0, 1.0], b.shape[0])).astype(np.float16)
        scale[:3] = [0.0, -0.0, np.float16(6e-8)]  # zero, negative zero, the smallest subnormal
        b[:, off:off + 2] = scale.view(np.uint8).reshape(-1, 2)
    return b.reshape(rows, -1)


# GGUF types (and mixed stacks: Gemma 3 Q4_K_M's ffn_down and attn_v) beyond QTYPES, kept quantized
# in the layouts of jaxchunk.weights.quantized.resident_format.
KQUANT_SPECS = ("Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "Q4_K+Q6_K", "Q5_0+Q8_0")


def make_stack(spec: str, k: int = 512, n: int = 400, tile: int = 200, seed: int = 0):
    """(stacked QuantizedWeight [layers, k, n] with NumPy leaves, float64 W [layers, k, n] per gguf):
    one layer per type named in `spec` ("Q4_K" or "Q4_K+Q6_K"), random blocks with f16 super-scales
    of 2**-12..2**-6. Default shape: 2 tiles of 200 columns (the native kernel's work items of 64
    columns, ItemColumns, and an 8-column edge per tile)."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import dequantize

    from jaxchunk.weights.gguf_file import RawTensor
    from jaxchunk.weights.quantized import pack_stacked
    raws, ws = [], []
    for i, qtype in enumerate(spec.split("+")):
        block = 256 if qtype.endswith("_K") else 32
        blocks = random_blocks(qtype, n, k // block, seed=seed + i, log2_range=(-12, -6))
        raws.append(RawTensor(f"layer{i}", qtype, (n, k), blocks))
        ws.append(dequantize(blocks, Q[qtype]).reshape(n, k).T.astype(np.float64))
    return pack_stacked(raws, tile), np.stack(ws)


def gemma3_gguf_path():
    """gemma-3-270m-q4_k_m.gguf: fetched into the cache where jaxchunk.fetch knows the model, else
    the path in $JAXCHUNK_GEMMA3_GGUF; the calling test is skipped (with this reason) otherwise."""
    import os
    from pathlib import Path

    import pytest

    from jaxchunk.fetch import MODELS, fetch_model
    if "gemma3-270m" in MODELS:
        return fetch_model("gemma3-270m", quiet=True)
    if os.environ.get("JAXCHUNK_GEMMA3_GGUF"):
        return Path(os.environ["JAXCHUNK_GEMMA3_GGUF"])
    pytest.skip("no gemma3-270m in jaxchunk.fetch.MODELS and no $JAXCHUNK_GEMMA3_GGUF")


def kernel_args(qw) -> list:
    """The packed leaves of a QuantizedWeight as the kernels take them: [qs, scales, mins or None]."""
    import jax.numpy as jnp
    return [jnp.asarray(qw.qs), jnp.asarray(qw.scales), None if qw.mins is None else jnp.asarray(qw.mins)]


def make_x(case: Case, dtype: str, seed: int = 1) -> np.ndarray:
    import jax.numpy as jnp
    x = np.random.default_rng(seed).normal(0, 1, (case.m, case.k)).astype(np.float32)
    return np.asarray(jnp.asarray(x, dtype).astype(jnp.float32))  # representable in `dtype`


def q8_activations(x: np.ndarray) -> np.ndarray:
    """The "q8" activation mode's x' in float64, written from llama.cpp's Q8_0 definition (NumPy,
    not the code under test): per 32-block, d = max|x| / 127 in f32, q = round(x / d) to nearest even
    in f32; x' = d * q."""
    x = np.asarray(x, np.float32)
    blocks = x.reshape(*x.shape[:-1], -1, 32)
    d = (np.abs(blocks).max(axis=-1, keepdims=True) / np.float32(127)).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = np.where(d > 0, np.round(blocks / d), 0)
    return (d.astype(np.float64) * q).reshape(x.shape)


def check(y, x: np.ndarray, w: np.ndarray, dtype: str) -> None:
    expected = x.astype(np.float64) @ w
    y = np.asarray(y, np.float64)
    assert y.shape == expected.shape
    err = np.abs(y - expected).max() / np.abs(expected).max()
    assert err <= TOL[dtype], f"max error {err:.2e} x max|y| > {TOL[dtype]:.0e} ({dtype})"
