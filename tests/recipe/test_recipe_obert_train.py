"""Every oBERT recipe of neuralmagic/sparseml (tests/fixtures/sparseml_recipes) starts training on the task it
targets (SQuAD -> question-answering, MNLI/QQP -> text-classification, MLM -> masked-lm, each on its fixture)
and its modifiers act: the LR schedule sets the recipe's init_lr, OBS prunes to its init_sparsity at its first
pruning step (block4: whole blocks of 4), ConstantPruning keeps the model's zeros, and distillation with the
recipes' hardness 1.0 makes the loss the KD loss alone.

``--max_steps`` stops each run one step after the first pruning step (epoch 2 of the 30-epoch recipes, step 0
of the MLM ones): the schedule keeps the recipe's epochs, only the run is short. One value is changed: OBS's
``num_grads`` 1024 becomes 16 (a Fisher from 1024 mini-batches takes minutes on a CPU; the code path is the
same). The student is a tiny BERT of width 40 (weights of 40 x 40 and 40 x 80, which the recipes' Fisher
blocks of 50 and 32 divide) whose task head the job builds; the teacher is another tiny BERT (encoder only,
so each task gives it a head) and KD is never zero.
"""
from __future__ import annotations

import json
import math
import re

import pytest
import torch
from conftest import FIXTURES, minilm_dir
from safetensors.torch import load_file

from distsparse import report
from distsparse.modifiers.obs import OBSPruningModifier
from distsparse.modifiers.pruning import ConstantPruningModifier
from distsparse.modifiers.training import LearningRateFunctionModifier
from distsparse.recipe import load_recipe
from distsparse.train import main as train

RECIPES = FIXTURES / "sparseml_recipes"
OBERT = sorted(RECIPES.glob("research__optimal_BERT_surgeon_oBERT__recipes__*.yaml")) + \
    [RECIPES / "neuralmagic+sparseml__oBERT__8epochs_sparse_transfer_qqp.yaml"]
TASKS = {  # recipe name suffix -> the task's flags on its fixture
    "squad": ["--task", "question-answering", "--train_file", str(FIXTURES / "squad_tiny.json"),
              "--version_2_with_negative", "--max_seq_length", "48", "--doc_stride", "16"],
    "mnli": ["--task", "text-classification", "--train_file", str(FIXTURES / "entailment" / "train.tsv"),
             "--max_train_samples", "16", "--max_seq_length", "32"],
    "qqp": ["--task", "text-classification", "--train_file", str(FIXTURES / "paraphrase" / "train.tsv"),
            "--input_column_names", "#1 String,#2 String", "--label_column_name", "Quality",
            "--max_train_samples", "16", "--max_seq_length", "32"],
    "mlm": ["--task", "masked-lm", "--train_file", str(FIXTURES / "text_tiny.txt"), "--max_seq_length", "32"],
}
BATCH = 16
PRUNED = re.compile(r"bert\.encoder\.layer\.\d+\.(attention\.self\.(query|key|value)|attention\.output\.dense|"
                    r"intermediate\.dense|output\.dense)\.weight")


def test_every_obert_recipe_is_here():
    """The 17 files of research/optimal_BERT_surgeon_oBERT/recipes (8epochs_sparse_transfer_qqp under its
    older fixture name, see NOTICE.md)."""
    assert len(OBERT) == 17 and all(p.is_file() for p in OBERT)
    assert {p.stem.rsplit("_", 1)[1] for p in OBERT} == set(TASKS)


def tiny_width40(path, seed: int, sparsity: float, head: bool = True):
    """A 2-layer BERT, hidden 40, saved with the MiniLM tokenizer; ``sparsity`` of each encoder weight zeroed.
    Without ``head`` only the encoder is saved: as a teacher, any task's job gives it a head of its own."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    model = BertForSequenceClassification(BertConfig(
        vocab_size=30522, hidden_size=40, num_hidden_layers=2, num_attention_heads=2, intermediate_size=80,
        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if PRUNED.fullmatch(name):
                p.view(-1)[p.abs().flatten().argsort()[:int(p.numel() * sparsity)]] = 0.0
    (model if head else model.bert).save_pretrained(path)
    AutoTokenizer.from_pretrained(minilm_dir()).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("obert")
    return {"dense": tiny_width40(root / "dense", 0, 0.0), "sparse": tiny_width40(root / "sparse", 0, 0.5),
            "teacher": tiny_width40(root / "teacher", 1, 0.0, head=False)}


def encoder_weights(folder) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(str(folder / "model.safetensors")).items() if PRUNED.fullmatch(k)}


@pytest.fixture(scope="module")
def steps_per_epoch(models):
    """ceil(training rows / batch) of each task's fixture, as the job computes it (tokenized once per task)."""
    from transformers import AutoTokenizer

    from distsparse.args import parse_args
    from distsparse.tasks import build_task

    tokenizer = AutoTokenizer.from_pretrained(models["dense"])
    return {name: math.ceil(len(build_task(parse_args(flags), tokenizer).train) / BATCH) for name, flags in TASKS.items()}


@pytest.mark.parametrize("path", OBERT, ids=lambda p: p.stem.split("__")[-1])
def test_obert_recipe_trains_on_its_task(path, models, steps_per_epoch, tmp_path, monkeypatch):
    monkeypatch.setattr(report, "write_report", lambda *a, **k: None)  # the model card's pictures: seconds each, not tested here
    recipe = load_recipe(path)
    obs = [m for m in recipe.modifiers if isinstance(m, OBSPruningModifier)]
    transfer = any(isinstance(m, ConstantPruningModifier) for m in recipe.modifiers)
    start = models["sparse" if transfer else "dense"]
    task = path.stem.rsplit("_", 1)[1]
    spe = steps_per_epoch[task]
    # One step past the first pruning step, which acts at the start of epoch start_epoch's first step.
    max_steps = round(min((m.start_epoch for m in obs), default=0.0) * spe) + 1
    text = path.read_text()
    assert text.count("num_grads: 1024") == len(obs)
    (tmp_path / path.name).write_text(text.replace("num_grads: 1024", "num_grads: 16"))
    out = tmp_path / "out"
    assert train(["--model_name_or_path", str(start), "--teacher", str(models["teacher"]),
                  "--recipe", str(tmp_path / path.name),
                  *TASKS[task], "--per_device_train_batch_size", str(BATCH), "--do_train", "--save_strategy", "no",
                  "--logging_steps", "1", "--seed", "0", "--max_steps", str(max_steps), "--output_dir", str(out)]) == 0

    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == max_steps and state["steps_per_epoch"] == spe
    rows = [r for r in state["log_history"] if "train/loss" in r]
    assert len(rows) == max_steps
    lr = next(m for m in recipe.modifiers if isinstance(m, LearningRateFunctionModifier) and m.start_epoch == 0)
    assert rows[0]["train/lr"] == pytest.approx(lr.init_lr)  # the recipe's schedule, not --learning_rate
    for row in rows:  # DistillationModifier hardness 1.0: the loss is the KD loss alone, and a teacher was given
        assert row["train/distill_loss"] > 0 and row["train/loss"] == pytest.approx(row["train/distill_loss"], rel=1e-5)

    before, after = encoder_weights(start), encoder_weights(out)
    assert after.keys() == before.keys() and len(after) == 12
    zeros = sum(int((w == 0).sum()) for w in after.values()) / sum(w.numel() for w in after.values())
    if obs:  # global OBS: the targeted weights together reach init_sparsity at the first pruning step
        assert zeros == pytest.approx(obs[0].init_sparsity, abs=0.005)
        if obs[0].mask_type == "block4":  # zeros in whole blocks of 4 consecutive inputs
            for w in after.values():
                blocks = (w.reshape(-1, 4) == 0).sum(1)
                assert set(blocks.tolist()) <= {0, 4}
    elif transfer:  # ConstantPruningModifier: the start model's zeros stay, the other weights train
        assert all(after[k][before[k] == 0].abs().max() == 0 for k in before)
        assert zeros == pytest.approx(0.5, abs=0.01)
        assert any(not torch.equal(after[k], before[k]) for k in before)
    else:  # the dense recipe: nothing pruned, the weights train
        assert zeros == 0 and any(not torch.equal(after[k], before[k]) for k in before)

