"""Quantized KV cache (pallas_kernels.kv_quant, jaxchunk.cache): round-trip error bounds per format,
the documented packed layout (read back by an independent NumPy decoder), the Hadamard rotation,
the donated cache with its scale arrays, every attention backend reading a quantized cache, and
chunked prefill into a quantized cache against a full forward over the same quantized K/V.

Why the model-level comparison is "teacher-forced": a quantizer is discontinuous. Chunked prefill
and a full forward compute K/V with different matmul shapes and softmax summation orders, so they
agree to ~1e-7 relative, not bit for bit; a value that sits within that noise of a rounding
boundary (or a float16 scale at its own rounding tie) is stored one level apart, and a random
model with peaked attention amplifies one such level to visible logit differences. So the tests
separate the two claims:
  1. given the K/V codes the chunked prefill stored, its logits equal a plain full causal forward
     over those same dequantized K/V to float32 tolerance (the chunking adds no error of its own);
  2. those codes are the quantization of what the full forward computes, up to rounding ties
     (a tiny fraction of elements, each off by at most one quantization level).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_cases import CASES, TEST_BLOCKS, lower_for_cuda, make_inputs, numpy_attention
from jaxchunk.cache import CACHE_DTYPES, KVCache, init_cache, resolve_cache_dtype
from jaxchunk.testing import tiny_config
from jaxchunk.errors import InputError
from jaxchunk.model import (compute_dtype, embed, forward, full_causal_attention, init_params, linear,
                            lm_head, mlp, qkv, rms_norm, rope_inv_freq)
from jaxchunk.prefill import decode_step, prefill, prefill_chunk
from jaxchunk.steps import jitted_prefill_chunk
from pallas_kernels.attention import attention
from pallas_kernels.kv_quant import (KV_QUANTS, QUANT_BLOCK, dequantize, fake_quantize, hadamard_matrix,
                                     quantize, rotate)

CONFIG = tiny_config(vocab_size=512, hidden_size=128, intermediate_size=256, num_heads=6, head_dim=64,
                     max_position_embeddings=2048, tie_word_embeddings=False)
INT_FORMATS = ("q8", "q6", "q4", "q8_norot", "q6_norot", "q4_norot")
# The documented field split of a packed code, low bits first (written from the docstring, not
# read from the code under test).
FIELDS = {8: (8,), 6: (4, 2), 4: (4,)}


@pytest.fixture(scope="module")
def params():
    # scale 0.2: peaked, position-dependent attention, so a wrong K/V or mask shows in the logits.
    return init_params(CONFIG, seed=0, scale=0.2)


def kv_like(shape, seed=0, outliers=True):
    """K/V-like test data: standard normal with a few large outliers (what the rotation is for)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape)
    if outliers:
        x = np.where(rng.random(shape) < 0.01, 20.0 * rng.standard_normal(shape), x)
    return x.astype(np.float32)


# ----------------------------------------------------------------------------- independent decoder
def numpy_hadamard():
    """scipy's Hadamard matrix (scipy is a dependency of jax), normalised: float64 [32, 32]."""
    from scipy.linalg import hadamard
    return hadamard(QUANT_BLOCK).astype(np.float64) / np.sqrt(QUANT_BLOCK)


def numpy_codes(stored, bits):
    """Unsigned codes [..., head_dim] from the packed uint8 layout the module docstring describes:
    fields of FIELDS[bits] bits, low bits first; a field packs 8 / w consecutive elements per byte,
    element t at bit w * t; the fields' byte arrays follow one another."""
    stored = np.asarray(stored).astype(np.int64)
    head_dim = stored.shape[-1] * 8 // bits
    codes = np.zeros((*stored.shape[:-1], head_dim), np.int64)
    offset = shift = 0
    for w in FIELDS[bits]:
        per_byte, n = 8 // w, head_dim * w // 8
        byte = stored[..., offset:offset + n]
        for t in range(per_byte):
            codes[..., t::per_byte] |= ((byte >> (w * t)) & (2 ** w - 1)) << shift
        offset += n
        shift += w
    return codes


def numpy_decode(stored, scales, spec):
    """float64 values in the original basis: (code - 2^(bits-1)) * scale, then un-rotate."""
    if not spec.packed:  # bf16 / fp8 are stored as raw bits: reinterpret them with NumPy (ml_dtypes)
        return np.asarray(stored).view(spec.element_dtype).astype(np.float64)
    codes = numpy_codes(stored, spec.bits) - 2 ** (spec.bits - 1)
    with np.errstate(invalid="ignore"):  # NaN garbage past kv_len in the attention cases
        values = codes * np.repeat(np.asarray(scales, np.float64), QUANT_BLOCK, axis=-1)
    if spec.rotate:
        blocks = values.reshape(*values.shape[:-1], -1, QUANT_BLOCK)
        values = (blocks @ numpy_hadamard()).reshape(values.shape)
    return values


# ----------------------------------------------------------------------------- formats
def test_hadamard_is_orthonormal_and_its_own_inverse():
    h = hadamard_matrix(QUANT_BLOCK)
    np.testing.assert_array_equal(np.abs(h) * np.sqrt(QUANT_BLOCK), 1.0)  # entries +-1/sqrt(32)
    np.testing.assert_allclose(h, numpy_hadamard(), atol=0)  # scipy's Sylvester construction
    np.testing.assert_allclose(h @ h, np.eye(QUANT_BLOCK), atol=1e-15)
    x = jnp.asarray(kv_like((4, 7, 3, 128)))
    spec = KV_QUANTS["q4"]
    # float32 rotation twice: ~1e-7 relative per element (32-term sums), well under 1e-5.
    np.testing.assert_allclose(rotate(rotate(x, spec), spec), x, atol=1e-5 * np.abs(x).max())
    # q . k is invariant (what lets the kernels rotate q instead of un-rotating the cache).
    q = jnp.asarray(kv_like((4, 7, 3, 128), seed=1))
    np.testing.assert_allclose(jnp.sum(rotate(q, spec) * rotate(x, spec), -1), jnp.sum(q * x, -1),
                               atol=1e-4 * float(jnp.abs(jnp.sum(q * x, -1)).max()))
    assert rotate(x, KV_QUANTS["q4_norot"]) is x


@pytest.mark.parametrize("name", INT_FORMATS)
def test_integer_formats_round_trip_within_half_a_step(name):
    spec = KV_QUANTS[name]
    x = kv_like((5, 9, 2, 128))
    stored, scales = quantize(jnp.asarray(x), spec)
    assert stored.dtype == jnp.uint8 and stored.shape == (5, 9, 2, 128 * spec.bits // 8)
    assert scales.dtype == jnp.float16 and scales.shape == (5, 9, 2, 128 // QUANT_BLOCK)
    # Independent expectations in float64: the rotated blocks and their absmax scale.
    blocks = x.astype(np.float64).reshape(5, 9, 2, -1, QUANT_BLOCK)
    if spec.rotate:
        blocks = blocks @ numpy_hadamard()
    want_scale = np.abs(blocks).max(-1) / (2 ** (spec.bits - 1) - 1)
    # Scales are float16: relative rounding <= 2^-11.
    np.testing.assert_allclose(np.asarray(scales, np.float64), want_scale, rtol=2 ** -11)
    # Codes read back by the independent decoder of the documented layout: every element within
    # half a quantization step of its (rotated) value, i.e. the bound the docstring states, plus
    # float32 noise of the rotation.
    codes = numpy_codes(stored, spec.bits) - 2 ** (spec.bits - 1)
    assert np.abs(codes).max() <= 2 ** (spec.bits - 1) - 1
    step = np.asarray(scales, np.float64)[..., None]
    err = np.abs(codes.reshape(blocks.shape) * step - blocks)
    assert (err <= step / 2 * (1 + 1e-6) + 1e-6).all(), float((err / step).max())
    # In the original basis the rotation keeps the L2 error per block (orthonormal).
    back = numpy_decode(stored, scales, spec).reshape(blocks.shape)
    orig = x.astype(np.float64).reshape(blocks.shape)
    per_block = np.sqrt(((back - orig) ** 2).sum(-1))
    assert (per_block <= np.sqrt(QUANT_BLOCK) * step[..., 0] / 2 * (1 + 1e-6) + 1e-5).all()
    # And the module's own decode agrees with the independent one.
    np.testing.assert_allclose(fake_quantize(jnp.asarray(x), spec), back.reshape(x.shape),
                               atol=1e-5 * np.abs(x).max())


# Round to nearest with p significant bits: |error| <= 2^-p |x| in the normal range, half the
# subnormal spacing below it.
@pytest.mark.parametrize("name, rel, tiny", [
    ("f32", 0.0, 0.0),
    ("bf16", 2.0 ** -8, 0.0),             # p = 8
    ("fp8_e4m3", 2.0 ** -4, 2.0 ** -10),  # p = 4; subnormal spacing 2^-9
    ("fp8_e5m2", 2.0 ** -3, 2.0 ** -17),  # p = 3; subnormal spacing 2^-16
])
def test_float_formats_round_trip(name, rel, tiny):
    spec = KV_QUANTS[name]
    x = kv_like((6, 3, 2, 64))
    x[0, 0, 0, :4] = [1e-5, -3e-4, 1e-3, 0.0]  # subnormal range of the fp8 formats
    stored, scales = quantize(jnp.asarray(x), spec)
    assert scales is None and stored.dtype == spec.dtype and stored.shape == x.shape
    back = np.asarray(dequantize(stored, None, spec), np.float64)
    assert (np.abs(back - x) <= rel * np.abs(x) + tiny).all()


def test_fp8_saturates_instead_of_overflowing():
    big = jnp.asarray([[1e4, -1e6, 500.0, 3.0]], jnp.float32)
    e4m3 = np.asarray(fake_quantize(big, KV_QUANTS["fp8_e4m3"]))
    np.testing.assert_array_equal(e4m3, [[448.0, -448.0, 448.0, 3.0]])
    e5m2 = np.asarray(fake_quantize(big, KV_QUANTS["fp8_e5m2"]))
    assert np.isfinite(e5m2).all() and e5m2[0, 1] == -57344.0


def test_all_zero_block_and_rotation_help_on_outliers():
    spec = KV_QUANTS["q4"]
    zeros = jnp.zeros((2, 64))
    np.testing.assert_array_equal(fake_quantize(zeros, spec), 0.0)
    # One outlier per block: without the rotation it sets the scale and the other 31 values fall
    # to a handful of levels; rotated, it is spread over the block (the point of the rotation).
    x = np.random.default_rng(0).standard_normal((256, 64)).astype(np.float32)
    x[:, ::QUANT_BLOCK] = 30.0
    errors = {n: float(jnp.mean((fake_quantize(jnp.asarray(x), KV_QUANTS[n]) - x) ** 2))
              for n in ("q4", "q4_norot")}
    assert errors["q4"] < 0.5 * errors["q4_norot"], errors


def test_cache_layout_bytes_and_errors():
    cache = init_cache(CONFIG, 2, 48, "q4")
    lead = (CONFIG.num_layers, 2, 48, CONFIG.num_kv_heads)
    assert cache.keys.shape == cache.values.shape == (*lead, CONFIG.head_dim // 2)
    assert cache.keys.dtype == jnp.uint8
    assert cache.key_scales.shape == cache.value_scales.shape == (*lead, CONFIG.head_dim // 32)
    assert cache.key_scales.dtype == jnp.float16
    # Bytes per token (K and V, all layers), by hand: head_dim * bits / 8 + 2 bytes per scale.
    per_head = {"f32": 64 * 4, "bf16": 64 * 2, "fp8_e4m3": 64, "fp8_e5m2": 64,
                "q8": 64 + 2 * 2, "q6": 48 + 2 * 2, "q4": 32 + 2 * 2}
    for name, nbytes in per_head.items():
        c = init_cache(CONFIG, 1, 16, name)
        assert c.bytes_per_token == 2 * CONFIG.num_layers * CONFIG.num_kv_heads * nbytes, name
    # Plain names and dtypes still work; bf16 / fp8 are stored as raw bits (in-place scatter on CPU).
    assert resolve_cache_dtype("float32") == KV_QUANTS["f32"]
    assert resolve_cache_dtype(jnp.bfloat16) == KV_QUANTS["bf16"]
    assert init_cache(CONFIG, 1, 16, "bf16").keys.dtype == jnp.uint16
    assert init_cache(CONFIG, 1, 16, "bf16").dtype == jnp.bfloat16
    assert init_cache(CONFIG, 1, 16, "fp8_e5m2").keys.dtype == jnp.uint8
    with pytest.raises(InputError, match="unknown cache dtype 'q3'.*q4"):
        init_cache(CONFIG, 1, 16, "q3")
    with pytest.raises(InputError, match="divisible by 32"):
        init_cache(tiny_config(vocab_size=8, hidden_size=48, intermediate_size=8, num_layers=1, num_heads=3,
                               num_kv_heads=1, max_position_embeddings=64),
                   1, 16, "q8")
    assert set(CACHE_DTYPES) >= {"f32", "bf16", "fp8_e4m3", "fp8_e5m2", "q8", "q6", "q4"}


# ----------------------------------------------------------------------------- attention backends
BACKENDS = {
    "reference": dict(impl="reference"),
    "xla": dict(impl="xla"),
    "pallas": dict(impl="pallas", block_sizes=TEST_BLOCKS, interpret=True),
}


def quantized_case_inputs(case, spec, seed=0):
    """make_inputs(...) with K/V stored in `spec`; garbage past kv_len is whatever the NaN/inf
    inputs quantize to (it must not leak)."""
    q, k, v, qo, kl = make_inputs(case, "float32", seed=seed)
    k_stored, k_scales = quantize(k, spec)
    v_stored, v_scales = quantize(v, spec)
    return q, k_stored, v_stored, qo, kl, k_scales, v_scales


FAST_BACKEND_CASES = {(CASES[5].id, "q4"), (CASES[5].id, "fp8_e4m3"), (CASES[0].id, "q6")}


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("case, name", [
    pytest.param(c, n, id=f"{c.id}-{n}",
                 marks=[] if (c.id, n) in FAST_BACKEND_CASES else [pytest.mark.slow])
    for c in (CASES[0], CASES[5]) for n in ("q4", "q6", "q8_norot", "fp8_e4m3", "bf16")])
def test_backends_read_a_quantized_cache(case, name, backend):
    """Every backend against the NumPy float64 oracle run on K/V decoded by the independent NumPy
    decoder. Tolerance: the f32 one of attention_cases (2e-5): both sides see identical K/V values
    (up to the float32 rotation, ~1e-7), so only summation order differs."""
    spec = KV_QUANTS[name]
    q, k, v, qo, kl, ks, vs = quantized_case_inputs(case, spec)
    out = attention(q, k, v, qo, kl, kv_quant=spec, k_scales=ks, v_scales=vs,
                    sliding_window=case.sliding_window, soft_cap=case.soft_cap, **BACKENDS[backend])
    k_dec, v_dec = numpy_decode(k, ks, spec), numpy_decode(v, vs, spec)
    want, sees_any = numpy_attention(q, k_dec, v_dec, np.asarray(qo), np.asarray(kl),
                                     sliding_window=case.sliding_window, soft_cap=case.soft_cap)
    out = np.asarray(out)
    assert np.isfinite(out).all()
    assert (out[~sees_any] == 0).all()
    np.testing.assert_allclose(out, want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("impl", ["xla", "reference", "pallas"])
def test_layer_index_into_stacked_quantized_cache(impl):
    """The model passes the whole cache [layers, ...] (and its scales) with a traced layer."""
    case, spec = CASES[1], KV_QUANTS["q4"]
    per_layer = [quantized_case_inputs(case, spec, seed=s) for s in range(3)]
    q, _, _, qo, kl, _, _ = per_layer[1]
    stack = [jnp.stack([x[i] for x in per_layer]) for i in (1, 2, 5, 6)]
    extra = dict(block_sizes=TEST_BLOCKS, interpret=True) if impl == "pallas" else {}
    run = jax.jit(lambda layer: attention(q, stack[0], stack[1], qo, kl, layer=layer, impl=impl,
                                          kv_quant=spec, k_scales=stack[2], v_scales=stack[3], **extra))
    _, k, v, _, _, ks, vs = per_layer[1]
    want, _ = numpy_attention(q, numpy_decode(k, ks, spec), numpy_decode(v, vs, spec),
                              np.asarray(qo), np.asarray(kl))
    np.testing.assert_allclose(run(jnp.int32(1)), want, atol=2e-5, rtol=2e-5)


def test_backends_reject_mismatched_cache():
    case, spec = CASES[0], KV_QUANTS["q4"]
    q, k, v, qo, kl, ks, vs = quantized_case_inputs(case, spec)
    with pytest.raises(ValueError, match="k_scales"):
        attention(q, k, v, qo, kl, kv_quant=spec)
    with pytest.raises(ValueError, match="stores uint8"):
        attention(q, k, v, qo, kl, kv_quant="q8", k_scales=ks, v_scales=vs)
    with pytest.raises(ValueError, match="unknown KV cache format"):
        attention(q, k, v, qo, kl, kv_quant="q5")


@pytest.mark.parametrize("name", ["q4", "q6", "q8", "fp8_e5m2", "bf16"])
def test_quantized_pallas_kernels_lower_to_triton(name):
    """The dequantize-on-read path uses only what Triton lowers (shifts, masks, 2-way joins)."""
    from pallas_kernels.decode_attention import decode_attention
    from pallas_kernels.flash_attention import flash_attention
    spec = KV_QUANTS[name]
    for case in (CASES[0], CASES[3]):
        q, k, v, qo, kl, ks, vs = quantized_case_inputs(case, spec)
        kw = dict(kv_quant=spec, interpret=False)
        fns = [lambda *a: flash_attention(*a[:5], k_scales=a[5], v_scales=a[6], **kw)]
        if case.q_len == 1:
            fns.append(lambda *a: decode_attention(*a[:5], k_scales=a[5], v_scales=a[6], **kw))
        for fn in fns:
            assert "xla.gpu.triton" in lower_for_cuda(fn, q, k, v, qo, kl, ks, vs)


# ----------------------------------------------------------------------------- the model
def prompt(length, seed=1):
    return np.random.default_rng(seed).integers(0, CONFIG.vocab_size, length).astype(np.int32)


def cache_kv(cache: KVCache, n: int):
    """The K/V the cache holds for row 0's first n tokens, decoded (float32, original basis):
    [layers, 1, n, kv_heads, head_dim] each, each side decoded with its own format."""

    def read(stored, scales, spec):
        return jnp.asarray(numpy_decode(stored[:, :1, :n], None if scales is None else scales[:, :1, :n],
                                        spec), jnp.float32)

    return (read(cache.keys, cache.key_scales, cache.key_quant),
            read(cache.values, cache.value_scales, cache.value_quant))


def teacher_forced_forward(params, ids, keys, values):
    """A full causal forward (no cache, no chunks) whose attention uses the given K/V of every layer
    ([layers, 1, s, kv_heads, head_dim]) instead of its own. Returns (logits [1, s, vocab], the K/V
    each layer itself computed before any quantization, stacked like `keys`)."""
    ids = jnp.asarray(ids, jnp.int32)[None]
    positions = jnp.arange(ids.shape[1])[None]
    x = embed(params, ids, compute_dtype(params))
    own_k, own_v = [], []
    for i in range(CONFIG.num_layers):
        layer = jax.tree.map(lambda a: a[i], params["layers"])
        h = rms_norm(x, layer["attn_norm"], CONFIG.rms_norm_eps)
        q, k, v = qkv(layer, CONFIG, h, positions, rope_inv_freq(CONFIG))
        own_k.append(k)
        own_v.append(v)
        attn = full_causal_attention(q, keys[i], values[i]).reshape(*x.shape[:2], -1)
        x = x + linear(attn, layer["wo"])
        x = x + mlp(layer, rms_norm(x, layer["mlp_norm"], CONFIG.rms_norm_eps))
    return lm_head(params, CONFIG, x), (jnp.stack(own_k), jnp.stack(own_v))


def assert_close_logits(got, want, rel=1e-4):
    """float32 tolerance of tests/test_prefill.py: 1e-4 of the logit range (summation order only)."""
    got, want = np.asarray(got), np.asarray(want)
    assert np.abs(got - want).max() <= rel * np.ptp(want), (np.abs(got - want).max(), np.ptp(want))


def assert_codes_are_the_full_forward_quantization(cache, own_k, own_v, n):
    """The cache holds quantize(K/V of the full forward) up to rounding ties: mismatching values
    are rare and each is at most one quantization level (or one fp8 / bf16 ulp) away. Keys and
    values each against their own format."""
    for stored, scales, own, spec in ((cache.keys, cache.key_scales, own_k, cache.key_quant),
                                      (cache.values, cache.value_scales, own_v, cache.value_quant)):
        want = np.asarray(fake_quantize(own, spec), np.float64)
        got = numpy_decode(stored[:, :1, :n], None if scales is None else scales[:, :1, :n], spec)
        own64 = np.asarray(own, np.float64)
        diff = np.abs(got - want)
        noise = 1e-5 * np.abs(own64).max()  # float32 noise of K/V and of the rotation
        mismatched = diff > noise
        # Rounding ties: a value within float noise of a rounding boundary goes either way, more often
        # the finer the step (q8: 1/127 of the block's absmax). Measured: up to 2.07e-3 of values on an
        # AVX-512 host (its dots sum in another order), ~1e-3 on AVX2. A wrong scale, offset or
        # element order mismatches most values; the per-value bound below is the strict check.
        assert mismatched.mean() <= 5e-3, (spec.name, mismatched.mean())
        if spec.packed:
            # One level is the block's step absmax / qmax; rotated, one level in one rotated element
            # spreads over the block with L2 norm = that step, so no element moves by more.
            blocks = own64.reshape(*own64.shape[:-1], -1, QUANT_BLOCK)
            if spec.rotate:
                blocks = blocks @ numpy_hadamard()
            step = np.repeat(np.abs(blocks).max(-1) / spec.qmax, QUANT_BLOCK, axis=-1)
            assert (diff <= step * 1.01 + noise).all(), (spec.name, float((diff / step).max()))
        else:
            # A float format: the value rounded the other way, one ulp at the value's magnitude
            # (relative spacing 2^(1 - significant bits); the fp8 subnormal spacing below that).
            significant, subnormal = FLOAT_ULP[spec.name]
            ulp = np.maximum(np.abs(own64) * 2.0 ** (1 - significant), subnormal)
            assert (diff <= ulp * 1.01 + noise).all(), spec.name


FLOAT_ULP = {"f32": (24, 0.0), "bf16": (8, 0.0), "fp8_e4m3": (4, 2.0 ** -9), "fp8_e5m2": (3, 2.0 ** -16)}
MODEL_CASES = [("q4", 64), ("q8", 7), ("fp8_e4m3", 64), ("q6", 300)]
SLOW_MODEL_CASES = [(n, c) for n in ("bf16", "fp8_e5m2", "q8", "q6", "q4", "q4_norot", "q6_norot")
                         for c in (7, 64, 300) if (n, c) not in MODEL_CASES]


@pytest.mark.parametrize("name, chunk_size", MODEL_CASES + [
    pytest.param(n, c, marks=pytest.mark.slow) for n, c in SLOW_MODEL_CASES])
def test_chunked_prefill_into_quantized_cache_equals_full_forward(params, name, chunk_size):
    ids = prompt(300)
    cache = init_cache(CONFIG, 1, 400, name)
    cache, logits = prefill(params, CONFIG, cache, [ids], chunk_size=chunk_size, all_logits=True)
    keys, values = cache_kv(cache, len(ids))
    want, (own_k, own_v) = teacher_forced_forward(params, ids, keys, values)
    # 1. all-position (hence also last-token) logits: float32 tolerance, identical argmax.
    assert_close_logits(logits[0], want[0])
    np.testing.assert_array_equal(logits[0].argmax(-1), np.asarray(want[0]).argmax(-1))
    # 2. the stored codes are the full forward's K/V quantized (up to ties).
    assert_codes_are_the_full_forward_quantization(cache, own_k, own_v, len(ids))
    # The untouched tail of the cache is still zeros (padding wrote nowhere).
    assert not np.any(np.asarray(cache.keys[:, 0, len(ids):]))


def test_quantized_forward_reference_is_close_to_chunked(params):
    """jaxchunk.model.forward(kv_quant=...) (quantize -> dequantize K/V before full attention) is
    the non-teacher-forced reference: with the same model the chunked q8 run may differ from it
    only through rounding ties (see the module docstring), which for q8 stay far below what the
    quantization itself changes."""
    ids = prompt(300)
    exact = np.asarray(forward(params, CONFIG, ids[None])[0])
    ref = np.asarray(forward(params, CONFIG, ids[None], kv_quant="q8")[0])
    cache = init_cache(CONFIG, 1, 400, "q8")
    _, logits = prefill(params, CONFIG, cache, [ids], chunk_size=64, all_logits=True)
    chunk_vs_ref = np.abs(logits[0] - ref).max()
    quant_effect = np.abs(exact - ref).max()
    assert chunk_vs_ref <= 0.05 * quant_effect, (chunk_vs_ref, quant_effect)
    assert (logits[0].argmax(-1) == ref.argmax(-1)).mean() >= 0.99


@pytest.mark.parametrize("impl", ["xla", pytest.param("pallas", marks=pytest.mark.slow)])
def test_decode_after_prefill_with_quantized_cache(params, impl):
    ids = prompt(100, seed=5)
    cache = init_cache(CONFIG, 1, 128, "q4")
    cache, logits = prefill(params, CONFIG, cache, [ids], chunk_size=32, attention_impl=impl)
    seq = list(ids)
    for _ in range(2):
        seq.append(int(np.asarray(logits)[0].argmax()))
        cache, logits = decode_step(params, cache, np.array([seq[-1]]), config=CONFIG, attention_impl=impl)
        keys, values = cache_kv(cache, len(seq))
        want, _ = teacher_forced_forward(params, np.array(seq), keys, values)
        assert_close_logits(np.asarray(logits)[0], want[0, -1])


def compiled_step(params, cache, chunk_len):
    tokens = jnp.zeros((1, chunk_len), jnp.int32)
    n_valid = jnp.full((1,), chunk_len, jnp.int32)
    return jitted_prefill_chunk.lower(params, cache, tokens, n_valid, config=CONFIG, attention_impl="xla",
                                logits="last").compile().memory_analysis()


@pytest.mark.parametrize("name", ["q4", pytest.param("fp8_e4m3", marks=pytest.mark.slow),
                                  pytest.param("bf16", marks=pytest.mark.slow)])
def test_quantized_cache_is_donated_and_updated_in_place(params, name):
    cache = init_cache(CONFIG, 1, 512, name)
    old = jax.tree.leaves(cache)
    assert len(old) == (5 if cache.key_quant.scaled else 3)  # keys, values, lengths (+ two scale arrays)
    cache, _ = prefill_chunk(params, cache, prompt(32)[None], config=CONFIG)
    assert all(x.is_deleted() for x in old), "the cache (or one of its scale arrays) was not donated"
    assert cache.key_quant.name == cache.value_quant.name == name and int(cache.lengths[0]) == 32
    # Aliased in full, and the step's temporaries do not grow with the cache: no copy of the codes,
    # the scales, or one layer of them per chunk.
    small, large = (compiled_step(params, init_cache(CONFIG, 1, n, name), 32) for n in (512, 2048))
    assert small.alias_size_in_bytes >= init_cache(CONFIG, 1, 512, name).nbytes - 4
    assert large.alias_size_in_bytes >= init_cache(CONFIG, 1, 2048, name).nbytes - 4
    assert large.temp_size_in_bytes == small.temp_size_in_bytes


@pytest.mark.model
def test_load_rejects_unknown_cache_dtype(smollm2_gguf):
    from jaxchunk.api import load
    with pytest.raises(InputError, match="unknown cache dtype 'int3'.*'q4'"):
        load(smollm2_gguf, cache_dtype="int3")


# ----------------------------------------------------------------------------- separate key and value formats
# (key format, value format) pairs: integer keys / values of different widths, a float side with an
# integer one (scales on one side only), a rotated side with an unrotated one (the rotation of q and
# of the output then differ), and fp8 keys with q6 values.
MIXED_PAIRS = [("q8", "q4"), ("bf16", "q4"), ("q4", "f32"), ("q4_norot", "q8"), ("q8", "q6_norot"),
               ("fp8_e4m3", "q6")]
FAST_MIXED = {("q8", "q4"), ("bf16", "q4"), ("q4", "f32"), ("q4_norot", "q8")}


def mixed_case_inputs(case, key_format, value_format, seed=0):
    """make_inputs(...) with K stored in `key_format` and V in `value_format` (garbage past kv_len
    as in `quantized_case_inputs`): (q, k, v, q_offset, kv_len, k_scales, v_scales)."""
    q, k, v, qo, kl = make_inputs(case, "float32", seed=seed)
    k_stored, k_scales = quantize(k, KV_QUANTS[key_format])
    v_stored, v_scales = quantize(v, KV_QUANTS[value_format])
    return q, k_stored, v_stored, qo, kl, k_scales, v_scales


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("case, pair", [
    pytest.param(c, p, id=f"{c.id}-k_{p[0]}-v_{p[1]}",
                 marks=[] if p in FAST_MIXED else [pytest.mark.slow])
    for c in (CASES[0], CASES[5]) for p in MIXED_PAIRS])
def test_backends_read_separate_key_and_value_formats(case, pair, backend):
    """Every backend (Pallas: the decode kernel for the q_len 1 case, flash for the q_len 64 window
    case, interpret mode) with keys and values in different formats, against the float64 oracle on
    K and V each decoded by the independent NumPy decoder with its own format. Tolerance: the
    single-format one (2e-5): both sides see identical K/V values, only summation order differs."""
    k_spec, v_spec = (KV_QUANTS[n] for n in pair)
    q, k, v, qo, kl, ks, vs = mixed_case_inputs(case, *pair)
    assert (ks is None) == (not k_spec.scaled) and (vs is None) == (not v_spec.scaled)
    out = attention(q, k, v, qo, kl, kv_quant=pair, k_scales=ks, v_scales=vs,
                    sliding_window=case.sliding_window, soft_cap=case.soft_cap, **BACKENDS[backend])
    want, sees_any = numpy_attention(q, numpy_decode(k, ks, k_spec), numpy_decode(v, vs, v_spec),
                                     np.asarray(qo), np.asarray(kl),
                                     sliding_window=case.sliding_window, soft_cap=case.soft_cap)
    out = np.asarray(out)
    assert np.isfinite(out).all()
    assert (out[~sees_any] == 0).all()
    np.testing.assert_allclose(out, want, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("impl", ["xla", "reference", "pallas"])
def test_layer_index_into_stacked_mixed_cache(impl):
    """The whole cache [layers, ...] with a traced layer, bf16 keys (no scales) and q4 values
    (scales): each side is sliced / read in place on its own."""
    case, pair = CASES[1], ("bf16", "q4")
    per_layer = [mixed_case_inputs(case, *pair, seed=s) for s in range(3)]
    q, _, _, qo, kl, _, _ = per_layer[1]
    k_stack, v_stack, vs_stack = (jnp.stack([x[i] for x in per_layer]) for i in (1, 2, 6))
    extra = dict(block_sizes=TEST_BLOCKS, interpret=True) if impl == "pallas" else {}
    run = jax.jit(lambda layer: attention(q, k_stack, v_stack, qo, kl, layer=layer, impl=impl, kv_quant=pair,
                                          v_scales=vs_stack, **extra))
    _, k, v, _, _, _, vs = per_layer[1]
    want, _ = numpy_attention(q, numpy_decode(k, None, KV_QUANTS["bf16"]), numpy_decode(v, vs, KV_QUANTS["q4"]),
                              np.asarray(qo), np.asarray(kl))
    np.testing.assert_allclose(run(jnp.int32(1)), want, atol=2e-5, rtol=2e-5)


def test_mixed_formats_check_each_side_and_native_cpu_refuses_them():
    from pallas_kernels.attention import BACKENDS as ATTENTION_BACKENDS
    from pallas_kernels.backends import choose_backend
    case = CASES[0]
    q, k, v, qo, kl, ks, vs = mixed_case_inputs(case, "q8", "q4")
    with pytest.raises(ValueError, match="'q4' needs v_scales"):
        attention(q, k, v, qo, kl, kv_quant=("q8", "q4"), k_scales=ks)
    with pytest.raises(ValueError, match="'q4' stores uint8.*got k uint8"):  # the sides swapped
        attention(q, k, v, qo, kl, kv_quant=("q4", "q8"), k_scales=ks, v_scales=vs)
    with pytest.raises(ValueError, match="kv_quant pair must be"):
        attention(q, k, v, qo, kl, kv_quant=("q8", "q4", "q4"), k_scales=ks, v_scales=vs)
    # The native CPU kernel reads one plain format for both: f32 keys with bf16 values is refused,
    # with its reason; auto then takes the blockwise XLA backend.
    qf, kf, vf, _, _ = make_inputs(case, "float32")
    v_bits = quantize(vf, KV_QUANTS["bf16"])[0]
    why = ATTENTION_BACKENDS["native_cpu"].supports(qf, kf, v_bits, qo, kl, kv_quant=("f32", "bf16"))
    assert why is not None and "keys f32 and values bf16" in why, why
    with pytest.raises(ValueError, match="cannot take this call: keys f32 and values bf16"):
        attention(qf, kf, v_bits, qo, kl, kv_quant=("f32", "bf16"), impl="native_cpu")
    assert choose_backend(ATTENTION_BACKENDS, "auto", qf, kf, v_bits, qo, kl, kv_quant=("f32", "bf16")).name == "xla"
    # A pair of one format is that format: the native kernel still takes it.
    assert ATTENTION_BACKENDS["native_cpu"].supports(qf, kf, kf, qo, kl, kv_quant=("f32", None)) is None


@pytest.mark.parametrize("pair", [("q8", "q4"), ("bf16", "q4"), ("q4", "fp8_e5m2")])
def test_mixed_format_pallas_kernels_lower_to_triton(pair):
    from pallas_kernels.decode_attention import decode_attention
    from pallas_kernels.flash_attention import flash_attention
    for case in (CASES[0], CASES[3]):
        q, k, v, qo, kl, ks, vs = mixed_case_inputs(case, *pair)
        kw = dict(kv_quant=pair, interpret=False)
        fns = [lambda *a: flash_attention(*a[:5], k_scales=a[5], v_scales=a[6], **kw)]
        if case.q_len == 1:
            fns.append(lambda *a: decode_attention(*a[:5], k_scales=a[5], v_scales=a[6], **kw))
        for fn in fns:
            assert "xla.gpu.triton" in lower_for_cuda(fn, q, k, v, qo, kl, ks, vs)


def test_cache_format_names_and_bytes():
    from jaxchunk.cache import resolve_cache_formats
    q = KV_QUANTS
    assert resolve_cache_formats("k8v4") == (q["q8"], q["q4"])
    assert resolve_cache_formats("k6v4") == (q["q6"], q["q4"])
    assert resolve_cache_formats("k4v8") == (q["q4"], q["q8"])
    assert resolve_cache_formats("k8v8") == (q["q8"], q["q8"])
    assert resolve_cache_formats(("bf16", "q4")) == (q["bf16"], q["q4"])
    assert resolve_cache_formats(["q8_norot", q["q4"]]) == (q["q8_norot"], q["q4"])
    assert resolve_cache_formats("bf16/q4") == (q["bf16"], q["q4"])
    assert resolve_cache_formats(("float32", jnp.bfloat16)) == (q["f32"], q["bf16"])
    for single in ("q4", "bf16", "f32", q["fp8_e4m3"], jnp.float32):  # one format: both sides
        spec = resolve_cache_dtype(single)
        assert resolve_cache_formats(single) == (spec, spec)
    for bad, pattern in [("k5v4", r"'k5v4': key bits 5 not one of \[8, 6, 4\]"),
                         ("k8v3", r"'k8v3': value bits 3 not one of"),
                         ("k2v2", r"key bits 2, value bits 2"),
                         (("q8",), r"pair is \(key format, value format\)"),
                         (("q8", "q4", "q4"), r"pair is \(key format, value format\)"),
                         (("q8", "q3"), r"unknown cache dtype 'q3'"),
                         ("q8/q4/f32", r"KEY/VALUE takes exactly two formats"),
                         ("bf16/zz", r"unknown cache dtype 'zz'"),
                         ("k8", r"unknown cache dtype 'k8'.*'k8v4'")]:
        with pytest.raises(InputError, match=pattern):
            resolve_cache_formats(bad)
        with pytest.raises(InputError, match=pattern):
            init_cache(CONFIG, 1, 16, bad)
    # Bytes per token (K and V, all layers) = the sum of the two formats' bytes, by hand.
    per_head = {"f32": 64 * 4, "bf16": 64 * 2, "fp8_e4m3": 64, "q8": 64 + 2 * 2, "q6": 48 + 2 * 2,
                "q4": 32 + 2 * 2}
    per_token = lambda k, v: CONFIG.num_layers * CONFIG.num_kv_heads * (per_head[k] + per_head[v])
    for dtype, (k, v) in [("k8v4", ("q8", "q4")), ("k8v6", ("q8", "q6")), ("k6v4", ("q6", "q4")),
                          (("bf16", "q4"), ("bf16", "q4")), ("q4/f32", ("q4", "f32")),
                          (("fp8_e4m3", "q8"), ("fp8_e4m3", "q8"))]:
        cache = init_cache(CONFIG, 2, 16, dtype)
        assert cache.bytes_per_token == per_token(k, v), dtype
        assert (cache.key_quant.name, cache.value_quant.name) == (k, v)
        lead = (CONFIG.num_layers, 2, 16, CONFIG.num_kv_heads)
        assert cache.keys.shape == (*lead, KV_QUANTS[k].stored_dim(64)) and cache.keys.dtype == KV_QUANTS[k].dtype
        assert cache.values.shape == (*lead, KV_QUANTS[v].stored_dim(64))
        assert cache.values.dtype == KV_QUANTS[v].dtype
        for scales, name in ((cache.key_scales, k), (cache.value_scales, v)):
            assert (scales is None) == (not KV_QUANTS[name].scaled)
    # One name keeps its single-format cache exactly: both sides that format.
    single = init_cache(CONFIG, 1, 16, "q4")
    assert single.key_quant == single.value_quant == KV_QUANTS["q4"] and single.kv_quant == (q["q4"], q["q4"])


def test_forward_takes_pair_names(params):
    ids = prompt(40)[None]
    by_name = np.asarray(forward(params, CONFIG, ids, kv_quant="k8v4"))
    by_pair = np.asarray(forward(params, CONFIG, ids, kv_quant=("q8", "q4")))
    np.testing.assert_array_equal(by_name, by_pair)
    assert not np.array_equal(by_pair, np.asarray(forward(params, CONFIG, ids, kv_quant="q4")))


MIXED_MODEL_CASES = [("k8v4", 64), (("bf16", "q4"), 7), (("q4", "f32"), 300)]
SLOW_MIXED_MODEL_CASES = [("k6v4", 64), ("k8v6", 300), (("q4_norot", "q8"), 64), (("q8", "q4"), 7)]


@pytest.mark.parametrize("dtype, chunk_size", MIXED_MODEL_CASES + [
    pytest.param(n, c, marks=pytest.mark.slow) for n, c in SLOW_MIXED_MODEL_CASES], ids=str)
def test_chunked_prefill_into_mixed_format_cache_equals_full_forward(params, dtype, chunk_size):
    """As the single-format test: given the codes the chunked prefill stored (keys and values each
    decoded with its own format), its logits equal a full causal forward over those K/V to float32
    tolerance, and the codes are the full forward's K / V each quantized in its own format."""
    ids = prompt(300)
    cache = init_cache(CONFIG, 1, 400, dtype)
    assert cache.key_quant != cache.value_quant
    cache, logits = prefill(params, CONFIG, cache, [ids], chunk_size=chunk_size, all_logits=True)
    keys, values = cache_kv(cache, len(ids))
    want, (own_k, own_v) = teacher_forced_forward(params, ids, keys, values)
    assert_close_logits(logits[0], want[0])
    np.testing.assert_array_equal(logits[0].argmax(-1), np.asarray(want[0]).argmax(-1))
    assert_codes_are_the_full_forward_quantization(cache, own_k, own_v, len(ids))
    assert not np.any(np.asarray(cache.keys[:, 0, len(ids):]))
    assert not np.any(np.asarray(cache.values[:, 0, len(ids):]))


def test_decode_after_prefill_with_mixed_cache(params):
    ids = prompt(100, seed=5)
    cache = init_cache(CONFIG, 1, 128, "k8v4")
    cache, logits = prefill(params, CONFIG, cache, [ids], chunk_size=32)
    seq = list(ids)
    for _ in range(2):
        seq.append(int(np.asarray(logits)[0].argmax()))
        cache, logits = decode_step(params, cache, np.array([seq[-1]]), config=CONFIG)
        keys, values = cache_kv(cache, len(seq))
        want, _ = teacher_forced_forward(params, np.array(seq), keys, values)
        assert_close_logits(np.asarray(logits)[0], want[0, -1])


def test_mixed_cache_is_donated_and_updated_in_place(params):
    """bf16 keys (raw bits, no scales) and q4 values (codes + scales): four arrays, all donated."""
    cache = init_cache(CONFIG, 1, 512, "bf16/q4")
    old = jax.tree.leaves(cache)
    assert len(old) == 4  # keys, values, lengths, value_scales
    cache, _ = prefill_chunk(params, cache, prompt(32)[None], config=CONFIG)
    assert all(x.is_deleted() for x in old), "the cache (or its scale array) was not donated"
    assert (cache.key_quant.name, cache.value_quant.name) == ("bf16", "q4") and cache.key_scales is None
    small, large = (compiled_step(params, init_cache(CONFIG, 1, n, "bf16/q4"), 32) for n in (512, 2048))
    assert large.alias_size_in_bytes >= init_cache(CONFIG, 1, 2048, "bf16/q4").nbytes - 4
    assert large.temp_size_in_bytes == small.temp_size_in_bytes
