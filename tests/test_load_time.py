"""experiments.load_time, run as users run it (`python -m`), on a tiny GGUF (no model file, no llama.cpp):
every output written, one row per fresh process, the summary and breakdown consistent with them."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from test_weights_api import write_model_gguf

pd = pytest.importorskip("pandas")
pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[1]


def test_load_time_script_writes_everything(tmp_path):
    model = write_model_gguf(tmp_path / "tiny.gguf")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "experiments.load_time", "--model", str(model),
                           "--weights", "f32,q4", "--repeats", "2", "--no-llama-cpp", "--generate-runs", "1",
                           "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = pd.read_csv(out / "results.csv")
    assert sorted(runs.weights) == ["f32", "f32", "q4", "q4"] and set(runs.system) == {"jaxchunk"}
    assert (runs.load_s > 0).all() and (runs.import_s > 0).all()
    assert all(Path(m).is_relative_to(ROOT) for m in runs.module)  # this checkout's jaxchunk was timed
    summary = pd.read_csv(out / "summary.csv")
    for _, row in summary.iterrows():
        times = runs[runs.weights == row.weights].load_s
        assert row.load_s_min == pytest.approx(times.min()) and row.load_s_max == pytest.approx(times.max())
    breakdown = pd.read_csv(out / "breakdown.csv")
    assert list(breakdown.weights) == ["f32", "q4"] and (breakdown.sum_s > 0).all()
    payload = json.loads((out / "results.json").read_text())
    assert payload["machine"]["load_average_1_5_15"] and payload["settings"]["model_bytes"] == model.stat().st_size
    for name in ("load_time.png", "generate.png"):
        png = (out / name).read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 10_000
    generate = pd.read_csv(out / "generate.csv", keep_default_na=False)
    assert list(generate.run) == ["first", "second", "cache off"] and (generate.wall_s > 0).all()
    assert generate.text.nunique() == 1  # the same greedy text from a cold, a warm and no compilation cache
