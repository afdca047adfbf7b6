"""SparseML's QuantizationModifier: int8 quantization-aware training, identical on every rank.

Structure is built at INIT, before ``accelerator.prepare``: every plain Linear (and Embedding with
``quantize_embeddings``) under ``submodules`` becomes a fake-quant twin, all switched off, so
nothing changes the model after DDP/DeepSpeed wrapped it; the query, key and value projections of
an attention block share one input quantizer (``fake_quant.share_qkv_input_quant_``). The schedule
is a pure function of the optimizer step, for step t (S = start, C = calibration steps, F =
observers freeze):

- t >= S: weights fake-quantized; activation observers record (training mode only);
- t >= S + C: activations fake-quantized too. The first C = max(1, num_calibration_steps) QAT
  steps only observe, so no activation is quantized with a scale nobody measured;
- t >= F (``disable_quantization_observer_epoch``): scales and zero points frozen on every rank.

At OPTIMIZER_STEP_END of every observing step, the pending min/max of all observers are merged
across ranks in one collective and every rank moves its averages the same way
(``fake_quant.update_observers_``).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..compat import ddp_ignore_buffers
from ..events import Event, State
from ..fake_quant import (ActivationFakeQuant, FakeQuant, WeightFakeQuant, load_named_quant_state,
                          named_quant_state, share_qkv_input_quant_, to_quant_, update_observers_)
from .base import Modifier, register


@register
@dataclass(kw_only=True)
class QuantizationModifier(Modifier):
    """Int8 QAT from ``start_epoch`` to the end of training (SparseML allows no ``end_epoch``)."""

    submodules: list[str] | None = None
    disable_quantization_observer_epoch: float | None = None
    freeze_bn_stats_epoch: float | None = None  # accepted for SparseML recipes; BERT has no BatchNorm
    quantize_embeddings: bool = True
    quantize_embedding_activations: bool = True
    quantize_linear_activations: bool = False
    exclude_module_types: list[str] | None = None
    activation_bits: int = 8
    weight_bits: int = 8
    reduce_range: bool = False
    num_calibration_steps: int | None = None
    # One weight scale per tensor, as SparseML's modifier (and its QuantizationScheme default) gives a
    # SparseML recipe; "channel": one per output channel / embedding row (distsparse's own recipes).
    weight_strategy: str = "tensor"

    def __post_init__(self):
        super().__post_init__()
        self._quants: list[tuple[str, FakeQuant]] = []  # each module once (Q, K and V share one)
        self._aliases: dict[str, str] = {}  # a shared module's other names: the one in _quants

    # -- schedule ---------------------------------------------------------------------------------
    @property
    def calibration_steps(self) -> int:
        return max(1, int(self.num_calibration_steps or 0))

    def freeze_step(self, steps_per_epoch: int) -> int | None:
        epoch = self.disable_quantization_observer_epoch
        return None if epoch is None or epoch < 0 else round(epoch * steps_per_epoch)

    def phase(self, step: int, steps_per_epoch: int) -> tuple[bool, bool, bool]:
        """(weights quantized, observers on, activations quantized) during optimizer step ``step``."""
        start = self.start_step(steps_per_epoch)
        freeze = self.freeze_step(steps_per_epoch)
        on = step >= start
        return on, on and (freeze is None or step < freeze), step >= start + self.calibration_steps

    def _set_phase(self, step: int, steps_per_epoch: int) -> None:
        weights, observe, activations = self.phase(step, steps_per_epoch)
        for _, fq in self._quants:
            fq.enabled = activations if isinstance(fq, ActivationFakeQuant) else weights
            fq.observe = observe

    # -- events -----------------------------------------------------------------------------------
    def match(self, event: Event, state: State) -> bool:
        return event in (Event.INIT, Event.FIT_START, Event.BATCH_START, Event.OPTIMIZER_STEP_END)

    def apply(self, event: Event, state: State) -> None:
        if event == Event.INIT:
            self.check_schedule(state.steps_per_epoch)
            self.build(state.model)
        if event == Event.OPTIMIZER_STEP_END:
            weights, observe, _ = self.phase(state.step, state.steps_per_epoch)
            if observe:
                update_observers_([fq for _, fq in self._quants if isinstance(fq, ActivationFakeQuant)])
            state.logs["qat/enabled"] = float(weights)
            state.logs["qat/observers_frozen"] = float(weights and not observe)
            # Set the next step's phase now, so an evaluation between steps sees it too.
            self._set_phase(state.step + 1, state.steps_per_epoch)
        else:
            self._set_phase(state.step, state.steps_per_epoch)

    def check_schedule(self, steps_per_epoch: int) -> None:
        freeze = self.freeze_step(steps_per_epoch)
        if freeze is not None and freeze <= self.start_step(steps_per_epoch):
            self.fail("disable_quantization_observer_epoch",
                      f"observers would freeze at step {freeze}, before QAT (step "
                      f"{self.start_step(steps_per_epoch)}) observed a batch")

    def build(self, model: nn.Module) -> None:
        """Swap in the fake-quant modules (all off) and keep DDP's hands off their buffers."""
        excluded = set(self.exclude_module_types or ())
        swapped = {}
        for root_name in self.submodules or [""]:
            try:
                root = model.get_submodule(root_name)
            except AttributeError:
                self.fail("submodules", f"{root_name!r} is not a submodule of the model")
            for name, module in _walk(root, root_name, excluded):
                if type(module) is nn.Linear or (type(module) is nn.Embedding and self.quantize_embeddings):
                    quantize_output = (self.quantize_linear_activations if type(module) is nn.Linear
                                       else self.quantize_embedding_activations)
                    swapped[name] = to_quant_(module, self.weight_bits, self.activation_bits,
                                              self.reduce_range, bool(quantize_output), self.weight_strategy)
        if not swapped:
            self.fail("submodules", f"no Linear or Embedding to quantize under {self.submodules or 'the model'}")
        share_qkv_input_quant_(model)
        named = [(f"{name}.{key}", child) for name, module in swapped.items()
                 for key, child in module.named_children() if isinstance(child, FakeQuant)]
        first = {}
        for name, child in named:
            first.setdefault(id(child), name)
        self._quants = [(name, child) for name, child in named if first[id(child)] == name]
        self._aliases = {name: first[id(child)] for name, child in named if first[id(child)] != name}
        # DDP would otherwise broadcast rank 0's buffers before each forward, wiping the other
        # ranks' pending statistics between accumulation micro-batches; we sync them ourselves.
        ignore = [f"{n}.{b}" for n, m in self._quants for b, _ in m.named_buffers(recurse=False)]
        ddp_ignore_buffers(model, ignore)

    # -- checkpointing ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"quant_state": named_quant_state(self._quants)}

    def load_state_dict(self, state_dict: dict) -> None:
        load_named_quant_state(self._quants, state_dict["quant_state"], f"{self.where}: checkpoint", self._aliases)

    # -- recipe check -----------------------------------------------------------------------------
    def timeline(self, steps_per_epoch: int) -> list[tuple[int, str]]:
        start = self.start_step(steps_per_epoch)
        calib = self.calibration_steps
        points = [
            (start, f"QuantizationModifier: QAT starts: int8 weights fake-quantized (a scale per "
                    f"{self.weight_strategy}), activation observers on (min/max all-reduced every step)"),
            (start + calib, f"QuantizationModifier: activations fake-quantized (after {calib} "
                            "calibration step(s) that only observe)"),
        ]
        freeze = self.freeze_step(steps_per_epoch)
        if freeze is not None:
            points.append((freeze, "QuantizationModifier: observers frozen: scales and zero points fixed"))
        bn = self.freeze_bn_stats_epoch
        if bn is not None and bn >= 0:
            points.append((round(bn * steps_per_epoch),
                           "QuantizationModifier: freeze_bn_stats_epoch: no BatchNorm in BERT, nothing to do"))
        return points

    def validate(self) -> None:
        super().validate()
        if self.end_epoch >= 0:
            self.fail("end_epoch", "QAT runs to the end of training; leave end_epoch at -1 (as SparseML)")
        for key in ("weight_bits", "activation_bits"):
            bits = getattr(self, key)
            if not isinstance(bits, int) or not 2 <= bits <= 8:
                self.fail(key, f"{bits!r} is not an integer from 2 to 8")
        if self.weight_strategy not in WeightFakeQuant.STRATEGIES:
            self.fail("weight_strategy", f"{self.weight_strategy!r} is not one of {', '.join(WeightFakeQuant.STRATEGIES)}")
        if self.num_calibration_steps is not None and (
                not isinstance(self.num_calibration_steps, int) or self.num_calibration_steps < 0):
            self.fail("num_calibration_steps", f"{self.num_calibration_steps!r} is not a count of steps")
        freeze = self.disable_quantization_observer_epoch
        if freeze is not None and 0 <= freeze <= max(self.start_epoch, 0):
            self.fail("disable_quantization_observer_epoch",
                      f"{freeze} is not after start_epoch {self.start_epoch}: observers would never see a batch")
        for key in ("submodules", "exclude_module_types"):
            value = getattr(self, key)
            if value is not None and not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
                self.fail(key, f"{value!r} is not a list of names")


def _walk(module: nn.Module, name: str, excluded: set[str]):
    """(name, module) under ``module``, skipping whole subtrees whose class name is excluded."""
    if type(module).__name__ in excluded:
        return
    yield name, module
    for key, child in module.named_children():
        yield from _walk(child, f"{name}.{key}" if name else key, excluded)
