"""Layer dropping (SparseML's LayerPruningModifier): named layers leave the model before training.

SparseML swaps each dropped layer for an Identity at start_epoch, mid-training. Here the layers are
removed from their ``ModuleList`` at INIT, before DDP/DeepSpeed wrap the model (a wrapped model's
parameter list and gradient buckets cannot change), the ones that stay are renumbered, and
``config.num_hidden_layers`` follows: the saved model, its ``config.json`` and the ONNX export have
fewer layers and load as a plain smaller model. Every rank drops the same layers from the same
recipe, and a resume rebuilds the same model before loading the checkpoint into it.

Recipes name the remaining weights by their original numbers (oBERT's 6-layer recipe prunes
``bert.encoder.layer.([0,2,4,6,8]|11)``), so the model keeps a map from each parameter's new name
to its original one, which ``params.select_params`` matches recipes against; this modifier runs
INIT before every other (``changes_structure``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from ..errors import RecipeError
from ..events import Event, State
from ..params import ORIGINAL_NAMES
from .base import Modifier, register


@register
@dataclass(kw_only=True)
class LayerPruningModifier(Modifier):
    """``layers``: module names, e.g. bert.encoder.layer.1, each an entry of a ModuleList."""

    layers: list[str] | None = None
    update_frequency: float = -1.0  # SparseML key; the layers go once
    changes_structure: ClassVar[bool] = True

    def match(self, event: Event, state: State) -> bool:
        return event == Event.INIT

    def apply(self, event: Event, state: State) -> None:
        drop_layers(state.model, self.layers, self.where)

    def timeline(self, steps_per_epoch: int) -> list[tuple[int, str]]:
        return [(0, f"LayerPruningModifier: {len(self.layers)} layers removed before training "
                    f"({', '.join(self.layers)})")]

    def validate(self) -> None:
        super().validate()
        if not self.layers:
            self.fail("layers", "required: the names of the layers to remove")
        if self.start_epoch > 0:
            self.fail("start_epoch", f"{self.start_epoch}: layers can only be removed before training (start_epoch "
                                     "0 or -1); removing them later would change a model DDP/DeepSpeed already wrapped")
        self.ignored("end_epoch", -1.0, "removed layers never come back")
        self.ignored("update_frequency", -1.0, "the layers are removed once")


def drop_layers(model: nn.Module, layers: list[str], where: str) -> None:
    """Remove ``layers`` from their ModuleLists, renumber the rest, and record original names."""
    modules = dict(model.named_modules())
    originals = getattr(model, ORIGINAL_NAMES, None) or {n: n for n, _ in model.named_parameters()}
    original_of = {id(p): originals[n] for n, p in model.named_parameters()}  # survives the renumbering
    by_list: dict[str, set[int]] = {}
    for layer in layers:
        parent, _, index = layer.rpartition(".")
        if not (index.isdigit() and isinstance(modules.get(parent), nn.ModuleList) and int(index) < len(modules[parent])):
            raise RecipeError(f"{where}: layers: {layer!r} is not an entry of a ModuleList of the model")
        by_list.setdefault(parent, set()).add(int(index))
    for parent, gone in by_list.items():
        old = modules[parent]
        kept = [i for i in range(len(old)) if i not in gone]
        if not kept:
            raise RecipeError(f"{where}: layers: removes every layer of {parent}")
        owner, _, attr = parent.rpartition(".")
        setattr(modules[owner] if owner else model, attr, nn.ModuleList([old[i] for i in kept]))
        config = getattr(model, "config", None)
        if parent.endswith("encoder.layer") and getattr(config, "num_hidden_layers", None) == len(old):
            config.num_hidden_layers = len(kept)
    setattr(model, ORIGINAL_NAMES, {n: original_of[id(p)] for n, p in model.named_parameters()})
