"""Prefill under a memory budget: which chunk length fits, what it costs, how fast it runs.

`prefill(..., memory_budget_bytes=N)` compiles the power-of-two chunk lengths (largest first) and
takes the largest whose compiled step fits N (jaxchunk/memory_budget.py: arguments + outputs -
aliased + temporaries, from XLA's memory_analysis). This script

1. measures that compiled peak for every candidate chunk length (the memory curve; table
   "candidates"), for a cache of --cache-len positions and the attention impl given;
2. sweeps budgets from just below the smallest peak (the error case: no chunk fits, and the error
   names the smallest budget that works) to above the largest, and for each budget records the
   chosen chunk, its compiled peak and temporaries, and the prefill throughput of --prompt-len tokens
   with that budget (median of --repeats warm runs, each on a fresh cache) and the process peak RSS
   of the first run.

  .venv/bin/python -m experiments.memory_budget --quick
  .venv/bin/python -m experiments.memory_budget --prompt-len 4096 --out results/memory_budget

Writes results.csv + results.json (budgets), candidates.csv + candidates.json, budget.png (peak memory and throughput
against the budget, chosen chunk lengths written at the points) and candidates.png into --out.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import numpy as np

from experiments import common
from jaxchunk.cache import init_cache
from jaxchunk.errors import InputError
from jaxchunk.memory_budget import candidate_chunk_lens, pick_chunk_len
from jaxchunk.prefill import DEFAULT_MAX_INPUT_LEN, prefill
from jaxchunk.steps import step_memory

FULL = dict(prompt_len=4096, n_budgets=14, repeats=3)
QUICK = dict(prompt_len=1024, n_budgets=10, repeats=1)
TABLE_COLUMNS = ["budget_mb", "chunk_len", "peak_mb", "temp_mb", "headroom_mb", "prefill_s", "tok_per_s",
                 "rss_peak_mb", "error"]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=common.DEFAULT_MODEL, choices=common.MODELS)
    p.add_argument("--dtype", default="f32", choices=tuple(common.DTYPES))
    p.add_argument("--attention-impl", default="xla")
    p.add_argument("--prompt-len", type=int, help="tokens to prefill")
    p.add_argument("--cache-len", type=int, help="KV cache positions (default: the prompt length)")
    p.add_argument("--max-input-len", type=int, default=DEFAULT_MAX_INPUT_LEN, help="the largest chunk allowed")
    p.add_argument("--n-budgets", type=int, help="budgets swept between the smallest and largest peak")
    p.add_argument("--repeats", type=int)
    p.add_argument("--candidates-only", action="store_true",
                   help="only the compiled memory of each candidate chunk (no budgets, nothing run)")
    p.add_argument("--quick", action="store_true", help=f"preset: {QUICK} (explicit flags still win)")
    p.add_argument("--out", type=Path, default=Path("results/memory_budget"))
    args = p.parse_args(argv)
    common.apply_preset(args, QUICK if args.quick else FULL)
    args.cache_len = args.cache_len or args.prompt_len
    if args.prompt_len > args.cache_len:
        p.error("--cache-len is shorter than --prompt-len")
    return args


def budget_grid(peaks: list[int], n: int) -> list[int]:
    """n budgets from 1% below the smallest peak (no chunk fits) to 2% above the largest, spaced
    geometrically, plus each candidate's exact peak."""
    low, high = min(peaks), max(peaks)
    grid = np.geomspace(low * 0.99, high * 1.02, n)
    return sorted({int(b) for b in grid} | set(peaks))


def plot_budget(df, path: Path, title: str) -> Path:
    plt = common.pyplot()
    fig, (ax_mem, ax_tps) = plt.subplots(1, 2, figsize=(12, 4.6))
    ok = df[df["chunk_len"].notna()]
    lim = [df["budget_mb"].min(), df["budget_mb"].max()]
    ax_mem.plot(lim, lim, "--", color="gray", label="peak = budget")
    ax_mem.plot(ok["budget_mb"], ok["peak_mb"], "o-", color="C0", label="compiled peak of the chosen chunk")
    ax_mem.plot(ok["budget_mb"], ok["arg_mb"] + ok["out_mb"] - ok["alias_mb"], ":", color="C2",
                label="params + cache + outputs (no temporaries)")
    failed = df[df["chunk_len"].isna()]
    if len(failed):
        ax_mem.plot(failed["budget_mb"], failed["budget_mb"], "x", color="C3", markersize=10,
                    label="no chunk fits (error)")
    ax_tps.plot(ok["budget_mb"], ok["tok_per_s"], "o-", color="C1", label="prefill throughput")
    # Label the first budget of each chosen chunk (a run of budgets picks the same one).
    for _, r in ok[ok["chunk_len"] != ok["chunk_len"].shift()].iterrows():
        ax_mem.annotate(f"{int(r['chunk_len'])}", (r["budget_mb"], r["peak_mb"]), textcoords="offset points",
                        xytext=(0, 6), ha="center", fontsize=8)
        ax_tps.annotate(f"{int(r['chunk_len'])}", (r["budget_mb"], r["tok_per_s"]), textcoords="offset points",
                        xytext=(0, 6), ha="center", fontsize=8)
    ax_mem.set_ylabel("compiled peak memory of the step (MB)")
    ax_tps.set_ylabel("prefill throughput (tokens/s)")
    for ax in (ax_mem, ax_tps):
        ax.set_xlabel("memory budget (MB); numbers at points: chosen chunk length")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    return common.save_figure(fig, path)


def main(argv=None):
    args = parse_args(argv)
    started = time.perf_counter()
    machine = common.machine_info()
    model = common.load_model(args.model, args.dtype)
    params, config = model.params, model.config
    ids = common.prompt_ids(args.model, args.prompt_len)
    cache_shape = jax.eval_shape(lambda: init_cache(config, 1, args.cache_len, model.dtype))
    max_chunk = min(args.max_input_len, 1 << (args.prompt_len - 1).bit_length())  # as prefill bounds it

    candidates = []
    for chunk_len in common.progress(candidate_chunk_lens(max_chunk), "compile candidates"):
        memory = step_memory(params, cache_shape, chunk_len, config=config, attention_impl=args.attention_impl)
        candidates.append({"chunk_len": chunk_len, "peak_bytes": memory.peak_bytes, **memory.as_mb()})

    timings: dict[int, dict] = {}
    rows = []
    budgets = [] if args.candidates_only else budget_grid([c["peak_bytes"] for c in candidates], args.n_budgets)
    for budget in (bar := common.progress(budgets, "budgets")):
        row = {"budget_mb": budget / common.MB, "budget_bytes": budget}
        try:
            chunk_len, memory = pick_chunk_len(params, cache_shape, budget, config=config, max_chunk_len=max_chunk,
                                               attention_impl=args.attention_impl)
        except InputError as err:
            rows.append({**row, "error": "no chunk fits", "error_message": str(err)})
            continue
        bar.set_postfix_str(f"chunk {chunk_len}")
        if chunk_len not in timings:

            def run(cache, budget=budget):
                return prefill(params, config, cache, [ids], memory_budget_bytes=budget,
                               attention_impl=args.attention_impl)[1]

            common.reset_peak_rss()
            timing = common.timeit(run, args.repeats,
                                   setup=lambda: (init_cache(config, 1, args.cache_len, model.dtype),))
            timings[chunk_len] = {"prefill_s": timing.median_s, "prefill_min_s": timing.min_s,
                                  "prefill_max_s": timing.max_s, "tok_per_s": args.prompt_len / timing.median_s,
                                  "rss_peak_mb": common.peak_rss_bytes() / common.MB}
        rows.append({**row, "chunk_len": chunk_len, **memory.as_mb(),
                     "headroom_mb": (budget - memory.peak_bytes) / common.MB, **timings[chunk_len]})

    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    cache_bytes = int(sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(cache_shape)))
    settings.update(model_source=model.source, cache_bytes=cache_bytes,
                    smallest_working_budget_bytes=min(c["peak_bytes"] for c in candidates),
                    wall_s=round(time.perf_counter() - started, 1))
    cand_df = common.write_results(args.out, candidates, settings, machine, name="candidates")
    title = (f"{args.model} {args.dtype}, {args.attention_impl} attention: prefill of {args.prompt_len} tokens, "
             f"cache {args.cache_len}")
    pngs = []
    if rows:
        df = common.write_results(args.out, rows, settings, machine, json_only=["error_message"])
        pngs.append(plot_budget(df, args.out / "budget.png", title))
    cand_df["series"] = "compiled step"
    pngs.append(common.line_plot(cand_df, args.out / "candidates.png", x="chunk_len", y=["peak_mb", "temp_mb"],
                                 y_labels=["peak (args + out - alias + temp)", "temporaries"], line="series",
                                 logy=True, xlabel="chunk length (tokens, log2)", ylabel="compiled memory (MB, log)",
                                 title=f"Memory of one compiled prefill step vs chunk length ({args.model})"))
    common.print_table(cand_df, ["chunk_len", "arg_mb", "out_mb", "alias_mb", "temp_mb", "peak_mb"],
                       title="\ncandidates (compiled prefill step)")
    if rows:
        common.print_table(df, TABLE_COLUMNS, title=f"\n{title}; load average {machine['load_average_1_5_15']}")
    for message in {r["error_message"] for r in rows if "error_message" in r}:
        print(f"\nbudget too small -> InputError: {message}")
    print(f"\nwrote into {args.out}: {'results.csv, results.json, ' if rows else ''}candidates.csv, candidates.json, "
          f"{', '.join(p.name for p in pngs)} in {settings['wall_s']} s")
    return cand_df


if __name__ == "__main__":
    main()
