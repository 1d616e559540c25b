"""The one cache-directory rule for this checkout's files: downloaded models (jaxchunk.fetch) and
compiled native kernels (pallas_kernels.native_cpu, under `cache_root() / "kernels"`).

Here rather than in jaxchunk because pallas_kernels imports nothing from jaxchunk.
"""
from __future__ import annotations

import os
from pathlib import Path

ENV_VAR = "JAXCHUNK_CACHE"


def cache_root() -> Path:
    """`$JAXCHUNK_CACHE` if set; else `<checkout>/.cache` when running from a source checkout
    (pyproject.toml beside the packages); else `~/.cache/jaxchunk` (an installed package: never
    a folder inside site-packages)."""
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "pyproject.toml").is_file():
        return checkout / ".cache"
    return Path.home() / ".cache" / "jaxchunk"
