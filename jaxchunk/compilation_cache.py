"""JAX's persistent compilation cache under jaxchunk's cache directory, on by default.

A second `jaxchunk generate` (or `jaxchunk.load` + the same shapes in a new process) then loads its
executables from disk instead of compiling them again. `jaxchunk.load` calls `enable()`.

- Where: `$JAXCHUNK_COMPILATION_CACHE` if it names a directory; else
  `<jaxchunk.fetch.cache_dir()>/xla/jax-<jax version>-jaxlib-<jaxlib version>`, so a jax upgrade
  starts a new directory and never loads an executable an older XLA wrote (JAX's own cache key also
  covers the versions, the computation, the compile options and the backend).
- Off: `JAXCHUNK_COMPILATION_CACHE=0` (or "off" / "false" / "no"), or a compilation cache directory
  already set by the user (`jax.config.update("jax_compilation_cache_dir", ...)`), which is left alone.
"""
from __future__ import annotations

import os
from pathlib import Path

ENV = "JAXCHUNK_COMPILATION_CACHE"
OFF = ("0", "off", "false", "no")
MIN_COMPILE_SECONDS = 0.2   # executables that compile faster are not worth a disk entry


def directory() -> Path | None:
    """The cache directory jaxchunk would use, or None when the environment turns it off."""
    import jax
    import jaxlib

    setting = os.environ.get(ENV, "").strip()
    if setting.lower() in OFF:
        return None
    if setting:
        return Path(setting).expanduser()
    from jaxchunk.fetch import cache_dir
    return cache_dir() / "xla" / f"jax-{jax.__version__}-jaxlib-{jaxlib.__version__}"


def enable() -> Path | None:
    """Point JAX's persistent compilation cache at `directory()` unless it is off or already set.

    Returns the directory in use (the user's own one if they set it), or None when off.
    """
    import jax

    current = jax.config.jax_compilation_cache_dir
    if current:
        return Path(current)
    path = directory()
    if path is None:
        return None
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path
