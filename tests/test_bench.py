"""The benchmark scripts run end to end in --tiny mode and write what BENCHMARKS.md is built from.

Tiny runs measure nothing; these tests check that each command works, that its result holds the
figures the tables need with values that follow from the setup (observer and mask counts,
sparsity, steps, ratios), and that bench/report.py puts measured results, and only those, into
BENCHMARKS.md.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

BENCH = ROOT / "bench"
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")


def bench(script: str, *args: str, tiny: bool = True) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(BENCH / script), *(["--tiny", "--threads", "1"] if tiny else []), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def step_overhead(tmp_path_factory):
    out = tmp_path_factory.mktemp("results") / "step_overhead.json"
    proc = bench("step_overhead.py", "--out", str(out))
    return json.loads(out.read_text()), proc.stdout


def test_step_overhead(step_overhead):
    result, printed = step_overhead
    v = result["variants"]
    assert list(v) == ["plain", "constant", "gmp_update", "qat", "distill"]
    assert all(r["median_ms"] > 0 for r in v.values())
    assert v["plain"]["ratio"] == 1.0
    assert (v["constant"]["target"], v["qat"]["target"], v["gmp_update"]["target"]) == (1.03, 1.15, None)
    share = result["teacher_forward"]["share_of_plain"]
    assert 0 < share and v["distill"]["target"] == pytest.approx(1 + share, abs=1e-4)
    assert v["qat"]["met"] == (v["qat"]["ratio"] <= 1.15)
    g = result["gmp_amortised"]  # constant + (update - constant) / 12
    assert g["update_interval_steps"] == 12
    assert g["median_ms"] == pytest.approx(v["constant"]["median_ms"] + (v["gmp_update"]["median_ms"]
                                                                         - v["constant"]["median_ms"]) / 12, abs=0.02)
    assert result["settings"]["tiny"] and result["settings"]["torch_threads"] == 1
    assert {"cpu", "cores", "torch", "accelerate", "transformers", "onnxruntime"} <= set(result["machine"])
    assert "| qat |" in printed and "| teacher_forward |" in printed and "--tiny" in printed


@pytest.mark.slow  # 30 s: profiles a step of the bench's job
def test_step_overhead_profile(tmp_path):
    out = tmp_path / "profile.json"
    proc = bench("step_overhead.py", "--profile", "qat", "--profile_steps", "1", "--out", str(out))
    profile = json.loads(out.read_text())["profile"]
    assert profile.startswith("## qat: 1 steps") and "Self CPU" in profile and "aten::" in profile
    assert "aten::" in proc.stdout


@pytest.mark.slow  # 30-60 s: launches 2 ranks; the sync code itself is tested in tests/test_distributed.py
def test_rank_sync(tmp_path):
    out = tmp_path / "rank_sync.json"
    proc = bench("rank_sync.py", "--out", str(out))
    result = json.loads(out.read_text())
    # tiny BERT, 2 layers: 10 Linear inputs (Q, K and V share one) + 3 embedding outputs observed; 6 encoder
    # linears per layer
    assert (result["observers"], result["masks"]) == (13, 12)
    assert result["mask_elements"] == 2 * (4 * 32 * 32 + 2 * 32 * 64)
    assert result["settings"]["world_size"] == 2 and result["step_ms"] > 0
    syncs = result["syncs"]
    assert set(syncs) == {"observer_all_reduce", "update_observers", "mask_broadcast"}
    for r in syncs.values():
        assert r["median_ms"] > 0
        assert r["share_of_step"] == pytest.approx(r["median_ms"] / result["step_ms"], rel=0.01, abs=1e-5)
        assert r["met"] == (r["share_per_step"] < 0.02)
    assert syncs["mask_broadcast"]["every_steps"] == 12
    assert "| mask_broadcast |" in proc.stdout


@pytest.mark.slow  # 70 s: four trainings and an export
def test_accuracy_then_deploy(tmp_path):
    """Benchmark 3's sparse QAT model is benchmark 4's input, as in the real sequence."""
    out, work = tmp_path / "accuracy.json", tmp_path / "sst2"
    proc = bench("accuracy_sst2.py", "--runs", "dense,gmp80_qat_kd", "--work_dir", str(work), "--out", str(out))
    assert proc.stdout.index("estimated wall time: at least") < proc.stdout.index("dense: 4 steps")
    result = json.loads(out.read_text())
    dense, sparse = result["runs"]["dense"], result["runs"]["gmp80_qat_kd"]
    assert list(result["runs"]) == ["dense", "gmp80_qat_kd"]
    # 64 rows at batch 16: 4 steps per epoch; dense 1 epoch, sparse 2
    assert (dense["steps"], sparse["steps"]) == (4, 8)
    assert dense["encoder_sparsity"] == 0.0 and sparse["encoder_sparsity"] == pytest.approx(0.8, abs=1e-3)
    assert (dense["int8_qat"], sparse["int8_qat"]) == (False, True)
    assert (dense["teacher"], sparse["teacher"]) == (None, "dense")
    assert f"--teacher {work / 'dense'}" in sparse["command"] and "--teacher disable" in dense["command"]
    assert sparse["recovery"] == round(sparse["accuracy"] / dense["accuracy"], 4)
    assert sparse["met"] == (sparse["recovery"] >= 0.98) and dense["met"] is None
    assert result["settings"]["dev_rows"] == 64

    out = tmp_path / "deploy.json"
    proc = bench("deploy_speed.py", "--model_path", str(work / "gmp80_qat_kd"), "--out", str(out))
    result = json.loads(out.read_text())
    rows = {(r["batch"], r["seq"], r["engine"]): r for r in result["results"]}
    assert set(rows) == {(b, 64, e) for b in (1, 32) for e in ("pytorch_fp32", "onnx_fp32", "onnx_int8")}
    assert all(r["ms_per_batch"] > 0 for r in rows.values())
    assert rows[(32, 64, "onnx_int8")]["ms_per_row"] == pytest.approx(rows[(32, 64, "onnx_int8")]["ms_per_batch"] / 32, abs=1e-3)
    sizes = result["sizes_mib"]
    assert sizes["onnx_int8"] < sizes["onnx_fp32"] / 2  # int8 weights
    assert result["settings"]["encoder_sparsity"] == pytest.approx(0.8, abs=1e-3) and result["settings"]["threads"] == 1
    assert list(result["targets"]) == ["int8 ≥ 2x PyTorch fp32, batch 32 seq 64"]  # tiny: seq 64 only
    assert "| onnx_int8 |" in proc.stdout


@pytest.mark.slow  # 60 s: the 2-rank OBS step launches its own processes
def test_obs_sst2(tmp_path):
    out = tmp_path / "obs.json"
    proc = bench("obs_sst2.py", "--work_dir", str(tmp_path / "work"), "--out", str(out))
    result = json.loads(out.read_text())
    runs = result["runs"]
    assert list(runs) == ["obs", "gmp"]
    for r in runs.values():  # 64 rows at batch 16, 1 epoch: 4 steps; the same recipe schedule reaches 80%
        assert r["steps"] == 4 and r["encoder_sparsity"] == pytest.approx(0.8, abs=1e-3)
    assert "!GMPruningModifier" in (tmp_path / "work" / "gmp80.yaml").read_text()
    assert "num_grads:" not in (tmp_path / "work" / "gmp80.yaml").read_text().split("pruning_modifiers:")[1]
    assert result["obs_minus_gmp_accuracy"] == round(runs["obs"]["accuracy"] - runs["gmp"]["accuracy"], 4)
    step = result["step"]
    assert [r["world_size"] for r in step["1"]] == [1] and [r["world_size"] for r in step["2"]] == [2, 2]
    for r in step["1"] + step["2"]:
        p = r["phases"]
        assert set(p) == {"grads", "fisher", "all_reduce", "inverse", "scores_update", "step"}
        assert 0 < p["grads"] + p["inverse"] <= p["step"] <= r["first_step_seconds"]
        assert r["peak_rss_mib"] >= r["rss_before_step_mib"] > 0
    inv = result["inverse"]
    assert (inv["weights"], inv["blocks"], inv["block_size"], inv["num_grads"]) == (128, 16, 8, 4)
    assert all(gap < 1e-10 for gap in inv["max_relative_gap_to_linalg_inv_float64"].values())  # the same matrix
    assert "| OBS |" in proc.stdout and "| 2 |" in proc.stdout


def test_report_uses_measured_results_only(step_overhead, tmp_path):
    result, _ = step_overhead
    results = tmp_path / "results"
    results.mkdir()
    (results / "rank_sync.json").write_text(json.dumps({"settings": {"tiny": True}}))  # a tiny one is left out
    measured = {**result, "settings": {**result["settings"], "tiny": False}}
    (results / "step_overhead.json").write_text(json.dumps(measured))
    bench("report.py", "--results", str(results), "--out", str(tmp_path / "B.md"), tiny=False)
    text = (tmp_path / "B.md").read_text()
    assert text.count("_Not yet measured._") == 5
    assert measured["command"] in text and "| constant |" in text
    assert f"| cpu | {result['machine']['cpu']} |" in text and "| torch |" in text
    for command in ("bench/rank_sync.py --out", "bench/accuracy_sst2.py --out", "bench/deploy_speed.py --model_path",
                    "bench/obs_sst2.py --out"):
        assert command in text


def test_benchmarks_step_the_job_itself(monkeypatch, tmp_path, tiny_model_dir):
    """The benchmarks call ``distsparse.train.train_step``: the events a benchmark step fires are the
    ones a training job's step fires, and no bench file fires events or steps an optimizer itself."""
    import importlib

    import distsparse.train as train_module

    fired = []
    real_fire = train_module.fire
    monkeypatch.setattr(train_module, "fire", lambda mods, event, state: (fired.append(event), real_fire(mods, event, state)))
    monkeypatch.syspath_prepend(str(BENCH))
    benchlib, step_overhead = importlib.import_module("benchlib"), importlib.import_module("step_overhead")

    run = benchlib.build_run(tiny_model_dir, step_overhead.QAT, tmp_path, "qat", "--max_seq_length", "16")
    job_step = [e for e in fired]
    fired.clear()
    batch = next(iter(run.train_loader))
    train_module.train_step(run, batch)
    bench_events = list(fired)
    fired.clear()
    job = train_module.setup(train_module.parse_args([
        "--model_name_or_path", str(tiny_model_dir), "--recipe", str(tmp_path / "qat.yaml"),
        "--output_dir", str(tmp_path / "job"), "--max_seq_length", "16", "--num_train_epochs", "0.05"]))
    assert [e.value for e in job_step] == [e.value for e in fired] == ["init", "fit_start"]
    fired.clear()
    assert train_module.train(job)
    per_step = bench_events
    assert [e.value for e in per_step] == ["batch_start", "loss", "after_backward", "optimizer_step_end"]
    assert fired[:4] == per_step  # the job's first step fires the same events in the same order
    for script in BENCH.glob("*.py"):
        text = script.read_text()
        assert "fire(" not in text and "optimizer.step(" not in text and ".backward(" not in text, script.name


@pytest.mark.slow  # 30 s: trains and exports a model first
def test_deploy_side_by_side(tmp_path, tiny_model_dir):
    """--against: our export and another int8 file timed in one process at batch 1 and 32. Here the
    other file is the same model's QDQ export, so both score the same on the dev rows."""
    from conftest import CONSTANT_PRUNING, small_recipe
    from distsparse.cli import main as cli

    recipe = tmp_path / "qat.yaml"
    recipe.write_text(small_recipe(CONSTANT_PRUNING, "quantization_modifiers:\n  - !QuantizationModifier\n"
                                   "    start_epoch: 0.0\n    exclude_module_types: [LayerNorm, Tanh]\n", num_epochs=1.0))
    run = tmp_path / "run"
    assert cli(["train", "--model_name_or_path", str(tiny_model_dir), "--recipe", str(recipe), "--output_dir", str(run),
                "--max_train_samples", "32", "--per_device_train_batch_size", "16", "--max_seq_length", "32",
                "--save_strategy", "no", "--eval_strategy", "no"]) == 0
    assert cli(["export", "--model_path", str(run), "--output_dir", str(tmp_path / "other")]) == 0
    other, out = tmp_path / "other" / "model.onnx", tmp_path / "vs.json"
    proc = bench("deploy_speed.py", "--against", str(other), "--model_path", str(run), "--out", str(out))
    result = json.loads(out.read_text())
    assert [(r["batch"], r["seq"]) for r in result["results"]] == [(1, 64), (32, 64)]  # both files: dynamic sequence
    assert all(r["ms_per_row"]["distsparse"] > 0 and r["ms_per_row"]["other"] > 0 and r["ratio"] > 0 for r in result["results"])
    assert result["bytes"]["other"] == other.stat().st_size == result["bytes"]["distsparse_qdq"]
    assert result["dev_rows"] == 200  # the bundled SST-2 sample
    acc = result["accuracy"]
    assert acc["distsparse"] == acc["other"] and abs(acc["distsparse"] - acc["pytorch_fake_quant"]) <= 0.005
    assert len(result["targets"]) == 4 and "| SST-2 dev accuracy (200 rows) |" in proc.stdout


def test_report_numbers_hand_written_sections_after_its_own(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import report

    generated = "## 4. Deployed\n\n## 4b. Side by side\n\n## 5. OBS\n"
    notes = "\n## 5. Export parity\n\ntext ## 9. inline\n\n## 6. `recipe check`\n\n## What limits the misses\n"
    assert report.numbered_after(notes, generated) == (
        "\n## 6. Export parity\n\ntext ## 9. inline\n\n## 7. `recipe check`\n\n## What limits the misses\n")


CHILD = """
import os, subprocess, sys, time
grandchild = subprocess.Popen(["sleep", "120"])  # as a training job's dataloader workers or ranks
open(sys.argv[1], "w").write(f"{os.getpid()} {grandchild.pid}")
time.sleep(120)
"""
PARENT = """
import sys
sys.path.insert(0, sys.argv[1])
import benchlib
benchlib.run_child([sys.executable, "-c", sys.argv[2], sys.argv[3]])
"""


def alive(pid: int) -> bool:
    """Running, not a zombie left for an init that does not reap."""
    try:
        stat = open(f"/proc/{pid}/stat").read()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_stopped_benchmark_leaves_no_child_running(tmp_path, sig):
    """bench.run_child: the child runs in its own process group, and the whole group (the child and
    what it started) is stopped when the benchmark gets SIGTERM or Ctrl-C."""
    import signal
    import time

    pids, started = tmp_path / "pids", []
    # Ctrl-C as from a terminal: a suite started in the background (`make test &`) inherits SIGINT
    # ignored, and Python then keeps it ignored, so the benchmark must get it back.
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(BENCH), CHILD, str(pids)], env=ENV,
                              preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 60
        while not (pids.is_file() and pids.read_text()) and time.monotonic() < deadline:
            time.sleep(0.1)
        started = child, grandchild = [int(pid) for pid in pids.read_text().split()]
        assert os.getpgid(child) == child != os.getpgid(parent.pid)  # a group of its own
        parent.send_signal(getattr(signal, sig))
        assert parent.wait(timeout=30) != 0
        assert not alive(child) and not alive(grandchild)
    finally:
        parent.kill()
        for pid in started:
            if alive(pid):
                os.kill(pid, 9)
