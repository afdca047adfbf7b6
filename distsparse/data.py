"""Data for each task: Hub datasets or local files, tokenized, checked before any training step.

A task is a function ``(args, tokenizer) -> TaskData``; ``TASKS`` maps ``--task`` names to them.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import datasets
import numpy as np
from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding

from .errors import DataError
from .metrics import classification_metrics

BUNDLED = Path(__file__).parent / "data"
DEFAULT_TRAIN = BUNDLED / "sst2_sample_train.tsv"
DEFAULT_VALIDATION = BUNDLED / "sst2_sample_dev.tsv"

# Column names tried, in order, when --input_column_names is not given (GLUE's and common ones).
TEXT_COLUMNS = [
    ("sentence1", "sentence2"), ("question", "sentence"), ("question1", "question2"),
    ("premise", "hypothesis"), ("sentence",), ("text",),
]


@dataclass
class TaskData:
    train: datasets.Dataset
    eval: datasets.Dataset | None
    label_list: list
    collator: Callable
    compute_metrics: Callable[[np.ndarray, np.ndarray], dict]  # (logits, labels) -> metrics
    model_class: type = AutoModelForSequenceClassification
    problem_type: str | None = None

    @property
    def num_labels(self) -> int:
        return len(self.label_list)


def read_file(path: str | Path) -> datasets.Dataset:
    """csv, tsv (GLUE style: quoting off), json or jsonl into a Dataset; clear errors for bad files."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty")
    suffix = path.suffix.lower()
    if suffix == ".tsv":
        kind, kwargs = "csv", {"delimiter": "\t", "quoting": csv.QUOTE_NONE}
    elif suffix == ".csv":
        kind, kwargs = "csv", {}
    elif suffix in (".json", ".jsonl"):
        kind, kwargs = "json", {}
    else:
        raise DataError(f"{path}: unsupported file type {suffix!r} (use csv, tsv, json or jsonl)")
    try:
        ds = datasets.load_dataset(kind, data_files=str(path), split="train", **kwargs)
    except Exception as err:  # the loaders raise many types; the user needs the file and the reason
        raise DataError(f"{path}: cannot be read as {suffix[1:]}: {str(err).splitlines()[0]}") from None
    if len(ds) == 0:
        raise DataError(f"{path}: file has no rows")
    return ds


def load_splits(args) -> tuple[datasets.Dataset, datasets.Dataset | None, str, str]:
    """(train, eval, train_name, eval_name) from --dataset_name or --train_file/--validation_file."""
    if args.dataset_name:
        raw = datasets.load_dataset(args.dataset_name, args.dataset_config_name)
        eval_split = next((s for s in ("validation", "validation_matched", "test") if s in raw), None)
        name = f"{args.dataset_name}/{args.dataset_config_name or ''}"
        return raw["train"], raw[eval_split] if eval_split else None, f"{name}:train", f"{name}:{eval_split}"
    train_file = args.train_file or DEFAULT_TRAIN
    eval_file = args.validation_file or (DEFAULT_VALIDATION if not args.train_file else None)
    train = read_file(train_file)
    evaluation = read_file(eval_file) if eval_file else None
    return train, evaluation, str(train_file), str(eval_file)


def pick_text_columns(ds: datasets.Dataset, requested: str | None, where: str) -> list[str]:
    if requested:
        columns = [c.strip() for c in requested.split(",") if c.strip()]
        missing = [c for c in columns if c not in ds.column_names]
        if missing:
            raise DataError(f"{where}: missing column {missing[0]!r} (columns: {', '.join(ds.column_names)})")
        return columns
    for guess in TEXT_COLUMNS:
        if all(c in ds.column_names for c in guess):
            return list(guess)
    raise DataError(f"{where}: no text column found (columns: {', '.join(ds.column_names)}); pass --input_column_names")


def limit(ds, n):
    return ds.select(range(min(n, len(ds)))) if n is not None and ds is not None else ds


def text_classification(args, tokenizer) -> TaskData:
    """Single sentences or sentence pairs; labels may be ints or strings."""
    train, evaluation, train_name, eval_name = load_splits(args)
    train, evaluation = limit(train, args.max_train_samples), limit(evaluation, args.max_eval_samples)
    columns = pick_text_columns(train, args.input_column_names, train_name)
    if evaluation is not None:
        pick_text_columns(evaluation, ",".join(columns), eval_name)
    label_col = args.label_column_name
    for ds, name in ((train, train_name), (evaluation, eval_name)):
        if ds is not None and label_col not in ds.column_names:
            raise DataError(f"{name}: missing label column {label_col!r} (columns: {', '.join(ds.column_names)})")
    label_list = train.features[label_col].names if hasattr(train.features[label_col], "names") else sorted(set(train[label_col]))
    label_to_id = {label: i for i, label in enumerate(label_list)}
    if evaluation is not None and not hasattr(evaluation.features[label_col], "names"):
        unknown = sorted(set(evaluation[label_col]) - set(label_to_id), key=str)
        if unknown:
            raise DataError(f"{eval_name}: unknown label {unknown[0]!r} in column {label_col!r} (train labels: {label_list})")
    class_label = hasattr(train.features[label_col], "names")

    def encode(batch):
        texts = [[("" if t is None else str(t)) for t in batch[c]] for c in columns]
        enc = tokenizer(*texts, truncation=True, max_length=args.max_seq_length)
        enc["labels"] = batch[label_col] if class_label else [label_to_id[v] for v in batch[label_col]]
        return enc

    def tokenize(ds):
        if ds is None:
            return None
        return ds.map(encode, batched=True, remove_columns=ds.column_names, desc="tokenizing")

    metrics = classification_metrics(len(label_list), with_f1=len(columns) > 1 or len(label_list) == 2)
    return TaskData(
        train=tokenize(train), eval=tokenize(evaluation), label_list=[str(x) for x in label_list],
        collator=DataCollatorWithPadding(tokenizer), compute_metrics=metrics,
    )


TASKS: dict[str, Callable] = {"text-classification": text_classification}


def build_task(args, tokenizer) -> TaskData:
    if args.task not in TASKS:
        raise DataError(f"--task {args.task!r} is not supported (supported: {', '.join(TASKS)})")
    return TASKS[args.task](args, tokenizer)
