"""Choosing a tokenizer backend from a path: `load_tokenizer`."""
from __future__ import annotations

from pathlib import Path

from jaxchunk.errors import TokenizerError
from jaxchunk.tokenizer.base import Tokenizer
from jaxchunk.tokenizer.hf import PathLike, check_file


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
    check_file(path)
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
