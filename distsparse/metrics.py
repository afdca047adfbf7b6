"""Task metrics computed locally (no download): the numbers users compare with GLUE's."""
from __future__ import annotations

import numpy as np


def f1_score(preds: np.ndarray, labels: np.ndarray, positive: int) -> float:
    tp = float(np.sum((preds == positive) & (labels == positive)))
    fp = float(np.sum((preds == positive) & (labels != positive)))
    fn = float(np.sum((preds != positive) & (labels == positive)))
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


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
