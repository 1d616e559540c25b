"""Our GGUF tokenizer against llama.cpp's own (llama-cpp-python, the `bench` extra).

llama.cpp is the runtime the GGUF was made for, and its "smollm" pre-tokenizer isolates digits as
SmolLM2's tokenizer.json does (transformers' GGUF import falls back to plain GPT-2 there; see
test_tokenizer.py). llama-cpp-python compiles from source for minutes, so it is not in the `test`
extras and this module is skipped, with that reason, where it is not installed.
"""
import pytest

from jaxchunk.corpus import reference_text
from jaxchunk.tokenizer import Tokenizer

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python (extra `bench`) not installed")
pytestmark = [pytest.mark.model]

SNIPPETS = [
    "    0 1 2\n\t\t42  ½ 3.14159 1e10 x2 ２３",
    "Ça va? 日本語 Привет مرحبا 👩‍👩‍👧 🇫🇷",
    "def f(x):\n        return x**2  # 123\n",
    "<|im_start|>user\nHi<|im_end|>\n",
]


def test_ids_identical_to_llama_cpp(smollm2_gguf):
    ours = Tokenizer.from_gguf(smollm2_gguf)
    llm = llama_cpp.Llama(model_path=str(smollm2_gguf), vocab_only=True, verbose=False)
    total = 0
    for text in [reference_text(200_000)] + SNIPPETS:
        theirs = llm.tokenize(text.encode(), add_bos=False, special=True)
        assert ours.encode(text) == theirs
        total += len(theirs)
    assert total >= 20_000
