"""Knowledge distillation from a teacher, as SparseML's DistillationModifier computes it."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..events import Event, State
from .base import Modifier, register

TARGETS = ("labels", "start_positions", "end_positions")  # what the task loss needs; the teacher is not given them
# Hugging Face outputs that are features, not logits: a softmax KD over them means nothing. No oBERT
# recipe asks for them; SparseML distills features with PerLayerDistillationModifier (not supported).
FEATURE_KEYS = ("hidden_states", "attentions")


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
                      mask: torch.Tensor | None = None) -> torch.Tensor:
    """KL(teacher || student) of the temperature-softened distributions, times T^2, averaged over rows.

    Logits ``[..., C]`` are flattened to rows of C classes, so token tasks average over tokens;
    ``mask`` (the logits' leading shape) keeps the rows that count, e.g. tokens labelled != -100.
    """
    t = temperature
    student = student_logits.reshape(-1, student_logits.shape[-1]).float()
    teacher = teacher_logits.reshape(-1, teacher_logits.shape[-1]).float()
    if mask is not None:
        student, teacher = student[mask.reshape(-1)], teacher[mask.reshape(-1)]
    if not len(student):
        return student_logits.sum() * 0.0
    return F.kl_div(F.log_softmax(student / t, -1), F.softmax(teacher / t, -1), reduction="batchmean") * t**2


@register
@dataclass(kw_only=True)
class DistillationModifier(Modifier):
    """loss = (1 - hardness) * task + hardness * KD, averaged over ``distill_output_keys``.

    The teacher sees the batch without its targets (or only ``teacher_input_keys``), under no_grad.
    Keys as SparseML's recipes name them: ``logits`` (classification, token tasks, masked LM: rows
    with a label only), ``start_logits``/``end_logits`` (question answering: a softmax over positions).
    Without a teacher (``--teacher disable``) the modifier does nothing. Unlike SparseML, which
    divides by the batch size, token tasks average over the tokens that carry a label.
    """

    hardness: float = 0.5
    temperature: float = 2.0
    distill_output_keys: list | None = field(default_factory=lambda: ["logits"])
    teacher_input_keys: list | None = None
    update_frequency: float = -1.0  # SparseML key, unused

    def match(self, event: Event, state: State) -> bool:
        return event == Event.LOSS and state.teacher is not None and self.active(state)

    def apply(self, event: Event, state: State) -> None:
        batch = state.batch
        keys = self.teacher_input_keys or [k for k in batch if k not in TARGETS]
        with torch.no_grad():
            teacher_outputs = state.teacher(**{k: batch[k] for k in keys})
        labels = batch.get("labels")
        losses = []
        for key in self.distill_output_keys:
            student, teacher = self._output(state.outputs, key), self._output(teacher_outputs, key)
            token_labels = labels is not None and student.dim() == 3 and labels.shape == student.shape[:2]
            losses.append(distillation_loss(student, teacher, self.temperature, labels != -100 if token_labels else None))
        distill = sum(losses) / len(losses)
        task = state.loss
        state.loss = (1 - self.hardness) * task + self.hardness * distill
        # Detached tensors, not floats: reading a value here would stall the GPU every step.
        state.loss_parts = {"task": task.detach(), "distill": distill.detach()}

    def _output(self, outputs, key) -> torch.Tensor:
        try:
            return outputs[key]
        except (KeyError, IndexError):
            have = list(outputs.keys()) if hasattr(outputs, "keys") else f"{len(outputs)} outputs"
            self.fail("distill_output_keys", f"the model output has no {key!r} (it has {have})")

    def timeline(self, steps_per_epoch: int) -> list[tuple[int, str]]:
        keys = ", ".join(map(str, self.distill_output_keys))
        points = [(self.start_step(steps_per_epoch),
                   f"DistillationModifier: loss = {1 - self.hardness:g} * task + {self.hardness:g} * KD "
                   f"(temperature {self.temperature:g}, on {keys}) when a teacher is given")]
        end = self.end_step(steps_per_epoch)
        if end is not None:
            points.append((end, "DistillationModifier ends: task loss only"))
        return points

    def validate(self) -> None:
        super().validate()
        if not 0 <= self.hardness <= 1:
            self.fail("hardness", f"{self.hardness} is outside [0, 1]")
        if self.temperature <= 0:
            self.fail("temperature", f"{self.temperature} must be positive")
        if isinstance(self.distill_output_keys, (str, int)):
            self.distill_output_keys = [self.distill_output_keys]
        if not self.distill_output_keys:  # SparseML: "all outputs", which for HF models includes the loss
            self.distill_output_keys = ["logits"]
        for key in self.distill_output_keys:
            if key in FEATURE_KEYS:
                self.fail("distill_output_keys", f"{key!r} is not supported: KD here is over logits; hidden-state "
                                                 "distillation (SparseML's PerLayerDistillationModifier) is not, "
                                                 "and no oBERT recipe asks for it")
        if isinstance(self.teacher_input_keys, str):
            self.teacher_input_keys = [self.teacher_input_keys]
