"""Version shims for Pallas APIs that moved between jax releases (0.10 vs 0.11).

All kernels import their backend-specific knobs from here so that a jax upgrade
touches one file.
"""
from __future__ import annotations

import functools

import jax


def default_interpret() -> bool:
    """`interpret=None` means: interpret everywhere except on a GPU backend."""
    return jax.default_backend() != "gpu"


@functools.cache
def _triton_params_class():
    # jax >= 0.5: `pallas.triton.CompilerParams`; older: `TritonCompilerParams`
    # (in `pallas.triton` or directly in `pallas`). Look in all places.
    try:
        from jax.experimental.pallas import triton as plgpu_triton
    except ImportError:  # pragma: no cover - depends on the jax build
        plgpu_triton = None
    for name in ("CompilerParams", "TritonCompilerParams"):
        cls = getattr(plgpu_triton, name, None)
        if cls is not None:
            return cls
    # `pl.CompilerParams` is the abstract base class, so only the old name counts.
    from jax.experimental import pallas as pl
    return getattr(pl, "TritonCompilerParams", None)


def triton_compiler_params(num_warps: int | None, num_stages: int | None):
    """Triton `CompilerParams` for `pl.pallas_call`, or None when this jax has none.

    Interpret mode ignores them, so passing them unconditionally is safe.
    """
    cls = _triton_params_class()
    if cls is None:  # pragma: no cover
        return None
    return cls(num_warps=num_warps, num_stages=num_stages)
