"""Data / tensor parallel inference (jaxchunk.sharding) against the same code on one device.

The device count is fixed when JAX starts, so every multi-device check runs tests/sharding_worker.py
in a subprocess with XLA_FLAGS=--xla_force_host_platform_device_count=6 (meshes 2x1, 1x2, 1x3, 2x2,
2x3 are all built from the first d * m of those 6) and asserts on the JSON it prints.

Tolerances (relative: max |sharded - single| / max |single|):
- f32: 1e-5. The sharded program sums the same products in another order (row-split partial sums
  all-reduced, vocab-split embedding gathered by a masked sum): f32 rounding, ~1e-6 observed.
- q4: 1e-5 too: the 4-bit weights are the same bits on every shard (columns by whole tiles, rows by
  whole 32-weight blocks), the arithmetic is f32; only the summation order changes.
- bf16: activations are rounded to bf16 after every matmul, so a changed f32 summation order can
  flip a rounding and the flip propagates through the layers. Bound: at most 2x bf16's own error
  (the same model in f32 vs bf16 on one device), and argmax equal wherever the top-2 gap is clear.
  Greedy bf16 generations are not required to match (a flipped near-tie changes the rest).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from jaxchunk import sharding, testing
from jaxchunk.config import LlamaConfig
from jaxchunk.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
ALL_MESHES = [[2, 1], [1, 2], [1, 3], [2, 2], [2, 3]]
F32_TOL = 1e-5
SMOLLM2 = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9,
                      num_kv_heads=3, head_dim=64)


def worker(spec: dict, devices: int = 6, timeout: float = 900) -> dict:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "sharding_worker.py"), json.dumps(spec)],
                          env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check_equivalence(result: dict, tol: float = F32_TOL, greedy: bool = True) -> None:
    for mesh, r in result["meshes"].items():
        where = f"mesh {mesh} ({r['attention']})"
        assert r["max_rel"] <= tol, f"{where}: logits differ by {r['max_rel']:.3g} > {tol}"
        if greedy:
            assert r["argmax_equal"], where
            assert r["greedy_equal"], f"{where}: {r['greedy']} != {r['greedy_ref']}"
        else:
            assert r["argmax_equal_where_clear"], where
        # The donated cache keeps its placement, is updated in place, and nothing recompiles per chunk
        # (3 chunks of 16 and 3 decode steps: one executable each).
        assert r["specs_out"] == r["specs_in"], where
        assert r["input_donated"] and not r["donation_warnings"], (where, r["donation_warnings"])
        assert r["new_prefill_executables"] <= 1 and r["new_decode_executables"] <= 1, where


# Every 6-device worker case, by the test that asserts on it. One worker process runs the cases of
# the tests selected (`six_device`): JAX starts once, each model is loaded and each single-device
# reference compiled once, instead of once per worker.
def equivalence(model: str, weights: str, meshes: list) -> dict:
    return {"case": "equivalence", "model": model, "weights": weights, "meshes": meshes}


SIX_DEVICE_CASES = {
    "test_tiny_all_meshes_f32": [equivalence("tiny", "f32", ALL_MESHES)],
    "test_tiny6_all_meshes_f32": [equivalence("tiny6", "f32", ALL_MESHES)],
    "test_query_heads_only": [equivalence("tiny_mqa", "f32", [[1, 2], [2, 2]]), equivalence("tiny", "f32", [[1, 4]])],
    "test_tiny_q4_and_bf16": [equivalence("tiny6", "q4", [[1, 3], [2, 2]]),
                              equivalence("tiny6", "bf16", [[1, 3], [2, 1]])],
    "test_smollm2_f32": [equivalence("smollm2", "f32", [[1, 2], [1, 3], [2, 3]])],
    "test_smollm2_q4_and_bf16": [equivalence("smollm2", "q4", [[1, 3], [2, 2]]),
                                 equivalence("smollm2", "bf16", [[1, 3]])],
    "test_hlo_collectives_and_memory": [{"case": "hlo_and_memory", "model": "tiny6", "weights": "f32",
                                         "meshes": ALL_MESHES}],
}


@pytest.fixture(scope="module")
def six_device(request) -> dict:
    """{test name: [worker result of each of its SIX_DEVICE_CASES]} for the tests of this session,
    from one worker process (6 forced CPU devices)."""
    names = [name for name in SIX_DEVICE_CASES
             if any(getattr(item, "originalname", None) == name for item in request.session.items)]
    specs = [spec for name in names for spec in SIX_DEVICE_CASES[name]]
    results = iter(worker({"case": "batch", "specs": specs}, timeout=900 * len(names))["results"])
    return {name: [next(results) for _ in SIX_DEVICE_CASES[name]] for name in names}


# ----------------------------------------------------------------------------- rules (in process)
@pytest.mark.parametrize("model, mode", [(1, "replicated"), (2, "replicated"), (3, "kv_heads")])
def test_plan_smollm2_heads(model, mode):
    """9 query / 3 KV heads: split over 3, not over 2 (neither divides: attention replicated)."""
    plan = sharding.plan_for(SMOLLM2, {"data": 1, "model": model})
    assert plan.attention == mode
    assert plan.rule["ffn"] == plan.rule["vocab"] == "model"
    text = sharding.describe(SMOLLM2, {"data": 2, "model": model})
    assert f"attention: {mode}" in text and "batch     -> data" in text


def test_plan_query_heads_only_and_non_dividing_axes():
    config = testing.tiny_config(num_kv_heads=1)           # 4 query heads, 1 KV head
    plan = sharding.plan_for(config, {"model": 2})
    assert plan.attention == "q_heads" and plan.rule["kv_heads"] is None and plan.rule["q_heads"] == "model"
    plan3 = sharding.plan_for(testing.tiny_config(), {"model": 3})  # vocab 256, ffn 128: not over 3
    assert plan3.attention == "replicated" and plan3.rule["vocab"] is None and plan3.rule["ffn"] is None
    # A dimension the mesh axis does not divide stays whole (a batch of 1 over data=2).
    assert sharding.plan_for(config, {"data": 2}).spec(("batch",), (1,)) == sharding.P()


def test_make_mesh_errors():
    with pytest.raises(InputError, match="needs 64 devices"):
        sharding.make_mesh(8, 8)
    with pytest.raises(InputError, match="positive int"):
        sharding.make_mesh(0, 1)


# ----------------------------------------------------------------------------- equivalence
def test_tiny_all_meshes_f32(six_device):
    """Tiny model (4 query / 2 KV heads): kv_heads mode over 2, replicated attention (and vocab,
    ffn) over 3."""
    (result,) = six_device["test_tiny_all_meshes_f32"]
    assert {r["attention"] for r in result["meshes"].values()} == {"kv_heads", "replicated"}
    check_equivalence(result)


@pytest.mark.slow
def test_tiny6_all_meshes_f32(six_device):
    """6 query / 3 KV heads, ffn 192, vocab 384: q_heads mode over 2 (KV replicated), kv_heads over 3."""
    (result,) = six_device["test_tiny6_all_meshes_f32"]
    assert {r["attention"] for r in result["meshes"].values()} == {"q_heads", "kv_heads", "replicated"}
    check_equivalence(result)


@pytest.mark.slow
def test_query_heads_only(six_device):
    """q_heads mode where model is a multiple of the KV heads: MQA (4 / 1 heads) over 2, and 4 / 2 heads
    over 4 (each shard attends to its one KV head, sliced from the replicated cache)."""
    mqa, gqa = six_device["test_query_heads_only"]
    for result in (mqa, gqa):
        assert {r["attention"] for r in result["meshes"].values()} == {"q_heads"}
        assert all("its query heads' one KV head" in r["describe"] for r in result["meshes"].values())
        check_equivalence(result)


@pytest.mark.slow
def test_tiny_q4_and_bf16(six_device):
    q4, bf16 = six_device["test_tiny_q4_and_bf16"]
    check_equivalence(q4)
    assert "quantized layers/wo" in q4["meshes"]["2x2"]["describe"]  # 96 rows = 3 blocks: not over 2
    check_equivalence(bf16, tol=2 * bf16["bf16_vs_f32"], greedy=False)


@pytest.mark.slow
def test_pallas_attention_per_shard():
    """The Pallas kernels (interpret mode here), which XLA cannot partition, inside shard_map on 2x2.
    (The native CPU decode kernel, impl="auto"'s choice for decode on CPU, is in every other test;
    test_hlo_collectives_and_memory checks its custom call is in the sharded decode step.)"""
    check_equivalence(worker({"case": "equivalence", "model": "tiny", "weights": "f32", "impl": "pallas",
                              "meshes": [[2, 2]]}, devices=4))


@pytest.mark.slow
def test_smollm2_f32(six_device):
    """SmolLM2-135M: 1x2 (heads do not divide: attention replicated), 1x3 and 2x3 (KV heads split)."""
    (result,) = six_device["test_smollm2_f32"]
    assert [r["attention"] for r in result["meshes"].values()] == ["replicated", "kv_heads", "kv_heads"]
    check_equivalence(result)


@pytest.mark.slow
def test_smollm2_q4_and_bf16(six_device):
    q4, bf16 = six_device["test_smollm2_q4_and_bf16"]
    check_equivalence(q4)
    check_equivalence(bf16, tol=2 * bf16["bf16_vs_f32"], greedy=False)


@pytest.mark.slow
def test_load_with_mesh():
    """jaxchunk.load(..., mesh=): generate, logits and perplexity as without a mesh (f32, 1x3)."""
    import numpy as np
    r = worker({"case": "api", "mesh": [1, 3]}, devices=3)
    single, mesh = r["single"], r["mesh"]
    assert mesh["texts"] == single["texts"]
    ref = np.asarray(single["logits"])
    assert np.abs(np.asarray(mesh["logits"]) - ref).max() <= F32_TOL * np.abs(ref).max()
    assert abs(mesh["perplexity"] - single["perplexity"]) <= 1e-4 * single["perplexity"]
    assert "attention: kv_heads" in mesh["info"] and single["info"] == "one device (no mesh)"
    assert "'model'" in mesh["cache_spec"]


# ----------------------------------------------------------------------------- HLO and memory
def test_hlo_collectives_and_memory(six_device):
    """Compiled decode step / prefill chunk: one all-reduce per row-split matmul (wo where the heads
    split, w_down whenever model > 1) plus the vocab-parallel embedding's, none on one device; never an
    all-gather of the cache or a weight (only, with data > 1, the chunk's new K/V rows before the
    cache scatter, and q's heads where XLA partitions a q_heads attention: KV heads 3 over model 2),
    none at all with data = 1 outside q_heads; per-device bytes of every split part 1/m (cache
    1/(d*m))."""
    (r,) = six_device["test_hlo_collectives_and_memory"]
    hidden, max_seq = r["hidden"], r["max_seq"]
    base = r["meshes"]["1x1"]
    for step in ("decode", "prefill"):
        assert not any(base[step]["collectives"].values())
    for mesh, entry in r["meshes"].items():
        if mesh == "1x1":
            continue
        data, model = map(int, mesh.split("x"))
        mode = entry["attention"]
        for step in ("decode", "prefill"):
            found = entry[step]["collectives"]
            row_sums = [s for s in found["all-reduce"] if len(s) == 3 and s[-1] == hidden]  # [b, s, hidden]
            expected = 0 if model == 1 else 3 if mode in ("kv_heads", "q_heads") else 2
            assert len(row_sums) == expected, (mesh, step, found)
            # With data > 1 one more, [batch, hidden]: each row's last token picked from data-split rows;
            # XLA's q_heads attention adds scalar ones (loop bounds).
            rest = [s for s in found["all-reduce"] if s not in row_sums and s]
            assert rest == ([[2, hidden]] if data > 1 else []), (mesh, step, found)
            gathered = found["all-gather"] + found["all-to-all"] + found["collective-permute"]
            assert all(max_seq not in s for s in gathered), (mesh, step, gathered)       # never the cache
            assert all(hidden not in s[-2:] for s in gathered), (mesh, step, gathered)  # never a weight
            if data == 1 and mode != "q_heads":
                assert not gathered, (mesh, step, gathered)
        assert entry["bytes"]["mlp"] * model == base["bytes"]["mlp"]
        assert entry["bytes"]["embed_head"] * model == base["bytes"]["embed_head"]
        split = data * (model if mode == "kv_heads" else 1)   # the cache: rows over data, KV heads over model
        assert abs(entry["bytes"]["cache"] * split - base["bytes"]["cache"]) <= 8 * split  # (lengths: int32 [batch])
        if mode == "kv_heads":
            assert entry["bytes"]["attention"] * model == base["bytes"]["attention"]
        # The native decode kernel runs per shard (a custom call in the partitioned step); in q_heads
        # mode attention is left to XLA's partitioner (backend xla: no custom call).
        if r["native_cpu"]:
            assert (entry["decode"]["custom_calls"] >= 1) == (entry["attention"] != "q_heads"), mesh
        arg = entry["decode"]["memory"]["argument"]
        assert arg <= 1.1 * base["decode"]["memory"]["argument"] / (model if entry["attention"] == "kv_heads" else 1)


# ----------------------------------------------------------------------------- paged
def test_paged_mixed_step():
    """Paged mixed steps (a prefill chunk and a decode token) on 1x3 (KV heads split) and 1x2
    (q_heads: the pool replicated), with and without the mesh context: same logits, the pool keeps
    its placement."""
    r = worker({"case": "paged", "model": "tiny6", "meshes": [[1, 3], [1, 2]]}, devices=3)
    for mesh, entry in r["meshes"].items():
        assert entry["max_rel"] <= F32_TOL and entry["argmax_equal"], mesh
        assert entry["specs_out"] == entry["specs_in"], mesh
    assert "'model'" in r["meshes"]["1x3/mesh_context"]["specs_in"][0]


# ----------------------------------------------------------------------------- several processes
def run_processes(n: int, devices_per_process: int, data: int = 1) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("XLA_FLAGS", None)
    cmd = [sys.executable, "-m", "jaxchunk.launch", "-n", str(n), "--devices-per-process", str(devices_per_process),
           "--timeout", "240", "--", sys.executable, str(ROOT / "tests" / "sharding_multiprocess.py"), str(data)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    lines = [line.split("] ", 1)[1] for line in proc.stdout.splitlines() if line.startswith("[0] {")]
    return json.loads(lines[-1])


@pytest.mark.slow
def test_two_processes_same_greedy_tokens():
    """Two processes joined over loopback (gloo), one or two devices each: meshes 1x2 and 1x4 (model
    across processes), 2x1 and 2x2 (data across processes: host reads gathered from both) give the
    greedy tokens of one process on one device."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("XLA_FLAGS", None)
    single = subprocess.run([sys.executable, str(ROOT / "tests" / "sharding_multiprocess.py")], env=env,
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert single.returncode == 0, single.stderr[-2000:]
    reference = json.loads(single.stdout.strip().splitlines()[-1])
    assert reference["processes"] == 1 and reference["devices"] == 1
    for devices_per_process, data, mode in ((1, 1, "kv_heads"), (2, 1, "q_heads"), (1, 2, "replicated"),
                                            (2, 2, "kv_heads")):
        got = run_processes(2, devices_per_process, data)
        assert got["processes"] == 2 and got["devices"] == 2 * devices_per_process
        assert got["attention"] == mode
        assert got["ids"] == reference["ids"]


def test_launcher_ends_processes_on_failure(tmp_path):
    """One process failing ends the other (which would sleep for minutes) and sets the exit status."""
    from jaxchunk.launch import launch
    script = tmp_path / "job.py"
    script.write_text("import os, sys, time\n"
                      "if os.environ['JAXCHUNK_PROCESS_ID'] == '1': sys.exit(3)\n"
                      "time.sleep(300)\n")
    assert launch([sys.executable, str(script)], 2, timeout=60) == 3


@pytest.mark.slow
def test_info_mesh_says_what_is_split(capsys):
    """`jaxchunk info MODEL --mesh DxM`: the plan for the model file's config (needs SmolLM2 fetched)."""
    from jaxchunk.cli import main
    assert main(["info", "smollm2-135m", "--mesh", "2x3"]) == 0
    out = capsys.readouterr().out
    assert "attention: kv_heads (heads 9 query / 3 KV)" in out and "batch     -> data" in out
    assert main(["info", "smollm2-135m", "--mesh", "two"]) == 2


@pytest.mark.slow
def test_experiment_script_writes_its_outputs(tmp_path):
    """experiments.sharding on the tiny model, 1x1 and 1x2 (as users run it: a subprocess that sets the
    device count itself): CSV, JSON and PNG written, the split parts halved on 1x2."""
    pd = pytest.importorskip("pandas")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, "-m", "experiments.sharding", "--model", "tiny-random", "--quick",
                           "--meshes", "1x1,1x2", "--repeats", "1", "--psum-loop", "10", "--out", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    df = pd.read_csv(tmp_path / "results.csv").set_index("mesh")
    payload = json.loads((tmp_path / "results.json").read_text())
    assert len(payload["rows"]) == 2 and payload["machine"]["load_average_1_5_15"]
    assert (tmp_path / "sharding.png").read_bytes().startswith(b"\x89PNG")
    assert df.loc["1x2", "attention"] == "kv_heads"
    # (lengths, int32 [batch], stay whole on every device)
    assert df.loc["1x2", "cache_mb"] * 2 == pytest.approx(df.loc["1x1", "cache_mb"], abs=1e-4)
    assert df.loc["1x2", "params_mb"] < 0.55 * df.loc["1x1", "params_mb"]   # all but the norms split
    assert df.loc["1x2", "hlo_all_reduce"] == 3 and df.loc["1x1", "hlo_all_reduce"] == 0
    assert df.loc["1x2", "all_reduce_us"] > 0
