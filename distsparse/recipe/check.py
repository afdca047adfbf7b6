"""``distsparse recipe check RECIPE``: validate a recipe and print what happens at which step.

Each modifier describes its own events (``Modifier.timeline``); this merges them into one table so
a user sees the schedule before spending hours on it: when pruning and QAT start, when observers
freeze, the LR at the key points, and what the run ends with.
"""
from __future__ import annotations

import argparse
import dataclasses

from ..modifiers.base import Modifier
from .loader import Recipe, load_recipe

MAX_STEPS_PER_EPOCH = 10**6  # SST-2 at batch 1 has 67k; times MAX_EPOCHS it stays an exact float


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="distsparse recipe",
                                     description="Validate a recipe and print its timeline.")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="validate a recipe and print its timeline")
    check.add_argument("recipe", help="recipe YAML file or recipe card (.md)")
    check.add_argument("--recipe_args", default=None, help="override variables: JSON or k=v,k2=v2")
    check.add_argument("--steps_per_epoch", type=_positive_int, default=100,
                       help="optimizer steps per epoch to show steps for (default 100)")
    args = parser.parse_args(argv)
    recipe = load_recipe(args.recipe, args.recipe_args)
    print(timeline_table(recipe, args.steps_per_epoch))
    return 0


def timeline_table(recipe: Recipe, steps_per_epoch: int) -> str:
    total = round(recipe.num_epochs * steps_per_epoch)
    events = sorted(((step, text) for m in _merged(recipe.modifiers) for step, text in m.timeline(steps_per_epoch)),
                    key=lambda event: event[0])  # stable: same step keeps recipe order
    lines = [f"{recipe.source}: valid, {len(recipe.modifiers)} modifiers", "",
             f"{'epoch':>8}  {'step':>7}  what"]
    for step, text in events:
        late = f"  (after training ends at step {total})" if step > total else ""
        lines.append(f"{step / steps_per_epoch:>8.2f}  {step:>7}  {text}{late}")
    lines += ["", summary(recipe, steps_per_epoch, total)]
    return "\n".join(lines)


def _merged(modifiers: list[Modifier]) -> list[Modifier]:
    """Per-tensor modifiers that differ only in ``params`` shown as one: older recipes list one
    GMPruningModifier per weight, which would otherwise fill the table with near-identical rows."""
    groups: dict[tuple, list[Modifier]] = {}
    for m in modifiers:
        per_tensor = hasattr(m, "params") and not getattr(m, "global_sparsity", False)
        rest = tuple(repr(getattr(m, f.name)) for f in dataclasses.fields(m) if f.name != "params")
        groups.setdefault((type(m), rest) if per_tensor else (id(m),), []).append(m)
    return [group[0] if len(group) == 1 else dataclasses.replace(
        group[0], params=[p for m in group for p in ([m.params] if isinstance(m.params, str) else m.params)])
        for group in groups.values()]


def summary(recipe: Recipe, steps_per_epoch: int, total: int) -> str:
    parts = [f"total: {recipe.num_epochs:g} epochs = {total} steps at {steps_per_epoch} steps/epoch",
             f"final sparsity: {_sparsity(recipe)}", f"QAT: {_qat(recipe, steps_per_epoch, total)}"]
    return "; ".join(parts)


def _sparsity(recipe: Recipe) -> str:
    targets: dict[str, set[str]] = {}
    for m in recipe.modifiers:
        if hasattr(m, "final_sparsity"):
            value = m.final_sparsity
            targets.setdefault(f"{value:.2f}" if isinstance(value, float) else str(value), set()).add(type(m).__name__)
    parts = [f"{target} ({', '.join(sorted(names))})" for target, names in targets.items()]
    if any(type(m).__name__ == "ConstantPruningModifier" for m in recipe.modifiers):
        parts.append("the model's own zeros kept (ConstantPruningModifier)")
    return ", ".join(parts) or "none (no pruning modifier)"


def _qat(recipe: Recipe, steps_per_epoch: int, total: int) -> str:
    quant = [m for m in recipe.modifiers if hasattr(m, "disable_quantization_observer_epoch")]
    if not quant:
        return "none"
    windows = []
    for m in quant:
        start = m.start_step(steps_per_epoch)
        text = f"epochs {start / steps_per_epoch:g}-{recipe.num_epochs:g} (steps {start}-{total})"
        freeze = m.disable_quantization_observer_epoch
        if freeze is not None and freeze >= 0:
            text += f", observers freeze at epoch {freeze:g} (step {round(freeze * steps_per_epoch)})"
        windows.append(text)
    return "; ".join(windows)


def _positive_int(text: str) -> int:
    value = int(text)
    if not 0 < value <= MAX_STEPS_PER_EPOCH:
        raise argparse.ArgumentTypeError(f"{text} is not a number of steps from 1 to {MAX_STEPS_PER_EPOCH}")
    return value
