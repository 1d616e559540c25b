"""Every attention backend against an independent NumPy float64 oracle (CPU).

Pallas kernels run in interpret mode here, with small blocks (block_q 16,
block_k 32) so each case still spans several query tiles and key blocks.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from attention_cases import (CASES, TEST_BLOCKS, backend_params, check_against_oracle,
                              as_native_cpu_cache, lower_for_cuda, make_inputs, require_native_cpu,
                              run_backend)
from pallas_kernels.attention import attention
from pallas_kernels.attention_reference import attention_reference
from pallas_kernels.common import BlockSizes
from pallas_kernels.blockwise_attention import blockwise_attention, key_block_range
from pallas_kernels.attention import BACKENDS, IMPLS
from pallas_kernels.backends import choose_backend
from pallas_kernels.decode_attention import decode_attention, decode_attention_supports
from pallas_kernels.flash_attention import flash_attention


@pytest.mark.parametrize("name,case,dtype",
                         backend_params(("reference", "xla", "flash", "decode", "native_cpu", "native_flash")))
def test_backend_matches_numpy(name, case, dtype):
    inputs = make_inputs(case, dtype)
    check_against_oracle(run_backend(name, inputs, case), case, dtype, inputs)


@pytest.mark.parametrize("case", [CASES[3], CASES[4], CASES[8], CASES[10]], ids=lambda c: c.id)
def test_native_flash_bf16_products(case):
    """bf16 queries on a bf16 cache: the flash kernel multiplies in bf16 (vdpbf16ps) where the CPU
    has AVX512_BF16. Both that and an f32 query on the same bf16-exact cache (f32 products) meet the
    float64 oracle at their dtype's tolerance; where the CPU has the instructions the two must
    differ (the bf16 path ran: its P is rounded to bf16), elsewhere agree to the output's rounding."""
    native_cpu = require_native_cpu()
    inputs = make_inputs(case, "bfloat16")
    q, k, v, q_offset, kv_len = inputs
    k_bits, v_bits, _ = as_native_cpu_cache(k, v)
    kw = dict(sm_scale=1 / np.sqrt(q.shape[-1]), sliding_window=case.sliding_window, soft_cap=case.soft_cap)
    run = jax.jit(lambda q: native_cpu.flash_attention_cpu(q, k_bits, v_bits, q_offset, kv_len, **kw))
    out_bf16 = run(q)
    check_against_oracle(out_bf16, case, "bfloat16", inputs)
    q32 = q.astype(jnp.float32)
    out_f32 = run(q32)
    check_against_oracle(out_f32, case, "float32", (q32, k, v, q_offset, kv_len))
    # f32 products, then the output rounded to bf16: what the bf16 call gives without the instructions.
    rounded = np.asarray(out_f32.astype(jnp.bfloat16).astype(jnp.float32))
    diff = np.abs(np.asarray(out_bf16.astype(jnp.float32)) - rounded).max()
    if "avx512_bf16" in native_cpu.cpu_flags():
        assert diff > 0, "bf16 queries on a bf16 cache took the f32-product path"
    else:
        assert diff == 0


@pytest.mark.parametrize("impl", ["auto", "xla", "pallas", "reference"])
@pytest.mark.parametrize("case", [CASES[1], CASES[5]], ids=lambda c: c.id)
def test_dispatcher(impl, case):
    inputs = make_inputs(case, "float32")
    block_sizes = TEST_BLOCKS if impl == "pallas" else None  # defaults otherwise
    out = attention(*inputs, impl=impl, sliding_window=case.sliding_window,
                    soft_cap=case.soft_cap, block_sizes=block_sizes)
    check_against_oracle(out, case, "float32", inputs)


def test_dispatcher_rejects_bad_input():
    case = CASES[0]
    q, k, v, qo, kl = make_inputs(case, "float32")
    with pytest.raises(ValueError, match="impl"):
        attention(q, k, v, qo, kl, impl="triton")
    with pytest.raises(ValueError, match="multiple"):
        attention(q[:, :, :8], k, v, qo, kl)  # 8 heads over 3 KV heads
    with pytest.raises(ValueError, match="sliding_window"):
        attention(q, k, v, qo, kl, sliding_window=0)


def test_explicit_sm_scale():
    case = CASES[0]
    q, *rest = make_inputs(case, "float32")
    # Scaling q by c is the same as sm_scale *= c: a check independent of the oracle
    # (the Pallas side compared with the already-checked reference: one compile).
    want = attention_reference(2 * q, *rest)
    base = 1 / np.sqrt(case.head_dim)
    for fn in (attention_reference, blockwise_attention,
               lambda *a, **kw: decode_attention(*a, interpret=True, **kw)):
        np.testing.assert_allclose(fn(q, *rest, sm_scale=2 * base), want,
                                   atol=2e-5, rtol=2e-5)


def test_block_sizes_is_frozen_and_hashable():
    bs = BlockSizes(16, 32)
    with pytest.raises(dataclasses.FrozenInstanceError):
        bs.block_q = 8
    assert hash(bs) == hash(BlockSizes(16, 32))
    for d in (64, 128, 256):
        for b in (BlockSizes.flash_default(d), BlockSizes.decode_default(d)):
            assert b.block_q & (b.block_q - 1) == 0 and b.block_k & (b.block_k - 1) == 0


def test_blockwise_work_follows_kv_len():
    """A cache of 8192 with kv_len 600 reads ceil(600 / block_k) key blocks: the
    loop bounds are traced values, not the static cache capacity."""
    jitted = jax.jit(lambda qo, kl: key_block_range(qo, kl, 0, 3 * 512 - 1, 3, 256, None))
    lo, full_lo, full_hi, hi = map(int, jitted(jnp.array([88], jnp.int32), jnp.array([600], jnp.int32)))
    # Keys 0..88 are seen by every query (first query at 88): block 0 [0, 256) is not.
    assert (lo, full_lo, full_hi, hi) == (0, 0, 0, 3)
    lo, full_lo, full_hi, hi = map(int, jitted(jnp.array([1000], jnp.int32), jnp.array([1500], jnp.int32)))
    assert (lo, full_lo, full_hi, hi) == (0, 0, 3, 6)  # blocks 0-2 (keys < 768 <= 1001) unmasked
    lo, full_lo, full_hi, hi = map(int, jitted(jnp.array([0, 4000], jnp.int32), jnp.array([100, 4300], jnp.int32)))
    assert (lo, full_lo, full_hi, hi) == (0, 0, 0, 17)  # the longest row decides hi, the shortest full_hi
    # Window: the first blocks are skipped too, and blocks wholly inside every row's window need no mask.
    lo, full_lo, full_hi, hi = map(int, key_block_range(jnp.array([5000]), jnp.array([5100]), 0, 299, 3, 256, 100))
    assert (lo, hi) == (4901 // 256, 20)
    assert full_lo == full_hi  # a 100-key window over 100 positions: no block is seen by all

    # The compiled program loops with a traced trip count (a while, no static scan).
    q = jnp.zeros((1, 512, 9, 64), jnp.float32)
    kv = jnp.zeros((1, 8192, 3, 64), jnp.float32)
    jaxpr = str(jax.make_jaxpr(lambda *a: blockwise_attention(*a))(
        q, kv, kv, jnp.array([88], jnp.int32), jnp.array([600], jnp.int32)))
    assert "while[" in jaxpr and "scan[" not in jaxpr

    # And 7592 NaN keys past kv_len are never read into the result: identical to
    # running on a cache truncated to exactly kv_len.
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.standard_normal((1, 64, 9, 64)), jnp.float32)
    k = rng.standard_normal((1, 8192, 3, 64)).astype(np.float32)
    v = rng.standard_normal((1, 8192, 3, 64)).astype(np.float32)
    k[:, 600:], v[:, 600:] = np.nan, np.nan
    qo, kl = jnp.array([536], jnp.int32), jnp.array([600], jnp.int32)
    full = blockwise_attention(q, jnp.asarray(k), jnp.asarray(v), qo, kl)
    short = blockwise_attention(q, jnp.asarray(k[:, :600]), jnp.asarray(v[:, :600]), qo, kl)
    assert np.isfinite(np.asarray(full)).all()
    np.testing.assert_allclose(full, short, atol=2e-6, rtol=2e-6)


@pytest.mark.slow
def test_flash_head_dim_not_power_of_two():
    """head_dim 80 is padded to 128 inside the wrapper (Triton tiles)."""
    from attention_cases import Case
    case = Case("q64_d80", 64, 4, 2, 80, 100, (10, 0), (74, 40))
    inputs = make_inputs(case, "float32")
    for name in ("flash", "xla"):
        check_against_oracle(run_backend(name, inputs, case), case, "float32", inputs)


def test_native_cpu_kernel_in_the_dispatcher():
    """impl="native_cpu": the native decode kernel, reading one layer of a stacked cache in place (f32 and
    the bf16 cache's uint16 bits); it refuses what it does not implement instead of guessing."""
    from pallas_kernels.kv_quant import KV_QUANTS
    case = CASES[0]  # decode, GQA 3
    per_layer = [make_inputs(case, "float32", seed=s) for s in range(3)]
    q, _, _, qo, kl = per_layer[2]
    keys = jnp.stack([x[1] for x in per_layer])
    values = jnp.stack([x[2] for x in per_layer])
    run = jax.jit(lambda layer, k, v, fmt: attention(q, k, v, qo, kl, layer=layer, impl="native_cpu", kv_quant=fmt),
                  static_argnums=3)
    check_against_oracle(run(jnp.int32(2), keys, values, None), case, "float32", per_layer[2])
    bits = lambda a: jax.lax.bitcast_convert_type(a.astype(jnp.bfloat16), jnp.uint16)
    bf16_inputs = (q, per_layer[2][1].astype(jnp.bfloat16), per_layer[2][2].astype(jnp.bfloat16), qo, kl)
    out = run(jnp.int32(2), bits(keys), bits(values), KV_QUANTS["bf16"])
    check_against_oracle(out, case, "float32", bf16_inputs)  # f32 q, bf16-exact K/V: f32 tolerance
    with pytest.raises(ValueError, match="native_cpu.*q_len <= 8"):  # prefill-sized chunks stay with the others
        attention(*make_inputs(CASES[3], "float32"), impl="native_cpu")
    with pytest.raises(ValueError, match="native_cpu.*plain f32 / bf16 cache"):
        attention(q, keys[0], values[0], qo, kl, impl="native_cpu", kv_quant="q8",
                  k_scales=jnp.ones((*keys.shape[1:4], 2), jnp.float16),
                  v_scales=jnp.ones((*keys.shape[1:4], 2), jnp.float16))
    with pytest.raises(Exception, match="layer index out of range"):
        jax.block_until_ready(run(jnp.int32(3), keys, values, None))


@pytest.mark.parametrize("impl", ["xla", "reference", "pallas"])
def test_layer_index_into_stacked_cache(impl):
    """k, v may be the whole cache [layers, b, max_seq, kv_heads, d] with a traced
    layer index (what a lax.scan over layers passes); other layers must not leak."""
    case = CASES[5]
    per_layer = [make_inputs(case, "float32", seed=s) for s in range(3)]
    q, _, _, qo, kl = per_layer[1]
    keys = jnp.stack([x[1] for x in per_layer])
    values = jnp.stack([x[2] for x in per_layer])
    block_sizes = TEST_BLOCKS if impl == "pallas" else None
    run = jax.jit(lambda layer: attention(
        q, keys, values, qo, kl, layer=layer, impl=impl, block_sizes=block_sizes,
        sliding_window=case.sliding_window, soft_cap=case.soft_cap))
    check_against_oracle(run(jnp.int32(1)), case, "float32", per_layer[1])


@pytest.mark.parametrize("dtype", ["float32", pytest.param("bfloat16", marks=pytest.mark.slow)])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_pallas_kernels_lower_to_triton(case, dtype):
    inputs = make_inputs(case, dtype)
    kw = dict(sliding_window=case.sliding_window, soft_cap=case.soft_cap,
              interpret=False)
    fns = [lambda *a: flash_attention(*a, **kw),  # default (GPU) block sizes
           lambda *a: flash_attention(*a, block_sizes=TEST_BLOCKS, **kw)]
    if decode_attention_supports(*inputs) is None:
        fns.append(lambda *a: decode_attention(*a, **kw))
    for fn in fns:
        assert "xla.gpu.triton" in lower_for_cuda(fn, *inputs)


def test_compiled_kernels_reject_non_power_of_two_blocks():
    inputs = make_inputs(CASES[3], "float32")
    with pytest.raises(ValueError, match="powers of two"):
        flash_attention(*inputs, block_sizes=BlockSizes(24, 32), interpret=False)
    with pytest.raises(ValueError, match="powers of two"):
        decode_attention(*make_inputs(CASES[0], "float32"),
                         block_sizes=BlockSizes(16, 8), interpret=False)


# ----------------------------------------------------------------------------- the backend table
def _shapes(q_len=1, head_dim=64, cache_dtype=jnp.float32, stored_dim=None):
    """The op's array arguments as ShapeDtypeStructs (all `supports` looks at): GQA 3, 150 slots."""
    sds = jax.ShapeDtypeStruct
    cache = sds((2, 150, 3, stored_dim or head_dim), cache_dtype)
    return (sds((2, q_len, 9, head_dim), jnp.float32), cache, cache,
            sds((2,), jnp.int32), sds((2,), jnp.int32))


def test_backend_table():
    assert IMPLS == ("auto", "pallas", "native_cpu", "native_flash", "xla", "reference")  # auto's order
    for name, backend in BACKENDS.items():
        assert backend.name == name and backend.doc
        with pytest.raises(dataclasses.FrozenInstanceError):
            backend.name = "other"  # frozen
    for name in ("pallas", "xla", "reference"):  # take every valid call
        assert BACKENDS[name].supports(*_shapes(q_len=64, head_dim=48), kv_quant="q4") is None


def test_native_cpu_supports_names_what_it_refuses(monkeypatch):
    from pallas_kernels import native_cpu
    from pallas_kernels.kv_quant import KV_QUANTS
    require_native_cpu()
    supports = BACKENDS["native_cpu"].supports
    assert supports(*_shapes()) is None
    assert supports(*_shapes(cache_dtype=jnp.uint16), kv_quant=KV_QUANTS["bf16"]) is None
    assert "q_len 64" in supports(*_shapes(q_len=64))
    assert "q_len 9" in decode_attention_supports(*_shapes(q_len=9))
    assert "cache q8 stored as uint8" in supports(*_shapes(cache_dtype=jnp.uint8), kv_quant="q8")
    assert "cache float stored as bfloat16" in supports(*_shapes(cache_dtype=jnp.bfloat16))  # not the bf16 format
    assert "head_dim 48" in supports(*_shapes(head_dim=48))
    monkeypatch.setattr(native_cpu, "available", lambda: False)
    monkeypatch.setattr(native_cpu, "unavailable_reason", lambda: "no C++ compiler found")
    assert supports(*_shapes()) == "the native CPU kernels did not build: no C++ compiler found"
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert "CPU backend" in supports(*_shapes())


def test_native_flash_supports_names_what_it_refuses():
    from pallas_kernels.kv_quant import KV_QUANTS
    require_native_cpu()
    supports = BACKENDS["native_flash"].supports
    for shapes in (_shapes(q_len=64), _shapes(q_len=1), _shapes(q_len=64, head_dim=48),
                   _shapes(q_len=64, head_dim=256)):
        assert supports(*shapes) is None
    assert supports(*_shapes(q_len=64, cache_dtype=jnp.uint16), kv_quant=KV_QUANTS["bf16"]) is None
    assert "head_dim 40" in supports(*_shapes(q_len=64, head_dim=40))
    assert "cache q8 stored as uint8" in supports(*_shapes(q_len=64, cache_dtype=jnp.uint8), kv_quant="q8")


def test_impl_name_that_cannot_take_the_call_raises_its_reason():
    inputs = make_inputs(CASES[3], "float32")  # a 64-query prefill chunk
    with pytest.raises(ValueError, match=r"impl='native_cpu' cannot take this call: q_len 64"):
        attention(*inputs, impl="native_cpu")
    with pytest.raises(ValueError, match=r"impl must be one of \('auto', 'pallas', 'native_cpu', 'native_flash', "
                                         r"'xla', 'reference'\), got 'cpu'"):
        attention(*inputs, impl="cpu")  # the old name of native_cpu


def test_auto_picks_what_it_always_picked(monkeypatch):
    """CPU: the native decode kernel for decode over an f32 / bf16 cache, the native flash kernel for
    prefill chunks over one (and head sizes the decode kernel lacks), blockwise XLA for quantized
    caches and head sizes neither takes; GPU: Pallas for everything."""
    from pallas_kernels.kv_quant import KV_QUANTS
    require_native_cpu()
    auto = lambda *args, **kwargs: choose_backend(BACKENDS, "auto", *args, **kwargs).name
    assert auto(*_shapes()) == "native_cpu"
    assert auto(*_shapes(q_len=8, cache_dtype=jnp.uint16), kv_quant=KV_QUANTS["bf16"]) == "native_cpu"
    assert auto(*_shapes(q_len=64)) == "native_flash"
    assert auto(*_shapes(q_len=64, cache_dtype=jnp.uint16), kv_quant=KV_QUANTS["bf16"]) == "native_flash"
    assert auto(*_shapes(cache_dtype=jnp.uint8), kv_quant=KV_QUANTS["q8"]) == "xla"
    assert auto(*_shapes(head_dim=48)) == "native_flash"  # not a decode-kernel size; flash takes it
    assert auto(*_shapes(head_dim=40)) == "xla"
    # And what it picks is what runs: bit for bit the explicit backend's result.
    inputs = make_inputs(CASES[0], "float32")
    np.testing.assert_array_equal(attention(*inputs), attention(*inputs, impl="native_cpu"))
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert auto(*_shapes()) == auto(*_shapes(q_len=64)) == "pallas"
