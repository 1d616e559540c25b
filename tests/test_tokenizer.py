"""Tests for jaxchunk.tokenizer: the three backends against their reference implementations.

* GGUF (SmolLM2's, marked `model`): ids equal transformers' GGUF-loaded tokenizer on a varied
  corpus of > 20k tokens, chat template rendering equal to transformers'.
* GGUF (tiny files written here): the build itself against transformers, and error handling.
* tokenizer.json: a byte-level BPE trained here, against `tokenizers` and transformers.
* SentencePiece: a model trained here, against `sentencepiece` itself.
* Streaming decode on every backend.
"""
from __future__ import annotations

import codecs
import contextlib
import importlib
import importlib.metadata
import inspect
import io
import json
import unicodedata
from pathlib import Path

import pytest

from jaxchunk.errors import InputError, TokenizerError
from jaxchunk.tokenizer import Tokenizer, load_tokenizer

# SmolLM2's own tokenizer.json (HuggingFaceTB/SmolLM2-135M-Instruct) pre-tokenizer, verbatim.
# llama.cpp's "smollm" pre-tokenizer is the same thing: isolate \p{N}, then GPT-2's regex.
SMOLLM2_PRE_TOKENIZER = {
    "type": "Sequence",
    "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    ],
}


# --------------------------------------------------------------------------------------------
# Corpus: real text available offline, plus hand-written snippets for what real text lacks
# --------------------------------------------------------------------------------------------

SNIPPETS = {
    "multilingual": (
        "Crème brûlée, façade, naïve, São Paulo, Ångström, Straße, Łódź, İstanbul, Tiếng Việt có dấu.\n"
        "中文：我们今天去北京的故宫博物院。日本語：東京は晴れ、カタカナとひらがな。한국어 문장입니다.\n"
        "Русский текст: Съешь же ещё этих мягких французских булок. Ελληνικά: Καλημέρα κόσμε.\n"
        "العربية: مرحبا بالعالم، كيف حالك؟ עברית: שלום עולם. हिन्दी: नमस्ते दुनिया। ไทย: สวัสดีชาวโลก\n"
        "Combining: e\u0301 a\u0308 n\u0303 (decomposed) vs é ä ñ (precomposed)."
    ),
    "emoji": (
        "Plain 😀😃😄 and skin tones 👍🏻👍🏿, ZWJ families 👨‍👩‍👧‍👦 👩‍❤️‍💋‍👨 🧑‍💻 🏳️‍🌈, "
        "flags 🇯🇵🇫🇷🇧🇷, keycaps 1️⃣ #️⃣, variation ☺︎ ☺️, newer 🫠🫶🪿, math 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𝟙𝟚𝟛."
    ),
    "whitespace": (
        "  two leading spaces\n\n\nthree newlines\t\ttwo tabs \t mixed \t\n"
        "    four-space indent\n\tTab indent\r\nCRLF line\r\n\r\n"
        "trailing spaces   \n \n \t \n        \n"
        "nbsp\u00a0here, ideographic\u3000space, zero\u200bwidth, thin\u2009space, en\u2002space."
        "                                                   long run of spaces"
    ),
    "special_tokens": (
        "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n"
        "<|endoftext|><file_sep><repo_name>jaxchunk<filename>tokenizer.py\n"
        "Broken ones stay text: <|im_start <|im_end| |im_end|> <|IM_START|> < |im_start|>"
    ),
    "numbers_ascii": (
        "pi = 3.14159265358979, e = 2.718281828, 1,000,000 and 1_000_000, 1e-10, -42, +7, 0x1F600,\n"
        "dates 2024-11-25T13:45:00Z, phone +1 (555) 010-9999, version 1.2.3rc4, 99.9% uptime, $12.50."
    ),
    "numbers_unicode": (
        "Recipe: ½ cup, ¼ tsp, ¾ lb; area 3 m², volume 2 m³, x¹ y² z³; "
        "Arabic-Indic ١٢٣ ٤٥٦, Devanagari ४२, fullwidth １２３, Roman Ⅻ, circled ① ②, Chinese 〇."
    ),
    "code_other_languages": (
        '{"name": "jaxchunk", "version": "0.1.0", "deps": ["jax", "flax"], "ok": true, "n": null}\n'
        "int main(void) {\n\tprintf(\"%d\\n\", 42);\n\treturn 0;\n}\n"
        "for f in *.gguf; do sha256sum \"$f\" | awk '{print $1}'; done 2>&1 >/dev/null\n"
        "SELECT id, name FROM users WHERE age >= 18 ORDER BY name DESC LIMIT 10;\n"
        "fn main() { let v: Vec<u8> = (0..=255).collect(); println!(\"{:?}\", &v[..4]); }"
    ),
    "contractions_punctuation": (
        "I'm sure they'll say it's fine, don't you think? We've seen it; you'd agree. "
        "THEY'RE SHOUTING!!! ...and --- dashes — en–dash “curly quotes” ‘single’ «guillemets» ¿qué? ¡sí!"
    ),
    "empty": "",
    "single_space": " ",
}

STDLIB_MODULES = ("textwrap", "heapq", "json.decoder", "fractions", "calendar")
LICENSED_PACKAGES = ("jax", "numpy", "jinja2", "tqdm", "gguf", "safetensors")


def _zen_of_python() -> str:
    with contextlib.redirect_stdout(io.StringIO()):  # importing `this` prints the Zen
        this = importlib.import_module("this")
    return codecs.decode(this.s, "rot13")


def _license_texts():
    """License texts of installed packages the project depends on (whichever are present)."""
    for package in LICENSED_PACKAGES:
        try:
            files = importlib.metadata.distribution(package).files or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for file in files:
            if file.name.upper().startswith(("LICENSE", "LICENCE", "COPYING")):
                yield f"license:{package}:{file.name}", file.read_text(encoding="utf-8")
                break


def corpus() -> dict[str, str]:
    """name -> text. Python stdlib sources (code, comments, docstrings) alone are > 20k tokens."""
    docs = {f"stdlib:{name}": inspect.getsource(importlib.import_module(name)) for name in STDLIB_MODULES}
    docs["docstrings:builtins"] = "\n\n".join(
        inspect.getdoc(obj) for obj in (str, bytes, dict, list, int, float, open, print, sorted, zip))
    docs["zen"] = _zen_of_python()
    docs.update(_license_texts())
    docs.update({f"snippet:{name}": text for name, text in SNIPPETS.items()})
    return docs


def digit_split_matters(text: str) -> bool:
    """Whether llama.cpp's "smollm" pre-tokenizer (= SmolLM2's tokenizer.json) and the plain
    GPT-2 one transformers builds for it can split `text` differently: a numeric character after
    2+ whitespace characters ("    0": "ĠĠĠĠ","0" vs "ĠĠĠ","Ġ","0"), or a non-ASCII one after a
    space (" ½": "Ġ","Â½" vs "ĠÂ","½"). See jaxchunk/tokenizer.py's docstring."""
    for i, ch in enumerate(text):
        if unicodedata.category(ch).startswith("N"):  # \p{N}
            if i >= 2 and text[i - 2:i].isspace():
                return True
            if not ch.isascii() and text[i - 1:i] == " ":
                return True
    return False


def first_difference(a: list[int], b: list[int]) -> str:
    i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return f"first difference at token {i}: {a[i:i + 8]} vs {b[i:i + 8]} (lengths {len(a)}, {len(b)})"


# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2(smollm2_gguf) -> Tokenizer:
    return Tokenizer.from_gguf(smollm2_gguf)


@pytest.fixture(scope="module")
def hf_smollm2(smollm2_gguf):
    """transformers' tokenizer for the same GGUF (built offline from the local file)."""
    transformers = pytest.importorskip("transformers")
    path = Path(smollm2_gguf)
    return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


@pytest.fixture(scope="module")
def hf_smollm2_fixed(hf_smollm2):
    """transformers' tokenizer with its pre-tokenizer replaced by SmolLM2's own (a `tokenizers`
    object: same vocab, merges, added tokens and decoder as transformers built)."""
    import tokenizers

    spec = json.loads(hf_smollm2.backend_tokenizer.to_str())
    spec["pre_tokenizer"] = SMOLLM2_PRE_TOKENIZER
    return tokenizers.Tokenizer.from_str(json.dumps(spec))


TRAIN_TEXT = _zen_of_python() + inspect.getsource(importlib.import_module("textwrap"))


@pytest.fixture(scope="module")
def hf_json_dir(tmp_path_factory) -> Path:
    """A small byte-level BPE trained here, saved as tokenizer.json + tokenizer_config.json.
    Its post-processor adds <s>, to check that `encode` adds nothing by itself."""
    from tokenizers import Tokenizer as HFTok, decoders, models, pre_tokenizers, processors, trainers

    tok = HFTok(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<s>", "</s>", "<|user|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TRAIN_TEXT.splitlines(), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    out = tmp_path_factory.mktemp("hf_json")
    tok.save(str(out / "tokenizer.json"))
    config = {
        "bos_token": "<s>",
        "eos_token": {"__type": "AddedToken", "content": "</s>", "lstrip": False, "normalized": False,
                      "rstrip": False, "single_word": False},  # the serialized-AddedToken form
        "chat_template": "{% for m in messages %}<|user|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
                         "{% if add_generation_prompt %}<|user|>{% endif %}",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


def _train_sentencepiece(prefix: Path, **options) -> Path:
    import sentencepiece

    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(TRAIN_TEXT.splitlines()), model_prefix=str(prefix),
        minloglevel=2, **options)
    return prefix.with_suffix(".model")


@pytest.fixture(scope="module")
def sp_model(tmp_path_factory) -> Path:
    """A small SentencePiece model (vocab 200) trained here."""
    return _train_sentencepiece(tmp_path_factory.mktemp("sp") / "sp", vocab_size=200)


@pytest.fixture(scope="module")
def sp_byte_model(tmp_path_factory) -> Path:
    """SentencePiece with byte fallback (unseen characters, e.g. emoji, become <0xNN> byte
    pieces) and no normalization, so any text round-trips."""
    return _train_sentencepiece(tmp_path_factory.mktemp("sp_bytes") / "sp", vocab_size=400,
                                byte_fallback=True, character_coverage=1.0,
                                normalization_rule_name="identity", remove_extra_whitespaces=False)


def write_gguf(path: Path, skip: tuple[str, ...] = (), **overrides) -> Path:
    """A tiny GGUF holding only tokenizer metadata (no tensors): a byte vocabulary, a few merges,
    three control tokens, one user-defined token ("<think>") and one token stored as raw text
    ("€" instead of its byte spelling "âĤ¬"). `skip` leaves fields out; `overrides` replaces them."""
    import gguf

    from jaxchunk.tokenizer import byte_spelling

    spell = byte_spelling()
    euro = [spell[b] for b in "€".encode()]  # 3 bytes
    merges = ["Ġ t", "h e", "Ġt he", "Ġ Â", "Â ½", "Ġ a", "i n", "Ġa n",
              f"{euro[0]} {euro[1]}", f"{euro[0]}{euro[1]} {euro[2]}"]
    tokens = (["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [spell[b] for b in range(256)]
              + ["Ġt", "he", "Ġthe", "ĠÂ", "Â½", "Ġa", "in", "Ġan", euro[0] + euro[1], "<think>", "€"])
    types = [3, 3, 3] + [1] * 256 + [1] * 9 + [4, 1]
    fields = {
        "model": ("add_tokenizer_model", "gpt2"),
        "pre": ("add_tokenizer_pre", "smollm"),
        "tokens": ("add_token_list", tokens),
        "token_type": ("add_token_types", types),
        "merges": ("add_token_merges", merges),
        "bos": ("add_bos_token_id", 1),
        "eos": ("add_eos_token_id", 2),
        "chat_template": ("add_chat_template", "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}"
                                               "{% endfor %}"),
    }
    writer = gguf.GGUFWriter(str(path), "llama")
    for name, (method, value) in fields.items():
        if name not in skip:
            getattr(writer, method)(overrides.get(name, value))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# --------------------------------------------------------------------------------------------
# (1) GGUF: SmolLM2 against transformers
# --------------------------------------------------------------------------------------------

@pytest.mark.model
@pytest.mark.peers
def test_smollm2_ids_match_transformers_on_corpus(smollm2, hf_smollm2, hf_smollm2_fixed):
    """Exactly transformers' vocabulary, merges, special tokens and decoder (against its tokenizer
    with SmolLM2's pre-tokenizer put back), and exactly transformers' GGUF tokenizer as it stands
    on every document where the digit split cannot matter."""
    total, divergent = 0, []
    for name, text in corpus().items():
        ours = smollm2.encode(text)
        reference = hf_smollm2_fixed.encode(text, add_special_tokens=False).ids
        assert ours == reference, f"{name}: {first_difference(ours, reference)}"
        stock = hf_smollm2.encode(text, add_special_tokens=False)
        if digit_split_matters(text):
            divergent += [name] if ours != stock else []
        else:
            assert ours == stock, f"{name}: {first_difference(ours, stock)}"
        assert smollm2.decode(ours) == text, name
        assert smollm2.decode(ours) == hf_smollm2.decode(ours), name
        total += len(ours)
    assert total >= 20_000, f"corpus has only {total} tokens"
    # The corpus does exercise the difference (indented numbers in code, " ½" ...).
    assert {"stdlib:heapq", "snippet:numbers_unicode"} <= set(divergent)


@pytest.mark.model
@pytest.mark.peers
@pytest.mark.parametrize("text, pieces", [
    ("    0", ["ĠĠĠĠ", "0"]),    # transformers: "ĠĠĠ", "Ġ", "0"
    ("\n\n1", ["ĊĊ", "1"]),    # transformers: "Ċ", "Ċ", "1"
    (" ½", ["Ġ", "Â½"]),         # transformers: "ĠÂ", "½"
    (" ٤٥", ["Ġ", "Ù", "¤", "Ù", "¥"]),  # Arabic-Indic digits, one byte per token
    (" 2024", ["Ġ", "2", "0", "2", "4"]),  # the same either way: no merge involves an ASCII digit
])
def test_smollm2_digit_split_like_llama_cpp(smollm2, hf_smollm2, text, pieces):
    """Where transformers' GGUF loader differs from SmolLM2's own tokenizer and llama.cpp: each
    numeric character is its own pre-token, so whitespace before it is not split off it."""
    ours = smollm2.encode(text)
    assert [smollm2.id_to_token(i) for i in ours] == pieces
    assert (ours == hf_smollm2.encode(text, add_special_tokens=False)) == (text == " 2024")


@pytest.mark.model
def test_smollm2_vocabulary_and_special_tokens(smollm2):
    assert smollm2.vocab_size == 49152
    assert (smollm2.bos_id, smollm2.eos_id) == (1, 2)
    assert (smollm2.bos_token, smollm2.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert smollm2.encode("<|im_start|>user<|im_end|>") == [1, smollm2.encode("user")[0], 2]
    assert smollm2.encode("hi", add_bos=True) == [1] + smollm2.encode("hi")
    ids = smollm2.encode("<|im_start|>assistant\nHello!<|im_end|>")
    assert smollm2.decode(ids, skip_special_tokens=True) == "assistant\nHello!"
    with pytest.raises(InputError, match="outside the vocabulary"):
        smollm2.decode([49152])


# --------------------------------------------------------------------------------------------
# GGUF: tiny files (no model needed)
# --------------------------------------------------------------------------------------------

@pytest.mark.peers
def test_tiny_gguf_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    path = write_gguf(tmp_path / "tiny.gguf", pre="gpt2")
    ours = Tokenizer.from_gguf(path)
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    for text in ["the an in", "<|im_start|>the<|im_end|>", "x<think>y", "café 5 €", "½ ¼ the", ""]:
        ids = ours.encode(text)
        assert ids == theirs.encode(text, add_special_tokens=False), text
        assert ours.decode(ids) == theirs.decode(ids) == text
    assert ours.vocab_size == len(theirs) == 270
    assert ours.encode("<think>") == [268]  # user-defined: matched whole ...
    assert ours.decode([1, 268], skip_special_tokens=True) == "<think>"  # ... but not special
    assert ours.encode("€") == [269]  # stored raw, re-spelled so that BPE reaches it
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    from jaxchunk.tokenizer import byte_spelling
    assert byte_spelling() == bytes_to_unicode()


def test_tiny_gguf_pre_tokenizers(tmp_path):
    """pre = "smollm" isolates numeric characters, "gpt2" does not; no pre field means "gpt2"."""
    smollm = Tokenizer.from_gguf(write_gguf(tmp_path / "smollm.gguf"))
    gpt2 = Tokenizer.from_gguf(write_gguf(tmp_path / "gpt2.gguf", pre="gpt2"))
    default = Tokenizer.from_gguf(write_gguf(tmp_path / "default.gguf", skip=("pre",)))
    ids = {name: tok.backend.token_to_id for name, tok in (("smollm", smollm), ("gpt2", gpt2))}
    assert smollm.encode(" ½") == [ids["smollm"]("Ġ"), ids["smollm"]("Â½")]
    assert gpt2.encode(" ½") == [ids["gpt2"]("ĠÂ"), ids["gpt2"]("½")] == default.encode(" ½")


@pytest.mark.peers
def test_tiny_gguf_llama3_pre_tokenizer_matches_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    path = write_gguf(tmp_path / "llama3.gguf", pre="llama-bpe")
    ours = Tokenizer.from_gguf(path).backend.pre_tokenizer
    theirs = transformers.AutoTokenizer.from_pretrained(
        str(tmp_path), gguf_file=path.name).backend_tokenizer.pre_tokenizer
    for text in SNIPPETS.values():
        assert ours.pre_tokenize_str(text) == theirs.pre_tokenize_str(text)


def test_gguf_chat_template_and_reader_reuse(tmp_path):
    import gguf

    path = write_gguf(tmp_path / "tiny.gguf")
    tok = Tokenizer.from_gguf(path, reader=gguf.GGUFReader(path))
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "[user]hi"
    assert load_tokenizer(path).encode("the") == tok.encode("the")
    assert load_tokenizer(tmp_path).encode("the") == tok.encode("the")  # the only .gguf in the dir


# --------------------------------------------------------------------------------------------
# (2) tokenizer.json
# --------------------------------------------------------------------------------------------

@pytest.mark.peers
def test_hf_json_matches_tokenizers_and_transformers(hf_json_dir):
    import tokenizers

    transformers = pytest.importorskip("transformers")
    path = hf_json_dir / "tokenizer.json"
    ours = Tokenizer.from_hf_json(path)
    reference = tokenizers.Tokenizer.from_file(str(path))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path))
    texts = [TRAIN_TEXT[:3000], *SNIPPETS.values(), "<s>x</s><|user|>y"]
    for text in texts:
        ids = ours.encode(text)
        assert ids == reference.encode(text, add_special_tokens=False).ids
        assert ids == fast.encode(text, add_special_tokens=False)
        assert ours.decode(ids) == text
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    auto = transformers.AutoTokenizer.from_pretrained(str(hf_json_dir))
    assert ours.apply_chat_template(chat) == auto.apply_chat_template(
        chat, tokenize=False, add_generation_prompt=True)
    # encode() adds no BOS by itself, even though the post-processor would.
    assert reference.encode("the").ids[0] == 0 and ours.encode("the")[0] != 0
    assert ours.encode("the", add_bos=True) == [0] + ours.encode("the")


def test_hf_json_config(hf_json_dir, tmp_path):
    tok = load_tokenizer(hf_json_dir)
    assert (tok.bos_id, tok.eos_id) == (0, 1)
    assert (tok.bos_token, tok.eos_token) == ("<s>", "</s>")
    chat = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    assert tok.apply_chat_template(chat) == "<|user|>a</s><|user|>b</s><|user|>"
    assert tok.apply_chat_template(chat, add_generation_prompt=False) == "<|user|>a</s><|user|>b</s>"

    # An explicit config (dict) wins; without any config there is no BOS/EOS/template.
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "tokenizer.json").write_bytes((hf_json_dir / "tokenizer.json").read_bytes())
    tok = Tokenizer.from_hf_json(bare / "tokenizer.json")
    assert (tok.bos_id, tok.eos_id, tok.chat_template) == (None, None, None)
    with pytest.raises(TokenizerError, match="no BOS"):
        tok.encode("x", add_bos=True)
    tok = Tokenizer.from_hf_json(bare / "tokenizer.json", tokenizer_config={"eos_token": "<|user|>"})
    assert tok.eos_id == 2

    # transformers >= 4.5x saves the template as chat_template.jinja.
    (bare / "chat_template.jinja").write_text("{{ messages[0]['content'] }}!")
    assert load_tokenizer(bare).apply_chat_template(chat) == "a!"


# --------------------------------------------------------------------------------------------
# (3) SentencePiece
# --------------------------------------------------------------------------------------------

def test_sentencepiece_matches_processor(sp_model):
    import sentencepiece

    tok = Tokenizer.from_sentencepiece(sp_model)
    reference = sentencepiece.SentencePieceProcessor(model_file=str(sp_model))
    assert (tok.bos_id, tok.eos_id) == (reference.bos_id(), reference.eos_id()) == (1, 2)
    assert tok.vocab_size == 200
    zen = _zen_of_python().splitlines()
    for text in TRAIN_TEXT.splitlines()[:300] + [SNIPPETS["multilingual"], SNIPPETS["emoji"]]:
        assert tok.encode(text) == reference.encode(text)
        assert tok.decode(tok.encode(text)) == reference.decode(reference.encode(text))
    for text in zen:  # round trip: every character is in the vocabulary, no extra whitespace
        assert tok.decode(tok.encode(text)) == text
    ids = tok.encode("Beautiful is better", add_bos=True)
    assert ids[0] == 1
    assert tok.decode(ids + [2]) == "<s>Beautiful is better</s>"
    assert tok.decode(ids + [2], skip_special_tokens=True) == "Beautiful is better"
    assert load_tokenizer(sp_model).encode("ugly") == tok.encode("ugly")


def test_sentencepiece_byte_fallback_round_trip(sp_byte_model):
    tok = Tokenizer.from_sentencepiece(sp_byte_model)
    for text in (SNIPPETS["emoji"], SNIPPETS["multilingual"], "Simple is better than complex."):
        assert tok.decode(tok.encode(text)) == text


# --------------------------------------------------------------------------------------------
# (4) Chat template: SmolLM2's, against transformers
# --------------------------------------------------------------------------------------------

CONVERSATION = [
    {"role": "system", "content": "You are a terse assistant. Answer in one line."},
    {"role": "user", "content": "What is chunked prefill?"},
    {"role": "assistant", "content": "Processing a long prompt in fixed-size pieces."},
    {"role": "user", "content": "Why? 🤔 (réponse en français, s'il vous plaît)"},
]


@pytest.mark.model
@pytest.mark.peers
@pytest.mark.parametrize("messages", [CONVERSATION, CONVERSATION[1:]], ids=["system", "default_system"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_smollm2_chat_template_matches_transformers(smollm2, hf_smollm2, messages, add_generation_prompt):
    ours = smollm2.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    theirs = hf_smollm2.apply_chat_template(messages, tokenize=False,
                                            add_generation_prompt=add_generation_prompt)
    assert ours == theirs
    assert ours.startswith("<|im_start|>system\n")
    if messages[0]["role"] != "system":  # SmolLM2's template injects its default system prompt
        assert "You are a helpful AI assistant named SmolLM" in ours
    assert ours.endswith("<|im_start|>assistant\n") == add_generation_prompt
    ids = hf_smollm2.apply_chat_template(messages, tokenize=True, return_dict=False,
                                         add_generation_prompt=add_generation_prompt)
    assert smollm2.encode(ours) == list(ids)


def test_chat_template_errors(tmp_path):
    template = ("{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}"
                "{% endif %}{% for m in messages %}{{ m['content'] | tojson }}{% endfor %}")
    tok = Tokenizer.from_gguf(write_gguf(tmp_path / "t.gguf", chat_template=template))
    assert tok.apply_chat_template([{"role": "user", "content": "é\"<"}]) == '"é\\"<"'  # no HTML escaping
    with pytest.raises(InputError, match="first must be user"):
        tok.apply_chat_template([{"role": "system", "content": "x"}])
    with pytest.raises(InputError, match="empty"):
        tok.apply_chat_template([])
    # Templates cannot reach Python internals (sandbox).
    sneaky = Tokenizer.from_gguf(write_gguf(tmp_path / "s.gguf", chat_template="{{ ''.__class__.__mro__ }}"))
    with pytest.raises(InputError):
        sneaky.apply_chat_template([{"role": "user", "content": "x"}])
    broken = Tokenizer.from_gguf(write_gguf(tmp_path / "b.gguf", chat_template="{% for %}"))
    with pytest.raises(TokenizerError, match="does not compile"):
        broken.apply_chat_template([{"role": "user", "content": "x"}])
    none = Tokenizer.from_gguf(write_gguf(tmp_path / "n.gguf", skip=("chat_template",)))
    with pytest.raises(TokenizerError, match="no chat template"):
        none.apply_chat_template([{"role": "user", "content": "x"}])


# --------------------------------------------------------------------------------------------
# (5) Streaming decode
# --------------------------------------------------------------------------------------------

STREAM_TEXTS = [
    SNIPPETS["emoji"],
    SNIPPETS["multilingual"],
    "漢字かな交じり文 👨‍👩‍👧‍👦 and <|im_start|>special<|im_end|> ok</s>",
    " leading space, then ▁ and \ufffd (a real replacement character) mid-text",
]


def check_stream(tok: Tokenizer, ids: list[int], skip_special_tokens: bool = False) -> list[str]:
    """Stream `ids`; check the pieces join to decode(ids) and carry no U+FFFD unless decode does."""
    pieces = list(tok.decode_stream(ids, skip_special_tokens=skip_special_tokens))
    full = tok.decode(ids, skip_special_tokens=skip_special_tokens)
    assert "".join(pieces) == full
    assert all(pieces)
    if "\ufffd" not in full:
        assert not any("\ufffd" in piece for piece in pieces)
    return pieces


@pytest.fixture(params=[pytest.param("gguf-smollm2", marks=pytest.mark.model), "hf-json", "sentencepiece"])
def any_tokenizer(request) -> Tokenizer:
    """Each backend in turn (fixtures are looked up lazily, so deselecting `model` skips the GGUF)."""
    if request.param == "gguf-smollm2":
        return request.getfixturevalue("smollm2")
    if request.param == "hf-json":
        return Tokenizer.from_hf_json(request.getfixturevalue("hf_json_dir") / "tokenizer.json")
    return Tokenizer.from_sentencepiece(request.getfixturevalue("sp_byte_model"))


@pytest.mark.parametrize("skip_special_tokens", [False, True])
def test_stream_pieces_join_to_decode(any_tokenizer, skip_special_tokens):
    tok = any_tokenizer
    split_chars = 0
    for text in STREAM_TEXTS:
        ids = tok.encode(text)
        check_stream(tok, ids, skip_special_tokens)
        # The texts do exercise the hold-back: some tokens are a fragment of a character.
        split_chars += sum("\ufffd" in tok.decode([i]) for i in ids)
    assert split_chars > 0


def test_stream_incomplete_and_invalid_bytes(any_tokenizer):
    tok = any_tokenizer
    ids = tok.encode("ok 👨‍👩‍👧 end")
    fragment = next(i for i in ids if "\ufffd" in tok.decode([i]))  # part of an emoji
    # Cut mid-character: decode ends in U+FFFD, and so does the stream (via flush).
    cut = ids[:ids.index(fragment) + 1]
    assert tok.decode(cut).endswith("\ufffd")
    check_stream(tok, cut)
    # A stray fragment in the middle of text decodes to U+FFFD there; the stream agrees.
    check_stream(tok, tok.encode("abc") + [fragment] + tok.encode("def"))


@pytest.mark.parametrize("skip_special_tokens", [False, True])
def test_stream_random_ids(any_tokenizer, skip_special_tokens):
    """Arbitrary id sequences (stray byte fragments, special tokens anywhere) still stream to
    exactly decode(ids)."""
    import random

    rng = random.Random(0)
    for _ in range(20):
        ids = [rng.randrange(any_tokenizer.vocab_size) for _ in range(rng.randrange(1, 60))]
        check_stream(any_tokenizer, ids, skip_special_tokens)


def test_incremental_decoder_push_flush(any_tokenizer):
    tok = any_tokenizer
    text = "Café ☕ 中文 🇯🇵!"
    decoder = tok.incremental_decoder()
    pieces = [decoder.push(i) for i in tok.encode(text)]
    assert "".join(pieces) + decoder.flush() == text
    assert "" in pieces  # something was held back at least once
    assert decoder.flush() == ""
    assert "".join(decoder.push(i) for i in tok.encode("again")) + decoder.flush() == "again"
    with pytest.raises(InputError, match="outside the vocabulary"):
        decoder.push(tok.vocab_size)
    assert decoder.push(tok.encode("!")[-1]) + decoder.flush() == "!"  # still usable


# --------------------------------------------------------------------------------------------
# (6) Errors
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("field, key", [
    ("model", "tokenizer.ggml.model"),
    ("tokens", "tokenizer.ggml.tokens"),
    ("merges", "tokenizer.ggml.merges"),
])
def test_gguf_missing_field(tmp_path, field, key):
    path = write_gguf(tmp_path / "t.gguf", skip=(field,))
    with pytest.raises(TokenizerError, match=key) as info:
        Tokenizer.from_gguf(path)
    assert str(path) in str(info.value) and "missing" in str(info.value)


@pytest.mark.parametrize("overrides, match", [
    ({"model": "llama"}, "tokenizer.ggml.model = 'llama' needs tokenizer.ggml.scores"),  # SentencePiece-style
    ({"model": "bert"}, "tokenizer.ggml.model = 'bert' is not supported"),
    ({"pre": "qwen2"}, "tokenizer.ggml.pre = 'qwen2' is not supported"),
    ({"merges": ["Ġ t", "nonsense"]}, "tokenizer.ggml.merges entry 'nonsense'"),
    ({"merges": ["Ġ zz"]}, "tokenizer.ggml.merges do not fit"),
    ({"token_type": [1, 1]}, "token_type has 2 entries"),
    ({"tokens": list(range(270))}, r"'tokenizer.ggml.tokens' is not a list\[str\]"),
    ({"token_type": ["control"] * 270}, r"'tokenizer.ggml.token_type' is not a list\[int\]"),
    ({"bos": 100_000}, "BOS id 100000 is outside the vocabulary"),
])
def test_gguf_bad_fields(tmp_path, overrides, match):
    path = write_gguf(tmp_path / "t.gguf", **overrides)
    with pytest.raises(TokenizerError, match=match) as info:
        Tokenizer.from_gguf(path)
    assert str(path) in str(info.value)


def test_unreadable_files(tmp_path):
    missing = tmp_path / "nope.gguf"
    for load in (Tokenizer.from_gguf, Tokenizer.from_hf_json, Tokenizer.from_sentencepiece, load_tokenizer):
        with pytest.raises(TokenizerError, match="no such file"):
            load(missing)
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"GGUF\x03\x00\x00\x00 truncated")
    with pytest.raises(TokenizerError, match="not a readable GGUF"):
        load_tokenizer(garbage)
    bad_json = tmp_path / "tokenizer.json"
    bad_json.write_text("{not json")
    with pytest.raises(TokenizerError, match="not a readable tokenizer.json"):
        load_tokenizer(bad_json)
    bad_sp = tmp_path / "tokenizer.model"
    bad_sp.write_bytes(b"\x00\x01 not a model")
    with pytest.raises(TokenizerError, match="not a readable SentencePiece"):
        Tokenizer.from_sentencepiece(bad_sp)
    other = tmp_path / "weights.bin"
    other.write_bytes(b"\x00" * 16)
    with pytest.raises(TokenizerError, match="unknown tokenizer file type"):
        load_tokenizer(other)
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(TokenizerError, match="no tokenizer found"):
        load_tokenizer(empty)
    with pytest.raises(InputError):
        Tokenizer.from_gguf(write_gguf(tmp_path / "t.gguf")).encode(b"bytes")  # type: ignore[arg-type]
