"""A real text for perplexity and equivalence checks, available offline on every machine.

The Python Language Reference topics shipped with CPython itself (`pydoc_data.topics`, ~465k
characters of English technical prose with code samples; Python Software Foundation License 2.0,
redistributable). Not generated text, and identical wherever the same CPython minor version runs.
"""
from __future__ import annotations

import sys

SOURCE = f"pydoc_data.topics (CPython {sys.version_info.major}.{sys.version_info.minor}), PSF License 2.0"

# Prose-heavy sections first, in a fixed order, so a short prefix is mostly natural language.
_PREFERRED = ("exceptions", "execmodel", "naming", "assignment", "import", "compound", "types",
              "datamodel", "specialnames", "customization", "numeric-types", "typesseq", "typesmapping")


def reference_text(min_chars: int = 0) -> str:
    """The corpus as one string (at least `min_chars` long when min_chars <= its size)."""
    from pydoc_data.topics import topics

    order = [k for k in _PREFERRED if k in topics] + sorted(k for k in topics if k not in _PREFERRED)
    parts, total = [], 0
    for key in order:
        parts.append(topics[key].strip())
        total += len(parts[-1])
        if min_chars and total >= min_chars:
            break
    return "\n\n".join(parts)


def reference_ids(tokenizer, n: int, *, bos: bool = True) -> list[int]:
    """The first `n` token ids of the corpus under `tokenizer` (a `jaxchunk.tokenizer.Tokenizer`),
    after its BOS token when `bos`. Tokenizes only about as much text as it needs."""
    chars = 6 * n  # ~4 characters per token in this text
    while True:
        text = reference_text(chars)
        ids = ([tokenizer.bos_id] if bos else []) + tokenizer.encode(text)
        if len(ids) >= n or len(text) < chars:
            break
        chars *= 2
    if len(ids) < n:
        raise ValueError(f"the reference text has only {len(ids)} tokens, fewer than {n}")
    return ids[:n]
