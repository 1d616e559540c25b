"""GGUF (llama.cpp) loader: metadata -> LlamaConfig, tensors -> the params pytree.

Parsing and dequantization are the `gguf` package's (`GGUFReader`, `gguf.quants.dequantize`);
this module adds what llama.cpp's format leaves to the reader:

* the config, read entirely from `{arch}.*` / `tokenizer.ggml.*` metadata;
* layout: GGUF stores a linear weight as ne=[in, out], i.e. NumPy [out, in]; params want
  [in, out], stacked over layers (done by `convert.assemble_params`);
* llama.cpp's converter permutes the rows of Q and K (per head, from Hugging Face's
  rotate-half order to interleaved pairs); `unpermute_qk` undoes it;
* every failure as a jaxchunk error naming the file, the tensor or key, and the problem.

`load_gguf_raw` exposes the still-quantized blocks, for a quantized-matmul path.
"""
from __future__ import annotations

import collections
import os
import struct
from pathlib import Path
from typing import Any, NamedTuple, Optional, Union

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, LlamaFileType
from gguf.quants import dequantize as _gguf_dequantize

from jaxchunk.config import LlamaConfig, RopeScaling
from jaxchunk.errors import ModelFileError, UnsupportedError
from jaxchunk.weights.convert import LINEAR_KEYS, assemble_params, check_tensors, expected_keys

PathLike = Union[str, os.PathLike]

SUPPORTED_VERSIONS = (2, 3)
# Tensor types the loader dequantizes (all through gguf.quants). Others (IQ*, TQ*, ...) would
# dequantize too, but nothing in this project is checked against them.
SUPPORTED_QTYPES = frozenset(GGMLQuantizationType[n] for n in (
    "F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"))

# params key -> llama.cpp tensor name (layer keys get a "blk.{i}." prefix).
GGUF_NAMES = {
    "embed": "token_embd.weight", "final_norm": "output_norm.weight", "lm_head": "output.weight",
    "attn_norm": "attn_norm.weight", "wq": "attn_q.weight", "wk": "attn_k.weight",
    "wv": "attn_v.weight", "wo": "attn_output.weight", "mlp_norm": "ffn_norm.weight",
    "w_gate": "ffn_gate.weight", "w_up": "ffn_up.weight", "w_down": "ffn_down.weight",
}


def gguf_tensor_name(key: str, layer: Optional[int]) -> str:
    """llama.cpp's name for params key `key` of `layer` (None for embed/final_norm/lm_head)."""
    return GGUF_NAMES[key] if layer is None else f"blk.{layer}.{GGUF_NAMES[key]}"


class RawTensor(NamedTuple):
    """One tensor as stored: still quantized, a read-only view into the memory-mapped file.

    Blocks run along rows, so whole rows can be reordered without dequantizing: Q/K rows are
    in llama.cpp's permuted order here, and `unpermute_qk(blocks, n_head)` fixes that.
    """

    name: str
    qtype: str                 # GGML type name: "Q4_1", "Q8_0", "F32", ...
    shape: tuple[int, ...]     # logical shape in NumPy order: [out, in] for a linear weight
    blocks: np.ndarray         # uint8 [*shape[:-1], bytes per row]


def open_gguf(path: PathLike) -> GGUFReader:
    """A `GGUFReader` for `path`, with every way the file can be bad turned into
    ModelFileError (not a GGUF, truncated, corrupt) or UnsupportedError (version, byte order)."""
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
        return GGUFReader(path)
    except Exception as e:  # the reader signals bad input with assorted built-in errors
        size = path.stat().st_size
        raise ModelFileError(f"{path}: corrupt or truncated GGUF ({size} bytes), or one the gguf "
                             f"package cannot read: {type(e).__name__}: {e}") from e


def _field(reader: GGUFReader, path, key: str, kind: type, default: Any = ...) -> Any:
    """Metadata value `key` as `kind` (int, float, str or bool); `default` if absent and given."""
    field = reader.get_field(key)
    if field is None:
        if default is ...:
            raise ModelFileError(f"{path}: missing metadata key {key!r}")
        return default
    vtype = field.types[0] if field.types else None
    ok = {
        int: vtype in (GGUFValueType.UINT8, GGUFValueType.INT8, GGUFValueType.UINT16,
                       GGUFValueType.INT16, GGUFValueType.UINT32, GGUFValueType.INT32,
                       GGUFValueType.UINT64, GGUFValueType.INT64),
        float: vtype in (GGUFValueType.FLOAT32, GGUFValueType.FLOAT64),
        str: vtype == GGUFValueType.STRING,
        bool: vtype == GGUFValueType.BOOL,
    }[kind]
    if not ok:
        raise ModelFileError(f"{path}: metadata key {key!r} has type "
                             f"{getattr(vtype, 'name', vtype)}, expected {kind.__name__}")
    value = field.contents()
    if vtype == GGUFValueType.FLOAT32:
        # Shortest decimal that rounds to the stored float32: 1e-05, not 9.999999747378752e-06.
        value = float(str(np.float32(value)))
    return kind(value)


def _raw_tensor(t) -> RawTensor:
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # GGUF lists ne[0] (columns) first
    blocks = t.data.view(np.uint8)  # F32/F16 come back typed; quantized ones already as bytes
    return RawTensor(t.name, t.tensor_type.name, shape, blocks.reshape(*shape[:-1], -1))


def _raw_tensors(reader: GGUFReader) -> dict[str, RawTensor]:
    return {t.name: _raw_tensor(t) for t in reader.tensors}


def load_gguf_raw(path: PathLike) -> dict[str, RawTensor]:
    """Every tensor of the GGUF at `path`, still quantized: name -> RawTensor (no copies)."""
    return _raw_tensors(open_gguf(path))


def _check_qtype(raw: RawTensor, path) -> None:
    if GGMLQuantizationType[raw.qtype] not in SUPPORTED_QTYPES:
        raise UnsupportedError(f"{path}: tensor {raw.name!r} has type {raw.qtype}; supported: "
                               f"{', '.join(sorted(q.name for q in SUPPORTED_QTYPES))}")


def dequantize_raw(raw: RawTensor, path: PathLike = "<gguf>") -> np.ndarray:
    """float32 array of `raw.shape` (file layout: [out, in]), dequantized by gguf.quants."""
    _check_qtype(raw, path)
    qtype = GGMLQuantizationType[raw.qtype]
    return np.asarray(_gguf_dequantize(raw.blocks, qtype), dtype=np.float32).reshape(raw.shape)


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


def _rope_scaling(reader: GGUFReader, path, arch: str, raw: dict[str, RawTensor],
                  theta: float, head_dim: int) -> Optional[RopeScaling]:
    if "rope_freqs.weight" in raw:
        # llama.cpp stores Llama-3 scaling as precomputed factors, not parameters. Take the
        # largest factor as `factor`, the other parameters as in every Llama 3.x release, and
        # accept that only if it reproduces every stored factor.
        factors = dequantize_raw(raw["rope_freqs.weight"], path).ravel()
        orig = _field(reader, path, f"{arch}.rope.scaling.original_context_length", int, 8192)
        guess = RopeScaling(kind="llama3", factor=float(factors.max()),
                            original_max_position_embeddings=orig)
        if factors.shape == (head_dim // 2,) and np.allclose(
                factors, llama3_rope_factors(theta, head_dim, guess), rtol=1e-5):
            return guess
        raise UnsupportedError(f"{path}: tensor 'rope_freqs.weight' holds RoPE frequency factors "
                               f"that are not Llama-3 scaling with factor={guess.factor}, "
                               f"low/high_freq_factor=1/4, original context {orig}")
    kind = _field(reader, path, f"{arch}.rope.scaling.type", str, "none")
    if kind == "none":
        return None
    if kind == "linear":
        return RopeScaling(kind="linear", factor=_field(reader, path, f"{arch}.rope.scaling.factor", float))
    raise UnsupportedError(f"{path}: RoPE scaling type {kind!r} is not supported "
                           f"(supported: none, linear, Llama-3 rope_freqs)")


def _config(reader: GGUFReader, path, raw: dict[str, RawTensor]) -> LlamaConfig:
    arch = _field(reader, path, "general.architecture", str)
    if arch != "llama":
        raise UnsupportedError(f"{path}: architecture {arch!r} is not supported (only 'llama')")
    if _field(reader, path, f"{arch}.expert_count", int, 0) > 0:
        raise UnsupportedError(f"{path}: mixture-of-experts llama models are not supported")

    def get(key, kind, default=...):
        return _field(reader, path, f"{arch}.{key}", kind, default)

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
    if tokens is not None and len(tokens.data) > vocab:
        raise ModelFileError(f"{path}: tokenizer has {len(tokens.data)} tokens but the "
                             f"embedding has only {vocab} rows")
    theta = get("rope.freq_base", float, 10000.0)
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
            bos_token_id=_field(reader, path, "tokenizer.ggml.bos_token_id", int, None),
            eos_token_id=_field(reader, path, "tokenizer.ggml.eos_token_id", int, None),
        )
    except ValueError as e:  # LlamaConfig's own validation (zero sizes, bad GQA ratio)
        raise ModelFileError(f"{path}: inconsistent metadata: {e}") from None


def _quantized_keys(config: LlamaConfig, raw: dict[str, RawTensor]) -> set[str]:
    """The params keys of matrices a quantized load keeps quantized: every layer (or the one global
    tensor) stored in the same one of Q4_0 / Q4_1 / Q8_0."""
    from jaxchunk.weights.quantized import QTYPES  # imports JAX: only for quantized loads
    types: dict[str, set[str]] = collections.defaultdict(set)
    for key, layer in expected_keys(config):
        if key in LINEAR_KEYS or key == "embed":
            types[key].add(raw[gguf_tensor_name(key, layer)].qtype)
    return {key for key, found in types.items() if len(found) == 1 and found <= set(QTYPES)}


def _file_type_name(file_type: Optional[int]) -> str:
    try:
        return LlamaFileType(file_type).name
    except ValueError:
        return str(file_type)


def load_gguf(path: PathLike, dtype=np.float32, quantized: bool = False) -> tuple[LlamaConfig, dict, dict]:
    """Load a llama GGUF into `(config, params, metadata)`.

    params is the pytree documented in `jaxchunk.weights` (NumPy arrays of `dtype`, linear
    weights [in, out], Q/K rows in Hugging Face order); metadata is a small dict of strings:
    format, path, architecture, name, file_type, gguf_version, tensor_types.

    quantized=True keeps Q4_0 / Q4_1 / Q8_0 matrices (the linear weights, and the embedding, which
    then becomes the LM head's [hidden, vocab] matrix) quantized, as
    `jaxchunk.weights.quantized.QuantizedWeight`s repacked from the file's bytes without
    dequantizing; a matrix kind whose layers are not all one of those types, and the norms, are
    dequantized to `dtype` as usual.
    """
    reader = open_gguf(path)
    raw = _raw_tensors(reader)
    config = _config(reader, path, raw)
    check_tensors(path, config, gguf_tensor_name, {name: t.shape for name, t in raw.items()})
    for key, layer in expected_keys(config):  # fail before dequantizing anything
        _check_qtype(raw[gguf_tensor_name(key, layer)], path)
    keep = _quantized_keys(config, raw) if quantized else set()

    def load(key: str, layer: Optional[int]):
        t = raw[gguf_tensor_name(key, layer)]
        # A kept tensor moves as whole rows of quant blocks; only its Q/K row order is fixed.
        w = t if key in keep else dequantize_raw(t, path)
        rows = w.blocks if key in keep else w
        if key == "wq":
            rows = unpermute_qk(rows, config.num_heads)
        elif key == "wk":
            rows = unpermute_qk(rows, config.num_kv_heads)
        return t._replace(blocks=rows) if key in keep else rows

    def pack(key: str, t):
        if key not in keep:
            return None
        from jaxchunk.weights.quantized import pack_gguf_rows
        # [out, in] rows -> W [in, out]. For the embedding [vocab, hidden] that is the LM head's
        # W [hidden, vocab], whose columns are the token rows.
        return pack_gguf_rows(t.blocks, t.qtype, t.shape)

    params = assemble_params(config, gguf_tensor_name, load, dtype=dtype, path=path, pack=pack)
    file_type = _field(reader, path, "general.file_type", int, None)
    metadata = {
        "format": "gguf",
        "path": str(path),
        "architecture": "llama",
        "name": _field(reader, path, "general.name", str, ""),
        "file_type": _file_type_name(file_type),
        "gguf_version": str(_field(reader, path, "GGUF.version", int)),
        "tensor_types": ",".join(f"{k}:{v}" for k, v in
                                 collections.Counter(t.qtype for t in raw.values()).most_common()),
    }
    return config, params, metadata
