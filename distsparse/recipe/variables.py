"""Recipe variables: resolved on first use, in any order, with cycles reported by name."""
from __future__ import annotations

from typing import Any

from ..errors import RecipeError
from .arithmetic import EvalError, evaluate_expression, is_eval

MAX_CHAIN = 50  # variables defined through one another; real recipes chain two or three


class Scope:
    """The variables of one level: the recipe, or a stage that sees the recipe's through ``parent``.

    ``lines`` maps a name to "file:line" for error messages; names given by recipe_args point there.
    """

    def __init__(self, raw: dict, lines: dict[str, str], parent: Scope | None = None):
        self.raw, self.lines, self.parent = raw, lines, parent
        self.resolved: dict[str, Any] = {}
        self.pending: list[str] = parent.pending if parent else []  # the chain being resolved

    def __contains__(self, name: str) -> bool:
        return name in self.raw or (self.parent is not None and name in self.parent)

    def get(self, name: str):
        if name in self.resolved:
            return self.resolved[name]
        if name not in self.raw:
            if self.parent is None:
                raise EvalError(f"unknown variable {name!r}")
            return self.parent.get(name)
        if name in self.pending:
            cycle = " -> ".join(self.pending[self.pending.index(name):] + [name])
            raise RecipeError(f"{self.lines[name]}: variables form a cycle: {cycle}")
        if len(self.pending) == MAX_CHAIN:  # each link is a few Python frames deeper
            raise RecipeError(f"{self.lines[name]}: {name}: reached through a chain of more than {MAX_CHAIN} "
                              f"variables ({self.pending[0]} -> {self.pending[1]} -> ...)")
        self.pending.append(name)
        try:
            value = self.resolve(self.raw[name])
        except EvalError as err:
            raise RecipeError(f"{self.lines[name]}: {name}: {err}") from None
        finally:
            self.pending.pop()
        self.resolved[name] = value
        return value

    def resolve(self, value):
        """``value`` with every ``eval(...)`` string in it (nested too) replaced by its result."""
        if is_eval(value):
            body = value[len("eval("):-1].strip()
            # A bare name substitutes the variable as it is: lists and strings too, as SparseML does.
            return self.get(body) if body.isidentifier() else evaluate_expression(body, self.get)
        if isinstance(value, list):
            return [self.resolve(v) for v in value]
        if isinstance(value, dict):
            return {k: self.resolve(v) for k, v in value.items()}
        return value
