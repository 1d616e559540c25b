"""GGUF block types decoded by jaxchunk.weights.gguf_quants: bit-exact against `gguf.quants`
(the `gguf` package's NumPy port of llama.cpp's reference dequantization, not this project's).

Random blocks (quant_cases.random_blocks) are random bytes everywhere except the f16 super-scales,
which are set to random finite f16 values (normal and subnormal, both signs): every bit pattern of
the quants, the packed 6-bit scales and the high-bit planes is reachable, so every decoding step is
exercised.
"""
from pathlib import Path

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize

from quant_cases import F16_FIELDS, gemma3_gguf_path, random_blocks
from jaxchunk.weights.gguf_quants import QUANT_TYPES, decode_blocks, dequantize_blocks

GEMMA3_TYPES = {"Q4_K", "Q5_0", "Q6_K", "Q8_0"}  # what gemma-3-270m-q4_k_m.gguf's matrices use


def test_table_covers_the_types_and_sizes_of_gguf():
    assert set(QUANT_TYPES) == set(F16_FIELDS)
    for name, t in QUANT_TYPES.items():
        assert (t.block_size, t.type_size) == GGML_QUANT_SIZES[Q[name]], name


@pytest.mark.parametrize("qtype", sorted(F16_FIELDS))
def test_random_blocks_bit_exact(qtype):
    blocks = random_blocks(qtype, rows=37, blocks_per_row=3 if QUANT_TYPES[qtype].block_size == 256 else 24)
    ref = dequantize(blocks, Q[qtype])
    got = dequantize_blocks(qtype, blocks)
    assert got.dtype == np.float32 and got.shape == ref.shape
    assert np.array_equal(got.view(np.uint32), ref.astype(np.float32).view(np.uint32))  # bits, -0.0 too
    # Decoded codes stay within the type's stated range, and every code of it occurs.
    codes = decode_blocks(qtype, blocks).codes
    lo, hi = QUANT_TYPES[qtype].code_range
    assert codes.dtype == np.int8 and codes.min() == lo and codes.max() == hi


@pytest.mark.parametrize("qtype", sorted(GEMMA3_TYPES))
def test_random_blocks_into_transposed_output_in_chunks(qtype):
    blocks = random_blocks(qtype, rows=50, blocks_per_row=2 if QUANT_TYPES[qtype].block_size == 256 else 16, seed=1)
    ref = dequantize(blocks, Q[qtype])
    out = np.full(ref.shape[::-1], np.nan, np.float32)  # C-contiguous [cols, rows]
    dequantize_blocks(qtype, blocks, out.T, chunk_rows=7)  # chunks that do not divide the rows
    assert np.array_equal(out.T, ref)


def test_scales_are_exact_products():
    """The k-quants' group scales d * sc are exact in float32 (what lets the resident weights keep
    them as f32 with no rounding): checked in float64."""
    blocks = random_blocks("Q4_K", rows=4, blocks_per_row=4, seed=2)
    c = decode_blocks("Q4_K", blocks)
    d = blocks.reshape(-1, 144)[:, 0:2].copy().view(np.float16)[:, 0].astype(np.float64)
    packed = blocks.reshape(-1, 144)[:, 4:16]
    sc = np.concatenate([packed[:, 0:4] & 63, (packed[:, 8:12] & 15) | ((packed[:, 0:4] >> 2) & 48)], axis=1)
    np.testing.assert_array_equal(c.scales.reshape(-1, 8).astype(np.float64), d[:, None] * sc)


def test_bad_row_length():
    with pytest.raises(ValueError, match="144-byte blocks"):
        decode_blocks("Q4_K", np.zeros((2, 100), np.uint8))


# --- the real file -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gemma3_gguf() -> Path:
    return gemma3_gguf_path()


@pytest.mark.model
@pytest.mark.slow
def test_gemma3_every_tensor_bit_exact(gemma3_gguf):
    from gguf import GGUFReader

    from jaxchunk.weights.gguf import dequantize_raw, open_gguf
    ours = open_gguf(gemma3_gguf).tensors
    seen = set()
    for t in GGUFReader(gemma3_gguf).tensors:
        if t.name == "token_embd.weight":  # 168M values: compare a slice of rows (still every code path)
            raw = ours[t.name]
            rows = slice(100_000, 104_096)
            ref = dequantize(t.data[rows], t.tensor_type)
            got = dequantize_raw(raw._replace(blocks=raw.blocks[rows], shape=(4096, raw.shape[1])))
        else:
            ref = dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
            got = dequantize_raw(ours[t.name])
        assert np.array_equal(got, ref), t.name
        seen.add(t.tensor_type.name)
    assert GEMMA3_TYPES <= seen
