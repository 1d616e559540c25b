"""Text <-> token ids: one interface (`Tokenizer`) over three kinds of tokenizer file.

* GGUF (llama.cpp): the vocabulary, merges and special tokens live in the file's metadata
  (`tokenizer.ggml.*`); `Tokenizer.from_gguf` rebuilds them as a Hugging Face `tokenizers`
  BPE: byte-level for "gpt2" vocabularies, SentencePiece-style (scores, byte fallback; Gemma) for
  "llama" ones (gguf.py, which also says how both follow llama.cpp).
* Hugging Face `tokenizer.json` (+ `tokenizer_config.json` beside it for the chat template and
  BOS/EOS): `Tokenizer.from_hf_json` (hf.py).
* SentencePiece `.model`: `Tokenizer.from_sentencepiece` (sentencepiece.py).

`load_tokenizer(path)` picks the right one from a file or a model directory (load.py);
`gguf_add_bos` / `hf_add_bos` say whether a model file asks for a BOS token before a prompt.
The tokenizer types (interface, the two backends, the streaming decoder) are base.py's; gguf.py,
hf.py and sentencepiece.py read the files; chat templating is chat_template.py's.
"""
from jaxchunk.tokenizer.base import HFTokenizer, IncrementalDecoder, SentencePieceTokenizer, Tokenizer
from jaxchunk.tokenizer.chat_template import compile_chat_template, render_chat_template
from jaxchunk.tokenizer.gguf import byte_spelling, gguf_add_bos
from jaxchunk.tokenizer.hf import hf_add_bos
from jaxchunk.tokenizer.load import load_tokenizer

__all__ = [
    "Tokenizer", "HFTokenizer", "SentencePieceTokenizer", "IncrementalDecoder", "load_tokenizer",
    "gguf_add_bos", "hf_add_bos", "byte_spelling", "compile_chat_template", "render_chat_template",
]
