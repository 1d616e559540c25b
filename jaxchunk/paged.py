"""A paged KV cache shared by many sequences, and one jitted step that runs prefill chunks and decode
tokens of many sequences together (the serving step of vLLM / SGLang / jax's ragged paged attention).

- `PagedKVCache`: one pool of pages `[layers, num_pages, page_size, kv_heads, stored_dim]` in any of
  the contiguous cache's formats, keys and values each in its own (`jaxchunk.cache.resolve_cache_formats`),
  scale arrays for the integer ones. It holds no lengths and no page ownership: those are the scheduler's, and arrive
  with each step.
- `MixedStep`: what one step runs, with static shapes (token budget T, max sequences S,
  pages_per_seq P) and traced contents, laid out as `pallas_kernels.paged_attention` describes.
  `build_step` makes one on the host from per-sequence (new tokens, cached length, page ids) and
  checks it first (`check_step`): JAX clamps out-of-range indices silently, so a bad page id or
  length would corrupt the pool without an error.
- `mixed_step(params, paged_cache, step, *, config)`: `jitted_mixed_step`, the pool donated (updated
  in place), named for `jaxchunk.steps.compile_guard`; one compile per (T, S, P), pool shape,
  config, attention impl and logits mode.

    cache = init_paged_cache(config, num_pages=64, page_size=16)
    step = build_step([(prompt_chunk, 0, [5, 2, 9]), ([next_token], 40, [7, 3, 1])], token_budget=64,
                      max_seqs=8, max_pages_per_seq=16, num_pages=cache.num_pages, page_size=cache.page_size)
    cache, logits = mixed_step(params, cache, step, config=config)   # logits [S, vocab]
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from jaxchunk import sharding
from jaxchunk.cache import resolve_cache_formats, write_kv, zero_cache_arrays
from jaxchunk.config import LlamaConfig
from jaxchunk.errors import InputError
from jaxchunk.steps import describe_arrays, describing_call
from jaxchunk.model import (LogitsMode, decoder_layer, embed_tokens, layer_rope_table, lm_head, per_layer_window,
                            scan_layers)
from pallas_kernels.kv_quant import KVQuant
from pallas_kernels.paged_attention import paged_attention, token_sequences

__all__ = ["PagedKVCache", "init_paged_cache", "MixedStep", "StepSequence", "build_step", "check_step",
           "paged_model_step", "jitted_mixed_step", "mixed_step", "gather_sequence_kv"]


# ----------------------------------------------------------------------------- the pool
@struct.dataclass
class PagedKVCache:
    """Keys/values of every layer in one pool of pages.

    keys, values: [layers, num_pages, page_size, kv_heads, stored_dim] in key_quant.dtype /
                  value_quant.dtype (as `KVCache`: stored_dim = head_dim, or head_dim * bits / 8 for
                  the packed integer formats; each side its own).
    key_scales, value_scales: [layers, num_pages, page_size, kv_heads, head_dim / 32] float16 for an
                  integer key / value format, None otherwise.
    key_quant, value_quant: the storage formats of keys and values (static).
    """

    keys: jax.Array
    values: jax.Array
    key_scales: Optional[jax.Array] = None
    value_scales: Optional[jax.Array] = None
    key_quant: Optional[KVQuant] = struct.field(pytree_node=False, default=None)
    value_quant: Optional[KVQuant] = struct.field(pytree_node=False, default=None)

    @property
    def kv_quant(self) -> tuple[Optional[KVQuant], Optional[KVQuant]]:
        """(key format, value format): the paged attention op's `kv_quant`."""
        return self.key_quant, self.value_quant

    @property
    def num_pages(self) -> int:
        return self.keys.shape[1]

    @property
    def page_size(self) -> int:
        return self.keys.shape[2]

    @property
    def nbytes(self) -> int:
        return sum(x.nbytes for x in jax.tree.leaves(self))


def init_paged_cache(config: LlamaConfig, *, num_pages: int, page_size: int, dtype="f32") -> PagedKVCache:
    """A zeroed pool of `num_pages` pages of `page_size` tokens; `dtype` the format of keys and values
    (`jaxchunk.cache.resolve_cache_formats`: one name, "k8v4", "bf16/q4" or a (key, value) tuple)."""
    for name, value in (("num_pages", num_pages), ("page_size", page_size)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise InputError(f"{name} must be a positive int, got {value!r}")
    key_quant, value_quant = resolve_cache_formats(dtype)
    lead = (config.num_layers, num_pages, page_size, config.num_kv_heads)
    keys, values, key_scales, value_scales = zero_cache_arrays(lead, config.head_dim, key_quant, value_quant)
    return PagedKVCache(keys=keys, values=values, key_scales=key_scales, value_scales=value_scales,
                        key_quant=key_quant, value_quant=value_quant)


# ----------------------------------------------------------------------------- the step description
@struct.dataclass
class MixedStep:
    """One step of many sequences (every leaf int32; shapes static, contents traced).

    tokens:     [T] the step's new tokens, sequence after sequence, then padding (T: the token budget).
    cu_q_lens:  [S + 1] sequence s owns tokens cu_q_lens[s] .. cu_q_lens[s+1] - 1; slots >= num_seqs
                repeat cu_q_lens[num_seqs] (q_len 0).
    kv_lens:    [S] tokens cached for s after this step (its new ones included).
    page_table: [S, P] the pool pages of s in order (token j at page j // page_size, slot j % page_size).
    num_seqs:   [] sequences in use.
    Token i of s sits at position kv_lens[s] - q_len[s] + i. Padding tokens write nowhere, read nothing.
    """

    tokens: jax.Array
    cu_q_lens: jax.Array
    kv_lens: jax.Array
    page_table: jax.Array
    num_seqs: jax.Array

    @property
    def token_budget(self) -> int:
        return self.tokens.shape[0]

    @property
    def max_seqs(self) -> int:
        return self.kv_lens.shape[0]

    @property
    def max_pages_per_seq(self) -> int:
        return self.page_table.shape[1]


class StepSequence(NamedTuple):
    """One sequence's part of a step (host side): its new token ids, how many tokens it had cached
    before the step, and its page ids in order (at least enough for cached + len(tokens) tokens)."""

    tokens: Sequence[int]
    cached: int
    pages: Sequence[int]


def build_step(seqs, *, token_budget: int, max_seqs: int, max_pages_per_seq: int, num_pages: int,
               page_size: int, config: LlamaConfig | None = None) -> MixedStep:
    """The `MixedStep` (NumPy arrays) of `seqs`, a list of `StepSequence` or (tokens, cached, pages)
    tuples, checked with `check_step` (InputError naming the sequence and the problem). config: also
    check the token ids against its vocabulary and each kv_len against its context length."""
    seqs = [StepSequence(*s) for s in seqs]
    for name, value in (("token_budget", token_budget), ("max_seqs", max_seqs),
                        ("max_pages_per_seq", max_pages_per_seq)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise InputError(f"{name} must be a positive int, got {value!r}")
    if len(seqs) > max_seqs:
        raise InputError(f"{len(seqs)} sequences do not fit a step of max_seqs={max_seqs}")
    q_lens = np.array([len(s.tokens) for s in seqs], np.int64)
    if q_lens.sum() > token_budget:
        raise InputError(f"the sequences bring {int(q_lens.sum())} new tokens, more than the step's "
                         f"token_budget={token_budget}")
    tokens = np.zeros(token_budget, np.int32)
    cu_q_lens = np.full(max_seqs + 1, q_lens.sum(), np.int32)
    cu_q_lens[0] = 0
    cu_q_lens[1:len(seqs) + 1] = np.cumsum(q_lens)
    kv_lens = np.zeros(max_seqs, np.int32)
    page_table = np.zeros((max_seqs, max_pages_per_seq), np.int32)
    for s, seq in enumerate(seqs):
        ids = np.asarray(seq.tokens)
        if ids.ndim != 1 or (ids.size and not np.issubdtype(ids.dtype, np.integer)):
            raise InputError(f"sequence {s}'s tokens must be a 1-d list of integer ids, got "
                             f"{ids.dtype} of shape {ids.shape}")
        if ids.size and config is not None and (ids.min() < 0 or ids.max() >= config.vocab_size):
            raise InputError(f"sequence {s}'s tokens hold ids outside [0, {config.vocab_size}): "
                             f"min {ids.min()}, max {ids.max()}")
        tokens[cu_q_lens[s]:cu_q_lens[s + 1]] = ids
        pages = np.asarray(seq.pages, np.int64).reshape(-1)
        if len(pages) > max_pages_per_seq:
            raise InputError(f"sequence {s} has {len(pages)} pages, more than max_pages_per_seq={max_pages_per_seq}")
        if not isinstance(seq.cached, (int, np.integer)) or isinstance(seq.cached, bool):
            raise InputError(f"sequence {s}: cached length must be an int, got {seq.cached!r}")
        if config is not None and seq.cached + q_lens[s] > config.max_position_embeddings:
            raise InputError(f"sequence {s}: kv_len {seq.cached + q_lens[s]} exceeds the model's context "
                             f"length {config.max_position_embeddings}")
        if pages.size and (pages.min() < 0 or pages.max() >= num_pages):
            bad = int(pages[(pages < 0) | (pages >= num_pages)][0])
            raise InputError(f"sequence {s}: page id {bad} is outside the pool's pages [0, {num_pages})")
        kv_lens[s] = np.clip(int(seq.cached) + q_lens[s], -2**31, 2**31 - 1)
        page_table[s, :len(pages)] = pages
    step = MixedStep(tokens=tokens, cu_q_lens=cu_q_lens, kv_lens=kv_lens, page_table=page_table,
                     num_seqs=np.int32(len(seqs)))
    check_step(step, num_pages=num_pages, page_size=page_size,
               pages_given=[len(np.asarray(s.pages).reshape(-1)) for s in seqs])
    return step


def check_step(step: MixedStep, *, num_pages: int, page_size: int, pages_given=None) -> None:
    """InputError unless `step` (host arrays) is well formed for a pool of `num_pages` pages of
    `page_size`: cu_q_lens starts at 0 and never decreases, its tokens fit T, num_seqs <= S, every
    sequence in use has 1 <= q_len <= kv_len, its kv_len fits its pages (pages_given[s] of them when
    known, else the page table's width) whose ids are in range, and no page written by one sequence
    in this step is used by another (or twice by the same one)."""
    cu = np.asarray(step.cu_q_lens, np.int64)
    kv_lens = np.asarray(step.kv_lens, np.int64)
    table = np.asarray(step.page_table, np.int64)
    T, S, P = step.token_budget, step.max_seqs, step.max_pages_per_seq
    if (np.ndim(step.tokens) != 1 or table.ndim != 2 or kv_lens.shape != (table.shape[0],)
            or cu.shape != (S + 1,) or np.ndim(step.num_seqs) != 0):
        raise InputError(f"a MixedStep holds tokens [T], cu_q_lens [S + 1], kv_lens [S], page_table [S, P] and "
                         f"a scalar num_seqs; got {np.shape(step.tokens)}, {cu.shape}, {kv_lens.shape}, "
                         f"{table.shape}, {np.shape(step.num_seqs)}")
    num_seqs = int(np.asarray(step.num_seqs))
    if not 0 <= num_seqs <= S:
        raise InputError(f"num_seqs={num_seqs} is outside [0, max_seqs={S}]")
    if cu[0] != 0 or np.any(np.diff(cu) < 0):
        raise InputError(f"cu_q_lens must start at 0 and never decrease, got {cu.tolist()}")
    if cu[num_seqs] > T:
        raise InputError(f"the step's sequences hold {int(cu[num_seqs])} tokens, more than token_budget={T}")
    writer = {}  # page -> the sequence writing it
    used = {}    # page -> the sequences reading or writing it
    for s in range(num_seqs):
        q_len, kv_len = int(cu[s + 1] - cu[s]), int(kv_lens[s])
        if q_len == 0:
            raise InputError(f"sequence {s} has no new tokens: a sequence in a step brings at least one")
        if q_len > kv_len:
            raise InputError(f"sequence {s}: q_len {q_len} > kv_len {kv_len} (kv_len counts the cached "
                             f"tokens plus the new ones, so the cached length would be {kv_len - q_len} < 0)")
        have = P if pages_given is None else int(pages_given[s])
        if kv_len > have * page_size:
            raise InputError(f"sequence {s}: kv_len {kv_len} needs {-(-kv_len // page_size)} pages of "
                             f"{page_size}, it has {have} (capacity {have * page_size})")
        n_used = -(-kv_len // page_size)
        pages = table[s, :n_used]
        if pages.min() < 0 or pages.max() >= num_pages:
            bad = int(pages[(pages < 0) | (pages >= num_pages)][0])
            raise InputError(f"sequence {s}: page id {bad} is outside the pool's pages [0, {num_pages})")
        for j, page in enumerate(pages.tolist()):
            used.setdefault(page, []).append(s)
            if j >= (kv_len - q_len) // page_size:  # a page this step writes into
                writer.setdefault(page, s)
    for page, s in writer.items():
        if len(used[page]) > 1:
            others = sorted(set(used[page]))
            raise InputError(f"page {page} is written by sequence {s} in this step and also used by "
                             f"sequence(s) {others}: a page being written belongs to one sequence, once")


# ----------------------------------------------------------------------------- the step
def paged_model_step(params: dict, config: LlamaConfig, paged_cache: PagedKVCache, step: MixedStep, *,
                     attention_impl: str = "auto", logits: LogitsMode = "last"):
    """Every layer over the step's flat tokens: K/V written into the pages at each token's position
    (quantized on write), then paged attention of each sequence over its pages. Unjitted (see
    `mixed_step`); the per-layer code is `jaxchunk.model.decoder_layer`, as for `model_step`.

    attention_impl: a `pallas_kernels.paged_attention` impl; "auto" is the Pallas mixed kernel on a
    GPU and the xla backend on CPU; "native_cpu" runs decode rows through the native kernel (f32 /
    bf16 pools).
    Returns (paged_cache, logits): logits [S, vocab] at each sequence's last token in the step
    ("last"; garbage for slots >= num_seqs), [T, vocab] ("all"), or None ("none").
    """
    num_tokens = step.tokens.shape[0]
    page_size, num_pages = paged_cache.page_size, paged_cache.num_pages
    seq, pos, real = token_sequences(step.cu_q_lens, step.kv_lens, step.num_seqs, num_tokens)
    page = jnp.take_along_axis(step.page_table[seq], (pos // page_size)[:, None], axis=1)[:, 0]
    # Padding goes to page num_pages, out of range: the scatter drops it.
    write_page = jnp.where(real, page, num_pages)[None, :]       # [1, T]
    write_slot = (pos % page_size)[None, :]                       # [1, T]
    positions = pos[None, :]
    rope_table = layer_rope_table(config)
    key_quant, value_quant = paged_cache.kv_quant
    x = embed_tokens(params, config, step.tokens[None, :])  # [1, T, hidden]

    def layer_fn(carry, layer, index):
        x, pool = carry

        def attend(q, k, v):
            keys, values, key_scales, value_scales = pool
            # The pool as a cache of `num_pages` rows: a token's (row, position) is (page, slot).
            keys, key_scales = write_kv(keys, key_scales, k, index, write_page, write_slot, key_quant)
            values, value_scales = write_kv(values, value_scales, v, index, write_page, write_slot, value_quant)
            attn = per_layer_window(config, index, lambda window: sharding.paged_attention_call(
                paged_attention, config, q[0], keys, values, step.cu_q_lens, step.kv_lens, step.page_table,
                step.num_seqs, layer=index, sm_scale=config.sm_scale, sliding_window=window,
                kv_quant=(key_quant, value_quant), k_scales=key_scales, v_scales=value_scales, impl=attention_impl))
            return attn[None], (keys, values, key_scales, value_scales)

        x, pool = decoder_layer(layer, config, x, positions, rope_table, attend, index)
        return (x, pool), None

    pool = (paged_cache.keys, paged_cache.values, paged_cache.key_scales, paged_cache.value_scales)
    (x, (keys, values, key_scales, value_scales)), _ = scan_layers(layer_fn, (x, pool), params["layers"],
                                                                   rows=x.shape[1])
    new_cache = paged_cache.replace(keys=keys, values=values, key_scales=key_scales, value_scales=value_scales)
    new_cache = sharding.constrain_cache(new_cache, config)  # same sharding out as in: donated in place
    if logits == "none":
        return new_cache, None
    if logits == "all":
        return new_cache, lm_head(params, config, x[0])
    last = jnp.clip(step.cu_q_lens[1:] - 1, 0, num_tokens - 1)
    return new_cache, lm_head(params, config, x[0, last])


@functools.partial(jax.jit, static_argnames=("config", "attention_impl", "logits"), donate_argnames=("paged_cache",))
def jitted_mixed_step(params, paged_cache: PagedKVCache, step: MixedStep, *, config: LlamaConfig,
                      attention_impl: str = "auto", logits: LogitsMode = "last"):
    """One jitted step of many sequences over the paged pool: `paged_model_step` with the pool
    donated (updated in place: the caller's `paged_cache` buffers are deleted). One compile per
    (T, S, P), pool shape and format, config, attention_impl (a `pallas_kernels.paged_attention`
    impl) and logits. It checks nothing: build the step with `build_step` (or run `check_step`).
    Returns (paged_cache, logits [S, vocab] for "last" / [T, vocab] for "all" / None)."""
    return paged_model_step(params, config, paged_cache, step, attention_impl=attention_impl, logits=logits)


def mixed_step(params, paged_cache: PagedKVCache, step: MixedStep, *, config: LlamaConfig,
               attention_impl: str = "auto", logits: LogitsMode = "last"):
    """`jitted_mixed_step` (the pool donated), named for `jaxchunk.steps.compile_guard`: a compile
    inside the guard reports "mixed_step(tokens int32[T], page_table int32[S, P], pool ..., ...)".
    It checks nothing: build the step with `build_step` (or run `check_step`)."""
    with describing_call(lambda: f"mixed_step({describe_arrays(tokens=step.tokens, page_table=step.page_table)}, "
                                 f"pool {describe_arrays(keys=paged_cache.keys)}, "
                                 f"attention_impl={attention_impl!r}, logits={logits!r})"):
        return jitted_mixed_step(params, paged_cache, step, config=config, attention_impl=attention_impl,
                                 logits=logits)


def gather_sequence_kv(paged_cache: PagedKVCache, pages, length: int):
    """One sequence's stored K/V (and scales) as contiguous arrays [layers, length, kv_heads, stored_dim]
    (as a `KVCache` row would hold them), from its page ids; host-side, for tests and inspection."""
    pages = np.asarray(pages, np.int64)
    n = -(-length // paged_cache.page_size)

    def gather(a):
        if a is None:
            return None
        a = a[:, pages[:n]]
        return a.reshape(a.shape[0], -1, *a.shape[3:])[:, :length]

    return tuple(gather(a) for a in (paged_cache.keys, paged_cache.values, paged_cache.key_scales,
                                     paged_cache.value_scales))
