"""Data and tensor parallelism with JAX's own SPMD partitioner: a mesh, ONE rules table, placement.

    mesh = make_mesh(data=2, model=2)                  # the first 4 devices, Auto axis types
    print(describe(config, mesh))                      # what the rules shard for this config
    params = shard_params(params, config, mesh)        # placed; q4 weights marked column / row split
    cache = shard_cache(init_cache(config, 2, 1024), config, mesh)   # or a PagedKVCache
    cache, logits = prefill(params, config, cache, prompts, chunk_size=64)  # unchanged code

`jaxchunk.load(..., mesh=mesh)` does the placement for a `Model`.

The rules (`RULES`, completed per config by `plan_for`) map logical axes, named in `PARAM_AXES` and
`CACHE_AXES`, to the two mesh axes:
- "batch" (cache rows, activations) -> data. The paged pool's pages are NOT split over data: a page
  may belong to any sequence of a step, so a data split of a pool needs one pool per data shard
  (a scheduler's job); paged steps run tensor-parallel only.
- "ffn" -> model: MLP gate/up by column, down by row (one all-reduce per layer, after down).
- "vocab" -> model: vocab-parallel embedding rows and LM-head columns.
- attention, chosen from the config (`plan_for`):
    "kv_heads"   num_kv_heads % model == 0: query and KV heads, wq/wk/wv columns, wo rows and the
                 cache's KV heads over model (a second all-reduce per layer, after wo);
    "q_heads"    else if num_heads % model == 0: query heads (wq columns, wo rows) over model, K/V
                 and their cache replicated (every model shard computes and stores all KV heads);
    "replicated" else: attention weights and the cache replicated over model; only MLP and vocab split.
  A dimension the mesh axis does not divide (a batch of 1 over data=2, a vocab of 256 over 3) is
  replicated instead.
- Quantized (q4) weights split along the same axes when their block layout divides: columns by
  whole column tiles (or within the single tile), rows by whole 32-weight quant blocks; else
  replicated (`describe` says which).

XLA partitions the float matmuls, norms, RoPE, cache scatter and embedding itself. (With data > 1 it
all-gathers the chunk's new K/V rows over data before the scatter: it does not see that a row's
index is its own shard. A batched scatter (vmap over rows) avoids that gather, but XLA:CPU then
copied the cache every step: a 1x2 decode step took 30x longer, so it is not used.) What it cannot
partition (Pallas kernels, the native CPU custom calls: opaque to the SPMD partitioner, which would
gather their operands) runs inside `jax.shard_map` with per-shard specs from the same rules:
attention (`attention_call`; every backend then sees one shard's rows and heads, as on one device)
and the quantized matmul (`quantized_linear`; a row split sums its partial products with one psum).
In "q_heads" mode, when model is a multiple of the KV heads (MQA; 4 query / 2 KV heads over 4), a
shard's query heads share one KV head and attend to it in shard_map; otherwise the attention stays
with XLA's partitioner and the native / Pallas backends give way to "xla".

Inside a step these wrappers use the mesh of the trace context (`jax.set_mesh`); the host-side
step runners (jaxchunk.steps, jaxchunk.generate) enter it from their inputs' placement
(`mesh_context`). Calling a jitted step directly on sharded inputs outside that context is still
correct (XLA gathers what it must), just not tensor-parallel in the kernels: use
`with mesh_context(cache):` (e.g. around `jaxchunk.paged.mixed_step`).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxchunk.config import LlamaConfig
from jaxchunk.errors import InputError
from jaxchunk.weights.bf16 import BF16Weight
from jaxchunk.weights.quantized import QuantizedWeight, retile
from jaxchunk.weights.quantized import quantized_linear as unsharded_quantized_linear
from pallas_kernels.quant_matmul import choose_tile

__all__ = ["DATA", "MODEL", "RULES", "PARAM_AXES", "CACHE_AXES", "ATTENTION_MODES", "ShardingPlan", "make_mesh",
           "plan_for", "describe", "param_shardings", "shard_params", "cache_shardings", "shard_cache",
           "mesh_of", "mesh_context", "to_host", "context_mesh", "constrain_cache", "attention_call",
           "paged_attention_call", "quantized_linear", "NON_PARTITIONED_ATTENTION"]

DATA, MODEL = "data", "model"

# ----------------------------------------------------------------------------- the rules table
RULES: dict[str, Optional[str]] = {
    "batch": DATA,        # cache rows and the activations' batch
    "vocab": MODEL,       # embedding rows, LM-head columns
    "ffn": MODEL,         # MLP gate/up columns, down rows
    "q_heads": MODEL,     # query heads: wq columns, wo rows (attention "kv_heads" / "q_heads")
    "kv_heads": MODEL,    # KV heads: wk/wv columns, the caches' heads (attention "kv_heads" only)
    # never split:
    "embed": None, "layers": None, "seq": None, "head_dim": None, "pages": None, "page_slot": None,
    "tokens": None,
}
"""logical axis -> mesh axis. `plan_for` turns the heads entries off where the config asks for it."""

# Logical axes of the params (jaxchunk/weights/__init__.py layout; a quantized embedding stands for
# the LM head's [hidden, vocab]).
PARAM_AXES = {
    "embed": ("vocab", "embed"),
    "final_norm": ("embed",),
    "lm_head": ("embed", "vocab"),
    "layers": {
        "attn_norm": ("layers", "embed"), "mlp_norm": ("layers", "embed"),
        "wq": ("layers", "embed", "q_heads"), "wk": ("layers", "embed", "kv_heads"),
        "wv": ("layers", "embed", "kv_heads"), "wo": ("layers", "q_heads", "embed"),
        "w_gate": ("layers", "embed", "ffn"), "w_up": ("layers", "embed", "ffn"),
        "w_down": ("layers", "ffn", "embed"),
    },
}
QUANTIZED_EMBED_AXES = ("embed", "vocab")

_CONTIGUOUS = ("layers", "batch", "seq", "kv_heads", "head_dim")
_PAGED = ("layers", "pages", "page_slot", "kv_heads", "head_dim")
CACHE_AXES = {
    "contiguous": {"keys": _CONTIGUOUS, "values": _CONTIGUOUS, "key_scales": _CONTIGUOUS,
                   "value_scales": _CONTIGUOUS, "lengths": ("batch",),
                   # the sliding-window layers' ring (jaxchunk.cache; None without one): slots as seq
                   "ring_keys": _CONTIGUOUS, "ring_values": _CONTIGUOUS, "ring_key_scales": _CONTIGUOUS,
                   "ring_value_scales": _CONTIGUOUS},
    "paged": {"keys": _PAGED, "values": _PAGED, "key_scales": _PAGED, "value_scales": _PAGED},
}
# Activations the shard_map wrappers split.
Q_AXES = ("batch", "seq", "q_heads", "head_dim")           # [batch, q_len, heads, head_dim]
PAGED_Q_AXES = ("tokens", "q_heads", "head_dim")           # [T, heads, head_dim]

ATTENTION_MODES = ("kv_heads", "q_heads", "replicated")
NON_PARTITIONED_ATTENTION = ("auto", "pallas", "native_cpu")
"""attention impls that may land on a kernel XLA cannot partition ("auto" picks one on CPU / GPU)."""


# ----------------------------------------------------------------------------- mesh and plan
def make_mesh(data: int = 1, model: int = 1, devices: Optional[Sequence] = None) -> jax.sharding.Mesh:
    """A (data, model) mesh over the first data * model devices (`jax.devices()` by default: across
    processes after `jax.distributed.initialize`), both axes Auto (XLA's partitioner places what
    the rules leave open; jax 0.10.2's default Explicit axes reject sharded contractions)."""
    for name, value in (("data", data), ("model", model)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise InputError(f"mesh {name} size must be a positive int, got {value!r}")
    devices = list(jax.devices() if devices is None else devices)
    if data * model > len(devices):
        raise InputError(f"a {data} x {model} mesh needs {data * model} devices, there are {len(devices)} "
                         f"(on CPU: XLA_FLAGS=--xla_force_host_platform_device_count=N before JAX starts)")
    grid = np.array(devices[:data * model], dtype=object).reshape(data, model)
    return jax.sharding.Mesh(grid, (DATA, MODEL), axis_types=(AxisType.Auto, AxisType.Auto))


@dataclasses.dataclass(frozen=True)
class ShardingPlan:
    """The rules for one config on one mesh shape: `rules` (logical -> mesh axis), the attention
    mode, and why. `spec(axes, shape)` is the PartitionSpec of one array."""

    data: int
    model: int
    attention: str
    rules: tuple[tuple[str, Optional[str]], ...]
    notes: tuple[str, ...] = ()

    @property
    def rule(self) -> dict[str, Optional[str]]:
        return dict(self.rules)

    def axis_size(self, mesh_axis: Optional[str]) -> int:
        return {DATA: self.data, MODEL: self.model}.get(mesh_axis, 1)

    def spec(self, axes: Sequence[str], shape: Sequence[int]) -> P:
        """PartitionSpec of an array with these logical axes; a dimension its mesh axis does not
        divide stays whole."""
        if len(axes) != len(shape):
            raise ValueError(f"logical axes {axes} do not match shape {tuple(shape)}")
        rule = self.rule
        out = []
        for name, dim in zip(axes, shape):
            mesh_axis = rule[name]
            size = self.axis_size(mesh_axis)
            out.append(mesh_axis if mesh_axis is not None and size > 1 and dim % size == 0 else None)
        while out and out[-1] is None:  # XLA's form (what a step's outputs carry): equal in and out
            out.pop()
        return P(*out)


def plan_for(config: LlamaConfig, mesh_or_shape) -> ShardingPlan:
    """The `ShardingPlan` of `config` on a mesh (or a {"data": d, "model": m} mapping)."""
    shape = dict(getattr(mesh_or_shape, "shape", mesh_or_shape))
    data, model = int(shape.get(DATA, 1)), int(shape.get(MODEL, 1))
    return _plan(config, data, model)


def _plan(config: LlamaConfig, data: int, model: int) -> ShardingPlan:
    rules = dict(RULES)
    notes = []
    if model == 1:
        attention = "replicated"
    elif config.num_kv_heads % model == 0:
        attention = "kv_heads"
    elif config.num_heads % model == 0:
        attention = "q_heads"
        rules["kv_heads"] = None
        how = ("each shard attends to its query heads' one KV head (any backend, in shard_map)"
               if model % config.num_kv_heads == 0 else "attention left to XLA's partitioner (backend xla)")
        notes.append(f"{config.num_kv_heads} KV heads do not divide over model={model}: K/V and the cache "
                     f"replicated, {config.num_heads} query heads split; {how}")
    else:
        attention = "replicated"
        rules["q_heads"] = rules["kv_heads"] = None
        notes.append(f"neither {config.num_kv_heads} KV nor {config.num_heads} query heads divide over "
                     f"model={model}: attention replicated over model")
    for axis, size in (("ffn", config.intermediate_size), ("vocab", config.vocab_size)):
        if model > 1 and size % model:
            rules[axis] = None
            notes.append(f"{axis} {size} does not divide over model={model}: replicated")
    return ShardingPlan(data, model, attention, tuple(rules.items()), tuple(notes))


def describe(config: LlamaConfig, mesh_or_shape, params=None) -> str:
    """`jaxchunk info`-style text: the mesh, the attention mode, what each logical axis maps to,
    and (given params) which quantized weights could not be split."""
    plan = plan_for(config, mesh_or_shape)
    lines = [f"mesh: data={plan.data} x model={plan.model}",
             f"attention: {plan.attention} (heads {config.num_heads} query / {config.num_kv_heads} KV)"]
    rule = plan.rule
    for name in ("batch", "q_heads", "kv_heads", "ffn", "vocab"):
        mesh_axis = rule[name]
        lines.append(f"  {name:9s} -> {mesh_axis if mesh_axis and plan.axis_size(mesh_axis) > 1 else 'replicated'}")
    lines.append("  paged pool pages -> replicated (tensor-parallel only)")
    lines += [f"note: {n}" for n in plan.notes]
    if params is not None:
        for path, w in _quantized_leaves(params):
            axes = _weight_axes(path, w)
            if _quantized_split(w, axes, plan)[0] is None and any(rule[a] and plan.model > 1 for a in axes[-2:]):
                lines.append(f"note: quantized {path} ({w.qtype}, qs {tuple(w.qs.shape)}): block layout does not "
                             f"divide over model={plan.model}: replicated")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- params
def _weight_axes(path: str, w) -> tuple[str, ...]:
    if path == "embed" and isinstance(w, QuantizedWeight):
        return QUANTIZED_EMBED_AXES
    if path.startswith("layers/"):
        return PARAM_AXES["layers"][path.split("/", 1)[1]]
    return PARAM_AXES[path]


def _quantized_leaves(params):
    for key, w in params.items():
        if key == "layers":
            for k, lw in w.items():
                if isinstance(lw, QuantizedWeight):
                    yield f"layers/{k}", lw
        elif isinstance(w, QuantizedWeight):
            yield key, w


def _quantized_split(w: QuantizedWeight, axes, plan: ShardingPlan) -> tuple[Optional[str], int]:
    """(split, tile): split is "out" (columns over model), "in" (rows over model) or None, for W
    with logical axes (..., in, out), when the block layout divides; tile is the tile width W must
    have for that split (its own unless an "out" split needs narrower tiles)."""
    rule, m = plan.rule, plan.model
    own_tile = w.qs.shape[-1]
    if m == 1:
        return None, own_tile
    in_axis, out_axis = axes[-2:]
    if rule[out_axis] == MODEL:
        tile = _out_split_tile(w, m)
        return ("out", tile) if tile is not None else (None, own_tile)
    if rule[in_axis] == MODEL:
        blocks = w.scales.shape[-2]
        return ("in" if blocks % m == 0 else None), own_tile
    return None, own_tile


def _out_split_tile(w: QuantizedWeight, m: int) -> Optional[int]:
    """The tile width with which W's columns split over m devices by whole tiles (or within its
    only tile): its own where that divides, else the loader's choice for n / m columns (W is then
    retiled: narrow tiles rarely come in multiples of m, 576 = 9 x 64), else None."""
    tiles, _, tile = w.qs.shape[-3:]
    if (tiles > 1 and tiles % m == 0) or (tiles == 1 and tile % m == 0):
        return tile
    n = tiles * tile
    if n % m == 0 and (n // choose_tile(n // m)) % m == 0:
        return choose_tile(n // m)
    return None


def _quantized_specs(w: QuantizedWeight, lead: int) -> QuantizedWeight:
    """A QuantizedWeight-shaped pytree of PartitionSpecs for its leaves (qs, scales, mins:
    [*lead, tiles, rows, tile]), from its `split`."""
    dims = [None] * (lead + 3)
    tiles = w.qs.shape[-3]
    if w.split == "out":
        dims[lead + (0 if tiles > 1 else 2)] = MODEL
    elif w.split == "in":
        dims[lead + 1] = MODEL
    while dims and dims[-1] is None:
        dims.pop()
    spec = P(*dims)
    return w.replace(qs=spec, scales=spec, mins=None if w.mins is None else spec, layer=None)


def _mark_splits(params: dict, plan: ShardingPlan) -> dict:
    """params with each QuantizedWeight's static `split` set from the plan."""
    def mark(path, w):
        if not isinstance(w, QuantizedWeight):
            return w
        split, tile = _quantized_split(w, _weight_axes(path, w), plan)
        if tile != w.qs.shape[-1]:
            w = retile(w, tile)
        return w.replace(split=split)

    out = {k: mark(k, w) for k, w in params.items() if k != "layers"}
    out["layers"] = {k: mark(f"layers/{k}", w) for k, w in params["layers"].items()}
    return out


def _spec_tree(params: dict, plan: ShardingPlan) -> dict:
    """PartitionSpecs in the params' structure (QuantizedWeight / BF16Weight nodes kept)."""
    def spec(path, w):
        axes = _weight_axes(path, w)
        if isinstance(w, QuantizedWeight):
            return _quantized_specs(w, w.qs.ndim - 3)
        if isinstance(w, BF16Weight):
            return BF16Weight(plan.spec(axes, w.bits.shape))
        return plan.spec(axes, np.shape(w))

    out = {k: spec(k, w) for k, w in params.items() if k != "layers"}
    out["layers"] = {k: spec(f"layers/{k}", w) for k, w in params["layers"].items()}
    return out


def _is_spec(x) -> bool:
    return isinstance(x, P)


def param_shardings(params: dict, config: LlamaConfig, mesh) -> dict:
    """NamedShardings in the structure of `shard_params(params, ...)` (quantized splits marked)."""
    plan = plan_for(config, mesh)
    specs = _spec_tree(_mark_splits(params, plan), plan)
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=_is_spec)


def shard_params(params: dict, config: LlamaConfig, mesh) -> dict:
    """params placed on `mesh` by the rules (host or device arrays in; one device_put). Quantized
    weights come back with `split` set, which the quantized matmul's shard_map reads."""
    plan = plan_for(config, mesh)
    params = _mark_splits(params, plan)
    specs = _spec_tree(params, plan)
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=_is_spec)
    return jax.device_put(params, shardings)


# ----------------------------------------------------------------------------- caches
def _cache_layout(cache) -> str:
    """"contiguous" for a KVCache (it has lengths), "paged" for a PagedKVCache."""
    return "contiguous" if hasattr(cache, "lengths") else "paged"


def _cache_specs(cache, plan: ShardingPlan):
    axes = CACHE_AXES[_cache_layout(cache)]
    fields = {name: (None if getattr(cache, name) is None else plan.spec(ax, getattr(cache, name).shape))
              for name, ax in axes.items()}
    return cache.replace(**fields)


def cache_shardings(cache, config: LlamaConfig, mesh):
    """NamedShardings in the structure of a KVCache or PagedKVCache (arrays or ShapeDtypeStructs)."""
    specs = _cache_specs(cache, plan_for(config, mesh))
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=_is_spec)


def shard_cache(cache, config: LlamaConfig, mesh):
    """A KVCache or PagedKVCache placed on `mesh` by the rules (batch -> data, KV heads -> model
    where the plan splits them)."""
    return jax.device_put(cache, cache_shardings(cache, config, mesh))


# ----------------------------------------------------------------------------- the mesh of a call
def mesh_of(tree) -> Optional[jax.sharding.Mesh]:
    """The mesh of the first leaf placed with a NamedSharding over more than one device, or None."""
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1:
            return sharding.mesh
    return None


def mesh_context(*trees):
    """`jax.set_mesh(mesh)` for the mesh the inputs are placed on (a no-op context for single-device
    inputs): what lets the shard_map wrappers inside a step find the mesh while it is traced."""
    mesh = mesh_of(trees)
    if mesh is None or context_mesh() is not None:
        return contextlib.nullcontext()
    return jax.set_mesh(mesh)


def to_host(x) -> np.ndarray:
    """A (possibly global, multi-process) array as NumPy on this host: the local copy when this
    process holds all of it, else gathered from every process (`process_allgather`; every process
    must call it, as every process runs the same step loop)."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def context_mesh():
    """The (abstract) mesh of the trace context when it spans more than one device, else None."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or math.prod(mesh.shape.values()) == 1:
        return None
    return mesh


def constrain_cache(cache, config: LlamaConfig):
    """Inside a step: the updated cache pinned to the rules' sharding, so the output matches the
    donated input and the update stays in place. A no-op without a context mesh."""
    mesh = context_mesh()
    if mesh is None:
        return cache
    specs = _cache_specs(cache, plan_for(config, mesh))
    return jax.tree.map(lambda x, s: jax.lax.with_sharding_constraint(x, s), cache, specs)


# ----------------------------------------------------------------------------- shard_map wrappers
def _shard_map(fn, mesh, in_specs, out_specs, *args):
    return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)(*args)


def _spec_or_none(plan, axes, x):
    return None if x is None else plan.spec(axes, x.shape)


def attention_call(op, config: LlamaConfig, q, k, v, q_offset, kv_len, *, impl: str, k_scales=None,
                   v_scales=None, **static):
    """`op(q, k, v, q_offset, kv_len, impl=impl, k_scales=, v_scales=, **static)` (the
    pallas_kernels.attention signature; k / v / scales the whole stacked cache with a traced
    `layer`), run per shard under the context mesh: rows over data, and heads over model in the
    "kv_heads" mode. "q_heads" mode: left to XLA's partitioner with a partitionable backend.
    Without a context mesh: `op` as is."""
    mesh = context_mesh()
    if mesh is None:
        return op(q, k, v, q_offset, kv_len, impl=impl, k_scales=k_scales, v_scales=v_scales, **static)
    plan = plan_for(config, mesh)
    # q_heads mode: a shard's query heads share one KV head when model is a multiple of the KV heads
    # (MQA, or e.g. 4 query / 2 KV heads over 4); it then attends to that head of the replicated cache.
    # Otherwise XLA partitions the attention (and gathers q's heads first).
    shared_kv = plan.model // config.num_kv_heads if plan.model % config.num_kv_heads == 0 else None
    if plan.attention == "q_heads" and shared_kv is None:
        impl = "xla" if impl in NON_PARTITIONED_ATTENTION else impl
        return op(q, k, v, q_offset, kv_len, impl=impl, k_scales=k_scales, v_scales=v_scales, **static)
    layer = static.pop("layer", None)
    cache_axes = _CONTIGUOUS if k.ndim == 5 else _CONTIGUOUS[1:]
    q_spec = plan.spec(Q_AXES, q.shape)
    rows = plan.spec(("batch",), q_offset.shape)
    in_specs = (q_spec, plan.spec(cache_axes, k.shape), plan.spec(cache_axes, v.shape), rows, rows,
                _spec_or_none(plan, cache_axes, k_scales), _spec_or_none(plan, cache_axes, v_scales), P())
    slice_kv = plan.attention == "q_heads" and config.num_kv_heads > 1

    def per_shard(q, k, v, q_offset, kv_len, k_scales, v_scales, layer):
        if slice_kv:  # this shard's KV head, out of the layer (a copy of 1 / num_kv_heads of it)
            head = jax.lax.axis_index(MODEL) // shared_kv
            k, v, k_scales, v_scales = (None if a is None else jax.lax.dynamic_slice_in_dim(
                a if layer is None else a[layer], head, 1, axis=-2) for a in (k, v, k_scales, v_scales))
            layer = None
        return op(q, k, v, q_offset, kv_len, impl=impl, k_scales=k_scales, v_scales=v_scales, layer=layer,
                  **static)

    return _shard_map(per_shard, mesh, in_specs, q_spec, q, k, v, q_offset, kv_len, k_scales, v_scales, layer)


def paged_attention_call(op, config: LlamaConfig, q, k_pages, v_pages, cu_q_lens, kv_lens, page_table,
                         num_seqs, *, impl: str, k_scales=None, v_scales=None, **static):
    """`op` with the pallas_kernels.paged_attention signature (q [T, heads, head_dim], pools
    [layers, pages, page_size, kv_heads, dim], traced `layer`), per model shard of the heads in the
    "kv_heads" mode (the step's index arrays replicated); as `attention_call` otherwise."""
    mesh = context_mesh()
    call = dict(impl=impl, k_scales=k_scales, v_scales=v_scales, **static)
    if mesh is None:
        return op(q, k_pages, v_pages, cu_q_lens, kv_lens, page_table, num_seqs, **call)
    plan = plan_for(config, mesh)
    if plan.attention != "kv_heads":
        if impl in NON_PARTITIONED_ATTENTION:
            call["impl"] = "xla"
        return op(q, k_pages, v_pages, cu_q_lens, kv_lens, page_table, num_seqs, **call)
    layer = static.pop("layer", None)
    pool_axes = _PAGED if k_pages.ndim == 5 else _PAGED[1:]
    q_spec = plan.spec(PAGED_Q_AXES, q.shape)
    pool = plan.spec(pool_axes, k_pages.shape)
    in_specs = (q_spec, pool, plan.spec(pool_axes, v_pages.shape), P(), P(), P(), P(),
                _spec_or_none(plan, pool_axes, k_scales), _spec_or_none(plan, pool_axes, v_scales), P())

    def per_shard(q, k, v, cu, kl, table, n, k_scales, v_scales, layer):
        return op(q, k, v, cu, kl, table, n, impl=impl, k_scales=k_scales, v_scales=v_scales, layer=layer,
                  **static)

    return _shard_map(per_shard, mesh, in_specs, q_spec, q, k_pages, v_pages, cu_q_lens, kv_lens, page_table,
                      num_seqs, k_scales, v_scales, layer)


def quantized_linear(x, w: QuantizedWeight):
    """x [..., in] @ W for a QuantizedWeight, per shard under the context mesh: the leading (batch)
    dim of x over data where it divides; W's columns ("out") or rows ("in", partial products summed
    with one psum over model) as `shard_params` split them. Without a context mesh (or a 1-D x):
    the plain quantized matmul."""
    mesh = context_mesh()
    if mesh is None:
        return unsharded_quantized_linear(x, w)
    data = dict(mesh.shape).get(DATA, 1)
    batch = DATA if x.ndim >= 2 and data > 1 and x.shape[0] % data == 0 else None
    mid = [None] * max(x.ndim - 2, 0)
    lead = [batch] if x.ndim >= 2 else []
    x_spec = P(*lead, *mid, MODEL if w.split == "in" else None)
    out_spec = P(*lead, *mid, MODEL if w.split == "out" else None)
    w_specs = _quantized_specs(w, w.qs.ndim - 3).replace(layer=None if w.layer is None else P())

    def per_shard(x, w):
        y = unsharded_quantized_linear(x, w)
        return jax.lax.psum(y, MODEL) if w.split == "in" else y

    return _shard_map(per_shard, mesh, (x_spec, w_specs), out_spec, x, w)
