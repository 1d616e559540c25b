"""Data / tensor parallel inference by mesh shape: per-device memory, step time, and what the
collectives cost per layer of a decode step.

For each (data x model) mesh, on one process with forced CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=N, set here before JAX starts):
- per-device memory: the bytes device 0 holds of the params and of the cache, and XLA's compiled
  memory analysis of the decode step (arguments, temporaries; the partitioned program is per device);
- step time: a decode step (batch --batch, cache --max-seq) and a prefill chunk (--chunk tokens per
  row), median of --repeats warm runs;
- collectives: the all-reduces / all-gathers in the compiled decode step (HLO text), and the cost
  of one all-reduce of a decode step's [batch, 1, hidden] f32 activations over the mesh's model
  axis (timed alone: a loop of --psum-loop psums under shard_map), times the all-reduces per layer.

Forced CPU devices share the machine's cores (2 here): a mesh does NOT run faster than one device,
its time shows the partitioning overhead (collectives through host memory, smaller matmuls, more
ops), not a speed-up. Memory per device is what a real mesh would see.

  .venv/bin/python -m experiments.sharding --quick
  .venv/bin/python -m experiments.sharding --meshes 1x1,2x1,1x2,1x3,2x2,2x3 --out results/sharding

Writes results.csv + results.json and sharding.png (memory per device; step time and collective
share) into --out.
"""
from __future__ import annotations

import argparse
import os
import re
import time
from pathlib import Path

from experiments import common

FULL = dict(meshes="1x1,2x1,1x2,1x3,2x2,2x3", repeats=5, max_seq=1024, chunk=64)
QUICK = dict(meshes="1x1,1x2,1x3,2x3", repeats=3, max_seq=256, chunk=32)
TABLE_COLUMNS = ["mesh", "attention", "params_mb", "cache_mb", "arg_mb", "temp_mb", "decode_ms", "prefill_ms",
                 "all_reduces_per_layer", "all_reduce_us", "collective_ms_per_step", "collective_share"]


def parse_mesh(text: str) -> tuple[int, int]:
    data, model = text.lower().split("x")
    return int(data), int(model)


def per_device_mb(tree) -> float:
    import jax
    device = jax.devices()[0]
    return sum(s.data.nbytes for leaf in jax.tree.leaves(tree) for s in leaf.addressable_shards
               if s.device == device) / common.MB


def count_collectives(hlo: str) -> dict[str, int]:
    ops = ("all-reduce", "all-gather", "all-to-all", "collective-permute", "reduce-scatter")
    return {op: len(re.findall(rf"\b{op}(?:-start)?\(", hlo)) for op in ops}


def all_reduce_seconds(mesh, shape, loop: int, repeats: int) -> float:
    """Median seconds of one psum of f32 `shape` (per shard) over the mesh's model axis."""
    import jax
    import jax.numpy as jnp
    from jax.sharding import PartitionSpec as P

    from jaxchunk.sharding import MODEL

    def body(x):
        # Each iteration depends on the last, so the loop's psums run one after another.
        return jax.lax.fori_loop(0, loop, lambda i, y: jax.lax.psum(y, MODEL) * (1.0 / mesh.shape[MODEL]), x)

    fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P(), out_specs=P(), check_vma=False))
    x = jnp.ones(shape, jnp.float32)
    timing = common.timeit(lambda: fn(x).block_until_ready(), repeats=repeats)
    return timing.median_s / loop


def measure(model, mesh_shape, args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jaxchunk import sharding
    from jaxchunk.cache import init_cache
    from jaxchunk.prefill import prefill
    from jaxchunk.steps import jitted_decode_step, jitted_prefill_chunk

    data, model_size = mesh_shape
    config, batch = model.config, args.batch
    mesh = sharding.make_mesh(data, model_size)
    params = sharding.shard_params(model.params, config, mesh)
    plan = sharding.plan_for(config, mesh)
    cache = sharding.shard_cache(init_cache(config, batch, args.max_seq, model.dtype), config, mesh)
    row = {"mesh": f"{data}x{model_size}", "data": data, "model": model_size, "attention": plan.attention,
           "params_mb": per_device_mb(params), "cache_mb": per_device_mb(cache)}
    tokens = jnp.zeros((batch,), jnp.int32)
    with sharding.mesh_context(params, cache):
        compiled = jitted_decode_step.lower(params, cache, tokens, config=config, attention_impl="auto").compile()
    stats = compiled.memory_analysis()
    row.update(arg_mb=stats.argument_size_in_bytes / common.MB, temp_mb=stats.temp_size_in_bytes / common.MB,
               out_mb=stats.output_size_in_bytes / common.MB, alias_mb=stats.alias_size_in_bytes / common.MB)
    found = count_collectives(compiled.as_text())
    row.update({f"hlo_{op.replace('-', '_')}": n for op, n in found.items()})

    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, config.vocab_size, args.chunk * 2).tolist() for _ in range(batch)]
    cache, logits = prefill(params, config, cache, prompts, chunk_size=args.chunk)
    state = {"cache": cache}

    def decode():
        state["cache"], out = jitted_decode_step_call(params, state["cache"], tokens, config)
        out.block_until_ready()

    def jitted_decode_step_call(params, cache, tokens, config):
        with sharding.mesh_context(cache):
            return jitted_decode_step(params, cache, tokens, config=config, attention_impl="auto")

    # Decode from the same position each time: reset the lengths, keep the (donated) buffers.
    def reset():
        state["cache"] = state["cache"].replace(lengths=jax.device_put(
            np.full((batch,), args.chunk * 2, np.int32), state["cache"].lengths.sharding))
        return ()

    decode_t = common.timeit(decode, repeats=args.repeats, setup=reset)
    chunk_tokens = jnp.zeros((batch, args.chunk), jnp.int32)
    n_valid = jnp.full((batch,), args.chunk, jnp.int32)

    def reset_prefill():
        state["cache"] = state["cache"].replace(lengths=jax.device_put(
            np.zeros((batch,), np.int32), state["cache"].lengths.sharding))
        return ()

    def prefill_chunk():
        with sharding.mesh_context(state["cache"]):
            state["cache"], out = jitted_prefill_chunk(params, state["cache"], chunk_tokens, n_valid, config=config,
                                                       attention_impl="auto", logits="last")
        out.block_until_ready()

    prefill_t = common.timeit(prefill_chunk, repeats=args.repeats, setup=reset_prefill)
    row.update(decode_ms=decode_t.median_s * 1e3, prefill_ms=prefill_t.median_s * 1e3,
               decode_tok_s=batch / decode_t.median_s, prefill_tok_s=batch * args.chunk / prefill_t.median_s)

    # Row-split matmuls per layer: w_down always (model > 1), wo when the heads split.
    per_layer = 0 if model_size == 1 else 1 + (plan.attention in ("kv_heads", "q_heads"))
    row["all_reduces_per_layer"] = per_layer
    if model_size > 1:
        local_batch = batch // data if batch % data == 0 else batch
        seconds = all_reduce_seconds(mesh, (local_batch, 1, config.hidden_size), args.psum_loop, args.repeats)
        row["all_reduce_us"] = seconds * 1e6
        row["collective_ms_per_step"] = seconds * 1e3 * (per_layer * config.num_layers + 1)  # + the embedding
        row["collective_share"] = row["collective_ms_per_step"] / row["decode_ms"]
    else:
        row.update(all_reduce_us=0.0, collective_ms_per_step=0.0, collective_share=0.0)
    return row


def plot(df, path: Path, title: str) -> Path:
    plt = common.pyplot()
    fig, (mem_ax, time_ax) = plt.subplots(1, 2, figsize=(12, 4.4))
    x = range(len(df))
    labels = [f"{m}\n{a}" for m, a in zip(df["mesh"], df["attention"])]
    bottom = [0.0] * len(df)
    for column, label in (("params_mb", "params"), ("cache_mb", "KV cache"), ("temp_mb", "step temporaries")):
        mem_ax.bar(x, df[column], bottom=bottom, label=label)
        bottom = [b + v for b, v in zip(bottom, df[column])]
    mem_ax.set_xticks(list(x), labels, fontsize=8)
    mem_ax.set_ylabel("MB on device 0")
    mem_ax.set_title("per-device memory (decode step)", fontsize=10)
    mem_ax.legend(fontsize=8)
    width = 0.4
    time_ax.bar([i - width / 2 for i in x], df["decode_ms"], width, label="decode step")
    time_ax.bar([i + width / 2 for i in x], df["collective_ms_per_step"], width,
                label="all-reduces of a decode step (timed alone)")
    time_ax.set_xticks(list(x), labels, fontsize=8)
    time_ax.set_ylabel("ms")
    time_ax.set_title("decode step time: forced CPU devices share 2 cores (overhead, not speed-up)", fontsize=9)
    time_ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    return common.save_figure(fig, path)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=common.DEFAULT_MODEL, choices=common.MODELS)
    parser.add_argument("--weights", default="dequantized", help="dequantized (f32) or q4")
    parser.add_argument("--meshes", default=None, help="comma-separated DxM (data x model)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--max-seq", type=int, default=None)
    parser.add_argument("--chunk", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--psum-loop", type=int, default=200)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=common.ROOT / "results" / "sharding")
    args = parser.parse_args(argv)
    common.apply_preset(args, QUICK if args.quick else FULL)
    meshes = [parse_mesh(m) for m in args.meshes.split(",")]
    devices = max(d * m for d, m in meshes)
    if "jax" not in __import__("sys").modules:  # the device count is fixed when JAX starts
        flags = os.environ.get("XLA_FLAGS", "")
        if "force_host_platform_device_count" not in flags:
            os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
    start = time.perf_counter()
    model = common.load_model(args.model, "f32", args.weights)
    machine = common.machine_info()
    rows = []
    for mesh_shape in common.progress(meshes, "meshes"):
        rows.append(measure(model, mesh_shape, args))
    machine["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    df = common.write_results(args.out, rows, vars(args) | {"out": str(args.out)}, machine)
    common.print_table(df, TABLE_COLUMNS, title=f"{args.model} weights={args.weights}, batch {args.batch}, "
                                                f"cache {args.max_seq}, chunk {args.chunk}; load "
                                                f"{machine['load_average_1_5_15']} -> {machine['load_average_after']}")
    title = (f"{args.model} ({args.weights}), batch {args.batch}, cache {args.max_seq}: {machine['cpu']}, "
             f"load {machine['load_average_1_5_15']}")
    png = plot(df, args.out / "sharding.png", title)
    common.print_written(args.out, [png], round(time.perf_counter() - start, 1))


if __name__ == "__main__":
    main()
