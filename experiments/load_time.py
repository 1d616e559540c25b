"""How long `jaxchunk.load(model, weights=...)` takes, per weight mode, next to llama.cpp's
`llama_cpp.Llama(path, n_ctx=..., verbose=False)` on the same GGUF, in the same run.

Every measurement is a fresh process (this script's worker, run with `python -c`), so nothing is
warm but the OS page cache (the file is read once before timing, so every run finds it cached):

- import_s: importing the libraries - JAX (and its backend start), jaxchunk with the modules and
  packages `load` uses (flax, tokenizers, gguf); for llama.cpp `import llama_cpp` (its shared
  library). What any use of the library costs, whatever the model.
- load_s:   `jaxchunk.load(...)` until its params are on the device (jax.block_until_ready):
  reading the file, the config, the weights in the chosen form, the tokenizer; for llama.cpp the
  `Llama(...)` constructor (memory-maps the file, builds its vocabulary, allocates the context).

Reported per mode: median, min and max over --repeats processes, and load_s / llama.cpp's median
load_s. With --baseline-root DIR the same is timed for the jaxchunk in DIR (e.g. a checkout of an
older commit), labelled "jaxchunk (baseline)". A breakdown run per mode (this checkout only)
times the steps of a load separately: open_gguf, load_weights, the tokenizer, jax.device_put.

Start-up of the command line (`--generate-runs N`, default 2): the wall time of a whole
`python -m jaxchunk.cli generate --prompt "The capital of France is" --max-new-tokens 8` process
(interpreter start, imports, load, compiles, generation), run twice on an empty persistent
compilation cache directory (`first`: everything compiles and is written; `second`: the
executables are read back), and once with the cache off (`JAXCHUNK_COMPILATION_CACHE=0`); with
--baseline-root also once with that checkout's jaxchunk. N rounds, each on a fresh directory.

llama.cpp is optional (`pip install llama-cpp-python`, the `bench` extra); without it only
jaxchunk is timed.

  .venv/bin/python -m experiments.load_time --quick
  .venv/bin/python -m experiments.load_time --baseline-root ../main

Writes results.csv (one row per process), summary.csv, breakdown.csv, generate.csv (+ .json with
machine info and settings), load_time.png and generate.png into --out.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from experiments import common

MODES = ("f32", "bf16", "q4", "q4_q8")
LLAMA_CPP = "llama.cpp"
JAXCHUNK = "jaxchunk"
BASELINE = "jaxchunk (baseline)"
# Imported before the clock starts for load_s: the library, not the model file.
LIBRARY_MODULES = ("jax", "jaxchunk", "jaxchunk.api", "jaxchunk.cache", "jaxchunk.model", "jaxchunk.prefill",
                   "jaxchunk.tokenizer", "jaxchunk.weights.gguf", "jaxchunk.weights.quantized",
                   "jaxchunk.weights.bf16", "flax", "tokenizers", "gguf")

JAXCHUNK_WORKER = r"""
import importlib, json, sys, time
spec = json.loads(sys.argv[1])
start = time.perf_counter()
for name in spec["modules"]:
    importlib.import_module(name)
import jax
jax.devices()  # start the backend
imported = time.perf_counter()
import jaxchunk
model = jaxchunk.load(spec["model"], weights=spec["weights"])
jax.block_until_ready(model.params)
loaded = time.perf_counter()
print(json.dumps({"import_s": imported - start, "load_s": loaded - imported, "module": jaxchunk.__file__}))
"""

LLAMA_CPP_WORKER = r"""
import json, sys, time
spec = json.loads(sys.argv[1])
start = time.perf_counter()
import llama_cpp
imported = time.perf_counter()
llm = llama_cpp.Llama(spec["model"], n_ctx=spec["n_ctx"], verbose=False)
loaded = time.perf_counter()
print(json.dumps({"import_s": imported - start, "load_s": loaded - imported, "module": llama_cpp.__file__}))
"""

BREAKDOWN_WORKER = r"""
import importlib, json, sys, time
spec = json.loads(sys.argv[1])
for name in spec["modules"]:
    importlib.import_module(name)
import jax
jax.devices()
from jaxchunk.tokenizer import Tokenizer, gguf_add_bos
from jaxchunk.weights import load_weights
from jaxchunk.weights.gguf import open_gguf
steps, t = {}, time.perf_counter()
def step(name):
    global t
    now = time.perf_counter()
    steps[name] = now - t
    t = now
gguf = open_gguf(spec["model"]); step("open_gguf_s")
config, params, metadata = load_weights(gguf, weights=spec["weights"]); step("load_weights_s")
tokenizer = Tokenizer.from_gguf(gguf.path, reader=gguf); gguf_add_bos(gguf, gguf.path); step("tokenizer_s")
jax.block_until_ready(jax.device_put(params)); step("device_put_s")
print(json.dumps(steps))
"""


def run_worker(code: str, spec: dict, root: Path) -> dict:
    """Run a worker in a fresh interpreter with `root`'s jaxchunk first on the path; its JSON line."""
    env = dict(os.environ, PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True,
                          cwd=root, env=env, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"worker failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


GENERATE_ARGS = ("generate", "--prompt", "The capital of France is", "--max-new-tokens", "8")
CACHE_RUNS = ("first", "second")  # on the same, initially empty, compilation cache directory


BASELINE_RUN = "baseline checkout"


def time_generate(model: Path, weights: str, rounds: int, baseline_root: Path | None = None) -> list[dict]:
    """Wall time of whole `jaxchunk generate` processes: per round, first and second on a fresh
    compilation cache directory, then one with the cache off (and one of the baseline checkout's
    jaxchunk, if given). Rows: run, round, wall_s, text."""
    rows = []
    command = [sys.executable, "-m", "jaxchunk.cli", *GENERATE_ARGS, "--model", str(model), "--weights", weights]
    for index in range(rounds):
        with tempfile.TemporaryDirectory(prefix="jaxchunk-xla-") as directory:
            runs = [*((name, directory, common.ROOT) for name in CACHE_RUNS), ("cache off", "0", common.ROOT)]
            if baseline_root is not None:
                runs.append((BASELINE_RUN, "0", baseline_root.resolve()))
            for run, setting, root in runs:
                env = dict(os.environ, JAXCHUNK_COMPILATION_CACHE=setting,
                           PYTHONPATH=str(root) + os.pathsep + os.environ.get("PYTHONPATH", ""))
                start = time.perf_counter()
                proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=root, timeout=600)
                wall = time.perf_counter() - start
                if proc.returncode != 0:
                    raise RuntimeError(f"jaxchunk generate failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
                rows.append({"run": run, "round": index, "weights": weights, "wall_s": wall,
                             "text": proc.stdout.strip()})
    return rows


def plot_generate(rows: list[dict], llama_load_s: float | None, path: Path, title: str) -> Path:
    """Bars: median wall time of each run kind (min-max whiskers), the second / first ratio on the
    second bar; a line at llama.cpp's median load time for scale."""
    plt = common.pyplot()
    kinds = [k for k in (*CACHE_RUNS, "cache off", BASELINE_RUN) if any(r["run"] == k for r in rows)]
    walls = {k: [r["wall_s"] for r in rows if r["run"] == k] for k in kinds}
    medians = {k: statistics.median(v) for k, v in walls.items()}
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for x, kind in enumerate(kinds):
        m = medians[kind]
        ax.bar(x, m, 0.6, color={"first": "C1", "second": "C0", "cache off": "C7", BASELINE_RUN: "C3"}[kind],
               yerr=[[m - min(walls[kind])], [max(walls[kind]) - m]], capsize=4)
        label = f"{m:.2f} s"
        if kind == "second":
            label += f"\n{m / medians['first']:.2f}x first"
            if BASELINE_RUN in medians:
                label += f"\n{m / medians[BASELINE_RUN]:.2f}x baseline"
        ax.text(x, max(walls[kind]) * 1.02, label, ha="center", va="bottom", fontsize=8)
    if llama_load_s is not None:
        ax.axhline(llama_load_s, color="C2", linestyle=":", linewidth=1)
        ax.text(-0.45, llama_load_s, f"llama.cpp load {llama_load_s:.2f} s", color="C2", fontsize=8,
                ha="left", va="bottom")
    ax.set_xticks(range(len(kinds)), [f"{k}\n({len(walls[k])} runs)" for k in kinds])
    ax.set_ylim(0, 1.2 * max(max(v) for v in walls.values()))
    ax.set_ylabel("wall time of the whole process (s)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, axis="y", alpha=0.3)
    return common.save_figure(fig, path)


def summarize(rows: list[dict]) -> list[dict]:
    """Median / min / max per (system, weights), and the ratio to llama.cpp's median load."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["system"], row["weights"]), []).append(row)
    llama = [r["load_s"] for r in rows if r["system"] == LLAMA_CPP]
    llama_median = statistics.median(llama) if llama else float("nan")
    out = []
    for (system, weights), runs in groups.items():
        entry = {"system": system, "weights": weights, "runs": len(runs)}
        for column in ("import_s", "load_s", "total_s"):
            values = [r[column] for r in runs]
            entry.update({f"{column}_median": statistics.median(values), f"{column}_min": min(values),
                          f"{column}_max": max(values)})
        entry["load_vs_llama_cpp"] = entry["load_s_median"] / llama_median
        out.append(entry)
    return out


def plot(summary: list[dict], path: Path, title: str) -> Path:
    """Two panels (load_s, import_s): bars per weight mode and system, min-max whiskers, log scale;
    the load panel marks 1x, 2x and 10x llama.cpp's median load time."""
    plt = common.pyplot()
    import matplotlib.ticker
    plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")  # 0.5, not 5x10^-1
    # Minor ticks labelled at 2, 3 and 5 x 10^k only (every one of them crowds the axis).
    sparse = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}" if f"{v:.0e}"[0] in "235" else "")
    systems = [s for s in (BASELINE, JAXCHUNK) if any(r["system"] == s for r in summary)]
    modes = [m for m in MODES if any(r["weights"] == m and r["system"] != LLAMA_CPP for r in summary)]
    colors = {BASELINE: "C7", JAXCHUNK: "C0", LLAMA_CPP: "C2"}
    llama = next((r for r in summary if r["system"] == LLAMA_CPP), None)
    width = 0.8 / len(systems)
    bars = [(system, mode, modes.index(mode) + (i - (len(systems) - 1) / 2) * width, width)
            for i, system in enumerate(systems) for mode in modes]
    if llama is not None:
        bars.append((LLAMA_CPP, llama["weights"], len(modes), 0.5))
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, column in zip(axes, ("load_s", "import_s")):
        labelled = set()
        for system, mode, x, w in bars:
            row = next((r for r in summary if r["system"] == system and r["weights"] == mode), None)
            if row is None:
                continue
            median = row[f"{column}_median"]
            err = [[median - row[f"{column}_min"]], [row[f"{column}_max"] - median]]
            ax.bar(x, median, w, color=colors[system], yerr=err, capsize=3,
                   label=None if system in labelled else system)
            labelled.add(system)
            text = f"{median:.2f}"
            if column == "load_s" and system != LLAMA_CPP and llama is not None:
                text += f"\n{row['load_vs_llama_cpp']:.1f}x"
            ax.text(x, row[f"{column}_max"] * 1.08, text, ha="center", va="bottom", fontsize=7)
        if column == "load_s" and llama is not None:
            for factor, style in ((1, ":"), (2, "--"), (10, "-.")):
                ax.axhline(llama["load_s_median"] * factor, color="C2", linestyle=style, linewidth=1, alpha=0.7)
                ax.text(-0.45, llama["load_s_median"] * factor, f"{factor}x llama.cpp", fontsize=7,
                        va="bottom", color="C2")
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(sparse)
        ax.set_xticks(range(len(modes) + (llama is not None)),
                      [f"weights={m}" for m in modes] + (["llama.cpp\n(Q4_1 as stored)"] if llama else []))
        ax.set_ylabel(f"{column.removesuffix('_s')} time (s, log scale)")
        ax.set_title(f"{column.removesuffix('_s')}: median of fresh processes, whiskers min-max"
                     + (" (lines: 1x, 2x, 10x llama.cpp)" if column == "load_s" and llama else ""), fontsize=10)
        ax.grid(True, axis="y", which="both", alpha=0.3)
        low, high = ax.get_ylim()
        ax.set_ylim(low / 1.5, high * 4)  # headroom for the legend above the bars (log scale)
        ax.legend(fontsize=8, loc="upper center", ncols=3)
    fig.suptitle(title, fontsize=10)
    return common.save_figure(fig, path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=common.DEFAULT_MODEL, help="a known model name or a .gguf file")
    p.add_argument("--weights", type=lambda s: common.parse_list(s, str), default=list(MODES),
                   help=f"comma-separated weight modes, from {','.join(MODES)}")
    p.add_argument("--repeats", type=int, default=5, help="fresh processes per measurement")
    p.add_argument("--n-ctx", type=int, default=8192,
                   help="llama.cpp's context (its KV cache is allocated at load; jaxchunk.load's default "
                        "max_seq_len is min(model context, 8192), allocated on first use)")
    p.add_argument("--baseline-root", type=Path, default=None,
                   help="also time the jaxchunk of this checkout (e.g. an older commit), as the baseline")
    p.add_argument("--baseline-repeats", type=int, default=None, help="processes per baseline mode (default --repeats)")
    p.add_argument("--no-llama-cpp", action="store_true", help="skip llama.cpp even if it is installed")
    p.add_argument("--generate-runs", type=int, default=2,
                   help="rounds of `jaxchunk generate` start-up timing (first / second / cache off); 0: none")
    p.add_argument("--generate-weights", default="f32", choices=MODES, help="weights of the generate runs")
    p.add_argument("--quick", action="store_true", help="2 repeats")
    p.add_argument("--out", type=Path, default=Path("results/load_time"))
    args = p.parse_args(argv)
    if args.quick:
        args.repeats = 2
    unknown = set(args.weights) - set(MODES)
    if unknown:
        p.error(f"unknown --weights {sorted(unknown)}; choose from {','.join(MODES)}")

    from jaxchunk.fetch import resolve_model
    from jaxchunk.weights import checkpoint_path

    started = time.perf_counter()
    model = checkpoint_path(resolve_model(args.model))
    if model.is_dir():
        p.error(f"{model}: a GGUF file is needed (llama.cpp and the weight modes q4 / q4_q8 read GGUF)")
    model.read_bytes()  # into the page cache: every run then reads it from memory
    root = common.ROOT
    with_llama = not args.no_llama_cpp and importlib.util.find_spec("llama_cpp") is not None
    if not args.no_llama_cpp and not with_llama:
        print("llama-cpp-python is not installed (pip install llama-cpp-python): timing jaxchunk only",
              file=sys.stderr)
    load_before = list(os.getloadavg())

    plan = []  # (system, weights, worker, spec, root)
    spec = {"model": str(model), "modules": list(LIBRARY_MODULES)}
    for _ in range(args.repeats):  # interleaved, so a change in machine load hits every system alike
        if with_llama:
            plan.append((LLAMA_CPP, "q4", LLAMA_CPP_WORKER, {"model": str(model), "n_ctx": args.n_ctx}, root))
        for mode in args.weights:
            plan.append((JAXCHUNK, mode, JAXCHUNK_WORKER, dict(spec, weights=mode), root))
    if args.baseline_root is not None:
        for _ in range(args.baseline_repeats or args.repeats):
            for mode in args.weights:
                plan.append((BASELINE, mode, JAXCHUNK_WORKER, dict(spec, weights=mode), args.baseline_root.resolve()))

    rows = []
    for system, mode, worker, worker_spec, worker_root in common.progress(plan, "load runs"):
        result = run_worker(worker, worker_spec, worker_root)
        rows.append({"system": system, "weights": mode, "import_s": result["import_s"], "load_s": result["load_s"],
                     "total_s": result["import_s"] + result["load_s"], "module": result["module"]})
    generate_rows = (time_generate(model, args.generate_weights, args.generate_runs, args.baseline_root)
                     if args.generate_runs else [])
    breakdown = []
    for mode in args.weights:
        steps = run_worker(BREAKDOWN_WORKER, dict(spec, weights=mode), root)
        breakdown.append({"weights": mode, **steps, "sum_s": sum(steps.values())})

    machine = common.machine_info()
    machine["load_average_before"] = [round(x, 2) for x in load_before]
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    settings["model_file"] = str(model)
    settings["model_bytes"] = model.stat().st_size
    common.write_results(args.out, rows, settings, machine)
    summary = summarize(rows)
    summary_df = common.write_results(args.out, summary, settings, machine, name="summary")
    breakdown_df = common.write_results(args.out, breakdown, settings, machine, name="breakdown")
    load = machine["load_average_1_5_15"]
    png = plot(summary, args.out / "load_time.png",
               f"Load time of {model.name} ({model.stat().st_size / 1e6:.0f} MB): jaxchunk.load vs llama_cpp.Llama"
               f"\n{machine['cpu']}, {machine['usable_cores']} usable cores, load average {load[0]} / {load[1]} / "
               f"{load[2]}")
    pngs = [png]
    if generate_rows:
        generate_df = common.write_results(args.out, generate_rows, settings, machine, name="generate")
        llama_load = next((r["load_s_median"] for r in summary if r["system"] == LLAMA_CPP), None)
        pngs.append(plot_generate(
            generate_rows, llama_load, args.out / "generate.png",
            f"Wall time of `jaxchunk generate --max-new-tokens 8` (weights={args.generate_weights}), a new "
            f"process each\non an empty compilation cache (first), again (second), cache off"
            f"{', the baseline checkout' if args.baseline_root else ''}; "
            f"{machine['cpu']}, load {load[0]}"))
        common.print_table(generate_df, ["run", "round", "weights", "wall_s"], title="\njaxchunk generate (s)")
    common.print_table(summary_df, ["system", "weights", "runs", "import_s_median", "load_s_median", "load_s_min",
                                    "load_s_max", "load_vs_llama_cpp"], title="load time (s)")
    common.print_table(breakdown_df, list(breakdown_df.columns), title="\nbreakdown of one load (s)")
    common.print_written(args.out, pngs, round(time.perf_counter() - started, 1))
    return summary_df


if __name__ == "__main__":
    main()
