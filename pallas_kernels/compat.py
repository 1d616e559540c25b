"""The backend-specific Pallas knobs every kernel takes, in one place so that a jax upgrade that
moves them touches one file (pyproject requires jax >= 0.10, which has all of these)."""
from __future__ import annotations

import jax
from jax.experimental.pallas import triton as pallas_triton


def default_interpret() -> bool:
    """`interpret=None` means: interpret everywhere except on a GPU backend."""
    return jax.default_backend() != "gpu"


def triton_compiler_params(num_warps: int | None, num_stages: int | None) -> pallas_triton.CompilerParams:
    """Triton `CompilerParams` for `pl.pallas_call`; interpret mode ignores them, so passing them
    unconditionally is safe."""
    return pallas_triton.CompilerParams(num_warps=num_warps, num_stages=num_stages)
