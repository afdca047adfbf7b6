"""Task metrics against values computed by hand on fixed prediction sets, and against the packages users
compare with (seqeval, scipy, sklearn) on thousands of random cases where those are installed."""
from __future__ import annotations

import random

import numpy as np
import pytest

from distsparse.tasks.glue import GLUE, glue_metrics
from distsparse.tasks.metrics import (
    average_ranks, classification_metrics, entity_scores, iob2_entities, matthews_correlation, multi_label_metrics,
    pearson, regression_metrics, spearman, token_classification_metrics,
)

# (gold, predicted) sentences; the comments give the entity-level outcome.
GOLD = [
    ["B-PER", "I-PER", "O", "B-LOC"],   # PER hit; LOC predicted as ORG (type error: one FP ORG, one FN LOC)
    ["B-ORG", "I-ORG", "I-ORG", "O"],   # ORG cut short (boundary error: one FP, one FN)
    ["O", "B-MISC", "O"],               # predicted I-MISC without B-: strict, no entity (one FN); default, a hit
    ["B-PER", "B-PER"],                 # two PERs predicted as one (one FP, two FN)
    ["B-LOC", "O"],                     # LOC hit
]
PRED = [
    ["B-PER", "I-PER", "O", "B-ORG"],
    ["B-ORG", "I-ORG", "O", "O"],
    ["O", "I-MISC", "O"],
    ["B-PER", "I-PER"],
    ["B-LOC", "O"],
]


def test_iob2_entities_strict():
    assert iob2_entities(["I-PER", "I-PER", "O", "B-LOC", "I-LOC", "I-PER"], strict=True) == [("LOC", 3, 5)]
    assert iob2_entities(["B-PER", "I-LOC"], strict=True) == [("PER", 0, 1)]
    assert iob2_entities(["B-X", "I-X", "B-X"], strict=True) == [("X", 0, 2), ("X", 2, 3)]
    assert iob2_entities(["O", "B-ORG", "I-ORG"], strict=True) == [("ORG", 1, 3)]
    assert iob2_entities([], strict=True) == []


def test_iob2_entities_default_mode():
    """conlleval's rule: an I-X after O or after another type opens an entity."""
    assert iob2_entities(["I-PER", "I-PER", "O", "B-LOC", "I-LOC", "I-PER"]) == [("PER", 0, 2), ("LOC", 3, 5),
                                                                                ("PER", 5, 6)]
    assert iob2_entities(["B-PER", "I-LOC"]) == [("PER", 0, 1), ("LOC", 1, 2)]
    assert iob2_entities(["B-X", "I-X", "B-X"]) == [("X", 0, 2), ("X", 2, 3)]


def test_entity_scores_default_mode_by_hand():
    # As below, but the I-MISC of sentence 3 is found and hits: 6 found, 3 hits.
    got = entity_scores(GOLD, PRED)
    assert got["precision"] == pytest.approx(3 / 6) and got["recall"] == pytest.approx(3 / 7)
    assert got["f1"] == pytest.approx(6 / 13) and got["MISC_f1"] == 1.0 and got["PER_f1"] == pytest.approx(0.4)


def test_entity_scores_strict_by_hand():
    # 7 true entities (PER 3, LOC 2, ORG 1, MISC 1), 5 found (PER 2, ORG 2, LOC 1), 2 hits (PER, LOC).
    got = entity_scores(GOLD, PRED, strict=True)
    want = {
        "precision": 2 / 5, "recall": 2 / 7, "f1": 1 / 3, "accuracy": 11 / 15,
        "PER_precision": 1 / 2, "PER_recall": 1 / 3, "PER_f1": 0.4,
        "LOC_precision": 1.0, "LOC_recall": 1 / 2, "LOC_f1": 2 / 3,
        "ORG_precision": 0.0, "ORG_recall": 0.0, "ORG_f1": 0.0,
        "MISC_precision": 0.0, "MISC_recall": 0.0, "MISC_f1": 0.0,
    }
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key] == pytest.approx(value), key


def test_entity_scores_perfect_and_empty():
    assert entity_scores(GOLD, GOLD)["f1"] == 1.0
    nothing = entity_scores([["O", "O"]], [["O", "O"]])
    assert nothing == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "accuracy": 1.0}


def test_token_metrics_skip_ignored_positions():
    """-100 positions (special tokens, later sub-tokens, padding) are neither scored nor counted as tokens."""
    labels_list = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-MISC", "I-MISC"]
    ids = {t: i for i, t in enumerate(labels_list)}
    length = 2 * max(map(len, GOLD)) + 1
    labels = np.full((len(GOLD), length), -100)
    preds = np.zeros((len(GOLD), length), dtype=int)
    for row, (gold, pred) in enumerate(zip(GOLD, PRED)):
        cols = [1 + 2 * j for j in range(len(gold))]  # every other position, as with split words
        labels[row, cols] = [ids[t] for t in gold]
        preds[row, cols] = [ids[t] for t in pred]
        preds[row, [c + 1 for c in cols if c + 1 < length]] = ids["B-PER"]  # junk on ignored positions
    logits = np.eye(len(labels_list))[preds] * 3.0 - 1.0
    assert token_classification_metrics(labels_list)(logits, labels) == pytest.approx(entity_scores(GOLD, PRED))
    strict = token_classification_metrics(labels_list, strict=True)(logits, labels)
    assert strict == pytest.approx(entity_scores(GOLD, PRED, strict=True)) and strict["f1"] == pytest.approx(1 / 3)


GOLD_HOT = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 0]], dtype=np.float32)
LOGITS = np.array([[2.0, -2.0, 0.0], [-2.0, 2.0, 2.0], [2.0, 2.0, -2.0], [-2.0, -2.0, -2.0]])
# predictions at 0.5: [[1,0,0],[0,1,1],[1,1,0],[0,0,0]] (sigmoid(0) = 0.5 is not above the threshold)


def test_multi_label_by_hand():
    # class 0: tp 2; class 1: tp 2; class 2: fp 1, fn 1 -> micro 2*4/(8+1+1), macro (1+1+0)/3; rows 2, 3 exact.
    got = multi_label_metrics(0.5)(LOGITS, GOLD_HOT)
    assert got == pytest.approx({"f1_micro": 0.8, "f1_macro": 2 / 3, "accuracy": 0.5})


def test_multi_label_threshold():
    got = multi_label_metrics(0.9)(LOGITS, GOLD_HOT)  # sigmoid(2) = 0.88: nothing predicted
    assert got == pytest.approx({"f1_micro": 0.0, "f1_macro": 0.0, "accuracy": 0.25})
    got = multi_label_metrics(0.4)(LOGITS, GOLD_HOT)  # now sigmoid(0) counts: row 0 becomes exact
    assert got == pytest.approx({"f1_micro": 2 * 5 / (10 + 1 + 0), "f1_macro": (1 + 1 + 2 / 3) / 3, "accuracy": 0.75})


def test_classification_f1():
    labels = np.array([1, 1, 0, 0, 1])
    logits = np.eye(2)[[1, 0, 0, 1, 1]]  # tp 2, fn 1, fp 1
    assert classification_metrics(2, with_f1=True)(logits, labels) == pytest.approx({"accuracy": 0.6, "f1": 2 / 3})


# -- against seqeval, sklearn and scipy -------------------------------------------------------------

def random_tags(rnd: random.Random, n: int) -> list[str]:
    """IOB2 tags as a model emits them: any tag anywhere, so stray I-X, type switches and B-X I-Y all occur."""
    tags = ["O", "O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"]
    return [rnd.choice(tags) for _ in range(n)]


@pytest.mark.parametrize("strict", [False, True], ids=["default", "strict"])
def test_entity_scores_match_seqeval(strict):
    seqeval = pytest.importorskip("seqeval.metrics", reason="seqeval not installed (pip install distsparse[test])")
    from seqeval.scheme import IOB2

    rnd = random.Random(7)
    mode = {"mode": "strict", "scheme": IOB2} if strict else {}
    for trial in range(300):  # 300 sets of 1-12 sentences: ~20,000 random tags
        lengths = [rnd.randint(1, 12) for _ in range(rnd.randint(1, 12))]
        gold = [random_tags(rnd, n) for n in lengths]
        pred = [random_tags(rnd, n) for n in lengths]
        got = entity_scores(gold, pred, strict=strict)
        report = seqeval.classification_report(gold, pred, output_dict=True, zero_division=0, **mode)
        want = {"precision": seqeval.precision_score(gold, pred, zero_division=0, **mode),
                "recall": seqeval.recall_score(gold, pred, zero_division=0, **mode),
                "f1": seqeval.f1_score(gold, pred, zero_division=0, **mode),
                "accuracy": seqeval.accuracy_score(gold, pred)}
        for kind in ("PER", "LOC", "ORG"):
            if kind in report:
                want.update({f"{kind}_{k}": report[kind][f"{k}-score" if k == "f1" else k]
                             for k in ("precision", "recall", "f1")})
        assert {k: got[k] for k in want} == pytest.approx(want), (trial, gold, pred)
    assert entity_scores([["I-PER"]], [["I-PER"]])["f1"] == 1.0 and entity_scores([["I-PER"]], [["I-PER"]], True)["f1"] == 0


def test_matthews_correlation_by_hand():
    # tp 2, tn 1, fp 1, fn 1: (2*1 - 1*1) / sqrt(3 * 3 * 2 * 2) = 1/6
    assert matthews_correlation(np.array([1, 1, 1, 0, 0]), np.array([1, 1, 0, 1, 0])) == pytest.approx(1 / 6)
    assert matthews_correlation(np.array([1, 1, 1]), np.array([0, 1, 0])) == 0.0  # one predicted class: undefined -> 0
    assert matthews_correlation(np.array([2, 0, 1]), np.array([2, 0, 1])) == pytest.approx(1.0)


def test_matthews_correlation_matches_sklearn():
    sklearn = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    for trial in range(200):
        classes = int(rng.integers(2, 5))
        labels = rng.integers(0, classes, int(rng.integers(1, 60)))
        preds = np.where(rng.random(len(labels)) < 0.6, labels, rng.integers(0, classes, len(labels)))
        assert matthews_correlation(preds, labels) == pytest.approx(sklearn.matthews_corrcoef(labels, preds), abs=1e-12)


def test_pearson_spearman_by_hand():
    x, y = np.array([1.0, 2.0, 3.0, 4.0]), np.array([2.0, 4.0, 5.0, 4.0])
    # centred: x (-1.5, -.5, .5, 1.5), y (-1.75, .25, 1.25, .25): r = 3.5 / sqrt(5 * 4.75)
    assert pearson(x, y) == pytest.approx(3.5 / np.sqrt(5 * 4.75))
    assert list(average_ranks(y)) == [1.0, 2.5, 4.0, 2.5]
    # ranks of y (1, 2.5, 4, 2.5) centred: (-1.5, 0, 1.5, 0); of x: (-1.5, -.5, .5, 1.5): rho = 3 / sqrt(5 * 4.5)
    assert spearman(x, y) == pytest.approx(3 / np.sqrt(5 * 4.5))
    assert np.isnan(pearson(x, np.ones(4)))


def test_pearson_spearman_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(1)
    for trial in range(500):
        n = int(rng.integers(3, 80))
        x = rng.normal(size=n)
        y = np.round(0.7 * x + rng.normal(size=n), int(rng.integers(0, 3)))  # rounding makes ties
        x = np.round(x, 1) if trial % 2 else x
        assert pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0], abs=1e-10, nan_ok=True)
        assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-10, nan_ok=True)
        assert list(average_ranks(y)) == pytest.approx(list(stats.rankdata(y)))


def test_glue_metrics_as_run_glue_reports_them():
    """GLUE's metric per task, combined_score where there are several (run_glue.py's compute_metrics)."""
    labels = np.array([1, 1, 0, 0, 1])
    logits = np.eye(2)[[1, 0, 0, 1, 1]]  # tp 2, fn 1, fp 1, tn 1
    assert glue_metrics(GLUE["mrpc"])(logits, labels) == pytest.approx(
        {"accuracy": 0.6, "f1": 2 / 3, "combined_score": (0.6 + 2 / 3) / 2})
    assert glue_metrics(GLUE["rte"])(logits, labels) == pytest.approx({"accuracy": 0.6})
    assert glue_metrics(GLUE["cola"])(logits, labels) == pytest.approx({"matthews_correlation": 1 / 6})
    scores, targets = np.array([[1.0], [2.0], [3.0], [4.0]]), np.array([2.0, 4.0, 5.0, 4.0])
    r, rho = 3.5 / np.sqrt(5 * 4.75), 3 / np.sqrt(5 * 4.5)
    assert glue_metrics(GLUE["stsb"])(scores, targets) == pytest.approx(
        {"pearson": r, "spearmanr": rho, "combined_score": (r + rho) / 2})
    assert regression_metrics(scores, targets) == pytest.approx({"mse": (1 + 4 + 4 + 0) / 4})
