"""SentencePiece `.model` files, through the `sentencepiece` package."""
from __future__ import annotations

from pathlib import Path

from jaxchunk.errors import TokenizerError
from jaxchunk.tokenizer.hf import check_file, config_chat_template, read_tokenizer_config


def read_sentencepiece(path: Path) -> tuple:
    """(sentencepiece.SentencePieceProcessor, chat_template) of a `.model` file (the template from a
    tokenizer_config.json / chat_template.jinja beside it): what `Tokenizer.from_sentencepiece`
    wraps in a SentencePieceTokenizer."""
    import sentencepiece

    path = Path(path)
    check_file(path)
    try:
        processor = sentencepiece.SentencePieceProcessor(model_file=str(path))
    except Exception as e:  # OSError / RuntimeError with sentencepiece's own message
        raise TokenizerError(f"{path}: not a readable SentencePiece model: {e}") from e
    config = read_tokenizer_config(path, None)
    return processor, config_chat_template(path, config)
