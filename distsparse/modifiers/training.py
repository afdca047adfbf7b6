"""Epoch range, learning rate and weight decay: SparseML's training modifiers, as pure functions of the step.

Every value a modifier writes into the optimizer is computed from ``state.step`` alone, so a resumed
run sets exactly what an uninterrupted one would. Schedules work in optimizer steps: an epoch value
``e`` becomes step ``round(e * steps_per_epoch)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..events import NO_DECAY, Event, State
from .base import Modifier, register

LR_FUNCS = ("linear", "cosine", "cyclic_linear")


def _num(x: float) -> str:
    return f"{x:.6g}"


def _groups(modifier: Modifier, optimizer, indices: list[int] | None) -> list[dict]:
    """The optimizer param groups a modifier's ``param_groups`` names (all when not given)."""
    groups = optimizer.param_groups
    if indices is None:
        return list(groups)
    bad = [i for i in indices if not 0 <= i < len(groups)]
    if bad:
        modifier.fail("param_groups", f"{bad} out of range: the optimizer has {len(groups)} param groups")
    return [groups[i] for i in indices]


@register
@dataclass(kw_only=True)
class EpochRangeModifier(Modifier):
    """How long training runs; the loop reads ``recipe.num_epochs`` (the largest end_epoch).

    end_epoch must be set and after start_epoch: a range of no epochs would leave the length to the
    loop's default, which the recipe never asked for. EpochRangeModifiers that overlap must be
    identical (``check_epoch_ranges``): identical copies are allowed, since a recipe that lists one
    per modifier group means one range; disjoint ones are the stages of a staged recipe.
    """

    def timeline(self, steps_per_epoch: int) -> list[tuple[int, str]]:
        points = [(self.start_step(steps_per_epoch), "EpochRangeModifier: training starts")]
        end = self.end_step(steps_per_epoch)
        if end is not None:
            points.append((end, f"EpochRangeModifier: training ends after epoch {_num(self.end_epoch)}"))
        return points

    def validate(self) -> None:
        super().validate()
        if self.end_epoch <= max(self.start_epoch, 0):
            self.fail("end_epoch", f"{_num(self.end_epoch)}: must be set and after start_epoch "
                                   f"{_num(self.start_epoch)} (it is how long training runs)")


def check_epoch_ranges(modifiers: list[Modifier]) -> None:
    """Refuse EpochRangeModifiers that overlap with different ranges: the loop runs one length, and
    taking the largest end would silently ignore the others. Disjoint ranges are the stages of a
    staged recipe (as ``Recipe.to_yaml`` writes one); identical copies are one range."""
    ranges: dict[tuple[float, float], Modifier] = {}
    for modifier in modifiers:
        if isinstance(modifier, EpochRangeModifier):  # -1: from the start
            ranges.setdefault((max(modifier.start_epoch, 0), modifier.end_epoch), modifier)
    latest = None  # (range, modifier) of the range seen so far that ends last
    for (start, end), modifier in sorted(ranges.items(), key=lambda item: item[0]):
        if latest and start < latest[0][1]:
            (other_start, other_end), other = latest
            modifier.fail("end_epoch" if start == other_start else "start_epoch",
                          f"epochs {_num(start)}-{_num(end)} overlap epochs {_num(other_start)}-{_num(other_end)} "
                          f"of the EpochRangeModifier at {other.where.split()[0]}; a recipe trains for one range")
        if latest is None or end > latest[0][1]:
            latest = ((start, end), modifier)


@register
@dataclass(kw_only=True)
class LearningRateFunctionModifier(Modifier):
    """Sets every param group's LR to ``lr_func`` of the step at each step of [start_epoch, end_epoch).

    A modifier owns only its own window, so schedules in sequence (one ending where the next starts)
    never fight over a step. After its last step it leaves the LR at ``final_lr``, as SparseML does.
    """

    lr_func: str = "linear"
    init_lr: float | None = None
    final_lr: float | None = None
    cycle_epochs: float = 1.0
    param_groups: list[int] | None = None
    update_frequency: float = -1.0  # SparseML key; the LR is always updated every step
    constant_logging: bool = False  # SparseML key; the loop logs the LR itself

    def lr_at(self, step: int, steps_per_epoch: int) -> float | None:
        """The LR this modifier gives optimizer step ``step``; None outside its window."""
        start, end = self.start_step(steps_per_epoch), self.end_step(steps_per_epoch)
        if not start <= step < end:
            return None
        init, final = self.init_lr, self.final_lr
        if self.lr_func == "cyclic_linear":
            # SparseML: each cycle goes from init_lr at its first step to final_lr at its last;
            # a shorter last cycle fits what is left of the window.
            cycle = max(1, round(self.cycle_epochs * steps_per_epoch))
            pos = (step - start) % cycle
            last = (end - start) - (step - start - pos)  # steps in this cycle
            length = min(cycle, last)
            return init if length <= 1 else init - pos / (length - 1) * (init - final)
        progress = (step - start) / (end - start)
        if self.lr_func == "cosine":
            return init + (final - init) * (1 - math.cos(math.pi * progress)) / 2
        return init + progress * (final - init)

    def match(self, event: Event, state: State) -> bool:
        if event == Event.BATCH_START:
            return self.active(state)
        last = self.end_step(state.steps_per_epoch) - 1
        return event == Event.OPTIMIZER_STEP_END and state.step == last

    def apply(self, event: Event, state: State) -> None:
        lr = self.final_lr if event == Event.OPTIMIZER_STEP_END else self.lr_at(state.step, state.steps_per_epoch)
        for group in _groups(self, state.optimizer, self.param_groups):
            group["lr"] = lr

    def timeline(self, steps_per_epoch: int) -> list[tuple[int, str]]:
        start, end = self.start_step(steps_per_epoch), self.end_step(steps_per_epoch)
        name = "LearningRateFunctionModifier"
        if end <= start:
            return [(start, f"{name}: window under one step at {steps_per_epoch} steps/epoch: "
                            f"{self.lr_func} schedule skipped")]
        mid = (start + end) // 2
        cycle = f", cycles of {_num(self.cycle_epochs)} epochs" if self.lr_func == "cyclic_linear" else ""
        lrs = ", ".join(f"{_num(self.lr_at(s, steps_per_epoch))} at step {s}" for s in sorted({start, mid, end - 1}))
        return [
            (start, f"{name}: {self.lr_func} lr {_num(self.init_lr)} -> {_num(self.final_lr)}{cycle} (lr {lrs})"),
            (end, f"{name} ends: lr left at final_lr {_num(self.final_lr)} unless another LR modifier starts"),
        ]

    def validate(self) -> None:
        super().validate()
        if self.lr_func not in LR_FUNCS:
            self.fail("lr_func", f"{self.lr_func!r} is not one of {', '.join(LR_FUNCS)}")
        for key in ("init_lr", "final_lr"):
            value = getattr(self, key)
            if value is None:
                self.fail(key, "required")
            if not 0 <= value <= 1:
                self.fail(key, f"{value} is outside [0, 1]")
        if self.end_epoch < 0 or self.end_epoch <= max(self.start_epoch, 0):
            self.fail("end_epoch", f"{self.end_epoch}: must be set and after start_epoch {self.start_epoch}")
        if self.lr_func == "cyclic_linear" and self.cycle_epochs <= 0:
            self.fail("cycle_epochs", f"{self.cycle_epochs} must be positive")


@register
@dataclass(kw_only=True)
class SetLearningRateModifier(Modifier):
    """Sets the LR once, at start_epoch; it then stays until something else changes it."""

    learning_rate: float | None = None
    param_groups: list[int] | None = None
    constant_logging: bool = False  # SparseML key; the loop logs the LR itself

    def match(self, event: Event, state: State) -> bool:
        return event == Event.BATCH_START and state.step == self.start_step(state.steps_per_epoch)

    def apply(self, event: Event, state: State) -> None:
        for group in _groups(self, state.optimizer, self.param_groups):
            group["lr"] = self.learning_rate

    def timeline(self, steps_per_epoch: int) -> list[tuple[int, str]]:
        return [(self.start_step(steps_per_epoch), f"SetLearningRateModifier: lr set to {_num(self.learning_rate)}")]

    def validate(self) -> None:
        super().validate()
        if self.learning_rate is None:
            self.fail("learning_rate", "required")
        if not 0 < self.learning_rate <= 1:
            self.fail("learning_rate", f"{self.learning_rate} is outside (0, 1]")


@register
@dataclass(kw_only=True)
class SetWeightDecayModifier(Modifier):
    """Sets AdamW's weight decay once, at start_epoch.

    Without ``param_groups`` it sets every group except one the loop marked ``no_decay`` (biases
    and LayerNorm weights, as Hugging Face's Trainer groups them), which stays at 0. SparseML sets
    every group; we keep HF's exemption because the no-decay group exists for that reason.
    """

    weight_decay: float | None = None
    param_groups: list[int] | None = None
    constant_logging: bool = False  # SparseML key; nothing to log per step

    def match(self, event: Event, state: State) -> bool:
        return event == Event.BATCH_START and state.step == self.start_step(state.steps_per_epoch)

    def apply(self, event: Event, state: State) -> None:
        for group in _groups(self, state.optimizer, self.param_groups):
            if self.param_groups is not None or not group.get(NO_DECAY):
                group["weight_decay"] = self.weight_decay

    def timeline(self, steps_per_epoch: int) -> list[tuple[int, str]]:
        groups = "all param groups but bias/LayerNorm" if self.param_groups is None else f"param groups {self.param_groups}"
        text = f"SetWeightDecayModifier: weight_decay set to {_num(self.weight_decay)} on {groups}"
        return [(self.start_step(steps_per_epoch), text)]

    def validate(self) -> None:
        super().validate()
        if self.weight_decay is None:
            self.fail("weight_decay", "required")
        if self.weight_decay < 0:
            self.fail("weight_decay", f"{self.weight_decay} is negative")
