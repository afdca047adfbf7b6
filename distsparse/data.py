"""Data for each task: Hub datasets or local files, tokenized, checked before any training step.

A task is a function ``(args, tokenizer) -> TaskData``; ``TASKS`` maps ``--task`` names to them.
"""
from __future__ import annotations

import csv
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Callable

import datasets
import numpy as np
from transformers import (
    AutoModelForSequenceClassification, AutoModelForTokenClassification, DataCollatorForTokenClassification,
    DataCollatorWithPadding,
)

from .errors import DataError
from .metrics import classification_metrics, multi_label_metrics, token_classification_metrics

BUNDLED = Path(__file__).parent / "data"
DEFAULT_TRAIN = BUNDLED / "sst2_sample_train.tsv"
DEFAULT_VALIDATION = BUNDLED / "sst2_sample_dev.tsv"

# Column names tried, in order, when --input_column_names is not given (GLUE's and common ones).
TEXT_COLUMNS = [
    ("sentence1", "sentence2"), ("question", "sentence"), ("question1", "question2"),
    ("premise", "hypothesis"), ("sentence",), ("text",),
]
CONLL_SUFFIXES = (".txt", ".conll")


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
    """csv, tsv (GLUE style: quoting off), json/jsonl or CoNLL (txt, conll) into a Dataset; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty")
    suffix = path.suffix.lower()
    if suffix in CONLL_SUFFIXES:
        return read_conll(path)
    if suffix == ".tsv":
        kind, kwargs = "csv", {"delimiter": "\t", "quoting": csv.QUOTE_NONE}
    elif suffix == ".csv":
        kind, kwargs = "csv", {}
    elif suffix in (".json", ".jsonl"):
        kind, kwargs = "json", {}
    else:
        raise DataError(f"{path}: unsupported file type {suffix!r} (use csv, tsv, json, jsonl; txt or conll for CoNLL)")
    try:
        ds = datasets.load_dataset(kind, data_files=str(path), split="train", **kwargs)
    except Exception as err:  # the loaders raise many types; the user needs the file and the reason
        raise DataError(f"{path}: cannot be read as {suffix[1:]}: {str(err).splitlines()[0]}") from None
    if len(ds) == 0:
        raise DataError(f"{path}: file has no rows")
    return ds


def read_conll(path: Path) -> datasets.Dataset:
    """CoNLL columns (token first, tag last), a blank line between sentences, ``-DOCSTART-`` lines skipped."""
    rows = {"tokens": [], "ner_tags": []}
    tokens, tags = [], []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    for number, line in enumerate([*lines, ""], 1):
        parts = line.split()
        if parts and parts[0] != "-DOCSTART-":
            if len(parts) < 2:
                raise DataError(f"{path}:{number}: expected a token and a tag, got {line.strip()!r}")
            tokens.append(parts[0])
            tags.append(parts[-1])
        elif tokens:
            rows["tokens"].append(tokens)
            rows["ner_tags"].append(tags)
            tokens, tags = [], []
    if not rows["tokens"]:
        raise DataError(f"{path}: no sentences (expected 'token ... tag' lines, blank lines between sentences)")
    return datasets.Dataset.from_dict(rows)


def load_splits(args, bundled: bool = True) -> tuple[datasets.Dataset, datasets.Dataset | None, str, str]:
    """(train, eval, train_name, eval_name) from --dataset_name or --train_file/--validation_file.

    Without either, the bundled SST-2 sample where it fits the task (``bundled``), else an error.
    """
    if args.dataset_name:
        raw = datasets.load_dataset(args.dataset_name, args.dataset_config_name)
        eval_split = next((s for s in ("validation", "validation_matched", "test") if s in raw), None)
        name = f"{args.dataset_name}/{args.dataset_config_name or ''}"
        train, evaluation = raw["train"], raw[eval_split] if eval_split else None
        train_name, eval_name = f"{name}:train", f"{name}:{eval_split}"
    else:
        if not args.train_file and not bundled:
            raise DataError(f"--task {args.task}: pass --train_file (and --validation_file) or --dataset_name")
        train_file = args.train_file or DEFAULT_TRAIN
        eval_file = args.validation_file or (DEFAULT_VALIDATION if not args.train_file else None)
        train = read_file(train_file)
        evaluation = read_file(eval_file) if eval_file else None
        train_name, eval_name = str(train_file), str(eval_file)
    return limit(train, args.max_train_samples), limit(evaluation, args.max_eval_samples), train_name, eval_name


def require_columns(splits, columns: list[str]) -> None:
    """Every split has every column; ``splits`` is ((dataset or None, name), ...)."""
    for ds, where in splits:
        missing = [c for c in columns if ds is not None and c not in ds.column_names]
        if missing:
            raise DataError(f"{where}: missing column {missing[0]!r} (columns: {', '.join(ds.column_names)})")


def require_labels(splits, column: str) -> None:
    """No row without a label (an empty csv cell, a json null): it would fail mid-training, not here."""
    for ds, where in splits:
        row = next((i for i, v in enumerate(ds[column]) if v is None), None) if ds is not None else None
        if row is not None:
            raise DataError(f"{where}: row {row} has no label in column {column!r}")


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


def limit(ds, n):
    return ds.select(range(min(n, len(ds)))) if n is not None and ds is not None else ds


def tokenize_texts(tokenizer, batch, columns: list[str], max_length: int):
    texts = [[("" if t is None else str(t)) for t in batch[c]] for c in columns]
    return tokenizer(*texts, truncation=True, max_length=max_length)


def tokenize(ds, encode, labels_feature=None):
    """``labels_feature`` fixes the labels' type: map keeps a same-named source column's (ints for 0./1. floats)."""
    if ds is None:
        return None
    ds = ds.map(encode, batched=True, remove_columns=ds.column_names, desc="tokenizing")
    return ds.cast_column("labels", labels_feature) if labels_feature else ds


def text_classification(args, tokenizer) -> TaskData:
    """Single sentences or sentence pairs; labels may be ints or strings."""
    train, evaluation, train_name, eval_name = load_splits(args)
    columns = pick_text_columns(train, args.input_column_names, train_name)
    label_col = args.label_column_name or "label"
    require_columns([(evaluation, eval_name)], columns)
    require_columns([(train, train_name), (evaluation, eval_name)], [label_col])
    require_labels([(train, train_name), (evaluation, eval_name)], label_col)
    names = class_names(train.features[label_col])
    label_list = names or sorted(set(train[label_col]))
    label_to_id = {label: i for i, label in enumerate(label_list)}
    if not names:
        check_known(evaluation, lambda v: [v], label_to_id, eval_name, label_col)

    def encode(batch):
        enc = tokenize_texts(tokenizer, batch, columns, args.max_seq_length)
        enc["labels"] = batch[label_col] if names else [label_to_id[v] for v in batch[label_col]]
        return enc

    metrics = classification_metrics(len(label_list), with_f1=len(columns) > 1 or len(label_list) == 2)
    return TaskData(
        train=tokenize(train, encode), eval=tokenize(evaluation, encode), label_list=[str(x) for x in label_list],
        collator=DataCollatorWithPadding(tokenizer), compute_metrics=metrics,
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


def token_classification(args, tokenizer) -> TaskData:
    """One IOB2 tag per word (NER), learned on the word's first sub-token; the others get -100, as in HF's run_ner."""
    if not tokenizer.is_fast:
        raise DataError(f"--task token-classification needs a fast tokenizer (for word_ids): "
                        f"{type(tokenizer).__name__} is not one")
    train, evaluation, train_name, eval_name = load_splits(args, bundled=False)
    word_col = (args.input_column_names or "tokens").strip()
    tag_col = args.label_column_name or "ner_tags"
    require_columns([(train, train_name), (evaluation, eval_name)], [word_col, tag_col])
    require_labels([(train, train_name), (evaluation, eval_name)], tag_col)
    for ds, where in ((train, train_name), (evaluation, eval_name)):
        for row, (words, tags) in enumerate(zip(ds[word_col], ds[tag_col]) if ds is not None else ()):
            if len(words) != len(tags):
                raise DataError(f"{where}: row {row} has {len(words)} tokens but {len(tags)} tags")
    names = class_names(train.features[tag_col])
    label_list = names or sorted(set(chain.from_iterable(train[tag_col])), key=lambda t: (t != "O", t))
    bad = [t for t in label_list if t != "O" and not (t[:2] in ("B-", "I-") and len(t) > 2)]
    if bad:
        raise DataError(f"{train_name}: tag {bad[0]!r} in column {tag_col!r} is not IOB2 (O, B-TYPE or I-TYPE)")
    label_to_id = {label: i for i, label in enumerate(label_list)}
    if not names:
        check_known(evaluation, lambda tags: tags, label_to_id, eval_name, tag_col)

    def encoder(pad: bool):
        def encode(batch):
            enc = tokenizer(batch[word_col], is_split_into_words=True, truncation=True, max_length=args.max_seq_length,
                            padding="max_length" if pad else False)
            enc["labels"] = []
            for i, tags in enumerate(batch[tag_col]):
                ids = tags if names else [label_to_id[t] for t in tags]
                words = enc.word_ids(i)
                enc["labels"].append([-100 if w is None or w == prev else ids[w]
                                      for prev, w in zip([None, *words], words)])
            return enc
        return encode

    # Eval rows are padded to --max_seq_length here so that every eval batch has the same length and the
    # loop can gather and concatenate [B, L, C] logits across batches and ranks; train batches pad dynamically.
    return TaskData(
        train=tokenize(train, encoder(pad=False)), eval=tokenize(evaluation, encoder(pad=True)),
        label_list=label_list, collator=DataCollatorForTokenClassification(tokenizer),
        compute_metrics=token_classification_metrics(label_list), model_class=AutoModelForTokenClassification,
    )


TASKS: dict[str, Callable] = {
    "text-classification": text_classification,
    "token-classification": token_classification,
    "multi-label-classification": multi_label_classification,
}


def build_task(args, tokenizer) -> TaskData:
    if args.task not in TASKS:
        raise DataError(f"--task {args.task!r} is not supported (supported: {', '.join(TASKS)})")
    return TASKS[args.task](args, tokenizer)
