"""``--task_name``: the GLUE tasks as Hugging Face's run_glue.py sets them up (columns, labels, metrics).

Without data files a preset reads the Hub's ``nyu-mll/glue`` (network). With ``--train_file`` etc. it
reads the Hub's column names or those of GLUE's downloadable TSVs (``#1 String``/``Quality`` for MRPC,
``gold_label`` for MNLI, ``is_duplicate`` for QQP, ``score`` for STS-B); labels may be the class ids
or the class names. MNLI's second evaluation (mismatched) is reported with the suffix ``_mm`` and
predicted into ``predict_results_mnli-mm.txt``, as run_glue.py names them.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import DataError
from .metrics import f1_score, matthews_correlation, pearson, spearman

HUB_DATASET = "nyu-mll/glue"


@dataclass(frozen=True)
class GlueTask:
    columns: tuple[str, ...]  # text columns as the Hub names them
    labels: tuple[str, ...] | None  # class names in the Hub's order (= label ids); None: regression
    metrics: tuple[str, ...]  # what GLUE's metric reports (run_glue.py adds combined_score when more than one)
    tsv_columns: tuple[str, ...] = ()  # text columns of GLUE's downloadable TSV, where they differ
    tsv_label: str = "label"

    @property
    def regression(self) -> bool:
        return self.labels is None


GLUE = {
    "cola": GlueTask(("sentence",), ("unacceptable", "acceptable"), ("matthews_correlation",)),
    "sst2": GlueTask(("sentence",), ("negative", "positive"), ("accuracy",)),
    "mrpc": GlueTask(("sentence1", "sentence2"), ("not_equivalent", "equivalent"), ("accuracy", "f1"),
                     ("#1 String", "#2 String"), "Quality"),
    "qqp": GlueTask(("question1", "question2"), ("not_duplicate", "duplicate"), ("accuracy", "f1"),
                    tsv_label="is_duplicate"),
    "stsb": GlueTask(("sentence1", "sentence2"), None, ("pearson", "spearmanr"), tsv_label="score"),
    "mnli": GlueTask(("premise", "hypothesis"), ("entailment", "neutral", "contradiction"), ("accuracy",),
                     ("sentence1", "sentence2"), "gold_label"),
    "qnli": GlueTask(("question", "sentence"), ("entailment", "not_entailment"), ("accuracy",)),
    "rte": GlueTask(("sentence1", "sentence2"), ("entailment", "not_entailment"), ("accuracy",)),
    "wnli": GlueTask(("sentence1", "sentence2"), ("not_entailment", "entailment"), ("accuracy",)),
}
MISMATCHED = "mm"  # MNLI's second evaluation: metric suffix (_mm) and predict file (predict_results_mnli-mm.txt)


def glue_task(args) -> GlueTask | None:
    name = getattr(args, "task_name", None)
    if name is None:
        return None
    if name not in GLUE:
        raise DataError(f"--task_name {name!r} is not a GLUE task (GLUE: {', '.join(GLUE)})")
    if args.task != "text-classification":
        raise DataError(f"--task_name {name} is a text-classification task, not --task {args.task}")
    return GLUE[name]


def layout(preset: GlueTask, column_names: list[str]) -> tuple[list[str], str]:
    """(text columns, label column) of a split: GLUE's TSV names where the split has them, else the Hub's."""
    tsv = preset.tsv_columns and all(c in column_names for c in preset.tsv_columns)
    return list(preset.tsv_columns if tsv else preset.columns), preset.tsv_label if preset.tsv_label in column_names else "label"


def label_id(preset: GlueTask, value, where: str, column: str):
    """A file's label as the model's target: a float (regression), or the class id of an id or a class name."""
    if preset.regression:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise DataError(f"{where}: label {value!r} in column {column!r} is not a number (STS-B scores)") from None
    if isinstance(value, str) and value in preset.labels:
        return preset.labels.index(value)
    text = str(value).strip()
    if text.lstrip("-").isdigit() and 0 <= int(text) < len(preset.labels):
        return int(text)
    raise DataError(f"{where}: unknown label {value!r} in column {column!r} "
                    f"(labels: {', '.join(preset.labels)} or their ids 0-{len(preset.labels) - 1})")


def glue_metrics(preset: GlueTask):
    """GLUE's metric for the task, plus ``combined_score`` (their mean) where it reports several, as run_glue.py."""

    def compute(logits: np.ndarray, labels: np.ndarray) -> dict:
        if preset.regression:
            preds = logits.reshape(len(labels), -1)[:, 0]
            out = {"pearson": pearson(preds, labels), "spearmanr": spearman(preds, labels)}
        else:
            preds = logits.argmax(-1)
            every = {"accuracy": lambda: float((preds == labels).mean()),
                     "f1": lambda: f1_score(preds, labels, positive=1),
                     "matthews_correlation": lambda: matthews_correlation(preds, labels)}
            out = {name: every[name]() for name in preset.metrics}
        if len(out) > 1:
            out["combined_score"] = float(np.mean(list(out.values())))
        return out

    return compute
