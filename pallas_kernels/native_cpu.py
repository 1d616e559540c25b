"""Native CPU kernels for decode (native_cpu.cc), as XLA FFI custom calls:

- `quant_matmul_cpu`: the quantized matmul's CPU decode backend. XLA:CPU fuses no int -> float
  conversion into a dot and Pallas has no CPU compiler (interpret mode only), so for decode-shaped
  products (a few rows) every formulation XLA can run writes dequantized floats to memory and reads
  them back: 7-9 G weights/s on the reference machine, while the weights are 0.6 bytes each. The
  kernel reads the packed bytes once and dequantizes in registers (~20 G weights/s on 2 cores).
  With `quantize_x` (quant_matmul's activations="q8") x is rounded to 8 bits per 32-block and the
  products run in integers with AVX-512 VNNI where the CPU has it (~4x fewer instructions per
  weight: memory-bound), plain C++ otherwise. Layout and semantics of
  pallas_kernels/quant_matmul.py; reference: its `quant_matmul_reference`.
- `decode_attention_cpu`: attention of a few query positions against a plain f32 / bf16 cache, the
  CPU decode backend of pallas_kernels.attention. XLA's blockwise loop spends most of a decode
  step's attention on per-block transposing copies and loop overhead; the kernel reads each cached
  key and value once for all query heads of its KV head. Semantics of
  pallas_kernels/attention_reference.py.
- `paged_decode_attention_cpu`: the same kernel (one C++ template over where a sequence's queries
  and cached vectors are) over a page pool and a page table, for the decode rows of a ragged paged
  step (pallas_kernels/paged_attention.py's layout).
- `dense_gemv_cpu`: x @ W for a few rows and a plain f32 / bf16 W (decode), W read once in place
  at its layer, each work item one sequential block of it. XLA's 1-row dot drew a third (f32) to a
  quarter (bf16) of the read bandwidth, and unsteadily (experiments/roofline.py's decode dots).
- `dequantize_cpu`: one layer's float32 W from the packed weights, for prefill (many rows), where
  XLA's dot is the right engine and only the dequantization was slow (SmolLM2's 30 layers, summed
  to force a full read: 24 ms here vs 75 ms for XLA's fusion).

The shared library is compiled on first use with the system C++ compiler (`$CXX`, else `c++`),
`-O3 -march=native`, against the FFI headers jaxlib ships, into `kernels_dir()` (`kernels/` under
pallas_kernels.cache_dir.cache_root(): `$JAXCHUNK_CACHE`, else the checkout's `.cache`, else
`~/.cache/jaxchunk`), named by a hash of the source, flags, compiler and CPU flags, so a changed
source or another machine's CPU gets its own build. If that fails, `available()` is False with the
reason in `unavailable_reason()`, and the dispatchers use the XLA paths.

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
import numpy as np

from pallas_kernels.cache_dir import cache_root
from pallas_kernels.kv_quant import kv_quant_pair

QUANT_GEMV = "jaxchunk_quant_gemv"
DECODE_ATTENTION = "jaxchunk_decode_attention"
DEQUANTIZE = "jaxchunk_dequantize"
PAGED_DECODE_ATTENTION = "jaxchunk_paged_decode_attention"
FLASH_ATTENTION = "jaxchunk_flash_attention"
PAGED_ATTENTION = "jaxchunk_paged_attention"
DENSE_GEMV = "jaxchunk_dense_gemv"
ATTENTION_HEAD_DIMS = (16, 32, 64, 80, 96, 128, 256)  # decode_attention_cpu's compiled head sizes
FLASH_MAX_HEAD_DIM = 512  # flash_attention_cpu: any multiple of 16 up to this
SOURCE = Path(__file__).with_suffix(".cc")
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")


def kernels_dir() -> Path:
    """Where the built libraries go: `cache_root() / "kernels"` (pallas_kernels/cache_dir.py)."""
    return cache_root() / "kernels"


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux reports them (/proc/cpuinfo's "flags": avx2, avx512_bf16,
    ...); empty where there is no such line (another OS, or a CPU that lists "Features")."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def widens_bf16_dots() -> bool:
    """Whether a bf16 x bf16 dot is better run as an f32 dot of the widened operands on this CPU:
    an x86 CPU without bf16 dot instructions (AVX512_BF16 / AMX_BF16), where XLA:CPU's bf16 kernel
    emulates them (prefill-shaped [512, 576] x [576, 1536], one core of an AVX2 EPYC: 44 GFLOP/s
    with bf16 operands, 60 widened, 74 with f32 weights; see jaxchunk.model.linear)."""
    flags = cpu_flags()
    return "avx2" in flags and not flags & {"avx512_bf16", "amx_bf16"}


def _cpu_id() -> str:
    """What -march=native depends on: the CPU's flags (Linux), else the machine name."""
    return " ".join(sorted(cpu_flags())) or platform.machine()


@functools.lru_cache(maxsize=1)
def _build() -> tuple[Path | None, str]:
    """(path of the built library, "") or (None, why not)."""
    cxx = _compiler()
    if cxx is None:
        return None, "no C++ compiler found ($CXX, c++, g++)"
    include = jax.ffi.include_dir()
    key = hashlib.sha256("\0".join([SOURCE.read_text(), cxx, *FLAGS, include, _cpu_id()]).encode()).hexdigest()[:16]
    lib = kernels_dir() / f"native_cpu-{key}.so"
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
    jax.ffi.register_ffi_target(DECODE_ATTENTION, jax.ffi.pycapsule(library.JaxchunkDecodeAttention),
                                platform="cpu")
    jax.ffi.register_ffi_target(DEQUANTIZE, jax.ffi.pycapsule(library.JaxchunkDequantize), platform="cpu")
    jax.ffi.register_ffi_target(PAGED_DECODE_ATTENTION, jax.ffi.pycapsule(library.JaxchunkPagedDecodeAttention),
                                platform="cpu")
    jax.ffi.register_ffi_target(FLASH_ATTENTION, jax.ffi.pycapsule(library.JaxchunkFlashAttention), platform="cpu")
    jax.ffi.register_ffi_target(PAGED_ATTENTION, jax.ffi.pycapsule(library.JaxchunkPagedAttention), platform="cpu")
    jax.ffi.register_ffi_target(DENSE_GEMV, jax.ffi.pycapsule(library.JaxchunkDenseGemv), platform="cpu")
    return ""


def unavailable_reason() -> str:
    """"" when the kernel can run here, else why not."""
    return _register()


def available() -> bool:
    return _register() == ""


def _require() -> None:
    why = _register()
    if why:
        raise RuntimeError(f"the native CPU kernels are unavailable: {why}")


NATIVE_STORAGE = {"float32": "float32", "bfloat16": "uint16"}  # cache format -> array dtype the kernels read


def attention_supports(head_dim: int, k_dtype, v_dtype, kv_quant=None, *, flash: bool = False) -> str | None:
    """None if the attention kernels (`decode_attention_cpu`, `paged_decode_attention_cpu`; with
    flash, `flash_attention_cpu`) take a cache of this format and head size here, else why not: the
    CPU backend, keys and values in one plain f32 / bf16 format (bf16 as its uint16 bits), a
    compiled head size (flash: a multiple of 16 up to FLASH_MAX_HEAD_DIM), a kernel that built.
    kv_quant as the attention ops' (a format, a (keys, values) pair, or None: plain floats)."""
    platform_name = jax.default_backend()
    if platform_name != "cpu":
        return f"the native kernel runs on the CPU backend, this is {platform_name!r}"
    k_quant, v_quant = kv_quant_pair(kv_quant)
    k_name, v_name = ("float" if spec is None else spec.name for spec in (k_quant, v_quant))
    if k_name != v_name and {k_name, v_name} != {"float", "f32"}:
        return (f"keys {k_name} and values {v_name}: the native kernel reads keys and values in one "
                f"plain f32 / bf16 format, not two formats")
    storage = "float32" if k_quant is None else k_quant.storage
    if storage not in NATIVE_STORAGE or str(k_dtype) != NATIVE_STORAGE[storage] or v_dtype != k_dtype:
        return (f"cache {k_name} stored as {k_dtype}: the native kernel takes a plain f32 / bf16 cache "
                f"(float32, or bf16 as uint16 bits)")
    if flash and not flash_head_dim_supported(head_dim):
        return f"head_dim {head_dim}: the native flash kernel takes multiples of 16 up to {FLASH_MAX_HEAD_DIM}"
    if not flash and head_dim not in ATTENTION_HEAD_DIMS:
        return f"head_dim {head_dim} is not one the native kernel is compiled for {ATTENTION_HEAD_DIMS}"
    if not available():
        return f"the native CPU kernels did not build: {unavailable_reason()}"
    return None


def _packed_operands(op: str, qs, scales, mins, layer):
    """The kernels' weight operands (qs, scales, mins, layer) for packed weights: a 2-D W becomes a
    stack of one, and missing mins (8-bit weights without) are stood in for by the scales (never
    read: the calls pass has_mins)."""
    _require()
    if scales.dtype not in (jnp.float16, jnp.float32) or (mins is not None and mins.dtype != scales.dtype):
        raise ValueError(f"{op} needs float16 or float32 scales (mins of the same dtype), got {scales.dtype}"
                         f"{'' if mins is None else f' / {mins.dtype}'}")
    if layer is None:
        qs, scales, mins, layer = qs[None], scales[None], None if mins is None else mins[None], 0
    return qs, scales, scales if mins is None else mins, jnp.asarray(layer, jnp.int32)


def quant_matmul_cpu(x: jax.Array, qs: jax.Array, scales: jax.Array, mins: jax.Array | None = None,
                     *, layer=None, quantize_x: bool = False) -> jax.Array:
    """x [..., k] @ W -> [..., n] in x.dtype, W in the layout of pallas_kernels/quant_matmul.py
    (scales / mins float16 or float32, groups of 32 or 16). Computed in float32. layer: None for a
    2-D W (qs [tiles, rows, tile]), or the index of W in stacked leaves [layers, tiles, rows, tile]
    (read in place; an index out of range is an error raised by the kernel). quantize_x: first
    round x to 8 bits per 32-block (quant_matmul's activations="q8"; the products then run in
    integers for the legacy layouts, in floats on the rounded x' for the k-quant ones). Raises RuntimeError if
    the kernel is unavailable."""
    operands = _packed_operands("quant_matmul_cpu", qs, scales, mins, layer)
    lead, k = x.shape[:-1], x.shape[-1]
    _, tiles, _, tile = operands[0].shape
    x2 = x.reshape(-1, k).astype(jnp.float32)
    call = jax.ffi.ffi_call(QUANT_GEMV, jax.ShapeDtypeStruct((x2.shape[0], tiles * tile), jnp.float32))
    y = call(x2, *operands, quantize_x=bool(quantize_x), has_mins=mins is not None)
    return y.reshape(*lead, tiles * tile).astype(x.dtype)


DENSE_STORAGE = (jnp.float32, jnp.uint16)  # dense_gemv_cpu's weights: f32, or bf16 as its uint16 bits


def dense_gemv_cpu(x: jax.Array, w: jax.Array, *, layer=None, transposed: bool = False) -> jax.Array:
    """x [..., k] @ W -> [..., n] in x.dtype, computed in float32, for a few rows (decode). w:
    float32, or bfloat16 held as uint16 bits; W [k, n] (transposed: w is W.T [n, k], e.g. a tied
    embedding [vocab, hidden] as the LM head). layer: None for a 2-D w, or the (traced) index of W
    in a stack [layers, ...] (read in place; out of range is an error raised by the kernel).
    Each block of W is read once, sequentially. Raises RuntimeError if the kernel is unavailable."""
    _require()
    if w.dtype not in DENSE_STORAGE:
        raise ValueError(f"dense_gemv_cpu takes float32 or uint16 (bf16 bits) weights, got {w.dtype}")
    if layer is None:
        w, layer = w[None], 0
    if w.ndim != 3 or w.shape[2 if transposed else 1] != x.shape[-1]:
        raise ValueError(f"dense_gemv_cpu: x [..., {x.shape[-1]}] does not match w {w.shape}"
                         f"{' (transposed: [layers, n, k])' if transposed else ' ([layers, k, n])'}")
    lead, k = x.shape[:-1], x.shape[-1]
    n = w.shape[1] if transposed else w.shape[2]
    x2 = x.reshape(-1, k).astype(jnp.float32)
    call = jax.ffi.ffi_call(DENSE_GEMV, jax.ShapeDtypeStruct((x2.shape[0], n), jnp.float32))
    y = call(x2, w, jnp.asarray(layer, jnp.int32), transposed=bool(transposed))
    return y.reshape(*lead, n).astype(x.dtype)


def decode_attention_cpu(q: jax.Array, k: jax.Array, v: jax.Array, q_offset: jax.Array, kv_len: jax.Array,
                         *, layer=None, sm_scale: float, soft_cap: float | None = None,
                         sliding_window: int | None = None) -> jax.Array:
    """Attention of q [batch, q_len, heads, d] against k, v [batch, max_seq, kv_heads, d] (or the
    whole cache [layers, batch, max_seq, kv_heads, d] with a traced `layer`, read in place), float32
    or bfloat16 held as uint16 bits (the cache's bf16 format). q_offset, kv_len: int32 [batch].
    Returns [batch, q_len, heads, d] in q.dtype, computed in float32; rows that see no key are zero.
    Masking as pallas_kernels.attention. For a few query positions (decode: every key read once per
    KV head, split over the threads by keys); `flash_attention_cpu` is the kernel for chunks.
    Raises RuntimeError if the kernel is unavailable."""
    _check_attention_operands("decode_attention_cpu", q.shape[-1], k, v)
    return _contiguous_attention(DECODE_ATTENTION, q, k, v, q_offset, kv_len, layer, sm_scale, soft_cap,
                                 sliding_window)


def flash_attention_cpu(q: jax.Array, k: jax.Array, v: jax.Array, q_offset: jax.Array, kv_len: jax.Array,
                        *, layer=None, sm_scale: float, soft_cap: float | None = None,
                        sliding_window: int | None = None) -> jax.Array:
    """`decode_attention_cpu`'s operation (same arguments, layouts and result) by the flash prefill
    kernel: tiles of query rows x blocks of 64 keys, register-blocked Q K^T and P V, online softmax,
    blocks outside a tile's causal / window bound never read. For prefill chunks. head_dim: any
    multiple of 16 up to FLASH_MAX_HEAD_DIM. bf16 q on a bf16 cache: bf16 products where the CPU
    has AVX512_BF16 (`_bf16_products`). Raises RuntimeError if the kernel is unavailable."""
    _check_attention_operands("flash_attention_cpu", q.shape[-1], k, v, flash=True)
    return _contiguous_attention(FLASH_ATTENTION, q, k, v, q_offset, kv_len, layer, sm_scale, soft_cap,
                                 sliding_window)


def _contiguous_attention(target, q, k, v, q_offset, kv_len, layer, sm_scale, soft_cap, sliding_window):
    if layer is None:
        k, v, layer = k[None], v[None], 0
    call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(q.shape, jnp.float32))
    o = call(q.astype(jnp.float32), k, v, jnp.asarray(q_offset, jnp.int32), jnp.asarray(kv_len, jnp.int32),
             jnp.asarray(layer, jnp.int32), sm_scale=np.float32(sm_scale),
             soft_cap=np.float32(soft_cap or 0.0), window=np.int64(sliding_window or 0),
             bf16_products=_bf16_products(q, k))
    return o.astype(q.dtype)


def _bf16_products(q: jax.Array, k: jax.Array) -> bool:
    """Whether the flash kernel may multiply in bf16 (AVX512_BF16's vdpbf16ps, twice the f32
    rate): bf16 queries against a bf16 cache, so that Q and K enter the products exactly; only the
    softmax weights are rounded to bf16 for P V (as torch's bf16 CPU flash attention does), the
    sums staying f32. An f32 query (f32 compute over a bf16 cache) keeps f32 products."""
    return bool(q.dtype == jnp.bfloat16 and k.dtype == jnp.uint16 and "avx512_bf16" in cpu_flags())


def flash_head_dim_supported(head_dim: int) -> bool:
    return head_dim % 16 == 0 and 0 < head_dim <= FLASH_MAX_HEAD_DIM


def _check_attention_operands(op: str, head_dim: int, k: jax.Array, v: jax.Array, *, flash: bool = False) -> None:
    _require()
    if flash and not flash_head_dim_supported(head_dim):
        raise ValueError(f"{op} takes head_dim a multiple of 16 up to {FLASH_MAX_HEAD_DIM}, got {head_dim}")
    if not flash and head_dim not in ATTENTION_HEAD_DIMS:
        raise ValueError(f"{op} takes head_dim in {ATTENTION_HEAD_DIMS}, got {head_dim}")
    if k.dtype not in (jnp.float32, jnp.uint16) or v.dtype != k.dtype:
        raise ValueError(f"{op} takes an f32 cache or bf16 bits (uint16), got {k.dtype}")


def paged_decode_attention_cpu(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, cu_q_lens: jax.Array,
                               kv_lens: jax.Array, page_table: jax.Array, num_seqs: jax.Array, *, layer=None,
                               sm_scale: float, soft_cap: float | None = None,
                               sliding_window: int | None = None, max_q_len: int = 8) -> jax.Array:
    """Ragged paged attention (layout of pallas_kernels/paged_attention.py) for the query rows of the
    sequences with at most `max_q_len` new tokens; every other row (padding, longer sequences) is
    zero. q [tokens, heads, d]; k_pages, v_pages [num_pages, page_size, kv_heads, d] (or the whole
    pool [layers, ...] with a traced `layer`, read in place), float32 or bf16 bits (uint16);
    cu_q_lens [max_seqs + 1], kv_lens [max_seqs], page_table [max_seqs, pages_per_seq], num_seqs []
    int32. Returns [tokens, heads, d] in q.dtype, computed in float32. The kernel rejects (an error
    at run time) page ids outside the pool and lengths past a sequence's pages among the rows it
    reads. Raises RuntimeError if the kernel is unavailable."""
    return _paged_attention(PAGED_DECODE_ATTENTION, "paged_decode_attention_cpu", q, k_pages, v_pages, cu_q_lens,
                            kv_lens, page_table, num_seqs, layer, sm_scale, soft_cap, sliding_window, max_q_len)


def paged_attention_cpu(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, cu_q_lens: jax.Array,
                        kv_lens: jax.Array, page_table: jax.Array, num_seqs: jax.Array, *, layer=None,
                        sm_scale: float, soft_cap: float | None = None,
                        sliding_window: int | None = None, max_q_len: int = 8) -> jax.Array:
    """`paged_decode_attention_cpu` for every sequence's rows in one call: those with at most
    `max_q_len` new tokens by the decode kernel, longer ones (prefill chunks) by the flash kernel
    (`flash_attention_cpu`'s, over the page table). Only padding rows are zero. The kernel checks
    every sequence's lengths and page ids."""
    return _paged_attention(PAGED_ATTENTION, "paged_attention_cpu", q, k_pages, v_pages, cu_q_lens, kv_lens,
                            page_table, num_seqs, layer, sm_scale, soft_cap, sliding_window, max_q_len)


def _paged_attention(target, op, q, k_pages, v_pages, cu_q_lens, kv_lens, page_table, num_seqs, layer, sm_scale,
                     soft_cap, sliding_window, max_q_len):
    _check_attention_operands(op, q.shape[-1], k_pages, v_pages)
    if layer is None:
        k_pages, v_pages, layer = k_pages[None], v_pages[None], 0
    call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(q.shape, jnp.float32))
    i32 = functools.partial(jnp.asarray, dtype=jnp.int32)
    o = call(q.astype(jnp.float32), k_pages, v_pages, i32(cu_q_lens), i32(kv_lens), i32(page_table), i32(num_seqs),
             i32(layer), sm_scale=np.float32(sm_scale), soft_cap=np.float32(soft_cap or 0.0),
             window=np.int64(sliding_window or 0), max_q_len=np.int64(max_q_len),
             bf16_products=_bf16_products(q, k_pages))
    return o.astype(q.dtype)


def dequantize_cpu(qs: jax.Array, scales: jax.Array, mins: jax.Array | None = None, *, layer=None) -> jax.Array:
    """The float32 W [k, n] of packed weights (layout of pallas_kernels/quant_matmul.py, any
    scales / mins), or of layer `layer` of stacked ones (read in place). What the prefill path feeds
    to XLA's dot (XLA's own dequantization fusion is ~3x slower). Bit-exact: d * q + m is one f32
    rounding, as in the gguf package's dequantization."""
    operands = _packed_operands("dequantize_cpu", qs, scales, mins, layer)
    _, tiles, rows, tile = operands[0].shape
    k = rows * (2 if qs.dtype == jnp.uint8 else 1)
    call = jax.ffi.ffi_call(DEQUANTIZE, jax.ShapeDtypeStruct((k, tiles * tile), jnp.float32))
    return call(*operands, has_mins=mins is not None)
