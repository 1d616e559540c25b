"""exllamav2's automatic chunking (max_attention_size) vs fixed chunk sizes.

exllamav2 bounds each chunk so that k_len * q_len <= max_attention_size: as the cache fills, chunks
shrink (jaxchunk rounds them down to powers of two so only a few shapes ever compile; see
jaxchunk/prefill.py: chunk_schedule). A fixed chunk size keeps one shape but lets the attention
scores of late chunks grow with the prompt. For each schedule and prompt length this records:

- the schedule itself (chunk lengths and how many tokens of each are real), its number of chunks
  and of distinct chunk shapes;
- n_compiles: executables the run added. Every prompt of a schedule shares one cache of
  --cache-len positions (like exllamav2's fixed cache) and JAX's caches are cleared before each
  schedule, so this counts what a schedule needs on top of its own shorter prompts;
- prefill time (median of --repeats warm calls) and first-call overhead (compilation);
- compiled memory: the largest XLA temp / peak over the schedule's chunk shapes, and peak RSS.

  .venv/bin/python -m experiments.max_attention_size --quick
  .venv/bin/python -m experiments.max_attention_size --prompt-lens 512,2048,8192 --out results/mas

Writes results.csv, results.json, schedule.png (chunk length vs position), time.png, memory.png.
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import jax

from experiments import common
from jaxchunk.cache import init_cache
from jaxchunk.prefill import DEFAULT_MAX_INPUT_LEN, chunk_schedule, prefill
from jaxchunk.steps import compiled_step_counts, step_memory

FULL = dict(prompt_lens=[512, 2048, 8192], max_attention_sizes=[512, 1024, 2048], chunk_sizes=[512, 2048],
            repeats=3)
QUICK = dict(prompt_lens=[512, 2048], max_attention_sizes=[512, 1024], chunk_sizes=[512], repeats=1)
TABLE_COLUMNS = ["schedule", "prompt_len", "n_chunks", "n_shapes", "n_compiles", "prefill_s", "tok_per_s",
                 "compile_s", "max_step_temp_mb", "max_step_peak_mb", "rss_peak_mb", "chunks"]


@dataclasses.dataclass(frozen=True)
class Policy:
    """One way of cutting prompts: exllamav2's rule (max_attention_size) or a fixed chunk size."""
    max_attention_size: int | None = None
    chunk_size: int | None = None

    @property
    def label(self) -> str:
        if self.chunk_size:
            return f"fixed {self.chunk_size}"
        return f"auto {int(round(self.max_attention_size ** 0.5))}^2"

    def kwargs(self, max_input_len: int) -> dict:
        if self.chunk_size:
            return dict(chunk_size=self.chunk_size, max_input_len=max(self.chunk_size, max_input_len))
        return dict(max_attention_size=self.max_attention_size, max_input_len=max_input_len)


def compact(schedule: list[tuple[int, int]]) -> str:
    """[(1024, 1024), (1024, 1024), (512, 300)] -> '1024x2 512(300)': readable in a table cell."""
    parts, i = [], 0
    while i < len(schedule):
        j = i
        while j < len(schedule) and schedule[j] == schedule[i]:
            j += 1
        length, valid = schedule[i]
        parts.append(f"{length}" + (f"({valid})" if valid != length else "") + (f"x{j - i}" if j - i > 1 else ""))
        i = j
    return " ".join(parts)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=common.DEFAULT_MODEL, choices=common.MODELS)
    p.add_argument("--dtype", default="f32", choices=tuple(common.DTYPES))
    p.add_argument("--attention-impl", default="xla")
    p.add_argument("--prompt-lens", type=common.parse_list, help="comma-separated token counts")
    p.add_argument("--max-attention-sizes", type=common.parse_list,
                   help="square roots: '512,1024' means max_attention_size 512^2 and 1024^2")
    p.add_argument("--chunk-sizes", type=common.parse_list, help="fixed chunk sizes to compare with")
    p.add_argument("--max-input-len", type=int, default=DEFAULT_MAX_INPUT_LEN,
                   help="the largest chunk the auto rule may pick")
    p.add_argument("--cache-len", type=int, help="KV cache positions (default: the longest prompt)")
    p.add_argument("--repeats", type=int)
    p.add_argument("--quick", action="store_true", help=f"preset: {QUICK} (explicit flags still win)")
    p.add_argument("--out", type=Path, default=Path("results/max_attention_size"))
    args = p.parse_args(argv)
    common.apply_preset(args, QUICK if args.quick else FULL)
    args.cache_len = args.cache_len or max(args.prompt_lens)
    if max(args.prompt_lens) > args.cache_len:
        p.error(f"--cache-len {args.cache_len} is shorter than the longest prompt")
    return args


def measure(model, ids, policy: Policy, args) -> dict:
    config, n = model.config, len(ids)
    kwargs = policy.kwargs(args.max_input_len)
    schedule = chunk_schedule(n, **kwargs)
    shapes = sorted({length for length, _ in schedule})

    def fresh_cache():
        return (init_cache(config, 1, args.cache_len, model.dtype),)

    def run_prefill(cache):
        return prefill(model.params, config, cache, [ids], attention_impl=args.attention_impl, **kwargs)[1]

    before = compiled_step_counts()["prefill_chunk"]
    common.reset_peak_rss()
    timing = common.timeit(run_prefill, args.repeats, setup=fresh_cache)
    rss_peak = common.peak_rss_bytes()
    n_compiles = compiled_step_counts()["prefill_chunk"] - before
    cache_shape = jax.eval_shape(lambda: init_cache(config, 1, args.cache_len, model.dtype))
    memory = [step_memory(model.params, cache_shape, length, config=config, attention_impl=args.attention_impl).as_mb()
              for length in shapes]
    return {
        "model": model.name, "dtype": model.dtype, "attention_impl": args.attention_impl,
        "schedule": policy.label, "max_attention_size": policy.max_attention_size,
        "chunk_size": policy.chunk_size, "prompt_len": n, "cache_len": args.cache_len,
        "n_chunks": len(schedule), "n_shapes": len(shapes), "n_compiles": n_compiles,
        "prefill_s": timing.median_s, "prefill_min_s": timing.min_s, "prefill_max_s": timing.max_s,
        "tok_per_s": n / timing.median_s, "compile_s": timing.compile_s,
        "max_step_temp_mb": max(m["temp_mb"] for m in memory),
        "max_step_peak_mb": max(m["peak_mb"] for m in memory),
        "rss_peak_mb": rss_peak / common.MB, "chunks": compact(schedule),
        "schedule_list": schedule,  # full list: JSON only (dropped from the CSV)
    }


def plot_schedules(policies: list[Policy], prompt_len: int, max_input_len: int, path: Path) -> Path:
    """Chunk length against the position where the chunk starts, one step line per schedule."""
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    all_lengths = set()
    for i, policy in enumerate(policies):
        schedule = chunk_schedule(prompt_len, **policy.kwargs(max_input_len))
        starts, pos = [], 0
        for _, valid in schedule:
            starts.append(pos)
            pos += valid
        lengths = [length for length, _ in schedule]
        all_lengths.update(lengths)
        # Repeat the last step to the prompt's end so the final chunk is drawn too.
        ax.step(starts + [prompt_len], lengths + lengths[-1:], where="post", color=f"C{i}",
                label=f"{policy.label} ({len(schedule)} chunks)", linewidth=2, alpha=0.8)
        ax.plot(starts, lengths, "o", color=f"C{i}", markersize=3)
    common.log2_axis(ax, all_lengths, "y")
    ax.set_xlabel("position where the chunk starts (tokens already in the cache)")
    ax.set_ylabel("chunk length (tokens, log2; compiled shape)")
    ax.set_title(f"Chunk schedules for a {prompt_len}-token prompt (max_input_len {max_input_len})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return common.save_figure(fig, path)


def main(argv=None):
    args = parse_args(argv)
    started = time.perf_counter()
    machine = common.machine_info()
    model = common.load_model(args.model, args.dtype)
    policies = ([Policy(max_attention_size=s * s) for s in args.max_attention_sizes]
                + [Policy(chunk_size=c) for c in args.chunk_sizes])
    runs = [(policy, n) for policy in policies for n in sorted(args.prompt_lens)]
    rows = []
    for policy, n in (bar := common.progress(runs, "max_attention_size")):
        bar.set_postfix_str(f"{policy.label} n={n}")
        if n == min(args.prompt_lens):
            jax.clear_caches()  # count each schedule's compiles on its own
        rows.append(measure(model, common.prompt_ids(args.model, n), policy, args))
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    settings.update(model_source=model.source, wall_s=round(time.perf_counter() - started, 1))
    df = common.write_results(args.out, rows, settings, machine, json_only=["schedule_list"])

    pngs = [plot_schedules(policies, max(args.prompt_lens), args.max_input_len, args.out / "schedule.png")]
    kw = dict(x="prompt_len", line="schedule", xlabel="prompt length (tokens, log2)")
    pngs.append(common.line_plot(df, args.out / "time.png", y="prefill_s", logy=True, ylabel="prefill time (s, log)",
                                 title=f"Prefill time ({args.dtype}, cache {args.cache_len})", **kw))
    pngs.append(common.line_plot(df, args.out / "memory.png", y="max_step_temp_mb", logy=True,
                                 ylabel="largest compiled step temporaries (MB, log)",
                                 title="Compiled memory of the largest chunk shape", **kw))
    common.print_table(df, TABLE_COLUMNS, title=f"\n{args.model} {args.dtype}, cache {args.cache_len}, "
                                                  f"load average {machine['load_average_1_5_15']}")
    common.print_written(args.out, pngs, settings['wall_s'])
    return df


if __name__ == "__main__":
    main()
