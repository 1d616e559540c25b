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

from jaxchunk.config import LlamaConfig
from jaxchunk.model import init_params

__all__ = ["TINY", "tiny_config", "tiny_model"]

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
