"""Optional features and the extra that installs each: a missing package is one line naming the extra.

DeepSpeed, W&B, TensorBoard and ONNX each serve one feature, so they are extras rather than
dependencies; a feature calls ``require`` where it first needs its package, before any work starts.
"""
from __future__ import annotations

import importlib
from types import ModuleType

from .errors import UserError


def require(module: str, extra: str, feature: str) -> ModuleType:
    """``module``, imported; if it is not installed, a UserError telling which extra brings it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UserError(f"{feature} needs the {module} package: pip install 'distsparse[{extra}]'") from None
