"""Chunked prefill and decode over a donated, fixed-shape KV cache.

- `prefill_chunk` / `decode_step`: one checked step each (the jitted steps are in `jaxchunk.steps`).
  The cache is donated (updated in place), the position of each row is the traced
  `kv_cache.lengths`, so one compile serves every chunk of every prompt for a given (batch, chunk_len).
- `chunk_schedule`: how a prompt is cut. An explicit `chunk_size` is used as is (last chunk padded).
  Otherwise exllamav2's rule: chunk <= max_input_len and k_len * q_len <= max_attention_size, i.e.
  chunk = floor((sqrt(past^2 + 4 * max_attention_size) - past) / 2), rounded DOWN to a power of two
  (the static set {1, 2, 4, ..., max_input_len}); the final partial chunk takes the smallest power of
  two that holds it. So auto prefill compiles at most 1 + ceil(log2(max_input_len)) step shapes per
  batch size, whatever the prompt lengths.
- `iter_prefill`: the chunk loop over the schedule (written once), for a batch of prompts of different
  lengths, yielding each chunk's logits; `prefill` runs it to the end. With
  `memory_budget_bytes=N` (or `chunk_size="auto"`) the chunk length is the largest power of two whose
  compiled step fits the budget (`jaxchunk.memory_budget.pick_chunk_len`).

Every bound is checked on the host before anything reaches the device: JAX clamps out-of-range
dynamic slices silently, so a bad position would otherwise corrupt the cache without an error.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Iterator

import jax.numpy as jnp
import numpy as np

from jaxchunk.cache import KVCache, check_chunk_fits_ring
from jaxchunk.config import LlamaConfig
from jaxchunk.errors import InputError
from jaxchunk.memory_budget import default_memory_budget, pick_chunk_len
from jaxchunk.model import LogitsMode
from jaxchunk.steps import check_room, check_tokens, host_lengths, run_decode_step, run_prefill_chunk

DEFAULT_MAX_INPUT_LEN = 2048
DEFAULT_MAX_ATTENTION_SIZE = 2048 ** 2


def prefill_chunk(params, kv_cache: KVCache, tokens, n_valid=None, *, config: LlamaConfig,
                  attention_impl: str = "auto", logits: LogitsMode = "last"):
    """One checked chunk: tokens [batch, chunk_len], n_valid [batch] (default: all valid).

    Returns (kv_cache, logits) as `jaxchunk.model.model_step`. The input cache is donated: do not use
    it afterwards.
    """
    tokens = check_tokens(tokens, config, 2, "tokens")
    batch, chunk_len = tokens.shape
    if batch != kv_cache.batch or chunk_len == 0:
        raise InputError(f"tokens shape {tokens.shape} does not fit a cache of batch {kv_cache.batch}")
    n_valid = np.full((batch,), chunk_len, np.int32) if n_valid is None else np.asarray(n_valid, np.int32)
    if n_valid.shape != (batch,) or n_valid.min() < 0 or n_valid.max() > chunk_len:
        raise InputError(f"n_valid must be [batch]={batch} ints in [0, {chunk_len}], got {n_valid}")
    check_chunk_fits_ring(kv_cache, chunk_len)
    check_room(host_lengths(kv_cache), n_valid, kv_cache.max_seq_len)
    return run_prefill_chunk(params, kv_cache, tokens, n_valid, config=config, attention_impl=attention_impl,
                             logits=logits)


def decode_step(params, kv_cache: KVCache, tokens, *, config: LlamaConfig, attention_impl: str = "auto",
                lengths: np.ndarray | None = None):
    """One token per row: tokens [batch] -> (kv_cache, logits [batch, vocab]). Cache donated.

    Pass the host-side `lengths` if you track them, to skip reading them back from the device.
    """
    tokens = check_tokens(tokens, config, 1, "tokens")
    if tokens.shape != (kv_cache.batch,):
        raise InputError(f"decode tokens must have shape [batch]=({kv_cache.batch},), got {tokens.shape}")
    lengths = host_lengths(kv_cache) if lengths is None else np.asarray(lengths)
    check_room(lengths, np.ones_like(lengths), kv_cache.max_seq_len)
    return run_decode_step(params, kv_cache, tokens, config=config, attention_impl=attention_impl)


# ----------------------------------------------------------------------------- schedule
def exllama_chunk_len(past: int, max_input_len: int, max_attention_size: int) -> int:
    """exllamav2's bound: the largest q_len with (past + q_len) * q_len <= max_attention_size."""
    q_len = int((math.sqrt(past * past + 4 * max_attention_size) - past) // 2)
    while (past + q_len) * q_len > max_attention_size:  # guard float rounding
        q_len -= 1
    return max(1, min(max_input_len, q_len))


def _pow2_floor(n: int) -> int:
    return 1 << (n.bit_length() - 1)


def _pow2_ceil(n: int) -> int:
    return 1 << (n - 1).bit_length()


def chunk_schedule(prompt_len: int, past: int = 0, *, chunk_size: int | None = None,
                   max_input_len: int = DEFAULT_MAX_INPUT_LEN,
                   max_attention_size: int = DEFAULT_MAX_ATTENTION_SIZE) -> list[tuple[int, int]]:
    """Cut `prompt_len` tokens (after `past` cached ones) into [(chunk_len, n_valid), ...].

    chunk_len is the static (compiled) length, n_valid <= chunk_len the real tokens in that chunk.
    """
    if not isinstance(prompt_len, (int, np.integer)) or prompt_len <= 0:
        raise InputError(f"prompt length must be a positive int, got {prompt_len!r}")
    if not isinstance(max_input_len, (int, np.integer)) or max_input_len <= 0:
        raise InputError(f"max_input_len must be a positive int, got {max_input_len!r}")
    if chunk_size is not None:
        if not isinstance(chunk_size, (int, np.integer)) or not 0 < chunk_size <= max_input_len:
            raise InputError(f"chunk_size must be an int in [1, max_input_len={max_input_len}], got {chunk_size!r}")
        full, rest = divmod(prompt_len, chunk_size)
        return [(chunk_size, chunk_size)] * full + ([(chunk_size, rest)] if rest else [])
    if max_attention_size <= 0:
        raise InputError(f"max_attention_size must be positive, got {max_attention_size!r}")
    schedule, done = [], 0
    while done < prompt_len:
        budget = _pow2_floor(exllama_chunk_len(past + done, max_input_len, max_attention_size))
        remaining = prompt_len - done
        chunk_len = min(budget, _pow2_ceil(remaining))
        n_valid = min(chunk_len, remaining)
        schedule.append((chunk_len, n_valid))
        done += n_valid
    return schedule


# ----------------------------------------------------------------------------- the chunk loop
@dataclasses.dataclass(frozen=True)
class PrefillChunk:
    """One chunk of `iter_prefill`: which tokens of each prompt it held and the step's logits.

    start [batch]: position in each prompt of the chunk's first token; n_valid [batch]: how many of
    that prompt's tokens it held (0 once a prompt is done); chunk_len: the compiled (padded) length;
    logits: the step's logits on device, [batch, vocab] at each row's last token in the chunk
    ("last"; garbage for rows with n_valid == 0), [batch, chunk_len, vocab] ("all") or None ("none").
    kv_cache: the cache after this chunk (the one passed to the next step is donated: do not keep it).
    """

    index: int
    num_chunks: int
    chunk_len: int
    start: np.ndarray
    n_valid: np.ndarray
    logits: object
    kv_cache: KVCache

    def valid_logits(self, row: int) -> np.ndarray:
        """Row `row`'s "all" logits for its real tokens: [n_valid[row], vocab] float32 NumPy."""
        return np.asarray(self.logits[row, :self.n_valid[row]])


def iter_prefill(params, config: LlamaConfig, kv_cache: KVCache, prompts, *, chunk_size: int | str | None = None,
                 max_input_len: int = DEFAULT_MAX_INPUT_LEN, max_attention_size: int = DEFAULT_MAX_ATTENTION_SIZE,
                 attention_impl: str = "auto", logits: LogitsMode = "last",
                 memory_budget_bytes: int | None = None) -> Iterator[PrefillChunk]:
    """The chunk loop, written once: prefill a batch of prompts (one per cache row, lengths may differ)
    chunk by chunk, yielding a `PrefillChunk` after each step. `prefill`, `Model.perplexity` and the
    experiments all run on it; a caller that wants per-chunk work (scoring, timing, watching the cache
    fill) consumes the chunks as they come, so at most one chunk's logits is alive.

    prompts: a sequence of `batch` token-id sequences, or an int array [batch, len].
    chunk_size: an int (fixed chunks, the last one padded), None (exllamav2's max_attention_size rule,
    `chunk_schedule`) or "auto": one fixed chunk length, the largest power of two <= max_input_len (and
    <= the longest prompt rounded up) whose compiled step fits `memory_budget_bytes`
    (jaxchunk.memory_budget; default budget: free device / host memory plus the params and cache).
    Giving memory_budget_bytes implies "auto". logits: "last", "all" or "none" per step.
    Everything is checked on the host before the first step runs (the generator's first `next()`
    raises InputError for a bad prompt, a prompt that does not fit the cache, a bad chunk size).
    A cache with a sliding-window ring (`init_cache(ring_chunk_len=C)`) takes chunks of at most C
    tokens: an explicit chunk_size above C raises InputError; the automatic schedules use
    max_input_len = min(max_input_len, C).
    """
    rows = [check_tokens(p, config, 1, f"prompt {i}") for i, p in enumerate(prompts)]
    if len(rows) != kv_cache.batch:
        raise InputError(f"got {len(rows)} prompts for a cache of batch {kv_cache.batch}")
    prompt_lens = np.array([len(r) for r in rows], np.int32)
    if prompt_lens.min() == 0:
        raise InputError(f"prompt {int(np.argmin(prompt_lens))} is empty")
    lengths = host_lengths(kv_cache)
    check_room(lengths, prompt_lens, kv_cache.max_seq_len)
    if kv_cache.ring_chunk_len is not None:
        if isinstance(chunk_size, (int, np.integer)):
            check_chunk_fits_ring(kv_cache, int(chunk_size))
        max_input_len = min(max_input_len, kv_cache.ring_chunk_len)
    if memory_budget_bytes is not None or chunk_size == "auto":
        if chunk_size not in (None, "auto"):
            raise InputError(f"give chunk_size={chunk_size!r} or memory_budget_bytes, not both")
        budget = default_memory_budget(params, kv_cache) if memory_budget_bytes is None else memory_budget_bytes
        chunk_size, _ = pick_chunk_len(params, kv_cache, budget, config=config,
                                       max_chunk_len=min(max_input_len, _pow2_ceil(int(prompt_lens.max()))),
                                       attention_impl=attention_impl, logits=logits)
    schedule = chunk_schedule(int(prompt_lens.max()), int(lengths.max()), chunk_size=chunk_size,
                              max_input_len=max_input_len, max_attention_size=max_attention_size)
    return _chunks(params, config, kv_cache, rows, prompt_lens, schedule, attention_impl, logits)


def _chunks(params, config, kv_cache, rows, prompt_lens, schedule, attention_impl, logits):
    """The generator behind `iter_prefill` (a separate function so the checks run at the call)."""
    done = np.zeros_like(prompt_lens)
    for index, (chunk_len, _) in enumerate(schedule):
        n_valid = np.clip(prompt_lens - done, 0, chunk_len).astype(np.int32)
        tokens = np.zeros((len(rows), chunk_len), np.int32)
        for b, row in enumerate(rows):
            tokens[b, :n_valid[b]] = row[done[b]:done[b] + n_valid[b]]
        kv_cache, step_logits = run_prefill_chunk(params, kv_cache, tokens, n_valid, config=config,
                                                  attention_impl=attention_impl, logits=logits)
        yield PrefillChunk(index, len(schedule), chunk_len, done.copy(), n_valid, step_logits, kv_cache)
        done += n_valid


def prefill(params, config: LlamaConfig, kv_cache: KVCache, prompts, *, chunk_size: int | str | None = None,
            max_input_len: int = DEFAULT_MAX_INPUT_LEN, max_attention_size: int = DEFAULT_MAX_ATTENTION_SIZE,
            attention_impl: str = "auto", all_logits: bool = False, progress: bool = False,
            memory_budget_bytes: int | None = None):
    """Prefill a batch of prompts (one per cache row, lengths may differ) chunk by chunk (`iter_prefill`,
    whose arguments these are).

    Returns (kv_cache, logits): logits [batch, vocab] (float32) at each row's last prompt token, or with
    all_logits=True a list of `batch` NumPy arrays [len_b, vocab].
    """
    chunks = iter_prefill(params, config, kv_cache, prompts, chunk_size=chunk_size, max_input_len=max_input_len,
                          max_attention_size=max_attention_size, attention_impl=attention_impl,
                          logits="all" if all_logits else "last", memory_budget_bytes=memory_budget_bytes)
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(desc="prefill", unit="chunk")
    last_logits, collected = None, [[] for _ in range(kv_cache.batch)]
    for chunk in chunks:
        kv_cache = chunk.kv_cache
        if bar is not None:
            bar.total = chunk.num_chunks
            bar.update(1)
        if all_logits:
            host = np.asarray(chunk.logits)
            for b, rows in enumerate(collected):
                rows.append(host[b, :chunk.n_valid[b]])
        else:
            # A row's logits are final after its last non-empty chunk.
            last_logits = chunk.logits if last_logits is None else \
                jnp.where((chunk.n_valid > 0)[:, None], chunk.logits, last_logits)
    if bar is not None:
        bar.close()
    if all_logits:
        return kv_cache, [np.concatenate(c) for c in collected]
    return kv_cache, last_logits
