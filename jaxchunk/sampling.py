"""Token sampling: pure, jittable functions over logits [batch, vocab] (float32).

The pipeline, in Hugging Face transformers' order and with its semantics:

1. repetition penalty (`repetition_penalty != 1`): every token already seen in the row (prompt and
   generated so far, a [batch, vocab] bool mask kept on device) has its logit divided by the penalty
   if positive, multiplied by it if negative (CTRL / HF `RepetitionPenaltyLogitsProcessor`);
2. temperature == 0: greedy, the argmax of the penalized logits (the filters below never remove
   the argmax, so they cannot change it);
3. otherwise divide by the temperature, then keep only
   - top_k > 0:   the k largest logits (ties with the k-th are kept),
   - top_p < 1:   the smallest set of most likely tokens whose probability reaches top_p
                  (nucleus; a token is kept if the mass of the tokens strictly more likely than
                  it is < top_p, so the most likely token always stays),
   - min_p > 0:   tokens with probability >= min_p * (probability of the most likely token),
   each computed on what the previous filter left; removed tokens get -inf;
4. draw from softmax of what is left (`jax.random.categorical`).

`SamplingParams` is a frozen dataclass, hashable, so jitted callers take it as a static argument:
each distinct setting compiles its own (small) program, and switched-off filters cost nothing.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxchunk.errors import InputError

__all__ = ["SamplingParams", "GREEDY", "process_logits", "sample", "seen_mask_from_rows", "mark_seen",
           "token_logprobs"]


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token. The defaults are greedy decoding with nothing else switched on.

    temperature:        0 for greedy (argmax), else logits are divided by it before sampling.
    top_k:              keep the k most likely tokens; 0 switches it off.
    top_p:              nucleus sampling threshold in (0, 1]; 1 switches it off.
    min_p:              keep tokens at least min_p times as likely as the top one; 0 switches it off.
    repetition_penalty: > 0; 1 switches it off, > 1 discourages tokens already seen.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0

    def __post_init__(self):
        def check(ok: bool, what: str, value):
            if not ok:
                raise InputError(f"{what}, got {value!r}")

        def number(name):
            value = getattr(self, name)
            check(isinstance(value, (int, float)) and not isinstance(value, bool)
                  and math.isfinite(value), f"{name} must be a finite number", value)
            object.__setattr__(self, name, float(value))  # 1 and 1.0: one static jit key
            return float(value)

        check(number("temperature") >= 0, "temperature must be >= 0 (0 means greedy)", self.temperature)
        check(0 < number("top_p") <= 1, "top_p must be in (0, 1] (1 switches it off)", self.top_p)
        check(0 <= number("min_p") <= 1, "min_p must be in [0, 1] (0 switches it off)", self.min_p)
        check(number("repetition_penalty") > 0,
              "repetition_penalty must be > 0 (1 switches it off)", self.repetition_penalty)
        check(isinstance(self.top_k, int) and not isinstance(self.top_k, bool) and self.top_k >= 0,
              "top_k must be an int >= 0 (0 switches it off)", self.top_k)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def uses_seen(self) -> bool:
        """Whether sampling reads the seen-token mask (only the repetition penalty does)."""
        return self.repetition_penalty != 1.0


GREEDY = SamplingParams()


# ----------------------------------------------------------------------------- the filters
def apply_repetition_penalty(logits: jax.Array, seen_mask: jax.Array, penalty: float) -> jax.Array:
    """logits [b, v] f32, seen_mask [b, v] bool -> penalized logits [b, v] (HF semantics)."""
    penalized = jnp.where(logits > 0, logits / penalty, logits * penalty)
    return jnp.where(seen_mask, penalized, logits)


def top_k_filter(logits: jax.Array, k: int) -> jax.Array:
    """Keep logits >= the k-th largest of each row (ties kept), -inf elsewhere. [b, v] -> [b, v]."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits >= kth, logits, -jnp.inf)


def top_p_filter(logits: jax.Array, top_p: float) -> jax.Array:
    """Nucleus filter. [b, v] -> [b, v], -inf outside the nucleus.

    Sorted most likely first, token i stays if the probability mass before it is < top_p; the
    kept tokens are a prefix of the sorted order, so we keep every logit >= the last kept one
    (a threshold instead of scattering a sorted mask back).
    """
    if top_p >= 1.0:
        return logits
    sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    n_keep = jnp.sum(mass_before < top_p, axis=-1, keepdims=True)  # >= 1: the first has mass 0
    threshold = jnp.take_along_axis(sorted_logits, n_keep - 1, axis=-1)
    return jnp.where(logits >= threshold, logits, -jnp.inf)


def min_p_filter(logits: jax.Array, min_p: float) -> jax.Array:
    """Keep tokens with prob >= min_p * max prob, -inf elsewhere. [b, v] -> [b, v]."""
    if min_p <= 0.0:
        return logits
    probs = jax.nn.softmax(logits, axis=-1)
    keep = probs >= min_p * jnp.max(probs, axis=-1, keepdims=True)
    return jnp.where(keep, logits, -jnp.inf)


def process_logits(logits: jax.Array, params: SamplingParams, seen_mask: Optional[jax.Array] = None) -> jax.Array:
    """Everything before the draw: penalty, temperature, top-k, top-p, min-p (module docstring).

    logits [b, v] -> [b, v] float32, -inf for removed tokens; softmax of the result is the
    distribution `sample` draws from. For greedy params only the penalty is applied.
    seen_mask [b, v] bool is required when params.repetition_penalty != 1.
    """
    logits = logits.astype(jnp.float32)
    if params.uses_seen:
        if seen_mask is None:
            raise InputError("repetition_penalty != 1 needs the seen-token mask (seen_mask)")
        logits = apply_repetition_penalty(logits, seen_mask, params.repetition_penalty)
    if params.greedy:
        return logits
    logits = logits / params.temperature
    logits = top_k_filter(logits, params.top_k)
    logits = top_p_filter(logits, params.top_p)
    return min_p_filter(logits, params.min_p)


def sample(logits: jax.Array, key: jax.Array, params: SamplingParams,
           seen_mask: Optional[jax.Array] = None) -> jax.Array:
    """Next token of each row: logits [b, v], a PRNG key -> int32 [b]. Jittable (params static).

    Greedy (temperature 0) ignores `key`. Rows are drawn independently from one key.
    """
    logits = process_logits(logits, params, seen_mask)
    if params.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


# ----------------------------------------------------------------------------- seen-token mask
def seen_mask_from_rows(rows, vocab_size: int) -> jax.Array:
    """[batch, vocab] bool mask of the ids in each of `rows` (sequences of ints; built on the host)."""
    mask = np.zeros((len(rows), vocab_size), bool)
    for b, row in enumerate(rows):
        mask[b, np.asarray(row, np.int64)] = True
    return jnp.asarray(mask)


def mark_seen(seen_mask: jax.Array, tokens: jax.Array, active: jax.Array) -> jax.Array:
    """Add tokens [b] (where active [b] bool) to seen_mask [b, v]. Jittable."""
    vocab = seen_mask.shape[-1]
    index = jnp.where(active, tokens, vocab)  # out of range: dropped
    return seen_mask.at[jnp.arange(seen_mask.shape[0]), index].set(True, mode="drop")


# ----------------------------------------------------------------------------- scoring
@jax.jit
def token_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """log softmax(logits) at the target ids: logits [..., v], targets [...] int -> [...] float32.
    (Perplexity: only these floats need to leave the device, not the [..., vocab] logits.)"""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
