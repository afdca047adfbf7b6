"""Int8 fake quantization for QAT, built so that every rank quantizes with the same numbers.

``to_quant_`` turns an ``nn.Linear`` / ``nn.Embedding`` into ``QuantLinear`` / ``QuantEmbedding``
by swapping its class in place: it stays the very same module object, so parameter names
(``...query.weight``), ``save_pretrained``/``from_pretrained``, hooks and other modifiers'
references all keep working. Every fake-quant child starts disabled, and a disabled module
computes exactly what the plain layer computes.

- Weights: symmetric, scale = absmax / 127, zero point 0, so zeros stay exactly zero; one scale per
  tensor (``strategy="tensor"``, SparseML's QuantizationModifier) or per output channel / embedding
  row (``"channel"``: finer, at 4 bytes a row in the deployed file). The op's range is -128..127
  (what ONNX int8 QDQ accepts) but values land in -127..127: no clipping of the largest weight, as
  TensorRT/onnxruntime symmetric int8.
- Activations: asymmetric per tensor, 0..255 (0..127 with ``reduce_range``), moving-average
  min/max like torch's ``MovingAverageMinMaxObserver`` (averaging constant 0.01; the first
  observation initialises). In training, forward only folds the batch's min/max into
  ``pending_min``/``pending_max``; ``update_observers_`` moves the averages once per optimizer
  step from statistics all-reduced over ranks in one collective, so the scales used in step t
  come from the union of all ranks' batches through step t-1, bitwise equal everywhere.

Buffers are registered with ``persistent=False``: the HF weights file stays clean;
``quant_state``/``load_quant_state`` carry them (and the on/off flags) in
``quantization.safetensors`` and in checkpoints.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

from . import distributed
from .errors import UserError

EPS = torch.finfo(torch.float32).eps
AVERAGING_CONSTANT = 0.01  # torch.ao.quantization.MovingAverageMinMaxObserver's default


def fake_quantize(x, scale, zero_point, quant_min: int, quant_max: int, axis: int | None = None,
                  clips: bool = True):
    """torch.fake_quantize_per_{tensor,channel}_affine: same numbers, same straight-through gradient.

    torch's ops are what ONNX export turns into QuantizeLinear/DequantizeLinear, and one fused kernel
    on GPU; on CPU they are about 4x slower than plain tensor arithmetic, so CPU training computes
    the same formula itself (tests check it is bitwise equal to torch's). ``clips=False`` promises
    that no value leaves the range (a weight's scale taken from that weight's absmax, zero point 0):
    CPU then skips the clamp and the straight-through mask, which would be all ones.
    """
    if x.device.type != "cpu" or torch.onnx.is_in_onnx_export():
        if axis is None:
            return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, quant_min, quant_max)
        return torch.fake_quantize_per_channel_affine(x, scale, zero_point, axis, quant_min, quant_max)
    if axis is not None:
        shape = [1] * x.dim()
        shape[axis] = -1
        scale, zero_point = scale.view(shape), zero_point.view(shape)
    if not clips:
        return _RoundToScale.apply(x, scale)
    return _FakeQuantize.apply(x, scale, zero_point, quant_min, quant_max)


class _RoundToScale(torch.autograd.Function):
    """round(x / s) * s with the identity as gradient: ``_FakeQuantize`` where nothing clips."""

    @staticmethod
    def forward(ctx, x, scale):
        return torch.mul(x, torch.reciprocal(scale)).round_().mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _FakeQuantize(torch.autograd.Function):
    """(clamp(round(x / s) + z, min, max) - z) * s, computed as clamp(round(x / s), min - z, max - z) * s:
    the same floats (small integers are exact), two passes over x fewer. The straight-through mask
    is kept as 0/1 floats: ``grad * mask`` is a plain vectorized multiply, where ``torch.where`` on
    a bool mask (or a float times bool) runs several times slower on CPU."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, quant_min, quant_max):
        q = torch.mul(x, torch.reciprocal(scale)).round_()
        if zero_point.numel() > 1 and zero_point.any():
            low, high = quant_min - zero_point, quant_max - zero_point
        else:  # one zero point (activations) or all zero (weights): plain numbers clamp fastest
            z = int(zero_point.reshape(-1)[0])
            low, high = quant_min - z, quant_max - z
        clamped = q.clamp(low, high)
        ctx.save_for_backward(torch.eq(clamped, q, out=q))  # q's memory becomes the mask
        return clamped.mul_(scale)

    @staticmethod
    def backward(ctx, grad):
        (inside,) = ctx.saved_tensors
        return grad * inside, None, None, None, None


class FakeQuant(nn.Module):
    """``enabled`` fake-quantizes, ``observe`` updates statistics; plain attributes, so reading them
    in forward never waits on a GPU."""

    def __init__(self):
        super().__init__()
        self.enabled = False
        self.observe = False


class WeightFakeQuant(FakeQuant):
    """Symmetric int8, one scale per tensor or per output channel (``strategy``); while observing, the
    scale follows the current weight, so nothing clips: |w| x (127 / absmax) stays within 127
    (x (1 + a few float32 ulps)), rounds into -127..127, and the straight-through gradient is the
    identity. A per-tensor scale is a 1-element tensor: what torch's ONNX export writes, and what
    compressed-tensors stores as ``weight_scale``."""

    STRATEGIES = ("tensor", "channel")

    def __init__(self, channels: int, bits: int = 8, device=None, strategy: str = "channel"):
        super().__init__()
        if strategy not in self.STRATEGIES:
            raise ValueError(f"weight strategy {strategy!r} is not one of {self.STRATEGIES}")
        self.per_channel = strategy == "channel"
        self.quant_min, self.quant_max = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
        size = channels if self.per_channel else 1
        self.register_buffer("scale", torch.ones(size, device=device), persistent=False)
        self.register_buffer("zero_point", torch.zeros(size, dtype=torch.int32, device=device), persistent=False)

    @property
    def axis(self) -> int | None:
        return 0 if self.per_channel else None

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return weight
        self.observe_(weight)
        return fake_quantize(weight, self.scale, self.zero_point, self.quant_min, self.quant_max, axis=self.axis,
                             clips=not self.observe)

    def rows(self, rows: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """``forward(weight)[index]`` given ``rows = weight[index]``: an embedding's looked-up rows
        cost a few thousand elements instead of the whole vocabulary table."""
        if not self.per_channel:
            return fake_quantize(rows, self.scale, self.zero_point, self.quant_min, self.quant_max,
                                 clips=not self.observe)
        flat = index.reshape(-1)
        out = fake_quantize(rows.reshape(flat.numel(), -1), self.scale[flat], self.zero_point[flat],
                            self.quant_min, self.quant_max, axis=0, clips=not self.observe)
        return out.view_as(rows)

    def weight_scale(self, weight: torch.Tensor) -> torch.Tensor:
        """The scale this weight's absmax gives (per tensor, or per row), as float32."""
        w = weight.detach()
        if self.per_channel:
            absmax = torch.maximum(w.amax(dim=1), w.amin(dim=1).neg_())  # no |w| temporary
        else:
            absmax = torch.maximum(w.amax(), w.amin().neg()).reshape(1)
        return torch.clamp(absmax.float() / self.quant_max, min=EPS)

    def observe_(self, weight: torch.Tensor) -> None:
        if self.observe:
            with torch.no_grad():
                self.scale.copy_(self.weight_scale(weight))


class ActivationFakeQuant(FakeQuant):
    """Asymmetric per-tensor uint8 with a moving-average min/max observer synced by the modifier."""

    def __init__(self, bits: int = 8, reduce_range: bool = False, device=None):
        super().__init__()
        self.quant_min, self.quant_max = 0, 2 ** (bits - int(bool(reduce_range))) - 1
        inf = float("inf")
        for name, value in (("min_val", inf), ("max_val", -inf), ("pending_min", inf),
                            ("pending_max", -inf), ("scale", 1.0)):
            self.register_buffer(name, torch.tensor(value, device=device), persistent=False)
        self.register_buffer("zero_point", torch.tensor(0, dtype=torch.int32, device=device),
                             persistent=False)

        self._last = None  # (weakref to the input, what else decided the output, weakref to it)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Called again on the very same tensor in the same state (one quantizer shared by Q, K and V),
        it returns its last output: one observation, one fake-quant, one Q/DQ pair in ONNX."""
        key = None if x.is_inference() else (x._version, self.enabled, self.observe, self.training,
                                              torch.is_grad_enabled(), self.scale._version, self.zero_point._version)
        if key is not None and self._last is not None and self._last[0]() is x and self._last[1] == key:
            y = self._last[2]()
            if y is not None:
                return y
        if self.observe and self.training:
            with torch.no_grad():
                low, high = torch.aminmax(x.detach())
                torch.minimum(self.pending_min, low, out=self.pending_min)
                torch.maximum(self.pending_max, high, out=self.pending_max)
        y = fake_quantize(x, self.scale, self.zero_point, self.quant_min, self.quant_max) if self.enabled else x
        if key is not None:
            self._last = (weakref.ref(x), key, weakref.ref(y))
        return y


class QuantLinear(nn.Linear):
    """nn.Linear with fake-quantized input, weight and (optionally) output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(self.input_quant(x), self.weight_quant(self.weight), self.bias)
        return self.output_quant(y)


class QuantEmbedding(nn.Embedding):
    """nn.Embedding with fake-quantized weight (per tensor or per row) and (optionally) output."""

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        wq = self.weight_quant
        if wq.enabled and not torch.onnx.is_in_onnx_export():
            wq.observe_(self.weight)  # the same numbers as below, quantizing only the rows looked up
            y = wq.rows(F.embedding(ids, self.weight, self.padding_idx, self.max_norm, self.norm_type,
                                    self.scale_grad_by_freq, self.sparse), ids)
        else:
            y = F.embedding(ids, wq(self.weight), self.padding_idx, self.max_norm, self.norm_type,
                            self.scale_grad_by_freq, self.sparse)
        return self.output_quant(y)


QUANT_CLASSES = {nn.Linear: QuantLinear, nn.Embedding: QuantEmbedding}


def to_quant_(module: nn.Module, weight_bits: int = 8, activation_bits: int = 8,
              reduce_range: bool = False, quantize_output: bool = False, weight_strategy: str = "channel") -> nn.Module:
    """Make a plain nn.Linear / nn.Embedding its Quant twin in place (all quantization off).

    Only exact types: a subclass has its own forward, which a class swap would throw away.
    """
    cls = QUANT_CLASSES[type(module)]
    device = module.weight.device
    channels = module.out_features if cls is QuantLinear else module.num_embeddings
    module.__class__ = cls
    module.weight_quant = WeightFakeQuant(channels, weight_bits, device, weight_strategy)
    if cls is QuantLinear:
        module.input_quant = ActivationFakeQuant(activation_bits, reduce_range, device)
    module.output_quant = (ActivationFakeQuant(activation_bits, reduce_range, device)
                           if quantize_output else nn.Identity())
    return module


# Sibling Linears that read one tensor: their input quantizer is shared (BERT/RoBERTa, DistilBERT, others).
QKV_NAMES = (("query", "key", "value"), ("q_lin", "k_lin", "v_lin"), ("q_proj", "k_proj", "v_proj"))


def share_qkv_input_quant_(model: nn.Module) -> dict[str, str]:
    """Give the key and value projections the query's input quantizer: they read the same tensor, so
    one observer, one fake-quant and one Q/DQ pair serve all three (the numbers three separate ones
    compute, as they observe the same values). In cross-attention the query reads other states:
    there key and value share theirs. Returns {layer: the layer whose input quantizer it uses}."""
    shared = {}
    for name, parent in model.named_modules():
        cross = getattr(parent, "is_cross_attention", False) or "CrossAttention" in type(parent).__name__
        for names in QKV_NAMES:
            layers = [(n, getattr(parent, n, None)) for n in names[int(bool(cross)):]]
            if not all(isinstance(m, QuantLinear) for _, m in layers):
                continue
            (first, head), *rest = layers
            for key, layer in rest:
                if layer.in_features == head.in_features and isinstance(layer.input_quant, ActivationFakeQuant):
                    layer.input_quant = head.input_quant
                    shared[f"{name}.{key}" if name else key] = f"{name}.{first}" if name else first
    return shared


def fake_quants(model: nn.Module) -> list[tuple[str, FakeQuant]]:
    """Every fake-quant module once, under its first name (a shared one has several)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, FakeQuant)]


def quant_aliases(model: nn.Module) -> dict[str, str]:
    """{a shared fake-quant module's other names: the name ``fake_quants`` gives it}."""
    first, aliases = {}, {}
    for name, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, FakeQuant):
            first.setdefault(id(m), name)
            if first[id(m)] != name:
                aliases[name] = first[id(m)]
    return aliases


def update_observers_(observers: list[ActivationFakeQuant],
                      averaging_constant: float = AVERAGING_CONSTANT) -> None:
    """One moving-average step for all ``observers`` from their pending batch statistics.

    The pending min/max of every observer go through ONE fused all-reduce (MIN/MAX), then each
    rank applies the same arithmetic: the result is what a single process would compute from the
    union of the ranks' batches. Observers that saw nothing this step (pending still +-inf on
    every rank) keep their values. Pending statistics are reset.
    """
    if not observers:
        return
    batch_min = torch.stack([o.pending_min for o in observers])
    batch_max = torch.stack([o.pending_max for o in observers])
    distributed.all_reduce_min_max_(batch_min, batch_max)
    old_min = torch.stack([o.min_val for o in observers])
    old_max = torch.stack([o.max_val for o in observers])
    seen = torch.isfinite(batch_min) & torch.isfinite(batch_max)
    first = torch.isinf(old_min)
    new_min = torch.where(first, batch_min, old_min + averaging_constant * (batch_min - old_min))
    new_max = torch.where(first, batch_max, old_max + averaging_constant * (batch_max - old_max))
    new_min, new_max = torch.where(seen, new_min, old_min), torch.where(seen, new_max, old_max)
    quant_min = torch.tensor([o.quant_min for o in observers], device=new_min.device)
    quant_max = torch.tensor([o.quant_max for o in observers], device=new_min.device)
    scale, zero_point = affine_qparams(new_min, new_max, quant_min, quant_max)
    for i, o in enumerate(observers):
        o.min_val.copy_(new_min[i])
        o.max_val.copy_(new_max[i])
        o.scale.copy_(scale[i])
        o.zero_point.copy_(zero_point[i])
        o.pending_min.fill_(float("inf"))
        o.pending_max.fill_(float("-inf"))


def affine_qparams(min_val, max_val, quant_min, quant_max):
    """torch's MinMaxObserver formula: the range always holds 0, so 0 is exactly representable."""
    min_neg = torch.clamp(min_val, max=0.0)
    max_pos = torch.clamp(max_val, min=0.0)
    scale = torch.clamp((max_pos - min_neg) / (quant_max - quant_min), min=EPS)
    zero_point = quant_min - torch.round(min_neg / scale)
    zero_point = torch.minimum(torch.maximum(zero_point, quant_min), quant_max)
    return scale, zero_point.to(torch.int32)


def freeze_(model: nn.Module) -> None:
    """Fix every scale as a deployed model needs: weights still observed get their final scale."""
    for module in model.modules():
        if isinstance(module, (QuantLinear, QuantEmbedding)) and module.weight_quant.enabled:
            module.weight_quant.observe_(module.weight)
    for _, fq in fake_quants(model):
        fq.observe = False


# -- saving and checking ---------------------------------------------------------------------------
def quant_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every fake-quant buffer and flag, keyed by module name: ``quantization.safetensors``."""
    return named_quant_state(fake_quants(model))


def named_quant_state(named: list[tuple[str, FakeQuant]]) -> dict[str, torch.Tensor]:
    state = {}
    for name, module in named:
        for key, buf in module.named_buffers(recurse=False):
            state[f"{name}.{key}"] = buf.detach()
        state[f"{name}.enabled"] = torch.tensor(module.enabled)
        state[f"{name}.observe"] = torch.tensor(module.observe)
    return state


def load_quant_state(model: nn.Module, tensors: dict[str, torch.Tensor], where: str = "quantization state") -> None:
    load_named_quant_state(fake_quants(model), tensors, where, quant_aliases(model))


def load_named_quant_state(named: list[tuple[str, FakeQuant]], tensors: dict[str, torch.Tensor],
                           where: str = "quantization state", aliases: dict[str, str] | None = None) -> None:
    """Restore buffers and flags exactly; keys must match the model's fake-quant modules one to one.

    Files written before Q, K and V shared one input quantizer hold it three times (``aliases``
    names the copies): accepted where the copies equal the shared one, as they always did.
    """
    tensors = dict(tensors)
    for key in [k for k in tensors if k.rpartition(".")[0] in (aliases or {})]:
        module, _, leaf = key.rpartition(".")
        primary = f"{aliases[module]}.{leaf}"
        if primary in tensors and not torch.equal(tensors.pop(key), tensors[primary]):
            raise UserError(f"{where}: {key} differs from {primary}, whose quantizer it shares")
    expected = named_quant_state(named)
    missing = sorted(expected.keys() - tensors.keys())
    unexpected = sorted(tensors.keys() - expected.keys())
    if missing or unexpected:
        raise UserError(f"{where}: does not match the model's quantized layers "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    for name, module in named:
        for key, buf in module.named_buffers(recurse=False):
            value = tensors[f"{name}.{key}"]
            if value.shape != buf.shape:  # copy_ would broadcast one scale over every channel
                hint = ""
                if isinstance(module, WeightFakeQuant):
                    saved = "channel" if value.numel() > 1 else "tensor"
                    hint = (f": saved with weight_strategy {saved}, the recipe gives "
                            f"{'channel' if module.per_channel else 'tensor'} (SparseML's default: tensor; a model "
                            f"saved before the key existed was per channel: add 'weight_strategy: {saved}' to the "
                            "QuantizationModifier of its recipe.yaml)")
                raise UserError(f"{where}: {name}.{key} has shape {list(value.shape)}, the model's quantizer "
                                f"{list(buf.shape)}{hint}")
            buf.copy_(value)
        module.enabled = bool(tensors[f"{name}.enabled"])
        module.observe = bool(tensors[f"{name}.observe"])


def qparams(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every scale and zero point: what the rank-consistency check digests."""
    return {f"{name}.{key}": getattr(m, key) for name, m in fake_quants(model)
            for key in ("scale", "zero_point")}
