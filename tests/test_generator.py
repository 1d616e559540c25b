"""The dynamic generator (jaxchunk/generator.py) against an independent reference: each job's output
equals generation of its prompt alone over a contiguous cache (`jaxchunk.generate.generate_ids`, the
code under `Model.generate`; `Model.generate` itself for SmolLM2), whatever arrives next to it.

Tolerance: none on ids. Greedy ids are compared exactly: the paged / mixed step only changes which
rows share a matmul and the order of the attention sums (tests/test_paged.py: logits within 1e-4 of
the range, same argmax), and the tiny model's random logits have no near-ties at that scale. The
same holds for sampled ids: a draw flips only if its uniform falls within ~1e-6 of a boundary.
"""
from __future__ import annotations

import numpy as np
import pytest

import jaxchunk
from jaxchunk.api import Model
from jaxchunk.cache import init_cache
from jaxchunk.errors import InputError
from jaxchunk.generate import generate_ids
from jaxchunk.generator import Event, Generator, Job
from jaxchunk.sampling import SamplingParams
from jaxchunk.steps import compile_guard
from jaxchunk.model import init_params
from jaxchunk.testing import tiny_gemma3_config, tiny_model

CONFIG, PARAMS = tiny_model(seed=0, scale=0.2, vocab_size=512, max_position_embeddings=1024)
MODEL = Model(CONFIG, PARAMS, None, max_seq_len=1024)  # token ids only (no tokenizer)
REF_LEN = 1024  # one contiguous cache length for every reference: one set of compiles


def reference(prompt, max_new, **sampling) -> list[int]:
    """The job's output alone: chunked prefill + on-device decode loop over a contiguous cache."""
    seed = sampling.pop("seed", 0)
    _, (ids,) = generate_ids(PARAMS, CONFIG, init_cache(CONFIG, 1, REF_LEN), [prompt], max_new_tokens=max_new,
                             stop_ids=sampling.pop("stop_ids", ()), sampling=SamplingParams(**sampling), seed=seed)
    return ids


def random_jobs(rng, n, max_prompt, max_new=12, arrive_within=20):
    """(arrival step, Job) with random prompt lengths in [1, max_prompt] and output lengths."""
    return [(int(rng.integers(0, arrive_within)),
             Job(rng.integers(0, CONFIG.vocab_size, int(rng.integers(1, max_prompt + 1))).tolist(),
                 max_new_tokens=int(rng.integers(1, max_new + 1)), stop_ids=(), id=i)) for i in range(n)]


def run_arrivals(gen: Generator, arrivals, cancel_at=None, max_steps=5000) -> list[Event]:
    """Enqueue each job at its step, iterate until every job is done; cancel_at: {step: [job ids]}."""
    pending = sorted(arrivals, key=lambda a: a[0])
    events = []
    for t in range(max_steps):
        while pending and pending[0][0] <= t:
            gen.enqueue(pending.pop(0)[1])
        for job_id in (cancel_at or {}).get(t, ()):
            gen.cancel(job_id)
        if not pending and gen.idle:
            return events
        events += gen.iterate()
    raise AssertionError(f"not done after {max_steps} steps")


def check_events(events, jobs):
    """Every job has one started (unless cancelled before it ran) and one finished event, tokens
    events that add up to its output, and nothing after finishing."""
    for job in jobs:
        mine = [e for e in events if e.job_id == job.id]
        assert mine[-1].kind == "finished" and mine[-1].reason == job.finish_reason
        assert [e.kind for e in mine].count("finished") == 1
        assert [i for e in mine if e.kind == "tokens" for i in e.ids] == job.output_ids
        if job.output_ids:
            assert mine[0].kind == "started"
            t = mine[-1].timings
            assert 0 <= t["queued_s"] <= t["ttft_s"] <= t["token_times_s"][-1] <= t["total_s"]
            assert len(t["token_times_s"]) == len(job.output_ids)


# ----------------------------------------------------------------------------- equivalence
@pytest.mark.slow
@pytest.mark.parametrize("page_size", [16, 256])
@pytest.mark.parametrize("token_budget", [16, 64, 256])
def test_greedy_jobs_arriving_at_random_steps_equal_each_prompt_alone(token_budget, page_size):
    rng = np.random.default_rng(token_budget + page_size)
    max_prompt = 5 * page_size if page_size == 16 else 2 * page_size + 100  # 1 to several pages
    arrivals = random_jobs(rng, 8, max_prompt)
    gen = Generator(MODEL, token_budget=token_budget, max_seqs=4, page_size=page_size, num_pages=64)
    events = run_arrivals(gen, arrivals)
    jobs = [job for _, job in arrivals]
    for job in jobs:
        assert job.finish_reason == "length"
        assert job.output_ids == reference(job.prompt, job.max_new_tokens), (job.id, len(job.prompt))
    check_events(events, jobs)
    assert gen.scheduler.pool.num_free == gen.num_pages


def test_gemma3_sliding_window_jobs_equal_each_prompt_alone():
    """Gemma 3 layers (tiny: window 16; local, local, global) through the paged mixed step: prompts
    up to 8 windows long over pages of 16, so local layers' decode and chunk rows skip whole pages
    that a global layer reads; each output equals the prompt generated alone (contiguous cache)."""
    config = tiny_gemma3_config(window=16, vocab_size=512, max_position_embeddings=1024)
    params = init_params(config, seed=3, scale=0.2)
    rng = np.random.default_rng(11)
    arrivals = [(int(rng.integers(0, 10)), Job(rng.integers(0, config.vocab_size, n).tolist(), max_new_tokens=12,
                                               stop_ids=(), id=i)) for i, n in enumerate([5, 40, 90, 17, 130])]
    gen = Generator(Model(config, params, None, max_seq_len=1024), token_budget=32, max_seqs=3, page_size=16,
                    num_pages=64)
    events = run_arrivals(gen, arrivals)
    jobs = [job for _, job in arrivals]
    for job in jobs:
        _, (want,) = generate_ids(params, config, init_cache(config, 1, REF_LEN), [job.prompt], max_new_tokens=12,
                                  stop_ids=())
        assert job.output_ids == want, (job.id, len(job.prompt))
    check_events(events, jobs)
    assert gen.scheduler.pool.num_free == gen.num_pages


@pytest.mark.parametrize("policy", ["prefill_first", "exllamav2"])
def test_other_policies_give_the_same_greedy_ids(policy):
    rng = np.random.default_rng(5)
    arrivals = random_jobs(rng, 6, 70)
    gen = Generator(MODEL, token_budget=32, max_seqs=4, page_size=16, num_pages=64, policy=policy)
    if policy == "prefill_first":  # a prompt runs whole: buckets up to the longest a job may bring
        assert gen.token_buckets == (4, 32, 64, 128, 256, 512, 1024)
    run_arrivals(gen, arrivals)
    for _, job in arrivals:
        assert job.output_ids == reference(job.prompt, job.max_new_tokens)


def test_stop_ids_end_a_job_like_generation_alone():
    rng = np.random.default_rng(11)
    prompt = rng.integers(0, CONFIG.vocab_size, 30).tolist()
    free = reference(prompt, 12)
    stop = free[5]  # a token it emits: generation stops at its first occurrence
    gen = Generator(MODEL, token_budget=16, max_seqs=2, page_size=16, num_pages=16)
    (result,) = gen.generate([prompt], max_new_tokens=12, stop_ids=[stop], return_ids=True)
    assert result.ids == reference(prompt, 12, stop_ids=[stop]) == free[:free.index(stop) + 1]
    assert result.finish_reason == "stop"


def test_sampled_output_depends_on_its_own_seed_only():
    rng = np.random.default_rng(3)
    prompt = rng.integers(0, CONFIG.vocab_size, 40).tolist()
    settings = dict(temperature=1.0, top_p=0.9, top_k=50)
    gen = Generator(MODEL, token_budget=32, max_seqs=4, page_size=16, num_pages=64)

    def run(neighbours: bool, seed=7):
        arrivals = [(2, Job(prompt, max_new_tokens=16, stop_ids=(), seed=seed, id="me", **settings))]
        if neighbours:
            arrivals += [(int(rng.integers(0, 5)), Job(rng.integers(0, 512, int(rng.integers(5, 60))).tolist(),
                                                       max_new_tokens=10, stop_ids=(), seed=int(rng.integers(99)),
                                                       temperature=float(rng.choice([0.0, 0.7, 1.3])), id=i))
                         for i in range(5)]
        run_arrivals(gen, arrivals)
        return arrivals[0][1].output_ids

    alone = run(False)
    assert run(True) == alone and run(True) == alone
    assert run(False, seed=8) != alone
    # The key scheme is Model.generate's for a batch of one: the same draws.
    assert alone == reference(prompt, 16, seed=7, **settings)


# ----------------------------------------------------------------------------- prefix reuse
def test_prefix_reuse_gives_the_same_outputs_and_skips_the_shared_prefill():
    rng = np.random.default_rng(2)
    shared = rng.integers(0, 512, 48).tolist()  # 3 full pages of 16
    prompts = [shared + rng.integers(0, 512, int(n)).tolist() for n in (5, 17, 1, 30)]
    outputs, computed = {}, {}
    for reuse in (False, True):
        gen = Generator(MODEL, token_budget=32, max_seqs=4, page_size=16, num_pages=64, prefix_cache=reuse)
        run = lambda ps: [r.ids for r in gen.generate(ps, max_new_tokens=8, stop_ids=(), return_ids=True)]  # noqa: E731
        outputs[reuse] = run(prompts[:1]) + run(prompts[1:])  # the first one's pages are cached by then
        computed[reuse] = gen.stats.prompt_tokens_computed
        if reuse:
            assert gen.stats.prefix_hit_tokens == 3 * 48
            assert gen.stats.prefix_hit_rate == pytest.approx(3 * 48 / sum(map(len, prompts)))
            gen.clear_prefix_cache()
            assert len(gen.scheduler.pool.free) == gen.num_pages
    assert outputs[True] == outputs[False]
    assert outputs[False] == [reference(p, 8) for p in prompts]
    assert computed[False] == sum(map(len, prompts))
    assert computed[False] - computed[True] == 3 * 48


# ----------------------------------------------------------------------------- a small pool
def test_tiny_pool_preempts_finishes_everything_and_leaks_nothing():
    rng = np.random.default_rng(9)
    arrivals = random_jobs(rng, 10, 60, max_new=30, arrive_within=6)
    gen = Generator(MODEL, token_budget=32, max_seqs=6, page_size=16, num_pages=8)  # 128 tokens for all
    events = run_arrivals(gen, arrivals)
    jobs = [job for _, job in arrivals]
    for job in jobs:
        assert job.output_ids == reference(job.prompt, job.max_new_tokens)
    check_events(events, jobs)
    assert gen.stats.preemptions > 0
    assert sum(job.timings["preemptions"] for job in jobs) == gen.stats.preemptions
    gen.clear_prefix_cache()
    pool = gen.scheduler.pool
    assert len(pool.free) == gen.num_pages and not any(pool.refcount)


def test_cancel_frees_pages_and_the_others_finish():
    rng = np.random.default_rng(4)
    gen = Generator(MODEL, token_budget=16, max_seqs=2, page_size=16, num_pages=32, prefix_cache=False)
    jobs = [gen.enqueue(Job(rng.integers(0, 512, 40).tolist(), max_new_tokens=20, stop_ids=())) for _ in range(3)]
    for _ in range(4):
        gen.iterate()
    running, waiting = jobs[0], jobs[2]
    held = len(gen.scheduler.running[0].pages)
    free = gen.scheduler.pool.num_free
    assert held > 0
    assert gen.cancel(running.id) and gen.cancel(waiting.id)
    assert gen.scheduler.pool.num_free == free + held
    assert not gen.cancel(running.id) and not gen.cancel("nobody")
    events = gen.iterate()
    assert [(e.job_id, e.reason) for e in events if e.kind == "finished"] == [(running.id, "cancelled"),
                                                                                (waiting.id, "cancelled")]
    gen.run()
    assert running.finish_reason == waiting.finish_reason == "cancelled" and not waiting.output_ids
    assert jobs[1].output_ids == reference(jobs[1].prompt, 20)
    assert gen.scheduler.pool.num_free == gen.num_pages


def test_a_job_that_can_never_fit_is_refused_and_nothing_else_is_lost():
    gen = Generator(MODEL, token_budget=16, max_seqs=2, page_size=16, num_pages=8)
    ok = gen.enqueue(Job(list(range(1, 30)), max_new_tokens=5, stop_ids=()))
    with pytest.raises(InputError, match="can never fit"):
        gen.enqueue(Job(list(range(100)), max_new_tokens=50))  # 150 tokens > 8 pages of 16
    with pytest.raises(InputError, match="already in the generator"):
        gen.enqueue(Job([1, 2], id=ok.id))
    with pytest.raises(InputError, match="max_new_tokens"):
        gen.enqueue(Job([1, 2], max_new_tokens=0))
    with pytest.raises(InputError, match="empty"):
        gen.enqueue(Job([]))
    with pytest.raises(InputError, match="vocab|lie in"):
        gen.enqueue(Job([1, 10_000]))
    with pytest.raises(InputError, match="stop strings need a tokenizer"):
        gen.enqueue(Job([1, 2], stop="x"))
    with pytest.raises(InputError, match="text prompt needs a tokenizer"):
        gen.enqueue(Job("hello"))
    gen.run()
    assert ok.output_ids == reference(ok.prompt, 5) and gen.idle


def test_soak_hundreds_of_short_jobs_with_random_arrival_and_cancellation():
    rng = np.random.default_rng(17)
    arrivals = random_jobs(rng, 300, 40, max_new=8, arrive_within=400)
    cancel_at = {}  # 10% of the jobs, a few steps after they arrive: queued, prefilling or decoding
    for arrival, job in arrivals:
        if rng.random() < 0.1:
            cancel_at.setdefault(arrival + int(rng.integers(0, 8)), []).append(job.id)
    gen = Generator(MODEL, token_budget=32, max_seqs=8, page_size=16, num_pages=12)  # 192 tokens: preempts
    events = run_arrivals(gen, arrivals, cancel_at, max_steps=3000)
    jobs = [job for _, job in arrivals]
    cancelled = {i for ids in cancel_at.values() for i in ids}
    assert all(job.finished for job in jobs)
    for job in jobs:
        assert job.finish_reason in ("cancelled", "length")
        if job.finish_reason == "cancelled":
            assert job.id in cancelled and len(job.output_ids) < job.max_new_tokens
        else:
            assert len(job.output_ids) == job.max_new_tokens
    n_cancelled = sum(job.finish_reason == "cancelled" for job in jobs)
    assert n_cancelled >= 10 and any(job.finish_reason == "cancelled" and job.output_ids for job in jobs)
    assert gen.stats.preemptions > 0
    check_events(events, jobs)
    for job in [j for j in jobs if j.finish_reason == "length"][::25]:  # a sample against the reference
        assert job.output_ids == reference(job.prompt, job.max_new_tokens)
    gen.clear_prefix_cache()
    assert len(gen.scheduler.pool.free) == gen.num_pages


# ----------------------------------------------------------------------------- shapes and compiles
def test_warmup_then_nothing_compiles():
    gen = Generator(MODEL, token_budget=32, max_seqs=3, page_size=16, num_pages=64)  # no other test's shapes
    assert gen.step_shapes == [(4, 64), (32, 64)]  # max_seq_len 1024 / 16 pages per sequence
    sampling = [{}, dict(temperature=0.8, top_k=20)]
    info = gen.warmup(sampling=sampling)
    assert info["compiles"] >= len(gen.step_shapes) + len(sampling)
    rng = np.random.default_rng(1)
    with compile_guard():
        arrivals = random_jobs(rng, 6, 120)
        arrivals[0][1].temperature, arrivals[0][1].top_k = 0.8, 20
        run_arrivals(gen, arrivals)
    assert all(job.finish_reason == "length" for _, job in arrivals)


def test_configuration_errors_and_memory_budget():
    gen = Generator(MODEL, token_budget=16, page_size=16, memory_mb=1)
    page_bytes = 2 * CONFIG.num_layers * 16 * CONFIG.num_kv_heads * CONFIG.head_dim * 4
    assert gen.num_pages == 2 ** 20 // page_bytes and gen.max_seqs == 16
    with pytest.raises(InputError, match="policy"):
        Generator(MODEL, policy="fifo", num_pages=8, page_size=16)
    with pytest.raises(InputError, match="not both"):
        Generator(MODEL, num_pages=8, memory_mb=1)
    with pytest.raises(InputError, match="token_buckets"):
        Generator(MODEL, token_budget=32, num_pages=8, page_size=16, token_buckets=(4, 16))
    assert jaxchunk.Generator is Generator and jaxchunk.Job is Job


# ----------------------------------------------------------------------------- SmolLM2, text
@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    from jaxchunk.api import load
    return load(str(smollm2_gguf), max_seq_len=512)


SMOL_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "<|im_start|>user\nWhat is gravity? Answer in two sentences.<|im_end|>\n<|im_start|>assistant\n",
    "Voilà: 日本語 🤔 — translate to English:",
]


@pytest.mark.model
@pytest.mark.slow
def test_smollm2_jobs_equal_model_generate_ids_text_and_stops(smollm2):
    gen = Generator(smollm2, token_budget=16, max_seqs=4, page_size=16, num_pages=64)
    stops = [(), (), ("\n",), ()]
    jobs = [Job(p, max_new_tokens=24, stop=s, id=i) for i, (p, s) in enumerate(zip(SMOL_PROMPTS, stops))]
    events = run_arrivals(gen, [(2 * i, job) for i, job in enumerate(jobs)])
    for job in jobs:
        want = smollm2.generate(job.prompt, max_new_tokens=24, stop=job.stop, return_ids=True)
        assert job.output_ids == want.ids and job.text == want.text and job.finish_reason == want.finish_reason
        pieces = [e.text for e in events if e.job_id == job.id]
        assert "".join(pieces) == job.text and all("\ufffd" not in p for p in pieces)
    check_events(events, jobs)
    assert gen.generate(SMOL_PROMPTS[0], max_new_tokens=8) == smollm2.generate(SMOL_PROMPTS[0], max_new_tokens=8)


# ----------------------------------------------------------------------------- Model.generate(engine=...)
def test_model_generate_engine_checks_its_arguments():
    gen = Generator(MODEL, token_budget=16, max_seqs=2, page_size=16, num_pages=8)
    other = Generator(Model(CONFIG, PARAMS, None, max_seq_len=1024), token_budget=16, max_seqs=2, page_size=16,
                      num_pages=8)
    for bad in ("generator", other, None):
        with pytest.raises(InputError, match="engine"):
            MODEL.generate([[1, 2, 3]], max_new_tokens=2, engine=bad)
    with pytest.raises(InputError, match="stream"):
        MODEL.generate([1, 2, 3], max_new_tokens=2, stream=True, engine=gen)
    with pytest.raises(InputError, match="repetition_penalty"):
        MODEL.generate([[1, 2, 3]], max_new_tokens=2, repetition_penalty=1.2, engine=gen)
    assert gen.idle  # nothing was enqueued by the refused calls


@pytest.mark.model
@pytest.mark.slow
def test_smollm2_model_generate_on_the_generator_equals_the_batch_engine(smollm2):
    """A list of prompts of different lengths (text, with EOS and a stop string in play): the same
    ids, texts and finish reasons with engine=a Generator as on the batch engine (greedy, f32)."""
    kwargs = dict(max_new_tokens=20, stop="\n\n", return_ids=True)
    gen = Generator(smollm2, token_budget=16, max_seqs=4, page_size=16, num_pages=64)
    batch = smollm2.generate(SMOL_PROMPTS, **kwargs)
    on_generator = smollm2.generate(SMOL_PROMPTS, engine=gen, **kwargs)
    assert [(r.ids, r.text, r.finish_reason) for r in on_generator] == [(r.ids, r.text, r.finish_reason)
                                                                         for r in batch]
    assert len({len(r.ids) for r in batch}) > 1  # rows end at different steps: continuous batching is exercised
    assert smollm2.generate(SMOL_PROMPTS[0], max_new_tokens=6, engine=gen) == \
        smollm2.generate(SMOL_PROMPTS[0], max_new_tokens=6)
