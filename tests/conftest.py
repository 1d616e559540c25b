"""Shared pytest fixtures."""
import os

import pytest

# Tests compile thousands of shapes once each: keep them out of the user's persistent compilation
# cache (tests/test_generate.py turns it on in subprocesses of its own, on a temporary directory).
os.environ.setdefault("JAXCHUNK_COMPILATION_CACHE", "0")


@pytest.fixture(scope="session")
def smollm2_gguf():
    """Path of the SmolLM2-135M Q4_1 GGUF, fetched into the cache on first use."""
    from jaxchunk.fetch import fetch_model
    return fetch_model("smollm2-135m", quiet=True)


@pytest.fixture(scope="session")
def smollm2_f32(smollm2_gguf):
    """(config, params) of SmolLM2 dequantized to float32 by jaxchunk's GGUF loader."""
    from jaxchunk.weights.gguf import load_gguf
    config, params, _ = load_gguf(smollm2_gguf)
    return config, params


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_gguf):
    """(model, tokenizer) from Hugging Face transformers, loaded from the same GGUF in float32:
    an implementation no one here wrote (its own GGUF dequantization, Q/K un-permutation, RoPE)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    kwargs = dict(gguf_file=smollm2_gguf.name)
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, **kwargs)
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, dtype=torch.float32, **kwargs)
    return model.eval(), tokenizer
