"""Wall-clock timing of repeated calls, shared by `jaxchunk bench` and the experiment scripts.

    timing = timeit(lambda cache: prefill(params, config, cache, [ids])[1], repeats=5,
                    setup=lambda: (init_cache(config, 1, len(ids)),))
    timing.min_s, timing.median_s, timing.max_s, timing.samples_s, timing.compile_s, timing.summary()

One warm-up call (timed on its own: tracing and compiling land there), then `repeats` timed calls.
JAX dispatches asynchronously, so each call's result (and each `setup` result) is waited for with
`jax.block_until_ready` before the clock is read. JAX is not imported here: where no JAX is in use
(the experiments' torch / llama.cpp workers) there is nothing to wait for, and importing it would
add to the memory those workers report.
"""
from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from typing import Any, Callable


@dataclasses.dataclass(frozen=True)
class Timing:
    """Wall times in seconds of one warm-up call and of the timed calls after it."""
    first_s: float                # the warm-up call: tracing + compilation + one run
    samples_s: tuple[float, ...]  # the timed calls, in order

    def __post_init__(self):
        if not self.samples_s:
            raise ValueError("a Timing needs at least one timed call")

    @property
    def min_s(self) -> float:
        return min(self.samples_s)

    @property
    def median_s(self) -> float:
        return statistics.median(self.samples_s)

    @property
    def max_s(self) -> float:
        return max(self.samples_s)

    @property
    def compile_s(self) -> float:
        """First-call overhead: what the first call cost beyond a warm call (mostly compilation).
        Floored at 0: on a busy machine a warm call can take longer than the first."""
        return max(0.0, self.first_s - self.median_s)

    def summary(self) -> dict[str, Any]:
        """The numbers a benchmark reports (JSON-ready): first call, min / median / max, samples."""
        return {"first_s": self.first_s, "min_s": self.min_s, "median_s": self.median_s,
                "max_s": self.max_s, "samples_s": list(self.samples_s)}


def block_until_ready(value: Any) -> Any:
    """Wait for JAX results in `value` (a pytree; anything else is already done) and return it."""
    if "jax" in sys.modules:
        sys.modules["jax"].block_until_ready(value)
    return value


def timeit(fn: Callable, repeats: int, setup: Callable[[], tuple] | None = None) -> Timing:
    """Call `fn(*setup())` once (warm-up, timed separately), then `repeats` times, each timed.
    `setup` runs untimed before every call, warm-up included: prefill donates its cache, so each
    call needs a fresh one. Without `setup`, `fn()` is called with no arguments."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")

    def once() -> float:
        args = block_until_ready(setup() if setup else ())
        start = time.perf_counter()
        block_until_ready(fn(*args))
        return time.perf_counter() - start

    first = once()
    return Timing(first, tuple(once() for _ in range(repeats)))
