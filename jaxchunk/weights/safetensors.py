"""Hugging Face Llama checkpoints: a directory with config.json and model.safetensors (or shards
listed in model.safetensors.index.json), f32/f16/bf16, read and written with `safetensors`.

Hugging Face stores Q/K rows in rotate-half order, which is what params use, so the only
layout work is transposing nn.Linear's [out, in] to [in, out] (done by `convert`).
"""
from __future__ import annotations

import json
import math
import os
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Mapping, Optional, Union

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from jaxchunk.config import LlamaConfig, RopeScaling
from jaxchunk.errors import ModelFileError, UnsupportedError
from jaxchunk.weights.convert import assemble_params, check_tensors, iter_file_tensors

PathLike = Union[str, os.PathLike]

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# params key -> Hugging Face tensor name (layer keys get a "model.layers.{i}." prefix).
HF_NAMES = {
    "embed": "model.embed_tokens.weight", "final_norm": "model.norm.weight",
    "lm_head": "lm_head.weight",
    "attn_norm": "input_layernorm.weight", "wq": "self_attn.q_proj.weight",
    "wk": "self_attn.k_proj.weight", "wv": "self_attn.v_proj.weight",
    "wo": "self_attn.o_proj.weight", "mlp_norm": "post_attention_layernorm.weight",
    "w_gate": "mlp.gate_proj.weight", "w_up": "mlp.up_proj.weight", "w_down": "mlp.down_proj.weight",
}


def hf_tensor_name(key: str, layer: Optional[int]) -> str:
    """Hugging Face's name for params key `key` of `layer` (None for embed/final_norm/lm_head)."""
    return HF_NAMES[key] if layer is None else f"model.layers.{layer}.{HF_NAMES[key]}"


# --- config.json <-> LlamaConfig ---------------------------------------------------------------

def _rope_from_hf(hf: Mapping[str, Any], path) -> tuple[float, Optional[RopeScaling]]:
    """(rope_theta, rope_scaling) from either transformers<5 keys (`rope_theta`,
    `rope_scaling`) or transformers>=5's `rope_parameters` dict."""
    params = dict(hf.get("rope_scaling") or {})
    params.update(hf.get("rope_parameters") or {})
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, None
    try:
        if kind == "linear":
            return theta, RopeScaling(kind="linear", factor=float(params["factor"]))
        if kind == "llama3":
            return theta, RopeScaling(
                kind="llama3", factor=float(params["factor"]),
                low_freq_factor=float(params["low_freq_factor"]),
                high_freq_factor=float(params["high_freq_factor"]),
                original_max_position_embeddings=int(params["original_max_position_embeddings"]))
    except KeyError as e:
        raise ModelFileError(f"{path}: rope scaling {kind!r} is missing {e.args[0]!r}") from None
    raise UnsupportedError(f"{path}: rope scaling type {kind!r} is not supported "
                           f"(supported: default, linear, llama3)")


def config_from_hf(hf: Mapping[str, Any], path: PathLike = CONFIG_FILE) -> LlamaConfig:
    """LlamaConfig from a Hugging Face config.json dict (`path` only names it in errors)."""
    if hf.get("model_type") != "llama":
        raise UnsupportedError(f"{path}: model_type {hf.get('model_type')!r} is not supported "
                               f"(only 'llama')")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise UnsupportedError(f"{path}: {flag}=true is not supported")
    if hf.get("hidden_act", "silu") != "silu":
        raise UnsupportedError(f"{path}: hidden_act {hf['hidden_act']!r} is not supported (only silu)")

    def need(key):
        if key not in hf:
            raise ModelFileError(f"{path}: missing key {key!r}")
        return hf[key]

    def token_id(key):  # HF allows a list of ids (several EOS tokens); keep the first
        value = hf.get(key)
        return value[0] if isinstance(value, list) and value else value if isinstance(value, int) else None

    hidden, heads = need("hidden_size"), need("num_attention_heads")
    theta, scaling = _rope_from_hf(hf, path)
    try:
        return LlamaConfig(
            vocab_size=need("vocab_size"), hidden_size=hidden,
            intermediate_size=need("intermediate_size"), num_layers=need("num_hidden_layers"),
            num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or (hidden // heads if isinstance(heads, int) and heads else 0),
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            rope_theta=theta, rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            rope_scaling=scaling, bos_token_id=token_id("bos_token_id"),
            eos_token_id=token_id("eos_token_id"))
    except (ValueError, TypeError) as e:  # LlamaConfig's own validation
        raise ModelFileError(f"{path}: inconsistent config: {e}") from None


def config_to_hf(config: LlamaConfig) -> dict[str, Any]:
    """A Hugging Face config.json dict for `config` (the classic keys `rope_theta` /
    `rope_scaling`, which every transformers version reads)."""
    hf: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size, "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads, "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim, "max_position_embeddings": config.max_position_embeddings,
        "rope_theta": config.rope_theta, "rms_norm_eps": config.rms_norm_eps,
        "tie_word_embeddings": config.tie_word_embeddings, "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False,
        "bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
    }
    s = config.rope_scaling
    if s is not None and s.kind == "linear":
        hf["rope_scaling"] = {"rope_type": "linear", "factor": s.factor}
    elif s is not None:
        hf["rope_scaling"] = {"rope_type": s.kind, "factor": s.factor,
                              "low_freq_factor": s.low_freq_factor,
                              "high_freq_factor": s.high_freq_factor,
                              "original_max_position_embeddings": s.original_max_position_embeddings}
    return hf


# --- loading ------------------------------------------------------------------------------------

def _read_json(path: Path) -> dict:
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ModelFileError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelFileError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ModelFileError(f"{path}: expected a JSON object")
    return data


def _weight_map(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> the .safetensors file holding it (one file, or the index's shards)."""
    index = model_dir / INDEX_FILE
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ModelFileError(f"{index}: no 'weight_map' object")
        return {name: model_dir / shard for name, shard in weight_map.items()}
    single = model_dir / SINGLE_FILE
    if not single.is_file():
        raise ModelFileError(f"{model_dir}: neither {SINGLE_FILE} nor {INDEX_FILE} found")
    with _open_safetensors(single) as f:
        return {name: single for name in f.keys()}


def _open_safetensors(path: Path):
    try:
        return safe_open(path, framework="np")
    except FileNotFoundError:
        raise ModelFileError(f"{path}: shard file not found") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelFileError(f"{path}: not a valid safetensors file: {e}") from None


def load_safetensors(model_dir: PathLike, dtype=np.float32) -> tuple[LlamaConfig, dict, dict]:
    """Load a Hugging Face Llama checkpoint directory into `(config, params, metadata)`.

    params is the pytree documented in `jaxchunk.weights` (NumPy arrays of `dtype`, linear
    weights [in, out]); metadata: format, path, stored_dtypes (e.g. "BF16").
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelFileError(f"{model_dir}: not a checkpoint directory")
    config = config_from_hf(_read_json(model_dir / CONFIG_FILE), model_dir / CONFIG_FILE)
    weight_map = _weight_map(model_dir)

    with ExitStack() as stack:
        handles = {file: stack.enter_context(_open_safetensors(file))
                   for file in sorted(set(weight_map.values()))}
        shapes, dtypes = {}, set()
        for name, file in weight_map.items():
            try:
                info = handles[file].get_slice(name)
            except SafetensorError:
                raise ModelFileError(f"{file}: index lists tensor {name!r} but the file lacks it") from None
            shapes[name] = info.get_shape()
            dtypes.add(str(info.get_dtype()))
        check_tensors(model_dir, config, hf_tensor_name, shapes)

        def load(key: str, layer: Optional[int]) -> np.ndarray:
            name = hf_tensor_name(key, layer)
            return handles[weight_map[name]].get_tensor(name)

        params = assemble_params(config, hf_tensor_name, load, dtype=dtype, path=model_dir)
    metadata = {"format": "safetensors", "path": str(model_dir),
                "stored_dtypes": ",".join(sorted(dtypes))}
    return config, params, metadata


# --- saving -------------------------------------------------------------------------------------

def save_safetensors(model_dir: PathLike, config: LlamaConfig, params: Mapping,
                     shards: int = 1, dtype=None) -> Path:
    """Write `params` as a Hugging Face Llama checkpoint that `transformers` can load:
    config.json plus model.safetensors, or with `shards > 1` that many
    model-0000i-of-0000N.safetensors files and model.safetensors.index.json.

    `dtype` (e.g. np.float16 or ml_dtypes.bfloat16) converts the tensors; default: as given.
    Returns `model_dir`.
    """
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for key, layer, w in iter_file_tensors(config, params):
        tensors[hf_tensor_name(key, layer)] = np.ascontiguousarray(w, dtype=dtype or w.dtype)
    with open(model_dir / CONFIG_FILE, "w") as f:
        json.dump(config_to_hf(config), f, indent=2)

    metadata = {"format": "pt"}  # transformers refuses files without it
    if shards <= 1:
        save_file(tensors, model_dir / SINGLE_FILE, metadata=metadata)
        return model_dir
    names = list(tensors)
    shards = min(shards, len(names))
    per_shard = math.ceil(len(names) / shards)
    weight_map = {}
    for i in range(shards):
        shard = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        chunk = names[i * per_shard:(i + 1) * per_shard]
        save_file({n: tensors[n] for n in chunk}, model_dir / shard, metadata=metadata)
        weight_map.update({n: shard for n in chunk})
    index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
             "weight_map": weight_map}
    with open(model_dir / INDEX_FILE, "w") as f:
        json.dump(index, f, indent=2)
    return model_dir
