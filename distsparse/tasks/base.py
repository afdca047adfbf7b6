"""What every task provides to the loop: the data, the head to load, and its evaluation."""
from __future__ import annotations

from dataclasses import dataclass
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
