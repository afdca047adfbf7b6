"""Reading the data files and Hub splits every task starts from; errors name the file and the reason."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Callable

import datasets

from ..errors import DataError

BUNDLED = Path(__file__).parent.parent / "data"
DEFAULT_TRAIN = BUNDLED / "sst2_sample_train.tsv"
DEFAULT_VALIDATION = BUNDLED / "sst2_sample_dev.tsv"
CONLL_SUFFIXES = (".txt", ".conll")


def existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if path.stat().st_size == 0:
        raise DataError(f"{path}: file is empty")
    return path


def read_file(path: str | Path) -> datasets.Dataset:
    """csv, tsv (GLUE style: quoting off), json/jsonl or CoNLL (txt, conll) into a Dataset; errors name the file."""
    path = existing(path)
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


def read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None


def read_conll(path: Path) -> datasets.Dataset:
    """CoNLL columns (token first, tag last), a blank line between sentences, ``-DOCSTART-`` lines skipped."""
    rows = {"tokens": [], "ner_tags": []}
    tokens, tags = [], []
    for number, line in enumerate([*read_lines(path), ""], 1):
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


def load_splits(args, bundled: bool = True, reader: Callable = read_file,
                ) -> tuple[datasets.Dataset, datasets.Dataset | None, str, str]:
    """(train, eval, train_name, eval_name) from --dataset_name or --train_file/--validation_file (read by ``reader``).

    Without either, the bundled SST-2 sample where it fits the task (``bundled``), else an error.
    """
    if args.dataset_name:
        raw, name = hub_dataset(args)
        eval_split = next((s for s in ("validation", "validation_matched", "test") if s in raw), None)
        train, evaluation = raw["train"], raw[eval_split] if eval_split else None
        train_name, eval_name = f"{name}:train", f"{name}:{eval_split}"
    else:
        if not args.train_file and not bundled:
            raise DataError(f"--task {args.task}: pass --train_file (and --validation_file) or --dataset_name")
        train_file = args.train_file or DEFAULT_TRAIN
        eval_file = args.validation_file or (DEFAULT_VALIDATION if not args.train_file else None)
        train = reader(train_file)
        evaluation = reader(eval_file) if eval_file else None
        train_name, eval_name = str(train_file), str(eval_file)
    return limit(train, args.max_train_samples), limit(evaluation, args.max_eval_samples), train_name, eval_name


def hub_dataset(args) -> tuple[datasets.DatasetDict, str]:
    """--dataset_name (--dataset_config_name) from the Hub, and its name for messages; one line when it cannot load."""
    name = f"{args.dataset_name}/{args.dataset_config_name or ''}"
    try:
        return datasets.load_dataset(args.dataset_name, args.dataset_config_name), name
    except Exception as err:  # offline, unknown name, no such config: many types, one readable line
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"{name}: Hub dataset cannot be loaded: {reason[:300]} "
                        "(pass local files: --train_file, --validation_file)") from None


def load_split(args, hub_splits: tuple[str, ...], path, reader: Callable = read_file, n: int | None = None,
               ) -> tuple[datasets.Dataset | None, str]:
    """A split beside train and eval (a test set, MNLI's mismatched dev set): the file ``path`` if given,
    else the first of ``hub_splits`` that --dataset_name has; (None, "") if neither. Cut to ``n`` rows."""
    if path:
        return limit(reader(path), n), str(path)
    if args.dataset_name:
        raw, name = hub_dataset(args)
        split = next((s for s in hub_splits if s in raw), None)
        if split:
            return limit(raw[split], n), f"{name}:{split}"
    return None, ""


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


def limit(ds, n):
    return ds.select(range(min(n, len(ds)))) if n is not None and ds is not None else ds


def tokenize(ds, encode, labels_feature=None):
    """``labels_feature`` fixes the labels' type: map keeps a same-named source column's (ints for 0./1. floats)."""
    if ds is None:
        return None
    ds = ds.map(encode, batched=True, remove_columns=ds.column_names, desc="tokenizing")
    return ds.cast_column("labels", labels_feature) if labels_feature else ds
