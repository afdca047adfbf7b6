"""Command-line flags for ``distsparse train``, named as in Hugging Face's run_glue.py / TrainingArguments.

Every flag takes ``--name value`` and ``--name=value`` (the form W&B sweep agents pass). ``--config
FILE.yaml`` holds any of them; flags on the command line win over the file.

Recipe variables from the command line: ``--recipe.NAME=VALUE`` (or ``--recipe.NAME VALUE``) sets the
recipe variable NAME, merged over ``--recipe_args``. A W&B sweep sweeps a recipe variable by naming
its parameter ``recipe.NAME``: the agent's ``${args}`` then passes ``--recipe.NAME=VALUE``.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import yaml

from .compat import argparse_dests
from .errors import UserError
from .recipe import parse_recipe_args

RECIPE_PREFIX = "--recipe."


def build_parser() -> argparse.ArgumentParser:  # long: one line per flag, grouped as --help shows them
    p = argparse.ArgumentParser(
        prog="distsparse train",
        description="Sparse transfer learning with a SparseML-style recipe, on Accelerate.",
        allow_abbrev=False,
        epilog="recipe variables: --recipe.NAME=VALUE sets variable NAME of the recipe (wins over --recipe_args)",
    )
    add = p.add_argument
    add("--config", help="YAML file holding any of these flags (flags given here win)")
    g = p.add_argument_group("model and recipe")
    g.add_argument("--model_name_or_path", default=None, help="HF model dir or Hub name (default: the bundled MiniLM-L6)")
    g.add_argument("--tokenizer_name", default=None, help="defaults to --model_name_or_path")
    g.add_argument("--teacher", default="disable", help="teacher model path or Hub name, 'self' (a frozen copy of the start model) or 'disable'")
    g.add_argument("--recipe", default=None, help="recipe YAML / recipe card (default: distsparse/recipes/default.yaml, shipped in the package)")
    g.add_argument("--recipe_args", default=None, help="override recipe variables: JSON or k=v,k2=v2")
    g = p.add_argument_group("data")
    g.add_argument("--task", default="text-classification", help="text-classification, token-classification, "
                   "multi-label-classification, question-answering, masked-lm")
    g.add_argument("--dataset_name", default=None, help="Hub dataset name (needs network)")
    g.add_argument("--dataset_config_name", default=None)
    g.add_argument("--train_file", default=None, help="csv, tsv, json or jsonl (default: the bundled SST-2 sample)")
    g.add_argument("--validation_file", default=None)
    g.add_argument("--validation_mismatched_file", default=None,
                   help="--task_name mnli: the mismatched dev file (metrics reported with the suffix _mm)")
    g.add_argument("--test_file", default=None, help="--do_predict: rows to predict (csv, tsv, json, jsonl; labels optional)")
    g.add_argument("--input_column_names", default=None, help="comma-separated text columns, e.g. sentence1,sentence2")
    g.add_argument("--label_column_name", default=None,
                   help="default: label (text), ner_tags (token), labels (multi-label classification)")
    g.add_argument("--label_delimiter", default=",", help="multi-label: separator of the labels in a csv/tsv cell")
    g.add_argument("--multi_label_threshold", type=float, default=0.5, help="multi-label: predict where sigmoid > this")
    g.add_argument("--max_seq_length", "--sequence_length", type=int, default=128, help="--sequence_length: SparseML's name")
    g.add_argument("--doc_stride", type=int, default=128, help="question answering: tokens shared by neighbouring windows")
    g.add_argument("--n_best_size", type=int, default=20, help="question answering: best starts and ends tried per window")
    g.add_argument("--max_answer_length", type=int, default=30, help="question answering: longest answer, in tokens")
    g.add_argument("--version_2_with_negative", action="store_true",
                   help="question answering: SQuAD 2.0, some questions have no answer")
    g.add_argument("--null_score_diff_threshold", type=float, default=0.0,
                   help="SQuAD 2.0: answer nothing when the no-answer score beats the best span by more than this")
    g.add_argument("--mlm_probability", type=float, default=0.15, help="masked LM: share of tokens masked")
    g.add_argument("--max_train_samples", type=int, default=None)
    g.add_argument("--max_eval_samples", type=int, default=None)
    g.add_argument("--max_predict_samples", type=int, default=None)
    g.add_argument("--entity_scoring", choices=["conlleval", "strict"], default="conlleval",
                   help="token classification: entity F1 as seqeval's default mode (conlleval, as HF run_ner.py) "
                        "or its strict IOB2 mode")
    g = p.add_argument_group("training")
    g.add_argument("--output_dir", default="outputs/distsparse",
                   help="environment variables are expanded: outputs/sweep/$WANDB_RUN_ID gives each sweep run its own")
    switch(g, "--overwrite_output_dir",
           help="start fresh even if output_dir holds checkpoints of an earlier run (they are removed)")
    g.add_argument("--per_device_train_batch_size", type=int, default=32)
    g.add_argument("--per_device_eval_batch_size", type=int, default=64)
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--learning_rate", type=float, default=5e-5, help="used when the recipe sets no LR")
    g.add_argument("--weight_decay", type=float, default=0.0, help="used when the recipe sets no weight decay")
    g.add_argument("--num_train_epochs", type=float, default=3.0, help="used when the recipe has no epoch range")
    g.add_argument("--max_steps", type=int, default=-1, help="stop after at most this many optimizer steps (a smoke run "
                   "of a long recipe); the recipe's schedule keeps its epochs, so later modifiers never act")
    g.add_argument("--max_grad_norm", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=42)
    g.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None)
    g.add_argument("--eval_strategy", choices=["no", "steps", "epoch"], default="epoch")
    g.add_argument("--eval_steps", type=int, default=None, help="defaults to --save_steps, else --logging_steps")
    g.add_argument("--save_strategy", choices=["no", "steps", "epoch"], default="epoch")
    g.add_argument("--save_steps", type=int, default=500)
    g.add_argument("--save_total_limit", type=int, default=2)
    g.add_argument("--logging_steps", type=int, default=10)
    g.add_argument("--resume_from_checkpoint", default=None, help="a checkpoint dir, or 'latest' (starts fresh if none)")
    g.add_argument("--check_rank_consistency", choices=["epoch", "end", "off"], default="epoch")
    switch(g, "--debug_disable_rank_sync", help=argparse.SUPPRESS)
    g = p.add_argument_group("Hugging Face run_glue.py / SparseML names (same meaning)")
    switch(g, "--do_train", help="train (with none of --do_train/--do_eval: train and evaluate)")
    switch(g, "--do_eval", help="evaluate; without --do_train, the model as saved (QAT scales included)")
    switch(g, "--do_predict", help="write predictions of --test_file: predict_results_<task>.txt "
                                   "(token classification: predictions.txt)")
    g.add_argument("--task_name", default=None, help="a GLUE task (cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli): "
                   "its columns, labels and metrics; without data files, the Hub's nyu-mll/glue")
    switch(g, "--fp16", help="= --mixed_precision fp16")
    switch(g, "--bf16", help="= --mixed_precision bf16")
    switch(g, "--load_best_model_at_end", help="the saved model is the checkpoint with the best --metric_for_best_model")
    g.add_argument("--metric_for_best_model", default=None, help="an eval metric name (default: accuracy, else the first)")
    g.add_argument("--greater_is_better", type=boolean, default=None, help="default: False for *loss, else True")
    g.add_argument("--best_model_after_epoch", type=float, default=0.0,
                   help="SparseML: only evaluations from this epoch on compete (once the final sparsity is reached)")
    g.add_argument("--distill_teacher", dest="teacher", default=argparse.SUPPRESS, help="SparseML's name for --teacher")
    g = p.add_argument_group("tracking")
    g.add_argument("--report_to", choices=["none", "wandb", "tensorboard"], default="none")
    g.add_argument("--run_name", default=None)
    g.add_argument("--wandb_project", default=None, help="default: $WANDB_PROJECT (set by sweep agents), else distsparse")
    g.add_argument("--wandb_entity", default=None, help="default: $WANDB_ENTITY, else your W&B default entity")
    g.add_argument("--wandb_group", default=None)
    g.add_argument("--wandb_tags", default=None, help="comma-separated")
    return p


def boolean(text: str) -> bool:
    """``True``/``False`` as ``TrainingArguments`` and W&B sweep agents pass booleans."""
    value = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}.get(str(text).lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")
    return value


def switch(group, name: str, help: str) -> None:
    """A boolean flag: ``--name`` alone, or ``--name True`` / ``--name=False``."""
    group.add_argument(name, type=boolean, nargs="?", const=True, default=False, help=help)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    values: dict = {}
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise UserError(f"{path}: --config file not found")
        values = yaml.safe_load(path.read_text()) or {}
        if not isinstance(values, dict):
            raise UserError(f"{path}: expected a mapping of flag names to values")
        known = argparse_dests(parser)
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(f"{path}: unknown key {unknown[0]!r} (not a distsparse train flag)")
        parser.set_defaults(**values)
        args, rest = parser.parse_known_args(argv)
    overrides = recipe_overrides(parser, rest)
    if overrides:
        args.recipe_args = {**parse_recipe_args(args.recipe_args), **overrides}
    args.output_dir = os.path.expandvars(args.output_dir)
    args.given = sorted(given_flags(argv) | set(values))
    if not (args.do_train or args.do_eval or args.do_predict):
        args.do_train = args.do_eval = True  # the default job: train, then evaluate
    if args.fp16 or args.bf16:
        wanted = "bf16" if args.bf16 else "fp16"
        if (args.fp16 and args.bf16) or args.mixed_precision not in (None, wanted):
            raise UserError(f"--fp16/--bf16/--mixed_precision disagree: pick one precision ({wanted}?)")
        args.mixed_precision = wanted
    return args


def given_flags(argv: list[str] | None) -> set[str]:
    """The flags the user typed (``--name value`` or ``--name=value``), so a recipe that overrides one can say so."""
    import sys

    tokens = sys.argv[1:] if argv is None else argv
    return {t[2:].split("=", 1)[0] for t in tokens if t.startswith("--")}


def recipe_overrides(parser: argparse.ArgumentParser, rest: list[str]) -> dict:
    """``--recipe.NAME=VALUE`` / ``--recipe.NAME VALUE`` as {NAME: value}; any other leftover is an error."""
    overrides, rest = {}, list(rest)
    while rest:
        flag, sep, value = rest.pop(0).partition("=")
        if not flag.startswith(RECIPE_PREFIX) or flag == RECIPE_PREFIX:
            parser.error(f"unrecognized arguments: {flag}{sep}{value}")
        if not sep:
            if not rest:
                parser.error(f"argument {flag}: expected one argument")
            value = rest.pop(0)
        overrides.update(parse_recipe_args(f"{flag.removeprefix(RECIPE_PREFIX)}={value}"))
    return overrides
