"""The training job end to end on a tiny pre-sparsified BERT: outputs, sparsity kept, exact resume, safe saves."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from distsparse import checkpoint, distributed
from distsparse.cli import main as cli
from distsparse.train import main as train

from conftest import CONSTANT_PRUNING, small_recipe

RECIPE = small_recipe(CONSTANT_PRUNING, """
qat_start_epoch: 1.0
quantization_modifiers:
  - !QuantizationModifier
    start_epoch: eval(qat_start_epoch)
    submodules: [bert.encoder, classifier]
regularization_modifiers:
  - !SetWeightDecayModifier
    start_epoch: 0.0
    weight_decay: 0.1
""")


@pytest.fixture
def job(tmp_path, tiny_model_dir):
    """Files for a small run: 48 rows of text, 6 optimizer steps per epoch at batch 8."""
    rows = ["sentence,label"] + [f"sample {i} {'good fine great' if i % 2 else 'bad poor awful'} text {i % 7},{i % 2}" for i in range(48)]
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "dev.csv").write_text("\n".join(rows[:17]) + "\n")
    (tmp_path / "recipe.yaml").write_text(RECIPE)

    def args(out: str, *extra: str) -> list[str]:
        return ["--model_name_or_path", str(tiny_model_dir), "--recipe", str(tmp_path / "recipe.yaml"),
                "--train_file", str(tmp_path / "train.csv"), "--validation_file", str(tmp_path / "dev.csv"),
                "--output_dir", str(tmp_path / out), "--per_device_train_batch_size", "8",
                "--max_seq_length", "32", "--logging_steps", "1", *extra]

    return args


def encoder_linear_zeros(state_dict) -> dict[str, torch.Tensor]:
    return {k: v == 0 for k, v in state_dict.items() if k.startswith("bert.encoder") and k.endswith("weight") and v.dim() == 2}


def test_constant_pruning_qat_run_keeps_every_zero(job, tiny_model_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    assert train(job("out")) == 0
    out = tmp_path / "out"
    for name in ("config.json", "model.safetensors", "recipe.yaml", "quantization.safetensors", "tokenizer.json"):
        assert (out / name).is_file(), name
    before = encoder_linear_zeros(load_file(str(tiny_model_dir / "model.safetensors")))
    after = load_file(str(out / "model.safetensors"))
    assert before and all(after[k][mask].abs().max() == 0 for k, mask in before.items())
    # training did change the surviving weights (the run did something)
    start = load_file(str(tiny_model_dir / "model.safetensors"))
    assert any(not torch.equal(start[k], after[k]) for k in before)
    # the final folder is a plain HF model
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.num_labels == 2
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 12 and "eval/accuracy" in state["metrics"]
    recipe = (out / "recipe.yaml").read_text()
    assert "metadata:" in recipe and "world_size: 1" in recipe
    quant = load_file(str(out / "quantization.safetensors"))
    assert any("scale" in k for k in quant)


def stop_after(monkeypatch, step: int):
    """Make the preemption check fire at the end of optimizer step ``step`` (as SIGUSR1 would)."""
    calls = {"n": 0}

    def any_rank(flag):
        calls["n"] += 1
        return calls["n"] == step

    monkeypatch.setattr(distributed, "any_rank", any_rank)


def test_resume_continues_exactly(job, tmp_path, monkeypatch):
    """12 steps in one run == 5 steps, preempted, resumed to 12: same weights, LR, QAT state."""
    extra = ["--save_strategy", "no", "--eval_strategy", "no"]
    assert train(job("full", *extra)) == 0

    with monkeypatch.context() as m:
        stop_after(m, 5)
        assert train(job("split", *extra)) == 0
    split = tmp_path / "split"
    assert (split / "PREEMPTED").read_text().strip() == "5"
    assert [p.name for p in checkpoint.checkpoints(split)] == ["checkpoint-5"]
    assert train(job("split", *extra, "--resume_from_checkpoint", "latest")) == 0
    assert not (split / "PREEMPTED").exists()

    full, resumed = load_file(str(tmp_path / "full" / "model.safetensors")), load_file(str(split / "model.safetensors"))
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], rtol=1e-5, atol=1e-6, msg=k)
    qa, qb = load_file(str(tmp_path / "full" / "quantization.safetensors")), load_file(str(split / "quantization.safetensors"))
    assert qa.keys() == qb.keys()
    for k in qa:
        torch.testing.assert_close(qb[k], qa[k], rtol=1e-5, atol=1e-7, msg=k)
    a = json.loads((tmp_path / "full" / "trainer_state.json").read_text())
    b = json.loads((split / "trainer_state.json").read_text())
    assert a["global_step"] == b["global_step"] == 12


def test_killed_save_leaves_previous_checkpoint(job, tmp_path, monkeypatch):
    """A crash in the middle of writing checkpoint-12 leaves checkpoint-6 complete and loadable."""
    from transformers import AutoModelForSequenceClassification

    import distsparse.train as train_module

    real = train_module.save_model
    calls = {"n": 0}

    def dying_save(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # second checkpoint: die after Accelerate wrote its part
            raise KeyboardInterrupt("killed while saving")
        return real(*a, **k)

    monkeypatch.setattr(train_module, "save_model", dying_save)
    with pytest.raises(KeyboardInterrupt):
        train(job("out", "--save_strategy", "epoch", "--eval_strategy", "no"))
    out = tmp_path / "out"
    assert [p.name for p in checkpoint.checkpoints(out)] == ["checkpoint-6"]
    assert (out / ".tmp-checkpoint-12").exists()  # the half-written one, ignored by `latest`
    assert checkpoint.resolve_resume("latest", out).name == "checkpoint-6"
    AutoModelForSequenceClassification.from_pretrained(out / "checkpoint-6")
    monkeypatch.setattr(train_module, "save_model", real)
    assert train(job("out", "--resume_from_checkpoint", "latest", "--eval_strategy", "no")) == 0
    assert [p.name for p in checkpoint.checkpoints(out)] == ["checkpoint-6", "checkpoint-12"]
    assert not (out / ".tmp-checkpoint-12").exists()


@pytest.mark.parametrize("content,message", [
    ("", "file is empty"),
    ("text,label\nhello,0\n", "missing column"),
    ("sentence,target\nhello,0\n", "missing column 'label'"),
])
def test_bad_data_is_one_clear_line(job, tmp_path, capsys, content, message):
    bad = tmp_path / "bad.csv"
    bad.write_text(content)
    argv = job("out") + ["--train_file", str(bad)]
    if message == "missing column":
        argv += ["--input_column_names", "sentence"]
    assert cli(["train", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(bad) in err[0] and message in err[0], err


def test_unknown_validation_label(job, tmp_path, capsys):
    (tmp_path / "dev.csv").write_text("sentence,label\nfine,0\nodd,7\n")
    assert cli(["train", *job("out")]) == 2
    err = capsys.readouterr().err
    assert "dev.csv" in err and "unknown label 7" in err


def test_existing_checkpoints_are_not_mixed(job, tmp_path, capsys):
    (tmp_path / "out" / "checkpoint-3" / "training_state").mkdir(parents=True)
    assert cli(["train", *job("out")]) == 2
    assert "--resume_from_checkpoint latest or --overwrite_output_dir" in capsys.readouterr().err


def test_config_file_and_equals_form(tmp_path):
    from distsparse.args import parse_args

    cfg = tmp_path / "c.yaml"
    cfg.write_text("learning_rate: 0.002\nper_device_train_batch_size: 4\n")
    args = parse_args(["--config", str(cfg), "--per_device_train_batch_size=16"])
    assert args.learning_rate == 0.002 and args.per_device_train_batch_size == 16
    cfg.write_text("learning_rte: 1\n")
    with pytest.raises(Exception, match="unknown key 'learning_rte'"):
        parse_args(["--config", str(cfg)])
