"""Settings that cannot work, refused before any model loads: one line each, naming flag and reason.

Without these a wrong ``--output_dir`` surfaces at the first save (after the whole run with
``--save_strategy no``), ``--max_seq_length 100000`` crashes mid-training, and a zero step count
divides by zero somewhere deep in the loop.
"""
from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path

from .errors import UserError

AT_LEAST_ONE = ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                "save_steps", "logging_steps", "max_seq_length", "eval_steps", "max_train_samples",
                "max_eval_samples", "max_predict_samples", "save_total_limit")
# A checkpoint holds the weights about four times over: model folder, training copy, AdamW's two moments.
CHECKPOINT_COPIES = 4


def check_before_loading(args, model_path: str) -> None:
    """Everything that can be checked from the command line and the disk alone."""
    check_flags(args)
    check_model_path("model_name_or_path", model_path)
    if args.teacher not in (None, "", "disable", "self"):
        check_model_path("teacher", args.teacher)
    check_output_dir(args.output_dir, model_bytes(model_path))
    positions = getattr(load_config("model_name_or_path", model_path), "max_position_embeddings", None)
    if positions and args.max_seq_length > positions:
        raise UserError(f"--max_seq_length {args.max_seq_length}: the model has {positions} positions")


def check_flags(args) -> None:
    for name in AT_LEAST_ONE:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise UserError(f"--{name} {value}: must be at least 1")
    for name in ("learning_rate", "weight_decay", "max_grad_norm"):
        value = getattr(args, name)
        if not math.isfinite(value) or value < 0:
            raise UserError(f"--{name} {value}: must be a finite number >= 0")
    if not math.isfinite(args.num_train_epochs) or args.num_train_epochs <= 0:
        raise UserError(f"--num_train_epochs {args.num_train_epochs}: must be a finite number > 0")
    if args.load_best_model_at_end:  # the best evaluation must have a checkpoint to come back to
        eval_every = args.eval_steps or args.save_steps
        if args.eval_strategy == "no" or args.save_strategy != args.eval_strategy or (
                args.save_strategy == "steps" and args.save_steps % eval_every):
            raise UserError("--load_best_model_at_end: needs --save_strategy equal to --eval_strategy (not 'no'), "
                            "and --save_steps a multiple of --eval_steps")


def check_output_dir(output_dir: str, model_bytes: int) -> None:
    """Writable, not a file, with room for one checkpoint (estimated from the model's size on disk)."""
    path = Path(output_dir)
    if path.exists() and not path.is_dir():
        raise UserError(f"--output_dir {path}: is a file, not a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as err:
        raise UserError(f"--output_dir {path}: not writable ({err.strerror or err})") from None
    need, free = CHECKPOINT_COPIES * model_bytes, shutil.disk_usage(path).free
    if need > free:
        raise UserError(f"--output_dir {path}: {free / 2**20:.0f} MiB free, one checkpoint needs about "
                        f"{need / 2**20:.0f} MiB")


def model_bytes(model_path: str) -> int:
    """Size of a local model's weight files (0 for a Hub name: nothing to measure before download)."""
    folder = Path(model_path)
    if not folder.is_dir():
        return 0
    return sum(f.stat().st_size for f in folder.iterdir() if f.suffix in (".safetensors", ".bin"))


def check_model_path(flag: str, value: str) -> None:
    """A value that looks like a path must exist (Hub names are ``name`` or ``org/name``)."""
    looks_local = value.startswith((".", "/", "~")) or value.count("/") > 1
    if looks_local and not Path(value).expanduser().is_dir():
        raise UserError(f"--{flag} {value}: no such model folder")


def check_teacher_labels(args, task) -> None:
    """A teacher must have the student's kind of head, and a classifier the task's labels; a regression
    has no class distribution for the DistillationModifier to compare (its KL over one output is always 0)."""
    if args.teacher in (None, "", "disable"):
        return
    if task.problem_type == "regression":
        raise UserError(f"--teacher {args.teacher}: distillation compares class distributions, a regression "
                        "task (one output, e.g. STS-B) has none; use --teacher disable")
    if args.teacher == "self":
        return
    config = load_config("teacher", args.teacher)
    head, wanted = _task_head(config), task.model_class.__name__.removeprefix("AutoModel")
    if head is not None and head != wanted:
        raise UserError(f"--teacher {args.teacher}: is a {config.architectures[0]}, the student trains a {wanted[3:]} "
                        f"head; distill from a teacher fine-tuned with the same head (a *{wanted} model)")
    if head in CLASSIFIER_HEADS and config.num_labels != task.num_labels:
        raise UserError(f"--teacher {args.teacher}: has {config.num_labels} labels, the task has {task.num_labels}")


def load_config(flag: str, name: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as err:
        raise UserError(f"--{flag} {name}: cannot be loaded ({str(err).strip().splitlines()[0][:160]})") from None


CLASSIFIER_HEADS = ("ForSequenceClassification", "ForTokenClassification")
TASK_HEADS = (*CLASSIFIER_HEADS, "ForQuestionAnswering", "ForMaskedLM")


def _task_head(config) -> str | None:
    """The task head a saved model was trained with (``ForQuestionAnswering``...), None for a bare encoder."""
    for architecture in config.architectures or []:
        for head in TASK_HEADS:
            if architecture.endswith(head):
                return head
    return None
