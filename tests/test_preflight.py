"""Settings that cannot work stop before any model loads, as exactly one line on stderr, exit 2."""
from __future__ import annotations

import os

import pytest

from conftest import tiny_bert
from distsparse.cli import main as cli


@pytest.fixture
def base(tmp_path, tiny_model_dir):
    def argv(*extra: str, out: str = "out") -> list[str]:
        return ["train", "--model_name_or_path", str(tiny_model_dir), "--output_dir", str(tmp_path / out), *extra]

    return argv


def one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    return err


@pytest.mark.parametrize("flags,message", [
    (["--per_device_train_batch_size", "0"], "--per_device_train_batch_size 0: must be at least 1"),
    (["--per_device_train_batch_size", "-1"], "--per_device_train_batch_size -1: must be at least 1"),
    (["--save_steps", "0"], "--save_steps 0: must be at least 1"),
    (["--logging_steps", "0"], "--logging_steps 0: must be at least 1"),
    (["--eval_steps", "0"], "--eval_steps 0: must be at least 1"),
    (["--max_seq_length", "0"], "--max_seq_length 0: must be at least 1"),
    (["--max_seq_length", "100000"], "--max_seq_length 100000: the model has 128 positions"),
    (["--learning_rate", "nan"], "--learning_rate nan: must be a finite number >= 0"),
    (["--num_train_epochs", "inf"], "--num_train_epochs inf: must be a finite number > 0"),
    (["--model_name_or_path", "./no/such/model"], "--model_name_or_path ./no/such/model: no such model folder"),
    (["--teacher", "/no/such/teacher"], "--teacher /no/such/teacher: no such model folder"),
])
def test_bad_flags(base, capsys, flags, message):
    assert cli(base(*flags)) == 2
    assert message in one_line(capsys)


def test_output_dir_is_a_file(base, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert cli(base(out="file")) == 2
    assert f"--output_dir {tmp_path / 'file'}: is a file, not a folder" in one_line(capsys)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_output_dir_read_only(base, tmp_path, capsys):
    (tmp_path / "ro").mkdir(mode=0o500)
    assert cli(base(out="ro")) == 2
    assert "not writable" in one_line(capsys)


def test_output_dir_without_room(base, tmp_path, capsys, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    assert cli(base()) == 2
    assert "MiB free, one checkpoint needs about" in one_line(capsys)


def test_teacher_with_other_labels(base, tmp_path, capsys):
    from transformers import AutoTokenizer

    from conftest import minilm_dir

    tiny_bert(num_labels=5).save_pretrained(tmp_path / "teacher")
    AutoTokenizer.from_pretrained(minilm_dir()).save_pretrained(tmp_path / "teacher")
    capsys.readouterr()  # the save's progress bar
    assert cli(base("--teacher", str(tmp_path / "teacher"))) == 2
    assert "has 5 labels, the task has 2" in one_line(capsys)


def test_teacher_with_another_head(base, tmp_path, capsys):
    """A tagger cannot teach a sentence classifier (nor a classifier a QA or masked-LM student): said by
    head kind, before the label counts are compared."""
    from transformers import AutoTokenizer, BertForTokenClassification

    from conftest import minilm_dir

    BertForTokenClassification(tiny_bert().config).save_pretrained(tmp_path / "teacher")
    AutoTokenizer.from_pretrained(minilm_dir()).save_pretrained(tmp_path / "teacher")
    capsys.readouterr()
    assert cli(base("--teacher", str(tmp_path / "teacher"))) == 2
    assert ("is a BertForTokenClassification, the student trains a SequenceClassification head; distill from a "
            "teacher fine-tuned with the same head (a *ForSequenceClassification model)") in one_line(capsys)


def test_fsdp_launch_is_refused_at_start(base, capsys, monkeypatch):
    """Masks and the rank check do not follow FSDP's flat shards yet: say so instead of training wrong."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert cli(base()) == 2
    err = one_line(capsys)
    assert "FSDP is not supported yet" in err and "deepspeed_zero3.yaml" in err
