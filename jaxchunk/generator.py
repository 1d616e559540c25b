"""The dynamic generator: many jobs over one paged KV cache, continuous batching with chunked prefill
under a per-step token budget, prefix reuse (exllamav2's `ExLlamaV2DynamicGenerator`, vLLM's engine).

    gen = jaxchunk.Generator(model, token_budget=256, page_size=256, num_pages=64)
    gen.enqueue(jaxchunk.Job("Once upon a time", max_new_tokens=32, id="a"))
    while not gen.idle:
        for event in gen.iterate():          # one step: started / prefill / tokens / finished events
            print(event.job_id, event.kind, event.text)
    gen.generate(["Hi", "Hello"], max_new_tokens=16)   # texts, in order

Each `iterate()` asks `jaxchunk.scheduler.Scheduler` what to run (chunks of many jobs, one or more
model calls by policy), runs each call as one jitted `jaxchunk.paged.mixed_step` over the pool, and
samples the next token of every job whose chunk reached its last token, each with its own sampling
settings and its own key: token i of a job is drawn with `fold_in(key(job.seed), i)`, as
`Model.generate` draws token i of a batch of one, so a job's output depends on its seed only, not on
its neighbours or the schedule. Text is streamed with `jaxchunk.api.TextStream` (whole characters,
stop strings) as `Model.generate(stream=True)` does.

Step shapes come from a fixed set (`Generator.step_shapes`: token buckets x pages-per-sequence
buckets, max_seqs fixed); `warmup()` compiles all of them, after which the generator compiles
nothing (`jaxchunk.compile_guard`). The XLA paged attention's work follows each sequence's kv_len,
not the page table's width, so one pages-per-sequence bucket (the most a job may hold) is the default.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import math
import time
from typing import Hashable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from jaxchunk.api import GenerationResult, Model, TextStream, stop_list
from jaxchunk.errors import InputError
from jaxchunk.paged import build_step, init_paged_cache, mixed_step
from jaxchunk.sampling import SamplingParams, sample
from jaxchunk.scheduler import Chunk, Request, Scheduler, power_of_two_buckets
from jaxchunk.steps import count_compiles, describe_arrays, describing_call

__all__ = ["Job", "Event", "Generator", "sample_rows"]

MB = 1024 ** 2
LOG_LENGTH = 100_000  # steps / calls kept in Generator.step_log / call_log
FINISH_REASONS = ("stop", "length", "cancelled")


# ----------------------------------------------------------------------------- jobs and events
@dataclasses.dataclass(eq=False)
class Job:
    """One generation request. prompt: text or token ids. Sampling as `Model.generate` (greedy when
    temperature == 0). stop: strings that end it (matched on the text); stop_ids: ids that end it
    (None: the model's EOS and single-token stop strings; (): none). seed: its sampling key.
    id: any hashable, unique among the generator's jobs (None: a number is given at enqueue).

    Filled in by the generator: output_ids (generated ids, up to and including the one that ended
    the job), text (the generated text, without the stop id / string), finish_reason ("stop",
    "length", "cancelled"; None until finished), timings (on finishing, as the "finished" event's).
    """

    prompt: Union[str, Sequence[int]]
    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    stop: Union[str, Sequence[str]] = ()
    stop_ids: Optional[Sequence[int]] = None
    seed: int = 0
    id: Optional[Hashable] = None
    output_ids: list[int] = dataclasses.field(default_factory=list, init=False)
    text: str = dataclasses.field(default="", init=False)
    finish_reason: Optional[str] = dataclasses.field(default=None, init=False)
    timings: Optional[dict] = dataclasses.field(default=None, init=False, repr=False)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclasses.dataclass(frozen=True)
class Event:
    """What happened to one job in one step.

    kind: "started" (its first chunk ran), "prefill" (a chunk of its prompt ran, no token yet),
    "tokens" (new ids, and the text they complete), "finished" (reason; text: what was held back).
    ids / text: what is new in this event. timings (on "finished"): seconds since enqueue of
    admission (queued_s), the first token (ttft_s), each token (token_times_s) and the end (total_s),
    and how often it was preempted.
    """

    job_id: Hashable
    kind: str
    ids: tuple[int, ...] = ()
    text: str = ""
    reason: Optional[str] = None
    timings: Optional[dict] = None


@dataclasses.dataclass(eq=False)
class _Active:
    """A job in the generator: its scheduler request, sampling, stops, text stream and clock."""

    job: Job
    request: Request
    sampling: SamplingParams
    stop_ids: frozenset
    text: Optional[TextStream]
    enqueued: float
    started: Optional[float] = None
    token_times: list = dataclasses.field(default_factory=list)


# ----------------------------------------------------------------------------- sampling
@functools.partial(jax.jit, static_argnames=("sampling",))
def sample_rows(logits, seeds, indices, *, sampling: SamplingParams):
    """Row r's next token drawn with key fold_in(key(seeds[r]), indices[r]), each row on its own (as
    `sample` on a batch of one): logits [S, vocab] f32, seeds [S] uint32, indices [S] int32 -> [S] int32."""
    def one(row, seed, index):
        return sample(row[None], jax.random.fold_in(jax.random.key(seed), index), sampling)[0]
    return jax.vmap(one)(logits, seeds, indices)


# ----------------------------------------------------------------------------- the generator
class Generator:
    """Jobs over one paged KV cache of `model` (module docstring).

    token_budget: tokens per step (policy "stall_free"; per chunk for "exllamav2", per batch of whole
        prompts for "prefill_first"). max_seqs: jobs running at once (default min(32, token_budget)).
    page_size, num_pages: the pool; or memory_mb, the pool's size in MiB (num_pages then follows).
        Default: room for max_seqs jobs of 512 tokens, and at least one of model.max_seq_len.
    cache_dtype: the pool's format (default: the model's). policy: `jaxchunk.scheduler.POLICIES`.
    prefill_cap: the most tokens of one prefill in a stall_free step. prefix_cache: reuse full pages.
    token_buckets / page_buckets: the step shapes (tokens per call, pages per sequence; defaults in
        `step_shapes`). attention_impl: a `pallas_kernels.paged_attention` impl ("auto").
    """

    def __init__(self, model: Model, token_budget: int = 256, max_seqs: Optional[int] = None, page_size: int = 256,
                 num_pages: Optional[int] = None, *, memory_mb: Optional[float] = None,
                 cache_dtype: Optional[str] = None, policy: str = "stall_free", prefill_cap: Optional[int] = None,
                 prefix_cache: bool = True, token_buckets: Optional[Sequence[int]] = None,
                 page_buckets: Optional[Sequence[int]] = None, attention_impl: str = "auto"):
        for name, value in (("token_budget", token_budget), ("page_size", page_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise InputError(f"{name} must be a positive int, got {value!r}")
        if num_pages is not None and memory_mb is not None:
            raise InputError("give num_pages or memory_mb, not both")
        if getattr(model, "ring_chunk_len", None) is not None:
            raise InputError(f"this model was loaded with ring_chunk_len={model.ring_chunk_len}: the sliding-window "
                             "ring is a layout of the contiguous cache only; the generator's paged cache keeps every "
                             "position (load the model without ring_chunk_len for a Generator)")
        self.model, self.config, self.params = model, model.config, model.params
        self.attention_impl = attention_impl
        max_seqs = min(32, token_budget) if max_seqs is None else max_seqs
        max_pages_per_seq = -(-model.max_seq_len // page_size)
        cache_dtype = model.cache_dtype if cache_dtype is None else cache_dtype
        if memory_mb is not None:
            one_page = jax.eval_shape(lambda: init_paged_cache(self.config, num_pages=1, page_size=page_size,
                                                               dtype=cache_dtype))
            page_bytes = sum(math.prod(a.shape) * a.dtype.itemsize for a in jax.tree.leaves(one_page))
            num_pages = int(memory_mb * MB // page_bytes)
            if num_pages < 1:
                raise InputError(f"memory_mb={memory_mb} holds no page of {page_size} tokens "
                                 f"({page_bytes / MB:.2f} MiB each)")
        if num_pages is None:
            num_pages = max(max_pages_per_seq, -(-max_seqs * 512 // page_size))
        self.scheduler = Scheduler(num_pages=num_pages, page_size=page_size, token_budget=token_budget,
                                   max_seqs=max_seqs, max_pages_per_seq=max_pages_per_seq, policy=policy,
                                   prefill_cap=prefill_cap, prefix_cache=prefix_cache)
        self.cache = init_paged_cache(self.config, num_pages=num_pages, page_size=page_size, dtype=cache_dtype)
        self.token_buckets = tuple(sorted(token_buckets or self._default_token_buckets()))
        self.page_buckets = tuple(sorted(page_buckets or (max_pages_per_seq,)))
        if self.page_buckets[-1] < max_pages_per_seq:
            raise InputError(f"page_buckets must reach max_pages_per_seq={max_pages_per_seq}, got {self.page_buckets}")
        longest_call = self.scheduler.max_request_tokens if policy == "prefill_first" else token_budget
        if self.token_buckets[-1] < min(longest_call, self.scheduler.max_request_tokens):
            raise InputError(f"token_buckets must reach {longest_call} tokens for policy {policy!r}, "
                             f"got {self.token_buckets}")
        self._jobs: dict[Hashable, _Active] = {}
        self._pending: list[Event] = []
        self._ids = itertools.count()
        # The last steps' and calls' records (host scheduling vs call seconds, what each call held).
        self.step_log: collections.deque[dict] = collections.deque(maxlen=LOG_LENGTH)
        self.call_log: collections.deque[dict] = collections.deque(maxlen=LOG_LENGTH)

    # ---- configuration ----------------------------------------------------------------------
    @property
    def page_size(self) -> int:
        return self.scheduler.page_size

    @property
    def num_pages(self) -> int:
        return self.scheduler.pool.num_pages

    @property
    def max_seqs(self) -> int:
        return self.scheduler.max_seqs

    @property
    def stats(self):
        """The scheduler's counters (`jaxchunk.scheduler.SchedulerStats`: preemptions, prefix hits...)."""
        return self.scheduler.stats

    @property
    def step_shapes(self) -> list[tuple[int, int]]:
        """Every (tokens per call, pages per sequence) a call may take (max_seqs is fixed)."""
        return [(t, p) for t in self.token_buckets for p in self.page_buckets]

    def _default_token_buckets(self) -> tuple[int, ...]:
        """A decode-only bucket (max_seqs rounded up to a power of two), and the budget; for
        prefill_first, powers of two from the budget up to the longest prompt a job may have."""
        s = self.scheduler
        decode = min(s.token_budget, 1 << (s.max_seqs - 1).bit_length())
        if s.policy == "prefill_first":
            top = s.max_request_tokens
            return tuple(sorted({decode, *power_of_two_buckets(s.token_budget, max(top, s.token_budget))}))
        return tuple(sorted({decode, s.token_budget}))

    # ---- jobs ----------------------------------------------------------------------------------
    def enqueue(self, job: Job) -> Job:
        """Queue a job (checked here: InputError for a bad one, which is then not queued)."""
        if not isinstance(job, Job):
            raise InputError(f"enqueue takes a jaxchunk.Job, got {type(job).__name__}")
        if job.id is None:
            job.id = next(i for i in self._ids if i not in self._jobs)
        if job.id in self._jobs:
            raise InputError(f"a job with id {job.id!r} is already in the generator")
        if job.finished or job.output_ids:
            raise InputError(f"job {job.id!r} has already run; make a new Job")
        if isinstance(job.prompt, str) and self.model.tokenizer is None:
            raise InputError(f"job {job.id!r}: a text prompt needs a tokenizer; this model has none (give ids)")
        ids = self.model.prompt_ids(job.prompt)
        if not isinstance(job.max_new_tokens, int) or isinstance(job.max_new_tokens, bool) or job.max_new_tokens < 1:
            raise InputError(f"job {job.id!r}: max_new_tokens must be a positive int, got {job.max_new_tokens!r}")
        if not isinstance(job.seed, (int, np.integer)) or isinstance(job.seed, bool) or not 0 <= job.seed < 2 ** 32:
            raise InputError(f"job {job.id!r}: seed must be an int in [0, 2**32), got {job.seed!r}")
        if len(ids) + job.max_new_tokens > self.model.max_seq_len:
            raise InputError(f"job {job.id!r}: prompt ({len(ids)} tokens) + max_new_tokens ({job.max_new_tokens}) "
                             f"exceeds the model's max_seq_len={self.model.max_seq_len}")
        if max(ids) >= self.config.vocab_size or min(ids) < 0:
            raise InputError(f"job {job.id!r}: prompt ids must lie in [0, {self.config.vocab_size})")
        sampling = SamplingParams(temperature=job.temperature, top_k=job.top_k, top_p=job.top_p, min_p=job.min_p)
        stops = stop_list(job.stop)
        stop_ids = self._stop_ids(job, stops)
        request = Request(id=job.id, tokens=list(ids), prompt_len=len(ids), max_tokens=len(ids) + job.max_new_tokens)
        self.scheduler.add(request)  # InputError if it can never fit the pool
        text = TextStream(self.model.tokenizer, (), stops) if self.model.tokenizer is not None else None
        self._jobs[job.id] = _Active(job, request, sampling, stop_ids, text, time.perf_counter())
        return job

    def _stop_ids(self, job: Job, stops: list[str]) -> frozenset:
        ids = [int(i) for i in job.stop_ids] if job.stop_ids is not None else self.model.stop_token_ids(stops)
        if any(not 0 <= i < self.config.vocab_size for i in ids):
            raise InputError(f"job {job.id!r}: stop_ids {ids} must lie in [0, {self.config.vocab_size})")
        return frozenset(ids)

    def cancel(self, job_id: Hashable) -> bool:
        """End a queued or running job now (its pages are released); its "finished" event (reason
        "cancelled") comes with the next `iterate()`. False if no such job is in the generator."""
        active = self._jobs.get(job_id)
        if active is None:
            return False
        self.scheduler.remove(active.request)
        self._finish(active, "cancelled", self._pending)
        return True

    @property
    def idle(self) -> bool:
        """No job queued or running, and no event left to hand out."""
        return not self._jobs and not self._pending

    @property
    def num_jobs(self) -> int:
        return len(self._jobs)

    def clear_prefix_cache(self) -> None:
        """Forget every cached page (pages in use stay with their jobs)."""
        self.scheduler.clear_prefix_cache()

    # ---- the step ------------------------------------------------------------------------------
    def iterate(self) -> list[Event]:
        """Run one step; returns its events (and those of jobs cancelled since the last step)."""
        events, self._pending = self._pending, []
        start = time.perf_counter()
        calls = self.scheduler.schedule()
        host_s, device_s = time.perf_counter() - start, 0.0
        for call in calls:
            device_s += self._run_call(call, events)
        if calls:
            self.step_log.append({"host_s": host_s, "call_s": device_s, "calls": len(calls),
                                  "tokens": sum(c.num_tokens for call in calls for c in call)})
        return events

    def _shape(self, call: list[Chunk]) -> tuple[int, int]:
        tokens = sum(c.num_tokens for c in call)
        pages = max(len(c.request.pages) for c in call)
        return (next(t for t in self.token_buckets if t >= tokens), next(p for p in self.page_buckets if p >= pages))

    def _run_call(self, call: list[Chunk], events: list[Event]) -> float:
        """One model call over `call`'s chunks, then the sampling of the chunks that end their job's
        tokens. Returns the call's seconds (model + sampling, host transfers included)."""
        start = time.perf_counter()
        token_budget, pages_per_seq = self._shape(call)
        step = build_step([(c.tokens, c.start, c.request.pages) for c in call], token_budget=token_budget,
                          max_seqs=self.max_seqs, max_pages_per_seq=pages_per_seq, num_pages=self.num_pages,
                          page_size=self.page_size, config=self.config)
        actives = [self._jobs[c.request.id] for c in call]
        rows = [(a.sampling, a.job.seed, len(a.job.output_ids)) if c.samples else None for a, c in zip(actives, call)]
        built = time.perf_counter()
        sampled = self._run_step(step, rows)
        now = time.perf_counter()
        elapsed = now - start
        decode_rows = sum(c.request.is_decode for c in call)
        # build_s: the host building and checking the step's arrays; device_s: the model call and the
        # sampling until the tokens are on the host (what a step-time model of the device should fit).
        self.call_log.append({"s": elapsed, "build_s": built - start, "device_s": now - built,
                              "token_bucket": token_budget, "max_seqs": self.max_seqs, "pages_bucket": pages_per_seq,
                              "decode_rows": decode_rows,
                              "prefill_tokens": sum(c.num_tokens for c in call) - decode_rows,
                              "kv_tokens": sum(c.start + c.num_tokens for c in call), "seqs": len(call)})
        for row, (chunk, active) in enumerate(zip(call, actives)):
            self.scheduler.commit(chunk)
            if active.started is None:
                active.started = now - elapsed
                events.append(Event(active.job.id, "started"))
            if chunk.samples:
                self._on_token(active, int(sampled[row]), now, events)
            else:
                events.append(Event(active.job.id, "prefill"))
        return elapsed

    def _run_step(self, step, rows) -> np.ndarray:
        """mixed_step over the pool, then each sampling setting's rows drawn; rows[r]: (sampling,
        seed, token index) or None. Returns the tokens [max_seqs] on the host (0 where None)."""
        with describing_call(lambda: f"mixed_step({describe_arrays(tokens=step.tokens, page_table=step.page_table)})"):
            self.cache, logits = mixed_step(self.params, self.cache, jax.tree.map(jnp.asarray, step),
                                            config=self.config, attention_impl=self.attention_impl)
            seeds = np.zeros(self.max_seqs, np.uint32)
            indices = np.zeros(self.max_seqs, np.int32)
            for r, row in enumerate(rows):
                if row is not None:
                    seeds[r], indices[r] = row[1], row[2]
            tokens = np.zeros(self.max_seqs, np.int64)
            if all(row is None for row in rows):
                jax.block_until_ready(logits)  # so the call's time is its own
            for sampling in {row[0] for row in rows if row is not None}:
                drawn = np.asarray(sample_rows(logits, seeds, indices, sampling=sampling))
                mine = [r for r, row in enumerate(rows) if row is not None and row[0] == sampling]
                tokens[mine] = drawn[mine]
        return tokens

    def _on_token(self, active: _Active, token: int, now: float, events: list[Event]) -> None:
        job = active.job
        job.output_ids.append(token)
        active.token_times.append(now)
        if token in active.stop_ids:
            events.append(Event(job.id, "tokens", (token,), ""))
            self._finish(active, "stop", events)
            return
        piece = active.text.push(token) if active.text is not None else ""
        job.text += piece
        events.append(Event(job.id, "tokens", (token,), piece))
        if active.text is not None and active.text.stopped:
            self._finish(active, "stop", events)
        elif len(job.output_ids) == job.max_new_tokens:
            self._finish(active, "length", events)
        else:
            active.request.tokens.append(token)  # fed in the next step

    def _finish(self, active: _Active, reason: str, events: list[Event]) -> None:
        job = active.job
        tail = ""
        if reason != "cancelled" and active.text is not None:
            tail = active.text.finish()  # what the decoder and the stop strings held back
            reason = "stop" if active.text.stopped else reason
        job.text += tail
        self.scheduler.remove(active.request)
        del self._jobs[job.id]
        end = time.perf_counter()
        since = lambda t: None if t is None else t - active.enqueued  # noqa: E731
        job.timings = {"queued_s": since(active.started), "ttft_s": since(active.token_times[0] if active.token_times
                                                                           else None),
                       "token_times_s": [since(t) for t in active.token_times], "total_s": since(end),
                       "preemptions": active.request.preemptions}
        job.finish_reason = reason
        events.append(Event(job.id, "finished", (), tail, reason, job.timings))

    # ---- whole runs ----------------------------------------------------------------------------
    def run(self, max_steps: Optional[int] = None) -> list[Event]:
        """iterate() until idle (or max_steps); every event, in order."""
        events = []
        for _ in itertools.count() if max_steps is None else range(max_steps):
            if self.idle:
                break
            events += self.iterate()
        return events

    def generate(self, prompts, max_new_tokens: int = 64, *, return_ids: bool = False, **job_kwargs):
        """Run `prompts` (one prompt, text or ids, or a list of them) to completion together with any
        jobs already queued. job_kwargs: `Job`'s sampling and stop fields (one seed for all, or
        seeds=[...] one per prompt). Returns the text(s), or with return_ids=True a
        `GenerationResult` (text, ids, finish_reason) per prompt, as `Model.generate`."""
        rows, single = self.model.prompt_rows(prompts)
        seeds = job_kwargs.pop("seeds", None)
        if seeds is not None and len(seeds) != len(rows):
            raise InputError(f"seeds: {len(seeds)} for {len(rows)} prompts")
        jobs = [Job(ids, max_new_tokens=max_new_tokens, **job_kwargs) for ids in rows]
        if seeds is not None:
            for job, seed in zip(jobs, seeds):
                job.seed = seed
        enqueued = []
        try:
            for job in jobs:
                enqueued.append(self.enqueue(job))
        except InputError:
            for job in enqueued:  # all or nothing
                self.cancel(job.id)
            self._pending = [e for e in self._pending if e.job_id not in {j.id for j in enqueued}]
            raise
        while not all(job.finished for job in jobs):
            self.iterate()
        out = [GenerationResult(job.text, list(job.output_ids), job.finish_reason) if return_ids else job.text
               for job in jobs]
        return out[0] if single else out

    # ---- warm-up -------------------------------------------------------------------------------
    def warmup(self, sampling: Sequence[dict] = ({},)) -> dict:
        """Compile every step shape (`step_shapes`) and the sampler for each setting in `sampling`
        (dicts of Job's temperature / top_k / top_p / min_p; default greedy) on a placeholder
        sequence of one token in a free page. Afterwards the generator compiles nothing for these
        settings (`jaxchunk.compile_guard()`). Returns {"compiles", "seconds"}."""
        page = self.scheduler.pool.allocate()
        if page is None:
            raise InputError("warmup needs one free page; call it before enqueueing jobs")
        settings = [SamplingParams(**s) for s in sampling] or [SamplingParams()]
        start = time.perf_counter()
        try:
            with count_compiles() as compiles:
                for token_budget, pages_per_seq in self.step_shapes:
                    step = build_step([([0], 0, [page])], token_budget=token_budget, max_seqs=self.max_seqs,
                                      max_pages_per_seq=pages_per_seq, num_pages=self.num_pages,
                                      page_size=self.page_size)
                    self._run_step(step, [(settings[0], 0, 0)])
                logits = jnp.zeros((self.max_seqs, self.config.vocab_size), jnp.float32)
                seeds, indices = np.zeros(self.max_seqs, np.uint32), np.zeros(self.max_seqs, np.int32)
                for setting in settings[1:]:
                    jax.block_until_ready(sample_rows(logits, seeds, indices, sampling=setting))
        finally:
            self.scheduler.pool.release(page)
        return {"compiles": compiles.count, "seconds": time.perf_counter() - start}
