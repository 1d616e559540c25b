"""The attention cases of test_attention_kernels.py, compiled for a GPU
(Pallas/Triton kernels with interpret=False, and the XLA paths on the GPU).

Skipped, with the reason shown, wherever jax has no GPU backend.
"""
from __future__ import annotations

import pytest

from attention_cases import (CASES, TOL, backend_params, check_against_oracle,
                             make_inputs, run_backend)
from gpu_marks import gpu_only
from pallas_kernels.attention import attention

pytestmark = gpu_only("test_attention_kernels.py")

# On GPU the f32 tolerance widens: Triton's exp/div are approximate (a few ulp),
# and XLA:GPU may run f32 dots in TF32 (10-bit mantissa, ~5e-4 relative) at
# default precision for the blockwise path. bf16 bounds are unchanged.
GPU_TOL = {
    "pallas": {"float32": dict(atol=1e-4, rtol=1e-4), "bfloat16": TOL["bfloat16"]},
    "xla": {"float32": dict(atol=5e-3, rtol=5e-3), "bfloat16": TOL["bfloat16"]},
}


@pytest.mark.parametrize("name,case,dtype", backend_params(("xla", "flash", "decode")))
def test_compiled_backend_matches_numpy(name, case, dtype):
    inputs = make_inputs(case, dtype)
    out = run_backend(name, inputs, case, interpret=False)
    tol = GPU_TOL["xla" if name == "xla" else "pallas"][dtype]
    check_against_oracle(out, case, dtype, inputs, tol=tol)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_auto_uses_default_block_sizes(case):
    """impl="auto" on GPU = Pallas with the per-head_dim default BlockSizes."""
    inputs = make_inputs(case, "bfloat16")
    out = attention(*inputs, sliding_window=case.sliding_window, soft_cap=case.soft_cap)
    check_against_oracle(out, case, "bfloat16", inputs)
