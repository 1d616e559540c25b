"""The native dense gemv (pallas_kernels/native_cpu.cc's JaxchunkDenseGemv, jaxchunk/weights/dense.py):
against a NumPy float64 oracle, its VJP against XLA's, and the model's decode through it.

Tolerance: the kernel sums k f32 products in its own order (8-row passes, k split over work
items); each partial sum errs by <= k * 2^-24 of sum |x_i w_i| in the worst case, ~sqrt(k) * 2^-24
typically. The bound used, 1e-6 of sum |x_i w_i| (k <= 1536: 1536 * 6e-8 = 9e-5 worst case, so
this is tighter than the worst case and looser than the typical ~2e-6 * 6e-8 scale), held with
margin in every case (measured max ~1e-7).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxchunk.weights.bf16 import BF16Weight
from jaxchunk.weights.dense import DenseLayer, dense_linear


def _kernels():
    from pallas_kernels import native_cpu
    if jax.default_backend() != "cpu":
        pytest.skip("the native kernels run on the CPU backend")
    if not native_cpu.available():  # a failed build must not pass silently: fail with the reason
        pytest.fail(f"the CPU kernels did not build: {native_cpu.unavailable_reason()}")
    return native_cpu


# (layers, k, n, rows, transposed): edges off the vector width (37 x 45), k not a multiple of the
# 8-row pass (37, 100), the model's shapes (576 x 1536, 1536 x 576), a split into 8 work items
# (k >= 512), the tied head's layout (transposed) with a vocab not a multiple of its 256-row items.
CASES = [(3, 37, 45, 1, False), (3, 37, 45, 3, True), (2, 100, 64, 16, False), (2, 576, 1536, 1, False),
         (1, 1536, 576, 5, False), (1, 640, 1000, 2, True), (2, 64, 4099, 1, True)]


def _storage(w: np.ndarray, bf16: bool):
    """(the kernel's operand, its exact float64 values)."""
    if not bf16:
        return jnp.asarray(w), w.astype(np.float64)
    b = jnp.asarray(w, jnp.bfloat16)
    return jax.lax.bitcast_convert_type(b, jnp.uint16), np.asarray(b, np.float64)


@pytest.mark.parametrize("bf16", [False, True], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c[:4])) + ("-T" if c[4] else ""))
def test_dense_gemv_matches_float64_oracle(case, bf16):
    native_cpu = _kernels()
    layers, k, n, rows, transposed = case
    rng = np.random.default_rng(k * n + rows)
    w = rng.standard_normal((layers, n, k) if transposed else (layers, k, n)).astype(np.float32)
    x = rng.standard_normal((rows, k)).astype(np.float32)
    storage, exact = _storage(w, bf16)
    call = jax.jit(lambda x, w, layer: native_cpu.dense_gemv_cpu(x, w, layer=layer, transposed=transposed))
    for layer in range(layers):
        got = np.asarray(call(x, storage, layer), np.float64)
        mat = exact[layer].T if transposed else exact[layer]
        want = x.astype(np.float64) @ mat
        scale = np.abs(x).astype(np.float64) @ np.abs(mat)
        assert np.max(np.abs(got - want) / scale) < 1e-6, (layer, np.max(np.abs(got - want) / scale))


def test_dense_gemv_rejects_bad_operands():
    native_cpu = _kernels()
    with pytest.raises(Exception, match="layer index out of range"):
        jax.block_until_ready(native_cpu.dense_gemv_cpu(jnp.ones((1, 8)), jnp.ones((2, 8, 4)), layer=2))
    with pytest.raises(ValueError, match="does not match"):
        native_cpu.dense_gemv_cpu(jnp.ones((1, 8)), jnp.ones((2, 9, 4)), layer=0)
    with pytest.raises(ValueError, match="float32 or uint16"):
        native_cpu.dense_gemv_cpu(jnp.ones((1, 8)), jnp.ones((2, 8, 4), jnp.bfloat16), layer=0)


@pytest.mark.parametrize("transposed", [False, True], ids=["W", "W.T"])
def test_dense_linear_gradient_equals_xla(transposed):
    """The VJP (XLA's products of the same layer): d/dx and d/dstack of a loss through
    DenseLayer equal jax.grad of the plain einsum of the sliced layer."""
    _kernels()
    rng = np.random.default_rng(5)
    stack = jnp.asarray(rng.standard_normal((3, 24, 40) if transposed else (3, 40, 24)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((2, 3, 40)), jnp.float32)
    target = jnp.asarray(rng.standard_normal((2, 3, 24)), jnp.float32)
    spec = "...i,oi->...o" if transposed else "...i,io->...o"

    def loss_native(x, stack):
        return jnp.sum((dense_linear(x, DenseLayer(stack, jnp.int32(1)), transposed=transposed) - target) ** 2)

    def loss_xla(x, stack):
        return jnp.sum((jnp.einsum(spec, x, stack[1]) - target) ** 2)

    got, want = jax.grad(loss_native, (0, 1))(x, stack), jax.grad(loss_xla, (0, 1))(x, stack)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-5 * float(jnp.abs(w).max()))
    assert not np.any(np.asarray(got[1])[[0, 2]])  # only the used layer has a gradient


def test_bf16_weight_gemv_equals_xla_einsum():
    """A BF16Weight through dense_linear (bf16 x, f32 products) against XLA's bf16 einsum with f32
    accumulation, rounded to bf16 the same way: equal up to one bf16 rounding (2^-8 relative)."""
    _kernels()
    rng = np.random.default_rng(6)
    w = jnp.asarray(rng.standard_normal((96, 200)), jnp.bfloat16)
    x = jnp.asarray(rng.standard_normal((1, 96)), jnp.bfloat16)
    got = np.asarray(dense_linear(x, BF16Weight(jax.lax.bitcast_convert_type(w, jnp.uint16))), np.float32)
    want = np.asarray(jnp.einsum("ri,io->ro", x, w, preferred_element_type=jnp.float32).astype(jnp.bfloat16),
                      np.float32)
    assert got.dtype == np.float32 and got.shape == (1, 200)
    np.testing.assert_allclose(got, want, rtol=2 ** -8, atol=1e-6)


def test_decode_step_reads_dense_weights_in_place():
    """A decode step on CPU passes the f32 matrices whole to the native gemv: the compiled step
    holds no per-layer copy of them (its temporaries stay below one layer's weights), and its
    logits equal the XLA dots' (the same step at 17 rows, above DECODE_ROWS) within f32 noise."""
    _kernels()
    from jaxchunk.cache import init_cache
    from jaxchunk.model import init_params, model_step, native_gemv_rows
    from jaxchunk.testing import tiny_config
    config = tiny_config(vocab_size=512, hidden_size=256, intermediate_size=1024)
    params = init_params(config, seed=0, dtype=jnp.float32, scale=0.2)
    assert native_gemv_rows(1) and not native_gemv_rows(17)
    tokens = jnp.asarray(np.random.default_rng(7).integers(0, 512, (1, 17)), jnp.int32)

    def step(tokens):
        cache = init_cache(config, 1, 64, "f32")
        return model_step(params, config, cache, tokens, jnp.array([tokens.shape[1]], jnp.int32), logits="all")[1]

    one_by_one = []
    cache = init_cache(config, 1, 64, "f32")
    for i in range(4):  # decode-shaped steps of 1 row (native), vs the 17-row step (XLA)
        cache, logits = model_step(params, config, cache, tokens[:, i:i + 1], jnp.array([1], jnp.int32))
        one_by_one.append(np.asarray(logits))
    full = np.asarray(step(tokens))[0, :4]
    np.testing.assert_allclose(np.concatenate(one_by_one).reshape(4, -1), full, rtol=1e-4,
                               atol=1e-4 * np.abs(full).max())
    layer_bytes = sum(w[0].nbytes for k, w in params["layers"].items() if w.ndim == 3)
    cache = init_cache(config, 1, 64, "f32")
    compiled = jax.jit(lambda p, c, t: model_step(p, config, c, t, jnp.array([1], jnp.int32))).lower(
        params, cache, tokens[:, :1]).compile()
    assert compiled.memory_analysis().temp_size_in_bytes < layer_bytes
