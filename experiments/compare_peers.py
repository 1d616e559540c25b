"""jaxchunk's prefill next to Hugging Face transformers and llama.cpp, same machine, same prompts.

Systems (--systems):
- jaxchunk:     chunked prefill (jaxchunk.prefill) for each --chunk-sizes, --dtypes and --weights,
                last-token logits; weights "dequantized": the GGUF dequantized to f32 / bf16 by
                jaxchunk's loader; "q4": the GGUF's Q4_1 / Q8_0 blocks kept quantized in memory
                (jaxchunk.weights.quantized; computed in the dtype); "q4_q8": q4 with each matrix's
                input rounded to 8 bits per 32-block, llama.cpp's own arithmetic (integer products).
                KV cache in --cache-dtypes (default: the compute dtype; llama.cpp keeps f16, so
                "bf16" is its size with f32 compute); --ring-cache: a model's sliding-window layers
                keep only window - 1 + chunk positions (llama.cpp's iSWA cache does the same).
- transformers: AutoModelForCausalLM.from_pretrained(dir, gguf_file=...) (its own dequantization)
                in f32 / bf16, torch.set_num_threads(--threads), torch.inference_mode, one forward
                over the whole prompt with logits_to_keep=1 (last-token logits only). Recent
                transformers keep GGUF weights packed and unpack them in every forward (several
                times slower on CPU without its `kernels` package); --hf-weights dense (default)
                asks for GgufConfig(dequantize=True): plain dense weights, like jaxchunk's.
- llama.cpp:    llama_cpp.Llama on the GGUF as is (its native weights: Q4_1 for SmolLM2, Q4_K_M
                for Gemma 3), n_batch 512,
                n_threads --threads, logits_all=False; llm.eval(ids) after llm.reset().

Every system runs in its own subprocess (this module with --worker), so its peak RSS (VmHWM, reset
before each prompt length) is its own: weights + cache + activations of that system only. Each gets
the same token ids (jaxchunk's tokenizer on jaxchunk.corpus.reference_text) through a .npy file.

Per prompt length: prefill tok/s (median of --repeats; warm-up excluded: for jaxchunk a full prefill
of that length, which compiles or loads the persistent compilation cache's executable; for the peers
one 64-token call at start-up) and decode tok/s (greedy, --decode-tokens tokens after the prompt,
one model step each, after a warm-up: the peers step token by token from Python, jaxchunk runs its
generation loop on device as model.generate does, warmed up by one full run), and the decode's
process CPU time per token (all threads; steadier than wall time on a shared machine, but it counts
spin-waiting threads too).
Decode is timed --decode-runs times (default 5) per prompt length, each run rewound to the prompt's
end first (the same tokens at the same context): the table reports the median and min / max, and
their spread (max / min).
The table adds each row's prefill speed relative to transformers f32 and bf16 at the same length,
and (unless --no-roofline) each prefill and decode figure as a fraction of this machine's limit for
its precision, measured first by experiments.roofline in the same run (prefill_of_limit,
decode_of_limit; the CPU model, flags and rates go into results.json).

  .venv/bin/python -m experiments.compare_peers --quick
  .venv/bin/python -m experiments.compare_peers --systems jaxchunk,llama.cpp --prompt-lens 8192

--rounds R runs every system R times, in the listed order and then reversed, alternately (a host
whose speed drifts during the run - shared cores - then weighs on every system alike, not on
whichever ran first). The table then gives per row: prefill tok/s as the median of the rounds'
medians, decode tok/s as the median over all rounds' runs, min / max / spread over all of them
(separate processes included), peak RSS the largest; rounds.csv keeps every round's row.

Writes results.csv, results.json, prefill.png, decode.png, memory.png (and with --rounds > 1
rounds.csv / rounds.json) into --out.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from experiments import common  # imports no JAX: the workers stay light

SYSTEMS = ("jaxchunk", "transformers", "llama.cpp")
FULL = dict(prompt_lens=[512, 2048, 8192], chunk_sizes=[256, 512, 2048], dtypes=["f32", "bf16"], repeats=3)
QUICK = dict(prompt_lens=[512, 2048], chunk_sizes=[512], dtypes=["f32", "bf16"], repeats=1)
RESULT_MARK = "COMPARE_PEERS_RESULT "
WORKER_MODULE = "experiments.compare_peers"  # each system runs in `python -m` of this module, --worker
WARMUP_TOKENS = 64


# ----------------------------------------------------------------------------- workers (subprocesses)
def measure_lengths(prefill_fn, decode_fn, rewind_fn, spec) -> list[dict]:
    """Shared by every worker: for each prompt length, time `prefill_fn(ids)` (returns the state
    decoding continues from) and --decode-runs timings of `decode_fn(state, n_tokens)`, each after
    `rewind_fn(state, n_prompt)` puts the state back at the end of the prompt (so every run decodes
    the same tokens at the same context), and record the peak RSS."""
    ids_all = np.load(spec["ids_path"])
    rows = []
    for n in spec["prompt_lens"]:
        ids = ids_all[:n]
        common.reset_peak_rss()
        state = {}

        def run():
            # Free the previous run's state (a whole KV cache) before the next one allocates its
            # own: the peak RSS is then one prefill's, not two caches'.
            state.pop("last", None)
            state["last"] = prefill_fn(ids)
            return state["last"]

        timing = common.timeit(run, spec["repeats"])
        decode_fn(state["last"], 1)  # warm-up step (jaxchunk: compiles the decode step)
        decode_s, decode_cpu_s = [], []
        for _ in range(spec["decode_runs"]):
            rewind_fn(state["last"], n)
            start, cpu_start = time.perf_counter(), time.process_time()
            decode_fn(state["last"], spec["decode_tokens"])
            decode_s.append(time.perf_counter() - start)
            decode_cpu_s.append(time.process_time() - cpu_start)
        tok_s = spec["decode_tokens"] / np.asarray(decode_s)
        rows.append({"prompt_len": n, "prefill_s": timing.median_s, "prefill_min_s": timing.min_s,
                     "prefill_max_s": timing.max_s, "prefill_tok_s": n / timing.median_s,
                     "first_call_s": timing.first_s, "decode_tok_s": float(np.median(tok_s)),
                     "decode_min_tok_s": float(tok_s.min()), "decode_max_tok_s": float(tok_s.max()),
                     "decode_spread": float(tok_s.max() / tok_s.min()), "decode_runs": len(tok_s),
                     "decode_runs_tok_s": tok_s.tolist(),
                     "decode_cpu_ms_per_tok": float(np.median(decode_cpu_s)) / spec["decode_tokens"] * 1e3,
                     "rss_peak_mb": common.peak_rss_bytes() / common.MB})
    return rows


def jaxchunk_worker(spec) -> tuple[list[dict], str]:
    import jax
    import jax.numpy as jnp

    from jaxchunk import compilation_cache
    from jaxchunk.cache import init_cache
    from jaxchunk.generate import decode_ids
    from jaxchunk.prefill import prefill
    # As jaxchunk.load does: executables from the persistent compilation cache when an earlier
    # process compiled the same step (no XLA compile, and none of its memory, in this one).
    compilation_cache.enable()
    model = common.load_model(spec["model"], spec["dtype"], spec["weights"])
    config, params, impl = model.config, model.params, spec["attention_impl"]

    n_decode = spec["decode_tokens"]

    def prefill_fn(ids):
        chunk = min(spec["chunk_size"], len(ids))
        # Room for the warm-up decode and the timed one (n_decode steps each).
        cache = init_cache(config, 1, len(ids) + 2 * n_decode + 1, spec["cache_dtype"] or model.dtype,
                           ring_chunk_len=chunk if spec.get("ring_cache") else None)
        cache, logits = prefill(params, config, cache, [ids], chunk_size=chunk, max_input_len=chunk,
                                attention_impl=impl)
        return {"cache": cache, "logits": logits}

    def decode_fn(state, n_tokens):
        # The library's generation loop (what model.generate runs): greedy, every step on device in
        # one jitted lax.while_loop. n_decode + 1 tokens = n_decode model steps (the first comes from
        # the prefill's logits). The warm-up call (n_tokens = 1) runs the full count too, so that
        # it compiles the loop the timed call uses (one compile per output-buffer size).
        state["cache"], _ = decode_ids(params, config, state["cache"], state["logits"],
                                       max_new_tokens=n_decode + 1, stop_ids=(), attention_impl=impl)

    def rewind_fn(state, n_prompt):  # the cache's write position back to the prompt's end
        state["cache"] = state["cache"].replace(lengths=jnp.full_like(state["cache"].lengths, n_prompt))

    weight_mb = sum(int(a.nbytes) for a in jax.tree.leaves(params)) / common.MB
    ring = f", sliding-window layers in a ring (ring_chunk_len={spec['chunk_size']})" if spec.get("ring_cache") else ""
    note = f"weights {spec['weights']} ({weight_mb:.0f} MB resident), attention_impl={impl}, cache=prompt+decode{ring}"
    return measure_lengths(prefill_fn, decode_fn, rewind_fn, spec), note


def load_transformers(gguf: str, dtype: str, threads: int, hf_weights: str = "dense", **kwargs):
    """The transformers peer: AutoModelForCausalLM on the GGUF jaxchunk loads (its own dequantization),
    in `dtype` ("f32" / "bf16"), torch using `threads` threads; `kwargs` go to from_pretrained (e.g.
    attn_implementation). Shared by every experiment that runs transformers."""
    import torch
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(threads)
    path = Path(gguf)
    if hf_weights == "dense":
        try:  # transformers >= 5: GGUF weights stay packed unless asked otherwise
            from transformers import GgufConfig
            kwargs["quantization_config"] = GgufConfig(dequantize=True)
        except ImportError:  # older transformers always dequantize
            pass
    torch_dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[dtype]
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch_dtype, **kwargs).eval()


def transformers_worker(spec) -> tuple[list[dict], str]:
    import inspect

    import torch
    import transformers
    model = load_transformers(spec["gguf"], spec["dtype"], spec["threads"], spec["hf_weights"])
    params = inspect.signature(model.forward).parameters
    keep = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in params), None)
    last_only = {keep: 1} if keep else {}

    @torch.inference_mode()
    def prefill_fn(ids):
        out = model(torch.as_tensor(ids, dtype=torch.long)[None], use_cache=True, **last_only)
        past = out.past_key_values
        if hasattr(past, "activate_past_recording"):  # sliding-window layers (Gemma 3) can then crop
            past.activate_past_recording()
        return {"past": past, "logits": out.logits[:, -1], "prompt_logits": out.logits[:, -1]}

    @torch.inference_mode()
    def decode_fn(state, n_tokens):
        for _ in range(n_tokens):
            token = state["logits"].argmax(-1, keepdim=True)
            out = model(token, past_key_values=state["past"], use_cache=True, **last_only)
            state["past"], state["logits"] = out.past_key_values, out.logits[:, -1]

    def rewind_fn(state, n_prompt):
        state["past"].crop(n_prompt - state["past"].get_seq_length())  # drop the decoded tokens
        state["logits"] = state["prompt_logits"]

    prefill_fn(np.arange(WARMUP_TOKENS))  # thread pools, allocator
    note = (f"transformers {transformers.__version__}, weights {spec['hf_weights']}, "
            f"attn={model.config._attn_implementation}, {keep or 'all logits (no logits_to_keep)'}, "
            f"threads={spec['threads']}")
    return measure_lengths(prefill_fn, decode_fn, rewind_fn, spec), note


def llama_cpp_worker(spec) -> tuple[list[dict], str]:
    import llama_cpp
    llm = llama_cpp.Llama(model_path=spec["gguf"], n_ctx=max(spec["prompt_lens"]) + spec["decode_tokens"] + 1,
                          n_batch=512, n_threads=spec["threads"], n_threads_batch=spec["threads"],
                          logits_all=False, verbose=False)

    def last_logits():
        # With logits_all=False llama-cpp-python keeps no scores; read the context's last row.
        return np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(llm.n_vocab(),))

    def prefill_fn(ids):
        llm.reset()
        llm.eval(ids.tolist())
        return {"first": int(np.argmax(last_logits()))}

    def decode_fn(state, n_tokens):
        token = state["first"]
        for _ in range(n_tokens):
            llm.eval([token])
            token = int(np.argmax(last_logits()))

    def rewind_fn(state, n_prompt):
        llm.n_tokens = n_prompt  # the next eval drops the cache past it (kv_cache_seq_rm)

    prefill_fn(np.arange(WARMUP_TOKENS))
    note = (f"llama-cpp-python {llama_cpp.__version__}, weights {spec['dtype']} (native), n_batch=512, "
            f"threads={spec['threads']}, {llama_cpp.llama_print_system_info().decode().strip()}")
    return measure_lengths(prefill_fn, decode_fn, rewind_fn, spec), note


WORKERS = {"jaxchunk": jaxchunk_worker, "transformers": transformers_worker, "llama.cpp": llama_cpp_worker}


def worker_main(spec_json: str) -> None:
    spec = json.loads(spec_json)
    rows, note = WORKERS[spec["system"]](spec)
    print(RESULT_MARK + json.dumps({"rows": rows, "note": note}), flush=True)


# ----------------------------------------------------------------------------- parent
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--systems", type=lambda s: common.parse_list(s, str), default=list(SYSTEMS),
                   help=f"comma-separated, from {SYSTEMS}")
    p.add_argument("--model", default=common.DEFAULT_MODEL, choices=common.MODELS,
                   help="tiny-random: jaxchunk only (the peers need the GGUF)")
    p.add_argument("--prompt-lens", type=common.parse_list)
    p.add_argument("--chunk-sizes", type=common.parse_list, help="jaxchunk chunk sizes")
    p.add_argument("--dtypes", type=lambda s: common.parse_list(s, str), help="for jaxchunk and transformers")
    p.add_argument("--attention-impl", default="auto", help="jaxchunk's attention_impl")
    p.add_argument("--cache-dtypes", type=lambda s: common.parse_list(s, str), default=[None],
                   help="jaxchunk's KV-cache formats (default: each --dtypes' own), e.g. bf16,f32")
    p.add_argument("--weights", type=lambda s: common.parse_list(s, str), default=["dequantized", "q4"],
                   help="jaxchunk weight modes: dequantized (to the dtype), q4 (kept quantized), q4_q8 "
                        "(q4 with 8-bit inputs, as llama.cpp)")
    p.add_argument("--ring-cache", action="store_true",
                   help="jaxchunk: sliding-window layers keep a ring of window - 1 + chunk positions "
                        "(init_cache(ring_chunk_len=chunk); llama.cpp's iSWA cache) instead of the whole prompt")
    p.add_argument("--repeats", type=int)
    p.add_argument("--decode-tokens", type=int, default=32)
    p.add_argument("--decode-runs", type=int, default=5,
                   help="timed decode runs per prompt length (same tokens, same context): min / median / max")
    p.add_argument("--rounds", type=int, default=1,
                   help="run every system this many times, order alternating (see above); >= 1")
    p.add_argument("--roofline", action=argparse.BooleanOptionalAction, default=True,
                   help="measure this machine's limits first (experiments.roofline) and report each "
                        "figure as a fraction of its limit")
    p.add_argument("--hf-weights", choices=("dense", "packed"), default="dense",
                   help="transformers: dequantize the GGUF at load (dense) or keep it packed")
    p.add_argument("--threads", type=int, default=2, help="torch / llama.cpp threads (JAX uses all cores)")
    p.add_argument("--quick", action="store_true", help=f"preset: {QUICK} (explicit flags still win)")
    p.add_argument("--out", type=Path, default=Path("results/compare_peers"))
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one system, print JSON
    args = p.parse_args(argv)
    common.apply_preset(args, QUICK if args.quick else FULL)
    bad_weights = set(args.weights) - set(common.WEIGHTS)
    if bad_weights:
        p.error(f"unknown --weights {sorted(bad_weights)}; choose from {', '.join(common.WEIGHTS)}")
    if args.rounds < 1:
        p.error(f"--rounds must be >= 1, got {args.rounds}")
    unknown = set(args.systems) - set(SYSTEMS)
    if unknown:
        p.error(f"unknown systems {sorted(unknown)}; choose from {SYSTEMS}")
    if args.ring_cache and not args.worker and not any(common.model_config(args.model).layer_windows or ()):
        p.error(f"--ring-cache: {args.model} has no sliding-window layers (every layer keeps every position)")
    return args


def unavailable(system: str, model: str) -> str | None:
    """Why `system` cannot run here (printed, never skipped silently), or None."""
    if system != "jaxchunk" and model == common.TINY_MODEL:
        return f"{system} needs the GGUF file; --model {model} is jaxchunk only"
    module = {"transformers": "transformers", "llama.cpp": "llama_cpp"}.get(system)
    if module:
        import importlib.util
        if importlib.util.find_spec(module) is None:
            return f"the Python package {module!r} is not installed (pip install " \
                   f"{'llama-cpp-python' if module == 'llama_cpp' else 'torch transformers accelerate'})"
    return None


def worker_specs(args, ids_path: Path) -> list[dict]:
    base = dict(model=args.model, prompt_lens=sorted(args.prompt_lens), repeats=args.repeats,
                decode_tokens=args.decode_tokens, decode_runs=args.decode_runs, threads=args.threads,
                ids_path=str(ids_path),
                gguf=None if args.model == common.TINY_MODEL else str(common.model_path(args.model)))
    specs = []
    for system in args.systems:
        reason = unavailable(system, args.model)
        if reason:
            print(f"compare_peers: skipping {system}: {reason}", file=sys.stderr)
        elif system == "jaxchunk":
            specs += [dict(base, system=system, dtype=d, chunk_size=c, attention_impl=args.attention_impl,
                           weights=w, cache_dtype=cd if cd != d else None, ring_cache=args.ring_cache)
                      for w in args.weights for d in args.dtypes for cd in args.cache_dtypes for c in args.chunk_sizes]
        elif system == "transformers":
            specs += [dict(base, system=system, dtype=d, hf_weights=args.hf_weights) for d in args.dtypes]
        else:
            specs.append(dict(base, system=system, dtype=common.file_type(args.model)))  # the GGUF's own
    return specs


def run_worker(spec: dict) -> list[dict]:
    """Run one system in a fresh interpreter; its stderr passes through, its result comes back as
    one marked JSON line on stdout. A failing peer is reported and left out, not fatal."""
    # From this process's directory (relative paths keep their meaning), with the repository root
    # on the module path: `-m experiments.compare_peers` must find this checkout from anywhere.
    path = os.pathsep.join(filter(None, [str(common.ROOT), os.environ.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-m", WORKER_MODULE, "--worker", json.dumps(spec)],
                          stdout=subprocess.PIPE, text=True,
                          env=dict(os.environ, TQDM_DISABLE="1", PYTHONPATH=path))
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_MARK)]
    if proc.returncode or not lines:
        print(f"compare_peers: {spec['system']} {spec['dtype']} failed (exit {proc.returncode}); "
              f"see its error output above", file=sys.stderr)
        return []
    result = json.loads(lines[-1][len(RESULT_MARK):])
    weights = f"{spec['weights']} " if spec.get("weights") in ("q4", "q4_q8") else ""
    cache = f" {spec['cache_dtype']} cache" if spec.get("cache_dtype") else ""
    ring = " ring" if spec.get("ring_cache") else ""
    label = {"jaxchunk": f"jaxchunk {weights}{spec['dtype']}{cache}{ring} chunk {spec.get('chunk_size')}",
             "transformers": f"transformers {spec['dtype']}", "llama.cpp": f"llama.cpp {spec['dtype']}"}[spec["system"]]
    return [dict(system=spec["system"], label=label, dtype=spec["dtype"], chunk_size=spec.get("chunk_size"),
                 cache_dtype=spec.get("cache_dtype") or ("f16" if spec["system"] == "llama.cpp" else spec["dtype"]),
                 weights=spec.get("weights", "dequantized" if spec["system"] == "transformers" else spec["dtype"]),
                 **row, note=result["note"]) for row in result["rows"]]


def merge_rounds(rows: list[dict]) -> list[dict]:
    """One row per (label, prompt_len) from the rounds' rows (see --rounds): prefill the median of
    the rounds' medians (min / max over them), decode the median over every run of every round
    (decode_runs_tok_s) with min / max / spread over all of them, peak RSS the largest."""
    groups: dict = {}
    for row in rows:
        groups.setdefault((row["label"], row["prompt_len"]), []).append(row)
    merged = []
    for group in groups.values():
        decode = np.concatenate([row["decode_runs_tok_s"] for row in group])
        prefill_s = float(np.median([row["prefill_s"] for row in group]))
        merged.append(dict(
            group[0], rounds=len(group), prefill_s=prefill_s, prefill_tok_s=group[0]["prompt_len"] / prefill_s,
            prefill_min_s=min(row["prefill_min_s"] for row in group),
            prefill_max_s=max(row["prefill_max_s"] for row in group),
            first_call_s=float(np.median([row["first_call_s"] for row in group])),
            decode_tok_s=float(np.median(decode)), decode_min_tok_s=float(decode.min()),
            decode_max_tok_s=float(decode.max()), decode_spread=float(decode.max() / decode.min()),
            decode_runs=len(decode), decode_runs_tok_s=decode.tolist(),
            decode_cpu_ms_per_tok=float(np.median([row["decode_cpu_ms_per_tok"] for row in group])),
            rss_peak_mb=max(row["rss_peak_mb"] for row in group)))
        merged[-1].pop("round", None)
    return merged


def add_ratios(df):
    """prefill tok/s divided by transformers' at the same prompt length (NaN where not measured)."""
    for dtype in ("f32", "bf16"):
        hf = df[(df.system == "transformers") & (df.dtype == dtype)].set_index("prompt_len")["prefill_tok_s"]
        df[f"vs_hf_{dtype}"] = df["prefill_tok_s"] / df["prompt_len"].map(hf)
    return df


def roofline_limits(args, tmp: Path):
    """This machine's prefill and decode limits for the model (experiments.roofline, in its own
    process, before the systems run): {("prefill", prompt_len, dtype) or ("decode", context,
    "W weights, C cache"): tok/s}, and its note (CPU, flags, rates)."""
    out = tmp / "roofline"
    lens = ",".join(map(str, sorted(args.prompt_lens)))
    path = os.pathsep.join(filter(None, [str(common.ROOT), os.environ.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-m", "experiments.roofline", "--model", args.model, "--prompt-lens", lens,
                           "--contexts", lens, "--chunk-size", str(max(args.chunk_sizes)), "--out", str(out)],
                          stdout=subprocess.DEVNULL, env=dict(os.environ, TQDM_DISABLE="1", PYTHONPATH=path))
    if proc.returncode:
        print("compare_peers: the roofline run failed; no fractions of the limit", file=sys.stderr)
        return {}, {}
    import pandas as pd
    df = pd.read_csv(out / "results.csv")
    limits = {("prefill" if r.kind == "prefill_limit" else "decode", int(r.prompt_len), r.dtype): r.tok_s
              for r in df[df.kind.isin(["prefill_limit", "decode_limit"])].itertuples()}
    machine = json.loads((out / "results.json").read_text())["machine"]
    return limits, dict(roofline=machine.get("roofline"), cpu_flags=machine.get("cpu_flags"))


def add_fractions(df, limits):
    """Each row's prefill and decode tok/s as a fraction of this machine's limit for its precision
    (prefill: f32 / bf16 rows; decode: weights and cache format as read per token). llama.cpp's
    Q4 weights are counted as the q4 format and its f16 cache as 2 bytes a value (bf16's size)."""
    def decode_key(row):
        weights = "q4" if row.system == "llama.cpp" or row.weights in ("q4", "q4_q8") else row.dtype
        cache = "bf16" if row.cache_dtype == "f16" else row.cache_dtype  # f16: llama.cpp's, bf16's size
        return f"{weights} weights, {cache} cache"
    df["prefill_of_limit"] = [r.prefill_tok_s / limits[("prefill", r.prompt_len, r.dtype)]
                              if ("prefill", r.prompt_len, r.dtype) in limits else np.nan for r in df.itertuples()]
    df["decode_of_limit"] = [r.decode_tok_s / limits[("decode", r.prompt_len, decode_key(r))]
                             if ("decode", r.prompt_len, decode_key(r)) in limits else np.nan
                             for r in df.itertuples()]
    return df


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        return worker_main(args.worker)
    started = time.perf_counter()
    machine = common.machine_info()
    ids = common.prompt_ids(args.model, max(args.prompt_lens))
    rows = []
    with tempfile.TemporaryDirectory(prefix="compare-peers-") as tmp:
        ids_path = Path(tmp) / "ids.npy"
        np.save(ids_path, ids)
        limits, roofline_note = roofline_limits(args, Path(tmp)) if args.roofline else ({}, {})
        specs = worker_specs(args, ids_path)
        runs = [(r, spec) for r in range(args.rounds) for spec in (specs if r % 2 == 0 else specs[::-1])]
        for r, spec in (bar := common.progress(runs, "compare peers")):
            bar.set_postfix_str(f"{spec['system']} {spec['dtype']} {spec.get('chunk_size') or ''}")
            rows += [dict(row, round=r) for row in run_worker(spec)]
    if not rows:
        sys.exit("compare_peers: no system produced results")
    round_rows = rows
    if args.rounds > 1:
        rows = merge_rounds(rows)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "worker"}
    settings.update(wall_s=round(time.perf_counter() - started, 1), prefill_warmup=(
        "jaxchunk: one full prefill of the same length (compiles, or loads the persistent compilation cache's "
        "executable); peers: one 64-token call at start-up"))
    import pandas as pd
    df = add_fractions(add_ratios(pd.DataFrame(rows)), limits)
    machine.update(roofline_note)
    json_only = ("decode_runs_tok_s",)  # the list of every decode run: results.json only
    df = common.write_results(args.out, df.to_dict("records"), settings, machine, json_only=json_only)
    if args.rounds > 1:
        common.write_results(args.out, round_rows, settings, machine, name="rounds", json_only=json_only)
    kw = dict(x="prompt_len", line="label", xlabel="prompt length (tokens, log2)", logy=True)
    pngs = [common.line_plot(df, args.out / "prefill.png", y="prefill_tok_s",
                             ylabel="prefill throughput (tokens/s, log)",
                             title=f"Prefill throughput, {machine['usable_cores']} cores", **kw),
            common.line_plot(df, args.out / "decode.png", y="decode_tok_s", ylabel="decode throughput (tokens/s, log)",
                             title=f"Greedy decode after the prompt ({args.decode_tokens} tokens): median of "
                                   f"{args.decode_runs * args.rounds} runs"
                                   f"{f' ({args.rounds} processes)' if args.rounds > 1 else ''}, shaded min-max",
                             band=("decode_min_tok_s", "decode_max_tok_s"), **kw),
            common.line_plot(df, args.out / "memory.png", y="rss_peak_mb", ylabel="peak RSS of the process (MB, log)",
                             title="Peak memory per system (own subprocess)", **kw)]
    common.print_table(df, ["label", "prompt_len", "prefill_tok_s", "vs_hf_f32", "vs_hf_bf16", "prefill_of_limit",
                            "decode_tok_s", "decode_min_tok_s", "decode_max_tok_s", "decode_spread",
                            "decode_of_limit", "decode_cpu_ms_per_tok", "rss_peak_mb", "first_call_s"],
                       title=f"\nload average at start {machine['load_average_1_5_15']}")
    bandwidth = (roofline_note.get("roofline") or {}).get("bandwidth_range_bytes")
    if bandwidth:  # what steadiness a bandwidth-bound decode can have on this host
        print(f"memory bandwidth, the roofline's samples: {bandwidth[0] / 1e9:.1f} - {bandwidth[1] / 1e9:.1f} GB/s "
              f"(max / min {bandwidth[1] / bandwidth[0]:.2f})")
    decode_dots = (roofline_note.get("roofline") or {}).get("decode_dot_bytes") or {}
    for name, (median, slowest, fastest) in decode_dots.items():  # what dense-weight decode can read
        print(f"dense {name} decode dots (1 row, a layer's matrices): {median / 1e9:.1f} GB/s of weights "
              f"[{slowest / 1e9:.1f} - {fastest / 1e9:.1f}]")
    print("\nprefill tok/s:")
    print(df.pivot_table(index="label", columns="prompt_len", values="prefill_tok_s").round(1).to_string())
    for label, note in dict(zip(df.label, df.note)).items():
        print(f"  {label}: {note}")
    common.print_written(args.out, pngs, settings['wall_s'])
    return df


if __name__ == "__main__":
    main()
