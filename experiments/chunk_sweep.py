"""Chunk size sweep: how prefill speed, memory and accuracy depend on the chunk size.

For every (dtype, prompt length, attention impl, chunk size) the prompt (the start of
jaxchunk.corpus.reference_text, tokenized) is prefilled chunk by chunk into a KV cache of exactly
the prompt's length, as `jaxchunk.prefill.prefill` does it. Per run:

- throughput: tokens / median wall time of `--repeats` warm prefills (last-token logits only);
- compilation: first-call overhead (first call - warm median: tracing + compiling) and how many
  executables the run added (`compiled_step_counts` delta);
- memory: XLA's compiled memory analysis of the step (arguments, outputs, aliased, temporaries)
  and the process's peak RSS during the timed calls (reset before each run; `rss_added_mb` is the
  peak minus the RSS at the start of the run: ~0 or negative when the run reuses memory freed
  before it, so memory.png plots the peak itself);
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
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from experiments import common
from jaxchunk.cache import init_cache
from jaxchunk.prefill import chunk_schedule, prefill
from jaxchunk.steps import compiled_step_counts, step_memory

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
    memory = step_memory(model.params, cache_shape, c, config=config, attention_impl=run.attention_impl).as_mb()
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
@dataclasses.dataclass(frozen=True)
class Panel:
    title: str
    ylabel: str
    column: str                          # the results column drawn, one line per prompt length
    span: tuple[str, str] | None = None  # (low, high) columns drawn as a bar through each point
    log_y: bool = False                  # only positive values are drawn; exact zeros are listed


THROUGHPUT = Panel("Prefill throughput", "prefill throughput (tokens/s)", "tok_per_s",
                   span=("tok_per_s_slowest", "tok_per_s_fastest"))
# What is measured, each on its own linear axis from 0: what XLA says the compiled step needs (the
# peak, and the temporaries: the part the chunk size drives) and what the process really held.
# Not `rss_added_mb` (peak minus the RSS at the start of the run): it depends on what earlier runs
# left allocated (the allocator reuses it) and can come out negative, so it measures no run.
MEMORY = (
    Panel("Compiled step peak (XLA memory analysis)\narguments + outputs - aliased + temporaries",
          "memory (MiB = 2^20 bytes)", "step_peak_mb"),
    Panel("Compiled step temporaries (XLA memory analysis)\nscratch of one step: what the chunk size drives",
          "memory (MiB = 2^20 bytes)", "step_temp_mb"),
    Panel("Process peak RSS during the timed prefills (VmHWM)\nwhole process: weights, cache, reference, runtime",
          "memory (MiB = 2^20 bytes)", "rss_peak_mb"),
)
ERROR = Panel("Max |logit difference| over positions and vocabulary", "max |logit difference| (log scale)",
              "max_abs_logit_diff", log_y=True)
MARKERS = ("o", "s", "^", "D", "v", "P")  # hollow and shrinking: runs with equal values stay visible
WHOLE_NOTE = "Each line's last point: the whole\nprompt as one chunk."


def panel_plot(df, path: Path, panels: Sequence[Panel], *, title: str, note: str = WHOLE_NOTE) -> Path:
    """One row of panels per variant (dtype, attention impl), one column per Panel, chunk size on a
    log2 x axis, one color and marker per prompt length. Linear axes start at 0; log axes span
    whole decades around the data. The legend (and `note`) get a column of their own, so they never
    cover a point."""
    plt = common.pyplot()
    import matplotlib.lines
    variants = list(dict.fromkeys(df["variant"]))
    prompt_lens = sorted(df["prompt_len"].unique())
    look = {n: dict(color=f"C{i}", marker=MARKERS[i % len(MARKERS)], markersize=10 - 2.5 * (i % 3),
                    linewidth=2.8 - 0.8 * (i % 3), markerfacecolor="none", markeredgewidth=1.6)
            for i, n in enumerate(prompt_lens)}
    fig, axes = plt.subplots(len(variants), len(panels) + 1, squeeze=False,
                             figsize=(4.8 * len(panels) + 2.6, 4.2 * len(variants)),
                             gridspec_kw={"width_ratios": [1] * len(panels) + [0.5]})
    for row, variant in zip(axes, variants):
        part = df[df["variant"] == variant]
        for ax, panel in zip(row, panels):
            zeros = []
            for n, runs in part.groupby("prompt_len"):
                runs = runs.sort_values("chunk_size")
                values = runs[panel.column].astype(float)
                drawn = (values > 0) if panel.log_y else np.isfinite(values)
                zeros += [f"n={n} chunk {c}" for c in runs["chunk_size"][values == 0]]
                ax.plot(runs["chunk_size"][drawn], values[drawn], "-", **look[n])
                if panel.span:
                    low, high = (runs[c].astype(float)[drawn] for c in panel.span)
                    ax.vlines(runs["chunk_size"][drawn], low, high, color=look[n]["color"], lw=2.5, alpha=0.5)
            common.log2_axis(ax, part["chunk_size"], "x")
            panel_values = part[[panel.column, *(panel.span or ())]].to_numpy(float)
            if panel.log_y:
                ax.set_yscale("log")
                positive = panel_values[panel_values > 0]
                if positive.size:
                    ax.set_ylim(10.0 ** (np.floor(np.log10(positive.min())) - 1),
                                10.0 ** (np.ceil(np.log10(positive.max())) + 1))
                if zeros:
                    ax.text(0.02, 0.03, "exactly 0, not drawable on a log axis:\n" + ", ".join(zeros),
                            transform=ax.transAxes, fontsize=7.5, va="bottom")
            else:
                ax.set_ylim(0, 1.1 * max(np.nanmax(panel_values), 1e-12))
            ax.set_title(f"{panel.title}\n{variant}", fontsize=9)
            ax.set(xlabel="chunk size (tokens, log2 scale)", ylabel=panel.ylabel)
            ax.grid(True, which="major", alpha=0.3)
        row[-1].axis("off")
    handles = [matplotlib.lines.Line2D([], [], linestyle="-", label=f"{n}-token prompt", **look[n])
               for n in prompt_lens]
    axes[0][-1].legend(handles=handles, loc="upper left", fontsize=8.5, frameon=False, title="prompt length",
                       title_fontsize=8.5)
    axes[0][-1].text(0.05, 0.0, note, transform=axes[0][-1].transAxes, fontsize=8, va="bottom")
    fig.suptitle(title)
    return common.save_figure(fig, path)


def plot(df, out: Path) -> list[Path]:
    df = df.assign(variant=df["dtype"] + ", " + df["attention_impl"],
                   tok_per_s_slowest=df["prompt_len"] / df["max_s"],
                   tok_per_s_fastest=df["prompt_len"] / df["min_s"])
    return [
        panel_plot(df, out / "throughput.png", [THROUGHPUT], title="Prefill throughput vs chunk size",
                   note=f"Points: prompt tokens / median time\nof the timed prefills ({df['repeats'].max()} per run,\n"
                        f"after a warm-up call); bars: the\nslowest to the fastest of them.\n\n{WHOLE_NOTE}"),
        panel_plot(df, out / "memory.png", MEMORY, title="Memory vs chunk size"),
        panel_plot(df, out / "error.png", [ERROR],
                   title=f"Chunked prefill vs the reference ({df['reference'].iloc[0]})"),
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
