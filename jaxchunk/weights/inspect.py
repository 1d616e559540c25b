"""What a checkpoint holds, without loading its weights: `inspect(path) -> CheckpointInfo`.

Reads only headers and metadata (a GGUF's metadata and tensor table, memory-mapped; a Hugging Face
directory's config.json and safetensors headers) plus the tokenizer. `jaxchunk info` prints it.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Optional, Union

from jaxchunk.config import LlamaConfig
from jaxchunk.errors import ModelFileError

PathLike = Union[str, os.PathLike]

# Bytes per element of the safetensors dtypes a Llama checkpoint uses (others are counted as 1).
SAFETENSORS_ITEM_BYTES = {"F32": 4, "F16": 2, "BF16": 2}


@dataclasses.dataclass(frozen=True)
class TensorGroup:
    """The tensors stored in one type ("Q4_1", "F32", "BF16", ...)."""

    count: int
    parameters: int   # elements, summed over the tensors
    nbytes: int       # bytes they take in the file


@dataclasses.dataclass(frozen=True)
class TokenizerSummary:
    kind: str                      # the backend class: "HFTokenizer", "SentencePieceTokenizer"
    vocab_size: int
    bos_id: Optional[int]
    bos_token: Optional[str]
    eos_id: Optional[int]
    eos_token: Optional[str]
    chat_template_chars: Optional[int]   # None when there is no chat template


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    """What `inspect` found. `tensors` maps a storage type to its TensorGroup, largest (bytes)
    first; `add_bos`: whether text prompts get a BOS token (the file's own setting)."""

    path: Path                     # the .gguf file or the Hugging Face directory
    format: str                    # "gguf" | "safetensors"
    config: LlamaConfig
    tensors: dict[str, TensorGroup]
    tokenizer: TokenizerSummary
    add_bos: bool
    file_bytes: int                # size of the .gguf, or of the directory's .safetensors files
    name: str = ""                 # GGUF general.name
    architecture: str = "llama"
    file_type: Optional[str] = None    # GGUF general.file_type, e.g. "MOSTLY_Q4_1"
    gguf_version: Optional[int] = None

    @property
    def total(self) -> TensorGroup:
        """All tensors together."""
        groups = self.tensors.values()
        return TensorGroup(sum(g.count for g in groups), sum(g.parameters for g in groups),
                           sum(g.nbytes for g in groups))


def inspect(path: PathLike) -> CheckpointInfo:
    """Summarize the checkpoint at `path` (a .gguf file, a Hugging Face directory, or a directory
    holding one .gguf): config, tensors per storage type, tokenizer, add_bos, file type."""
    from jaxchunk.weights.load import checkpoint_path

    path = checkpoint_path(path)
    return _inspect_hf_dir(path) if path.is_dir() else _inspect_gguf(path)


def _group(sizes: list[tuple[str, int, int]]) -> dict[str, TensorGroup]:
    """(type, parameters, bytes) per tensor -> TensorGroup per type, largest first."""
    totals: dict[str, list[int]] = {}
    for kind, numel, nbytes in sizes:
        row = totals.setdefault(kind, [0, 0, 0])
        row[0] += 1
        row[1] += numel
        row[2] += nbytes
    ordered = sorted(totals.items(), key=lambda kv: -kv[1][2])
    return {kind: TensorGroup(*row) for kind, row in ordered}


def _summarize(tokenizer) -> TokenizerSummary:
    template = tokenizer.chat_template
    return TokenizerSummary(type(tokenizer).__name__, tokenizer.vocab_size, tokenizer.bos_id,
                            tokenizer.bos_token, tokenizer.eos_id, tokenizer.eos_token,
                            len(template) if template else None)


def _inspect_gguf(path: Path) -> CheckpointInfo:
    from jaxchunk.tokenizer import Tokenizer, gguf_add_bos
    from jaxchunk.weights.gguf import config_from_gguf, file_type_name, gguf_field, open_gguf

    reader = open_gguf(path)
    sizes = [(t.qtype, math.prod(t.shape), t.blocks.nbytes) for t in reader.tensors.values()]
    file_type = gguf_field(reader, path, "general.file_type", int, None)
    return CheckpointInfo(
        path=path, format="gguf", config=config_from_gguf(reader), tensors=_group(sizes),
        tokenizer=_summarize(Tokenizer.from_gguf(path, reader=reader)),
        add_bos=gguf_add_bos(reader, path), file_bytes=path.stat().st_size,
        name=gguf_field(reader, path, "general.name", str, ""),
        architecture=gguf_field(reader, path, "general.architecture", str),
        file_type=None if file_type is None else file_type_name(file_type), gguf_version=reader.version)


def _inspect_hf_dir(path: Path) -> CheckpointInfo:
    from safetensors import safe_open

    from jaxchunk.tokenizer import hf_add_bos, load_tokenizer
    from jaxchunk.weights.safetensors import CONFIG_FILE, config_from_hf

    try:
        hf_config = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, ValueError) as e:
        raise ModelFileError(f"{path / CONFIG_FILE}: not readable JSON: {e}") from None
    sizes, file_bytes = [], 0
    for file in sorted(path.glob("*.safetensors")):
        file_bytes += file.stat().st_size
        with safe_open(file, framework="np") as f:
            for name in f.keys():
                info = f.get_slice(name)
                numel = math.prod(info.get_shape())
                sizes.append((info.get_dtype(), numel, numel * SAFETENSORS_ITEM_BYTES.get(info.get_dtype(), 1)))
    return CheckpointInfo(
        path=path, format="safetensors", config=config_from_hf(hf_config, path / CONFIG_FILE),
        tensors=_group(sizes), tokenizer=_summarize(load_tokenizer(path)), add_bos=hf_add_bos(path),
        file_bytes=file_bytes, architecture=str(hf_config.get("model_type")))
