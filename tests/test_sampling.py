"""Samplers against independent NumPy references (written from Hugging Face's definitions, in their
own formulation: top-p by ascending sort as HF does, not our descending threshold), seeded
reproducibility, greedy == argmax, and empirical frequencies vs the filtered distribution."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from jaxchunk.errors import InputError
from jaxchunk.sampling import (GREEDY, SamplingParams, mark_seen, process_logits, sample, seen_mask_from_rows,
                               token_logprobs)

# A fixed distribution over 12 tokens (distinct logits, no ties), and a second row with negatives.
LOGITS = np.array([
    [2.0, 1.5, 1.2, 0.9, 0.5, 0.3, 0.1, -0.2, -0.5, -1.0, -2.0, -3.0],
    [-0.1, 3.0, -2.0, 0.7, 1.1, -0.4, 2.2, 0.0, -1.3, 0.4, -0.8, 1.6],
], np.float32)


# ----------------------------------------------------------------------------- NumPy references
def softmax(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x[np.isfinite(x)].max())
    return e / e.sum()


def ref_repetition_penalty(row, seen, penalty):
    row = row.astype(np.float64).copy()
    for t in seen:
        row[t] = row[t] / penalty if row[t] > 0 else row[t] * penalty
    return row


def ref_top_k(row, k):
    kth = np.sort(row)[::-1][min(k, len(row)) - 1]  # HF clamps k to the vocabulary
    return np.where(row < kth, -np.inf, row)


def ref_top_p(row, p):
    """HF TopPLogitsWarper: sort ascending, drop tokens whose cumulative prob is <= 1 - p, keep the last."""
    order = np.argsort(row, kind="stable")
    cum = np.cumsum(softmax(row[order]))
    remove = cum <= 1 - p
    remove[-1] = False
    out = row.astype(np.float64).copy()
    out[order[remove]] = -np.inf
    return out


def ref_min_p(row, min_p):
    probs = softmax(row)
    return np.where(probs < min_p * probs.max(), -np.inf, row)


def ref_distribution(row, p: SamplingParams, seen=()):
    row = ref_repetition_penalty(row, seen, p.repetition_penalty) / p.temperature
    if p.top_k:
        row = ref_top_k(row, p.top_k)
    if p.top_p < 1:
        row = ref_top_p(row, p.top_p)
    if p.min_p > 0:
        row = ref_min_p(row, p.min_p)
    return softmax(row)


def ours_distribution(logits, p: SamplingParams, seen_mask=None):
    return np.asarray(jax.nn.softmax(process_logits(jnp.asarray(logits), p, seen_mask), axis=-1), np.float64)


# ----------------------------------------------------------------------------- each filter
def assert_matches_reference(p: SamplingParams, seen_rows=((), ())):
    """Our filtered distribution of LOGITS equals the NumPy reference: same support, same probabilities."""
    mask = seen_mask_from_rows(seen_rows, LOGITS.shape[1]) if p.uses_seen else None
    want = np.array([ref_distribution(row, p, seen) for row, seen in zip(LOGITS, seen_rows)])
    got = ours_distribution(LOGITS, p, mask)
    np.testing.assert_array_equal(got > 0, want > 0)
    np.testing.assert_allclose(got, want, atol=1e-6)
    return got


@pytest.mark.parametrize("k", [1, 3, 5, 11, 12, 50])
def test_top_k(k):
    got = assert_matches_reference(SamplingParams(temperature=1.0, top_k=k))
    assert ((got > 0).sum(-1) == min(k, 12)).all()


@pytest.mark.parametrize("top_p", [0.01, 0.3, 0.5, 0.75, 0.9, 0.99, 1.0])
def test_top_p(top_p):
    assert_matches_reference(SamplingParams(temperature=1.0, top_p=top_p))


@pytest.mark.parametrize("min_p", [0.0, 0.05, 0.2, 0.5, 1.0])
def test_min_p(min_p):
    assert_matches_reference(SamplingParams(temperature=1.0, min_p=min_p))


@pytest.mark.parametrize("penalty", [0.7, 1.0, 1.3, 2.0])
def test_repetition_penalty(penalty):
    seen_rows = [[0, 3, 7, 9], [1, 2, 6]]  # positive and negative logits in both rows
    assert_matches_reference(SamplingParams(temperature=1.0, repetition_penalty=penalty), seen_rows)
    # Greedy applies the penalty too: 2.0 halves row 1's top logit (3.0 -> 1.5 < 2.2).
    mask = seen_mask_from_rows(seen_rows, LOGITS.shape[1])
    greedy = SamplingParams(repetition_penalty=penalty)
    want_argmax = [int(np.argmax(ref_repetition_penalty(row, seen, penalty))) for row, seen in zip(LOGITS, seen_rows)]
    assert sample(jnp.asarray(LOGITS), jax.random.key(0), greedy, mask).tolist() == want_argmax


def test_all_filters_chained():
    p = SamplingParams(temperature=0.7, top_k=8, top_p=0.9, min_p=0.05, repetition_penalty=1.2)
    assert_matches_reference(p, [[0, 5], [1, 11]])


def test_temperature_scales_logits():
    got = ours_distribution(LOGITS, SamplingParams(temperature=0.5))
    np.testing.assert_allclose(got, [softmax(row / 0.5) for row in LOGITS], atol=1e-6)


# ----------------------------------------------------------------------------- greedy, seeds, draws
def test_greedy_is_argmax():
    logits = jax.random.normal(jax.random.key(1), (16, 1000))
    want = np.argmax(np.asarray(logits), -1)
    for p in (GREEDY, SamplingParams(temperature=0.0, top_k=3, top_p=0.5, min_p=0.3)):
        got = sample(logits, jax.random.key(5), p)
        assert got.dtype == jnp.int32
        np.testing.assert_array_equal(got, want)


def test_seeded_sampling_is_reproducible_and_jittable():
    logits = jax.random.normal(jax.random.key(2), (64, 500))
    p = SamplingParams(temperature=1.0, top_p=0.95)
    jitted = jax.jit(sample, static_argnames="params")
    a = jitted(logits, jax.random.key(7), p)
    np.testing.assert_array_equal(a, jitted(logits, jax.random.key(7), p))
    np.testing.assert_array_equal(a, sample(logits, jax.random.key(7), p))
    assert (np.asarray(a) != np.asarray(jitted(logits, jax.random.key(8), p))).any()


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7, top_k=6),
    SamplingParams(temperature=1.3, top_p=0.8),
    SamplingParams(temperature=1.0, min_p=0.1),
    SamplingParams(temperature=0.9, top_k=9, top_p=0.9, min_p=0.02, repetition_penalty=1.5),
], ids=["plain", "top_k", "top_p", "min_p", "all"])
def test_empirical_frequencies_match_filtered_distribution(params):
    """N independent draws (one batch row each) of row 0 of LOGITS: chi-square goodness of fit
    against the reference distribution at significance 1e-4, and nothing outside its support."""
    n = 40_000
    logits = jnp.broadcast_to(jnp.asarray(LOGITS[0]), (n, LOGITS.shape[1]))
    seen = [2, 4]
    mask = seen_mask_from_rows([seen] * n, LOGITS.shape[1])
    draws = np.asarray(sample(logits, jax.random.key(11), params, mask))
    counts = np.bincount(draws, minlength=LOGITS.shape[1])
    want = ref_distribution(LOGITS[0], params, seen)
    support = want > 0
    assert counts[~support].sum() == 0
    expected = n * want[support]
    chi2 = float(((counts[support] - expected) ** 2 / expected).sum())
    bound = stats.chi2.ppf(1 - 1e-4, df=max(int(support.sum()) - 1, 1))
    assert chi2 < bound, (chi2, bound, counts, expected)


# ----------------------------------------------------------------------------- params and helpers
def test_sampling_params_validation_and_hashing():
    assert SamplingParams(temperature=1, repetition_penalty=1) == SamplingParams(temperature=1.0)
    assert hash(SamplingParams(top_p=1)) == hash(SamplingParams())
    assert GREEDY.greedy and not GREEDY.uses_seen
    for bad in (dict(temperature=-0.1), dict(temperature=float("nan")), dict(top_p=0.0), dict(top_p=1.5),
                dict(min_p=-0.1), dict(min_p=2.0), dict(repetition_penalty=0.0), dict(top_k=-1),
                dict(top_k=2.5), dict(temperature="1")):
        with pytest.raises(InputError):
            SamplingParams(**bad)
    with pytest.raises(InputError, match="seen"):
        sample(jnp.asarray(LOGITS), jax.random.key(0), SamplingParams(repetition_penalty=1.2))


def test_seen_mask_helpers():
    mask = seen_mask_from_rows([[1, 3], [0]], 5)
    np.testing.assert_array_equal(mask, [[0, 1, 0, 1, 0], [1, 0, 0, 0, 0]])
    mask = mark_seen(mask, jnp.array([4, 2]), jnp.array([True, False]))
    np.testing.assert_array_equal(mask, [[0, 1, 0, 1, 1], [1, 0, 0, 0, 0]])


def test_token_logprobs():
    targets = np.array([[3, 0], [1, 11]])
    logits = np.stack([LOGITS, LOGITS[::-1]])  # [2, 2, 12]
    got = np.asarray(token_logprobs(jnp.asarray(logits), jnp.asarray(targets)))
    want = [[np.log(softmax(logits[b, i])[targets[b, i]]) for i in range(2)] for b in range(2)]
    np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.peers
def test_matches_transformers_logits_processors():
    """The same pipeline through transformers' own processors (torch), on random logits."""
    torch = pytest.importorskip("torch")
    generation = pytest.importorskip("transformers.generation.logits_process")
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 2, (4, 300)).astype(np.float32)
    seen = rng.integers(0, 300, (4, 20))
    p = SamplingParams(temperature=0.8, top_k=40, top_p=0.9, min_p=0.05, repetition_penalty=1.3)
    processors = generation.LogitsProcessorList([
        generation.RepetitionPenaltyLogitsProcessor(p.repetition_penalty),
        generation.TemperatureLogitsWarper(p.temperature),
        generation.TopKLogitsWarper(p.top_k),
        generation.TopPLogitsWarper(p.top_p),
        generation.MinPLogitsWarper(p.min_p),
    ])
    theirs = processors(torch.tensor(seen), torch.tensor(logits)).softmax(-1).numpy()
    ours = ours_distribution(logits, p, seen_mask_from_rows(seen, 300))
    np.testing.assert_array_equal(ours > 0, theirs > 0)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
