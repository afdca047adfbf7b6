"""Every modifier family; importing this package fills ``MODIFIERS`` (YAML tag -> class)."""
from . import distillation, layer_pruning, obs, pruning, quantization, training  # noqa: F401  (they register themselves)
from .base import MODIFIERS, Modifier, register

__all__ = ["MODIFIERS", "Modifier", "register"]
