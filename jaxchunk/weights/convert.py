"""Shared assembly of the params pytree (see `jaxchunk.weights`) from any checkpoint format.

Both loaders describe their file the same way:

* `tensor_name(key, layer) -> str` maps a params key ("wq", "embed", ...) and a layer index
  (None for the non-layer keys) to the tensor's name in the file;
* `shapes`: the name -> shape of every tensor in the file, read from its header;
* `load(key, layer) -> np.ndarray`: one tensor as floats in *file orientation*.

File orientation is the same for GGUF and safetensors: a linear layer is [out, in] (PyTorch's
nn.Linear layout, and GGUF's ne[1], ne[0] in NumPy order), the embedding is [vocab, hidden].
The helpers here check every tensor's presence and shape up front (before anything is
loaded), then fill pre-allocated stacked arrays one tensor at a time, so only one full copy
of the model is ever held.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import numpy as np

from jaxchunk.config import LlamaConfig
from jaxchunk.errors import ModelFileError
from jaxchunk.weights.layout import layer_keys

TensorName = Callable[[str, Optional[int]], str]
TensorLoad = Callable[[str, Optional[int]], np.ndarray]
TensorPack = Callable[[str, Any], Any]
TensorFill = Callable[[str, int, np.ndarray], bool]

# Keys stored as linear weights: [out, in] in files, [in, out] in params.
LINEAR_KEYS = frozenset({"wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down", "lm_head"})
GLOBAL_KEYS = ("embed", "final_norm", "lm_head")


def file_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Expected shape of each params key in file orientation ([out, in] for linear weights)."""
    h, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    return {
        "embed": (v, h), "final_norm": (h,), "lm_head": (v, h),
        "attn_norm": (h,), "wq": (q, h), "wk": (kv, h), "wv": (kv, h), "wo": (h, q),
        "mlp_norm": (h,), "w_gate": (f, h), "w_up": (f, h), "w_down": (h, f),
        "q_norm": (config.head_dim,), "k_norm": (config.head_dim,),
        "post_attn_norm": (h,), "post_mlp_norm": (h,),
    }


def expected_keys(config: LlamaConfig) -> Iterator[tuple[str, Optional[int]]]:
    """Every (key, layer) the params pytree needs; lm_head only when embeddings are untied."""
    yield "embed", None
    yield "final_norm", None
    if not config.tie_word_embeddings:
        yield "lm_head", None
    for layer in range(config.num_layers):
        for key in layer_keys(config):
            yield key, layer


def check_tensors(path, config: LlamaConfig, tensor_name: TensorName,
                  shapes: Mapping[str, Sequence[int]]) -> None:
    """Raise ModelFileError unless `shapes` (the file's header) has every tensor `config` needs,
    with the expected shape, and no tensors for layers beyond `config.num_layers`."""
    expected = file_shapes(config)
    for key, layer in expected_keys(config):
        name = tensor_name(key, layer)
        if name not in shapes:
            raise ModelFileError(f"{path}: missing tensor {name!r} (config has "
                                 f"{config.num_layers} layers)")
        actual = tuple(int(d) for d in shapes[name])
        if actual != expected[key]:
            raise ModelFileError(f"{path}: tensor {name!r} has shape {list(actual)}, expected "
                                 f"{list(expected[key])} from the config")
    # A file with more layers than its config says is inconsistent, not just "extra data".
    extra = [tensor_name(key, config.num_layers) for key in layer_keys(config)]
    extra = [name for name in extra if name in shapes]
    if extra:
        raise ModelFileError(f"{path}: has tensor {extra[0]!r} but the config says "
                             f"num_layers={config.num_layers}")


def assemble_params(config: LlamaConfig, tensor_name: TensorName, load: TensorLoad,
                    dtype=np.float32, path=None, pack: Optional[TensorPack] = None,
                    fill: Optional[TensorFill] = None) -> dict:
    """Build the params pytree from `load`, which returns tensors in file orientation.

    Linear weights are transposed to [in, out]; layer tensors are written straight into
    [L, ...] arrays allocated once (at the first layer, in the shape of what it produced). Call
    `check_tensors` first: this re-checks each loaded shape only as a guard against a `load` that
    disagrees with the header.

    `load` may also return something other than a float array (anything with a `.shape` in file
    orientation, e.g. a GGUF RawTensor that is to stay quantized); `pack(key, tensor)` then turns
    it into the params leaf or pytree of NumPy arrays in params orientation (e.g. a
    QuantizedWeight), and returns None for tensors the default float path should take.

    `fill(key, layer, out)`, if given, may write a layer tensor itself, in params orientation and
    `dtype`, straight into its slot `out` of the stacked array (saving a full-size temporary and
    a copy) and return True; False leaves that tensor to `load`.
    """
    expected = file_shapes(config)

    def get(key: str, layer: Optional[int]):
        w = load(key, layer)
        if tuple(w.shape) != expected[key]:
            raise ModelFileError(f"{path}: tensor {tensor_name(key, layer)!r} loaded with shape "
                                 f"{list(w.shape)}, expected {list(expected[key])}")
        packed = pack(key, w) if pack is not None else None
        if packed is not None:
            return packed
        return np.asarray(w.T if key in LINEAR_KEYS else w, dtype=dtype)

    params: dict = {}
    for key in GLOBAL_KEYS:
        if key == "lm_head" and config.tie_word_embeddings:
            continue
        leaf = get(key, None)
        params[key] = np.ascontiguousarray(leaf) if isinstance(leaf, np.ndarray) else leaf

    layers: dict = {}
    for layer in range(config.num_layers):
        for key in layer_keys(config):
            if fill is not None and layer == 0:
                shape = expected[key][::-1] if key in LINEAR_KEYS else expected[key]
                stack = aligned_empty((config.num_layers, *shape), dtype)  # untouched until filled
                if fill(key, 0, stack[0]):
                    layers[key] = stack
                    continue
            elif fill is not None and isinstance(layers[key], np.ndarray) and fill(key, layer, layers[key][layer]):
                continue
            tensor = get(key, layer)
            if layer == 0:
                layers[key] = _tree_map(lambda a: aligned_empty((config.num_layers, *a.shape), a.dtype), tensor)
            try:
                _tree_map(lambda dst, src: dst.__setitem__(layer, src), layers[key], tensor)
            except (ValueError, TypeError) as e:  # a layer stored in another quant type than layer 0
                raise ModelFileError(f"{path}: tensor {tensor_name(key, layer)!r} is stored differently "
                                     f"from layer 0's ({e}); layers must share one type per tensor") from None
    params["layers"] = layers
    return params


def aligned_empty(shape: tuple[int, ...], dtype=np.float32, alignment: int = 64) -> np.ndarray:
    """np.empty, but starting on an `alignment`-byte boundary: JAX's CPU backend adopts such an
    array in `jax.device_put` instead of copying it (NumPy's own large arrays start 16 bytes past
    a page boundary)."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    buffer = np.empty(nbytes + alignment, np.uint8)
    start = -buffer.ctypes.data % alignment
    return buffer[start:start + nbytes].view(dtype).reshape(shape)


def _tree_map(fn, *trees):
    """jax.tree.map, imported only when a loader packs non-array leaves (plain arrays need no JAX)."""
    if all(isinstance(t, np.ndarray) for t in trees):
        return fn(*trees)
    import jax
    return jax.tree.map(fn, *trees)


def iter_file_tensors(config: LlamaConfig, params: Mapping) -> Iterator[tuple[str, Optional[int], np.ndarray]]:
    """Inverse of `assemble_params`: yield (key, layer, tensor in file orientation) for every
    tensor a checkpoint of `config` stores. Used by writers."""
    for key, layer in expected_keys(config):
        w = np.asarray(params[key] if layer is None else params["layers"][key][layer])
        yield key, layer, (w.T if key in LINEAR_KEYS else w)
