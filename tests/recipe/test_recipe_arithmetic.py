"""The recipe ``eval`` evaluator and variable resolution: arithmetic only, never code."""
from __future__ import annotations

import math
import operator
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distsparse.errors import RecipeError
from distsparse.recipe import load_recipe
from distsparse.recipe.arithmetic import EvalError, evaluate_expression

VARIABLES = {"a": 3, "b": 0.5, "num_epochs": 13, "big": 10**6}


def lookup(name):
    if name not in VARIABLES:
        raise EvalError(f"unknown variable {name!r}")
    return VARIABLES[name]


@pytest.mark.parametrize("expr, expected", [
    ("1 + 2 * 3", 7), ("(1 + 2) * 3", 9), ("2 ** 3 ** 2", 512), ("-2 ** 2", -4), ("7 // 2", 3),
    ("-7 // 2", -4), ("7 % 3", 1), ("7 / 2", 3.5), ("num_epochs - a", 10), ("b * 4", 2.0),
    ("abs(-a)", 3), ("min(a, b, 1)", 0.5), ("max(a, num_epochs)", 13), ("round(2.675, 2)", 2.67),
    ("int(7.9)", 7), ("float(a)", 3.0), ("round(b + 2)", 2), ("+a", 3), (" 1e-4 * 4 ", 4e-4),
])
def test_arithmetic(expr, expected):
    value = evaluate_expression(expr, lookup)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize("expr", [
    "__import__('os')", "().__class__", "open('x')", "x.y", "[1][0]", "lambda: 1", "a.real",
    "[a for a in (1, 2)]", "'text'", "a if a else b", "a < b", "(a := 2)", "f'{a}'", "{1: 2}",
    "min(*[1, 2])", "round(a, ndigits=1)", "getattr(a, 'x')", "True", "None", "a; b", "import os",
    "eval('1')", "b'x'", "1j",
])
def test_anything_but_arithmetic_is_refused_before_any_lookup(expr):
    seen = []
    with pytest.raises(EvalError):
        evaluate_expression(f"num_epochs + {expr}" if "import" not in expr else expr,
                 lambda name: seen.append(name) or lookup(name))
    assert seen == []  # refused on the syntax tree, before a single variable was read


@pytest.mark.parametrize("expr", ["9**9**9", "10**10**10", "2**100000", "(10**300)**10",
                                  "round(1, -10**9)", "big**big", "float(10**400)", "1e308 * 10",
                                  "(-8) ** 0.5", "1 / 0", "a % 0", "min()", "int(1, 2)"])
def test_huge_or_undefined_results_are_refused_fast(expr):
    start = time.perf_counter()
    with pytest.raises(EvalError):
        evaluate_expression(expr, lookup)
    assert time.perf_counter() - start < 0.5


def test_unknown_and_non_numeric_names():
    with pytest.raises(EvalError, match="unknown variable 'nope'"):
        evaluate_expression("nope + 1", lookup)
    with pytest.raises(EvalError, match="not a number"):
        evaluate_expression("s * 2", lambda name: "text")
    with pytest.raises(EvalError, match="not a number"):
        evaluate_expression("flag + 1", lambda name: True)


def test_long_or_deep_expressions_are_refused_cleanly():
    with pytest.raises(EvalError, match="longer than"):
        evaluate_expression("+".join(["1"] * 400), lookup)
    assert evaluate_expression("-" * 300 + "1", lookup) == 1


# -- property: random arithmetic trees against a reference evaluator over the same tree ----------
OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv,
       "//": operator.floordiv, "%": operator.mod}
FUNCS = {"abs": abs, "min": min, "max": max, "round": round, "int": int, "float": float}
leaves = st.one_of(
    st.integers(0, 1000).map(lambda n: ("num", n)),
    st.floats(0, 1000, allow_nan=False, allow_infinity=False).map(lambda x: ("num", x)),
    st.sampled_from(sorted(VARIABLES)).map(lambda name: ("var", name)),
)


def _extend(children):
    return st.one_of(
        st.tuples(st.just("bin"), st.sampled_from(sorted(OPS)), children, children),
        st.tuples(st.just("pow"), children, st.integers(0, 4)),
        st.tuples(st.just("neg"), children),
        st.tuples(st.just("call"), st.sampled_from(["abs", "round", "int", "float"]), children),
        st.tuples(st.just("call2"), st.sampled_from(["min", "max"]), children, children),
    )


trees = st.recursive(leaves, _extend, max_leaves=12)


def render(tree) -> str:
    kind = tree[0]
    if kind == "num":
        return repr(tree[1])
    if kind == "var":
        return tree[1]
    if kind == "bin":
        return f"({render(tree[2])} {tree[1]} {render(tree[3])})"
    if kind == "pow":
        return f"({render(tree[1])} ** {tree[2]})"
    if kind == "neg":
        return f"(-{render(tree[1])})"
    if kind == "call":
        return f"{tree[1]}({render(tree[2])})"
    return f"{tree[1]}({render(tree[2])}, {render(tree[3])})"


def reference(tree):
    """What the recipe evaluator must give: Python arithmetic, with every result finite and
    integers below 2**1100 (the evaluator's documented bound)."""
    kind = tree[0]
    if kind == "num":
        value = tree[1]
    elif kind == "var":
        value = VARIABLES[tree[1]]
    elif kind == "bin":
        value = OPS[tree[1]](reference(tree[2]), reference(tree[3]))
    elif kind == "pow":
        value = reference(tree[1]) ** tree[2]
    elif kind == "neg":
        value = -reference(tree[1])
    elif kind == "call":
        value = FUNCS[tree[1]](reference(tree[2]))
    else:
        value = FUNCS[tree[1]](reference(tree[2]), reference(tree[3]))
    if isinstance(value, float) and not math.isfinite(value):
        raise OverflowError(value)
    if isinstance(value, int) and abs(value).bit_length() > 1100:
        raise OverflowError("too large")
    return value


@settings(max_examples=400, deadline=None)
@given(trees)
def test_evaluator_matches_reference_on_random_trees(tree):
    try:
        expected = reference(tree)
    except (ArithmeticError, ValueError):
        with pytest.raises(EvalError):
            evaluate_expression(render(tree), lookup)
        return
    value = evaluate_expression(render(tree), lookup)
    assert value == expected and type(value) is type(expected)


# -- variables: order-independent, cycles named, non-numeric substitution -------------------------
def test_variables_resolve_in_any_order():
    recipe = load_recipe(
        "total: eval(warmup + main)\nmain: eval(warmup * 4)\nwarmup: 2\n"
        "modifiers:\n  - !EpochRangeModifier\n    end_epoch: eval(total)\n")
    assert recipe.variables == {"total": 10, "main": 8, "warmup": 2}
    assert recipe.modifiers[0].end_epoch == 10.0 and recipe.num_epochs == 10.0


def test_cycle_names_the_variables_and_line():
    text = "a: eval(b + 1)\nb: eval(c * 2)\nc: eval(a)\nmodifiers: []\n"
    with pytest.raises(RecipeError) as err:
        load_recipe(text)
    message = str(err.value)
    assert "cycle" in message and "a -> b -> c -> a" in message and message.startswith("<string>:")
    with pytest.raises(RecipeError, match=r"<string>:1: .*cycle: x -> x"):
        load_recipe("x: eval(x + 1)\nmodifiers: []\n")


def test_bare_name_substitutes_non_numeric_values():
    recipe = load_recipe(
        "layers: [re:bert\\.encoder\\..*\\.weight]\nkind: unstructured\nqat: false\n"
        "modifiers:\n  - !QuantizationModifier\n    start_epoch: 1\n    submodules: eval(layers)\n"
        "    quantize_embeddings: eval(qat)\n")
    quant = recipe.modifiers[0]
    assert quant.submodules == ["re:bert\\.encoder\\..*\\.weight"] and quant.quantize_embeddings is False
    assert recipe.variables["kind"] == "unstructured"


def test_eval_errors_name_file_line_and_key(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("lr: 1e-4\nname: bert\n"
                    "modifiers:\n  - !SetLearningRateModifier\n    start_epoch: 0\n"
                    "    learning_rate: eval(lr * name)\n")
    with pytest.raises(RecipeError, match=rf"^{path}:6 SetLearningRateModifier: learning_rate: "
                                          r"variable 'name' is not a number"):
        load_recipe(path)
    path.write_text("lr: eval(missing * 2)\nmodifiers: []\n")
    with pytest.raises(RecipeError, match=rf"^{path}:1: lr: unknown variable 'missing'"):
        load_recipe(path)
