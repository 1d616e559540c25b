"""Chunked training (jaxchunk.training) against full-sequence gradients on a small random Llama and a
small random Gemma 3 (sliding-window layers).

References, independent of the cache / model_step / attention kernels / chunking:
- mode="exact": jax.grad of the mean next-token loss of `jaxchunk.model.forward` (plain full causal
  attention over the whole sequence).
- mode="truncated": the same full forward, written out here layer by layer, with the keys/values of
  positions < n - train_len wrapped in stop_gradient (held constant), and the loss over the last
  train_len positions only.

Tolerance (float32): chunking changes only summation order (softmax over chunks of keys, gradient
contributions accumulated chunk by chunk in reverse), so per-parameter-group differences are
rounding noise: relative L2 norm <= 1e-4 (observed ~2e-6; float32 eps is 1.2e-7 and sums here run
over ~100 positions x 2 layers). A missing gradient path (e.g. not flowing into earlier chunks'
K/V) gives relative differences of order 0.1-1, far above it - `test_references_disagree` checks
that the two references really differ on these inputs.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxchunk.testing import tiny_config, tiny_gemma3_config
from jaxchunk.errors import InputError
from jaxchunk.model import (embed, forward, full_causal_attention, init_params, linear, lm_head, mlp, qkv, rms_norm,
                            rope_inv_freq)
from jaxchunk.training import chunked_loss, full_loss, loss_and_grad

CONFIG = tiny_config(vocab_size=128, tie_word_embeddings=False)
REL_TOL = 1e-4


@pytest.fixture(scope="module")
def params():
    # scale 0.2: peaked, position-dependent attention, so gradients through K/V are not negligible.
    return init_params(CONFIG, seed=0, scale=0.2)


def ids_of(n, batch=2, seed=0):
    return np.random.default_rng(seed + n).integers(0, CONFIG.vocab_size, (batch, n)).astype(np.int32)


def nll(logits, targets):
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def reference_loss(params, ids, first=0):
    """Full-sequence loss over positions [first, n - 1); K/V of positions < first held constant."""
    ids = jnp.asarray(ids)
    b, n = ids.shape
    positions = jnp.broadcast_to(jnp.arange(n), (b, n))
    inv_freq = rope_inv_freq(CONFIG)
    constant = (jnp.arange(n) < first)[None, :, None, None]
    x = embed(params, ids, jnp.float32)
    for i in range(CONFIG.num_layers):
        layer = jax.tree.map(lambda a: a[i], params["layers"])
        h = rms_norm(x, layer["attn_norm"], CONFIG.rms_norm_eps)
        q, k, v = qkv(layer, CONFIG, h, positions, inv_freq)
        k = jnp.where(constant, jax.lax.stop_gradient(k), k)
        v = jnp.where(constant, jax.lax.stop_gradient(v), v)
        x = x + linear(full_causal_attention(q, k, v).reshape(b, n, -1), layer["wo"])
        x = x + mlp(layer, rms_norm(x, layer["mlp_norm"], CONFIG.rms_norm_eps))
    logits = lm_head(params, CONFIG, x)
    return jnp.mean(nll(logits[:, first:n - 1], ids[:, first + 1:]))


reference_grad = jax.jit(jax.value_and_grad(reference_loss), static_argnums=(2,))


def assert_grads_close(got, want, tol=REL_TOL):
    for path, g, w in zip(jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(got), jax.tree.leaves(want)):
        rel = float(jnp.linalg.norm(g - w) / jnp.linalg.norm(w))
        assert rel <= tol, (jax.tree_util.keystr(path[0]), rel)


# Lengths not multiples of the chunk; chunk 33 > 16 and one chunk 33 covering 37 in two pieces.
EXACT_CASES = [(37, 8, "recompute"), (37, 33, "recompute"), (100, 16, "recompute"), (37, 16, "checkpoint")]
EXACT_SLOW = [(100, 8, "recompute"), (100, 33, "recompute"), (37, 8, "checkpoint"), (100, 33, "checkpoint")]


@pytest.mark.parametrize("n, chunk_len, strategy",
                         EXACT_CASES + [pytest.param(*c, marks=pytest.mark.slow) for c in EXACT_SLOW])
def test_exact_equals_full_sequence_gradient(params, n, chunk_len, strategy):
    ids = ids_of(n)
    want_loss, want = reference_grad(params, ids, 0)
    loss, got = loss_and_grad(params, CONFIG, ids, chunk_len=chunk_len, strategy=strategy)
    np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-5)
    assert_grads_close(got, want)


def test_full_mode_is_model_forward(params):
    """loss_and_grad(mode="full") (jaxchunk.model.forward) agrees with the layer-by-layer reference."""
    ids = ids_of(37)
    want_loss, want = reference_grad(params, ids, 0)
    loss, got = loss_and_grad(params, CONFIG, ids, mode="full")
    np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-5)
    assert_grads_close(got, want)


@pytest.mark.parametrize("n, chunk_len, train_len", [(100, 16, 40), pytest.param(37, 8, 10, marks=pytest.mark.slow),
                                                     pytest.param(100, 33, 67, marks=pytest.mark.slow)])
def test_truncated_equals_gradient_with_constant_prefix_kv(params, n, chunk_len, train_len):
    ids = ids_of(n)
    want_loss, want = reference_grad(params, ids, n - train_len)
    loss, got = loss_and_grad(params, CONFIG, ids, chunk_len=chunk_len, mode="truncated", train_len=train_len)
    np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-5)
    assert_grads_close(got, want)


def test_references_disagree(params):
    """Holding the prefix K/V constant changes the gradient far beyond REL_TOL: the tests above can
    tell exact from truncated gradients."""
    ids = ids_of(37)
    _, held = reference_grad(params, ids, 27)
    through = jax.grad(reference_loss_window)(params, ids, 27)
    rels = [float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
            for a, b in zip(jax.tree.leaves(held), jax.tree.leaves(through))]
    assert max(rels) > 100 * REL_TOL, rels


def reference_loss_window(params, ids, first):
    """Loss over positions [first, n - 1) with gradients through every position's K/V."""
    ids = jnp.asarray(ids)
    logits = forward(params, CONFIG, ids)
    return jnp.mean(nll(logits[:, first:-1], ids[:, first + 1:]))


@pytest.mark.slow
def test_truncated_with_whole_window_is_exact(params):
    ids = ids_of(37)
    _, exact = loss_and_grad(params, CONFIG, ids, chunk_len=16)
    _, truncated = loss_and_grad(params, CONFIG, ids, chunk_len=16, mode="truncated", train_len=37)
    assert_grads_close(truncated, exact, tol=1e-6)


def test_jax_grad_composes(params):
    """chunked_loss is an ordinary differentiable function: jax.grad works on it directly."""
    ids = ids_of(37)  # the exact tests' batch: their reference gradient's compile serves here
    grad = jax.jit(jax.grad(lambda p: chunked_loss(p, CONFIG, jnp.asarray(ids), chunk_len=16)))(params)
    _, want = reference_grad(params, ids, 0)
    assert_grads_close(grad, want)


# Gemma 3 (tiny: window 8, local, local, global; QK-norm, sandwich norms, GeGLU, two RoPE bases):
# exact chunked gradients equal jax.grad of the full-sequence `forward` loss (forward itself is
# checked against transformers on the real model in test_gemma3). Chunks of 7 and 16 tokens against
# a window of 8: chunk boundaries inside the window and chunks wider than it.
GEMMA = tiny_gemma3_config(window=8, vocab_size=128)
GEMMA_NO_WINDOW = tiny_gemma3_config(window=10**6, vocab_size=128)  # same layers, global attention
gemma_reference_grad = jax.jit(jax.value_and_grad(full_loss), static_argnums=(1,))


@pytest.fixture(scope="module")
def gemma_params():
    return init_params(GEMMA, seed=1, scale=0.2)


@pytest.mark.parametrize("chunk_len, strategy", [(7, "recompute"), (16, "recompute"), (7, "checkpoint")])
def test_gemma3_exact_equals_full_sequence_gradient(gemma_params, chunk_len, strategy):
    ids = ids_of(37)
    want_loss, want = gemma_reference_grad(gemma_params, GEMMA, jnp.asarray(ids))
    loss, got = loss_and_grad(gemma_params, GEMMA, ids, chunk_len=chunk_len, strategy=strategy)
    np.testing.assert_allclose(float(loss), float(want_loss), rtol=1e-5)
    assert_grads_close(got, want)


def test_gemma3_window_changes_the_gradient(gemma_params):
    """37 tokens past a window of 8: without the window the gradient differs far beyond REL_TOL, so
    the test above would catch chunked training that ignored (or misplaced) the window."""
    ids = jnp.asarray(ids_of(37))
    _, windowed = gemma_reference_grad(gemma_params, GEMMA, ids)
    _, unwindowed = gemma_reference_grad(gemma_params, GEMMA_NO_WINDOW, ids)
    rels = [float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
            for a, b in zip(jax.tree.leaves(windowed), jax.tree.leaves(unwindowed))]
    assert max(rels) > 100 * REL_TOL, rels


@pytest.mark.parametrize("kwargs, match", [
    (dict(chunk_len=0), "chunk_len"),
    (dict(chunk_len=8, mode="nope"), "mode"),
    (dict(chunk_len=8, mode="truncated"), "train_len"),
    (dict(chunk_len=8, mode="truncated", train_len=1), "train_len"),
    (dict(chunk_len=8, mode="truncated", train_len=38), "train_len"),
    (dict(chunk_len=8, train_len=10), "train_len"),
    (dict(mode="exact"), "chunk_len"),
    (dict(chunk_len=8, strategy="magic"), "strategy"),
])
def test_bad_arguments(params, kwargs, match):
    with pytest.raises(InputError, match=match):
        loss_and_grad(params, CONFIG, ids_of(37), **kwargs)


@pytest.mark.parametrize("ids, match", [
    (np.zeros((2, 1), np.int32), "at least 2 tokens"),
    (np.zeros(10, np.int32), "dimension"),
    (np.full((1, 10), CONFIG.vocab_size), "outside"),
    (np.zeros((1, 600), np.int32), "context"),
])
def test_bad_ids(params, ids, match):
    with pytest.raises(InputError, match=match):
        loss_and_grad(params, CONFIG, ids, chunk_len=8)


# Compiled in a fresh process: late in the full suite (after ~800 tests, ~9 GB resident) XLA:CPU
# aborted / segfaulted twice while compiling these steps (2026-12-01, jax 0.10.2); alone it never did.
_TEMP_BYTES_SCRIPT = """
import json
from jaxchunk.model import init_params
from jaxchunk.testing import tiny_config
from jaxchunk.training import lower_step
config = tiny_config(vocab_size=128, tie_word_embeddings=False)
params = init_params(config, seed=0, scale=0.2)
out = {}
for chunk_len, strategy in ((8, "recompute"), (32, "recompute"), (8, "checkpoint")):
    stats = lower_step(params, config, 1, 256, chunk_len=chunk_len, strategy=strategy).compile().memory_analysis()
    out[f"{strategy}_{chunk_len}"] = stats.temp_size_in_bytes
print(json.dumps(out))
"""


@pytest.mark.slow
def test_recompute_memory_does_not_grow_with_chunk_count():
    """Compiled memory: the checkpointed scan saves the cache once per chunk (grows with the number
    of chunks), the recompute VJP keeps two caches whatever the count."""
    import json
    import subprocess
    import sys

    assert CONFIG == tiny_config(vocab_size=128, tie_word_embeddings=False)  # what the script builds
    done = subprocess.run([sys.executable, "-c", _TEMP_BYTES_SCRIPT], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    temps = json.loads(done.stdout.strip().splitlines()[-1])

    cache_bytes = 2 * CONFIG.num_layers * 256 * CONFIG.num_kv_heads * CONFIG.head_dim * 4
    recompute = {c: temps[f"recompute_{c}"] for c in (8, 32)}
    checkpoint = temps["checkpoint_8"]
    # 32 chunks of 8: the scan saves ~one cache per chunk on top of what the recompute VJP needs.
    assert checkpoint - recompute[8] >= 24 * cache_bytes, (checkpoint, recompute, cache_bytes)
    # More, smaller chunks: less attention-score memory, no extra caches.
    assert recompute[8] <= recompute[32], recompute


@pytest.mark.slow
def test_experiment_script(tmp_path):
    """experiments/chunked_training.py end to end on the tiny random model: exact rows agree with
    the full gradient, truncated rows do not, and lengths above --run-max-len get memory only."""
    import subprocess
    import sys
    from pathlib import Path
    pd = pytest.importorskip("pandas")
    pytest.importorskip("matplotlib")
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "experiments.chunked_training", "--model",
                           "tiny-random", "--lengths", "40,64", "--chunk-lens", "16", "--train-len", "16",
                           "--methods", "full,exact,truncated",
                           "--run-max-len", "40", "--repeats", "1", "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=root, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    df = pd.read_csv(tmp_path / "results.csv")
    train = df[df["pass"] == "train"].set_index(["seq_len", "method"])
    assert set(train.loc[40].index) == {"full", "exact", "truncated"}
    assert train.loc[(40, "exact"), "grad_rel_all"] < REL_TOL
    assert train.loc[(40, "truncated"), "grad_rel_all"] > 100 * REL_TOL
    assert np.isnan(train.loc[(64, "exact"), "step_s"]) and train.loc[(64, "exact"), "peak_mb"] > 0
    for png in ("memory.png", "time.png", "grad_error.png"):
        assert (tmp_path / png).read_bytes().startswith(b"\x89PNG")
