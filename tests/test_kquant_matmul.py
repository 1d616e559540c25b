"""GGUF k-quants (and Q5_0 / Q5_1) kept quantized: the resident layouts of
jaxchunk.weights.quantized, and every quantized-matmul backend on them, against a NumPy float64
oracle of the weights as `gguf.quants` dequantizes them (not this project's code).

Weights are random blocks (quant_cases.random_blocks: random bytes, random f16 super-scales), so
every code, sub-scale and min pattern occurs. Mixed stacks ("Q4_K+Q6_K": Gemma 3 Q4_K_M's
ffn_down, "Q5_0+Q8_0": its attn_v) put layers of two types into one layout and are run per layer
through `layer=`, as the model's layer scan does.

Tolerance (f32): relative to max |y|, 2e-5 as for the legacy types (quant_cases.TOL): the resident
weights are the gguf values exactly, so only float32 summation order differs (k = 512 terms).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize

from quant_cases import KQUANT_SPECS as STACKS
from quant_cases import TOL, gemma3_gguf_path, kernel_args, make_stack, q8_activations, random_blocks
from jaxchunk.weights.gguf_file import RawTensor
from jaxchunk.weights.quantized import (QuantizedWeight, ResidentFormat, pack_gguf_rows, pack_stacked,
                                        resident_format)
from jaxchunk.weights.quantized import dequantize as dequantize_weight
from pallas_kernels import native_cpu
from pallas_kernels.quant_matmul import quant_matmul, quant_matmul_pallas, quant_matmul_xla

K, N = 512, 400  # make_stack's default shape


def layer_args(qw: QuantizedWeight) -> list:
    return kernel_args(qw)


def check(y, expected, dtype="float32"):
    y = np.asarray(y, np.float64)
    assert y.shape == expected.shape
    err = np.abs(y - expected).max() / np.abs(expected).max()
    assert err <= TOL[dtype], f"max error {err:.2e} x max|y| > {TOL[dtype]:.0e} ({dtype})"


# ----------------------------------------------------------------------------- layouts
def test_resident_formats():
    """The layout of each type, written out (bits, group, scale dtype, mins), and bits per weight."""
    expected = {
        "Q4_0": (4, 32, "float16", True), "Q4_1": (4, 32, "float16", True), "Q8_0": (8, 32, "float16", False),
        "Q5_0": (8, 32, "float16", False), "Q5_1": (8, 32, "float16", True), "Q4_K": (4, 32, "float32", True),
        "Q5_K": (8, 32, "float32", True), "Q6_K": (8, 16, "float32", False), "Q2_K": (4, 16, "float32", True),
        "Q3_K": (4, 16, "float32", True),
    }
    for qtype, fmt in expected.items():
        assert resident_format([qtype]) == ResidentFormat(*fmt), qtype
    assert resident_format(["Q4_K", "Q6_K"]) == ResidentFormat(8, 16, "float32", True)
    assert resident_format(["Q5_0", "Q8_0"]) == ResidentFormat(8, 32, "float16", False)
    assert resident_format(["Q4_K"]).bits_per_weight() == 4 + 64 / 32
    assert resident_format(["Q6_K"]).bits_per_weight() == 8 + 32 / 16


@pytest.mark.parametrize("spec", STACKS)
def test_packed_layers_are_the_gguf_values(spec):
    qw, w = make_stack(spec)
    layers = len(spec.split("+"))
    assert qw.shape == (layers, K, N) and qw.qtype == spec
    fmt = resident_format(spec.split("+"))
    assert qw.nbytes == layers * K * N * fmt.bits_per_weight() / 8
    # Exact values (array_equal: a zero min added to -0.0 makes +0.0, the same number).
    assert np.array_equal(np.asarray(dequantize_weight(qw)), w.astype(np.float32))


def test_pack_refuses_what_a_layout_cannot_hold():
    blocks = random_blocks("Q4_K", 8, 1)
    with pytest.raises(ValueError, match="groups of 32"):  # group 16 codes into a group-32 layout
        pack_gguf_rows(random_blocks("Q6_K", 8, 1), "Q6_K", (8, 256), fmt=resident_format(["Q4_K"]))
    with pytest.raises(ValueError, match="without mins"):
        pack_gguf_rows(blocks, "Q4_K", (8, 256), fmt=ResidentFormat(8, 32, "float32", False))
    with pytest.raises(ValueError, match="not exact in float16"):
        pack_gguf_rows(blocks, "Q4_K", (8, 256), fmt=ResidentFormat(4, 32, "float16", True))
    with pytest.raises(ValueError, match="do not fit 4 bits"):
        pack_gguf_rows(random_blocks("Q5_0", 8, 8), "Q5_0", (8, 256), fmt=ResidentFormat(4, 32, "float16", True))
    with pytest.raises(ValueError, match="one shape"):
        pack_stacked([RawTensor("a", "Q4_K", (8, 256), blocks), RawTensor("b", "Q4_K", (4, 256), blocks[:4])])


# ----------------------------------------------------------------------------- every backend
def _native():
    if not native_cpu.available():  # a failed build must not pass silently
        pytest.fail(f"the CPU kernel did not build: {native_cpu.unavailable_reason()}")
    return native_cpu


BACKEND_RUNS = {
    # name -> fn(x, qs, scales, mins, layer) -> y
    "reference": lambda x, *w, layer: quant_matmul(x, *w, layer=layer, impl="reference"),
    "xla": lambda x, *w, layer: quant_matmul(x, *w, layer=layer, impl="xla"),
    "native_cpu": lambda x, *w, layer: quant_matmul(x, *w, layer=layer, impl="native_cpu"),
    "pallas": lambda x, *w, layer: quant_matmul(x, *w, layer=layer, impl="pallas"),  # interpret mode on CPU
}


@pytest.mark.parametrize("rows", [1, 40], ids=["decode", "prefill"])
@pytest.mark.parametrize("backend", sorted(BACKEND_RUNS))
@pytest.mark.parametrize("spec", STACKS)
def test_backend_matches_float64_oracle(spec, backend, rows):
    """quant_matmul(impl=backend) on each layer of the stack (read through `layer=`, as in the
    model). native_cpu: 1 row is its matrix-vector kernel, 40 rows its dequantization + XLA's dot."""
    if backend == "native_cpu":
        _native()
    if backend == "pallas" and rows > 1:
        rows = 5  # interpret mode runs the kernel grid in Python: keep it small
    qw, w = make_stack(spec)
    x = np.random.default_rng(1).normal(size=(rows, K)).astype(np.float32)
    args = layer_args(qw)
    run = jax.jit(lambda x, qs, s, m, i: BACKEND_RUNS[backend](x, qs, s, m, layer=i))
    for i in range(w.shape[0]):
        check(run(jnp.asarray(x), *args, jnp.int32(i)), x.astype(np.float64) @ w[i])


@pytest.mark.parametrize("formulation", ["dequant_dot", "split_dot", "multiply_reduce"])
@pytest.mark.parametrize("spec", ["Q2_K", "Q4_K", "Q6_K", "Q4_K+Q6_K"])
def test_xla_formulations(spec, formulation):
    qw, w = make_stack(spec.split("+")[0], n=96, tile=48)
    x = np.random.default_rng(2).normal(size=(3, K)).astype(np.float32)
    check(quant_matmul_xla(jnp.asarray(x), *[None if a is None else a[0] for a in kernel_args(qw)],
                           formulation=formulation), x.astype(np.float64) @ w[0])


@pytest.mark.parametrize("spec", STACKS)
def test_native_dequantize_is_bit_exact_and_q8_gemv(spec):
    kernel = _native()
    qw, w = make_stack(spec)
    args = layer_args(qw)
    x = np.random.default_rng(3).normal(size=(2, K)).astype(np.float32)
    for i in range(w.shape[0]):
        got = np.asarray(jax.jit(kernel.dequantize_cpu)(*args, layer=jnp.int32(i)))
        assert np.array_equal(got, w[i].astype(np.float32))
        # activations="q8": the rounded x' (NumPy Q8_0 oracle) times W.
        y = kernel.quant_matmul_cpu(jnp.asarray(x), *args, layer=jnp.int32(i), quantize_x=True)
        check(y, q8_activations(x) @ w[i])


@pytest.mark.parametrize("dtype", ["bfloat16"])
@pytest.mark.parametrize("spec", ["Q4_K", "Q6_K"])
def test_bf16_activations(spec, dtype):
    """bf16 x: weights rounded to bf16 for the dot, output rounded to bf16 (TOL['bfloat16'])."""
    qw, w = make_stack(spec)
    x = np.asarray(jnp.asarray(np.random.default_rng(4).normal(size=(3, K)), dtype).astype(jnp.float32))
    for backend in ("xla", "native_cpu"):
        y = quant_matmul(jnp.asarray(x, dtype), *[None if a is None else a[0] for a in kernel_args(qw)], impl=backend)
        assert y.dtype == jnp.dtype(dtype)
        check(y, x.astype(np.float64) @ w[0], dtype)


@pytest.mark.parametrize("spec", ["Q4_K", "Q6_K", "Q2_K", "Q4_K+Q6_K"])
def test_pallas_kernel_lowers_to_triton(spec):
    """The new layouts (f32 scales, group 16, 8-bit with mins) lower for CUDA (no GPU needed)."""
    from attention_cases import lower_for_cuda
    qw, _ = make_stack(spec, n=128, tile=128)
    qs, scales, mins = [None if a is None else a[-1] for a in kernel_args(qw)]
    x = jnp.ones((16, K), jnp.float32)

    def fn(x, qs, scales, *mins):
        return quant_matmul_pallas(x, qs, scales, *mins, block_m=16, block_n=64, interpret=False)
    module = lower_for_cuda(fn, x, qs, scales, *([] if mins is None else [mins]))
    assert "triton" in str(module).lower()


# ----------------------------------------------------------------------------- the loader
def test_quantized_gguf_load_keeps_mixed_layers_quantized(tmp_path):
    """A llama GGUF whose layers mix types as Gemma 3's Q4_K_M does: weights="q4" keeps every
    matrix quantized, in the layout of its types, with exactly the dequantized load's values."""
    from test_gguf_loader import permuted, tiny_hf_weights, tiny_metadata, write_gguf

    from jaxchunk.weights.gguf import load_gguf
    weights = permuted(tiny_hf_weights(np.random.default_rng(5)))
    qtypes = {name: Q.Q5_0 for name, w in weights.items() if w.ndim == 2}
    qtypes["token_embd.weight"] = Q.Q8_0
    qtypes.update({"blk.0.ffn_down.weight": Q.Q6_K, "blk.1.ffn_down.weight": Q.Q4_K,
                   "blk.0.attn_v.weight": Q.Q8_0, "blk.0.attn_output.weight": Q.Q4_K,
                   "blk.1.attn_output.weight": Q.Q4_K})
    path = write_gguf(tmp_path / "mixed.gguf", weights, tiny_metadata(), qtypes=qtypes)
    _, floats, _ = load_gguf(path)
    _, quant, _ = load_gguf(path, quantized=True)
    labels = {"w_down": "Q4_K+Q6_K", "wv": "Q5_0+Q8_0", "wo": "Q4_K", "wq": "Q5_0", "w_up": "Q5_0"}
    for key, label in labels.items():
        qw = quant["layers"][key]
        assert isinstance(qw, QuantizedWeight) and qw.qtype == label, key
        assert np.array_equal(np.asarray(dequantize_weight(qw)), floats["layers"][key]), key
    assert quant["embed"].qtype == "Q8_0"
    assert np.array_equal(np.asarray(dequantize_weight(quant["embed"])).T, floats["embed"])


def test_resident_bytes_experiment_on_a_mixed_file(tmp_path):
    """experiments/kquant_resident.py: groups, layouts, byte counts and the exactness check, on a
    tiny GGUF of the Gemma mix (written here, so the byte counts are known)."""
    import json

    from test_gguf_loader import permuted, tiny_hf_weights, tiny_metadata, write_gguf

    from experiments import kquant_resident
    weights = permuted(tiny_hf_weights(np.random.default_rng(6)))
    qtypes = {name: Q.Q5_0 for name, w in weights.items() if w.ndim == 2}
    qtypes.update({"token_embd.weight": Q.Q8_0, "blk.0.ffn_down.weight": Q.Q6_K, "blk.1.ffn_down.weight": Q.Q4_K})
    path = write_gguf(tmp_path / "mixed.gguf", weights, tiny_metadata(), qtypes=qtypes)
    df = kquant_resident.main(["--gguf", str(path), "--verify", "--out", str(tmp_path / "out")])
    down = df[df.group == "ffn_down.weight"].iloc[0]
    # [256 out, 512 in] x 2 layers; file: 2 super-blocks a row of 210 (Q6_K) / 144 (Q4_K) bytes.
    assert down.types == "Q4_K+Q6_K" and down.file_bytes == 256 * 2 * (210 + 144)
    assert down.resident_bytes == 2 * 256 * 512 * (8 + 64 / 16) / 8  # int8 + f32 scale and min per 16
    up = df[df.group == "ffn_up.weight"].iloc[0]
    assert up.file_bytes == 2 * 512 * 8 * 22 and up.resident_bytes == 2 * 512 * 256 * (8 + 16 / 32) / 8
    total = df[df.group == "total"].iloc[0]
    assert total.resident_bytes == df[df.group != "total"].resident_bytes.sum()
    assert (tmp_path / "out" / "resident_bytes.png").stat().st_size > 0
    assert json.loads((tmp_path / "out" / "results.json").read_text())["settings"]["verify"] is True


@pytest.fixture(scope="module")
def gemma3_gguf():
    return gemma3_gguf_path()


@pytest.mark.model
@pytest.mark.slow
def test_gemma3_resident_weights_exact_and_within_budget(gemma3_gguf):
    """Every matrix stack of gemma-3-270m-q4_k_m.gguf packed for weights="q4" (layers of different
    types in one layout) holds exactly gguf.quants' values, and the whole stays <= 1.25x the file."""
    import re

    from gguf import GGUFReader

    from jaxchunk.weights.gguf import open_gguf
    ours = open_gguf(gemma3_gguf).tensors
    ref = {t.name: t for t in GGUFReader(gemma3_gguf).tensors}
    stacks: dict = {}
    for name, t in ours.items():
        m = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
        stacks.setdefault(m.group(2) if m else name, []).append(t)
    resident, labels = 0, {}
    for key, tensors in stacks.items():
        if tensors[0].qtype == "F32":
            resident += sum(t.blocks.nbytes for t in tensors)
            continue
        qw = pack_stacked(tensors)
        resident, labels[key] = resident + qw.nbytes, qw.qtype
        tiles = min(qw.qs.shape[-3], max(1, 4096 // qw.qs.shape[-1]))  # the embedding: its first 4096 tokens
        cols = tiles * qw.qs.shape[-1]
        for i, t in enumerate(tensors):
            layer = jax.tree.map(lambda a: a[i, :tiles], qw)
            r = ref[t.name]
            want = dequantize(r.data[:cols], r.tensor_type).reshape(cols, t.shape[1]).T
            assert np.array_equal(np.asarray(dequantize_weight(layer)), want), t.name
    file_size = gemma3_gguf.stat().st_size
    assert labels["ffn_down.weight"] == "Q4_K+Q6_K" and labels["attn_v.weight"] == "Q5_0+Q8_0"
    assert resident <= 1.25 * file_size, f"resident {resident} B vs file {file_size} B"


@pytest.mark.slow
def test_model_with_kquant_weights_matches_dequantized_model(tmp_path):
    """A tiny llama GGUF stored the way Gemma 3's Q4_K_M is (Q5_0 / Q8_0 / Q4_K / Q6_K, mixed per
    layer), loaded with weights="q4" and with weights="f32": forward, chunked prefill and decode
    (auto backends: the native CPU kernels) agree with the float model on exactly the weights they
    stand for, up to summation order (f32 logits, 2 layers: 1e-4 x max |logits|)."""
    from gguf import GGUFWriter
    from test_gguf_loader import tiny_hf_weights, tiny_metadata

    from jaxchunk.cache import init_cache
    from jaxchunk.model import forward
    from jaxchunk.prefill import decode_step, prefill_chunk
    from jaxchunk.weights import load_weights
    weights = tiny_hf_weights(np.random.default_rng(7))  # shapes, and the F32 norms
    types = {"attn_q": "Q5_0", "attn_k": "Q5_0", "attn_v": ("Q8_0", "Q5_0"), "attn_output": "Q4_K",
             "ffn_gate": "Q5_0", "ffn_up": "Q5_0", "ffn_down": ("Q6_K", "Q4_K")}
    path = tmp_path / "kquants.gguf"
    writer = GGUFWriter(path, arch="llama")
    for key, value in tiny_metadata().items():
        {int: writer.add_uint32, float: writer.add_float32, str: writer.add_string}[type(value)](key, value)
    for seed, (name, w) in enumerate(weights.items()):
        if w.ndim == 1:
            writer.add_tensor(name, w)
            continue
        parts = name.split(".")
        qtype = "Q8_0" if parts[0] == "token_embd" else types[parts[2]]
        qtype = qtype[int(parts[1])] if isinstance(qtype, tuple) else qtype
        block = 256 if qtype.endswith("_K") else 32
        blocks = random_blocks(qtype, w.shape[0], w.shape[1] // block, seed=seed, log2_range=(-13, -10))
        writer.add_tensor(name, blocks, raw_dtype=Q[qtype])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    config, qparams, _ = load_weights(path, weights="q4")
    _, fparams, _ = load_weights(path, weights="f32")
    assert qparams["layers"]["w_down"].qtype == "Q4_K+Q6_K" and qparams["layers"]["wv"].qtype == "Q5_0+Q8_0"
    qparams = jax.device_put(qparams)
    ids = np.random.default_rng(0).integers(0, config.vocab_size, (2, 22)).astype(np.int32)
    run_forward = jax.jit(forward, static_argnums=1)
    expected = np.asarray(run_forward(jax.device_put(fparams), config, ids))
    assert np.isfinite(expected).all() and np.abs(expected).max() > 0
    tol = 1e-4 * np.abs(expected).max()
    np.testing.assert_allclose(np.asarray(run_forward(qparams, config, ids)), expected, atol=tol)
    cache = init_cache(config, 2, 32, "f32")
    cache, chunk_logits = prefill_chunk(qparams, cache, ids[:, :20], config=config, logits="all")
    np.testing.assert_allclose(np.asarray(chunk_logits), expected[:, :20], atol=tol)
    for i in range(20, 22):
        cache, last = decode_step(qparams, cache, ids[:, i], config=config)
        np.testing.assert_allclose(np.asarray(last), expected[:, i], atol=tol)


@pytest.mark.parametrize("spec", ["Q4_K", "Q6_K", "Q2_K", "Q5_0"])
def test_quantized_embedding_rows(spec):
    """A k-quant embedding (llama.cpp's Q4_K_M files often store token_embd as Q6_K / Q4_K), held as
    the LM head's W [hidden, vocab] in 2 tiles: the looked-up rows are exactly gguf's values."""
    from jaxchunk.model import embed
    qw, w = make_stack(spec, k=256, n=96, tile=48)  # W [hidden 256, vocab 96]
    table = jax.tree.map(lambda a: a[0], qw)
    tokens = jnp.array([[0, 47, 48, 95], [13, 5, 5, 60]])
    got = embed({"embed": table}, tokens, jnp.float32)
    assert np.array_equal(np.asarray(got), w[0].T.astype(np.float32)[np.asarray(tokens)])
