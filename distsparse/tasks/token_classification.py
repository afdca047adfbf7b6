"""Token classification (NER): one IOB2 tag per word, CoNLL files or json/jsonl word lists."""
from __future__ import annotations

from itertools import chain

import numpy as np
from transformers import AutoModelForTokenClassification, DataCollatorForTokenClassification

from ..errors import DataError
from .base import TaskData
from .classification import check_known, class_names
from .files import load_split, load_splits, require_columns, require_labels, tokenize
from .metrics import token_classification_metrics


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

    tests = {}
    if args.do_predict:
        test, test_name = load_split(args, ("test",), args.test_file, n=args.max_predict_samples)
        if test is None:
            raise DataError("--do_predict: pass --test_file (CoNLL txt/conll, json or jsonl; tags optional)")
        require_columns([(test, test_name)], [word_col])
        if tag_col not in test.column_names:  # no tags: a stand-in tag marks each word's first sub-token, where it is predicted
            test = test.add_column(tag_col, [[0 if names else label_list[0]] * len(words) for words in test[word_col]])
        if not names:
            check_known(test, lambda tags: tags, label_to_id, test_name, tag_col)
        tests[args.task] = test

    # Eval (and test) rows are padded to --max_seq_length here so that every batch has the same length and the
    # loop can gather and concatenate [B, L, C] logits across batches and ranks; train batches pad dynamically.
    return TokenClassificationData(
        train=tokenize(train, encoder(pad=False)), eval=tokenize(evaluation, encoder(pad=True)),
        label_list=label_list, collator=DataCollatorForTokenClassification(tokenizer),
        compute_metrics=token_classification_metrics(label_list, strict=args.entity_scoring == "strict"),
        model_class=AutoModelForTokenClassification,
        predict_sets={name: tokenize(ds, encoder(pad=True)) for name, ds in tests.items()},
    )


class TokenClassificationData(TaskData):
    def prediction_file(self, name: str) -> str:
        return "predictions.txt"

    def prediction_lines(self, logits: np.ndarray, labels: np.ndarray | None) -> list[str]:
        """run_ner.py's predictions.txt: each sentence's predicted tags, one per word (truncated words have none)."""
        preds = logits.argmax(-1)
        return [" ".join(self.label_list[p] for p, gold in zip(row, marks) if gold != -100)
                for row, marks in zip(preds, labels)]
