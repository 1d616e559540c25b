"""The `jaxchunk` command end to end, through `python -m jaxchunk.cli` in a subprocess.

The flag-validation and missing-model cases never load weights (~1 s each). Each test that runs
the model loads it in its own process (~10-20 s), so there are only three of those.
"""
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args, stdin=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "jaxchunk.cli", *map(str, args)], input=stdin,
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def assert_one_line_error(proc, pattern):
    """Exit status 2, no traceback, and exactly one `error: ...` line matching `pattern`."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and re.search(pattern, errors[0]), proc.stderr
    assert not proc.stdout


# ----------------------------------------------------------------------------- no model needed
def test_help_explains_every_flag():
    for command, flags in {
        "fetch": [], "info": [],
        "generate": ["--model", "--prompt", "--max-new-tokens", "--temperature", "--top-k", "--top-p", "--min-p",
                     "--repetition-penalty", "--seed", "--chunk-size", "--dtype", "--attention-impl", "--stop",
                     "--chat", "--system", "--max-seq-len", "--weights", "--cache-dtype"],
        "perplexity": ["--max-tokens", "--chunk-size", "--model"],
        "bench": ["--prompt-lengths", "--decode-tokens", "--repeats", "--json", "--peers"],
    }.items():
        proc = run_cli(command, "--help")
        assert proc.returncode == 0, proc.stderr
        for flag in flags:
            # Each flag is listed with a sentence of help after it, not just in the usage line.
            assert re.search(rf"^\s+{flag}\b.*\n?.*\w+", proc.stdout, re.M), (command, flag)
    top = run_cli("--help")
    assert top.returncode == 0 and all(c in top.stdout for c in ("fetch", "info", "generate", "perplexity", "bench"))


@pytest.mark.parametrize("args, pattern", [
    (["generate", "--chunk-size", "0", "--prompt", "x"], r"--chunk-size: must be a positive integer"),
    (["generate", "--temperature", "-1", "--prompt", "x"], r"--temperature: must be a number >= 0"),
    (["generate", "--top-p", "0", "--prompt", "x"], r"--top-p: must be a number in \(0, 1\]"),
    (["generate", "--min-p", "1.5", "--prompt", "x"], r"--min-p"),
    (["generate", "--repetition-penalty", "0", "--prompt", "x"], r"--repetition-penalty: must be a number > 0"),
    (["generate", "--max-new-tokens", "abc", "--prompt", "x"], r"--max-new-tokens"),
    (["perplexity", "f.txt", "--max-tokens", "1"], r"--max-tokens: must be an integer >= 2"),
    (["bench", "--prompt-lengths", "128,0"], r"--prompt-lengths"),
    (["generate", "--dtype", "f16", "--prompt", "x"], r"--dtype: invalid choice"),
    (["generate", "--cache-dtype", "q3", "--prompt", "x"], r"unknown cache dtype 'q3'; choose one of .*q4"),
    (["generate", "--cache-dtype", "k5v4", "--prompt", "x"], r"cache dtype 'k5v4': key bits 5 not one of"),
    (["generate", "--cache-dtype", "bf16/q3", "--prompt", "x"], r"unknown cache dtype 'q3'"),
    (["frobnicate"], r"invalid choice"),
])
def test_bad_flag_values(args, pattern):
    assert_one_line_error(run_cli(*args), pattern)


def test_missing_model_and_files(tmp_path):
    assert_one_line_error(run_cli("generate", "--model", tmp_path / "nope.gguf", "--prompt", "hi"),
                          r"nope\.gguf.*neither an existing path nor a known model")
    assert_one_line_error(run_cli("fetch", "no-such-model"), r"unknown model 'no-such-model'")
    not_gguf = tmp_path / "weights.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 definitely not a gguf")
    assert_one_line_error(run_cli("info", not_gguf), r"not a GGUF file")
    assert_one_line_error(run_cli("perplexity", tmp_path / "missing.txt"), r"cannot read .*missing\.txt")


def test_bench_peers_runs_the_experiment_module_from_any_directory(tmp_path):
    """`bench --peers` hands over to `python -m experiments.compare_peers` of this checkout, from the
    caller's directory (relative paths in its arguments keep their meaning)."""
    import os
    env = dict(os.environ, PYTHONPATH=str(ROOT))  # this checkout's jaxchunk, not an installed one
    proc = subprocess.run([sys.executable, "-m", "jaxchunk.cli", "bench", "--peers", "--", "--help"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "--systems" in proc.stdout and "transformers" in proc.stdout, proc.stdout


def test_bench_peers_without_experiments_is_a_clean_error(monkeypatch, tmp_path, capsys):
    """An installed package has no experiments/: one error line, no traceback."""
    from jaxchunk import cli
    monkeypatch.setattr(cli, "PEER_SCRIPT", tmp_path / "experiments" / "compare_peers.py")
    assert cli.main(["bench", "--peers"]) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(r"error: .*needs experiments/compare_peers\.py.*source checkout\)\n", err), err


# ----------------------------------------------------------------------------- with the model
@pytest.mark.model
def test_fetch_prints_the_path(smollm2_gguf):
    proc = run_cli("fetch")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(smollm2_gguf)


@pytest.mark.model
def test_info_shows_config_tensors_and_tokenizer(smollm2_gguf):
    proc = run_cli("info", smollm2_gguf)
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"^\s+num_layers: 30$", proc.stdout, re.M)
    assert re.search(r"Q4_1:\s+210 tensors", proc.stdout)
    assert re.search(r"tokenizer: .*vocab 49152.*eos 2 '<\|im_end\|>'", proc.stdout)


@pytest.mark.model
@pytest.mark.slow
def test_generate_greedy_prints_text():
    proc = run_cli("generate", "--prompt", "The capital of France is", "--temperature", "0",
                   "--max-new-tokens", "8", "--chunk-size", "4")
    assert proc.returncode == 0, proc.stderr
    assert "Paris" in proc.stdout  # SmolLM2's greedy continuation: " Paris.\n\nThe answer is:"
    assert "Traceback" not in proc.stderr


@pytest.mark.model
@pytest.mark.slow
def test_perplexity_of_a_small_file(tmp_path):
    from jaxchunk.corpus import reference_text
    text_file = tmp_path / "text.txt"
    text_file.write_text(reference_text(3000)[:3000], encoding="utf-8")
    proc = run_cli("perplexity", text_file, "--max-tokens", "300", "--chunk-size", "64")
    assert proc.returncode == 0, proc.stderr
    match = re.search(r"perplexity: ([0-9.]+) \(300 tokens", proc.stdout)
    assert match, proc.stdout
    assert math.isfinite(float(match.group(1))) and 1 < float(match.group(1)) < 100


@pytest.mark.model
@pytest.mark.slow
def test_prompt_longer_than_the_cache_is_a_clean_error():
    proc = run_cli("generate", "--max-seq-len", "32", "--max-new-tokens", "4",
                   stdin="A prompt read from stdin that is longer than thirty-two tokens. " * 4)
    assert_one_line_error(proc, r"prompt 0 \(\d+ tokens\) \+ max_new_tokens \(4\) does not fit the cache.*"
                                r"max_seq_len=32")


@pytest.mark.model
@pytest.mark.slow
def test_bench_writes_a_table_and_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = run_cli("bench", "--prompt-lengths", "24,40", "--decode-tokens", "4", "--repeats", "3",
                   "--chunk-size", "16", "--weights", "q4", "--cache-dtype", "q8", "--json", out)
    assert proc.returncode == 0, proc.stderr
    import json
    report = json.loads(out.read_text())
    assert report["weights"] == "q4" and report["dtype"] == "f32" and report["cache_dtype"] == "q8"
    assert [r["prompt_tokens"] for r in report["results"]] == [24, 40]
    for row in report["results"]:
        for key in ("prefill_tok_s", "decode_tok_s_on_device", "decode_tok_s_streaming"):
            assert math.isfinite(row[key]) and row[key] > 0, (key, row)
        for timing in row["seconds"].values():  # the spread behind each tok/s (median of --repeats)
            assert 0 < timing["min_s"] <= timing["median_s"] <= timing["max_s"] and len(timing["samples_s"]) == 3
        prefill = row["seconds"]["prefill"]
        assert row["prefill_tok_s"] == row["prompt_tokens"] / prefill["median_s"]
        assert row["tok_s_min_max"]["prefill"] == [row["prompt_tokens"] / prefill["max_s"],
                                                   row["prompt_tokens"] / prefill["min_s"]]
    # prompt, then three "median [slowest-fastest]" cells, then the decode's spread
    cell = r"[0-9.]+ \[[0-9.]+-[0-9.]+\]"
    assert re.search(rf"^\s+24\s+{cell}\s+{cell}\s+{cell}\s+[0-9.]+$", proc.stdout, re.M), proc.stdout
