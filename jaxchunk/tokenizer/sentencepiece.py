"""SentencePiece `.model` files, through the `sentencepiece` package."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from jaxchunk.errors import TokenizerError
from jaxchunk.tokenizer.base import PathLike, Tokenizer, check_file
from jaxchunk.tokenizer.hf import config_chat_template, read_tokenizer_config


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


def tokenizer_from_sentencepiece(path: PathLike) -> SentencePieceTokenizer:
    """A SentencePiece `.model` file (see `Tokenizer.from_sentencepiece`)."""
    import sentencepiece

    path = Path(path)
    check_file(path)
    try:
        processor = sentencepiece.SentencePieceProcessor(model_file=str(path))
    except Exception as e:  # OSError / RuntimeError with sentencepiece's own message
        raise TokenizerError(f"{path}: not a readable SentencePiece model: {e}") from e
    config = read_tokenizer_config(path, None)
    return SentencePieceTokenizer(processor, path, chat_template=config_chat_template(path, config))
