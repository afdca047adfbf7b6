"""W&B tracking: a 2-rank CPU job makes one offline run whose logged values match the saved model,
its config holds the resolved recipe, and a resumed job continues the same run."""
from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, free_port, minilm_dir, tiny_bert
from distsparse import tracking
from distsparse.errors import UserError
from test_launch_configs import accelerate_launch, launch_env

DATA = ROOT / "distsparse" / "data"
STEPS_PER_EPOCH = 4  # 32 rows / (4 per device x 2 ranks)
EPOCHS, INIT_LR, QAT_START, FREEZE = 2, 1e-3, 1.0, 1.5
RECIPE = f"""
num_epochs: {EPOCHS}
lr: {INIT_LR}
qat_start_epoch: {QAT_START}
observer_freeze_epoch: eval(qat_start_epoch + 0.5)
distill_hardness: 0.5
distill_temperature: 2.0
training_modifiers:
  - !EpochRangeModifier {{start_epoch: 0.0, end_epoch: eval(num_epochs)}}
  - !LearningRateFunctionModifier
    {{start_epoch: 0.0, end_epoch: eval(num_epochs), lr_func: linear, init_lr: eval(lr), final_lr: 0.0}}
pruning_modifiers:
  - !ConstantPruningModifier {{start_epoch: 0.0, params: __ALL_PRUNABLE__}}
distillation_modifiers:
  - !DistillationModifier
    {{start_epoch: 0.0, hardness: eval(distill_hardness), temperature: eval(distill_temperature)}}
quantization_modifiers:
  - !QuantizationModifier
    start_epoch: eval(qat_start_epoch)
    disable_quantization_observer_epoch: eval(observer_freeze_epoch)
    submodules: [bert.encoder]
"""

# --- reading an offline run file (LevelDB log format: 32 KiB blocks of CRC'd, typed chunks) -------
BLOCK, HEADER = 32768, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path):
    """Every protobuf ``Record`` in a ``run-*.wandb`` file, in order."""
    from wandb.proto.wandb_internal_pb2 import Record

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a W&B run file"
    pos, chunks = HEADER, b""
    while pos + HEADER <= len(data):
        if BLOCK - pos % BLOCK < HEADER:  # a block's tail too short for a chunk header is padding
            pos += BLOCK - pos % BLOCK
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + HEADER])
        if kind == 0:
            break
        chunks += data[pos + HEADER:pos + HEADER + length]
        pos += HEADER + length
        if kind in (FULL, LAST):
            record = Record()
            record.ParseFromString(chunks)
            yield record
            chunks = b""


def item_key(item) -> str:
    return item.key or ".".join(item.nested_key)


def read_run(run_dir: Path) -> dict:
    """{"id", "history": {step: {key: value}}, "config": {key: value}, "files": [paths]} of one run."""
    (path,) = run_dir.glob("run-*.wandb")
    run = {"history": {}, "config": {}, "files": []}
    for record in read_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run["id"] = record.run.run_id
            updates = record.run.config.update
        elif kind == "config":
            updates = record.config.update
        elif kind == "history":
            row = {item_key(i): json.loads(i.value_json) for i in record.history.item}
            run["history"].setdefault(row["_step"], {}).update(row)
            continue
        elif kind == "files":
            run["files"] += [f.path for f in record.files.files]
            continue
        else:
            continue
        run["config"].update({item_key(u): json.loads(u.value_json) for u in updates})
    return run


# --- the job ---------------------------------------------------------------------------------------
def train_args(model: Path, recipe: Path, out: Path, *extra: str) -> list[str]:
    return ["-m", "distsparse.train", "--model_name_or_path", str(model), "--teacher", "self",
            "--recipe", str(recipe), "--recipe.distill_hardness=0.75",
            "--train_file", str(DATA / "sst2_sample_train.tsv"), "--validation_file", str(DATA / "sst2_sample_dev.tsv"),
            "--max_train_samples", "32", "--max_eval_samples", "16", "--max_seq_length", "32",
            "--per_device_train_batch_size", "4", "--logging_steps", "1", "--output_dir", str(out),
            "--report_to", "wandb", "--wandb_project", "distsparse-test", "--run_name", "tiny",
            "--wandb_group", "ci", "--wandb_tags", "a,b", *extra]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """One 2-rank CPU job with WANDB_MODE=offline (and its environment, for a resume)."""
    tmp = tmp_path_factory.mktemp("wandb")
    model = tmp / "tiny-bert"
    tiny_bert(sparsity=0.5).save_pretrained(model)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(minilm_dir()).save_pretrained(model)
    recipe = tmp / "recipe.yaml"
    recipe.write_text(RECIPE)
    env = launch_env(tmp, WANDB_MODE="offline", WANDB_DIR=str(tmp / "wandb"), ACCELERATE_USE_CPU="true")
    out = tmp / "out"
    cmd = accelerate_launch(ROOT / "launch_configs" / "cpu_2proc.yaml", free_port(), *train_args(model, recipe, out))
    proc = subprocess.run(cmd, env=env, cwd=tmp, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return {"tmp": tmp, "model": model, "recipe": recipe, "out": out, "env": env, "runs": offline_runs(tmp)}


def offline_runs(tmp: Path) -> list[Path]:
    return sorted((tmp / "wandb" / "wandb").glob("offline-run-*"))


def linear_weight_sparsity(model_dir: Path, where: str = "") -> float:
    """Zeros / elements of the saved Linear weights (2-D ``*.weight`` of the encoder, pooler, head)."""
    weights = load_file(str(model_dir / "model.safetensors"))
    linear = [w for k, w in weights.items() if k.endswith(".weight") and w.dim() == 2
              and "embeddings" not in k and where in k]
    return sum(int((w == 0).sum()) for w in linear) / sum(w.numel() for w in linear)


def test_two_ranks_make_one_run_with_correct_values(job):
    runs = job["runs"]
    assert len(runs) == 1, runs
    run = read_run(runs[0])
    history, config = run["history"], run["config"]
    total = EPOCHS * STEPS_PER_EPOCH
    train_steps = [s for s in history if "train/loss" in history[s]]
    assert train_steps == list(range(1, total + 1))

    # Final sparsity logged = sparsity of the saved model (and it is the tiny model's 50% encoder).
    last = history[total]
    assert last["sparsity/linear"] == pytest.approx(linear_weight_sparsity(job["out"]), abs=1e-12)
    assert last["sparsity/attention"] == pytest.approx(linear_weight_sparsity(job["out"], "attention"), abs=1e-12)
    assert last["sparsity/attention"] == pytest.approx(0.5, abs=0.01)
    assert 0.4 < last["sparsity/linear"] < 0.5  # pooler and classifier are dense

    for step in train_steps:
        row = history[step]
        done = step - 1  # the optimizer step just taken, 0-based
        assert row["train/epoch"] == pytest.approx(step / STEPS_PER_EPOCH)
        assert row["train/lr"] == pytest.approx(INIT_LR * (1 - done / total))  # the LR that step used
        assert row["qat/enabled"] == float(done >= QAT_START * STEPS_PER_EPOCH)
        assert row["qat/observers_frozen"] == float(done >= FREEZE * STEPS_PER_EPOCH)
        assert row["train/samples_per_second"] > 0
        for key in ("train/loss", "train/task_loss", "train/distill_loss"):
            assert math.isfinite(row[key]) and row[key] >= 0, (key, row)
    evals = [s for s in history if "eval/accuracy" in history[s]]
    assert evals == [STEPS_PER_EPOCH, total]
    final = json.loads((job["out"] / "trainer_state.json").read_text())["metrics"]
    assert history[total]["eval/accuracy"] == pytest.approx(final["eval/accuracy"])
    # The job's pictures and its per-layer sparsity table, logged at the last step (2 layers x 6 weight types).
    assert last["report/curves._type"] == last["report/sparsity._type"] == "image-file"
    assert (last["report/curves.width"], last["report/sparsity.width"]) == (1000, 1000)
    assert last["report/sparsity_per_layer._type"] == "table-file"
    table = json.loads((runs[0] / "files" / last["report/sparsity_per_layer.path"]).read_text())
    assert table["columns"] == ["layer", "query", "key", "value", "attention-output", "intermediate", "output"]
    assert [row[0] for row in table["data"]] == [0, 1]
    assert all(value == pytest.approx(0.5) for row in table["data"] for value in row[1:])  # tiny_bert's 50%

    # Config: every argument, the resolved recipe (eval done, override applied), world size, backend.
    assert config["world_size"] == 2 and config["backend"] == "gloo"
    assert config["learning_rate"] == 5e-5 and config["per_device_train_batch_size"] == 4
    assert config["recipe_args"] == {"distill_hardness": 0.75}
    assert config["recipe_variables"] == {
        "num_epochs": EPOCHS, "lr": INIT_LR, "qat_start_epoch": QAT_START, "observer_freeze_epoch": FREEZE,
        "distill_hardness": 0.75, "distill_temperature": 2.0}
    assert "recipe.yaml" in run["files"]
    saved = (runs[0] / "files" / "recipe.yaml").read_text()
    assert "distill_hardness: 0.75" in saved and "observer_freeze_epoch: 1.5" in saved
    assert "hardness: 0.75" in saved.split("distillation_modifiers:")[1]

    # The run id travels in the checkpoint, for a resume.
    saved = json.loads((job["out"] / f"checkpoint-{total}" / "training_state" / "distsparse_state.json").read_text())
    assert saved["progress"]["tracking_ids"]["wandb_run_id"] == run["id"] == runs[0].name.rsplit("-", 1)[1]


def test_resume_continues_the_same_run(job):
    (first_dir,) = job["runs"]
    first = read_run(first_dir)
    checkpoint = job["out"] / f"checkpoint-{STEPS_PER_EPOCH}"
    cmd = [sys.executable, *train_args(job["model"], job["recipe"], job["out"], "--resume_from_checkpoint",
                                       str(checkpoint), "--per_device_train_batch_size", "8")]
    proc = subprocess.run(cmd, env=job["env"], cwd=job["tmp"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    # W&B writes each offline session to its own folder; `wandb sync` joins them into one run.
    (second_dir,) = set(offline_runs(job["tmp"])) - {first_dir}
    resumed = read_run(second_dir)
    assert resumed["id"] == first["id"]
    assert [s for s in resumed["history"] if "train/loss" in resumed["history"][s]] == list(
        range(STEPS_PER_EPOCH + 1, EPOCHS * STEPS_PER_EPOCH + 1))


def test_report_to_wandb_without_wandb_fails_at_start(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # what `import wandb` sees when it is not installed
    with pytest.raises(UserError, match=r"^--report_to wandb needs the wandb package: pip install 'distsparse\[wandb\]'$"):
        tracking.log_with("wandb")
    assert tracking.log_with("none") is None


def test_cli_reports_missing_wandb_in_one_line(monkeypatch, capsys, tmp_path):
    from distsparse.cli import main

    monkeypatch.setitem(sys.modules, "wandb", None)
    assert main(["train", "--report_to", "wandb", "--output_dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.endswith("pip install 'distsparse[wandb]'")
    assert not any(tmp_path.iterdir())  # nothing loaded, nothing written


def test_init_kwargs_carry_flags_and_the_checkpointed_id(tmp_path, monkeypatch):
    from distsparse.args import parse_args

    monkeypatch.delenv("WANDB_DIR", raising=False)
    args = parse_args(["--report_to", "wandb", "--run_name", "r", "--wandb_entity", "e", "--wandb_group", "g",
                       "--wandb_tags", "x,y", "--output_dir", str(tmp_path / "o")])
    kwargs = tracking.wandb_init_kwargs(args, "abc123")
    assert kwargs == {"name": "r", "entity": "e", "group": "g", "tags": ["x", "y"], "id": "abc123",
                      "resume": "allow", "dir": str(tmp_path / "o")}
