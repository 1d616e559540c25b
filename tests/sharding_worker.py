"""Runs in its own process (tests/test_sharding.py starts it with
XLA_FLAGS=--xla_force_host_platform_device_count=N): the device count is fixed when JAX starts.

    python tests/sharding_worker.py '{"case": "equivalence", "model": "tiny", "weights": "f32", "meshes": [[2, 1]]}'
    python tests/sharding_worker.py '{"case": "batch", "specs": [{...}, {...}]}'   # several, one process

Prints one JSON line (the last line of stdout) with what it measured; the test asserts on it. The
reference of every mesh is the same code on one device (uncommitted arrays on device 0, no mesh).
"""
from __future__ import annotations

import contextlib
import functools
import json
import re
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np

from jaxchunk import sharding, testing
from jaxchunk.cache import init_cache
from jaxchunk.generate import generate_ids
from jaxchunk.prefill import decode_step, prefill
from jaxchunk.steps import compiled_step_counts, jitted_decode_step, jitted_prefill_chunk

CHUNK = 16
MAX_SEQ = 80          # a length no other dimension has: an all-gather of the cache would show it
DECODE_STEPS = 3
NEW_TOKENS = 6
TINY6 = dict(num_heads=6, num_kv_heads=3, intermediate_size=192, vocab_size=384)  # divides by 2 and 3


@functools.cache
def load_model(name: str, weights: str):
    """(config, params on the host / device 0, cache dtype); loaded once per process (a `batch` of
    cases, and a bf16 case's f32 reference, reuse them)."""
    if name == "smollm2":
        from jaxchunk.fetch import fetch_model
        from jaxchunk.weights.load import load_weights
        kw = dict(weights="q4", dtype="f32") if weights == "q4" else dict(dtype=weights)
        config, params, _ = load_weights(fetch_model(quiet=True), **kw)
        return config, jax.device_put(params), "bf16" if weights == "bf16" else "f32"
    overrides = TINY6 if name == "tiny6" else {}
    if name == "tiny_mqa":
        overrides = dict(num_kv_heads=1)
    dtype = jnp.bfloat16 if weights == "bf16" else jnp.float32
    config, params = testing.tiny_model(seed=0, scale=0.2, dtype=dtype, **overrides)
    if weights == "q4":
        from jaxchunk.weights.quantized import quantize_params
        params = quantize_params(params)
    if weights == "bf16":
        from jaxchunk.weights.bf16 import pack_bf16
        params = pack_bf16(params)
    return config, jax.device_put(params), "bf16" if weights == "bf16" else "f32"


def prompts_for(config, batch=2):
    rng = np.random.default_rng(1)
    lengths = [45, 29, 37, 41][:batch]   # different lengths, several chunks of 16
    return [rng.integers(0, config.vocab_size, n).tolist() for n in lengths]


def run(params, config, cache, prompts, impl="auto"):
    """Chunked prefill + DECODE_STEPS greedy decode steps: (cache, logits [1 + steps, batch, vocab])."""
    cache, logits = prefill(params, config, cache, prompts, chunk_size=CHUNK, attention_impl=impl)
    out = [np.asarray(logits)]
    for _ in range(DECODE_STEPS):
        cache, logits = decode_step(params, cache, out[-1].argmax(-1), config=config, attention_impl=impl)
        out.append(np.asarray(logits))
    return cache, np.stack(out)


def specs(tree):
    return [str(leaf.sharding.spec) for leaf in jax.tree.leaves(tree)]


def equivalence(spec) -> dict:
    config, params, cache_dtype = load_model(spec["model"], spec["weights"])
    impl = spec.get("impl", "auto")
    prompts = prompts_for(config)
    _, ref = run(params, config, init_cache(config, 2, MAX_SEQ, cache_dtype), prompts, impl)
    _, ref_ids = generate_ids(params, config, init_cache(config, 2, MAX_SEQ, cache_dtype), prompts,
                              max_new_tokens=NEW_TOKENS, chunk_size=CHUNK, attention_impl=impl)
    out = {"config": [config.num_heads, config.num_kv_heads], "meshes": {}}
    if spec["weights"] == "bf16":  # bf16's own error: the same model in f32 (the tolerance's scale)
        f32_config, f32_params, _ = load_model(spec["model"], "f32")
        _, f32 = run(f32_params, f32_config, init_cache(f32_config, 2, MAX_SEQ, "f32"), prompts, impl)
        out["bf16_vs_f32"] = float(np.abs(ref - f32).max() / np.abs(f32).max())
    for data, model in spec["meshes"]:
        mesh = sharding.make_mesh(data, model)
        placed = sharding.shard_params(params, config, mesh)
        cache = sharding.shard_cache(init_cache(config, 2, MAX_SEQ, cache_dtype), config, mesh)
        placed_specs = specs(cache)
        counts = compiled_step_counts()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            first_keys = cache.keys
            cache, got = run(placed, config, cache, prompts, impl)
        after = compiled_step_counts()
        _, ids = generate_ids(placed, config, sharding.shard_cache(init_cache(config, 2, MAX_SEQ, cache_dtype),
                                                                    config, mesh),
                              prompts, max_new_tokens=NEW_TOKENS, chunk_size=CHUNK, attention_impl=impl)
        margin = np.sort(ref, axis=-1)
        out["meshes"][f"{data}x{model}"] = {
            "attention": sharding.plan_for(config, mesh).attention,
            "max_rel": float(np.abs(got - ref).max() / np.abs(ref).max()),
            "argmax_equal": bool((got.argmax(-1) == ref.argmax(-1)).all()),
            "min_top2_gap": float((margin[..., -1] - margin[..., -2]).min() / np.abs(ref).max()),
            "argmax_equal_where_clear": bool(np.all((got.argmax(-1) == ref.argmax(-1)) |
                                                    ((margin[..., -1] - margin[..., -2]) < 0.1 * np.abs(ref).max()))),
            "greedy_equal": ids == ref_ids, "greedy": ids, "greedy_ref": ref_ids,
            "specs_in": placed_specs, "specs_out": specs(cache),
            "input_donated": bool(first_keys.is_deleted()),
            "donation_warnings": [str(w.message)[:200] for w in caught if "donat" in str(w.message).lower()],
            "new_prefill_executables": after["prefill_chunk"] - counts["prefill_chunk"],
            "new_decode_executables": after["decode_step"] - counts["decode_step"],
            "describe": sharding.describe(config, mesh, placed),
        }
    return out


COLLECTIVES = ("all-reduce", "all-gather", "all-to-all", "collective-permute", "reduce-scatter")


def collectives(hlo: str) -> dict:
    """{op: [result shape dims, ...]} of the collectives in compiled HLO text."""
    found = {op: [] for op in COLLECTIVES}
    for line in hlo.splitlines():
        for op in COLLECTIVES:
            match = re.search(rf"= \(?(\w+)\[([\d,]*)\][^=]*? {op}(-start)?\(", line)
            if match:
                found[op].append([int(d) for d in match.group(2).split(",") if d])
    return found


def memory(compiled) -> dict:
    stats = compiled.memory_analysis()
    return {"argument": int(stats.argument_size_in_bytes), "output": int(stats.output_size_in_bytes),
            "alias": int(stats.alias_size_in_bytes), "temp": int(stats.temp_size_in_bytes)}


def per_device_bytes(tree) -> int:
    """Bytes device 0 holds of the arrays in `tree`."""
    return sum(s.data.nbytes for leaf in jax.tree.leaves(tree) for s in leaf.addressable_shards
               if s.device == jax.devices()[0])


def parts(params) -> dict:
    return {"attention": {k: params["layers"][k] for k in ("wq", "wk", "wv", "wo")},
            "mlp": {k: params["layers"][k] for k in ("w_gate", "w_up", "w_down")},
            "embed_head": {k: params[k] for k in ("embed", "lm_head") if k in params}}


def hlo_and_memory(spec) -> dict:
    """Compiled decode step and prefill chunk on each mesh: collectives, memory analysis, and the
    bytes device 0 holds of each part (the 1x1 entry is the single-device baseline)."""
    config, params, cache_dtype = load_model(spec["model"], spec["weights"])
    batch = spec.get("batch", 2)
    from pallas_kernels import native_cpu
    out = {"max_seq": MAX_SEQ, "hidden": config.hidden_size, "native_cpu": native_cpu.available(), "meshes": {}}
    for data, model in [[1, 1]] + spec["meshes"]:
        mesh = sharding.make_mesh(data, model)
        placed = sharding.shard_params(params, config, mesh)
        cache = sharding.shard_cache(init_cache(config, batch, MAX_SEQ, cache_dtype), config, mesh)
        entry = {"attention": sharding.plan_for(config, mesh).attention,
                 "bytes": {name: per_device_bytes(p) for name, p in parts(placed).items()}}
        entry["bytes"]["cache"] = per_device_bytes(cache)
        with sharding.mesh_context(placed, cache):  # a no-op on the 1x1 mesh
            decode = jitted_decode_step.lower(placed, cache, jnp.zeros((batch,), jnp.int32), config=config,
                                              attention_impl="auto").compile()
            chunk = jitted_prefill_chunk.lower(placed, cache, jnp.zeros((batch, CHUNK), jnp.int32),
                                               jnp.full((batch,), CHUNK, jnp.int32), config=config,
                                               attention_impl="auto", logits="last").compile()
        entry["decode"] = {"memory": memory(decode), "collectives": collectives(decode.as_text()),
                           "custom_calls": len(re.findall(r" custom-call\(", decode.as_text()))}
        entry["prefill"] = {"memory": memory(chunk), "collectives": collectives(chunk.as_text())}
        out["meshes"][f"{data}x{model}"] = entry
    return out


def paged(spec) -> dict:
    """One mixed step (a prefill chunk of one sequence + a decode token of another) on the paged
    pool, sharded vs one device."""
    from jaxchunk.paged import build_step, init_paged_cache, mixed_step
    config, params, _ = load_model(spec["model"], "f32")
    rng = np.random.default_rng(2)
    a, b = rng.integers(0, config.vocab_size, 20).tolist(), rng.integers(0, config.vocab_size, 9).tolist()

    def steps(params, cache, ctx):
        outs = []
        kw = dict(token_budget=32, max_seqs=4, max_pages_per_seq=4, num_pages=cache.num_pages,
                  page_size=cache.page_size)
        with ctx():
            cache, la = mixed_step(params, cache, build_step([(a, 0, [3, 1]), (b, 0, [5])], **kw), config=config)
            outs.append(np.asarray(la)[:2])
            cache, lb = mixed_step(params, cache, build_step([([int(np.asarray(la)[0].argmax())], 20, [3, 1]),
                                                              ([int(np.asarray(la)[1].argmax())], 9, [5])], **kw),
                                   config=config)
            outs.append(np.asarray(lb)[:2])
        return cache, np.stack(outs)

    _, ref = steps(params, init_paged_cache(config, num_pages=8, page_size=16), contextlib.nullcontext)
    out = {"meshes": {}}
    for data, model in spec["meshes"]:
        mesh = sharding.make_mesh(data, model)
        placed = sharding.shard_params(params, config, mesh)
        pool = sharding.shard_cache(init_paged_cache(config, num_pages=8, page_size=16), config, mesh)
        before = specs(pool)
        for ctx_name, ctx in (("mesh_context", lambda: sharding.mesh_context(pool)),
                              ("no_context", contextlib.nullcontext)):
            pool_in = sharding.shard_cache(init_paged_cache(config, num_pages=8, page_size=16), config, mesh)
            pool_out, got = steps(placed, pool_in, ctx)
            out["meshes"][f"{data}x{model}/{ctx_name}"] = {
                "max_rel": float(np.abs(got - ref).max() / np.abs(ref).max()),
                "argmax_equal": bool((got.argmax(-1) == ref.argmax(-1)).all()),
                "specs_in": before, "specs_out": specs(pool_out)}
    return out


def api(spec) -> dict:
    """`jaxchunk.load(..., mesh=)`: Model.generate / logits / perplexity on a mesh vs without one."""
    import jaxchunk
    prompts = ["The capital of France is", "def fibonacci(n):"]
    out = {}
    for name, mesh in (("single", None), ("mesh", sharding.make_mesh(*spec["mesh"]))):
        model = jaxchunk.load("smollm2-135m", max_seq_len=128, mesh=mesh, **spec.get("load", {}))
        out[name] = {"texts": model.generate(prompts, max_new_tokens=8, chunk_size=4),
                     "logits": np.asarray(model.logits(prompts[0], chunk_size=4)).tolist(),
                     "perplexity": model.perplexity("The quick brown fox jumps over the lazy dog.", chunk_size=4),
                     "info": model.sharding_info(),
                     "cache_spec": str(model.new_cache(2).keys.sharding.spec) if mesh is not None else ""}
    return out


def batch(spec) -> dict:
    """Several cases ({"case": "batch", "specs": [spec, ...]}) in this one process: JAX starts once,
    and each model is loaded and each single-device reference shape compiled once for all of them.
    {"results": [result of each spec, in order]}."""
    return {"results": [CASES[s["case"]](s) for s in spec["specs"]]}


CASES = {"equivalence": equivalence, "hlo_and_memory": hlo_and_memory, "paged": paged, "api": api, "batch": batch}

if __name__ == "__main__":
    spec = json.loads(sys.argv[1])
    print(json.dumps(CASES[spec["case"]](spec)))
