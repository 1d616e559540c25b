"""experiments/paged_step.py run as users run it (`python -m`, a subprocess) on the tiny random
model with small settings: every configuration is in the CSV with positive times, the timed calls
compiled nothing, and the plot is written."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

pd = pytest.importorskip("pandas")
pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--model", "tiny-random", "--quick", "--prompt-len", "128", "--chunk-sizes", "32,128", "--decode-context",
        "64", "--batches", "1,4", "--page-sizes", "16,64", "--mixed-decodes", "4", "--mixed-chunk", "28",
        "--mixed-chunk-cached", "16", "--mixed-budget", "32", "--repeats", "2",
        "--sections", "prefill,decode,mixed,attention,blocks,llama.cpp"]


def test_paged_step_experiment_writes_every_configuration(tmp_path):
    out = tmp_path / "paged_step"
    proc = subprocess.run([sys.executable, "-m", "experiments.paged_step", *ARGS, "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)  # ~5 min at load 9
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    df = pd.read_csv(out / "results.csv")
    payload = json.loads((out / "results.json").read_text())
    assert len(payload["rows"]) == len(df)
    # The pages_per_block sweep: per query tier (1, 8, the first chunk size) and page size, a time for
    # each candidate and the fastest named.
    blocks, df = df[df.kind == "blocks"], df[df.kind != "blocks"]
    assert sorted(zip(blocks.chunk, blocks.page_size)) == [(q, p) for q in (1, 8, 32) for p in (16, 64)]
    assert (blocks.best_pages_per_block >= 1).all() and (blocks.timed_compiles == 0).all()
    assert (blocks.ppb_1_min_s > 0).all() and (blocks.ppb_1_min_s <= blocks.ppb_1_median_s).all()
    machine = payload["machine"]
    assert len(machine["load_average_1_5_15"]) == len(machine["load_average_after_1_5_15"]) == 3
    assert payload["settings"]["page_sizes"] == [16, 64]

    def configs(kind):
        part = df[df.kind == kind]
        return sorted(zip(part.chunk if kind == "prefill" else part.batch, part.page_size))

    assert configs("prefill") == [(c, p) for c in (32, 128) for p in (16, 64)]
    assert configs("decode") == [(b, p) for b in (1, 4) for p in (16, 64)]
    assert sorted(df[df.kind == "mixed"].page_size) == [16, 64]
    attention = df[df.kind == "attention"]
    # decode batches 1, 4 and prefill chunks 32, 128, each per page size
    assert sorted(zip(attention.batch, attention.chunk, attention.page_size)) == sorted(
        [(b, 1, p) for b in (1, 4) for p in (16, 64)] + [(1, c, p) for c in (32, 128) for p in (16, 64)])
    assert attention.step_gap_s.notna().all() and attention.attention_gap_x_layers_s.notna().all()
    assert (attention.paged_1page_median_s > 0).all() and (attention.ratio_1page > 0).all()
    assert "llama.cpp" not in set(df.kind)  # the tiny model has no GGUF
    timed = df[df.kind != "attention"]
    for col in ("paged_median_s", "paged_min_s", "paged_max_s", "paged_tok_s", "contig_tok_s", "ratio"):
        assert (df[col] > 0).all(), col
    for col in ("contig_median_s", "contig_min_s", "contig_max_s"):
        part = df[df.kind.isin(["prefill", "decode", "attention"])][col]
        assert (part > 0).all(), col
    assert (df[df.kind == "decode"].contig_xla_tok_s > 0).all()
    assert (df[df.kind == "decode"].paged_native_tok_s > 0).all()  # the paged step on the native backend too
    attention = df[df.kind == "attention"]
    assert (attention.paged_native_median_s > 0).all() and (attention.paged_xla_median_s > 0).all()
    mixed = df[df.kind == "mixed"]
    assert (mixed.sum_parts_median_s > 0).all() and (mixed.decodes_median_s > 0).all()
    assert (df.paged_min_s <= df.paged_median_s).all() and (df.paged_median_s <= df.paged_max_s).all()
    assert (timed.warmup_compiles > 0).all()  # the warm-up compiled each new shape ...
    assert (df.timed_compiles == 0).all()     # ... and the timed calls nothing
    # Paged and contiguous attention agree (same K/V values, pages permuted).
    assert (df[df.kind == "attention"].max_abs_diff < 1e-4).all()
    data = (out / "paged_step.png").read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 10_000
