"""GGUF loader: values, layout, config and every bad-file case.

Dequantization arithmetic is jaxchunk.weights.gguf_quants' (checked bit-exactly against
`gguf.quants` block by block in tests/test_gguf_quants.py). What these tests check is the loader's
own work on top (and that its values still equal `gguf.quants`'): transposition to [in, out], undoing llama.cpp's Q/K
row permutation (against a permutation written here and against `transformers`' GGUF import),
stacking over layers, the config, and the errors.
"""
import math
import struct

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, GGUFWriter
from gguf.quants import dequantize, quant_shape_to_byte_shape, quantize

from jaxchunk.config import RopeScaling
from jaxchunk.errors import ModelFileError, UnsupportedError
from jaxchunk.weights import PARAM_LAYER_KEYS
from jaxchunk.weights.gguf import dequantize_raw, load_gguf, load_gguf_raw, unpermute_qk

# llama.cpp tensor name -> params key, written out here rather than imported from the loader.
LAYER_NAMES = {"attn_norm": "attn_norm", "attn_q": "wq", "attn_k": "wk", "attn_v": "wv",
               "attn_output": "wo", "ffn_norm": "mlp_norm", "ffn_gate": "w_gate",
               "ffn_up": "w_up", "ffn_down": "w_down"}
GLOBAL_NAMES = {"token_embd": "embed", "output_norm": "final_norm", "output": "lm_head"}
LINEAR = {"wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down", "lm_head"}


def llama_cpp_permute(w, n_head):
    """llama.cpp convert_hf_to_gguf.py's `permute` of an HF [out, in] Q/K weight, verbatim."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def file_layout(params, name, n_heads, n_kv_heads):
    """The loader's tensor for GGUF tensor `name`, taken back to the file's layout: [out, in],
    Q/K rows re-permuted the way llama.cpp stores them."""
    parts = name.split(".")
    if parts[0] == "blk":
        key = LAYER_NAMES[parts[2]]
        w = np.asarray(params["layers"][key][int(parts[1])])
    else:
        key = GLOBAL_NAMES[parts[0]]
        w = np.asarray(params[key])
    if key in LINEAR:
        w = w.T
    if key == "wq":
        w = llama_cpp_permute(w, n_heads)
    if key == "wk":
        w = llama_cpp_permute(w, n_kv_heads)
    return w


def assert_matches_gguf_dequant(reader, config, params):
    """Every tensor in `reader`, dequantized by gguf.quants, equals the loader's output put
    back into file layout: bit-exact."""
    for t in reader.tensors:
        ref = dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
        got = file_layout(params, t.name, config.num_heads, config.num_kv_heads)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, ref, err_msg=t.name)
    return reader


# --- small GGUFs written with gguf.GGUFWriter ----------------------------------------------------

TINY = dict(hidden=256, ffn=512, heads=4, kv_heads=2, head_dim=64, vocab=64, layers=2)


def tiny_metadata(arch="llama", layers=TINY["layers"]):
    return {
        f"{arch}.block_count": layers, f"{arch}.context_length": 512,
        f"{arch}.embedding_length": TINY["hidden"], f"{arch}.feed_forward_length": TINY["ffn"],
        f"{arch}.attention.head_count": TINY["heads"],
        f"{arch}.attention.head_count_kv": TINY["kv_heads"],
        f"{arch}.attention.layer_norm_rms_epsilon": 1e-6, f"{arch}.rope.freq_base": 50000.0,
        "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
    }


def tiny_hf_weights(rng, layers=TINY["layers"], tied=True):
    """Random weights in HF layout ([out, in]), keyed by GGUF tensor name."""
    h, f, v = TINY["hidden"], TINY["ffn"], TINY["vocab"]
    q, kv = TINY["heads"] * TINY["head_dim"], TINY["kv_heads"] * TINY["head_dim"]
    shapes = {"token_embd.weight": (v, h), "output_norm.weight": (h,)}
    if not tied:
        shapes["output.weight"] = (v, h)
    for i in range(layers):
        shapes.update({f"blk.{i}.attn_norm.weight": (h,), f"blk.{i}.attn_q.weight": (q, h),
                       f"blk.{i}.attn_k.weight": (kv, h), f"blk.{i}.attn_v.weight": (kv, h),
                       f"blk.{i}.attn_output.weight": (h, q), f"blk.{i}.ffn_norm.weight": (h,),
                       f"blk.{i}.ffn_gate.weight": (f, h), f"blk.{i}.ffn_up.weight": (f, h),
                       f"blk.{i}.ffn_down.weight": (h, f)})
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def encode(w, qtype, rng):
    """`w` stored as `qtype`: what GGUFWriter.add_tensor takes."""
    if qtype == Q.F32:
        return w
    if qtype == Q.F16:
        return w.astype(np.float16)
    if qtype in (Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ2_XXS):
        # gguf.quants cannot quantize these, so use random blocks. Bytes below 0x7C keep every
        # embedded f16 scale finite (its high byte's exponent bits are never all ones).
        return rng.integers(0, 0x7C, quant_shape_to_byte_shape(w.shape, qtype), dtype=np.uint8)
    return quantize(w, qtype)


def write_gguf(path, tensors, metadata, arch="llama", qtypes=None, rng=None):
    """Write a GGUF with `metadata` (int/float/str values) and `tensors` (name -> [out, in]
    float32, Q/K already in llama.cpp order); qtypes: name -> storage type (default F32)."""
    rng = rng or np.random.default_rng(0)
    writer = GGUFWriter(path, arch=arch)
    for key, value in metadata.items():
        {int: writer.add_uint32, float: writer.add_float32, str: writer.add_string}[type(value)](key, value)
    for name, w in tensors.items():
        qtype = (qtypes or {}).get(name, Q.F32)
        data = encode(w, qtype, rng)
        writer.add_tensor(name, data, raw_dtype=None if qtype in (Q.F32, Q.F16) else qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def permuted(weights):
    """HF-layout weights -> what llama.cpp writes: Q/K rows permuted."""
    out = dict(weights)
    for name, w in weights.items():
        if ".attn_q." in name:
            out[name] = llama_cpp_permute(w, TINY["heads"])
        if ".attn_k." in name:
            out[name] = llama_cpp_permute(w, TINY["kv_heads"])
    return out


@pytest.fixture
def tiny(tmp_path):
    """(path, HF-layout weights) of a valid 2-layer F32 GGUF."""
    weights = tiny_hf_weights(np.random.default_rng(1))
    return write_gguf(tmp_path / "tiny.gguf", permuted(weights), tiny_metadata()), weights


# --- values and layout on small files ------------------------------------------------------------

def test_tiny_f32_roundtrip_undoes_qk_permutation(tiny):
    path, weights = tiny
    config, params, meta = load_gguf(path)
    assert (config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads,
            config.head_dim, config.intermediate_size, config.vocab_size) == (2, 256, 4, 2, 64, 512, 64)
    assert config.tie_word_embeddings and "lm_head" not in params
    assert config.rope_theta == 50000.0 and config.rms_norm_eps == 1e-6
    assert (config.bos_token_id, config.eos_token_id) == (1, 2)
    assert set(params["layers"]) == set(PARAM_LAYER_KEYS)
    # F32 storage: the loader must give back exactly the HF-layout weights, transposed.
    for i in range(2):
        np.testing.assert_array_equal(params["layers"]["wq"][i], weights[f"blk.{i}.attn_q.weight"].T)
        np.testing.assert_array_equal(params["layers"]["wk"][i], weights[f"blk.{i}.attn_k.weight"].T)
        np.testing.assert_array_equal(params["layers"]["w_down"][i], weights[f"blk.{i}.ffn_down.weight"].T)
        np.testing.assert_array_equal(params["layers"]["attn_norm"][i], weights[f"blk.{i}.attn_norm.weight"])
    np.testing.assert_array_equal(params["embed"], weights["token_embd.weight"])
    assert meta["architecture"] == "llama" and meta["gguf_version"] == "3"


def test_every_supported_type_matches_gguf_dequant(tmp_path):
    supported = [Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0,
                 Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K]
    weights = permuted(tiny_hf_weights(np.random.default_rng(2), tied=False))
    matrices = [n for n, w in weights.items() if w.ndim == 2]
    qtypes = {name: supported[i % len(supported)] for i, name in enumerate(matrices)}
    assert set(qtypes.values()) == set(supported)
    path = write_gguf(tmp_path / "mixed.gguf", weights, tiny_metadata(), qtypes=qtypes)
    config, params, _ = load_gguf(path)
    assert not config.tie_word_embeddings and params["lm_head"].shape == (256, 64)
    assert_matches_gguf_dequant(GGUFReader(path), config, params)


def test_raw_blocks_dequantize_to_loader_values(tmp_path):
    weights = permuted(tiny_hf_weights(np.random.default_rng(3)))
    qtypes = {name: Q.Q4_1 for name, w in weights.items() if w.ndim == 2}
    qtypes["token_embd.weight"] = Q.Q8_0  # as in SmolLM2's file
    path = write_gguf(tmp_path / "q41.gguf", weights, tiny_metadata(), qtypes=qtypes)
    raw = load_gguf_raw(path)
    config, params, _ = load_gguf(path)
    q = raw["blk.1.attn_q.weight"]
    assert (q.qtype, q.shape, q.blocks.dtype) == ("Q4_1", (256, 256), np.uint8)
    assert q.blocks.shape == (256, 256 // 32 * 20)  # 20-byte Q4_1 blocks of 32 values
    assert raw["token_embd.weight"].blocks.shape == (64, 256 // 32 * 34)  # 34-byte Q8_0 blocks
    assert raw["output_norm.weight"][1:3] == ("F32", (256,))
    # Reordering whole rows of quantized blocks undoes the Q/K permutation without dequantizing.
    for i in range(2):
        for key, n_head in (("wq", 4), ("wk", 2)):
            blocks = unpermute_qk(raw[f"blk.{i}.attn_{key[1]}.weight"].blocks, n_head)
            np.testing.assert_array_equal(dequantize(blocks, Q.Q4_1), params["layers"][key][i].T)
    for name, t in raw.items():
        np.testing.assert_array_equal(dequantize(t.blocks, Q[t.qtype]).reshape(t.shape),
                                      file_layout(params, name, 4, 2), err_msg=name)
        np.testing.assert_array_equal(dequantize_raw(t), file_layout(params, name, 4, 2))


def test_loaded_params_do_not_keep_the_file_mapped(tiny):
    """F32 tensors are copied out of the file's mmap: a view adopted by device_put kept the whole
    map (and every page read while loading) resident for the model's lifetime (SmolLM2 q4: 93 MB)."""
    import gc
    from pathlib import Path

    import jax
    path, _ = tiny
    _, params, _ = load_gguf(path)
    params = jax.device_put(params)
    gc.collect()
    mapped = Path("/proc/self/maps").read_text()
    assert str(Path(path).resolve()) not in mapped
    assert float(jax.tree.leaves(params)[0].sum()) == float(jax.tree.leaves(params)[0].sum())  # still alive


def _mapped_rss_kb(path) -> int:
    """Resident kB of this process's mappings of `path` (from /proc/self/smaps)."""
    from pathlib import Path
    target, total, inside = str(Path(path).resolve()), 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if "-" in line.split(" ", 1)[0] and not line.split(" ", 1)[0].endswith(":"):
            inside = line.rstrip().endswith(target)  # a mapping's header line: "start-end perms ... path"
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


def test_release_pages_drops_the_read_file_from_the_resident_set(tmp_path):
    """After a load the whole file stays resident beside the copied weights while the GGUF is open
    (jaxchunk.load builds the tokenizer from the same parse next: that sum was Gemma 3's peak RSS).
    release_pages() drops it, and the tensor bytes still read the same afterwards."""
    from jaxchunk.weights.gguf_file import read_gguf
    big = np.random.default_rng(0).standard_normal((2048, 4096)).astype(np.float32)  # 32 MiB
    path = write_gguf(tmp_path / "big.gguf", {"big.weight": big}, tiny_metadata())
    gguf = read_gguf(path)
    data = gguf.tensors["big.weight"].blocks
    total = int(data.astype(np.uint64).sum())  # reads every page
    assert _mapped_rss_kb(path) > 0.9 * big.nbytes / 1024
    gguf.release_pages()
    assert _mapped_rss_kb(path) < 0.05 * big.nbytes / 1024
    assert int(data.astype(np.uint64).sum()) == total
    np.testing.assert_array_equal(data.view(np.float32).reshape(big.shape), big)


def test_output_dtype(tiny):
    import ml_dtypes
    path, weights = tiny
    _, params, _ = load_gguf(path, dtype=ml_dtypes.bfloat16)
    assert params["layers"]["wv"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(params["layers"]["wv"][0],
                                  weights["blk.0.attn_v.weight"].T.astype(ml_dtypes.bfloat16))


def test_linear_rope_scaling_and_key_length(tmp_path):
    meta = tiny_metadata() | {"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0,
                              "llama.attention.key_length": 64}
    path = write_gguf(tmp_path / "lin.gguf", permuted(tiny_hf_weights(np.random.default_rng(4))), meta)
    config, _, _ = load_gguf(path)
    assert config.rope_scaling == RopeScaling(kind="linear", factor=4.0)
    assert config.head_dim == 64 and config.max_position_embeddings == 512


def llama_cpp_rope_freqs(base, dim, factor, low_freq_factor, high_freq_factor, old_context_len):
    """llama.cpp convert_hf_to_gguf.py's Llama-3 `rope_freqs` loop, as plain Python."""
    factors = []
    for i in range(0, dim, 2):
        freq = 1.0 / float(np.float32(base) ** np.float32(i / dim))
        wavelen = 2 * math.pi / freq
        if wavelen < old_context_len / high_freq_factor:
            factors.append(1.0)
        elif wavelen > old_context_len / low_freq_factor:
            factors.append(factor)
        else:
            smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def test_llama3_rope_freqs_tensor(tmp_path):
    """Llama-3.x GGUFs carry their RoPE scaling as a `rope_freqs.weight` tensor."""
    weights = permuted(tiny_hf_weights(np.random.default_rng(15)))
    weights["rope_freqs.weight"] = llama_cpp_rope_freqs(500000.0, 64, 32.0, 1.0, 4.0, 8192)
    meta = tiny_metadata() | {"llama.rope.freq_base": 500000.0}
    config, _, _ = load_gguf(write_gguf(tmp_path / "l3.gguf", weights, meta))
    assert config.rope_scaling == RopeScaling(kind="llama3", factor=32.0, low_freq_factor=1.0,
                                              high_freq_factor=4.0, original_max_position_embeddings=8192)
    assert config.rope_theta == 500000.0

    weights["rope_freqs.weight"] = llama_cpp_rope_freqs(500000.0, 64, 32.0, 1.0, 2.0, 8192)
    with pytest.raises(UnsupportedError, match="not Llama-3 scaling with factor=32.0"):
        load_gguf(write_gguf(tmp_path / "other.gguf", weights, meta))


# --- the real model --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    return load_gguf(smollm2_gguf)


@pytest.fixture(scope="module")
def smollm2_reader(smollm2_gguf):
    """The test's own GGUFReader of the file (parsing it takes ~5 s: share it)."""
    return GGUFReader(smollm2_gguf)


@pytest.mark.model
def test_smollm2_config_from_metadata(smollm2, smollm2_reader):
    config, params, meta = smollm2
    fields = smollm2_reader.fields
    value = lambda key: fields[key].contents()  # noqa: E731
    assert config.num_layers == value("llama.block_count")
    assert config.hidden_size == value("llama.embedding_length")
    assert config.intermediate_size == value("llama.feed_forward_length")
    assert config.num_heads == value("llama.attention.head_count")
    assert config.num_kv_heads == value("llama.attention.head_count_kv")
    assert config.head_dim == value("llama.rope.dimension_count")
    assert config.rope_theta == value("llama.rope.freq_base")
    assert config.rms_norm_eps == pytest.approx(value("llama.attention.layer_norm_rms_epsilon"), rel=1e-6)
    assert config.max_position_embeddings == value("llama.context_length")
    assert config.vocab_size == len(fields["tokenizer.ggml.tokens"].data)
    assert config.bos_token_id == value("tokenizer.ggml.bos_token_id")
    assert config.eos_token_id == value("tokenizer.ggml.eos_token_id")
    # Known facts about SmolLM2-135M.
    assert (config.num_layers, config.hidden_size, config.intermediate_size, config.num_heads,
            config.num_kv_heads, config.head_dim, config.vocab_size) == (30, 576, 1536, 9, 3, 64, 49152)
    assert config.rope_theta == 100000.0 and config.rms_norm_eps == 1e-5
    assert config.tie_word_embeddings and "lm_head" not in params and config.rope_scaling is None
    assert meta["file_type"] == "MOSTLY_Q4_1" and "Q4_1:210" in meta["tensor_types"]
    assert params["layers"]["wq"].shape == (30, 576, 576)
    assert params["layers"]["wk"].shape == (30, 576, 192)
    assert params["layers"]["w_down"].shape == (30, 1536, 576)


@pytest.mark.model
def test_smollm2_every_tensor_matches_gguf_dequant(smollm2, smollm2_reader):
    config, params, _ = smollm2
    assert_matches_gguf_dequant(smollm2_reader, config, params)
    assert len(smollm2_reader.tensors) == 2 + 9 * 30  # embed, final norm, 9 per layer: all covered


@pytest.mark.model
@pytest.mark.peers
@pytest.mark.slow
def test_smollm2_qk_match_transformers(smollm2, smollm2_gguf, monkeypatch):
    """transformers' own GGUF import (its reverse permutation, its config parsing) agrees.

    `load_gguf_checkpoint` is what `from_pretrained(dir, gguf_file=...)` calls to read the
    file (dequantize, reverse-permute Q/K, parse the config); it is called directly, with a
    meta-device model that only provides parameter names, to skip building a model (and
    from_pretrained's need for `accelerate`).
    """
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    # transformers rebuilds the same pure name table once per submodule (~400 times, ~15 s);
    # memoizing it changes nothing but the time.
    import functools
    import gguf
    monkeypatch.setattr(gguf, "get_tensor_name_map", functools.cache(gguf.get_tensor_name_map))

    config, params, _ = smollm2
    hf_config = transformers.LlamaConfig(  # SmolLM2-135M's shape, to name the parameters
        num_hidden_layers=30, hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
        vocab_size=49152, tie_word_embeddings=True)
    with torch.device("meta"):
        skeleton = transformers.LlamaForCausalLM(hf_config)
    loaded = load_gguf_checkpoint(str(smollm2_gguf), return_tensors=True, model_to_load=skeleton)
    hf, state = loaded["config"], loaded["tensors"]
    assert (hf["num_hidden_layers"], hf["hidden_size"], hf["intermediate_size"],
            hf["num_attention_heads"], hf["num_key_value_heads"], hf["head_dim"], hf["vocab_size"],
            hf["rope_theta"], hf["tie_word_embeddings"]) == (
        config.num_layers, config.hidden_size, config.intermediate_size, config.num_heads,
        config.num_kv_heads, config.head_dim, config.vocab_size, config.rope_theta,
        config.tie_word_embeddings)
    for i in range(config.num_layers):
        for key, proj in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"), ("wo", "o_proj")):
            theirs = state[f"model.layers.{i}.self_attn.{proj}.weight"].numpy().T
            np.testing.assert_array_equal(params["layers"][key][i], theirs, err_msg=f"{i} {proj}")
    np.testing.assert_array_equal(params["embed"], state["model.embed_tokens.weight"].numpy())


# --- bad files ------------------------------------------------------------------------------------

def test_not_a_file(tmp_path):
    with pytest.raises(ModelFileError, match="no such GGUF file"):
        load_gguf(tmp_path / "missing.gguf")


def test_json_file_is_not_gguf(tmp_path):
    path = tmp_path / "config.gguf"
    path.write_text('{"model_type": "llama"}')
    with pytest.raises(ModelFileError, match=r"config\.gguf: not a GGUF file.*b'\{\"mo'"):
        load_gguf(path)


def test_random_bytes_are_not_gguf(tmp_path):
    path = tmp_path / "noise.gguf"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(ModelFileError, match="not a GGUF file"):
        load_gguf(path)


def test_wrong_magic(tiny):
    path, _ = tiny
    data = bytearray(path.read_bytes())
    data[:4] = b"GGUG"
    path.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="starts with b'GGUG'"):
        load_gguf(path)


@pytest.mark.parametrize("version", [1, 4, 99])
def test_unsupported_version(tiny, version):
    path, _ = tiny
    data = bytearray(path.read_bytes())
    data[4:8] = struct.pack("<I", version)
    path.write_bytes(bytes(data))
    with pytest.raises(UnsupportedError, match=f"GGUF version {version} is not supported"):
        load_gguf(path)


@pytest.mark.parametrize("keep", [0, 6, 20, 300, 0.5, -100])
def test_truncated(tiny, keep):
    """Cut inside: the magic, the version, the counts, the metadata, the tensor data."""
    path, _ = tiny
    data = path.read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else keep % len(data)
    path.write_bytes(data[:n])
    with pytest.raises(ModelFileError, match=r"tiny\.gguf: (truncated|corrupt or truncated)"):
        load_gguf(path)


@pytest.mark.model
def test_truncated_real_model(smollm2_gguf, tmp_path):
    path = tmp_path / "cut.gguf"
    with open(smollm2_gguf, "rb") as f:
        path.write_bytes(f.read(100_000))  # cut inside the tokenizer metadata
    with pytest.raises(ModelFileError, match="corrupt or truncated GGUF"):
        load_gguf(path)


def test_unsupported_quant_type(tmp_path):
    weights = permuted(tiny_hf_weights(np.random.default_rng(5)))
    path = write_gguf(tmp_path / "iq.gguf", weights, tiny_metadata(),
                      qtypes={"blk.1.ffn_up.weight": Q.IQ2_XXS})
    with pytest.raises(UnsupportedError, match=r"iq\.gguf: tensor 'blk\.1\.ffn_up\.weight' has type IQ2_XXS"):
        load_gguf(path)


def test_unknown_type_id(tiny):
    """A type id no GGML version defines (patched into the tensor info)."""
    path, _ = tiny
    reader = GGUFReader(path)
    info = next(t for t in reader.tensors if t.name == "blk.0.attn_v.weight").field
    name_len = len(info.parts[1])
    n_dims = int(info.parts[2][0])
    offset = info.offset + 8 + name_len + 4 + 8 * n_dims  # the uint32 type follows the dims
    del reader
    data = bytearray(path.read_bytes())
    assert struct.unpack_from("<I", data, offset)[0] == int(Q.F32)
    struct.pack_into("<I", data, offset, 99)
    path.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match=r"tiny\.gguf: .*99\) is not a valid GGMLQuantizationType"):
        load_gguf(path)


def test_missing_tensor(tmp_path):
    weights = permuted(tiny_hf_weights(np.random.default_rng(6)))
    del weights["blk.1.ffn_up.weight"]
    path = write_gguf(tmp_path / "hole.gguf", weights, tiny_metadata())
    with pytest.raises(ModelFileError, match=r"hole\.gguf: missing tensor 'blk\.1\.ffn_up\.weight'"):
        load_gguf(path)


def test_shape_mismatch(tmp_path):
    weights = permuted(tiny_hf_weights(np.random.default_rng(7)))
    weights["blk.0.attn_k.weight"] = weights["blk.0.attn_k.weight"][:64]
    path = write_gguf(tmp_path / "bad.gguf", weights, tiny_metadata())
    with pytest.raises(ModelFileError, match=r"'blk\.0\.attn_k\.weight' has shape \[64, 256\], "
                                             r"expected \[128, 256\]"):
        load_gguf(path)


def test_metadata_says_more_layers_than_tensors(tmp_path):
    weights = permuted(tiny_hf_weights(np.random.default_rng(8), layers=3))
    path = write_gguf(tmp_path / "l.gguf", weights, tiny_metadata(layers=4))
    with pytest.raises(ModelFileError, match=r"missing tensor 'blk\.3\.attn_norm\.weight' \(config has 4 layers\)"):
        load_gguf(path)


def test_metadata_says_fewer_layers_than_tensors(tmp_path):
    weights = permuted(tiny_hf_weights(np.random.default_rng(9), layers=3))
    path = write_gguf(tmp_path / "l.gguf", weights, tiny_metadata(layers=2))
    with pytest.raises(ModelFileError, match=r"has tensor 'blk\.2\..*num_layers=2"):
        load_gguf(path)


def test_non_llama_architecture(tmp_path):
    weights = tiny_hf_weights(np.random.default_rng(10))
    path = write_gguf(tmp_path / "g.gguf", weights, tiny_metadata(arch="gpt2"), arch="gpt2")
    with pytest.raises(UnsupportedError, match=r"g\.gguf: architecture 'gpt2' is not supported"):
        load_gguf(path)


def test_missing_metadata_key(tmp_path):
    meta = tiny_metadata()
    del meta["llama.feed_forward_length"]
    path = write_gguf(tmp_path / "m.gguf", tiny_hf_weights(np.random.default_rng(11)), meta)
    with pytest.raises(ModelFileError, match=r"m\.gguf: missing metadata key 'llama\.feed_forward_length'"):
        load_gguf(path)


def test_metadata_key_of_wrong_type(tmp_path):
    meta = tiny_metadata() | {"llama.block_count": "two"}
    path = write_gguf(tmp_path / "m.gguf", tiny_hf_weights(np.random.default_rng(12)), meta)
    with pytest.raises(ModelFileError, match=r"'llama\.block_count' has type STRING, expected int"):
        load_gguf(path)


def test_inconsistent_heads(tmp_path):
    meta = tiny_metadata() | {"llama.attention.head_count_kv": 3}  # 4 heads, 3 KV heads
    path = write_gguf(tmp_path / "m.gguf", tiny_hf_weights(np.random.default_rng(13)), meta)
    with pytest.raises(ModelFileError, match="inconsistent metadata.*multiple of num_kv_heads"):
        load_gguf(path)


def test_unsupported_rope_scaling(tmp_path):
    meta = tiny_metadata() | {"llama.rope.scaling.type": "yarn", "llama.rope.scaling.factor": 4.0}
    path = write_gguf(tmp_path / "y.gguf", tiny_hf_weights(np.random.default_rng(14)), meta)
    with pytest.raises(UnsupportedError, match="RoPE scaling type 'yarn'"):
        load_gguf(path)
