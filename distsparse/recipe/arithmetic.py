"""``eval(...)`` in recipes: arithmetic over numeric variables, checked on the AST before computing.

A recipe is data from strangers. The expression is parsed, every node is checked against an
allow-list, and only then is the tree walked here; Python's ``eval`` is never called, and sizes are
bounded so that ``9**9**9`` is refused instead of hanging the process.
"""
from __future__ import annotations

import ast
import math
import operator
import warnings
from typing import Any, Callable

from ..errors import RecipeError
from .yaml_io import brief

BINARY = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}
UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}
FUNCTIONS = {"abs": abs, "float": float, "int": int, "min": min, "max": max, "round": round}
ALLOWED = {ast.Expression, ast.BinOp, ast.UnaryOp, ast.Constant, ast.Name, ast.Call, ast.Load,
           *BINARY, *UNARY}
MAX_LENGTH = 500  # recipe expressions are short; this also bounds nesting depth
MAX_BITS = 1100  # integers past any float's range only serve to exhaust time or memory
MAX_NDIGITS = 400  # round(x, -n) computes 10**n


class EvalError(RecipeError):
    """An expression's own fault; the caller adds the file and line it came from."""


def is_eval(value: Any) -> bool:
    return isinstance(value, str) and value.startswith("eval(") and value.endswith(")")


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def evaluate_expression(expr: str, lookup: Callable[[str], Any]):
    """Compute ``expr``; ``lookup(name)`` gives a variable's value (and may resolve it first)."""
    if len(expr) > MAX_LENGTH:
        raise EvalError(f"eval expression longer than {MAX_LENGTH} characters")
    try:
        with warnings.catch_warnings():  # "1abc" warns on stderr first: make it the error, one line
            warnings.simplefilter("error", SyntaxWarning)
            tree = ast.parse(expr.strip(), mode="eval")
    except SyntaxError as err:
        raise EvalError(f"eval({expr}): not an expression ({err.msg})") from None
    _check(tree, expr)
    try:
        return _compute(tree.body, lookup)
    except (ArithmeticError, ValueError, TypeError) as err:
        raise EvalError(f"eval({expr}): {err}") from None
    except RecursionError:
        raise EvalError(f"eval({expr}): nested too deeply") from None


def _check(tree: ast.AST, expr: str) -> None:
    """Refuse the whole expression before anything is computed."""
    for node in ast.walk(tree):
        if type(node) not in ALLOWED:
            raise EvalError(f"eval({expr}): {type(node).__name__} is not allowed "
                            f"(only numbers, numeric variables, + - * / // % **, {', '.join(FUNCTIONS)})")
        if isinstance(node, ast.Constant) and not is_number(node.value):
            raise EvalError(f"eval({expr}): only numbers may appear as constants, not {node.value!r}")
        if isinstance(node, ast.Call) and not (
            isinstance(node.func, ast.Name) and node.func.id in FUNCTIONS and not node.keywords
        ):
            raise EvalError(f"eval({expr}): only calls to {', '.join(FUNCTIONS)} with positional "
                            "arguments are allowed")


def _compute(node: ast.AST, lookup):
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        value = lookup(node.id)
        if not is_number(value):
            raise EvalError(f"variable {node.id!r} is not a number: {brief(value)}")
        return _bounded(value)
    if isinstance(node, ast.UnaryOp):
        return _bounded(UNARY[type(node.op)](_compute(node.operand, lookup)))
    if isinstance(node, ast.BinOp):
        left, right = _compute(node.left, lookup), _compute(node.right, lookup)
        if isinstance(node.op, ast.Pow):
            _check_power(left, right)
        return _bounded(BINARY[type(node.op)](left, right))
    # ast.Call, already restricted to FUNCTIONS by _check
    args = [_compute(arg, lookup) for arg in node.args]
    if node.func.id == "round" and len(args) == 2 and abs(args[1]) > MAX_NDIGITS:
        raise EvalError(f"round: ndigits {args[1]} is out of range")
    return _bounded(FUNCTIONS[node.func.id](*args))


def _check_power(base, exponent) -> None:
    if isinstance(base, int) and isinstance(exponent, int) and abs(base) > 1 and exponent > 0:
        if exponent * (abs(base).bit_length() - 1) > MAX_BITS:
            raise EvalError(f"{base} ** {exponent} is too large")


def _bounded(value):
    if isinstance(value, int) and value.bit_length() > MAX_BITS:
        raise EvalError("result is too large")
    if isinstance(value, complex):
        raise EvalError("result is not a real number")
    if isinstance(value, float) and not math.isfinite(value):
        raise EvalError(f"result is not finite ({value})")
    return value
