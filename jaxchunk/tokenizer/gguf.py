"""The tokenizer of a GGUF file: `tokenizer.ggml.*` metadata rebuilt as a Hugging Face `tokenizers`
BPE (the BPE itself is the `tokenizers` library's, never hand-written here). The metadata is read
with the weight loader's reader (`jaxchunk.weights.gguf.open_gguf` / `gguf_field`), its errors
reported as TokenizerError. Two kinds of vocabulary (`tokenizer.ggml.model`):

* "gpt2": byte-level BPE with merges (SmolLM2, Llama 3); see the pre-tokenization notes below.
* "llama": SentencePiece-style (Gemma 3): tokens with scores, no merges, byte fallback
  (`<0xXX>` tokens). llama.cpp's SPM tokenizer repeatedly merges the adjacent pair whose
  concatenation is a token of highest score (leftmost first on ties); that is BPE whose merges are
  every (left, right) split of every token, ranked by the token's score, which `tokenizers` runs
  (`spm_merges`). As in llama.cpp, user-defined tokens (Gemma: newline runs, space runs, HTML tags)
  and control tokens are matched whole in the raw text first; the rest has each space written
  "▁" (no space prefix unless `tokenizer.ggml.add_space_prefix`) and goes through the BPE.

Pre-tokenization of GGUF files, and how it differs from transformers
--------------------------------------------------------------------
A GGUF names its pre-tokenizer (how text is cut into words before BPE) in `tokenizer.ggml.pre`.
We follow llama.cpp. For "smollm" (SmolLM/SmolLM2; also "starcoder" and a few others) llama.cpp
first isolates every numeric character (\\p{N}) and then applies GPT-2's regex. That is exactly
SmolLM2's own tokenizer.json, `Sequence([Digits(individual_digits=True), ByteLevel()])`, i.e. what
the model was trained with.

transformers' GGUF loader (5.x) does not know "smollm" and keeps plain GPT-2 `ByteLevel()`, so
its ids differ from SmolLM2's (and ours, and llama.cpp's) around numbers:
* 2+ whitespace characters before a digit: "    0" is "ĠĠĠĠ","0" here, but transformers' GPT-2
  regex hands the last space to the number: "ĠĠĠ","Ġ","0" (common in indented code and tables);
* a space before a non-ASCII numeric character: " ½" is "Ġ","Â½" here, "ĠÂ","½" there.
Everything else (vocabulary, merges, special tokens, decoding) is identical; tests/test_tokenizer.py
checks both on a corpus of ~50k tokens.
"""
from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

from jaxchunk.errors import ModelFileError, TokenizerError, UnsupportedError
from jaxchunk.tokenizer.hf import PathLike, check_file
from jaxchunk.weights.gguf import gguf_field, open_gguf

# llama.cpp's token types (tokenizer.ggml.token_type).
_CONTROL, _USER_DEFINED = 3, 4

# tokenizer.ggml.pre -> which llama.cpp pre-tokenizer regexes it uses, as `tokenizers` pieces.
# llama.cpp (src/llama-vocab.cpp) gives these names GPT-2's regex ...
_PRE_GPT2 = frozenset({"default", "gpt2", "mpt", "olmo", "jais"})
# ... and these GPT-2's regex after isolating each numeric character ("\p{N}").
_PRE_DIGITS_GPT2 = frozenset({"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone"})
# Llama 3's regex (the Split in Meta's tokenizer.json; numbers in groups of up to 3 digits).
_PRE_LLAMA3 = frozenset({"llama-bpe", "llama3", "llama-v3"})
_LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def gguf_pre_tokenizer(pre: str, path: Path):
    """The `tokenizers` pre-tokenizer doing what llama.cpp does for `tokenizer.ggml.pre`."""
    from tokenizers import Regex, pre_tokenizers

    gpt2 = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _PRE_GPT2:
        return gpt2
    if pre in _PRE_DIGITS_GPT2:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), gpt2])
    if pre in _PRE_LLAMA3:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3_REGEX), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    known = ", ".join(sorted(_PRE_GPT2 | _PRE_DIGITS_GPT2 | _PRE_LLAMA3))
    raise TokenizerError(f"{path}: tokenizer.ggml.pre = {pre!r} is not supported (supported: {known})")


@functools.lru_cache(maxsize=1)
def byte_spelling() -> dict[int, str]:
    """GPT-2's byte -> printable character table: how byte-level vocabularies spell bytes
    (space is "Ġ", newline "Ċ"). Printable Latin-1 bytes stand for themselves, the other 68
    bytes get the characters from U+0100 on."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    spelling = {b: chr(b) for b in keep}
    others = (b for b in range(256) if b not in spelling)
    spelling.update({b: chr(256 + n) for n, b in enumerate(others)})
    return spelling


def _field(reader, path: Path, key: str, kind: type, default: Any = ...) -> Any:
    """`gguf_field`, its ModelFileError (missing key, wrong type) as a TokenizerError."""
    try:
        return gguf_field(reader, path, key, kind, default)
    except ModelFileError as e:
        raise TokenizerError(str(e)) from None


def _open(path: Path):
    check_file(path)
    try:
        return open_gguf(path)
    except (ModelFileError, UnsupportedError) as e:
        reason = str(e).removeprefix(f"{path}: ")
        raise TokenizerError(f"{path}: not a readable GGUF file: {reason}") from e


def gguf_add_bos(reader, path: PathLike = "<gguf>") -> bool:
    """Whether a GGUF (open, as for `tokenizer_from_gguf`) asks for a BOS token before a text
    prompt: `tokenizer.ggml.add_bos_token`, False when absent."""
    return _field(reader, Path(path), "tokenizer.ggml.add_bos_token", bool, False)


def _respell(tokens: list[str], spelling: dict[int, str]) -> list[str]:
    """`tokens` with every entry spelled outside the byte alphabet re-spelled in it (its UTF-8
    bytes' characters). Found with one regex scan over all tokens (49k set tests take ~0.1 s)."""
    outside = re.compile("[^" + re.escape("".join(spelling.values())) + "\n]")
    joined = "\n".join(tokens)  # a newline is spelled "Ċ" in the alphabet: it only separates here
    if not outside.search(joined):
        return tokens
    starts = [0]
    for token in tokens:
        starts.append(starts[-1] + len(token) + 1)
    import bisect
    bad = {bisect.bisect_right(starts, m.start()) - 1 for m in outside.finditer(joined)}
    return [("".join(spelling[b] for b in token.encode("utf-8")) if i in bad else token)
            for i, token in enumerate(tokens)]


def read_gguf_vocabulary(path: Path, reader=None) -> tuple:
    """(tokenizers.Tokenizer, path, bos_id, eos_id, chat_template): the byte-level BPE described by
    `tokenizer.ggml.*` (see the module docstring), as the arguments of `HFTokenizer`
    (`Tokenizer.from_gguf` builds it). `reader`: the file already open (`open_gguf`, or a
    `gguf.GGUFReader`); else it is opened here."""
    import tokenizers
    from tokenizers import AddedToken, decoders, models

    path = Path(path)
    if reader is None:
        reader = _open(path)
    model = _field(reader, path, "tokenizer.ggml.model", str)
    if model == "llama":
        return read_spm_vocabulary(path, reader)
    if model != "gpt2":
        raise TokenizerError(f"{path}: tokenizer.ggml.model = {model!r} is not supported "
                             f"(supported: 'gpt2', byte-level BPE; 'llama', SentencePiece-style)")
    tokens = _field(reader, path, "tokenizer.ggml.tokens", list[str])
    merges = _field(reader, path, "tokenizer.ggml.merges", list[str])
    token_types = _field(reader, path, "tokenizer.ggml.token_type", list[int], None)
    pre = _field(reader, path, "tokenizer.ggml.pre", str, None) or "default"
    if token_types is not None and len(token_types) != len(tokens):
        raise TokenizerError(f"{path}: tokenizer.ggml.token_type has {len(token_types)} entries "
                             f"but tokenizer.ggml.tokens has {len(tokens)}")

    # Vocabulary entries are spelled in the byte alphabet; some converters store a few tokens
    # as raw text instead, so re-spell those (as transformers does) or BPE could never reach them.
    spelling = byte_spelling()
    alphabet = set(spelling.values())
    spelled = _respell(tokens, spelling)
    vocab = dict(zip(spelled, range(len(spelled))))
    if len(vocab) != len(tokens):
        raise TokenizerError(f"{path}: tokenizer.ggml.tokens has duplicate entries")
    pairs = [tuple(merge.split(" ")) for merge in merges]
    bad = next((m for m, p in zip(merges, pairs) if len(p) != 2), None)
    if bad is not None:
        raise TokenizerError(f"{path}: tokenizer.ggml.merges entry {bad!r} is not 'left right'")

    try:
        backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
    except Exception as e:  # a merge naming a token that is not in the vocabulary
        raise TokenizerError(f"{path}: tokenizer.ggml.merges do not fit tokenizer.ggml.tokens: {e}") from e
    backend.pre_tokenizer = gguf_pre_tokenizer(pre, path)
    backend.decoder = decoders.ByteLevel()

    # Control tokens (<|im_start|>, ...) are matched whole in text and can be skipped when
    # decoding; user-defined ones are matched whole but are ordinary text. A "control" token
    # spelled outside the byte alphabet is a converter mislabel (transformers skips it too).
    types = token_types or []
    backend.add_special_tokens([
        AddedToken(token, normalized=False, special=True)
        for token, kind in zip(tokens, types) if kind == _CONTROL and set(token) <= alphabet])
    backend.add_tokens([
        AddedToken(token, normalized=False, special=False)
        for token, kind in zip(tokens, types) if kind == _USER_DEFINED and token in vocab])

    return (backend, path, _field(reader, path, "tokenizer.ggml.bos_token_id", int, None),
            _field(reader, path, "tokenizer.ggml.eos_token_id", int, None),
            _field(reader, path, "tokenizer.chat_template", str, None))


# ----------------------------------------------------------------------------- SentencePiece-style
_BYTE = 6  # llama.cpp's token type of the <0xXX> byte-fallback tokens
SPACE = "\u2581"  # how SentencePiece vocabularies spell a space

# The end-of-turn token of chat vocabularies that do not name one in tokenizer.ggml.eot_token_id
# (llama.cpp looks these up by text too).
END_OF_TURN_TOKENS = ("<end_of_turn>",)


def spm_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """BPE merges equivalent to SentencePiece-style score merging over `tokens`: every split of a
    token into two tokens, ranked by the merged token's score, highest first (ties: lower token
    id first, then the shorter left piece)."""
    import numpy as np

    vocab = frozenset(tokens)
    order = np.lexsort((np.arange(len(tokens)), -np.asarray(scores, np.float64)))  # by -score, then id
    merges = []
    for token in (tokens[i] for i in order.tolist()):
        merges.extend((token[:cut], token[cut:]) for cut in range(1, len(token))
                      if token[:cut] in vocab and token[cut:] in vocab)
    return merges


def read_spm_vocabulary(path: Path, reader) -> tuple:
    """`read_gguf_vocabulary` for tokenizer.ggml.model = "llama" (see the module docstring)."""
    import tokenizers
    from tokenizers import AddedToken, decoders, models, normalizers

    tokens = _field(reader, path, "tokenizer.ggml.tokens", list[str])
    field = reader.get_field("tokenizer.ggml.scores")
    if field is None:
        raise TokenizerError(f"{path}: tokenizer.ggml.model = 'llama' needs tokenizer.ggml.scores")
    scores = [float(x) for x in field.contents()]
    token_types = _field(reader, path, "tokenizer.ggml.token_type", list[int], None) or [1] * len(tokens)
    if not len(scores) == len(token_types) == len(tokens):
        raise TokenizerError(f"{path}: tokenizer.ggml.tokens / scores / token_type have different "
                             f"lengths ({len(tokens)}, {len(scores)}, {len(token_types)})")
    vocab = dict(zip(tokens, range(len(tokens))))
    if len(vocab) != len(tokens):
        raise TokenizerError(f"{path}: tokenizer.ggml.tokens has duplicate entries")
    if any(f"<0x{b:02X}>" not in vocab for b in range(256)):
        raise TokenizerError(f"{path}: a SentencePiece-style vocabulary needs the 256 byte tokens <0x00>..<0xFF>")
    unk_id = _field(reader, path, "tokenizer.ggml.unknown_token_id", int, None)

    backend = tokenizers.Tokenizer(models.BPE(
        vocab=vocab, merges=spm_merges(tokens, scores), byte_fallback=True, fuse_unk=True,
        unk_token=None if unk_id is None else tokens[unk_id]))
    steps = [normalizers.Replace(" ", SPACE)]
    if _field(reader, path, "tokenizer.ggml.add_space_prefix", bool, False):
        steps.insert(0, normalizers.Prepend(SPACE))
    backend.normalizer = normalizers.Sequence(steps)
    backend.pre_tokenizer = None
    backend.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    # Matched whole in the raw text, before the space escaping (llama.cpp's tokenizer_st_partition):
    # control tokens as special (skippable when decoding), user-defined ones as text.
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True)
                                for t, kind in zip(tokens, token_types) if kind == _CONTROL])
    backend.add_tokens([AddedToken(t, normalized=False, special=False)
                        for t, kind in zip(tokens, token_types) if kind == _USER_DEFINED])

    eot = _field(reader, path, "tokenizer.ggml.eot_token_id", int, None)
    if eot is None:
        eot = next((vocab[t] for t in END_OF_TURN_TOKENS if t in vocab), None)
    template = _field(reader, path, "tokenizer.chat_template", str, None)
    if template is None and "<start_of_turn>" in vocab and "<end_of_turn>" in vocab:
        from jaxchunk.tokenizer.chat_template import GEMMA_CHAT_TEMPLATE
        template = GEMMA_CHAT_TEMPLATE  # a base model's file names none; its turn tokens say which
    return (backend, path, _field(reader, path, "tokenizer.ggml.bos_token_id", int, None),
            _field(reader, path, "tokenizer.ggml.eos_token_id", int, None), template, eot)
