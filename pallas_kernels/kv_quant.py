"""Quantized KV-cache storage: quantize on write, dequantize on read (exllamav2's FP8 / Q8 / Q6 / Q4
caches), in plain `jnp` so the same read path traces in XLA and inside the Pallas kernels.

Formats, chosen by a `KVQuant` spec (see `KV_QUANTS`), along head_dim of each cached K/V vector:

- `f32`, `bf16`: plain floats.
- `fp8_e4m3`, `fp8_e5m2`: one float8 per element, saturated at the format's largest finite value,
  no scale. As in exllamav2's FP8 cache: a float format's *relative* error is the same at every
  magnitude of its normal range (e4m3: 2^-6..448, e5m2: 2^-14..57344), and K/V activations of
  Llama models sit well inside it, so a per-block scale would only buy back precision for values
  already too small to move an attention score (the study in experiments/cache_quant.py measures
  what the format costs).
- `q8`, `q6`, `q4`: symmetric integers in blocks of 32 elements with one float16 absmax scale per
  block, after a normalised Walsh-Hadamard rotation of each block (exllamav2 rotates the same way:
  it spreads an outlier over the block, so the scale is set by a typical value, not the outlier).
  `*_norot` are the same without the rotation.

      scale = fl16(max|x_block| / qmax),   qmax = 2^(bits-1) - 1     (127, 31, 7)
      code  = round(x / scale) + 2^(bits-1)  in [1, 2^bits - 1], unsigned
      x'    = (code - 2^(bits-1)) * scale         |x - x'| <= scale / 2 per element

  exllamav2 divides by 2^(bits-1) instead of qmax (one more level, clipping the positive
  absmax by one step); here every value in the block is representable, so the bound above holds
  without a clipping term (scale is rounded to float16 before dividing, so x / scale <= qmax(1 +
  2^-10) still rounds to qmax).

Storage of the integer formats, one uint8 array [..., head_dim * bits / 8] per K and V:
a b-bit code is split into fields of power-of-two widths (8 -> 8; 6 -> 4 + 2; 4 -> 4), low bits
first; each field packs 8 / width consecutive elements per byte, element t of a byte at bit
width * t, and the fields' byte arrays follow one another. Unpacking is shifts, masks and two-way
interleaves (`jnp.stack(..., axis=-1)` + reshape), which is what Triton can lower (tl.join).
Scales: float16 [..., head_dim / 32], beside the codes in the same cache pytree.

Sub-32-bit floats (bf16, fp8) are stored as their raw bits in uint16 / uint8 arrays (`KVQuant.dtype`)
and bitcast back on read: XLA:CPU has no native bf16/fp8 scatter and rewrites one into "convert the
whole cache to f32, scatter, convert back", a full copy of the cache per layer and step that would
defeat the donated in-place update. A bitcast is free on every backend (Triton: a register reinterpret).

Rotation: H = Hadamard(32) / sqrt(32) is symmetric and orthonormal, so H @ H = I (the rotation is
its own inverse) and (Hq).(Hk) = q.k. The kernels therefore never un-rotate the cache: they rotate
q, attend to the stored (rotated) K/V, and rotate the output once (sum_j p_j H v_j = H sum_j p_j v_j).

Keys and values may each have their own format (llama.cpp's --cache-type-k / --cache-type-v): an
attention op's `kv_quant` is one format for both or a (key format, value format) pair, see
`kv_quant_pair`. The rotation then follows each tensor: q is rotated iff the key format rotates,
the output iff the value format does.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

QUANT_BLOCK = 32  # elements of head_dim per scale and per Hadamard rotation
SCALE_DTYPE = jnp.float16


@dataclasses.dataclass(frozen=True)
class KVQuant:
    """How one cached K or V vector is stored (hashable: a static jit argument).

    name: the user-facing name (`KV_QUANTS` key).
    storage: the element format: "float32", "bfloat16", "float8_e4m3fn", "float8_e5m2", or
        "uint8" for packed integer codes (the array dtype is `dtype`).
    bits: bits per element in storage (scales not counted).
    block: elements of head_dim per float16 scale (integer formats), None for float formats.
    rotate: apply the normalised Walsh-Hadamard rotation over each block of 32 before quantizing.
    """

    name: str
    storage: str
    bits: int
    block: int | None = None
    rotate: bool = False

    def __post_init__(self):
        if self.packed:
            if self.block != QUANT_BLOCK or not 2 <= self.bits <= 8:
                raise ValueError(f"{self.name}: integer formats take 2..8 bits in blocks of {QUANT_BLOCK}")
        elif self.block is not None:
            raise ValueError(f"{self.name}: float formats ({self.storage}) take no scale block")
        if not self.packed and self.bits != 8 * jnp.dtype(self.storage).itemsize:
            raise ValueError(f"{self.name}: {self.storage} holds {8 * jnp.dtype(self.storage).itemsize} "
                             f"bits, not {self.bits}")

    @property
    def packed(self) -> bool:
        """Integer codes packed into uint8, with scales."""
        return self.storage == "uint8"

    @property
    def scaled(self) -> bool:
        return self.block is not None

    @property
    def element_dtype(self):
        """The float format of one element (uint8 for packed codes)."""
        return jnp.dtype(self.storage)

    @property
    def dtype(self):
        """dtype of the stored array: float32 as is; narrower floats as raw bits (uint16 / uint8)."""
        itemsize = self.element_dtype.itemsize
        return self.element_dtype if itemsize == 4 else jnp.dtype(f"uint{8 * itemsize}")

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1

    @property
    def fields(self) -> tuple[int, ...]:
        """Bit widths of the packed fields, low bits first (6 -> (4, 2)); () for float formats."""
        if not self.packed:
            return ()
        widths, rest = [], self.bits
        for w in (8, 4, 2, 1):
            if rest >= w:
                widths.append(w)
                rest -= w
        return tuple(widths)

    def check_head_dim(self, head_dim: int) -> None:
        if (self.packed or self.rotate) and head_dim % QUANT_BLOCK:
            raise ValueError(f"cache format {self.name!r} needs head_dim divisible by {QUANT_BLOCK}, "
                             f"got {head_dim}")

    def stored_dim(self, head_dim: int) -> int:
        """Last dimension of the stored array for vectors of `head_dim`."""
        self.check_head_dim(head_dim)
        return head_dim * self.bits // 8 if self.packed else head_dim

    def num_scales(self, head_dim: int) -> int:
        """Scales per vector (0 for float formats)."""
        self.check_head_dim(head_dim)
        return head_dim // self.block if self.scaled else 0

    def field_slices(self, head_dim: int) -> tuple[tuple[int, int], ...]:
        """(byte offset, byte count) of each packed field in a stored vector."""
        out, offset = [], 0
        for w in self.fields:
            out.append((offset, head_dim * w // 8))
            offset += head_dim * w // 8
        return tuple(out)

    def bytes_per_vector(self, head_dim: int) -> int:
        """Bytes one cached K (or V) vector of one head takes, scales included."""
        return (self.stored_dim(head_dim) * self.dtype.itemsize
                + self.num_scales(head_dim) * jnp.dtype(SCALE_DTYPE).itemsize)


def _q(name, bits, rotate):
    return KVQuant(name, "uint8", bits, QUANT_BLOCK, rotate)


KV_QUANTS: dict[str, KVQuant] = {
    "f32": KVQuant("f32", "float32", 32),
    "bf16": KVQuant("bf16", "bfloat16", 16),
    "fp8_e4m3": KVQuant("fp8_e4m3", "float8_e4m3fn", 8),
    "fp8_e5m2": KVQuant("fp8_e5m2", "float8_e5m2", 8),
    "q8": _q("q8", 8, True),
    "q6": _q("q6", 6, True),
    "q4": _q("q4", 4, True),
    "q8_norot": _q("q8_norot", 8, False),
    "q6_norot": _q("q6_norot", 6, False),
    "q4_norot": _q("q4_norot", 4, False),
}


def kv_quant_spec(kind) -> KVQuant:
    """A `KVQuant` from its name (a `KV_QUANTS` key) or a spec; ValueError listing the names."""
    if isinstance(kind, KVQuant):
        return kind
    if kind not in KV_QUANTS:
        raise ValueError(f"unknown KV cache format {kind!r}; choose one of {list(KV_QUANTS)}")
    return KV_QUANTS[kind]


def kv_quant_pair(kv_quant) -> tuple[KVQuant | None, KVQuant | None]:
    """(key format, value format) of an attention op's `kv_quant`: None (plain float K and V), one
    format for both (a `KVQuant` or its name), or a (keys, values) pair of them, either side None
    for plain floats. ValueError for anything else."""
    if isinstance(kv_quant, (tuple, list)):
        if len(kv_quant) != 2:
            raise ValueError(f"kv_quant pair must be (key format, value format), got {kv_quant!r}")
        k_quant, v_quant = kv_quant
    else:
        k_quant = v_quant = kv_quant
    return tuple(None if s is None else kv_quant_spec(s) for s in (k_quant, v_quant))


# ----------------------------------------------------------------------------- rotation
@functools.cache
def hadamard_matrix(n: int = QUANT_BLOCK) -> np.ndarray:
    """Normalised Walsh-Hadamard matrix [n, n] (Sylvester order), float64: symmetric, H @ H = I."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Hadamard size must be a power of two, got {n}")
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h / np.sqrt(n)


def rotate(x: jax.Array, spec: KVQuant | None) -> jax.Array:
    """The blockwise Hadamard rotation over the last axis [..., head_dim] when spec.rotate (its own
    inverse), else x unchanged. Computed in float32, returned in x's dtype."""
    if spec is None or not spec.rotate:
        return x
    *lead, d = x.shape
    spec.check_head_dim(d)
    h = jnp.asarray(hadamard_matrix(QUANT_BLOCK), jnp.float32)
    blocks = x.astype(jnp.float32).reshape(*lead, d // QUANT_BLOCK, QUANT_BLOCK)
    # HIGHEST: no TF32 on GPU, the rotation must stay an exact-to-rounding orthogonal map.
    out = jnp.einsum("...i,ij->...j", blocks, h, precision=lax.Precision.HIGHEST)
    return out.reshape(x.shape).astype(x.dtype)


# ----------------------------------------------------------------------------- packing
def _interleave(parts: list) -> jax.Array:
    """[p0, p1, ..., p(n-1)], each [..., m] -> [..., m * n] with out[..., n*j + t] = p_t[..., j].
    n a power of two; only two-way stacks on the last axis (Triton's tl.join)."""
    if len(parts) == 1:
        return parts[0]
    even, odd = _interleave(parts[0::2]), _interleave(parts[1::2])
    both = jnp.stack([even, odd], axis=-1)
    return both.reshape(*both.shape[:-2], both.shape[-2] * 2)


def pack_codes(codes: jax.Array, spec: KVQuant) -> jax.Array:
    """Unsigned codes [..., head_dim] (int, < 2^bits) -> uint8 [..., head_dim * bits / 8]."""
    codes = codes.astype(jnp.uint32)
    *lead, d = codes.shape
    out, shift = [], 0
    for w in spec.fields:
        per_byte = 8 // w
        field = (codes >> shift) & ((1 << w) - 1)
        field = field.reshape(*lead, d // per_byte, per_byte)
        byte = sum(field[..., t] << (w * t) for t in range(per_byte))
        out.append(byte.astype(jnp.uint8))
        shift += w
    return out[0] if len(out) == 1 else jnp.concatenate(out, axis=-1)


def unpack_fields(fields, spec: KVQuant) -> jax.Array:
    """The packed fields of `spec` (one uint8 array [..., head_dim * width / 8] each, as laid out by
    `field_slices`) -> int32 codes [..., head_dim]."""
    codes, shift = None, 0
    for w, byte in zip(spec.fields, fields):
        per_byte = 8 // w
        byte = byte.astype(jnp.int32)
        parts = [(byte >> (w * t)) & ((1 << w) - 1) for t in range(per_byte)]
        field = _interleave(parts) << shift
        codes = field if codes is None else codes | field
        shift += w
    return codes


def expand_scales(scales: jax.Array, block: int) -> jax.Array:
    """[..., n] -> [..., n * block] f32, each scale repeated over its block (broadcast + reshape)."""
    s = scales.astype(jnp.float32)
    s = jnp.broadcast_to(s[..., None], (*s.shape, block))
    return s.reshape(*s.shape[:-2], s.shape[-2] * block)


# ----------------------------------------------------------------------------- quantize / dequantize
def quantize(x: jax.Array, spec: KVQuant):
    """x [..., head_dim] (any float dtype) -> (stored [..., stored_dim] in spec.dtype,
    scales [..., head_dim / 32] float16, or None for float formats)."""
    x = rotate(x, spec).astype(jnp.float32) if spec.rotate else x
    if not spec.packed:
        element = spec.element_dtype
        if element.itemsize == 1:  # fp8: saturate (float8 e4m3fn has no inf, e5m2 would overflow)
            big = float(jnp.finfo(element).max)
            x = jnp.clip(x.astype(jnp.float32), -big, big)
        x = x.astype(element)
        return (x if element == spec.dtype else lax.bitcast_convert_type(x, spec.dtype)), None
    *lead, d = x.shape
    spec.check_head_dim(d)
    blocks = x.astype(jnp.float32).reshape(*lead, d // spec.block, spec.block)
    absmax = jnp.max(jnp.abs(blocks), axis=-1)
    big = float(jnp.finfo(SCALE_DTYPE).max)
    scales = jnp.minimum(absmax / spec.qmax, big).astype(SCALE_DTYPE)
    s = scales.astype(jnp.float32)[..., None]
    # Round with the float16 scale actually stored, so dequantizing reproduces x to within s/2.
    q = jnp.round(blocks / jnp.where(s > 0, s, 1.0))
    q = jnp.clip(q, -spec.qmax, spec.qmax).astype(jnp.int32) + 2 ** (spec.bits - 1)
    return pack_codes(q.reshape(*lead, d), spec), scales


def dequantize_fields(fields, scales, spec: KVQuant, dtype=jnp.float32) -> jax.Array:
    """Packed fields (see `unpack_fields`) and scales [..., head_dim / 32] -> values
    [..., head_dim] in `dtype`, still in the stored (rotated) basis. The kernels' read path."""
    codes = unpack_fields(fields, spec) - 2 ** (spec.bits - 1)
    return (codes.astype(jnp.float32) * expand_scales(scales, spec.block)).astype(dtype)


def float_values(stored: jax.Array, spec: KVQuant, dtype=jnp.float32) -> jax.Array:
    """A float format's stored array (raw bits for bf16 / fp8) -> its values in `dtype`."""
    if stored.dtype != spec.element_dtype:
        stored = lax.bitcast_convert_type(stored, spec.element_dtype)
    return stored.astype(dtype)


def dequantize(stored: jax.Array, scales, spec: KVQuant, dtype=jnp.float32) -> jax.Array:
    """stored [..., stored_dim] (+ scales) -> values [..., head_dim] in `dtype`, in the stored
    basis (rotated when spec.rotate: attend with a rotated q, see the module docstring)."""
    if not spec.packed:
        return float_values(stored, spec, dtype)
    head_dim = stored.shape[-1] * 8 // spec.bits
    fields = [lax.slice_in_dim(stored, off, off + n, axis=-1)
              for off, n in spec.field_slices(head_dim)]
    return dequantize_fields(fields, scales, spec, dtype)


def decode(stored: jax.Array, scales, spec: KVQuant, dtype=jnp.float32) -> jax.Array:
    """What the cache holds, in the original basis: dequantize, then undo the rotation."""
    return rotate(dequantize(stored, scales, spec, jnp.float32), spec).astype(dtype)


def fake_quantize(x: jax.Array, spec: KVQuant) -> jax.Array:
    """x through the cache and back (quantize, then decode), in x's dtype: the K/V a quantized
    cache gives attention. [..., head_dim] -> [..., head_dim]."""
    return decode(*quantize(x, spec), spec, x.dtype)


# ----------------------------------------------------------------------------- checks
def check_stored(spec: KVQuant | None, head_dim: int, x, scales, name: str) -> None:
    """One cached tensor (`name`: "k" or "v") as stored in `spec` against q's head_dim; ValueError
    naming the problem. x: [..., max_seq, kv_heads, stored_dim]; scales: [..., head_dim / 32]."""
    scales_name = f"{name}_scales"
    if spec is None:
        if x.shape[-1] != head_dim:
            raise ValueError(f"batch/head_dim mismatch: q head_dim {head_dim}, {name} {x.shape}")
        if scales is not None:
            raise ValueError(f"{scales_name} given without a kv_quant format for {name}")
        return
    stored = spec.stored_dim(head_dim)
    if x.shape[-1] != stored or x.dtype != spec.dtype:
        raise ValueError(f"cache format {spec.name!r} stores {spec.dtype} [..., {stored}] for "
                         f"head_dim {head_dim}; got {name} {x.dtype}{list(x.shape)}")
    if not spec.scaled:
        if scales is not None:
            raise ValueError(f"cache format {spec.name!r} has no scales, but {scales_name} was given")
        return
    want = (*x.shape[:-1], spec.num_scales(head_dim))
    if scales is None or tuple(scales.shape) != want:
        raise ValueError(f"cache format {spec.name!r} needs {scales_name} of shape {list(want)}, got "
                         f"{None if scales is None else list(scales.shape)}")


def check_quantized_cache(kv_quant, head_dim: int, k, v, k_scales, v_scales) -> None:
    """Shapes of a (possibly quantized) cache against q's head_dim; ValueError naming the problem.
    kv_quant: see `kv_quant_pair`. k, v: [..., max_seq, kv_heads, stored_dim] (stored_dim per
    format); scales: [..., max_seq, kv_heads, head_dim / 32] for the integer formats."""
    k_quant, v_quant = kv_quant_pair(kv_quant)
    if k.shape[:-1] != v.shape[:-1]:
        raise ValueError(f"k and v must hold the same positions and heads: k {k.shape}, v {v.shape}")
    check_stored(k_quant, head_dim, k, k_scales, "k")
    check_stored(v_quant, head_dim, v, v_scales, "v")
