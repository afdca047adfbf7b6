"""Recipes from strangers (issue 14): refused in bounded time and memory, with one line naming the
file, the key or variable and the reason, exit 2 from ``recipe check`` and ``train``.

Cases that could run away (alias bombs, deep nesting, huge files, long variable chains) run in a
subprocess under a timeout and a 2 GiB address-space limit; the rest are bounded by construction
and run in-process.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import ROOT, small_recipe
from test_recipe_loader import ALL_RECIPES

from distsparse.cli import main
from distsparse.errors import RecipeError
from distsparse.recipe import load_recipe, yaml_io

sys.path.insert(0, str(ROOT / "bench"))
import recipe_check_cost  # bench/ is no package

DENSE = ROOT / "distsparse" / "recipes" / "dense.yaml"  # EpochRangeModifier at line 14, its end_epoch at line 16

# The benchmark's hostile recipes (name -> (what, text)), each with the refusal after "file", as a regex.
BOMBS = recipe_check_cost.bombs()
REFUSALS = {
    "alias_bomb": r":5: a4: more than 100000 YAML nodes with aliases expanded \(an alias bomb\?\); "
                  r"real recipes have a few thousand",
    "recursive_anchor": r":2: loop: alias \*loop is inside its own anchor \(a recursive recipe\)",
    "deep_flow": r":2: deep: nested more than 50 levels deep \(aliases expanded\); real recipes nest about 6",
    "five_megabytes": r": longer than 1048576 bytes \(1 MiB\); real recipes are under 25 KB",
    "variable_chain": r":51: v50: reached through a chain of more than 50 variables \(v0 -> v1 -> \.\.\.\)",
}
RUNAWAY = {name: (text, REFUSALS[name]) for name, (_, text) in BOMBS.items()} | {
    "recursive_merge": ("base: &base\n  x: 1\n  <<: *base\nmodifiers: []\n",
                        r":1: base: alias \*base is inside its own anchor \(a recursive recipe\)"),
    "deep_through_aliases": (f"a: &a {'[' * 30}{']' * 30}\nb: {'[' * 30}*a{']' * 30}\nmodifiers: []\n",
                             r":2: b: nested more than 50 levels deep"),
}


def cli(*args, timeout: float = 180) -> subprocess.CompletedProcess | subprocess.TimeoutExpired:
    """``distsparse ARGS`` in its own process, under the address-space limit and a timeout."""
    try:
        return subprocess.run([sys.executable, "-m", "distsparse", *map(str, args)], cwd=ROOT, capture_output=True,
                              text=True, timeout=timeout, preexec_fn=recipe_check_cost.limit_memory, check=False)
    except subprocess.TimeoutExpired as timed_out:
        return timed_out  # the test of that case fails, not the others run beside it


def assert_one_line(proc, command: str, path: Path, reason: str) -> None:
    assert isinstance(proc, subprocess.CompletedProcess), f"ran past {proc.timeout} s"
    assert (proc.returncode, proc.stdout) == (2, ""), (proc.returncode, proc.stdout[-500:], proc.stderr[-2000:])
    assert re.fullmatch(rf"distsparse {command}: error: {re.escape(str(path))}{reason}[^\n]*\n", proc.stderr), \
        proc.stderr[-2000:]


@pytest.fixture(scope="module")
def checked(tmp_path_factory) -> dict[str, tuple[Path, subprocess.CompletedProcess]]:
    """Every runaway recipe through ``distsparse recipe check``, a few processes at a time."""
    folder = tmp_path_factory.mktemp("runaway")
    paths = {}
    for name, (text, _) in RUNAWAY.items():
        paths[name] = folder / f"{name}.yaml"
        paths[name].write_text(text)
    with ThreadPoolExecutor(max_workers=3) as pool:
        procs = pool.map(lambda path: cli("recipe", "check", path), paths.values())
        return {name: (paths[name], proc) for name, proc in zip(paths, procs)}


@pytest.mark.parametrize("name", RUNAWAY)
def test_runaway_recipes_are_one_line_in_bounded_memory(checked, name):
    path, proc = checked[name]
    assert_one_line(proc, "recipe", path, RUNAWAY[name][1])


def test_five_megabytes_is_refused_before_parsing():
    text = RUNAWAY["five_megabytes"][0]
    assert len(text) > 5 * 10**6
    with pytest.raises(RecipeError, match=r"^<string>: longer than 1048576 bytes"):
        load_recipe(text)
    with pytest.raises(RecipeError, match=r"^recipe_args: longer than 1048576 bytes"):
        load_recipe(DENSE, "num_epochs=1," * 100_000)


def test_train_refuses_a_hostile_recipe_in_one_line(tmp_path, tiny_model_dir):
    """The same refusals from ``distsparse train --recipe``, before any training step."""
    (tmp_path / "train.csv").write_text("sentence,label\n" + "".join(f"text {i},{i % 2}\n" for i in range(8)))
    recipes = {"alias_bomb": RUNAWAY["alias_bomb"], "nan_epochs": (
        small_recipe().replace("num_epochs: 2.0\n", "num_epochs: .nan\n"),
        r":16 EpochRangeModifier: end_epoch: nan is not a finite number")}
    for name, (text, _) in recipes.items():
        (tmp_path / f"{name}.yaml").write_text(text)

    def train(name):
        return cli("train", "--model_name_or_path", tiny_model_dir, "--train_file", tmp_path / "train.csv",
                   "--recipe", tmp_path / f"{name}.yaml", "--output_dir", tmp_path / name, "--max_seq_length", 16)

    with ThreadPoolExecutor(max_workers=2) as pool:
        procs = dict(zip(recipes, pool.map(train, recipes)))
    for name, proc in procs.items():
        assert_one_line(proc, "train", tmp_path / f"{name}.yaml", recipes[name][1])
        assert not (tmp_path / name / "model.safetensors").exists()


# -- bounded by construction: in-process ------------------------------------------------------------
EPOCH_RANGE = "modifiers:\n  - !EpochRangeModifier\n    start_epoch: {start}\n    end_epoch: {end}\n"


@pytest.mark.parametrize("start, end, reason", [
    ("0", ".nan", r":4 EpochRangeModifier: end_epoch: nan is not a finite number"),
    ("0", ".inf", r":4 EpochRangeModifier: end_epoch: inf is not a finite number"),
    ("-.inf", "3", r":3 EpochRangeModifier: start_epoch: -inf is not a finite number"),
    ("-3", "-2", r":3 EpochRangeModifier: start_epoch: -3.0 is not an epoch: -1 \(from the start / never\) or 0 to "),
    ("0", "-0.5", r":4 EpochRangeModifier: end_epoch: -0.5 is not an epoch"),
    ("0", "1e307", r":4 EpochRangeModifier: end_epoch: 1e\+307 is not an epoch"),
    ("0", "9" * 400, r":4 EpochRangeModifier: end_epoch: expected float, got 9{40}\.\.\. \(400 characters\)"),
    ("0", "0", r":2 EpochRangeModifier: end_epoch: 0: must be set and after start_epoch 0 \(it is how long training"),
    ("2", "2", r":2 EpochRangeModifier: end_epoch: 2: must be set and after start_epoch 2"),
    ("-1", "-1", r":2 EpochRangeModifier: end_epoch: -1: must be set and after start_epoch -1"),
])
def test_bad_epochs_name_modifier_and_key(tmp_path, capsys, start, end, reason):
    path = tmp_path / "epochs.yaml"
    path.write_text(EPOCH_RANGE.format(start=start, end=end))
    assert main(["recipe", "check", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert re.fullmatch(rf"distsparse recipe: error: {re.escape(str(path))}{reason}[^\n]*\n", captured.err)


@pytest.mark.parametrize("recipe_args, reason", [
    ("num_epochs=-5", r":16 EpochRangeModifier: end_epoch: -5.0 is not an epoch"),
    ("num_epochs=0", r":14 EpochRangeModifier: end_epoch: 0: must be set"),
    ("num_epochs=.nan", r":16 EpochRangeModifier: end_epoch: nan is not a finite number"),
    ('{"num_epochs": 1e999}', r":16 EpochRangeModifier: end_epoch: inf is not a finite number"),
])
def test_recipe_args_cannot_make_epochs_bad(recipe_args, reason):
    """dense.yaml trains for eval(num_epochs): train used to run its default 3 epochs instead."""
    with pytest.raises(RecipeError, match=rf"^{re.escape(str(DENSE))}{reason}"):
        load_recipe(DENSE, recipe_args)


def test_overlapping_epoch_ranges_are_refused_identical_and_disjoint_allowed():
    two = EPOCH_RANGE.format(start=0, end=3) + EPOCH_RANGE.removeprefix("modifiers:\n")
    overlap = r"^<string>:5 EpochRangeModifier: {key}: epochs {mine} overlap epochs 0-3 of the EpochRangeModifier at "
    with pytest.raises(RecipeError, match=overlap.format(key="end_epoch", mine="0-5") + r"<string>:2; a recipe trains "
                                                                                         r"for one range$"):
        load_recipe(two.format(start=0, end=5))
    with pytest.raises(RecipeError, match=overlap.format(key="start_epoch", mine="2-4")):
        load_recipe(two.format(start=2, end=4))
    assert load_recipe(two.format(start=-1, end=3)).num_epochs == 3.0  # -1 is the start: the same range
    assert load_recipe(two.format(start=3, end=5)).num_epochs == 5.0  # one after the other, as flattened stages


@pytest.mark.parametrize("value, reason", [
    ("2001-13-45", r"'2001-13-45': month must be in 1\.\.12"),
    ("!!int 0x", r"'0x': invalid literal for int\(\) with base 16: ''"),
    ("!!float abc", r"'abc': could not convert string to float: 'abc'"),
    ("9" * 5000, r"'9{39}\.\.\. \(5002 characters\): Exceeds the limit \(4300 digits\)"),
])
def test_scalar_errors_are_one_line_with_the_line(value, reason):
    with pytest.raises(RecipeError, match=rf"^<string>:2: {reason}"):
        load_recipe(f"x: 1\ny: {value}\nmodifiers: []\n")


@pytest.mark.parametrize("recipe_args, reason", [
    ('{"num_epochs": ' + "[" * 100_000 + "]" * 100_000 + "}", "recipe_args: JSON nested too deeply"),
    ('{"num_epochs": ' + "[" * 200 + "]" * 200 + "}", r"recipe_args: num_epochs: more than 100000 values or 50 levels"),
    ('{"num_epochs": 1' + "0" * 5000 + "}", r"recipe_args: not valid JSON: Exceeds the limit \(4300 digits\)"),
])
def test_json_recipe_args_are_bounded(recipe_args, reason):
    with pytest.raises(RecipeError, match=rf"^{reason}"):
        load_recipe(DENSE, recipe_args)


def test_long_values_are_cut_in_messages():
    with pytest.raises(RecipeError) as err:
        load_recipe("x: [" + ", ".join(["word"] * 20_000) + "]\ny: eval(x + 1)\nmodifiers: []\n")
    assert str(err.value) == ("<string>:2: y: variable 'x' is not a number: ['word', 'word', 'word', 'word', "
                              "'word',... (160000 characters)")


@pytest.mark.parametrize("path", ALL_RECIPES, ids=lambda p: p.name)
def test_real_recipes_are_far_inside_the_bounds(path):
    """The bounds refuse only what no recipe needs: real ones stay 10x below each of them."""
    text = path.read_text()
    loader = yaml_io.Loader(text)
    try:
        loader.get_single_node()
    finally:
        loader.dispose()
    assert len(text.encode()) * 10 < yaml_io.MAX_BYTES
    assert loader.nodes * 10 < yaml_io.MAX_NODES and loader.deepest * 5 < yaml_io.MAX_DEPTH
    assert loader.nodes > 10 and loader.deepest >= 3  # counted


def test_bench_recipe_check_cost_tiny(tmp_path):
    out = tmp_path / "cost.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "recipe_check_cost.py"), "--tiny", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    cases = result["cases"]
    assert cases[0]["exit"] == 0 and cases[0]["case"] == "real" and cases[0]["stdout_lines"] > 5
    assert [c["exit"] for c in cases[1:]] == [2] * (len(cases) - 1) and len(cases) >= 3
    assert all(c["seconds"] > 0 and c["peak_rss_mib"] > 0 for c in cases)
    assert "| case |" in proc.stdout


def test_lr_window_under_one_step_and_literals_python_warns_about():
    """Found by mutating real recipes: an LR window under one step, and eval text Python only warns about."""
    from distsparse.recipe.check import timeline_table

    table = timeline_table(load_recipe(DENSE, "num_epochs=1e-300"), 100)
    assert "LearningRateFunctionModifier: window under one step at 100 steps/epoch: linear schedule skipped" in table
    with pytest.raises(RecipeError, match=r"^<string>:1: x: eval\(1abc\): not an expression \(invalid decimal literal\)$"):
        load_recipe("x: eval(1abc)\nmodifiers: []\n")
