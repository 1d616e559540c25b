"""experiments/serving.py run as users run it (`python -m`, a subprocess) on the tiny random model with
the --quick preset cut to two workloads and two policies: every (workload, policy) is in the CSV with
its metrics, nothing compiled after warm-up, the analysis and the plot are written."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
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
        (w, p) for w in ("W1", "W2", "W4", "W4") for p in ("b16", "prefill_first"))
    assert (runs.run_compiles == 0).all()            # the warm-up covered every step shape
    assert sorted(runs.requests) == [4] * 2 + [6] * 6  # W2: 3 background + 1 long prompt; W4 with and without reuse
    for col in ("ttft_median_s", "ttft_p99_s", "tbt_median_s", "tbt_p99_s", "token_throughput", "call_s"):
        assert (runs[col] > 0).all(), col
    assert (runs.ttft_p99_s >= runs.ttft_median_s).all()
    assert (runs[runs.workload == "W2"].background_tbt_p99_s > 0).all()
    w4 = runs[runs.workload == "W4"]
    assert (w4[w4.prefix_cache == True].prefix_hit_rate > 0.3).all()  # noqa: E712  64 shared of 72 tokens (0.74 at most)
    assert (w4[w4.prefix_cache == False].prefix_hit_rate == 0).all()  # noqa: E712  (the run without reuse)
    batch = df[df.workload == "batch"].iloc[0]
    assert batch.token_throughput > 0 and batch.model_generate_tok_s > 0
    analysis = payload["settings"]["analysis"]
    assert analysis["step_model"]["calls"] > 8 and set(analysis["capacity_rps"]) == {"b16", "prefill_first"}
    assert analysis["step_model"]["held_out_calls"] > 0 and "held_out_rel_rms_error" in analysis["step_model"]
    assert (runs.slo_s == 0.5).all()  # --quick: --slo-tbt 0.5 s
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
    peer = df[df.policy == "hf"].sort_values("workload")
    assert sorted(peer.workload) == ["W1", "W2"] and (peer.system == "transformers").all()
    assert (peer.requests == [3, 4]).all()
    for col in ("ttft_median_s", "tbt_p99_s", "token_throughput", "queue_median_s"):
        assert (peer[col] > 0).all(), col
    assert (peer.same_ids_frac == 1.0).all()
    assert (df[df.policy == "b64"].same_ids_frac == 1.0).all()
    note = json.loads((out / "results.json").read_text())["settings"]["peer"]
    assert "continuous batching" in note and "attn=" in note


def test_capacity_search_finds_the_threshold():
    """search_capacity against a known threshold: doubling, then bisection; halving when the start
    fails; None below the lowest rate; each rate checked once."""
    from experiments import serving
    tried = []

    def below(threshold):
        def check(rate):
            tried.append(rate)
            return rate <= threshold
        return check

    assert serving.search_capacity(below(3.0), 1.0, 0.25, 16.0, 2) == 2.83  # 1, 2 pass, 4 fails; 2.83 p, 3.36 f
    assert tried == [1.0, 2.0, 4.0, 2.83, 3.36]
    tried.clear()
    assert serving.search_capacity(below(0.3), 1.0, 0.25, 16.0, 1) == 0.25  # 1, 0.5 fail, 0.25 passes; 0.354 f
    assert tried == [1.0, 0.5, 0.25, 0.354]
    assert serving.search_capacity(below(0.1), 1.0, 0.25, 16.0, 1) is None
    assert serving.search_capacity(below(100.0), 1.0, 0.25, 16.0, 1) == 16.0


def test_capacity_summary_says_what_zero_means():
    from experiments import serving
    df = pd.DataFrame([dict(workload="W1", policy=p, rate=r, tbt_p99_s=t, queue_median_s=q, slo_s=1.0)
                       for p, r, t, q in [("prefill_first", 0.25, 0.9, 0.1), ("prefill_first", 0.5, 1.5, 0.1),
                                          ("b64", 0.25, 0.5, 0.1), ("b64", 0.5, 0.6, 0.2), ("b64", 1.0, 0.6, 2.5),
                                          ("exllamav2", 0.25, 1.2, 0.1)]])
    summary = serving.capacity_summary(df)
    assert summary["capacity_rps"] == {"b64": 0.5, "exllamav2": 0.0, "prefill_first": 0.25}
    assert summary["ratio_vs_prefill_first"] == {"b64": 2.0, "exllamav2": 0.0}
    assert summary["meaning"]["exllamav2"] == "0: below the lowest rate tried (0.25 rps)"
    assert summary["meaning"]["b64"] == "0.5 rps (fails at 1)"


def test_step_model_recovers_known_coefficients():
    """fit_step_model on calls made from known per-shape constants and per-token costs (2 % noise):
    the coefficients come back and the held-out error is the noise's size."""
    from experiments import serving
    rng = np.random.default_rng(0)
    base = {16: 0.1, 64: 0.3, 256: 1.0}
    calls = []
    for _ in range(400):
        t = int(rng.choice(list(base)))
        rows = int(rng.integers(1, 9))
        prefill = int(rng.integers(0, t - rows + 1))
        kv = int(rng.integers(rows, 2000))
        s = base[t] + 2e-3 * prefill + 5e-3 * rows + 1e-5 * kv
        calls.append(dict(token_bucket=t, max_seqs=16, prefill_tokens=prefill, decode_rows=rows, kv_tokens=kv,
                          device_s=s * (1 + 0.02 * rng.standard_normal()), run_decode_step_s=0.1))
    fit = serving.fit_step_model(calls)
    assert fit["held_out_calls"] == 100 and fit["held_out_rel_rms_error"] < 0.04
    np.testing.assert_allclose([fit["shape_s"][f"T={t},S=16"] for t in base], list(base.values()), rtol=0.05)
    np.testing.assert_allclose([fit["per_prefill_token_s"], fit["per_decode_row_s"]], [2e-3, 5e-3], rtol=0.15)
    steps = serving.fit_step_model(calls, in_decode_steps=True)  # the same in units of 0.1 s
    np.testing.assert_allclose(steps["shape_s"]["T=256,S=16"], 10.0, rtol=0.05)
    best, predicted = serving.predicted_budget(fit, [16, 64, 256], 16, decode_rows=4, kv_tokens=1000, target_s=0.5)
    assert best == 64 and predicted[256] > 0.5  # 0.3 + 0.12 + 0.02 + 0.01 = 0.45 s at 64


def test_policies_get_power_of_two_buckets_unless_asked_not_to():
    from experiments import serving
    args = serving.parse_args(["--model", "tiny-random", "--preset", "smollm", "--policies", "b256"])
    assert serving.policy_kwargs("b256", args, 64) == dict(policy="stall_free", token_budget=256,
                                                           token_buckets=(16, 32, 64, 128, 256))
    assert serving.policy_kwargs("exllamav2", args, 64)["token_buckets"] == (16, 32, 64, 128, 256)
    assert serving.policy_kwargs("prefill_first", args, 100) == dict(policy="prefill_first", token_budget=128)
    args = serving.parse_args(["--model", "tiny-random", "--preset", "smollm", "--policies", "b256",
                               "--buckets", "budget"])
    assert serving.policy_kwargs("b256", args, 64) == dict(policy="stall_free", token_budget=256)
