"""Loading recipes: SparseML's real recipes unchanged, cards, anchors, recipe_args, stages, errors."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES, ROOT, SHARED, requires_shared

from distsparse.errors import RecipeError
from distsparse.modifiers import MODIFIERS
from distsparse.recipe import load_recipe, parse_recipe_args

SPARSEML = FIXTURES / "sparseml_recipes"
SST2 = SPARSEML / "neuralmagic+sparseml__tutorial-sentiment-analysis-cli__sst2_pruned90_quant.yaml"
MNLI = SPARSEML / "neuralmagic+sparseml__tutorial-text-classification-cli__mnli_pruned90_quant.yaml"
BERT_BASE = SPARSEML / "neuralmagic+sparseml_at_92ff434-parent__hf-recipes__bert-base-12layers_prune_quant90.yaml"
PER_TENSOR = SPARSEML / "neuralmagic+sparseml_at_403e650-parent__hf-recipes__90sparsity10epochs.yaml"
SEED_RECIPE = FIXTURES / "seed_recipe.yaml"
ALL_RECIPES = sorted(SPARSEML.glob("*.yaml")) + sorted((ROOT / "distsparse" / "recipes").glob("*.yaml"))


def names(recipe):
    return [type(m).__name__ for m in recipe.modifiers]


def seed_card(tmp_path: Path) -> Path:
    """The seed document's recipe as a SparseML recipe card: prose, then the YAML between ---."""
    card = tmp_path / "card.md"
    card.write_text(f"---\n{SEED_RECIPE.read_text()}---\n\n# SST-2 sparse transfer\n\nProse after the recipe.\n")
    return card


@requires_shared
def test_fixtures_are_the_shared_originals():
    """The shipped copies are SparseML's files unchanged, and the seed recipe is the seed's YAML block."""
    for original in sorted((SHARED / "recipes-sparseml").glob("*.yaml")):
        assert (SPARSEML / original.name).read_bytes() == original.read_bytes(), original.name
    seed = next((SHARED / "seed").glob("*.txt")).read_text()
    assert SEED_RECIPE.read_text() == re.search(r"```yaml\n(.*?)```", seed, re.S)[1]


def test_sst2_recipe_values():
    recipe = load_recipe(SST2)
    assert names(recipe) == ["EpochRangeModifier", "LearningRateFunctionModifier", "QuantizationModifier",
                             "DistillationModifier", "ConstantPruningModifier", "SetWeightDecayModifier"]
    epochs, lr, quant, distill, constant, decay = recipe.modifiers
    assert (epochs.start_epoch, epochs.end_epoch, recipe.num_epochs) == (0.0, 13.0, 13.0)
    assert (lr.lr_func, lr.init_lr, lr.final_lr, lr.end_epoch) == ("linear", 1.5e-4, 0.0, 13.0)
    assert (quant.start_epoch, quant.disable_quantization_observer_epoch) == (8.0, 12.0)
    assert quant.quantize_embeddings is True and quant.quantize_linear_activations is False
    assert quant.exclude_module_types == ["LayerNorm", "Tanh"]
    assert quant.submodules == ["bert.embeddings", "bert.encoder", "bert.pooler", "classifier"]
    assert (distill.hardness, distill.temperature, distill.distill_output_keys) == (1.0, 2.0, ["logits"])
    assert constant.params == "__ALL_PRUNABLE__" and decay.weight_decay == 0.01
    assert recipe.variables["version"] == "1.1.0" and recipe.variables["num_epochs"] == 13
    assert quant.where == f"{SST2}:31 QuantizationModifier"


def test_yaml_12_numbers():
    """``8e-5`` is a float (PyYAML's YAML 1.1 reads a string), ``2:4`` a string (not 124)."""
    lr = load_recipe(MNLI).modifiers[1]
    assert lr.init_lr == 8e-5 and isinstance(lr.init_lr, float)
    recipe = load_recipe("a: 8e-5\nb: 2:4\nc: 1_000\nd: .5\ne: -1\nf: 1.5e+3\ng: 0x10\nmodifiers: []\n")
    assert recipe.variables == {"a": 8e-5, "b": "2:4", "c": 1000, "d": 0.5, "e": -1, "f": 1500.0, "g": 16}


def test_anchors_aliases_and_block_masks():
    recipe = load_recipe(BERT_BASE)
    assert recipe.num_epochs == 40.0
    gmp = recipe.modifiers[3]
    assert (gmp.start_epoch, gmp.end_epoch, gmp.final_sparsity, gmp.update_frequency) == (2.0, 20.0, 0.9, 0.01)
    assert gmp.mask_type == [1, 4] and len(gmp.params) == 6
    assert [m.start_epoch for m in recipe.modifiers[1:3]] == [0.0, 30.0]


def test_merge_keys_share_modifier_defaults():
    recipe = load_recipe("""
gmp: &gmp {init_sparsity: 0.0, final_sparsity: 0.8, start_epoch: 1, end_epoch: 5, update_frequency: 0.5}
modifiers:
  - !GMPruningModifier
    <<: *gmp
    params: [re:.*query.weight]
  - !GMPruningModifier
    <<: *gmp
    final_sparsity: 0.6
    params: [re:.*key.weight]
""")
    first, second = recipe.modifiers
    assert (first.final_sparsity, second.final_sparsity, second.end_epoch) == (0.8, 0.6, 5.0)


def test_per_tensor_recipe():
    recipe = load_recipe(PER_TENSOR)
    assert names(recipe).count("GMPruningModifier") == 72 and recipe.num_epochs == 10.0
    assert recipe.modifiers[1].log_types == "__ALL__" and recipe.modifiers[1].params == [
        "bert.encoder.layer.0.attention.self.query.weight"]


def test_recipe_card_gives_the_file_recipe_and_card_lines(tmp_path):
    card = seed_card(tmp_path)
    from_card, from_file = load_recipe(card), load_recipe(SST2)
    assert from_card.modifiers == from_file.modifiers and from_card.source == str(card)
    lines = card.read_text().splitlines()
    line = int(from_card.modifiers[2].where.split(":")[1].split()[0])
    assert lines[line - 1].strip() == "- !QuantizationModifier"
    card.write_text(card.read_text().replace("hardness: eval(distill_hardness)", "hardness: eval(nope)"))
    with pytest.raises(RecipeError, match=rf"^{card}:\d+ DistillationModifier: hardness: unknown variable 'nope'"):
        load_recipe(card)
    (tmp_path / "bad.md").write_text("# no front matter here\n")
    with pytest.raises(RecipeError, match="between two '---' lines"):
        load_recipe(tmp_path / "bad.md")


def test_yaml_string_source_and_missing_file(tmp_path):
    assert load_recipe(SST2.read_text()).source == "<string>"
    framework_tag = load_recipe("modifiers:\n  - !pytorch.EpochRangeModifier\n    end_epoch: 3\n")
    assert names(framework_tag) == ["EpochRangeModifier"] and framework_tag.num_epochs == 3.0
    with pytest.raises(RecipeError, match="cannot read the recipe"):
        load_recipe(str(tmp_path / "missing.yaml"))


@pytest.mark.parametrize("recipe_args", [
    {"num_epochs": 20, "qat_start_epoch": 15.0, "observer_epoch": 19},
    '{"num_epochs": 20, "qat_start_epoch": 15.0, "observer_epoch": 19}',
    "num_epochs=20, qat_start_epoch=15.0,observer_epoch=19",
])
def test_recipe_args_forms(recipe_args):
    recipe = load_recipe(SST2, recipe_args)
    quant = recipe.modifiers[2]
    assert recipe.num_epochs == 20.0 and (quant.start_epoch, quant.disable_quantization_observer_epoch) == (15, 19)
    assert recipe.modifiers[1].end_epoch == 20.0  # eval(num_epochs) follows the override


def test_recipe_args_flow_into_derived_variables():
    sst2 = ROOT / "distsparse" / "recipes" / "sst2_sparse_transfer.yaml"
    base, longer = load_recipe(sst2), load_recipe(sst2, "num_epochs=16,qat_epochs=4")
    assert (base.variables["qat_start_epoch"], base.variables["observer_freeze_epoch"]) == (7, 9)
    assert (longer.variables["qat_start_epoch"], longer.variables["observer_freeze_epoch"]) == (12, 15)
    quant = next(m for m in longer.modifiers if type(m).__name__ == "QuantizationModifier")
    assert (quant.start_epoch, quant.disable_quantization_observer_epoch, longer.num_epochs) == (12.0, 15.0, 16.0)


def test_recipe_args_parsing_and_unknown_keys():
    assert parse_recipe_args("a=1,b=2.5,c=1e-4,d=true,e=linear,f=2:4") == {
        "a": 1, "b": 2.5, "c": 1e-4, "d": True, "e": "linear", "f": "2:4"}
    assert parse_recipe_args(None) == {} and parse_recipe_args("") == {}
    with pytest.raises(RecipeError, match="'oops' is not key=value"):
        parse_recipe_args("a=1,oops")
    with pytest.raises(RecipeError, match="not valid JSON"):
        parse_recipe_args("{num_epochs: 3")
    with pytest.raises(RecipeError, match=r"recipe_args: num_epoch not a variable .*num_epochs"):
        load_recipe(SST2, {"num_epoch": 3})
    text = "x: 1\ny: eval(x * 2)\nmodifiers: []\n"
    with pytest.raises(RecipeError, match=r"^<string>: recipe_args: variables form a cycle: x -> y -> x"):
        load_recipe(text, {"x": "eval(y)"})
    with pytest.raises(RecipeError, match=r"^<string>:2: y: variable 'x' is not a number: 'abc'"):
        load_recipe(text, "x=abc")


def test_unknown_modifier_lists_supported(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("version: 1\nmodifiers:\n  - !EpochRangeModifier\n    end_epoch: 2\n"
                    "  - !NoSuchPruningModifier\n    end_epoch: 2\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    message = str(err.value)
    assert message.startswith(f"{path}:5: unknown modifier !NoSuchPruningModifier; supported: ")
    assert all(name in message for name in MODIFIERS) and "GMPruningModifier" in MODIFIERS


def test_unknown_key_names_line_key_and_valid_keys(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("modifiers:\n  - !DistillationModifier\n    hardness: 0.5\n    temprature: 2.0\n")
    with pytest.raises(RecipeError, match=rf"^{path}:4 DistillationModifier: unknown key 'temprature'; "
                                          r"valid keys: .*temperature"):
        load_recipe(path)


@pytest.mark.parametrize("key, value", [("init_lr", "fast"), ("init_lr", "[1, 2]"), ("lr_func", "3"),
                                        ("end_epoch", "true"), ("param_groups", "[a]")])
def test_wrong_value_types(key, value):
    text = ("modifiers:\n  - !LearningRateFunctionModifier\n    start_epoch: 0\n    end_epoch: 2\n"
            "    lr_func: linear\n    init_lr: 0.1\n    final_lr: 0.0\n")
    text = re.sub(rf"(?m)^    {key}: .*$", f"    {key}: {value}", text) if key in text else \
        text + f"    {key}: {value}\n"
    with pytest.raises(RecipeError, match=rf"^<string>:\d+ LearningRateFunctionModifier: {key}: expected "):
        load_recipe(text)


def test_modifier_validation_and_yaml_errors_name_the_place(tmp_path):
    with pytest.raises(RecipeError, match=r"^<string>:2 GMPruningModifier: final_sparsity: 1.5 is outside"):
        load_recipe("modifiers:\n  - !GMPruningModifier\n    params: __ALL__\n    end_epoch: 2\n"
                    "    init_sparsity: 0\n    final_sparsity: 1.5\n    update_frequency: 1\n")
    with pytest.raises(RecipeError, match=r"^<string>:3: mapping values are not allowed here"):
        load_recipe("a: 1\nmodifiers:\n  - b: c: d\n")
    with pytest.raises(RecipeError, match=r"^<string>:2: modifiers: each entry must be a !ModifierName"):
        load_recipe("a: 1\nmodifiers:\n  - EpochRangeModifier\n")
    with pytest.raises(RecipeError, match="a recipe is a YAML mapping"):
        load_recipe("- just\n- a list\n")


def test_python_tags_are_refused_without_running(tmp_path):
    marker = tmp_path / "ran"
    text = f"x: !!python/object/apply:os.system ['touch {marker}']\nmodifiers: []\n"
    with pytest.raises(RecipeError, match=r"^<string>:1: could not determine a constructor"):
        load_recipe(text)
    assert not marker.exists()


STAGED = """
num_epochs: 2
lr: 0.1
dense_stage:
  dense_modifiers:
    - !EpochRangeModifier
      end_epoch: eval(num_epochs)
    - !ConstantPruningModifier
      params: __ALL_PRUNABLE__
    - !SetLearningRateModifier
      learning_rate: eval(lr)
prune_stage:
  lr: 0.01
  prune_epochs: 1.5
  prune_modifiers:
    - !GMPruningModifier
      params: __ALL_PRUNABLE__
      start_epoch: 0.5
      end_epoch: eval(0.5 + prune_epochs)
      init_sparsity: 0.0
      final_sparsity: 0.5
      update_frequency: 0.5
    - !SetLearningRateModifier
      learning_rate: eval(lr)
  quant_modifiers:
    - !QuantizationModifier
      start_epoch: 1.0
      disable_quantization_observer_epoch: 1.5
qat_stage:
  qat_modifiers:
    - !EpochRangeModifier
      start_epoch: -1
      end_epoch: 1
"""


def test_stages_run_one_after_another():
    recipe = load_recipe(STAGED)
    epoch0, constant, set_lr0, gmp, set_lr1, quant, epoch2 = recipe.modifiers
    assert (epoch0.start_epoch, epoch0.end_epoch) == (-1.0, 2.0)
    assert constant.end_epoch == 2.0  # never-ending modifiers end with their stage
    assert set_lr0.learning_rate == 0.1 and set_lr1.learning_rate == 0.01  # stage variables win
    assert (gmp.start_epoch, gmp.end_epoch) == (2.5, 4.0)
    assert (quant.start_epoch, quant.disable_quantization_observer_epoch, quant.end_epoch) == (3.0, 3.5, -1.0)
    assert set_lr1.start_epoch == 2.0  # -1 ("from the start") means the start of its stage
    assert (epoch2.start_epoch, epoch2.end_epoch) == (4.0, 5.0)  # stage 2 starts at ceil(4.0)
    assert recipe.num_epochs == 5.0 and list(recipe.groups) == [
        "dense_stage_dense_modifiers", "prune_stage_prune_modifiers", "prune_stage_quant_modifiers",
        "qat_stage_qat_modifiers"]
    assert load_recipe(STAGED, "lr=0.5").modifiers[4].learning_rate == 0.5  # overrides reach stages


def test_stages_and_top_level_modifiers_do_not_mix():
    with pytest.raises(RecipeError, match="all be inside stages"):
        load_recipe(STAGED + "extra_modifiers: []\n")


@pytest.mark.parametrize("path", ALL_RECIPES + [STAGED], ids=lambda p: getattr(p, "name", "staged"))
def test_to_yaml_round_trip(path):
    recipe = load_recipe(path)
    text = recipe.to_yaml({"world_size": 2, "args": {"seed": 42, "recipe_args": "eval(x)"}})
    assert "eval(" not in text.replace("eval(x)", "")
    again = load_recipe(text)
    assert again.modifiers == recipe.modifiers and again.num_epochs == recipe.num_epochs
    assert again.metadata == {"world_size": 2, "args": {"seed": 42, "recipe_args": "eval(x)"}}
    assert load_recipe(again.to_yaml()).metadata == again.metadata  # kept when saved again


@pytest.mark.parametrize("text, message", [
    ("a: !EpochRangeModifier {end_epoch: 1}\nmodifiers: []\n", r"^<string>:1: a: modifiers belong in a list"),
    ("modifiers: !EpochRangeModifier {end_epoch: 1}\n", r"^<string>:1: modifiers: must be a list"),
    ("s:\n  t:\n    x_modifiers: []\n  y_modifiers: []\n", r"^<string>:2: t: stages cannot hold stages"),
    ("recipes/typo.yml", r"cannot read the recipe"),
    ("not_a_recipe", r"^'not_a_recipe': no such recipe file"),
    ("{" + ", ".join(f"v{i}: {i}" for i in range(100)) + ", modifiers: []}", None),
])
def test_structure_errors(text, message):
    if message is None:
        assert load_recipe(text).variables["v99"] == 99  # a long one-line YAML string is no file name
    else:
        with pytest.raises(RecipeError, match=message):
            load_recipe(text)


def test_list_keys_take_one_name_and_none_stays_none():
    recipe = load_recipe("modifiers:\n  - !DistillationModifier\n    distill_output_keys: start_logits\n"
                         "    teacher_input_keys: null\n")
    assert recipe.modifiers[0].distill_output_keys == ["start_logits"]
    assert recipe.modifiers[0].teacher_input_keys is None


@pytest.mark.parametrize("path", sorted((ROOT / "distsparse" / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_our_recipes_select_what_their_headers_say(path, tiny_model):
    from distsparse.params import select_params

    text = path.read_text()
    assert text.startswith("# ") and "Variables" in text  # each says what it is for and its knobs
    recipe = load_recipe(path)
    from transformers import BertForMaskedLM, BertForQuestionAnswering

    head = {"squad_sparse_transfer.yaml": BertForQuestionAnswering, "mlm_gmp80.yaml": BertForMaskedLM}.get(path.name)
    tiny_model = head(tiny_model.config) if head else tiny_model  # the task the recipe's header names
    linears = {f"{m}.weight" for m, module in tiny_model.named_modules()
               if m.startswith("bert.encoder") and isinstance(module, torch.nn.Linear)}
    for m in recipe.modifiers:
        if type(m).__name__ == "GMPruningModifier":
            assert set(select_params(tiny_model, m.params, m.where)) == linears
        if type(m).__name__ == "QuantizationModifier":
            assert all(tiny_model.get_submodule(name) is not None for name in m.submodules or [])
