"""LR and weight-decay modifiers at the step level, against closed forms, on a real AdamW."""
from __future__ import annotations

import math

import pytest
import torch

from distsparse.errors import RecipeError
from distsparse.events import Event, State, fire
from distsparse.modifiers.training import (
    EpochRangeModifier, LearningRateFunctionModifier, SetLearningRateModifier, SetWeightDecayModifier,
)

SPE = 10


def optimizer():
    """Two groups as the training loop builds them: decay, and a marked bias/LayerNorm group."""
    net = torch.nn.Linear(4, 3)
    return torch.optim.AdamW([{"params": [net.weight], "weight_decay": 0.0},
                              {"params": [net.bias], "weight_decay": 0.0, "no_decay": True}], lr=1.0)


def lr_mod(**kw):
    args = dict(lr_func="linear", init_lr=0.1, final_lr=0.01, start_epoch=1.0, end_epoch=3.0)
    modifier = LearningRateFunctionModifier(**{**args, **kw})
    modifier.validate()
    return modifier


def step_through(modifiers, steps, opt):
    """Fire the LR-relevant events of a loop; return the LR each optimizer step ran with."""
    state = State(model=None, steps_per_epoch=SPE, optimizer=opt)
    seen = []
    for step in range(steps):
        state.step = step
        fire(modifiers, Event.BATCH_START, state)
        seen.append([g["lr"] for g in opt.param_groups])
        fire(modifiers, Event.OPTIMIZER_STEP_END, state)
    return seen


def test_linear_lr_matches_closed_form_and_owns_only_its_window():
    m = lr_mod()
    for step in range(40):
        expected = 0.1 + (step - 10) / 20 * (0.01 - 0.1) if 10 <= step < 30 else None
        assert m.lr_at(step, SPE) == (pytest.approx(expected, abs=1e-15) if expected is not None else None)
    seen = step_through([m], 40, optimizer())
    assert seen[0] == [1.0, 1.0]  # before start_epoch the optimizer's own LR stands
    assert seen[10] == [0.1, 0.1]
    assert seen[29][0] == pytest.approx(0.1 - 19 / 20 * 0.09)
    assert seen[30] == [0.01, 0.01] and seen[39] == [0.01, 0.01]  # left at final_lr after the window


@pytest.mark.parametrize("init, final", [(0.1, 0.01), (0.01, 0.1)])
def test_cosine_lr_matches_closed_form(init, final):
    m = lr_mod(lr_func="cosine", init_lr=init, final_lr=final)
    for step in range(10, 30):
        p = (step - 10) / 20
        assert m.lr_at(step, SPE) == pytest.approx(final + (init - final) * (1 + math.cos(math.pi * p)) / 2)
    assert m.lr_at(20, SPE) == pytest.approx((init + final) / 2)


def test_cyclic_linear_restarts_each_cycle_and_fits_the_last_one():
    # 20-step window, cycles of 7 steps: [10..16], [17..23], then a 6-step cycle [24..29].
    m = lr_mod(lr_func="cyclic_linear", cycle_epochs=0.7)
    lrs = {s: m.lr_at(s, SPE) for s in range(10, 30)}
    for first, length in ((10, 7), (17, 7), (24, 6)):
        for pos in range(length):
            assert lrs[first + pos] == pytest.approx(0.1 - pos / (length - 1) * 0.09)
    assert lrs[16] == pytest.approx(0.01) and lrs[17] == 0.1 and lrs[29] == pytest.approx(0.01)


@pytest.mark.parametrize("reverse", [False, True])
def test_schedules_in_sequence_each_own_their_window(reverse):
    # bert-base recipe shape: linear to 0 until QAT, then a fresh linear schedule.
    first = lr_mod(init_lr=0.05, final_lr=0.0, start_epoch=0.0, end_epoch=3.0)
    second = lr_mod(init_lr=0.05, final_lr=0.0, start_epoch=3.0, end_epoch=4.0)
    mods = [second, first] if reverse else [first, second]
    seen = [lrs[0] for lrs in step_through(mods, 40, optimizer())]
    assert seen[29] == pytest.approx(0.05 * (1 - 29 / 30))
    assert seen[30] == 0.05  # the second schedule's start, whatever the order
    assert seen[35] == pytest.approx(0.05 * (1 - 5 / 10))


def test_param_groups_limits_which_groups_change():
    opt = optimizer()
    seen = step_through([lr_mod(param_groups=[1])], 11, opt)
    assert seen[10] == [1.0, 0.1]
    with pytest.raises(RecipeError, match="param_groups"):
        step_through([lr_mod(param_groups=[2])], 11, optimizer())


def test_set_learning_rate_once_at_start():
    opt = optimizer()
    m = SetLearningRateModifier(learning_rate=0.02, start_epoch=0.5)
    m.validate()
    state = State(model=None, steps_per_epoch=SPE, optimizer=opt)
    seen = []
    for step in range(8):
        state.step = step
        fire([m], Event.BATCH_START, state)
        seen.append(opt.param_groups[0]["lr"])
        if step == 5:
            opt.param_groups[0]["lr"] = 0.5  # another modifier takes over: not set back
    assert seen == [1.0] * 5 + [0.02, 0.5, 0.5]


def test_set_weight_decay_leaves_the_no_decay_group_at_zero():
    opt = optimizer()
    m = SetWeightDecayModifier(weight_decay=0.01, start_epoch=0.0)
    m.validate()
    fire([m], Event.BATCH_START, State(model=None, steps_per_epoch=SPE, optimizer=opt))
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]
    explicit = SetWeightDecayModifier(weight_decay=0.03, param_groups=[1])
    fire([explicit], Event.BATCH_START, State(model=None, steps_per_epoch=SPE, optimizer=opt))
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.03]


def test_timelines_name_values_and_steps():
    points = lr_mod().timeline(SPE)
    assert points[0][0] == 10 and "linear lr 0.1 -> 0.01" in points[0][1] and "0.1 at step 10" in points[0][1]
    assert points[1] == (30, "LearningRateFunctionModifier ends: lr left at final_lr 0.01 unless another LR modifier starts")
    assert EpochRangeModifier(start_epoch=0, end_epoch=13).timeline(SPE)[-1][0] == 130
    assert "0.01" in SetWeightDecayModifier(weight_decay=0.01, start_epoch=2).timeline(SPE)[0][1]
    assert SetLearningRateModifier(learning_rate=0.3, start_epoch=2).timeline(SPE) == [
        (20, "SetLearningRateModifier: lr set to 0.3")]


@pytest.mark.parametrize("cls, kw, key", [
    (LearningRateFunctionModifier, dict(lr_func="step", init_lr=0.1, final_lr=0.0, end_epoch=2), "lr_func"),
    (LearningRateFunctionModifier, dict(init_lr=1.5, final_lr=0.0, end_epoch=2), "init_lr"),
    (LearningRateFunctionModifier, dict(init_lr=0.1, end_epoch=2), "final_lr"),
    (LearningRateFunctionModifier, dict(init_lr=0.1, final_lr=0.0), "end_epoch"),
    (LearningRateFunctionModifier, dict(init_lr=0.1, final_lr=0.0, start_epoch=2, end_epoch=2), "end_epoch"),
    (LearningRateFunctionModifier, dict(lr_func="cyclic_linear", init_lr=0.1, final_lr=0.0, end_epoch=2,
                                        cycle_epochs=0), "cycle_epochs"),
    (SetLearningRateModifier, dict(learning_rate=0.0), "learning_rate"),
    (SetLearningRateModifier, dict(), "learning_rate"),
    (SetWeightDecayModifier, dict(weight_decay=-0.1), "weight_decay"),
])
def test_validate_refuses_bad_values(cls, kw, key):
    with pytest.raises(RecipeError, match=f"{cls.__name__}: {key}: "):
        cls(**kw).validate()
