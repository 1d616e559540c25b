"""Chunked training: the next-token loss of a long sequence computed chunk by chunk through the KV
cache, differentiable with `jax.grad`.

exllamav2's author doubts chunking "would work during training": the backward pass gives back what
the forward saved. Two answers, both built on `jaxchunk.model.model_step` and `KVCache`:

- mode="exact": the gradient of the loss over every target, flowing through the cached keys/values
  of earlier chunks: identical (up to float rounding) to the full-sequence gradient. Two ways:
  - strategy="recompute" (default): a `jax.custom_vjp`. The forward runs the chunks in a fori_loop
    over one fixed-shape cache and saves only the final cache. The backward walks the chunks in
    reverse and recomputes each from that final cache with `lengths` reset to the chunk's start:
    chunk i reads only positions < its end, which later chunks never overwrite, so the final cache
    *is* the cache chunk i saw. It carries one cotangent cache (d loss / d K, V) that each chunk's
    VJP passes back to earlier positions. Memory: params + 2 caches + one chunk's activations,
    whatever the number of chunks (this is `jax.checkpoint`'s recompute with the per-chunk cache
    copies removed).
  - strategy="checkpoint": plain `jax.grad` through a `lax.scan` over chunks carrying the cache,
    the body under `jax.checkpoint`. Activations are bounded per chunk, but scan saves its carry,
    the whole cache, once per chunk: memory grows as n_chunks x cache. Kept for comparison.
- mode="truncated": exllamav2-discussion style. The first n - train_len tokens are prefilled
  without gradients (their K/V enter as constants: stop_gradient on the cache) and only the last
  `train_len` tokens are trained: loss over the targets predicted from positions
  [n - train_len, n - 1), chunked (exactly, as above) with `chunk_len`.

The loss is mean next-token cross-entropy: position p predicts ids[p + 1] (float32 log-softmax).
mode="exact" trains positions [0, n - 1); mode="truncated" positions [n - train_len, n - 1).

Attention: every differentiated chunk uses the "reference" impl (full masked f32 attention over the
cache, O(chunk_len x cache_len) per chunk): the blockwise "xla" impl loops over key blocks with a
fori_loop whose bounds are traced, which reverse-mode AD rejects. Forward-only sweeps (the truncated
prefix, the recompute strategy's forward) use `forward_attention_impl` ("auto": blockwise XLA on
CPU, or the native decode kernel for chunks <= 8 tokens; Pallas on GPU); the backward recomputes
with "reference".

`full_loss` is the reference: `jaxchunk.model.forward` (plain full causal attention, no cache).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from jaxchunk.cache import KVCache
from jaxchunk.config import LlamaConfig
from jaxchunk.errors import InputError
from jaxchunk.model import compute_dtype, forward, model_step
from jaxchunk.steps import check_tokens

Mode = Literal["exact", "truncated"]
Strategy = Literal["recompute", "checkpoint"]
MODES = ("exact", "truncated")
STRATEGIES = ("recompute", "checkpoint")
GRAD_ATTENTION_IMPL = "reference"  # the differentiable attention path (see module docstring)


# ----------------------------------------------------------------------------- loss pieces
def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """-log softmax(logits)[target] in float32. logits [..., vocab], targets [...] -> [...]."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def full_loss(params: dict, config: LlamaConfig, ids: jax.Array, *, train_len: int | None = None) -> jax.Array:
    """The reference: mean next-token cross-entropy of ids [batch, n] from the full-sequence
    `forward` (no cache, no chunks). With train_len, only positions [n - train_len, n - 1) count
    (the same targets as mode="truncated", but gradients flow through every position)."""
    ids = jnp.asarray(ids, jnp.int32)
    n = ids.shape[1]
    first = 0 if train_len is None else n - train_len
    logits = forward(params, config, ids)
    return jnp.mean(token_nll(logits[:, first:n - 1], ids[:, first + 1:]))


@dataclasses.dataclass(frozen=True)
class ChunkPlan:
    """How a sequence of n tokens is cut (all static ints).

    The prefix [0, first) is computed without gradients; the trained window [first, n) is cut into
    n_window_chunks chunks of chunk_len starting at first (the last one padded). Targets: positions
    [first, n - 1), n_targets = n - 1 - first per row.
    """

    n: int
    chunk_len: int
    first: int

    @property
    def n_prefix_chunks(self) -> int:
        return -(-self.first // self.chunk_len)

    @property
    def n_window_chunks(self) -> int:
        return -(-(self.n - self.first) // self.chunk_len)

    @property
    def n_targets(self) -> int:
        return self.n - 1 - self.first

    @property
    def padded_len(self) -> int:
        """Token array length that every chunk's slice fits in (prefix and window)."""
        return max(self.first + self.n_window_chunks * self.chunk_len, self.n_prefix_chunks * self.chunk_len)


def make_plan(n: int, chunk_len: int, mode: Mode = "exact", train_len: int | None = None) -> ChunkPlan:
    """The checked ChunkPlan of a length-n sequence (InputError on bad arguments)."""
    if mode not in MODES:
        raise InputError(f"mode must be one of {MODES}, got {mode!r}")
    if isinstance(chunk_len, bool) or not isinstance(chunk_len, (int, np.integer)) or chunk_len < 1:
        raise InputError(f"chunk_len must be a positive int, got {chunk_len!r}")
    if n < 2:
        raise InputError(f"a sequence needs at least 2 tokens to have a next-token loss, got {n}")
    if mode == "exact":
        if train_len is not None:
            raise InputError("train_len is for mode='truncated'; mode='exact' trains every position")
        return ChunkPlan(n, int(chunk_len), 0)
    if isinstance(train_len, bool) or not isinstance(train_len, (int, np.integer)) or not 2 <= train_len <= n:
        raise InputError(f"mode='truncated' needs train_len, an int in [2, sequence length {n}], got {train_len!r}")
    return ChunkPlan(n, int(chunk_len), n - int(train_len))


# ----------------------------------------------------------------------------- one chunk
def _chunk_slices(plan: ChunkPlan, tokens, targets, weights, start):
    """tokens / targets / weights of the chunk starting at `start` (traced): each [batch, chunk_len]."""
    batch = tokens.shape[0]
    size = (batch, plan.chunk_len)
    return tuple(jax.lax.dynamic_slice(a, (0, start), size) for a in (tokens, targets, weights))


def _run_chunk(params, keys, values, tokens, start, n_valid, *, config, attention_impl, logits):
    """model_step on the chunk `tokens` [batch, chunk_len] at position `start` (traced) of every row,
    n_valid of them real: (keys, values, logits). keys/values [layers, batch, cache_len, kv_heads,
    head_dim], passed as arrays so that they can be differentiated or stop-gradiented."""
    batch = tokens.shape[0]
    cache = KVCache(keys=keys, values=values, lengths=jnp.full((batch,), start, jnp.int32))
    cache, out = model_step(params, config, cache, tokens, jnp.full((batch,), n_valid, jnp.int32),
                            attention_impl=attention_impl, logits=logits)
    return cache.keys, cache.values, out


def _chunk_nll_sum(params, keys, values, tokens, targets, weights, start, n_valid, *, config, attention_impl):
    """One chunk at position `start` of every row: write its K/V, return (keys, values, sum of
    weighted NLL). keys/values [layers, batch, cache_len, kv_heads, head_dim]."""
    keys, values, logits = _run_chunk(params, keys, values, tokens, start, n_valid, config=config,
                                      attention_impl=attention_impl, logits="all")
    return keys, values, jnp.sum(token_nll(logits, targets) * weights)


def _window_start(plan: ChunkPlan, i):
    start = plan.first + i * plan.chunk_len
    return start, jnp.minimum(plan.chunk_len, plan.n - start)


def _forward_sweep(params, keys, values, tokens, targets, weights, *, plan, config, attention_impl):
    """Run the window's chunks (no gradients needed): final (keys, values, nll_sum)."""

    def body(i, carry):
        keys, values, total = carry
        start, n_valid = _window_start(plan, i)
        chunk = _chunk_slices(plan, tokens, targets, weights, start)
        keys, values, nll = _chunk_nll_sum(params, keys, values, *chunk, start, n_valid, config=config,
                                           attention_impl=attention_impl)
        return keys, values, total + nll

    return jax.lax.fori_loop(0, plan.n_window_chunks, body, (keys, values, jnp.float32(0)))


# ----------------------------------------------------------------------------- strategy: recompute
@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _window_nll_recompute(params, keys, values, tokens, targets, weights, plan, config, forward_impl):
    """Sum of weighted NLL over the window; keys/values (the prefix cache) are constants."""
    return _forward_sweep(params, keys, values, tokens, targets, weights, plan=plan, config=config,
                          attention_impl=forward_impl)[2]


def _recompute_fwd(params, keys, values, tokens, targets, weights, plan, config, forward_impl):
    final_keys, final_values, total = _forward_sweep(params, keys, values, tokens, targets, weights, plan=plan,
                                                     config=config, attention_impl=forward_impl)
    return total, (params, final_keys, final_values, tokens, targets, weights)


def _recompute_bwd(plan, config, forward_impl, residuals, g_total):
    params, final_keys, final_values, tokens, targets, weights = residuals

    def body(j, carry):
        g_params, g_keys, g_values = carry
        start, n_valid = _window_start(plan, plan.n_window_chunks - 1 - j)
        chunk = _chunk_slices(plan, tokens, targets, weights, start)

        def step(params, keys, values):
            return _chunk_nll_sum(params, keys, values, *chunk, start, n_valid, config=config,
                                  attention_impl=GRAD_ATTENTION_IMPL)

        # The final cache is the cache this chunk saw: it reads positions < start + n_valid only,
        # which no later chunk wrote; its own rows are overwritten by the step (so get no gradient).
        _, vjp = jax.vjp(step, params, final_keys, final_values)
        d_params, g_keys, g_values = vjp((g_keys, g_values, g_total))
        return jax.tree.map(jnp.add, g_params, d_params), g_keys, g_values

    zeros = jax.tree.map(jnp.zeros_like, (params, final_keys, final_values))
    g_params, _, _ = jax.lax.fori_loop(0, plan.n_window_chunks, body, zeros)
    # The prefix cache is a constant (stop_gradient semantics); token arrays are integers.
    return g_params, None, None, None, None, None


_window_nll_recompute.defvjp(_recompute_fwd, _recompute_bwd)


# ----------------------------------------------------------------------------- strategy: checkpoint
def _window_nll_checkpoint(params, keys, values, tokens, targets, weights, plan, config):
    """Plain autodiff: scan over chunks carrying the cache, each chunk under jax.checkpoint (so only
    the carry - the whole cache - is saved per chunk, and the chunk's activations are recomputed)."""

    @jax.checkpoint
    def body(carry, i):
        keys, values = carry
        start, n_valid = _window_start(plan, i)
        chunk = _chunk_slices(plan, tokens, targets, weights, start)
        keys, values, nll = _chunk_nll_sum(params, keys, values, *chunk, start, n_valid, config=config,
                                           attention_impl=GRAD_ATTENTION_IMPL)
        return (keys, values), nll

    _, nlls = jax.lax.scan(body, (keys, values), jnp.arange(plan.n_window_chunks))
    return jnp.sum(nlls)


# ----------------------------------------------------------------------------- the loss
def _prefill_prefix(params, keys, values, tokens, *, plan, config, attention_impl):
    """The truncated mode's prefix [0, first), chunk by chunk, without gradients."""
    batch = tokens.shape[0]

    def body(i, carry):
        keys, values = carry
        start = i * plan.chunk_len
        chunk = jax.lax.dynamic_slice(tokens, (0, start), (batch, plan.chunk_len))
        n_valid = jnp.minimum(plan.chunk_len, plan.first - start)
        keys, values, _ = _run_chunk(params, keys, values, chunk, start, n_valid, config=config,
                                     attention_impl=attention_impl, logits="none")
        return keys, values

    return jax.lax.fori_loop(0, plan.n_prefix_chunks, body, (keys, values))


def chunked_loss(params: dict, config: LlamaConfig, ids: jax.Array, *, chunk_len: int, mode: Mode = "exact",
                 train_len: int | None = None, strategy: Strategy = "recompute",
                 forward_attention_impl: str = "auto") -> jax.Array:
    """Mean next-token cross-entropy of ids [batch, n], computed chunk by chunk through a KV cache
    of n positions; differentiable w.r.t. params with `jax.grad` (see the module docstring for the
    modes and strategies). Traceable: call under jit with config / chunk_len / mode / train_len /
    strategy static; `loss_and_grad` does that after checking the ids on the host."""
    if strategy not in STRATEGIES:
        raise InputError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if getattr(ids, "ndim", None) != 2:
        raise InputError(f"ids must be [batch, seq_len], got shape {getattr(ids, 'shape', None)}")
    batch, n = ids.shape
    if n > config.max_position_embeddings:
        raise InputError(f"sequence length {n} exceeds the model's context {config.max_position_embeddings}")
    plan = make_plan(n, chunk_len, mode, train_len)
    ids = jnp.asarray(ids, jnp.int32)
    pad = plan.padded_len - n
    tokens = jnp.pad(ids, ((0, 0), (0, pad)))
    # Position p predicts ids[p + 1]; only window positions < n - 1 carry loss.
    targets = jnp.pad(ids[:, 1:], ((0, 0), (0, pad + 1)))
    positions = jnp.arange(plan.padded_len)
    weights = jnp.broadcast_to(((positions >= plan.first) & (positions < n - 1)).astype(jnp.float32),
                               tokens.shape)

    dtype = compute_dtype(params)
    shape = (config.num_layers, batch, n, config.num_kv_heads, config.head_dim)
    keys, values = jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)
    if plan.first:
        keys, values = _prefill_prefix(jax.lax.stop_gradient(params), keys, values, tokens, plan=plan,
                                       config=config, attention_impl=forward_attention_impl)
        keys, values = jax.lax.stop_gradient((keys, values))
    if strategy == "recompute":
        total = _window_nll_recompute(params, keys, values, tokens, targets, weights, plan, config,
                                      forward_attention_impl)
    else:
        total = _window_nll_checkpoint(params, keys, values, tokens, targets, weights, plan, config)
    return total / (batch * plan.n_targets)


_STATIC = ("config", "chunk_len", "mode", "train_len", "strategy", "forward_attention_impl")


@functools.partial(jax.jit, static_argnames=_STATIC)
def _chunked_value_and_grad(params, ids, *, config, chunk_len, mode, train_len, strategy,
                            forward_attention_impl):
    return jax.value_and_grad(chunked_loss)(params, config, ids, chunk_len=chunk_len, mode=mode,
                                            train_len=train_len, strategy=strategy,
                                            forward_attention_impl=forward_attention_impl)


@functools.partial(jax.jit, static_argnames=("config", "train_len"))
def _full_value_and_grad(params, ids, *, config, train_len):
    return jax.value_and_grad(full_loss)(params, config, ids, train_len=train_len)


def check_ids(ids, config: LlamaConfig) -> np.ndarray:
    """ids as int32 [batch, n] after host-side checks (shape, dtype, vocab range)."""
    return check_tokens(ids, config, 2, "ids")


def loss_and_grad(params: dict, config: LlamaConfig, ids, *, chunk_len: int | None = None,
                  mode: Mode | Literal["full"] = "exact", train_len: int | None = None,
                  strategy: Strategy = "recompute", forward_attention_impl: str = "auto"):
    """(loss, grads) of one training step on ids [batch, n], jitted (one compile per shape/setting).

    mode="full" is the reference (`full_loss`, no chunks; chunk_len / strategy unused, train_len
    optional); "exact" and "truncated" are `chunked_loss`.
    """
    ids = check_ids(ids, config)
    if mode == "full":
        make_plan(ids.shape[1], 1, "exact" if train_len is None else "truncated", train_len)
        return _full_value_and_grad(params, jnp.asarray(ids), config=config,
                                    train_len=None if train_len is None else int(train_len))
    if chunk_len is None:
        raise InputError(f"mode={mode!r} needs chunk_len")
    make_plan(ids.shape[1], chunk_len, mode, train_len)  # argument errors before tracing
    return _chunked_value_and_grad(params, jnp.asarray(ids), config=config, chunk_len=int(chunk_len), mode=mode,
                                   train_len=None if train_len is None else int(train_len), strategy=strategy,
                                   forward_attention_impl=forward_attention_impl)


@functools.partial(jax.jit, static_argnames=_STATIC)
def _chunked_loss_jit(params, ids, **kwargs):
    return chunked_loss(params, kwargs.pop("config"), ids, **kwargs)


@functools.partial(jax.jit, static_argnames=("config", "train_len"))
def _full_loss_jit(params, ids, *, config, train_len):
    return full_loss(params, config, ids, train_len=train_len)


def lower_step(params, config: LlamaConfig, batch: int, n: int, *, grad: bool = True, mode="exact", **kwargs):
    """The lowered (not compiled) training step - or with grad=False the loss alone (the forward) -
    for ids [batch, n]. params may be ShapeDtypeStructs: nothing runs. kwargs as `loss_and_grad`.
    `.compile().memory_analysis()` gives its memory."""
    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
    ids = jax.ShapeDtypeStruct((batch, n), jnp.int32)
    if mode == "full":
        fn = _full_value_and_grad if grad else _full_loss_jit
        return fn.lower(shapes, ids, config=config, train_len=kwargs.get("train_len"))
    make_plan(n, kwargs["chunk_len"], mode, kwargs.get("train_len"))
    kwargs = {"train_len": None, "strategy": "recompute", "forward_attention_impl": "auto", **kwargs}
    fn = _chunked_value_and_grad if grad else _chunked_loss_jit
    return fn.lower(shapes, ids, config=config, mode=mode, **kwargs)
