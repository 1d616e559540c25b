"""The tokenizer types: the interface (`Tokenizer`), its two backends (`HFTokenizer` over a Hugging
Face `tokenizers.Tokenizer`, what GGUF vocabularies and tokenizer.json files become;
`SentencePieceTokenizer`) and the streaming decoder (`IncrementalDecoder`). Reading the files is
gguf.py's, hf.py's and sentencepiece.py's (imported when a `Tokenizer.from_*` constructor runs).

Every backend shares: `encode(text, add_bos=False)`, `decode(ids, skip_special_tokens=False)`, `bos_id`,
`eos_id`, `vocab_size`, `chat_template`, `apply_chat_template(messages)` (rendered the way
transformers renders it) and streaming decoding (`IncrementalDecoder`, `decode_stream`).

`encode` never adds anything on its own: no BOS unless `add_bos=True` (whatever a tokenizer.json's
post-processor would do), and special tokens written in the text ("<|im_start|>") become their
single ids in the `tokenizers`-based backends.
"""
from __future__ import annotations

import abc
import functools
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional, Sequence, Union

from jaxchunk.errors import InputError, TokenizerError
from jaxchunk.tokenizer.chat_template import Message, render_chat_template

PathLike = Union[str, os.PathLike]


class Tokenizer(abc.ABC):
    """Text <-> token ids, plus chat templating and streaming decode.

    Build one with `Tokenizer.from_gguf`, `Tokenizer.from_hf_json`, `Tokenizer.from_sentencepiece`
    or `load_tokenizer`. A backend (subclass) implements `vocab_size`, `id_to_token`, `_encode`
    and `_decode`; everything else is shared.

    Attributes:
        source: the file this tokenizer was read from (for messages).
        bos_id, eos_id: begin/end-of-sequence token ids, or None if the files do not say.
        end_of_turn_id: the chat end-of-turn token (Gemma's <end_of_turn>) where it differs from
            EOS, or None; generation stops on it as on EOS.
        chat_template: the Jinja chat template, or None.
    """

    end_of_turn_id: Optional[int] = None

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
        size = self.vocab_size  # once: HFTokenizer's costs ~1 ms on Gemma's 262k vocabulary
        bad = [i for i in ids if not 0 <= i < size]
        if bad:
            raise InputError(f"decode(): token id {bad[0]} is outside the vocabulary of "
                             f"{self.source} (size {size})")
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
        transformers' `apply_chat_template(messages, tokenize=False)` does (see
        `chat_template.render_chat_template`); the template also sees `bos_token` / `eos_token`.

        Raises TokenizerError if there is no template or it does not compile, InputError if the
        template rejects the conversation (its `raise_exception(...)`) or it is empty.
        """
        if self.chat_template is None:
            raise TokenizerError(f"{self.source}: no chat template in this tokenizer's files")
        special = {"bos_token": self.bos_token, "eos_token": self.eos_token}
        context = {name: text for name, text in special.items() if text is not None}
        context.update(variables)  # callers may override any of the above
        return render_chat_template(self.chat_template, messages, add_generation_prompt,
                                    source=self.source, **context)

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
    def from_gguf(cls, path: PathLike, reader: Any = None) -> "Tokenizer":
        """The tokenizer stored in a GGUF file's `tokenizer.*` metadata. Pass the file already
        open (`jaxchunk.weights.gguf.open_gguf`, or a `gguf.GGUFReader`) as `reader` to avoid
        parsing it a second time."""
        from jaxchunk.tokenizer.gguf import read_gguf_vocabulary
        return HFTokenizer(*read_gguf_vocabulary(Path(path), reader))

    @classmethod
    def from_hf_json(cls, path: PathLike,
                     tokenizer_config: Union[PathLike, Mapping[str, Any], None] = None) -> "Tokenizer":
        """A Hugging Face `tokenizer.json`. BOS/EOS and the chat template come from
        `tokenizer_config` (a dict or the path of a tokenizer_config.json), by default the
        tokenizer_config.json beside `path`; a chat_template.jinja beside it also counts."""
        from jaxchunk.tokenizer.hf import read_hf_json
        return HFTokenizer(*read_hf_json(Path(path), tokenizer_config))

    @classmethod
    def from_sentencepiece(cls, path: PathLike) -> "Tokenizer":
        """A SentencePiece `.model` file. BOS/EOS come from the model; the chat template from a
        tokenizer_config.json / chat_template.jinja beside it, if any."""
        from jaxchunk.tokenizer.sentencepiece import read_sentencepiece
        processor, chat_template = read_sentencepiece(Path(path))
        return SentencePieceTokenizer(processor, path, chat_template)


# ---- the two backends ------------------------------------------------------------------

class HFTokenizer(Tokenizer):
    """Backend over a Hugging Face `tokenizers.Tokenizer` (used for GGUF and tokenizer.json)."""

    def __init__(self, backend, source: PathLike, bos_id: Optional[int], eos_id: Optional[int],
                 chat_template: Optional[str], end_of_turn_id: Optional[int] = None):
        self.backend = backend
        super().__init__(source, bos_id, eos_id, chat_template)
        self.end_of_turn_id = end_of_turn_id

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


# ---- streaming -----------------------------------------------------------------------

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
