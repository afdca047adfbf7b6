"""--task_name: the GLUE presets as run_glue.py sets them up, on the synthetic GLUE-shaped files
(tests/fixtures/glue, paraphrase, entailment) and on a stand-in for the Hub's nyu-mll/glue."""
from __future__ import annotations

import csv
import json

import datasets
import numpy as np
import pytest
import torch
from conftest import CONSTANT_PRUNING, FIXTURES, SHARED, minilm_dir, requires_shared, small_recipe, tiny_bert
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from distsparse.args import parse_args
from distsparse.cli import main as cli
from distsparse.errors import DataError
from distsparse.export import export_main
from distsparse.tasks import build_task
from distsparse.tasks.glue import GLUE

GLUE_FILES = FIXTURES / "glue"
DATA = SHARED / "data"


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(minilm_dir())


def task(tokenizer, *argv):
    return build_task(parse_args(list(argv)), tokenizer)


def tsv_rows(path):
    with open(path, encoding="utf-8-sig", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def test_cola_columns_labels_metric(tokenizer):
    t = task(tokenizer, "--task_name", "cola", "--train_file", str(GLUE_FILES / "cola_train.tsv"),
             "--validation_file", str(GLUE_FILES / "cola_dev.tsv"))
    rows = tsv_rows(GLUE_FILES / "cola_train.tsv")
    assert t.label_list == ["unacceptable", "acceptable"] and t.train["labels"] == [int(r["label"]) for r in rows]
    assert tokenizer.decode(t.train[0]["input_ids"], skip_special_tokens=True) == rows[0]["sentence"].lower()
    assert set(t.compute_metrics(np.eye(2)[[0, 1]], np.array([0, 1]))) == {"matthews_correlation"}


# (--task_name, folder of GLUE's train/dev/test TSVs, label column): the synthetic files, then the real ones.
GLUE_TSVS = [
    pytest.param("mrpc", FIXTURES / "paraphrase", "Quality", id="mrpc-synthetic"),
    pytest.param("rte", FIXTURES / "entailment", "label", id="rte-synthetic"),
    pytest.param("mrpc", DATA / "mrpc", "Quality", marks=requires_shared, id="mrpc"),
    pytest.param("rte", DATA / "rte", "label", marks=requires_shared, id="rte"),
    pytest.param("sst2", DATA / "sst2", "label", marks=requires_shared, id="sst2"),
]


@pytest.mark.parametrize("name, folder, label", GLUE_TSVS)
def test_glue_tsvs_as_downloaded(tokenizer, name, folder, label):
    """GLUE's TSVs as they are: MRPC's columns are #1 String / #2 String / Quality, RTE's labels are names;
    GLUE's test.tsv (no labels) is what --do_predict reads."""
    test = folder / "test.tsv" if (folder / "test.tsv").is_file() else folder / "dev.tsv"
    t = task(tokenizer, "--task_name", name, "--train_file", str(folder / "train.tsv"), "--validation_file",
             str(folder / "dev.tsv"), "--do_predict", "--test_file", str(test), "--max_train_samples", "300")
    rows = tsv_rows(folder / "train.tsv")[:300]
    preset = GLUE[name]
    assert t.label_list == list(preset.labels)
    assert t.train["labels"] == [int(r[label]) if r[label].isdigit() else preset.labels.index(r[label]) for r in rows]
    columns = preset.tsv_columns if name == "mrpc" else preset.columns
    first = tokenizer(*[rows[0][c] for c in columns], truncation=True, max_length=128)["input_ids"]
    assert t.train[0]["input_ids"] == first and len(t.eval) == len(tsv_rows(folder / "dev.tsv"))
    assert len(t.predict_sets[name]) == len(tsv_rows(test)) and "labels" not in t.predict_sets[name].column_names
    assert set(t.compute_metrics(np.eye(2)[[0, 1]], np.array([0, 1]))) == set(
        {"mrpc": ["accuracy", "f1", "combined_score"]}.get(name, ["accuracy"]))


def test_stsb_is_a_regression(tokenizer):
    t = task(tokenizer, "--task_name", "stsb", "--train_file", str(GLUE_FILES / "stsb_train.tsv"),
             "--validation_file", str(GLUE_FILES / "stsb_dev.tsv"))
    scores = [float(r["score"]) for r in tsv_rows(GLUE_FILES / "stsb_train.tsv")]
    assert t.train["labels"] == pytest.approx(scores) and t.train.features["labels"].dtype == "float32"
    assert t.model_kwargs()["num_labels"] == 1 and t.model_kwargs()["problem_type"] == "regression"
    batch = t.collator([t.train[i] for i in range(4)])
    model = tiny_bert(1)
    model.config.problem_type = t.problem_type
    out = model(**batch)  # MSE on the single output, as run_glue.py's STS-B
    assert out.loss.item() == pytest.approx(torch.nn.functional.mse_loss(out.logits[:, 0], batch["labels"]).item())
    assert set(t.compute_metrics(np.array([[1.0], [2.0]]), np.array([1.0, 3.0]))) == {"pearson", "spearmanr",
                                                                                      "combined_score"}


def test_float_label_file_is_a_regression_without_preset(tokenizer, tmp_path):
    """run_glue.py's rule for other files: a float label column is a regression (metric: mse)."""
    path = tmp_path / "scores.csv"
    path.write_text("sentence,label\ngood,0.9\nbad,0.1\nfine,0.6\n")
    t = task(tokenizer, "--train_file", str(path), "--validation_file", str(path))
    assert t.problem_type == "regression" and t.num_labels == 1 and t.eval["labels"] == pytest.approx([0.9, 0.1, 0.6])
    assert t.compute_metrics(np.array([[1.0], [0.0], [0.6]]), np.array([0.9, 0.1, 0.6])) == pytest.approx(
        {"mse": (0.01 + 0.01) / 3})


def test_mnli_matched_and_mismatched(tokenizer):
    t = task(tokenizer, "--task_name", "mnli", "--train_file", str(GLUE_FILES / "mnli_train.jsonl"),
             "--validation_file", str(GLUE_FILES / "mnli_dev_matched.jsonl"),
             "--validation_mismatched_file", str(GLUE_FILES / "mnli_dev_mismatched.jsonl"))
    rows = [json.loads(line) for line in (GLUE_FILES / "mnli_dev_mismatched.jsonl").read_text().splitlines()]
    assert t.label_list == ["entailment", "neutral", "contradiction"] and set(t.more_evals) == {"mm"}
    assert t.more_evals["mm"]["labels"] == [t.label_list.index(r["label"]) for r in rows]


@pytest.mark.parametrize("case", ["unknown name", "id out of range", "score not a number", "missing column",
                                  "not glue", "not text classification"])
def test_glue_bad_input(tokenizer, tmp_path, case):
    train, where = str(FIXTURES / "entailment/train.tsv"), None
    name, extra = "rte", []
    if case == "unknown name":
        train = where = str(tmp_path / "t.tsv")
        (tmp_path / "t.tsv").write_text("sentence1\tsentence2\tlabel\na\tb\tmaybe\n")
        message = "unknown label 'maybe' in column 'label' (labels: entailment, not_entailment or their ids 0-1)"
    elif case == "id out of range":
        train = where = str(tmp_path / "t.tsv")
        (tmp_path / "t.tsv").write_text("sentence\tlabel\na\t2\n")
        name, message = "sst2", "unknown label 2 in column 'label'"
    elif case == "score not a number":
        train = where = str(tmp_path / "t.tsv")
        (tmp_path / "t.tsv").write_text("sentence1\tsentence2\tlabel\na\tb\thigh\n")
        name, message = "stsb", "label 'high' in column 'label' is not a number"
    elif case == "missing column":
        name, where, message = "qnli", train, "missing column 'question'"
    elif case == "not glue":
        name, where, message = "squad", "--task_name 'squad'", "is not a GLUE task"
    else:
        extra, where, message = ["--task", "token-classification"], "--task_name rte", "not --task token-classification"
    with pytest.raises(DataError) as err:
        task(tokenizer, "--task_name", name, "--train_file", train, *extra)
    assert str(err.value).startswith(f"{where}: " if "--" not in where else where) and message in str(err.value)


def fake_glue(monkeypatch, name: str):
    """nyu-mll/glue's MNLI splits and features, three rows each (the test splits' labels are -1, as on the Hub)."""
    labels = datasets.ClassLabel(names=list(GLUE[name].labels))
    features = datasets.Features({"premise": datasets.Value("string"), "hypothesis": datasets.Value("string"),
                                  "label": labels, "idx": datasets.Value("int32")})

    def split(tag, label=(0, 1, 2)):
        return datasets.Dataset.from_dict({"premise": [f"{tag} premise {i}" for i in range(3)],
                                           "hypothesis": [f"{tag} hypothesis {i}" for i in range(3)],
                                           "label": list(label), "idx": [0, 1, 2]}, features=features)

    calls = []

    def load_dataset(*args, **kwargs):
        calls.append(args)
        return datasets.DatasetDict(train=split("train"), validation_matched=split("m"),
                                    validation_mismatched=split("mm", (2, 2, 1)), test_matched=split("tm", (-1,) * 3),
                                    test_mismatched=split("tmm", (-1,) * 3))

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return calls


def test_mnli_from_the_hub(tokenizer, monkeypatch):
    calls = fake_glue(monkeypatch, "mnli")
    t = task(tokenizer, "--task_name", "mnli", "--do_predict")
    task(tokenizer, "--task_name", "mnli", "--dataset_name", "glue")  # HF's older name, no config needed either
    assert set(calls) == {("nyu-mll/glue", "mnli"), ("glue", "mnli")}
    assert t.eval["labels"] == [0, 1, 2] and t.more_evals["mm"]["labels"] == [2, 2, 1]
    assert set(t.predict_sets) == {"mnli", "mnli-mm"} and "labels" not in t.predict_sets["mnli"].column_names
    assert tokenizer.decode(t.predict_sets["mnli-mm"][0]["input_ids"], skip_special_tokens=True) == "tmm premise 0 tmm hypothesis 0"


def test_hub_offline_is_one_line(tmp_path, tiny_model_dir, capsys):
    """No files and no network: one line naming the dataset, exit 2 (HF_HUB_OFFLINE is set by conftest)."""
    assert cli(["train", "--task_name", "rte", "--model_name_or_path", str(tiny_model_dir),
                "--output_dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("distsparse train: error: nyu-mll/glue/rte: Hub dataset cannot be loaded: ") and "\n" not in err
    assert "pass local files: --train_file, --validation_file" in err


# -- training -------------------------------------------------------------------------------------------

RECIPE = small_recipe(CONSTANT_PRUNING, init_lr=0.01, num_epochs=2.0)


def train(tmp_path, num_labels: int, *argv) -> dict:
    model_dir, out = tmp_path / "tiny", tmp_path / "out"
    tiny_bert(num_labels, sparsity=0.5).save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(minilm_dir()).save_pretrained(model_dir)
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    assert cli(["train", *argv, "--model_name_or_path", str(model_dir), "--recipe", str(tmp_path / "recipe.yaml"),
                "--output_dir", str(out), "--per_device_train_batch_size", "16", "--max_seq_length", "48",
                "--save_strategy", "no", "--logging_steps", "2", "--do_train", "--do_eval"]) == 0
    return json.loads((out / "eval_results.json").read_text())


def test_train_stsb_regression_predict_and_export(tmp_path, tokenizer):
    dev = GLUE_FILES / "stsb_dev.tsv"
    results = train(tmp_path, 1, "--task_name", "stsb", "--train_file", str(GLUE_FILES / "stsb_train.tsv"),
                    "--validation_file", str(dev), "--do_predict", "--test_file", str(dev))
    assert {"eval_pearson", "eval_spearmanr", "eval_combined_score", "eval_loss"} <= set(results)
    out = tmp_path / "out"
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert model.config.problem_type == "regression" and model.num_labels == 1
    t = task(tokenizer, "--task_name", "stsb", "--train_file", str(dev), "--validation_file", str(dev))
    batch = t.collator([t.eval[i] for i in range(len(t.eval))])
    with torch.no_grad():
        scores = model(**batch).logits[:, 0].numpy()
    mse = float(np.mean((scores - batch["labels"].numpy()) ** 2))
    assert results["eval_loss"] == pytest.approx(mse, rel=1e-4)
    assert results["eval_pearson"] == pytest.approx(np.corrcoef(scores, batch["labels"].numpy())[0, 1], abs=1e-5)
    # run_glue.py's file: a header, then index and the score to three decimals, in the test file's order.
    lines = (out / "predict_results_stsb.txt").read_text().splitlines()
    assert lines == ["index\tprediction", *(f"{i}\t{s:3.3f}" for i, s in enumerate(scores))]
    # The regression head exports: one output per row, as PyTorch computes it.
    assert export_main(["--model_path", str(out), "--output_dir", str(tmp_path / "onnx"), "--sequence_length", "32",
                        "--task", "glue"]) == 0  # SparseML's name for it
    report = json.loads((tmp_path / "onnx" / "export_report.json").read_text())
    assert report["task"] == "text-classification" and report["max_abs_diff"] < 1e-4


def test_regression_refuses_a_teacher(tmp_path, tiny_model_dir, capsys):
    assert cli(["train", "--task_name", "stsb", "--train_file", str(GLUE_FILES / "stsb_train.tsv"), "--teacher", "self",
                "--model_name_or_path", str(tiny_model_dir), "--output_dir", str(tmp_path / "out")]) == 2
    assert "--teacher self: distillation compares class distributions, a regression task" in capsys.readouterr().err


def test_train_mnli_reports_mismatched(tmp_path):
    results = train(tmp_path, 3, "--task_name", "mnli", "--train_file", str(GLUE_FILES / "mnli_train.jsonl"),
                    "--validation_file", str(GLUE_FILES / "mnli_dev_matched.jsonl"),
                    "--validation_mismatched_file", str(GLUE_FILES / "mnli_dev_mismatched.jsonl"),
                    "--eval_strategy", "steps", "--eval_steps", "1")
    # run_glue.py's names: the mismatched evaluation's metrics with the suffix _mm.
    assert {"eval_accuracy", "eval_loss", "eval_accuracy_mm", "eval_loss_mm"} <= set(results)
    # As run_glue.py: the mismatched set only in the final evaluation (last step), matched at every one.
    evals = [row for row in json.loads((tmp_path / "out" / "trainer_state.json").read_text())["log_history"]
             if "eval/accuracy" in row]
    assert len(evals) > 1 and [("eval/accuracy_mm" in row) for row in evals] == [False] * (len(evals) - 1) + [True]
    assert results["eval_samples"] == 20 and results["eval_samples_mm"] == 16
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out").eval()
    assert model.config.id2label == {0: "entailment", 1: "neutral", 2: "contradiction"}
    for suffix, name in (("", "matched"), ("_mm", "mismatched")):
        path = str(GLUE_FILES / f"mnli_dev_{name}.jsonl")
        t = task(AutoTokenizer.from_pretrained(tmp_path / "out"), "--task_name", "mnli", "--train_file", path,
                 "--validation_file", path)
        batch = t.collator([t.eval[i] for i in range(len(t.eval))])
        with torch.no_grad():
            preds = model(**batch).logits.argmax(-1)
        assert results[f"eval_accuracy{suffix}"] == pytest.approx((preds == batch["labels"]).float().mean().item())
