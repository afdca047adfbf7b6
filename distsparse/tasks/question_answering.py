"""Extractive question answering (SQuAD v1.1 / 2.0) as Hugging Face's run_qa.py: windows, spans, EM/F1.

A context longer than ``--max_seq_length`` is cut into overlapping windows (``--doc_stride`` tokens
shared by neighbours), one *feature* each. The model scores every token as the answer's start and end;
evaluation gathers those logits per feature from every rank (each rank holds a share of the features,
``gather_for_metrics`` drops the padding of the last batch) and every rank then maps the best span of
each question's features back to the context's text, so each question is scored once.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import numpy as np
import torch
from transformers import AutoModelForQuestionAnswering, DataCollatorWithPadding

from ..errors import DataError
from .base import TaskData
from .files import existing, load_splits, read_file, require_columns
from .metrics import squad_scores

COLUMNS = ["id", "question", "context", "answers"]


def read_squad(path: str | Path) -> datasets.Dataset:
    """The official SQuAD JSON (``data/paragraphs/qas``) or flattened json/jsonl rows (id, question, context, answers)."""
    path = existing(path)
    if path.suffix.lower() == ".json":
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            doc = None  # json lines, or broken: read_file says which
        if isinstance(doc, dict) and "data" in doc:
            return flatten_squad(doc, path)
    return read_file(path)


def flatten_squad(doc: dict, path: Path) -> datasets.Dataset:
    rows = {"id": [], "title": [], "context": [], "question": [], "answers": []}
    try:
        for article in doc["data"]:
            for paragraph in article["paragraphs"]:
                for qa in paragraph["qas"]:
                    answers = [] if qa.get("is_impossible") else qa["answers"]
                    rows["id"].append(str(qa["id"]))
                    rows["title"].append(article.get("title", ""))
                    rows["context"].append(paragraph["context"])
                    rows["question"].append(qa["question"])
                    rows["answers"].append({"text": [a["text"] for a in answers],
                                            "answer_start": [int(a["answer_start"]) for a in answers]})
    except (KeyError, TypeError) as err:
        raise DataError(f"{path}: not SQuAD JSON (data/paragraphs/qas): missing {err}") from None
    if not rows["id"]:
        raise DataError(f"{path}: no questions under data/paragraphs/qas")
    return datasets.Dataset.from_dict(rows)


def check_answers(ds: datasets.Dataset, where: str, allow_unanswerable: bool) -> None:
    """Every answer's text is at its ``answer_start``; questions without an answer only in SQuAD 2.0 mode."""
    for qid, context, answers in zip(ds["id"], ds["context"], ds["answers"]):
        if not answers["text"] and not allow_unanswerable:
            raise DataError(f"{where}: question {qid} has no answer (SQuAD 2.0 data: pass --version_2_with_negative)")
        for text, start in zip(answers["text"], answers["answer_start"]):
            found = context[start:start + len(text)]
            if found != text:
                raise DataError(f"{where}: question {qid}: answer_start {start} does not match its text "
                                f"{text!r} (the context there reads {found!r})")


def windows(tokenizer, questions, contexts, args):
    """Question + context windows, every one padded to --max_seq_length (so eval logits concatenate)."""
    return tokenizer([q.lstrip() for q in questions], list(contexts), truncation="only_second",
                     max_length=args.max_seq_length, stride=args.doc_stride, return_overflowing_tokens=True,
                     return_offsets_mapping=True, padding="max_length")


def train_features(tokenizer, args, where: str):
    """Start/end token positions of the answer in each window; the [CLS] token (0) where it is not inside."""

    def encode(batch):
        enc = windows(tokenizer, batch["question"], batch["context"], args)
        enc["start_positions"], enc["end_positions"] = [], []
        for i, offsets in enumerate(enc.pop("offset_mapping")):
            answers = batch["answers"][enc["overflow_to_sample_mapping"][i]]
            start = end = 0
            if answers["text"]:
                first = answers["answer_start"][0]
                last = first + len(answers["text"][0])
                context = [t for t, s in enumerate(enc.sequence_ids(i)) if s == 1]
                if offsets[context[0]][0] <= first and offsets[context[-1]][1] >= last:
                    start = next(t for t in context if offsets[t][1] > first)
                    end = next(t for t in reversed(context) if offsets[t][0] < last)
            enc["start_positions"].append(start)
            enc["end_positions"].append(end)
        held = {row for row, start in zip(enc.pop("overflow_to_sample_mapping"), enc["start_positions"]) if start}
        for row, answers in enumerate(batch["answers"]):
            if answers["text"] and row not in held:
                raise DataError(f"{where}: question {batch['id'][row]}: no window of --max_seq_length "
                                f"{args.max_seq_length} (--doc_stride {args.doc_stride}) holds its whole answer")
        return enc

    return encode


@dataclass
class EvalFeatures:
    """What post-processing needs beside the logits: each feature's question and its tokens' character spans."""
    example_index: np.ndarray  # [F] row of the question in the eval set
    offsets: np.ndarray        # [F, L, 2] character span of each token in the context
    in_context: np.ndarray     # [F, L] the token is part of the context (answers may only be there)


def eval_features(tokenizer, evaluation: datasets.Dataset, args) -> tuple[datasets.Dataset, EvalFeatures]:
    enc = windows(tokenizer, evaluation["question"], evaluation["context"], args)
    in_context = np.array([[s == 1 for s in enc.sequence_ids(i)] for i in range(len(enc["input_ids"]))])
    meta = EvalFeatures(np.asarray(enc["overflow_to_sample_mapping"]), np.asarray(enc["offset_mapping"]), in_context)
    inputs = {k: enc[k] for k in ("input_ids", "token_type_ids", "attention_mask") if k in enc}
    return datasets.Dataset.from_dict(inputs), meta


def best_answers(contexts: list[str], features: EvalFeatures, start_logits: np.ndarray, end_logits: np.ndarray,
                 n_best_size: int = 20, max_answer_length: int = 30, version_2_with_negative: bool = False,
                 null_score_diff_threshold: float = 0.0) -> list[str]:
    """The answer text of each question, as run_qa's postprocess_qa_predictions picks it.

    Over all features of a question, the ``n_best_size`` best starts and ends form candidate spans inside
    the context (end not before start, at most ``max_answer_length`` tokens); the best sum of start and
    end logits wins. SQuAD 2.0: answer "" when the [CLS] score (the lowest over the features) beats the
    best span by more than ``null_score_diff_threshold``.
    """
    best: list[tuple[float, str]] = [(-np.inf, "")] * len(contexts)
    null = [np.inf] * len(contexts)
    for f, row in enumerate(features.example_index):
        start, end = start_logits[f], end_logits[f]
        null[row] = min(null[row], float(start[0] + end[0]))
        starts, ends = np.argsort(start)[::-1][:n_best_size], np.argsort(end)[::-1][:n_best_size]
        ok = features.in_context[f]
        valid = (ok[starts][:, None] & ok[ends][None, :] & (ends[None, :] >= starts[:, None])
                 & (ends[None, :] - starts[:, None] < max_answer_length))
        if not valid.any():
            continue
        scores = np.where(valid, start[starts][:, None] + end[ends][None, :], -np.inf)
        i, j = np.unravel_index(np.argmax(scores), scores.shape)
        if scores[i, j] > best[row][0]:
            span = (features.offsets[f][starts[i]][0], features.offsets[f][ends[j]][1])
            best[row] = (float(scores[i, j]), contexts[row][span[0]:span[1]])
    if not version_2_with_negative:
        return [text for _, text in best]
    return ["" if null[row] - score > null_score_diff_threshold else text for row, (score, text) in enumerate(best)]


@dataclass
class QuestionAnsweringData(TaskData):
    examples: datasets.Dataset | None = None  # eval questions: id, context, answers
    features: EvalFeatures | None = None
    options: dict = field(default_factory=dict)  # best_answers' n_best_size, max_answer_length, ...

    def model_kwargs(self) -> dict:
        return {}  # the QA head has two outputs (start, end): BERT's default num_labels

    @torch.no_grad()
    def evaluate(self, model, loader, accelerator) -> dict[str, float]:
        model.eval()
        starts, ends = [], []
        for batch in loader:
            out = model(**batch)
            start, end = accelerator.gather_for_metrics((out.start_logits.float(), out.end_logits.float()))
            starts.append(start.cpu())
            ends.append(end.cpu())
        model.train()
        texts = best_answers(list(self.examples["context"]), self.features, torch.cat(starts).numpy(),
                             torch.cat(ends).numpy(), **self.options)
        references = {qid: answers["text"] for qid, answers in zip(self.examples["id"], self.examples["answers"])}
        return squad_scores(dict(zip(self.examples["id"], texts)), references)


def question_answering(args, tokenizer) -> QuestionAnsweringData:
    if not tokenizer.is_fast:
        raise DataError(f"--task question-answering needs a fast tokenizer (for offsets): "
                        f"{type(tokenizer).__name__} is not one")
    if not 0 <= args.doc_stride < args.max_seq_length // 2:
        raise DataError(f"--doc_stride {args.doc_stride} must be below half of --max_seq_length {args.max_seq_length}")
    train, evaluation, train_name, eval_name = load_splits(args, bundled=False, reader=read_squad)
    splits = [(train, train_name), (evaluation, eval_name)]
    require_columns(splits, COLUMNS)
    for ds, where in splits:
        if ds is not None:
            check_answers(ds, where, args.version_2_with_negative)
    encode = train_features(tokenizer, args, train_name)
    train_set = train.map(encode, batched=True, remove_columns=train.column_names, desc="tokenizing")
    eval_set, features = eval_features(tokenizer, evaluation, args) if evaluation is not None else (None, None)
    return QuestionAnsweringData(
        train=train_set, eval=eval_set, label_list=[], collator=DataCollatorWithPadding(tokenizer),
        model_class=AutoModelForQuestionAnswering,
        examples=None if evaluation is None else evaluation.select_columns(["id", "context", "answers"]),
        features=features,
        options={"n_best_size": args.n_best_size, "max_answer_length": args.max_answer_length,
                 "version_2_with_negative": args.version_2_with_negative,
                 "null_score_diff_threshold": args.null_score_diff_threshold},
    )
