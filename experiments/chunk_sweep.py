"""Chunk size sweep: how prefill speed, memory and accuracy depend on the chunk size.

For every (dtype, prompt length, attention impl, chunk size) the prompt (the start of
jaxchunk.corpus.reference_text, tokenized) is prefilled chunk by chunk into a KV cache of exactly
the prompt's length, as `jaxchunk.prefill.prefill` does it. Per run:

- throughput: tokens / median wall time of `--repeats` warm prefills (last-token logits only);
- compilation: first-call overhead (first call - warm median: tracing + compiling) and how many
  executables the run added (`compiled_step_counts` delta);
- memory: XLA's compiled memory analysis of the step (arguments, outputs, aliased, temporaries)
  and the process's peak RSS during the timed calls (reset before each run; `rss_added_mb` is the
  peak minus the RSS at the start of the run);
- accuracy: the same chunks again with all-position logits, compared with a reference computed
  once per (dtype, prompt length): max |logit difference|, top-1 agreement, and the text's
  perplexity under both. The `reference` column names it: "forward" (jaxchunk.model.forward, plain
  full causal attention, no cache) or "whole-prefill" (one chunk with attention_impl="reference").

"whole" in --chunk-sizes means one chunk holding the whole prompt; a chunk size >= the prompt
length is that same run and is measured once.

  .venv/bin/python -m experiments.chunk_sweep --quick                    # a few minutes
  .venv/bin/python -m experiments.chunk_sweep --out results/chunk_sweep  # the full sweep (long)
  .venv/bin/python -m experiments.chunk_sweep --model tiny-random --prompt-lens 64,256 --chunk-sizes 16,whole

Writes results.csv, results.json (machine, versions, settings, rows) and throughput.png,
memory.png, error.png into --out, and prints the table.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from experiments import common
from jaxchunk.cache import init_cache
from jaxchunk.prefill import chunk_schedule, compiled_step_counts, prefill

WHOLE = "whole"
FULL = dict(prompt_lens=[512, 2048, 8192], chunk_sizes=[64, 128, 256, 512, 1024, 2048, WHOLE],
            dtypes=["f32", "bf16"], attention_impls=["xla"], repeats=3)
QUICK = dict(prompt_lens=[512, 2048], chunk_sizes=[128, 512, WHOLE], dtypes=["f32"],
             attention_impls=["xla"], repeats=1)
TABLE_COLUMNS = ["dtype", "attention_impl", "prompt_len", "chunk_size", "n_chunks", "tok_per_s",
                 "compile_s", "n_compiles", "step_temp_mb", "step_peak_mb", "rss_peak_mb",
                 "max_abs_logit_diff", "top1_agreement", "perplexity", "perplexity_reference"]


@dataclasses.dataclass(frozen=True)
class Run:
    dtype: str
    prompt_len: int
    attention_impl: str
    chunk_size: int  # == prompt_len for the whole-prompt run


def chunk_size_arg(text: str) -> list:
    return [WHOLE if part.strip() == WHOLE else int(part) for part in text.split(",") if part.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=common.DEFAULT_MODEL, choices=common.MODELS,
                   help="tiny-random: a 2-layer random Llama with random ids (tests, smoke runs)")
    p.add_argument("--chunk-sizes", type=chunk_size_arg, help=f"comma-separated ints and/or '{WHOLE}'")
    p.add_argument("--prompt-lens", type=common.parse_list, help="comma-separated token counts")
    p.add_argument("--dtypes", type=lambda s: common.parse_list(s, str), help="f32,bf16")
    p.add_argument("--attention-impls", type=lambda s: common.parse_list(s, str),
                   help="auto,xla,pallas,reference (pallas is interpreted on CPU: very slow)")
    p.add_argument("--repeats", type=int, help="timed calls per run after the warm-up call")
    p.add_argument("--reference", choices=("forward", "whole-prefill"), default="forward",
                   help="what the error columns compare with (see the module docstring)")
    p.add_argument("--quick", action="store_true",
                   help=f"preset for a few minutes on 2 cores: {QUICK} (explicit flags still win)")
    p.add_argument("--out", type=Path, default=Path("results/chunk_sweep"))
    # Test hook: swap in the top-left-aligned mask so tests can check the error columns react.
    p.add_argument("--break-mask", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    common.apply_preset(args, QUICK if args.quick else FULL)
    for dtype in args.dtypes:
        if dtype not in common.DTYPES:
            p.error(f"unknown dtype {dtype!r}; choose from {tuple(common.DTYPES)}")
    return args


def plan_runs(args) -> list[Run]:
    """Every run, ordered so that one reference per (dtype, prompt length) serves consecutive runs."""
    runs = []
    for dtype in args.dtypes:
        for n in sorted(args.prompt_lens):
            sizes = sorted({n if c == WHOLE else min(int(c), n) for c in args.chunk_sizes})
            runs += [Run(dtype, n, impl, c) for impl in args.attention_impls for c in sizes]
    return runs


# ----------------------------------------------------------------------------- the broken-mask hook
@contextlib.contextmanager
def top_left_mask():
    """Run with a deliberately wrong mask: every chunk's queries are placed at positions 0..q_len-1
    (a top-left-aligned causal mask, the classic chunked-prefill bug) instead of past..past+q_len-1.
    Chunk 1 is unaffected; later chunks no longer see most of the earlier tokens. Only the tests use
    this (hidden flag --break-mask), to show the error columns come from a real comparison.

    It wraps whichever attention function jaxchunk.model calls with a `q_offset` argument, and clears
    JAX's caches on entry and exit so no executable traced with the other mask is reused.
    """
    import jaxchunk.model as model_module
    for name in ("cache_attention", "attention"):
        original = getattr(model_module, name, None)
        if callable(original) and "q_offset" in inspect.signature(original).parameters:
            break
    else:
        raise RuntimeError("--break-mask: jaxchunk.model has no attention function taking q_offset "
                           "(cache_attention / attention); update chunk_sweep.top_left_mask")
    signature = inspect.signature(original)

    def broken(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.arguments["q_offset"] = jnp.zeros_like(bound.arguments["q_offset"])
        return original(*bound.args, **bound.kwargs)

    jax.clear_caches()
    setattr(model_module, name, broken)
    try:
        yield
    finally:
        setattr(model_module, name, original)
        jax.clear_caches()


# ----------------------------------------------------------------------------- one run
def compute_reference(model: common.LoadedModel, ids, kind: str):
    if kind == "forward":
        return common.reference_logits(model, ids)
    cache = init_cache(model.config, 1, len(ids), model.dtype)
    _, (logits,) = prefill(model.params, model.config, cache, [ids], chunk_size=len(ids),
                           max_input_len=len(ids), attention_impl="reference", all_logits=True)
    return logits


def measure(model: common.LoadedModel, ids, run: Run, repeats: int, reference, reference_kind: str) -> dict:
    n, c, config = run.prompt_len, run.chunk_size, model.config

    def fresh_cache():
        return (init_cache(config, 1, n, model.dtype),)

    def run_prefill(cache):
        return prefill(model.params, config, cache, [ids], chunk_size=c, max_input_len=c,
                       attention_impl=run.attention_impl)[1]

    compiles_before = compiled_step_counts()["prefill_chunk"]
    common.reset_peak_rss()
    rss_start = common.current_rss_bytes()
    timing = common.timeit(run_prefill, repeats, setup=fresh_cache)
    rss_peak = common.peak_rss_bytes()
    n_compiles = compiled_step_counts()["prefill_chunk"] - compiles_before

    cache_shape = jax.eval_shape(lambda: init_cache(config, 1, n, model.dtype))
    memory = common.step_memory(model.params, config, cache_shape, c, run.attention_impl)
    errors = common.chunked_eval(model, ids, c, run.attention_impl, reference)
    return {
        "model": model.name, **dataclasses.asdict(run), "whole_prompt": c == n,
        "n_chunks": len(chunk_schedule(n, chunk_size=c, max_input_len=c)), "cache_len": n,
        "repeats": repeats, "tok_per_s": n / timing.median_s, "median_s": timing.median_s,
        "min_s": timing.min_s, "max_s": timing.max_s,
        "first_call_s": timing.first_s, "compile_s": timing.compile_s, "n_compiles": n_compiles,
        **{f"step_{k}": v for k, v in memory.items()},
        "rss_peak_mb": rss_peak / common.MB, "rss_added_mb": (rss_peak - rss_start) / common.MB,
        "reference": reference_kind, **errors,
    }


# ----------------------------------------------------------------------------- plots
def plot(df, out: Path) -> list[Path]:
    df = df.assign(variant=df["dtype"] + ", " + df["attention_impl"])
    xlabel = "chunk size (tokens, log2; each line's last point = whole prompt)"
    common_kw = dict(x="chunk_size", line="prompt_len", facet="variant", xlabel=xlabel)
    return [
        common.line_plot(df, out / "throughput.png", y="tok_per_s", title="Prefill throughput vs chunk size",
                         ylabel="prefill throughput (tokens/s)", **common_kw),
        common.line_plot(df, out / "memory.png", y=["step_temp_mb", "rss_added_mb"],
                         y_labels=["compiled temp", "RSS added"], logy=True,
                         title="Memory vs chunk size: XLA step temporaries, RSS added by the run",
                         ylabel="memory (MB, log)", **common_kw),
        common.line_plot(df, out / "error.png", y="max_abs_logit_diff", logy=True, floor=1e-9,
                         title=f"Max |logit difference| vs reference ({df['reference'].iloc[0]})",
                         ylabel="max |logit diff| (log; 0 shown as 1e-9)", **common_kw),
    ]


def main(argv=None):
    args = parse_args(argv)
    started = time.perf_counter()
    machine = common.machine_info()
    runs = plan_runs(args)
    print(f"chunk_sweep: {len(runs)} runs of {args.model} -> {args.out}", file=sys.stderr)
    rows, reference_for, models = [], None, {}
    with top_left_mask() if args.break_mask else contextlib.nullcontext():
        for run in (bar := common.progress(runs, "chunk sweep")):
            bar.set_postfix_str(f"{run.dtype} n={run.prompt_len} chunk={run.chunk_size} {run.attention_impl}")
            if run.dtype not in models:
                models = {run.dtype: common.load_model(args.model, run.dtype)}  # one dtype at a time
            model = models[run.dtype]
            ids = common.prompt_ids(args.model, run.prompt_len)
            if reference_for != (run.dtype, run.prompt_len):
                reference = None  # free the previous one first: [n, vocab] float32
                reference = compute_reference(model, ids, args.reference)
                reference_for = (run.dtype, run.prompt_len)
            rows.append(measure(model, ids, run, args.repeats, reference, args.reference))
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    settings.update(out=str(args.out), model_source=models[runs[-1].dtype].source,
                    mask="BROKEN top-left (test hook)" if args.break_mask else "bottom-right causal",
                    cache_len="prompt length", timing="median of repeats after one warm-up call",
                    wall_s=round(time.perf_counter() - started, 1))
    df = common.write_results(args.out, rows, settings, machine)
    pngs = plot(df, args.out)
    common.print_table(df, TABLE_COLUMNS, title=f"\n{args.model}, reference={args.reference}, "
                                                  f"load average {machine['load_average_1_5_15']}")
    common.print_written(args.out, pngs, settings['wall_s'])
    return df


if __name__ == "__main__":
    main()
