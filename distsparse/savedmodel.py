"""The saved model: a plain Hugging Face folder plus what distsparse needs to rebuild its QAT structure.

``config.json`` + ``model.safetensors`` + tokenizer load with ``AutoModelFor*.from_pretrained``;
``recipe.yaml`` (resolved, with metadata) and ``quantization.safetensors`` (observer statistics,
scales and zero-points) let ``distsparse export`` rebuild the fake-quantized model exactly.
"""
from __future__ import annotations

import json
import platform
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .distributed import full_parameters

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
    unwrapped.save_pretrained(folder, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    plain = json.loads(json.dumps({**metadata, "versions": versions()}, default=str))  # YAML-safe scalars only
    (folder / RECIPE_FILE).write_text(recipe.to_yaml(plain))
    quant = quant_state(unwrapped)
    if quant:
        save_file({k: v.detach().cpu().contiguous() for k, v in quant.items()}, str(folder / QUANT_FILE))


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
