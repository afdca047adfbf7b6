"""Task metrics computed locally (no download): the numbers users compare with GLUE's, seqeval's, sklearn's
and the official SQuAD scripts'.

Every factory returns ``compute(logits, labels) -> {name: float}``, called once on the whole eval set;
SQuAD scores answer texts instead (``squad_scores``).
"""
from __future__ import annotations

import re
import string
from collections import Counter

import numpy as np


def f1(tp, fp, fn):
    """F1 from counts; 0 where nothing was predicted or expected (sklearn's and seqeval's zero_division)."""
    tp, fp, fn = (np.asarray(x, dtype=float) for x in (tp, fp, fn))
    denom = 2 * tp + fp + fn
    return np.divide(2 * tp, denom, out=np.zeros_like(denom), where=denom > 0)


def f1_score(preds: np.ndarray, labels: np.ndarray, positive: int) -> float:
    p, g = preds == positive, labels == positive
    return float(f1(np.sum(p & g), np.sum(p & ~g), np.sum(~p & g)))


def classification_metrics(num_labels: int, with_f1: bool):
    """Accuracy; with F1 for the positive class (binary) or macro F1 (more classes), as GLUE reports."""

    def compute(logits: np.ndarray, labels: np.ndarray) -> dict:
        preds = logits.argmax(-1)
        out = {"accuracy": float((preds == labels).mean())}
        if with_f1:
            if num_labels == 2:
                out["f1"] = f1_score(preds, labels, positive=1)
            else:
                out["f1"] = float(np.mean([f1_score(preds, labels, c) for c in range(num_labels)]))
        return out

    return compute


def matthews_correlation(preds: np.ndarray, labels: np.ndarray) -> float:
    """Matthews correlation of class ids (multi-class R_K, as sklearn's matthews_corrcoef; GLUE's CoLA metric).
    0 where either side is a single class (the correlation is undefined)."""
    classes = np.union1d(preds, labels)
    confusion = np.zeros((len(classes), len(classes)))
    np.add.at(confusion, (np.searchsorted(classes, labels), np.searchsorted(classes, preds)), 1)
    true, pred, n = confusion.sum(1), confusion.sum(0), confusion.sum()
    cov_tp = np.trace(confusion) * n - true @ pred
    cov_pp, cov_tt = n * n - pred @ pred, n * n - true @ true
    return float(cov_tp / np.sqrt(cov_tt * cov_pp)) if cov_tt * cov_pp else 0.0


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson's r (scipy.stats.pearsonr's statistic); nan where either side is constant, as scipy."""
    x, y = (np.asarray(v, dtype=np.float64) - np.mean(v) for v in (x, y))
    denom = np.sqrt((x @ x) * (y @ y))
    return float(np.clip(x @ y / denom, -1.0, 1.0)) if denom else float("nan")


def average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks from 1, ties sharing their mean rank (scipy.stats.rankdata's "average")."""
    x = np.asarray(x)
    order = np.argsort(x, kind="stable")
    values = x[order]
    starts = np.flatnonzero(np.r_[True, values[1:] != values[:-1]])  # first position of each distinct value
    ends = np.r_[starts[1:], len(x)]
    ranks = np.empty(len(x))
    ranks[order] = np.repeat((starts + ends + 1) / 2, ends - starts)
    return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rho: Pearson's r of the average ranks (scipy.stats.spearmanr's statistic)."""
    return pearson(average_ranks(x), average_ranks(y))


def regression_metrics(logits: np.ndarray, labels: np.ndarray) -> dict:
    """Mean squared error of the single output, as run_glue.py reports a non-GLUE regression."""
    preds = logits.reshape(len(labels), -1)[:, 0]
    return {"mse": float(np.mean((preds - labels) ** 2))}


def multi_label_metrics(threshold: float):
    """Micro/macro F1 and subset accuracy of ``sigmoid(logits) > threshold`` against multi-hot labels."""

    def compute(logits: np.ndarray, labels: np.ndarray) -> dict:
        preds = 1.0 / (1.0 + np.exp(-logits.astype(np.float64))) > threshold
        gold = labels > 0.5
        tp, fp, fn = (preds & gold).sum(0), (preds & ~gold).sum(0), (~preds & gold).sum(0)
        return {"f1_micro": float(f1(tp.sum(), fp.sum(), fn.sum())), "f1_macro": float(f1(tp, fp, fn).mean()),
                "accuracy": float((preds == gold).all(1).mean())}

    return compute


def iob2_entities(tags: list[str], strict: bool = False) -> list[tuple[str, int, int]]:
    """(type, start, end) spans of IOB2 tags, as seqeval finds them.

    Default (seqeval's default mode, conlleval's rule, what HF's run_ner.py reports): an I-X after O or
    after another type opens an entity too. ``strict`` (seqeval ``mode="strict", scheme=IOB2``): only
    B-X opens one, a stray I-X is no entity. Either way I-X continues an open X and anything else closes it.
    """
    spans, start, kind = [], None, None
    for i, tag in enumerate([*tags, "O"]):
        if start is not None and tag != f"I-{kind}":
            spans.append((kind, start, i))
            start = None
        if tag.startswith("B-") or (not strict and start is None and tag.startswith("I-")):
            start, kind = i, tag[2:]
    return spans


def entity_scores(gold: list[list[str]], pred: list[list[str]], strict: bool = False) -> dict:
    """Entity precision/recall/F1 over sentences (micro, and per type) plus token accuracy, like seqeval
    (its default mode, or ``strict``: see ``iob2_entities``)."""
    true = {(s, *e) for s, tags in enumerate(gold) for e in iob2_entities(tags, strict)}
    found = {(s, *e) for s, tags in enumerate(pred) for e in iob2_entities(tags, strict)}
    hits = true & found
    n_true, n_found, n_hits = (Counter(e[1] for e in x) for x in (true, found, hits))

    def prf(tp, n_pred, n_gold, prefix=""):
        return {f"{prefix}precision": tp / n_pred if n_pred else 0.0, f"{prefix}recall": tp / n_gold if n_gold else 0.0,
                f"{prefix}f1": float(f1(tp, n_pred - tp, n_gold - tp))}

    tokens = sum(len(t) for t in gold)
    correct = sum(g == p for gt, pt in zip(gold, pred) for g, p in zip(gt, pt))
    out = {**prf(len(hits), len(found), len(true)), "accuracy": correct / tokens if tokens else 0.0}
    for kind in sorted(n_true | n_found):
        out.update(prf(n_hits[kind], n_found[kind], n_true[kind], prefix=f"{kind}_"))
    return out


def token_classification_metrics(label_list: list[str], strict: bool = False):
    """Entity scores of argmax tags at the positions labelled (not -100: special tokens, later sub-tokens, padding)."""
    names = np.asarray(label_list, dtype=object)

    def compute(logits: np.ndarray, labels: np.ndarray) -> dict:
        preds = logits.argmax(-1)
        keep = labels != -100
        gold = [list(names[row[k]]) for row, k in zip(labels, keep)]
        pred = [list(names[row[k]]) for row, k in zip(preds, keep)]
        return entity_scores(gold, pred, strict)

    return compute


PUNCTUATION = set(string.punctuation)
ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)


def normalize_answer(text: str) -> str:
    """The official SQuAD normalization: lowercase, drop punctuation, drop articles a/an/the, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in PUNCTUATION)
    return " ".join(ARTICLES.sub(" ", text).split())


def answer_f1(prediction: str, gold: str) -> float:
    """Token-overlap F1 of the normalized texts; two empty texts (SQuAD 2.0: "no answer") score 1."""
    pred, true = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred or not true:
        return float(pred == true)
    same = sum((Counter(pred) & Counter(true)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(true)
    return 2 * precision * recall / (precision + recall)


def squad_scores(predictions: dict[str, str], references: dict[str, list[str]]) -> dict:
    """Exact match and F1 in percent, each question's best over its reference answers, as the official scripts.

    A question whose references are all empty after normalization is unanswerable (SQuAD 2.0): it scores
    1 only for an empty prediction. With both kinds present, ``has_answer_*`` and ``no_answer_*`` split them.
    """
    groups: dict[str, list[tuple[float, float]]] = {"has_answer": [], "no_answer": []}
    for qid, answers in references.items():
        golds = [a for a in answers if normalize_answer(a)] or [""]
        pred = predictions[qid]
        exact = max(float(normalize_answer(pred) == normalize_answer(g)) for g in golds)
        groups["has_answer" if golds != [""] else "no_answer"].append((exact, max(answer_f1(pred, g) for g in golds)))
    everything = groups["has_answer"] + groups["no_answer"]
    out = {"exact_match": 100 * float(np.mean([e for e, _ in everything])),
           "f1": 100 * float(np.mean([f for _, f in everything]))}
    if all(groups.values()):
        for name, scores in groups.items():
            out[f"{name}_exact_match"] = 100 * float(np.mean([e for e, _ in scores]))
            out[f"{name}_f1"] = 100 * float(np.mean([f for _, f in scores]))
    return out
