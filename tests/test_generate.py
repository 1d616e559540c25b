"""Generation: the on-device decode loop and the streaming path against step-by-step decoding, on a
small random Llama (fast); then stop strings, streaming text and chat() on the real SmolLM2."""
import jax
import numpy as np
import pytest

from jaxchunk.cache import init_cache
from jaxchunk.testing import tiny_config
from jaxchunk.errors import InputError
from jaxchunk.generate import compiled_loop_count, decode_ids, generate_ids, stream_ids
from jaxchunk.model import init_params
from jaxchunk.prefill import decode_step, prefill
from jaxchunk.steps import host_lengths
from jaxchunk.sampling import SamplingParams

CONFIG = tiny_config(tie_word_embeddings=False, eos_token_id=None)
MAX_SEQ = 128
CHUNK = 8   # one prefill chunk shape, max_new_tokens <= 16 (one loop bucket) and batch 1 or 2
            # wherever possible: each new static shape is a compile, the bulk of this file's runtime
SAMPLED = SamplingParams(temperature=1.0, top_k=50, top_p=0.95, repetition_penalty=1.2)


@pytest.fixture(scope="module")
def params():
    # scale 0.2: peaked logits, so greedy argmaxes are far from ties.
    return init_params(CONFIG, seed=0, scale=0.2)


def prompt(length, seed):
    return np.random.default_rng(seed).integers(0, CONFIG.vocab_size, length).astype(np.int32)


def cache(batch=1):
    return init_cache(CONFIG, batch, MAX_SEQ)


def step_by_step_greedy(params, ids, n):
    """Reference: prefill, then argmax + decode_step on the host, n tokens."""
    kv, logits = prefill(params, CONFIG, cache(), [ids], chunk_size=CHUNK)
    out = []
    for _ in range(n):
        out.append(int(np.asarray(logits)[0].argmax()))
        if len(out) < n:
            kv, logits = decode_step(params, kv, np.array(out[-1:]), config=CONFIG)
    return out


def stream_all(*args, **kwargs):
    """Run stream_ids to the end: (tokens [steps, batch], the returned cache)."""
    gen, steps = stream_ids(*args, **kwargs), []
    try:
        while True:
            steps.append(next(gen))
    except StopIteration as stop:
        return np.stack(steps), stop.value


def trim(steps):
    """Per-row ids from stream_ids' [steps, batch] (PAD = -1 after a row is done)."""
    return [col[col >= 0].tolist() for col in np.asarray(steps).T]


# ----------------------------------------------------------------------------- random model
def test_loop_equals_step_by_step_greedy(params):
    ids = prompt(21, seed=1)
    kv, (out,) = generate_ids(params, CONFIG, cache(), [ids], max_new_tokens=16, chunk_size=CHUNK)
    assert out == step_by_step_greedy(params, ids, 16)
    # The last token is sampled but never fed back.
    assert host_lengths(kv).tolist() == [21 + 16 - 1]


def test_batch_of_different_lengths_equals_per_row(params):
    prompts = [prompt(n, seed=10 + n) for n in (5, 40)]
    _, batched = generate_ids(params, CONFIG, cache(2), prompts, max_new_tokens=12, chunk_size=CHUNK)
    for ids, row in zip(prompts, batched):
        _, (alone,) = generate_ids(params, CONFIG, cache(), [ids], max_new_tokens=12, chunk_size=CHUNK)
        assert row == alone


def test_stops_at_eos_per_row(params):
    prompts = [prompt(9, seed=2), prompt(30, seed=3)]
    _, free = generate_ids(params, CONFIG, cache(2), prompts, max_new_tokens=16, chunk_size=CHUNK)
    eos = free[0][5]  # make row 0's sixth token the stop id
    _, stopped = generate_ids(params, CONFIG, cache(2), prompts, max_new_tokens=16, stop_ids=[eos],
                              chunk_size=CHUNK)
    for row, full in zip(stopped, free):
        end = full.index(eos) + 1 if eos in full else len(full)
        assert row == full[:end]  # up to and including the stop id, nothing after
    assert stopped[0][-1] == eos and len(stopped[0]) <= 6
    steps, _ = stream_all(params, CONFIG, cache(2), prompts, max_new_tokens=16, stop_ids=[eos], chunk_size=CHUNK)
    assert trim(steps) == stopped


def test_stops_early_on_device_when_all_rows_done(params):
    ids = prompt(12, seed=4)
    _, (free,) = generate_ids(params, CONFIG, cache(), [ids], max_new_tokens=16, chunk_size=CHUNK)
    kv, (out,) = generate_ids(params, CONFIG, cache(), [ids], max_new_tokens=16, stop_ids=[free[2]],
                              chunk_size=CHUNK)
    assert out == free[:free.index(free[2]) + 1]
    assert host_lengths(kv).tolist() == [12 + len(out) - 1]  # the loop exited: no further steps


def test_seeded_sampling_is_deterministic_and_streaming_agrees(params):
    prompts = [prompt(11, seed=5), prompt(3, seed=6)]
    run = lambda seed: generate_ids(params, CONFIG, cache(2), prompts, max_new_tokens=16, sampling=SAMPLED,
                                    seed=seed, chunk_size=CHUNK)[1]
    first = run(seed=123)
    assert run(seed=123) == first
    assert run(seed=124) != first
    steps, _ = stream_all(params, CONFIG, cache(2), prompts, max_new_tokens=16, sampling=SAMPLED, seed=123,
                          chunk_size=CHUNK)
    assert trim(steps) == first


def test_stream_greedy_equals_loop_and_returns_cache(params):
    ids = prompt(33, seed=7)
    _, (want,) = generate_ids(params, CONFIG, cache(), [ids], max_new_tokens=10, chunk_size=CHUNK)
    steps, kv = stream_all(params, CONFIG, cache(), [ids], max_new_tokens=10, chunk_size=CHUNK)
    assert steps.shape == (10, 1) and trim(steps) == [want]
    assert host_lengths(kv).tolist() == [33 + 10 - 1]


def test_loop_compiles_once_for_different_prompts(params):
    sampling = SamplingParams(temperature=0.5, top_k=7)  # a configuration no other test uses
    before = compiled_loop_count()
    generate_ids(params, CONFIG, cache(2), [prompt(7, 8), prompt(30, 9)], max_new_tokens=9, sampling=sampling,
                 chunk_size=CHUNK)
    assert compiled_loop_count() == before + 1
    # Other prompts, other lengths, another seed, another max_new_tokens in the same bucket (1..16).
    generate_ids(params, CONFIG, cache(2), [prompt(50, 10), prompt(2, 11)], max_new_tokens=16,
                 sampling=sampling, seed=5, chunk_size=CHUNK)
    assert compiled_loop_count() == before + 1


def test_host_guards(params):
    ids = prompt(113, seed=12)
    with pytest.raises(InputError, match="does not fit the cache"):
        generate_ids(params, CONFIG, cache(), [ids], max_new_tokens=16)  # 113 + 16 > 128
    with pytest.raises(InputError, match="does not fit the cache"):
        stream_ids(params, CONFIG, cache(), [ids], max_new_tokens=16)  # raised at the call
    for bad in (0, -3, 2.0, True):
        with pytest.raises(InputError, match="max_new_tokens"):
            generate_ids(params, CONFIG, cache(), [ids], max_new_tokens=bad)
    with pytest.raises(InputError, match="stop_ids"):
        generate_ids(params, CONFIG, cache(), [ids], max_new_tokens=4, stop_ids=[CONFIG.vocab_size])
    with pytest.raises(InputError, match="seed"):
        generate_ids(params, CONFIG, cache(), [ids], max_new_tokens=4, seed=-1)
    with pytest.raises(InputError, match="prompts"):
        generate_ids(params, CONFIG, cache(2), [ids], max_new_tokens=4)
    generate_ids(params, CONFIG, cache(), [ids], max_new_tokens=15, chunk_size=CHUNK)  # exactly fits


def test_decode_ids_continues_a_prefill_like_generate_ids(params):
    """decode_ids (the on-device loop from a cache + logits) gives generate_ids' tokens, and checks
    its input on the host."""
    ids = prompt(21, seed=1)
    _, (expected,) = generate_ids(params, CONFIG, cache(), [ids], max_new_tokens=16, chunk_size=CHUNK)
    kv, logits = prefill(params, CONFIG, cache(), [ids], chunk_size=CHUNK)
    kv, (out,) = decode_ids(params, CONFIG, kv, logits, max_new_tokens=16)
    assert out == expected
    assert host_lengths(kv).tolist() == [21 + 16 - 1]
    kv, logits = prefill(params, CONFIG, cache(), [prompt(113, seed=2)], chunk_size=CHUNK)
    with pytest.raises(InputError, match="cache positions"):
        decode_ids(params, CONFIG, kv, logits, max_new_tokens=17)  # 16 steps, 15 free
    with pytest.raises(InputError, match="logits must be"):
        decode_ids(params, CONFIG, kv, logits[:, :10], max_new_tokens=4)
    with pytest.raises(InputError, match="max_new_tokens"):
        decode_ids(params, CONFIG, kv, logits, max_new_tokens=0)
    with pytest.raises(InputError, match="stop_ids"):
        decode_ids(params, CONFIG, kv, logits, max_new_tokens=4, stop_ids=[-1])


# ----------------------------------------------------------------------------- real SmolLM2
@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    from jaxchunk.api import load
    return load(str(smollm2_gguf), max_seq_len=512)


GREEDY_PROMPTS = [  # as tests/test_reference_smollm2.py
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "<|im_start|>user\nWhat is gravity? Answer in two sentences.<|im_end|>\n<|im_start|>assistant\n",
]


@pytest.mark.model
@pytest.mark.peers
@pytest.mark.slow
def test_batched_on_device_greedy_matches_transformers(smollm2, hf_smollm2):
    """The 3 reference prompts (different lengths) in ONE batch through the on-device loop, 32 tokens
    each, equal transformers' greedy generation of each prompt alone."""
    import torch
    hf_model, hf_tok = hf_smollm2
    prompts = [hf_tok.encode(p, add_special_tokens=False) for p in GREEDY_PROMPTS]
    eos = smollm2.config.eos_token_id
    _, ours = generate_ids(smollm2.params, smollm2.config, smollm2.new_cache(3), prompts, max_new_tokens=32,
                           chunk_size=7)
    for ids, row in zip(prompts, ours):
        with torch.no_grad():
            theirs = hf_model.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False,
                                       eos_token_id=eos, pad_token_id=eos)[0, len(ids):].tolist()
        assert row == theirs, (hf_tok.decode(row), hf_tok.decode(theirs))


@pytest.mark.model
@pytest.mark.slow
def test_stop_strings_spanning_tokens(smollm2):
    text_prompt = "The capital of France is"
    pieces = list(smollm2.generate(text_prompt, max_new_tokens=16, stream=True))
    full = "".join(pieces)
    # Where one streamed piece ends and the next begins is a token boundary (ASCII text: one
    # piece per token). Take a stop string made of the end of one piece and the start of the next.
    ends = np.cumsum([len(p) for p in pieces])[:-1]
    cuts = [int(e) for e in ends if 4 <= e <= len(full) - 3]
    assert cuts, pieces
    at = cuts[len(cuts) // 2]
    stop = full[at - 2:at + 2]
    want = full[:full.find(stop)]
    assert len(want) < at  # the stop string really is cut off, not after it
    assert smollm2.generate(text_prompt, max_new_tokens=16, stop=[stop, "never appears"]) == want
    assert "".join(smollm2.generate(text_prompt, max_new_tokens=16, stop=stop, stream=True)) == want


@pytest.mark.model
@pytest.mark.slow
def test_stream_concatenates_to_text_with_multibyte_characters(smollm2):
    messages = [{"role": "user", "content": "Write three Japanese words in Japanese script, then a heart emoji."}]
    kwargs = dict(max_new_tokens=24, temperature=0.7, top_p=0.9, seed=3)
    whole = smollm2.chat(messages, **kwargs)
    pieces = list(smollm2.chat(messages, stream=True, **kwargs))
    assert "".join(pieces) == whole
    # Only a character cut off by max_new_tokens may end the text as U+FFFD (as decode() does).
    assert all("\ufffd" not in piece for piece in pieces[:-1])
    assert any(ord(c) > 0x7FF for c in whole), whole  # 3- or 4-byte UTF-8 characters were generated
    # ... and at least one of them was split across tokens (the case the incremental decoder handles).
    ids = smollm2.tokenizer.encode(whole)
    assert any("\ufffd" in smollm2.tokenizer.decode([i]) for i in ids), whole


@pytest.mark.model
def test_stream_text_assembly_with_crafted_ids(smollm2_gguf):
    """The text side of streaming alone (SmolLM2's tokenizer, no weights), on ids whose characters
    span tokens: pieces are whole characters, they join to the non-streamed text, and stop strings
    cut both the same way."""
    from jaxchunk.api import Model
    from jaxchunk.tokenizer import Tokenizer
    tok = Tokenizer.from_gguf(smollm2_gguf)
    text_only = Model(config=None, params=None, tokenizer=tok)  # only the text methods are used
    text = "Voilà: 日本語 🤔🤔 and ñ — the end. More after the end."
    ids = tok.encode(text)
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    stop_ids = {tok.eos_id}
    for stops in ([], ["the end"], ["🤔"], ["語 🤔"], ["nope"]):
        steps = iter([np.array([i]) for i in ids + [tok.eos_id, 5, 6]])  # what stream_ids yields
        pieces = list(text_only._stream_text(_closable(steps), stop_ids, stops))
        assert "".join(pieces) == text_only._text(ids + [tok.eos_id], stop_ids, stops)
        cut = min([text.find(s) for s in stops if s in text], default=len(text))
        assert "".join(pieces) == text[:cut]
        assert all("\ufffd" not in p for p in pieces)


def _closable(iterator):
    yield from iterator


@pytest.mark.model
@pytest.mark.peers
@pytest.mark.slow
def test_chat_feeds_the_transformers_rendering(smollm2, smollm2_gguf):
    transformers = pytest.importorskip("transformers")
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": "Name a color."},
                {"role": "assistant", "content": "Blue."},
                {"role": "user", "content": "Another one?"}]
    rendered = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    reply = smollm2.chat(messages, max_new_tokens=12)
    assert reply == smollm2.generate(smollm2.tokenizer.encode(rendered), max_new_tokens=12)
    assert reply and "<|im_end|>" not in reply
    assert "".join(smollm2.chat(messages, max_new_tokens=12, stream=True)) == reply


# ----------------------------------------------------------------------------- jaxchunk.load / Model
@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A Hugging Face checkpoint directory: random small Llama + a BPE tokenizer trained here (its
    tokenizer_config asks for BOS and has a chat template)."""
    import json

    from tokenizers import Tokenizer as HFTok, decoders, models, pre_tokenizers, trainers

    from jaxchunk.corpus import reference_text
    from jaxchunk.weights.safetensors import save_safetensors

    tok = HFTok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<s>", "</s>", "<|user|>", "<|bot|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(reference_text(20000).splitlines(), trainer)
    out = tmp_path_factory.mktemp("tiny_llama")
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True,
        "chat_template": "{% for m in messages %}<|user|>{{ m['content'] }}</s>{% endfor %}"
                         "{% if add_generation_prompt %}<|bot|>{% endif %}"}))
    config = tiny_config(vocab_size=tok.get_vocab_size(), max_position_embeddings=256, tie_word_embeddings=True,
                         bos_token_id=0, eos_token_id=1)
    save_safetensors(out, config, init_params(config, seed=3, scale=0.2))
    return out


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    from jaxchunk.api import load
    return load(tiny_dir, max_seq_len=64)


def test_api_load_and_logits(tiny):
    from jaxchunk.model import forward
    assert tiny.add_bos and tiny.encode("Hello")[0] == tiny.tokenizer.bos_id == 0
    ids = tiny.encode("The quick brown fox jumps over the lazy dog.")
    want = np.asarray(forward(tiny.params, tiny.config, np.array([ids])))[0]
    last = tiny.logits(ids, chunk_size=CHUNK)
    every = tiny.logits(ids, chunk_size=CHUNK, all_positions=True)
    assert isinstance(last, np.ndarray) and last.shape == (tiny.config.vocab_size,)
    assert every.shape == (len(ids), tiny.config.vocab_size)
    np.testing.assert_allclose(every, want, atol=1e-4 * np.ptp(want))
    np.testing.assert_allclose(last, want[-1], atol=1e-4 * np.ptp(want))


def reference_perplexity(model, ids, window):
    """exp(mean NLL) from the plain full-attention forward, window by window, in float64 on the host."""
    from jaxchunk.model import forward
    forward = jax.jit(forward, static_argnums=1)
    nll, n = 0.0, 0
    for start in range(0, len(ids), window):
        w = np.array(ids[start:start + window])
        if len(w) < 2:
            continue
        logits = np.asarray(forward(model.params, model.config, w[None]))[0].astype(np.float64)
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - logits.max(-1, keepdims=True)
        nll -= logp[np.arange(len(w) - 1), w[1:]].sum()
        n += len(w) - 1
    return float(np.exp(nll / n))


def test_api_perplexity_matches_forward_including_windows(tiny):
    from jaxchunk.api import Model
    ids = tiny.encode("Perplexity is the exponential of the mean negative log-likelihood of each token. " * 2)
    assert len(ids) > 40
    np.testing.assert_allclose(tiny.perplexity(ids, chunk_size=CHUNK), reference_perplexity(tiny, ids, 64),
                               rtol=1e-4)
    text = "Short text scored as text."
    assert tiny.perplexity(text, CHUNK) == pytest.approx(tiny.perplexity(tiny.encode(text), CHUNK))
    small = Model(tiny.config, tiny.params, tiny.tokenizer, max_seq_len=16)  # windows of 16 tokens
    np.testing.assert_allclose(small.perplexity(ids, chunk_size=CHUNK), reference_perplexity(tiny, ids, 16),
                               rtol=1e-4)
    with pytest.raises(InputError, match="at least 2 tokens"):
        tiny.perplexity([5])


def test_api_generate_text_batch_stream_and_stops(tiny):
    texts = ["The quick brown fox", "Numbers and letters: the language reference says"]
    kwargs = dict(max_new_tokens=8, chunk_size=CHUNK)
    batch = tiny.generate(texts, **kwargs)
    assert isinstance(batch, list) and len(batch) == 2
    for text, out in zip(texts, batch):
        single = tiny.generate(text, **kwargs)
        assert isinstance(single, str) and single == out
        assert "".join(tiny.generate(text, stream=True, **kwargs)) == single
    # Greedy text is the decoded on-device loop output (ids in, same ids out).
    ids = tiny.encode(texts[0])
    _, (gen,) = generate_ids(tiny.params, tiny.config, tiny.new_cache(), [ids], max_new_tokens=8, chunk_size=CHUNK,
                             stop_ids=[tiny.tokenizer.eos_id])
    gen = gen[:-1] if gen and gen[-1] == tiny.tokenizer.eos_id else gen
    assert tiny.generate(ids, **kwargs) == tiny.tokenizer.decode(gen) == batch[0]
    # A stop string cuts the text before it, streamed or not.
    full = batch[1]
    assert len(full) > 4, full  # random weights: 8 tokens of varied text
    stop = full[2:4]
    want = full[:full.find(stop)]
    assert tiny.generate(texts[1], stop=stop, **kwargs) == want
    assert "".join(tiny.generate(texts[1], stop=[stop], stream=True, **kwargs)) == want


def test_api_chat_feeds_the_rendered_template(tiny):
    messages = [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "Hi"},
                {"role": "user", "content": "Tell me more"}]
    rendered = "<|user|>Hello there</s><|user|>Hi</s><|user|>Tell me more</s><|bot|>"
    assert tiny.tokenizer.apply_chat_template(messages) == rendered
    reply = tiny.chat(messages, max_new_tokens=8, chunk_size=CHUNK)
    assert reply == tiny.generate(tiny.tokenizer.encode(rendered), max_new_tokens=8, chunk_size=CHUNK)


def test_api_input_errors(tiny_dir, tiny):
    from jaxchunk.api import load
    from jaxchunk.errors import UnsupportedError
    with pytest.raises(UnsupportedError, match="quantized blocks"):
        load(tiny_dir, weights="q4")
    for kwargs, match in ((dict(weights="int8"), "weights"), (dict(dtype="f16"), "dtype"),
                          (dict(max_seq_len=10 ** 6), "max_seq_len"), (dict(attention_impl="magic"), "attention_impl"),
                          (dict(cache_dtype="f8"), "cache dtype")):
        with pytest.raises(InputError, match=match):
            load(tiny_dir, **kwargs)
    with pytest.raises(InputError, match="single prompt"):
        tiny.generate(["a", "b"], stream=True)
    with pytest.raises(InputError, match="empty"):
        tiny.generate([])
    with pytest.raises(InputError, match="stop"):
        tiny.generate("a", stop=[""])
    with pytest.raises(InputError, match="temperature"):
        tiny.generate("a", temperature=-1)
    with pytest.raises(InputError, match="does not fit the cache"):
        tiny.generate("word " * 80, max_new_tokens=4)


def test_api_bf16(tiny_dir):
    import jax.numpy as jnp

    from jaxchunk.api import load
    model = load(tiny_dir, dtype="bf16", max_seq_len=64)
    assert model.params["embed"].dtype == jnp.bfloat16 and model.new_cache().dtype == jnp.bfloat16
    assert isinstance(model.generate("The quick brown fox", max_new_tokens=4, chunk_size=CHUNK), str)


# ----------------------------------------------------------------------------- ids, warm-up, compile cache
def test_api_return_ids(tiny):
    """return_ids=True: the same text, the ids generate_ids produces (cut after what ended them), and the
    finish reason; for one prompt, a batch, a stop string and a single-token stop."""
    from jaxchunk.api import GenerationResult
    from jaxchunk.generate import generate_ids

    prompt = "The quick brown fox"
    ids = tiny.encode(prompt)
    _, (want,) = generate_ids(tiny.params, tiny.config, tiny.new_cache(1), [ids], max_new_tokens=12,
                              chunk_size=CHUNK, stop_ids=[tiny.tokenizer.eos_id])
    result = tiny.generate(prompt, max_new_tokens=12, chunk_size=CHUNK, return_ids=True)
    assert isinstance(result, GenerationResult)
    assert result.text == tiny.generate(prompt, max_new_tokens=12, chunk_size=CHUNK)
    assert result.ids == want
    assert result.finish_reason == ("stop" if want[-1] == tiny.tokenizer.eos_id else "length")
    batch = tiny.generate([prompt, "Hello"], max_new_tokens=5, chunk_size=CHUNK, return_ids=True)
    assert [r.text for r in batch] == tiny.generate([prompt, "Hello"], max_new_tokens=5, chunk_size=CHUNK)

    text = tiny.tokenizer.decode(want)
    stop = text[len(text) // 2:len(text) // 2 + 2]  # a stop string inside the generated text
    if stop.strip():
        cut = tiny.generate(prompt, max_new_tokens=12, chunk_size=CHUNK, stop=stop, return_ids=True)
        assert cut.finish_reason == "stop" and cut.text == text[:text.find(stop)]
        assert stop in tiny.tokenizer.decode(cut.ids) and stop not in tiny.tokenizer.decode(cut.ids[:-1])
        assert cut.ids == want[:len(cut.ids)]
    singles = [t for t in want if tiny.tokenizer.encode(tiny.tokenizer.decode([t])) == [t]]
    if singles:  # a stop string that is one token stops the device loop at that id
        stop_token = singles[0]
        hit = tiny.generate(prompt, max_new_tokens=12, chunk_size=CHUNK, stop=tiny.tokenizer.decode([stop_token]),
                            return_ids=True)
        assert hit.finish_reason == "stop" and hit.ids == want[:want.index(stop_token) + 1]
    with pytest.raises(InputError, match="return_ids"):
        tiny.generate(prompt, stream=True, return_ids=True)


def test_warmup_then_compile_guard(tiny):
    """After warm-up, prompts of several lengths, batches and decode lengths compile nothing inside
    compile_guard(); a shape that was not warmed up raises an error naming it."""
    import jaxchunk
    from jaxchunk.steps import count_compiles

    warm = tiny.warmup(batch_sizes=(1, 2), chunk_sizes=(CHUNK,), max_new_tokens=(8,))
    assert warm["seconds"] > 0 and warm["compiles"] >= 0
    with count_compiles() as counted, jaxchunk.compile_guard():
        for n in (3, CHUNK, CHUNK + 5, 3 * CHUNK + 1):
            tiny.generate(list(range(5, 5 + n)), max_new_tokens=8, chunk_size=CHUNK)
        tiny.generate(["Hello", "The quick brown fox jumps"], max_new_tokens=3, chunk_size=CHUNK)
        tiny.generate("Hi", max_new_tokens=16, chunk_size=CHUNK)       # the same bucket as 8
    assert counted.count == 0
    with pytest.raises(jaxchunk.CompileAfterWarmupError, match=rf"prefill_chunk\(tokens int32\[1, {CHUNK // 2}\]"):
        with jaxchunk.compile_guard():
            tiny.generate("Hello", max_new_tokens=4, chunk_size=CHUNK // 2)
    with pytest.raises(jaxchunk.CompileAfterWarmupError, match="compiled inside compile_guard"):
        with jaxchunk.compile_guard():
            tiny.generate(["a", "b", "c"], max_new_tokens=4, chunk_size=CHUNK)
    tiny.generate("Hello", max_new_tokens=4, chunk_size=CHUNK // 2)  # outside the guard: compiles, runs
    with pytest.raises(InputError, match="chunk_sizes"):
        tiny.warmup(chunk_sizes=())
    with pytest.raises(InputError, match="max_seq_len"):
        tiny.warmup(chunk_sizes=(tiny.max_seq_len,))


_CACHE_SCRIPT = """
import sys
from jax import monitoring
hits = []
monitoring.register_event_listener(lambda event, **kw: hits.append(event) if event.endswith("cache_hits") else None)
import jaxchunk
model = jaxchunk.load(sys.argv[1], max_seq_len=64)
out = model.generate("Hello there", max_new_tokens=6, chunk_size=8, return_ids=True)
import jax
print(len(hits), jax.config.jax_compilation_cache_dir, out.ids)
"""


def test_persistent_compilation_cache(tiny_dir, tmp_path):
    """jaxchunk.load turns JAX's persistent compilation cache on: a second process loads its executables
    from the directory (cache hits, same tokens); JAXCHUNK_COMPILATION_CACHE=0 turns it off."""
    import os
    import subprocess
    import sys

    def run(setting):
        env = {**os.environ, "JAXCHUNK_COMPILATION_CACHE": str(setting)}
        done = subprocess.run([sys.executable, "-c", _CACHE_SCRIPT, str(tiny_dir)], env=env, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        hits, directory, ids = done.stdout.strip().split(" ", 2)
        return int(hits), directory, ids

    cache = tmp_path / "xla"
    first_hits, directory, first_ids = run(cache)
    assert first_hits == 0 and directory == str(cache) and any(cache.iterdir())
    second_hits, _, second_ids = run(cache)
    assert second_hits > 0 and second_ids == first_ids
    hits, directory, ids = run(0)
    assert (hits, directory, ids) == (0, "None", first_ids)
