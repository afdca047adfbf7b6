"""Every real SparseML BERT recipe we ship (tests/fixtures/sparseml_recipes, plus ../shared's when
present) passes ``distsparse recipe check`` with a timeline, and sets up on a BERT of the recipes'
shape: 12 layers, dropped layers gone, pruned weights named as the recipe names them."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import ROOT, SHARED
from distsparse.cli import main
from distsparse.events import Event, State, fire
from distsparse.recipe import load_recipe

FIXTURES = ROOT / "tests" / "fixtures" / "sparseml_recipes"
RECIPES = sorted(p for p in FIXTURES.iterdir() if p.suffix in (".yaml", ".md") and p.name not in ("NOTICE.md", "README.md"))
SHARED_RECIPES = sorted((SHARED / "recipes-sparseml").glob("*.yaml")) if SHARED.is_dir() else []


def test_fixtures_are_there():
    assert len(RECIPES) >= 10


@pytest.mark.parametrize("path", RECIPES + SHARED_RECIPES, ids=lambda p: p.name)
def test_recipe_check_prints_a_timeline(path: Path, capsys):
    assert main(["recipe", "check", str(path), "--steps_per_epoch", "100"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{path}: valid, ")
    assert "\n   epoch     step  what\n" in out and "\ntotal: " in out


def bert_base_shaped():
    """BERT-base's structure (12 layers, a QA head) at a width whose weights the recipes' Fisher
    blocks (50, 32) divide: 40 x 40 and 40 x 80 weights."""
    from transformers import BertConfig, BertForQuestionAnswering

    torch.manual_seed(0)
    return BertForQuestionAnswering(BertConfig(vocab_size=100, hidden_size=40, num_hidden_layers=12,
                                               num_attention_heads=2, intermediate_size=80))


@pytest.mark.parametrize("name, layers, pruned", [
    ("integrations__huggingface-transformers__recipes__uni_80sparse_freq0.01_18prune10fine_6layers.md", 6, 36),
    ("integrations__huggingface-transformers__recipes__bert-base-6layers_prune_quant90.md", 6, 36),
    ("integrations__huggingface-transformers__recipes__bert-base-3layers_prune80.md", 3, 18),
    ("research__optimal_BERT_surgeon_oBERT__recipes__30epochs_4block80_squad.yaml", 12, 72),
])
def test_recipe_sets_up_on_bert_base_shape(name, layers, pruned):
    model = bert_base_shaped()
    recipe = load_recipe(FIXTURES / name)
    fire([m for m in recipe.modifiers if hasattr(m, "names") or hasattr(m, "layers")], Event.INIT,
         State(model=model, steps_per_epoch=10))
    assert len(model.bert.encoder.layer) == model.config.num_hidden_layers == layers
    masked = [n for m in recipe.modifiers for n in getattr(m, "names", [])]
    assert len(masked) == pruned and len(set(masked)) == pruned
    assert {int(n.split(".")[3]) for n in masked} == set(range(layers))  # renumbered: every kept layer, pruned


# -- the rest of SparseML's modifier set, and the GMP keys its recipes use ------------------------------------
@pytest.mark.parametrize("name", ["MFACPruningModifier", "MovementPruningModifier", "LearningRateModifier",
                                  "TrainableParamsModifier", "PerLayerDistillationModifier"])
def test_other_sparseml_modifiers_are_refused_with_a_reason(name):
    from distsparse.errors import RecipeError

    with pytest.raises(RecipeError, match=rf"^<string>:2: !{name} is not supported: \S.+$"):
        load_recipe(f"modifiers:\n  - !{name}\n    start_epoch: 0\n")


GMP = """
modifiers:
  - !GMPruningModifier
    params: {params}
    init_sparsity: {init}
    final_sparsity: {final}
    start_epoch: 0
    end_epoch: 2
    update_frequency: 1
    inter_func: linear
    {extra}
"""


def two_linears(zero_fraction: float = 0.0):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 10, bias=False), torch.nn.Linear(10, 10, bias=False))
    with torch.no_grad():
        model[0].weight.view(-1)[: int(100 * zero_fraction)] = 0.0
    return model


def run_schedule(recipe, model, steps_per_epoch: int = 2) -> list[list[float]]:
    """Sparsity of each masked tensor after each step's mask update."""
    state = State(model=model, steps_per_epoch=steps_per_epoch)
    fire(recipe.modifiers, Event.INIT, state)
    seen = []
    for step in range(2 * steps_per_epoch + 1):
        state.step = step
        fire(recipe.modifiers, Event.BATCH_START, state)
        seen.append([round(float((p == 0).float().mean()), 2) for p in model.parameters()])
    return seen


def test_ignored_key_warns_naming_it():
    with pytest.warns(UserWarning, match=r"GMPruningModifier: log_types \['sparsity'\] is ignored: every sparsity is logged"):
        load_recipe(GMP.format(params="[0.weight]", init=0.1, final=0.5, extra="log_types: [sparsity]"))


def test_dict_final_sparsity_is_one_modifier_per_target():
    recipe = load_recipe(GMP.format(params="[]", init=0.0, final="{0.5: [0.weight], 0.8: [1.weight]}", extra=""))
    assert [(m.params, m.final_sparsity) for m in recipe.modifiers] == [(["0.weight"], 0.5), (["1.weight"], 0.8)]
    assert run_schedule(recipe, two_linears())[-1] == [0.5, 0.8]


def test_init_sparsity_from_param_starts_from_the_zeros_there():
    recipe = load_recipe(GMP.format(params="[0.weight, 1.weight]", init="__FROM_PARAM__", final=0.8, extra=""))
    model = two_linears(zero_fraction=0.4)
    seen = run_schedule(recipe, model)
    # Linear from each tensor's own start (0.4 and 0.0) to 0.8, updated at steps 0, 2 and 4.
    assert seen == [[0.4, 0.0], [0.4, 0.0], [0.6, 0.4], [0.6, 0.4], [0.8, 0.8]]
    assert {k: float(v) for k, v in recipe.modifiers[0].state_dict()["from_param"].items()} == \
        {"0.weight": pytest.approx(0.4), "1.weight": 0.0}


def test_gmp_global_sparsity_key():
    recipe = load_recipe(GMP.format(params="[0.weight, 1.weight]", init=0.0, final=0.5, extra="global_sparsity: true"))
    model = two_linears()
    with torch.no_grad():
        model[1].weight.mul_(10)  # one threshold across both: the small tensor takes the pruning
    small, large = run_schedule(recipe, model)[-1]
    assert small + large == 1.0 and small > 0.8  # half of all weights, taken mostly from the small tensor
