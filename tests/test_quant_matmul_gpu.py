"""The quantized-matmul cases of test_quant_matmul.py compiled for a GPU (Pallas -> Triton,
interpret=False). Skipped, with the reason shown, wherever jax has no GPU backend."""
from __future__ import annotations

import jax.numpy as jnp
import pytest

from gpu_marks import gpu_only
from quant_cases import CASES, KQUANT_SPECS, QTYPES, Case, check, kernel_args, make_stack, make_weight, make_x
from pallas_kernels.quant_matmul import quant_matmul_pallas

pytestmark = gpu_only("test_quant_matmul.py")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_compiled_pallas_matches_oracle(case, qtype, dtype):
    qw, w = make_weight(case, qtype)
    x = make_x(case, dtype)
    # Triton tiles: powers of two >= 16.
    y = quant_matmul_pallas(jnp.asarray(x, dtype), *kernel_args(qw), block_m=16, block_n=max(16, case.block_n),
                            interpret=False)
    check(y, x, w, dtype)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("spec", KQUANT_SPECS)
def test_compiled_pallas_kquant_layouts_match_oracle(spec, dtype):
    """The k-quant layouts (f32 scales, groups of 16, 8-bit with mins), every layer of a stack
    (interpret mode: test_kquant_matmul.py)."""
    qw, w = make_stack(spec)
    x = make_x(Case(33, w.shape[1], w.shape[2], None, 16, 64), dtype)
    for i in range(w.shape[0]):
        args = [None if a is None else a[i] for a in kernel_args(qw)]
        y = quant_matmul_pallas(jnp.asarray(x, dtype), *args, block_m=16, block_n=64, interpret=False)
        check(y, x, w[i], dtype)
