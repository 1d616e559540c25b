"""bf16 weights held as uint16 bits (jaxchunk/weights/bf16.py): same numbers as plain bf16 params,
and the compiled decode step no longer converts every layer's weights to f32 up front."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxchunk.cache import init_cache
from jaxchunk.testing import tiny_config
from jaxchunk.model import forward, init_params, native_gemv_rows
from jaxchunk.prefill import decode_step, prefill
from jaxchunk.steps import jitted_decode_step
from jaxchunk.weights.bf16 import BF16Weight, pack_bf16, unpack_bf16

# Vocab 8192 = two tiles of the bf16 decode head (HEAD_TILE_MAX = 4096), so the tiled path runs.
CONFIG = tiny_config(vocab_size=8192, tie_word_embeddings=True)


def bf16_params(config, seed=0):
    return init_params(config, seed=seed, dtype=jnp.bfloat16, scale=0.2)


def run(params, config, ids, decode_tokens):
    """Chunked prefill (chunk 8), then decode steps feeding the given tokens; all logits as f32."""
    cache = init_cache(config, 1, 128, "bf16")
    cache, logits = prefill(params, config, cache, [ids], chunk_size=8)
    out = [np.asarray(logits, np.float32)]
    for t in decode_tokens:
        cache, logits = decode_step(params, cache, np.array([t], np.int32), config=config)
        out.append(np.asarray(logits, np.float32))
    return np.concatenate(out)


def test_pack_round_trip_is_exact():
    params = bf16_params(CONFIG)
    packed = pack_bf16(params)
    assert isinstance(packed["embed"], BF16Weight) and isinstance(packed["layers"]["w_up"], BF16Weight)
    assert packed["layers"]["attn_norm"].dtype == jnp.bfloat16  # norms stay plain
    assert packed["layers"]["wq"].bits.dtype == jnp.uint16
    same = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), params, unpack_bf16(packed))
    assert all(jax.tree.leaves(same))
    with pytest.raises(ValueError, match="bfloat16"):
        pack_bf16(init_params(CONFIG, dtype=jnp.float32))


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_packed_params_give_identical_logits(tied):
    """Bits are the bf16 values themselves, so every logit must be identical (not just close):
    forward (XLA's dots for both), and chunked prefill and decode where the same engine runs both.
    On CPU with the native kernels, packed bf16 steps of <= 16 rows (chunks of 8 here, decode)
    run the native dense gemv while plain
    bf16 arrays keep XLA's dot (jaxchunk.weights.dense): the same exact products summed in another
    order, so each bf16 layer output may round the other way (2^-8 relative); the logits are then
    held to 2e-2 of their largest magnitude (measured: ~1e-6, the layers' roundings agreed)."""
    config = dataclasses.replace(CONFIG, tie_word_embeddings=tied)
    params = bf16_params(config)
    packed = pack_bf16(params)
    ids = np.random.default_rng(1).integers(0, config.vocab_size, 21).astype(np.int32)
    np.testing.assert_array_equal(np.asarray(forward(packed, config, ids[None]), np.float32),
                                  np.asarray(forward(params, config, ids[None]), np.float32))
    got, want = run(packed, config, ids, [5, 9, 100]), run(params, config, ids, [5, 9, 100])
    if native_gemv_rows(1):
        np.testing.assert_allclose(got, want, rtol=0, atol=2e-2 * np.abs(want).max())
    else:
        np.testing.assert_array_equal(got, want)


def test_tiled_decode_head_equals_f32_reference():
    """The decode head converts vocab tiles to f32; compare with a NumPy f32 product of the same values."""
    from jaxchunk.model import lm_head
    params = pack_bf16(bf16_params(CONFIG))
    h = jnp.asarray(np.random.default_rng(2).normal(size=(3, CONFIG.hidden_size)), jnp.bfloat16)
    got = np.asarray(lm_head(params, CONFIG, h))
    from jaxchunk.model import rms_norm
    hn = np.asarray(rms_norm(h, params["final_norm"], CONFIG.rms_norm_eps), np.float32).astype(np.float64)
    want = hn @ np.asarray(unpack_bf16(params)["embed"], np.float32).astype(np.float64).T
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def decode_temp_bytes(params, config) -> int:
    cache = init_cache(config, 1, 64, "bf16")
    compiled = jitted_decode_step.lower(params, cache, jnp.zeros((1,), jnp.int32), config=config,
                                  attention_impl="auto").compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_decode_step_temporaries_do_not_grow_with_depth():
    """With plain bf16 params XLA:CPU converted all layers' weights to f32 before the layer loop
    (temporaries ~ 4 bytes x all weights); packed, the loop converts one layer at a time."""
    big = dataclasses.replace(CONFIG, hidden_size=256, intermediate_size=1024, num_layers=8)
    temps = {}
    for layers in (2, 8):
        config = dataclasses.replace(big, num_layers=layers)
        temps[layers] = decode_temp_bytes(pack_bf16(bf16_params(config)), config)
    one_layer_f32 = 4 * (4 * 256 * 64 + 3 * 256 * 1024)  # q/k/v/o + mlp, f32 bytes
    print("decode temp bytes by depth (packed):", temps)
    assert temps[8] - temps[2] < one_layer_f32


def test_packed_params_refuse_gradients():
    """Bits carry no gradient: jax.grad must raise rather than return zeros."""
    packed = pack_bf16(bf16_params(CONFIG))
    ids = jnp.zeros((1, 4), jnp.int32)
    with pytest.raises(TypeError):
        jax.grad(lambda p: jnp.sum(forward(p, CONFIG, ids)))(packed)


@pytest.mark.parametrize("widen", [False, True], ids=["bf16-dot", "widened-f32-dot"])
def test_linear_bf16_both_lowerings_match_the_float64_product(monkeypatch, widen):
    """A bf16 prefill-sized linear takes one f32 dot of the widened operands on CPUs without bf16 dot
    instructions, else the bf16 dot with f32 accumulation: either way the exact products summed in
    f32, then rounded once to bf16. Against the float64 product of the same bf16 values: within
    one bf16 rounding (2^-8 relative) plus f32 summation error (k = 256, far below it)."""
    from jaxchunk import model
    from pallas_kernels import native_cpu
    monkeypatch.setattr(native_cpu, "widens_bf16_dots", lambda: widen)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 40, 256)), jnp.bfloat16)  # 80 rows: above the decode rows
    w = jnp.asarray(rng.normal(size=(256, 96)), jnp.bfloat16)
    linear = jax.jit(lambda x, w: model.linear(x, w))  # a new function: no trace cached by the other case
    y = linear(x, w)
    assert y.dtype == jnp.bfloat16
    ref = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    np.testing.assert_allclose(np.asarray(y, np.float64), ref, rtol=2 ** -8, atol=1e-6 * np.abs(ref).max())
    hlo = linear.lower(x, w).as_text()
    assert ("bf16" not in hlo.split("dot_general")[1].split("\n")[0]) == widen  # the dot's operand types


def test_widens_bf16_dots_only_without_bf16_dot_instructions(monkeypatch):
    from pallas_kernels import native_cpu
    for flags, widens in [({"avx2", "fma"}, True), ({"avx2", "avx512f", "avx512_bf16"}, False),
                          ({"avx2", "amx_bf16"}, False), (set(), False)]:
        monkeypatch.setattr(native_cpu, "cpu_flags", lambda flags=flags: frozenset(flags))
        assert native_cpu.widens_bf16_dots() == widens, flags
