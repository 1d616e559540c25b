"""One way to get a model's weights ready for the device: `load_weights(path, dtype=, weights=)`.

Reads the checkpoint once (a GGUF memory-mapped, or a Hugging Face safetensors directory),
dequantizes it or keeps its quant blocks, and puts the result in the form the model computes
with (`prepare_params`): q8 activation rounding for weights="q4_q8", bf16 matrices held as bits
for dtype="bf16" (see bf16.py). Both `jaxchunk.load` and the experiments load through here.

The leaves are NumPy arrays, allocated 64-byte aligned where the loader builds them, so that
`jax.device_put` on CPU can adopt them without a copy.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Union

import numpy as np

from jaxchunk.config import LlamaConfig
from jaxchunk.errors import InputError, ModelFileError, UnsupportedError
from jaxchunk.weights.modes import DTYPES, QUANTIZED_MODES, WEIGHT_MODES

if TYPE_CHECKING:
    from jaxchunk.weights.gguf_file import GGUFFile

PathLike = Union[str, os.PathLike]

def resolve_dtype(dtype: Optional[str], weights: str) -> str:
    """The compute dtype for `dtype` (None: "bf16" for weights="bf16", else "f32") and weight mode
    `weights`; InputError for an unknown name or a contradiction (weights="bf16", dtype="f32")."""
    if weights not in WEIGHT_MODES:
        raise InputError(f"weights must be one of {WEIGHT_MODES}, got {weights!r}")
    if dtype is None:
        dtype = "bf16" if weights == "bf16" else "f32"
    if dtype not in DTYPES:
        raise InputError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if weights in DTYPES and dtype != weights:
        raise InputError(f"weights={weights!r} dequantizes to {weights} and computes in it; dtype={dtype!r} "
                         f"contradicts that (leave dtype out, or use weights='dequantized')")
    return dtype


def numpy_dtype(dtype: str):
    """The NumPy dtype of a name in DTYPES (bf16 is ml_dtypes.bfloat16, JAX's own)."""
    import ml_dtypes
    return {"f32": np.dtype(np.float32), "bf16": np.dtype(ml_dtypes.bfloat16)}[dtype]


def checkpoint_path(path: PathLike) -> Path:
    """The checkpoint `path` names: a .gguf file, a Hugging Face directory (with config.json), or
    the single .gguf inside a directory. ModelFileError otherwise."""
    path = Path(path)
    if not path.is_dir():
        if not path.is_file():
            raise ModelFileError(f"{path}: no such file or directory")
        return path
    if (path / "config.json").is_file():
        return path
    ggufs = sorted(path.glob("*.gguf"))
    if len(ggufs) != 1:
        raise ModelFileError(f"{path}: not a model directory (no config.json, and "
                             f"{len(ggufs)} .gguf files instead of one)")
    return ggufs[0]


def prepare_params(params: dict, dtype: str = "f32", weights: str = "dequantized") -> dict:
    """Host params (float leaves, and QuantizedWeights for a quantized mode) in the form the model
    computes with: float leaves as `dtype`, every QuantizedWeight multiplying its input as
    weights="q4_q8" asks ("q8") or not ("float"), and for dtype="bf16" with float matrices, those
    held as `bf16.BF16Weight` bits. Leaves already of `dtype` are not copied."""
    import jax

    from jaxchunk.weights.bf16 import pack_bf16
    from jaxchunk.weights.quantized import QuantizedWeight, with_activations

    dtype = resolve_dtype(dtype, weights)
    target = numpy_dtype(dtype)
    is_quantized = lambda w: isinstance(w, QuantizedWeight)  # noqa: E731
    params = jax.tree.map(lambda a: a if is_quantized(a) or not np.issubdtype(np.asarray(a).dtype, np.floating)
                          else np.asarray(a, target), params, is_leaf=is_quantized)
    if weights in QUANTIZED_MODES:
        return with_activations(params, "q8" if weights == "q4_q8" else "float")
    if dtype == "bf16":
        return pack_bf16(params)  # bf16 matrices held as bits: see jaxchunk/weights/bf16.py
    return params


def load_weights(source: Union[PathLike, "GGUFFile"], *, dtype: Optional[str] = None,
                 weights: str = "dequantized") -> tuple[LlamaConfig, dict, dict]:
    """(config, params, metadata) of a checkpoint, params ready for `jax.device_put`.

    source: a .gguf file, a Hugging Face checkpoint directory, a directory holding one .gguf, or
        a GGUF already opened with `jaxchunk.weights.gguf.open_gguf` (to read its tokenizer from
        the same parse).
    dtype, weights: as `jaxchunk.load` (see DTYPES, WEIGHT_MODES; dtype None: from weights).
        Quantized modes need a GGUF (UnsupportedError for a safetensors directory).

    params is the pytree of `jaxchunk.weights` (NumPy leaves) after `prepare_params`; metadata
    the loader's small dict of strings (format, path, ...).
    """
    from jaxchunk.weights.gguf import load_gguf
    from jaxchunk.weights.gguf_file import GGUFFile
    from jaxchunk.weights.safetensors import load_safetensors

    dtype = resolve_dtype(dtype, weights)
    quantized = weights in QUANTIZED_MODES
    if not isinstance(source, GGUFFile):
        source = checkpoint_path(source)
    if isinstance(source, Path) and source.is_dir():
        if quantized:
            raise UnsupportedError(f"{source}: weights={weights!r} keeps a GGUF file's quantized blocks; this "
                                   f"is a Hugging Face checkpoint with float weights (use weights='f32' or 'bf16')")
        config, params, metadata = load_safetensors(source, dtype=numpy_dtype(dtype))
    else:
        config, params, metadata = load_gguf(source, dtype=numpy_dtype(dtype), quantized=quantized)
    return config, prepare_params(params, dtype, weights), metadata
