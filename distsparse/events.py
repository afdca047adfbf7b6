"""The events the training loop fires, and the state modifiers see.

The loop knows nothing about pruning, quantization or distillation: it fires these events in order
and every modifier whose ``match`` says yes gets ``apply``. Order within one optimizer step:

    BATCH_START -> (forward) -> LOSS -> (backward) -> AFTER_BACKWARD -> (optimizer.step)
    -> OPTIMIZER_STEP_END

``INIT`` fires once before ``accelerator.prepare`` (build structure: mask tensors, fake-quant
modules, so nothing changes a model after DDP/DeepSpeed wrapped it); ``FIT_START`` after prepare
and after a resume; ``EPOCH_END`` and ``FIT_END`` as named.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from collections.abc import Callable, Iterator
from typing import Any


# The loop marks its bias/LayerNorm AdamW group with this key; SetWeightDecayModifier leaves it at 0.
NO_DECAY = "no_decay"


class Event(str, Enum):
    INIT = "init"
    FIT_START = "fit_start"
    BATCH_START = "batch_start"
    LOSS = "loss"
    AFTER_BACKWARD = "after_backward"
    OPTIMIZER_STEP_END = "optimizer_step_end"
    EPOCH_END = "epoch_end"
    FIT_END = "fit_end"


@dataclass
class State:
    """What the loop shares with modifiers. ``step`` counts optimizer steps (global, all ranks)."""

    model: Any  # the unwrapped model: modifiers look parameters up by name on it
    steps_per_epoch: int
    accelerator: Any = None
    optimizer: Any = None
    teacher: Any = None
    step: int = 0
    batch: Any = None
    outputs: Any = None
    loss: Any = None
    loss_parts: dict = field(default_factory=dict)  # named loss terms for logging (task, distill)
    logs: dict = field(default_factory=dict)  # scalars modifiers want logged at this step
    # grad_batches(batch_size) -> an endless iterator of batches (on device, this rank's shard of the
    # training data, in a seeded order): what OBS pruning samples its gradients from.
    grad_batches: Callable[[int], Iterator[dict]] | None = None

    @property
    def epoch(self) -> float:
        return self.step / self.steps_per_epoch


def fire(modifiers, event: Event, state: State) -> None:
    for modifier in modifiers:
        if modifier.match(event, state):
            modifier.apply(event, state)
