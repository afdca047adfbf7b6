"""Pruning: masks that hold sparsity (ConstantPruningModifier) or grow it by magnitude (GMP).

Masks are bool "keep" tensors keyed by parameter name. They exist from INIT (before DDP/DeepSpeed
wrap the model), change only on schedule, are broadcast from rank 0 at every change so all ranks
hold the same ones, and are applied to gradients after backward and to weights after every
optimizer step: a pruned weight stays exactly zero through AdamW's momentum and weight decay.
With torch's Adam/AdamW and masks that stay to the end of training, the weights need no masking
after the step once the optimizer's moments at pruned positions are zero (zeroed at every mask
change and at FIT_START, after a resume): a zero gradient keeps a zero moment zero, the update
0 / (0 + eps) is 0 and decoupled decay of 0 is 0. Every weight is bit for bit what masking it
would give; only the moments at pruned positions differ (0, where they would decay), which is why
masks that end (leave_enabled false, an end_epoch on constant pruning) keep the masking: there the
old moments revive weights after the end. Other optimizers (DeepSpeed's among them) keep it too.
Parameters are looked up by name on ``state.model`` each time, never held, since wrapping may
replace them.
"""
from __future__ import annotations

import math
import re
import sys
import weakref
from dataclasses import dataclass, replace

import torch

from ..distributed import broadcast_, full_parameters, mask_parameter_, zero_stage
from ..errors import RecipeError
from ..events import Event, State
from ..params import select_params
from .base import Modifier, register

INTER_FUNCS = ("linear", "cubic", "inverse_cubic")
FROM_PARAM = "__FROM_PARAM__"  # SparseML: start from the sparsity each parameter already has
MASK_TYPES = "unstructured, block4 (also block or [1, 4]: 1x4 blocks), or 'N:M' such as '2:4'"

# Per model, every parameter any pruning modifier masks -> (zeros, size) at its last mask change:
# "sparsity/global" covers all of them, also when a recipe holds one modifier per parameter.
_ZEROS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def interpolate(progress: float, init: float, final: float, inter_func: str) -> float:
    """SparseML's schedule shapes from ``init`` (progress 0) to ``final`` (progress 1), ends exact."""
    p = min(max(progress, 0.0), 1.0)
    y = {"linear": p, "cubic": 1 - (1 - p) ** 3, "inverse_cubic": 1 - (1 - p) ** (1 / 3)}[inter_func]
    if y <= sys.float_info.epsilon:
        return init
    if y >= 1 - sys.float_info.epsilon:
        return final
    return min(max(init + y * (final - init), min(init, final)), max(init, final))


def parse_mask_type(mask_type) -> tuple:
    """("unstructured",), ("block", size) for 1 x size blocks, or ("nm", N, M): keep N of every M."""
    if mask_type == "unstructured":
        return ("unstructured",)
    if mask_type in ("block", "block4"):
        return ("block", 4)
    if mask_type == "tensorrt":
        return ("nm", 2, 4)
    if isinstance(mask_type, list) and len(mask_type) == 2 and mask_type[0] == 1 and isinstance(mask_type[1], int) \
            and mask_type[1] >= 1:
        return ("block", mask_type[1])
    found = isinstance(mask_type, str) and re.fullmatch(r"(\d+):(\d+)", mask_type.strip())
    if found and 0 < int(found[1]) < int(found[2]):
        return ("nm", int(found[1]), int(found[2]))
    raise ValueError(f"{mask_type!r} is not one of {MASK_TYPES}")


def _group_size(pattern: tuple) -> int:
    return 1 if pattern[0] == "unstructured" else pattern[-1]


def _unit_scores(weight: torch.Tensor, keep: torch.Tensor, pattern: tuple) -> torch.Tensor:
    """One magnitude per pruning unit (weight or block); pruned units score -1 so they stay pruned,
    and in N:M the N largest of each group score +inf so they can never be pruned."""
    scores = weight.detach().abs().float().masked_fill(~keep, -1.0)
    if pattern[0] == "block":
        return scores.reshape(-1, pattern[1]).mean(1)
    if pattern[0] == "nm":
        n, m = pattern[1:]
        groups = scores.reshape(-1, m)
        rank = groups.argsort(dim=1, stable=True).argsort(dim=1)
        return groups.masked_fill(rank >= m - n, math.inf).reshape(-1)
    return scores.reshape(-1)


def _prune_lowest(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep mask dropping the ``sparsity`` share of lowest (finite) scores, ties to the lower index,
    as a stable sort would; by the k-th value, 3x faster than sorting OBS's 10.6M MiniLM scores."""
    k = min(round(sparsity * scores.numel()), int(torch.isfinite(scores).sum()))
    keep = torch.ones_like(scores, dtype=torch.bool)
    if k == 0:
        return keep
    threshold = scores.kthvalue(k).values
    below = scores < threshold
    keep[below] = False
    keep[(scores == threshold).nonzero().reshape(-1)[: k - int(below.sum())]] = False
    return keep


def magnitude_masks(weights: list[torch.Tensor], keeps: list[torch.Tensor], sparsity: float, pattern: tuple,
                    global_sparsity: bool = False) -> list[torch.Tensor]:
    """New keep masks pruning the smallest-magnitude units to ``sparsity``; never revives a pruned weight.

    Per tensor, or with ``global_sparsity`` one threshold across all of them. In N:M the target is
    reached by pruning within each group of M consecutive input weights at most M - N, so the
    pattern is exactly N:M once ``sparsity`` is 1 - N/M.
    """
    scores = [_unit_scores(w, k, pattern) for w, k in zip(weights, keeps)]
    if global_sparsity:
        units = torch.split(_prune_lowest(torch.cat(scores), sparsity), [len(s) for s in scores])
    else:
        units = [_prune_lowest(s, sparsity) for s in scores]
    size = pattern[1] if pattern[0] == "block" else 1
    return [u.repeat_interleave(size).reshape(w.shape) & k for u, w, k in zip(units, weights, keeps)]


@torch.no_grad()
def apply_masks(model: torch.nn.Module, masks: dict[str, torch.Tensor], grads: bool = False,
                cache: dict | None = None) -> None:
    """Zero what ``masks`` prune, in the weights or (``grads``) in their gradients.

    The only place that writes masked weights; ``distributed.mask_parameter_`` reaches every copy
    (ZeRO-3 partitions, DeepSpeed's fp32 master weights). DeepSpeed steps inside backward and keeps
    gradients to itself (``param.grad`` is None), so there only the weights are masked, after the
    step, before the next forward. ``cache`` keeps each mask as 0/1 in the parameter's dtype: a
    multiply is several times faster than ``masked_fill_`` on CPU, and this runs every step.
    """
    params = dict(model.named_parameters())
    for name, keep in masks.items():
        param, multiplier = params[name], None
        if cache is not None and param.numel() == keep.numel():
            multiplier = cache.get(name)
            if multiplier is None or multiplier.dtype != param.dtype or multiplier.device != param.device:
                multiplier = cache[name] = keep.to(device=param.device, dtype=param.dtype)
        if not grads:
            mask_parameter_(param, keep, multiplier)
        elif param.grad is not None:
            if multiplier is not None:
                param.grad.mul_(multiplier)
            else:
                param.grad.masked_fill_(~keep, 0.0)


@torch.no_grad()
def zero_pruned_moments_(optimizer, model: torch.nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero the optimizer's per-weight state (Adam's moments) where ``masks`` prune."""
    inner = getattr(optimizer, "optimizer", optimizer)  # Accelerate's wrapper holds torch's optimizer
    params = dict(model.named_parameters())
    for name, keep in masks.items():
        for value in inner.state.get(params[name], {}).values():
            if torch.is_tensor(value) and value.shape == keep.shape:
                value.masked_fill_(~keep.to(value.device), 0.0)


def plain_adam(state: State) -> bool:
    """torch's Adam/AdamW stepping on the parameters themselves (not DeepSpeed's copies)."""
    inner = getattr(state.optimizer, "optimizer", state.optimizer)
    return (type(inner) in (torch.optim.Adam, torch.optim.AdamW)
            and (state.accelerator is None or zero_stage(state.accelerator) is None))


def _log_sparsity(state: State, names: list[str]) -> None:
    counts = _ZEROS.setdefault(state.model, {})
    params = dict(state.model.named_parameters())
    counts.update({n: (int((params[n] == 0).sum()), params[n].numel()) for n in names})
    state.logs["sparsity/global"] = sum(z for z, _ in counts.values()) / sum(t for _, t in counts.values())


def _fmt(value) -> str:
    return value if isinstance(value, str) else format(value, "g")


def _spec(params) -> str:
    entries = [params] if isinstance(params, str) else list(params)
    return ", ".join(entries) if len(entries) <= 2 else f"{entries[0]}, ... ({len(entries)} entries)"


@dataclass(kw_only=True)
class _MaskingModifier(Modifier):
    """What constant and gradual pruning share: masks, their application, their checkpoint."""

    params: str | list[str] | None = None
    log_types: str | list[str] = "__ALL__"  # SparseML key; the loop logs everything

    def __post_init__(self):
        super().__post_init__()
        self.names: list[str] = []
        self.masks: dict[str, torch.Tensor] = {}
        self.grads_keep_zeros = False  # set at FIT_START: no weight masking after each optimizer step

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """Boolean keep-masks by parameter name: the state that is broadcast, checked and saved."""
        return self._masks

    @masks.setter
    def masks(self, masks: dict[str, torch.Tensor]) -> None:
        self._masks, self._multipliers = masks, {}  # new masks: drop their cached 0/1 copies

    def update_due(self, state: State) -> bool:
        raise NotImplementedError

    def update_masks(self, state: State) -> None:
        raise NotImplementedError

    def masking(self, state: State) -> bool:
        return self.active(state)

    def masks_never_end(self) -> bool:
        return self.end_epoch < 0

    def init_masks(self, state: State) -> None:
        pass

    def match(self, event: Event, state: State) -> bool:
        if event in (Event.INIT, Event.FIT_START):
            return True
        if event == Event.BATCH_START:
            return self.update_due(state)
        if event == Event.AFTER_BACKWARD or (event == Event.OPTIMIZER_STEP_END and not self.grads_keep_zeros):
            return bool(self.masks) and self.masking(state)
        return False

    def apply(self, event: Event, state: State) -> None:
        if event == Event.INIT:
            self.names = select_params(state.model, self.params, self.where)
            self.init_masks(state)
        elif event == Event.FIT_START:  # prepare() or a resume may have moved the parameters
            params = dict(state.model.named_parameters())
            self.masks = {n: m.to(params[n].device) for n, m in self.masks.items()}
            self.grads_keep_zeros = self.masks_never_end() and plain_adam(state)
            if self.grads_keep_zeros and self.masks and self.masking(state):  # a resumed state may predate the rule
                apply_masks(state.model, self.masks)
                zero_pruned_moments_(state.optimizer, state.model, self.masks)
        elif event == Event.BATCH_START:
            with full_parameters(state.model, self.names):  # ZeRO-3: whole weights to score
                self.update_masks(state)
        else:
            apply_masks(state.model, self.masks, grads=event == Event.AFTER_BACKWARD, cache=self._multipliers)

    def set_masks(self, state: State, masks: dict[str, torch.Tensor]) -> None:
        """Adopt rank 0's new masks (one fused broadcast) and prune the weights now."""
        broadcast_(list(masks.values()), src=0)
        self.masks = masks
        apply_masks(state.model, masks)
        if self.grads_keep_zeros:
            zero_pruned_moments_(state.optimizer, state.model, masks)
        _log_sparsity(state, list(masks))

    def state_dict(self) -> dict:
        return {"masks": dict(self.masks)}

    def load_state_dict(self, state_dict: dict) -> None:
        masks = {n: m.bool() for n, m in state_dict["masks"].items()}
        if masks and self.names and set(masks) != set(self.names):
            raise RecipeError(f"{self.where}: the checkpoint's masks are for other parameters than params selects")
        self.masks = masks

    def validate(self) -> None:
        super().validate()
        self.ignored("log_types", "__ALL__", "every sparsity is logged")
        if not self.params:
            self.fail("params", "required: parameter names, re: patterns, __ALL__ or __ALL_PRUNABLE__")


@register
@dataclass(kw_only=True)
class ConstantPruningModifier(_MaskingModifier):
    """Keeps a pre-sparsified model's zeros: the mask is ``weight != 0`` at start_epoch.

    Masking stops at end_epoch (-1: never), as SparseML's does.
    """

    update_frequency: float = -1.0  # SparseML key, unused

    def validate(self) -> None:
        super().validate()
        self.ignored("update_frequency", -1.0, "the mask is fixed once, at start_epoch")

    def init_masks(self, state: State) -> None:
        if self.start_step(state.steps_per_epoch) == 0:
            self.update_masks(state)

    def update_due(self, state: State) -> bool:
        return self.active(state) and not self.masks

    def update_masks(self, state: State) -> None:
        params = dict(state.model.named_parameters())
        self.set_masks(state, {n: params[n].detach() != 0 for n in self.names})

    def timeline(self, steps_per_epoch: int) -> list[tuple[int, str]]:
        points = [(self.start_step(steps_per_epoch),
                   f"ConstantPruningModifier: masks fixed to weights != 0, zeros kept at 0 ({_spec(self.params)})")]
        end = self.end_step(steps_per_epoch)
        if end is not None:
            points.append((end, "ConstantPruningModifier ends: masks no longer applied"))
        return points


@register
@dataclass(kw_only=True)
class GMPruningModifier(_MaskingModifier):
    """Gradual magnitude pruning from init_sparsity to final_sparsity over [start_epoch, end_epoch].

    Masks are recomputed from the current weights at start_step, every update_frequency epochs
    (rounded to whole steps, at least one; -1 means every step) and at end_step, where
    final_sparsity is reached exactly. Each tensor is pruned to the scheduled sparsity on its own
    (global_sparsity, GlobalMagnitudePruningModifier: one threshold across all). With leave_enabled
    the masks keep being applied after end_epoch. ``init_sparsity: __FROM_PARAM__`` starts each
    tensor (global: all of them) from the zeros it has at start_epoch; ``final_sparsity: {0.8:
    [params], ...}`` becomes one modifier per target (``expand``).
    """

    init_sparsity: float | str | None = None  # str: SparseML's __FROM_PARAM__
    final_sparsity: float | dict | None = None  # dict: SparseML's {sparsity: [params]}
    update_frequency: float | None = None
    inter_func: str = "cubic"
    leave_enabled: bool = True
    mask_type: str | list[int] = "unstructured"
    global_sparsity: bool = False

    @property
    def pattern(self) -> tuple:
        return parse_mask_type(self.mask_type)

    def _interval(self, steps_per_epoch: int) -> int:
        return 1 if self.update_frequency == -1 else max(1, round(self.update_frequency * steps_per_epoch))

    def update_steps(self, steps_per_epoch: int) -> list[int]:
        start, end = self.start_step(steps_per_epoch), self.end_step(steps_per_epoch)
        return [*range(start, end, self._interval(steps_per_epoch)), end]

    def expand(self) -> list[Modifier]:
        """The dict form of final_sparsity as one modifier per target sparsity, in file order."""
        if not isinstance(self.final_sparsity, dict):
            return [self]
        parts = []
        for target, names in self.final_sparsity.items():
            part = replace(self, params=names, final_sparsity=target)
            part.where = self.where
            parts.append(part)
        return parts

    def sparsity_at(self, step: int, steps_per_epoch: int, init: float | None = None) -> float:
        """The sparsity the masks hold during optimizer step ``step`` (0 before start_epoch);
        ``init`` replaces init_sparsity (__FROM_PARAM__: the sparsity measured at start_epoch)."""
        init = self.init_sparsity if init is None else init
        start, end = self.start_step(steps_per_epoch), self.end_step(steps_per_epoch)
        if step < start:
            return 0.0
        interval = self._interval(steps_per_epoch)
        last_update = end if step >= end else start + (step - start) // interval * interval
        progress = 1.0 if end == start else (last_update - start) / (end - start)
        return interpolate(progress, init, self.final_sparsity, self.inter_func)

    def init_masks(self, state: State) -> None:
        params = dict(state.model.named_parameters())
        size = _group_size(self.pattern)
        for name in self.names:
            shape = tuple(params[name].shape)
            if size > 1 and (len(shape) != 2 or shape[1] % size):
                self.fail("mask_type", f"{self.mask_type} needs 2-D weights whose input size divides by {size}; "
                                       f"{name} has shape {shape}")
        self.masks = {n: torch.ones_like(params[n], dtype=torch.bool) for n in self.names}
        self.from_param: dict[str, float] = {}

    def init_sparsities(self, state: State) -> list[float]:
        """init_sparsity per parameter (global: the same for all); __FROM_PARAM__ measures the zeros
        once, at the first update, and the checkpoint keeps the values."""
        if self.init_sparsity != FROM_PARAM:
            return [self.init_sparsity] * len(self.names)
        if not self.from_param:
            params = dict(state.model.named_parameters())
            zeros = {n: int((params[n] == 0).sum()) for n in self.names}
            if self.global_sparsity:
                overall = sum(zeros.values()) / sum(params[n].numel() for n in self.names)
                self.from_param = {n: overall for n in self.names}
            else:
                self.from_param = {n: zeros[n] / params[n].numel() for n in self.names}
        return [self.from_param[n] for n in self.names]

    def update_due(self, state: State) -> bool:
        start, end = self.start_step(state.steps_per_epoch), self.end_step(state.steps_per_epoch)
        return start <= state.step <= end and (
            state.step == end or (state.step - start) % self._interval(state.steps_per_epoch) == 0)

    def update_masks(self, state: State) -> None:
        params = dict(state.model.named_parameters())
        weights, keeps = [params[n] for n in self.names], [self.masks[n] for n in self.names]
        targets = [self.sparsity_at(state.step, state.steps_per_epoch, init) for init in self.init_sparsities(state)]
        if self.global_sparsity:
            new = magnitude_masks(weights, keeps, targets[0], self.pattern, global_sparsity=True)
        else:
            new = [magnitude_masks([w], [k], t, self.pattern)[0] for w, k, t in zip(weights, keeps, targets)]
        self.set_masks(state, dict(zip(self.names, new)))

    def state_dict(self) -> dict:
        if not getattr(self, "from_param", None):
            return super().state_dict()
        return {**super().state_dict(), "from_param": {n: torch.tensor(v) for n, v in self.from_param.items()}}

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self.from_param = {n: float(v) for n, v in state_dict.get("from_param", {}).items()}

    def masking(self, state: State) -> bool:
        return self.started(state) and (self.leave_enabled or not self.ended(state))

    def masks_never_end(self) -> bool:
        return self.leave_enabled

    def timeline(self, steps_per_epoch: int) -> list[tuple[int, str]]:
        name, pattern = self.__class__.__name__, self.pattern
        updates = self.update_steps(steps_per_epoch)
        mid = updates[len(updates) // 2]
        shape = ("unstructured" if pattern[0] == "unstructured" else f"1x{pattern[1]} blocks" if pattern[0] == "block"
                 else f"{self.mask_type} (keep {pattern[1]} of every {pattern[2]} input weights)")
        scope = "one global threshold" if self.global_sparsity else "each tensor"
        after = "masks stay applied (leave_enabled)" if self.leave_enabled else "masks no longer applied"
        return [
            (updates[0], f"{name}: {self.inter_func} sparsity {_fmt(self.init_sparsity)} -> {self.final_sparsity:g}, "
                         f"{shape}, {scope}, {len(updates)} mask updates every {self._interval(steps_per_epoch)} "
                         f"steps ({_spec(self.params)})"),
            (mid, f"{name}: sparsity {self.sparsity_at(mid, steps_per_epoch, self._shown_init()):.4g}"),
            (updates[-1], f"{name} ends: sparsity {self.final_sparsity:g} reached; {after}"),
        ]

    def _shown_init(self) -> float:
        """For the timeline: __FROM_PARAM__ is unknown before the run; shown as from 0."""
        return 0.0 if self.init_sparsity == FROM_PARAM else self.init_sparsity

    def validate(self) -> None:
        super().validate()
        if isinstance(self.init_sparsity, str) and self.init_sparsity != FROM_PARAM:
            self.fail("init_sparsity", f"{self.init_sparsity!r}: give a number or {FROM_PARAM}")
        if isinstance(self.final_sparsity, dict):
            self.fail("final_sparsity", "the {sparsity: [params]} form must be expanded before validation")
        for key in ("init_sparsity", "final_sparsity", "update_frequency"):
            if getattr(self, key) is None:
                self.fail(key, "required")
        for key in ("init_sparsity", "final_sparsity"):
            value = getattr(self, key)
            if value != FROM_PARAM and not (isinstance(value, (int, float)) and 0 <= value < 1):
                self.fail(key, f"{value} is outside [0, 1)")
        if self.init_sparsity != FROM_PARAM and self.init_sparsity > self.final_sparsity:
            self.fail("init_sparsity", f"{self.init_sparsity} exceeds final_sparsity {self.final_sparsity}: "
                                       "pruned weights are never revived")
        if self.end_epoch < 0:
            self.fail("end_epoch", "required: the epoch final_sparsity is reached")
        if self.update_frequency != -1 and self.update_frequency <= 0:
            self.fail("update_frequency", f"{self.update_frequency} must be positive (or -1: every step)")
        if self.inter_func not in INTER_FUNCS:
            self.fail("inter_func", f"{self.inter_func!r} is not one of {', '.join(INTER_FUNCS)}")
        try:
            pattern = self.pattern
        except ValueError as err:
            self.fail("mask_type", str(err))
        if pattern[0] == "nm" and abs(self.final_sparsity - (1 - pattern[1] / pattern[2])) > 1e-2:
            self.fail("final_sparsity", f"{self.final_sparsity} does not match {self.mask_type}: "
                                        f"{pattern[1]} of every {pattern[2]} kept is {1 - pattern[1] / pattern[2]:g}")


@register
@dataclass(kw_only=True)
class MagnitudePruningModifier(GMPruningModifier):
    """SparseML's alias of GMPruningModifier."""


@register
@dataclass(kw_only=True)
class GlobalMagnitudePruningModifier(GMPruningModifier):
    """GMP with one magnitude threshold across all its parameters: layers end at different sparsities."""

    global_sparsity: bool = True
