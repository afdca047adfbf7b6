"""Task metrics against values computed by hand on fixed prediction sets."""
from __future__ import annotations

import numpy as np
import pytest

from distsparse.tasks.metrics import (
    classification_metrics, entity_scores, iob2_entities, multi_label_metrics, token_classification_metrics,
)

# (gold, predicted) sentences; the comments give the entity-level outcome.
GOLD = [
    ["B-PER", "I-PER", "O", "B-LOC"],   # PER hit; LOC predicted as ORG (type error: one FP ORG, one FN LOC)
    ["B-ORG", "I-ORG", "I-ORG", "O"],   # ORG cut short (boundary error: one FP, one FN)
    ["O", "B-MISC", "O"],               # predicted I-MISC without B-: no entity in strict mode (one FN)
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
    assert iob2_entities(["I-PER", "I-PER", "O", "B-LOC", "I-LOC", "I-PER"]) == [("LOC", 3, 5)]
    assert iob2_entities(["B-PER", "I-LOC"]) == [("PER", 0, 1)]
    assert iob2_entities(["B-X", "I-X", "B-X"]) == [("X", 0, 2), ("X", 2, 3)]
    assert iob2_entities(["O", "B-ORG", "I-ORG"]) == [("ORG", 1, 3)]
    assert iob2_entities([]) == []


def test_entity_scores_by_hand():
    # 7 true entities (PER 3, LOC 2, ORG 1, MISC 1), 5 found (PER 2, ORG 2, LOC 1), 2 hits (PER, LOC).
    got = entity_scores(GOLD, PRED)
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
