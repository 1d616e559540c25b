"""Text <-> token ids: one interface (`Tokenizer`) over three kinds of tokenizer file.

* GGUF (llama.cpp): the vocabulary, merges and special tokens live in the file's metadata
  (`tokenizer.ggml.*`). `Tokenizer.from_gguf` rebuilds them as a Hugging Face `tokenizers`
  byte-level BPE (the BPE itself is the `tokenizers` library's, never hand-written here).
* Hugging Face `tokenizer.json` (+ `tokenizer_config.json` beside it for the chat template and
  BOS/EOS): `Tokenizer.from_hf_json`.
* SentencePiece `.model`: `Tokenizer.from_sentencepiece`, through the `sentencepiece` package.

`load_tokenizer(path)` picks the right one from a file or a model directory.

Every backend shares: `encode(text, add_bos=False)`, `decode(ids, skip_special_tokens=False)`,
`bos_id`, `eos_id`, `vocab_size`, `chat_template`, `apply_chat_template(messages)` (rendered the
way transformers renders it) and streaming decoding (`IncrementalDecoder`, `decode_stream`).

`encode` never adds anything on its own: no BOS unless `add_bos=True` (whatever a tokenizer.json's
post-processor would do), and special tokens written in the text ("<|im_start|>") become their
single ids in the `tokenizers`-based backends.

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

import abc
import functools
import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence, Union

from jaxchunk.errors import InputError, TokenizerError

PathLike = Union[str, os.PathLike]
Message = Mapping[str, Any]

__all__ = [
    "Tokenizer", "HFTokenizer", "SentencePieceTokenizer", "IncrementalDecoder", "load_tokenizer",
]


# --------------------------------------------------------------------------------------------
# The interface
# --------------------------------------------------------------------------------------------

class Tokenizer(abc.ABC):
    """Text <-> token ids, plus chat templating and streaming decode.

    Build one with `Tokenizer.from_gguf`, `Tokenizer.from_hf_json`, `Tokenizer.from_sentencepiece`
    or `load_tokenizer`. A backend (subclass) implements `vocab_size`, `id_to_token`, `_encode`
    and `_decode`; everything else is shared.

    Attributes:
        source: the file this tokenizer was read from (for messages).
        bos_id, eos_id: begin/end-of-sequence token ids, or None if the files do not say.
        chat_template: the Jinja chat template, or None.
    """

    def __init__(self, source: PathLike, bos_id: Optional[int], eos_id: Optional[int],
                 chat_template: Optional[str]):
        self.source = str(source)
        self.chat_template = chat_template
        for name, token_id in (("BOS", bos_id), ("EOS", eos_id)):
            if token_id is not None and not 0 <= token_id < self.vocab_size:
                raise TokenizerError(f"{self.source}: {name} id {token_id} is outside the "
                                     f"vocabulary (size {self.vocab_size})")
        self.bos_id = bos_id
        self.eos_id = eos_id

    # ---- what each backend provides -------------------------------------------------------

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of token ids, added/special tokens included (ids are 0 .. vocab_size - 1)."""

    @abc.abstractmethod
    def _encode(self, text: str) -> list[int]:
        """Token ids of `text`, nothing added. Use `encode`."""

    @abc.abstractmethod
    def _decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        """Text of `ids` (already validated as in range). Use `decode`."""

    @abc.abstractmethod
    def id_to_token(self, token_id: int) -> str:
        """The vocabulary entry (as spelled in the vocabulary) of one id."""

    # ---- shared API ----------------------------------------------------------------------

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of `text`; with `add_bos`, prefixed by `bos_id`."""
        if not isinstance(text, str):
            raise InputError(f"encode() takes a str, got {type(text).__name__}")
        ids = self._encode(text)
        if add_bos:
            if self.bos_id is None:
                raise TokenizerError(f"{self.source}: add_bos=True but this tokenizer has no BOS token")
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids` (any iterable of ints: list, NumPy / JAX array). Special tokens appear as
        their text ("<|im_end|>") unless `skip_special_tokens`."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise InputError(f"decode(): token id {bad[0]} is outside the vocabulary of "
                             f"{self.source} (size {self.vocab_size})")
        return self._decode(ids, skip_special_tokens)

    @property
    def bos_token(self) -> Optional[str]:
        """Text of the BOS token, or None."""
        return None if self.bos_id is None else self.id_to_token(self.bos_id)

    @property
    def eos_token(self) -> Optional[str]:
        """Text of the EOS token, or None."""
        return None if self.eos_id is None else self.id_to_token(self.eos_id)

    def apply_chat_template(self, messages: Sequence[Message], add_generation_prompt: bool = True,
                            **variables: Any) -> str:
        """Render `messages` ([{"role": ..., "content": ...}, ...]) with `chat_template`, as
        transformers' `apply_chat_template(messages, tokenize=False)` does: same sandboxed Jinja
        environment, and the template sees `messages`, `add_generation_prompt`, `tools=None`,
        `documents=None`, `bos_token`, `eos_token` and any extra `variables`.

        Raises TokenizerError if there is no template or it does not compile, InputError if the
        template rejects the conversation (its `raise_exception(...)`) or it is empty.
        """
        import jinja2

        if self.chat_template is None:
            raise TokenizerError(f"{self.source}: no chat template in this tokenizer's files")
        if not messages:
            raise InputError("apply_chat_template(): the conversation is empty")
        if not all(isinstance(m, Mapping) for m in messages):
            raise InputError("apply_chat_template(): each message must be a dict "
                             "like {'role': 'user', 'content': '...'}")
        try:
            template = _compile_chat_template(self.chat_template)
        except jinja2.TemplateError as e:
            raise TokenizerError(f"{self.source}: chat template does not compile: {e}") from e
        special = {"bos_token": self.bos_token, "eos_token": self.eos_token}
        context = {name: text for name, text in special.items() if text is not None}
        context.update({"tools": None, "documents": None})
        context.update(variables)  # callers may override any of the above
        # Like transformers: keys whose value is None are dropped (templates test for presence).
        plain = [{k: v for k, v in m.items() if v is not None} for m in messages]
        try:
            return template.render(messages=plain, add_generation_prompt=add_generation_prompt,
                                   **context)
        except jinja2.TemplateError as e:  # raise_exception(), undefined fields, sandbox violations
            raise InputError(f"chat template of {self.source} rejected the conversation: {e}") from e

    def incremental_decoder(self, skip_special_tokens: bool = False) -> "IncrementalDecoder":
        """A fresh `IncrementalDecoder` over this tokenizer."""
        return IncrementalDecoder(self, skip_special_tokens)

    def decode_stream(self, ids: Iterable[int], skip_special_tokens: bool = False) -> Iterator[str]:
        """Yield the text of `ids` piece by piece as they arrive (e.g. from a generator of sampled
        tokens). Each piece is complete UTF-8 text; together they equal `decode(ids)`."""
        decoder = self.incremental_decoder(skip_special_tokens)
        for token_id in ids:
            piece = decoder.push(token_id)
            if piece:
                yield piece
        tail = decoder.flush()
        if tail:
            yield tail

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({self.source!r}, vocab_size={self.vocab_size}, "
                f"bos_id={self.bos_id}, eos_id={self.eos_id})")

    # ---- constructors --------------------------------------------------------------------

    @classmethod
    def from_gguf(cls, path: PathLike, reader: Any = None) -> "HFTokenizer":
        """The tokenizer stored in a GGUF file's `tokenizer.*` metadata. Pass an open
        `gguf.GGUFReader` as `reader` to avoid parsing the file a second time."""
        return _tokenizer_from_gguf(Path(path), reader)

    @classmethod
    def from_hf_json(cls, path: PathLike,
                     tokenizer_config: Union[PathLike, Mapping[str, Any], None] = None) -> "HFTokenizer":
        """A Hugging Face `tokenizer.json`. BOS/EOS and the chat template come from
        `tokenizer_config` (a dict or the path of a tokenizer_config.json), by default the
        tokenizer_config.json beside `path`; a chat_template.jinja beside it also counts."""
        import tokenizers

        path = Path(path)
        _check_file(path)
        try:
            backend = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON / unknown types
            raise TokenizerError(f"{path}: not a readable tokenizer.json: {e}") from e
        config = _hf_config(path, tokenizer_config)

        def token_id(field: str) -> Optional[int]:
            token = _config_token(config, field)
            if token is None:
                return None
            token_id = backend.token_to_id(token)
            if token_id is None:
                raise TokenizerError(f"{path}: {field} {token!r} from tokenizer_config is not in "
                                     f"the vocabulary")
            return token_id

        return HFTokenizer(backend, path, token_id("bos_token"), token_id("eos_token"),
                           _hf_chat_template(path, config))

    @classmethod
    def from_sentencepiece(cls, path: PathLike) -> "SentencePieceTokenizer":
        """A SentencePiece `.model` file. BOS/EOS come from the model; the chat template from a
        tokenizer_config.json / chat_template.jinja beside it, if any."""
        import sentencepiece

        path = Path(path)
        _check_file(path)
        try:
            processor = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except Exception as e:  # OSError / RuntimeError with sentencepiece's own message
            raise TokenizerError(f"{path}: not a readable SentencePiece model: {e}") from e
        config = _hf_config(path, None)
        return SentencePieceTokenizer(processor, path, chat_template=_hf_chat_template(path, config))


# --------------------------------------------------------------------------------------------
# Backends
# --------------------------------------------------------------------------------------------

class HFTokenizer(Tokenizer):
    """Backend over a Hugging Face `tokenizers.Tokenizer` (used for GGUF and tokenizer.json)."""

    def __init__(self, backend, source: PathLike, bos_id: Optional[int], eos_id: Optional[int],
                 chat_template: Optional[str]):
        self.backend = backend
        super().__init__(source, bos_id, eos_id, chat_template)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def _encode(self, text: str) -> list[int]:
        # add_special_tokens=False only turns off the post-processor (e.g. a BOS template);
        # special tokens written in the text are still matched.
        return self.backend.encode(text, add_special_tokens=False).ids

    def _decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str:
        return self.backend.id_to_token(token_id)


class SentencePieceTokenizer(Tokenizer):
    """Backend over a `sentencepiece.SentencePieceProcessor`.

    SentencePiece itself never writes control tokens (<s>, </s>) when decoding and never matches
    them in text. `decode(..., skip_special_tokens=False)` writes them back, decoding the text
    between them as SentencePiece does; `encode` keeps SentencePiece's behaviour, so "<s>" written
    in the text is plain text.
    """

    def __init__(self, processor, source: PathLike, chat_template: Optional[str] = None):
        self.processor = processor
        bos, eos = processor.bos_id(), processor.eos_id()  # -1 when the model has none
        super().__init__(source, bos if bos >= 0 else None, eos if eos >= 0 else None, chat_template)

    @property
    def vocab_size(self) -> int:
        return self.processor.get_piece_size()

    def _encode(self, text: str) -> list[int]:
        return self.processor.encode(text, out_type=int)

    def _decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        is_control = self.processor.is_control
        if skip_special_tokens or not any(is_control(i) for i in ids):
            return self.processor.decode(ids)  # drops control tokens itself
        # Decode each run between control tokens and write the control tokens in between.
        parts: list[str] = []
        run: list[int] = []
        for token_id in ids:
            if is_control(token_id):
                parts += [self.processor.decode(run), self.id_to_token(token_id)]
                run = []
            else:
                run.append(token_id)
        parts.append(self.processor.decode(run))
        return "".join(parts)

    def id_to_token(self, token_id: int) -> str:
        return self.processor.id_to_piece(token_id)


# --------------------------------------------------------------------------------------------
# Streaming
# --------------------------------------------------------------------------------------------

class IncrementalDecoder:
    """Decode a stream of token ids into text pieces, one `push` per id.

    A token can end in the middle of a multi-byte UTF-8 character (an emoji or a CJK character is
    often 2-4 byte-level tokens); decoding up to it gives a trailing U+FFFD. So text is held back
    while the decoded tail ends in U+FFFD, and emitted once the character is complete (`flush`
    emits whatever is left, U+FFFD included, as `decode` would).

    Only the backend's `decode` is used, on a short window rather than the whole stream: the ids of
    the last emitted piece (left context, so that e.g. SentencePiece keeps a word's leading space)
    plus the ids since. The new piece is the window's text minus the text of the context. The pieces
    therefore concatenate to `decode(all ids)`.

        decoder = tokenizer.incremental_decoder()
        for token_id in generated:
            print(decoder.push(token_id), end="")
        print(decoder.flush())
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._ids: list[int] = []  # the window: context ids (already emitted), then pending ids
        self._read = 0  # how many of self._ids are context

    def _window_texts(self) -> tuple[str, str]:
        decode = functools.partial(self.tokenizer.decode, skip_special_tokens=self.skip_special_tokens)
        return decode(self._ids[:self._read]), decode(self._ids)

    def push(self, token_id: int) -> str:
        """Add one id; return the text that is now complete ("" if held back)."""
        self._ids.append(int(token_id))
        try:
            done, text = self._window_texts()
        except InputError:  # an id outside the vocabulary: leave the stream as it was
            self._ids.pop()
            raise
        if len(text) <= len(done) or text.endswith("\ufffd"):
            return ""  # nothing new yet, or a character still incomplete
        # Slide the window: the tokens just emitted become the left context.
        self._ids = self._ids[self._read:]
        self._read = len(self._ids)
        return text[len(done):]

    def flush(self) -> str:
        """Return whatever is held back (an incomplete character becomes U+FFFD, as in `decode`),
        and reset for a new stream."""
        done, text = self._window_texts()
        self._ids, self._read = [], 0
        return text[len(done):]


# --------------------------------------------------------------------------------------------
# Choosing a backend from a path
# --------------------------------------------------------------------------------------------

def load_tokenizer(path: PathLike) -> Tokenizer:
    """The tokenizer at `path`: a .gguf file, a tokenizer.json, a SentencePiece .model, or a
    directory holding one of them (tokenizer.json preferred, then tokenizer.model, then a single
    .gguf)."""
    path = Path(path)
    if path.is_dir():
        ggufs = sorted(path.glob("*.gguf"))
        if (path / "tokenizer.json").is_file():
            return Tokenizer.from_hf_json(path / "tokenizer.json")
        if (path / "tokenizer.model").is_file():
            return Tokenizer.from_sentencepiece(path / "tokenizer.model")
        if len(ggufs) == 1:
            return Tokenizer.from_gguf(ggufs[0])
        found = f"{len(ggufs)} .gguf files" if ggufs else "none"
        raise TokenizerError(f"{path}: no tokenizer found (looked for tokenizer.json, "
                             f"tokenizer.model or exactly one .gguf file; found {found})")
    _check_file(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if path.suffix == ".gguf" or magic == b"GGUF":
        return Tokenizer.from_gguf(path)
    if path.suffix == ".json":
        return Tokenizer.from_hf_json(path)
    if path.suffix == ".model":
        return Tokenizer.from_sentencepiece(path)
    raise TokenizerError(f"{path}: unknown tokenizer file type (expected .gguf, tokenizer.json "
                         f"or a SentencePiece .model)")


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise TokenizerError(f"{path}: no such file")


# --------------------------------------------------------------------------------------------
# GGUF
# --------------------------------------------------------------------------------------------

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


def _gguf_pre_tokenizer(pre: str, path: Path):
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
def _byte_spelling() -> dict[int, str]:
    """GPT-2's byte -> printable character table: how byte-level vocabularies spell bytes
    (space is "Ġ", newline "Ċ"). Printable Latin-1 bytes stand for themselves, the other 68
    bytes get the characters from U+0100 on."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    spelling = {b: chr(b) for b in keep}
    others = (b for b in range(256) if b not in spelling)
    spelling.update({b: chr(256 + n) for n, b in enumerate(others)})
    return spelling


def _open_gguf(path: Path):
    import gguf

    _check_file(path)
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the reader reports bad files with assorted built-in errors
        raise TokenizerError(f"{path}: not a readable GGUF file: {type(e).__name__}: {e}") from e


def _gguf_value(reader, path: Path, key: str, kind: type, required: bool = True):
    """Metadata `key` as `kind` (str, int, list[str] or list[int]); None if absent and not
    required."""
    field = reader.get_field(key)
    if field is None:
        if required:
            raise TokenizerError(f"{path}: GGUF metadata field {key!r} is missing")
        return None
    value = field.contents()
    container, item = (list, kind.__args__[0]) if kind in (list[str], list[int]) else (kind, None)

    def is_a(v, t):
        return isinstance(v, t) and not (t is int and isinstance(v, bool))

    if not is_a(value, container) or (item and not all(is_a(v, item) for v in value)):
        expected = str(kind) if item else kind.__name__
        raise TokenizerError(f"{path}: GGUF metadata field {key!r} is not a {expected}")
    return value


def _tokenizer_from_gguf(path: Path, reader=None) -> HFTokenizer:
    """Rebuild the byte-level BPE described by `tokenizer.ggml.*` (see the module docstring)."""
    import tokenizers
    from tokenizers import AddedToken, decoders, models

    if reader is None:
        reader = _open_gguf(path)
    model = _gguf_value(reader, path, "tokenizer.ggml.model", str)
    if model != "gpt2":
        raise TokenizerError(f"{path}: tokenizer.ggml.model = {model!r} is not supported "
                             f"(supported: 'gpt2', byte-level BPE)")
    tokens = _gguf_value(reader, path, "tokenizer.ggml.tokens", list[str])
    merges = _gguf_value(reader, path, "tokenizer.ggml.merges", list[str])
    token_types = _gguf_value(reader, path, "tokenizer.ggml.token_type", list[int], required=False)
    pre = _gguf_value(reader, path, "tokenizer.ggml.pre", str, required=False) or "default"
    if token_types is not None and len(token_types) != len(tokens):
        raise TokenizerError(f"{path}: tokenizer.ggml.token_type has {len(token_types)} entries "
                             f"but tokenizer.ggml.tokens has {len(tokens)}")

    # Vocabulary entries are spelled in the byte alphabet; some converters store a few tokens
    # as raw text instead, so re-spell those (as transformers does) or BPE could never reach them.
    spelling = _byte_spelling()
    alphabet = set(spelling.values())
    vocab = {token if set(token) <= alphabet
             else "".join(spelling[b] for b in token.encode("utf-8")): index
             for index, token in enumerate(tokens)}
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
    backend.pre_tokenizer = _gguf_pre_tokenizer(pre, path)
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

    return HFTokenizer(
        backend, path,
        bos_id=_gguf_value(reader, path, "tokenizer.ggml.bos_token_id", int, required=False),
        eos_id=_gguf_value(reader, path, "tokenizer.ggml.eos_token_id", int, required=False),
        chat_template=_gguf_value(reader, path, "tokenizer.chat_template", str, required=False))


# --------------------------------------------------------------------------------------------
# Hugging Face side files (tokenizer_config.json, chat_template.jinja)
# --------------------------------------------------------------------------------------------

def _hf_config(path: Path, config: Union[PathLike, Mapping[str, Any], None]) -> Mapping[str, Any]:
    """The tokenizer_config as a dict: `config` itself, the file it names, the
    tokenizer_config.json beside `path`, or {} if there is none."""
    if isinstance(config, Mapping):
        return config
    if config is None:
        config = path.parent / "tokenizer_config.json"
        if not config.is_file():
            return {}
    config = Path(config)
    _check_file(config)
    try:
        loaded = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise TokenizerError(f"{config}: not a readable JSON file: {e}") from e
    if not isinstance(loaded, dict):
        raise TokenizerError(f"{config}: expected a JSON object, got {type(loaded).__name__}")
    return loaded


def _config_token(config: Mapping[str, Any], field: str) -> Optional[str]:
    """A special token's text from tokenizer_config: written as a string or as a serialized
    AddedToken ({"content": ...})."""
    value = config.get(field)
    if isinstance(value, Mapping):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _hf_chat_template(path: Path, config: Mapping[str, Any]) -> Optional[str]:
    """The chat template from tokenizer_config ("chat_template": a string, or a list of named
    templates of which we take "default"), else from chat_template.jinja beside `path`
    (where transformers >= 4.5x saves it)."""
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
        template = named.get("default")
    if isinstance(template, str):
        return template
    jinja_file = path.parent / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    return None


# --------------------------------------------------------------------------------------------
# Chat templates
# --------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=8)
def _compile_chat_template(source: str):
    """Compile a chat template in the environment transformers uses
    (transformers/utils/chat_template_utils.py): an immutable sandbox (templates come from model
    files, i.e. untrusted), trim_blocks + lstrip_blocks, the loopcontrols extension, a
    non-escaping `tojson`, and the globals `raise_exception` and `strftime_now`.
    `{% generation %}` blocks (used by transformers to mask assistant tokens) render their body."""
    import datetime

    import jinja2
    import jinja2.ext
    import jinja2.nodes
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTag(jinja2.ext.Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body).set_lineno(lineno)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(source)
