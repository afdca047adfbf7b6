"""``distsparse recipe check RECIPE``: validate a recipe and print what happens at which step.

Each modifier describes its own events (``Modifier.timeline``); this merges them into one table so
a user sees the schedule before spending hours on it: when pruning and QAT start, when observers
freeze, the LR at the key points, and what the run ends with.
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from .. import plots
from ..modifiers.base import Modifier
from ..modifiers.distillation import DistillationModifier
from ..modifiers.pruning import ConstantPruningModifier, GMPruningModifier
from ..modifiers.quantization import QuantizationModifier
from ..modifiers.training import LearningRateFunctionModifier, SetLearningRateModifier
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
    check.add_argument("--plot", type=Path, default=None, metavar="PNG",
                       help="also draw the timeline (LR, sparsity target, QAT and distillation phases) to this PNG")
    args = parser.parse_args(argv)
    figure = args.plot and plots.figure_class("--plot")  # before any work: a missing extra is the first thing said
    recipe = load_recipe(args.recipe, args.recipe_args)
    print(timeline_table(recipe, args.steps_per_epoch))
    if figure:
        print(f"\ntimeline plot: {plot_timeline(figure, recipe, args.steps_per_epoch, args.plot)}")
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


# -- the picture ------------------------------------------------------------------------------------------
PLOT_POINTS = 2000  # steps sampled per curve, besides every step where a modifier starts or ends


def plot_timeline(figure, recipe: Recipe, steps_per_epoch: int, path: Path) -> Path:
    """LR, sparsity target and the phases over steps, each from the modifiers' own schedule functions
    (``lr_at``, ``sparsity_at``, ``QuantizationModifier.phase``), so the picture is what a run does."""
    import numpy as np

    total = round(recipe.num_epochs * steps_per_epoch)
    modifiers = _merged(recipe.modifiers)
    edges = {s for m in modifiers for s, _ in m.timeline(steps_per_epoch)}
    steps = np.unique(np.concatenate([np.linspace(0, total, PLOT_POINTS).round(), [e + d for e in edges for d in (-1, 0)]]))
    steps = [int(s) for s in steps if 0 <= s <= total]
    fig = figure(figsize=(10, 6.5), layout="constrained")
    lr_ax, sparsity_ax, phase_ax = fig.subplots(3, 1, sharex=True, height_ratios=[2, 2, 1.6])
    fig.suptitle(f"{Path(recipe.source).name}: {recipe.num_epochs:g} epochs x {steps_per_epoch} steps")
    lrs = [_lr_at(recipe.modifiers, s, steps_per_epoch) for s in steps]
    lr_ax.plot(steps, [np.nan if lr is None else lr for lr in lrs], drawstyle="steps-post")
    lr_ax.set_ylabel("learning rate")
    lr_ax.yaxis.set_major_formatter("{x:.3g}")  # no "1e-5" offset text colliding with the epoch axis
    if all(lr is None for lr in lrs):
        lr_ax.text(0.5, 0.5, "not set by the recipe: --learning_rate", transform=lr_ax.transAxes, ha="center")
    plots.epoch_axis(lr_ax, steps_per_epoch)

    gradual = [m for m in modifiers if isinstance(m, GMPruningModifier)]
    for m in gradual:
        sparsity_ax.plot(steps, [m.sparsity_at(s, steps_per_epoch) for s in steps], drawstyle="steps-post",
                         label=f"{type(m).__name__} ({_spec_short(m.params)})")
    if gradual:
        sparsity_ax.legend(loc="lower right", fontsize="small")
    else:
        sparsity_ax.text(0.5, 0.5, _sparsity(recipe), transform=sparsity_ax.transAxes, ha="center", wrap=True)
    sparsity_ax.set_ylim(0, 1)
    sparsity_ax.set_ylabel("sparsity target")

    rows = _phase_rows(modifiers, steps_per_epoch, total)
    for y, (label, spans) in enumerate(rows):
        for start, end, color, text in spans:
            phase_ax.broken_barh([(start, end - start)], (y - 0.4, 0.8), color=color)
            if end - start >= 0.08 * total:  # a label wider than its bar would cover its neighbours
                phase_ax.text((start + end) / 2, y, text, ha="center", va="center", fontsize="small")
    phase_ax.set_yticks(range(len(rows)), [label for label, _ in rows])
    phase_ax.set_ylim(len(rows) - 0.5, -0.5)
    phase_ax.set_xlim(0, total)
    phase_ax.set_xlabel("optimizer step")
    return plots.save(fig, path)


def _lr_at(modifiers: list[Modifier], step: int, steps_per_epoch: int) -> float | None:
    """The LR optimizer step ``step`` uses: the value the latest modifier set (None: the optimizer's own).

    A function keeps setting its LR inside its window and leaves final_lr after it; a set holds
    from its start; on the same step the later modifier in the recipe wins, as events fire in order.
    """
    latest = None  # (when it was set, recipe order, lr)
    for order, m in enumerate(modifiers):
        setting = None
        if isinstance(m, LearningRateFunctionModifier):
            lr = m.lr_at(step, steps_per_epoch)
            end = m.end_step(steps_per_epoch)
            setting = (step, order, lr) if lr is not None else (end - 0.5, order, m.final_lr) if step >= end else None
        elif isinstance(m, SetLearningRateModifier) and step >= m.start_step(steps_per_epoch):
            setting = (m.start_step(steps_per_epoch), order, m.learning_rate)
        if setting and (latest is None or setting[:2] > latest[:2]):
            latest = setting
    return latest and latest[2]


QAT_PHASES = {(True, True, False): ("tab:olive", "calibrate"), (True, True, True): ("tab:orange", "QAT, observers on"),
              (True, False, True): ("tab:red", "QAT, frozen"), (True, False, False): ("tab:brown", "observers frozen")}


def _phase_rows(modifiers: list[Modifier], steps_per_epoch: int, total: int) -> list[tuple[str, list[tuple]]]:
    """(row label, [(start, end, color, text)]) for the pruning, distillation and QAT windows."""
    rows = []
    for m in modifiers:
        start, end = m.start_step(steps_per_epoch), m.end_step(steps_per_epoch)
        end = total if end is None else min(end, total)
        if isinstance(m, GMPruningModifier):
            spans = [(start, end, "tab:blue", f"{m.inter_func} {m.init_sparsity:g} -> {m.final_sparsity:g}")]
            if m.leave_enabled and end < total:
                spans.append((end, total, "lightsteelblue", "masks kept"))
            rows.append(("pruning", spans))
        elif isinstance(m, ConstantPruningModifier):
            rows.append(("pruning", [(start, end, "lightsteelblue", "zeros kept (constant)")]))
        elif isinstance(m, DistillationModifier):
            rows.append(("distillation", [(start, end, "tab:purple", f"hardness {m.hardness:g}, T {m.temperature:g} "
                                                                     "(with --teacher)")]))
        elif isinstance(m, QuantizationModifier):
            cuts = sorted({s for s in (start, start + m.calibration_steps, m.freeze_step(steps_per_epoch), total)
                           if s is not None and start <= s <= total})
            rows.append(("QAT", [(a, b, *QAT_PHASES[m.phase(a, steps_per_epoch)]) for a, b in zip(cuts, cuts[1:])]))
    return rows


def _spec_short(params) -> str:
    entries = [params] if isinstance(params, str) else list(params)
    return entries[0] if len(entries) == 1 else f"{len(entries)} patterns"


def _positive_int(text: str) -> int:
    value = int(text)
    if not 0 < value <= MAX_STEPS_PER_EPOCH:
        raise argparse.ArgumentTypeError(f"{text} is not a number of steps from 1 to {MAX_STEPS_PER_EPOCH}")
    return value
