"""The saved model: a Hugging Face folder plus what distsparse needs to rebuild its QAT structure.

``config.json`` + ``model.safetensors`` + tokenizer load with ``AutoModelFor*.from_pretrained``.
A QAT model is saved in compressed-tensors format (``compressed.py``): plain transformers with the
``compressed-tensors`` package rebuilds its int8 quantization, and without that package refuses to
load rather than return fp32. ``recipe.yaml`` (resolved, with metadata) and
``quantization.safetensors`` (observer statistics, scales, zero points, on/off flags) let
distsparse rebuild its own fake-quant modules exactly (``from_pretrained`` here, then
``load_quantization``).
"""
from __future__ import annotations

import json
import platform
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from . import compressed
from .distributed import full_parameters

CONFIG_FILE = "config.json"
QUANT_FILE = "quantization.safetensors"
RECIPE_FILE = "recipe.yaml"


def versions() -> dict:
    import accelerate
    import transformers

    from . import __version__

    return {"distsparse": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "accelerate": accelerate.__version__, "python": platform.python_version()}


def save_model(accelerator, model, tokenizer, recipe, folder: Path, metadata: dict) -> None:
    """Write the model folder; call on every rank (gathering ZeRO-3 shards is collective)."""
    from .fake_quant import quant_state

    state_dict = accelerator.get_state_dict(model)
    if not accelerator.is_main_process:
        return
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    unwrapped = accelerator.unwrap_model(model)
    quantized = compressed.quantized_modules(unwrapped)
    if quantized:
        state_dict = compressed.compressed_state_dict(quantized, state_dict)
    unwrapped.save_pretrained(folder, state_dict=dict(state_dict), safe_serialization=True)  # it pops what it writes
    if quantized:
        config = json.loads((folder / CONFIG_FILE).read_text())
        config["quantization_config"] = compressed.quantization_config(quantized)
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tokenizer.save_pretrained(folder)
    plain = json.loads(json.dumps({**metadata, "versions": versions()}, default=str))  # YAML-safe scalars only
    (folder / RECIPE_FILE).write_text(recipe.to_yaml(plain))
    quant = quant_state(unwrapped)
    if quant:
        for name, module in quantized.items():  # the weight scales the int8 weights were stored with
            quant[f"{name}.weight_quant.scale"] = state_dict[f"{name}.weight_scale"].reshape(-1)
        save_file({k: v.detach().cpu().contiguous() for k, v in quant.items()}, str(folder / QUANT_FILE))


def from_pretrained(model_class, path, **kwargs):
    """``model_class.from_pretrained`` that reads distsparse's own compressed-tensors folders too.

    Such a folder loads as the plain float model (weights int8 x scale, no compressed-tensors
    package needed): distsparse then builds its own fake-quant modules from ``recipe.yaml`` and
    ``load_quantization``, instead of transformers wrapping the layers a second time.
    """
    if not compressed.is_compressed(path):
        return model_class.from_pretrained(path, **kwargs)
    from transformers import AutoConfig

    config, rest = AutoConfig.from_pretrained(path, return_unused_kwargs=True, **kwargs)
    del config.quantization_config
    if hasattr(model_class, "_model_mapping"):  # an Auto class: only the concrete one loads from a state dict alone
        model_class = model_class._model_mapping[type(config)]
    return model_class.from_pretrained(None, config=config, state_dict=compressed.dequantized_state_dict(path), **rest)


def load_quantization(model: nn.Module, folder) -> None:
    """The trained scales and zero points of a saved QAT model (its fake-quant modules already built)."""
    from safetensors.torch import load_file

    from .fake_quant import load_quant_state

    path = Path(folder) / QUANT_FILE
    if path.is_file():
        load_quant_state(model, load_file(str(path)), where=str(path))


def sparsity_report(model: nn.Module) -> dict:
    """Fraction of exact zeros in Linear weights: overall, and per kind of layer (attention, mlp, ...).

    Collective under ZeRO-3 (each weight is gathered in turn): call it on every rank.
    """
    zeros, total = {}, {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            with full_parameters(module, ["weight"]):
                w = module.weight.detach()
                kind = layer_kind(name)
                for key in ("linear", kind):
                    zeros[key] = zeros.get(key, 0) + int((w == 0).sum())
                    total[key] = total.get(key, 0) + w.numel()
    return {f"sparsity/{k}": zeros[k] / total[k] for k in total if total[k]}


def layer_kind(name: str) -> str:
    if "attention" in name:
        return "attention"
    if "intermediate" in name or ".output." in name:
        return "mlp"
    for kind in ("pooler", "classifier"):
        if kind in name:
            return kind
    return "other"
