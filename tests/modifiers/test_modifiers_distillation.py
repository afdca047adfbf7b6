"""Distillation: the KD loss against a hand computation, and the modifier inside the LOSS event."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_bert

from distsparse.errors import RecipeError
from distsparse.events import Event, State, fire
from distsparse.modifiers.distillation import DistillationModifier, distillation_loss


def hand_kd(student, teacher, t):
    """KL(teacher || student) of softmax(x / t) with explicit sums, mean over rows, times t^2."""
    total = 0.0
    for s_row, t_row in zip(student.tolist(), teacher.tolist()):
        zs = sum(math.exp(v / t) for v in s_row)
        zt = sum(math.exp(v / t) for v in t_row)
        for sv, tv in zip(s_row, t_row):
            p, q = math.exp(tv / t) / zt, math.exp(sv / t) / zs
            total += p * math.log(p / q)
    return total / len(student) * t * t


def test_kd_loss_equals_hand_computation():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    for t in (1.0, 2.0, 5.5):
        assert distillation_loss(student, teacher, t).item() == pytest.approx(hand_kd(student, teacher, t), rel=1e-5)
    assert distillation_loss(student, student, 2.0).item() == pytest.approx(0.0, abs=1e-6)


def test_token_kd_averages_over_labelled_tokens_only():
    g = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(2, 4, 3, generator=g), torch.randn(2, 4, 3, generator=g)
    labels = torch.tensor([[0, 2, -100, -100], [1, -100, 0, 2]])
    keep = labels != -100
    expected = hand_kd(student[keep], teacher[keep], 2.0)
    assert distillation_loss(student, teacher, 2.0, keep).item() == pytest.approx(expected, rel=1e-5)
    assert distillation_loss(student, teacher, 2.0, torch.zeros_like(keep)).item() == 0.0


class Recording(torch.nn.Module):
    """A teacher that remembers what it was called with."""

    def __init__(self, model):
        super().__init__()
        self.model, self.calls = model, []

    def forward(self, **inputs):
        self.calls.append(sorted(inputs))
        return self.model(**inputs)


def loss_event(modifier, teacher, step=0, model=None, num_labels=2):
    model = model or tiny_bert(num_labels=num_labels)
    g = torch.Generator().manual_seed(2)
    batch = {"input_ids": torch.randint(0, 30522, (3, 6), generator=g),
             "attention_mask": torch.ones(3, 6, dtype=torch.long), "labels": torch.tensor([0, 1, 1])}
    state = State(model=model, steps_per_epoch=10, teacher=teacher, step=step, batch=batch)
    state.outputs = model(**batch)
    state.loss = state.outputs.loss
    fire([modifier], Event.LOSS, state)
    return state


def kd(**kw):
    modifier = DistillationModifier(**kw)
    modifier.validate()
    return modifier


def confident_teacher():
    """A tiny random BERT gives near-uniform logits; a sharper teacher makes the KD term count."""
    teacher = tiny_bert(seed=1)
    with torch.no_grad():
        teacher.classifier.weight.mul_(30)
    return teacher


def test_loss_mixes_task_and_kd_by_hardness_and_teacher_sees_no_labels():
    teacher = Recording(confident_teacher())
    state = loss_event(kd(hardness=0.7, temperature=3.0), teacher)
    task = state.outputs.loss.item()
    with torch.no_grad():
        teacher_logits = teacher.model(input_ids=state.batch["input_ids"],
                                       attention_mask=state.batch["attention_mask"]).logits
    distill = hand_kd(state.outputs.logits.detach(), teacher_logits, 3.0)
    assert distill > 0.1 and teacher.calls == [["attention_mask", "input_ids"]]
    assert state.loss.item() == pytest.approx(0.3 * task + 0.7 * distill, rel=1e-5)
    assert state.loss_parts["task"].item() == pytest.approx(task)
    assert state.loss_parts["distill"].item() == pytest.approx(distill, rel=1e-5)
    state.loss.backward()  # gradients reach the student only
    assert state.model.classifier.weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())


def test_hardness_zero_gives_the_task_loss():
    state = loss_event(kd(hardness=0.0), tiny_bert(seed=1))
    assert state.loss.item() == pytest.approx(state.outputs.loss.item(), rel=1e-6)


def test_no_teacher_or_outside_the_window_leaves_the_loss_alone():
    state = loss_event(kd(hardness=1.0), None)
    assert state.loss is state.outputs.loss
    state = loss_event(kd(hardness=1.0, end_epoch=1.0), tiny_bert(seed=1), step=10)
    assert state.loss is state.outputs.loss


def test_teacher_input_keys_restricts_what_the_teacher_sees():
    teacher = Recording(tiny_bert(seed=1))
    loss_event(kd(teacher_input_keys=["input_ids"]), teacher)
    assert teacher.calls == [["input_ids"]]


def test_token_classification_masks_ignored_positions():
    from transformers import BertConfig, BertForTokenClassification

    def token_model(seed):
        torch.manual_seed(seed)
        config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                            intermediate_size=64, num_labels=3, hidden_dropout_prob=0.0,
                            attention_probs_dropout_prob=0.0)
        return BertForTokenClassification(config)

    student, teacher = token_model(0), token_model(1)
    with torch.no_grad():
        teacher.classifier.weight.mul_(30)
    labels = torch.tensor([[0, 2, -100, 1], [-100, -100, 1, 0]])
    batch = {"input_ids": torch.randint(0, 100, (2, 4)), "labels": labels}
    state = State(model=student, steps_per_epoch=10, teacher=teacher, batch=batch)
    state.outputs = student(**batch)
    state.loss = state.outputs.loss
    fire([kd(hardness=1.0, temperature=2.0)], Event.LOSS, state)
    with torch.no_grad():
        t_logits = teacher(input_ids=batch["input_ids"]).logits
    expected = hand_kd(state.outputs.logits.detach()[labels != -100], t_logits[labels != -100], 2.0)
    assert expected > 0.1 and state.loss.item() == pytest.approx(expected, rel=1e-5)


def test_unknown_output_key_is_a_recipe_error():
    with pytest.raises(RecipeError, match="distill_output_keys: the model output has no 'start_logits'"):
        loss_event(kd(distill_output_keys=["start_logits"]), tiny_bert(seed=1))


@pytest.mark.parametrize("kw, key", [(dict(hardness=1.5), "hardness"), (dict(temperature=0.0), "temperature")])
def test_validate_refuses_bad_values(kw, key):
    with pytest.raises(RecipeError, match=f"DistillationModifier: {key}: "):
        kd(**kw)


@pytest.mark.parametrize("key", ["hidden_states", "attentions"])
def test_feature_keys_are_refused_in_one_line(key):
    """No oBERT recipe distills hidden states (they all name logits or start/end logits): refused when read."""
    from distsparse.recipe import load_recipe

    text = f"modifiers:\n  - !DistillationModifier\n    distill_output_keys: [logits, {key}]\n"
    with pytest.raises(RecipeError) as err:
        load_recipe(text)
    assert str(err.value) == (f"<string>:2 DistillationModifier: distill_output_keys: {key!r} is not supported: KD here "
                              "is over logits; hidden-state distillation (SparseML's PerLayerDistillationModifier) "
                              "is not, and no oBERT recipe asks for it")


def test_defaults_and_timeline():
    m = kd(distill_output_keys=None, teacher_input_keys="input_ids")
    assert m.distill_output_keys == ["logits"] and m.teacher_input_keys == ["input_ids"]
    assert m.timeline(10) == [(0, "DistillationModifier: loss = 0.5 * task + 0.5 * KD (temperature 2, on logits) "
                                  "when a teacher is given")]
    assert kd(start_epoch=1, end_epoch=2).timeline(10)[1] == (20, "DistillationModifier ends: task loss only")
