"""Times the attention backends for SmolLM2-135M shapes (9 heads, 3 KV heads,
head_dim 64) against a fixed-capacity cache (max_seq 8192).

For each (q_len, kv) the chunk is the last one of a kv-token prompt:
q_offset = max(kv - q_len, 0), kv_len = kv (kv < q_len: a padded last chunk).
Reports the median wall time (the JSON also min / max; and process CPU time: steadier on a shared box)
of --repeats calls after a warm-up call, the compiled peak scratch memory (memory_analysis().temp_size_in_bytes) and the
useful TFLOP/s (4 * d * visible (query, key) pairs per head).

CPU: blockwise XLA (default 768-row tiles, block_k 256/512/1024, and untiled)
vs the f32 reference vs
jax.nn.dot_product_attention with an explicit mask, the native CPU flash kernel, and for
q_len <= 8 the native CPU decode kernel (pallas_kernels/native_cpu.py). GPU: also the Pallas
flash / decode kernels (compiled).

  .venv/bin/python -m experiments.bench_attention [--quick] [--json out.json]
  .venv/bin/python -m experiments.bench_attention --q-lens 1 --kvs 512 2048 8192   # decode
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxchunk.timing import Timing, timeit
from pallas_kernels import native_cpu
from pallas_kernels.common import BlockSizes
from pallas_kernels.attention_reference import attention_reference
from pallas_kernels.blockwise_attention import blockwise_attention
from pallas_kernels.decode_attention import decode_attention
from pallas_kernels.flash_attention import flash_attention

HEADS, KV_HEADS, HEAD_DIM, MAX_SEQ = 9, 3, 64, 8192


def sdpa_masked(q, k, v, q_offset, kv_len):
    """jax.nn.dot_product_attention over the whole cache with an explicit mask."""
    ql, s = q.shape[1], k.shape[1]
    pos = q_offset[:, None] + jnp.arange(ql)
    j = jnp.arange(s)
    mask = (j[None, None, :] <= pos[:, :, None]) & (j < kv_len[:, None])[:, None, :]
    v = jnp.where((j < kv_len[:, None])[:, :, None, None], v, 0)
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None])


def native_decode(q, k, v, q_offset, kv_len):
    """The native CPU decode kernel (a bf16 cache comes as its bits, as the model stores it)."""
    return native_cpu.decode_attention_cpu(q, k, v, q_offset, kv_len, sm_scale=HEAD_DIM ** -0.5)


def native_flash(q, k, v, q_offset, kv_len):
    """The native CPU flash kernel (chunks; a bf16 cache comes as its bits, as the model stores it)."""
    return native_cpu.flash_attention_cpu(q, k, v, q_offset, kv_len, sm_scale=HEAD_DIM ** -0.5)


def visible_pairs(q_len, q_offset, kv_len):
    pos = q_offset + np.arange(q_len)
    return int(np.minimum(pos + 1, kv_len).clip(min=0).sum())


def time_fn(fn, args, repeats) -> tuple[Timing, float, int | None]:
    """(wall-time Timing, median process CPU seconds per call, compiled scratch bytes)."""
    compiled = jax.jit(fn).lower(*args).compile()
    mem = compiled.memory_analysis()
    peak = getattr(mem, "temp_size_in_bytes", None) if mem is not None else None
    cpu = []  # process CPU time of every call (all threads), the warm-up's first

    def call():
        start = time.process_time()
        out = jax.block_until_ready(compiled(*args))
        cpu.append(time.process_time() - start)
        return out

    wall = timeit(call, repeats)
    return wall, statistics.median(cpu[1:]), peak


def backends(block_ks, on_gpu):
    xla_q = BlockSizes.xla_default(HEAD_DIM).block_q
    out = {f"xla_q{xla_q}_k{bk}": (lambda bk: lambda *a: blockwise_attention(
        *a, block_sizes=BlockSizes(xla_q, bk)))(bk) for bk in block_ks}
    out["xla_untiled_k256"] = lambda *a: blockwise_attention(
        *a, block_sizes=BlockSizes(1 << 30, 256))  # one row tile: no causal skipping
    out["reference"] = attention_reference
    out["jax.nn.dpa+mask"] = sdpa_masked
    if not on_gpu and native_cpu.available():
        out["native_cpu"] = native_decode
        out["native_flash"] = native_flash
    if on_gpu:
        out["pallas_flash"] = lambda *a: flash_attention(*a, interpret=False)
        out["pallas_decode"] = lambda *a: decode_attention(*a, interpret=False)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--q-lens", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--kvs", type=int, nargs="+", default=[512, 2048, 8192])
    ap.add_argument("--block-ks", type=int, nargs="+", default=[256, 512, 1024])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--only", nargs="*", help="backend names to run")
    ap.add_argument("--quick", action="store_true", help="q_len 512, 3 repeats")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    if args.quick:
        args.q_lens, args.repeats = [512], 3
    on_gpu = jax.default_backend() == "gpu"
    dtype = jnp.dtype(args.dtype)
    rng = np.random.default_rng(0)
    k = jnp.asarray(rng.standard_normal((1, MAX_SEQ, KV_HEADS, HEAD_DIM)), dtype)
    v = jnp.asarray(rng.standard_normal((1, MAX_SEQ, KV_HEADS, HEAD_DIM)), dtype)
    # The native kernels read a bf16 cache as its uint16 bits, made here once: a bitcast inside the
    # timed function is a copy of the whole cache (6 MiB of scratch) that the model never makes.
    native_kv = tuple(jax.lax.bitcast_convert_type(a, jnp.uint16) if dtype == jnp.bfloat16 else a for a in (k, v))
    print(f"backend={jax.default_backend()} devices={jax.devices()} dtype={dtype} "
          f"heads={HEADS}/{KV_HEADS} d={HEAD_DIM} max_seq={MAX_SEQ}")
    print(f"{'q_len':>5} {'kv':>5} {'backend':>22} {'wall ms':>9} {'cpu ms':>9} "
          f"{'TFLOP/s':>8} {'scratch MiB':>11}")
    rows = []
    for ql in args.q_lens:
        q = jnp.asarray(rng.standard_normal((1, ql, HEADS, HEAD_DIM)), dtype)
        for kv in args.kvs:
            q_offset = jnp.array([max(kv - ql, 0)], jnp.int32)
            kv_len = jnp.array([kv], jnp.int32)
            flops = 4 * HEAD_DIM * HEADS * visible_pairs(ql, max(kv - ql, 0), kv)
            for name, fn in backends(args.block_ks, on_gpu).items():
                if args.only and name not in args.only:
                    continue
                if name in ("pallas_decode", "native_cpu") and ql > 8:
                    continue
                kv_args = native_kv if name.startswith("native") else (k, v)
                wall, cpu, peak = time_fn(fn, (q, *kv_args, q_offset, kv_len), args.repeats)
                t = wall.median_s
                mib = peak / 2**20 if peak is not None else float("nan")
                print(f"{ql:>5} {kv:>5} {name:>22} {t * 1e3:>9.2f} {cpu * 1e3:>9.2f} "
                      f"{flops / t / 1e12:>8.4f} {mib:>11.1f}", flush=True)
                rows.append(dict(q_len=ql, kv=kv, backend=name, wall_ms=t * 1e3,
                                 wall_min_ms=wall.min_s * 1e3, wall_max_ms=wall.max_s * 1e3,
                                 cpu_ms=cpu * 1e3, tflops=flops / t / 1e12,
                                 scratch_bytes=peak))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
