"""The jitted model steps over a donated KV cache, the host-side guards every caller runs before them,
their compiled memory, and a guard against compiles after warm-up.

- `jitted_prefill_chunk` / `jitted_decode_step`: `jaxchunk.model.model_step` under `jax.jit` with the
  cache donated (updated in place). The position of each row is the traced `kv_cache.lengths`, so one
  compile serves every chunk of every prompt for a given (batch, chunk_len, config, impl, logits).
  They check nothing: call them through `jaxchunk.prefill` (`prefill_chunk`, `decode_step`,
  `iter_prefill`), or run `check_tokens` / `check_room` first. JAX clamps out-of-range dynamic
  slices silently, so a bad position would corrupt the cache without an error.
- `compiled_step_counts`: how many executables each step holds (tests count compiles with it).
- `step_memory`: XLA's memory analysis of the compiled prefill step for a chunk length.
- `compile_guard`: a context manager inside which any XLA compile raises `CompileAfterWarmupError`
  naming the step and shapes being called (use it after `jaxchunk.Model.warmup`); `count_compiles`
  counts them instead. Both listen to JAX's backend-compile event, which a load from the
  persistent compilation cache also fires.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax import monitoring

from jaxchunk.cache import KVCache
from jaxchunk.sharding import mesh_context, to_host
from jaxchunk.config import LlamaConfig
from jaxchunk.errors import CompileAfterWarmupError, InputError
from jaxchunk.model import LogitsMode, model_step

__all__ = ["jitted_prefill_chunk", "jitted_decode_step", "compiled_step_counts", "run_prefill_chunk",
           "run_decode_step", "check_tokens", "check_room", "host_lengths", "StepMemory", "step_memory", "shape_of",
           "compile_guard", "count_compiles", "CompileCount", "describing_call", "describe_arrays"]

MB = 1024 ** 2


# ----------------------------------------------------------------------------- jitted steps
@functools.partial(jax.jit, static_argnames=("config", "attention_impl", "logits"), donate_argnames=("kv_cache",))
def jitted_prefill_chunk(params, kv_cache: KVCache, tokens, n_valid, *, config: LlamaConfig, attention_impl: str,
                         logits: LogitsMode):
    """tokens [batch, chunk_len] int32, n_valid [batch] int32 -> (kv_cache, logits) as `model_step`."""
    return model_step(params, config, kv_cache, tokens, n_valid, attention_impl=attention_impl, logits=logits)


@functools.partial(jax.jit, static_argnames=("config", "attention_impl"), donate_argnames=("kv_cache",))
def jitted_decode_step(params, kv_cache: KVCache, tokens, *, config: LlamaConfig, attention_impl: str):
    """tokens [batch] int32 (one per row) -> (kv_cache, logits [batch, vocab])."""
    n_valid = jnp.ones(tokens.shape[:1], jnp.int32)
    return model_step(params, config, kv_cache, tokens[:, None], n_valid, attention_impl=attention_impl,
                      logits="last")


def compiled_step_counts() -> dict[str, int]:
    """How many executables the jitted steps hold (one per static shape / config / impl seen)."""
    return {"prefill_chunk": jitted_prefill_chunk._cache_size(), "decode_step": jitted_decode_step._cache_size()}


def run_prefill_chunk(params, kv_cache: KVCache, tokens: np.ndarray, n_valid: np.ndarray, *, config: LlamaConfig,
                      attention_impl: str, logits: LogitsMode):
    """`jitted_prefill_chunk` on host arrays the caller has already checked (as
    `jaxchunk.prefill.prefill_chunk` does), named for `compile_guard`'s message."""
    with describing_call(lambda: f"prefill_chunk({describe_arrays(tokens=tokens, kv_cache=kv_cache.keys)}, "
                                 f"attention_impl={attention_impl!r}, logits={logits!r})"), mesh_context(kv_cache):
        return jitted_prefill_chunk(params, kv_cache, jnp.asarray(tokens), jnp.asarray(n_valid), config=config,
                                    attention_impl=attention_impl, logits=logits)


def run_decode_step(params, kv_cache: KVCache, tokens: np.ndarray, *, config: LlamaConfig, attention_impl: str):
    """`jitted_decode_step` on host tokens [batch] the caller has already checked (as
    `jaxchunk.prefill.decode_step` does), named for `compile_guard`'s message."""
    with describing_call(lambda: f"decode_step({describe_arrays(tokens=tokens, kv_cache=kv_cache.keys)}, "
                                 f"attention_impl={attention_impl!r})"), mesh_context(kv_cache):
        return jitted_decode_step(params, kv_cache, jnp.asarray(tokens), config=config, attention_impl=attention_impl)


# ----------------------------------------------------------------------------- host guards
def host_lengths(kv_cache: KVCache) -> np.ndarray:
    """Per-row cache lengths on the host (waits for the step that produced them)."""
    return to_host(kv_cache.lengths)  # (gathered across processes when data spans them)


def check_tokens(tokens, config: LlamaConfig, ndim: int, what: str) -> np.ndarray:
    """`tokens` as int32 NumPy after checking its rank, integer dtype and id range; `what` names it in
    the error."""
    arr = np.asarray(tokens)
    if arr.ndim != ndim:
        raise InputError(f"{what} must have {ndim} dimension(s), got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise InputError(f"{what} must hold integer token ids, got dtype {arr.dtype}")
    if arr.size and (arr.min() < 0 or arr.max() >= config.vocab_size):
        raise InputError(f"{what} holds ids outside [0, {config.vocab_size}): "
                         f"min {arr.min()}, max {arr.max()}")
    return arr.astype(np.int32)


def check_room(lengths: np.ndarray, adding: np.ndarray, max_seq_len: int) -> None:
    """Raise if any row's `lengths + adding` would pass the cache capacity."""
    over = np.nonzero(lengths + adding > max_seq_len)[0]
    if over.size:
        b = int(over[0])
        raise InputError(f"row {b}: {int(lengths[b])} cached + {int(adding[b])} new tokens exceeds the "
                         f"cache capacity max_seq_len={max_seq_len}")


# ----------------------------------------------------------------------------- compiled memory
@dataclasses.dataclass(frozen=True)
class StepMemory:
    """XLA's memory analysis of one compiled prefill step (bytes)."""

    chunk_len: int
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int

    @property
    def peak_bytes(self) -> int:
        """arguments + outputs - aliased (donated cache, counted once) + temporaries."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

    def as_mb(self) -> dict[str, float]:
        return {"arg_mb": self.argument_bytes / MB, "out_mb": self.output_bytes / MB,
                "alias_mb": self.alias_bytes / MB, "temp_mb": self.temp_bytes / MB,
                "peak_mb": self.peak_bytes / MB}


def shape_of(tree):
    """The pytree as ShapeDtypeStructs: lowering needs shapes only and does not touch (or donate) the
    real buffers."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


def _signature(tree):
    """Hashable (structure, ((shape, dtype), ...)) of a pytree of arrays or ShapeDtypeStructs."""
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple((tuple(leaf.shape), jnp.dtype(leaf.dtype).name) for leaf in leaves)


def _from_signature(signature):
    treedef, leaves = signature
    return jax.tree.unflatten(treedef, [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in leaves])


@functools.lru_cache(maxsize=256)
def _step_memory_cached(params_sig, cache_sig, batch: int, config: LlamaConfig, chunk_len: int,
                        attention_impl: str, logits: str) -> StepMemory:
    tokens = jax.ShapeDtypeStruct((batch, chunk_len), jnp.int32)
    n_valid = jax.ShapeDtypeStruct((batch,), jnp.int32)
    compiled = jitted_prefill_chunk.lower(_from_signature(params_sig), _from_signature(cache_sig), tokens, n_valid,
                                          config=config, attention_impl=attention_impl, logits=logits).compile()
    stats = compiled.memory_analysis()
    if stats is None:
        raise InputError(f"the {jax.default_backend()} backend reports no compiled memory analysis: "
                         "a memory budget cannot be checked here; pass chunk_size instead")
    return StepMemory(chunk_len, int(stats.argument_size_in_bytes), int(stats.output_size_in_bytes),
                      int(stats.alias_size_in_bytes), int(stats.temp_size_in_bytes))


def step_memory(params, kv_cache, chunk_len: int, *, config: LlamaConfig, attention_impl: str = "auto",
                logits: str = "last") -> StepMemory:
    """Compiled memory of `jitted_prefill_chunk` for tokens [kv_cache.batch, chunk_len].

    peak = arguments (params, cache, tokens) + outputs (cache, logits) - aliased (the donated cache,
    updated in place, counted once) + temporaries (what the chunk length drives). params / kv_cache may
    be arrays or ShapeDtypeStructs: only shapes and dtypes are used, nothing is donated or run.
    Memoized on the shapes (an lru_cache, the only cache kept here); lowering and compiling a shape
    the process already ran is cheap, so its duration says nothing about compile time.
    """
    return _step_memory_cached(_signature(params), _signature(kv_cache), int(kv_cache.batch), config,
                               int(chunk_len), attention_impl, logits)


# ----------------------------------------------------------------------------- compile guard
# What the caller is running right now (set by `describing_call`), for the guard's error message.
_CALL: contextvars.ContextVar[Callable[[], str] | None] = contextvars.ContextVar("jaxchunk_call", default=None)
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@contextlib.contextmanager
def describing_call(describe: Callable[[], str]) -> Iterator[None]:
    """Within this block, a compile caught by `compile_guard` is reported as `describe()` (evaluated
    only then), e.g. "prefill_chunk(tokens int32[1, 64], ...)"."""
    token = _CALL.set(describe)
    try:
        yield
    finally:
        _CALL.reset(token)


def describe_arrays(**arrays) -> str:
    """"name dtype[shape], ..." of the given arrays (or ShapeDtypeStructs / pytrees: their first leaf)."""
    parts = []
    for name, value in arrays.items():
        leaf = jax.tree.leaves(value)[0] if not hasattr(value, "shape") else value
        parts.append(f"{name} {jnp.dtype(leaf.dtype).name}{list(leaf.shape)}")
    return ", ".join(parts)


@dataclasses.dataclass
class CompileCount:
    """What `count_compiles` saw: `count` XLA compiles (disk-cache loads included) taking `seconds`."""

    count: int = 0
    seconds: float = 0.0


@contextlib.contextmanager
def count_compiles() -> Iterator[CompileCount]:
    """Count the XLA compiles (any function, jaxchunk's or not) inside this block."""
    counted = CompileCount()

    def on_event(event: str, duration: float, **kwargs) -> None:
        if event == _COMPILE_EVENT:
            counted.count += 1
            counted.seconds += duration

    monitoring.register_event_duration_secs_listener(on_event)
    try:
        yield counted
    finally:
        monitoring.unregister_event_duration_listener(on_event)


@contextlib.contextmanager
def compile_guard() -> Iterator[None]:
    """Raise `CompileAfterWarmupError` when anything compiles inside this block.

    Use it after `jaxchunk.Model.warmup(...)` to prove a serving or benchmark loop runs on warmed-up
    executables only. The error names the compiled function and, for jaxchunk's own steps, the call
    and its shapes. Executables already in JAX's in-memory caches run as usual.
    """
    def on_event(event: str, duration: float, **kwargs) -> None:
        if event != _COMPILE_EVENT:
            return
        describe = _CALL.get()
        call = describe() if describe is not None else "a call outside jaxchunk's steps"
        raise CompileAfterWarmupError(
            f"{kwargs.get('fun_name', 'a function')} compiled inside compile_guard() ({duration:.2f} s), "
            f"while running {call}: this shape was not warmed up (Model.warmup's batch_sizes / chunk_sizes / "
            f"max_new_tokens)")

    monitoring.register_event_duration_secs_listener(on_event)
    try:
        yield
    finally:
        monitoring.unregister_event_duration_listener(on_event)
