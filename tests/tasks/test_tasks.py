"""Tasks beyond single-sentence classification: NER (CoNLL), multi-label, GLUE sentence pairs.

Data checks use the real MiniLM tokenizer; the training runs use a tiny BERT on a few hundred rows of
synthetic files in CoNLL-2003's and MRPC's layouts (tests/fixtures), again on the real CoNLL-2003 and
MRPC files where ../shared exists (read in place, never copied), and on a generated multi-label set.
"""
from __future__ import annotations

import csv
import json
import random

import datasets
import numpy as np
import onnxruntime
import pytest
import torch
from conftest import CONSTANT_PRUNING, FIXTURES, SHARED, minilm_dir, requires_shared, small_recipe, tiny_bert
from torch.utils.data import DataLoader
from transformers import AutoModelForTokenClassification, AutoTokenizer, BertForTokenClassification

from distsparse.args import parse_args
from distsparse.tasks import build_task
from distsparse.tasks.files import read_file
from distsparse.errors import DataError
from distsparse.events import Event, State
from distsparse.export import export_main
from distsparse.tasks.metrics import iob2_entities, multi_label_metrics
from distsparse.modifiers.distillation import DistillationModifier, distillation_loss

DATA = SHARED / "data"
CONLL = DATA / "conll2003"
# Folders of train/valid (NER) or train/dev (GLUE) files: the synthetic fixture, then the real set.
NER = [pytest.param(FIXTURES / "ner", id="synthetic"), pytest.param(CONLL, marks=requires_shared, id="conll2003")]
MRPC = [pytest.param(FIXTURES / "paraphrase", id="synthetic"), pytest.param(DATA / "mrpc", marks=requires_shared, id="mrpc")]
RTE = [pytest.param(FIXTURES / "entailment", id="synthetic"), pytest.param(DATA / "rte", marks=requires_shared, id="rte")]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(minilm_dir())


def task(tokenizer, *argv):
    return build_task(parse_args(list(argv)), tokenizer)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# -- reading ---------------------------------------------------------------------------------------

def test_read_conll_layout(tmp_path):
    path = tmp_path / "x.conll"
    path.write_text("-DOCSTART- -X- -X- O\n\nEU NNP B-NP B-ORG\nrejects\tVBZ\tB-VP\tO\n\n\n"
                    "German JJ B-NP B-MISC\n-DOCSTART- -X- O O\nPeter B-PER\n")
    ds = read_file(path)
    assert ds["tokens"] == [["EU", "rejects"], ["German"], ["Peter"]]
    assert ds["ner_tags"] == [["B-ORG", "O"], ["B-MISC"], ["B-PER"]]


@requires_shared
def test_read_conll2003_valid_counts():
    """The counts CoNLL-2003's SOURCE.txt gives (HF's split size; the paper's entity counts)."""
    ds = read_file(CONLL / "valid.txt")
    assert len(ds) == 3250
    assert sum(map(len, ds["tokens"])) == 51362
    kinds = [kind for tags in ds["ner_tags"] for kind, _, _ in iob2_entities(tags)]
    assert {k: kinds.count(k) for k in set(kinds)} == {"PER": 1842, "LOC": 1837, "ORG": 1341, "MISC": 922}


# -- token classification --------------------------------------------------------------------------

def test_labels_on_first_sub_token(tokenizer, tmp_path):
    rows = [{"tokens": ["Peter", "Blackburnshire", "visited", "Uzbekistan", "."],
             "ner_tags": ["B-PER", "I-PER", "O", "B-LOC", "O"]}]
    path = write_jsonl(tmp_path / "ner.jsonl", rows)
    t = task(tokenizer, "--task", "token-classification", "--train_file", path, "--validation_file", path,
             "--max_seq_length", "24")
    assert t.label_list == ["O", "B-LOC", "B-PER", "I-PER"]
    assert t.model_class is AutoModelForTokenClassification
    row = t.train[0]
    pieces = tokenizer.convert_ids_to_tokens(row["input_ids"])
    firsts = [i for i, p in enumerate(pieces) if p not in ("[CLS]", "[SEP]") and not p.startswith("##")]
    assert len(firsts) == 5 and len(pieces) > 7  # some words split into several pieces
    assert [i for i, lab in enumerate(row["labels"]) if lab != -100] == firsts
    assert [row["labels"][i] for i in firsts] == [t.label_list.index(tag) for tag in rows[0]["ner_tags"]]
    # Eval rows come padded to --max_seq_length, so the loop can concatenate logits across batches.
    evaluated = t.eval[0]
    assert len(evaluated["input_ids"]) == 24 and evaluated["labels"][: len(row["labels"])] == row["labels"]
    assert set(evaluated["labels"][len(row["labels"]):]) == {-100}


def test_token_test_file_without_tags(tokenizer, tmp_path):
    """--do_predict rows need no tags: each word's first sub-token is still marked (not -100) for its prediction."""
    path = write_jsonl(tmp_path / "ner.jsonl", [{"tokens": ["Peter", "Blackburnshire", "."], "ner_tags": ["B-PER", "I-PER", "O"]}])
    test = write_jsonl(tmp_path / "test.jsonl", [{"tokens": ["Uzbekistan", "visited", "Blackburnshire"]}])
    t = task(tokenizer, "--task", "token-classification", "--train_file", path, "--do_predict", "--test_file", test,
             "--max_seq_length", "16")
    row = t.predict_sets["token-classification"][0]
    pieces = tokenizer.convert_ids_to_tokens(row["input_ids"])
    marked = [p for p, lab in zip(pieces, row["labels"]) if lab != -100]
    assert len(row["input_ids"]) == 16 and marked == [p for p in pieces if p not in ("[CLS]", "[SEP]", "[PAD]")
                                                      and not p.startswith("##")]
    assert len(marked) == 3 and t.prediction_file("token-classification") == "predictions.txt"
    lines = t.prediction_lines(np.eye(4)[[[2] * 16]], np.array([row["labels"]]))
    assert lines == [f"{t.label_list[2]} {t.label_list[2]} {t.label_list[2]}"]


def fake_hub(monkeypatch, train: dict, features: datasets.Features):
    ds = datasets.Dataset.from_dict(train, features=features)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: datasets.DatasetDict(train=ds, validation=ds))


def test_token_task_hub_classlabels(tokenizer, monkeypatch):
    names = ["O", "B-PER", "I-PER"]
    fake_hub(monkeypatch, {"tokens": [["Ann", "Lee", "ran"]], "ner_tags": [[1, 2, 0]]},
             datasets.Features({"tokens": datasets.List(datasets.Value("string")),
                                "ner_tags": datasets.List(datasets.ClassLabel(names=names))}))
    t = task(tokenizer, "--task", "token-classification", "--dataset_name", "conll2003")
    assert t.label_list == names
    assert [x for x in t.train[0]["labels"] if x != -100] == [1, 2, 0]


def bad(tmp_path, name, text):
    (tmp_path / name).write_text(text)
    return str(tmp_path / name)


@pytest.mark.parametrize("case", ["missing column", "unknown label", "empty", "no sentences", "not iob2",
                                  "lengths", "one column", "no file"])
def test_token_bad_data(tokenizer, tmp_path, case):
    good = bad(tmp_path, "train.txt", "Ann B-PER\nLee I-PER\n\nran O\n")
    train, valid, where = good, None, None
    if case == "missing column":
        train = where = write_jsonl(tmp_path / "t.jsonl", [{"tokens": ["a"], "tags": ["O"]}])
        message = "missing column 'ner_tags'"
    elif case == "unknown label":
        valid = where = bad(tmp_path, "valid.txt", "Paris B-LOC\n")
        message = "unknown label 'B-LOC'"
    elif case == "empty":
        valid = where = bad(tmp_path, "valid.txt", "")
        message = "file is empty"
    elif case == "no sentences":
        train = where = bad(tmp_path, "d.conll", "-DOCSTART- -X- -X- O\n\n")
        message = "no sentences"
    elif case == "not iob2":
        train = where = bad(tmp_path, "iobes.txt", "Ann S-PER\n")
        message = "'S-PER' in column 'ner_tags' is not IOB2"
    elif case == "lengths":
        train = where = write_jsonl(tmp_path / "t.jsonl", [{"tokens": ["a", "b"], "ner_tags": ["O"]}])
        message = "row 0 has 2 tokens but 1 tags"
    elif case == "one column":
        train = bad(tmp_path, "cols.txt", "Ann B-PER\n\nLee\n")
        where, message = f"{train}:3", "expected a token and a tag"
    else:
        train = where = str(tmp_path / "nope.txt")
        message = "file not found"
    argv = ["--task", "token-classification", "--train_file", train] + (["--validation_file", valid] if valid else [])
    with pytest.raises(DataError) as err:
        task(tokenizer, *argv)
    assert str(err.value).startswith(f"{where}: ") and message in str(err.value)


def test_token_task_needs_data(tokenizer):
    with pytest.raises(DataError, match="--task token-classification: pass --train_file"):
        task(tokenizer, "--task", "token-classification")


def test_distillation_on_token_batches(tokenizer):
    """The DistillationModifier's KD on [B, L, C] logits counts only labelled tokens of our batches."""
    t = task(tokenizer, "--task", "token-classification", "--train_file", str(FIXTURES / "ner" / "valid.txt"),
             "--max_train_samples", "8")
    batch = t.collator([t.train[i] for i in range(8)])
    assert (batch["labels"] == -100).any(dim=1).all()  # special tokens at least; padding, sub-tokens
    config = tiny_bert(t.num_labels).config
    student, teacher = (torch.manual_seed(seed) and BertForTokenClassification(config) for seed in (0, 1))
    state = State(model=student, steps_per_epoch=1, teacher=teacher.eval(), batch=batch)
    state.outputs = student(**batch)
    state.loss = state.outputs.loss
    DistillationModifier(hardness=1.0, temperature=2.0).apply(Event.LOSS, state)
    with torch.no_grad():
        teacher_logits = teacher(**{k: v for k, v in batch.items() if k != "labels"}).logits
    keep = batch["labels"] != -100
    want = torch.nn.functional.kl_div(
        torch.log_softmax(state.outputs.logits[keep] / 2, -1), torch.softmax(teacher_logits[keep] / 2, -1),
        reduction="sum") * 4 / keep.sum()
    assert state.loss.item() == pytest.approx(want.item(), rel=1e-5)
    assert state.loss.item() != pytest.approx(distillation_loss(state.outputs.logits, teacher_logits, 2.0).item(),
                                              rel=1e-3)


# -- sentence pairs (GLUE files as they are) -------------------------------------------------------

def glue_rows(path):
    with open(path, encoding="utf-8-sig", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


@pytest.mark.parametrize("folder", MRPC)
def test_mrpc_columns(tokenizer, folder):
    t = task(tokenizer, "--train_file", str(folder / "train.tsv"), "--validation_file", str(folder / "dev.tsv"),
             "--input_column_names", "#1 String,#2 String", "--label_column_name", "Quality",
             "--max_train_samples", "100")
    rows = glue_rows(folder / "train.tsv")[:100]
    assert t.label_list == ["0", "1"] and len(t.eval) == len(glue_rows(folder / "dev.tsv"))
    assert t.train["labels"] == [int(r["Quality"]) for r in rows]
    first = t.train[0]
    assert 1 in first["token_type_ids"]  # encoded as a pair
    assert tokenizer.decode(first["input_ids"], skip_special_tokens=True) == tokenizer.decode(
        tokenizer(rows[0]["#1 String"], rows[0]["#2 String"])["input_ids"], skip_special_tokens=True)
    assert set(t.compute_metrics(np.eye(2)[[0, 1]], np.array([0, 1]))) == {"accuracy", "f1"}


@pytest.mark.parametrize("folder", RTE)
def test_rte_string_labels(tokenizer, folder):
    t = task(tokenizer, "--train_file", str(folder / "train.tsv"), "--validation_file", str(folder / "dev.tsv"),
             "--max_train_samples", "50")
    rows = glue_rows(folder / "train.tsv")[:50]
    assert t.label_list == ["entailment", "not_entailment"]
    assert t.train["labels"] == [t.label_list.index(r["label"]) for r in rows]


def test_text_row_without_label(tokenizer, tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("sentence,label\ngood,pos\nbad,\n")
    with pytest.raises(DataError, match=rf"^{path}: row 1 has no label in column 'label'$"):
        task(tokenizer, "--train_file", str(path))


def test_pair_missing_column_names_file(tokenizer):
    with pytest.raises(DataError, match=r"paraphrase/train.tsv: missing column '#3 String'"):
        task(tokenizer, "--train_file", str(FIXTURES / "paraphrase/train.tsv"), "--input_column_names", "#1 String,#3 String",
             "--label_column_name", "Quality")


# -- multi-label -----------------------------------------------------------------------------------

ROWS = [("fresh apple pie", ["10", "2"]), ("a dog barks", ["1"]), ("nothing here", []), ("dog eats apple", ["1", "10"])]


def test_multi_label_csv_and_jsonl_agree(tokenizer, tmp_path):
    jsonl = write_jsonl(tmp_path / "ml.jsonl", [{"text": x, "labels": [int(v) for v in y]} for x, y in ROWS])
    tsv = tmp_path / "ml.tsv"
    tsv.write_text("text\tlabels\n" + "".join(f"{x}\t{';'.join(y)}\n" for x, y in ROWS))
    a = task(tokenizer, "--task", "multi-label-classification", "--train_file", jsonl)
    b = task(tokenizer, "--task", "multi-label-classification", "--train_file", str(tsv), "--label_delimiter", ";")
    assert a.label_list == b.label_list == ["1", "2", "10"]
    want = [[0, 1, 1], [1, 0, 0], [0, 0, 0], [1, 0, 1]]
    assert a.train["labels"] == b.train["labels"] == want
    assert a.problem_type == "multi_label_classification"
    batch = a.collator([a.train[i] for i in range(4)])
    assert batch["labels"].dtype == torch.float32
    model = tiny_bert(3)
    model.config.problem_type = a.problem_type
    out = model(**batch)
    assert out.loss.item() == pytest.approx(
        torch.nn.functional.binary_cross_entropy_with_logits(out.logits, torch.tensor(want, dtype=torch.float)).item())


@pytest.mark.parametrize("case", ["missing column", "unknown label"])
def test_multi_label_bad_data(tokenizer, tmp_path, case):
    train = write_jsonl(tmp_path / "train.jsonl", [{"text": "a", "labels": ["x"]}])
    if case == "missing column":
        valid = write_jsonl(tmp_path / "valid.jsonl", [{"text": "a", "label": ["x"]}])
        message = "missing column 'labels'"
    else:
        valid = write_jsonl(tmp_path / "valid.jsonl", [{"text": "a", "labels": ["x", "y"]}])
        message = "unknown label 'y'"
    with pytest.raises(DataError) as err:
        task(tokenizer, "--task", "multi-label-classification", "--train_file", train, "--validation_file", valid)
    assert str(err.value).startswith(f"{valid}: ") and message in str(err.value)


def test_multi_label_hub_classlabels(tokenizer, monkeypatch):
    fake_hub(monkeypatch, {"text": ["a b", "c"], "labels": [[0, 2], []]},
             datasets.Features({"text": datasets.Value("string"),
                                "labels": datasets.List(datasets.ClassLabel(names=["joy", "anger", "fear"]))}))
    t = task(tokenizer, "--task", "multi-label-classification", "--dataset_name", "go_emotions")
    assert t.label_list == ["joy", "anger", "fear"] and t.train["labels"] == [[1, 0, 1], [0, 0, 0]]


# -- training ----------------------------------------------------------------------------------------

RECIPE = small_recipe(CONSTANT_PRUNING, """
distillation_modifiers:
  - !DistillationModifier
      hardness: 0.5
      temperature: 2.0
""", init_lr=0.02)


def train_and_recompute(tmp_path, capsys, num_labels: int, *argv):
    """Train a 50%-sparse tiny BERT (teacher: itself) into tmp_path/out.

    Returns (logged metrics, metrics recomputed from the saved model, log, eval batch, its logits).
    """
    from distsparse.train import main

    model_dir, out = tmp_path / "tiny", tmp_path / "out"
    tiny_bert(num_labels, sparsity=0.5).save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(minilm_dir()).save_pretrained(model_dir)
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    argv = [*argv, "--model_name_or_path", str(model_dir), "--recipe", str(tmp_path / "recipe.yaml"),
            "--teacher", "self", "--output_dir", str(out), "--per_device_train_batch_size", "16",
            "--max_seq_length", "48", "--save_strategy", "no", "--logging_steps", "5"]
    assert main(argv) == 0
    log = capsys.readouterr().out
    logged = json.loads((out / "trainer_state.json").read_text())["metrics"]
    assert 0 < logged.pop("eval/loss") < 20  # the eval loss is logged too (its batching differs from below)
    # Recompute from the saved model: what the loop logged must be the metric of what it saved.
    t = build_task(parse_args(argv), AutoTokenizer.from_pretrained(out))
    model = t.model_class.from_pretrained(out).eval()
    zeros = model.bert.encoder.layer[0].attention.self.query.weight.eq(0).float().mean().item()
    assert zeros == pytest.approx(0.5, abs=0.01)  # the ConstantPruningModifier kept the zeros
    batch = next(iter(DataLoader(t.eval, batch_size=len(t.eval), collate_fn=t.collator)))
    with torch.no_grad():
        logits = model(**batch).logits.numpy()
    recomputed = {f"eval/{k}": v for k, v in t.compute_metrics(logits, batch["labels"].numpy()).items()}
    return logged, recomputed, log, batch, logits


@pytest.mark.parametrize("folder", NER)
def test_train_ner_conll2003_and_export(tmp_path, capsys, folder):
    logged, recomputed, log, batch, logits = train_and_recompute(
        tmp_path, capsys, 9, "--task", "token-classification", "--train_file", str(folder / "train.txt"),
        "--validation_file", str(folder / "valid.txt"), "--max_train_samples", "300", "--max_eval_samples", "100",
        "--do_train", "--do_eval", "--do_predict", "--test_file", str(folder / "valid.txt"), "--max_predict_samples", "100")
    assert "eval/f1=" in log and "eval/precision=" in log and "eval/PER_f1=" in log
    assert logged == pytest.approx(recomputed, abs=1e-5)
    # run_ner.py's predictions.txt: per sentence, the argmax tag of each word's first sub-token.
    names = AutoModelForTokenClassification.from_pretrained(tmp_path / "out").config.id2label
    want = [" ".join(names[int(k)] for k, gold in zip(row, marks) if gold != -100)
            for row, marks in zip(logits.argmax(-1), batch["labels"].numpy())]
    assert (tmp_path / "out" / "predictions.txt").read_text().splitlines() == want
    # One tag per word, as run_ner.py: words cut off by --max_seq_length get none.
    tagged, words = [len(line.split()) for line in want], [len(w) for w in read_file(folder / "valid.txt")["tokens"][:100]]
    assert all(0 < t <= w for t, w in zip(tagged, words)) and sum(t == w for t, w in zip(tagged, words)) >= 90
    assert 0.5 < logged["eval/accuracy"] <= 1 and 0.05 < logged["eval/f1"] <= 1  # some entities found
    # The exported ONNX model tags the eval sentences as the PyTorch model does.
    assert export_main(["--model_path", str(tmp_path / "out"), "--output_dir", str(tmp_path / "onnx"),
                        "--sequence_length", "32"]) == 0
    assert json.loads((tmp_path / "onnx/export_report.json").read_text())["task"] == "token-classification"
    session = onnxruntime.InferenceSession(str(tmp_path / "onnx/model.onnx"))
    feed = {i.name: batch[i.name].numpy() for i in session.get_inputs()}
    onnx_logits = session.run(None, feed)[0]
    assert onnx_logits.shape == logits.shape and np.abs(onnx_logits - logits).max() < 1e-4


@pytest.mark.parametrize("folder", MRPC)
def test_train_mrpc(tmp_path, capsys, folder):
    logged, recomputed, log, _, _ = train_and_recompute(
        tmp_path, capsys, 2, "--train_file", str(folder / "train.tsv"), "--validation_file",
        str(folder / "dev.tsv"), "--input_column_names", "#1 String,#2 String", "--label_column_name", "Quality",
        "--max_train_samples", "200", "--max_eval_samples", "100")
    assert "eval/accuracy=" in log and "eval/f1=" in log
    assert logged == pytest.approx(recomputed, abs=1e-5)
    assert 0.3 < logged["eval/accuracy"] < 1


def test_train_multi_label(tmp_path, capsys):
    """A generated set where keywords carry the labels; the tiny model must beat predicting every label."""
    words = {"apple": "fruit", "pear": "fruit", "dog": "animal", "cat": "animal", "red": "color", "blue": "color"}
    filler = "the a some very old new big small one".split()
    rnd = random.Random(0)

    def rows(n):
        out = []
        for _ in range(n):
            keys = rnd.sample(sorted(words), rnd.randint(0, 3))
            text = rnd.sample(filler, 4) + keys
            rnd.shuffle(text)
            out.append({"text": " ".join(text), "labels": sorted({words[k] for k in keys})})
        return out

    train = write_jsonl(tmp_path / "train.jsonl", rows(320))
    valid_rows = rows(80)
    valid = write_jsonl(tmp_path / "valid.jsonl", valid_rows)
    gold = np.array([[name in r["labels"] for name in ("animal", "color", "fruit")] for r in valid_rows], dtype=float)
    every_label = multi_label_metrics(0.5)(np.ones_like(gold), gold)["f1_micro"]
    logged, recomputed, log, _, _ = train_and_recompute(
        tmp_path, capsys, 3, "--task", "multi-label-classification", "--train_file", train,
        "--validation_file", valid, "--num_train_epochs", "2")
    assert "eval/f1_micro=" in log and "eval/f1_macro=" in log
    assert logged == pytest.approx(recomputed, abs=1e-5)
    assert logged["eval/f1_micro"] > every_label + 0.05


def test_text_label_in_train_is_not_blamed_on_dev(tokenizer, tmp_path):
    """One text label makes the train file's labels text; the dev file's "0" still reads as 0. The
    same label must be known, and an unknown one is reported against the file it is in."""
    train = bad(tmp_path, "train.tsv", "sentence\tlabel\ngood\t0\nbad\tpositive\n")
    dev = bad(tmp_path, "dev.tsv", "sentence\tlabel\nok\t0\nfine\tpositive\n")
    t = task(tokenizer, "--train_file", train, "--validation_file", dev)
    assert t.label_list == ["0", "positive"] and list(t.eval["labels"]) == [0, 1]
    bad(tmp_path, "dev.tsv", "sentence\tlabel\nok\tnegative\n")
    with pytest.raises(DataError, match=r"dev\.tsv: unknown label 'negative'"):
        task(tokenizer, "--train_file", train, "--validation_file", dev)
