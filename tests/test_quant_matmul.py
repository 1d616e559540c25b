"""Quantized weights (jaxchunk.weights.quantized) and the quantized matmul
(pallas_kernels.quant_matmul): packing, the Pallas kernel in interpret mode, the XLA CPU
formulations and the reference, each against an oracle from the `gguf` package + NumPy
(see quant_cases.py), and the model with quantized params against the same model with the
dequantized floats."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from quant_cases import CASES, QTYPES, Case, check, kernel_args, make_weight, make_x, q8_activations
from pallas_kernels.backends import choose_backend
from pallas_kernels.quant_matmul import (BACKENDS, DECODE_ROWS, IMPLS, XLA_FORMULATIONS, choose_tile, column_blocks,
                                         quant_matmul, quant_matmul_pallas, quant_matmul_reference, quant_matmul_xla)


# ----------------------------------------------------------------------------- packing
@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("case", CASES[:2], ids=lambda c: c.id)
def test_packed_blocks_dequantize_to_gguf_values(qtype, case):
    from jaxchunk.weights.quantized import dequantize
    qw, w = make_weight(case, qtype)
    assert qw.shape == (case.k, case.n)
    bytes_per_weight = {"Q4_0": 20 / 32, "Q4_1": 20 / 32, "Q8_0": 34 / 32}[qtype]  # f16 scale (+ min)
    assert qw.nbytes == case.k * case.n * bytes_per_weight
    # Exact: the f16 scales / mins are the file's bits and d * q + m is one f32 rounding in both.
    np.testing.assert_array_equal(np.asarray(dequantize(qw)), w.astype(np.float32))


@pytest.mark.parametrize("qtype", QTYPES)
def test_retile_is_lossless(qtype):
    """retile (the sharding planner's relayout) keeps every weight: 3 stacked layers of 192 columns,
    64-column tiles -> 32 and 96 -> back to 64, against the gguf package's values."""
    from jaxchunk.weights.quantized import dequantize, retile
    case = CASES[3]  # n 192 in tiles of 64
    pairs = [make_weight(case, qtype, seed=s) for s in range(3)]
    stacked = jax.tree.map(lambda *a: jnp.asarray(np.stack(a)), *[qw for qw, _ in pairs])
    expected = np.stack([w for _, w in pairs]).astype(np.float32)
    for tile in (32, 96, 64):
        stacked = retile(stacked, tile)
        assert stacked.qs.shape[-3:][::2] == (192 // tile, tile)
        np.testing.assert_array_equal(np.asarray(dequantize(stacked)), expected)
    with pytest.raises(ValueError, match="does not divide"):
        retile(stacked, 80)


def test_stacked_weight_dequantizes_per_layer():
    from jaxchunk.weights.quantized import dequantize
    pairs = [make_weight(CASES[1], "Q4_1", seed=s) for s in range(3)]
    stacked = jax.tree.map(lambda *a: np.stack(a), *[qw for qw, _ in pairs])
    assert stacked.shape == (3, CASES[1].k, CASES[1].n)
    np.testing.assert_array_equal(np.asarray(dequantize(stacked)), np.stack([w for _, w in pairs]).astype(np.float32))


def test_choose_tile():
    # 64 where it divides; else the widest multiple of 32, of 16, or n itself.
    assert [choose_tile(n) for n in (576, 1536, 49152, 262144, 96, 48, 40, 100)] == [64, 64, 64, 64, 32, 48, 40, 100]


def test_column_blocks():
    # One block up to 2 * 1024 columns; wider: the most whole tiles in <= 1024 columns.
    assert column_blocks(24, 64) == 24 and column_blocks(32, 64) == 32
    assert column_blocks(768, 64) == 16 and column_blocks(4096, 64) == 16
    assert column_blocks(35, 64) == 7        # 35 tiles: 7 of them (448 columns) divide evenly
    assert column_blocks(37, 64) == 1        # prime: one tile at a time
    assert column_blocks(3, 2048) == 1       # a tile wider than a block: one tile


# ----------------------------------------------------------------------------- matmul backends
@pytest.mark.parametrize("qtype", QTYPES)
def test_pallas_kernel_lowers_to_triton(qtype):
    """Compiled (interpret=False) lowering for CUDA via cross-platform export, without a GPU: catches
    tiles and primitives Triton rejects (PTX compilation itself needs a GPU: test_quant_matmul_gpu.py)."""
    from attention_cases import lower_for_cuda
    case = CASES[3]
    qw, _ = make_weight(case, qtype)
    qs, scales, mins = kernel_args(qw)

    def fn(x, qs, scales, *mins):
        return quant_matmul_pallas(x, qs, scales, *mins, block_m=16, block_n=64, interpret=False)
    module = lower_for_cuda(fn, jnp.asarray(make_x(case, "float32")), qs, scales, *([] if mins is None else [mins]))
    assert "triton" in str(module).lower()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_pallas_interpret_matches_oracle(case, qtype, dtype):
    qw, w = make_weight(case, qtype)
    x = make_x(case, dtype)
    y = quant_matmul_pallas(jnp.asarray(x, dtype), *kernel_args(qw), block_m=case.block_m, block_n=case.block_n,
                            interpret=True)
    assert y.dtype == jnp.dtype(dtype)
    check(y, x, w, dtype)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("formulation", sorted(XLA_FORMULATIONS) + ["reference"])
@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("case", CASES[1:3], ids=lambda c: c.id)
def test_xla_formulations_match_oracle(case, qtype, formulation, dtype):
    qw, w = make_weight(case, qtype)
    x = make_x(case, dtype)
    if formulation == "reference":
        y = quant_matmul_reference(jnp.asarray(x, dtype), *kernel_args(qw))
    else:
        y = quant_matmul_xla(jnp.asarray(x, dtype), *kernel_args(qw), formulation=formulation)
    assert y.dtype == jnp.dtype(dtype)
    check(y, x, w, dtype)


# The native CPU decode kernel (pallas_kernels/native_cpu.cc). Cases: the shared ones plus
# tiles wider than 128 split into several work items (ItemColumns: 136 -> 64 + 64 + 8, 1536 -> 4 x
# 384, 544 -> 3 x 160 + 64; narrower ones are one item: 100, and the loader's 64 in the shared
# cases), edges that are not a multiple of the vector kernels' 32 columns, and up to 16 rows.
CPU_CASES = CASES + [Case(1, 64, 136, None, 16, 32), Case(16, 96, 200, 100, 16, 32),
                     Case(2, 576, 1536, 1536, 16, 32), Case(1, 128, 1024 + 64, 1088 // 2, 16, 32)]


def _cpu_kernel():
    from pallas_kernels import native_cpu
    if not native_cpu.available():  # a failed build must not pass silently: fail with the reason
        pytest.fail(f"the CPU kernel did not build: {native_cpu.unavailable_reason()}")
    return native_cpu


@pytest.mark.parametrize("quantize_x", [False, True], ids=["float-x", "q8-x"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: c.id)
def test_cpu_kernel_matches_oracle(case, qtype, dtype, quantize_x):
    """Both activation modes: float x (weights dequantized in registers) and q8 x (integer dot
    products per block: AVX-512 VNNI for whole 64-column groups or AVX2 for 32-column ones, plain C++
    for the edge columns),
    the latter against x' @ W with x' from the NumPy Q8_0 oracle."""
    kernel = _cpu_kernel()
    qw, w = make_weight(case, qtype)
    x = make_x(case, dtype)
    y = jax.jit(kernel.quant_matmul_cpu, static_argnames="quantize_x")(jnp.asarray(x, dtype), *kernel_args(qw),
                                                                     quantize_x=quantize_x)
    assert y.dtype == jnp.dtype(dtype)
    # f32: the kernel sums each 32-block then scales, a different order from the oracle's; at
    # k = 576 the bound of the shared table still holds (measured ~1e-6). q8: the integer sums are
    # exact, so only the per-block scaling rounds (measured ~2e-7).
    check(y, q8_activations(x) if quantize_x else x, w, dtype)


@pytest.mark.parametrize("impl", list(BACKENDS))
@pytest.mark.parametrize("qtype", QTYPES)
def test_q8_activations_in_every_backend(impl, qtype):
    """activations="q8" means the same x' @ W in every backend (so chunk sizes that take different
    backends still agree), and differs from the float product by about 8-bit rounding."""
    case = CPU_CASES[-1]  # 1088 columns in tiles of 544: VNNI groups and scalar edges on the CPU
    qw, w = make_weight(case, qtype)
    x = make_x(case, "float32")
    y = quant_matmul(jnp.asarray(x), *kernel_args(qw), impl=impl, activations="q8")
    check(y, q8_activations(x), w, "float32")
    float_error = np.abs(np.asarray(y, np.float64) - x.astype(np.float64) @ w).max() / np.abs(x @ w).max()
    assert 1e-4 < float_error < 2e-2, float_error  # it did round x, by ~1 / 254 of each block's max
    with pytest.raises(ValueError, match="activations"):
        quant_matmul(jnp.asarray(x), *kernel_args(qw), activations="int4")


def test_cpu_kernel_reads_a_layer_of_a_stack_in_place():
    """Inside the model's layer scan the kernel gets the whole stack and a traced layer index."""
    kernel = _cpu_kernel()
    case = CPU_CASES[-2]
    pairs = [make_weight(case, "Q4_1", seed=s) for s in range(3)]
    stacked = jax.tree.map(lambda *a: jnp.asarray(np.stack(a)), *[qw for qw, _ in pairs])
    x = make_x(case, "float32")

    @jax.jit
    def per_layer(x, qs, scales, mins):
        def body(_, i):
            return None, kernel.quant_matmul_cpu(x, qs, scales, mins, layer=i)
        return jax.lax.scan(body, None, jnp.arange(3))[1]

    ys = per_layer(jnp.asarray(x), stacked.qs, stacked.scales, stacked.mins)
    for y, (_, w) in zip(ys, pairs):
        check(y, x, w, "float32")
    with pytest.raises(Exception, match="layer index out of range"):
        jax.block_until_ready(kernel.quant_matmul_cpu(jnp.asarray(x), stacked.qs, stacked.scales,
                                                      stacked.mins, layer=3))


def test_auto_dispatch_uses_the_native_kernels_on_cpu(monkeypatch):
    _cpu_kernel()
    qw, _ = make_weight(CASES[1], "Q4_1")
    qs, scales, mins = kernel_args(qw)
    auto = lambda x, scales, mins: choose_backend(BACKENDS, "auto", x, qs, scales, mins).name
    assert auto(jnp.ones((DECODE_ROWS, CASES[1].k)), scales, mins) == "native_cpu"
    assert auto(jnp.ones((DECODE_ROWS + 1, CASES[1].k)), scales, mins) == "native_cpu"  # native dequantize + dot
    f32 = lambda a: a.astype(jnp.float32)
    assert auto(jnp.ones((1, CASES[1].k)), f32(scales), f32(mins)) == "native_cpu"  # k-quant layouts: f32
    bf16 = lambda a: a.astype(jnp.bfloat16)
    assert auto(jnp.ones((1, CASES[1].k)), bf16(scales), bf16(mins)) == "xla"  # no kernel reads bf16 scales
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert auto(jnp.ones((1, CASES[1].k)), scales, mins) == "pallas"


def test_backend_table_and_what_native_cpu_refuses(monkeypatch):
    """Each entry says what it takes; an explicit impl that cannot take the call names the reason."""
    from pallas_kernels import native_cpu
    _cpu_kernel()
    assert IMPLS == ("auto", "pallas", "native_cpu", "xla", "reference")  # "auto" tries them in this order
    qw, _ = make_weight(CASES[0], "Q4_1")
    x, (qs, scales, mins) = jnp.ones((1, 64)), kernel_args(qw)
    f32 = lambda a: a.astype(jnp.float32)
    for name, backend in BACKENDS.items():
        assert backend.name == name and backend.doc
        if name != "native_cpu":
            assert backend.supports(x, qs, f32(scales), f32(mins), layer=None, activations="q8") is None
    supports = BACKENDS["native_cpu"].supports
    bf16 = lambda a: a.astype(jnp.bfloat16)
    assert supports(x, qs, scales, mins) is None and supports(x, qs, f32(scales), f32(mins)) is None
    assert "scales are bfloat16" in supports(x, qs, bf16(scales), mins)
    assert "mins are bfloat16" in supports(x, qs, scales, bf16(mins))
    with pytest.raises(ValueError, match=r"impl='native_cpu' cannot take this call: scales are bfloat16: .*float32"):
        quant_matmul(x, qs, bf16(scales), bf16(mins), impl="native_cpu")
    monkeypatch.setattr(native_cpu, "available", lambda: False)
    monkeypatch.setattr(native_cpu, "unavailable_reason", lambda: "no C++ compiler found")
    assert supports(x, qs, scales, mins) == "the native CPU kernels did not build: no C++ compiler found"
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert "CPU backend" in supports(x, qs, scales, mins)


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: c.id)
def test_cpu_dequantize_is_bit_exact(case, qtype):
    """The native dequantization (prefill's path) gives exactly the gguf package's float32 weights,
    also for one layer of a stack read in place."""
    kernel = _cpu_kernel()
    qw, w = make_weight(case, qtype)
    np.testing.assert_array_equal(np.asarray(kernel.dequantize_cpu(*kernel_args(qw))), w.astype(np.float32))
    qw2, w2 = make_weight(case, qtype, seed=7)
    qs, scales, mins = [None if a is None else jnp.stack([a, b]) for a, b in zip(kernel_args(qw), kernel_args(qw2))]
    w_layer1 = jax.jit(kernel.dequantize_cpu)(qs, scales, mins, layer=jnp.int32(1))
    np.testing.assert_array_equal(np.asarray(w_layer1), w2.astype(np.float32))
    with pytest.raises(Exception, match="layer index out of range"):
        jax.block_until_ready(kernel.dequantize_cpu(qs, scales, mins, layer=2))


@pytest.mark.parametrize("activations", ["float", "q8"])
def test_cpu_prefill_rows_match_oracle(activations):
    """More than DECODE_ROWS rows through impl="native_cpu" (native dequantization then XLA's dot)
    and impl="xla": weights of one column block (dequantized whole: 24 tiles of 64, 2 of 548) and of
    several (2304 columns in 36 tiles: 3 blocks of 12 tiles, each merged into one)."""
    _cpu_kernel()
    for case in (Case(40, 576, 1536, None, 16, 32), Case(37, 128, 1096, 548, 16, 32), Case(20, 64, 2304, None, 16, 32)):
        for qtype in QTYPES:
            qw, w = make_weight(case, qtype)
            x = make_x(case, "float32")
            for impl in ("native_cpu", "xla"):
                y = quant_matmul(jnp.asarray(x), *kernel_args(qw), impl=impl, activations=activations)
                check(y, q8_activations(x) if activations == "q8" else x, w, "float32")


def test_leading_axes_and_dispatch():
    """x [batch, seq, k] through the default dispatch (the model's call), default row choice."""
    case = CASES[1]
    qw, w = make_weight(case, "Q4_1")
    x = np.random.default_rng(5).normal(size=(2, 20, case.k)).astype(np.float32)
    for impl in ("auto", "xla", "native_cpu", "reference"):
        y = quant_matmul(jnp.asarray(x), *kernel_args(qw), impl=impl)
        assert y.shape == (2, 20, case.n)
        check(np.asarray(y).reshape(-1, case.n), x.reshape(-1, case.k), w, "float32")


def test_bad_inputs_raise_clear_errors():
    qw, _ = make_weight(CASES[0], "Q4_1")
    qs, scales, mins = kernel_args(qw)
    with pytest.raises(ValueError, match="does not match the weight's k"):
        quant_matmul_xla(jnp.ones((1, 32)), qs, scales, mins)
    with pytest.raises(ValueError, match="need mins"):
        quant_matmul_xla(jnp.ones((1, 64)), qs, scales, None)
    with pytest.raises(ValueError, match="uint8"):
        quant_matmul_xla(jnp.ones((1, 64)), qs.astype(jnp.int32), scales, mins)
    with pytest.raises(ValueError, match="impl"):
        quant_matmul(jnp.ones((1, 64)), qs, scales, mins, impl="magic")
    with pytest.raises(ValueError, match=r"impl must be one of \('auto', 'pallas', 'native_cpu', 'xla', "
                                         r"'reference'\), got 'cpu'"):
        quant_matmul(jnp.ones((1, 64)), qs, scales, mins, impl="cpu")  # the old name of native_cpu
    from jaxchunk.weights.quantized import pack_gguf_rows
    with pytest.raises(ValueError, match="qtype"):
        pack_gguf_rows(np.zeros((4, 18), np.uint8), "IQ2_XS", (4, 32))
    with pytest.raises(ValueError, match="multiple of 32"):
        pack_gguf_rows(np.zeros((4, 18), np.uint8), "Q4_0", (4, 40))
    with pytest.raises(ValueError, match="multiple of 256"):
        pack_gguf_rows(np.zeros((4, 144), np.uint8), "Q4_K", (4, 128))


# ----------------------------------------------------------------------------- in the model
def _tiny():
    from jaxchunk.testing import tiny_config
    from jaxchunk.model import init_params
    # hidden / head sizes multiples of 32 (quant blocks run along every matrix's input dim).
    config = tiny_config(vocab_size=160, intermediate_size=96, max_position_embeddings=128)
    return config, init_params(config, seed=0, scale=0.2)


def _dequantized_params(qparams):
    """The float params the quantized ones stand for (embedding back to [vocab, hidden])."""
    from jaxchunk.weights.quantized import QuantizedWeight, dequantize

    def leaf(x):
        return np.asarray(dequantize(x)) if isinstance(x, QuantizedWeight) else np.asarray(x)
    out = jax.tree.map(leaf, qparams, is_leaf=lambda x: isinstance(x, QuantizedWeight))
    out["embed"] = out["embed"].T
    return out


def test_quantized_model_matches_model_on_dequantized_weights():
    """forward and chunked model_step (prefill + decode) with QuantizedWeight params agree with the
    float model run on exactly the weights they stand for: the only difference is summation order."""
    from jaxchunk.cache import init_cache
    from jaxchunk.model import forward
    from jaxchunk.prefill import decode_step, prefill_chunk
    from jaxchunk.weights.quantized import QuantizedWeight, quantize_params
    config, params = _tiny()
    qparams = quantize_params(params, "Q4_1", "Q8_0")
    qparams["layers"]["wv"] = quantize_params(params, "Q4_0")["layers"]["wv"]  # a second 4-bit type
    assert isinstance(qparams["embed"], QuantizedWeight) and qparams["embed"].shape == (64, 160)
    fparams = _dequantized_params(qparams)
    qparams = jax.device_put(qparams)
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (2, 22)).astype(np.int32)
    run_forward = jax.jit(forward, static_argnums=1)
    expected = np.asarray(run_forward(fparams, config, ids))
    tol = 1e-4 * np.abs(expected).max()  # f32 logits ~10: summation order only, through 2 layers
    np.testing.assert_allclose(np.asarray(run_forward(qparams, config, ids)), expected, atol=tol)

    cache = init_cache(config, 2, 32, "f32")
    cache, chunk_logits = prefill_chunk(qparams, cache, ids[:, :20], config=config, attention_impl="xla",
                                        logits="all")
    np.testing.assert_allclose(np.asarray(chunk_logits), expected[:, :20], atol=tol)
    for i in range(20, 22):  # decode steps: rows = 2 takes the decode formulation
        cache, last = decode_step(qparams, cache, ids[:, i], config=config, attention_impl="xla")
        np.testing.assert_allclose(np.asarray(last), expected[:, i], atol=tol)


def test_quantized_embedding_gathers_rows():
    from jaxchunk.model import embed
    from jaxchunk.weights.quantized import quantize
    config, params = _tiny()
    for qtype in QTYPES:
        qembed = quantize(np.asarray(params["embed"]).T, qtype, tile=32)  # 5 tiles of 32 tokens
        full = _dequantized_params({"embed": qembed, "layers": {}})["embed"]
        tokens = jnp.array([[0, 31, 32, 159], [77, 5, 5, 100]])
        got = embed({"embed": qembed}, tokens, jnp.float32)
        np.testing.assert_array_equal(np.asarray(got), full[np.asarray(tokens)])


def test_q8_activation_model_gives_the_same_numbers_at_every_chunk_size():
    """With activations="q8" (weights="q4_q8") decode and small chunks run the native CPU kernel's
    integer products and large chunks the XLA path; both compute x' @ W, so chunked prefill at any
    chunk size and decode agree with the full forward up to summation order, as in float mode."""
    from jaxchunk.cache import init_cache
    from jaxchunk.model import forward
    from jaxchunk.prefill import decode_step, prefill_chunk
    from jaxchunk.weights.quantized import quantize_params, with_activations
    config, params = _tiny()
    qparams = quantize_params(params, "Q4_1", "Q8_0")
    q8params = jax.device_put(with_activations(qparams, "q8"))
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (2, 22)).astype(np.int32)
    run_forward = jax.jit(forward, static_argnums=1)
    expected = np.asarray(run_forward(q8params, config, ids))  # 44 rows: the XLA path
    tol = 1e-4 * np.abs(expected).max()
    float_logits = np.asarray(run_forward(jax.device_put(qparams), config, ids))
    assert np.abs(float_logits - expected).max() > 10 * tol  # the mode is on: x was rounded
    for chunk in (4, 20):  # 2 x 4 rows: native kernel; 2 x 20 rows: XLA
        cache = init_cache(config, 2, 32, "f32")
        got = []
        for start in range(0, 20, chunk):
            cache, logits = prefill_chunk(q8params, cache, ids[:, start:start + chunk], config=config, logits="all")
            got.append(np.asarray(logits))
        np.testing.assert_allclose(np.concatenate(got, axis=1), expected[:, :20], atol=tol)
        for i in range(20, 22):
            cache, last = decode_step(q8params, cache, ids[:, i], config=config)
            np.testing.assert_allclose(np.asarray(last), expected[:, i], atol=tol)
