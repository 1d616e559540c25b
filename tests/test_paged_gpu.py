"""The Pallas mixed paged kernel compiled for a GPU (Triton, interpret=False) on the ragged cases
test_paged.py runs in interpret mode, and `mixed_step` with impl="auto" (= pallas on a GPU).

Skipped, with the reason shown, wherever jax has no GPU backend.
"""
from __future__ import annotations

import jax
import numpy as np
import pytest
from gpu_marks import gpu_only
from test_paged import PAGED_CASES, PALLAS_PARAMS, format_pair, make_paged_inputs, numpy_paged_attention
from test_paged import test_pallas_backend_in_the_model as check_pallas_in_the_model  # not collected twice

from pallas_kernels.paged_flash_attention import paged_flash_attention

pytestmark = gpu_only("test_paged.py")

# Triton's exp / div are approximate (a few ulp) and its f32 dots may run in TF32 (~5e-4
# relative): the compiled kernel's tolerance is the contiguous Pallas kernels' on GPU, widened
# for TF32 (test_attention_gpu.py).
GPU_TOL = dict(atol=2e-3, rtol=2e-3)
GPU_CASES = [(c, f) for c, f in PALLAS_PARAMS] + [(c, "f32") for c in PAGED_CASES]


@pytest.mark.parametrize("case, fmt", GPU_CASES, ids=[f"{c.id}-{f}" for c, f in GPU_CASES])
def test_compiled_pallas_kernel_matches_numpy(case, fmt):
    inputs, seq_kv = make_paged_inputs(case, fmt)
    q, k, v, ks, vs, cu, kv_lens, page_table, num_seqs = inputs
    out = paged_flash_attention(q, k, v, cu, kv_lens, page_table, num_seqs, sliding_window=case.sliding_window,
                                soft_cap=case.soft_cap, kv_quant=None if fmt == "f32" else format_pair(fmt),
                                k_scales=ks, v_scales=vs, interpret=False)
    out = np.asarray(out)
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, numpy_paged_attention(q, np.asarray(cu), seq_kv, case), **GPU_TOL)


def test_mixed_step_on_gpu():
    """mixed_step with attention_impl="pallas", compiled, against `forward`; the model's own matmuls
    at "highest" precision (no TF32) so that the f32 model tolerance applies."""
    with jax.default_matmul_precision("highest"):
        check_pallas_in_the_model()
