"""The paged KV cache and the mixed step (jaxchunk/paged.py) and the paged attention backends
(pallas_kernels/paged_attention.py).

Model-level tolerance (float32), as tests/test_prefill.py: paging and mixing change only which rows
share a matmul and the order of the softmax / PV summation over key pages, so the differences are
rounding noise: max |dlogit| <= 1e-4 * (logit range) and identical argmax.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from attention_cases import require_native_cpu

from jaxchunk.cache import init_cache

from jaxchunk.errors import CompileAfterWarmupError, InputError
from jaxchunk.model import forward
from jaxchunk.paged import (MixedStep, build_step, check_step, gather_sequence_kv, init_paged_cache,
                            jitted_mixed_step, mixed_step)
from jaxchunk.prefill import prefill
from jaxchunk.steps import compile_guard, count_compiles, shape_of
from jaxchunk.testing import tiny_model
from pallas_kernels.kv_quant import KV_QUANTS, decode, quantize
from pallas_kernels.paged_attention import BACKENDS, paged_attention, paged_attention_xla

CONFIG, PARAMS = tiny_model(seed=0, scale=0.2, vocab_size=512, num_heads=6, head_dim=32, tie_word_embeddings=False,
                            max_position_embeddings=2048)
REL_TOL = 1e-4
OBSERVED = {}  # test -> max |dlogit| / range seen (printed with -s)


def device_step(step: MixedStep) -> MixedStep:
    return jax.tree.map(jnp.asarray, step)


def rel_err(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.abs(got - want).max() / np.ptp(want))


# ----------------------------------------------------------------------------- equivalence
# Five sequences: lengths cross page boundaries of 16 and 64; the longest spans two pages of 256.
SEQ_LENS = (37, 130, 5, 300, 81)
PROMPT_LENS = (30, 120, 2, 290, 64)  # the rest is fed one token per step (decode)
TOKEN_BUDGET, MAX_SEQS = 64, 4


@pytest.fixture(scope="module")
def sequences():
    rng = np.random.default_rng(7)
    return [rng.integers(0, CONFIG.vocab_size, n).astype(np.int32) for n in SEQ_LENS]


@pytest.fixture(scope="module")
def references(sequences):
    """Per sequence: plain full-attention logits [len, vocab], and the K/V of a contiguous cache filled
    by `jaxchunk.prefill.prefill` ([layers, len, kv_heads, d] each)."""
    logits = [np.asarray(forward(PARAMS, CONFIG, jnp.asarray(ids)[None]))[0] for ids in sequences]
    cache = init_cache(CONFIG, len(sequences), max(SEQ_LENS))
    cache, _ = prefill(PARAMS, CONFIG, cache, sequences, chunk_size=64, max_input_len=max(SEQ_LENS))
    kv = [(np.asarray(cache.keys[:, b, :n]), np.asarray(cache.values[:, b, :n])) for b, n in enumerate(SEQ_LENS)]
    return logits, kv


def run_schedule(sequences, page_size: int, seed: int, impl: str = "auto"):
    """A random serving schedule over `sequences`: each step takes up to MAX_SEQS unfinished sequences
    in random order; one still in its prompt takes a chunk of random length (its last partial chunk
    when little is left), one past it decodes a single token. Pages: a random permutation of the pool,
    so a sequence's pages are neither contiguous nor in order. Returns (paged cache, pages per
    sequence, [(sequence, position, logits)] for every sequence's last token of every step)."""
    rng = np.random.default_rng(seed)
    pages_needed = [-(-n // page_size) for n in SEQ_LENS]
    num_pages = sum(pages_needed) + 3
    perm = rng.permutation(num_pages)
    pages, at = [], 0
    for n in pages_needed:
        pages.append(perm[at:at + n].tolist())
        at += n
    max_pages = max(pages_needed)
    cache = init_paged_cache(CONFIG, num_pages=num_pages, page_size=page_size)
    cached = [0] * len(sequences)
    seen, kinds = [], set()
    while any(c < n for c, n in zip(cached, SEQ_LENS)):
        todo = [s for s in rng.permutation(len(sequences)) if cached[s] < SEQ_LENS[s]][:MAX_SEQS]
        budget, batch = TOKEN_BUDGET, []
        for s in todo:
            if budget == 0:
                break
            left = PROMPT_LENS[s] - cached[s]
            if left > 0:
                n = min(left, budget, int(rng.integers(1, 48)))
                kinds.add("last chunk" if n == left else "chunk")
            else:
                n = 1
                kinds.add("decode")
            batch.append((s, n))
            budget -= n
        step = build_step([(sequences[s][cached[s]:cached[s] + n], cached[s], pages[s]) for s, n in batch],
                          token_budget=TOKEN_BUDGET, max_seqs=MAX_SEQS, max_pages_per_seq=max_pages,
                          num_pages=num_pages, page_size=page_size, config=CONFIG)
        cache, logits = mixed_step(PARAMS, cache, device_step(step), config=CONFIG, attention_impl=impl)
        logits = np.asarray(logits)
        for slot, (s, n) in enumerate(batch):
            cached[s] += n
            seen.append((s, cached[s] - 1, logits[slot]))
    assert kinds == {"chunk", "last chunk", "decode"}
    return cache, pages, seen


@pytest.mark.parametrize("page_size, seed", [(16, 0), (64, 1), (256, 2)])
def test_mixed_steps_equal_full_attention(sequences, references, page_size, seed):
    ref_logits, ref_kv = references
    cache, pages, seen = run_schedule(sequences, page_size, seed)
    worst = 0.0
    for s, pos, logits in seen:
        want = ref_logits[s][pos]
        worst = max(worst, rel_err(logits, want))
        assert np.abs(logits - want).max() <= REL_TOL * np.ptp(want), (s, pos)
        assert logits.argmax() == want.argmax(), (s, pos)
    OBSERVED[f"logits page_size {page_size}"] = worst
    for s, n in enumerate(SEQ_LENS):
        keys, values, _, _ = gather_sequence_kv(cache, pages[s], n)
        for got, want in ((keys, ref_kv[s][0]), (values, ref_kv[s][1])):
            np.testing.assert_allclose(np.asarray(got), want, atol=REL_TOL * np.abs(want).max(), rtol=0)


def test_reference_backend_in_the_model(sequences, references):
    """The same schedule through the reference paged backend (gather + full attention)."""
    ref_logits, _ = references
    _, _, seen = run_schedule(sequences, 16, seed=3, impl="reference")
    for s, pos, logits in seen:
        assert rel_err(logits, ref_logits[s][pos]) <= REL_TOL
        assert logits.argmax() == ref_logits[s][pos].argmax()


def step_of(seqs, num_pages=24, page_size=16, T=48, S=4, P=4):
    return device_step(build_step(seqs, token_budget=T, max_seqs=S, max_pages_per_seq=P, num_pages=num_pages,
                                  page_size=page_size))


def test_neighbours_do_not_change_a_sequence():
    """The same sequence (a 20-token chunk after 10 cached tokens) with different neighbours in the same
    (T, S, P) step shape, at the same slot and token offset and at another: the logits are BITWISE
    equal. Why: no reduction mixes different tokens' rows (the matmuls reduce over features only,
    in an order that does not depend on the row on XLA:CPU), and a sequence's attention reads only
    its own pages, in the same query blocks relative to its first token. A backend whose matmul
    tiling depends on the row's place (e.g. a GPU kernel) may lose bitwise equality at another
    offset; the model tolerance is then the contract."""
    rng = np.random.default_rng(11)
    ids = rng.integers(0, CONFIG.vocab_size, 30)
    other = lambda n: rng.integers(0, CONFIG.vocab_size, n)
    results = []
    # Each layout: (sequence list, slot of ours); our pages are 2, 7 in every layout.
    layouts = [
        ([(ids[10:], 10, [2, 7]), (other(5), 40, [1, 3, 4]), ([7], 3, [9])], 0),
        ([(ids[10:], 10, [2, 7]), (other(17), 0, [5, 6]), ([1], 30, [10, 11]), (other(9), 9, [12, 13])], 0),
        ([(ids[10:], 10, [2, 7])], 0),
        ([([4], 20, [1, 3]), (other(6), 0, [4]), (ids[10:], 10, [2, 7])], 2),
    ]
    for seqs, slot in layouts:
        cache = init_paged_cache(CONFIG, num_pages=24, page_size=16)
        # Our first 10 tokens, cached by a step of their own.
        cache, _ = mixed_step(PARAMS, cache, step_of([(ids[:10], 0, [2, 7])]), config=CONFIG)
        cache, logits = mixed_step(PARAMS, cache, step_of(seqs), config=CONFIG)
        results.append(np.asarray(logits[slot]))
    for same in results[1:]:
        np.testing.assert_array_equal(same, results[0])  # bitwise, see the docstring
    want = np.asarray(forward(PARAMS, CONFIG, jnp.asarray(ids)[None]))[0, -1]
    assert rel_err(results[0], want) <= REL_TOL


def test_all_logits():
    rng = np.random.default_rng(5)
    a, b = rng.integers(0, CONFIG.vocab_size, 20), rng.integers(0, CONFIG.vocab_size, 9)
    cache = init_paged_cache(CONFIG, num_pages=24, page_size=16)
    cache, logits = mixed_step(PARAMS, cache, step_of([(a, 0, [3, 1]), (b, 0, [0])]), config=CONFIG, logits="all")
    assert logits.shape == (48, CONFIG.vocab_size)
    for ids, rows in ((a, slice(0, 20)), (b, slice(20, 29))):
        want = np.asarray(forward(PARAMS, CONFIG, jnp.asarray(ids)[None]))[0]
        assert rel_err(logits[rows], want) <= REL_TOL
        np.testing.assert_array_equal(np.asarray(logits[rows]).argmax(-1), want.argmax(-1))


@pytest.mark.parametrize("dtype", ["q4", "bf16", "k8v4", "bf16/q4"])
def test_quantized_pool_matches_quantized_forward(dtype):
    """A quantized pool gives the logits of `forward(kv_quant=dtype)` (K/V through the format and
    back), as the contiguous quantized cache does; looser than f32 (1e-3 of the range) because a
    code may round the other way when K differs by float noise. "k8v4" / "bf16/q4": keys and values
    each in its own format, in the pool and in the reference."""
    rng = np.random.default_rng(6)
    ids = rng.integers(0, CONFIG.vocab_size, 40)
    cache = init_paged_cache(CONFIG, num_pages=24, page_size=16, dtype=dtype)
    for pos, n in ((0, 25), (25, 14), (39, 1)):
        cache, logits = mixed_step(PARAMS, cache, step_of([(ids[pos:pos + n], pos, [5, 2, 8])]), config=CONFIG)
    want = np.asarray(forward(PARAMS, CONFIG, jnp.asarray(ids)[None], kv_quant=dtype))[0, -1]
    OBSERVED[f"{dtype} pool vs forward(kv_quant)"] = rel_err(logits[0], want)
    assert rel_err(logits[0], want) <= 1e-3
    assert int(np.asarray(logits[0]).argmax()) == int(want.argmax())


# ----------------------------------------------------------------------------- compiles, donation, memory
def test_one_compile_per_step_shape():
    """One compile per (T, S, P): every step of a shape after its first compiles nothing, a new
    (T, S, P) compiles once, and compile_guard names the mixed_step call and its shapes."""
    rng = np.random.default_rng(2)
    toks = lambda n: rng.integers(0, CONFIG.vocab_size, n)
    steps = [[(toks(20), 0, [4, 2])], [(toks(3), 20, [4, 2]), (toks(11), 0, [9]), ([5], 7, [1])],
             [([1], 23, [4, 2]), (toks(30), 0, [3, 5])]]
    shapes = [dict(T=40, S=3, P=2), dict(T=48, S=3, P=2), dict(T=40, S=4, P=2), dict(T=40, S=3, P=3)]
    cache = init_paged_cache(CONFIG, num_pages=12, page_size=16)
    before = jitted_mixed_step._cache_size()
    for n, shape in enumerate(shapes):
        kw = dict(num_pages=12, page_size=16, **shape)
        with count_compiles() as first:
            cache, _ = mixed_step(PARAMS, cache, step_of(steps[0], **kw), config=CONFIG)
        with count_compiles() as rest:
            for seqs in steps[1:]:
                cache, _ = mixed_step(PARAMS, cache, step_of(seqs, **kw), config=CONFIG)
            jax.block_until_ready(cache)
        assert first.count >= 1 and rest.count == 0, (shape, first.count, rest.count)
        assert jitted_mixed_step._cache_size() == before + n + 1
    warm = [step_of(steps[1], num_pages=12, page_size=16, **shape) for shape in shapes]
    cold = step_of(steps[1], num_pages=12, page_size=16, T=24, S=3, P=2)  # built outside the guard
    with compile_guard():
        for step in warm:  # nothing compiles
            cache, _ = mixed_step(PARAMS, cache, step, config=CONFIG)
        named = (r"while running mixed_step\(tokens int32\[24\], page_table int32\[3, 2\], "
                 r"pool keys float32\[2, 12, 16, 2, 32\]")
        with pytest.raises(CompileAfterWarmupError, match=named):
            mixed_step(PARAMS, cache, cold, config=CONFIG)


@pytest.mark.parametrize("dtype", ["q8", "bf16/q4"])
def test_pool_is_donated_and_updated_in_place(dtype):
    cache = init_paged_cache(CONFIG, num_pages=8, page_size=16, dtype=dtype)
    old = jax.tree.leaves(cache)
    addresses = [a.unsafe_buffer_pointer() for a in old]
    new, _ = mixed_step(PARAMS, cache, step_of([([1, 2, 3], 0, [6])], num_pages=8), config=CONFIG)
    assert all(a.is_deleted() for a in old)
    # The output pool lives in the input's buffers: written in place, not copied.
    assert [a.unsafe_buffer_pointer() for a in jax.tree.leaves(new)] == addresses
    assert np.asarray(new.keys[:, 6, :3]).any() and not np.asarray(new.keys[:, 6, 3:]).any()
    assert not np.asarray(new.keys[:, :6]).any()  # padding wrote nowhere


def test_compiled_temporaries_do_not_grow_with_the_pool():
    step = step_of([([1, 2, 3], 0, [6])], num_pages=8)
    temps = []
    for num_pages in (8, 512):
        cache = shape_of(init_paged_cache(CONFIG, num_pages=num_pages, page_size=16))
        compiled = jitted_mixed_step.lower(PARAMS, cache, step, config=CONFIG).compile()
        temps.append(compiled.memory_analysis().temp_size_in_bytes)
    pool_growth = 2 * CONFIG.num_layers * (512 - 8) * 16 * CONFIG.num_kv_heads * CONFIG.head_dim * 4
    assert temps[1] - temps[0] < pool_growth / 100, (temps, pool_growth)


# ----------------------------------------------------------------------------- host checks
BASE = dict(token_budget=16, max_seqs=2, max_pages_per_seq=3, num_pages=10, page_size=4)


@pytest.mark.parametrize("seqs, overrides, message", [
    ([([1, 2], 0, [3, 10])], {}, r"page id 10 is outside the pool's pages \[0, 10\)"),
    ([([1, 2], 0, [-1])], {}, r"page id -1 is outside"),
    ([([1, 2, 3], 7, [1, 2])], {}, r"sequence 0: kv_len 10 needs 3 pages of 4, it has 2 \(capacity 8\)"),
    ([([1] * 9, 0, [1, 2, 3]), ([1] * 8, 0, [4, 5])], {}, r"17 new tokens, more than the step's token_budget=16"),
    ([([1], 0, [1]), ([1], 0, [2]), ([1], 0, [3])], {}, r"3 sequences do not fit a step of max_seqs=2"),
    ([([1, 2], -1, [1])], {}, r"sequence 0: q_len 2 > kv_len 1"),
    ([([1], 0, [1]), ([], 3, [2])], {}, r"sequence 1 has no new tokens"),
    ([([1], 0, [1]), ([1], 3, [1])], {},
     r"page 1 is written by sequence 0 in this step and also used by sequence\(s\) \[0, 1\]"),
    ([([1], 4, [2, 2])], {}, r"page 2 is written by sequence 0 .* \[0\]"),
    ([([1], 0, [1, 2, 3, 4])], {}, r"sequence 0 has 4 pages, more than max_pages_per_seq=3"),
    ([([1, 600], 0, [1])], {"config": CONFIG}, r"ids outside \[0, 512\)"),
    ([([1, 2], 2047, [1])], {"config": CONFIG, "page_size": 1024},
     r"kv_len 2049 exceeds the model's context length 2048"),
    ([([1], True, [1])], {}, r"cached length must be an int"),
    ([([1.5], 0, [1])], {}, r"integer ids"),
    ([([1], 0, [1])], {"token_budget": 0}, r"token_budget must be a positive int"),
])
def test_build_step_checks(seqs, overrides, message):
    with pytest.raises(InputError, match=message):
        build_step(seqs, **{**BASE, **overrides})


def test_shared_read_only_prefix_page_is_allowed():
    """Two sequences may read the same full page (a shared prefix) when neither writes it."""
    step = build_step([([1], 4, [1, 2]), ([1, 2], 4, [1, 3])], **BASE)
    assert int(step.num_seqs) == 2 and step.kv_lens.tolist() == [5, 6]


def test_check_step_on_a_hand_made_step():
    step = build_step([([1, 2], 0, [1])], **BASE)
    bad = step.replace(cu_q_lens=np.array([0, 2, 1], np.int32))
    with pytest.raises(InputError, match="never decrease"):
        check_step(bad, num_pages=10, page_size=4)
    with pytest.raises(InputError, match="num_seqs=3 is outside"):
        check_step(step.replace(num_seqs=np.int32(3)), num_pages=10, page_size=4)
    with pytest.raises(InputError, match=r"a MixedStep holds tokens \[T\]"):
        check_step(step.replace(kv_lens=step.kv_lens[:1]), num_pages=10, page_size=4)
    with pytest.raises(InputError, match="kv_len 6 needs 2 pages of 4, it has 1"):  # the table's width, 1
        check_step(step.replace(page_table=step.page_table[:, :1], kv_lens=np.array([6, 0], np.int32)),
                   num_pages=10, page_size=4)


def test_init_paged_cache_checks():
    with pytest.raises(InputError, match="num_pages must be a positive int"):
        init_paged_cache(CONFIG, num_pages=0, page_size=16)
    with pytest.raises(InputError, match="page_size must be a positive int"):
        init_paged_cache(CONFIG, num_pages=4, page_size=2.0)
    with pytest.raises(InputError, match="unknown cache dtype"):
        init_paged_cache(CONFIG, num_pages=4, page_size=16, dtype="q3")
    with pytest.raises(InputError, match="divisible by 32"):  # tiny head_dim 16 < the q8 block
        init_paged_cache(tiny_model(head_dim=16)[0], num_pages=4, page_size=16, dtype="q8")
    cache = init_paged_cache(CONFIG, num_pages=4, page_size=16, dtype="q4")
    assert cache.keys.shape == (CONFIG.num_layers, 4, 16, CONFIG.num_kv_heads, CONFIG.head_dim // 2)
    assert cache.key_scales.shape == (CONFIG.num_layers, 4, 16, CONFIG.num_kv_heads, CONFIG.head_dim // 32)
    # Keys and values apart: each side its own arrays; the pool's bytes are the two formats' sum.
    with pytest.raises(InputError, match="key bits 5"):
        init_paged_cache(CONFIG, num_pages=4, page_size=16, dtype="k5v4")
    lead = (CONFIG.num_layers, 4, 16, CONFIG.num_kv_heads)
    for dtype in ("k8v4", ("bf16", "q4"), "q4/f32"):
        mixed = init_paged_cache(CONFIG, num_pages=4, page_size=16, dtype=dtype)
        k_spec, v_spec = mixed.kv_quant
        assert k_spec != v_spec
        assert mixed.keys.shape == (*lead, k_spec.stored_dim(CONFIG.head_dim)) and mixed.keys.dtype == k_spec.dtype
        assert mixed.values.shape == (*lead, v_spec.stored_dim(CONFIG.head_dim))
        assert mixed.values.dtype == v_spec.dtype
        assert (mixed.key_scales is None) == (not k_spec.scaled)
        assert (mixed.value_scales is None) == (not v_spec.scaled)
        per_token = sum(spec.bytes_per_vector(CONFIG.head_dim) for spec in (k_spec, v_spec))
        assert mixed.nbytes == np.prod(lead) * per_token


# ----------------------------------------------------------------------------- backends vs a float64 oracle
@dataclasses.dataclass(frozen=True)
class PagedCase:
    id: str
    q_lens: tuple[int, ...]   # per sequence in use
    kv_lens: tuple[int, ...]
    page_size: int
    tokens: int               # T (>= sum(q_lens): the rest is padding)
    max_seqs: int             # S (>= len(q_lens): the rest are empty slots)
    pages_per_seq: int
    heads: int = 6
    kv_heads: int = 2
    sliding_window: int | None = None
    soft_cap: float | None = None
    q_gain: float = 1.0       # scale q up so the soft-cap bites


HEAD_DIM = 32  # the integer formats' block
PAGED_CASES = [
    # decode only; kv_len 16 and 32 end exactly at a page boundary.
    PagedCase("decode_only", (1, 1, 1), (5, 16, 32), 16, 8, 3, 3),
    # prefill only: a first chunk, a later chunk ending at a page boundary (48), a long chunk
    # (several query blocks of the xla backend).
    PagedCase("prefill_only", (20, 13, 150), (20, 48, 170), 16, 192, 3, 11),
    # mixed, with empty slots (S 6, 4 in use) and padding tokens; MHA.
    PagedCase("mixed_empty_slots", (1, 24, 7, 1), (64, 24, 40, 1), 16, 48, 6, 4, heads=4, kv_heads=4),
    # GQA 4 on pages of 64, a chunk crossing a page.
    PagedCase("gqa4_page64", (1, 50, 3), (130, 90, 64), 64, 64, 4, 3, heads=8, kv_heads=2),
    # a sliding window over a mixed step (decode rows see only the window's pages).
    PagedCase("window", (1, 30, 5), (100, 60, 9), 16, 40, 3, 7, sliding_window=20),
    # soft-cap with large logits, window too.
    PagedCase("softcap_window", (1, 17), (33, 50), 16, 24, 2, 4, sliding_window=24, soft_cap=2.0, q_gain=4.0),
]
FORMAT_CASES = ("mixed_empty_slots", "softcap_window")  # run in every cache format

# Tolerances by cache format. The oracle runs in float64 on the K/V the pool holds (decoded by
# kv_quant.decode) and the same f32 q, so only the backends' own f32 arithmetic differs: ~1e-7
# relative per op over <= a few hundred terms, |out| <~ 3.
PAGED_TOL = {
    "f32": dict(atol=2e-5, rtol=2e-5),
    # bf16 / fp8 decode exactly to f32: the same arithmetic as f32.
    "bf16": dict(atol=2e-5, rtol=2e-5),
    "fp8_e4m3": dict(atol=2e-5, rtol=2e-5),
    # integer formats: the xla backend also rotates q and the output in f32 (a 32-term Hadamard sum
    # each, ~1e-7 relative) instead of un-rotating K/V: a few times more f32 rounding.
    "q8": dict(atol=5e-5, rtol=5e-5),
    "q4": dict(atol=5e-5, rtol=5e-5),
}
# Keys and values in two formats ("KEY/VALUE"): the looser of the two sides' tolerances (each side
# adds only its own arithmetic: a rotated key format rotates q, a rotated value format the output).
MIXED_FORMATS = ("q8/q4", "bf16/q4", "q4/f32")
for _fmt in MIXED_FORMATS:
    PAGED_TOL[_fmt] = max((PAGED_TOL[side] for side in _fmt.split("/")), key=lambda tol: tol["atol"])


def format_pair(fmt: str):
    """(key spec, value spec) of a test format: one name for both, or "KEY/VALUE"."""
    names = fmt.split("/") if "/" in fmt else (fmt, fmt)
    return tuple(KV_QUANTS[n] for n in names)


def make_paged_inputs(case: PagedCase, fmt: str, seed: int = 0):
    """(q, k_pages, v_pages, k_scales, v_scales, cu_q_lens, kv_lens, page_table, num_seqs) as device
    arrays, plus the per-sequence K/V the pool holds as float64 NumPy ([kv_len, kv_heads, d] each).
    Pages are a random permutation of the pool; unused page-table entries point at other sequences'
    pages; every slot the step does not own (past kv_len, unused pages) holds NaN (f32 / bf16, and
    the scales of the integer formats) to prove nothing leaks."""
    rng = np.random.default_rng(seed)
    n, ps, P, S = len(case.q_lens), case.page_size, case.pages_per_seq, case.max_seqs
    num_pages = n * P + 2
    perm = rng.permutation(num_pages)
    page_table = rng.integers(0, num_pages, (S, P)).astype(np.int32)
    specs = format_pair(fmt)
    k_all = rng.standard_normal((num_pages, ps, case.kv_heads, HEAD_DIM)).astype(np.float32)
    v_all = rng.standard_normal((num_pages, ps, case.kv_heads, HEAD_DIM)).astype(np.float32)
    owned = np.zeros((num_pages, ps), bool)
    for s, kv_len in enumerate(case.kv_lens):
        pages = perm[s * P:(s + 1) * P]
        used = -(-kv_len // ps)
        page_table[s, :used] = pages[:used]
        for j in range(kv_len):
            owned[pages[j // ps], j % ps] = True
    pool, held = [], []  # per side (keys, values): (stored, scales), and the decoded values
    for x, spec in zip((k_all, v_all), specs):
        stored, scales = quantize(jnp.asarray(x), spec)
        stored = np.array(stored)
        if spec.scaled:
            scales = np.array(scales)
            scales[~owned] = np.nan
        elif spec.name in ("f32", "bf16"):
            nan_bits = np.asarray(jax.lax.bitcast_convert_type(jnp.asarray(np.nan, spec.element_dtype), spec.dtype)) \
                if spec.name == "bf16" else np.float32(np.nan)
            stored[~owned] = nan_bits
        pool.append((jnp.asarray(stored), None if scales is None else jnp.asarray(scales)))
        held.append(np.asarray(decode(*pool[-1], spec)))
    (k_stored, k_scales), (v_stored, v_scales) = pool
    held_k, held_v = held
    seq_kv = []
    for s, kv_len in enumerate(case.kv_lens):
        j = np.arange(kv_len)
        pages = page_table[s, j // ps]
        seq_kv.append((held_k[pages, j % ps].astype(np.float64), held_v[pages, j % ps].astype(np.float64)))
    cu = np.full(S + 1, sum(case.q_lens), np.int32)
    cu[0] = 0
    cu[1:n + 1] = np.cumsum(case.q_lens)
    kv_lens = np.zeros(S, np.int32)
    kv_lens[:n] = case.kv_lens
    q = (rng.standard_normal((case.tokens, case.heads, HEAD_DIM)) * case.q_gain).astype(np.float32)
    inputs = (jnp.asarray(q), k_stored, v_stored, k_scales, v_scales, jnp.asarray(cu),
              jnp.asarray(kv_lens), jnp.asarray(page_table), jnp.int32(n))
    return inputs, seq_kv


def numpy_paged_attention(q, cu, seq_kv, case: PagedCase):
    """Independent float64 oracle from the spec: each sequence's rows against its own keys, query i
    at position kv_len - q_len + i; rows past the sequences are zeros."""
    q = np.asarray(q, np.float64)
    out = np.zeros_like(q)
    g = case.heads // case.kv_heads
    scale = 1.0 / np.sqrt(HEAD_DIM)
    for s, (k, v) in enumerate(seq_kv):
        kv_len, q_len = case.kv_lens[s], case.q_lens[s]
        for i in range(q_len):
            pos = kv_len - q_len + i
            j = np.arange(kv_len)
            vis = j <= pos
            if case.sliding_window is not None:
                vis &= j > pos - case.sliding_window
            for h in range(case.heads):
                sc = k[:, h // g] @ q[cu[s] + i, h] * scale
                if case.soft_cap is not None:
                    sc = case.soft_cap * np.tanh(sc / case.soft_cap)
                sc = np.where(vis, sc, -np.inf)
                w = np.exp(sc - sc.max())
                out[cu[s] + i, h] = (w / w.sum()) @ v[:, h // g]
    return out


# The cache formats each backend takes (its `supports` is checked against this in
# test_backends_refuse_the_formats_they_do_not_take): the native CPU kernel reads plain f32 / bf16.
ALL_FORMATS = ("f32", "bf16", "fp8_e4m3", "q8", "q4", *MIXED_FORMATS)
BACKEND_FORMATS = {"native_cpu": ("f32", "bf16")}
CPU_BACKENDS = [b for b in BACKENDS if b != "pallas"]  # the Pallas kernel: its own, smaller cases below
BACKEND_PARAMS = [(b, c, "f32") for c in PAGED_CASES for b in CPU_BACKENDS] + \
                 [(b, c, f) for c in PAGED_CASES if c.id in FORMAT_CASES
                  for f in ALL_FORMATS[1:] for b in CPU_BACKENDS if f in BACKEND_FORMATS.get(b, ALL_FORMATS)]


def oracle_check(case: PagedCase, fmt: str, impl: str, seed: int = 0):
    """`paged_attention(impl=...)` on `case` in cache format `fmt` against the float64 oracle."""
    inputs, seq_kv = make_paged_inputs(case, fmt, seed)
    q, k, v, ks, vs, cu, kv_lens, page_table, num_seqs = inputs
    out = paged_attention(q, k, v, cu, kv_lens, page_table, num_seqs, sliding_window=case.sliding_window,
                          soft_cap=case.soft_cap, kv_quant=None if fmt == "f32" else format_pair(fmt), k_scales=ks,
                          v_scales=vs, impl=impl)
    assert out.shape == q.shape and out.dtype == q.dtype
    out = np.asarray(out)
    assert np.isfinite(out).all(), "NaN/inf leaked into the output"
    want = numpy_paged_attention(q, np.asarray(cu), seq_kv, case)
    assert (out[sum(case.q_lens):] == 0).all()  # padding rows: exact zeros
    np.testing.assert_allclose(out, want, **PAGED_TOL[fmt])


@pytest.mark.parametrize("backend, case, fmt", BACKEND_PARAMS,
                         ids=[f"{b}-{c.id}-{f}" for b, c, f in BACKEND_PARAMS])
def test_backend_against_float64_oracle(backend, case, fmt):
    if backend == "native_cpu":
        require_native_cpu()
    oracle_check(case, fmt, backend)


@pytest.mark.parametrize("pages_per_block", [1, 3])
@pytest.mark.parametrize("case_id", ["prefill_only", "window"])
def test_xla_key_blocks_of_any_number_of_pages(case_id, pages_per_block):
    """The default reads 256 keys per loop step (16 pages of 16 in the cases above); one page per
    step and a count that does not divide pages_per_seq give the same result."""
    case = next(c for c in PAGED_CASES if c.id == case_id)
    inputs, seq_kv = make_paged_inputs(case, "f32")
    q, k, v, _, _, cu, kv_lens, page_table, num_seqs = inputs
    out = paged_attention_xla(q, k, v, cu, kv_lens, page_table, num_seqs, sliding_window=case.sliding_window,
                              pages_per_block=pages_per_block)
    np.testing.assert_allclose(np.asarray(out), numpy_paged_attention(q, np.asarray(cu), seq_kv, case),
                               **PAGED_TOL["f32"])


def test_xla_temporaries_do_not_follow_pages_per_seq():
    """The xla backend's compiled temporaries are one key block per query block, whatever the page
    table's width (max context) is; the reference's grow with tokens x pages_per_seq x page_size."""
    def temp(impl, pages_per_seq):
        args = (jax.ShapeDtypeStruct((64, 6, HEAD_DIM), jnp.float32),
                *[jax.ShapeDtypeStruct((600, 16, 2, HEAD_DIM), jnp.float32)] * 2,
                jax.ShapeDtypeStruct((5,), jnp.int32), jax.ShapeDtypeStruct((4,), jnp.int32),
                jax.ShapeDtypeStruct((4, pages_per_seq), jnp.int32), jax.ShapeDtypeStruct((), jnp.int32))
        fn = jax.jit(lambda *a: paged_attention(*a, impl=impl))
        return fn.lower(*args).compile().memory_analysis().temp_size_in_bytes

    xla = [temp("xla", p) for p in (4, 128)]
    assert xla[1] - xla[0] < 64 * 1024, xla  # the padded page table only
    reference = [temp("reference", p) for p in (4, 128)]
    assert reference[1] > 10 * reference[0], reference


def test_backend_table_and_errors():
    assert list(BACKENDS) == ["pallas", "native_cpu", "xla", "reference"]
    assert BACKENDS["reference"].auto_platforms == ()
    assert BACKENDS["native_cpu"].auto_platforms == ()  # measured: paged_attention.py's native CPU section
    inputs, _ = make_paged_inputs(PAGED_CASES[0], "f32")
    q, k, v, _, _, cu, kv_lens, page_table, num_seqs = inputs
    with pytest.raises(ValueError, match="impl must be one of"):
        paged_attention(q, k, v, cu, kv_lens, page_table, num_seqs, impl="nope")
    with pytest.raises(ValueError, match=r"q must be \[tokens, heads, head_dim\]"):
        paged_attention(q[None], k, v, cu, kv_lens, page_table, num_seqs)
    with pytest.raises(ValueError, match="cu_q_lens"):
        paged_attention(q, k, v, cu[:-1], kv_lens, page_table, num_seqs)


# ----------------------------------------------------------------------------- the native CPU kernel
def test_native_kernel_reads_only_decode_rows():
    """The kernel alone: rows of sequences with q_len <= max_q_len match the oracle, every other row
    (prefill chunks: the xla loop's, and padding) is exactly zero, whatever max_q_len."""
    native_cpu = require_native_cpu()
    case = next(c for c in PAGED_CASES if c.id == "mixed_empty_slots")  # q_lens 1, 24, 7, 1
    inputs, seq_kv = make_paged_inputs(case, "f32")
    q, k, v, _, _, cu, kv_lens, page_table, num_seqs = inputs
    want = numpy_paged_attention(q, np.asarray(cu), seq_kv, case)
    cu_host = np.asarray(cu)
    for max_q_len in (1, 8, 24):
        out = np.asarray(native_cpu.paged_decode_attention_cpu(q, k, v, cu, kv_lens, page_table, num_seqs,
                                                               sm_scale=HEAD_DIM ** -0.5, max_q_len=max_q_len))
        for s, q_len in enumerate(case.q_lens):
            rows = slice(cu_host[s], cu_host[s + 1])
            if q_len <= max_q_len:
                np.testing.assert_allclose(out[rows], want[rows], **PAGED_TOL["f32"])
            else:
                assert (out[rows] == 0).all(), (max_q_len, s)
        assert (out[sum(case.q_lens):] == 0).all()


def test_native_kernel_refuses_to_read_outside_the_pool():
    """The host checks the step; the kernel checks again what it reads (JAX would not)."""
    native_cpu = require_native_cpu()
    case = PAGED_CASES[0]  # decode only
    inputs, _ = make_paged_inputs(case, "f32")
    q, k, v, _, _, cu, kv_lens, page_table, num_seqs = inputs
    call = lambda table, lens: np.asarray(native_cpu.paged_decode_attention_cpu(
        q, k, v, cu, lens, table, num_seqs, sm_scale=1.0))
    with pytest.raises(Exception, match="page id outside the pool"):
        call(page_table.at[1, 0].set(k.shape[0]), kv_lens)
    with pytest.raises(Exception, match="past the sequence's pages"):
        call(page_table, kv_lens.at[0].set(case.pages_per_seq * case.page_size + 1))


def test_native_all_rows_kernel_refuses_to_read_outside_the_pool():
    """paged_attention_cpu reads every sequence (chunks by the flash kernel): each one's lengths and
    page ids are checked in the kernel too."""
    native_cpu = require_native_cpu()
    case = next(c for c in PAGED_CASES if c.id == "prefill_only")
    inputs, _ = make_paged_inputs(case, "f32")
    q, k, v, _, _, cu, kv_lens, page_table, num_seqs = inputs
    call = lambda table, lens: np.asarray(native_cpu.paged_attention_cpu(
        q, k, v, cu, lens, table, num_seqs, sm_scale=1.0))
    call(page_table, kv_lens)
    with pytest.raises(Exception, match="page id outside the pool"):
        call(page_table.at[0, 0].set(-1), kv_lens)
    with pytest.raises(Exception, match="past the sequence's pages"):
        call(page_table, kv_lens.at[0].set(case.pages_per_seq * case.page_size + 1))


def test_native_backend_supports_names_what_it_refuses(monkeypatch):
    from pallas_kernels import native_cpu
    require_native_cpu()
    supports = BACKENDS["native_cpu"].supports
    q = jax.ShapeDtypeStruct((8, 6, HEAD_DIM), jnp.float32)
    pages = lambda dtype, d=HEAD_DIM: jax.ShapeDtypeStruct((3, 10, 16, 2, d), dtype)
    step = (jax.ShapeDtypeStruct((5,), jnp.int32), jax.ShapeDtypeStruct((4,), jnp.int32),
            jax.ShapeDtypeStruct((4, 3), jnp.int32), jax.ShapeDtypeStruct((), jnp.int32))
    assert supports(q, pages(jnp.float32), pages(jnp.float32), *step) is None
    assert supports(q, pages(jnp.uint16), pages(jnp.uint16), *step, kv_quant=format_pair("bf16")) is None
    assert "cache q8 stored as uint8" in supports(q, pages(jnp.uint8), pages(jnp.uint8), *step,
                                                  kv_quant=format_pair("q8"))
    assert "keys q8 and values q4" in supports(q, pages(jnp.uint8), pages(jnp.uint8, 16), *step,
                                               kv_quant=format_pair("q8/q4"))
    q48 = jax.ShapeDtypeStruct((8, 6, 48), jnp.float32)
    assert "head_dim 48" in supports(q48, pages(jnp.float32, 48), pages(jnp.float32, 48), *step)
    monkeypatch.setattr(native_cpu, "available", lambda: False)
    monkeypatch.setattr(native_cpu, "unavailable_reason", lambda: "no C++ compiler found")
    assert "did not build: no C++ compiler found" in supports(q, pages(jnp.float32), pages(jnp.float32), *step)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert "CPU backend" in supports(q, pages(jnp.float32), pages(jnp.float32), *step)


def test_native_backend_in_the_model(sequences, references):
    """The random schedule (chunks, last chunks, decodes; page 16) with attention_impl="native_cpu":
    decode rows through the native decode kernel, chunks through the native flash kernel, same
    tolerance."""
    require_native_cpu()
    ref_logits, _ = references
    _, _, seen = run_schedule(sequences, 16, seed=4, impl="native_cpu")
    for s, pos, logits in seen:
        assert rel_err(logits, ref_logits[s][pos]) <= REL_TOL
        assert logits.argmax() == ref_logits[s][pos].argmax()


def test_native_backend_with_a_bf16_pool():
    require_native_cpu()
    rng = np.random.default_rng(8)
    ids = rng.integers(0, CONFIG.vocab_size, 30)
    cache = init_paged_cache(CONFIG, num_pages=24, page_size=16, dtype="bf16")
    for pos, n in ((0, 27), (27, 1), (28, 1), (29, 1)):
        cache, logits = mixed_step(PARAMS, cache, step_of([(ids[pos:pos + n], pos, [5, 2])]), config=CONFIG,
                                   attention_impl="native_cpu")
    want = np.asarray(forward(PARAMS, CONFIG, jnp.asarray(ids)[None], kv_quant="bf16"))[0, -1]
    assert rel_err(logits[0], want) <= 1e-3  # the quantized pool's tolerance (see above)
    assert int(np.asarray(logits[0]).argmax()) == int(want.argmax())


# ----------------------------------------------------------------------------- the Pallas mixed kernel
# Interpret mode is slow (every program of the grid runs in Python-level JAX): small cases, each
# still ragged. (case, cache formats)
PALLAS_CASES = [
    # a decode row, a first chunk, a last partial chunk, an empty slot, padding tokens; GQA 3.
    (PagedCase("pallas_mixed", (1, 20, 3), (40, 20, 19), 16, 32, 4, 3),
     ("f32", "bf16", "q4", "q8/q4")),
    # decode only, kv_len at page boundaries (16, 32), MHA.
    (PagedCase("pallas_decode_only", (1, 1, 1), (16, 32, 7), 16, 4, 3, 2, heads=2, kv_heads=2), ("f32",)),
    # GQA 4 on pages of 64 (two key tiles per page), a chunk crossing a page.
    (PagedCase("pallas_gqa4_page64", (1, 10), (100, 70), 64, 16, 2, 2, heads=8, kv_heads=2), ("f32", "fp8_e4m3")),
    # sliding window, soft-cap with large logits.
    (PagedCase("pallas_softcap_window", (1, 9), (33, 30), 16, 12, 2, 3, sliding_window=12, soft_cap=2.0,
               q_gain=4.0), ("f32",)),
]
PALLAS_PARAMS = [(c, f) for c, fmts in PALLAS_CASES for f in fmts]


@pytest.mark.parametrize("case, fmt", PALLAS_PARAMS, ids=[f"{c.id}-{f}" for c, f in PALLAS_PARAMS])
def test_pallas_kernel_against_float64_oracle_interpreted(case, fmt):
    oracle_check(case, fmt, "pallas")


def test_pallas_kernel_block_sizes_and_supports():
    """Smaller tiles than the defaults (two key tiles per page of 16, several row tiles per
    sequence) give the same result; the compiled kernel's shape limits are named."""
    from pallas_kernels.paged_flash_attention import PagedBlockSizes, paged_flash_attention, paged_flash_supports
    case = PALLAS_CASES[0][0]
    inputs, seq_kv = make_paged_inputs(case, "f32")
    q, k, v, _, _, cu, kv_lens, page_table, num_seqs = inputs
    out = paged_flash_attention(q, k, v, cu, kv_lens, page_table, num_seqs,
                                block_sizes=PagedBlockSizes(block_q=16, block_k=8), interpret=True)
    np.testing.assert_allclose(np.asarray(out), numpy_paged_attention(q, np.asarray(cu), seq_kv, case),
                               **PAGED_TOL["f32"])
    with pytest.raises(ValueError, match="block_k 12 must divide page_size 16"):
        paged_flash_attention(q, k, v, cu, kv_lens, page_table, num_seqs, block_sizes=PagedBlockSizes(16, 12),
                              interpret=True)
    assert paged_flash_supports(q, k, interpret=True) is None
    assert paged_flash_supports(q, k, interpret=False) is None
    assert "head_dim 48" in paged_flash_supports(jax.ShapeDtypeStruct((4, 2, 48), jnp.float32), k, interpret=False)
    assert "page_size 8" in paged_flash_supports(q, jax.ShapeDtypeStruct((3, 8, 2, 32), jnp.float32),
                                                 interpret=False)
    assert BACKENDS["pallas"].auto_platforms == ("gpu",)


@pytest.mark.parametrize("case, fmt", PALLAS_PARAMS, ids=[f"{c.id}-{f}" for c, f in PALLAS_PARAMS])
def test_pallas_kernel_lowers_to_triton_without_a_gpu(case, fmt):
    """The compiled path's first half, checked here: `jax.export` for platform "cuda" runs the
    Pallas -> Triton lowering (interpret=False) on this CPU-only machine, which rejects what
    Triton cannot take (non-power-of-two tiles, two indexers on one load, unsupported ops). The
    Triton -> PTX compile and the numbers need a GPU (tests/test_paged_gpu.py)."""
    from jax import export

    from pallas_kernels.paged_flash_attention import paged_flash_attention
    inputs, _ = make_paged_inputs(case, fmt)
    q, k, v, ks, vs, cu, kv_lens, page_table, num_seqs = inputs
    fn = jax.jit(lambda *a, **kw: paged_flash_attention(*a, sliding_window=case.sliding_window, soft_cap=case.soft_cap,
                                                        kv_quant=None if fmt == "f32" else format_pair(fmt),
                                                        interpret=False, **kw))
    triton_call = "__gpu$xla.gpu.triton"
    lower = export.export(fn, platforms=["cuda"], disabled_checks=[export.DisabledSafetyCheck.custom_call(triton_call)])
    exported = lower(q, k, v, cu, kv_lens, page_table, num_seqs, k_scales=ks, v_scales=vs)
    text = exported.mlir_module()
    assert text.count(triton_call) == 1 and "jaxchunk_paged_flash" in text


def test_pallas_backend_in_the_model():
    """Two mixed steps through `mixed_step(attention_impl="pallas")` (interpret mode): a chunk, then
    a decode row beside a new chunk, against `forward` per sequence."""
    rng = np.random.default_rng(9)
    a, b = rng.integers(0, CONFIG.vocab_size, 13), rng.integers(0, CONFIG.vocab_size, 6)
    cache = init_paged_cache(CONFIG, num_pages=8, page_size=16)
    cache, _ = mixed_step(PARAMS, cache, step_of([(a[:12], 0, [3])], num_pages=8, T=16, S=2, P=1), config=CONFIG,
                          attention_impl="pallas")
    cache, logits = mixed_step(PARAMS, cache, step_of([(a[12:], 12, [3]), (b, 0, [6])], num_pages=8, T=16, S=2, P=1),
                               config=CONFIG, attention_impl="pallas")
    for slot, ids in enumerate((a, b)):
        want = np.asarray(forward(PARAMS, CONFIG, jnp.asarray(ids)[None]))[0, -1]
        assert rel_err(logits[slot], want) <= REL_TOL
        assert int(np.asarray(logits[slot]).argmax()) == int(want.argmax())


def test_report_observed_tolerances():
    """Prints what the model-level tests measured (run with -s); runs last in this file."""
    for name, value in OBSERVED.items():
        print(f"max |dlogit| / range, {name}: {value:.2e}")
