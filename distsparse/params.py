"""Which parameters a recipe's ``params`` names: exact names, ``re:`` patterns, __ALL__, __ALL_PRUNABLE__."""
from __future__ import annotations

import re

from torch import nn

from .errors import RecipeError

ORIGINAL_NAMES = "_distsparse_original_names"  # set by LayerPruningModifier: {current name: name in the recipe's model}


def prunable(model: nn.Module) -> list[str]:
    """Weights of Linear and Embedding layers, as SparseML's __ALL_PRUNABLE__."""
    return [
        f"{name}.weight" if name else "weight"
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, nn.Embedding))
    ]


def select_params(model: nn.Module, spec, where: str = "params") -> list[str]:
    """Resolve a recipe's ``params`` value into parameter names, in model order. After layers were
    dropped, entries match the original names and the current names are returned.

    A name or pattern that matches nothing is an error: a recipe written for another model
    must not silently prune nothing.
    """
    current = [n for n, _ in model.named_parameters()]
    original = getattr(model, ORIGINAL_NAMES, None) or {n: n for n in current}
    names = [original[n] for n in current]  # the recipe names parameters as the model was before layers left
    entries = [spec] if isinstance(spec, str) else list(spec or [])
    if not entries:
        raise RecipeError(f"{where}: params is empty")
    chosen: set[str] = set()
    for entry in entries:
        if entry == "__ALL__":
            found = names
        elif entry == "__ALL_PRUNABLE__":
            found = [original[n] for n in prunable(model) if n in original]
        elif entry.startswith("re:"):
            try:
                pattern = re.compile(entry[3:])
            except re.error as err:
                raise RecipeError(f"{where}: params: bad pattern {entry!r}: {err}") from None
            found = [n for n in names if pattern.fullmatch(n)]
        else:
            found = [entry] if entry in names else []
        if not found:
            raise RecipeError(f"{where}: params: {entry!r} matches no parameter of the model")
        chosen.update(found)
    return [n for n in current if original[n] in chosen]
