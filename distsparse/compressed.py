"""A saved QAT model in compressed-tensors format, so plain ``transformers`` rebuilds its quantization.

``config.json`` gets a ``quantization_config`` (``quant_method: compressed-tensors``, format
``int-quantized``) that states our scheme, and ``model.safetensors`` holds each quantized layer as
compressed-tensors stores it: ``weight`` as int8, ``weight_scale`` (per tensor or output channel),
``input_scale``/``input_zero_point`` and ``output_scale``/``output_zero_point`` (per tensor).
``from_pretrained`` with ``compressed-tensors`` installed then fake-quantizes exactly where we do:

- weights: symmetric per tensor or per channel, ``round(w / s)`` in -127..127, zero point 0: the same;
- activations: our asymmetric uint8 0..255 with zero point z is compressed-tensors' int8
  -128..127 with zero point z - 128 (the same integers shifted by 128, so the same floats);
  ``reduce_range`` (0..127) is int7 -64..63 with z - 64.

The two differ only at exact rounding ties (we multiply by 1/s, it divides by s; it rounds after
adding z, we before), one quantization step on a handful of elements.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .fake_quant import ActivationFakeQuant, QuantEmbedding, QuantLinear, WeightFakeQuant

FORMAT = "int-quantized"


def _weight_args(fq: WeightFakeQuant) -> dict:
    bits = (fq.quant_max + 1).bit_length()  # quant_max = 2**(bits-1) - 1
    return {"num_bits": bits, "type": "int", "symmetric": True, "strategy": "channel" if fq.per_channel else "tensor",
            "dynamic": False}


def _activation_args(fq: ActivationFakeQuant) -> dict:
    return {"num_bits": (fq.quant_max + 1).bit_length() - 1, "type": "int", "symmetric": False,
            "strategy": "tensor", "dynamic": False}


def _weight_scale(fq: WeightFakeQuant, weight: torch.Tensor) -> torch.Tensor:
    """The scale the frozen model uses (``fake_quant.freeze_``): still observing means the current absmax."""
    scale = fq.weight_scale(weight) if fq.observe else fq.scale.detach().float()
    return scale.to(weight.device)


def _activation_tensors(prefix: str, fq: ActivationFakeQuant) -> dict[str, torch.Tensor]:
    shift = (fq.quant_max + 1) // 2  # unsigned 0..2^b-1 -> signed -2^(b-1)..2^(b-1)-1
    # a copy per layer: Q, K and V share one quantizer, and safetensors refuses one tensor under three names
    return {f"{prefix}_scale": fq.scale.detach().float().reshape(1).clone(),
            f"{prefix}_zero_point": (fq.zero_point.detach().reshape(1) - shift).to(torch.int8)}


def _scheme(module: nn.Module) -> dict:
    scheme = {"weights": _weight_args(module.weight_quant), "input_activations": None, "output_activations": None,
              "format": FORMAT}  # per group: left out, compressed-tensors packs Embedding weights instead
    if isinstance(module, QuantLinear) and module.input_quant.enabled:
        scheme["input_activations"] = _activation_args(module.input_quant)
    if isinstance(module.output_quant, ActivationFakeQuant) and module.output_quant.enabled:
        scheme["output_activations"] = _activation_args(module.output_quant)
    return scheme


def quantized_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The layers whose weights are fake-quantized now: what the saved model must quantize."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, (QuantLinear, QuantEmbedding)) and m.weight_quant.enabled}


def quantization_config(modules: dict[str, nn.Module]) -> dict:
    """compressed-tensors' ``quantization_config``: one group per distinct scheme, targets by module name."""
    groups: list[dict] = []
    for name, module in modules.items():
        scheme = _scheme(module)
        group = next((g for g in groups if all(g[k] == v for k, v in scheme.items())), None)
        if group is None:
            group = {**scheme, "targets": []}
            groups.append(group)
        group["targets"].append(name)
    return {"quant_method": "compressed-tensors", "format": FORMAT, "quantization_status": "compressed",
            "config_groups": {f"group_{i}": g for i, g in enumerate(groups)}, "ignore": [],
            "producer": "distsparse"}


def compressed_state_dict(modules: dict[str, nn.Module], state_dict: dict[str, torch.Tensor]) -> dict:
    """``state_dict`` with each quantized layer's weight as int8 and its scales and zero points added."""
    out = dict(state_dict)
    for name, module in modules.items():
        fq = module.weight_quant
        weight = state_dict[f"{name}.weight"]
        scale = _weight_scale(fq, weight)
        scale = scale[:, None] if fq.per_channel else scale  # compressed-tensors' shapes: [rows, 1] or [1]
        q = torch.clamp(torch.round(weight.detach().float() / scale), fq.quant_min, fq.quant_max)
        out[f"{name}.weight"] = q.to(torch.int8)
        out[f"{name}.weight_scale"] = scale.contiguous()
        if isinstance(module, QuantLinear) and module.input_quant.enabled:
            out.update({f"{name}.{k}": v for k, v in _activation_tensors("input", module.input_quant).items()})
        if isinstance(module.output_quant, ActivationFakeQuant) and module.output_quant.enabled:
            out.update({f"{name}.{k}": v for k, v in _activation_tensors("output", module.output_quant).items()})
    return out


def is_compressed(folder) -> bool:
    config = Path(folder) / "config.json"
    if not config.is_file():
        return False
    quant = json.loads(config.read_text()).get("quantization_config") or {}
    return quant.get("quant_method") == "compressed-tensors" and quant.get("producer") == "distsparse"


def quantized_targets(folder) -> list[str]:
    config = json.loads((Path(folder) / "config.json").read_text())["quantization_config"]
    return [t for group in config["config_groups"].values() for t in group["targets"]]


def dequantized_state_dict(folder) -> dict[str, torch.Tensor]:
    """The saved weights as floats (int8 x scale), without compressed-tensors' extra tensors.

    What distsparse's own loaders read: these weights, fake-quantized again with the same scales,
    are the weights the model trained and was evaluated with.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    tensors = {k: v for f in files for k, v in load_file(str(folder / f)).items()}
    for name in quantized_targets(folder):
        scale = tensors.pop(f"{name}.weight_scale")
        tensors[f"{name}.weight"] = tensors[f"{name}.weight"].float() * scale
        for key in ("input_scale", "input_zero_point", "output_scale", "output_zero_point"):
            tensors.pop(f"{name}.{key}", None)
    return tensors
