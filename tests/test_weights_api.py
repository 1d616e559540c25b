"""The public entry points of jaxchunk.weights and jaxchunk.tokenizer: read_gguf / open_gguf /
gguf_field (against the `gguf` package's own GGUFReader), load_weights / prepare_params (against
the loader + the packing functions they replace), inspect (against GGUFReader's and safetensors'
own tensor tables), the mode names, and the tokenizer package's functions."""
from __future__ import annotations

import collections
import json
import math

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, GGUFValueType, GGUFWriter
from gguf.quants import quantize

from jaxchunk.errors import InputError, ModelFileError, TokenizerError, UnsupportedError

H, F, V, HEADS, KV_HEADS, HEAD_DIM, LAYERS = 64, 128, 300, 4, 2, 16, 2


def tiny_tensors(rng) -> dict[str, np.ndarray]:
    """Random llama tensors in file layout ([out, in]), by GGUF name (tied embedding)."""
    q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    shapes = {"token_embd.weight": (V, H), "output_norm.weight": (H,)}
    for i in range(LAYERS):
        shapes.update({f"blk.{i}.attn_norm.weight": (H,), f"blk.{i}.attn_q.weight": (q, H),
                       f"blk.{i}.attn_k.weight": (kv, H), f"blk.{i}.attn_v.weight": (kv, H),
                       f"blk.{i}.attn_output.weight": (H, q), f"blk.{i}.ffn_norm.weight": (H,),
                       f"blk.{i}.ffn_gate.weight": (F, H), f"blk.{i}.ffn_up.weight": (F, H),
                       f"blk.{i}.ffn_down.weight": (H, F)})
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def write_model_gguf(path, add_bos=None, matrix_type=Q.Q4_1, extra=None):
    """A 2-layer llama GGUF with a byte-level tokenizer: matrices in `matrix_type`, the embedding
    Q8_0, norms F32, plus metadata of every value type (`extra` adds more)."""
    from jaxchunk.tokenizer import byte_spelling

    spell = byte_spelling()
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [spell[b] for b in range(256)] + ["Ġt", "he"]
    tokens += [f"<pad{i}>" for i in range(V - len(tokens))]
    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(LAYERS)
    writer.add_context_length(256)
    writer.add_embedding_length(H)
    writer.add_feed_forward_length(F)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_name("tiny test model")
    writer.add_file_type(3)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3, 3] + [1] * (len(tokens) - 3))
    writer.add_token_merges(["Ġ t", "h e"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_chat_template("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}")
    if add_bos is not None:
        writer.add_add_bos_token(add_bos)
    # One of every other value type, to check the reader against GGUFReader.
    writer.add_uint8("test.u8", 7)
    writer.add_int16("test.i16", -300)
    writer.add_int64("test.i64", -(2 ** 40))
    writer.add_float64("test.f64", 0.1)
    writer.add_bool("test.bool", True)
    writer.add_array("test.floats", [0.5, -1.25])
    writer.add_array("test.strings", ["a", "ünï", ""])
    for key, value in (extra or {}).items():
        writer.add_string(key, value)
    for name, w in tiny_tensors(np.random.default_rng(0)).items():
        qtype = Q.F32 if w.ndim == 1 else Q.Q8_0 if name == "token_embd.weight" else matrix_type
        writer.add_tensor(name, w if qtype == Q.F32 else quantize(w, qtype),
                          raw_dtype=None if qtype == Q.F32 else qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def tiny_gguf(tmp_path):
    return write_model_gguf(tmp_path / "tiny.gguf", add_bos=True)


# --- the GGUF container -----------------------------------------------------------------------

def test_read_gguf_matches_gguf_reader(tiny_gguf):
    from jaxchunk.weights.gguf import open_gguf

    ours, theirs = open_gguf(tiny_gguf), GGUFReader(tiny_gguf)
    assert ours.version == int(theirs.fields["GGUF.version"].contents())
    assert ours.data_offset == theirs.data_offset
    their_fields = {k: f for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
    assert list(ours.fields) == list(their_fields)
    for key, field in their_fields.items():
        assert list(ours.fields[key].types) == list(field.types), key
        assert ours.fields[key].contents() == pytest.approx(field.contents()), key
    assert list(ours.tensors) == [t.name for t in theirs.tensors]
    for t in theirs.tensors:
        raw = ours.tensors[t.name]
        assert raw.qtype == t.tensor_type.name
        assert raw.shape == tuple(reversed(t.shape.tolist()))
        np.testing.assert_array_equal(raw.blocks.ravel(), t.data.view(np.uint8).ravel())
        assert not raw.blocks.flags.writeable  # a view into the read-only map, not a copy


def test_gguf_field_kinds_and_errors(tiny_gguf):
    from jaxchunk.weights.gguf import gguf_field, open_gguf

    for reader in (open_gguf(tiny_gguf), GGUFReader(tiny_gguf)):  # either reader answers alike
        assert gguf_field(reader, tiny_gguf, "llama.block_count", int) == LAYERS
        assert gguf_field(reader, tiny_gguf, "test.i64", int) == -(2 ** 40)
        assert gguf_field(reader, tiny_gguf, "llama.attention.layer_norm_rms_epsilon", float) == 1e-5
        assert gguf_field(reader, tiny_gguf, "test.bool", bool) is True
        assert gguf_field(reader, tiny_gguf, "test.strings", list[str]) == ["a", "ünï", ""]
        assert gguf_field(reader, tiny_gguf, "tokenizer.ggml.token_type", list[int])[:4] == [3, 3, 3, 1]
        assert gguf_field(reader, tiny_gguf, "no.such.key", int, None) is None
        with pytest.raises(ModelFileError, match=r"tiny\.gguf: missing metadata key 'no\.such\.key'"):
            gguf_field(reader, tiny_gguf, "no.such.key", int)
        with pytest.raises(ModelFileError, match=r"'general\.name' has type STRING, expected int"):
            gguf_field(reader, tiny_gguf, "general.name", int)
        not_strings = r"'test\.floats' is not a list\[str\] \(it has type ARRAY\[FLOAT32\]\)"
        with pytest.raises(ModelFileError, match=not_strings):
            gguf_field(reader, tiny_gguf, "test.floats", list[str])


# --- load_weights / prepare_params --------------------------------------------------------------

def assert_same_tree(a, b):
    import jax
    leaves_a, tree_a = jax.tree.flatten(a)
    leaves_b, tree_b = jax.tree.flatten(b)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b):
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x.view(np.uint8), y.view(np.uint8))


@pytest.mark.parametrize("dtype, weights", [("f32", "dequantized"), ("bf16", "dequantized"), ("f32", "f32"),
                                            (None, "bf16"), ("f32", "q4"), ("bf16", "q4"), ("f32", "q4_q8")])
def test_load_weights_equals_loader_plus_packing(tiny_gguf, dtype, weights):
    """load_weights == what jaxchunk.load and the experiments did by hand before it existed:
    load_gguf, then with_activations for q4_q8 and pack_bf16 for float bf16."""
    import ml_dtypes

    from jaxchunk.weights import load_weights
    from jaxchunk.weights.bf16 import BF16Weight, pack_bf16
    from jaxchunk.weights.gguf import load_gguf
    from jaxchunk.weights.quantized import QuantizedWeight, with_activations

    resolved = dtype or weights
    np_dtype = {"f32": np.float32, "bf16": ml_dtypes.bfloat16}[resolved]
    quantized = weights in ("q4", "q4_q8")
    config, expected, meta = load_gguf(tiny_gguf, dtype=np_dtype, quantized=quantized)
    if weights == "q4_q8":
        expected = with_activations(expected, "q8")
    if resolved == "bf16" and not quantized:
        expected = pack_bf16(expected)
    got_config, got, got_meta = load_weights(tiny_gguf, dtype=dtype, weights=weights)
    assert got_config == config and got_meta == meta
    assert_same_tree(got, expected)
    wq = got["layers"]["wq"]
    assert isinstance(wq, QuantizedWeight if quantized else BF16Weight if resolved == "bf16" else np.ndarray)
    if quantized:
        assert wq.activations == ("q8" if weights == "q4_q8" else "float")


def test_load_weights_shares_an_open_file_and_a_directory(tiny_gguf):
    from jaxchunk.weights import load_weights
    from jaxchunk.weights.gguf import open_gguf

    by_path = load_weights(tiny_gguf, weights="q4")
    assert_same_tree(load_weights(open_gguf(tiny_gguf), weights="q4")[1], by_path[1])
    assert_same_tree(load_weights(tiny_gguf.parent, weights="q4")[1], by_path[1])  # the dir's only .gguf


def test_load_weights_errors(tiny_gguf, tmp_path):
    from jaxchunk.weights import load_weights

    with pytest.raises(InputError, match="weights must be one of"):
        load_weights(tiny_gguf, weights="int3")
    with pytest.raises(InputError, match="dtype must be one of"):
        load_weights(tiny_gguf, dtype="f16")
    with pytest.raises(InputError, match="contradicts"):
        load_weights(tiny_gguf, dtype="f32", weights="bf16")
    with pytest.raises(ModelFileError, match="no such file"):
        load_weights(tmp_path / "missing.gguf")
    write_model_gguf(tmp_path / "second.gguf")
    with pytest.raises(ModelFileError, match="2 .gguf files instead of one"):
        load_weights(tmp_path)


def test_load_weights_rejects_quantized_safetensors(tmp_path):
    from jaxchunk.weights import load_weights
    from jaxchunk.weights.safetensors import save_safetensors

    config, params = _tiny_float_model()
    save_safetensors(tmp_path / "hf", config, params)
    with pytest.raises(UnsupportedError, match="keeps a GGUF file's quantized blocks"):
        load_weights(tmp_path / "hf", weights="q4")
    _, loaded, meta = load_weights(tmp_path / "hf", weights="f32")
    assert meta["format"] == "safetensors"
    assert_same_tree(loaded, params)


def test_prepare_params_casts_and_packs():
    from jaxchunk.weights import prepare_params
    from jaxchunk.weights.bf16 import BF16Weight, unpack_bf16

    _, params = _tiny_float_model()
    assert prepare_params(params)["layers"]["wq"] is params["layers"]["wq"]  # already f32: no copy
    packed = prepare_params(params, "bf16")
    assert isinstance(packed["embed"], BF16Weight)
    np.testing.assert_array_equal(np.asarray(unpack_bf16(packed)["layers"]["w_up"], np.float32),
                                  params["layers"]["w_up"].astype(np.dtype("bfloat16")).astype(np.float32))


def test_load_weights_device_put_needs_no_copy_on_cpu(tiny_gguf):
    """The stacked layer arrays are 64-byte aligned, so JAX's CPU backend adopts them."""
    import jax

    from jaxchunk.weights import load_weights

    if jax.default_backend() != "cpu":
        pytest.skip("zero-copy device_put is a property of the CPU backend")
    host = load_weights(tiny_gguf, weights="f32")[1]["layers"]["w_up"]
    assert host.ctypes.data % 64 == 0
    assert jax.device_put(host).unsafe_buffer_pointer() == host.ctypes.data


def test_mode_names_are_defined_once():
    import jaxchunk.cli as cli
    from experiments import common
    from jaxchunk.fetch import DEFAULT_MODEL, MODELS
    from jaxchunk.weights import DTYPES, QUANTIZED_MODES, WEIGHT_MODES

    assert set(QUANTIZED_MODES) < set(WEIGHT_MODES) and set(DTYPES) < set(WEIGHT_MODES)
    assert common.DTYPES is DTYPES and set(common.WEIGHTS) == {"dequantized", *QUANTIZED_MODES}
    assert common.DEFAULT_MODEL == cli.DEFAULT_MODEL == DEFAULT_MODEL and DEFAULT_MODEL in MODELS
    parser = cli.build_parser()
    generate = parser._subparsers._group_actions[0].choices["generate"]
    choices = {a.dest: a.choices for a in generate._actions}
    assert tuple(choices["weights"]) == WEIGHT_MODES and tuple(choices["dtype"]) == DTYPES


def _tiny_float_model():
    import jax

    from jaxchunk.config import LlamaConfig
    from jaxchunk.model import init_params

    config = LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=F, num_layers=LAYERS, num_heads=HEADS,
                         num_kv_heads=KV_HEADS, head_dim=HEAD_DIM, max_position_embeddings=256,
                         tie_word_embeddings=True)
    return config, jax.tree.map(np.asarray, init_params(config, seed=0))


# --- inspect --------------------------------------------------------------------------------------

def expected_gguf_table(path) -> dict:
    """type -> (count, elements, bytes), from gguf's own GGUFReader."""
    table = collections.defaultdict(lambda: [0, 0, 0])
    for t in GGUFReader(path).tensors:
        row = table[t.tensor_type.name]
        row[0] += 1
        row[1] += int(t.n_elements)
        row[2] += int(t.n_bytes)
    return {k: tuple(v) for k, v in table.items()}


def check_gguf_info(info, path):
    from jaxchunk.tokenizer import Tokenizer
    from jaxchunk.weights.gguf import load_gguf

    reader = GGUFReader(path)
    got = {kind: (g.count, g.parameters, g.nbytes) for kind, g in info.tensors.items()}
    assert got == expected_gguf_table(path)
    assert list(info.tensors) == sorted(got, key=lambda k: -got[k][2])  # largest first
    assert info.total.count == len(reader.tensors)
    assert info.config == load_gguf(path, quantized=True)[0]
    assert info.format == "gguf" and info.file_bytes == path.stat().st_size
    assert info.gguf_version == int(reader.fields["GGUF.version"].contents())
    assert info.name == reader.fields["general.name"].contents()
    tok = Tokenizer.from_gguf(path)
    assert (info.tokenizer.vocab_size, info.tokenizer.bos_id, info.tokenizer.eos_token) == (
        tok.vocab_size, tok.bos_id, tok.eos_token)
    assert info.tokenizer.chat_template_chars == len(tok.chat_template)
    field = reader.fields.get("tokenizer.ggml.add_bos_token")
    assert info.add_bos == (bool(field.contents()) if field is not None else False)


def test_inspect_tiny_gguf(tiny_gguf):
    from jaxchunk.weights import inspect

    info = inspect(tiny_gguf)
    check_gguf_info(info, tiny_gguf)
    assert set(info.tensors) == {"Q4_1", "Q8_0", "F32"} and info.file_type == "MOSTLY_Q4_1"
    assert info.add_bos is True


@pytest.mark.model
def test_inspect_smollm2(smollm2_gguf):
    from jaxchunk.weights import inspect

    info = inspect(smollm2_gguf)
    check_gguf_info(info, smollm2_gguf)
    assert info.tensors["Q4_1"].count == 210 and info.file_type == "MOSTLY_Q4_1" and info.add_bos is False


def test_inspect_hf_directory(tmp_path):
    from safetensors import safe_open
    from tokenizers import Tokenizer as HFTok
    from tokenizers import models, pre_tokenizers

    from jaxchunk.weights import inspect
    from jaxchunk.weights.safetensors import save_safetensors

    config, params = _tiny_float_model()
    model_dir = save_safetensors(tmp_path / "hf", config, params, shards=2, dtype=np.float16)
    tok = HFTok(models.WordLevel({"<s>": 0, "</s>": 1, "hi": 2, "[UNK]": 3}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(model_dir / "tokenizer.json"))
    (model_dir / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}))
    info = inspect(model_dir)
    names = {}
    for file in model_dir.glob("*.safetensors"):
        with safe_open(file, framework="np") as f:
            names.update({name: f.get_tensor(name) for name in f.keys()})
    assert {k: (g.count, g.parameters, g.nbytes) for k, g in info.tensors.items()} == {
        "F16": (len(names), sum(math.prod(a.shape) for a in names.values()), sum(a.nbytes for a in names.values()))}
    assert info.format == "safetensors" and info.config == config and info.add_bos is True
    assert (info.tokenizer.kind, info.tokenizer.bos_id, info.tokenizer.eos_token) == ("HFTokenizer", 0, "</s>")
    assert info.tokenizer.chat_template_chars is None


def test_inspect_errors(tmp_path):
    from jaxchunk.weights import inspect

    with pytest.raises(ModelFileError, match="no such file"):
        inspect(tmp_path / "nothing.gguf")
    (tmp_path / "notes.txt").write_text("hello, not a model")
    with pytest.raises(ModelFileError, match="not a GGUF file"):
        inspect(tmp_path / "notes.txt")


# --- the tokenizer package ----------------------------------------------------------------------

def test_tokenizer_public_api_is_importable():
    import jaxchunk.tokenizer as package

    for name in package.__all__:
        assert getattr(package, name) is not None, name
    assert package.Tokenizer.from_gguf and package.load_tokenizer


@pytest.mark.parametrize("add_bos", [True, False, None])
def test_gguf_add_bos(tmp_path, add_bos):
    from jaxchunk.tokenizer import gguf_add_bos
    from jaxchunk.weights.gguf import open_gguf

    path = write_model_gguf(tmp_path / "t.gguf", add_bos=add_bos)
    assert gguf_add_bos(open_gguf(path), path) is bool(add_bos)
    assert gguf_add_bos(GGUFReader(path), path) is bool(add_bos)


def test_gguf_add_bos_of_wrong_type(tmp_path):
    from jaxchunk.tokenizer import gguf_add_bos
    from jaxchunk.weights.gguf import open_gguf

    path = write_model_gguf(tmp_path / "t.gguf", extra={"tokenizer.ggml.add_bos_token": "yes"})
    with pytest.raises(TokenizerError, match="'tokenizer.ggml.add_bos_token' has type STRING, expected bool"):
        gguf_add_bos(open_gguf(path), path)


@pytest.mark.parametrize("config, expected", [({"add_bos_token": True}, True), ({"add_bos_token": False}, False),
                                              ({}, False), ("{not json", False), (None, False), ([1, 2], False)])
def test_hf_add_bos(tmp_path, config, expected):
    from jaxchunk.tokenizer import hf_add_bos

    if config is not None:
        text = config if isinstance(config, str) else json.dumps(config)
        (tmp_path / "tokenizer_config.json").write_text(text)
    assert hf_add_bos(tmp_path) is expected


def test_tokenizer_from_gguf_reports_bad_files_as_tokenizer_errors(tmp_path):
    from jaxchunk.tokenizer import Tokenizer

    bad = tmp_path / "v9.gguf"
    bad.write_bytes(b"GGUF\x09\x00\x00\x00" + b"\x00" * 32)
    with pytest.raises(TokenizerError, match=r"v9\.gguf: not a readable GGUF file: GGUF version 9 is not supported"):
        Tokenizer.from_gguf(bad)


def test_render_chat_template_directly():
    from jaxchunk.tokenizer import render_chat_template

    template = "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}" \
               "{% if add_generation_prompt %}>{% endif %}{{ tools is none }}"
    assert render_chat_template(template, [{"role": "user", "content": "hi"}], bos_token="<s>") == "<s>[user]hi>True"
    with pytest.raises(InputError, match="empty"):
        render_chat_template(template, [])
    with pytest.raises(TokenizerError, match="x.jinja: chat template does not compile"):
        render_chat_template("{% for %}", [{"role": "user", "content": "hi"}], source="x.jinja")


def test_tokenizer_encode_matches_after_shared_parse(tiny_gguf):
    """The tokenizer built from the weights' parse of the file is the one built on its own."""
    from jaxchunk.tokenizer import Tokenizer
    from jaxchunk.weights.gguf import open_gguf

    shared = Tokenizer.from_gguf(tiny_gguf, reader=open_gguf(tiny_gguf))
    alone = Tokenizer.from_gguf(tiny_gguf)
    text = "the <|im_start|>user\nhe 12"
    assert shared.encode(text) == alone.encode(text) and shared.vocab_size == alone.vocab_size == V
    assert GGUFValueType.BOOL  # the reader's types are gguf's own enum
