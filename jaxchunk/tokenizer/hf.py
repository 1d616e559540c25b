"""Hugging Face tokenizer files: `tokenizer.json` (read by the `tokenizers` library) and its side
files (tokenizer_config.json for BOS/EOS, `add_bos_token` and the chat template;
chat_template.jinja). Imports nothing of the tokenizer types (base.py builds them from this)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from jaxchunk.errors import TokenizerError

PathLike = Union[str, os.PathLike]


def check_file(path: Path) -> None:
    """TokenizerError unless `path` is an existing file."""
    if not path.is_file():
        raise TokenizerError(f"{path}: no such file")


def read_hf_json(path: Path, tokenizer_config: Union[PathLike, Mapping[str, Any], None] = None) -> tuple:
    """(tokenizers.Tokenizer, path, bos_id, eos_id, chat_template) of a Hugging Face
    `tokenizer.json` and its tokenizer_config: the arguments of `HFTokenizer`
    (`Tokenizer.from_hf_json` builds it)."""
    import tokenizers

    path = Path(path)
    check_file(path)
    try:
        backend = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON / unknown types
        raise TokenizerError(f"{path}: not a readable tokenizer.json: {e}") from e
    config = read_tokenizer_config(path, tokenizer_config)

    def token_id(field: str) -> Optional[int]:
        token = _config_token(config, field)
        if token is None:
            return None
        token_id = backend.token_to_id(token)
        if token_id is None:
            raise TokenizerError(f"{path}: {field} {token!r} from tokenizer_config is not in "
                                 f"the vocabulary")
        return token_id

    return backend, path, token_id("bos_token"), token_id("eos_token"), config_chat_template(path, config)


def hf_add_bos(model_dir: PathLike) -> bool:
    """Whether a Hugging Face model directory asks for a BOS token before a text prompt:
    `add_bos_token` of its tokenizer_config.json (False when absent or unreadable)."""
    try:
        value = json.loads((Path(model_dir) / "tokenizer_config.json").read_text()).get("add_bos_token")
    except (OSError, ValueError, AttributeError):
        return False
    return bool(value)


def read_tokenizer_config(path: Path, config: Union[PathLike, Mapping[str, Any], None]) -> Mapping[str, Any]:
    """The tokenizer_config as a dict: `config` itself, the file it names, the
    tokenizer_config.json beside `path`, or {} if there is none."""
    if isinstance(config, Mapping):
        return config
    if config is None:
        config = path.parent / "tokenizer_config.json"
        if not config.is_file():
            return {}
    config = Path(config)
    check_file(config)
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


def config_chat_template(path: Path, config: Mapping[str, Any]) -> Optional[str]:
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
