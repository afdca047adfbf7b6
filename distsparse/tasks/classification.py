"""Sentence and sentence-pair classification, single- or multi-label (GLUE's files and the Hub's)."""
from __future__ import annotations

from copy import copy
from itertools import chain
from typing import Callable

import datasets
import numpy as np
from transformers import DataCollatorWithPadding

from ..errors import DataError
from .base import TaskData
from .files import load_split, load_splits, require_columns, require_labels, tokenize
from .glue import HUB_DATASET, MISMATCHED, glue_metrics, glue_task, label_id, layout
from .metrics import classification_metrics, multi_label_metrics, regression_metrics

# Column names tried, in order, when --input_column_names is not given (GLUE's and common ones).
TEXT_COLUMNS = [
    ("sentence1", "sentence2"), ("question", "sentence"), ("question1", "question2"),
    ("premise", "hypothesis"), ("sentence",), ("text",),
]


def pick_text_columns(ds: datasets.Dataset, requested: str | None, where: str) -> list[str]:
    if requested:
        columns = [c.strip() for c in requested.split(",") if c.strip()]
        require_columns([(ds, where)], columns)
        return columns
    for guess in TEXT_COLUMNS:
        if all(c in ds.column_names for c in guess):
            return list(guess)
    raise DataError(f"{where}: no text column found (columns: {', '.join(ds.column_names)}); pass --input_column_names")


def class_names(feature) -> list[str] | None:
    """Label names of a Hub ClassLabel column, or of a list column of ClassLabels (NER tags, multi-labels)."""
    names = getattr(feature, "names", None) or getattr(getattr(feature, "feature", None), "names", None)
    return list(names) if names else None


def check_known(ds, values: Callable, label_to_id: dict, where: str, column: str) -> None:
    """Eval labels must all be train labels: the model has no output for the others."""
    if ds is None:
        return
    unknown = sorted(set(chain.from_iterable(values(v) for v in ds[column])) - set(label_to_id), key=str)
    if unknown:
        raise DataError(f"{where}: unknown label {unknown[0]!r} in column {column!r} "
                        f"(train labels: {list(label_to_id)})")


def tokenize_texts(tokenizer, batch, columns: list[str], max_length: int):
    texts = [[("" if t is None else str(t)) for t in batch[c]] for c in columns]
    return tokenizer(*texts, truncation=True, max_length=max_length)


def text_classification(args, tokenizer) -> TaskData:
    """Single sentences or sentence pairs; labels may be ints or strings, or float scores (regression).

    ``--task_name`` (a GLUE task) fixes the columns, the label names and the metrics (``glue.py``).
    Regression, as run_glue.py: STS-B, or a label column of floats; one output, MSE loss."""
    preset = glue_task(args)
    if preset and not args.train_file and (args.dataset_name or HUB_DATASET) in ("glue", HUB_DATASET):
        args = copy(args)  # the Hub's GLUE, this task's config
        args.dataset_name, args.dataset_config_name = args.dataset_name or HUB_DATASET, args.task_name
    train, evaluation, train_name, eval_name = load_splits(args)
    if preset:
        columns, label_col = layout(preset, train.column_names)
        columns = [c.strip() for c in args.input_column_names.split(",")] if args.input_column_names else columns
        require_columns([(train, train_name)], columns)
        label_col = args.label_column_name or label_col
    else:
        columns = pick_text_columns(train, args.input_column_names, train_name)
        label_col = args.label_column_name or "label"
    splits = [(train, train_name), (evaluation, eval_name)]
    mismatched = (load_split(args, ("validation_mismatched",), args.validation_mismatched_file, n=args.max_eval_samples)
                  if args.task_name == "mnli" else (None, ""))
    if mismatched[0] is not None:
        splits.append(mismatched)
    require_columns(splits, columns + [label_col])
    require_labels(splits, label_col)
    names = class_names(train.features[label_col])
    if preset:
        regression = preset.regression
        label_list = list(preset.labels or ["LABEL_0"])
        ids = {} if names else {v: label_id(preset, v, where, label_col)
                                for ds, where in splits if ds is not None for v in set(ds[label_col])}
        to_label = (lambda v: v) if names else ids.__getitem__
        metrics = glue_metrics(preset)
    else:
        regression = getattr(train.features[label_col], "dtype", None) in ("float32", "float64")
        label_list = ["LABEL_0"] if regression else names or sorted(set(train[label_col]))
        label_to_id = {label: i for i, label in enumerate(label_list)}
        # A train file with one text label reads every label as text, its dev file may still read "0" as 0.
        as_train = str if label_list and isinstance(label_list[0], str) else (lambda v: v)
        if not (names or regression):
            check_known(evaluation, lambda v: [as_train(v)], label_to_id, eval_name, label_col)
        to_label = float if regression else (lambda v: v) if names else (lambda v: label_to_id[as_train(v)])
        metrics = (regression_metrics if regression else
                   classification_metrics(len(label_list), with_f1=len(columns) > 1 or len(label_list) == 2))

    def encode(batch):
        enc = tokenize_texts(tokenizer, batch, columns, args.max_seq_length)
        if label_col in batch:
            enc["labels"] = [to_label(v) for v in batch[label_col]]
        return enc

    labels_type = datasets.Value("float32") if regression else None
    tests = {}
    if args.do_predict:
        name = args.task_name or args.task
        tests[name] = load_split(args, ("test", "test_matched"), args.test_file, n=args.max_predict_samples)
        if args.task_name == "mnli":
            tests[f"{name}-{MISMATCHED}"] = load_split(args, ("test_mismatched",), None, n=args.max_predict_samples)
        if tests[name][0] is None:
            raise DataError("--do_predict: pass --test_file (csv, tsv, json or jsonl; labels optional)")
        require_columns([t for t in tests.values() if t[0] is not None], columns)
    return TaskData(
        train=tokenize(train, encode, labels_type), eval=tokenize(evaluation, encode, labels_type),
        label_list=[str(x) for x in label_list], collator=DataCollatorWithPadding(tokenizer), compute_metrics=metrics,
        problem_type="regression" if regression else None,
        more_evals={MISMATCHED: tokenize(mismatched[0], encode, labels_type)} if mismatched[0] is not None else {},
        predict_sets={name: tokenize(ds.select_columns(columns), encode) for name, (ds, _) in tests.items()
                      if ds is not None},
    )


def label_order(label: str):
    """Numbers in numeric order (2 before 10), then names alphabetically."""
    return (0, int(label), "") if label.isdigit() else (1, 0, label)


def multi_label_classification(args, tokenizer) -> TaskData:
    """Several labels per text (a list column, or a --label_delimiter string in csv/tsv); sigmoid + BCE."""
    train, evaluation, train_name, eval_name = load_splits(args, bundled=False)
    columns = pick_text_columns(train, args.input_column_names, train_name)
    label_col = args.label_column_name or "labels"
    require_columns([(evaluation, eval_name)], columns)
    require_columns([(train, train_name), (evaluation, eval_name)], [label_col])
    names = class_names(train.features[label_col])

    def labels_of(value) -> list:
        if value is None:
            return []
        if isinstance(value, str):
            return [v.strip() for v in value.split(args.label_delimiter) if v.strip()]
        if isinstance(value, float) and value.is_integer():  # pandas reads an int column with gaps as floats
            value = int(value)
        return [v if names else str(v) for v in (value if isinstance(value, list) else [value])]

    label_list = names or sorted(set(chain.from_iterable(labels_of(v) for v in train[label_col])), key=label_order)
    if not label_list:
        raise DataError(f"{train_name}: column {label_col!r} holds no labels")
    label_to_id = {i: i for i in range(len(names))} if names else {label: i for i, label in enumerate(label_list)}
    check_known(evaluation, labels_of, label_to_id, eval_name, label_col)

    def encode(batch):
        enc = tokenize_texts(tokenizer, batch, columns, args.max_seq_length)
        hot = np.zeros((len(batch[label_col]), len(label_list)), dtype=np.float32)
        for row, value in enumerate(batch[label_col]):
            hot[row, [label_to_id[v] for v in labels_of(value)]] = 1.0
        enc["labels"] = hot.tolist()
        return enc

    multi_hot = datasets.List(datasets.Value("float32"))
    return TaskData(
        train=tokenize(train, encode, multi_hot), eval=tokenize(evaluation, encode, multi_hot),
        label_list=[str(x) for x in label_list],
        collator=DataCollatorWithPadding(tokenizer), compute_metrics=multi_label_metrics(args.multi_label_threshold),
        problem_type="multi_label_classification",
    )
