"""Every row of the export's task table, and the deployment folder the way Optimum's ORT models read it.

No Optimum release installs beside transformers 5 (see the README's export section), so the folder
is checked as ``ORTModelFor*.from_pretrained(folder)`` + ``pipeline()`` would use it: config.json
with the labels, the tokenizer, ``model.onnx`` with Optimum's input and output names, int64 inputs
with dynamic batch and sequence axes, and the same answers as PyTorch.
"""
from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
import transformers
from transformers import AutoConfig, AutoTokenizer

from conftest import minilm_dir, tiny_bert
from distsparse.cli import main as cli
from distsparse.export import EXPORT_TASKS, load_trained
from export_helpers import QAT_RECIPE, train_by_hand

OPTIMUM_INPUTS = ["input_ids", "attention_mask", "token_type_ids"]


def untrained(folder, task: str, num_labels: int = 2):
    """A tiny BERT with the task's head, saved by ``AutoModelFor*.from_config`` as a user would."""
    config = tiny_bert().config
    config.num_labels = num_labels
    torch.manual_seed(0)
    getattr(transformers, EXPORT_TASKS[task].auto_class).from_config(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(minilm_dir()).save_pretrained(folder)
    return folder


def exported(tmp_path, trained, *extra):
    deploy = tmp_path / "deploy"
    assert cli(["export", "--model_path", str(trained), "--output_dir", str(deploy), "--sequence_length", "16", *extra]) == 0
    return deploy


def session_of(deploy):
    return ort.InferenceSession(str(deploy / "model.onnx"), providers=["CPUExecutionProvider"])


def assert_optimum_shaped(deploy, outputs: dict[str, list]):
    """Inputs and outputs by Optimum's names, int64 inputs, symbolic batch/sequence axes."""
    session = session_of(deploy)
    assert [i.name for i in session.get_inputs()] == OPTIMUM_INPUTS
    assert all(i.type == "tensor(int64)" and i.shape == ["batch", "sequence"] for i in session.get_inputs())
    assert {o.name: o.shape for o in session.get_outputs()} == outputs
    assert AutoConfig.from_pretrained(deploy).model_type == "bert"
    assert AutoTokenizer.from_pretrained(deploy)("a b")["input_ids"][0] == 101  # [CLS] of the MiniLM vocabulary


@pytest.mark.parametrize("task, outputs, num_labels", [
    ("token-classification", {"logits": ["batch", "sequence", 5]}, 5),
    ("question-answering", {"start_logits": ["batch", "sequence"], "end_logits": ["batch", "sequence"]}, 2),
    ("masked-lm", {"logits": ["batch", "sequence", 30522]}, 2),
])
def test_each_task_exports_its_outputs_and_verifies(tmp_path, task, outputs, num_labels):
    trained = untrained(tmp_path / task, task, num_labels)
    deploy = exported(tmp_path, trained)  # the task comes from config.json's architectures
    report = json.loads((deploy / "export_report.json").read_text())
    assert report["task"] == task and report["max_abs_diff"] <= report["atol"] <= 1e-3
    assert_optimum_shaped(deploy, outputs)
    stored = np.load(deploy / "sample_outputs.npz")
    assert sorted(stored.files) == sorted(outputs)
    # another batch size and length than the samples, against PyTorch
    model, tokenizer, _ = load_trained(trained)
    feed = tokenizer(["what is it?", "a longer second question, with a comma"], ["it is a test."] * 2,
                     padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = model(**feed)
    got = session_of(deploy).run(list(outputs), {k: v.numpy() for k, v in feed.items()})
    for name, value in zip(outputs, got):
        np.testing.assert_allclose(value, getattr(expected, name).numpy(), atol=1e-4)
    assert cli(["verify", str(deploy)]) == 0


def test_masked_lm_with_tied_decoder_checks_the_shared_weight_once(tmp_path):
    trained = untrained(tmp_path / "mlm", "masked-lm")
    deploy = exported(tmp_path, trained)
    sparsity = json.loads((deploy / "export_report.json").read_text())["sparsity"]
    assert "bert.embeddings.word_embeddings.weight" in sparsity
    assert "cls.predictions.decoder.weight" not in sparsity  # the same tensor as the word embeddings


def test_multi_label_task_comes_from_problem_type(tmp_path):
    trained = untrained(tmp_path / "ml", "text-classification", num_labels=3)
    config = json.loads((trained / "config.json").read_text())
    (trained / "config.json").write_text(json.dumps({**config, "problem_type": "multi_label_classification"}))
    deploy = exported(tmp_path, trained)
    assert json.loads((deploy / "export_report.json").read_text())["task"] == "multi-label-classification"
    assert_optimum_shaped(deploy, {"logits": ["batch", 3]})


def test_qat_text_classifier_folder_gives_pytorch_labels_the_way_optimum_reads_it(tmp_path):
    """config.json's id2label + tokenizer + onnxruntime: what ORTModelForSequenceClassification
    in a text-classification pipeline() computes, label for label against PyTorch."""
    trained = tmp_path / "trained"
    train_by_hand(trained, QAT_RECIPE)
    config = json.loads((trained / "config.json").read_text())
    (trained / "config.json").write_text(json.dumps({**config, "id2label": {"0": "negative", "1": "positive"},
                                                      "label2id": {"negative": 0, "positive": 1}}))
    deploy = exported(tmp_path, trained)
    assert_optimum_shaped(deploy, {"logits": ["batch", 2]})
    id2label = AutoConfig.from_pretrained(deploy).id2label
    texts = ["good fine great film", "bad poor awful plot here", "what a film", "no", "great but poor and bad"]
    encoded = AutoTokenizer.from_pretrained(deploy)(texts, padding=True, return_tensors="np")
    logits = session_of(deploy).run(["logits"], {k: encoded[k] for k in OPTIMUM_INPUTS})[0]
    model, tokenizer, _ = load_trained(trained)
    with torch.no_grad():
        expected = model(**tokenizer(texts, padding=True, return_tensors="pt")).logits
    assert [id2label[i] for i in logits.argmax(-1)] == [model.config.id2label[i] for i in expected.argmax(-1).tolist()]
    assert set(id2label.values()) == {"negative", "positive"}


def test_sparseml_task_names_are_aliases(capsys):
    """sparseml.transformers.export_onnx's --task names (glue, ner, qa, mlm; _ read as -) name our tasks."""
    from distsparse.export.cli import build_export_parser

    def task_of(name):
        return build_export_parser().parse_args(["--model_path", "m", "--output_dir", "o", "--task", name]).task

    assert [task_of(n) for n in ("glue", "ner", "qa", "mlm", "sequence_classification", "token-classification")] == [
        "text-classification", "token-classification", "question-answering", "masked-lm", "text-classification",
        "token-classification"]
    with pytest.raises(SystemExit):
        task_of("summarization")
    assert "'summarization' is not a task (text-classification, " in capsys.readouterr().err
