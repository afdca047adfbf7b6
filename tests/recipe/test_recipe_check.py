"""``distsparse recipe check``: every recipe we know passes, timelines match SparseML's schedule by
hand, and a hostile or broken recipe gets exit 2 with one line naming file and line."""
from __future__ import annotations

import io
import re
import subprocess
import sys
from contextlib import redirect_stderr, redirect_stdout

import pytest
from conftest import FIXTURES, ROOT
from test_recipe_loader import ALL_RECIPES, BERT_BASE, PER_TENSOR, SST2, seed_card

from distsparse.cli import main


def check(*args) -> tuple[int, str, str]:
    result = subprocess.run([sys.executable, "-m", "distsparse", "recipe", "check", *map(str, args)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    return result.returncode, result.stdout, result.stderr


def check_here(path) -> tuple[int, str, str]:
    """``check`` in this process (the command line's own entry point, its stdout and stderr captured)."""
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = main(["recipe", "check", str(path)])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def checked(tmp_path_factory) -> dict:
    """Every recipe checked in one process: a process each spent most of its time importing torch."""
    paths = [*ALL_RECIPES, seed_card(tmp_path_factory.mktemp("card"))]
    return {p.name: check_here(p) for p in paths}


def rows(output: str) -> list[tuple[float, int, str]]:
    """(epoch, step, what) for each row of the timeline table."""
    found = re.findall(r"(?m)^ +(\d+\.\d\d) +(\d+)  (.*)$", output)
    return [(float(epoch), int(step), text) for epoch, step, text in found]


def at(table: list, step: int, *words: str) -> str:
    """The one row at ``step`` whose text has all ``words``."""
    hits = [text for s, _, text in [(s, e, t) for e, s, t in table] if s == step and all(w in text for w in words)]
    assert len(hits) == 1, (step, words, table)
    return hits[0]


@pytest.mark.parametrize("name", [p.name for p in ALL_RECIPES] + ["card.md"])
def test_every_recipe_passes_check(name, checked):
    returncode, out, err = checked[name]
    assert returncode == 0, err
    assert err == "" and "valid" in out and "total: " in out


def test_sst2_timeline_by_hand(capsys):
    assert main(["recipe", "check", str(SST2)]) == 0
    out = capsys.readouterr().out
    table = rows(out)
    assert [s for _, s, _ in table] == sorted(s for _, s, _ in table)
    assert "0.00015 at step 0" in at(table, 0, "LearningRateFunctionModifier", "linear")
    assert "7.5e-05 at step 650" in at(table, 0, "LearningRateFunctionModifier", "linear")
    at(table, 800, "QAT starts")
    at(table, 1200, "observers frozen")
    at(table, 1300, "EpochRangeModifier")
    at(table, 0, "ConstantPruningModifier", "__ALL_PRUNABLE__")
    at(table, 0, "SetWeightDecayModifier", "0.01")
    summary = out.strip().splitlines()[-1]
    assert "13 epochs = 1300 steps at 100 steps/epoch" in summary
    assert "epochs 8-13 (steps 800-1300), observers freeze at epoch 12 (step 1200)" in summary
    assert "model's own zeros kept" in summary


def test_steps_per_epoch_moves_every_event(capsys):
    assert main(["recipe", "check", str(SST2), "--steps_per_epoch", "7"]) == 0
    out = capsys.readouterr().out
    table = rows(out)
    at(table, 56, "QAT starts")  # round(8 * 7)
    at(table, 84, "observers frozen")  # round(12 * 7)
    assert table[-1][1] == 91 and "13 epochs = 91 steps at 7 steps/epoch" in out


def test_gmp_block_recipe_timeline_by_hand(capsys):
    assert main(["recipe", "check", str(BERT_BASE)]) == 0
    out = capsys.readouterr().out
    table = rows(out)
    at(table, 200, "GMPruningModifier", "0 -> 0.9", "1x4", "every 1 steps")
    # cubic at the middle update (step 1100 of 200..2000): 0.9 * (1 - (1 - 0.5) ** 3) = 0.7875
    at(table, 1100, "GMPruningModifier", "0.7875")
    at(table, 2000, "GMPruningModifier", "0.9 reached")
    assert "5e-05 at step 3000" in at(table, 3000, "LearningRateFunctionModifier", "linear")
    at(table, 3000, "QAT starts")
    at(table, 3500, "observers frozen")
    assert "40 epochs = 4000 steps" in out and "final sparsity: 0.90 (GMPruningModifier)" in out


def test_per_tensor_modifiers_collapse_to_one_row(capsys):
    assert main(["recipe", "check", str(PER_TENSOR)]) == 0
    out = capsys.readouterr().out
    table = rows(out)
    assert "(72 entries)" in at(table, 0, "GMPruningModifier")
    assert len(table) == 5 and "10 epochs = 1000 steps" in out


def test_recipe_args_change_the_timeline(capsys):
    sst2 = ROOT / "distsparse" / "recipes" / "sst2_sparse_transfer.yaml"
    assert main(["recipe", "check", str(sst2), "--recipe_args", "num_epochs=20,qat_epochs=5"]) == 0
    out = capsys.readouterr().out
    at(rows(out), 1500, "QAT starts")
    assert "20 epochs = 2000 steps" in out


HOSTILE = ["__import__('os').system('touch {marker}')", "().__class__.__bases__[0].__subclasses__()",
           "open('{marker}', 'w')", "num_epochs.real", "[1][0]", "lambda: open('{marker}', 'w')",
           "9**9**9", "10**10**10"]


@pytest.mark.parametrize("expr", HOSTILE)
def test_hostile_evals_are_refused_before_anything_runs(expr, tmp_path, capsys):
    marker = tmp_path / "ran"
    recipe = tmp_path / "hostile.yaml"
    recipe.write_text("num_epochs: 2\nmodifiers:\n  - !EpochRangeModifier\n    start_epoch: 0\n"
                      f"    end_epoch: \"eval({expr.format(marker=marker)})\"\n")
    assert main(["recipe", "check", str(recipe)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and not marker.exists()
    assert re.fullmatch(rf"distsparse recipe: error: {recipe}:5 EpochRangeModifier: end_epoch: [^\n]+\n",
                        captured.err)


def test_bad_recipe_is_one_line_without_traceback(tmp_path):
    marker = tmp_path / "ran"
    recipe = tmp_path / "hostile.yaml"
    recipe.write_text(f"x: 1\ny: eval(__import__('os').system('touch {marker}'))\nmodifiers: []\n")
    returncode, out, err = check(recipe)
    assert returncode == 2 and out == "" and not marker.exists()
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith(f"distsparse recipe: error: {recipe}:2: y: eval(")


def test_usage_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["recipe", "check", str(SST2), "--steps_per_epoch", "0"])
    assert exit_.value.code == 2
    with pytest.raises(SystemExit) as exit_:
        main(["recipe", "lint", str(SST2)])
    assert exit_.value.code == 2
    assert main(["recipe", "check", str(FIXTURES / "no-such-recipe.yaml")]) == 2
    assert "cannot read the recipe" in capsys.readouterr().err
