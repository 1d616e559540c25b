"""The generator's host-side scheduler (jaxchunk/scheduler.py), without a model.

A simulated pool stands in for the KV cache: running a chunk writes each token id into its
(page, slot), and before that every position the chunk attends to (0 .. start-1) is read back and
compared with the request's own tokens. So a page shared wrongly, revived with other contents,
overwritten while another request still reads it, or missing, fails here, whatever the policy.
"""
from __future__ import annotations

import numpy as np
import pytest

from jaxchunk.errors import InputError
from jaxchunk.scheduler import POLICIES, PagePool, Request, Scheduler, page_hash


def make_request(rid, prompt, max_new):
    return Request(id=rid, tokens=list(prompt), prompt_len=len(prompt), max_tokens=len(prompt) + max_new)


def next_token(tokens) -> int:
    """A deterministic stand-in for the model: depends on the whole sequence so far."""
    return int(sum((i + 1) * t for i, t in enumerate(tokens)) % 97)


class Simulation:
    """Runs a Scheduler to completion with simulated pool contents; checks every step."""

    def __init__(self, scheduler: Scheduler):
        self.s = scheduler
        self.content = np.full((scheduler.pool.num_pages, scheduler.page_size), -1, np.int64)
        self.outputs = {}
        self.max_new = {}
        self.calls = []

    def add(self, request, max_new):
        self.max_new[request.id] = max_new
        self.s.add(request)

    def step(self):
        s, size = self.s, self.s.page_size
        calls = s.schedule()
        self.calls.append(calls)
        seen = set()
        for call in calls:
            assert 0 < len(call) <= s.max_seqs
            if s.policy == "stall_free":
                assert sum(c.num_tokens for c in call) <= s.token_budget
            written = {}
            for chunk in call:
                r = chunk.request
                assert r in s.running and r not in seen
                seen.add(r)
                assert chunk.start == r.num_computed and chunk.num_tokens >= 1
                assert len(r.pages) * size >= chunk.start + chunk.num_tokens
                assert len(r.pages) <= s.max_pages_per_seq
                for pos in range(chunk.start):  # what attention reads
                    assert self.content[r.pages[pos // size], pos % size] == r.tokens[pos], (r.id, pos)
                for page in r.pages[chunk.start // size:]:
                    assert s.pool.refcount[page] == 1, "a page being written is shared"
                    assert written.setdefault(page, r.id) == r.id
            for chunk in call:
                r = chunk.request
                for i, pos in enumerate(range(chunk.start, chunk.start + chunk.num_tokens)):
                    self.content[r.pages[pos // size], pos % size] = chunk.tokens[i]
                s.commit(chunk)
                if chunk.samples:
                    r.tokens.append(next_token(r.tokens))
                    if len(r.tokens) - r.prompt_len == self.max_new[r.id]:
                        self.outputs[r.id] = r.tokens[r.prompt_len:]
                        s.remove(r)
        self.check_refcounts()
        return calls

    def check_refcounts(self):
        s = self.s
        counts = np.zeros(s.pool.num_pages, int)
        for r in s.running:
            for page in r.pages:
                counts[page] += 1
        for r in s.waiting:
            assert not r.pages
        assert counts.tolist() == s.pool.refcount
        free = set(s.pool.free) | set(s.pool.cached)
        assert free == {p for p in range(s.pool.num_pages) if counts[p] == 0}
        assert len(s.pool.free) + len(s.pool.cached) == len(free)

    def run(self, arrivals=(), max_steps=10_000):
        """arrivals: [(step, request, max_new)]; runs until everything is done."""
        pending = sorted(arrivals, key=lambda a: a[0])
        for t in range(max_steps):
            while pending and pending[0][0] <= t:
                _, request, max_new = pending.pop(0)
                self.add(request, max_new)
            if not pending and self.s.idle:
                return t
            self.step()
        raise AssertionError("did not finish: a deadlock or livelock")


def expected(prompt, max_new):
    tokens = list(prompt)
    for _ in range(max_new):
        tokens.append(next_token(tokens))
    return tokens[len(prompt):]


def random_workload(rng, n, max_prompt, max_new, vocab=50, shared=None):
    arrivals = []
    for i in range(n):
        prompt = rng.integers(0, vocab, int(rng.integers(1, max_prompt + 1))).tolist()
        if shared is not None and rng.random() < 0.5:
            prompt = list(shared) + prompt
        arrivals.append((int(rng.integers(0, 30)), make_request(i, prompt, 0), int(rng.integers(1, max_new + 1))))
    for _, r, m in arrivals:
        r.max_tokens = r.prompt_len + m
    return arrivals


# ----------------------------------------------------------------------------- the pool
def test_page_pool_refcounts_lru_and_revival():
    pool = PagePool(3)
    a, b, c = pool.allocate(), pool.allocate(), pool.allocate()
    assert pool.allocate() is None and pool.num_free == 0
    pool.register(a, b"A")
    pool.register(b, b"B")
    assert pool.share(b"A") == a and pool.refcount[a] == 2
    pool.release(a)
    pool.release(a)
    pool.release(b)
    assert list(pool.cached) == [a, b] and pool.num_free == 2
    assert pool.share(b"B") == b and pool.refcount[b] == 1 and list(pool.cached) == [a]  # revived
    pool.release(c)
    assert pool.allocate() == c  # plain free pages go before cached ones
    assert pool.allocate() == a and b"A" not in pool.page_of  # then the least recently released
    with pytest.raises(RuntimeError):
        PagePool(1).release(0)


def test_page_hash_is_chained():
    one, two = page_hash(None, [1, 2]), page_hash(None, [3, 4])
    assert page_hash(one, [3, 4]) != two  # the same page after a different prefix
    assert page_hash(one, [3, 4]) == page_hash(page_hash(None, [1, 2]), [3, 4])


# ----------------------------------------------------------------------------- policies
@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("num_pages", [64, 9])  # plenty / a pool that forces preemption
def test_every_request_finishes_with_its_tokens(policy, num_pages):
    rng = np.random.default_rng(num_pages + len(policy))
    shared = rng.integers(0, 50, 20).tolist()
    s = Scheduler(num_pages=num_pages, page_size=4, token_budget=16, max_seqs=4, max_pages_per_seq=9,
                  policy=policy)
    sim = Simulation(s)
    arrivals = random_workload(rng, 40, max_prompt=14, max_new=12, shared=shared)
    arrivals = [a for a in arrivals if a[1].max_tokens <= 36]
    sim.run([(t, r, m) for t, r, m in arrivals])
    assert sim.outputs == {r.id: expected(r.tokens[:r.prompt_len], m) for _, r, m in arrivals}
    if num_pages == 9:
        assert s.stats.preemptions > 0
    assert s.stats.prefix_hit_tokens > 0
    s.clear_prefix_cache()
    assert s.pool.num_free == num_pages and len(s.pool.free) == num_pages  # no page leaked


def test_stall_free_order_and_budget():
    s = Scheduler(num_pages=100, page_size=4, token_budget=10, max_seqs=8, max_pages_per_seq=20, prefill_cap=6)
    sim = Simulation(s)
    for i in range(3):
        sim.add(make_request(i, list(range(1 + i, 9 + i)), 5), 5)
    (call,) = sim.step()
    # Budget 10, cap 6: request 0 takes 6 tokens, request 1 the remaining 4, request 2 waits.
    assert [(c.request.id, c.num_tokens) for c in call] == [(0, 6), (1, 4)]
    (call,) = sim.step()
    # Continuing prefills (0: 2 left, 1: 4 left) before the new one (2: capped by the rest).
    assert [(c.request.id, c.num_tokens) for c in call] == [(0, 2), (1, 4), (2, 4)]
    (call,) = sim.step()
    # Decodes first (0 and 1 sampled their first tokens), then the continuing prefill.
    assert [(c.request.id, c.num_tokens) for c in call] == [(0, 1), (1, 1), (2, 4)]


def test_prefill_first_runs_whole_prompts_and_decodes_wait():
    s = Scheduler(num_pages=100, page_size=4, token_budget=8, max_seqs=8, max_pages_per_seq=20,
                  policy="prefill_first")
    sim = Simulation(s)
    sim.add(make_request(0, list(range(12)), 3), 3)
    sim.add(make_request(1, list(range(3)), 3), 3)
    (call,) = sim.step()
    assert [(c.request.id, c.num_tokens) for c in call] == [(0, 12)]  # longer than the budget: alone
    sim.add(make_request(2, list(range(20, 25)), 3), 3)  # no page in common with 0
    (call,) = sim.step()
    assert [(c.request.id, c.num_tokens) for c in call] == [(1, 3), (2, 5)]  # whole, batched
    (call,) = sim.step()
    assert [(c.request.id, c.num_tokens) for c in call] == [(0, 1), (1, 1), (2, 1)]


def test_exllamav2_one_call_per_prefill_then_one_decode_call():
    s = Scheduler(num_pages=100, page_size=4, token_budget=5, max_seqs=8, max_pages_per_seq=20, policy="exllamav2")
    sim = Simulation(s)
    sim.add(make_request(0, list(range(3)), 4), 4)
    sim.step()
    sim.add(make_request(1, list(range(12)), 4), 4)
    sim.add(make_request(2, list(range(20, 27)), 4), 4)
    calls = sim.step()
    assert [[(c.request.id, c.num_tokens) for c in call] for call in calls] == [[(1, 5)], [(2, 5)], [(0, 1)]]


def test_prefix_reuse_skips_cached_pages_and_never_the_last_token():
    s = Scheduler(num_pages=40, page_size=4, token_budget=64, max_seqs=4, max_pages_per_seq=10)
    sim = Simulation(s)
    shared = list(range(10, 22))  # 3 full pages
    sim.run([(0, make_request("a", shared + [1, 2], 2), 2)])
    sim.run([(0, make_request("b", shared + [3, 4, 5], 2), 2)])
    assert s.stats.prefix_hit_tokens == 12 and s.stats.prompt_tokens_computed == 14 + 3
    sim.run([(0, make_request("c", shared, 2), 2)])  # all cached: the last page is computed anyway
    assert s.stats.prefix_hit_tokens == 12 + 8
    assert s.stats.prefix_hit_rate == pytest.approx(20 / (14 + 15 + 12))
    no_reuse = Scheduler(num_pages=40, page_size=4, token_budget=64, max_seqs=4, max_pages_per_seq=10,
                         prefix_cache=False)
    sim2 = Simulation(no_reuse)
    sim2.run([(0, make_request("b", shared + [3, 4, 5], 2), 2)])
    sim2.run([(0, make_request("b2", shared + [3, 4, 5], 2), 2)])
    assert no_reuse.stats.prefix_hit_tokens == 0 and no_reuse.stats.prompt_tokens_computed == 30


def test_preemption_recomputes_and_keeps_generated_tokens():
    # Two requests that each need 4 of the pool's 5 pages by the end.
    s = Scheduler(num_pages=5, page_size=4, token_budget=16, max_seqs=4, max_pages_per_seq=5, prefix_cache=False)
    sim = Simulation(s)
    a, b = make_request("a", [1, 2, 3, 4, 5], 10), make_request("b", [6, 7, 8], 12)
    sim.run([(0, a, 10), (0, b, 12)])
    assert sim.outputs == {"a": expected([1, 2, 3, 4, 5], 10), "b": expected([6, 7, 8], 12)}
    assert b.preemptions >= 1 and a.preemptions == 0  # the younger one yields
    assert s.stats.prompt_tokens_computed > 8  # b's prompt ran again
    assert s.pool.num_free == 5


def test_a_request_that_can_never_fit_is_refused():
    s = Scheduler(num_pages=4, page_size=4, token_budget=16, max_seqs=4, max_pages_per_seq=3)
    with pytest.raises(InputError, match="can never fit"):
        s.add(make_request(0, list(range(10)), 3))  # 13 tokens > 3 pages of 4
    s.add(make_request(1, list(range(10)), 2))
    assert len(s.waiting) == 1
    with pytest.raises(InputError, match="token_budget"):
        Scheduler(num_pages=4, page_size=4, token_budget=16, max_seqs=4, max_pages_per_seq=3, prefill_cap=17)
    with pytest.raises(InputError, match="policy"):
        Scheduler(num_pages=4, page_size=4, token_budget=16, max_seqs=4, max_pages_per_seq=3, policy="fifo")


def test_remove_releases_pages_waiting_or_running():
    s = Scheduler(num_pages=10, page_size=4, token_budget=8, max_seqs=4, max_pages_per_seq=10, prefix_cache=False)
    sim = Simulation(s)
    a, b = make_request("a", list(range(20)), 4), make_request("b", list(range(5)), 4)
    sim.add(a, 4)
    sim.add(b, 4)
    sim.step()
    assert a.pages and a in s.running
    s.remove(a)
    assert not a.pages and s.pool.num_free == 10 - len(b.pages)
    s.remove(b)
    assert s.idle and s.pool.num_free == 10
