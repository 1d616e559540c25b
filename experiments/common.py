"""Helpers shared by every experiment script (and the notebooks), so the scripts only say *what*
they measure.

- Machine:  `machine_info()` - CPU, cores, load, library versions, git commit (saved with results).
- Model:    `load_model("smollm2-135m" | "tiny-random", dtype)` and `prompt_ids(name, n)`.
- Timing:   `timeit(fn, repeats, setup)` -> `Timing` (jaxchunk.timing): the first call (compile)
            and min / median / max of the warm calls.
- Memory:   `reset_peak_rss()` / `peak_rss_bytes()` (per-run process peak, Linux); XLA's compiled
            memory of a prefill step is `jaxchunk.steps.step_memory`.
- Accuracy: `reference_logits` (full attention, no cache) and `chunked_eval` (chunked prefill
            compared with it, plus perplexity, one chunk at a time).
- Output:   `write_results` (CSV + JSON with machine info and settings), `line_plot` (PNG),
            `print_table`, `progress` (tqdm over runs).

experiments/ is a package: run each script from the repository root as a module,
`.venv/bin/python -m experiments.<script>`, and import from it with `from experiments import
common`. JAX is imported only inside the functions that need it: compare_peers' torch / llama.cpp
workers use the timing and memory helpers, and importing JAX there would add to the peak RSS they
report.
"""
from __future__ import annotations

import dataclasses
import datetime
import functools
import importlib.metadata
import json
import math
import os
import platform
import resource
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from jaxchunk.fetch import DEFAULT_MODEL  # the model registry's default; imports no JAX
from jaxchunk.fetch import MODELS as fetch_models

# The one timing helper, shared with `jaxchunk bench`; re-exported for the scripts.
from jaxchunk.timing import Timing, timeit  # noqa: F401
from jaxchunk.weights.modes import DTYPES, QUANTIZED_MODES

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = "tiny-random"
MODELS = (*fetch_models, TINY_MODEL)  # every model of the registry, and the random one
MB = 1024 ** 2


# ----------------------------------------------------------------------------- machine
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on. The load average matters: this runs on shared machines."""
    try:
        usable_cores = len(os.sched_getaffinity(0))
    except AttributeError:
        usable_cores = os.cpu_count()
    import jax
    return {
        "time": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": usable_cores,
        "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "memory_total_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024 ** 3, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax_backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "versions": {p: _version(p) for p in ("jax", "jaxlib", "numpy", "torch", "transformers",
                                               "llama_cpp_python")},
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
    }


# ----------------------------------------------------------------------------- memory
def reset_peak_rss() -> bool:
    """Reset the process's peak-RSS mark (Linux: writing 5 to /proc/self/clear_refs), so the next
    `peak_rss_bytes()` covers only what ran since. False where unsupported (then the peak is the
    whole process lifetime)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _status_kb(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def current_rss_bytes() -> int:
    kb = _status_kb("VmRSS")
    return kb * 1024 if kb is not None else peak_rss_bytes()


def peak_rss_bytes() -> int:
    """Peak resident memory of this process since start or the last `reset_peak_rss()`."""
    kb = _status_kb("VmHWM")
    if kb is None:  # not Linux: ru_maxrss is KiB on Linux, bytes on macOS
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return rss if sys.platform == "darwin" else rss * 1024
    return kb * 1024


# ----------------------------------------------------------------------------- models and prompts
@dataclasses.dataclass
class LoadedModel:
    name: str
    dtype: str           # "f32" | "bf16": params, activations and KV cache
    config: Any          # jaxchunk.config.LlamaConfig
    params: dict         # on device, in `dtype`
    tokenizer: Any       # jaxchunk Tokenizer, None for the random model
    source: str          # file path or description, for the results' settings


def tiny_config():
    """A 2-layer Llama with GQA (4 query heads, 2 KV heads): compiles and runs in well under a
    second, for tests and smoke runs of the scripts."""
    from jaxchunk import testing
    return testing.tiny_config(vocab_size=512, max_position_embeddings=8192, bos_token_id=1, eos_token_id=2)


def model_path(name: str = DEFAULT_MODEL) -> Path:
    """The GGUF file of a known model (fetched on first use)."""
    if name not in MODELS or name == TINY_MODEL:
        raise ValueError(f"{name!r} has no model file; choose one of {', '.join(fetch_models)}")
    from jaxchunk.fetch import fetch_model
    return fetch_model(name)


def model_config(name: str):
    """The LlamaConfig of a known model (from its GGUF's metadata; no weights read) or the random one."""
    if name == TINY_MODEL:
        return tiny_config()
    from jaxchunk.weights.gguf import config_from_gguf, open_gguf
    return config_from_gguf(open_gguf(model_path(name)))


def file_type(name: str) -> str:
    """The GGUF's quantization mix as llama.cpp names it ("Q4_1", "Q4_K_M"), from `general.file_type`."""
    from jaxchunk.weights.gguf import file_type_name, gguf_field, open_gguf
    path = model_path(name)
    return file_type_name(gguf_field(open_gguf(path), path, "general.file_type", int, None)).removeprefix("MOSTLY_")


def _tiny_host_weights(quantized: bool):
    """(config, float32 NumPy params, source) of the random model; quantized: Q4_1 layers and a
    Q8_0 embedding (jaxchunk.weights.quantized.quantize_params)."""
    import jax
    from jaxchunk.model import init_params
    config = tiny_config()
    # scale 0.2 (not the default 0.02) gives peaked attention, so a wrong mask shows up clearly.
    params = jax.tree.map(np.asarray, init_params(config, seed=0, scale=0.2))
    source = "random init (jaxchunk.model.init_params, seed 0, scale 0.2)"
    if not quantized:
        return config, params, source
    from jaxchunk.weights.quantized import quantize_params
    return config, quantize_params(params, "Q4_1", "Q8_0"), source + ", quantized Q4_1 / Q8_0"


@functools.lru_cache(maxsize=2)
def _tokenizer(name: str):
    """jaxchunk's tokenizer of the model (None for the random model), without loading weights."""
    if name == TINY_MODEL:
        return None
    from jaxchunk.tokenizer import Tokenizer
    return Tokenizer.from_gguf(model_path(name))


WEIGHTS = ("dequantized", *QUANTIZED_MODES)  # load_model's weight modes (its dtype says the float one)


def load_model(name: str = DEFAULT_MODEL, dtype: str = "f32", weights: str = "dequantized") -> LoadedModel:
    """SmolLM2-135M (its GGUF, through jaxchunk.weights.load_weights as jaxchunk.load reads it) or
    the tiny random model, in `dtype` (bf16: packed as `jaxchunk.load` packs it, for inference;
    not differentiable).

    weights="q4": the weight matrices stay quantized (jaxchunk.weights.quantized; the GGUF's own
    Q4_1 / Q8_0 blocks, or for the random model Q4_1 layers and a Q8_0 embedding); norms in `dtype`.
    "q4_q8": the same, each matrix's input rounded to 8 bits per 32-block (as jaxchunk.load).
    """
    import jax

    from jaxchunk import host_memory
    from jaxchunk.weights import load_weights, prepare_params
    host_memory.trim_after_compiles()  # as jaxchunk.load: the peak RSS the experiments report is the library's
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    quantized = weights in QUANTIZED_MODES
    if name == TINY_MODEL:
        config, host_params, source = _tiny_host_weights(quantized)
        params = prepare_params(host_params, dtype, weights)
    else:
        path = model_path(name)
        config, params, _ = load_weights(path, dtype=dtype, weights=weights)
        source = str(path)
    if quantized:
        source += " (weights kept quantized" + (", inputs rounded to 8 bits)" if weights == "q4_q8" else ")")
    return LoadedModel(name, dtype, config, jax.device_put(params), _tokenizer(name), source)


def prompt_ids(name: str, n: int) -> np.ndarray:
    """n token ids for model `name`: BOS + the start of jaxchunk.corpus.reference_text (real
    English prose and code, so perplexity means something), or seeded random ids for the random
    model. Every script and peer gets the same ids for the same n."""
    if name == TINY_MODEL:
        return np.random.default_rng(n).integers(3, tiny_config().vocab_size, n).astype(np.int32)
    return _text_ids(name, n)


@functools.lru_cache(maxsize=8)
def _text_ids(name: str, n: int) -> np.ndarray:
    from jaxchunk.corpus import reference_ids
    return np.asarray(reference_ids(_tokenizer(name), n), np.int32)


# ----------------------------------------------------------------------------- accuracy
@functools.lru_cache(maxsize=1)
def _jitted_forward():
    import jax
    from jaxchunk.model import forward
    return jax.jit(forward, static_argnums=(1,))  # config is hashable: static


def reference_logits(model: LoadedModel, ids: np.ndarray) -> np.ndarray:
    """[n, vocab] float32 logits of `jaxchunk.model.forward`: plain causal attention over the whole
    sequence, no cache and no chunks - what chunked prefill must reproduce. Its attention scores are
    [heads, n, n] float32 per layer (2.4 GB per layer for SmolLM2 at n=8192)."""
    return np.asarray(_jitted_forward()(model.params, model.config, np.asarray(ids)[None])[0])


def token_nll(logits: np.ndarray, targets: np.ndarray, rows: int = 256) -> np.ndarray:
    """Negative log-likelihood of each target under each row of logits (float64 accumulation),
    `rows` rows at a time (the float64 copy of a [2048, 262144] Gemma chunk would be 4.3 GB)."""
    out = []
    for start in range(0, len(targets), rows):
        block = logits[start:start + rows].astype(np.float64)
        top = block.max(-1, keepdims=True)
        log_z = top[:, 0] + np.log(np.exp(block - top).sum(-1))
        out.append(log_z - block[np.arange(len(block)), targets[start:start + rows]])
    return np.concatenate(out) if out else np.zeros(0)


def chunked_eval(model: LoadedModel, ids: np.ndarray, chunk_size: int, attention_impl: str,
                 reference: np.ndarray, cache_len: int | None = None,
                 cache_dtype: str | None = None) -> dict[str, float]:
    """Prefill `ids` chunk by chunk with all-position logits and compare each chunk's logits with
    the same rows of `reference` as they arrive, so at most one chunk of logits is alive (never the
    whole [n, vocab] twice). Returns max |logit difference|, top-1 agreement, and the perplexity of
    the text under the chunked logits and under the reference. cache_dtype: the KV cache format
    (jaxchunk.cache.CACHE_DTYPES); default the model's dtype."""
    from jaxchunk.cache import init_cache
    from jaxchunk.prefill import iter_prefill

    n = len(ids)
    cache = init_cache(model.config, 1, cache_len or n, cache_dtype or model.dtype)
    max_diff, agree, nll, nll_ref = 0.0, 0, 0.0, 0.0
    for chunk in iter_prefill(model.params, model.config, cache, [ids], chunk_size=chunk_size,
                              max_input_len=chunk_size, attention_impl=attention_impl, logits="all"):
        start, n_valid = int(chunk.start[0]), int(chunk.n_valid[0])
        ours, ref = chunk.valid_logits(0), reference[start:start + n_valid]
        max_diff = max(max_diff, float(np.abs(ours - ref).max()))
        agree += int((ours.argmax(-1) == ref.argmax(-1)).sum())
        # Position i predicts token i + 1; the prompt's last position has nothing to predict.
        targets = ids[start + 1:start + n_valid + 1]
        nll += token_nll(ours[:len(targets)], targets).sum()
        nll_ref += token_nll(ref[:len(targets)], targets).sum()
    return {"max_abs_logit_diff": max_diff, "top1_agreement": agree / n,
            "perplexity": math.exp(nll / (n - 1)), "perplexity_reference": math.exp(nll_ref / (n - 1))}


# ----------------------------------------------------------------------------- output
def progress(items: Sequence, desc: str):
    """A tqdm bar over runs, on stderr so stdout keeps only the results table. Plain-text tqdm
    even in notebooks (tqdm.auto's widget needs ipywidgets); TQDM_DISABLE=1 turns it off."""
    from tqdm import tqdm
    return tqdm(items, desc=desc, unit="run", file=sys.stderr, dynamic_ncols=True)


def _jsonable(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return None if np.isnan(value) else float(value)
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def write_results(out_dir: Path, rows: list[dict], settings: dict, machine: dict,
                  name: str = "results", json_only: Sequence[str] = ()):
    """`<name>.csv` (one row per run) and `<name>.json` ({machine, settings, rows}); returns the
    CSV's rows as a pandas DataFrame. Columns in `json_only` (lists, nested data) skip the CSV."""
    import pandas as pd
    out_dir.mkdir(parents=True, exist_ok=True)
    df = pd.DataFrame(rows).drop(columns=list(json_only))
    df.to_csv(out_dir / f"{name}.csv", index=False)
    payload = {"machine": machine, "settings": settings,
               "rows": [{k: _jsonable(v) for k, v in row.items()} for row in rows]}
    (out_dir / f"{name}.json").write_text(json.dumps(payload, indent=2, default=_jsonable) + "\n")
    return df


def print_table(df, columns: Iterable[str], title: str | None = None) -> str:
    """Print (and return) the chosen columns as an aligned text table."""
    import pandas as pd
    columns = [c for c in columns if c in df.columns]
    with pd.option_context("display.width", 250, "display.max_columns", None,
                           "display.float_format", lambda x: f"{x:.4g}"):
        text = df[columns].to_string(index=False)
    if title:
        text = f"{title}\n{text}"
    print(text)
    return text


def line_plot(df, path: Path, *, x: str, y: str | Sequence[str], line: str, facet: str | None = None,
              title: str, xlabel: str, ylabel: str, logx: bool = True, logy: bool = False,
              y_labels: Sequence[str] | None = None, floor: float | None = None,
              band: tuple[str, str] | None = None) -> Path:
    """One panel per value of `facet` (e.g. dtype), one line per value of `line` (e.g. prompt
    length), one line style per column in `y` (e.g. two kinds of memory). `floor` clips values
    below it (zeros on a log axis). `band`: (low, high) columns shaded around each line (e.g. the
    min and max of repeated runs; rows without them unshaded). Saves a PNG."""
    plt = pyplot()
    ys = [y] if isinstance(y, str) else list(y)
    y_labels = list(y_labels) if y_labels else ys
    facets = list(dict.fromkeys(df[facet])) if facet else [None]  # in order of appearance
    keys = sorted(df[line].unique())
    # Past 6 entries a legend inside the panel covers lines: it goes to the right of the last panel.
    legend_outside = len(keys) * len(ys) > 6
    fig, axes = plt.subplots(1, len(facets), figsize=(5.5 * len(facets) + 1 + 2.5 * legend_outside, 4.2),
                             squeeze=False, sharey=True)
    styles = ["-", "--", ":", "-."]
    # Same color in every panel; past the 10 default colors (which would repeat), tab20's 20.
    colors = {key: f"C{i}" if len(keys) <= 10 else plt.cm.tab20(i % 20) for i, key in enumerate(keys)}
    for ax, value in zip(axes[0], facets):
        part = df if facet is None else df[df[facet] == value]
        for key, group in sorted(part.groupby(line), key=lambda kv: kv[0]):
            group = group.sort_values(x)
            for col, label, style in zip(ys, y_labels, styles):
                values = group[col].astype(float)
                if floor is not None:
                    values = values.clip(lower=floor)
                suffix = f", {label}" if len(ys) > 1 else ""
                name = key if line == "label" else f"{line}={key}"  # a "label" column is already readable
                ax.plot(group[x], values, style, color=colors[key], marker="o", label=f"{name}{suffix}")
            if band is not None and group[list(band)].notna().all(axis=None):
                ax.fill_between(group[x], group[band[0]].astype(float), group[band[1]].astype(float),
                                color=colors[key], alpha=0.15, linewidth=0)
        if logx:
            log2_axis(ax, part[x], "x")
        if logy:
            log10_axis(ax)
        ax.set_xlabel(xlabel)
        ax.grid(True, which="both", alpha=0.3)
        # A single panel's title wrapped to the panel (~11 characters an inch at this size).
        ax.set_title(f"{facet}: {value}" if facet else textwrap.fill(title, int(11 * 5.5)), fontsize=10)
        if not legend_outside:
            ax.legend(fontsize=8)
    if legend_outside:
        handles = {h.get_label(): h for ax in axes[0] for h in ax.get_lines()}  # every panel's lines, once
        axes[0][-1].legend(list(handles.values()), list(handles), fontsize=8, loc="upper left",
                           bbox_to_anchor=(1.02, 1.0))
    axes[0][0].set_ylabel(ylabel)
    if facet:
        fig.suptitle(title)
    return save_figure(fig, path)


def log10_axis(ax) -> None:
    """A log10 y axis (call after plotting) with plainly written labels (200, not 2x10^2), dense
    enough that every value reads against a labelled tick: at 1, 2, ..., 9 x 10^k over a range of
    under 0.7 decades, 1, 1.5, 2, 3, 4, 5, 7 x 10^k under 1.5, 1, 2, 5 x 10^k up to 3, else 10^k;
    unlabelled grid lines between."""
    import matplotlib.ticker
    ax.set_yscale("log")
    low, high = ax.get_ylim()
    decades = math.log10(high / low) if low > 0 else math.inf
    subs = (tuple(range(1, 10)) if decades < 0.7 else (1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 7.0) if decades < 1.5
            else (1.0, 2.0, 5.0) if decades < 3 else (1.0,))
    ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=subs))
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_locator(matplotlib.ticker.LogLocator(base=10, subs=tuple(range(1, 10))))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def log2_axis(ax, values, which: str = "x") -> None:
    """A log2 axis ticked at the values themselves, written plainly (512, not 2^9)."""
    import matplotlib.ticker
    ticks = sorted({int(v) for v in values})
    getattr(ax, f"set_{which}scale")("log", base=2)
    getattr(ax, f"set_{which}ticks")(ticks, [str(t) for t in ticks],
                                     rotation=45 if which == "x" and len(ticks) > 6 else 0)
    getattr(ax, f"{which}axis").set_minor_locator(matplotlib.ticker.NullLocator())


def pyplot():
    """matplotlib.pyplot on the Agg backend (PNGs without a display: servers, CI, subprocesses),
    unless pyplot is already in use (a notebook's inline backend stays)."""
    import matplotlib
    if "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return path


def parse_list(text: str, kind=int) -> list:
    """'64,128, 256' -> [64, 128, 256] (argparse type for comma-separated lists)."""
    return [kind(part.strip()) for part in text.split(",") if part.strip()]


def apply_preset(args, preset: dict) -> None:
    """Fill every argument still None from the --quick / full preset (explicit flags win)."""
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)


def print_written(out_dir: Path, pngs: Sequence[Path], wall_s: float) -> None:
    """The closing line of every experiment: what it wrote and how long it took."""
    print(f"\nwrote {out_dir / 'results.csv'}, results.json, {', '.join(p.name for p in pngs)} in {wall_s} s")
