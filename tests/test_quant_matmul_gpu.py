"""The quantized-matmul cases of test_quant_matmul.py compiled for a GPU (Pallas -> Triton,
interpret=False). Skipped, with the reason shown, wherever jax has no GPU backend."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from quant_cases import CASES, QTYPES, check, make_weight, make_x
from pallas_kernels.quant_matmul import quant_matmul_pallas

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        jax.default_backend() != "gpu",
        reason=f"needs a GPU: jax.default_backend() is {jax.default_backend()!r}; "
               "the same cases run in interpret mode in test_quant_matmul.py"),
]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_compiled_pallas_matches_oracle(case, qtype, dtype):
    qw, w = make_weight(case, qtype)
    x = make_x(case, dtype)
    args = [jnp.asarray(qw.qs), jnp.asarray(qw.scales), None if qw.mins is None else jnp.asarray(qw.mins)]
    # Triton tiles: powers of two >= 16.
    y = quant_matmul_pallas(jnp.asarray(x, dtype), *args, block_m=16, block_n=max(16, case.block_n),
                            interpret=False)
    check(y, x, w, dtype)
