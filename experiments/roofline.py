"""This machine's limits for a model, measured: what prefill and decode tok/s the hardware allows.

Measures, at the model's own shapes (so the limits are the ones its steps can reach):
- dot throughput (FLOP/s) of x[chunk, k] @ W[k, n] for each of a layer's matrices, f32 and bf16,
  run like the model (a lax.scan over `--layers` stacked copies, so the working set is model-sized);
  the layer's total FLOPs over its total time is the "matmul" figure;
- attention-shaped dots (per KV head: [G * chunk, head_dim] @ [head_dim, keys], then @ [keys, head_dim]);
- the q4 weights' matmuls (`weights="q4"`): the native kernel at 1 row (decode; reported as bytes
  of quantized weights read per second) and the XLA path at chunk rows;
- memory read bandwidth (a sum over a --bandwidth-mb array, f32: one FMA per 4 bytes, far below the
  dot rate, so it is bandwidth-bound);
- the dense decode dots: each layer matrix at 1 row, f32 and bf16 (held as `BF16Weight`, as
  `jaxchunk.load` does), through `jaxchunk.model.linear`, by both engines: XLA's dot of the scan's
  slice ("xla") and the native dense gemv reading the stack in place ("native", what a CPU decode
  step with dense weights runs: jaxchunk/weights/dense.py), over enough stacked copies that the weights
  come from memory (>= DECODE_STACK_MB a matrix), as bytes of weights read per second, median and
  min / max of its samples: next to the bandwidth, how much of it dense-weight decode gets, and how
  steadily.

and derives the ideal figures the benchmarks are reported against:
- prefill limit(L) = dot FLOP/s / FLOPs per token, with FLOPs per token = 2 * (matmul weights, the LM
  head excluded: prefill needs logits of the last token only) + 4 * layers * heads * head_dim * (L + 1) / 2
  (QK^T and PV of a causal prompt of L tokens, averaged over its positions). The matmul part uses its
  measured rate, the attention part the better of its own dots' rate and the matmuls' (a fused
  attention kernel can beat XLA's attention-shaped einsum, so that einsum is no limit).
- decode limit(context) = bandwidth / bytes read per token (every weight once, LM head included, plus
  the cached K/V of `context` tokens in the cache format).

    .venv/bin/python -m experiments.roofline --quick
    .venv/bin/python -m experiments.roofline --prompt-lens 512,2048,8192 --chunk-size 512

`measure(config, ...)` returns a `Roofline` other scripts use to print fractions of the limit next to
their figures (`experiments.compare_peers`). Writes results.csv (one row per measured dot and per
limit), results.json (machine, CPU flags, the Roofline), roofline.png.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import time
from pathlib import Path

import numpy as np

from experiments import common

# CPU flags that decide which instructions the dot and the native kernels can use.
FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
         "avx512_fp16", "amx_bf16", "amx_int8", "avx_vnni")
DTYPES = ("f32", "bf16")


def cpu_flags() -> list[str]:
    """The FLAGS this CPU reports (/proc/cpuinfo; empty where unreadable)."""
    from pallas_kernels.native_cpu import cpu_flags as all_flags
    present = all_flags()
    return [f for f in FLAGS if f in present]


def layer_matrices(config) -> list[tuple[str, int, int]]:
    """(name, k, n) of one decoder layer's matrices."""
    h, q, kv, ffn = config.hidden_size, config.num_heads * config.head_dim, \
        config.num_kv_heads * config.head_dim, config.intermediate_size
    return [("wq", h, q), ("wk", h, kv), ("wv", h, kv), ("wo", q, h), ("w_gate", h, ffn), ("w_up", h, ffn),
            ("w_down", ffn, h)]


def matmul_weights(config) -> int:
    """Weights of every layer's matrices (embedding and LM head excluded)."""
    return config.num_layers * sum(k * n for _, k, n in layer_matrices(config))


def attention_flops_per_token(config, prompt_len: int) -> float:
    """QK^T + PV FLOPs per token of a causal prompt of `prompt_len` tokens: position p sees p + 1 keys,
    min(p + 1, window) in a sliding-window layer (config.layer_windows: Gemma 3's local layers)."""
    keys = 0.0  # mean keys a position sees, summed over layers
    for window in config.layer_windows or (None,) * config.num_layers:
        if window is None or window >= prompt_len:
            keys += (prompt_len + 1) / 2
        else:
            keys += (window * (window + 1) / 2 + (prompt_len - window) * window) / prompt_len
    return 4.0 * config.num_heads * config.head_dim * keys


@dataclasses.dataclass(frozen=True)
class Roofline:
    """Measured rates (per second) and the limits they imply for one model config."""
    matmul_flops: dict          # dtype -> FLOP/s of the layer's matrices at chunk rows
    attention_flops: dict       # dtype -> FLOP/s of the attention-shaped dots
    bandwidth_bytes: float      # bytes/s read (median sample)
    chunk_size: int
    cpu: str
    flags: tuple
    bandwidth_range_bytes: tuple = ()  # (slowest, fastest) sample's bytes/s
    decode_dot_bytes: dict = dataclasses.field(default_factory=dict)  # "f32 xla" -> (median, slowest, fastest)
    # bytes/s of weights the dense 1-row dots read, per dtype and engine (measure_decode_dots)

    def prefill_tok_s(self, config, prompt_len: int, dtype: str = "f32") -> float:
        """Ideal prefill tokens/s of a `prompt_len` prompt in `dtype`: the matmuls at their measured
        rate, attention at the better of its own dots' rate and the matmuls' (XLA's attention-shaped
        einsum is no limit: the native flash kernel ran attention at 121-128 GFLOP/s where that einsum
        measured 82 and the layer matmuls 157, on the 2-core AVX2 EPYC of issue 20)."""
        attention_rate = max(self.attention_flops[dtype], self.matmul_flops[dtype])
        seconds = (2.0 * matmul_weights(config) / self.matmul_flops[dtype]
                   + attention_flops_per_token(config, prompt_len) / attention_rate)
        return 1.0 / seconds

    def decode_tok_s(self, weight_bytes: float, kv_bytes_per_token: float, context: int) -> float:
        """Ideal decode tokens/s: every weight byte and the context's K/V read once per token."""
        return self.bandwidth_bytes / (weight_bytes + kv_bytes_per_token * context)


def _time(fn, *args, repeats: int) -> float:
    """Median seconds of `repeats` warm calls."""
    return common.timeit(lambda: fn(*args), repeats).median_s


def measure_matmul(config, dtype: str, rows: int, layers: int, repeats: int) -> list[dict]:
    """Each layer matrix x[rows, k] @ W[k, n] in `dtype`, over `layers` stacked copies, through
    `jaxchunk.model.linear` (the model's own lowering: bf16 operands with f32 accumulation, or on a
    CPU without bf16 dot instructions the widened f32 dot; a plain bf16-output `x @ W` runs ~1.5x
    slower on AVX512_BF16 and would understate the bf16 limit)."""
    import jax
    import jax.numpy as jnp

    from jaxchunk.model import linear
    jdtype = jnp.float32 if dtype == "f32" else jnp.bfloat16
    rng = np.random.default_rng(0)

    @jax.jit
    def run(x, stacked):
        def step(acc, w):  # row sums keep every output live at rows * n adds
            return acc + jnp.sum(linear(x, w).astype(jnp.float32), axis=-1), None
        return jax.lax.scan(step, jnp.zeros((x.shape[0],), jnp.float32), stacked)[0]

    out = []
    for name, k, n in layer_matrices(config):
        stacked = jnp.asarray(rng.normal(0, 0.02, (layers, k, n)), jdtype)
        x = jnp.asarray(rng.normal(size=(rows, k)), jdtype)
        seconds = _time(run, x, stacked, repeats=repeats) / layers
        out.append(dict(kind="matmul", name=name, dtype=dtype, rows=rows, k=k, n=n, seconds=seconds,
                        flops=2.0 * rows * k * n, gflop_s=2.0 * rows * k * n / seconds / 1e9))
    return out


DECODE_STACK_MB = 64  # weights per matrix stack in measure_decode_dots: past any cache of these CPUs


DECODE_DOT_IMPLS = ("xla", "native")  # XLA's dot of the scan's slice; the native gemv reading the stack in place


def measure_decode_dots(config, dtype: str, repeats: int, impl: str = "xla") -> list[dict]:
    """Each layer matrix at 1 row in `dtype` (a decode step's dots with dense weights), through
    `jaxchunk.model.linear`, over as many stacked copies as make >= DECODE_STACK_MB of weights;
    gb_s (median), gb_s_min / gb_s_max (slowest / fastest of max(repeats, BANDWIDTH_SAMPLES) samples)
    count the weight bytes read. impl: "xla" (each layer sliced by the scan: XLA's dot) or "native"
    (the stack passed whole as `DenseLayer`, as `scan_layers` does for decode on CPU: the native
    dense gemv reads the layer in place)."""
    import jax
    import jax.numpy as jnp

    from jaxchunk.model import linear
    from jaxchunk.weights.bf16 import BF16Weight
    from jaxchunk.weights.dense import DenseLayer
    jdtype = jnp.float32 if dtype == "f32" else jnp.bfloat16
    itemsize = jnp.dtype(jdtype).itemsize
    rng = np.random.default_rng(3)

    def as_weight(w):
        return BF16Weight(w) if w.dtype == jnp.uint16 else w

    @jax.jit
    def run(x, stacked):
        if impl == "native":
            def step(acc, index):
                return acc + jnp.sum(linear(x, DenseLayer(as_weight(stacked), index)).astype(jnp.float32), -1), None
            return jax.lax.scan(step, jnp.zeros((1,), jnp.float32), jnp.arange(stacked.shape[0]))[0]

        def step(acc, w):
            return acc + jnp.sum(linear(x, as_weight(w)).astype(jnp.float32), axis=-1), None
        return jax.lax.scan(step, jnp.zeros((1,), jnp.float32), stacked)[0]

    out = []
    for name, k, n in layer_matrices(config):
        layers = -(-DECODE_STACK_MB * 2 ** 20 // (k * n * itemsize))
        stacked = jnp.asarray(rng.normal(0, 0.02, (layers, k, n)).astype(np.float32), jdtype)
        if dtype == "bf16":  # held as bits, as jaxchunk.load does: plain bf16 in a scan converts every layer
            stacked = jax.lax.bitcast_convert_type(stacked, jnp.uint16)
        x = jnp.asarray(rng.normal(size=(1, k)), jdtype)
        timing = common.timeit(lambda: run(x, stacked), max(repeats, BANDWIDTH_SAMPLES))
        nbytes = stacked.nbytes
        out.append(dict(kind="decode_dot", name=name, dtype=dtype, impl=impl, rows=1, k=k, n=n,
                        seconds=timing.median_s / layers, gb_s=nbytes / timing.median_s / 1e9,
                        gb_s_min=nbytes / timing.max_s / 1e9, gb_s_max=nbytes / timing.min_s / 1e9))
    return out


def measure_quant_matmul(config, rows: int, layers: int, repeats: int) -> list[dict]:
    """The q4 (Q4_1 layout) matmuls of one layer, as `weights="q4"` runs them: the native CPU kernel
    at decode rows (<= 16), the XLA path otherwise (experiments.bench_quant_matmul's harness)."""
    import jax
    import jax.numpy as jnp

    from experiments.bench_quant_matmul import make_fn
    from jaxchunk.weights.quantized import quantize
    formulation = "native_cpu" if rows <= 16 else "dequant_dot"
    fn = make_fn(formulation, rows)
    rng = np.random.default_rng(2)
    out = []
    for name, k, n in layer_matrices(config):
        qw = quantize(rng.normal(0, 0.02, (k, n)).astype(np.float32), "Q4_1")
        stacked = jax.tree.map(lambda a: jnp.asarray(np.stack([np.roll(a, i, axis=-1) for i in range(layers)])), qw)
        x = jnp.asarray(rng.normal(size=(rows, k)).astype(np.float32))
        seconds = _time(fn, x, stacked, repeats=repeats) / layers
        out.append(dict(kind="q4_matmul", name=name, dtype=f"q4 ({formulation})", rows=rows, k=k, n=n,
                        seconds=seconds, flops=2.0 * rows * k * n, gflop_s=2.0 * rows * k * n / seconds / 1e9,
                        gb_s=qw.nbytes / seconds / 1e9))
    return out


def measure_attention(config, dtype: str, chunk: int, keys: int, repeats: int) -> dict:
    """One layer's attention dots for a chunk against `keys` keys: per KV head, its G query heads'
    rows at once (how the blockwise and flash kernels read K/V), f32 accumulation."""
    import jax
    import jax.numpy as jnp
    jdtype = jnp.float32 if dtype == "f32" else jnp.bfloat16
    g, kvh, d = config.q_per_kv, config.num_kv_heads, config.head_dim
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.normal(size=(kvh, g * chunk, d)), jdtype)
    k = jnp.asarray(rng.normal(size=(kvh, keys, d)), jdtype)
    v = jnp.asarray(rng.normal(size=(kvh, keys, d)), jdtype)

    @jax.jit
    def run(q, k, v):
        s = jnp.einsum("hqd,hkd->hqk", q, k, preferred_element_type=jnp.float32)
        return jnp.einsum("hqk,hkd->hqd", s.astype(jdtype), v, preferred_element_type=jnp.float32)

    seconds = _time(run, q, k, v, repeats=repeats)
    flops = 4.0 * kvh * g * chunk * keys * d
    return dict(kind="attention", name=f"chunk {chunk} x {keys} keys", dtype=dtype, rows=chunk, k=d, n=keys,
                seconds=seconds, flops=flops, gflop_s=flops / seconds / 1e9)


BANDWIDTH_SAMPLES = 20  # timed sums (at least --repeats): the host's own spread, below


def measure_bandwidth(megabytes: int, repeats: int) -> dict:
    """Read bandwidth: a jitted sum over a `megabytes` f32 array (larger than any cache), the
    median of max(repeats, BANDWIDTH_SAMPLES) sums, with the slowest and fastest sum's rate
    (gb_s_min / gb_s_max): on a shared host the memory bandwidth itself varies between samples
    (2-core EPYC VMs: 28-60 GB/s, sums a fifth of a second apart), a bound on how steady any
    bandwidth-bound decode can be there."""
    import jax
    import jax.numpy as jnp
    n = megabytes * 2 ** 20 // 4
    x = jnp.ones((n,), jnp.float32)
    timing = common.timeit(functools.partial(jax.jit(jnp.sum), x), max(repeats, BANDWIDTH_SAMPLES))
    return dict(kind="bandwidth", name=f"sum over {megabytes} MiB", dtype="f32", seconds=timing.median_s,
                gb_s=n * 4 / timing.median_s / 1e9, gb_s_min=n * 4 / timing.max_s / 1e9,
                gb_s_max=n * 4 / timing.min_s / 1e9)


def measure(config, *, chunk_size: int = 512, keys: int = 2048, layers: int = 8, repeats: int = 5,
            bandwidth_mb: int = 1024, dtypes=DTYPES) -> tuple[Roofline, list[dict]]:
    """Measure this machine for `config`; returns the Roofline and the measured rows."""
    rows, matmul, attention = [], {}, {}
    for dtype in dtypes:
        mm = measure_matmul(config, dtype, chunk_size, layers, repeats)
        rows += mm
        matmul[dtype] = sum(r["flops"] for r in mm) / sum(r["seconds"] for r in mm)
        att = measure_attention(config, dtype, chunk_size, keys, repeats)
        rows.append(att)
        attention[dtype] = att["flops"] / att["seconds"]
    if "bf16" in matmul and "f32" in matmul:
        # bf16 operands can always be widened and multiplied in f32 (what a CPU without bf16 dot
        # instructions does): the bf16 limit is the better of the two.
        matmul["bf16"] = max(matmul["bf16"], matmul["f32"])
        attention["bf16"] = max(attention["bf16"], attention["f32"])
    for q_rows in (1, chunk_size):
        rows += measure_quant_matmul(config, q_rows, layers, repeats)
    decode_dot_bytes = {}
    from jaxchunk.model import native_gemv_rows
    impls = DECODE_DOT_IMPLS if native_gemv_rows(1) else ("xla",)
    for dtype, impl in itertools.product(dtypes, impls):
        dots = measure_decode_dots(config, dtype, repeats, impl)
        rows += dots
        # the layer's bytes over its time; the range from each matrix's slowest / fastest sample
        per_layer = sum(r["k"] * r["n"] for r in dots)  # elements: the itemsize cancels below
        seconds = sum(r["k"] * r["n"] / (r["gb_s"] * 1e9) for r in dots)
        slowest = sum(r["k"] * r["n"] / (r["gb_s_min"] * 1e9) for r in dots)
        fastest = sum(r["k"] * r["n"] / (r["gb_s_max"] * 1e9) for r in dots)
        decode_dot_bytes[f"{dtype} {impl}"] = (per_layer / seconds, per_layer / slowest, per_layer / fastest)
    bw = measure_bandwidth(bandwidth_mb, repeats)
    rows.append(bw)
    info = common.machine_info()
    roofline = Roofline(matmul_flops=matmul, attention_flops=attention, bandwidth_bytes=bw["gb_s"] * 1e9,
                        bandwidth_range_bytes=(bw["gb_s_min"] * 1e9, bw["gb_s_max"] * 1e9),
                        decode_dot_bytes=decode_dot_bytes,
                        chunk_size=chunk_size, cpu=info["cpu"], flags=tuple(cpu_flags()))
    return roofline, rows


def kv_bytes_per_token(config, cache_dtype: str = "f32") -> float:
    """Bytes of cached K and V per token (all layers) in a cache format, scales included."""
    from jaxchunk.cache import resolve_cache_formats
    per = config.num_layers * config.num_kv_heads * config.head_dim
    total = 0.0
    for quant in resolve_cache_formats(cache_dtype):
        total += per * quant.bits / 8 + (per / quant.block * 2 if quant.packed else 0)  # f16 scales
    return total


# Bytes per weight of the resident formats: q4 is 4-bit codes with an f16 scale and min per 32
# (5 bits a weight), its embedding / head q8 (8 bits and an f16 scale per 32), as SmolLM2's Q4_1 file.
WEIGHT_BYTES = {"f32": (4.0, 4.0), "bf16": (2.0, 2.0), "q4": (5 / 8, 8.5 / 8)}   # (matrices, embedding)


def weight_bytes(config, weights: str) -> float:
    """Bytes of weights a decode step reads: every layer matrix and the LM head (tied or not, one
    [vocab, hidden] matrix)."""
    matrices, head = WEIGHT_BYTES[weights]
    return matmul_weights(config) * matrices + config.vocab_size * config.hidden_size * head


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=common.DEFAULT_MODEL)
    p.add_argument("--prompt-lens", type=common.parse_list, default=None)
    p.add_argument("--contexts", type=common.parse_list, default=None, help="decode context lengths")
    p.add_argument("--chunk-size", type=int, default=512)
    p.add_argument("--layers", type=int, default=None, help="stacked copies per matrix")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--bandwidth-mb", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="few repeats, small arrays (a smoke run)")
    p.add_argument("--out", type=Path, default=Path("results/roofline"))
    args = p.parse_args(argv)
    common.apply_preset(args, dict(prompt_lens=[512, 2048], contexts=[512], layers=2, repeats=2,
                                   bandwidth_mb=256) if args.quick else
                        dict(prompt_lens=[512, 2048, 8192], contexts=[512, 2048, 8192], layers=8, repeats=5,
                             bandwidth_mb=1024))
    t0 = time.perf_counter()
    if args.model == common.TINY_MODEL:
        config = common.tiny_config()
    else:
        from jaxchunk.weights import inspect
        config = inspect(common.model_path(args.model)).config
    roofline, rows = measure(config, chunk_size=args.chunk_size, layers=args.layers, repeats=args.repeats,
                             bandwidth_mb=args.bandwidth_mb)
    for dtype in DTYPES:
        for length in args.prompt_lens:
            rows.append(dict(kind="prefill_limit", name=f"prompt {length}", dtype=dtype, prompt_len=length,
                             tok_s=roofline.prefill_tok_s(config, length, dtype),
                             attention_share=attention_flops_per_token(config, length)
                             / (2 * matmul_weights(config) + attention_flops_per_token(config, length))))
    for weights, cache in [(w, c) for w in WEIGHT_BYTES for c in ("f32", "bf16")]:
        for context in args.contexts:
            rows.append(dict(kind="decode_limit", name=f"context {context}", dtype=f"{weights} weights, {cache} cache",
                             prompt_len=context, tok_s=roofline.decode_tok_s(
                                 weight_bytes(config, weights), kv_bytes_per_token(config, cache), context)))
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    machine = dict(common.machine_info(), cpu_flags=cpu_flags(), roofline=dataclasses.asdict(roofline))
    df = common.write_results(args.out, rows, settings, machine)
    plt = common.pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    rates = df[df.kind.isin(["matmul", "attention", "q4_matmul"]) & (df.rows == args.chunk_size)]
    table = rates.pivot_table(index="name", columns="dtype", values="gflop_s", sort=False)
    table.plot.bar(ax=axes[0], rot=30)
    axes[0].set_ylabel("GFLOP/s (higher is better)")
    axes[0].set_title(f"dot throughput at {args.model} shapes, {args.chunk_size} rows", fontsize=10)
    axes[0].set_xlabel("layer matrix, or one layer's attention dots")
    axes[0].legend(title="operands", fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    axes[0].grid(True, axis="y", alpha=0.3)
    limits = df[df.kind == "prefill_limit"]
    for dtype, group in limits.groupby("dtype"):
        axes[1].plot(group.prompt_len, group.tok_s, marker="o", label=f"prefill limit, {dtype}")
    common.log2_axis(axes[1], limits.prompt_len, "x")
    axes[1].set_xlabel("prompt length (tokens)")
    axes[1].set_ylabel("tokens/s")
    axes[1].set_ylim(bottom=0)
    axes[1].set_title(f"ideal prefill tok/s (bandwidth {roofline.bandwidth_bytes / 1e9:.1f} GB/s)", fontsize=10)
    axes[1].grid(True, alpha=0.3)
    axes[1].legend(fontsize=8)
    png = common.save_figure(fig, args.out / "roofline.png")
    common.print_table(df, ["kind", "name", "dtype", "impl", "gflop_s", "gb_s", "gb_s_min", "gb_s_max", "tok_s",
                            "attention_share"])
    print(f"cpu: {roofline.cpu}; flags: {' '.join(roofline.flags)}")
    common.print_written(args.out, [png], round(time.perf_counter() - t0, 1))
    return df


if __name__ == "__main__":
    main()
