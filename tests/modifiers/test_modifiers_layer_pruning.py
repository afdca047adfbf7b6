"""LayerPruningModifier: layers leave the model before training; recipes keep naming weights by their
original layer numbers; the saved model, its config and the ONNX export have fewer layers; resume works."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from distsparse.errors import RecipeError
from distsparse.events import Event, State, fire
from distsparse.recipe import load_recipe

from conftest import small_recipe

DROP = """
structure_modifiers:
  - !LayerPruningModifier
    layers: [{layers}]
"""
# After the drop in file order (as oBERT's 6-layer recipe writes it), naming layers by original numbers.
PRUNE_KEPT = """
pruning_modifiers:
  - !GMPruningModifier
    params: ["re:bert\\\\.encoder\\\\.layer\\\\.({kept})\\\\.intermediate\\\\.dense\\\\.weight"]
    start_epoch: 0.0
    end_epoch: 1.0
    init_sparsity: 0.5
    final_sparsity: 0.5
    update_frequency: 1.0
"""


def bert(layers: int):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(
        vocab_size=120, hidden_size=16, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=32,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)).eval()


def test_dropped_layers_leave_the_model_and_names_follow():
    model = bert(4)
    kept_weights = {i: model.bert.encoder.layer[i].intermediate.dense.weight.detach().clone() for i in (0, 3)}
    recipe = load_recipe(PRUNE_KEPT.replace("{kept}", "0|3") + DROP.format(layers="bert.encoder.layer.1, bert.encoder.layer.2"))
    assert type(recipe.modifiers[0]).__name__ == "LayerPruningModifier"  # structure first, whatever the file order
    fire(recipe.modifiers, Event.INIT, State(model=model, steps_per_epoch=1))

    assert len(model.bert.encoder.layer) == 2 and model.config.num_hidden_layers == 2
    gmp = recipe.modifiers[1]
    assert gmp.names == ["bert.encoder.layer.0.intermediate.dense.weight", "bert.encoder.layer.1.intermediate.dense.weight"]
    assert torch.equal(model.bert.encoder.layer[1].intermediate.dense.weight, kept_weights[3])
    # The model is now exactly a 2-layer BERT: a fresh one loaded with its weights computes the same.
    small = bert(2)
    small.load_state_dict(model.state_dict())
    ids = torch.randint(0, 120, (3, 7))
    torch.testing.assert_close(model(input_ids=ids).logits, small(input_ids=ids).logits)


@pytest.mark.parametrize("layers, message", [
    ("bert.encoder.layer.9", r"'bert.encoder.layer.9' is not an entry of a ModuleList"),
    ("bert.encoder", r"'bert.encoder' is not an entry of a ModuleList"),
    ("bert.encoder.layer.0, bert.encoder.layer.1", r"removes every layer of bert.encoder.layer"),
])
def test_bad_layers_are_one_line(layers, message):
    recipe = load_recipe(DROP.format(layers=layers))
    with pytest.raises(RecipeError, match=message):
        fire(recipe.modifiers, Event.INIT, State(model=bert(2), steps_per_epoch=1))


def test_start_after_training_began_is_refused():
    with pytest.raises(RecipeError, match=r"LayerPruningModifier: start_epoch: 2.0: layers can only be removed before"):
        load_recipe(DROP.format(layers="bert.encoder.layer.1") + "    start_epoch: 2.0\n")


def test_train_save_resume_export_have_fewer_layers(tiny_model_dir, tmp_path):
    from distsparse.export import export_main as export
    from distsparse.train import main as train
    from transformers import AutoModelForSequenceClassification

    rows = ["sentence,label"] + [f"sample {i} {'good great' if i % 2 else 'bad awful'} {i % 5},{i % 2}" for i in range(32)]
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "recipe.yaml").write_text(small_recipe(DROP.format(layers="bert.encoder.layer.0"), num_epochs=2.0))

    def args(out, *extra):
        return ["--model_name_or_path", str(tiny_model_dir), "--recipe", str(tmp_path / "recipe.yaml"),
                "--train_file", str(tmp_path / "train.csv"), "--output_dir", str(tmp_path / out),
                "--per_device_train_batch_size", "8", "--max_seq_length", "16", "--eval_strategy", "no", *extra]

    assert train(args("out", "--save_strategy", "epoch")) == 0
    out = tmp_path / "out"
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 1
    saved = load_file(str(out / "model.safetensors"))
    assert {k.split(".")[3] for k in saved if k.startswith("bert.encoder.layer.")} == {"0"}
    start = load_file(str(tiny_model_dir / "model.safetensors"))  # the original layer 1 became layer 0
    assert saved["bert.encoder.layer.0.output.dense.weight"].shape == start["bert.encoder.layer.1.output.dense.weight"].shape
    assert AutoModelForSequenceClassification.from_pretrained(out).config.num_hidden_layers == 1

    # Resume from the epoch-1 checkpoint: the recipe drops the same layer before the state is loaded.
    assert train(args("resumed", "--save_strategy", "no", "--resume_from_checkpoint", str(out / "checkpoint-4"))) == 0
    resumed = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert resumed.keys() == saved.keys()
    for key in saved:
        torch.testing.assert_close(resumed[key], saved[key], rtol=1e-5, atol=1e-6, msg=key)

    assert export(["--model_path", str(out), "--output_dir", str(tmp_path / "deploy")]) == 0
    import onnx

    graph = onnx.load(str(tmp_path / "deploy" / "model.onnx")).graph
    names = " ".join([i.name for i in graph.initializer] + [n.name for n in graph.node])
    assert "layer.0" in names and "layer.1" not in names
