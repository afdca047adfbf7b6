"""What every task provides to the loop: the data, the head to load, and its evaluation."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import datasets
import numpy as np
import torch
from transformers import AutoModelForSequenceClassification


@dataclass
class TaskData:
    train: datasets.Dataset
    eval: datasets.Dataset | None
    label_list: list
    collator: Callable
    compute_metrics: Callable[[np.ndarray, np.ndarray], dict] | None = None  # (logits, labels) -> metrics
    model_class: type = AutoModelForSequenceClassification
    problem_type: str | None = None
    more_evals: dict[str, datasets.Dataset] = field(default_factory=dict)  # suffix -> set (MNLI: "mm" -> mismatched)
    predict_sets: dict[str, datasets.Dataset] = field(default_factory=dict)  # name -> --do_predict rows (labels optional)

    @property
    def num_labels(self) -> int:
        return len(self.label_list)

    def model_kwargs(self) -> dict:
        """What ``model_class.from_pretrained`` needs besides the path: the head's size and label names."""
        labels = dict(enumerate(self.label_list))
        return {"num_labels": self.num_labels, "id2label": labels, "label2id": {v: k for k, v in labels.items()},
                "problem_type": self.problem_type}

    def set_epoch(self, epoch: int) -> None:
        """Called by the loop at each epoch start; tasks whose training rows change per epoch (masked LM) override it."""

    @torch.no_grad()
    def evaluate(self, model, loader, accelerator) -> dict[str, float]:
        """Metrics over the whole eval set: logits and labels gathered from every rank (padding rows
        dropped), and the eval loss (each batch's mean, weighted by its rows), as HF's ``eval_loss``."""
        model.eval()
        logits, labels, losses = [], [], []
        for batch in loader:
            out = model(**batch)
            rows = len(batch["labels"])
            lg, lb, ls = accelerator.gather_for_metrics((out.logits.float(), batch["labels"], out.loss.float().repeat(rows)))
            logits.append(lg.cpu())
            labels.append(lb.cpu())
            losses.append(ls.cpu())
        model.train()
        metrics = self.compute_metrics(torch.cat(logits).numpy(), torch.cat(labels).numpy())
        return {"loss": float(torch.cat(losses).mean()), **metrics}

    @torch.no_grad()
    def predict(self, model, loader, accelerator) -> tuple[np.ndarray, np.ndarray | None]:
        """(logits, labels or None) of every row in the dataset's order: each step gathers the ranks'
        batches in rank order, which is the order the prepared loader dealt them; padding rows dropped."""
        model.eval()
        logits, labels = [], []
        for batch in loader:
            gold = batch.pop("labels", None)
            lg = model(**batch).logits.float()
            gathered = accelerator.gather_for_metrics(lg if gold is None else (lg, gold))
            logits.append((gathered if gold is None else gathered[0]).cpu())
            if gold is not None:
                labels.append(gathered[1].cpu())
        model.train()
        return torch.cat(logits).numpy(), torch.cat(labels).numpy() if labels else None

    def prediction_file(self, name: str) -> str:
        return f"predict_results_{name}.txt"

    def prediction_lines(self, logits: np.ndarray, labels: np.ndarray | None) -> list[str]:
        """run_glue.py's predict_results file: a header, then index and prediction (class name, or the score to 3 decimals)."""
        if self.problem_type == "regression":
            rows = [f"{i}\t{value:3.3f}" for i, value in enumerate(logits.reshape(len(logits), -1)[:, 0])]
        else:
            rows = [f"{i}\t{self.label_list[k]}" for i, k in enumerate(logits.argmax(-1))]
        return ["index\tprediction", *rows]
