"""The serving study: the dynamic generator (jaxchunk.Generator) under synthetic, offline workloads with
arrivals on the wall clock, per scheduling policy and token budget.

Workloads (random token ids, fixed seeds; `--ignore-eos` style: no stop token, every job runs its
max_new_tokens):
  W1  Poisson arrivals at each of --rates, fixed prompt / output lengths (capacity sweep).
  W2  --w2-background decoders (short prompts, long outputs) running, and --w2-long long prompts
      injected while they decode: the background's time between tokens is the stall.
  W3  Poisson arrivals, bimodal prompt lengths (--w3-short-frac short, the rest long).
  W4  Poisson arrivals, a shared long prefix + a short unique suffix each (prefix reuse).
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
<= --slo-tbt and median queueing delay <= 2 s (Sarathi-Serve's definition). A step-time model is fitted
on every call of every run: call seconds = a + b * prefill tokens + c * decode rows + d * cached tokens
read (least squares; relative RMS error reported), and the largest budget it predicts for a TBT target
(a step of the W2 background's decode rows + one budget of prefill) is written next to the measured
best.

  .venv/bin/python -m experiments.serving --quick                        # SmolLM2, minutes
  .venv/bin/python -m experiments.serving --model tiny-random --quick    # seconds (the test)
  .venv/bin/python -m experiments.serving --preset smollm                # W1 + W2 + the peer, ~15 min
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

from experiments import common

FULL = dict(workloads=["W1", "W2", "W3", "W4", "batch"], policies=["b32", "b64", "b128", "b256", "b512", "b1024",
                                                                    "b2048", "prefill_first", "exllamav2"],
            rates=[0.5, 1.0, 2.0, 4.0], requests=32, prompt_len=512, output_len=64, w2_background=8,
            w2_prompt_len=4096, w2_long=2, w2_output_len=128, w3_short=128, w3_long=2048, w3_short_frac=0.8,
            w4_prefix=1024, w4_suffix=32, batch_jobs=32, batch_prompt=64, batch_output=64, batch_budget=256,
            page_size=256, max_seqs=32, exl_chunk=2048, slo_tbt=0.5, hf_budget=256)
QUICK = dict(workloads=["W1", "W2", "W3", "W4", "batch"], policies=["b16", "b64", "prefill_first", "exllamav2"],
             rates=[4.0, 16.0], requests=8, prompt_len=48, output_len=8, w2_background=3, w2_prompt_len=256,
             w2_long=1, w2_output_len=24, w3_short=16, w3_long=160, w3_short_frac=0.75, w4_prefix=64, w4_suffix=8,
             batch_jobs=8, batch_prompt=16, batch_output=16, batch_budget=64, page_size=16, max_seqs=8, exl_chunk=64,
             slo_tbt=0.5, hf_budget=64)
# SmolLM2 in ~15 minutes on 2 loaded cores: W1 rate sweep + W2, the goal's budgets and the peer.
SMOLLM = dict(workloads=["W1", "W2"], policies=["b64", "b256", "prefill_first", "exllamav2", "hf"],
              rates=[0.5, 1.0, 2.0, 4.0], requests=10, prompt_len=128, output_len=16, w2_background=4,
              w2_prompt_len=1024, w2_long=2, w2_output_len=48, w3_short=32, w3_long=512, w3_short_frac=0.8,
              w4_prefix=256, w4_suffix=16, batch_jobs=8, batch_prompt=32, batch_output=16, batch_budget=256,
              page_size=64, max_seqs=16, exl_chunk=256, slo_tbt=1.0, hf_budget=256)
PRESETS = {"quick": QUICK, "smollm": SMOLLM, "full": FULL}
PEER = "hf"  # the policy name of the transformers continuous-batching peer


# ----------------------------------------------------------------------------- workloads
def workloads(args, vocab: int, rng_seed: int = 0) -> dict:
    """name -> list of (arrival s, prompt ids, max_new_tokens, background flag)."""
    rng = np.random.default_rng(rng_seed)

    def ids(n):
        return rng.integers(3, vocab, n).tolist()

    def poisson(rate, n):
        return np.cumsum(rng.exponential(1 / rate, n)).tolist()

    out = {}
    for rate in args.rates:
        out[f"W1@{rate:g}"] = [(t, ids(args.prompt_len), args.output_len, False) for t in poisson(rate, args.requests)]
    if "W2" in args.workloads:
        background = [(0.0, ids(32), args.w2_output_len, True) for _ in range(args.w2_background)]
        # long prompts injected once the background decodes (its prefill of 32 tokens is done by then)
        inject = [(0.05 + 0.5 * i, ids(args.w2_prompt_len), 4, False) for i in range(args.w2_long)]
        out["W2"] = background + inject
    if "W3" in args.workloads:
        lengths = np.where(rng.random(args.requests) < args.w3_short_frac, args.w3_short, args.w3_long)
        out["W3"] = [(t, ids(int(n)), args.output_len, False)
                     for t, n in zip(poisson(max(args.rates), args.requests), lengths)]
    if "W4" in args.workloads:
        prefix = ids(args.w4_prefix)
        out["W4"] = [(t, prefix + ids(args.w4_suffix), args.output_len, False)
                     for t in poisson(max(args.rates), args.requests)]
    return {k: v for k, v in out.items() if k.split("@")[0] in args.workloads}


def policy_kwargs(policy: str, args, longest_prompt: int) -> dict:
    if policy.startswith("b"):
        return dict(policy="stall_free", token_budget=int(policy[1:]))
    if policy == "prefill_first":  # whole prompts, batched up to the longest one
        return dict(policy="prefill_first", token_budget=1 << (longest_prompt - 1).bit_length())
    if policy == "exllamav2":
        return dict(policy="exllamav2", token_budget=args.exl_chunk)
    raise ValueError(f"unknown policy {policy!r}")


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


def run_policy(model, workload: str, requests, policy: str, args) -> tuple[dict, list]:
    from jaxchunk.generator import Generator
    from jaxchunk.steps import count_compiles

    longest = max(len(r[1]) for r in requests)
    kwargs = policy_kwargs(policy, args, longest)
    gen = Generator(model, max_seqs=args.max_seqs, page_size=args.page_size, num_pages=num_pages_for(requests, args),
                    **kwargs)
    warm = gen.warmup()
    with count_compiles() as compiles:
        jobs, makespan = serve(gen, requests)
    row = {**workload_key(workload), "policy": policy, "system": "jaxchunk", "token_budget": kwargs["token_budget"],
           "warmup_compiles": warm["compiles"],
           "warmup_s": warm["seconds"], "run_compiles": compiles.count, "steps": len(gen.step_log),
           "host_s": sum(s["host_s"] for s in gen.step_log), "call_s": sum(s["call_s"] for s in gen.step_log),
           "prefix_hit_rate": gen.stats.prefix_hit_rate, **metrics(jobs, makespan)}
    calls = [dict(c, workload=row["workload"], policy=policy) for c in gen.call_log]
    row["output_ids"] = [list(map(int, j.output_ids)) for j, _, _ in jobs]
    return row, calls


def num_pages_for(requests, args) -> int:
    """The page pool each run gets (the generator's and the peer's): half of --max-seqs jobs (at least
    2) at the longest prompt + output at once."""
    need = max(len(r[1]) + r[2] for r in requests)
    return -(-need // args.page_size) * max(2, args.max_seqs // 2)


# ----------------------------------------------------------------------------- the transformers peer
def hf_worker(spec: dict) -> dict:
    """In its own process: transformers' continuous batching on each workload in spec["workloads"]
    (name -> requests), requests added at their arrival on the wall clock. Returns name -> {"jobs":
    [{"output_ids", "timings"} in arrival order], "makespan_s"} and a note."""

    import torch
    import transformers
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    from experiments.compare_peers import load_transformers
    model = load_transformers(spec["gguf"], spec["dtype"], spec["threads"], attn_implementation="paged|sdpa")
    rng = np.random.default_rng(99)
    out, attn = {}, None
    for name, requests in spec["workloads"].items():
        config = GenerationConfig(do_sample=False, eos_token_id=-1, max_new_tokens=max(r[2] for r in requests))
        cb = ContinuousBatchingConfig(page_size=spec["page_size"], num_blocks=spec["num_pages"][name],
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
    note = (f"transformers {transformers.__version__} (torch {torch.__version__}) continuous batching, attn={attn}, "
            f"{spec['dtype']}, threads={torch.get_num_threads()}, "
            f"max_batch_tokens={spec['hf_budget']}, max_requests_per_batch={spec['max_seqs']}, "
            f"page_size={spec['page_size']}")
    return {"workloads": out, "note": note}


def run_peer(loads: dict, args, vocab: int) -> tuple[list[dict], str]:
    """The "hf" policy on every workload, in a subprocess (its own memory and threads); one row each."""
    import json
    import subprocess
    import sys
    import tempfile
    from types import SimpleNamespace
    threads = len(os.sched_getaffinity(0))  # the usable cores, as JAX uses them
    spec = dict(gguf=str(common.model_path(args.model)), dtype=args.dtype, threads=threads,
                page_size=args.page_size, max_seqs=args.max_seqs, hf_budget=args.hf_budget, vocab=vocab,
                num_pages={k: num_pages_for(v, args) for k, v in loads.items()}, workloads=loads)
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
        order = sorted(loads[name], key=lambda r: r[0])
        jobs = [(SimpleNamespace(**j), r[3], 0.0) for j, r in zip(done["jobs"], order)]  # added at the arrival
        rows.append({**workload_key(name), "policy": PEER, "system": "transformers", "token_budget": args.hf_budget,
                     "run_compiles": np.nan, **metrics(jobs, done["makespan_s"]),
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
            "steps": len(gen.step_log),
            "batch_seconds": times}


# ----------------------------------------------------------------------------- analysis
def fit_step_model(calls) -> dict:
    """Least squares of call seconds on (1, prefill tokens, decode rows, cached tokens read)."""
    if len(calls) < 8:
        return {}
    x = np.array([[1.0, c["prefill_tokens"], c["decode_rows"], c["kv_tokens"]] for c in calls])
    y = np.array([c["s"] for c in calls])
    coef, *_ = np.linalg.lstsq(x, y, rcond=None)
    pred = x @ coef
    return {"intercept_s": float(coef[0]), "per_prefill_token_s": float(coef[1]),
            "per_decode_row_s": float(coef[2]), "per_cached_token_s": float(coef[3]),
            "rel_rms_error": float(np.sqrt(np.mean((pred - y) ** 2)) / np.mean(y)),
            "calls": len(calls)}


def predicted_budget(fit: dict, decode_rows: int, kv_tokens: int, target_s: float) -> float:
    """The prefill tokens one step can take next to `decode_rows` decodes within `target_s` (the model)."""
    if not fit or fit["per_prefill_token_s"] <= 0:
        return np.nan
    rest = fit["intercept_s"] + fit["per_decode_row_s"] * decode_rows + fit["per_cached_token_s"] * kv_tokens
    return max(0.0, (target_s - rest) / fit["per_prefill_token_s"])


def capacity(df, slo: float) -> dict:
    """policy -> the highest W1 rate meeting P99 TBT <= slo and median queueing delay <= 2 s."""
    w1 = df[df.workload == "W1"]
    out = {}
    for policy, part in w1.groupby("policy"):
        ok = part[(part.tbt_p99_s <= slo) & (part.queue_median_s <= 2.0)]
        out[policy] = float(ok.rate.max()) if len(ok) else 0.0
    return out


def same_ids(rows) -> None:
    """Each row's `same_ids_frac`: the share of its jobs whose greedy ids equal the first policy's on
    that workload (the generator's policies must all agree; the peer, f32, should)."""
    first = {}
    for row in rows:
        key = (row["workload"], row["rate"] if row["rate"] == row["rate"] else None)
        ref = first.setdefault(key, row["output_ids"])
        row["same_ids_frac"] = float(np.mean([a == b for a, b in zip(row["output_ids"], ref)]))


def plot(df, path: Path, title: str):
    """Bars per workload and policy: TTFT P99, TBT P99, output tok/s; the W2 background's TBT; the
    batch section's tok/s next to generate_ids'."""
    plt = common.pyplot()
    runs = df[df.workload != "batch"]
    batch = df[df.workload == "batch"]
    panels = [("ttft_p99_s", "TTFT P99 (s)"), ("tbt_p99_s", "TBT P99 (s)"), ("token_throughput", "output tok/s")]
    panels = panels if len(runs) else []
    extra = ["W2"] * int(len(runs) > 0 and "W2" in set(runs.workload)) + ["batch"] * int(len(batch) > 0)
    fig, axes = plt.subplots(1, len(panels) + len(extra), figsize=(5 * (len(panels) + len(extra)), 4.2),
                             squeeze=False)
    axes = list(axes[0])
    if panels:
        label_of = runs.workload + runs.rate.map(lambda r: "" if r is None or r != r else f"@{float(r):g}")
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
    p.add_argument("--rates", type=lambda s: common.parse_list(s, float), help="W1 requests / s")
    for name in ("requests", "prompt_len", "output_len", "w2_background", "w2_prompt_len", "w2_long", "w2_output_len",
                 "w3_short", "w3_long", "w4_prefix", "w4_suffix", "batch_jobs", "batch_prompt", "batch_output",
                 "batch_budget", "page_size", "max_seqs", "exl_chunk", "hf_budget"):
        p.add_argument("--" + name.replace("_", "-"), type=int)
    p.add_argument("--w3-short-frac", type=float)
    p.add_argument("--slo-tbt", type=float, help="P99 TBT SLO for capacity (s)")
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
    longest = max([len(r[1]) + r[2] for reqs in loads.values() for r in reqs] + [args.batch_prompt + args.batch_output])
    max_seq_len = min(loaded.config.max_position_embeddings, -(-longest // args.page_size) * args.page_size)
    model = Model(loaded.config, loaded.params, loaded.tokenizer, dtype=args.dtype, max_seq_len=max_seq_len)
    rows, calls = [], []
    runs = [(w, p) for w in loads for p in args.policies if p != PEER]
    for workload, policy in (bar := common.progress(runs, "serving")):
        bar.set_postfix_str(f"{workload} {policy}")
        row, call_rows = run_policy(model, workload, loads[workload], policy, args)
        rows.append(row)
        calls += call_rows
    peer_note = None
    if PEER in args.policies:
        peer_rows, peer_note = run_peer({k: [list(r) for r in v] for k, v in loads.items()}, args, vocab)
        rows += peer_rows
    same_ids(rows)
    for row in rows:
        del row["output_ids"]
    if "batch" in args.workloads:
        rows.append(run_batch(model, args, vocab))
    machine["load_average_after_1_5_15"] = [round(x, 2) for x in os.getloadavg()]
    df = pd.DataFrame(rows)
    fit = fit_step_model(calls)
    analysis = {"step_model": fit, "capacity_rps": capacity(df, args.slo_tbt), "slo_tbt_s": args.slo_tbt}
    w2 = df[df.workload == "W2"]
    if len(w2) and fit:
        kv = args.w2_background * (32 + args.w2_output_len // 2)
        analysis["predicted_budget_for_slo"] = predicted_budget(fit, args.w2_background, kv, args.slo_tbt)
        ok = w2[w2.policy.str.match(r"b\d+") & (w2.background_tbt_p99_s <= args.slo_tbt)]
        analysis["measured_best_budget_for_slo"] = int(ok.token_budget.max()) if len(ok) else None
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    settings.update(wall_s=round(time.perf_counter() - started, 1), model_source=loaded.source, analysis=analysis,
                    peer=peer_note,
                    timing="arrivals on the wall clock; each policy's generator warmed up first (warm-up compiles "
                           "counted apart); TTFT from enqueue; TBT every gap between a job's tokens")
    df = common.write_results(args.out, df.to_dict("records"), settings, machine,
                              json_only=[c for c in ("batch_seconds",) if c in df])
    pd.DataFrame(calls).to_csv(args.out / "calls.csv", index=False)
    png = plot(df, args.out / "serving.png",
               f"Dynamic generator: {args.model} {args.dtype}, page {args.page_size}, {machine['usable_cores']} cores, "
               f"load {machine['load_average_1_5_15'][0]}->{machine['load_average_after_1_5_15'][0]}")
    common.print_table(df, [c for c in COLUMNS if c in df], title=f"\nload average before "
                       f"{machine['load_average_1_5_15']}, after {machine['load_average_after_1_5_15']}")
    print(f"\nstep-time model: {fit}\ncapacity (rps, P99 TBT <= {args.slo_tbt} s, median queue <= 2 s): "
          f"{analysis['capacity_rps']}")
    for key in ("predicted_budget_for_slo", "measured_best_budget_for_slo"):
        if key in analysis:
            print(f"{key}: {analysis[key]}")
    if peer_note:
        print(f"peer ({PEER}): {peer_note}")
    common.print_written(args.out, [png] if png else [], settings["wall_s"])
    return df


if __name__ == "__main__":
    main()
