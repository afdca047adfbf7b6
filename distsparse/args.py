"""Command-line flags for ``distsparse train``, named as in Hugging Face's run_glue.py / TrainingArguments.

Every flag takes ``--name value`` and ``--name=value`` (the form W&B sweep agents pass). ``--config
FILE.yaml`` holds any of them; flags on the command line win over the file.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import yaml

from .errors import UserError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="distsparse train",
        description="Sparse transfer learning with a SparseML-style recipe, on Accelerate.",
        allow_abbrev=False,
    )
    add = p.add_argument
    add("--config", help="YAML file holding any of these flags (flags given here win)")
    g = p.add_argument_group("model and recipe")
    g.add_argument("--model_name_or_path", default=None, help="HF model dir or Hub name (default: the bundled MiniLM-L6)")
    g.add_argument("--tokenizer_name", default=None, help="defaults to --model_name_or_path")
    g.add_argument("--teacher", default="disable", help="teacher model path or Hub name, 'self' (a frozen copy of the start model) or 'disable'")
    g.add_argument("--recipe", default=None, help="recipe YAML / recipe card (default: recipes/default.yaml shipped with distsparse)")
    g.add_argument("--recipe_args", default=None, help="override recipe variables: JSON or k=v,k2=v2")
    g = p.add_argument_group("data")
    g.add_argument("--task", default="text-classification")
    g.add_argument("--dataset_name", default=None, help="Hub dataset name (needs network)")
    g.add_argument("--dataset_config_name", default=None)
    g.add_argument("--train_file", default=None, help="csv, tsv, json or jsonl (default: the bundled SST-2 sample)")
    g.add_argument("--validation_file", default=None)
    g.add_argument("--input_column_names", default=None, help="comma-separated text columns, e.g. sentence1,sentence2")
    g.add_argument("--label_column_name", default="label")
    g.add_argument("--max_seq_length", type=int, default=128)
    g.add_argument("--max_train_samples", type=int, default=None)
    g.add_argument("--max_eval_samples", type=int, default=None)
    g = p.add_argument_group("training")
    g.add_argument("--output_dir", default="outputs/distsparse")
    g.add_argument("--per_device_train_batch_size", type=int, default=32)
    g.add_argument("--per_device_eval_batch_size", type=int, default=64)
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--learning_rate", type=float, default=5e-5, help="used when the recipe sets no LR")
    g.add_argument("--weight_decay", type=float, default=0.0, help="used when the recipe sets no weight decay")
    g.add_argument("--num_train_epochs", type=float, default=3.0, help="used when the recipe has no epoch range")
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
    g.add_argument("--debug_disable_rank_sync", action="store_true", help=argparse.SUPPRESS)
    g = p.add_argument_group("tracking")
    g.add_argument("--report_to", choices=["none", "wandb", "tensorboard"], default="none")
    g.add_argument("--run_name", default=None)
    g.add_argument("--wandb_project", default="distsparse")
    g.add_argument("--wandb_entity", default=None)
    g.add_argument("--wandb_group", default=None)
    g.add_argument("--wandb_tags", default=None, help="comma-separated")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise UserError(f"{path}: --config file not found")
        values = yaml.safe_load(path.read_text()) or {}
        if not isinstance(values, dict):
            raise UserError(f"{path}: expected a mapping of flag names to values")
        known = {a.dest for a in parser._actions}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(f"{path}: unknown key {unknown[0]!r} (not a distsparse train flag)")
        parser.set_defaults(**values)
        args = parser.parse_args(argv)
    return args
