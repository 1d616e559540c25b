"""The user-facing entry point: `jaxchunk.load(...)` returns a `Model` that tokenizes, prefills,
scores and generates.

    import jaxchunk
    model = jaxchunk.load("smollm2-135m")                  # or a .gguf path, or a Hugging Face dir
    print(model.generate("The capital of France is", max_new_tokens=16))
    for piece in model.chat([{"role": "user", "content": "Hi!"}], stream=True):
        print(piece, end="", flush=True)

Text in, text out, built from the lower layers (jaxchunk.prefill, jaxchunk.generate,
jaxchunk.sampling); every method also takes token ids. Importing this module is cheap: JAX and
the model code are imported on first use (`jaxchunk.cli --help` and `jaxchunk fetch` never load them).

Conventions:
- Text prompts are encoded with a BOS token only if the model file asks for one
  (`tokenizer.ggml.add_bos_token` in a GGUF, `add_bos_token` in a Hugging Face
  tokenizer_config.json; SmolLM2 says no). Token-id prompts are used exactly as given.
- Generated text excludes the EOS / stop token and the stop string that ended it (like llama.cpp,
  vLLM and transformers' pipelines). Special tokens the model emits before that are kept as text.
"""
from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Mapping, Optional, Sequence, Union

import numpy as np

from jaxchunk.config import LlamaConfig
from jaxchunk.errors import InputError
from jaxchunk.fetch import DEFAULT_MODEL
from jaxchunk.weights.modes import QUANTIZED_MODES

if TYPE_CHECKING:
    from jaxchunk.cache import KVCache
    from jaxchunk.tokenizer import Tokenizer

__all__ = ["load", "Model", "GenerationResult", "StopStrings", "TextStream", "stop_list"]

DEFAULT_MAX_SEQ_LEN = 8192
PROGRESS_MIN_TOKENS = 1024    # prefill progress bars only for prompts at least this long
PERPLEXITY_MAX_CHUNK = 512    # auto chunk cap for perplexity: "all" logits are [chunk, vocab] f32

Prompt = Union[str, Sequence[int], np.ndarray]


# ----------------------------------------------------------------------------- loading
def load(model: Union[str, os.PathLike] = DEFAULT_MODEL, *, dtype: Optional[str] = None,
         weights: str = "dequantized", attention_impl: str = "auto", cache_dtype: Optional[str] = None,
         max_seq_len: Optional[int] = None, mesh=None, ring_chunk_len: Optional[int] = None) -> "Model":
    """Load a Llama (or Gemma 3) model and its tokenizer.

    model: a known model name ("smollm2-135m", "gemma3-270m"; fetched on first use), a .gguf file, or a Hugging
        Face checkpoint directory (config.json + safetensors + tokenizer files; a directory holding
        exactly one .gguf also works).
    dtype: "f32" or "bf16", the dtype the model computes in (activations, norms, float weights).
        Default: "bf16" for weights="bf16", else "f32".
    weights: how the weight matrices are held in memory.
        "q4": as the GGUF stores them: block-quantized matrices (Q4_0 .. Q8_0, k-quants Q2_K ..
            Q6_K) stay quantized (4 or 8 bits a weight plus f16 / f32 block scales, exactly the
            file's values; the tied embedding too) and are dequantized inside the quantized matmul
            (pallas_kernels/quant_matmul.py). Float tensors (F32 norms) are cast to `dtype`. GGUF
            files only.
        "q4_q8": "q4", with each matrix's input rounded to 8 bits per 32-block first (llama.cpp's
            arithmetic for these weight types; pallas_kernels/quant_matmul.py): on CPU the decode
            products then run in integers, about 3x faster than "q4"'s float ones, at the cost of
            that rounding (logits move by ~1e-2; every chunk size still gives the same numbers).
        "f32" / "bf16": dequantized to that float dtype at load (`dtype` must match or be left out).
            bf16 matrices are held as their uint16 bits (jaxchunk/weights/bf16.py: keeps XLA:CPU from
            converting the whole model to f32 every step); inference only, not differentiable.
        "dequantized": dequantized to `dtype` (the default; same as weights=dtype).
    attention_impl: passed to every step: "auto" or a backend name of
        pallas_kernels.attention.BACKENDS ("pallas", "native_cpu", "xla", "reference").
    cache_dtype: KV-cache format: "f32", "bf16", "fp8_e4m3", "fp8_e5m2", "q8", "q6", "q4" (blocks
        of 32, Hadamard-rotated, float16 absmax scales; "*_norot" without the rotation); default:
        `dtype`. Keys and values apart: "k8v4" (q8 keys, q4 values; k<bits>v<bits> over 8 / 6 / 4),
        "bf16/q4" (KEY/VALUE), or a (key, value) tuple (jaxchunk.cache.resolve_cache_formats).
        See jaxchunk.cache and experiments/cache_quant.py for what each costs.
    max_seq_len: KV-cache capacity (prompt + generated tokens); default min(model context, 8192).
    mesh: a `jaxchunk.sharding.make_mesh(data=, model=)` mesh: params and every new cache are placed
        on it by jaxchunk.sharding's rules (batch over data; MLP, vocab and, where the heads divide,
        attention over model); every method then runs data / tensor parallel. None: one device.
        `Model.sharding_info()` says what is split.
    ring_chunk_len: None (default): the KV cache keeps max_seq_len positions for every layer. An
        int C: sliding-window layers (Gemma 3's local ones) keep a ring of window - 1 + C slots
        instead, global layers max_seq_len (jaxchunk.cache.init_cache); prefill then takes chunks
        of at most C tokens (a larger chunk_size raises InputError; the automatic schedule stays
        at or below C). InputError for a model without sliding-window layers. The paged cache of
        `jaxchunk.Generator` has no ring.
    """
    from jaxchunk.fetch import resolve_model
    from jaxchunk.weights.load import resolve_dtype

    dtype = resolve_dtype(dtype, weights)
    path = resolve_model(model)  # before importing JAX: a wrong path fails fast

    import jax

    from jaxchunk import compilation_cache, host_memory
    from jaxchunk.cache import resolve_cache_formats

    compilation_cache.enable()  # before the first compile of the process, or JAX never looks at it
    host_memory.trim_after_compiles()  # what XLA's compiles free goes back to the OS (host_memory.py)

    _check_attention_impl(attention_impl)
    cache_dtype = dtype if cache_dtype is None else cache_dtype
    resolve_cache_formats(cache_dtype)  # InputError for an unknown name, before the slow part
    config, params, metadata, tokenizer, add_bos = _load_files(path, dtype, weights)

    if max_seq_len is None:
        max_seq_len = min(config.max_position_embeddings, DEFAULT_MAX_SEQ_LEN)
    if not isinstance(max_seq_len, int) or isinstance(max_seq_len, bool) or \
            not 0 < max_seq_len <= config.max_position_embeddings:
        raise InputError(f"max_seq_len must be an int in [1, {config.max_position_embeddings}] "
                         f"(the model's context), got {max_seq_len!r}")
    if ring_chunk_len is not None:
        from jaxchunk.cache import ring_layout
        ring_layout(config, ring_chunk_len)  # InputError for a bad value or a model without windows
    if mesh is None:
        params = jax.device_put(params)
    else:
        from jaxchunk.sharding import shard_params
        params = shard_params(params, config, mesh)
    return Model(config, params, tokenizer, path=path, metadata=metadata, dtype=dtype,
                 attention_impl=attention_impl, cache_dtype=cache_dtype, max_seq_len=max_seq_len,
                 add_bos=add_bos, weights=weights if weights in QUANTIZED_MODES else dtype, mesh=mesh,
                 ring_chunk_len=ring_chunk_len)


def _check_attention_impl(impl: str) -> None:
    try:
        from pallas_kernels.attention import IMPLS
    except ImportError:  # the kernels package is optional here; the model step checks later
        return
    if impl not in IMPLS:
        raise InputError(f"attention_impl must be one of {IMPLS}, got {impl!r}")


def _load_files(path: Path, dtype: str, weights: str):
    """(config, params, metadata, tokenizer, add_bos) from a .gguf file or a model directory.
    A GGUF is parsed once, for the weights and the tokenizer alike."""
    from jaxchunk.tokenizer import Tokenizer, gguf_add_bos, hf_add_bos, load_tokenizer
    from jaxchunk.weights.gguf import open_gguf
    from jaxchunk.weights.load import checkpoint_path, load_weights

    path = checkpoint_path(path)
    if path.is_dir():  # a Hugging Face checkpoint
        config, params, metadata = load_weights(path, dtype=dtype, weights=weights)
        return config, params, metadata, load_tokenizer(path), hf_add_bos(path)
    gguf = open_gguf(path)  # ModelFileError if not a GGUF
    config, params, metadata = load_weights(gguf, dtype=dtype, weights=weights)
    gguf.release_pages()  # params hold copies; the file's pages need not stay beside them
    return config, params, metadata, Tokenizer.from_gguf(path, reader=gguf), gguf_add_bos(gguf, path)


# ----------------------------------------------------------------------------- stop strings
class StopStrings:
    """Cut a text stream at the first occurrence of any stop string.

    `push(piece)` returns the text that is now safe to show: text that can still turn out to be the
    start of a stop string (e.g. "\\n" when a stop is "\\n\\n") is held back until the next piece
    decides it. Once a stop string appears, `stopped` is True and nothing from it on is returned.
    `flush()` returns what is held back at the end of the stream. Works for whole texts too:
    `push(text) + flush()` is `text` cut before its first stop string.
    """

    def __init__(self, stops: Sequence[str] = ()):
        self.stops = tuple(stops)
        self.stopped = False
        self._pending = ""

    def push(self, piece: str) -> str:
        if self.stopped:
            return ""
        self._pending += piece
        hits = [i for i in (self._pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            out, self._pending = self._pending[:min(hits)], ""
            return out
        hold = max((n for s in self.stops for n in range(1, len(s))
                    if self._pending.endswith(s[:n])), default=0)
        out, self._pending = self._pending[:len(self._pending) - hold], self._pending[len(self._pending) - hold:]
        return out

    def flush(self) -> str:
        out, self._pending = self._pending, ""
        return out


# ----------------------------------------------------------------------------- results
@dataclasses.dataclass(frozen=True)
class GenerationResult:
    """One prompt's generation (`Model.generate(..., return_ids=True)`).

    text: the generated text, without the stop token or stop string that ended it;
    ids: the generated token ids up to and including the one that ended it (an EOS / stop id, or the
        token that completed a stop string); nothing after it;
    finish_reason: "stop" (a stop id or stop string) or "length" (max_new_tokens reached).
    """

    text: str
    ids: list[int]
    finish_reason: str


# ----------------------------------------------------------------------------- the model
class Model:
    """A loaded model: `config`, `params` (on device), `tokenizer`, and the settings it runs with
    (`dtype`, `weights`, `attention_impl`, `cache_dtype`, `max_seq_len`, `add_bos`, `ring_chunk_len`).
    Build it with `load`."""

    def __init__(self, config: LlamaConfig, params: dict, tokenizer: "Tokenizer", *, path=None,
                 metadata: Optional[Mapping[str, Any]] = None, dtype: str = "f32",
                 attention_impl: str = "auto", cache_dtype: Optional[str] = None,
                 max_seq_len: int = DEFAULT_MAX_SEQ_LEN, add_bos: bool = False, weights: Optional[str] = None,
                 mesh=None, ring_chunk_len: Optional[int] = None):
        self.config = config
        self.params = params
        self.tokenizer = tokenizer
        self.path = path
        self.metadata = dict(metadata or {})
        self.dtype = dtype
        self.attention_impl = attention_impl
        self.cache_dtype = cache_dtype or dtype
        self.max_seq_len = max_seq_len
        self.add_bos = add_bos
        self.weights = weights or dtype  # "q4" / "q4_q8", or the float dtype the matrices are held in
        self.mesh = mesh  # a jaxchunk.sharding mesh the params and caches are placed on, or None
        self.ring_chunk_len = ring_chunk_len  # sliding-window layers' ring (jaxchunk.cache), or None

    def __repr__(self) -> str:
        return (f"Model({str(self.path)!r}, layers={self.config.num_layers}, "
                f"hidden={self.config.hidden_size}, vocab={self.config.vocab_size}, dtype={self.dtype}, "
                f"weights={self.weights}, "
                f"max_seq_len={self.max_seq_len}, attention_impl={self.attention_impl!r})")

    # ---- tokens -------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, with BOS if the model file asks for it (see the module docstring)."""
        return self.tokenizer.encode(text, add_bos=self.add_bos)

    def prompt_ids(self, prompt: Prompt) -> list[int]:
        """One prompt (text or ids) as a non-empty list of ids."""
        ids = self.encode(prompt) if isinstance(prompt, str) else _id_list(prompt)
        if not ids:
            raise InputError("the prompt is empty (no tokens)")
        return ids

    def prompt_rows(self, prompts) -> tuple[list[list[int]], bool]:
        """(rows of ids, whether a single prompt was given): text, ids, or a list of either."""
        if _is_batch(prompts):
            return [self.prompt_ids(p) for p in prompts], False
        return [self.prompt_ids(prompts)], True

    # ---- low level ----------------------------------------------------------------------
    def new_cache(self, batch: int = 1) -> "KVCache":
        """An empty KV cache of `batch` rows and `max_seq_len` positions, in `cache_dtype` (with the
        sliding-window layers' ring when `ring_chunk_len` is set)."""
        from jaxchunk.cache import init_cache
        cache = init_cache(self.config, batch, self.max_seq_len, self.cache_dtype, ring_chunk_len=self.ring_chunk_len)
        if self.mesh is None:
            return cache
        from jaxchunk.sharding import shard_cache
        return shard_cache(cache, self.config, self.mesh)

    def sharding_info(self) -> str:
        """What the mesh splits for this model (`jaxchunk.sharding.describe`); "one device" without one."""
        if self.mesh is None:
            return "one device (no mesh)"
        from jaxchunk.sharding import describe
        return describe(self.config, self.mesh, self.params)

    def prefill(self, ids, chunk_size: Optional[int] = None, *, all_logits: bool = False,
                progress: bool = False, **schedule):
        """Chunked prefill of one prompt (ids or text) or a batch of them into a new cache.

        Returns (cache, logits) as `jaxchunk.prefill.prefill`: logits [batch, vocab] at each row's
        last token, or with all_logits=True a list of NumPy [len_b, vocab]. `schedule` passes
        max_input_len / max_attention_size on.
        """
        from jaxchunk.prefill import prefill
        rows, _ = self.prompt_rows(ids)
        return prefill(self.params, self.config, self.new_cache(len(rows)), rows, chunk_size=chunk_size,
                       attention_impl=self.attention_impl, all_logits=all_logits,
                       progress=progress and max(map(len, rows)) >= PROGRESS_MIN_TOKENS, **schedule)

    def logits(self, ids, *, chunk_size: Optional[int] = None, all_positions: bool = False) -> np.ndarray:
        """float32 NumPy logits of one sequence: [vocab] after its last token, or [len(ids), vocab]
        at every position with all_positions=True."""
        _, logits = self.prefill(self.prompt_ids(ids), chunk_size, all_logits=all_positions)
        return logits[0] if all_positions else np.asarray(logits[0])

    def perplexity(self, text_or_ids, chunk_size: Optional[int] = None, *, max_tokens: Optional[int] = None,
                   progress: bool = False) -> float:
        """exp(mean negative log-likelihood) of each token given the ones before it.

        Text is encoded as prompts are. At most `max_tokens` tokens are used. A text longer than the
        cache is scored in consecutive windows of max_seq_len tokens (each with a fresh cache; the
        first token of a window has no context and is not scored). Log-probs are taken on device
        chunk by chunk, so only [chunk] floats ever reach the host. The automatic chunk size is
        capped at 512 (the chunk's all-position logits are [chunk, vocab] float32).
        """
        ids = np.asarray(self.prompt_ids(text_or_ids), np.int32)
        if max_tokens is not None:
            if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 2:
                raise InputError(f"max_tokens must be an int >= 2, got {max_tokens!r}")
            ids = ids[:max_tokens]
        if len(ids) < 2:
            raise InputError(f"perplexity needs at least 2 tokens, got {len(ids)}")
        windows = [ids[i:i + self.max_seq_len] for i in range(0, len(ids), self.max_seq_len)]
        windows = [w for w in windows if len(w) >= 2]
        total_nll, scored = 0.0, 0
        bar = _progress_bar(sum(map(len, windows)), "perplexity", progress and len(ids) >= PROGRESS_MIN_TOKENS)
        for window in windows:
            nll = self._window_nll(window, chunk_size, bar)
            total_nll += nll
            scored += len(window) - 1
        if bar is not None:
            bar.close()
        return math.exp(total_nll / scored)

    def _window_nll(self, ids: np.ndarray, chunk_size: Optional[int], bar) -> float:
        """Sum of -log p(ids[i+1] | ids[:i+1]) over one window that fits the cache."""
        import jax.numpy as jnp

        from jaxchunk.prefill import iter_prefill
        from jaxchunk.sampling import token_logprobs

        chunks = iter_prefill(self.params, self.config, self.new_cache(1), [ids], chunk_size=chunk_size,
                              max_input_len=chunk_size or PERPLEXITY_MAX_CHUNK,
                              attention_impl=self.attention_impl, logits="all")
        nll = 0.0
        for chunk in chunks:
            start, n_valid = int(chunk.start[0]), int(chunk.n_valid[0])
            targets = np.zeros((1, chunk.chunk_len), np.int32)
            scored = len(ids[start + 1:start + n_valid + 1])  # the window's last token predicts nothing
            targets[0, :scored] = ids[start + 1:start + 1 + scored]
            logprobs = np.asarray(token_logprobs(chunk.logits, jnp.asarray(targets)))
            nll -= float(logprobs[0, :scored].astype(np.float64).sum())
            if bar is not None:
                bar.update(n_valid)
        return nll

    # ---- generation ---------------------------------------------------------------------
    def generate(self, prompts, max_new_tokens: int = 64, chunk_size: Optional[int] = None, *,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
                 repetition_penalty: float = 1.0, seed: int = 0, stop: Union[str, Sequence[str]] = (),
                 stream: bool = False, progress: bool = False, return_ids: bool = False, engine: Any = "batch"):
        """Continue one prompt or a batch of prompts (text or token ids).

        Sampling: greedy when temperature == 0; otherwise temperature, top_k (0: off), top_p (1: off),
        min_p (0: off) and repetition_penalty (1: off) as in jaxchunk.sampling. Deterministic for a
        given seed (and batch). Generation ends at EOS, after max_new_tokens, or at any of the `stop`
        strings (matched on the decoded text, so a stop string may span tokens); the returned text
        excludes EOS and the stop string.

        Returns the text (str) for one prompt, a list of texts for a list of prompts; with
        return_ids=True a `GenerationResult` (text, ids, finish_reason) per prompt instead; with
        stream=True (one prompt only), a generator of text pieces, each valid UTF-8 on its own
        (a character split across tokens comes out whole), concatenating to the same text.
        Prefill runs when generate() is called; errors (e.g. a prompt longer than the cache) are
        raised then, not on the first piece.

        engine: "batch" (one contiguous cache for the batch, one on-device decode loop) or a
        `jaxchunk.Generator` over this model (the prompts become its jobs, next to any it holds:
        continuous batching over its paged cache and token budget; chunk_size is then the
        generator's). Greedy ids are the same on both; sampled ids differ (the generator draws each
        job from its own key, `seed`, whatever its neighbours). A generator takes no stream and no
        repetition_penalty. (The generator imports this module, so it is passed in, not built here.)
        """
        from jaxchunk import generate as gen
        from jaxchunk.sampling import SamplingParams

        if not (isinstance(engine, str) and engine == "batch") and getattr(engine, "model", None) is not self:
            raise InputError(f"engine must be 'batch' or a jaxchunk.Generator over this model, got {engine!r}")
        rows, single = self.prompt_rows(prompts)
        if engine != "batch":
            return self._generate_on_generator(engine, rows, single, max_new_tokens, stream=stream,
                                               repetition_penalty=repetition_penalty, return_ids=return_ids,
                                               temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                               seed=seed, stop=stop)
        sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                                  repetition_penalty=repetition_penalty)
        stops = stop_list(stop)
        stop_ids = self.stop_token_ids(stops)
        kwargs = dict(max_new_tokens=max_new_tokens, sampling=sampling, seed=seed, chunk_size=chunk_size,
                      stop_ids=stop_ids, attention_impl=self.attention_impl,
                      progress=progress and max(map(len, rows)) >= PROGRESS_MIN_TOKENS)
        if stream:
            if not single:
                raise InputError("stream=True takes a single prompt, not a list")
            if return_ids:
                raise InputError("return_ids=True returns whole results; it cannot be combined with stream=True")
            steps = gen.stream_ids(self.params, self.config, self.new_cache(1), rows, **kwargs)
            return self._stream_text(steps, set(stop_ids), stops)
        _, outputs = gen.generate_ids(self.params, self.config, self.new_cache(len(rows)), rows, **kwargs)
        if return_ids:
            results = [self._result(ids, set(stop_ids), stops) for ids in outputs]
            return results[0] if single else results
        texts = [self._text(ids, set(stop_ids), stops) for ids in outputs]
        return texts[0] if single else texts

    def _generate_on_generator(self, generator, rows, single, max_new_tokens, *, stream, repetition_penalty,
                               return_ids, **job_kwargs):
        """generate(engine=generator): the rows as the generator's jobs, run to completion."""
        if stream:
            raise InputError("stream=True runs on engine='batch'; a generator streams with Generator.iterate()")
        if repetition_penalty != 1.0:
            raise InputError("repetition_penalty is not supported on a generator engine")
        out = generator.generate([list(r) for r in rows], max_new_tokens=max_new_tokens, return_ids=return_ids,
                                 **job_kwargs)
        return out[0] if single else out

    def chat(self, messages: Sequence[Mapping[str, Any]], **generate_kwargs):
        """Reply to a conversation ([{"role": "system" | "user" | "assistant", "content": ...}, ...]).

        The model file's chat template renders it (as transformers' apply_chat_template with
        add_generation_prompt=True), the rendering is encoded as is (the template writes any BOS
        itself) and continued with `generate(**generate_kwargs)`.
        """
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return self.generate(self.tokenizer.encode(text), **generate_kwargs)

    # ---- warm-up ------------------------------------------------------------------------
    def warmup(self, batch_sizes: Sequence[int] = (1,), chunk_sizes: Optional[Sequence[int]] = None,
               max_new_tokens: Sequence[int] = (64,), *, stream: bool = False, **sampling) -> dict:
        """Compile, ahead of the real work, every executable that `generate` (and so `prefill` /
        `logits` with the same chunk sizes) runs for these shapes; afterwards, inside
        `jaxchunk.compile_guard()`, such calls compile nothing.

        batch_sizes: numbers of prompts per call. chunk_sizes: the prefill chunk lengths that will
        be passed as `chunk_size=`; None means the automatic schedule's whole static set (every power
        of two up to max_input_len=2048, max_seq_len and ring_chunk_len). max_new_tokens: the generation lengths (the
        on-device decode loop compiles once per power-of-two bucket, at least 16). stream: also the
        streaming path (one decode step per token). sampling: temperature / top_k / top_p / min_p /
        repetition_penalty as they will be passed to generate (each setting is its own compile).

        Each shape runs once on placeholder prompts in a throwaway cache: `jit(...).lower(...)
        .compile()` from ShapeDtypeStructs would not fill jit's dispatch cache in jax 0.10.2 (the
        next call compiles again), so only a real call warms what later calls use. Returns
        {"compiles": executables built, "seconds": wall time}.
        """
        import time

        from jaxchunk.prefill import DEFAULT_MAX_INPUT_LEN
        from jaxchunk.steps import count_compiles

        largest = min(DEFAULT_MAX_INPUT_LEN, self.max_seq_len, self.ring_chunk_len or DEFAULT_MAX_INPUT_LEN)
        chunk_sizes = list(chunk_sizes) if chunk_sizes is not None else \
            [1 << i for i in range(largest.bit_length())]
        for name, values in (("batch_sizes", batch_sizes), ("chunk_sizes", chunk_sizes),
                             ("max_new_tokens", max_new_tokens)):
            if not values or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
                raise InputError(f"{name} must be a non-empty list of positive ints, got {values!r}")
        longest = max(chunk_sizes) + max(max_new_tokens)
        if longest > self.max_seq_len:
            raise InputError(f"warm-up of chunk {max(chunk_sizes)} + {max(max_new_tokens)} new tokens needs "
                             f"{longest} cache positions; max_seq_len is {self.max_seq_len}")
        start = time.perf_counter()
        with count_compiles() as compiles:
            for batch in batch_sizes:
                for chunk in chunk_sizes:
                    # Two chunks where they fit (the second one merges the rows' last logits).
                    length = chunk + 1 if chunk + 1 + max(max_new_tokens) <= self.max_seq_len else chunk
                    prompts = [[0] * length] * batch
                    for new_tokens in max_new_tokens:
                        self.generate(prompts, max_new_tokens=new_tokens, chunk_size=chunk, stop=(), **sampling)
                    if stream:
                        for _ in self.generate(prompts[0], max_new_tokens=2, chunk_size=chunk, stream=True,
                                               **sampling):
                            pass
        return {"compiles": compiles.count, "seconds": time.perf_counter() - start}

    def stop_token_ids(self, stops: Sequence[str] = ()) -> list[int]:
        """EOS, plus stop strings that are exactly one token: those can stop the device loop early
        (the text check below stays the authority). Without a tokenizer: the config's EOS."""
        if self.tokenizer is None:
            if stops:
                raise InputError("stop strings need a tokenizer; this model has none")
            return [] if self.config.eos_token_id is None else [self.config.eos_token_id]
        eos = self.tokenizer.eos_id if self.tokenizer.eos_id is not None else self.config.eos_token_id
        ids = [] if eos is None else [eos]
        if self.tokenizer.end_of_turn_id is not None and self.tokenizer.end_of_turn_id != eos:
            ids.append(self.tokenizer.end_of_turn_id)  # Gemma's <end_of_turn>
        for s in stops:
            encoded = self.tokenizer.encode(s)
            if len(encoded) == 1 and self.tokenizer.decode(encoded) == s:
                ids.append(encoded[0])
        return ids

    def _text(self, ids: list[int], stop_ids: set[int], stops: Sequence[str]) -> str:
        """Text of one row's generated ids, without a final stop id, cut at the first stop string."""
        if ids and ids[-1] in stop_ids:
            ids = ids[:-1]
        cutter = StopStrings(stops)
        return cutter.push(self.tokenizer.decode(ids)) + cutter.flush()

    def _result(self, ids: list[int], stop_ids: set[int], stops: Sequence[str]) -> GenerationResult:
        """`_text` of one row, with the ids cut after the token that ended the generation."""
        text = self._text(ids, stop_ids, stops)
        if stops:  # the first token whose text completes a stop string ends the ids there
            decoder, cutter = self.tokenizer.incremental_decoder(), StopStrings(stops)
            for i, token in enumerate(ids):
                if token in stop_ids:
                    break
                cutter.push(decoder.push(token))
                if cutter.stopped:
                    return GenerationResult(text, ids[:i + 1], "stop")
            if cutter.push(decoder.flush()) or cutter.stopped:  # bytes held back until the end
                return GenerationResult(text, ids, "stop" if cutter.stopped else "length")
        return GenerationResult(text, ids, "stop" if ids and ids[-1] in stop_ids else "length")

    def _stream_text(self, steps, stop_ids: set[int], stops: Sequence[str]) -> Iterator[str]:
        """Text pieces from a `stream_ids` generator of one row (same text as `_text`)."""
        text = TextStream(self.tokenizer, stop_ids, stops)
        try:
            for tokens in steps:
                piece = text.push(int(tokens[0]))
                if piece:
                    yield piece
                if text.stopped:
                    return
            tail = text.finish()
            if tail:
                yield tail
        finally:
            steps.close()  # stop decoding on the device when the caller stops early


class TextStream:
    """One generation's text, token by token (push-based, for streaming and the dynamic generator).

    `push(token)` returns the text that is now safe to show (a character split across tokens comes out
    whole; text that may start a stop string is held back) and sets `stopped` when the token is a stop
    id (its text is not shown) or completes a stop string (nothing from the stop string on is shown).
    `finish()` returns what is held back at the end. The pieces join to `Model._text` of the ids.
    """

    def __init__(self, tokenizer: "Tokenizer", stop_ids=(), stops: Sequence[str] = ()):
        self.stop_ids = set(stop_ids)
        self.stopped = False
        self._decoder = tokenizer.incremental_decoder()
        self._cutter = StopStrings(stops)

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        if token in self.stop_ids:
            self.stopped = True
            return ""
        piece = self._cutter.push(self._decoder.push(token))
        self.stopped = self._cutter.stopped
        return piece

    def finish(self) -> str:
        if self.stopped:
            return ""
        tail = self._cutter.push(self._decoder.flush())
        self.stopped = self._cutter.stopped
        return tail + self._cutter.flush()


# ----------------------------------------------------------------------------- helpers
def _is_batch(prompts) -> bool:
    """A list of prompts (texts or id sequences) rather than one prompt (a text or 1-D ids)."""
    if isinstance(prompts, str):
        return False
    if isinstance(prompts, (list, tuple)):
        return len(prompts) > 0 and (isinstance(prompts[0], str) or np.ndim(prompts[0]) >= 1)
    return np.ndim(prompts) >= 2


def _id_list(ids) -> list[int]:
    arr = np.asarray(ids)
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise InputError(f"a prompt must be text or a 1-D sequence of int token ids, got "
                         f"{'shape ' + str(arr.shape) if arr.ndim != 1 else 'dtype ' + str(arr.dtype)}")
    return arr.astype(np.int64).tolist()


def stop_list(stop) -> list[str]:
    """`stop` (one string or a list of them) as a checked list of non-empty strings."""
    stops = [stop] if isinstance(stop, str) else list(stop or ())
    if not all(isinstance(s, str) and s for s in stops):
        raise InputError(f"stop must be a string or a list of non-empty strings, got {stop!r}")
    return stops


def _progress_bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="tok")
