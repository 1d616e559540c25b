"""Hugging Face safetensors checkpoints: save/load round trips (single file, sharded, f16,
bf16), transformers as an independent reader of what save_safetensors writes, and errors."""
import dataclasses
import json

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from jaxchunk.config import RopeScaling
from jaxchunk.testing import tiny_config
from jaxchunk.errors import ModelFileError, UnsupportedError
from jaxchunk.weights import PARAM_LAYER_KEYS
from jaxchunk.weights.safetensors import config_from_hf, load_safetensors, save_safetensors

CONFIG = tiny_config(vocab_size=128, intermediate_size=96, max_position_embeddings=256, tie_word_embeddings=False,
                     bos_token_id=1, eos_token_id=2)


def random_params(config, seed=0):
    """A params pytree of the documented shapes, written out here independently of the loader."""
    rng = np.random.default_rng(seed)
    h, f, v, L = config.hidden_size, config.intermediate_size, config.vocab_size, config.num_layers
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    shapes = {"attn_norm": (L, h), "wq": (L, h, q), "wk": (L, h, kv), "wv": (L, h, kv),
              "wo": (L, q, h), "mlp_norm": (L, h), "w_gate": (L, h, f), "w_up": (L, h, f),
              "w_down": (L, f, h)}
    draw = lambda shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    params = {"embed": draw((v, h)), "final_norm": draw((h,)),
              "layers": {key: draw(shape) for key, shape in shapes.items()}}
    if not config.tie_word_embeddings:
        params["lm_head"] = draw((h, v))
    return params


def assert_same_params(a, b):
    assert set(a) == set(b) and set(a["layers"]) == set(b["layers"]) == set(PARAM_LAYER_KEYS)
    for key in a:
        if key != "layers":
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    for key in a["layers"]:
        np.testing.assert_array_equal(a["layers"][key], b["layers"][key], err_msg=key)


@pytest.fixture
def checkpoint(tmp_path):
    params = random_params(CONFIG)
    return save_safetensors(tmp_path / "ckpt", CONFIG, params), params


def test_roundtrip(checkpoint):
    path, params = checkpoint
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "model.safetensors"]
    stored = load_file(path / "model.safetensors")
    # HF layout on disk: nn.Linear weights are [out, in].
    assert stored["model.layers.1.self_attn.k_proj.weight"].shape == (32, 64)
    np.testing.assert_array_equal(stored["model.layers.1.mlp.down_proj.weight"], params["layers"]["w_down"][1].T)
    config, loaded, meta = load_safetensors(path)
    assert config == CONFIG
    assert_same_params(loaded, params)
    assert meta == {"format": "safetensors", "path": str(path), "stored_dtypes": "F32"}


def test_sharded_roundtrip(tmp_path):
    params = random_params(CONFIG, seed=1)
    path = save_safetensors(tmp_path / "sharded", CONFIG, params, shards=3)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert not (path / "model.safetensors").exists()
    config, loaded, _ = load_safetensors(path)
    assert config == CONFIG
    assert_same_params(loaded, params)


@pytest.mark.parametrize("stored", [np.float16, ml_dtypes.bfloat16], ids=["f16", "bf16"])
def test_half_precision(tmp_path, stored):
    params = random_params(CONFIG, seed=2)
    path = save_safetensors(tmp_path / "half", CONFIG, params, dtype=stored)
    _, loaded, meta = load_safetensors(path)
    assert meta["stored_dtypes"] == {np.float16: "F16", ml_dtypes.bfloat16: "BF16"}[stored]
    assert loaded["layers"]["wq"].dtype == np.float32
    rounded = lambda x: x.astype(stored).astype(np.float32)  # noqa: E731
    np.testing.assert_array_equal(loaded["layers"]["wq"], rounded(params["layers"]["wq"]))
    np.testing.assert_array_equal(loaded["embed"], rounded(params["embed"]))
    _, as_bf16, _ = load_safetensors(path, dtype=ml_dtypes.bfloat16)
    assert as_bf16["layers"]["w_up"].dtype == ml_dtypes.bfloat16


def test_tied_embeddings(tmp_path):
    config = dataclasses.replace(CONFIG, tie_word_embeddings=True)
    params = random_params(config, seed=3)
    path = save_safetensors(tmp_path / "tied", config, params)
    assert "lm_head.weight" not in load_file(path / "model.safetensors")
    loaded_config, loaded, _ = load_safetensors(path)
    assert loaded_config.tie_word_embeddings and "lm_head" not in loaded
    assert_same_params(loaded, params)


@pytest.mark.parametrize("scaling", [
    RopeScaling(kind="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                original_max_position_embeddings=128),
    RopeScaling(kind="linear", factor=2.0),
], ids=["llama3", "linear"])
def test_rope_scaling_roundtrip(tmp_path, scaling):
    config = dataclasses.replace(CONFIG, rope_scaling=scaling, rope_theta=500000.0)
    path = save_safetensors(tmp_path / "rope", config, random_params(config))
    assert load_safetensors(path)[0] == config


def test_config_in_transformers_5_style():
    """transformers>=5 writes `rope_parameters` instead of `rope_theta` / `rope_scaling`."""
    hf = {"model_type": "llama", "vocab_size": 128, "hidden_size": 64, "intermediate_size": 96,
          "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
          "head_dim": None, "rms_norm_eps": 1e-6, "eos_token_id": [2, 7],
          "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 8192}}
    config = config_from_hf(hf)
    assert config.rope_theta == 500000.0 and config.head_dim == 16 and config.eos_token_id == 2
    assert config.rope_scaling == RopeScaling(kind="llama3", factor=8.0)


@pytest.mark.peers
def test_transformers_loads_saved_checkpoint(tmp_path):
    """transformers reads what save_safetensors writes: same config, same weights."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = dataclasses.replace(CONFIG, rope_scaling=RopeScaling(
        factor=8.0, original_max_position_embeddings=128))
    params = random_params(config, seed=4)
    path = save_safetensors(tmp_path / "hf", config, params, shards=2, dtype=ml_dtypes.bfloat16)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    hf = model.config
    assert (hf.num_hidden_layers, hf.hidden_size, hf.num_attention_heads, hf.num_key_value_heads,
            hf.head_dim, hf.vocab_size, hf.tie_word_embeddings) == (2, 64, 4, 2, 16, 128, False)
    rope = getattr(hf, "rope_parameters", None) or hf.rope_scaling
    assert rope["rope_type"] == "llama3" and rope["factor"] == 8.0
    rounded = lambda x: x.astype(ml_dtypes.bfloat16).astype(np.float32)  # noqa: E731
    for i in range(2):
        attn = model.model.layers[i].self_attn
        np.testing.assert_array_equal(attn.q_proj.weight.detach().numpy().T, rounded(params["layers"]["wq"][i]))
        np.testing.assert_array_equal(attn.k_proj.weight.detach().numpy().T, rounded(params["layers"]["wk"][i]))
    np.testing.assert_array_equal(model.lm_head.weight.detach().numpy().T, rounded(params["lm_head"]))


# --- bad checkpoints ------------------------------------------------------------------------------

def test_missing_config_json(checkpoint):
    path, _ = checkpoint
    (path / "config.json").unlink()
    with pytest.raises(ModelFileError, match=r"ckpt/config\.json: file not found"):
        load_safetensors(path)


def test_not_a_directory(tmp_path):
    with pytest.raises(ModelFileError, match="not a checkpoint directory"):
        load_safetensors(tmp_path / "nowhere")


def test_config_json_not_json(checkpoint):
    path, _ = checkpoint
    (path / "config.json").write_text("model_type: llama\n")
    with pytest.raises(ModelFileError, match=r"config\.json: not valid JSON"):
        load_safetensors(path)


def test_no_weights_file(checkpoint):
    path, _ = checkpoint
    (path / "model.safetensors").unlink()
    with pytest.raises(ModelFileError, match="neither model.safetensors nor model.safetensors.index.json"):
        load_safetensors(path)


def test_missing_tensor(checkpoint):
    path, _ = checkpoint
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, path / "model.safetensors")
    with pytest.raises(ModelFileError, match=r"ckpt: missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
        load_safetensors(path)


def test_wrong_shape(checkpoint):
    path, _ = checkpoint
    config = json.loads((path / "config.json").read_text())
    config["intermediate_size"] = 128  # the tensors say 96
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFileError, match=r"'model\.layers\.0\.mlp\.gate_proj\.weight' has shape "
                                             r"\[96, 64\], expected \[128, 64\]"):
        load_safetensors(path)


def test_more_layers_in_file_than_config(checkpoint):
    path, _ = checkpoint
    config = json.loads((path / "config.json").read_text())
    config["num_hidden_layers"] = 1
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFileError, match=r"has tensor 'model\.layers\.1\..*num_layers=1"):
        load_safetensors(path)


def test_corrupt_safetensors(checkpoint):
    path, _ = checkpoint
    (path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(ModelFileError, match=r"model\.safetensors: not a valid safetensors file"):
        load_safetensors(path)


def test_index_names_missing_shard(tmp_path):
    path = save_safetensors(tmp_path / "sharded", CONFIG, random_params(CONFIG), shards=2)
    (path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelFileError, match=r"model-00002-of-00002\.safetensors: shard file not found"):
        load_safetensors(path)


@pytest.mark.parametrize("change, error, message", [
    ({"model_type": "mistral"}, UnsupportedError, "model_type 'mistral' is not supported"),
    ({"attention_bias": True}, UnsupportedError, "attention_bias=true is not supported"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, UnsupportedError, "rope scaling type 'yarn'"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 4.0}}, ModelFileError, "missing 'low_freq_factor'"),
    ({"num_key_value_heads": 3}, ModelFileError, "inconsistent config.*multiple of num_kv_heads"),
    ({"hidden_size": None}, ModelFileError, "inconsistent config"),
])
def test_bad_config(checkpoint, change, error, message):
    path, _ = checkpoint
    config = json.loads((path / "config.json").read_text()) | change
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(error, match=message):
        load_safetensors(path)


def test_missing_config_key(checkpoint):
    path, _ = checkpoint
    config = json.loads((path / "config.json").read_text())
    del config["num_hidden_layers"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelFileError, match=r"config\.json: missing key 'num_hidden_layers'"):
        load_safetensors(path)
