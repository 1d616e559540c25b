"""Tiny random models for tests, notebooks and experiments: one place that says what "tiny" is.

    from jaxchunk import testing
    config = testing.tiny_config(vocab_size=512, num_heads=6)   # any LlamaConfig field overridden
    config, params = testing.tiny_model(seed=0, scale=0.2)

The tiny shape (2 layers, hidden 64, 4 query / 2 KV heads of 16, GQA group 2) is small enough for
interpret-mode kernels and float64 oracles, and still has every feature of the real model (GQA,
several layers, tied or untied head).
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from jaxchunk.cache import init_cache
from jaxchunk.config import LlamaConfig
from jaxchunk.model import init_params
from jaxchunk.prefill import decode_step, prefill

__all__ = ["TINY", "tiny_config", "tiny_model", "tiny_gemma3_config"]

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
            head_dim=16, max_position_embeddings=512)
"""The tiny config's fields; the rest are `LlamaConfig`'s defaults."""


def tiny_config(**overrides) -> LlamaConfig:
    """`LlamaConfig(**TINY)` with `overrides` (any LlamaConfig field)."""
    return LlamaConfig(**{**TINY, **overrides})


def tiny_model(seed: int = 0, *, dtype=jnp.float32, scale: float = 0.02,
               **overrides) -> tuple[LlamaConfig, dict]:
    """(config, random params) of a tiny model; params as `jaxchunk.model.init_params`."""
    config = tiny_config(**overrides)
    return config, init_params(config, seed=seed, dtype=dtype, scale=scale)


def tiny_gemma3_config(window: int = 16, pattern: int = 3, **overrides) -> LlamaConfig:
    """A tiny Gemma 3 (`tiny_config` with every Gemma 3 feature): `pattern` - 1 sliding-window
    layers of `window`, then a global one, repeated (3 layers by default: local, local, global),
    local RoPE base 1e4 and global 1e6, QK-norm, sandwich norms, GeGLU, embeddings scaled by
    sqrt(hidden), attention scale 1 / sqrt(query_pre_attn_scalar)."""
    num_layers = overrides.pop("num_layers", pattern)
    fields = dict(num_layers=num_layers, architecture="gemma3", rope_theta=1e6, local_rope_theta=1e4,
                  layer_windows=tuple(None if i % pattern == pattern - 1 else window for i in range(num_layers)),
                  qk_norm=True, sandwich_norms=True, mlp_activation="gelu_tanh",
                  embed_scale=TINY["hidden_size"] ** 0.5, query_pre_attn_scalar=24.0, rms_norm_eps=1e-6)
    return tiny_config(**{**fields, **overrides})


def greedy_step_by_step(params, config, ids, n_new: int, chunk_size: int, cache_len: int) -> list:
    """Greedy ids after `ids`, one `decode_step` at a time after a chunked `prefill` into a cache of
    `cache_len` tokens (the reference tests' loop: stops after EOS or `n_new` tokens)."""
    cache = init_cache(config, 1, cache_len)
    cache, logits = prefill(params, config, cache, [ids], chunk_size=chunk_size)
    out = []
    for _ in range(n_new):
        token = int(np.asarray(logits)[0].argmax())
        out.append(token)
        if token == config.eos_token_id:
            break
        if len(out) < n_new:
            cache, logits = decode_step(params, cache, np.array([token]), config=config)
    return out
