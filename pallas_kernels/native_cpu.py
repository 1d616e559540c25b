"""Native CPU kernels for decode (native_cpu.cc), as XLA FFI custom calls:

- `quant_matmul_cpu`: the quantized matmul's CPU decode backend. XLA:CPU fuses no int -> float
  conversion into a dot and Pallas has no CPU compiler (interpret mode only), so for decode-shaped
  products (a few rows) every formulation XLA can run writes dequantized floats to memory and reads
  them back: 7-9 G weights/s on the reference machine, while the weights are 0.6 bytes each. The
  kernel reads the packed bytes once and dequantizes in registers (~27 G weights/s). Layout and
  semantics of pallas_kernels/quant_matmul.py; reference: its `quant_matmul_reference`.

The shared library is compiled on first use with the system C++ compiler (`$CXX`, else `c++`),
`-O3 -march=native`, against the FFI headers jaxlib ships, into `$JAXCHUNK_CACHE/kernels` (default:
the repository's `.cache/kernels`), named by a hash of the source, flags, compiler and CPU flags, so
a changed source or another machine's CPU gets its own build. If that fails, `available()` is
False with the reason in `unavailable_reason()`, and the dispatchers use the XLA paths.

Self-contained: imports nothing from jaxchunk.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp

QUANT_GEMV = "jaxchunk_quant_gemv"
SOURCE = Path(__file__).with_suffix(".cc")
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")


def cache_dir() -> Path:
    root = os.environ.get("JAXCHUNK_CACHE") or str(Path(__file__).resolve().parents[1] / ".cache")
    return Path(root) / "kernels"


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")


def _cpu_id() -> str:
    """What -march=native depends on: the CPU's flags (Linux), else the machine name."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.machine()


@functools.lru_cache(maxsize=1)
def _build() -> tuple[Path | None, str]:
    """(path of the built library, "") or (None, why not)."""
    cxx = _compiler()
    if cxx is None:
        return None, "no C++ compiler found ($CXX, c++, g++)"
    include = jax.ffi.include_dir()
    key = hashlib.sha256("\0".join([SOURCE.read_text(), cxx, *FLAGS, include, _cpu_id()]).encode()).hexdigest()[:16]
    lib = cache_dir() / f"native_cpu-{key}.so"
    if lib.exists():
        return lib, ""
    lib.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
        out = Path(tmp) / lib.name
        proc = subprocess.run([cxx, *FLAGS, "-I", include, str(SOURCE), "-o", str(out)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            return None, f"compiling {SOURCE.name} failed: {proc.stderr.strip()[-2000:]}"
        os.replace(out, lib)  # atomic: a concurrent process sees the whole file or none
    return lib, ""


@functools.lru_cache(maxsize=1)
def _register() -> str:
    """Builds and registers the FFI target once; returns "" or why it is unavailable."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"the CPU kernel is built for x86-64 Linux only (this is {platform.system()} {platform.machine()})"
    try:
        lib, why = _build()
    except OSError as e:
        return f"building the CPU kernel failed: {e}"
    if lib is None:
        return why
    library = ctypes.cdll.LoadLibrary(str(lib))
    jax.ffi.register_ffi_target(QUANT_GEMV, jax.ffi.pycapsule(library.JaxchunkQuantGemv), platform="cpu")
    return ""


def unavailable_reason() -> str:
    """"" when the kernel can run here, else why not."""
    return _register()


def available() -> bool:
    return _register() == ""


def quant_matmul_cpu(x: jax.Array, qs: jax.Array, scales: jax.Array, mins: jax.Array | None = None,
                     *, layer=None) -> jax.Array:
    """x [..., k] @ W -> [..., n] in x.dtype, W in the layout of pallas_kernels/quant_matmul.py
    (scales / mins float16). Computed in float32. layer: None for a 2-D W (qs [tiles, rows, tile]),
    or the index of W in stacked leaves [layers, tiles, rows, tile] (read in place; an index out
    of range is an error raised by the kernel). Raises RuntimeError if the kernel is unavailable."""
    why = _register()
    if why:
        raise RuntimeError(f"the native CPU kernels are unavailable: {why}")
    if scales.dtype != jnp.float16 or (mins is not None and mins.dtype != jnp.float16):
        raise ValueError(f"quant_matmul_cpu needs float16 scales / mins, got {scales.dtype}")
    if layer is None:  # a 2-D W is a stack of one
        qs, scales, mins = (None if a is None else a[None] for a in (qs, scales, mins))
        layer = 0
    lead, k = x.shape[:-1], x.shape[-1]
    _, tiles, _, tile = qs.shape
    x2 = x.reshape(-1, k).astype(jnp.float32)
    call = jax.ffi.ffi_call(QUANT_GEMV, jax.ShapeDtypeStruct((x2.shape[0], tiles * tile), jnp.float32))
    # 8-bit weights have no mins: the scales stand in for the unused argument (never read).
    y = call(x2, qs, scales, scales if mins is None else mins, jnp.asarray(layer, jnp.int32))
    return y.reshape(*lead, tiles * tile).astype(x.dtype)

