"""The serving study: the dynamic generator (jaxchunk.Generator) under synthetic, offline workloads with
arrivals on the wall clock, per scheduling policy and token budget.

Workloads (random token ids, fixed seeds; `--ignore-eos` style: no stop token, every job runs its
max_new_tokens):
  W1  Poisson arrivals, fixed prompt / output lengths, at each of --rates or, by default, at the rates
      a capacity search picks per policy (`search_capacity`; the same prompts and unit-rate gaps at
      every rate, scaled by 1 / rate).
  W2  --w2-background decoders (short prompts, long outputs) running, and --w2-long long prompts
      injected while they decode: the background's time between tokens is the stall.
  W3  Poisson arrivals, bimodal prompt lengths (--w3-short-frac short, the rest long).
  W4  Poisson arrivals, a shared long prefix + a short unique suffix each, with and without prefix
      reuse (hit rate, TTFT). W3 and W4 arrive at --mixed-rate.
  batch  --batch-jobs jobs decoding together through the generator vs `Model.generate` on one batch
      of the same prompts (tok/s ratio, same run).
Policies: "b<N>" = stall_free with token budget N; "prefill_first" (whole prompts, decodes wait);
"exllamav2" (each prefilling job's chunk as its own call, then one decode call; --exl-chunk tokens);
"hf" = the peer: Hugging Face transformers' continuous batching (ContinuousBatchingManager from
model.init_continuous_batching, attn_implementation="paged|sdpa", which transformers 5.24 runs as "sdpa"
over its paged cache (the note records it), f32 / bf16 as --dtype, greedy, no EOS) on the same GGUF
weights (compare_peers.load_transformers), in its own subprocess (this module with --worker), torch
threads = the usable cores; its scheduler chunks prefill under max_batch_tokens = --hf-budget with at
most --max-seqs requests per batch, page size --page-size and as many pages as jaxchunk's generator
gets. Its manager runs steps in a background thread, so each request is added at its arrival on the wall
clock; its timings come from the manager's own per-token timestamps (record_timestamps=True), queueing
from its admission stamp (lifespan[0]). Same workloads (token ids), same max_new_tokens; one fresh
manager per workload, warmed up by one request of the longest prompt (random ids, 2 tokens) first.
SmolLM2 only (it needs the GGUF).

Metrics as `vllm bench serve` reports them: TTFT (arrival to first token; the generator's jobs are
enqueued between steps, so their enqueue lag after the arrival is added to TTFT, queueing and latency)
and TBT (each gap between a job's tokens), median / P99, TPOT ((latency - TTFT) / (tokens - 1)),
end-to-end latency, queueing delay, request and output-token throughput; compiles during the run (after
warm-up; must be 0); host scheduling vs model-call seconds. Capacity (W1): the highest rate with P99 TBT
<= the SLO and median queueing delay <= 2 s (Sarathi-Serve's definition), and its ratio to
prefill_first's (0 = below the lowest rate tried, said so). The SLO: --slo-tbt seconds, or
--slo-decode-steps (5: Sarathi-Serve's strict SLO is 5x a decode iteration) times each run's own median
decode-only call, its clock (the shared CPU's speed drifts ~2x within minutes; the peer's runs take
the calibration's decode step, measured before W1). A step-time model is fitted on the device seconds
of every call of every run (model call + sampling, without the host's scheduling and step building):
a constant per step shape (T, S) + b * prefill tokens + c * decode rows + d * cached tokens read (least
squares on 75 % of each shape's calls, relative RMS error on the held-out 25 %), once in seconds and
once in decode steps of the call's run (drift taken out); the largest budget it predicts for the
SLO (a step of the W2 background's decode rows + the rest of the budget in prefill) is written next to
the largest budget that met it in W2.

  .venv/bin/python -m experiments.serving --quick                        # SmolLM2, minutes
  .venv/bin/python -m experiments.serving --model tiny-random --quick    # seconds (the test)
  .venv/bin/python -m experiments.serving --preset smollm                # W1-W4 + the peer, ~15-20 min
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Optional

import numpy as np

from experiments import common
from jaxchunk.scheduler import power_of_two_buckets  # pure Python, no JAX

# W1's rates: an explicit grid (--rates) or, when none is given, a search for the capacity of each
# policy: from --rate-start doubling up (or halving down) within [--rate-min, --rate-max] to the first
# rate that fails the SLO, then --bisect-steps geometric bisections between the last pass and the
# first failure. The SLO: --slo-tbt seconds, or (None) --slo-decode-steps times the measured decode-only
# step (Sarathi-Serve's SLOs are multiples of a decode iteration's time: strict 5x, relaxed 25x).
FULL = dict(workloads=["W1", "W2", "W3", "W4", "batch"], policies=["b32", "b64", "b128", "b256", "b512", "b1024",
                                                                    "b2048", "prefill_first", "exllamav2"],
            rates=None, rate_start=1.0, rate_min=0.125, rate_max=16.0, bisect_steps=2, requests=32, prompt_len=512,
            output_len=64, mixed_rate=1.0, w2_background=8,
            w2_prompt_len=4096, w2_long=2, w2_output_len=128, w3_short=128, w3_long=2048, w3_short_frac=0.8,
            w4_prefix=1024, w4_suffix=32, batch_jobs=32, batch_prompt=64, batch_output=64, batch_budget=256,
            page_size=256, max_seqs=32, exl_chunk=2048, slo_tbt=None, slo_decode_steps=5.0, hf_budget=256)
QUICK = dict(workloads=["W1", "W2", "W3", "W4", "batch"], policies=["b16", "b64", "prefill_first", "exllamav2"],
             rates=[4.0, 16.0], rate_start=4.0, rate_min=1.0, rate_max=32.0, bisect_steps=1, requests=8,
             prompt_len=48, output_len=8, mixed_rate=16.0, w2_background=3, w2_prompt_len=256,
             w2_long=1, w2_output_len=24, w3_short=16, w3_long=160, w3_short_frac=0.75, w4_prefix=64, w4_suffix=8,
             batch_jobs=8, batch_prompt=16, batch_output=16, batch_budget=64, page_size=16, max_seqs=8, exl_chunk=64,
             slo_tbt=0.5, slo_decode_steps=5.0, hf_budget=64)
# SmolLM2 f32 in ~15 minutes on 2 loaded cores. W1: 64-token prompts, so that a prompt prefilled whole
# (prefill_first) stalls the decodes for about 3 decode steps and meets the 5-decode-step SLO when
# prompts arrive alone; what it cannot meet is two or three prompts arriving together. The capacity
# search starts at 0.5 rps and halves down to 0.125 rps (8 requests: 56 s at the lowest rate).
SMOLLM = dict(workloads=["W1", "W2", "W3", "W4"], policies=["b64", "b256", "prefill_first", "exllamav2", "hf"],
              rates=None, rate_start=0.5, rate_min=0.125, rate_max=4.0, bisect_steps=1, requests=8, prompt_len=64,
              output_len=16, mixed_rate=1.0, w2_background=4,
              w2_prompt_len=1024, w2_long=2, w2_output_len=48, w3_short=32, w3_long=512, w3_short_frac=0.8,
              w4_prefix=256, w4_suffix=16, batch_jobs=8, batch_prompt=32, batch_output=16, batch_budget=256,
              page_size=64, max_seqs=16, exl_chunk=256, slo_tbt=None, slo_decode_steps=5.0, hf_budget=256)
PRESETS = {"quick": QUICK, "smollm": SMOLLM, "full": FULL}
PEER = "hf"  # the policy name of the transformers continuous-batching peer
QUEUE_LIMIT_S = 2.0  # capacity: median queueing delay at most this (Sarathi-Serve)
MIN_DECODE_CALLS = 3  # decode-only calls a run needs for its own decode-step clock


# ----------------------------------------------------------------------------- workloads
def w1_requests(args, vocab: int, rate: float) -> list:
    """W1 at `rate`: the same --requests prompts and the same unit-rate Poisson gaps at every rate (scaled
    by 1 / rate; the first arrival at 0), so rates and policies differ only in what they should."""
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, vocab, args.prompt_len).tolist() for _ in range(args.requests)]
    gaps = rng.exponential(1.0, args.requests)
    arrivals = (np.cumsum(gaps) - gaps[0]) / rate
    return [(float(t), p, args.output_len, False) for t, p in zip(arrivals, prompts)]


def workloads(args, vocab: int, rng_seed: int = 0) -> dict:
    """name -> list of (arrival s, prompt ids, max_new_tokens, background flag) of W2, W3, W4 (W1's
    rates are built as they are run: `w1_requests`)."""
    rng = np.random.default_rng(rng_seed)

    def ids(n):
        return rng.integers(3, vocab, n).tolist()

    def poisson(rate, n):
        return np.cumsum(rng.exponential(1 / rate, n)).tolist()

    out = {}
    if "W2" in args.workloads:
        background = [(0.0, ids(32), args.w2_output_len, True) for _ in range(args.w2_background)]
        # long prompts injected once the background decodes (its prefill of 32 tokens is done by then)
        inject = [(0.05 + 0.5 * i, ids(args.w2_prompt_len), 4, False) for i in range(args.w2_long)]
        out["W2"] = background + inject
    if "W3" in args.workloads:
        lengths = np.where(rng.random(args.requests) < args.w3_short_frac, args.w3_short, args.w3_long)
        out["W3"] = [(t, ids(int(n)), args.output_len, False)
                     for t, n in zip(poisson(args.mixed_rate, args.requests), lengths)]
    if "W4" in args.workloads:
        prefix = ids(args.w4_prefix)
        out["W4"] = [(t, prefix + ids(args.w4_suffix), args.output_len, False)
                     for t in poisson(args.mixed_rate, args.requests)]
    return {k: v for k, v in out.items() if k.split("@")[0] in args.workloads}


def policy_kwargs(policy: str, args, longest_prompt: int) -> dict:
    """The Generator arguments of `policy`. With --buckets pow2 (the default) stall_free and exllamav2
    get power-of-two token buckets from the decode-only one up to the budget (as vLLM captures its
    graphs for a ladder of batch sizes), so a step pays for its tokens rounded up to a power of two;
    --buckets budget keeps the generator's default, {decode-only, budget}, where a lone 64-token
    prompt under budget 256 runs a 256-token step."""
    if policy.startswith("b"):
        kwargs = dict(policy="stall_free", token_budget=int(policy[1:]))
    elif policy == "prefill_first":  # whole prompts, batched up to the longest one (its own buckets)
        return dict(policy="prefill_first", token_budget=1 << (longest_prompt - 1).bit_length())
    elif policy == "exllamav2":
        kwargs = dict(policy="exllamav2", token_budget=args.exl_chunk)
    else:
        raise ValueError(f"unknown policy {policy!r}")
    if args.buckets == "pow2":
        budget = kwargs["token_budget"]
        kwargs["token_buckets"] = power_of_two_buckets(min(budget, 1 << (args.max_seqs - 1).bit_length()), budget)
    return kwargs


# ----------------------------------------------------------------------------- one run
def serve(gen, requests) -> tuple[list, float]:
    """Enqueue each request at its arrival time (wall clock) and iterate until all finish.
    Returns (finished jobs with their background flag and enqueue lag after the arrival (s),
    makespan seconds)."""
    import jaxchunk
    pending = sorted(requests, key=lambda r: r[0])
    jobs = []
    start = time.perf_counter()
    while pending or not gen.idle:
        now = time.perf_counter() - start
        while pending and pending[0][0] <= now:
            arrival, prompt, max_new, background = pending.pop(0)
            job = gen.enqueue(jaxchunk.Job(prompt, max_new_tokens=max_new, stop_ids=()))
            jobs.append((job, background, time.perf_counter() - start - arrival))
        if gen.idle and pending:
            time.sleep(max(0.0, pending[0][0] - (time.perf_counter() - start)))
            continue
        gen.iterate()
    return jobs, time.perf_counter() - start


def metrics(jobs, makespan: float) -> dict:
    def stats(values, name):
        values = np.asarray(values, float)
        if not len(values):
            return {f"{name}_median_s": np.nan, f"{name}_p99_s": np.nan}
        return {f"{name}_median_s": float(np.median(values)), f"{name}_p99_s": float(np.percentile(values, 99))}

    def tbt(js):
        return [g for j in js for g in np.diff(j.timings["token_times_s"])]

    done = [j for j, _, _ in jobs]
    background = [j for j, b, _ in jobs if b]
    lag = [late for _, _, late in jobs]  # enqueue after the arrival: counted in TTFT, queue, latency
    row = {"requests": len(done), "output_tokens": sum(len(j.output_ids) for j in done), "makespan_s": makespan}
    row.update(stats([j.timings["ttft_s"] + late for j, late in zip(done, lag)], "ttft"))
    row.update(stats(tbt(done), "tbt"))
    row.update(stats([(j.timings["total_s"] - j.timings["ttft_s"]) / (len(j.output_ids) - 1)
                      for j in done if len(j.output_ids) > 1], "tpot"))
    row.update(stats([j.timings["total_s"] + late for j, late in zip(done, lag)], "e2e"))
    row.update(stats([j.timings["queued_s"] + late for j, late in zip(done, lag)], "queue"))
    row["enqueue_lag_max_s"] = max(lag) if lag else np.nan
    if background:
        row.update(stats(tbt(background), "background_tbt"))
    row["request_throughput"] = len(done) / makespan
    row["token_throughput"] = row["output_tokens"] / makespan
    row["preemptions"] = sum(j.timings["preemptions"] for j in done)
    return row


def workload_key(workload: str) -> dict:
    return {"workload": workload.split("@")[0], "rate": float(workload.split("@")[1]) if "@" in workload else np.nan}


def make_generator(model, requests, policy: str, args, prefix_cache: bool = True):
    """A warmed-up generator for `policy` with the page pool `requests` get (`num_pages_for`), and its
    warm-up's {"compiles", "seconds"}."""
    from jaxchunk.generator import Generator

    longest = max(len(r[1]) for r in requests)
    gen = Generator(model, max_seqs=args.max_seqs, page_size=args.page_size,
                    num_pages=num_pages_for(requests, args.page_size, args.max_seqs), prefix_cache=prefix_cache,
                    **policy_kwargs(policy, args, longest))
    return gen, gen.warmup()


def run_policy(model, workload: str, requests, policy: str, args, gen=None,
               prefix_cache: bool = True) -> tuple[dict, list]:
    """One workload under one policy: a row of metrics and the run's call records. gen: (generator,
    warm-up) from `make_generator` to reuse (idle; its prefix cache is cleared first), else a new one."""
    from jaxchunk.steps import count_compiles

    gen, warm = make_generator(model, requests, policy, args, prefix_cache) if gen is None else gen
    gen.clear_prefix_cache()  # nothing carried over from an earlier run of the same prompts
    steps0, calls0 = len(gen.step_log), len(gen.call_log)
    hits0, lookups0 = gen.stats.prefix_hit_tokens, gen.stats.prefix_lookup_tokens
    with count_compiles() as compiles:
        jobs, makespan = serve(gen, requests)
    steps, calls = list(gen.step_log)[steps0:], list(gen.call_log)[calls0:]
    lookups = gen.stats.prefix_lookup_tokens - lookups0
    row = {**workload_key(workload), "policy": policy, "system": "jaxchunk", "token_budget": gen.scheduler.token_budget,
           "prefix_cache": prefix_cache, "warmup_compiles": warm["compiles"],
           "warmup_s": warm["seconds"], "run_compiles": compiles.count, "steps": len(steps),
           "host_s": sum(s["host_s"] for s in steps), "call_s": sum(s["call_s"] for s in steps),
           "prefix_hit_rate": (gen.stats.prefix_hit_tokens - hits0) / lookups if lookups else 0.0,
           **metrics(jobs, makespan)}
    decode_only = [c["device_s"] for c in calls if c["prefill_tokens"] == 0 and c["decode_rows"] > 0]
    row["decode_step_s"] = float(np.median(decode_only)) if len(decode_only) >= MIN_DECODE_CALLS else np.nan
    calls = [dict(c, workload=row["workload"], policy=policy, run_decode_step_s=row["decode_step_s"]) for c in calls]
    row["output_ids"] = [list(map(int, j.output_ids)) for j, _, _ in jobs]
    return row, calls


def num_pages_for(requests, page_size: int, max_seqs: int) -> int:
    """The page pool each run gets (the generator's and the peer's): half of max_seqs jobs (at least
    2) at the longest prompt + output at once."""
    need = max(len(r[1]) + r[2] for r in requests)
    return -(-need // page_size) * max(2, max_seqs // 2)


# ----------------------------------------------------------------------------- W1: SLO and capacity
def slo_for(row: dict, args, calibration_s: float) -> float:
    """The run's P99 TBT SLO in seconds: --slo-tbt, or --slo-decode-steps times the run's own median
    decode-only call (its clock: the shared CPU's speed drifts 2x within minutes, so an SLO in seconds
    fixed at the start would measure the neighbours' load, not the policy), or the calibration's when
    the run had too few decode-only calls (and for the peer, whose steps are not ours)."""
    if args.slo_tbt is not None:
        return float(args.slo_tbt)
    step = row.get("decode_step_s", np.nan)
    return float(args.slo_decode_steps * (step if step == step else calibration_s))


def meets_slo(row: dict, slo: float) -> bool:
    """Sarathi-Serve's capacity condition: P99 TBT <= slo and median queueing delay <= 2 s."""
    return bool(row["tbt_p99_s"] <= slo and row["queue_median_s"] <= QUEUE_LIMIT_S)


def search_capacity(check, start: float, lo: float, hi: float, bisect_steps: int) -> Optional[float]:
    """The highest rate in [lo, hi] for which check(rate) holds, by doubling up from `start` (or halving
    down) to the first change, then `bisect_steps` geometric bisections between the last pass and the
    first failure. None: even `lo` fails. Each rate is checked once."""
    seen = {}

    def ok(rate):
        rate = float(f"{rate:.3g}")
        if rate not in seen:
            seen[rate] = check(rate)
        return seen[rate]

    passed = failed = None
    if ok(start):
        passed = start
        while passed * 2 <= hi * (1 + 1e-9):
            if not ok(passed * 2):
                failed = passed * 2
                break
            passed *= 2
    else:
        failed = start
        while failed / 2 >= lo * (1 - 1e-9):
            if ok(failed / 2):
                passed = failed / 2
                break
            failed /= 2
    if passed is not None and failed is not None:
        for _ in range(bisect_steps):
            mid = float(f"{np.sqrt(passed * failed):.3g}")
            if ok(mid):
                passed = mid
            else:
                failed = mid
    return None if passed is None else float(f"{passed:.3g}")


def run_w1(model, args, vocab: int, calibration_s: float) -> tuple[list, list]:
    """W1 per jaxchunk policy: the --rates grid, or the capacity search (`search_capacity`), one
    generator per policy reused across its rates; each row's SLO from `slo_for`. Returns (rows,
    call records)."""
    rows, calls = [], []
    for policy in [p for p in args.policies if p != PEER]:
        gen = make_generator(model, w1_requests(args, vocab, 1.0), policy, args)

        def check(rate, policy=policy, gen=gen):
            row, call_rows = run_policy(model, f"W1@{rate:g}", w1_requests(args, vocab, rate), policy, args, gen)
            row["slo_s"] = slo_for(row, args, calibration_s)
            rows.append(row)
            calls.extend(call_rows)
            verdict = "meets" if meets_slo(row, row["slo_s"]) else "misses"
            print(f"  W1 {policy} @ {rate:g} rps: P99 TBT {row['tbt_p99_s']:.2f} s (SLO {row['slo_s']:.2f} s), "
                  f"median queue {row['queue_median_s']:.2f} s -> {verdict}", flush=True)
            return meets_slo(row, row["slo_s"])

        if args.rates:
            for rate in args.rates:
                check(rate)
        else:
            search_capacity(check, args.rate_start, args.rate_min, args.rate_max, args.bisect_steps)
    return rows, calls


def decode_step_seconds(model, args, vocab: int) -> dict:
    """The decode-only step the SLO is a multiple of: max_seqs // 2 jobs of W1's prompt length
    decoding together (stall_free, budget 256: their prompts first, then decodes only); the median
    device seconds of those decode-only calls."""
    import jaxchunk
    from jaxchunk.generator import Generator

    rows = max(1, args.max_seqs // 2)
    rng = np.random.default_rng(7)
    gen = Generator(model, token_budget=256, max_seqs=args.max_seqs, page_size=args.page_size,
                    num_pages=rows * -(-(args.prompt_len + max(args.output_len, 8)) // args.page_size))
    gen.warmup()
    for _ in range(rows):
        gen.enqueue(jaxchunk.Job(rng.integers(3, vocab, args.prompt_len).tolist(),
                                 max_new_tokens=max(args.output_len, 8), stop_ids=()))
    gen.run()
    times = [c["device_s"] for c in gen.call_log if c["prefill_tokens"] == 0 and c["decode_rows"] == rows]
    return {"decode_step_s": float(np.median(times)), "rows": rows, "context": args.prompt_len, "calls": len(times)}


# ----------------------------------------------------------------------------- the transformers peer
def hf_worker(spec: dict) -> dict:
    """In its own process: transformers' continuous batching on each workload in spec["workloads"]
    (name -> requests) and on W1 (spec["w1"]: the --rates grid or the same capacity search as the
    generator's), requests added at their arrival on the wall clock. Returns name -> {"jobs":
    [{"output_ids", "timings"} in arrival order], "makespan_s"} and a note."""
    from types import SimpleNamespace

    import torch
    import transformers
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    from experiments.compare_peers import load_transformers
    model = load_transformers(spec["gguf"], spec["dtype"], spec["threads"], attn_implementation="paged|sdpa")
    rng = np.random.default_rng(99)
    out, attn = {}, None

    def run(name, requests):
        nonlocal attn
        config = GenerationConfig(do_sample=False, eos_token_id=-1, max_new_tokens=max(r[2] for r in requests))
        cb = ContinuousBatchingConfig(page_size=spec["page_size"],
                                      num_blocks=num_pages_for(requests, spec["page_size"], spec["max_seqs"]),
                                      max_batch_tokens=spec["hf_budget"], max_requests_per_batch=spec["max_seqs"])
        manager = model.init_continuous_batching(generation_config=config, continuous_batching_config=cb)
        manager.warmup()
        manager.start()
        attn = model.config._attn_implementation
        try:
            longest = max(len(r[1]) for r in requests)
            warm = manager.add_request(rng.integers(3, spec["vocab"], longest).tolist(), max_new_tokens=2,
                                       eos_token_id=-1)
            while not ((r := manager.get_result(warm, timeout=60)) and r.is_finished()):
                if not manager.is_running():
                    raise RuntimeError("transformers' generation thread stopped during the warm-up")
            ids, start = [], time.perf_counter()
            for arrival, prompt, max_new, _ in sorted(requests, key=lambda r: r[0]):
                time.sleep(max(0.0, start + arrival - time.perf_counter()))
                ids.append(manager.add_request(prompt, max_new_tokens=max_new, record_timestamps=True,
                                               eos_token_id=-1))
            results = {}
            while len(results) < len(ids):
                r = manager.get_result(timeout=1)
                if r is not None and r.is_finished():
                    if r.error:
                        raise RuntimeError(f"transformers request {r.request_id} failed: {r.error}")
                    results[r.request_id] = r
                elif r is None and not manager.is_running():
                    raise RuntimeError("transformers' generation thread stopped")
        finally:
            manager.stop(block=True, timeout=30)
            manager.destroy()
        jobs = []
        for rid in ids:
            r = results[rid]
            since = [t - r.created_time for t in r.timestamps]
            jobs.append({"output_ids": list(map(int, r.generated_tokens)),
                         "timings": {"queued_s": r.lifespan[0] - r.created_time, "ttft_s": since[0],
                                     "token_times_s": since, "total_s": r.lifespan[1] - r.created_time,
                                     "preemptions": np.nan}})  # the manager does not count its requeues
        out[name] = {"jobs": jobs, "makespan_s": max(r.lifespan[1] for r in results.values()) - start}
        return out[name]

    for name, requests in spec["workloads"].items():
        run(name, requests)
    if spec.get("w1"):
        w1 = SimpleNamespace(**spec["w1"])

        def check(rate):
            done = run(f"W1@{rate:g}", w1_requests(w1, spec["vocab"], rate))
            return meets_slo(metrics(peer_jobs(done), done["makespan_s"]), w1.slo)

        if w1.rates:
            for rate in w1.rates:
                check(rate)
        else:
            search_capacity(check, w1.rate_start, w1.rate_min, w1.rate_max, w1.bisect_steps)
    note = (f"transformers {transformers.__version__} (torch {torch.__version__}) continuous batching, attn={attn}, "
            f"{spec['dtype']}, threads={torch.get_num_threads()}, "
            f"max_batch_tokens={spec['hf_budget']}, max_requests_per_batch={spec['max_seqs']}, "
            f"page_size={spec['page_size']}")
    return {"workloads": out, "note": note}


def peer_jobs(done: dict, requests=None) -> list:
    """The peer's jobs of one workload as `metrics` takes them (background flags from `requests`,
    in arrival order; no enqueue lag: each was added at its arrival)."""
    from types import SimpleNamespace
    order = sorted(requests, key=lambda r: r[0]) if requests else [None] * len(done["jobs"])
    return [(SimpleNamespace(**j), bool(r[3]) if r else False, 0.0) for j, r in zip(done["jobs"], order)]


def run_peer(loads: dict, args, vocab: int, slo: Optional[float]) -> tuple[list[dict], str]:
    """The "hf" policy on every workload (and W1 when slo is given), in a subprocess (its own memory
    and threads); one row each."""
    import json
    import subprocess
    import sys
    import tempfile
    threads = len(os.sched_getaffinity(0))  # the usable cores, as JAX uses them
    w1 = None
    if slo is not None:
        w1 = dict(slo=slo, **{k: getattr(args, k) for k in ("requests", "prompt_len", "output_len", "rates",
                                                            "rate_start", "rate_min", "rate_max", "bisect_steps")})
    spec = dict(gguf=str(common.model_path(args.model)), dtype=args.dtype, threads=threads,
                page_size=args.page_size, max_seqs=args.max_seqs, hf_budget=args.hf_budget, vocab=vocab,
                workloads=loads, w1=w1)
    with tempfile.TemporaryDirectory(prefix="serving-peer-") as tmp:
        spec["result_path"] = str(Path(tmp) / "result.json")
        (Path(tmp) / "spec.json").write_text(json.dumps(spec))
        path = os.pathsep.join(filter(None, [str(common.ROOT), os.environ.get("PYTHONPATH")]))
        proc = subprocess.run([sys.executable, "-m", "experiments.serving", "--worker", str(Path(tmp) / "spec.json")],
                              env=dict(os.environ, TQDM_DISABLE="1", PYTHONPATH=path))
        if proc.returncode:
            print(f"serving: the transformers peer failed (exit {proc.returncode}); see its error output above",
                  file=sys.stderr)
            return [], ""
        result = json.loads(Path(spec["result_path"]).read_text())
    rows = []
    for name, done in result["workloads"].items():
        rows.append({**workload_key(name), "policy": PEER, "system": "transformers", "token_budget": args.hf_budget,
                     "prefix_cache": np.nan, "run_compiles": np.nan,
                     **metrics(peer_jobs(done, loads.get(name)), done["makespan_s"]),
                     "output_ids": [j["output_ids"] for j in done["jobs"]]})
    return rows, result["note"]


def run_batch(model, args, vocab: int) -> dict:
    """--batch-jobs jobs decoding together: the generator (budget --batch-budget) vs Model.generate's
    code on one batch (prefill + decode, tok/s of generated tokens; best of 2 interleaved rounds), and
    the generator's decode phase alone."""
    import jaxchunk
    from jaxchunk.cache import init_cache
    from jaxchunk.generate import generate_ids
    from jaxchunk.generator import Generator
    rng = np.random.default_rng(5)
    prompts = [rng.integers(3, vocab, args.batch_prompt).tolist() for _ in range(args.batch_jobs)]
    n = args.batch_output
    gen = Generator(model, token_budget=args.batch_budget, max_seqs=args.batch_jobs,
                    page_size=args.page_size, num_pages=args.batch_jobs * -(-(args.batch_prompt + n) // args.page_size))
    gen.warmup()

    def batch():  # Model.generate's code without the text: one cache, one on-device decode loop
        cache = init_cache(model.config, len(prompts), model.max_seq_len, model.cache_dtype)
        return generate_ids(model.params, model.config, cache, prompts, max_new_tokens=n, stop_ids=())

    batch()  # warm-up (compiles)
    times = {"generator": [], "model_generate": []}
    decode_tok_s = []
    for _ in range(2):  # interleaved rounds
        jobs = [gen.enqueue(jaxchunk.Job(p, max_new_tokens=n, stop_ids=())) for p in prompts]
        start = time.perf_counter()
        gen.run()
        times["generator"].append(time.perf_counter() - start)
        # decode phase alone: from the last job's first token to the end, the tokens after each first
        first = max(j.timings["ttft_s"] for j in jobs)
        end = max(j.timings["total_s"] for j in jobs)
        decode_tok_s.append(len(jobs) * (n - 1) / (end - first))
        start = time.perf_counter()
        batch()
        times["model_generate"].append(time.perf_counter() - start)
    tokens = args.batch_jobs * n
    gen_tok_s, ref_tok_s = tokens / min(times["generator"]), tokens / min(times["model_generate"])
    return {"workload": "batch", "policy": f"b{args.batch_budget}", "requests": args.batch_jobs,
            "output_tokens": tokens, "token_throughput": gen_tok_s, "model_generate_tok_s": ref_tok_s,
            "ratio_vs_model_generate": gen_tok_s / ref_tok_s, "generator_decode_tok_s": max(decode_tok_s),
            "host_s": sum(s["host_s"] for s in gen.step_log), "call_s": sum(s["call_s"] for s in gen.step_log),
            "steps": len(gen.step_log), "calls_by_shape": calls_by_shape(gen.call_log),
            "batch_seconds": times}


def calls_by_shape(calls) -> dict:
    """Where a run's device time went: "T=<bucket> prefill" / "T=<bucket> decode-only" -> calls,
    device seconds, mean decode rows."""
    out = {}
    for c in calls:
        key = f"T={c['token_bucket']} " + ("prefill" if c["prefill_tokens"] else "decode-only")
        entry = out.setdefault(key, {"calls": 0, "device_s": 0.0, "decode_rows": 0})
        entry["calls"] += 1
        entry["device_s"] += c["device_s"]
        entry["decode_rows"] += c["decode_rows"]
    for entry in out.values():
        entry["decode_rows"] /= entry["calls"]
    return out


# ----------------------------------------------------------------------------- analysis
def shape_key(call: dict) -> str:
    return f"T={call['token_bucket']},S={call['max_seqs']}"


STEP_FEATURES = ("prefill_tokens", "decode_rows", "kv_tokens")


def fit_step_model(calls, held_out: float = 0.25, seed: int = 0, in_decode_steps: bool = False) -> dict:
    """Least squares of each call's device seconds (`device_s`: the model call and its sampling, not
    the host's scheduling or step building) on a constant per step shape (T tokens, S sequences: the
    padded work) + prefill tokens + decode rows + cached tokens read. `held_out` of each shape's calls
    (shapes with >= 4 calls) are left out of the fit and its error is measured on them: relative RMS
    error (RMS / mean seconds) and the median |error| / seconds; the same for a single-constant fit.
    in_decode_steps: fit device_s / the run's median decode-only call (`run_decode_step_s`) instead,
    which takes out the shared CPU's drift between runs (coefficients are then in decode steps)."""
    calls = [c for c in calls if "device_s" in c]
    if in_decode_steps:
        calls = [dict(c, device_s=c["device_s"] / c["run_decode_step_s"]) for c in calls
                 if c.get("run_decode_step_s", np.nan) == c.get("run_decode_step_s", np.nan)]
    if len(calls) < 8:
        return {}
    shapes = sorted({shape_key(c) for c in calls}, key=lambda k: tuple(int(v.split("=")[1]) for v in k.split(",")))
    rng = np.random.default_rng(seed)
    test = np.zeros(len(calls), bool)
    for shape in shapes:
        idx = np.array([i for i, c in enumerate(calls) if shape_key(c) == shape])
        if len(idx) >= 4:
            test[rng.choice(idx, int(round(held_out * len(idx))), replace=False)] = True
    y = np.array([c["device_s"] for c in calls])
    feats = np.array([[c[f] for f in STEP_FEATURES] for c in calls], float)
    onehot = np.array([[shape_key(c) == k for k in shapes] for c in calls], float)

    def fit(x):
        coef, *_ = np.linalg.lstsq(x[~test], y[~test], rcond=None)
        pred = x @ coef
        errors = {}
        for name, part in (("train", ~test), ("held_out", test)):
            if part.any():
                err = pred[part] - y[part]
                errors[f"{name}_rel_rms_error"] = float(np.sqrt(np.mean(err ** 2)) / np.mean(y[part]))
                errors[f"{name}_median_rel_error"] = float(np.median(np.abs(err) / y[part]))
        return coef, errors

    coef, errors = fit(np.hstack([onehot, feats]))
    linear_coef, linear_errors = fit(np.hstack([np.ones((len(calls), 1)), feats]))
    out = {"unit": "decode steps" if in_decode_steps else "s",
           "shape_s": dict(zip(shapes, map(float, coef[:len(shapes)]))),
           **{f"per_{f.rstrip('s')}_s": float(v) for f, v in zip(STEP_FEATURES, coef[len(shapes):])},
           **errors, "calls": len(calls), "held_out_calls": int(test.sum()),
           "single_constant_fit": {"intercept_s": float(linear_coef[0]),
                                   **{f"per_{f.rstrip('s')}_s": float(v) for f, v in zip(STEP_FEATURES,
                                                                                           linear_coef[1:])},
                                   **linear_errors}}
    return out


def predict_step_s(fit: dict, token_bucket: int, max_seqs: int, prefill_tokens: int, decode_rows: int,
                   kv_tokens: int) -> float:
    """The fitted device seconds of one call (NaN for a step shape the fit has not seen)."""
    base = fit.get("shape_s", {}).get(f"T={token_bucket},S={max_seqs}")
    if base is None:
        return float("nan")
    return (base + fit["per_prefill_token_s"] * prefill_tokens + fit["per_decode_row_s"] * decode_rows
            + fit["per_kv_token_s"] * kv_tokens)


def predicted_budget(fit: dict, budgets, max_seqs: int, decode_rows: int, kv_tokens: int,
                     target_s: float) -> tuple[Optional[int], dict]:
    """The largest of `budgets` whose step (decode_rows decodes + the rest of the budget in prefill
    tokens, kv_tokens cached tokens read) the fit predicts within target_s; and each prediction."""
    predicted = {int(b): predict_step_s(fit, b, max_seqs, b - decode_rows, decode_rows, kv_tokens)
                 for b in sorted(budgets)}
    ok = [b for b, t in predicted.items() if t <= target_s]
    return (max(ok) if ok else None), predicted


def capacity(df, slo: Optional[float] = None) -> dict:
    """policy -> the highest W1 rate meeting P99 TBT <= SLO (`slo` seconds, or each row's `slo_s`)
    and median queueing delay <= 2 s (0.0: none)."""
    w1 = df[df.workload == "W1"]
    out = {}
    for policy, part in w1.groupby("policy"):
        limit = part.slo_s if slo is None else slo
        ok = part[(part.tbt_p99_s <= limit) & (part.queue_median_s <= QUEUE_LIMIT_S)]
        out[policy] = float(ok.rate.max()) if len(ok) else 0.0
    return out


def capacity_summary(df, slo: Optional[float] = None, baseline: str = "prefill_first") -> dict:
    """Capacity per policy with what it means, and each policy's ratio to `baseline`'s. A policy that
    met no rate has capacity 0 = "below the lowest rate tried" (no ratio when the baseline is 0)."""
    cap = capacity(df, slo)
    w1 = df[df.workload == "W1"]
    summary = {"capacity_rps": cap, "rates_tried": {p: sorted(map(float, part.rate)) for p, part in
                                                    w1.groupby("policy")}, "meaning": {}, "ratio_vs_" + baseline: {}}
    for policy, rps in cap.items():
        tried = summary["rates_tried"][policy]
        if rps == 0.0:
            summary["meaning"][policy] = f"0: below the lowest rate tried ({tried[0]:g} rps)"
        elif rps == max(tried):
            summary["meaning"][policy] = f"at least {rps:g} rps (the highest rate tried)"
        else:
            summary["meaning"][policy] = f"{rps:g} rps (fails at {min(r for r in tried if r > rps):g})"
    base = cap.get(baseline)
    for policy, rps in cap.items():
        if policy != baseline and base is not None:
            summary["ratio_vs_" + baseline][policy] = rps / base if base else None
    return summary


def same_ids(rows) -> None:
    """Each row's `same_ids_frac`: the share of its jobs whose greedy ids equal the first policy's on
    that workload (the generator's policies must all agree; the peer, f32, should)."""
    first = {}
    for row in rows:
        key = (row["workload"], row["rate"] if row["rate"] == row["rate"] else None)
        ref = first.setdefault(key, row["output_ids"])
        row["same_ids_frac"] = float(np.mean([a == b for a, b in zip(row["output_ids"], ref)]))


def plot(df, path: Path, title: str):
    """W1: P99 TBT over each run's SLO against the rate, per policy (a cross where the median queueing
    delay exceeds 2 s). Bars per other workload and policy: TTFT P99, TBT P99, output tok/s; the W2
    background's TBT; the batch section's tok/s next to generate_ids'."""
    plt = common.pyplot()
    w1 = df[df.workload == "W1"]
    runs = df[~df.workload.isin(["batch", "W1"])]
    batch = df[df.workload == "batch"]
    panels = [("ttft_p99_s", "TTFT P99 (s)"), ("tbt_p99_s", "TBT P99 (s)"), ("token_throughput", "output tok/s")]
    panels = panels if len(runs) else []
    extra = (["W1"] * int(len(w1) > 0) + ["W2"] * int(len(runs) > 0 and "W2" in set(runs.workload))
             + ["batch"] * int(len(batch) > 0))
    fig, axes = plt.subplots(1, len(panels) + len(extra), figsize=(5 * (len(panels) + len(extra)), 4.2),
                             squeeze=False)
    axes = list(axes[0])
    if panels:
        label_of = (runs.workload + runs.rate.map(lambda r: "" if r is None or r != r else f"@{float(r):g}")
                    + runs.prefix_cache.map(lambda c: " no reuse" if c is False or c == 0.0 else ""))
        policies, names = list(dict.fromkeys(runs.policy)), list(dict.fromkeys(label_of))
        width = 0.8 / len(policies)
        for ax, (col, label) in zip(axes, panels):
            for i, policy in enumerate(policies):
                part = runs.policy == policy
                ax.bar([names.index(k) + i * width for k in label_of[part]], runs[part][col], width, label=policy)
            ax.set_xticks([i + 0.4 - width / 2 for i in range(len(names))], names, rotation=30, fontsize=8)
            ax.set_ylabel(label)
            if col != "token_throughput":
                ax.set_yscale("log")
        axes[0].legend(fontsize=7)
    rest = axes[len(panels):]
    if "W1" in extra:
        ax, rest = rest[0], rest[1:]
        for i, (policy, part) in enumerate(w1.groupby("policy", sort=False)):
            part = part.sort_values("rate")
            ratio = part.tbt_p99_s / part.slo_s
            ax.plot(part.rate, ratio, marker="o", color=f"C{i}", label=policy)
            queued = part.queue_median_s > QUEUE_LIMIT_S
            ax.scatter(part.rate[queued], ratio[queued], marker="x", s=80, color="k", zorder=3)
        ax.axhline(1.0, ls="--", c="k", lw=1)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.xaxis.set_major_formatter(lambda v, _: f"{v:g}")
        ax.yaxis.set_major_formatter(lambda v, _: f"{v:g}")
        ax.set_xlabel("W1 arrival rate (requests/s)")
        ax.set_ylabel("W1 P99 TBT / SLO (x: median queue > 2 s)")
        ax.legend(fontsize=7)
    if "W2" in extra:
        ax, rest = rest[0], rest[1:]
        w2 = runs[runs.workload == "W2"]
        ax.bar(range(len(w2)), w2.background_tbt_p99_s, label="P99")
        ax.bar(range(len(w2)), w2.background_tbt_median_s, label="median")
        ax.set_xticks(range(len(w2)), w2.policy, rotation=30, fontsize=8)
        ax.set_ylabel("W2 background TBT (s)")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
    if "batch" in extra:
        ax, row = rest[0], batch.iloc[0]
        values = [row.token_throughput, row.generator_decode_tok_s, row.model_generate_tok_s]
        ax.bar(range(3), values, color=["C0", "C0", "C1"])
        ax.set_xticks(range(3), ["generator", "generator\n(decode phase)", "generate_ids\n(one batch)"], fontsize=8)
        ax.set_ylabel(f"tok/s, {int(row.requests)} jobs (ratio {row.ratio_vs_model_generate:.2f}x)")
    fig.suptitle(title, fontsize=10)
    return common.save_figure(fig, path)


# ----------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=common.DEFAULT_MODEL, choices=common.MODELS)
    p.add_argument("--dtype", default="f32", choices=common.DTYPES)
    p.add_argument("--workloads", type=lambda s: common.parse_list(s, str))
    p.add_argument("--policies", type=lambda s: common.parse_list(s, str))
    p.add_argument("--rates", type=lambda s: common.parse_list(s, float),
                   help="W1 requests / s, a fixed grid (default of --preset full / smollm: the capacity search)")
    for name, what in (("rate_start", "W1 capacity search: first rate"), ("rate_min", "lowest rate it tries"),
                       ("rate_max", "highest rate it tries"), ("mixed_rate", "W3 / W4 requests / s"),
                       ("slo_decode_steps", "SLO (without --slo-tbt): P99 TBT <= this many decode-only steps")):
        p.add_argument("--" + name.replace("_", "-"), type=float, help=what)
    p.add_argument("--bisect-steps", type=int, help="W1 capacity search: bisections after the first failure")
    for name in ("requests", "prompt_len", "output_len", "w2_background", "w2_prompt_len", "w2_long", "w2_output_len",
                 "w3_short", "w3_long", "w4_prefix", "w4_suffix", "batch_jobs", "batch_prompt", "batch_output",
                 "batch_budget", "page_size", "max_seqs", "exl_chunk", "hf_budget"):
        p.add_argument("--" + name.replace("_", "-"), type=int)
    p.add_argument("--w3-short-frac", type=float)
    p.add_argument("--buckets", choices=("pow2", "budget"), default="pow2",
                   help="token buckets of stall_free / exllamav2 (policy_kwargs)")
    p.add_argument("--slo-tbt", type=float, help="P99 TBT SLO for capacity (s); default: --slo-decode-steps")
    p.add_argument("--quick", action="store_true", help="--preset quick")
    p.add_argument("--preset", choices=PRESETS, help=f"settings (explicit flags still win); default full; "
                   f"quick: {QUICK}; smollm (SmolLM2 in ~15 min): {SMOLLM}")
    p.add_argument("--out", type=Path, default=Path("results/serving"))
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: the transformers peer, spec file
    args = p.parse_args(argv)
    if args.quick and args.preset not in (None, "quick"):
        p.error("--quick is --preset quick")
    args.preset = "quick" if args.quick else (args.preset or "full")
    common.apply_preset(args, PRESETS[args.preset])
    if PEER in args.policies and args.model == common.TINY_MODEL:
        p.error(f"policy {PEER!r} (transformers) needs the GGUF; --model {args.model} is jaxchunk only")
    return args


COLUMNS = ["workload", "rate", "policy", "ttft_median_s", "ttft_p99_s", "tbt_median_s", "tbt_p99_s",
           "background_tbt_p99_s", "queue_median_s", "token_throughput", "preemptions", "prefix_hit_rate",
           "same_ids_frac", "host_s", "call_s", "run_compiles"]


def main(argv=None):
    import pandas as pd

    from jaxchunk.api import Model

    args = parse_args(argv)
    if args.worker:
        import json
        spec = json.loads(Path(args.worker).read_text())
        Path(spec["result_path"]).write_text(json.dumps(hf_worker(spec)))
        return None
    started = time.perf_counter()
    machine = common.machine_info()
    loaded = common.load_model(args.model, args.dtype)
    vocab = loaded.config.vocab_size
    loads = workloads(args, vocab)
    w1 = "W1" in args.workloads
    longest = max([len(r[1]) + r[2] for reqs in loads.values() for r in reqs] + [args.batch_prompt + args.batch_output]
                  + [args.prompt_len + args.output_len] * w1)
    max_seq_len = min(loaded.config.max_position_embeddings, -(-longest // args.page_size) * args.page_size)
    model = Model(loaded.config, loaded.params, loaded.tokenizer, dtype=args.dtype, max_seq_len=max_seq_len)
    rows, calls = [], []
    slo, decode_step = args.slo_tbt, None
    if w1 or "W2" in args.workloads:
        decode_step = decode_step_seconds(model, args, vocab)
        if slo is None:
            slo = args.slo_decode_steps * decode_step["decode_step_s"]
        print(f"decode-only step ({decode_step['rows']} rows at {decode_step['context']} tokens): "
              f"{decode_step['decode_step_s'] * 1e3:.0f} ms; SLO P99 TBT <= {slo:.3f} s"
              + ("" if args.slo_tbt is not None else f" ({args.slo_decode_steps:g} decode steps)"), flush=True)
    if w1:
        rows, calls = run_w1(model, args, vocab, decode_step["decode_step_s"])
    runs = [(w, p, cache) for w in loads for p in args.policies if p != PEER for cache in (True, False)
            if cache or w == "W4"]  # W4 also without prefix reuse
    for workload, policy, cache in (bar := common.progress(runs, "serving")):
        bar.set_postfix_str(f"{workload} {policy}" + ("" if cache else " no reuse"))
        row, call_rows = run_policy(model, workload, loads[workload], policy, args, prefix_cache=cache)
        if slo is not None:
            row["slo_s"] = slo_for(row, args, decode_step["decode_step_s"])
        rows.append(row)
        calls += call_rows
    peer_note = None
    if PEER in args.policies:
        peer_rows, peer_note = run_peer({k: [list(r) for r in v] for k, v in loads.items()}, args, vocab,
                                        slo if w1 else None)
        for row in peer_rows:  # the peer's steps are not ours: the SLO in seconds from the calibration
            row["slo_s"] = slo
        rows += peer_rows
    same_ids(rows)
    for row in rows:
        del row["output_ids"]
    if "batch" in args.workloads:
        rows.append(run_batch(model, args, vocab))
    machine["load_average_after_1_5_15"] = [round(x, 2) for x in os.getloadavg()]
    df = pd.DataFrame(rows)
    fit, fit_steps = fit_step_model(calls), fit_step_model(calls, in_decode_steps=True)
    analysis = {"step_model": fit, "step_model_in_decode_steps": fit_steps, "slo_tbt_s": slo,
                "decode_step": decode_step,
                "slo_rule": (f"--slo-tbt {args.slo_tbt} s" if args.slo_tbt is not None else
                             f"{args.slo_decode_steps:g} x each run's median decode-only call (Sarathi-Serve: "
                             "strict 5x, relaxed 25x a decode iteration); the peer: x the calibration's")}
    if w1:
        analysis.update(capacity_summary(df))
    w2 = df[df.workload == "W2"]
    budgets = sorted({int(p[1:]) for p in args.policies if p[:1] == "b" and p[1:].isdigit()})
    if len(w2) and fit and budgets:
        # the background's rows at half their output, and the long prompt's last chunk (the most it reads)
        kv = args.w2_background * (32 + args.w2_output_len // 2) + args.w2_prompt_len
        # the SLO in decode steps takes the drift-free fit; in seconds (--slo-tbt), the fit in seconds
        model_fit, target = (fit, slo) if args.slo_tbt is not None else (fit_steps, args.slo_decode_steps)
        best, predicted = predicted_budget(model_fit, budgets, args.max_seqs, args.w2_background, kv, target)
        analysis["predicted_budget_for_slo"] = best
        analysis["predicted_step_s_per_budget"] = predicted
        ok = w2[w2.policy.str.match(r"b\d+") & (w2.background_tbt_p99_s <= w2.slo_s)]
        analysis["measured_best_budget_for_slo"] = int(ok.token_budget.max()) if len(ok) else None
        analysis["measured_background_tbt_p99_s_per_budget"] = {
            int(r.token_budget): float(r.background_tbt_p99_s) for r in w2[w2.policy.str.match(r"b\d+")].itertuples()}
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    settings.update(wall_s=round(time.perf_counter() - started, 1), model_source=loaded.source, analysis=analysis,
                    peer=peer_note,
                    timing="arrivals on the wall clock; each policy's generator warmed up first (warm-up compiles "
                           "counted apart); TTFT from enqueue; TBT every gap between a job's tokens")
    df = common.write_results(args.out, df.to_dict("records"), settings, machine,
                              json_only=[c for c in ("batch_seconds", "calls_by_shape") if c in df])
    pd.DataFrame(calls).to_csv(args.out / "calls.csv", index=False)
    png = plot(df, args.out / "serving.png",
               f"Dynamic generator: {args.model} {args.dtype}, page {args.page_size}, {machine['usable_cores']} cores, "
               f"load {machine['load_average_1_5_15'][0]}->{machine['load_average_after_1_5_15'][0]}")
    common.print_table(df, [c for c in COLUMNS if c in df], title=f"\nload average before "
                       f"{machine['load_average_1_5_15']}, after {machine['load_average_after_1_5_15']}")
    print(f"\nstep-time model: {fit}\nstep-time model in decode steps: {fit_steps}")
    if w1:
        print(f"capacity (P99 TBT <= {slo:.3f} s [{analysis['slo_rule']}], median queue <= {QUEUE_LIMIT_S:g} s): "
              f"{analysis['meaning']}\ncapacity / prefill_first's: {analysis.get('ratio_vs_prefill_first')}")
    for key in ("predicted_budget_for_slo", "predicted_step_s_per_budget", "measured_best_budget_for_slo",
                "measured_background_tbt_p99_s_per_budget"):
        if key in analysis:
            print(f"{key}: {analysis[key]}")
    if peer_note:
        print(f"peer ({PEER}): {peer_note}")
    common.print_written(args.out, [png] if png else [], settings["wall_s"])
    return df


if __name__ == "__main__":
    main()
