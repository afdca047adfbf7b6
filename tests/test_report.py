"""Pictures and the model card: a job writes sparsity.png, curves.png and README.md whose numbers are
those of its saved files; `recipe check --plot` draws the recipe's own schedule; without matplotlib
the pictures are skipped (train) or refused (recipe check) in one line."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, minilm_dir, small_recipe, tiny_bert
from distsparse.cli import main as cli
from distsparse.recipe import load_recipe
from distsparse.recipe.check import _lr_at, _merged, _phase_rows
from distsparse.report import WEIGHT_TYPES, weight_sparsity, write_report

pytest.importorskip("matplotlib", reason="the pictures need the [plots] extra")

STEPS_PER_EPOCH = 6  # 48 rows / 8 per step
RECIPE = small_recipe(r"""
pruning_modifiers:
  - !GMPruningModifier
    params:
      - re:bert\.encoder\.layer\.\d+\.attention\.self\.(query|key|value)\.weight
      - re:bert\.encoder\.layer\.\d+\.(attention\.output|intermediate|output)\.dense\.weight
    start_epoch: 0.0
    end_epoch: 1.0
    init_sparsity: 0.0
    final_sparsity: 0.75
    update_frequency: 0.5
quantization_modifiers:
  - !QuantizationModifier
    start_epoch: 1.0
    submodules: [bert.encoder, classifier]
""", num_epochs=2.0)


def image(path: Path):
    """The PNG's pixels, [height, width, channels] floats in [0, 1]."""
    from matplotlib.image import imread

    return imread(path)


def assert_picture(path: Path, width: int, height: int) -> None:
    pixels = image(path)
    assert pixels.shape[:2] == (height, width), (path, pixels.shape)
    assert pixels[..., :3].std() > 0.05, f"{path}: blank"  # lines, bars and text, not one colour


@pytest.fixture(scope="module")
def job(tmp_path_factory) -> Path:
    """A tiny BERT trained 2 epochs: GMP to 75% of the encoder in the first, QAT in the second."""
    from transformers import AutoTokenizer

    tmp = tmp_path_factory.mktemp("report")
    model = tmp / "tiny-bert"
    tiny_bert().save_pretrained(model)
    AutoTokenizer.from_pretrained(minilm_dir()).save_pretrained(model)
    rows = ["sentence,label"] + [f"sample {i} {'good fine great' if i % 2 else 'bad poor awful'} text,{i % 2}"
                                 for i in range(48)]
    (tmp / "train.csv").write_text("\n".join(rows) + "\n")
    (tmp / "dev.csv").write_text("\n".join(rows[:21]) + "\n")
    (tmp / "recipe.yaml").write_text(RECIPE)
    out = tmp / "out"
    assert cli(["train", "--model_name_or_path", str(model), "--recipe", str(tmp / "recipe.yaml"),
                "--recipe_args", "init_lr=0.002", "--train_file", str(tmp / "train.csv"),
                "--validation_file", str(tmp / "dev.csv"), "--output_dir", str(out),
                "--per_device_train_batch_size", "8", "--max_seq_length", "32", "--logging_steps", "1"]) == 0
    return out


def test_job_writes_pictures_and_a_card_with_its_numbers(job):
    assert_picture(job / "sparsity.png", 1000, 450)
    assert_picture(job / "curves.png", 1000, 700)

    # The numbers, counted here from the saved weights: every encoder weight at 75%, pooler and head dense.
    weights = load_file(str(job / "model.safetensors"))
    linear = [w for k, w in weights.items() if w.dim() == 2 and k.endswith(".weight") and "embeddings" not in k]
    linear_sparsity = sum(int((w == 0).sum()) for w in linear) / sum(w.numel() for w in linear)
    query = weights["bert.encoder.layer.1.attention.self.query.weight"]
    assert float((query == 0).float().mean()) == pytest.approx(0.75)
    sparsity = weight_sparsity(job / "model.safetensors")
    assert sparsity["linear"] == pytest.approx(linear_sparsity)
    assert list(sparsity["layers"]) == [0, 1]
    assert all(sparsity["layers"][layer][kind] == pytest.approx(0.75) for layer in (0, 1) for kind in WEIGHT_TYPES)

    card = (job / "README.md").read_text()
    results = json.loads((job / "eval_results.json").read_text())
    assert f"| accuracy | {results['eval_accuracy']:.4f} |" in card
    assert f"| loss | {results['eval_loss']:.4f} |" in card
    assert f"| all Linear layers | {linear_sparsity:.1%} |" in card and 0.5 < linear_sparsity < 0.75
    assert "| encoder layers | 75.0% |" in card
    assert all(f"| {kind} | 75.0% |" in card for kind in WEIGHT_TYPES)
    assert "quantization.safetensors" in card and (job / "quantization.safetensors").is_file()
    assert "`init_lr=0.002`" in card and "`num_epochs=2.0`" in card  # the recipe's variables, as resolved
    assert f"`{job.parent / 'train.csv'}`" in card and f"{2 * STEPS_PER_EPOCH} optimizer steps (2 epochs" in card
    assert f'AutoModelForSequenceClassification.from_pretrained("{job}")' in card
    assert f"distsparse export --model_path {job} --output_dir {job}-deploy" in card
    assert "![curves](curves.png)" in card and "![sparsity](sparsity.png)" in card


def test_without_matplotlib_the_card_is_written_and_one_line_says_why(job, tmp_path, monkeypatch):
    folder = tmp_path / "copy"
    folder.mkdir()
    for name in ("config.json", "model.safetensors", "quantization.safetensors"):
        (folder / name).write_bytes((job / name).read_bytes())
    state = json.loads((job / "trainer_state.json").read_text())
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what `import matplotlib` sees when it is not installed
    said = []
    written = write_report(folder, state, {"recipe_variables": {"a": 1}}, say=said.append)
    assert said == ["pictures skipped: sparsity.png and curves.png needs the matplotlib package: "
                    "pip install 'distsparse[plots]'"]
    assert written == [folder / "README.md"] and not list(folder.glob("*.png"))
    card = written[0].read_text()
    assert "| all Linear layers |" in card and "## Pictures" not in card


def test_recipe_check_without_matplotlib_is_one_line(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    recipe = ROOT / "distsparse" / "recipes" / "default.yaml"
    assert cli(["recipe", "check", str(recipe), "--plot", str(tmp_path / "t.png")]) == 2
    captured = capsys.readouterr()
    assert captured.err == ("distsparse recipe: error: --plot needs the matplotlib package: "
                            "pip install 'distsparse[plots]'\n")
    assert captured.out == "" and not (tmp_path / "t.png").exists()  # refused before any work


def test_timeline_plot_of_the_default_recipe(capsys, tmp_path):
    recipe_path = ROOT / "distsparse" / "recipes" / "default.yaml"
    assert cli(["recipe", "check", str(recipe_path), "--steps_per_epoch", "25", "--plot", str(tmp_path / "t.png")]) == 0
    assert capsys.readouterr().out.endswith(f"timeline plot: {tmp_path / 't.png'}\n")
    assert_picture(tmp_path / "t.png", 1000, 650)

    # What it draws, from the modifiers' own schedules: 3 epochs x 25 steps, GMP to 0.5 until epoch
    # 1.5 then masks kept, QAT from step 50 (one calibration step), observers frozen at epoch 2.75.
    recipe = load_recipe(recipe_path)
    rows = _phase_rows(_merged(recipe.modifiers), 25, 75)
    assert [(label, [(a, b, text) for a, b, _, text in spans]) for label, spans in rows] == [
        ("pruning", [(0, 38, "cubic 0 -> 0.5"), (38, 75, "masks kept")]),
        ("QAT", [(50, 51, "calibrate"), (51, 69, "QAT, observers on"), (69, 75, "QAT, frozen")])]
    assert _lr_at(recipe.modifiers, 0, 25) == pytest.approx(8e-5)
    assert _lr_at(recipe.modifiers, 74, 25) == pytest.approx(8e-5 * (1 - 74 / 75))


def test_timeline_lr_follows_sets_functions_and_final_lr():
    recipe = load_recipe("""
training_modifiers:
  - !EpochRangeModifier {start_epoch: 0.0, end_epoch: 4.0}
  - !SetLearningRateModifier {start_epoch: 0.0, learning_rate: 0.001}
  - !LearningRateFunctionModifier {start_epoch: 1.0, end_epoch: 2.0, lr_func: linear, init_lr: 0.0001, final_lr: 0.00001}
  - !SetLearningRateModifier {start_epoch: 3.0, learning_rate: 0.0005}
""")
    lrs = {step: _lr_at(recipe.modifiers, step, 10) for step in (0, 9, 10, 19, 20, 29, 30, 39)}
    assert lrs == pytest.approx({0: 1e-3, 9: 1e-3, 10: 1e-4, 19: 1.9e-5, 20: 1e-5, 29: 1e-5, 30: 5e-4, 39: 5e-4})
    assert _lr_at(load_recipe("training_modifiers:\n  - !EpochRangeModifier {start_epoch: 0.0, end_epoch: 1.0}\n").modifiers, 0, 10) is None
