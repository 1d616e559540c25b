"""experiments/serving.py run as users run it (`python -m`, a subprocess) on the tiny random model with
the --quick preset cut to two workloads and two policies: every (workload, policy) is in the CSV with
its metrics, nothing compiled after warm-up, the analysis and the plot are written."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

pd = pytest.importorskip("pandas")
pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--model", "tiny-random", "--quick", "--workloads", "W1,W2,W4,batch", "--policies", "b16,prefill_first",
        "--rates", "16", "--requests", "6"]


@pytest.mark.slow
def test_serving_experiment_writes_every_run(tmp_path):
    out = tmp_path / "serving"
    proc = subprocess.run([sys.executable, "-m", "experiments.serving", *ARGS, "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    df = pd.read_csv(out / "results.csv")
    payload = json.loads((out / "results.json").read_text())
    assert len(payload["rows"]) == len(df)
    runs = df[df.workload != "batch"]
    assert sorted(zip(runs.workload, runs.policy)) == sorted(
        (w, p) for w in ("W1", "W2", "W4") for p in ("b16", "prefill_first"))
    assert (runs.run_compiles == 0).all()            # the warm-up covered every step shape
    assert (runs.requests == [6] * 2 + [4] * 2 + [6] * 2).all()  # W2: 3 background + 1 long prompt
    for col in ("ttft_median_s", "ttft_p99_s", "tbt_median_s", "tbt_p99_s", "token_throughput", "call_s"):
        assert (runs[col] > 0).all(), col
    assert (runs.ttft_p99_s >= runs.ttft_median_s).all()
    assert (runs[runs.workload == "W2"].background_tbt_p99_s > 0).all()
    assert (runs[runs.workload == "W4"].prefix_hit_rate > 0.3).all()  # 64 shared of 72 tokens (0.74 at most)
    batch = df[df.workload == "batch"].iloc[0]
    assert batch.token_throughput > 0 and batch.model_generate_tok_s > 0
    analysis = payload["settings"]["analysis"]
    assert analysis["step_model"]["calls"] > 8 and set(analysis["capacity_rps"]) == {"b16", "prefill_first"}
    data = (out / "serving.png").read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 10_000


def test_the_transformers_peer_needs_the_gguf():
    from experiments import serving
    with pytest.raises(SystemExit):
        serving.parse_args(["--model", "tiny-random", "--quick", "--policies", "b16,hf"])


@pytest.mark.slow
@pytest.mark.model
@pytest.mark.peers
def test_transformers_peer_runs_the_same_workload(tmp_path, smollm2_gguf):
    """The "hf" policy (transformers' continuous batching, its own process) next to the generator on
    SmolLM2: a row per workload with its metrics, and its greedy ids equal the generator's (f32 on
    both sides; transformers is the independent implementation)."""
    pytest.importorskip("transformers")
    out = tmp_path / "serving"
    proc = subprocess.run([sys.executable, "-m", "experiments.serving", "--quick", "--workloads", "W1,W2",
                           "--policies", "b64,hf", "--rates", "8", "--requests", "3", "--w2-output-len", "8",
                           "--out", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    df = pd.read_csv(out / "results.csv")
    peer = df[df.policy == "hf"]
    assert sorted(peer.workload) == ["W1", "W2"] and (peer.system == "transformers").all()
    assert (peer.requests == [3, 4]).all()
    for col in ("ttft_median_s", "tbt_p99_s", "token_throughput", "queue_median_s"):
        assert (peer[col] > 0).all(), col
    assert (peer.same_ids_frac == 1.0).all()
    assert (df[df.policy == "b64"].same_ids_frac == 1.0).all()
    note = json.loads((out / "results.json").read_text())["settings"]["peer"]
    assert "continuous batching" in note and "attn=" in note
