"""SmolLM2 through jaxchunk's chunked prefill vs Hugging Face transformers (fp32, same GGUF).

transformers dequantizes the GGUF and undoes llama.cpp's Q/K permutation with its own code, so
agreement here checks our loader, RoPE layout and chunked attention against an independent stack.
Thresholds are the issue's: top-1 agreement >= 99.9%, perplexity within 0.05%, identical greedy text.
"""
import numpy as np
import pytest

from jaxchunk.cache import init_cache
from jaxchunk.corpus import reference_text
from jaxchunk.prefill import prefill
from jaxchunk.testing import greedy_step_by_step

pytestmark = [pytest.mark.model, pytest.mark.peers, pytest.mark.slow]
N_TOKENS = 2048


def log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def perplexity(logits, ids):
    logp = log_softmax(logits[:-1].astype(np.float64))
    return float(np.exp(-logp[np.arange(len(ids) - 1), ids[1:]].mean()))


def test_logits_and_perplexity_match_transformers(smollm2_f32, hf_smollm2):
    import torch
    config, params = smollm2_f32
    hf_model, hf_tok = hf_smollm2
    ids = np.array([config.bos_token_id] + hf_tok.encode(reference_text(20000), add_special_tokens=False))
    ids = ids[:N_TOKENS]
    assert len(ids) == N_TOKENS
    cache = init_cache(config, 1, N_TOKENS)
    cache, (ours,) = prefill(params, config, cache, [ids], chunk_size=256, all_logits=True)
    with torch.no_grad():
        theirs = hf_model(torch.tensor(ids)[None]).logits[0].numpy()
    top1 = (ours.argmax(-1) == theirs.argmax(-1)).mean()
    ppl_ours, ppl_theirs = perplexity(ours, ids), perplexity(theirs, ids)
    print(f"top-1 agreement {top1:.5f}, perplexity {ppl_ours:.4f} vs {ppl_theirs:.4f}, "
          f"max |diff| {np.abs(ours - theirs).max():.2e}")
    assert top1 >= 0.999
    assert abs(ppl_ours / ppl_theirs - 1) <= 5e-4


def greedy(params, config, ids, n_new, chunk_size):
    # one cache shape for every prompt: compiled once
    return greedy_step_by_step(params, config, ids, n_new, chunk_size, cache_len=256)


@pytest.mark.parametrize("prompt", [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "<|im_start|>user\nWhat is gravity? Answer in two sentences.<|im_end|>\n<|im_start|>assistant\n",
])
def test_greedy_generation_matches_transformers(smollm2_f32, hf_smollm2, prompt):
    import torch
    config, params = smollm2_f32
    hf_model, hf_tok = hf_smollm2
    ids = hf_tok.encode(prompt, add_special_tokens=False)
    ours = greedy(params, config, np.array(ids), 32, chunk_size=7)  # several chunks, last one padded
    with torch.no_grad():
        theirs = hf_model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                                   eos_token_id=config.eos_token_id, pad_token_id=config.eos_token_id)
    theirs = theirs[0, len(ids):].tolist()
    assert len(ours) >= 8  # a real continuation, not an immediate eos
    assert ours == theirs, (hf_tok.decode(ours), hf_tok.decode(theirs))
