"""The dynamic generator's host-side scheduler: which tokens of which requests run in each model call,
and which pool pages hold them. Pure Python, no JAX: `jaxchunk.generator` runs what it decides.

A `Request` is a token list (prompt + generated so far) of which `num_computed` are in the KV cache;
the rest, `to_compute`, are fed next: a whole prompt not yet cached is a prefill, a single sampled
token is a decode (vLLM v1's unified view: there are no phases, only tokens still to compute). A
`Chunk` (request, start, num_tokens) is one request's part of a call; when it reaches the end of
the request's tokens, the call's logits for it are sampled.

Policies (`POLICIES`), one `schedule()` -> a list of calls, each a list of chunks:
- "stall_free" (Sarathi-Serve's stall-free batching, vLLM's default): one call per step; every
  running decode first, then continuing prefills, then new requests, until `token_budget` tokens
  are used, one prefill's chunk capped at `prefill_cap` tokens.
- "prefill_first" (no chunking): new prompts whole, batched up to the budget (a longer prompt runs
  alone), and decodes wait until no new prompt can start.
- "exllamav2" (`ExLlamaV2DynamicGenerator.iterate`): each prefilling request's next chunk (at most
  `token_budget` tokens) as a call of its own, then one call of all decodes. Only its order of calls:
  exllamav2 reserves a job's pages up front and never preempts; here pages follow the chunks, as for
  the other policies, so the study compares orders under one page policy.

Pages (`PagePool`) are allocated as chunks need them. When a running request needs a page and none
is free, the most recently admitted running request is preempted: its pages are released and it
goes back to the front of the queue with its tokens (prompt + generated) to recompute; no new
request is admitted in a step that preempted. The oldest running request always gets its pages
(everything younger can be preempted, and `add` refuses a request that cannot fit the pool alone),
so every request finishes: none is lost, nothing deadlocks.

Prefix reuse (exllamav2, vLLM): each full page of a request's tokens is hashed, chained on the
previous page's hash (`page_hash`); computed full pages are registered in the pool under their
hash. Released pages keep their contents and hash (LRU) until the pool needs them, so a new request
whose tokens start with those pages takes them (refcounted, read only) and skips their prefill. At
least the last token is always computed (its logits start the generation), so the page being
written is never shared.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
from typing import Hashable, Optional, Sequence

import numpy as np

from jaxchunk.errors import InputError

__all__ = ["POLICIES", "page_hash", "PagePool", "Request", "Chunk", "Scheduler", "SchedulerStats",
           "power_of_two_buckets"]

POLICIES = ("stall_free", "prefill_first", "exllamav2")


def page_hash(parent: Optional[bytes], tokens: Sequence[int]) -> bytes:
    """The hash of one full page: its token ids chained on the previous page's hash (None for the
    first page), so equal hashes mean equal token prefixes, not just equal pages."""
    h = hashlib.blake2b(digest_size=16)
    h.update(parent or b"")
    h.update(np.asarray(tokens, np.int64).tobytes())
    return h.digest()


def power_of_two_buckets(smallest: int, largest: int) -> tuple[int, ...]:
    """(smallest, 2 * smallest, ..., largest): powers of two times `smallest`, capped at `largest`."""
    buckets, n = [], max(1, smallest)
    while n < largest:
        buckets.append(n)
        n *= 2
    return tuple(buckets) + (largest,)


# ----------------------------------------------------------------------------- pages
class PagePool:
    """Reference-counted pages of one pool, with freed pages kept under their hash until reused.

    free: pages holding nothing of use, taken first. cached: pages with refcount 0 that hold a
    registered full page (hash); taken least recently released first, which drops their hash.
    """

    def __init__(self, num_pages: int):
        self.num_pages = num_pages
        self.refcount = [0] * num_pages
        self.free: collections.deque[int] = collections.deque(range(num_pages))
        self.cached: collections.OrderedDict[int, bytes] = collections.OrderedDict()  # LRU first
        self.page_of: dict[bytes, int] = {}
        self.hash_of: dict[int, bytes] = {}

    @property
    def num_free(self) -> int:
        """Pages an `allocate` can return (free, or cached and evictable)."""
        return len(self.free) + len(self.cached)

    def allocate(self) -> Optional[int]:
        """A page for new contents (refcount 1), or None if every page is in use."""
        if self.free:
            page = self.free.popleft()
        elif self.cached:
            page, digest = self.cached.popitem(last=False)
            del self.page_of[digest], self.hash_of[page]
        else:
            return None
        self.refcount[page] = 1
        return page

    def share(self, digest: bytes) -> Optional[int]:
        """The page registered under `digest`, with one more reference (revived if it was cached),
        or None."""
        page = self.page_of.get(digest)
        if page is not None:
            self.cached.pop(page, None)
            self.refcount[page] += 1
        return page

    def release(self, page: int) -> None:
        """Drop one reference; at zero the page is cached under its hash, or free if it has none."""
        if self.refcount[page] <= 0:
            raise RuntimeError(f"page {page} released more often than taken")
        self.refcount[page] -= 1
        if self.refcount[page] == 0:
            if page in self.hash_of:
                self.cached[page] = self.hash_of[page]
            else:
                self.free.append(page)

    def register(self, page: int, digest: bytes) -> None:
        """Record that `page` (in use, full, computed) holds the tokens hashed as `digest`. A hash
        already held by another page keeps that one (the duplicate stays private)."""
        if digest not in self.page_of and page not in self.hash_of:
            self.page_of[digest] = page
            self.hash_of[page] = digest

    def clear_cache(self) -> None:
        """Forget every hash: cached pages become free, pages in use are no longer shared."""
        self.free.extend(self.cached)
        self.cached.clear()
        self.page_of.clear()
        self.hash_of.clear()


# ----------------------------------------------------------------------------- requests
@dataclasses.dataclass(eq=False)
class Request:
    """One job as the scheduler sees it. tokens: prompt + generated so far; num_computed of them are
    in the pages (in order); max_tokens: len(prompt) + max_new_tokens."""

    id: Hashable
    tokens: list[int]
    prompt_len: int
    max_tokens: int
    pages: list[int] = dataclasses.field(default_factory=list)
    num_computed: int = 0
    hashes: list[bytes] = dataclasses.field(default_factory=list)  # of its full pages, in order
    num_registered: int = 0   # leading pages registered in the pool (or found there)
    admitted: int = -1        # admission order (a preempted request is admitted again later)
    preemptions: int = 0

    @property
    def to_compute(self) -> int:
        return len(self.tokens) - self.num_computed

    @property
    def is_decode(self) -> bool:
        return self.num_computed >= self.prompt_len and self.to_compute == 1


@dataclasses.dataclass(frozen=True)
class Chunk:
    """tokens[start : start + num_tokens] of `request`, computed in one call."""

    request: Request
    start: int
    num_tokens: int

    @property
    def tokens(self) -> list[int]:
        return self.request.tokens[self.start:self.start + self.num_tokens]

    @property
    def samples(self) -> bool:
        """Whether it ends at the request's last token (so its logits give the next token)."""
        return self.start + self.num_tokens == len(self.request.tokens)


@dataclasses.dataclass
class SchedulerStats:
    """Counters since the scheduler was made (or `reset`)."""

    steps: int = 0                 # schedule() calls that ran something
    calls: int = 0                 # model calls
    prompt_tokens: int = 0         # prompt tokens of admitted requests (first admission)
    prompt_tokens_computed: int = 0  # tokens at prompt positions run through the model (recompute included)
    computed_tokens: int = 0       # every token run through the model
    prefix_hit_tokens: int = 0     # tokens taken from cached pages instead of computed
    prefix_lookup_tokens: int = 0  # tokens looked up in the prefix cache (hit or miss)
    preemptions: int = 0

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hit_tokens / self.prefix_lookup_tokens if self.prefix_lookup_tokens else 0.0


# ----------------------------------------------------------------------------- the scheduler
class Scheduler:
    """Requests waiting and running over one `PagePool` (module docstring).

    token_budget: tokens per call (stall_free), per chunk (exllamav2), per batch of whole prompts
        (prefill_first). max_seqs: requests running at once (and so sequences per call).
    max_pages_per_seq: pages one request may hold. prefill_cap: the most tokens one prefill chunk
        takes in a stall_free step (default: the whole budget). prefix_cache: reuse full pages.
    """

    def __init__(self, *, num_pages: int, page_size: int, token_budget: int, max_seqs: int,
                 max_pages_per_seq: int, policy: str = "stall_free", prefill_cap: Optional[int] = None,
                 prefix_cache: bool = True):
        for name, value in (("num_pages", num_pages), ("page_size", page_size), ("token_budget", token_budget),
                            ("max_seqs", max_seqs), ("max_pages_per_seq", max_pages_per_seq)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise InputError(f"{name} must be a positive int, got {value!r}")
        if policy not in POLICIES:
            raise InputError(f"policy must be one of {POLICIES}, got {policy!r}")
        prefill_cap = token_budget if prefill_cap is None else prefill_cap
        if not isinstance(prefill_cap, int) or isinstance(prefill_cap, bool) or not 0 < prefill_cap <= token_budget:
            raise InputError(f"prefill_cap must be an int in [1, token_budget={token_budget}], got {prefill_cap!r}")
        self.pool = PagePool(num_pages)
        self.page_size, self.token_budget, self.max_seqs = page_size, token_budget, max_seqs
        self.max_pages_per_seq, self.policy, self.prefill_cap = max_pages_per_seq, policy, prefill_cap
        self.prefix_cache = prefix_cache
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []  # in admission order, oldest first
        self.stats = SchedulerStats()
        self._admissions = 0

    # ---- requests in and out ------------------------------------------------------------
    @property
    def max_request_tokens(self) -> int:
        """The most tokens (prompt + max_new_tokens) one request may need: it must fit the pool alone."""
        return min(self.pool.num_pages, self.max_pages_per_seq) * self.page_size

    def add(self, request: Request) -> None:
        """Queue a request; InputError if it could never fit (its prompt + max_new_tokens need more
        pages than the pool, or than one sequence may hold)."""
        if request.max_tokens > self.max_request_tokens:
            raise InputError(
                f"job {request.id!r}: prompt ({request.prompt_len} tokens) + max_new_tokens "
                f"({request.max_tokens - request.prompt_len}) = {request.max_tokens} tokens can never fit: "
                f"the pool holds {self.pool.num_pages} pages of {self.page_size} and one sequence at most "
                f"{self.max_pages_per_seq} pages ({self.max_request_tokens} tokens)")
        if request.prompt_len < 1 or len(request.tokens) != request.prompt_len:
            raise InputError(f"job {request.id!r}: a new request holds its prompt (>= 1 token) and nothing else")
        self.waiting.append(request)

    def remove(self, request: Request) -> None:
        """Drop a request (finished or cancelled) and release its pages."""
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self._release(request)

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.running

    def clear_prefix_cache(self) -> None:
        self.pool.clear_cache()
        for request in self.running:  # its pages are no longer registered: register them again if wanted
            request.num_registered = 0

    # ---- one step ------------------------------------------------------------------------
    def schedule(self) -> list[list[Chunk]]:
        """The model calls of the next step, each a list of chunks (at most max_seqs of them, each
        request at most once per step). Pages for every chunk are allocated. Empty when idle."""
        calls = {"stall_free": self._stall_free, "prefill_first": self._prefill_first,
                 "exllamav2": self._exllamav2}[self.policy]()
        calls = [call for call in calls if call]
        if calls:
            self.stats.steps += 1
            self.stats.calls += len(calls)
        return calls

    def commit(self, chunk: Chunk) -> None:
        """Record that `chunk` ran: its tokens are cached; full pages get registered."""
        request = chunk.request
        if chunk.start != request.num_computed:
            raise RuntimeError(f"chunk of {request.id!r} starts at {chunk.start}, {request.num_computed} computed")
        request.num_computed += chunk.num_tokens
        self.stats.computed_tokens += chunk.num_tokens
        self.stats.prompt_tokens_computed += max(0, min(request.prompt_len, request.num_computed) - chunk.start)
        if self.prefix_cache:
            full = request.num_computed // self.page_size
            for j in range(request.num_registered, full):
                self.pool.register(request.pages[j], self._hashes(request, j + 1)[j])
            request.num_registered = max(request.num_registered, full)

    def _stall_free(self) -> list[list[Chunk]]:
        chunks: dict[Request, Chunk] = {}
        decodes = [r for r in self.running if r.is_decode]
        prefills = [r for r in self.running if not r.is_decode]
        preempted = False
        for request in decodes + prefills:
            budget = self.token_budget - sum(c.num_tokens for c in chunks.values())
            if budget == 0:
                break
            if request not in self.running:  # preempted earlier in this step
                continue
            n = 1 if request.is_decode else min(request.to_compute, budget, self.prefill_cap, self._coverable(request))
            n, victims = self._grow(request, n, chunks)
            preempted |= bool(victims)
            if n:
                chunks[request] = Chunk(request, request.num_computed, n)
        budget = self.token_budget - sum(c.num_tokens for c in chunks.values())
        if not preempted:  # vLLM: nothing new starts in a step that had to preempt
            while budget and self.waiting and len(self.running) < self.max_seqs:
                request = self._admit()
                n = self._fit_new(request, min(request.to_compute, budget, self.prefill_cap))
                if n == 0:
                    self._unadmit(request)
                    break
                chunks[request] = Chunk(request, request.num_computed, n)
                budget -= n
        return [list(chunks.values())]

    def _prefill_first(self) -> list[list[Chunk]]:
        # Whole prompts (and whole recomputes of preempted requests), batched up to the budget.
        chunks, used = [], 0
        while self.waiting and len(self.running) < self.max_seqs:
            request = self.waiting[0]
            need = self._need_after_prefix(request)
            if chunks and used + need > self.token_budget:
                break
            request = self._admit()
            n = self._fit_new(request, request.to_compute)
            if n < request.to_compute:  # not enough pages for the whole prompt now
                self._unadmit(request)
                break
            chunks.append(Chunk(request, request.num_computed, n))
            used += n
        if chunks:
            return [chunks]
        return [self._decode_call()]

    def _exllamav2(self) -> list[list[Chunk]]:
        while self.waiting and len(self.running) < self.max_seqs:
            request = self._admit()
            if self._fit_new(request, 1) == 0:
                self._unadmit(request)
                break
        chunks: dict[Request, Chunk] = {}
        for request in [r for r in self.running if not r.is_decode]:
            if request in self.running:
                n = min(request.to_compute, self.token_budget, self._coverable(request))
                n, _ = self._grow(request, n, chunks)
                if n:
                    chunks[request] = Chunk(request, request.num_computed, n)
        prefills = list(chunks.values())
        decodes = self._decode_call(chunks)  # may preempt a request whose chunk is in `prefills`
        return [[chunk] for chunk in prefills if chunk.request in self.running] + [decodes]

    def _decode_call(self, chunks: Optional[dict] = None) -> list[Chunk]:
        """One call of every running decode (at most token_budget); `chunks`: this step's other
        chunks, from which a preempted request's is dropped."""
        chunks = {} if chunks is None else chunks
        decodes: dict[Request, Chunk] = {}
        for request in [r for r in self.running if r.is_decode][:self.token_budget]:
            if request in self.running:
                n, victims = self._grow(request, 1, chunks)
                for victim in victims:
                    decodes.pop(victim, None)
                if n:
                    decodes[request] = chunks[request] = Chunk(request, request.num_computed, 1)
        return list(decodes.values())

    # ---- admission, pages, preemption ----------------------------------------------------
    def _hashes(self, request: Request, n_pages: int) -> list[bytes]:
        """The chained hashes of the request's first n_pages full pages (computed once)."""
        size = self.page_size
        while len(request.hashes) < n_pages:
            j = len(request.hashes)
            parent = request.hashes[-1] if request.hashes else None
            request.hashes.append(page_hash(parent, request.tokens[j * size:(j + 1) * size]))
        return request.hashes

    def _need_after_prefix(self, request: Request) -> int:
        """Tokens the request would compute now, after the cached pages it could take."""
        if not self.prefix_cache:
            return request.to_compute
        n_pages = (len(request.tokens) - 1) // self.page_size
        hit = 0
        for digest in self._hashes(request, n_pages)[:n_pages]:
            if digest not in self.pool.page_of:
                break
            hit += 1
        return request.to_compute - hit * self.page_size

    def _admit(self) -> Request:
        """Move the next waiting request to running and take the cached pages its tokens start with."""
        request = self.waiting.popleft()
        if request.admitted < 0:
            self.stats.prompt_tokens += request.prompt_len
        self._admissions += 1
        request.admitted = self._admissions
        self.running.append(request)
        if self.prefix_cache and not request.pages:
            n_pages = (len(request.tokens) - 1) // self.page_size  # the last token is always computed
            self.stats.prefix_lookup_tokens += len(request.tokens)
            for digest in self._hashes(request, n_pages)[:n_pages]:
                page = self.pool.share(digest)
                if page is None:
                    break
                request.pages.append(page)
            hit = len(request.pages) * self.page_size
            request.num_computed, request.num_registered = hit, len(request.pages)
            self.stats.prefix_hit_tokens += hit
        return request

    def _unadmit(self, request: Request) -> None:
        """Undo `_admit` for a request that cannot start now (no pages): back to the queue's front."""
        self.running.remove(request)
        self._release(request)
        self.waiting.appendleft(request)

    def _fit_new(self, request: Request, n: int) -> int:
        """Allocate pages for the first n tokens to compute of a just-admitted request without
        preempting anyone; returns how many tokens fit (0: none)."""
        have = len(request.pages) * self.page_size - request.num_computed
        extra_pages = min(self.pool.num_free, -(-(n - have) // self.page_size)) if n > have else 0
        for _ in range(extra_pages):
            request.pages.append(self.pool.allocate())
        return min(n, len(request.pages) * self.page_size - request.num_computed)

    def _coverable(self, request: Request) -> int:
        """Tokens the request could compute with its pages and the free ones (at least 1: a request
        that needs a page when none is free preempts in `_grow`)."""
        return max(1, (len(request.pages) + self.pool.num_free) * self.page_size - request.num_computed)

    def _grow(self, request: Request, n: int, chunks: dict) -> tuple[int, list[Request]]:
        """Pages for n more tokens of a running request, preempting the youngest running requests
        (dropping their chunks of this step) while none are free. Returns (tokens that got pages: n,
        or 0 if the request preempted itself; the requests preempted)."""
        victims = []
        need = -(-(request.num_computed + n) // self.page_size)
        while len(request.pages) < need:
            page = self.pool.allocate()
            if page is not None:
                request.pages.append(page)
                continue
            victim = self.running[-1]
            self._preempt(victim)
            chunks.pop(victim, None)
            victims.append(victim)
            if victim is request:
                return 0, victims
        return n, victims

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self._release(request)
        request.preemptions += 1
        self.stats.preemptions += 1
        self.waiting.appendleft(request)

    def _release(self, request: Request) -> None:
        for page in reversed(request.pages):  # the tail first: the LRU then evicts tails before heads
            self.pool.release(page)
        request.pages.clear()
        request.num_computed = request.num_registered = 0
