"""Generation: chunked prefill of the prompts, then token-by-token decoding.

Two decoding paths over the same prefill, the same sampler and the same per-step keys (step i draws
with `jax.random.fold_in(key(seed), i)`), so under one seed they produce the same tokens:

* `generate_ids`: the whole decode loop is ONE jitted `lax.while_loop` on device. Its carry holds the
  (donated) KV cache, the last token of each row, per-row `done` flags, the seen-token mask (for the
  repetition penalty) and an output buffer [batch, bucket]. Each iteration calls
  `jaxchunk.model.model_step` with a chunk of length 1, where finished rows pass n_valid = 0 so they
  write nothing. The loop exits when every row is done or after `max_new_tokens`. `max_new_tokens`
  itself is traced; only its power-of-two bucket (the buffer size) is static, so the loop compiles
  once per (batch, bucket, sampling params, cache shape), not per prompt or per token.
* `stream_ids`: a generator, one host round trip per token (what streaming needs): the jitted
  `jaxchunk.steps.jitted_decode_step` and a jitted sampler, yielding each step's tokens.

A row is done after it emits one of `stop_ids` (by default the model's EOS); the stop id is part of
the returned ids (as in Hugging Face `generate`), nothing after it is.
"""
from __future__ import annotations

import functools
from typing import Generator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxchunk.cache import KVCache
from jaxchunk.config import LlamaConfig
from jaxchunk.errors import InputError
from jaxchunk.model import model_step
from jaxchunk.prefill import DEFAULT_MAX_ATTENTION_SIZE, DEFAULT_MAX_INPUT_LEN, prefill
from jaxchunk.sampling import GREEDY, SamplingParams, mark_seen, sample, seen_mask_from_rows
from jaxchunk.steps import host_lengths, run_decode_step
from jaxchunk.sharding import mesh_context, to_host

__all__ = ["generate_ids", "decode_ids", "stream_ids", "compiled_loop_count", "PAD"]

PAD = -1          # output slot of a row that is already done
MIN_BUCKET = 16   # smallest output buffer: short generations share one compile


def _bucket(max_new_tokens: int) -> int:
    """Static output-buffer length: the next power of two >= max_new_tokens (at least MIN_BUCKET)."""
    return max(MIN_BUCKET, 1 << (max_new_tokens - 1).bit_length())


# ----------------------------------------------------------------------------- one sampling step
def _sample_step(logits, key, step, seen, active, sampling: SamplingParams):
    """Draw step `step`'s tokens and record them. Shared by both paths so they agree token for token.

    logits [b, v] f32; key: the generation's base key; step: int32 scalar; seen [b, v] bool (or
    [b, 0] when the penalty is off); active [b] bool. Returns (tokens [b] int32, PAD where not
    active; seen with the new tokens marked).
    """
    tokens = sample(logits, jax.random.fold_in(key, step), sampling, seen if sampling.uses_seen else None)
    tokens = jnp.where(active, tokens, PAD)
    if sampling.uses_seen:
        seen = mark_seen(seen, tokens, active)
    return tokens, seen


_sample_step_jit = jax.jit(_sample_step, static_argnames=("sampling",))


# ----------------------------------------------------------------------------- on-device loop
@functools.partial(jax.jit, static_argnames=("config", "attention_impl", "sampling", "bucket"),
                   donate_argnames=("kv_cache",))
def _decode_loop(params, kv_cache: KVCache, logits, seen, key, stop_mask, limit, *,
                 config: LlamaConfig, attention_impl: str, sampling: SamplingParams, bucket: int):
    """Sample up to `limit` (<= bucket) tokens per row on device, starting from the prefill logits.

    logits [b, v]: each row's logits at its last prompt token; stop_mask [v] bool; limit: int32
    scalar. Returns (kv_cache, out [b, bucket] int32 with PAD after a row is done, steps taken).
    The last sampled token is never fed back, so a row's cache grows by (tokens generated - 1).
    """
    batch = logits.shape[0]
    tokens, seen = _sample_step(logits, key, 0, seen, jnp.ones((batch,), bool), sampling)
    out = jnp.full((batch, bucket), PAD, jnp.int32).at[:, 0].set(tokens)
    done = stop_mask[tokens]

    def cond(state):
        step, _, _, done, _, _ = state
        return (step < limit) & ~jnp.all(done)

    def body(state):
        step, cache, tokens, done, seen, out = state
        active = ~done
        # Done rows hold PAD; feed them a valid id with n_valid = 0: they write nothing.
        feed = jnp.where(active, tokens, 0)[:, None]
        cache, logits = model_step(params, config, cache, feed, active.astype(jnp.int32),
                                   attention_impl=attention_impl, logits="last")
        tokens, seen = _sample_step(logits, key, step, seen, active, sampling)
        out = jax.lax.dynamic_update_slice(out, tokens[:, None], (0, step))
        done = done | (active & stop_mask[jnp.where(active, tokens, 0)])
        return step + 1, cache, tokens, done, seen, out

    state = (jnp.int32(1), kv_cache, tokens, done, seen, out)
    steps, kv_cache, _, _, _, out = jax.lax.while_loop(cond, body, state)
    return kv_cache, out, steps


def compiled_loop_count() -> int:
    """How many executables the on-device decode loop holds (one per static configuration seen)."""
    return _decode_loop._cache_size()


# ----------------------------------------------------------------------------- shared setup
def _check_generation_args(max_new_tokens, sampling, seed) -> None:
    if not isinstance(max_new_tokens, (int, np.integer)) or isinstance(max_new_tokens, bool) \
            or max_new_tokens <= 0:
        raise InputError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool) or not 0 <= seed < 2 ** 32:
        raise InputError(f"seed must be an int in [0, 2**32), got {seed!r}")
    if not isinstance(sampling, SamplingParams):
        raise InputError(f"sampling must be a jaxchunk.sampling.SamplingParams, got {type(sampling).__name__}")


def _stop_mask(config: LlamaConfig, stop_ids) -> np.ndarray:
    """[vocab] bool of the ids that end a row (default: the model's EOS), checked."""
    if stop_ids is None:
        stop_ids = () if config.eos_token_id is None else (config.eos_token_id,)
    stop_ids = [int(i) for i in stop_ids]
    if any(not 0 <= i < config.vocab_size for i in stop_ids):
        raise InputError(f"stop_ids {stop_ids} must lie in [0, vocab_size={config.vocab_size})")
    stop_mask = np.zeros(config.vocab_size, bool)
    stop_mask[stop_ids] = True
    return stop_mask


def _start(params, config, kv_cache, prompts, max_new_tokens, sampling, seed, chunk_size, stop_ids,
           attention_impl, max_input_len, max_attention_size, progress):
    """Host checks, then prefill. Returns (kv_cache, first logits [b, v], seen, key, stop_mask [v] np)."""
    _check_generation_args(max_new_tokens, sampling, seed)
    rows = [np.asarray(p) for p in prompts]
    if len(rows) != kv_cache.batch:
        raise InputError(f"got {len(rows)} prompts for a cache of batch {kv_cache.batch}")
    # prefill() checks the prompts alone; here the generated tokens must fit as well.
    room = kv_cache.max_seq_len - host_lengths(kv_cache)
    for b, row in enumerate(rows):
        if len(row) + max_new_tokens > room[b]:
            raise InputError(f"prompt {b} ({len(row)} tokens) + max_new_tokens ({max_new_tokens}) does not "
                             f"fit the cache: {room[b]} free of max_seq_len={kv_cache.max_seq_len}")

    stop_mask = _stop_mask(config, stop_ids)
    kv_cache, logits = prefill(params, config, kv_cache, rows, chunk_size=chunk_size,
                               max_input_len=max_input_len, max_attention_size=max_attention_size,
                               attention_impl=attention_impl, progress=progress)
    seen = (seen_mask_from_rows(rows, config.vocab_size) if sampling.uses_seen
            else jnp.zeros((len(rows), 0), bool))  # the penalty is off: carry nothing
    return kv_cache, logits, seen, jax.random.key(seed), stop_mask


# ----------------------------------------------------------------------------- public entry points
def generate_ids(params, config: LlamaConfig, kv_cache: KVCache, prompts: Sequence, *,
                 max_new_tokens: int, sampling: SamplingParams = GREEDY, seed: int = 0,
                 chunk_size: Optional[int] = None, stop_ids: Optional[Sequence[int]] = None,
                 attention_impl: str = "auto", max_input_len: int = DEFAULT_MAX_INPUT_LEN,
                 max_attention_size: int = DEFAULT_MAX_ATTENTION_SIZE,
                 progress: bool = False) -> tuple[KVCache, list[list[int]]]:
    """Prefill `prompts` (one per cache row, lengths may differ) and decode on device.

    prompts: `batch` token-id sequences. The cache (donated: do not reuse the one passed in) must
    have room for every prompt plus max_new_tokens after what it already holds.
    stop_ids: ids that end a row (default: the model's EOS; () for none, e.g. to benchmark).
    chunk_size / max_input_len / max_attention_size: the prefill schedule (jaxchunk.prefill).

    Returns (kv_cache, ids): ids[b] is row b's new tokens, at most max_new_tokens, ending with the
    stop id if it hit one.
    """
    kv_cache, logits, seen, key, stop_mask = _start(
        params, config, kv_cache, prompts, max_new_tokens, sampling, seed, chunk_size, stop_ids,
        attention_impl, max_input_len, max_attention_size, progress)
    return _run_loop(params, config, kv_cache, logits, seen, key, stop_mask, max_new_tokens, sampling,
                     attention_impl)


def decode_ids(params, config: LlamaConfig, kv_cache: KVCache, logits, *, max_new_tokens: int,
               sampling: SamplingParams = GREEDY, seed: int = 0, stop_ids: Optional[Sequence[int]] = None,
               attention_impl: str = "auto") -> tuple[KVCache, list[list[int]]]:
    """`generate_ids`'s on-device decode loop, continuing from a cache and each row's logits at its
    last cached token (logits [batch, vocab], e.g. from `jaxchunk.prefill.prefill`). The first token
    is sampled from `logits`; each further one costs one model step, so max_new_tokens tokens take
    max_new_tokens - 1 steps and that much cache room. Same returns as `generate_ids` (no repetition
    penalty history from before the call)."""
    _check_generation_args(max_new_tokens, sampling, seed)
    if tuple(np.shape(logits)) != (kv_cache.batch, config.vocab_size):
        raise InputError(f"logits must be [batch, vocab] = [{kv_cache.batch}, {config.vocab_size}], "
                         f"got {tuple(np.shape(logits))}")
    room = kv_cache.max_seq_len - host_lengths(kv_cache)
    if (max_new_tokens - 1 > room).any():
        raise InputError(f"max_new_tokens={max_new_tokens} needs {max_new_tokens - 1} cache positions; "
                         f"a row has only {int(room.min())} free of max_seq_len={kv_cache.max_seq_len}")
    stop_mask = _stop_mask(config, stop_ids)
    seen = jnp.zeros((kv_cache.batch, config.vocab_size if sampling.uses_seen else 0), bool)
    return _run_loop(params, config, kv_cache, jnp.asarray(logits, jnp.float32), seen, jax.random.key(seed),
                     stop_mask, max_new_tokens, sampling, attention_impl)


def _run_loop(params, config, kv_cache, logits, seen, key, stop_mask, max_new_tokens, sampling, attention_impl):
    with mesh_context(kv_cache):  # a sharded cache: the step's shard_map wrappers find its mesh
        kv_cache, out, _ = _decode_loop(params, kv_cache, logits, seen, key, jnp.asarray(stop_mask),
                                        jnp.int32(max_new_tokens), config=config, attention_impl=attention_impl,
                                        sampling=sampling, bucket=_bucket(max_new_tokens))
    out = to_host(out)[:, :max_new_tokens]
    return kv_cache, [row[row != PAD].tolist() for row in out]


def stream_ids(params, config: LlamaConfig, kv_cache: KVCache, prompts: Sequence, *,
               max_new_tokens: int, sampling: SamplingParams = GREEDY, seed: int = 0,
               chunk_size: Optional[int] = None, stop_ids: Optional[Sequence[int]] = None,
               attention_impl: str = "auto", max_input_len: int = DEFAULT_MAX_INPUT_LEN,
               max_attention_size: int = DEFAULT_MAX_ATTENTION_SIZE,
               progress: bool = False) -> Generator[np.ndarray, None, KVCache]:
    """Like `generate_ids`, but returns a generator that yields each step's tokens as an int32 array
    [batch] (PAD = -1 for rows already done) as soon as they are sampled. Same tokens as
    `generate_ids` under the same arguments (up to float rounding between the two programs).

    Checks and prefill run now, so errors surface at the call, not at the first `next()`. The
    generator's return value (StopIteration.value) is the KV cache. Rows that finished early keep
    being stepped (outputs discarded) until every row is done; that only costs compute for batch > 1.
    """
    kv_cache, logits, seen, key, stop_mask = _start(
        params, config, kv_cache, prompts, max_new_tokens, sampling, seed, chunk_size, stop_ids,
        attention_impl, max_input_len, max_attention_size, progress)
    return _stream(params, config, kv_cache, logits, seen, key, stop_mask, max_new_tokens, sampling,
                   attention_impl)


def _stream(params, config, kv_cache, logits, seen, key, stop_mask, max_new_tokens, sampling, attention_impl):
    """The generator behind `stream_ids`, from the prefill's logits on."""
    active = np.ones(kv_cache.batch, bool)
    for step in range(max_new_tokens):
        tokens, seen = _sample_step_jit(logits, key, jnp.int32(step), seen, jnp.asarray(active),
                                        sampling=sampling)
        tokens = np.asarray(tokens)  # the host round trip streaming needs
        yield tokens
        active &= ~stop_mask[np.maximum(tokens, 0)]
        if not active.any() or step + 1 == max_new_tokens:
            break
        kv_cache, logits = run_decode_step(params, kv_cache, np.maximum(tokens, 0), config=config,
                                           attention_impl=attention_impl)
    return kv_cache
