"""GGUF block quantization types decoded in NumPy: every block of every type as integer codes
with one float32 scale (and min) per group of 16 or 32 weights.

All the types this project reads (legacy Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0 and the k-quants
Q2_K / Q3_K / Q4_K / Q5_K / Q6_K) dequantize as

    w = scale[group] * code (+ min[group])           code: a small integer (int8), float32 math

where scale / min are the file's f16 block scales, or for the k-quants the super-block's f16
d / dmin times a sub-block's 4 / 6 / 8-bit scale / min, i.e. float32 products that are exact
(<= 19 significant bits). scale * code is exact too (<= 21 bits), so the only rounding is the
add of min: the same single rounding as `gguf.quants` (llama.cpp's reference) performs, which
makes `dequantize_blocks` bit-identical to it (tests/test_gguf_quants.py checks every type).

The decoded form is shared by the dequantizing loader (`dequantize_blocks`) and by the resident
quantized weights (`jaxchunk.weights.quantized.pack_codes`, which stores the codes as 4 or 8 bits
and the scales as f16 where that is exact, f32 otherwise).

Block layouts (bytes; all little-endian; QK_K = 256 weights per super-block):

    Q4_0 (18 / 32)  d f16 | 16 B nibbles          code = q - 8
    Q4_1 (20 / 32)  d f16 | m f16 | 16 B nibbles  code = q, min = m
    Q5_0 (22 / 32)  d f16 | qh u32 | 16 B         code = (q | h << 4) - 16
    Q5_1 (24 / 32)  d f16 | m f16 | qh u32 | 16 B code = q | h << 4, min = m
    Q8_0 (34 / 32)  d f16 | 32 x int8
    Q2_K (84 / 256) 16 B scales (4-bit sc | 4-bit m) | 64 B 2-bit q | d | dmin    groups of 16
    Q3_K (110/256)  32 B hmask | 64 B 2-bit q | 12 B 6-bit scales | d              groups of 16
    Q4_K (144/256)  d | dmin | 12 B 6-bit scales / mins | 128 B nibbles            groups of 32
    Q5_K (176/256)  d | dmin | 12 B scales / mins | 32 B high bits | 128 B nibbles groups of 32
    Q6_K (210/256)  128 B low nibbles | 64 B 2-bit highs | 16 x int8 scales | d    groups of 16

(Within a block, nibble j / 16 + j of the legacy types share byte j; the k-quants' element
orders are those of `gguf.quants`, followed here step by step.)
"""
from __future__ import annotations

import dataclasses
from typing import Callable, NamedTuple, Optional

import numpy as np

QK_K = 256


class BlockCodes(NamedTuple):
    """A tensor's blocks decoded: w = scales * codes (+ mins), per group of `group` along a row.

    codes: int8 [rows, cols]; scales, mins: float32 [rows, cols // group] (mins None for types
    without one).
    """

    codes: np.ndarray
    scales: np.ndarray
    mins: Optional[np.ndarray]
    group: int


@dataclasses.dataclass(frozen=True)
class QuantType:
    """One GGUF block type: sizes, the range of its codes, and its decoder.

    decode: uint8 [n, type_size] blocks -> (codes int8 [n, block_size],
            scales f32 [n, block_size // group], mins f32 [n, block_size // group] or None).
    """

    name: str
    block_size: int       # weights per block
    type_size: int        # bytes per block
    group: int            # weights per scale (and min)
    code_range: tuple[int, int]  # inclusive
    has_mins: bool
    decode: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]]


def _f16(b: np.ndarray) -> np.ndarray:
    """uint8 [..., 2] -> float32 [...] (an f16 read from its two bytes)."""
    return np.ascontiguousarray(b).view(np.float16)[..., 0].astype(np.float32)


def _bits(b: np.ndarray) -> np.ndarray:
    """uint8 [n, bytes] -> uint8 [n, 8 * bytes] of 0 / 1, bit j of the little-endian word at j."""
    return np.unpackbits(b, axis=-1, bitorder="little")


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """uint8 [n, 16] -> [n, 32]: the low nibbles of bytes 0..15, then their high nibbles."""
    return np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=-1)


def _q4_0(b):
    return (_nibbles(b[:, 2:]).view(np.int8) - np.int8(8)), _f16(b[:, 0:2])[:, None], None


def _q4_1(b):
    return _nibbles(b[:, 4:]).view(np.int8), _f16(b[:, 0:2])[:, None], _f16(b[:, 2:4])[:, None]


def _q5_0(b):
    q = _nibbles(b[:, 6:]) | (_bits(b[:, 2:6]) << np.uint8(4))
    return q.view(np.int8) - np.int8(16), _f16(b[:, 0:2])[:, None], None


def _q5_1(b):
    q = _nibbles(b[:, 8:]) | (_bits(b[:, 4:8]) << np.uint8(4))
    return q.view(np.int8), _f16(b[:, 0:2])[:, None], _f16(b[:, 2:4])[:, None]


def _q8_0(b):
    return np.ascontiguousarray(b[:, 2:]).view(np.int8), _f16(b[:, 0:2])[:, None], None


def _q2_k(b):
    n = b.shape[0]
    scales, qs, d, dmin = b[:, :16], b[:, 16:80], _f16(b[:, 80:82]), _f16(b[:, 82:84])
    shift = np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)
    q = ((qs.reshape(n, 2, 1, 32) >> shift) & np.uint8(3)).reshape(n, QK_K)
    return (q.view(np.int8), d[:, None] * (scales & np.uint8(0x0F)).astype(np.float32),
            -(dmin[:, None] * (scales >> np.uint8(4)).astype(np.float32)))


def _q3_k(b):
    n = b.shape[0]
    hmask, qs, packed, d = b[:, :32], b[:, 32:96], b[:, 96:108], _f16(b[:, 108:110])
    low = (packed[:, :8].reshape(n, 1, 8) >> np.array([0, 4], np.uint8).reshape(1, 2, 1)).reshape(n, 16)
    high = (packed[:, 8:].reshape(n, 1, 4) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 4, 1)).reshape(n, 16)
    sc = ((low & np.uint8(0x0F)) | ((high & np.uint8(0x03)) << np.uint8(4))).view(np.int8) - np.int8(32)
    ql = (qs.reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & np.uint8(3)
    qh = (hmask.reshape(n, 1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 1, 8, 1)) & np.uint8(1)
    # A set hmask bit means no offset: q = low 2 bits - 4 * (1 - bit).
    q = ql.reshape(n, QK_K).view(np.int8) - ((qh.reshape(n, QK_K) ^ np.uint8(1)) << np.uint8(2)).view(np.int8)
    return q, d[:, None] * sc.astype(np.float32), None


def _k_scale_min(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K / Q5_K's 12 bytes -> 8 six-bit scales and 8 six-bit mins (uint8 [n, 8] each)."""
    n = packed.shape[0]
    d, m, md = np.split(packed.reshape(n, 3, 4), 3, axis=1)
    sc = np.concatenate([d & np.uint8(0x3F), (md & np.uint8(0x0F)) | ((d >> np.uint8(2)) & np.uint8(0x30))], -1)
    mn = np.concatenate([m & np.uint8(0x3F), (md >> np.uint8(4)) | ((m >> np.uint8(2)) & np.uint8(0x30))], -1)
    return sc.reshape(n, 8), mn.reshape(n, 8)


def _k_nibbles(qs: np.ndarray) -> np.ndarray:
    """Q4_K / Q5_K's 128 bytes -> [n, 256]: sub-block 2c is the low nibbles of bytes 32c..32c+31,
    sub-block 2c + 1 their high nibbles."""
    n = qs.shape[0]
    shift = np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    return ((qs.reshape(n, 4, 1, 32) >> shift) & np.uint8(0x0F)).reshape(n, QK_K)


def _q4_k(b):
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, mn = _k_scale_min(b[:, 4:16])
    return (_k_nibbles(b[:, 16:]).view(np.int8), d[:, None] * sc.astype(np.float32),
            -(dmin[:, None] * mn.astype(np.float32)))


def _q5_k(b):
    n = b.shape[0]
    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, mn = _k_scale_min(b[:, 4:16])
    qh = (b[:, 16:48].reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & np.uint8(1)
    q = _k_nibbles(b[:, 48:]) | (qh.reshape(n, QK_K) << np.uint8(4))
    return q.view(np.int8), d[:, None] * sc.astype(np.float32), -(dmin[:, None] * mn.astype(np.float32))


def _q6_k(b):
    n = b.shape[0]
    ql, qh, sc, d = b[:, :128], b[:, 128:192], b[:, 192:208].view(np.int8), _f16(b[:, 208:210])
    low = (ql.reshape(n, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)) & np.uint8(0x0F)
    high = (qh.reshape(n, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & np.uint8(3)
    q = (low.reshape(n, QK_K) | (high.reshape(n, QK_K) << np.uint8(4))).view(np.int8) - np.int8(32)
    return q, d[:, None] * sc.astype(np.float32), None


QUANT_TYPES: dict[str, QuantType] = {t.name: t for t in (
    QuantType("Q4_0", 32, 18, 32, (-8, 7), False, _q4_0),
    QuantType("Q4_1", 32, 20, 32, (0, 15), True, _q4_1),
    QuantType("Q5_0", 32, 22, 32, (-16, 15), False, _q5_0),
    QuantType("Q5_1", 32, 24, 32, (0, 31), True, _q5_1),
    QuantType("Q8_0", 32, 34, 32, (-128, 127), False, _q8_0),
    QuantType("Q2_K", QK_K, 84, 16, (0, 3), True, _q2_k),
    QuantType("Q3_K", QK_K, 110, 16, (-4, 3), False, _q3_k),
    QuantType("Q4_K", QK_K, 144, 32, (0, 15), True, _q4_k),
    QuantType("Q5_K", QK_K, 176, 32, (0, 31), True, _q5_k),
    QuantType("Q6_K", QK_K, 210, 16, (-32, 31), False, _q6_k),
)}
"""Every block type decoded here, by GGML type name: the one table the loader dequantizes with."""


def decode_blocks(qtype: str, blocks: np.ndarray) -> BlockCodes:
    """A tensor's rows of blocks `blocks` uint8 [rows, bytes per row] (RawTensor.blocks of a 2-D
    tensor) of type `qtype` -> its BlockCodes ([rows, cols] codes, per-group scales / mins)."""
    t = QUANT_TYPES[qtype]
    rows, row_bytes = blocks.shape
    if row_bytes % t.type_size:
        raise ValueError(f"{qtype} rows are whole {t.type_size}-byte blocks, got {row_bytes} bytes")
    nb = row_bytes // t.type_size
    codes, scales, mins = t.decode(np.ascontiguousarray(blocks, np.uint8).reshape(rows * nb, t.type_size))
    cols = nb * t.block_size
    return BlockCodes(codes.reshape(rows, cols), scales.reshape(rows, cols // t.group),
                      None if mins is None else mins.reshape(rows, cols // t.group), t.group)


def dequantize_codes(c: BlockCodes, out: Optional[np.ndarray] = None) -> np.ndarray:
    """float32 [rows, cols] = scales * codes (+ mins), written into `out` if given."""
    rows, cols = c.codes.shape
    shape = (rows, cols // c.group, c.group)
    out = np.empty((rows, cols), np.float32) if out is None else out
    blocked = out.reshape(shape)
    np.multiply(c.codes.reshape(shape), c.scales[..., None], out=blocked)
    if c.mins is not None:
        np.add(blocked, c.mins[..., None], out=blocked)
    return out


def dequantize_blocks(qtype: str, blocks: np.ndarray, out: Optional[np.ndarray] = None,
                      chunk_rows: int = 4096) -> np.ndarray:
    """float32 [rows, cols] of blocks uint8 [rows, bytes per row] of type `qtype` (a key of
    QUANT_TYPES), bit-identical to `gguf.quants.dequantize`. Decoded `chunk_rows` rows at a time,
    so the temporaries stay a few MB; written into `out` [rows, cols] if given, or into the
    transposed view of a C-contiguous [cols, rows] array (`out=a.T`)."""
    t = QUANT_TYPES[qtype]
    rows = blocks.shape[0]
    cols = blocks.shape[1] // t.type_size * t.block_size
    if out is None:
        out = np.empty((rows, cols), np.float32)
    if out.shape != (rows, cols) or out.dtype != np.float32:
        raise ValueError(f"cannot dequantize {qtype} [{rows}, {cols}] into {out.dtype} {out.shape}")
    contiguous = out.flags.c_contiguous
    for r in range(0, rows, chunk_rows):
        c = decode_blocks(qtype, blocks[r:r + chunk_rows])
        if contiguous:
            dequantize_codes(c, out[r:r + chunk_rows])
        else:
            out[r:r + chunk_rows] = dequantize_codes(c)
    return out
