"""jaxchunk.host_memory: malloc_trim after XLA compiles gives freed arena memory back to the OS."""
import os
import platform
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest

from jaxchunk import host_memory

GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
needs_glibc = pytest.mark.skipif(not GLIBC, reason="malloc_trim is glibc's")


def run_python(code: str, **env) -> str:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                         env={**os.environ, **env}, timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout


@needs_glibc
def test_trim_returns_a_threads_freed_arena_memory_to_the_os():
    # A worker thread (its own malloc arena, as XLA's compile threads have) allocates ~200 MB in
    # malloc-sized pieces and frees them, keeping the last one so that the arena cannot shrink
    # from its top: the pages stay resident until trim() hands them back.
    out = run_python("""
        import threading
        from jaxchunk import host_memory
        def rss_mb():
            return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")) / 1024
        keep = []
        def work():
            pieces = [bytes(2000) for _ in range(100_000)]
            keep.append(pieces[-1])
            del pieces
        t = threading.Thread(target=work); t.start(); t.join()
        before = rss_mb()
        assert host_memory.trim()
        print(before, rss_mb())
    """)
    before, after = map(float, out.split())
    assert before - after > 150, (before, after)


@needs_glibc
def test_trim_after_compiles_trims_after_a_compile(monkeypatch):
    assert host_memory.trim_after_compiles()
    assert host_memory.trim_after_compiles()  # idempotent: one listener
    # The operands first: their own small compiles can pass MIN_COMPILE_SECONDS on a loaded host
    # (a CI run with other test files beside it counted 3 trims).
    x, m = jax.block_until_ready((jnp.ones((4, 8)), jnp.eye(8)))
    calls = []
    monkeypatch.setattr(host_memory, "trim", lambda: calls.append(1) or True)

    def many_ops(x, m):  # slow enough to compile (>= MIN_COMPILE_SECONDS; ~1 s here) on any host
        for i in range(100):
            x = jnp.sin(x @ m) * (i + 1.5)
        return x

    jax.jit(many_ops)(x, m).block_until_ready()
    assert len(calls) == 1


def test_the_environment_turns_it_off():
    out = run_python("from jaxchunk import host_memory; print(host_memory.trim_after_compiles())",
                     JAXCHUNK_MALLOC_TRIM="0")
    assert out.strip() == "False"
