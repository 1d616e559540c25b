"""Memory-budget chunking (jaxchunk.memory_budget, prefill(memory_budget_bytes=...)).

The picker's answers are checked against XLA's memory analysis computed here, straight from
`jitted_prefill_chunk.lower(...).compile()` (not through the module's cache), with the formula stated in
jaxchunk/memory_budget.py: arguments + outputs - aliased + temporaries.
"""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxchunk.cache import init_cache
from jaxchunk.testing import tiny_config
from jaxchunk.errors import InputError
from jaxchunk.memory_budget import candidate_chunk_lens, default_memory_budget, pick_chunk_len
from jaxchunk.model import forward, init_params
from jaxchunk.prefill import prefill
from jaxchunk.steps import jitted_prefill_chunk, step_memory

CONFIG = tiny_config(vocab_size=128, max_position_embeddings=1024)
MAX_SEQ = 256
MAX_CHUNK = 256
IMPL = "reference"  # attention scores [chunk, max_seq]: memory clearly grows with the chunk


@pytest.fixture(scope="module")
def params():
    return init_params(CONFIG, seed=0, scale=0.2)


def shapes(tree):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


def compiled_peak(params, cache, chunk_len, logits="last"):
    """Peak bytes of the compiled step, computed here from XLA's memory analysis."""
    tokens = jax.ShapeDtypeStruct((cache.batch, chunk_len), jnp.int32)
    n_valid = jax.ShapeDtypeStruct((cache.batch,), jnp.int32)
    stats = jitted_prefill_chunk.lower(shapes(params), shapes(cache), tokens, n_valid, config=CONFIG,
                                 attention_impl=IMPL, logits=logits).compile().memory_analysis()
    return (stats.argument_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
            + stats.temp_size_in_bytes)


@pytest.fixture(scope="module")
def peaks(params):
    cache = init_cache(CONFIG, 1, MAX_SEQ)
    return {c: compiled_peak(params, cache, c) for c in candidate_chunk_lens(MAX_CHUNK)}


def test_candidates_are_powers_of_two():
    assert candidate_chunk_lens(256) == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert candidate_chunk_lens(100) == [1, 2, 4, 8, 16, 32, 64]


def test_step_memory_matches_compiled_analysis(params, peaks):
    cache = init_cache(CONFIG, 1, MAX_SEQ)
    for chunk_len in (1, 64, 256):
        memory = step_memory(params, cache, chunk_len, config=CONFIG, attention_impl=IMPL)
        assert memory.peak_bytes == peaks[chunk_len]
        # The donated cache is aliased to the output: counted once, not twice.
        assert memory.alias_bytes >= cache.keys.nbytes + cache.values.nbytes


def test_picker_never_exceeds_the_budget_and_picks_the_largest(params, peaks):
    cache = init_cache(CONFIG, 1, MAX_SEQ)
    low, high = min(peaks.values()), max(peaks.values())
    budgets = sorted(set(np.linspace(low, high * 1.1, 12).astype(int).tolist()) | set(peaks.values()))
    chosen = []
    for budget in budgets:
        chunk_len, memory = pick_chunk_len(params, cache, budget, config=CONFIG, max_chunk_len=MAX_CHUNK,
                                           attention_impl=IMPL)
        assert peaks[chunk_len] <= budget, (budget, chunk_len, peaks)
        assert memory.peak_bytes == peaks[chunk_len]
        assert all(peaks[c] > budget for c in peaks if c > chunk_len), (budget, chunk_len, peaks)
        chosen.append(chunk_len)
    assert chosen[0] == min(peaks, key=peaks.get) and chosen[-1] == MAX_CHUNK
    assert len(set(chosen)) > 3  # the budgets really steer the choice


def test_too_small_budget_names_the_smallest_that_works(params, peaks):
    cache = init_cache(CONFIG, 1, MAX_SEQ)
    smallest = min(peaks.values())
    with pytest.raises(InputError, match="too small") as err:
        pick_chunk_len(params, cache, smallest - 1, config=CONFIG, max_chunk_len=MAX_CHUNK, attention_impl=IMPL)
    named = int(re.search(r"smallest budget that works is (\d+) bytes", str(err.value)).group(1))
    assert named == smallest
    chunk_len, _ = pick_chunk_len(params, cache, named, config=CONFIG, max_chunk_len=MAX_CHUNK,
                                  attention_impl=IMPL)
    assert peaks[chunk_len] == smallest


def test_prefill_with_budget_matches_forward(params, peaks, monkeypatch):
    """prefill picks the chunk from the budget (candidates up to the prompt length rounded up: 128)
    and still computes the same logits as full attention (float32, rounding-level tolerance as in
    test_prefill.py)."""
    import jaxchunk.prefill
    picked = []

    def recording_pick(*args, **kwargs):
        picked.append(pick_chunk_len(*args, **kwargs))
        return picked[-1]

    monkeypatch.setattr(jaxchunk.prefill, "pick_chunk_len", recording_pick)
    ids = np.random.default_rng(3).integers(0, CONFIG.vocab_size, 100).astype(np.int32)
    budget = peaks[32]  # fits 32, not 64 (peaks are for logits="last", what prefill uses here)
    assert peaks[64] > budget
    cache, logits = prefill(params, CONFIG, init_cache(CONFIG, 1, MAX_SEQ), [ids], attention_impl=IMPL,
                            memory_budget_bytes=budget)
    assert [chunk_len for chunk_len, _ in picked] == [32]
    want = np.asarray(forward(params, CONFIG, ids[None])[0, -1])
    np.testing.assert_allclose(np.asarray(logits[0]), want, atol=1e-4 * np.ptp(want))
    assert int(cache.lengths[0]) == 100


def test_prefill_auto_uses_largest_chunk_with_ample_memory(params):
    ids = np.arange(1, 41, dtype=np.int32)
    cache, logits = prefill(params, CONFIG, init_cache(CONFIG, 1, MAX_SEQ), [ids], chunk_size="auto",
                            attention_impl=IMPL)
    want = np.asarray(forward(params, CONFIG, ids[None])[0, -1])
    np.testing.assert_allclose(np.asarray(logits[0]), want, atol=1e-4 * np.ptp(want))


def test_default_budget_counts_resident_arguments(params):
    cache = init_cache(CONFIG, 1, MAX_SEQ)
    resident = sum(a.nbytes for a in jax.tree.leaves((params, cache)))
    assert default_memory_budget(params, cache) > resident


@pytest.mark.parametrize("kwargs, match", [
    (dict(memory_budget_bytes=0), "positive"),
    (dict(memory_budget_bytes=-5), "positive"),
    (dict(memory_budget_bytes=1.5e9), "positive int"),
    (dict(memory_budget_bytes=10 ** 9, chunk_size=16), "not both"),
    (dict(memory_budget_bytes=100), "smallest budget that works"),
    (dict(chunk_size="big"), "chunk_size"),
])
def test_prefill_bad_budget_arguments(params, kwargs, match):
    with pytest.raises(InputError, match=match):
        prefill(params, CONFIG, init_cache(CONFIG, 1, MAX_SEQ), [np.arange(1, 20)], attention_impl=IMPL, **kwargs)


@pytest.mark.slow
def test_experiment_script(tmp_path):
    """experiments/memory_budget.py end to end on the tiny random model: the chosen chunks never
    exceed their budget, the smallest budget fails with the error, larger budgets pick longer chunks."""
    import subprocess
    import sys
    from pathlib import Path
    pd = pytest.importorskip("pandas")
    pytest.importorskip("matplotlib")
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "experiments.memory_budget", "--model", "tiny-random",
                           "--prompt-len", "40", "--n-budgets", "4", "--repeats", "1", "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=root, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    df = pd.read_csv(tmp_path / "results.csv")
    ok = df[df["chunk_len"].notna()]
    assert (ok["peak_mb"] <= ok["budget_mb"] + 1e-9).all()
    assert df["error"].iloc[0] == "no chunk fits" and ok["chunk_len"].max() == 64
    assert ok["chunk_len"].is_monotonic_increasing or ok["chunk_len"].iloc[-1] == 64
    for png in ("budget.png", "candidates.png"):
        assert (tmp_path / png).read_bytes().startswith(b"\x89PNG")
