"""The paged KV cache and its jitted mixed step (`jaxchunk.paged`) against the contiguous cache's
steps (`jaxchunk.steps`), same model, same cache format, same process (issue 16's measurements).

Sections (each a set of `kind` rows in results.csv):
- prefill:   one sequence of --prompt-len tokens, chunk C (--chunk-sizes), through `mixed_step`
             (T = C, S = 1) vs the contiguous `jitted_prefill_chunk` at chunk C; per --page-sizes.
             One timed call = the whole prompt, chunk after chunk.
- decode:    batch B (--batches) of sequences with --decode-context tokens cached, one token each:
             one paged `mixed_step` (T = S = B; attention auto: on CPU the paged xla backend)
             and the same step with attention_impl="native_cpu" (the native kernel over the page
             table; f32 / bf16 pools), vs the contiguous `jitted_decode_step` (auto: the native
             CPU decode kernel) and the contiguous step with attention_impl="xla"; per --page-sizes.
- mixed:     one paged step of --mixed-decodes decode tokens + one --mixed-chunk-token prefill
             chunk (after --mixed-chunk-cached cached tokens) in a token budget --mixed-budget, vs
             the sum of its parts run separately as paged steps (the decodes in T = S = decodes,
             the chunk in T = chunk, S = 1); per --page-sizes.
- attention: the attention op alone for one layer at the decode and prefill shapes, per page
             size: paged (`paged_attention` auto = xla on CPU, the native_cpu and xla backends, and
             xla with pages_per_block=1) vs contiguous (`attention`, auto), to say where a slower
             step loses its time (`step_gap_s` vs `attention_gap_x_layers_s`).
- blocks:    the xla backend's key-block size per query tier (q_len 1 at batch --batches[-1], 8, and
             --chunk-sizes[0]) and page size: one layer timed for each pages_per_block with 16, 64, 256
             keys per block; the fastest by its minimum (the table in paged_attention.py).
- llama.cpp: (SmolLM2 only, --llama-cpp) llama.cpp's greedy decode at batch 1 after
             --decode-context prompt tokens, run by `experiments.compare_peers`' worker in its own
             process (its Q4_1 GGUF weights, not f32: a reference point, not a like-for-like).

Fairness: the jitted steps are called directly with their inputs already on device (the host
checks, `build_step` / `prefill_chunk`'s guards, are left out of both; `build_step`'s host time is
reported on its own); caches are f32 for both paths (--cache-dtype), filled with random K/V; pages
are assigned in a random permutation of the pool (not contiguously). Each config's paged and
contiguous calls are warmed up (compiles counted), then timed interleaved, round after round
(alternating order), so drift on this shared machine hits both alike; every timed round is
checked to compile nothing (`count_compiles`). tok/s = tokens / median seconds; ratio =
paged tok/s / contiguous tok/s from the same run.

  .venv/bin/python -m experiments.paged_step --quick
  .venv/bin/python -m experiments.paged_step --model tiny-random --quick    # seconds (the test)

Writes results.csv, results.json (machine, load average before and after, settings), paged_step.png.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from experiments import common

FULL = dict(prompt_len=2048, chunk_sizes=[128, 512, 2048], decode_context=512, batches=[1, 8, 32],
            page_sizes=[16, 64, 256], mixed_decodes=16, mixed_chunk=240, mixed_chunk_cached=256,
            mixed_budget=256, repeats=5, sections=["prefill", "decode", "mixed", "attention", "llama.cpp"])
# ~2 minutes on SmolLM2 (2 shared cores): no attention section (`--sections attention` runs it alone).
QUICK = dict(prompt_len=256, chunk_sizes=[64, 256], decode_context=256, batches=[1, 8],
             page_sizes=[16, 256], mixed_decodes=8, mixed_chunk=120, mixed_chunk_cached=128,
             mixed_budget=128, repeats=3, sections=["prefill", "decode", "mixed", "llama.cpp"])
DECODE_ROOM = 64  # capacity past the decode context, both caches (the contiguous max_seq_len, the pages)


# ----------------------------------------------------------------------------- timing
def interleaved(cases: dict, repeats: int) -> tuple[dict, dict, int]:
    """cases: name -> (fn, setup) as `common.timeit`'s. Warm each case up once (its compiles
    counted), then `repeats` rounds calling every case once per round, in alternating order.
    Returns ({name: Timing}, {name: warm-up compiles}, compiles during the timed rounds)."""
    from jaxchunk.steps import count_compiles
    from jaxchunk.timing import Timing, block_until_ready

    def once(fn, setup) -> float:
        args = block_until_ready(setup())
        start = time.perf_counter()
        block_until_ready(fn(*args))
        return time.perf_counter() - start

    first, warm_compiles = {}, {}
    for name, (fn, setup) in cases.items():
        with count_compiles() as counted:
            first[name] = once(fn, setup)
        warm_compiles[name] = counted.count
    samples = {name: [] for name in cases}
    names = list(cases)
    with count_compiles() as timed:
        for r in range(repeats):
            for name in (names if r % 2 == 0 else names[::-1]):
                samples[name].append(once(*cases[name]))
    return {n: Timing(first[n], tuple(samples[n])) for n in names}, warm_compiles, timed.count


def timing_cols(t, tokens: int, prefix: str) -> dict:
    return {f"{prefix}_median_s": t.median_s, f"{prefix}_min_s": t.min_s, f"{prefix}_max_s": t.max_s,
            f"{prefix}_first_s": t.first_s, f"{prefix}_tok_s": tokens / t.median_s}


# ----------------------------------------------------------------------------- state
def random_fill(cache, seed: int):
    """The cache (contiguous or paged, plain float) with random K/V, so nothing runs on zeros."""
    import jax
    import jax.numpy as jnp
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    return cache.replace(keys=jax.random.normal(k1, cache.keys.shape, jnp.float32).astype(cache.keys.dtype) * 0.5,
                         values=jax.random.normal(k2, cache.values.shape, jnp.float32).astype(cache.values.dtype))


class Pool:
    """A paged pool and a page allocator handing out pages in a random permutation of the pool."""

    def __init__(self, config, num_pages: int, page_size: int, dtype: str, seed: int = 0):
        from jaxchunk.paged import init_paged_cache
        self.cache = random_fill(init_paged_cache(config, num_pages=num_pages, page_size=page_size, dtype=dtype), seed)
        self.page_size, self.num_pages = page_size, num_pages
        self.free = list(np.random.default_rng(seed).permutation(num_pages))

    def take(self, tokens: int) -> list[int]:
        n = -(-tokens // self.page_size)
        pages, self.free = self.free[:n], self.free[n:]
        return [int(p) for p in pages]


def device_step(seqs, *, budget, max_seqs, pages_per_seq, pool: Pool, config, host_times: list | None = None):
    """`build_step` on the host (timed into host_times), then on device."""
    import jax

    from jaxchunk.paged import build_step
    start = time.perf_counter()
    step = build_step(seqs, token_budget=budget, max_seqs=max_seqs, max_pages_per_seq=pages_per_seq,
                      num_pages=pool.num_pages, page_size=pool.page_size, config=config)
    if host_times is not None:
        host_times.append(time.perf_counter() - start)
    return jax.device_put(step)


# ----------------------------------------------------------------------------- sections
def bench_prefill(model, args, ids, chunk: int, page_size: int) -> dict:
    import jax.numpy as jnp

    from jaxchunk.cache import init_cache
    from jaxchunk.paged import jitted_mixed_step
    from jaxchunk.steps import jitted_prefill_chunk
    config, params, n = model.config, model.params, args.prompt_len
    n_chunks = -(-n // chunk)
    pool = Pool(config, -(-n // page_size), page_size, args.cache_dtype)
    pages = pool.take(n)
    host = []
    steps = [device_step([(ids[i * chunk:(i + 1) * chunk].tolist(), i * chunk, pages)], budget=chunk, max_seqs=1,
                         pages_per_seq=len(pages), pool=pool, config=config, host_times=host)
             for i in range(n_chunks)]
    state = {"paged": pool.cache, "contig": random_fill(init_cache(config, 1, n_chunks * chunk, args.cache_dtype), 1)}
    tokens, n_valid = [], []
    for i in range(n_chunks):
        part = ids[i * chunk:(i + 1) * chunk]
        tokens.append(jnp.asarray(np.pad(part, (0, chunk - len(part)))[None]))
        n_valid.append(jnp.asarray([len(part)], jnp.int32))

    def paged(cache):
        for step in steps:
            cache, logits = jitted_mixed_step(params, cache, step, config=config)
        state["paged"] = cache
        return cache, logits

    def contig(cache):
        for t, v in zip(tokens, n_valid):
            cache, logits = jitted_prefill_chunk(params, cache, t, v, config=config, attention_impl="auto",
                                                 logits="last")
        state["contig"] = cache
        return cache, logits

    cases = {"paged": (paged, lambda: (state["paged"],)),
             "contiguous": (contig, lambda: (state["contig"].replace(lengths=jnp.zeros((1,), jnp.int32)),))}
    timings, warm, timed = interleaved(cases, args.repeats)
    row = dict(kind="prefill", config=f"chunk {chunk}", chunk=chunk, batch=1, page_size=page_size, tokens=n,
               steps=n_chunks, host_build_ms_per_step=1e3 * float(np.median(host)),
               warmup_compiles=sum(warm.values()), timed_compiles=timed)
    row.update(timing_cols(timings["paged"], n, "paged"))
    row.update(timing_cols(timings["contiguous"], n, "contig"))
    row["ratio"] = row["paged_tok_s"] / row["contig_tok_s"]
    return row


def bench_decode(model, args, batch: int, page_size: int) -> dict:
    import jax.numpy as jnp

    from jaxchunk.cache import init_cache
    from jaxchunk.paged import jitted_mixed_step
    from jaxchunk.steps import jitted_decode_step
    config, params, ctx = model.config, model.params, args.decode_context
    capacity = ctx + DECODE_ROOM
    per_seq = -(-capacity // page_size)
    pool = Pool(config, batch * per_seq, page_size, args.cache_dtype)
    rng = np.random.default_rng(batch)
    next_ids = rng.integers(3, config.vocab_size, batch)
    host = []
    step = device_step([([int(t)], ctx, pool.take(per_seq * page_size)) for t in next_ids], budget=batch,
                       max_seqs=batch, pages_per_seq=per_seq, pool=pool, config=config, host_times=host)
    contig0 = random_fill(init_cache(config, batch, per_seq * page_size, args.cache_dtype), 1)
    state = {"paged": pool.cache, "contiguous": contig0, "contiguous_xla": None}
    tokens = jnp.asarray(next_ids, jnp.int32)

    def paged(impl):
        def run(cache):
            # One pool serves both paged cases, as one cache both contiguous ones.
            state["paged"], logits = jitted_mixed_step(params, cache, step, config=config, attention_impl=impl)
            return state["paged"], logits
        return run

    def contig(impl):
        key = "contiguous" if impl == "auto" else "contiguous_xla"

        def run(cache):
            # One cache serves both contiguous cases (each call donates it and hands the new one on).
            state["contiguous"], logits = jitted_decode_step(params, cache, tokens, config=config, attention_impl=impl)
            return state["contiguous"], logits
        return key, run

    # paged: attention "auto" (on CPU the xla backend); paged_native: the native CPU kernel's backend.
    pool_now = lambda: (state["paged"],)
    cases = {"paged": (paged("auto"), pool_now), "paged_native": (paged("native_cpu"), pool_now)}
    for impl in ("auto", "xla"):
        key, run = contig(impl)
        # A fresh lengths array each call (the donated cache takes its lengths with it).
        cases[key] = (run, lambda: (state["contiguous"].replace(lengths=jnp.full((batch,), ctx, jnp.int32)),))
    timings, warm, timed = interleaved(cases, args.repeats)
    row = dict(kind="decode", config=f"batch {batch}", chunk=1, batch=batch, page_size=page_size, tokens=batch,
               steps=1, context=ctx, capacity=per_seq * page_size, host_build_ms_per_step=1e3 * host[0],
               warmup_compiles=sum(warm.values()), timed_compiles=timed)
    row.update(timing_cols(timings["paged"], batch, "paged"))
    row.update(timing_cols(timings["contiguous"], batch, "contig"))
    row.update(timing_cols(timings["contiguous_xla"], batch, "contig_xla"))
    row.update(timing_cols(timings["paged_native"], batch, "paged_native"))
    row["ratio"] = row["paged_tok_s"] / row["contig_tok_s"]
    row["ratio_native"] = row["paged_native_tok_s"] / row["contig_tok_s"]
    row["paged_native_vs_auto"] = row["paged_native_tok_s"] / row["paged_tok_s"]
    row["ratio_vs_contig_xla"] = row["paged_tok_s"] / row["contig_xla_tok_s"]
    return row


def bench_mixed(model, args, page_size: int) -> dict:
    from jaxchunk.paged import jitted_mixed_step
    config, params = model.config, model.params
    d, chunk, cached, ctx = args.mixed_decodes, args.mixed_chunk, args.mixed_chunk_cached, args.decode_context
    if d + chunk > args.mixed_budget:
        raise SystemExit(f"--mixed-decodes {d} + --mixed-chunk {chunk} exceed --mixed-budget {args.mixed_budget}")
    per_seq = -(-max(ctx + 1, cached + chunk) // page_size)
    pool = Pool(config, (d + 1) * per_seq, page_size, args.cache_dtype)
    rng = np.random.default_rng(d)
    decodes = [([int(rng.integers(3, config.vocab_size))], ctx, pool.take(per_seq * page_size)) for _ in range(d)]
    prefill = (rng.integers(3, config.vocab_size, chunk).tolist(), cached, pool.take(per_seq * page_size))
    kw = dict(pages_per_seq=per_seq, pool=pool, config=config)
    host = []
    mixed = device_step(decodes + [prefill], budget=args.mixed_budget, max_seqs=d + 1, host_times=host, **kw)
    only_decodes = device_step(decodes, budget=d, max_seqs=d, **kw)
    only_chunk = device_step([prefill], budget=chunk, max_seqs=1, **kw)
    state = {"cache": pool.cache}

    def runner(step):
        def run(cache):
            state["cache"], logits = jitted_mixed_step(params, cache, step, config=config)
            return state["cache"], logits
        return run, lambda: (state["cache"],)

    timings, warm, timed = interleaved({"mixed": runner(mixed), "decodes": runner(only_decodes),
                                        "chunk": runner(only_chunk)}, args.repeats)
    n = d + chunk
    row = dict(kind="mixed", config=f"{d} decodes + {chunk}-token chunk in T={args.mixed_budget}", chunk=chunk,
               batch=d + 1, page_size=page_size, tokens=n, steps=1, context=ctx,
               host_build_ms_per_step=1e3 * host[0], warmup_compiles=sum(warm.values()), timed_compiles=timed)
    row.update(timing_cols(timings["mixed"], n, "paged"))
    row.update(timing_cols(timings["decodes"], d, "decodes"))
    row.update(timing_cols(timings["chunk"], chunk, "chunk"))
    row["sum_parts_median_s"] = timings["decodes"].median_s + timings["chunk"].median_s
    row["contig_tok_s"] = n / row["sum_parts_median_s"]  # "the parts' throughput", so ratio reads alike
    row["ratio"] = row["sum_parts_median_s"] / row["paged_median_s"]  # > 1: the mixed step beats the sum
    return row


def bench_attention(model, args, batch: int, q_len: int, kv_len: int, page_size: int) -> dict:
    """One layer's attention alone: paged op (auto) vs the contiguous op (auto), same K/V values."""
    import jax
    import jax.numpy as jnp

    from pallas_kernels.attention import attention
    from pallas_kernels.paged_attention import paged_attention, paged_attention_xla
    config = model.config
    h, kvh, hd = config.num_heads, config.num_kv_heads, config.head_dim
    per_seq = -(-kv_len // page_size)
    capacity = per_seq * page_size
    key = jax.random.PRNGKey(batch * 7919 + q_len)
    kq, kk, kv = jax.random.split(key, 3)
    q = jax.random.normal(kq, (batch, q_len, h, hd), jnp.float32)
    k = jax.random.normal(kk, (1, batch, capacity, kvh, hd), jnp.float32)
    v = jax.random.normal(kv, (1, batch, capacity, kvh, hd), jnp.float32)
    perm = np.random.default_rng(0).permutation(batch * per_seq)
    table = perm.reshape(batch, per_seq).astype(np.int32)
    pages_k = jnp.zeros((1, batch * per_seq, page_size, kvh, hd), jnp.float32)
    pages_k = pages_k.at[0, table.reshape(-1)].set(k[0].reshape(batch * per_seq, page_size, kvh, hd))
    pages_v = jnp.zeros_like(pages_k).at[0, table.reshape(-1)].set(v[0].reshape(batch * per_seq, page_size, kvh, hd))
    cu = jnp.arange(batch + 1, dtype=jnp.int32) * q_len
    kv_lens = jnp.full((batch,), kv_len, jnp.int32)
    offset = kv_lens - q_len
    layer = jnp.int32(0)
    paged_fn = jax.jit(lambda q, kp, vp, t: paged_attention(q.reshape(-1, h, hd), kp, vp, cu, kv_lens, t,
                                                            jnp.int32(batch), layer=layer))
    # The XLA backend with one page per key block (its default since the per-tier table for decode
    # rows, 64 / 256 keys for the small / large tiers; before it, 256 keys per block for every tier,
    # i.e. 16 pages at page 16, gathered together): which block a decode row should read.
    one_page_fn = jax.jit(lambda q, kp, vp, t: paged_attention_xla(q.reshape(-1, h, hd), kp, vp, cu, kv_lens, t,
                                                                   jnp.int32(batch), layer=layer, pages_per_block=1))
    # The named backends apart (auto is one of them): which one a step should use.
    impl_fn = lambda impl: jax.jit(lambda q, kp, vp, t: paged_attention(q.reshape(-1, h, hd), kp, vp, cu, kv_lens, t,
                                                                        jnp.int32(batch), layer=layer, impl=impl))
    xla_fn, native_fn = impl_fn("xla"), impl_fn("native_cpu")
    contig_fn = jax.jit(lambda q, k, v: attention(q, k, v, offset, kv_lens, layer=layer))
    table = jnp.asarray(table)
    out_c = contig_fn(q, k, v)
    fns = {"paged": paged_fn, "paged_1page": one_page_fn, "paged_xla": xla_fn, "paged_native": native_fn}
    err = max(float(jnp.max(jnp.abs(fn(q, pages_k, pages_v, table).reshape(q.shape) - out_c))) for fn in fns.values())
    cases = {name: (functools.partial(fn, q, pages_k, pages_v, table), tuple) for name, fn in fns.items()}
    timings, warm, timed = interleaved({**cases, "contiguous": (lambda: contig_fn(q, k, v), tuple)}, args.repeats)
    n = batch * q_len
    row = dict(kind="attention", config=f"1 layer, batch {batch} x q_len {q_len}, kv_len {kv_len}", chunk=q_len,
               batch=batch, page_size=page_size, tokens=n, steps=1, context=kv_len, max_abs_diff=err,
               warmup_compiles=sum(warm.values()), timed_compiles=timed)
    row.update(timing_cols(timings["paged"], n, "paged"))
    row.update(timing_cols(timings["contiguous"], n, "contig"))
    for name in ("paged_1page", "paged_xla", "paged_native"):
        row.update(timing_cols(timings[name], n, name))
        row[f"ratio{name[5:]}"] = row[f"{name}_tok_s"] / row["contig_tok_s"]
    row["ratio"] = row["paged_tok_s"] / row["contig_tok_s"]
    return row


def bench_blocks(model, args, q_len: int, page_size: int) -> dict:
    """The xla backend's key-block size for one query tier: one layer's paged attention of batch
    --batches[-1] rows of q_len (1: decode, else one prefill chunk of --chunk-sizes[0]... given as
    q_len) over --decode-context (decode) / --prompt-len (chunk) keys, timed interleaved for each
    pages_per_block whose block holds 16, 64 or 256 keys (at least one page). Picks the table in
    pallas_kernels.paged_attention.PAGES_PER_BLOCK."""
    import jax
    import jax.numpy as jnp

    from pallas_kernels.paged_attention import paged_attention_xla
    config = model.config
    h, kvh, hd = config.num_heads, config.num_kv_heads, config.head_dim
    batch = args.batches[-1] if q_len == 1 else 1
    kv_len = args.decode_context + 1 if q_len == 1 else args.prompt_len
    per_seq = -(-kv_len // page_size)
    kq, kk, kv = jax.random.split(jax.random.PRNGKey(q_len * 31 + page_size), 3)
    q = jax.random.normal(kq, (batch * q_len, h, hd), jnp.float32)
    pages_k = jax.random.normal(kk, (1, batch * per_seq, page_size, kvh, hd), jnp.float32)
    pages_v = jax.random.normal(kv, (1, batch * per_seq, page_size, kvh, hd), jnp.float32)
    table = jnp.asarray(np.random.default_rng(0).permutation(batch * per_seq).reshape(batch, per_seq).astype(np.int32))
    cu = jnp.arange(batch + 1, dtype=jnp.int32) * q_len
    kv_lens = jnp.full((batch,), kv_len, jnp.int32)
    candidates = sorted({max(1, keys // page_size) for keys in (16, 64, 256)})  # 32, 128, 512: never clearly first
    fns = {f"ppb_{n}": jax.jit(functools.partial(paged_attention_xla, cu_q_lens=cu, kv_lens=kv_lens, page_table=table,
                                                 num_seqs=jnp.int32(batch), layer=jnp.int32(0), pages_per_block=n))
           for n in candidates}
    cases = {name: (functools.partial(fn, q, pages_k, pages_v), tuple) for name, fn in fns.items()}
    timings, warm, timed = interleaved(cases, args.repeats)
    n = batch * q_len
    row = dict(kind="blocks", config=f"1 layer, batch {batch} x q_len {q_len}, kv_len {kv_len}", chunk=q_len,
               batch=batch, page_size=page_size, tokens=n, steps=1, context=kv_len,
               warmup_compiles=sum(warm.values()), timed_compiles=timed)
    for name, t in timings.items():
        row[f"{name}_median_s"], row[f"{name}_min_s"] = t.median_s, t.min_s
    # The fastest by its minimum: on this shared machine other jobs only ever add time, and the
    # medians of candidates ~10% apart swap places from run to run under load.
    best = min(timings, key=lambda name: timings[name].min_s)
    row["best_pages_per_block"] = int(best[4:])
    row["best_keys_per_block"] = int(best[4:]) * page_size
    return row


def bench_llama_cpp(args, ids) -> dict | None:
    """llama.cpp's batch-1 greedy decode after --decode-context prompt tokens (compare_peers' worker)."""
    from experiments import compare_peers
    reason = compare_peers.unavailable("llama.cpp", args.model)
    if reason:
        print(f"paged_step: skipping llama.cpp: {reason}", file=sys.stderr)
        return None
    with tempfile.TemporaryDirectory(prefix="paged-step-") as tmp:
        ids_path = Path(tmp) / "ids.npy"
        np.save(ids_path, ids[:args.decode_context])
        spec = dict(system="llama.cpp", dtype="Q4_1", model=args.model, prompt_lens=[args.decode_context], repeats=1,
                    decode_tokens=args.llama_decode_tokens, threads=args.threads, ids_path=str(ids_path),
                    gguf=str(common.model_path(args.model)))
        rows = compare_peers.run_worker(spec)
    if not rows:
        return None
    r = rows[0]
    return dict(kind="llama.cpp", config="llama.cpp decode batch 1 (Q4_1 weights)", chunk=1, batch=1, page_size=None,
                tokens=args.llama_decode_tokens, steps=args.llama_decode_tokens, context=args.decode_context,
                contig_tok_s=r["decode_tok_s"], note=r["note"])


# ----------------------------------------------------------------------------- output
def plot(df, path: Path, title: str) -> Path | None:
    """One panel per section, the ratios the goals are about (linear axes): paged / contiguous tok/s
    per page size with whiskers from min / max (contiguous min / paged max .. contiguous max /
    paged min), the 0.9x goal and 1x drawn; the mixed step's time over the sum of its parts'."""
    plt = common.pyplot()
    sections = [("prefill", "chunk", "pure prefill, 1 sequence: paged / contiguous tok/s", "chunk C (tokens, log2)"),
                ("decode", "batch", "pure decode, 1 token per sequence: paged / contiguous tok/s",
                 "batch (sequences, log2)"),
                ("mixed", "page_size", "mixed step time / sum of its parts' times", "page size (tokens, log2)")]
    sections = [s for s in sections if (df.kind == s[0]).any()]
    if not sections:  # e.g. --sections attention: a table, nothing to plot
        return None
    fig, axes = plt.subplots(1, len(sections), figsize=(5.6 * len(sections), 5.0), squeeze=False)
    for ax, (kind, x, sub, xlabel) in zip(axes[0], sections):
        part = df[df.kind == kind]
        if kind == "mixed":
            part = part.sort_values("page_size")
            y = part.paged_median_s / part.sum_parts_median_s
            ax.plot(part.page_size, y, "-o", color="C0", label="mixed step / (decodes step + chunk step)")
            for px, py in zip(part.page_size, y):
                ax.annotate(f"{py:.2f}x", (px, py), textcoords="offset points", xytext=(0, 7), ha="center", fontsize=8)
            ax.axhline(1.0, color="black", lw=1, ls="--", label="1x: goal is below")
            ax.set_ylabel("time ratio\n(median seconds; < 1: mixed wins)")
            ax.set_ylim(min(0.8, y.min() - 0.05), max(1.1, y.max() + 0.05))
        else:
            for i, (ps, g) in enumerate(sorted(part.groupby("page_size"), key=lambda kv: kv[0])):
                g = g.sort_values(x)
                lo = g.contig_min_s / g.paged_max_s
                hi = g.contig_max_s / g.paged_min_s
                xs = g[x] * 2 ** ((i - 1) * 0.06)  # small horizontal offset per page size: whiskers apart
                ax.errorbar(xs, g.ratio, yerr=[g.ratio - lo, hi - g.ratio], fmt="-o", color=f"C{i}", capsize=3,
                            label=f"page {int(ps)}")
                for px, py in zip(xs, g.ratio):
                    ax.annotate(f"{py:.2f}", (px, py), textcoords="offset points", xytext=(7, -3), fontsize=7,
                                color=f"C{i}")
            ax.axhline(1.0, color="black", lw=1, ls="--", label="1x: as fast as contiguous")
            ax.axhline(0.9, color="C3", lw=1, ls=":", label="0.9x: the goal")
            ax.set_ylabel("paged / contiguous tokens/s\n(median; whiskers: min-max)")
            if kind == "decode":
                llama = df[df.kind == "llama.cpp"]
                b1 = part[(part.batch == 1) & (part.page_size == part.page_size.max())]
                if len(llama) and len(b1):
                    ax.text(0.02, 0.03, f"batch 1: paged {b1.paged_tok_s.iloc[0]:.1f} tok/s (f32), llama.cpp "
                            f"{llama.contig_tok_s.iloc[0]:.1f} tok/s (Q4_1)", transform=ax.transAxes, fontsize=7)
        ticks = sorted(int(v) for v in part[x].unique())
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel(xlabel)
        ax.set_title(sub, fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.17), ncol=3)
    fig.suptitle(title, fontsize=10)
    return common.save_figure(fig, path)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=common.DEFAULT_MODEL, choices=common.MODELS)
    p.add_argument("--dtype", default="f32", choices=common.DTYPES, help="weights and activations")
    p.add_argument("--cache-dtype", default="f32", help="both caches' format")
    p.add_argument("--prompt-len", type=int)
    p.add_argument("--chunk-sizes", type=common.parse_list)
    p.add_argument("--decode-context", type=int, help="tokens cached per sequence before the decode step")
    p.add_argument("--batches", type=common.parse_list)
    p.add_argument("--page-sizes", type=common.parse_list)
    p.add_argument("--mixed-decodes", type=int)
    p.add_argument("--mixed-chunk", type=int)
    p.add_argument("--mixed-chunk-cached", type=int)
    p.add_argument("--mixed-budget", type=int)
    p.add_argument("--repeats", type=int)
    p.add_argument("--sections", type=lambda s: common.parse_list(s, str),
                   help="comma-separated, from prefill, decode, mixed, attention, blocks, llama.cpp")
    p.add_argument("--llama-decode-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2, help="llama.cpp threads (JAX uses all cores)")
    p.add_argument("--quick", action="store_true", help=f"preset: {QUICK} (explicit flags still win)")
    p.add_argument("--out", type=Path, default=Path("results/paged_step"))
    args = p.parse_args(argv)
    common.apply_preset(args, QUICK if args.quick else FULL)
    return args


def add_time_split(df, num_layers: int):
    """Where a step's paged-vs-contiguous gap goes: on each attention row, the whole step's gap
    (paged - contiguous median seconds; decode: that batch's step, prefill: the prompt's last chunk
    estimated as the step's time / its number of chunks) next to num_layers x the attention op's gap
    alone at the same shape (page size of the attention row)."""
    df["step_gap_s"] = np.nan
    df["attention_gap_x_layers_s"] = np.nan
    for i, r in df[df.kind == "attention"].iterrows():
        if r.chunk == 1:
            step = df[(df.kind == "decode") & (df.batch == r.batch) & (df.page_size == r.page_size)]
        else:
            step = df[(df.kind == "prefill") & (df.chunk == r.chunk) & (df.page_size == r.page_size)]
        if len(step):
            s = step.iloc[0]
            df.loc[i, "step_gap_s"] = (s.paged_median_s - s.contig_median_s) / s.steps
        df.loc[i, "attention_gap_x_layers_s"] = num_layers * (r.paged_median_s - r.contig_median_s)
    return df


COLUMNS = ["kind", "config", "page_size", "paged_tok_s", "contig_tok_s", "ratio", "contig_xla_tok_s",
           "ratio_vs_contig_xla", "paged_native_tok_s", "ratio_native", "paged_native_vs_auto", "paged_median_s",
           "paged_min_s", "paged_max_s", "contig_median_s", "contig_min_s",
           "contig_max_s", "sum_parts_median_s", "host_build_ms_per_step", "warmup_compiles", "timed_compiles"]


def main(argv=None):
    args = parse_args(argv)
    started = time.perf_counter()
    machine = common.machine_info()
    model = common.load_model(args.model, args.dtype)
    ids = common.prompt_ids(args.model, max(args.prompt_len, args.decode_context))
    runs = []
    if "prefill" in args.sections:
        runs += [("prefill", c, ps) for c in args.chunk_sizes for ps in args.page_sizes]
    if "decode" in args.sections:
        runs += [("decode", b, ps) for b in args.batches for ps in args.page_sizes]
    if "mixed" in args.sections:
        runs += [("mixed", None, ps) for ps in args.page_sizes]
    if "attention" in args.sections:
        runs += [("attention", ("decode", b), ps) for b in args.batches for ps in args.page_sizes]
        runs += [("attention", ("prefill", c), ps) for c in args.chunk_sizes for ps in args.page_sizes]
    if "blocks" in args.sections:
        runs += [("blocks", q_len, ps) for q_len in (1, 8, args.chunk_sizes[0]) for ps in args.page_sizes]
    if "llama.cpp" in args.sections and args.model != common.TINY_MODEL:
        runs.append(("llama.cpp", None, None))
    rows = []
    for kind, what, ps in (bar := common.progress(runs, "paged step")):
        bar.set_postfix_str(f"{kind} {what} page {ps}")
        if kind == "prefill":
            rows.append(bench_prefill(model, args, ids[:args.prompt_len], what, ps))
        elif kind == "decode":
            rows.append(bench_decode(model, args, what, ps))
        elif kind == "mixed":
            rows.append(bench_mixed(model, args, ps))
        elif kind == "attention":
            sub, n = what
            if sub == "decode":
                rows.append(bench_attention(model, args, n, 1, args.decode_context + 1, ps))
            else:  # the last chunk of the prompt: the most keys
                rows.append(bench_attention(model, args, 1, n, args.prompt_len, ps))
        elif kind == "blocks":
            rows.append(bench_blocks(model, args, what, ps))
        elif (row := bench_llama_cpp(args, ids)) is not None:
            rows.append(row)
    machine["load_average_after_1_5_15"] = [round(x, 2) for x in os.getloadavg()]
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    settings.update(wall_s=round(time.perf_counter() - started, 1), model_source=model.source,
                    timing="warm-up call per case (compiles counted), then --repeats interleaved rounds; "
                           "jitted steps called directly on device inputs (host checks excluded, build_step "
                           "timed apart); caches random-filled; pages a random permutation of the pool",
                    mixed_ratio="sum of parts' median seconds / mixed step's median seconds (> 1: mixed wins)")
    import pandas as pd
    df = add_time_split(pd.DataFrame(rows), model.config.num_layers)
    df = common.write_results(args.out, df.to_dict("records"), settings, machine)
    png = plot(df, args.out / "paged_step.png",
               f"Paged mixed_step vs contiguous steps: {args.model} {args.dtype}, cache {args.cache_dtype}, "
               f"{machine['usable_cores']} cores, load {machine['load_average_1_5_15'][0]}"
               f"->{machine['load_average_after_1_5_15'][0]}")
    common.print_table(df, COLUMNS, title=f"\nload average before {machine['load_average_1_5_15']}, "
                                          f"after {machine['load_average_after_1_5_15']}")
    blocks = df[df.kind == "blocks"]
    if len(blocks):
        common.print_table(blocks, ["config", "page_size", *[c for c in df.columns if c.startswith("ppb_")],
                                    "best_pages_per_block", "best_keys_per_block"],
                           title="\nxla backend: median and min seconds per pages_per_block (one layer)")
    split = df[df.kind == "attention"]
    if len(split):
        common.print_table(split, ["config", "page_size", "paged_median_s", "paged_xla_median_s",
                                   "paged_native_median_s", "paged_1page_median_s", "contig_median_s",
                                   "ratio", "ratio_xla", "ratio_native", "ratio_1page", "step_gap_s",
                                   "attention_gap_x_layers_s"],
                           title=f"\nwhere the paged step's time goes: step gap (paged - contiguous, per step) vs "
                                 f"{model.config.num_layers} layers x the attention op's gap alone")
    bad = df[df.timed_compiles.fillna(0) > 0]
    print(f"\ncompiles during timed calls: {int(df.timed_compiles.fillna(0).sum())}"
          + (f" (in {list(bad.config)})" if len(bad) else " (none)"))
    common.print_written(args.out, [png] if png else [], settings["wall_s"])
    return df


if __name__ == "__main__":
    main()
