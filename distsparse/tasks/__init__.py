"""Tasks: the data reader, the model head and the evaluation each ``--task`` needs, checked before training.

A task is a function ``(args, tokenizer) -> TaskData``; ``TASKS`` maps ``--task`` names to them.
The training loop only calls ``model_kwargs()``, ``collator`` and ``evaluate()``: a task whose
evaluation is not "gather logits and labels" (question answering, masked LM) overrides ``evaluate``.
"""
from __future__ import annotations

from typing import Callable

from ..errors import DataError
from .base import TaskData
from .classification import multi_label_classification, text_classification
from .glue import glue_task
from .masked_lm import masked_lm
from .question_answering import question_answering
from .token_classification import token_classification

TASKS: dict[str, Callable] = {
    "text-classification": text_classification,
    "token-classification": token_classification,
    "multi-label-classification": multi_label_classification,
    "question-answering": question_answering,
    "masked-lm": masked_lm,
}

PREDICTING = ("text-classification", "token-classification")  # run_glue.py's and run_ner.py's predict files


def build_task(args, tokenizer) -> TaskData:
    if args.task not in TASKS:
        raise DataError(f"--task {args.task!r} is not supported (supported: {', '.join(TASKS)})")
    if args.do_predict and args.task not in PREDICTING:
        raise DataError(f"--do_predict: --task {args.task} writes no predictions ({' and '.join(PREDICTING)} do)")
    glue_task(args)  # --task_name: a GLUE task, and --task text-classification
    return TASKS[args.task](args, tokenizer)
