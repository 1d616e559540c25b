"""The quantized-matmul cases of test_quant_matmul.py compiled for a GPU (Pallas -> Triton,
interpret=False). Skipped, with the reason shown, wherever jax has no GPU backend."""
from __future__ import annotations

import jax.numpy as jnp
import pytest

from gpu_marks import gpu_only
from quant_cases import CASES, QTYPES, check, kernel_args, make_weight, make_x
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
