"""KV cache formats: what each costs in accuracy and buys in memory (exllamav2's cache study).

For every cache format (jaxchunk.cache.CACHE_DTYPES: f32, bf16, fp8_e4m3, fp8_e5m2, q8, q6, q4 and
the q*_norot variants without the Hadamard rotation; and keys and values in separate formats,
`MIXED_DTYPES`: k8v4 = q8 keys with q4 values, k8v6, k6v4, bf16/q4 = bf16 keys with q4 values) and
chunk size, the same real text (BOS + the
start of jaxchunk.corpus.reference_text) is prefilled chunk by chunk into a cache of that format,
with the model's weights in float32. Per run:

- accuracy, against the float32 cache at the same chunk size (all-position logits): the text's
  perplexity, its change in % (`ppl_delta_pct`), top-1 agreement of the next-token argmax, and the
  max |logit difference|;
- memory: bytes one token takes in the cache (K and V of every layer, scales included), and the
  ratio to float32;
- speed: prefill tokens/s (median of `--repeats` warm prefills, last-token logits only) and decode
  tokens/s (`--decode-tokens` greedy steps of jaxchunk.prefill.decode_step after prefilling the text,
  one host round trip per token as when streaming; measured once per format, chunk size does not
  enter it).

Ablation (ablation.csv, with --ablation, on by default): which of K and V a format's error comes
from. jaxchunk.model.forward (full attention, no cache) with K and V quantized separately
(quantize -> dequantize, the same functions the cache uses): e.g. q4 keys with exact values, and
q8 keys with q4 values. Perplexity change vs the same forward with exact K/V.

  .venv/bin/python -m experiments.cache_quant --quick      # 2048 tokens, chunks 128 and 512
  .venv/bin/python -m experiments.cache_quant              # every format, 4096 tokens (long)

Writes results.csv, results.json (machine, versions, settings, rows), accuracy.png (perplexity change
vs cache bytes per token) and speed.png into --out, and prints the table.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from pathlib import Path

import numpy as np

from experiments import common
from jaxchunk.cache import CACHE_DTYPES, init_cache, resolve_cache_formats
from jaxchunk.errors import InputError
from jaxchunk.prefill import decode_step, prefill

BASELINE = "f32"
# Keys and values apart (llama.cpp's --cache-type-k / -v): keys carry most of a format's loss (see
# the ablation), so spend the bits there.
MIXED_DTYPES = ["k8v4", "k8v6", "k6v4", "bf16/q4"]
FULL = dict(cache_dtypes=list(CACHE_DTYPES) + MIXED_DTYPES, chunk_sizes=[128, 512, 2048], prompt_len=4096,
            decode_tokens=64, repeats=3)
QUICK = dict(cache_dtypes=["f32", "bf16", "fp8_e4m3", "fp8_e5m2", "q8", "q6", "q4", "q4_norot", *MIXED_DTYPES],
             chunk_sizes=[128, 512], prompt_len=2048, decode_tokens=16, repeats=1)
TABLE_COLUMNS = ["cache_dtype", "chunk_size", "bytes_per_token", "bytes_vs_f32", "perplexity",
                 "ppl_delta_pct", "top1_agreement", "max_abs_logit_diff", "prefill_tok_per_s",
                 "decode_tok_per_s"]
# The targets for SmolLM2 (perplexity change vs the float32 cache).
TARGETS = {"q8": 0.5, "q4": 3.0, "k8v4": 3.0}


@dataclasses.dataclass(frozen=True)
class Run:
    cache_dtype: str
    chunk_size: int


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=common.DEFAULT_MODEL, choices=common.MODELS,
                   help="tiny-random: a 2-layer random Llama with head_dim 16 (float formats only; smoke runs)")
    p.add_argument("--cache-dtypes", type=lambda s: common.parse_list(s, str),
                   help=f"comma-separated, from {list(CACHE_DTYPES)}, k<bits>v<bits> (e.g. k8v4) or KEY/VALUE "
                        f"(e.g. bf16/q4) ({BASELINE} is always run: the baseline)")
    p.add_argument("--chunk-sizes", type=common.parse_list, help="comma-separated ints")
    p.add_argument("--prompt-len", type=int, help="tokens of real text")
    p.add_argument("--decode-tokens", type=int, help="greedy decode steps timed after the prefill (0: skip)")
    p.add_argument("--repeats", type=int, help="timed calls per measurement after the warm-up call")
    p.add_argument("--attention-impl", default="xla", help="auto, xla, pallas, reference")
    p.add_argument("--ablation", action=argparse.BooleanOptionalAction, default=True,
                   help="K-vs-V ablation with the full forward (needs head_dim divisible by 32)")
    p.add_argument("--quick", action="store_true",
                   help=f"preset for ~15 minutes on 2 cores: {QUICK} (explicit flags still win)")
    p.add_argument("--out", type=Path, default=Path("results/cache_quant"))
    args = p.parse_args(argv)
    common.apply_preset(args, QUICK if args.quick else FULL)
    for name in args.cache_dtypes:
        try:
            resolve_cache_formats(name)
        except InputError as e:
            p.error(str(e))
    args.cache_dtypes = [BASELINE] + [d for d in dict.fromkeys(args.cache_dtypes) if d != BASELINE]
    return args


# ----------------------------------------------------------------------------- measurements
def baseline_logits(model, ids, chunk_size: int, attention_impl: str) -> np.ndarray:
    """[n, vocab] float32 logits of chunked prefill into the float32 cache: the reference."""
    cache = init_cache(model.config, 1, len(ids), BASELINE)
    _, (logits,) = prefill(model.params, model.config, cache, [ids], chunk_size=chunk_size,
                           max_input_len=chunk_size, attention_impl=attention_impl, all_logits=True)
    return logits


def prefill_speed(model, ids, run: Run, repeats: int, attention_impl: str) -> common.Timing:
    def fresh_cache():
        return (init_cache(model.config, 1, len(ids), run.cache_dtype),)

    def run_prefill(cache):
        return prefill(model.params, model.config, cache, [ids], chunk_size=run.chunk_size,
                       max_input_len=run.chunk_size, attention_impl=attention_impl)[1]

    return common.timeit(run_prefill, repeats, setup=fresh_cache)


def decode_speed(model, ids, cache_dtype: str, steps: int, repeats: int, attention_impl: str,
                 chunk_size: int) -> common.Timing:
    """`steps` greedy decode steps after prefilling `ids` (the prefill is untimed setup)."""
    def prefilled():
        cache = init_cache(model.config, 1, len(ids) + steps, cache_dtype)
        return prefill(model.params, model.config, cache, [ids], chunk_size=chunk_size,
                       max_input_len=chunk_size, attention_impl=attention_impl)

    def run_decode(cache, logits):
        lengths = np.array([len(ids)])
        for _ in range(steps):
            token = np.asarray(logits).argmax(-1)
            cache, logits = decode_step(model.params, cache, token, config=model.config,
                                        attention_impl=attention_impl, lengths=lengths)
            lengths = lengths + 1
        return logits

    return common.timeit(run_decode, repeats, setup=prefilled)


def measure(model, ids, run: Run, args, reference: np.ndarray, decode: common.Timing | None) -> dict:
    n = len(ids)
    cache = init_cache(model.config, 1, n, run.cache_dtype)
    f32_bytes = init_cache(model.config, 1, 1, BASELINE).bytes_per_token
    timing = prefill_speed(model, ids, run, args.repeats, args.attention_impl)
    errors = common.chunked_eval(model, ids, run.chunk_size, args.attention_impl, reference,
                                 cache_dtype=run.cache_dtype)
    ppl, ppl_ref = errors["perplexity"], errors["perplexity_reference"]
    return {
        "model": model.name, **dataclasses.asdict(run), "key_format": cache.key_quant.name,
        "value_format": cache.value_quant.name, "prompt_len": n,
        "bytes_per_token": cache.bytes_per_token, "bytes_vs_f32": cache.bytes_per_token / f32_bytes,
        "cache_mb": cache.nbytes / common.MB,
        **errors, "ppl_delta_pct": 100.0 * (ppl / ppl_ref - 1.0),
        "prefill_tok_per_s": n / timing.median_s, "prefill_s": timing.median_s,
        "prefill_min_s": timing.min_s, "prefill_max_s": timing.max_s,
        "prefill_first_call_s": timing.first_s,
        "decode_tok_per_s": args.decode_tokens / decode.median_s if decode else math.nan,
        "decode_ms_per_token": 1e3 * decode.median_s / args.decode_tokens if decode else math.nan,
    }


# ----------------------------------------------------------------------------- K vs V ablation
ABLATION = [(None, None), ("q4", None), (None, "q4"), ("q4", "q4"), ("q8", "q4"), ("q4", "q8"),
            ("q6", "q4"), ("q8", "q8")]


def ablation(model, ids) -> list[dict]:
    """Perplexity of the full forward with keys / values quantized separately (None: exact)."""
    import jax

    from jaxchunk.model import forward
    from pallas_kernels.kv_quant import KV_QUANTS

    run_forward = jax.jit(forward, static_argnums=(1, 3, 4))
    config, rows, base = model.config, [], None
    for keys, values in ABLATION:
        logits = np.asarray(run_forward(model.params, config, np.asarray(ids)[None], False, (keys, values))[0])
        ppl = math.exp(common.token_nll(logits[:-1], ids[1:]).mean())
        base = ppl if base is None else base
        per_head = sum((KV_QUANTS[f or "f32"]).bytes_per_vector(config.head_dim) for f in (keys, values))
        rows.append({"model": model.name, "keys": keys or "f32 (exact)", "values": values or "f32 (exact)",
                     "prompt_len": len(ids), "perplexity": ppl, "ppl_delta_pct": 100.0 * (ppl / base - 1.0),
                     "bytes_per_token": config.num_layers * config.num_kv_heads * per_head})
        del logits
    return rows


# ----------------------------------------------------------------------------- plots
def plot(df, out: Path) -> list[Path]:
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    markers = ["o", "s", "^", "D"]
    for i, ((chunk, group), marker) in enumerate(zip(df.groupby("chunk_size"), markers)):
        # Hollow, growing markers: the chunk sizes mostly coincide (chunking adds ~no error).
        ax.scatter(group["bytes_per_token"], group["ppl_delta_pct"], marker=marker, s=40 + 40 * i,
                   facecolors="none" if i else f"C{i}", edgecolors=f"C{i}", label=f"chunk size {chunk}")
        if chunk == df["chunk_size"].min():
            # Formats of equal size (q6 and k8v4) share an x: stack their labels, not overprint them.
            nth_at_x: dict = {}
            for _, row in group.sort_values("ppl_delta_pct").iterrows():
                k = nth_at_x[row["bytes_per_token"]] = nth_at_x.get(row["bytes_per_token"], -1) + 1
                ax.annotate(row["cache_dtype"], (row["bytes_per_token"], row["ppl_delta_pct"]),
                            textcoords="offset points", xytext=(5, 4 + 10 * k), fontsize=8)
    common.log2_axis(ax, df["bytes_per_token"], "x")
    ax.tick_params(axis="x", labelrotation=45)  # neighbouring formats (fp8, q8) sit close
    ax.set_xlabel("KV cache bytes per token (all layers, K + V, scales included; log2)")
    ax.set_ylabel("perplexity change vs float32 cache (%)")
    ax.axhline(0.0, color="gray", lw=0.8)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{df['model'].iloc[0]}: accuracy vs cache size ({df['prompt_len'].iloc[0]} tokens of text)",
                 fontsize=10)
    paths = [common.save_figure(fig, out / "accuracy.png")]

    paths.append(common.line_plot(
        df, out / "speed.png", x="chunk_size", y="prefill_tok_per_s", line="cache_dtype",
        title="Prefill throughput by cache format", xlabel="chunk size (tokens, log2)",
        ylabel="prefill throughput (tokens/s)"))
    return paths


def summary(df) -> str:
    """The issue's targets, checked on the measured rows."""
    lines = []
    for name, target in TARGETS.items():
        rows = df[df["cache_dtype"] == name]
        if rows.empty:
            continue
        worst = rows["ppl_delta_pct"].abs().max()
        verdict = "met" if worst <= target else "NOT met"
        lines.append(f"{name}: |perplexity change| <= {worst:.3f}% over chunk sizes "
                     f"{sorted(rows['chunk_size'])} (target {target}%: {verdict})")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    started = time.perf_counter()
    machine = common.machine_info()
    model = common.load_model(args.model, "f32")
    ids = common.prompt_ids(args.model, args.prompt_len)
    runs = [Run(d, c) for c in sorted(args.chunk_sizes) for d in args.cache_dtypes]
    print(f"cache_quant: {len(runs)} runs of {args.model}, {len(ids)} tokens -> {args.out}", file=sys.stderr)
    decode_timings: dict[str, common.Timing | None] = {}
    rows, reference, reference_chunk = [], None, None
    for run in (bar := common.progress(runs, "cache formats")):
        bar.set_postfix_str(f"{run.cache_dtype} chunk={run.chunk_size}")
        if reference_chunk != run.chunk_size:
            reference = None  # free the previous [n, vocab] first
            reference = baseline_logits(model, ids, run.chunk_size, args.attention_impl)
            reference_chunk = run.chunk_size
        if run.cache_dtype not in decode_timings:
            decode_timings[run.cache_dtype] = (decode_speed(
                model, ids, run.cache_dtype, args.decode_tokens, args.repeats, args.attention_impl,
                max(args.chunk_sizes)) if args.decode_tokens > 0 else None)
        rows.append(measure(model, ids, run, args, reference, decode_timings[run.cache_dtype]))
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    settings.update(out=str(args.out), model_source=model.source, weights="float32",
                    text="BOS + jaxchunk.corpus.reference_text", baseline=f"{BASELINE} cache, same chunk size",
                    timing="median of repeats after one warm-up call",
                    decode="greedy decode_step loop after prefilling the text, once per format",
                    wall_s=round(time.perf_counter() - started, 1))
    df = common.write_results(args.out, rows, settings, machine)
    pngs = plot(df, args.out)
    common.print_table(df, TABLE_COLUMNS, title=f"\n{args.model}, {len(ids)} tokens, attention "
                                                  f"{args.attention_impl}, load average "
                                                  f"{machine['load_average_1_5_15']}")
    if args.ablation and model.config.head_dim % 32 == 0:
        ablation_df = common.write_results(args.out, ablation(model, ids), settings, machine, name="ablation")
        common.print_table(ablation_df, ["keys", "values", "bytes_per_token", "perplexity", "ppl_delta_pct"],
                           title="\nK vs V ablation (full forward, no cache; change vs exact K/V)")
    text = summary(df)
    if text:
        print("\n" + text)
    common.print_written(args.out, pngs, settings['wall_s'])
    return df


if __name__ == "__main__":
    main()
