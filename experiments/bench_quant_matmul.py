"""Times formulations of the quantized matmul x[rows, k] @ dequant(W)[k, n] on SmolLM2-135M shapes
(--shapes smollm2), to choose the CPU path (pallas_kernels.quant_matmul.quant_matmul_xla), or on
Gemma 3 270M's shapes and GGUF types (--shapes gemma3: Q5_0 / Q8_0 / Q4_K / Q6_K and the mixed
Q4_K+Q6_K stack of its ffn_down, each next to the project's first q4 format, Q4_1, at the same shape).

Each case runs like the model: a lax.scan over --layers stacked copies of the weight (so the
working set is model-sized and a float W cannot sit in cache the way one small matrix would), with
rows = 1 (decode) and rows = 512 (a prefill chunk). The LM head (Q8_0, 576 x 49152) runs once.

Formulations (XLA_FORMULATIONS in pallas_kernels/quant_matmul.py, plus baselines):
- dequant_dot:      dequantize a column tile to float in natural order, one dot.
- split_dot:        4-bit: x split into the halves meeting low / high nibbles, two dots + a mins term.
- multiply_reduce:  no dot; x * int weights summed per block in one fusion, then scaled.
- native_cpu:       the native CPU kernel (pallas_kernels/native_cpu.py; what decode uses), reading
                    each layer of the stack in place.
- native_prefill:   quant_matmul(impl="native_cpu") for > 16 rows: native dequantization of the
                    layer, then XLA's dot (what prefill uses on CPU).
- xla:              quant_matmul(impl="xla"): the formulation the op picks by row count.
- dense_f32:        the float32 matrix (what weights="f32" runs), for reference.
- pallas_interpret: only with --pallas (slow: interpret mode; a correctness smoke, not a speed).

Cases are timed interleaved (every case's warm-up, then --repeats rounds of one call of each), so a
change in the machine's load hits all alike. Reports the median wall time of the warm calls per
matrix, weights/s (k * n / time), multiply-adds/s (rows * k * n / time) and the quantized bytes
read per second. Writes results.csv, results.json, quant_matmul.png into --out.

  .venv/bin/python -m experiments.bench_quant_matmul --quick
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from experiments import common

# (name, k, n, qtype, stacked copies): SmolLM2-135M's matrices (q/o, k/v, gate/up, down, LM head).
SHAPES = [("wq", 576, 576, "Q4_1", None), ("wk", 576, 192, "Q4_1", None), ("w_up", 576, 1536, "Q4_1", None),
          ("w_down", 1536, 576, "Q4_1", None), ("lm_head", 576, 49152, "Q8_0", 1)]
# Gemma 3 270M (gemma-3-270m-q4_k_m.gguf): gate / up 640 -> 2048 (Q5_0), down 2048 -> 640 (Q4_K and
# Q6_K layers), q 640 -> 1024 (Q5_0), o 1024 -> 640 (Q4_K); Q4_1 at each shape is the baseline.
GEMMA3_SHAPES = [(f"{name}:{qtype}", k, n, qtype, None) for name, k, n, types in (
    ("w_up", 640, 2048, ("Q4_1", "Q5_0", "Q8_0")),
    ("w_down", 2048, 640, ("Q4_1", "Q4_K", "Q6_K", "Q4_K+Q6_K")),
    ("wq", 640, 1024, ("Q4_1", "Q5_0")),
    ("wo", 1024, 640, ("Q4_1", "Q4_K"))) for qtype in types]
SHAPE_SETS = {"smollm2": SHAPES, "gemma3": GEMMA3_SHAPES}
FORMULATIONS = ("dequant_dot", "split_dot", "multiply_reduce", "native_cpu", "dense_f32")
GEMMA3_FORMULATIONS = ("native_cpu", "native_prefill", "xla", "dense_f32")


def make_weights(k: int, n: int, spec: str, copies: int, rng):
    """(stacked QuantizedWeight [copies, k, n], stacked float32 W) for GGUF type `spec` ("Q4_K",
    or "Q4_K+Q6_K": copies alternating between the types, in the layout of both). Types the gguf
    package quantizes come from a random float matrix; the k-quants (which it cannot quantize) are
    random blocks with f16 scales near 2**-10. Copies differ (rolled / re-drawn), so no copy is a
    cache hit of another."""
    import jax
    import jax.numpy as jnp
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    from jaxchunk.weights.gguf_file import RawTensor
    from jaxchunk.weights.gguf_quants import QUANT_TYPES
    from jaxchunk.weights.quantized import pack_stacked

    types = spec.split("+")
    w0 = rng.normal(0, 0.02, (n, k)).astype(np.float32)
    raws, floats = [], []
    for i in range(copies):
        qtype = types[i % len(types)]
        t = QUANT_TYPES[qtype]
        if t.block_size == 32:
            blocks = quantize(np.roll(w0, i, axis=0), GGMLQuantizationType[qtype])
        else:  # random bytes; then every byte pair that holds an f16 super-scale set to ~2**-10
            blocks = rng.integers(0, 256, (n, k // t.block_size, t.type_size), dtype=np.uint8)
            for off in _K_F16_FIELDS[qtype]:
                blocks[..., off:off + 2] = np.float16(2 ** -10 * rng.uniform(0.5, 1.0)).reshape(1).view(np.uint8)
            blocks = blocks.reshape(n, -1)
        raws.append(RawTensor(f"copy{i}", qtype, (n, k), blocks))
        floats.append(dequantize(blocks, GGMLQuantizationType[qtype]).reshape(n, k).T)
    stacked = jax.tree.map(jnp.asarray, pack_stacked(raws))
    return stacked, jnp.asarray(np.stack(floats))


# Byte offsets of the f16 super-scales d (and dmin) in a k-quant block (ggml-common.h).
_K_F16_FIELDS = {"Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}



def make_fn(formulation: str, rows: int):
    import jax
    import jax.numpy as jnp

    from pallas_kernels.native_cpu import quant_matmul_cpu
    from pallas_kernels.quant_matmul import quant_matmul, quant_matmul_pallas, quant_matmul_xla

    def one(x, w):
        if formulation == "dense_f32":
            return x @ w
        if formulation == "pallas_interpret":
            return quant_matmul_pallas(x, w.qs, w.scales, w.mins, interpret=True)
        if formulation == "xla":
            return quant_matmul(x, w.qs, w.scales, w.mins, impl="xla")
        return quant_matmul_xla(x, w.qs, w.scales, w.mins, formulation=formulation)

    @jax.jit
    def run(x, stacked):
        def step(acc, w):  # the row sums keep every output live at a cost of rows * n adds
            return acc + jnp.sum(one(x, w), axis=-1), None
        if formulation in ("native_cpu", "native_prefill"):  # reads layer i of the stack in place, as in the model
            def step_in_place(acc, i):
                if formulation == "native_cpu":
                    y = quant_matmul_cpu(x, stacked.qs, stacked.scales, stacked.mins, layer=i)
                else:
                    y = quant_matmul(x, stacked.qs, stacked.scales, stacked.mins, layer=i, impl="native_cpu")
                return acc + jnp.sum(y, axis=-1), None
            copies = jax.tree.leaves(stacked)[0].shape[0]
            return jax.lax.scan(step_in_place, jnp.zeros((rows,), x.dtype), jnp.arange(copies))[0]
        acc, _ = jax.lax.scan(step, jnp.zeros((rows,), x.dtype), stacked)
        return acc
    return run


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=common.parse_list, default=[1, 512])
    p.add_argument("--layers", type=int, default=30, help="stacked copies of each layer matrix")
    p.add_argument("--shapes", choices=sorted(SHAPE_SETS), default="smollm2",
                   help="smollm2: SmolLM2-135M's Q4_1 / Q8_0 matrices; gemma3: Gemma 3 270M's shapes and types")
    p.add_argument("--matrices", type=lambda s: common.parse_list(s, str), default=None,
                   help="only these matrix names (e.g. w_down:Q4_K,wq:Q5_0); default: all of --shapes")
    p.add_argument("--formulations", type=lambda s: common.parse_list(s, str), default=None,
                   help=f"default: {','.join(FORMULATIONS)} (smollm2), {','.join(GEMMA3_FORMULATIONS)} (gemma3)")
    p.add_argument("--pallas", action="store_true", help="also time the Pallas kernel in interpret mode")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--quick", action="store_true", help="3 repeats, 8 stacked layers")
    p.add_argument("--out", type=Path, default=Path("results/bench_quant_matmul"))
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.layers = 3, 8
    import jax.numpy as jnp

    if args.formulations is None:
        args.formulations = list(FORMULATIONS if args.shapes == "smollm2" else GEMMA3_FORMULATIONS)
    formulations = list(args.formulations) + (["pallas_interpret"] if args.pallas else [])
    rng = np.random.default_rng(0)
    shapes = [s for s in SHAPE_SETS[args.shapes] if args.matrices is None or s[0] in args.matrices]
    cases = []  # (row of results without timings, fn, x, stacked weights, copies)
    for name, k, n, qtype, copies in shapes:
        copies = copies or args.layers
        stacked_q, stacked_f = make_weights(k, n, qtype, copies, rng)
        qbytes = stacked_q.nbytes / copies
        for rows in args.rows:
            x = jnp.asarray(rng.normal(size=(rows, k)).astype(np.float32))
            for formulation in formulations:
                if formulation == "pallas_interpret" and (rows > 16 or name == "lm_head"):
                    continue  # interpret mode is a Python-level loop: keep it to small cases
                if (formulation == "native_cpu" and rows > 16) or (formulation == "native_prefill" and rows <= 16):
                    continue  # decode kernel for <= 16 rows (as the model), dequantize + dot for more
                row = dict(matrix=name, k=k, n=n, qtype=qtype, rows=rows, formulation=formulation, qbytes=qbytes)
                cases.append((row, make_fn(formulation, rows), x,
                              stacked_f if formulation == "dense_f32" else stacked_q, copies))
    # Interleaved: every case's warm-up call, then --repeats rounds of one call of every case, so
    # that a change in the machine's load (other processes) hits every case alike.
    first = [common.timeit(lambda: fn(x, w), 1).first_s for _, fn, x, w, _ in cases]
    samples: list[list[float]] = [[] for _ in cases]
    for _ in range(args.repeats):
        for i, (_, fn, x, w, _) in enumerate(cases):
            samples[i].append(common.timeit(lambda: fn(x, w), 1).samples_s[0])
    rows_out = []
    for (row, _, _, _, copies), first_s, times in zip(cases, first, samples):
        timing = common.Timing(first_s, tuple(times))
        per_matrix = timing.median_s / copies
        k, n, rows, qbytes = row["k"], row["n"], row["rows"], row.pop("qbytes")
        rows_out.append(dict(row, ms_per_matrix=per_matrix * 1e3,
                             ms_per_matrix_min=timing.min_s / copies * 1e3,
                             ms_per_matrix_max=timing.max_s / copies * 1e3,
                             gweights_per_s=k * n / per_matrix / 1e9,
                             gmacs_per_s=rows * k * n / per_matrix / 1e9,
                             quant_gb_per_s=qbytes / per_matrix / 1e9,
                             compile_s=timing.compile_s))
        print(f"{row['matrix']:14} rows={rows:4} {row['formulation']:17} {per_matrix * 1e3:8.3f} ms/matrix "
              f"{k * n / per_matrix / 1e9:6.2f} Gweights/s", flush=True)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    df = common.write_results(args.out, rows_out, settings, common.machine_info())
    plt = common.pyplot()
    fig, axes = plt.subplots(1, len(args.rows), figsize=(6 * len(args.rows), 4.2 if args.shapes == "smollm2" else 5.5),
                             squeeze=False)
    for ax, rows in zip(axes[0], args.rows):
        part = df[df.rows == rows]
        table = part.pivot_table(index="matrix", columns="formulation", values="gmacs_per_s")
        table = table.reindex([s[0] for s in shapes])
        table.plot.bar(ax=ax, rot=0 if args.shapes == "smollm2" else 60)
        ax.set_ylim(0, 1.4 * float(np.nanmax(table.to_numpy())))  # room for the legend above the bars
        ax.set_ylabel("multiply-adds per second (10^9/s, higher is better)")
        ax.set_xlabel(f"matrix ({'SmolLM2-135M' if args.shapes == 'smollm2' else 'Gemma 3 270M'} shape"
                      f"{'' if args.shapes == 'smollm2' else ': GGUF type'})")
        ax.set_title(f"rows = {rows} ({'decode' if rows <= 16 else 'prefill chunk'})", fontsize=10)
        ax.legend(title="formulation", fontsize=8, ncol=len(table.columns))
        ax.grid(True, axis="y", alpha=0.3)
    common.save_figure(fig, args.out / "quant_matmul.png")
    common.print_table(df, ["matrix", "rows", "formulation", "ms_per_matrix", "gweights_per_s", "gmacs_per_s",
                            "quant_gb_per_s"])
    print(f"wrote {args.out}/results.csv, results.json, quant_matmul.png")
    return df


if __name__ == "__main__":
    main()
