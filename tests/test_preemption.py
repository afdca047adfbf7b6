"""Preemption by real signals outside Slurm, and errors under 2 ranks: a SIGTERM or SIGUSR1 sent to
the running job checkpoints at the end of the step, exits 0 and the resume finishes the run; a bad
input under ``accelerate launch`` with 2 processes is still said once, in one line, with no traceback
from any rank (the launcher adds its own report that a child exited with 2)."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import pytest

from conftest import ROOT, free_port, minilm_dir, small_recipe, tiny_bert
from distsparse import checkpoint


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("preempt")
    tiny_bert(sparsity=0.5).save_pretrained(root / "model")
    AutoTokenizer.from_pretrained(minilm_dir()).save_pretrained(root / "model")
    rows = [f"sample {i} {'good' if i % 2 else 'bad'} text,{i % 2}" for i in range(96)]
    (root / "train.csv").write_text("sentence,label\n" + "\n".join(rows) + "\n")
    (root / "recipe.yaml").write_text(small_recipe(num_epochs=4.0))
    return root


def command(files, out, *extra) -> list[str]:
    return [sys.executable, "-u", "-m", "distsparse", "train", "--model_name_or_path", str(files / "model"),
            "--recipe", str(files / "recipe.yaml"), "--train_file", str(files / "train.csv"),
            "--output_dir", str(out), "--per_device_train_batch_size", "8", "--max_seq_length", "16",
            "--logging_steps", "1", "--eval_strategy", "no", "--save_strategy", "no", *extra]


ENV = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGUSR1, marks=pytest.mark.slow)])  # one handler
def test_signal_checkpoints_and_resume_finishes(files, tmp_path, sig):
    out = tmp_path / "out"
    proc = subprocess.Popen(command(files, out), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if "step 3 train/loss" in line:  # tqdm's bar may share the line
            proc.send_signal(sig)
            break
    rest = proc.stdout.read()
    assert proc.wait(timeout=120) == 0, rest[-2000:]
    step = int((out / "PREEMPTED").read_text())
    assert step >= 3 and f"preempted: checkpoint at step {step}" in rest
    assert [p.name for p in checkpoint.checkpoints(out)] == [f"checkpoint-{step}"]
    done = subprocess.run(command(files, out, "--resume_from_checkpoint", "latest"), env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"resumed from {out / f'checkpoint-{step}'} at step {step}" in done.stdout
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 48 and not (out / "PREEMPTED").exists()
    logged = [row["step"] for row in state["log_history"] if "train/loss" in row]
    assert logged == list(range(1, 49))  # no step lost or repeated across the preemption


def test_bad_input_under_two_ranks_is_one_line(files, tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("sentence,target\nhello,0\n")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(ROOT / "launch_configs" / "cpu_2proc.yaml"), "--main_process_port", str(free_port()),
              "-m", "distsparse.train", *command(files, tmp_path / "out", "--train_file", str(bad))[5:]]
    env = dict(ENV, ACCELERATE_USE_CPU="true", GLOO_SOCKET_IFNAME="lo", MASTER_ADDR="127.0.0.1",
               HF_HOME=str(tmp_path / "hf"))
    proc = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    ours = [line for line in proc.stderr.splitlines() if line.startswith("distsparse train: error:")]
    assert len(ours) == 1 and str(bad) in ours[0] and "missing column 'label'" in ours[0], proc.stderr[-2000:]
    # No rank prints a traceback (torchrun then adds its own report that a child failed, naming exit code 2).
    # (a frame of our package, by its path: a clone in a folder named "distsparse" holds the venv's frames too)
    ours_frame = re.escape(f'File "{ROOT / "distsparse"}/')
    assert not re.search(rf"^\[rank\d\]:|{ours_frame}", proc.stderr, flags=re.M), proc.stderr[-3000:]
    assert "exitcode: 2" in proc.stderr



def test_resume_with_another_world_size_mid_epoch(files, tmp_path):
    """Preempted mid-epoch in one process, resumed by two: the epoch position is kept (12 steps per
    epoch become 6, so step 3 becomes step round(1.5) = 2) and the recipe's 4 epochs end at step 24."""
    out = tmp_path / "out"
    proc = subprocess.Popen(command(files, out), env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in proc.stdout:
        if "step 3 train/loss" in line:
            proc.send_signal(signal.SIGTERM)
            break
    proc.stdout.read()
    assert proc.wait(timeout=120) == 0
    step = int((out / "PREEMPTED").read_text())
    assert 0 < step % 12  # mid-epoch
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(ROOT / "launch_configs" / "cpu_2proc.yaml"), "--main_process_port", str(free_port()),
              "-m", "distsparse.train", *command(files, out, "--resume_from_checkpoint", "latest")[5:]]
    env = dict(ENV, ACCELERATE_USE_CPU="true", GLOO_SOCKET_IFNAME="lo", MASTER_ADDR="127.0.0.1",
               HF_HOME=str(tmp_path / "hf"))
    done = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed_at = round(step * 6 / 12)
    assert f"at step {resumed_at}" in done.stdout
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 24 and state["steps_per_epoch"] == 6
    logged = [row["step"] for row in state["log_history"] if "train/loss" in row]
    assert logged == list(range(1, step + 1)) + list(range(resumed_at + 1, 25))
