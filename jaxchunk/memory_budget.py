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
down (so no monotonicity is assumed and only one compile is needed when the largest fits). The
compiled figures come from `jaxchunk.steps.step_memory` (memoized on the shapes there).
"""
from __future__ import annotations

import os
from pathlib import Path

import jax
import numpy as np

from jaxchunk.config import LlamaConfig
from jaxchunk.errors import InputError
from jaxchunk.steps import MB, StepMemory, step_memory


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
