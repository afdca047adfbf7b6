"""The sbatch scripts in slurm/ on a real one-machine Slurm cluster (scripts/start_slurm.sh): a
two-"machine" job (two tasks of one node, each one machine of a multi-node launch), and a one-node
job that is preempted (USR1 -> checkpoint -> requeue), resumes with no step lost or repeated, and
ends with the model.

The jobs run the scripts unchanged except resources this 2-core, GPU-less machine cannot give
(--gpus-per-node=0, fewer CPUs) and the log path (tmp). Needs root (it starts slurmctld/slurmd)."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT
from test_launch_configs import write_small_job

pytestmark = pytest.mark.slurm

STEPS_PER_EPOCH = 6  # write_small_job's 48 rows / (batch 4 x 2 processes)


@pytest.fixture(scope="session")
def slurm_cluster():
    if os.geteuid() != 0:
        pytest.skip("Slurm tests need root: they install and start munge, slurmctld and slurmd")
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "start_slurm.sh")], capture_output=True, text=True, timeout=600)
    if proc.returncode == 77:
        pytest.skip(f"no Slurm cluster possible here: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.fixture
def job_env(slurm_cluster, tmp_path, tiny_model_dir):
    """What a user sets before sbatch: files for a small run, this venv on PATH, gloo on CPU."""
    train_file, recipe = write_small_job(tmp_path)
    return dict(
        os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}", HF_HOME=str(tmp_path / "hf"),
        ACCELERATE_USE_CPU="true", GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1",
        MODEL=str(tiny_model_dir), RECIPE=str(recipe), TRAIN_FILE=str(train_file),
        OUTPUT_DIR=str(tmp_path / "out"),
        EXTRA_ARGS="--per_device_train_batch_size 4 --max_seq_length 16 --logging_steps 1 --eval_strategy no",
    )


def sbatch(script: str, env: dict, log_dir: Path, *options: str) -> str:
    cmd = ["sbatch", "--parsable", "--gpus-per-node=0", f"--output={log_dir}/%x-%j.out", *options, f"slurm/{script}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    return proc.stdout.strip().split(";")[0]


def job_info(job: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, check=True).stdout
    return dict(field.split("=", 1) for field in out.split() if "=" in field)


def wait_for(job: str, done, timeout: float, what: str) -> dict[str, str]:
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = job_info(job)
        if done(info):
            return info
        time.sleep(0.5)
    raise AssertionError(f"job {job}: not {what} after {timeout:.0f} s: {info.get('JobState')} {info.get('Reason')}")


def finished(info: dict) -> bool:
    return info["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")


def log_of(job: str, log_dir: Path) -> str:
    path = next(log_dir.glob(f"*-{job}.out"), None)
    return path.read_text() if path else ""


def test_slurm_two_machine_job_is_rank_consistent(job_env, tmp_path):
    """Two tasks on one node, each one "machine" (its SLURM_PROCID as machine rank), 1 process each."""
    env = dict(job_env, NPROC_PER_NODE="1")
    job = sbatch("train_multi_node.sbatch", env, tmp_path,
                 "--nodes=1", "--ntasks=2", "--ntasks-per-node=2", "--cpus-per-task=1")
    info = wait_for(job, finished, 240, "finished")
    log = log_of(job, tmp_path)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log[-3000:]
    host = socket.gethostname()
    assert f"main process {host}:{20000 + int(job) % 20000}, 2 machines x 1 processes" in log
    assert "machine 0 of 2" in log and "machine 1 of 2" in log
    assert "rank consistency: OK" in log, log[-3000:]
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_slurm_single_node_job_preempted_requeues_resumes_and_writes_model(job_env, tmp_path):
    """One node, 2 processes. The first run is preempted; the requeued run resumes and completes."""
    epochs = 4
    env = dict(job_env, LAUNCH_CONFIG="launch_configs/cpu_2proc.yaml", NPROC_PER_NODE="2",
               EXTRA_ARGS=job_env["EXTRA_ARGS"] + f" --recipe_args num_epochs={epochs}")
    job = sbatch("train_single_node.sbatch", env, tmp_path, "--cpus-per-task=2")
    info = wait_for(job, lambda info: finished(info) or re.search(r"^step 2 ", log_of(job, tmp_path), re.M),
                    240, "training")
    assert not finished(info), log_of(job, tmp_path)[-3000:]
    # What Slurm does 90 s before the time limit (#SBATCH --signal=B:USR1@90).
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
    wait_for(job, lambda info: info["JobState"] == "PENDING" and info["Restarts"] == "1", 120, "requeued")
    # Slurm holds a requeued job ~2 min (BeginTime) so its node forgets the old run; 2 s suffice here
    # (the node rejects a new start within the same second as the old run's end).
    time.sleep(2)
    subprocess.run(["scontrol", "update", f"jobid={job}", "starttime=now"], check=True)
    info = wait_for(job, finished, 240, "finished")
    log = log_of(job, tmp_path)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), log[-3000:]

    stopped = int(re.search(r"^preempted: checkpoint at step (\d+)", log, re.M).group(1))
    assert "USR1: asking the training to checkpoint" in log and f"requeueing job {job}" in log
    assert f"job {job} (distsparse) restart 0" in log and f"job {job} (distsparse) restart 1" in log
    assert f"resumed from {tmp_path / 'out' / f'checkpoint-{stopped}'} at step {stopped}" in log
    steps = [int(s) for s in re.findall(r"^step (\d+) ", log, re.M)]
    total = epochs * STEPS_PER_EPOCH
    assert 2 <= stopped < total and steps == list(range(1, total + 1)), steps
    assert "rank consistency: OK" in log and log.rstrip().endswith("training exit 0")
    out = tmp_path / "out"
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert not (out / "PREEMPTED").exists()
    assert f'"global_step": {total}' in (out / "trainer_state.json").read_text()
