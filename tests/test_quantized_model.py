"""SmolLM2-135M with its weights kept quantized (load_gguf(quantized=True) / load(weights="q4"))
against the same GGUF dequantized to float32 by the float loader."""
from __future__ import annotations

import os

import jax
import numpy as np
import pytest

pytestmark = pytest.mark.model

# Resident weight bytes may be at most this multiple of the GGUF file's size (the budget).
MEMORY_BUDGET = 1.25


@pytest.fixture(scope="module")
def smollm2_q4(smollm2_gguf):
    from jaxchunk.weights.gguf import load_gguf
    config, params, _ = load_gguf(smollm2_gguf, quantized=True)
    return config, params


def _nbytes(tree) -> int:
    return sum(int(leaf.nbytes) for leaf in jax.tree.leaves(tree))


def test_quantized_weights_fit_the_file_size(smollm2_gguf, smollm2_q4):
    from jaxchunk.weights.quantized import QuantizedWeight
    _, params = smollm2_q4
    ratio = _nbytes(params) / os.path.getsize(smollm2_gguf)
    print(f"resident weight bytes / GGUF file size = {ratio:.3f}")
    assert ratio <= MEMORY_BUDGET
    assert isinstance(params["embed"], QuantizedWeight) and params["embed"].qtype == "Q8_0"
    assert all(isinstance(params["layers"][k], QuantizedWeight) and params["layers"][k].qtype == "Q4_1"
               for k in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"))


def test_quantized_weights_stand_for_the_dequantized_ones(smollm2_q4, smollm2_f32):
    """Every kept matrix dequantizes to exactly the float loader's values (gguf.quants's
    dequantization, Q/K rows un-permuted): repacking moved bytes only."""
    from jaxchunk.weights.quantized import dequantize
    _, qparams = smollm2_q4
    _, fparams = smollm2_f32
    np.testing.assert_array_equal(np.asarray(dequantize(qparams["embed"])).T, fparams["embed"])
    for key in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down"):
        for layer in (0, 29):  # first and last: stacking keeps layer order
            w = jax.tree.map(lambda a: a[layer], qparams["layers"][key])
            np.testing.assert_array_equal(np.asarray(dequantize(w)), fparams["layers"][key][layer], err_msg=key)
    np.testing.assert_array_equal(qparams["layers"]["attn_norm"], fparams["layers"]["attn_norm"])


@pytest.mark.slow
def test_quantized_logits_match_dequantized_f32_model(smollm2_q4, smollm2_f32):
    """Chunked prefill (all positions) + decode on a real prompt. Both models compute with the same
    weight values in float32, so only summation order differs: logits agree to 2e-3 absolute
    (they span about +-25; observed ~1e-4)."""
    from experiments.common import prompt_ids
    from jaxchunk.cache import init_cache
    from jaxchunk.prefill import decode_step, prefill_chunk
    ids = prompt_ids("smollm2-135m", 160)
    outputs = []
    for config, params in (smollm2_q4, smollm2_f32):
        params = jax.device_put(params)
        cache = init_cache(config, 1, 256, "f32")
        cache, logits = prefill_chunk(params, cache, ids[None, :128], config=config, attention_impl="xla",
                                      logits="all")
        steps = [np.asarray(logits[0])]
        for token in ids[128:136]:
            cache, last = decode_step(params, cache, np.array([token]), config=config, attention_impl="xla")
            steps.append(np.asarray(last))
        outputs.append(np.concatenate([steps[0], np.stack(steps[1:])[:, 0]]))
    q4, f32 = outputs
    assert np.abs(f32).max() > 5  # real logits, not a degenerate run
    print(f"max |logits q4 - f32| = {np.abs(q4 - f32).max():.2e} (max |logit| {np.abs(f32).max():.1f})")
    np.testing.assert_allclose(q4, f32, atol=2e-3, rtol=0)
    assert (q4.argmax(-1) == f32.argmax(-1)).mean() >= 0.99


@pytest.mark.slow
def test_quantized_perplexity_within_0_1_percent(smollm2_gguf):
    """Perplexity of 2,048 tokens of jaxchunk.corpus text: weights="q4" vs weights="f32" within 0.1%
    (the issue's bound). weights="q4_q8" also rounds every matrix input to 8 bits per 32-block
    (llama.cpp's arithmetic): ~1/254 of a block's largest value per element, measured +0.14%; held to
    0.5% here."""
    from jaxchunk.api import load
    from jaxchunk.corpus import reference_text
    text = reference_text(12_000)
    results = {}
    for weights in ("q4", "q4_q8", "f32"):
        model = load(smollm2_gguf, weights=weights, attention_impl="xla", max_seq_len=2048)
        assert model.weights == weights
        results[weights] = model.perplexity(text, max_tokens=2048)
        n_tokens = min(len(model.encode(text)), 2048)
        del model
    assert n_tokens == 2048
    print(f"perplexity q4 {results['q4']:.6f} q4_q8 {results['q4_q8']:.6f} f32 {results['f32']:.6f}; relative "
          f"difference q4 {results['q4'] / results['f32'] - 1:.2e}, q4_q8 {results['q4_q8'] / results['f32'] - 1:.2e}")
    assert 3 < results["f32"] < 100
    assert abs(results["q4"] / results["f32"] - 1) <= 1e-3
    assert abs(results["q4_q8"] / results["f32"] - 1) <= 5e-3
    assert results["q4_q8"] != results["q4"]  # the rounding is really on


@pytest.mark.slow
def test_q4_q8_decode_agrees_with_the_f32_model(smollm2_q4, smollm2_f32):
    """weights="q4_q8" decode (the native kernel's integer products where it builds) after a real
    prompt: the same model up to 8-bit input rounding; greedy choices agree with the f32 model."""
    from experiments.common import prompt_ids
    from jaxchunk.cache import init_cache
    from jaxchunk.prefill import decode_step, prefill_chunk
    from jaxchunk.weights.quantized import with_activations
    ids = prompt_ids("smollm2-135m", 160)
    outputs = []
    for config, params in ((smollm2_q4[0], with_activations(smollm2_q4[1], "q8")), smollm2_f32):
        params = jax.device_put(params)
        cache = init_cache(config, 1, 256, "f32")
        cache, _ = prefill_chunk(params, cache, ids[None, :128], config=config)
        steps = []
        for token in ids[128:160]:
            cache, last = decode_step(params, cache, np.array([token]), config=config)
            steps.append(np.asarray(last[0]))
        outputs.append(np.stack(steps))
    q8, f32 = outputs
    diff = np.abs(q8 - f32).max()
    print(f"q4_q8 decode: max |logit diff| vs f32 {diff:.3f} (max |logit| {np.abs(f32).max():.1f}), "
          f"top-1 agreement {(q8.argmax(-1) == f32.argmax(-1)).mean():.3f}")
    # Rounded (not the float path's ~1e-4), but the same model: 8-bit inputs through 30 layers moved
    # the logits (|logit| <= 36) by at most 0.80 when measured; 2.0 leaves room for other CPUs' order.
    assert 1e-3 < diff < 2.0
    assert (q8.argmax(-1) == f32.argmax(-1)).mean() >= 0.9


def test_load_weight_modes(smollm2_gguf, smollm2_f32):
    """load(weights=...): "q4" with a bf16 compute dtype runs (norms and activations bf16, matrices
    still quantized) and predicts like the f32 model; contradictory settings are rejected."""
    import jax.numpy as jnp

    from experiments.common import prompt_ids
    from jaxchunk.api import load
    from jaxchunk.errors import InputError
    from jaxchunk.weights.quantized import QuantizedWeight
    with pytest.raises(InputError, match="contradicts"):
        load(smollm2_gguf, weights="bf16", dtype="f32")
    model = load(smollm2_gguf, weights="q4", dtype="bf16", max_seq_len=128)
    assert (model.weights, model.dtype) == ("q4", "bf16") and "weights=q4" in repr(model)
    assert isinstance(model.params["layers"]["w_up"], QuantizedWeight)
    assert model.params["final_norm"].dtype == jnp.bfloat16
    ids = prompt_ids("smollm2-135m", 64)
    got = model.logits(ids, all_positions=True)
    config, fparams = smollm2_f32
    from jaxchunk.model import forward
    expected = np.asarray(jax.jit(forward, static_argnums=1)(fparams, config, ids[None]))[0]
    # bf16 activations: a loose check that it is the same model (top-1 agreement), not bit equality.
    assert (got.argmax(-1) == expected.argmax(-1)).mean() >= 0.9
