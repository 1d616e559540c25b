"""GGUF (llama.cpp) loader: metadata -> LlamaConfig, tensors -> the params pytree.

The container is parsed by `gguf_file.read_gguf` (memory-mapped; the `gguf` package's
`GGUFReader` takes seconds on a tokenizer's metadata), dequantization is `gguf.quants`'s; this
module adds what llama.cpp's format leaves to the reader:

* the config, read entirely from `{arch}.*` / `tokenizer.ggml.*` metadata;
* layout: GGUF stores a linear weight as ne=[in, out], i.e. NumPy [out, in]; params want
  [in, out], stacked over layers (done by `convert.assemble_params`);
* llama.cpp's converter permutes the rows of Q and K of a llama (per head, from Hugging Face's
  rotate-half order to interleaved pairs); `unpermute_qk` undoes it. Gemma 3's are not permuted
  (llama.cpp runs it with NEOX, i.e. rotate-half, RoPE);
* Gemma 3 (`gemma3.*`): what llama.cpp fixes for the architecture rather than storing (the
  sliding-window pattern, the local RoPE base, the attention scale) is read from the optional keys
  newer converters write, defaulting to llama.cpp's values (`GEMMA3_DEFAULTS`);
* every failure as a jaxchunk error naming the file, the tensor or key, and the problem.

`load_gguf_raw` exposes the still-quantized blocks, for a quantized-matmul path;
`open_gguf` + `gguf_field` / `config_from_gguf` / `raw_tensors` read a file without loading it
(shared with the tokenizer and `jaxchunk.weights.inspect`).
"""
from __future__ import annotations

import collections
import math
import os
import struct
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType, LlamaFileType
from gguf.quants import dequantize as _gguf_dequantize

from jaxchunk.config import LlamaConfig, RopeScaling
from jaxchunk.errors import ModelFileError, UnsupportedError
from jaxchunk.weights.convert import LINEAR_KEYS, aligned_empty, assemble_params, check_tensors, expected_keys
from jaxchunk.weights.gguf_file import GGUFFile, RawTensor, read_gguf
from jaxchunk.weights.gguf_quants import QUANT_TYPES, dequantize_blocks

PathLike = Union[str, os.PathLike]

SUPPORTED_VERSIONS = (2, 3)
# Tensor types the loader dequantizes: the floats, and every block type of gguf_quants.QUANT_TYPES
# (decoded there, bit-identical to gguf.quants). Others (IQ*, TQ*, ...) are refused.
SUPPORTED_QTYPES = frozenset(GGMLQuantizationType[n] for n in ("F32", "F16", "BF16", *QUANT_TYPES))

# params key -> llama.cpp tensor name (layer keys get a "blk.{i}." prefix).
GGUF_NAMES = {
    "embed": "token_embd.weight", "final_norm": "output_norm.weight", "lm_head": "output.weight",
    "attn_norm": "attn_norm.weight", "wq": "attn_q.weight", "wk": "attn_k.weight",
    "wv": "attn_v.weight", "wo": "attn_output.weight", "mlp_norm": "ffn_norm.weight",
    "w_gate": "ffn_gate.weight", "w_up": "ffn_up.weight", "w_down": "ffn_down.weight",
    # Gemma 3's extra norms (the converter stores Gemma's (1 + w) already: used as plain weights).
    "q_norm": "attn_q_norm.weight", "k_norm": "attn_k_norm.weight",
    "post_attn_norm": "post_attention_norm.weight", "post_mlp_norm": "post_ffw_norm.weight",
}

ARCHITECTURES = ("llama", "gemma3")

GEMMA3_DEFAULTS = {
    # llama.cpp llama-model.cpp, LLM_ARCH_GEMMA3: set_swa_pattern(6) (layer il is global iff
    # il % 6 == 5), rope_freq_base_train_swa = 10000, f_attention_scale = 1/sqrt(key_length)
    # (1/sqrt(hidden / heads) for the 62-layer 27B); a file may state the first two.
    "attention.sliding_window_pattern": 6,
    "rope.freq_base_swa": 10000.0,
}


def gguf_tensor_name(key: str, layer: Optional[int]) -> str:
    """llama.cpp's name for params key `key` of `layer` (None for embed/final_norm/lm_head)."""
    return GGUF_NAMES[key] if layer is None else f"blk.{layer}.{GGUF_NAMES[key]}"


def open_gguf(path: PathLike) -> GGUFFile:
    """The parsed, memory-mapped GGUF at `path` (see `gguf_file`), with every way the file can be
    bad turned into ModelFileError (not a GGUF, truncated, corrupt) or UnsupportedError (version,
    byte order). Nothing is read beyond the metadata and tensor table until a tensor is used."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such GGUF file")
    with open(path, "rb") as f:
        head = f.read(8)
    if len(head) < 8:
        raise ModelFileError(f"{path}: truncated GGUF ({len(head)} bytes, not even a header)")
    if head[:4] != b"GGUF":
        raise ModelFileError(f"{path}: not a GGUF file (starts with {head[:4]!r}, expected b'GGUF')")
    version = struct.unpack("<I", head[4:])[0]
    if version & 0xFFFF == 0:  # written on a big-endian machine: the reader would byte-swap
        raise UnsupportedError(f"{path}: big-endian GGUF files are not supported")
    if version not in SUPPORTED_VERSIONS:
        raise UnsupportedError(f"{path}: GGUF version {version} is not supported "
                               f"(supported: {', '.join(map(str, SUPPORTED_VERSIONS))})")
    try:
        return read_gguf(path)
    except Exception as e:  # struct.error, ValueError (bad enum values, overruns), UnicodeDecodeError
        size = path.stat().st_size
        raise ModelFileError(f"{path}: corrupt or truncated GGUF ({size} bytes), or one the gguf "
                             f"package cannot read: {type(e).__name__}: {e}") from e


_INT_TYPES = frozenset({GGUFValueType.UINT8, GGUFValueType.INT8, GGUFValueType.UINT16, GGUFValueType.INT16,
                        GGUFValueType.UINT32, GGUFValueType.INT32, GGUFValueType.UINT64, GGUFValueType.INT64})
# What `gguf_field` accepts as each kind: the value types a field may have ([ARRAY, item] for lists).
_KIND_TYPES = {
    int: lambda types: len(types) == 1 and types[0] in _INT_TYPES,
    float: lambda types: tuple(types) in ((GGUFValueType.FLOAT32,), (GGUFValueType.FLOAT64,)),
    str: lambda types: tuple(types) == (GGUFValueType.STRING,),
    bool: lambda types: tuple(types) == (GGUFValueType.BOOL,),
    list[str]: lambda types: tuple(types) == (GGUFValueType.ARRAY, GGUFValueType.STRING),
    list[int]: lambda types: len(types) == 2 and types[0] == GGUFValueType.ARRAY and types[1] in _INT_TYPES,
}


def gguf_field(reader, path: PathLike, key: str, kind: type, default: Any = ...) -> Any:
    """Metadata value `key` of `reader` (a `GGUFFile`, or anything with `GGUFReader.get_field`'s
    answers) as `kind`: int, float, str, bool, list[str] or list[int]. `default` if the key is
    absent and a default is given; ModelFileError naming `path` and the key if it is absent
    otherwise, or stored as another type."""
    field = reader.get_field(key)
    if field is None:
        if default is ...:
            raise ModelFileError(f"{path}: missing metadata key {key!r}")
        return default
    types = list(field.types)
    if not _KIND_TYPES[kind](types):
        stored = "[".join(getattr(t, "name", str(t)) for t in types) + "]" * (len(types) - 1)
        if kind in (list[str], list[int]):
            raise ModelFileError(f"{path}: metadata key {key!r} is not a {kind} (it has type {stored})")
        raise ModelFileError(f"{path}: metadata key {key!r} has type {stored}, expected {kind.__name__}")
    value = field.contents()
    if kind in (list[str], list[int]):
        return list(value)
    if types == [GGUFValueType.FLOAT32]:
        # Shortest decimal that rounds to the stored float32: 1e-05, not 9.999999747378752e-06.
        value = float(str(np.float32(value)))
    return kind(value)


def raw_tensors(gguf: GGUFFile) -> dict[str, RawTensor]:
    """Every tensor of an open GGUF, still quantized: name -> RawTensor (views, no copies)."""
    return dict(gguf.tensors)


def load_gguf_raw(path: PathLike) -> dict[str, RawTensor]:
    """Every tensor of the GGUF at `path`, still quantized: name -> RawTensor (no copies)."""
    return raw_tensors(open_gguf(path))


def _check_qtype(raw: RawTensor, path) -> None:
    if GGMLQuantizationType[raw.qtype] not in SUPPORTED_QTYPES:
        raise UnsupportedError(f"{path}: tensor {raw.name!r} has type {raw.qtype}; supported: "
                               f"{', '.join(sorted(q.name for q in SUPPORTED_QTYPES))}")


# Bytes of one 32-weight block of the types `dequantize_blocks_into` writes straight into a
# (transposed) output: one pass over the packed bytes, no per-chunk temporaries.
_BLOCK_BYTES = {name: QUANT_TYPES[name].type_size for name in ("Q4_0", "Q4_1", "Q8_0")}


def dequantize_raw(raw: RawTensor, path: PathLike = "<gguf>", transpose: bool = False) -> np.ndarray:
    """float32 array of `raw.shape` (file layout: [out, in]), or with `transpose` of the reversed
    shape ([in, out], C-contiguous: params orientation, built directly rather than by a copy).

    Block types are dequantized by `gguf_quants.dequantize_blocks` (one table, QUANT_TYPES, every
    type vectorised over the whole tensor and bit-identical to gguf.quants), Q4_0 / Q4_1 / Q8_0
    matrices by `dequantize_blocks_into` (the same values, one pass straight into the output);
    F32 / F16 / BF16 by a cast.
    """
    _check_qtype(raw, path)
    if transpose and len(raw.shape) != 2:
        raise ValueError(f"transpose takes a 2-D tensor, {raw.name!r} is {raw.shape}")
    shape = raw.shape[::-1] if transpose else raw.shape
    if raw.qtype in _BLOCK_BYTES and len(raw.shape) == 2:
        return dequantize_blocks_into(raw, aligned_empty(shape), transpose)
    if raw.qtype in QUANT_TYPES:
        out = aligned_empty(shape)
        rows_view = out.T if transpose else out.reshape(-1, raw.shape[-1])
        dequantize_blocks(raw.qtype, raw.blocks.reshape(-1, raw.blocks.shape[-1]), rows_view)
        return out
    if raw.qtype in ("F32", "F16"):
        w = raw.blocks.view(np.float32 if raw.qtype == "F32" else np.float16).reshape(raw.shape)
    else:  # BF16
        w = np.asarray(_gguf_dequantize(raw.blocks, GGMLQuantizationType[raw.qtype]),
                       dtype=np.float32).reshape(raw.shape)
    w = w.T if transpose else w
    # Always a copy: a view of the file (an F32 tensor, contiguous) would be adopted by device_put
    # and keep the whole mmap, and every page of it read while loading, resident for the model's
    # lifetime (SmolLM2 q4: 93 MB of RSS for its 2 KB final norm).
    return np.array(w, dtype=np.float32, order="C", copy=True)


def dequantize_blocks_into(raw: RawTensor, out: np.ndarray, transpose: bool) -> np.ndarray:
    """Dequantize a Q4_0 / Q4_1 / Q8_0 tensor [rows, in] into `out`: float32 [rows, in], or
    [in, rows] with `transpose` (C-contiguous, e.g. one layer of a stacked params array).

    Works in block layout [rows, nb, 32] (or [nb, 32, rows]): each quant is cast and scaled in one
    pass straight into `out` (then shifted, for Q4_1), so no other full-size array exists.
    Transposing happens on the packed bytes (1/8 or 1/4 of the output's size), never on floats.
    """
    rows, cols = raw.shape
    nb = cols // 32
    if raw.qtype not in _BLOCK_BYTES or out.dtype != np.float32 or not out.flags.c_contiguous or \
            out.shape != ((cols, rows) if transpose else (rows, cols)):
        raise ValueError(f"cannot dequantize {raw.qtype} {raw.shape} into {out.dtype} {out.shape}")
    blocks = raw.blocks.reshape(rows, nb, _BLOCK_BYTES[raw.qtype])
    scale = blocks[:, :, 0:2].copy().view(np.float16)[..., 0].astype(np.float32)  # d [rows, nb]
    shift = blocks[:, :, 2:4].copy().view(np.float16)[..., 0].astype(np.float32) if raw.qtype == "Q4_1" else None
    quants = blocks[:, :, 4:] if raw.qtype == "Q4_1" else blocks[:, :, 2:]     # [rows, nb, 16 or 32]
    if transpose:  # block axes first, rows last: [nb, bytes, rows]
        quants = np.ascontiguousarray(quants.transpose(1, 2, 0))
        scale, shift = scale.T[:, None, :], None if shift is None else shift.T[:, None, :]
        blocked = out.reshape(nb, 32, rows)
        lo, hi = blocked[:, :16], blocked[:, 16:]
    else:
        scale, shift = scale[..., None], None if shift is None else shift[..., None]
        blocked = out.reshape(rows, nb, 32)
        lo, hi = blocked[..., :16], blocked[..., 16:]
    # gguf.quants computes d * float32(q) (+ m); q -> float32 is exact, so casting inside the
    # multiply gives the same bits.
    if raw.qtype == "Q8_0":
        np.multiply(quants.view(np.int8), scale, out=blocked)
    else:  # weight j of a block is the low nibble of byte j, weight 16 + j its high nibble
        low, high = quants & np.uint8(0x0F), quants >> np.uint8(4)
        if raw.qtype == "Q4_0":  # d * (q - 8), q - 8 as int8 (exact)
            low, high = low.view(np.int8) - np.int8(8), high.view(np.int8) - np.int8(8)
        np.multiply(low, scale, out=lo)
        np.multiply(high, scale, out=hi)
    if shift is not None:
        np.add(blocked, shift, out=blocked)
    return out


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's row permutation of a Q or K weight [n_head * head_dim, ...] (floats, or
    a RawTensor's uint8 blocks: only whole rows move).

    llama.cpp's convert applies, per head, `w.reshape(n_head, 2, hd // 2, in).swapaxes(1, 2)`
    (rotate-half halves -> interleaved pairs); swapping back restores Hugging Face's order.
    `n_head` is num_heads for Q and num_kv_heads for K.
    """
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(theta: float, head_dim: int, s: RopeScaling) -> np.ndarray:
    """Per-frequency divisors [head_dim // 2] of Llama-3 RoPE scaling `s`: what llama.cpp's
    converter stores as `rope_freqs.weight` (1 for high frequencies, `s.factor` for low ones,
    a smooth blend between)."""
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)
    wavelen = 2 * np.pi / freqs
    orig = s.original_max_position_embeddings
    smooth = (orig / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    blend = 1 / ((1 - smooth) / s.factor + smooth)
    return np.where(wavelen < orig / s.high_freq_factor, 1.0,
                    np.where(wavelen > orig / s.low_freq_factor, s.factor, blend))


def _rope_scaling(reader: GGUFFile, path, arch: str, raw: dict[str, RawTensor],
                  theta: float, head_dim: int) -> Optional[RopeScaling]:
    if "rope_freqs.weight" in raw:
        # llama.cpp stores Llama-3 scaling as precomputed factors, not parameters. Take the
        # largest factor as `factor`, the other parameters as in every Llama 3.x release, and
        # accept that only if it reproduces every stored factor.
        factors = dequantize_raw(raw["rope_freqs.weight"], path).ravel()
        orig = gguf_field(reader, path, f"{arch}.rope.scaling.original_context_length", int, 8192)
        guess = RopeScaling(kind="llama3", factor=float(factors.max()),
                            original_max_position_embeddings=orig)
        if factors.shape == (head_dim // 2,) and np.allclose(
                factors, llama3_rope_factors(theta, head_dim, guess), rtol=1e-5):
            return guess
        raise UnsupportedError(f"{path}: tensor 'rope_freqs.weight' holds RoPE frequency factors "
                               f"that are not Llama-3 scaling with factor={guess.factor}, "
                               f"low/high_freq_factor=1/4, original context {orig}")
    kind = gguf_field(reader, path, f"{arch}.rope.scaling.type", str, "none")
    if kind == "none":
        return None
    if kind == "linear":
        return RopeScaling(kind="linear", factor=gguf_field(reader, path, f"{arch}.rope.scaling.factor", float))
    raise UnsupportedError(f"{path}: RoPE scaling type {kind!r} is not supported "
                           f"(supported: none, linear, Llama-3 rope_freqs)")


def config_from_gguf(reader: GGUFFile) -> LlamaConfig:
    """The LlamaConfig described by an open GGUF's `{arch}.*` metadata (and its tensor table:
    vocabulary size, tied embeddings, Llama-3 RoPE factors), every inconsistency as an error."""
    path, raw = reader.path, reader.tensors
    arch = gguf_field(reader, path, "general.architecture", str)
    if arch not in ARCHITECTURES:
        raise UnsupportedError(f"{path}: architecture {arch!r} is not supported "
                               f"(supported: {', '.join(ARCHITECTURES)})")
    if gguf_field(reader, path, f"{arch}.expert_count", int, 0) > 0:
        raise UnsupportedError(f"{path}: mixture-of-experts llama models are not supported")

    def get(key, kind, default=...):
        return gguf_field(reader, path, f"{arch}.{key}", kind, default)

    hidden, n_heads = get("embedding_length", int), get("attention.head_count", int)
    head_dim = get("attention.key_length", int, None) or (hidden // n_heads if n_heads else 0)
    if head_dim % 2:
        raise UnsupportedError(f"{path}: odd head_dim {head_dim} (RoPE needs pairs)")
    if get("attention.value_length", int, head_dim) != head_dim:
        raise UnsupportedError(f"{path}: attention.value_length != key_length is not supported")
    if get("rope.dimension_count", int, head_dim) != head_dim:
        raise UnsupportedError(f"{path}: partial rotary embeddings (rope.dimension_count "
                               f"{get('rope.dimension_count', int)} != head_dim {head_dim}) "
                               f"are not supported")
    embed = raw.get(GGUF_NAMES["embed"])
    if embed is None:
        raise ModelFileError(f"{path}: missing tensor {GGUF_NAMES['embed']!r}")
    vocab = embed.shape[0]
    if get("vocab_size", int, vocab) != vocab:
        raise ModelFileError(f"{path}: {arch}.vocab_size is {get('vocab_size', int)} but "
                             f"{GGUF_NAMES['embed']!r} has {vocab} rows")
    tokens = reader.get_field("tokenizer.ggml.tokens")
    if tokens is not None and len(tokens.contents()) > vocab:
        raise ModelFileError(f"{path}: tokenizer has {len(tokens.contents())} tokens but the "
                             f"embedding has only {vocab} rows")
    theta = get("rope.freq_base", float, 10000.0)
    variant = _gemma3_fields(get, path, hidden, n_heads, head_dim) if arch == "gemma3" else {}
    try:
        return LlamaConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=get("feed_forward_length", int),
            num_layers=get("block_count", int),
            num_heads=n_heads,
            num_kv_heads=get("attention.head_count_kv", int, n_heads),
            head_dim=head_dim,
            max_position_embeddings=get("context_length", int),
            rope_theta=theta,
            rms_norm_eps=get("attention.layer_norm_rms_epsilon", float),
            tie_word_embeddings=GGUF_NAMES["lm_head"] not in raw,
            rope_scaling=_rope_scaling(reader, path, arch, raw, theta, head_dim),
            bos_token_id=gguf_field(reader, path, "tokenizer.ggml.bos_token_id", int, None),
            eos_token_id=gguf_field(reader, path, "tokenizer.ggml.eos_token_id", int, None),
            architecture=arch,
            **variant,
        )
    except ValueError as e:  # LlamaConfig's own validation (zero sizes, bad GQA ratio)
        raise ModelFileError(f"{path}: inconsistent metadata: {e}") from None


def _gemma3_fields(get, path, hidden: int, n_heads: int, head_dim: int) -> dict:
    """The LlamaConfig fields of a Gemma 3 GGUF beyond Llama's (see `GEMMA3_DEFAULTS`)."""
    num_layers = get("block_count", int)
    window = get("attention.sliding_window", int)
    pattern = get("attention.sliding_window_pattern", int, GEMMA3_DEFAULTS["attention.sliding_window_pattern"])
    if window < 1 or pattern < 1:
        raise ModelFileError(f"{path}: gemma3 sliding window {window} / pattern {pattern} must be >= 1")
    # Gemma 3 27B (62 layers) scales queries by hidden / heads, the others by head_dim (llama.cpp).
    scalar = hidden // n_heads if num_layers == 62 else head_dim
    return dict(
        layer_windows=tuple(None if i % pattern == pattern - 1 else window for i in range(num_layers)),
        local_rope_theta=get("rope.freq_base_swa", float, GEMMA3_DEFAULTS["rope.freq_base_swa"]),
        qk_norm=True, sandwich_norms=True, mlp_activation="gelu_tanh",
        embed_scale=math.sqrt(hidden), query_pre_attn_scalar=float(scalar),
    )


def quantized_formats(config: LlamaConfig, raw: dict[str, RawTensor]) -> dict[str, tuple[Any, str]]:
    """The matrices a quantized load keeps quantized, as params key -> (ResidentFormat, label):
    every linear weight and the embedding whose layers are all stored in block types (any mix of
    them: the format is the one that holds them all, the label their names, "Q4_K+Q6_K")."""
    from jaxchunk.weights.quantized import QTYPES, resident_format  # imports JAX: only for quantized loads
    types: dict[str, set[str]] = collections.defaultdict(set)
    for key, layer in expected_keys(config):
        if key in LINEAR_KEYS or key == "embed":
            types[key].add(raw[gguf_tensor_name(key, layer)].qtype)
    return {key: (resident_format(sorted(found)), "+".join(sorted(found)))
            for key, found in types.items() if found <= set(QTYPES)}


def file_type_name(file_type: Optional[int]) -> str:
    """llama.cpp's name of a `general.file_type` id ("MOSTLY_Q4_1"), or the id itself if unknown."""
    try:
        return LlamaFileType(file_type).name
    except ValueError:
        return str(file_type)


def load_gguf(path: Union[PathLike, GGUFFile], dtype=np.float32,
              quantized: bool = False) -> tuple[LlamaConfig, dict, dict]:
    """Load a llama GGUF (a path, or a file `open_gguf` already opened, e.g. to read its tokenizer
    too) into `(config, params, metadata)`.

    params is the pytree documented in `jaxchunk.weights` (NumPy arrays of `dtype`, linear
    weights [in, out], Q/K rows in Hugging Face order); metadata is a small dict of strings:
    format, path, architecture, name, file_type, gguf_version, tensor_types.

    quantized=True keeps block-quantized matrices (the linear weights, and the embedding, which
    then becomes the LM head's [hidden, vocab] matrix) quantized, as
    `jaxchunk.weights.quantized.QuantizedWeight`s repacked from the file's blocks without
    dequantizing (`quantized_formats`: layers of different types share the layout that holds
    them all); a matrix kind with a float layer (F32 / F16 / BF16), and the norms, are dequantized
    to `dtype` as usual.
    """
    reader = path if isinstance(path, GGUFFile) else open_gguf(path)
    path, raw = reader.path, reader.tensors
    config = config_from_gguf(reader)
    check_tensors(path, config, gguf_tensor_name, {name: t.shape for name, t in raw.items()})
    for key, layer in expected_keys(config):  # fail before dequantizing anything
        _check_qtype(raw[gguf_tensor_name(key, layer)], path)
    keep = quantized_formats(config, raw) if quantized else {}

    def stored(key: str, layer: Optional[int]) -> RawTensor:
        """The tensor's blocks, Q/K rows already in Hugging Face order (whole rows of quant blocks
        move, before anything is dequantized)."""
        t = raw[gguf_tensor_name(key, layer)]
        if key in ("wq", "wk") and config.architecture == "llama":
            heads = config.num_heads if key == "wq" else config.num_kv_heads
            t = t._replace(blocks=unpermute_qk(t.blocks, heads))
        return t

    def load(key: str, layer: Optional[int]):
        t = stored(key, layer)
        if key in keep:
            return t
        if key in LINEAR_KEYS:  # dequantized straight into [in, out]; the .T hands back file orientation
            return dequantize_raw(t, path, transpose=True).T
        return dequantize_raw(t, path)

    def fill(key: str, layer: int, out: np.ndarray) -> bool:
        """Dequantize a Q4_0 / Q4_1 / Q8_0 layer matrix straight into its slot [in, out] of the stack."""
        if key in keep or key not in LINEAR_KEYS or raw[gguf_tensor_name(key, layer)].qtype not in _BLOCK_BYTES:
            return False
        if out.dtype == np.float32:
            dequantize_blocks_into(stored(key, layer), out, transpose=True)
        else:  # e.g. bf16: one rounding pass from float32, as np.asarray(w, dtype) does
            out[...] = dequantize_blocks_into(stored(key, layer), aligned_empty(out.shape), transpose=True)
        return True

    def pack(key: str, t):
        if key not in keep:
            return None
        from jaxchunk.weights.quantized import pack_gguf_rows
        # [out, in] rows -> W [in, out]. For the embedding [vocab, hidden] that is the LM head's
        # W [hidden, vocab], whose columns are the token rows.
        fmt, label = keep[key]
        return pack_gguf_rows(t.blocks, t.qtype, t.shape, fmt=fmt, label=label)

    params = assemble_params(config, gguf_tensor_name, load, dtype=dtype, path=path, pack=pack, fill=fill)
    file_type = gguf_field(reader, path, "general.file_type", int, None)
    metadata = {
        "format": "gguf",
        "path": str(path),
        "architecture": config.architecture,
        "name": gguf_field(reader, path, "general.name", str, ""),
        "file_type": file_type_name(file_type),
        "gguf_version": str(reader.version),
        "tensor_types": ",".join(f"{k}:{v}" for k, v in
                                 collections.Counter(t.qtype for t in raw.values()).most_common()),
    }
    return config, params, metadata
