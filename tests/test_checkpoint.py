"""Checkpoints from strangers and killed jobs: nothing in a checkpoint runs code, corruption is
caught before loading, ``latest`` falls back to the newest intact checkpoint, and a job killed with
SIGKILL at an arbitrary step resumes bitwise to where the uninterrupted job ends (dropout on)."""
from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import CONSTANT_PRUNING, ROOT, free_port, minilm_dir, small_recipe, tiny_bert
from distsparse import checkpoint
from distsparse.cli import main as cli

RECIPE = small_recipe(CONSTANT_PRUNING, """
quantization_modifiers:
  - !QuantizationModifier
    start_epoch: 0.5
    submodules: [bert.encoder, classifier]
""", num_epochs=3.0)
STEPS_PER_EPOCH, EPOCHS = 5, 3  # 40 rows at batch 8


class Payload:
    """What an attacker plants: unpickling it would create ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny BERT with dropout 0.1 (so the RNG matters), 48 rows, the recipe."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("ckpt")
    tiny_bert(sparsity=0.5, dropout=0.1).save_pretrained(root / "model")
    AutoTokenizer.from_pretrained(minilm_dir()).save_pretrained(root / "model")
    rows = [f"sample {i} {'good fine great' if i % 2 else 'bad poor awful'} text {i % 7},{i % 2}" for i in range(40)]
    (root / "train.csv").write_text("sentence,label\n" + "\n".join(rows) + "\n")
    (root / "recipe.yaml").write_text(RECIPE)
    return root


def job_args(files: Path, out: Path, *extra: str) -> list[str]:
    return ["--model_name_or_path", str(files / "model"), "--recipe", str(files / "recipe.yaml"),
            "--train_file", str(files / "train.csv"), "--output_dir", str(out), "--per_device_train_batch_size", "8",
            "--max_seq_length", "32", "--logging_steps", "1", "--eval_strategy", "no", "--seed", "3", *extra]


@pytest.fixture(scope="module")
def finished(files):
    """One uninterrupted run with a checkpoint every 4 steps."""
    out = files / "full"
    assert cli(["train", *job_args(files, out, "--save_strategy", "steps", "--save_steps", "4",
                                   "--save_total_limit", "10")]) == 0
    return out


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def rewrite_manifest(path: Path) -> None:
    """What an attacker who knows the format does: hashes that match the planted files."""
    files = {str(p.relative_to(path)): {"size": p.stat().st_size, "sha256": checkpoint.sha256(p)}
             for p in path.rglob("*") if p.is_file() and p.name != checkpoint.MANIFEST}
    checkpoint.write_json(path / checkpoint.MANIFEST, {"format": checkpoint.FORMAT, "step": 4, "files": files})


def resume_in_subprocess(files: Path, ckpt: Path, out: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "distsparse", "train", *job_args(files, out, "--resume_from_checkpoint", str(ckpt))]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=files)


def test_planted_pickle_never_runs(files, finished, tmp_path):
    """Every file of a checkpoint replaced in turn by a pickle with a __reduce__ payload, with the
    manifest left alone and with a manifest forged to match: resume refuses in one line, nothing runs."""
    original = finished / "checkpoint-4"
    names = sorted(str(p.relative_to(original)) for p in original.rglob("*") if p.is_file())
    assert "training_state/optimizer.bin" in names and "training_state/distsparse_state.json" in names
    for i, name in enumerate(names):
        for forged in (False, True) if name != checkpoint.MANIFEST else (False,):
            ckpt = copy_checkpoint(original, tmp_path / f"c{i}{forged}")
            marker = tmp_path / f"ran-{i}-{forged}"
            torch.save({"state": Payload(marker)}, ckpt / name)  # a zip archive, like a real torch file
            if forged:
                rewrite_manifest(ckpt)
            with pytest.raises(checkpoint.CheckpointError) as err:
                checkpoint.verify(ckpt)
            assert name.split("/")[-1] in str(err.value) and "\n" not in str(err.value)
            assert not marker.exists()
    # The same through the real command line, the forged case on the optimizer.
    ckpt = copy_checkpoint(original, tmp_path / "cli")
    marker = tmp_path / "ran-cli"
    torch.save({"state": Payload(marker)}, ckpt / "training_state/optimizer.bin")
    rewrite_manifest(ckpt)
    proc = resume_in_subprocess(files, ckpt, tmp_path / "cli-out")
    assert proc.returncode == 2 and not marker.exists()
    assert proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "optimizer.bin: references posix.system" in proc.stderr or "optimizer.bin: references" in proc.stderr


def test_extra_pickle_file_is_refused(finished, tmp_path):
    """Accelerate would unpickle custom_checkpoint_0.pkl freely: a file the manifest does not list is refused."""
    ckpt = copy_checkpoint(finished / "checkpoint-4", tmp_path / "c")
    with open(ckpt / "training_state" / "custom_checkpoint_0.pkl", "wb") as f:
        pickle.dump(Payload(tmp_path / "ran"), f)
    with pytest.raises(checkpoint.CheckpointError, match=r"custom_checkpoint_0\.pkl: not listed in the manifest"):
        checkpoint.verify(ckpt)
    assert not (tmp_path / "ran").exists()


def test_no_manifest_means_not_ours(finished, tmp_path):
    ckpt = copy_checkpoint(finished / "checkpoint-4", tmp_path / "c")
    (ckpt / checkpoint.MANIFEST).unlink()
    with pytest.raises(checkpoint.CheckpointError, match="not a distsparse checkpoint"):
        checkpoint.verify(ckpt)


def test_corruption_is_detected_and_latest_falls_back(finished, tmp_path):
    """200 flipped bytes in the newest checkpoint's model, a truncated optimizer in the one before:
    ``latest`` names both and takes the newest intact one."""
    out = tmp_path / "out"
    shutil.copytree(finished, out)
    found = checkpoint.checkpoints(out)
    newest, second, third = found[-1], found[-2], found[-3]
    model = newest / "training_state" / "model.safetensors"
    data = bytearray(model.read_bytes())
    for i in range(200):
        data[len(data) // 2 + i] ^= 0xFF
    model.write_bytes(bytes(data))
    optimizer = second / "training_state" / "optimizer.bin"
    optimizer.write_bytes(optimizer.read_bytes()[: optimizer.stat().st_size // 2])
    said = []
    assert checkpoint.resolve_resume("latest", out, say=said.append) == third
    assert said == [f"skipping {newest.name}: {model}: corrupted (size or sha256 differs from the manifest)",
                    f"skipping {second.name}: {optimizer}: corrupted (size or sha256 differs from the manifest)"]
    with pytest.raises(checkpoint.CheckpointError, match="corrupted"):
        checkpoint.resolve_resume(str(newest), out)


def test_recipe_state_is_keyed_by_modifier(files, finished, tmp_path, capsys):
    """A recipe whose modifiers changed cannot restore another modifier's state: one line."""
    changed = tmp_path / "recipe.yaml"
    changed.write_text(small_recipe(CONSTANT_PRUNING, num_epochs=3.0))  # QAT removed
    args = job_args(files, tmp_path / "out", "--resume_from_checkpoint", str(finished / "checkpoint-4"))
    args[args.index("--recipe") + 1] = str(changed)
    assert cli(["train", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert "the recipe changed since this checkpoint" in err and "quantization_modifiers[0]:QuantizationModifier" in err


# -- exact resume after SIGKILL ---------------------------------------------------------------------------
def launch(files: Path, out: Path, ranks: int, *extra: str) -> list[str]:
    train = ["-m", "distsparse.train", *job_args(files, out, "--save_strategy", "steps", "--save_steps", "3",
                                                 "--save_total_limit", "10",
                                                 "--per_device_train_batch_size", str(8 // ranks), *extra)]
    if ranks == 1:
        return [sys.executable, "-u", *train]
    return [sys.executable, "-u", "-m", "accelerate.commands.launch", "--config_file",
            str(ROOT / "launch_configs" / "cpu_2proc.yaml"), "--main_process_port", str(free_port()), *train]



def env_for(files: Path) -> dict:
    return dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", ACCELERATE_USE_CPU="true",
                HF_HOME=str(files / "hf"), GLOO_SOCKET_IFNAME="lo", MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS="1")


def run_to_end(cmd: list[str], env: dict) -> None:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def kill_after_checkpoint(cmd: list[str], env: dict, step: int) -> None:
    """Start the job and SIGKILL its whole process group as soon as it reports checkpoint-``step``."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    for line in proc.stdout:
        if re.search(rf"saved .*checkpoint-{step}$", line.strip()):
            os.killpg(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert proc.returncode != 0, "the job finished before it could be killed"


def losses(out: Path) -> dict[int, float]:
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return {row["step"]: row["train/loss"] for row in history if "train/loss" in row}


@pytest.mark.parametrize("ranks", [pytest.param(1, marks=pytest.mark.slow), 2])  # both take the same resume path
def test_sigkill_mid_epoch_then_resume_is_bitwise_exact(files, tmp_path, ranks):
    """N steps == k steps + kill -9 + resume: final weights, optimizer state, qparams and every step's
    loss bitwise equal, with dropout on, resumed mid-epoch after the QAT observers started."""
    env = env_for(files)
    full, split = tmp_path / "full", tmp_path / "split"
    run_to_end(launch(files, full, ranks), env)
    kill_after_checkpoint(launch(files, split, ranks), env, step=6)  # checkpoints at 3, 6, 9, 12: all mid-epoch
    resumed_from = checkpoint.resolve_resume("latest", split)
    assert int(resumed_from.name.split("-")[1]) % STEPS_PER_EPOCH != 0  # mid-epoch, whichever the kill hit
    run_to_end(launch(files, split, ranks, "--resume_from_checkpoint", "latest"), env)

    total = STEPS_PER_EPOCH * EPOCHS
    assert losses(full) == losses(split) and sorted(losses(full)) and len(losses(full)) == total
    for name in ("model.safetensors", "quantization.safetensors"):
        a, b = load_file(str(full / name)), load_file(str(split / name))
        assert a.keys() == b.keys() and [k for k in a if not torch.equal(a[k], b[k])] == [], name
    opt_a = torch.load(full / f"checkpoint-{total}" / "training_state" / "optimizer.bin", weights_only=True)
    opt_b = torch.load(split / f"checkpoint-{total}" / "training_state" / "optimizer.bin", weights_only=True)
    for idx, state in opt_a["state"].items():
        assert all(torch.equal(v, opt_b["state"][idx][k]) for k, v in state.items()), idx
    assert json.loads((split / "config.json").read_text())["hidden_dropout_prob"] == 0.1  # the RNG mattered
