"""Cases, inputs and an independent NumPy float64 oracle shared by
test_attention_kernels.py (CPU, interpret mode) and test_attention_gpu.py.

Not a test module (no test_ prefix): pytest does not collect it.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.attention_reference import attention_reference
from pallas_kernels.common import BlockSizes
from pallas_kernels.attention import BACKENDS
from pallas_kernels.blockwise_attention import blockwise_attention
from pallas_kernels.decode_attention import decode_attention, decode_attention_supports
from pallas_kernels.flash_attention import flash_attention
from pallas_kernels.kv_quant import KV_QUANTS


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    q_len: int
    heads: int
    kv_heads: int
    head_dim: int
    max_seq: int  # deliberately not a multiple of the test block_k (32)
    q_offset: tuple[int, ...]
    kv_len: tuple[int, ...]
    sliding_window: int | None = None
    soft_cap: float | None = None
    q_gain: float = 1.0  # scale q up so the soft-cap actually bites
    slow: bool = False


CASES = [
    # decode, GQA 3 (SmolLM2 ratio): first token, middle, cache exactly full.
    Case("q1_gqa3", 1, 9, 3, 64, 150, (0, 40, 149), (1, 41, 150)),
    # speculative chunk, GQA 8, head_dim 128.
    Case("q3_gqa8_d128", 3, 8, 1, 128, 77, (5, 60), (8, 63)),
    # padding rows: kv_len 0 (all zeros), q_offset + q_len > kv_len (padded tail);
    # max_seq 24 < block_k 32 exercises the small-cache path.
    Case("q3_padrows_g1", 3, 4, 4, 64, 24, (0, 10, 0), (0, 12, 2)),
    # first chunk of a prompt, MHA; second row is a padded last chunk (50 < 64).
    Case("q64_first_g1", 64, 2, 2, 64, 150, (0, 0), (64, 50)),
    # later chunk, GQA 3, head_dim 128; second row's tail is padding.
    Case("q64_later_gqa3_d128", 64, 6, 2, 128, 200, (64, 100), (128, 130)),
    # sliding window: row 1's padded tail ends up seeing nothing (zeros).
    Case("q64_window_gqa3", 64, 6, 2, 64, 160, (40, 0), (104, 30), sliding_window=16),
    # soft-cap with large logits.
    Case("q3_softcap_gqa3", 3, 9, 3, 64, 70, (20, 66), (23, 69), soft_cap=2.0, q_gain=4.0),
    # window + soft-cap on decode, GQA 8.
    Case("q1_window_softcap_gqa8_d128", 1, 8, 1, 128, 100, (99, 50), (100, 51),
         sliding_window=7, soft_cap=5.0, q_gain=3.0),
    # window + soft-cap on a chunk whose window starts past the first key blocks.
    Case("q64_window_softcap_gqa8", 64, 8, 1, 64, 230, (150, 0), (214, 0),
         sliding_window=40, soft_cap=3.0, q_gain=3.0),
    # Gemma 3's shape on decode: head_dim 256, GQA 4, a window of 512 the first row has passed.
    Case("q1_window_gqa4_d256", 1, 4, 1, 256, 530, (529, 100), (530, 101), sliding_window=512),
    # a long chunk (several query tiles, many key blocks), GQA 3.
    Case("q200_gqa3", 200, 3, 1, 64, 333, (0, 120), (200, 310), slow=True),
]

PALLAS_BF16_FAST = {"q1_gqa3", "q64_later_gqa3_d128"}

# Tolerances by input dtype. Oracle: float64 NumPy on the *same* (rounded) inputs.
TOL = {
    # f32 end to end on both sides: only summation order and the online-softmax
    # rescaling differ (~1e-7 relative per op over <= a few hundred terms).
    "float32": dict(atol=2e-5, rtol=2e-5),
    # bf16 inputs are rounded before the oracle sees them, so the error is the
    # kernels' own: p is cast to bf16 for the PV matmul (2^-9 relative per weight)
    # and the output is rounded to bf16 (2^-9 relative, |out| <~ 3): ~1e-2 worst.
    "bfloat16": dict(atol=2e-2, rtol=2e-2),
}


def make_inputs(case: Case, dtype: str, seed: int = 0, garbage=np.nan):
    """Returns jnp (q, k, v, q_offset, kv_len); the cache past kv_len is `garbage`
    (NaN by default, one row gets +inf) to prove nothing leaks."""
    rng = np.random.default_rng(seed)
    b = len(case.q_offset)
    q = rng.standard_normal((b, case.q_len, case.heads, case.head_dim)) * case.q_gain
    k = rng.standard_normal((b, case.max_seq, case.kv_heads, case.head_dim))
    v = rng.standard_normal((b, case.max_seq, case.kv_heads, case.head_dim))
    for i, n in enumerate(case.kv_len):
        fill = np.inf if (i == 1 and garbage is not None) else garbage
        if garbage is not None:
            k[i, n:], v[i, n:] = fill, fill
    cast = lambda x: jnp.asarray(x.astype(np.float32), dtype)
    return (cast(q), cast(k), cast(v), jnp.asarray(case.q_offset, jnp.int32),
            jnp.asarray(case.kv_len, jnp.int32))


def numpy_attention(q, k, v, q_offset, kv_len, *, sliding_window=None, soft_cap=None,
                    sm_scale=None):
    """Independent float64 oracle, written from the spec (loops over rows/heads).
    Also returns the [b, q_len] mask of query rows that see at least one key."""
    q, k, v = (np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (q, k, v))
    b, ql, nh, d = q.shape
    g = nh // k.shape[2]
    scale = 1.0 / np.sqrt(d) if sm_scale is None else sm_scale
    out = np.zeros_like(q)
    sees_any = np.zeros((b, ql), bool)
    for bi in range(b):
        n = int(kv_len[bi])
        pos = int(q_offset[bi]) + np.arange(ql)[:, None]
        j = np.arange(n)[None, :]
        vis = j <= pos
        if sliding_window is not None:
            vis &= j > pos - sliding_window
        sees_any[bi] = vis.any(axis=1)
        for h in range(nh):
            kh, vh = k[bi, :n, h // g], v[bi, :n, h // g]  # only the valid keys
            s = q[bi, :, h] @ kh.T * scale
            if soft_cap is not None:
                s = soft_cap * np.tanh(s / soft_cap)
            s = np.where(vis, s, -np.inf)
            for i in np.nonzero(sees_any[bi])[0]:
                w = np.exp(s[i] - s[i].max())
                out[bi, i, h] = (w / w.sum()) @ vh
    return out, sees_any


def check_against_oracle(out, case: Case, dtype: str, inputs, tol=None):
    q, k, v, q_offset, kv_len = inputs
    assert out.shape == q.shape and out.dtype == q.dtype
    out = np.asarray(jnp.asarray(out, jnp.float32))
    assert np.isfinite(out).all(), "NaN/inf leaked into the output"
    want, sees_any = numpy_attention(q, k, v, np.asarray(q_offset), np.asarray(kv_len),
                                     sliding_window=case.sliding_window,
                                     soft_cap=case.soft_cap)
    # Rows that see no key must be exact zeros, not merely close.
    assert (out[~sees_any] == 0).all()
    np.testing.assert_allclose(out, want, **(tol or TOL[dtype]))


# Small tiles so each case spans several query tiles and key blocks; still
# Triton-legal (powers of two >= 16) for the GPU run.
TEST_BLOCKS = BlockSizes(block_q=16, block_k=32)


# What decides whether a test backend takes a case: its entry's `supports` in the attention table,
# and for the two Pallas kernels (the "pallas" entry picks one by q_len) the decode kernel's own.
SUPPORTS = {"reference": BACKENDS["reference"].supports, "xla": BACKENDS["xla"].supports,
            "flash": BACKENDS["pallas"].supports, "decode": decode_attention_supports,
            "native_cpu": BACKENDS["native_cpu"].supports, "native_flash": BACKENDS["native_flash"].supports}


def require_native_cpu():
    """The native kernels, built: a failed build must fail, with the compiler's reason, not skip."""
    from pallas_kernels import native_cpu
    if not native_cpu.available():
        pytest.fail(f"the native CPU kernels did not build: {native_cpu.unavailable_reason()}")
    return native_cpu


def as_native_cpu_cache(k, v):
    """(k, v, kv_quant) as the native kernel takes a plain cache: f32 as is, bf16 as its uint16
    bits (the bf16 cache format)."""
    if k.dtype == jnp.bfloat16:
        k, v = (jax.lax.bitcast_convert_type(a, jnp.uint16) for a in (k, v))
        return k, v, KV_QUANTS["bf16"]
    return k, v, None


def run_backend(name, inputs, case, interpret=True):
    """Runs one backend (a SUPPORTS key) on make_inputs(...) output; skips, with the backend's own
    reason, a case its `supports` refuses. interpret: Pallas only."""
    kw = dict(sliding_window=case.sliding_window, soft_cap=case.soft_cap)
    q, k, v, q_offset, kv_len = inputs
    kv_quant = None
    if name in ("native_cpu", "native_flash"):
        native_cpu = require_native_cpu()
        k, v, kv_quant = as_native_cpu_cache(k, v)
    why = SUPPORTS[name](q, k, v, q_offset, kv_len, kv_quant=kv_quant, **kw)
    if why is not None:
        pytest.skip(f"{name}: {why}")
    if name == "reference":
        return attention_reference(*inputs, **kw)
    if name == "xla":
        # block_q 160 rows: long chunks also exercise the optional query tiling
        # (each tile is its own loop, so more tiles only cost compile time).
        return blockwise_attention(*inputs, block_sizes=BlockSizes(160, 32), **kw)
    if name == "flash":
        return flash_attention(*inputs, block_sizes=TEST_BLOCKS, interpret=interpret, **kw)
    if name == "decode":
        return decode_attention(*inputs, block_sizes=TEST_BLOCKS, k_splits=3,
                                interpret=interpret, **kw)
    if name == "native_cpu":  # the kernel itself, not the dispatcher
        return native_cpu.decode_attention_cpu(q, k, v, q_offset, kv_len, sm_scale=1 / np.sqrt(q.shape[-1]), **kw)
    if name == "native_flash":
        return native_cpu.flash_attention_cpu(q, k, v, q_offset, kv_len, sm_scale=1 / np.sqrt(q.shape[-1]), **kw)
    raise ValueError(name)


def backend_params(backends):
    """pytest params (name, case, dtype) over CASES x {f32, bf16} x backends (SUPPORTS keys); a
    case a backend does not take is skipped by run_backend with that backend's reason."""
    params = []
    for case in CASES:
        for dtype in ("float32", "bfloat16"):
            for name in backends:
                pallas = name in ("flash", "decode")
                # Interpret-mode compiles dominate the file's runtime: bf16 on the
                # Pallas kernels runs by default for two cases, the rest are slow.
                slow = pallas and (case.slow or (
                    dtype == "bfloat16" and case.id not in PALLAS_BF16_FAST))
                marks = [pytest.mark.slow] if slow else []
                params.append(pytest.param(name, case, dtype, marks=marks,
                                           id=f"{name}-{case.id}-{dtype}"))
    return params


def lower_for_cuda(fn, *args):
    """Pallas -> Triton lowering for CUDA via cross-platform export: catches
    non-power-of-two tiles and primitives Triton lacks, without a GPU. (PTX
    compilation itself still needs one: see test_attention_gpu.py.)"""
    import jax
    from jax import export
    try:
        exp = export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=[
            export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(*args)
    except (ImportError, NotImplementedError) as e:  # no Triton dialect in this jaxlib
        pytest.skip(f"cannot lower for CUDA here: {e}")
    return exp.mlir_module()
