"""Chunked prefill + decode against the plain full-attention forward, on a small random Llama.

Tolerance (float32): chunking changes only the order of the softmax/PV summation over key blocks, so
differences are rounding noise: we require max |diff| <= 1e-4 * (logit range), the issue's target,
and identical argmax at every position.
"""
import jax.numpy as jnp
import numpy as np
import pytest
from reference_forward import forward

from jaxchunk.cache import init_cache
from jaxchunk.config import RopeScaling
from jaxchunk.testing import tiny_config
from jaxchunk.errors import InputError
from jaxchunk.model import init_params, rope_inv_freq
from jaxchunk.prefill import chunk_schedule, decode_step, exllama_chunk_len, prefill, prefill_chunk
from jaxchunk.steps import compiled_step_counts, jitted_prefill_chunk

CONFIG = tiny_config(vocab_size=512, num_heads=6, max_position_embeddings=2048, tie_word_embeddings=False)
MAX_SEQ = 1100
REL_TOL = 1e-4


@pytest.fixture(scope="module")
def params():
    # scale 0.2 gives peaked, position-dependent attention, so a wrong mask shows up in the logits.
    return init_params(CONFIG, seed=0, scale=0.2)


def prompt(length, seed=1):
    return np.random.default_rng(seed).integers(0, CONFIG.vocab_size, length).astype(np.int32)


def assert_close_logits(got, want):
    got, want = np.asarray(got), np.asarray(want)
    scale = np.ptp(want)
    assert np.abs(got - want).max() <= REL_TOL * scale, (np.abs(got - want).max(), scale)


# Chunk 1 over 1000 tokens (1000 dispatches) is left out: lengths <= 300 cover chunk 1.
CASES = [(n, c) for n in (1, 63, 300, 1000) for c in (1, 7, 64, 256, "whole") if (n, c) != (1000, 1)]


@pytest.mark.parametrize("length, chunk_size", CASES)
def test_chunked_equals_full(params, length, chunk_size):
    chunk = length if chunk_size == "whole" else chunk_size
    ids = prompt(length)
    ref_logits, (ref_k, ref_v) = forward(params, CONFIG, ids[None], return_kv=True)
    cache = init_cache(CONFIG, 1, MAX_SEQ)
    cache, logits = prefill(params, CONFIG, cache, [ids], chunk_size=chunk, max_input_len=MAX_SEQ,
                            all_logits=True)
    assert_close_logits(logits[0][-1], ref_logits[0, -1])
    np.testing.assert_array_equal(logits[0].argmax(-1), np.asarray(ref_logits[0]).argmax(-1))
    assert int(cache.lengths[0]) == length
    # Cache holds exactly the prompt's K/V; the rest is untouched zeros (padding wrote nowhere).
    for got, want in ((cache.keys, ref_k), (cache.values, ref_v)):
        want = np.asarray(want[:, 0])
        np.testing.assert_allclose(got[:, 0, :length], want, atol=REL_TOL * np.abs(want).max())
    assert not np.any(np.asarray(cache.keys[:, 0, length:]))


def test_decode_after_chunked_prefill_equals_forward(params):
    ids = prompt(150)
    cache = init_cache(CONFIG, 1, MAX_SEQ)
    cache, logits = prefill(params, CONFIG, cache, [ids], chunk_size=64)
    seq, decoded = list(ids), []
    for _ in range(8):
        next_token = int(np.asarray(logits)[0].argmax())
        seq.append(next_token)
        cache, logits = decode_step(params, cache, np.array([next_token]), config=CONFIG)
        decoded.append(np.asarray(logits)[0])
    # forward is causal: its row p is the prediction after token p (one compile for every step).
    ref = np.asarray(forward(params, CONFIG, np.array(seq)[None]))[0]
    for step, got in enumerate(decoded):
        assert_close_logits(got, ref[len(ids) + step])


def test_batch_of_different_lengths_has_no_cross_row_leakage(params):
    lengths = [37, 200, 129]
    prompts = [prompt(n, seed=10 + i) for i, n in enumerate(lengths)]
    cache = init_cache(CONFIG, 3, MAX_SEQ)
    cache, logits = prefill(params, CONFIG, cache, prompts, chunk_size=64)
    np.testing.assert_array_equal(np.asarray(cache.lengths), lengths)
    next_tokens = np.asarray(logits).argmax(-1)
    # forward is causal: over the prompt and its next token, row -2 is the prompt's last-token
    # prediction and row -1 the decode step's (one compile per row).
    refs = [np.asarray(forward(params, CONFIG, np.append(ids, next_tokens[b])[None]))[0]
            for b, ids in enumerate(prompts)]
    for b in range(len(prompts)):
        assert_close_logits(np.asarray(logits)[b], refs[b][-2])
    # Decode one token per row at different positions.
    cache, step_logits = decode_step(params, cache, next_tokens, config=CONFIG)
    for b in range(len(prompts)):
        assert_close_logits(np.asarray(step_logits)[b], refs[b][-1])
    # Changing row 1 changes nothing in rows 0 and 2.
    other = [prompts[0], prompt(200, seed=99), prompts[2]]
    cache2 = init_cache(CONFIG, 3, MAX_SEQ)
    cache2, logits2 = prefill(params, CONFIG, cache2, other, chunk_size=64)
    np.testing.assert_array_equal(np.asarray(logits2)[[0, 2]], np.asarray(logits)[[0, 2]])
    assert not np.allclose(np.asarray(logits2)[1], np.asarray(logits)[1])


def test_one_compile_per_chunk_len_and_one_for_decode(params):
    before = compiled_step_counts()
    for length in (90, 170, 333):  # each spans several chunks of 48, last one padded
        cache = init_cache(CONFIG, 2, 512)
        cache, logits = prefill(params, CONFIG, cache, [prompt(length), prompt(length - 5)], chunk_size=48)
        lengths = np.array([length, length - 5])
        for _ in range(3):
            cache, logits = decode_step(params, cache, np.asarray(logits).argmax(-1), config=CONFIG,
                                        lengths=lengths)
            lengths += 1
    after = compiled_step_counts()
    assert after["prefill_chunk"] - before["prefill_chunk"] == 1
    assert after["decode_step"] - before["decode_step"] == 1


def compiled_memory(params, max_seq, chunk_len):
    cache = init_cache(CONFIG, 1, max_seq)
    tokens = jnp.zeros((1, chunk_len), jnp.int32)
    n_valid = jnp.full((1,), chunk_len, jnp.int32)
    compiled = jitted_prefill_chunk.lower(params, cache, tokens, n_valid, config=CONFIG, attention_impl="auto",
                                    logits="last").compile()
    return compiled.memory_analysis(), cache.keys.nbytes + cache.values.nbytes


def test_cache_is_donated_and_updated_in_place(params):
    cache = init_cache(CONFIG, 1, MAX_SEQ)
    old_keys = cache.keys
    cache, _ = prefill_chunk(params, cache, prompt(32)[None], config=CONFIG)
    assert old_keys.is_deleted(), "the input cache was not donated"
    # XLA aliases the cache input to the output, and the step's temporaries do not grow with the
    # cache capacity: no copy of the cache (or of one layer of it) is made per chunk.
    small, small_cache_bytes = compiled_memory(params, 1024, 32)
    large, large_cache_bytes = compiled_memory(params, 2048, 32)
    assert small.alias_size_in_bytes >= small_cache_bytes
    assert large.alias_size_in_bytes >= large_cache_bytes
    assert large.temp_size_in_bytes == small.temp_size_in_bytes


def test_chunk_schedule_follows_exllamav2_rule():
    for length, past in [(8192, 0), (3000, 100), (5, 4000), (2049, 0)]:
        schedule = chunk_schedule(length, past, max_input_len=2048, max_attention_size=2048 ** 2)
        assert sum(n for _, n in schedule) == length
        seen = past
        for chunk_len, n_valid in schedule:
            assert 0 < n_valid <= chunk_len <= 2048
            assert chunk_len & (chunk_len - 1) == 0  # power of two: bounded set of compiles
            assert (seen + chunk_len) * chunk_len <= 2048 ** 2
            seen += n_valid
    # The closed form is exllamav2's: largest q with (past + q) * q <= budget.
    for past in (0, 1, 500, 2048, 6000):
        q = exllama_chunk_len(past, 10 ** 9, 2048 ** 2)
        assert (past + q) * q <= 2048 ** 2 < (past + q + 1) * (q + 1)
    assert chunk_schedule(10, chunk_size=4) == [(4, 4), (4, 4), (4, 2)]


@pytest.mark.parametrize("kwargs, message", [
    (dict(chunk_size=0), "chunk_size"),
    (dict(chunk_size=4096), "chunk_size"),
    (dict(chunk_size=-3), "chunk_size"),
])
def test_bad_chunk_size(params, kwargs, message):
    with pytest.raises(InputError, match=message):
        prefill(params, CONFIG, init_cache(CONFIG, 1, 64), [prompt(10)], **kwargs)


def test_bad_inputs_are_clear_errors(params):
    cache = init_cache(CONFIG, 1, 64)
    with pytest.raises(InputError, match="exceeds the cache capacity"):
        prefill(params, CONFIG, cache, [prompt(65)])
    with pytest.raises(InputError, match="empty"):
        prefill(params, CONFIG, cache, [np.array([], np.int32)])
    with pytest.raises(InputError, match="integer"):
        prefill(params, CONFIG, cache, [np.ones(4, np.float32)])
    with pytest.raises(InputError, match="outside"):
        prefill(params, CONFIG, cache, [np.array([1, CONFIG.vocab_size])])
    with pytest.raises(InputError, match="2 prompts"):
        prefill(params, CONFIG, cache, [prompt(3), prompt(3)])
    with pytest.raises(InputError, match="shape"):
        decode_step(params, cache, np.array([[1]]), config=CONFIG)
    with pytest.raises(InputError, match="max_seq_len"):
        init_cache(CONFIG, 1, 4096)
    with pytest.raises(InputError, match="positive"):
        init_cache(CONFIG, 0, 64)
    # A full cache refuses one more token instead of silently overwriting the last slot.
    cache, logits = prefill(params, CONFIG, cache, [prompt(64)], chunk_size=32)
    with pytest.raises(InputError, match="exceeds the cache capacity"):
        decode_step(params, cache, np.array([1]), config=CONFIG)


def test_llama3_rope_scaling_matches_transformers():
    torch = pytest.importorskip("torch")
    from transformers import LlamaConfig as HFConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = HFConfig(hidden_size=512, num_attention_heads=4, rope_theta=500000.0, max_position_embeddings=131072,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    want, _ = ROPE_INIT_FUNCTIONS["llama3"](hf, torch.device("cpu"))
    ours = tiny_config(vocab_size=8, hidden_size=512, intermediate_size=8, num_layers=1, num_kv_heads=4,
                       head_dim=128, max_position_embeddings=131072, rope_theta=500000.0,
                       rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 8192))
    np.testing.assert_allclose(rope_inv_freq(ours), want.numpy(), rtol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["pallas", "reference"])
def test_model_with_other_attention_impls_matches_forward(params, impl):
    """The whole model with the Pallas kernels (interpret mode on CPU: flash for the chunks, split-K
    decode for single tokens) or the plain reference: chunked prefill + decode equal `forward`."""
    ids = prompt(150, seed=3)
    cache = init_cache(CONFIG, 1, 256)
    cache, logits = prefill(params, CONFIG, cache, [ids], chunk_size=64, attention_impl=impl)
    assert_close_logits(np.asarray(logits)[0], forward(params, CONFIG, ids[None])[0, -1])
    seq = list(ids)
    for _ in range(3):
        seq.append(int(np.asarray(logits)[0].argmax()))
        cache, logits = decode_step(params, cache, np.array([seq[-1]]), config=CONFIG, attention_impl=impl)
        assert_close_logits(np.asarray(logits)[0], forward(params, CONFIG, np.array(seq)[None])[0, -1])
