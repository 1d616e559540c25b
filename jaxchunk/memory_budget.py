"""Chunk length from a memory budget, measured on the compiled step (not guessed).

exllamav2 lowers its chunk length "based on available memory"; here the rule is exact for the
executable that will run: each candidate chunk length (the power-of-two set {1, 2, 4, ...,
max_input_len} that `chunk_schedule` already uses, so no new shapes appear) is lowered and compiled
for the real params / cache / batch / dtype / attention impl, and XLA's `memory_analysis()` says what
it needs:

    peak_bytes = argument_bytes + output_bytes - alias_bytes + temp_bytes

Arguments are the params, the cache and the tokens; outputs the updated cache and the logits; the
donated cache is aliased to its output (updated in place), so it is counted once, not twice;
temporaries are the activations, attention scores, etc. of one chunk. This is what the step holds
while it runs (XLA's own accounting of its buffers, not allocator overhead or the host process).

`pick_chunk_len` returns the largest candidate whose peak fits the budget, scanning from the largest
down (so no monotonicity is assumed and only one compile is needed when the largest fits). Compiled
figures are memoized in `_step_memory_cached`, a functools.lru_cache keyed on hashable shape
signatures (pytree structure + shapes + dtypes of params and cache), config, chunk length, impl and
logits mode: the only cache this module keeps. Lowering reuses jit's tracing caches, so the chosen
chunk's executable is usually not rebuilt when prefill runs it.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxchunk.config import LlamaConfig
from jaxchunk.errors import InputError

MB = 1024 ** 2


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
    from jaxchunk.prefill import _prefill_chunk  # prefill imports this module
    tokens = jax.ShapeDtypeStruct((batch, chunk_len), jnp.int32)
    n_valid = jax.ShapeDtypeStruct((batch,), jnp.int32)
    compiled = _prefill_chunk.lower(_from_signature(params_sig), _from_signature(cache_sig), tokens, n_valid,
                                    config=config, attention_impl=attention_impl, logits=logits).compile()
    stats = compiled.memory_analysis()
    if stats is None:
        raise InputError(f"the {jax.default_backend()} backend reports no compiled memory analysis: "
                         "a memory budget cannot be checked here; pass chunk_size instead")
    return StepMemory(chunk_len, int(stats.argument_size_in_bytes), int(stats.output_size_in_bytes),
                      int(stats.alias_size_in_bytes), int(stats.temp_size_in_bytes))


def step_memory(params, kv_cache, chunk_len: int, *, config: LlamaConfig, attention_impl: str = "auto",
                logits: str = "last") -> StepMemory:
    """Compiled memory of `prefill_chunk` for tokens [kv_cache.batch, chunk_len]. params / kv_cache may
    be arrays or ShapeDtypeStructs (only shapes and dtypes are used; nothing is donated or run)."""
    return _step_memory_cached(_signature(params), _signature(kv_cache), int(kv_cache.batch), config, int(chunk_len),
                               attention_impl, logits)


def candidate_chunk_lens(max_chunk_len: int) -> list[int]:
    """Powers of two 1, 2, 4, ... up to the largest <= max_chunk_len (chunk_schedule's static set)."""
    if not isinstance(max_chunk_len, (int, np.integer)) or max_chunk_len < 1:
        raise InputError(f"the largest chunk length must be a positive int, got {max_chunk_len!r}")
    return [1 << i for i in range(int(max_chunk_len).bit_length())]


def pick_chunk_len(params, kv_cache, memory_budget_bytes: int, *, config: LlamaConfig, max_chunk_len: int,
                   attention_impl: str = "auto", logits: str = "last") -> tuple[int, StepMemory]:
    """The largest power-of-two chunk length <= max_chunk_len whose compiled step fits the budget.

    Returns (chunk_len, its StepMemory). Raises InputError naming the smallest budget that works
    when no candidate fits.
    """
    if isinstance(memory_budget_bytes, bool) or not isinstance(memory_budget_bytes, (int, np.integer)) \
            or memory_budget_bytes <= 0:
        raise InputError(f"memory_budget_bytes must be a positive int, got {memory_budget_bytes!r}")
    measured = []
    for chunk_len in reversed(candidate_chunk_lens(max_chunk_len)):
        memory = step_memory(params, kv_cache, chunk_len, config=config, attention_impl=attention_impl,
                             logits=logits)
        if memory.peak_bytes <= memory_budget_bytes:
            return chunk_len, memory
        measured.append(memory)
    smallest = min(measured, key=lambda m: m.peak_bytes)
    raise InputError(
        f"memory budget {memory_budget_bytes} bytes ({memory_budget_bytes / MB:.4g} MiB) is too small for "
        f"any chunk length: the smallest budget that works is {smallest.peak_bytes} bytes "
        f"({smallest.peak_bytes / MB:.4g} MiB, chunk length {smallest.chunk_len}; the params and cache "
        f"alone take {smallest.argument_bytes} bytes)")


def _mem_available_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def default_memory_budget(params, kv_cache) -> int:
    """The budget `chunk_size="auto"` uses when none is given: what the device can still allocate
    plus the params and cache, which are already resident and counted among the step's arguments.

    Device memory stats (GPU: bytes_limit - bytes_in_use) where the backend has them, else the host's
    MemAvailable (CPU). Raises InputError when neither is known.
    """
    first = jax.tree.leaves(kv_cache)[0]
    device = next(iter(first.devices())) if isinstance(first, jax.Array) else jax.devices()[0]
    stats = device.memory_stats()
    if stats and "bytes_limit" in stats:
        free = int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    else:
        free = _mem_available_bytes()
        if free is None:
            raise InputError("free memory is unknown on this platform: pass memory_budget_bytes")
    resident = sum(leaf.nbytes for leaf in jax.tree.leaves((params, kv_cache)))
    return free + resident
