"""The sliding-window ring cache (`init_cache(..., ring_chunk_len=C)`): local layers keep
window - 1 + C slots (position p in slot p % ring_len), global layers every position.

References, both independent of the ring code: the plain full-attention `forward` (float32, no
cache) and the full-length cache path (`init_cache` without a ring) at the same chunk size.
Tolerance: float32 logits within 1e-4 x the logit range (the ring's keys reach the blockwise
attention at other offsets than the full cache's, so the online softmax sums in another order:
~1e-6 differences seen; a wrong key, window edge or position would move them by > 1e-2 x the
range at scale 0.2), greedy ids identical.
"""
import numpy as np
import pytest
from reference_forward import forward

from jaxchunk.cache import init_cache, ring_layout
from jaxchunk.errors import InputError
from jaxchunk.model import init_params
from jaxchunk.prefill import decode_step, prefill, prefill_chunk
from jaxchunk.steps import compiled_step_counts, step_memory
from jaxchunk.testing import tiny_config, tiny_gemma3_config

REL_TOL = 1e-4
DECODE_STEPS = 5

# Window 16 over 6 layers (local, local, global x 2): the sweep around the window runs in seconds.
SMALL = tiny_gemma3_config(window=16, pattern=3, num_layers=6, vocab_size=512, max_position_embeddings=2048)
# The real model's window (512) on the 3-layer tiny Gemma 3.
WIDE = tiny_gemma3_config(window=512, vocab_size=512, max_position_embeddings=2048)


def prompt(length, vocab=512, seed=1):
    return np.random.default_rng(seed).integers(0, vocab, length).astype(np.int32)


def assert_close_logits(got, want):
    got, want = np.asarray(got), np.asarray(want)
    scale = np.ptp(want)
    assert np.abs(got - want).max() <= REL_TOL * scale, (np.abs(got - want).max(), scale)


@pytest.fixture(scope="module")
def small_params():
    return init_params(SMALL, seed=0, scale=0.2)  # peaked attention: a wrong key shows


@pytest.fixture(scope="module")
def wide_params():
    return init_params(WIDE, seed=0, scale=0.2)


def prefill_then_decode(params, config, cache, ids, chunk_size, steps=DECODE_STEPS):
    """All prefill logits [len, vocab], then `steps` greedy decode steps, each feeding the id
    predicted before it: (prefill logits, decode logits [steps, vocab], the fed ids, cache)."""
    cache, logits = prefill(params, config, cache, [ids], chunk_size=chunk_size, max_input_len=2048,
                            all_logits=True)
    token, decoded, ids_out = int(logits[0][-1].argmax()), [], []
    for _ in range(steps):
        ids_out.append(token)
        cache, step_logits = decode_step(params, cache, np.array([token]), config=config)
        decoded.append(np.asarray(step_logits)[0])
        token = int(decoded[-1].argmax())
    return logits[0], np.stack(decoded), ids_out, cache


def check_ring_equals_full(params, config, length, chunk_size, max_seq):
    ids = prompt(length, seed=length)
    ring = init_cache(config, 1, max_seq, ring_chunk_len=chunk_size)
    assert ring.ring_len == min(config.windows[0] - 1 + chunk_size, max_seq)
    got, got_decode, got_ids, ring = prefill_then_decode(params, config, ring, ids, chunk_size)
    want, want_decode, want_ids, _ = prefill_then_decode(params, config, init_cache(config, 1, max_seq), ids,
                                                         chunk_size)
    assert got_ids == want_ids
    assert_close_logits(got, want)
    np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))
    assert_close_logits(got_decode, want_decode)
    # Independent of both cache paths: forward over the whole sequence (prompt + decoded ids).
    seq = np.concatenate([ids, np.array(got_ids, np.int32)])
    ref = np.asarray(forward(params, config, seq[None]))[0]
    assert_close_logits(got, ref[:length])
    assert_close_logits(got_decode, ref[length:])  # decode step i fed id i: position length + i
    return ring, seq


# Lengths before, at and past the window (and several rings), chunks of 1, below and above it.
SMALL_CASES = [(n, c) for n in (1, 15, 16, 17, 60) for c in (1, 7, 16, 32)]


@pytest.mark.parametrize("length, chunk_size", SMALL_CASES)
def test_small_window_ring_equals_full_cache(small_params, length, chunk_size):
    ring, seq = check_ring_equals_full(small_params, SMALL, length, chunk_size, max_seq=128)
    # The ring holds forward's K/V of the last ring_len positions, position p in slot p % ring_len.
    _, (ref_k, ref_v) = forward(small_params, SMALL, seq[None], return_kv=True)
    layout = ring_layout(SMALL, chunk_size)
    local = [i for i, w in enumerate(SMALL.layer_windows) if w is not None]
    n = len(seq)  # every decoded id was fed back
    kept = np.arange(max(0, n - ring.ring_len), n)
    for got, want in ((ring.ring_keys, ref_k), (ring.ring_values, ref_v)):
        for layer in local:
            stored = np.asarray(got[layout.ring_index[layer], 0])[kept % ring.ring_len]
            np.testing.assert_allclose(stored, np.asarray(want[layer, 0])[kept], atol=1e-5)
    glob = [i for i, w in enumerate(SMALL.layer_windows) if w is None]
    for layer in glob:
        np.testing.assert_allclose(np.asarray(ring.keys[layout.full_index[layer], 0, :n]),
                                   np.asarray(ref_k[layer, 0]), atol=1e-5)


# The brief's sweep at the real window: lengths around 512 and 1500, chunks 1 .. 512 (chunk 1 is
# one dispatch per token: up to 513 tokens only).
WIDE_CASES = [(n, c) for n in (1, 511, 512, 513, 1500) for c in (1, 7, 256, 512) if (n, c) != (1500, 1)]


@pytest.mark.slow
@pytest.mark.parametrize("length, chunk_size", WIDE_CASES)
def test_window_512_ring_equals_full_cache(wide_params, length, chunk_size):
    check_ring_equals_full(wide_params, WIDE, length, chunk_size, max_seq=1600)


def test_batch_rows_of_different_lengths(small_params):
    """Each row wraps its ring at its own position (base per row); one row shorter than a chunk."""
    rows = [prompt(53, seed=3), prompt(9, seed=4)]
    ring = init_cache(SMALL, 2, 96, ring_chunk_len=8)
    ring, logits = prefill(small_params, SMALL, ring, rows, chunk_size=8, all_logits=True)
    for row, got in zip(rows, logits):
        assert_close_logits(got, np.asarray(forward(small_params, SMALL, row[None]))[0])
    lengths = np.array([53, 9])
    seqs, steps = [list(r) for r in rows], []
    tokens = np.array([int(g[-1].argmax()) for g in logits])
    for _ in range(3):
        ring, step = decode_step(small_params, ring, tokens, config=SMALL, lengths=lengths)
        lengths += 1
        for b in range(2):
            seqs[b].append(int(tokens[b]))
        steps.append(np.asarray(step))
        tokens = steps[-1].argmax(-1)
    for b in range(2):  # forward is causal: its last 3 rows are the decode steps' predictions
        ref = np.asarray(forward(small_params, SMALL, np.array(seqs[b])[None]))[0, -3:]
        assert_close_logits(np.stack([s[b] for s in steps]), ref)


@pytest.mark.parametrize("cache_dtype", ["q8", "bf16", "k8v4"])
def test_quantized_ring_equals_quantized_full_cache(cache_dtype):
    """Every cache format goes through the ring (codes and scales in the same slots): the same
    numbers as the full-length cache in that format."""
    config = tiny_gemma3_config(window=16, vocab_size=512, head_dim=32)
    params = init_params(config, seed=5, scale=0.2)
    ids = prompt(70, seed=6)
    got, got_dec, got_ids, _ = prefill_then_decode(
        params, config, init_cache(config, 1, 96, cache_dtype, ring_chunk_len=16), ids, 16, steps=3)
    want, want_dec, want_ids, _ = prefill_then_decode(params, config, init_cache(config, 1, 96, cache_dtype), ids, 16,
                                                      steps=3)
    assert got_ids == want_ids
    assert_close_logits(got, want)
    assert_close_logits(got_dec, want_dec)


def test_one_compile_per_chunk_len_and_one_for_decode():
    config = tiny_gemma3_config(window=8, vocab_size=301)  # a config no other test compiles
    params = init_params(config, seed=1, scale=0.2)
    before = compiled_step_counts()
    for length in (5, 30, 70):
        cache = init_cache(config, 1, 128, ring_chunk_len=16)
        cache, logits = prefill(params, config, cache, [prompt(length, 301)], chunk_size=16)
        for _ in range(3):
            cache, logits = decode_step(params, cache, np.asarray(logits).argmax(-1), config=config)
    after = compiled_step_counts()
    assert after["prefill_chunk"] - before["prefill_chunk"] == 1
    assert after["decode_step"] - before["decode_step"] == 1


def test_sizes_and_bytes_per_token():
    """Shapes from the layout, bytes counted from first principles (f32: 4 bytes, K and V)."""
    batch, max_seq, chunk = 2, 1024, 32
    full = init_cache(SMALL, batch, max_seq)
    ring = init_cache(SMALL, batch, max_seq, ring_chunk_len=chunk)
    local, glob = 4, 2   # SMALL: local, local, global x 2
    per_slot = SMALL.num_kv_heads * SMALL.head_dim * 4 * 2
    assert ring.keys.shape == (glob, batch, max_seq, SMALL.num_kv_heads, SMALL.head_dim)
    assert ring.ring_keys.shape == (local, batch, 16 - 1 + chunk, SMALL.num_kv_heads, SMALL.head_dim)
    assert full.bytes_per_token == full.growing_bytes_per_token == 6 * per_slot and full.ring_bytes == 0
    assert ring.growing_bytes_per_token == glob * per_slot
    assert ring.ring_bytes == local * batch * (16 - 1 + chunk) * per_slot
    assert ring.nbytes - ring.lengths.nbytes == ring.ring_bytes + ring.growing_bytes_per_token * batch * max_seq
    # A ring longer than the cache would never wrap: clamped to max_seq_len.
    assert init_cache(SMALL, 1, 20, ring_chunk_len=chunk).ring_len == 20


def test_ring_updated_in_place(small_params):
    """The donated ring is aliased to the step's output like the rest of the cache (no copy)."""
    cache = init_cache(SMALL, 1, 2048, ring_chunk_len=64)
    memory = step_memory(small_params, cache, 64, config=SMALL)
    assert memory.alias_bytes >= cache.nbytes - cache.lengths.nbytes


def test_errors():
    params = init_params(SMALL, seed=0)
    ring = init_cache(SMALL, 1, 128, ring_chunk_len=8)
    with pytest.raises(InputError, match="ring_chunk_len=8"):
        prefill(params, SMALL, ring, [prompt(20)], chunk_size=9)
    with pytest.raises(InputError, match="ring_chunk_len=8"):
        prefill_chunk(params, ring, prompt(9)[None], config=SMALL)
    for bad in (0, -3, True, 2.5):
        with pytest.raises(InputError, match="ring_chunk_len"):
            init_cache(SMALL, 1, 128, ring_chunk_len=bad)
    with pytest.raises(InputError, match="no sliding-window layers"):
        init_cache(tiny_config(), 1, 128, ring_chunk_len=8)
    # A ring built for another layer pattern (4 local layers here, 3 there) is refused at trace time.
    other = tiny_gemma3_config(window=16, pattern=2, num_layers=6, vocab_size=512)
    with pytest.raises(InputError, match="not built for this config"):
        prefill(init_params(other, seed=0), other, init_cache(SMALL, 1, 128, ring_chunk_len=8), [prompt(5)],
                chunk_size=8)
    # The automatic schedule stays within the ring (max_input_len capped at ring_chunk_len).
    ring, logits = prefill(params, SMALL, ring, [prompt(40)])
    assert_close_logits(np.asarray(logits)[0], np.asarray(forward(params, SMALL, prompt(40)[None]))[0, -1])


def test_generator_refuses_a_ring_model():
    from jaxchunk.api import Model
    from jaxchunk.generator import Generator
    model = Model(SMALL, init_params(SMALL, seed=0), None, max_seq_len=128, ring_chunk_len=8)
    assert model.new_cache(1).ring_chunk_len == 8
    with pytest.raises(InputError, match="paged cache"):
        Generator(model)


def test_on_device_generation_loop_with_ring(small_params):
    """`generate_ids` (prefill, then the on-device decode loop) gives the same greedy ids with the ring."""
    from jaxchunk.generate import generate_ids
    from jaxchunk.sampling import SamplingParams
    rows = [prompt(45, seed=8), prompt(20, seed=9)]
    kwargs = dict(max_new_tokens=24, sampling=SamplingParams(), seed=0, chunk_size=8, stop_ids=[])
    _, got = generate_ids(small_params, SMALL, init_cache(SMALL, 2, 96, ring_chunk_len=8), rows, **kwargs)
    _, want = generate_ids(small_params, SMALL, init_cache(SMALL, 2, 96), rows, **kwargs)
    assert got == want and all(len(g) == 24 for g in got)


def test_layers_with_different_windows():
    """Two local windows (8 and 16): one ring sized for the larger, each layer masks by its own."""
    import dataclasses
    config = dataclasses.replace(SMALL, layer_windows=(8, 16, None, 16, 8, None))
    params = init_params(config, seed=3, scale=0.2)
    ids = prompt(50, seed=7)
    ring = init_cache(config, 1, 64, ring_chunk_len=8)
    assert ring.ring_len == 16 - 1 + 8
    ring, logits = prefill(params, config, ring, [ids], chunk_size=8, all_logits=True)
    assert_close_logits(logits[0], np.asarray(forward(params, config, ids[None]))[0])



@pytest.mark.slow
def test_pallas_kernels_read_the_ring(small_params):
    """The Pallas kernels (interpret mode off a GPU: flash for chunks, split-K decode for one
    token) over the ring's position-ordered view give forward's logits."""
    ids = prompt(37, seed=5)
    ring = init_cache(SMALL, 1, 64, ring_chunk_len=16)
    ring, logits = prefill(small_params, SMALL, ring, [ids], chunk_size=16, attention_impl="pallas")
    seq = list(ids)
    for _ in range(2):
        assert_close_logits(np.asarray(logits)[0], forward(small_params, SMALL, np.array(seq)[None])[0, -1])
        seq.append(int(np.asarray(logits)[0].argmax()))
        ring, logits = decode_step(small_params, ring, np.array([seq[-1]]), config=SMALL, attention_impl="pallas")
    assert_close_logits(np.asarray(logits)[0], forward(small_params, SMALL, np.array(seq)[None])[0, -1])
