"""The experiment scripts, run as users run them (subprocesses) on tiny settings.

Mostly on `--model tiny-random` (a 2-layer random Llama, random ids), so these run without the
model file. They check that every output is written and that the numbers are sane, and - with the
hidden --break-mask hook, which swaps in a top-left-aligned causal mask - that the error columns
come from a real comparison: the broken mask must make them large.
"""
import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pd = pytest.importorskip("pandas")
pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model", "tiny-random", "--repeats", "1"]


def run_script(name: str, *args: str, out: Path, check: bool = True) -> subprocess.CompletedProcess:
    """`python -m experiments.<name> ARGS --out OUT` from the repository root, as users run it
    (check: assert it succeeded)."""
    proc = subprocess.run([sys.executable, "-m", f"experiments.{name}", *args, "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert not check or proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def check_outputs(out: Path, pngs: list[str]) -> pd.DataFrame:
    """CSV and JSON written and consistent, PNGs non-trivial; returns the CSV."""
    df = pd.read_csv(out / "results.csv")
    payload = json.loads((out / "results.json").read_text())
    assert {"machine", "settings", "rows"} <= payload.keys()
    assert payload["machine"]["versions"]["jax"] and payload["machine"]["cpu"]
    assert len(payload["rows"]) == len(df) > 0
    for png in pngs:
        data = (out / png).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 10_000, png
    return df


SCRIPTS = sorted(path.stem for path in (ROOT / "experiments").glob("*.py") if path.stem != "__init__")


def test_every_script_imports_as_a_module_without_running(tmp_path):
    """`import experiments.<name>` defines main() and runs nothing. The command line is a bad flag,
    so a script that ran main() on import would exit at once (status 2) instead of hiding a run."""
    assert {"chunk_sweep", "common", "compare_peers"} <= set(SCRIPTS)
    code = ("import importlib, sys\n"
            "sys.argv = ['import-only', '--not-a-flag-of-any-script']\n"
            f"for name in {SCRIPTS!r}:\n"
            "    module = importlib.import_module('experiments.' + name)\n"
            "    assert name == 'common' or callable(module.main), name\n"
            "print('imported', len(sys.argv))\n")
    before = sorted(ROOT.iterdir())
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == "imported 2\n"  # nothing printed by the imports themselves
    assert sorted(ROOT.iterdir()) == before  # nothing written (no results/ directory)


def test_no_file_edits_the_module_search_path():
    """Packages are found the standard way (`python -m`, the editable install), never by editing
    the interpreter's search path in code."""
    edit = re.compile(r"\bsys\s*\.\s*path\b")
    sources = [path for folder in ("experiments", "jaxchunk", "tests", "pallas_kernels")
               for path in (ROOT / folder).rglob("*.py")]
    assert len(sources) > 20
    offenders = [str(path.relative_to(ROOT)) for path in sources if edit.search(path.read_text())]
    for notebook in (ROOT / "notebooks").glob("*.ipynb"):
        cells = json.loads(notebook.read_text())["cells"]
        if any(edit.search("".join(cell["source"])) for cell in cells if cell["cell_type"] == "code"):
            offenders.append(str(notebook.relative_to(ROOT)))
    assert not offenders


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    proc = run_script("chunk_sweep", *TINY, "--prompt-lens", "40", "--chunk-sizes", "16,64,whole",
                      "--dtypes", "f32", out=out)
    return out, proc


@pytest.fixture(scope="module")
def broken_sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("broken")
    run_script("chunk_sweep", *TINY, "--prompt-lens", "40", "--chunk-sizes", "16,whole",
               "--dtypes", "f32", "--break-mask", out=out)
    return pd.read_csv(out / "results.csv")


def test_chunk_sweep_writes_everything(sweep):
    out, proc = sweep
    df = check_outputs(out, ["throughput.png", "memory.png", "error.png"])
    # Chunk 64 >= 40 tokens is the whole-prompt run, measured once.
    assert sorted(zip(df.prompt_len, df.chunk_size)) == [(40, 16), (40, 40)]
    assert list(df.whole_prompt) == [c == n for n, c in zip(df.prompt_len, df.chunk_size)]
    assert (df.n_chunks == np.ceil(df.prompt_len / df.chunk_size)).all()
    assert "tok_per_s" in proc.stdout and "max_abs_logit_diff" in proc.stdout  # the printed table


def test_chunk_sweep_numbers_are_sane(sweep):
    df = pd.read_csv(sweep[0] / "results.csv")
    assert (df.tok_per_s > 0).all() and (df.median_s > 0).all()
    assert (df.n_compiles >= 1).all()  # every run is a new (chunk, cache) shape
    assert (df.compile_s >= 0).all()
    assert (df.step_temp_mb > 0).all() and (df.step_peak_mb >= df.step_temp_mb).all()
    assert (df.step_alias_mb > 0).all()  # the donated cache is updated in place
    assert (df.rss_peak_mb > 50).all()  # a Python process with JAX loaded
    assert (df.reference == "forward").all()
    # Chunked prefill reproduces full attention.
    assert (df.max_abs_logit_diff < 1e-3).all()
    assert (df.top1_agreement == 1.0).all()
    np.testing.assert_allclose(df.perplexity, df.perplexity_reference, rtol=1e-4)


def test_broken_mask_makes_the_error_columns_large(sweep, broken_sweep):
    good = pd.read_csv(sweep[0] / "results.csv").set_index(["prompt_len", "chunk_size"])
    bad = broken_sweep.set_index(["prompt_len", "chunk_size"])
    # Several chunks: the later ones see the wrong keys.
    assert bad.loc[(40, 16), "max_abs_logit_diff"] > 0.1
    assert bad.loc[(40, 16), "max_abs_logit_diff"] > 1000 * max(good.loc[(40, 16), "max_abs_logit_diff"], 1e-6)
    assert bad.loc[(40, 16), "top1_agreement"] < 0.8
    assert abs(bad.loc[(40, 16), "perplexity"] / bad.loc[(40, 16), "perplexity_reference"] - 1) > 0.01
    # One chunk: top-left and bottom-right alignment coincide, so the "broken" run is still right.
    assert bad.loc[(40, 40), "max_abs_logit_diff"] < 1e-3


def test_max_attention_size_records_schedules(tmp_path):
    from jaxchunk.prefill import chunk_schedule
    from experiments.max_attention_size import compact

    run_script("max_attention_size", *TINY, "--prompt-lens", "40,100", "--max-attention-sizes", "32",
               "--chunk-sizes", "32", "--max-input-len", "64", out=tmp_path)
    df = check_outputs(tmp_path, ["schedule.png", "time.png", "memory.png"])
    assert list(df.schedule) == ["auto 32^2", "auto 32^2", "fixed 32", "fixed 32"]
    for row in df.itertuples():
        kwargs = (dict(chunk_size=32) if row.schedule == "fixed 32"
                  else dict(max_attention_size=32 * 32, max_input_len=64))
        expected = chunk_schedule(row.prompt_len, **kwargs)
        assert row.chunks == compact(expected) and row.n_chunks == len(expected)
        assert row.n_shapes == len({length for length, _ in expected})
    assert (df.tok_per_s > 0).all() and (df.max_step_temp_mb > 0).all()
    # A fixed chunk size compiles once for every prompt length (one shared cache).
    fixed = df[df.schedule == "fixed 32"]
    assert list(fixed.n_compiles) == [1, 0]
    assert df[df.schedule == "auto 32^2"].n_compiles.iloc[0] >= 1
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [tuple(c) for c in rows[0]["schedule_list"]] == chunk_schedule(40, max_attention_size=1024,
                                                                           max_input_len=64)


def test_compare_peers_jaxchunk_only(tmp_path):
    proc = run_script("compare_peers", *TINY, "--systems", "jaxchunk,transformers", "--prompt-lens", "64",
                      "--chunk-sizes", "16", "--dtypes", "f32", "--decode-tokens", "3", "--rounds", "2",
                      out=tmp_path)
    assert "skipping transformers" in proc.stderr  # said, not silently dropped
    df = check_outputs(tmp_path, ["prefill.png", "decode.png", "memory.png"])
    assert list(df.label) == ["jaxchunk f32 chunk 16", "jaxchunk q4 f32 chunk 16"]  # --weights dequantized,q4
    assert list(df.weights) == ["dequantized", "q4"]
    assert (df.prefill_tok_s > 0).all() and (df.decode_tok_s > 0).all()
    assert (df.rss_peak_mb > 50).all()
    assert df.vs_hf_f32.isna().all()  # no transformers row to compare with
    # --decode-runs 5 by default, each rewound to the prompt's end, in each of the 2 rounds (one
    # process each): min <= median <= max over the 10.
    assert (df.decode_runs == 10).all() and (df.decode_spread >= 1).all()
    rounds = pd.read_csv(tmp_path / "rounds.csv")
    assert sorted(rounds["round"]) == [0, 0, 1, 1] and (rounds.decode_runs == 5).all()
    assert ((df.decode_min_tok_s <= df.decode_tok_s) & (df.decode_tok_s <= df.decode_max_tok_s)).all()
    # The roofline ran first: every row has its fractions of this machine's limits.
    assert (df.prefill_of_limit > 0).all() and (df.decode_of_limit > 0).all()
    assert "roofline" in json.loads((tmp_path / "results.json").read_text())["machine"]


def test_compare_peers_ring_cache_needs_sliding_windows(tmp_path):
    """--ring-cache on a model whose layers are all global is refused up front, by name."""
    proc = run_script("compare_peers", *TINY, "--systems", "jaxchunk", "--ring-cache", out=tmp_path, check=False)
    assert proc.returncode == 2 and "--ring-cache: tiny-random has no sliding-window layers" in proc.stderr


def test_compare_peers_merges_rounds():
    """--rounds: prefill the median of the rounds' medians, decode over every run of every round."""
    from experiments.compare_peers import merge_rounds
    base = dict(label="a", prompt_len=100, first_call_s=1.0, decode_cpu_ms_per_tok=1.0, note="")
    rows = [dict(base, round=0, prefill_s=1.0, prefill_min_s=0.9, prefill_max_s=1.1, decode_runs_tok_s=[10.0, 20.0],
                 rss_peak_mb=300.0),
            dict(base, round=1, prefill_s=4.0, prefill_min_s=3.0, prefill_max_s=5.0, decode_runs_tok_s=[30.0, 40.0],
                 rss_peak_mb=200.0),
            dict(base, round=0, prompt_len=200, prefill_s=2.0, prefill_min_s=2.0, prefill_max_s=2.0,
                 decode_runs_tok_s=[5.0], rss_peak_mb=100.0)]
    merged = {row["prompt_len"]: row for row in merge_rounds(rows)}
    a = merged[100]
    assert a["rounds"] == 2 and a["prefill_s"] == 2.5 and a["prefill_tok_s"] == 40.0
    assert (a["prefill_min_s"], a["prefill_max_s"]) == (0.9, 5.0)
    decode = (a["decode_tok_s"], a["decode_min_tok_s"], a["decode_max_tok_s"], a["decode_spread"])
    assert decode == (25.0, 10.0, 40.0, 4.0)
    assert a["decode_runs"] == 4 and a["rss_peak_mb"] == 300.0 and "round" not in a
    assert merged[200]["rounds"] == 1 and merged[200]["decode_tok_s"] == 5.0


@pytest.mark.model
@pytest.mark.slow
def test_chunk_sweep_on_smollm2(tmp_path):
    """The default model: real text, so the perplexity is a language model's (not a random one's)."""
    run_script("chunk_sweep", "--prompt-lens", "96", "--chunk-sizes", "32,whole", "--dtypes", "f32",
               "--repeats", "1", out=tmp_path)
    df = check_outputs(tmp_path, ["throughput.png", "memory.png", "error.png"])
    assert (df.model == "smollm2-135m").all()
    assert (df.top1_agreement > 0.99).all() and (df.max_abs_logit_diff < 1e-2).all()
    assert (1 < df.perplexity).all() and (df.perplexity < 100).all()


def test_bench_quant_matmul_smoke(tmp_path):
    run_script("bench_quant_matmul", "--rows", "1,32", "--layers", "2", "--repeats", "1",
               "--formulations", "split_dot,dense_f32", out=tmp_path)
    df = check_outputs(tmp_path, ["quant_matmul.png"])
    assert set(df.formulation) == {"split_dot", "dense_f32"} and set(df.rows) == {1, 32}
    assert len(df) == 5 * 2 * 2 and (df.gweights_per_s > 0).all()


def test_bench_quant_matmul_gemma3_shapes_smoke(tmp_path):
    """--shapes gemma3: Gemma 3 270M's k-quant types (random blocks) next to Q4_1, native decode
    (1 row) and native prefill (32 rows) kernels."""
    run_script("bench_quant_matmul", "--shapes", "gemma3", "--rows", "1,32", "--layers", "2", "--repeats", "1",
               "--matrices", "w_down:Q4_1,w_down:Q4_K+Q6_K", "--formulations", "native_cpu,native_prefill",
               out=tmp_path)
    df = check_outputs(tmp_path, ["quant_matmul.png"])
    assert set(df.matrix) == {"w_down:Q4_1", "w_down:Q4_K+Q6_K"} and (df.gweights_per_s > 0).all()
    assert set(zip(df.rows, df.formulation)) == {(1, "native_cpu"), (32, "native_prefill")}


def test_cache_quant_writes_everything(tmp_path):
    """tiny-random has head_dim 16, so only the float formats (the q formats need 32)."""
    proc = run_script("cache_quant", *TINY, "--cache-dtypes", "bf16,fp8_e4m3", "--chunk-sizes", "16",
                      "--prompt-len", "40", "--decode-tokens", "2", out=tmp_path)
    df = check_outputs(tmp_path, ["accuracy.png", "speed.png"])
    assert list(df.cache_dtype) == ["f32", "bf16", "fp8_e4m3"]  # the f32 baseline always runs first
    np.testing.assert_allclose(df.bytes_vs_f32, [1.0, 0.5, 0.25])
    base = df[df.cache_dtype == "f32"].iloc[0]
    assert base.ppl_delta_pct == 0 and base.top1_agreement == 1 and base.max_abs_logit_diff == 0
    assert (df.max_abs_logit_diff[1:] > 0).all()  # a real comparison: rounding K/V changes logits
    assert (df.prefill_tok_per_s > 0).all() and (df.decode_tok_per_s > 0).all()
    assert "ppl_delta_pct" in proc.stdout


@pytest.mark.model
@pytest.mark.slow
def test_cache_quant_on_smollm2(tmp_path):
    run_script("cache_quant", "--cache-dtypes", "q8,q4", "--chunk-sizes", "32", "--prompt-len", "96",
               "--decode-tokens", "2", "--repeats", "1", out=tmp_path)
    df = check_outputs(tmp_path, ["accuracy.png", "speed.png"]).set_index("cache_dtype")
    # SmolLM2: 30 layers x 3 KV heads x (K, V); head_dim 64 -> f32 256 bytes, q8 64 + 2 x 2, q4 32 + 2 x 2.
    assert df.loc["f32", "bytes_per_token"] == 30 * 3 * 2 * 256
    assert df.loc["q8", "bytes_per_token"] == 30 * 3 * 2 * 68 and df.loc["q4", "bytes_per_token"] == 30 * 3 * 2 * 36
    assert abs(df.loc["q8", "ppl_delta_pct"]) < 1 and df.loc["q8", "top1_agreement"] > 0.95
    assert df.loc["q4", "max_abs_logit_diff"] > df.loc["q8", "max_abs_logit_diff"] > 0


def test_roofline_limits_follow_the_flop_count():
    """SmolLM2-135M by hand: 30 layers x (2 * 576^2 + 2 * 576 * 192 + 3 * 576 * 1536) = 106,168,320
    matrix weights; at 8100 tokens attention adds 4 * 30 * 9 * 64 * 8101 / 2 FLOPs a token. At 175
    GFLOP/s for both that is ~357 tok/s (the figure issue 20 quotes)."""
    from experiments import roofline
    from jaxchunk.config import LlamaConfig
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                         num_kv_heads=3, head_dim=64)
    assert roofline.matmul_weights(config) == 106_168_320
    assert roofline.attention_flops_per_token(config, 8100) == 4 * 30 * 9 * 64 * 8101 / 2
    # Sliding-window layers: position p sees min(p + 1, window) keys. Window 4 over 10 positions:
    # 1 + 2 + 3 + 4 + 6 * 4 = 34 keys, a global layer 55.
    windowed = dataclasses.replace(config, num_layers=2, layer_windows=(4, None))
    assert roofline.attention_flops_per_token(windowed, 10) == pytest.approx(4 * 9 * 64 * (34 + 55) / 10)
    limits = roofline.Roofline(matmul_flops={"f32": 175e9}, attention_flops={"f32": 175e9}, bandwidth_bytes=40e9,
                               chunk_size=512, cpu="test", flags=())
    assert limits.prefill_tok_s(config, 8100) == pytest.approx(175e9 / (2 * 106_168_320 + 4 * 30 * 576 * 8101 / 2))
    assert 350 < limits.prefill_tok_s(config, 8100) < 365
    # XLA's attention-shaped einsum slower than the matmuls is no limit (a fused kernel beat it): the
    # attention part then counts at the matmul rate.
    slow_einsum = roofline.Roofline(matmul_flops={"f32": 157e9}, attention_flops={"f32": 82e9},
                                    bandwidth_bytes=40e9, chunk_size=512, cpu="test", flags=())
    assert slow_einsum.prefill_tok_s(config, 8100) == pytest.approx(
        157e9 / (2 * 106_168_320 + 4 * 30 * 576 * 8101 / 2))
    # decode: f32 weights (matrices + one 49152 x 576 head) and an f32 cache of 30 layers x 3 heads x 64 x (K, V)
    wbytes = roofline.weight_bytes(config, "f32")
    assert wbytes == 4 * (106_168_320 + 49152 * 576)
    assert roofline.kv_bytes_per_token(config, "f32") == 30 * 3 * 64 * 4 * 2
    assert roofline.kv_bytes_per_token(config, "q8") == 30 * 3 * 64 * (1 + 2 / 32) * 2
    assert limits.decode_tok_s(wbytes, 0, 0) == pytest.approx(40e9 / wbytes)


def test_roofline_quick_writes_everything(tmp_path):
    from experiments import roofline
    df = roofline.main(["--quick", "--model", "tiny-random", "--chunk-size", "64", "--out", str(tmp_path)])
    for name in ("results.csv", "results.json", "roofline.png"):
        assert (tmp_path / name).stat().st_size > 0
    limits = df[df.kind == "prefill_limit"].sort_values("prompt_len")
    assert (limits.tok_s > 0).all()
    for _, group in limits.groupby("dtype"):  # longer prompts cost more attention per token
        assert group.tok_s.is_monotonic_decreasing
    assert (df[df.kind == "bandwidth"].gb_s > 0.1).all()
    # Dense decode dots: every layer matrix at 1 row, both dtypes, XLA's dot and the native gemv
    # (the CPU kernels build in CI: test_dense_gemv fails otherwise), median within its samples' range.
    dots = df[df.kind == "decode_dot"]
    assert sorted(dots.groupby(["dtype", "impl"]).size().items()) == [
        (("bf16", "native"), 7), (("bf16", "xla"), 7), (("f32", "native"), 7), (("f32", "xla"), 7)]
    assert (dots.rows == 1).all() and (dots.gb_s > 0).all()
    assert ((dots.gb_s_min <= dots.gb_s) & (dots.gb_s <= dots.gb_s_max)).all()
    summary = json.loads((tmp_path / "results.json").read_text())["machine"]["roofline"]["decode_dot_bytes"]
    assert sorted(summary) == ["bf16 native", "bf16 xla", "f32 native", "f32 xla"]
    for median, slowest, fastest in summary.values():
        assert 0 < slowest <= median <= fastest


@pytest.mark.slow
def test_ring_cache_writes_everything(tmp_path):
    """The tiny Gemma 3 (6 layers: 5 local of window 32, 1 global; 2 KV heads of 32): bytes from
    first principles, and the ring run agrees with the full-cache run."""
    run_script("ring_cache", "--quick", "--cache-dtypes", "f32", out=tmp_path)
    df = check_outputs(tmp_path, []).set_index("layout")
    nbytes = pd.read_csv(tmp_path / "bytes.csv")
    per_layer_slot = 2 * 32 * 4 * 2  # kv_heads x head_dim x f32 x (K, V)
    assert (nbytes.full_bytes_per_token == 6 * per_layer_slot).all()
    assert (nbytes.ring_growing_bytes_per_token == per_layer_slot).all()
    assert np.allclose(nbytes.ring_fixed_mb * 1024 ** 2, 5 * (32 - 1 + 64) * per_layer_slot)
    assert (tmp_path / "bytes.png").read_bytes().startswith(b"\x89PNG")
    assert df.loc["full", "max_abs_logit_diff"] == 0 and df.loc["ring", "max_abs_logit_diff"] < 1e-3
    assert df.greedy_ids_equal.all() and df.loc["ring", "cache_mb"] < df.loc["full", "cache_mb"]
    assert (df.prefill_tok_s > 0).all() and (df.decode_tok_s > 0).all()
