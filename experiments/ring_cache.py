"""The sliding-window ring cache vs the full-length cache: bytes, compiled memory, speed, agreement.

`init_cache(..., ring_chunk_len=C)` keeps window - 1 + C slots for each sliding-window layer
(Gemma 3 270M: 15 of its 18 layers) and every position for the global ones. This script measures

1. table "bytes" (no compute: shapes only): cache bytes of each layout per max_seq_len and cache
   format, and bytes per token: the full cache's, the ring's growing part (global layers) and its
   fixed ring, and the ring cache's bytes over the full cache's;
2. table "results" (runs, each layout in a fresh process): for one prompt of --prompt-len tokens of
   the corpus into a cache of prompt + decode positions, chunk --chunk-size: XLA's compiled memory
   of the prefill step (jaxchunk.steps.step_memory: arguments + outputs - aliased + temporaries),
   the process peak RSS, prefill and decode tok/s (median of --repeats warm runs), and the ring's
   last logits / greedy ids against the full cache's.

  .venv/bin/python -m experiments.ring_cache --quick                      # tiny Gemma 3, seconds
  .venv/bin/python -m experiments.ring_cache --model gemma3-270m --prompt-len 8192

Writes results.csv / .json, bytes.csv / .json and bytes.png into --out.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from experiments import common

TINY_GEMMA = "tiny-gemma3"
FULL = dict(prompt_len=8192, chunk_size=512, decode_tokens=16, repeats=2, seq_lens="2048,8192,32768")
QUICK = dict(prompt_len=300, chunk_size=64, decode_tokens=4, repeats=1, seq_lens="512,2048")
LAYOUTS = ("full", "ring")
BYTES_COLUMNS = ["cache_dtype", "max_seq_len", "ring_chunk_len", "full_mb", "ring_cache_mb", "ring_vs_full",
                 "full_bytes_per_token", "ring_growing_bytes_per_token", "ring_fixed_mb"]
RESULT_COLUMNS = ["layout", "cache_mb", "step_peak_mb", "step_temp_mb", "rss_peak_mb", "prefill_tok_s",
                  "decode_tok_s", "max_abs_logit_diff", "greedy_ids_equal"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, choices=(*common.fetch_models, TINY_GEMMA),
                   help=f"default: gemma3-270m ({TINY_GEMMA} with --quick)")
    p.add_argument("--prompt-len", type=int)
    p.add_argument("--chunk-size", type=int, help="prefill chunk, and the ring's ring_chunk_len")
    p.add_argument("--decode-tokens", type=int)
    p.add_argument("--repeats", type=int)
    p.add_argument("--seq-lens", help="max_seq_len values of the bytes table (comma-separated)")
    p.add_argument("--cache-dtypes", default="f32,bf16,q8", help="cache formats of the bytes table")
    p.add_argument("--bytes-only", action="store_true", help="only the bytes table (shapes; nothing runs)")
    p.add_argument("--quick", action="store_true", help=f"preset: {QUICK} on the tiny Gemma 3 (flags still win)")
    p.add_argument("--out", type=Path, default=Path("results/ring_cache"))
    p.add_argument("--worker", choices=LAYOUTS, help=argparse.SUPPRESS)  # one layout's run, JSON on stdout
    args = p.parse_args(argv)
    args.model = args.model or (TINY_GEMMA if args.quick else "gemma3-270m")
    common.apply_preset(args, QUICK if args.quick else FULL)
    return args


# ----------------------------------------------------------------------------- model
def load(name: str):
    """(config, params on device, prompt ids function) of a registry model (f32) or a tiny Gemma 3."""
    import jax

    if name == TINY_GEMMA:
        from jaxchunk.model import init_params
        from jaxchunk.testing import tiny_gemma3_config
        config = tiny_gemma3_config(window=32, pattern=6, num_layers=6, vocab_size=512, head_dim=32,
                                    max_position_embeddings=8192)
        params = jax.device_put(init_params(config, seed=0, scale=0.2))
        return config, params, lambda n: np.random.default_rng(n).integers(3, 512, n).astype(np.int32)
    model = common.load_model(name, "f32")
    return model.config, model.params, lambda n: common.prompt_ids(name, n)


def config_of(name: str):
    """The config alone (the GGUF's metadata: no weights read) for the bytes table."""
    if name == TINY_GEMMA:
        return load(name)[0]
    from jaxchunk.weights.gguf import config_from_gguf, open_gguf
    return config_from_gguf(open_gguf(common.model_path(name)))


# ----------------------------------------------------------------------------- bytes (shapes only)
def bytes_rows(config, seq_lens, cache_dtypes, ring_chunk_len: int) -> list[dict]:
    import jax

    from jaxchunk.cache import init_cache
    rows = []
    for cache_dtype in cache_dtypes:
        for max_seq_len in seq_lens:
            full = jax.eval_shape(lambda: init_cache(config, 1, max_seq_len, cache_dtype))
            ring = jax.eval_shape(lambda: init_cache(config, 1, max_seq_len, cache_dtype,
                                                     ring_chunk_len=ring_chunk_len))
            full_b, ring_b = _nbytes(full), _nbytes(ring)
            rows.append({"cache_dtype": cache_dtype, "max_seq_len": max_seq_len, "ring_chunk_len": ring_chunk_len,
                         "ring_len": ring.ring_keys.shape[2], "full_mb": full_b / common.MB,
                         "ring_cache_mb": ring_b / common.MB, "ring_vs_full": ring_b / full_b,
                         "full_bytes_per_token": _per_token(full, ring=False),
                         "ring_growing_bytes_per_token": _per_token(ring, ring=False),
                         "ring_fixed_mb": _ring_bytes(ring) / common.MB})
    return rows


def _nbytes(cache) -> int:
    import jax
    return sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(cache))


def _stacks(cache, ring: bool):
    names = ("ring_keys", "ring_values", "ring_key_scales", "ring_value_scales") if ring else \
        ("keys", "values", "key_scales", "value_scales")
    return [a for a in (getattr(cache, n) for n in names) if a is not None]


def _per_token(cache, ring: bool) -> int:
    # The ShapeDtypeStruct twin of KVCache.growing_bytes_per_token (eval_shape gives no .nbytes).
    return sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in _stacks(cache, ring)) // \
        (cache.keys.shape[1] * cache.keys.shape[2])


def _ring_bytes(cache) -> int:
    return sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in _stacks(cache, True))


# ----------------------------------------------------------------------------- one layout's run
def worker(args) -> dict:
    """Prefill + decode with one layout, in this (fresh) process: memory, speed, logits."""
    import jax

    from jaxchunk.cache import init_cache
    from jaxchunk.prefill import decode_step, prefill
    from jaxchunk.steps import step_memory

    config, params, ids_of = load(args.model)
    ids = ids_of(args.prompt_len)
    max_seq = args.prompt_len + args.decode_tokens
    ring_chunk_len = args.chunk_size if args.worker == "ring" else None

    def new_cache():
        return init_cache(config, 1, max_seq, ring_chunk_len=ring_chunk_len)

    memory = step_memory(params, new_cache(), args.chunk_size, config=config)
    common.reset_peak_rss()
    prefill_s, decode_s = [], []
    for _ in range(args.repeats + 1):  # the first run compiles
        cache = new_cache()
        start = time.perf_counter()
        cache, logits = prefill(params, config, cache, [ids], chunk_size=args.chunk_size)
        last = np.asarray(logits)[0]
        prefill_s.append(time.perf_counter() - start)
        token, tokens = int(last.argmax()), []
        start = time.perf_counter()
        for _ in range(args.decode_tokens):
            tokens.append(token)
            cache, logits = decode_step(params, cache, np.array([token]), config=config)
            token = int(np.asarray(logits)[0].argmax())
        decode_s.append(time.perf_counter() - start)
        jax.block_until_ready(cache)
    return {"layout": args.worker, "cache_mb": cache.nbytes / common.MB, "ring_len": cache.ring_len,
            "step_peak_mb": memory.peak_bytes / common.MB, "step_temp_mb": memory.temp_bytes / common.MB,
            "step_alias_mb": memory.alias_bytes / common.MB, "rss_peak_mb": common.peak_rss_bytes() / common.MB,
            "prefill_s": float(np.median(prefill_s[1:])), "prefill_compile_s": prefill_s[0],
            "prefill_tok_s": args.prompt_len / float(np.median(prefill_s[1:])),
            "decode_tok_s": args.decode_tokens / float(np.median(decode_s[1:])),
            "last_logits": last.tolist(), "greedy_ids": tokens}


def run_layout(args, layout: str) -> dict:
    argv = [sys.executable, "-m", "experiments.ring_cache", "--worker", layout, "--model", args.model,
            "--prompt-len", str(args.prompt_len), "--chunk-size", str(args.chunk_size),
            "--decode-tokens", str(args.decode_tokens), "--repeats", str(args.repeats)]
    done = subprocess.run(argv, capture_output=True, text=True, cwd=common.ROOT)
    if done.returncode:
        raise RuntimeError(f"{layout} worker failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- plot
def plot(df, path: Path) -> Path:
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for i, (dtype, group) in enumerate(df.groupby("cache_dtype", sort=False)):
        group = group.sort_values("max_seq_len")
        ax.plot(group["max_seq_len"], group["full_mb"], "-", marker="o", color=f"C{i}", label=f"{dtype} full")
        ax.plot(group["max_seq_len"], group["ring_cache_mb"], "--", marker="s", color=f"C{i}",
                label=f"{dtype} ring (chunk {int(group['ring_chunk_len'].iloc[0])})")
    common.log2_axis(ax, df["max_seq_len"], "x")
    ax.set_yscale("log")
    ax.set_xlabel("max_seq_len (cache positions)")
    ax.set_ylabel("KV cache MiB (batch 1)")
    ax.set_title("KV cache size: full-length vs sliding-window ring")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return common.save_figure(fig, path)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    started = time.time()
    machine = common.machine_info()
    config = config_of(args.model)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "worker"}
    settings["layer_windows"] = list(config.layer_windows or ())
    bytes_df = common.write_results(args.out, bytes_rows(config, common.parse_list(args.seq_lens),
                                                         args.cache_dtypes.split(","), args.chunk_size),
                                    settings, machine, name="bytes")
    common.print_table(bytes_df, BYTES_COLUMNS, title="cache bytes (batch 1)")
    pngs = [plot(bytes_df, args.out / "bytes.png")]
    if not args.bytes_only:
        runs = {layout: run_layout(args, layout) for layout in LAYOUTS}
        full = runs["full"]
        rows = []
        for run in runs.values():
            diff = np.abs(np.asarray(run["last_logits"]) - np.asarray(full["last_logits"])).max()
            rows.append({**{k: v for k, v in run.items() if k not in ("last_logits", "greedy_ids")},
                         "max_abs_logit_diff": float(diff), "logit_range": float(np.ptp(full["last_logits"])),
                         "greedy_ids_equal": run["greedy_ids"] == full["greedy_ids"],
                         "greedy_ids": run["greedy_ids"]})
        machine["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
        df = common.write_results(args.out, rows, settings, machine, json_only=("greedy_ids",))
        common.print_table(df, RESULT_COLUMNS, title=f"{args.model}: {args.prompt_len} tokens, chunk {args.chunk_size}")
    common.print_written(args.out, pngs, round(time.time() - started, 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
