"""Pruning modifiers at the step level: schedules, mask structure, zeros kept through AdamW, resume."""
from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_bert
from hypothesis import given, settings
from hypothesis import strategies as st

from distsparse.errors import RecipeError
from distsparse.events import Event, State, fire
from distsparse.modifiers import pruning
from distsparse.modifiers.pruning import (
    ConstantPruningModifier, GlobalMagnitudePruningModifier, GMPruningModifier, MagnitudePruningModifier,
    apply_masks, interpolate, magnitude_masks,
)

SPE = 10
ENCODER = "re:bert.encoder.layer.*.(attention.self.(query|key|value)|intermediate.dense|output.dense).weight"  # 6 a layer


def mlp(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))


def gmp(cls=GMPruningModifier, **kw):
    args = dict(params=["0.weight", "2.weight"], init_sparsity=0.0, final_sparsity=0.8, start_epoch=0.5,
                end_epoch=3.0, update_frequency=0.2, inter_func="cubic")
    modifier = cls(**{**args, **kw})
    modifier.validate()
    return modifier


def bert_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, 30522, (4, 8), generator=g), "labels": torch.randint(0, 2, (4,), generator=g)}


def train(model, modifiers, steps, after_step=None, state=None, opt=None, seed=0):
    """The loop's event order around a real AdamW with weight decay 0.1 and a nonzero loss."""
    if state is None:
        state = State(model=model, steps_per_epoch=SPE)
        fire(modifiers, Event.INIT, state)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        state.optimizer = opt
        fire(modifiers, Event.FIT_START, state)
    g = torch.Generator().manual_seed(seed + state.step)
    for _ in range(steps):
        fire(modifiers, Event.BATCH_START, state)
        if isinstance(model, torch.nn.Sequential):
            x = torch.randn(8, 16, generator=g)
            state.loss = ((model(x) - 1.0) ** 2).mean()
        else:
            state.loss = model(**bert_batch(state.step)).loss
        fire(modifiers, Event.LOSS, state)
        state.loss.backward()
        fire(modifiers, Event.AFTER_BACKWARD, state)
        opt.step()
        opt.zero_grad()
        fire(modifiers, Event.OPTIMIZER_STEP_END, state)
        if after_step:
            after_step(state)
        state.step += 1
    return state, opt


def zeros(model, name):
    return dict(model.named_parameters())[name].detach() == 0


# -- schedules -----------------------------------------------------------------------------------

def test_interpolate_is_sparsemls_formulas():
    assert interpolate(0.5, 0.1, 0.9, "linear") == pytest.approx(0.5)
    assert interpolate(0.5, 0.1, 0.9, "cubic") == pytest.approx(0.1 + (1 - 0.5 ** 3) * 0.8)
    assert interpolate(0.5, 0.1, 0.9, "inverse_cubic") == pytest.approx(0.1 + (1 - 0.5 ** (1 / 3)) * 0.8)


@settings(max_examples=150, deadline=None)
@given(spe=st.integers(1, 50), start=st.floats(0, 3), length=st.floats(0, 5), freq=st.floats(0.01, 2) | st.just(-1.0),
       init=st.floats(0, 0.99), extra=st.floats(0, 1), inter_func=st.sampled_from(["linear", "cubic", "inverse_cubic"]))
def test_sparsity_schedule_properties(spe, start, length, freq, init, extra, inter_func):
    final = init + (0.99 - init) * extra
    m = gmp(init_sparsity=init, final_sparsity=final, start_epoch=start, end_epoch=start + length,
            update_frequency=freq, inter_func=inter_func)
    first, last = m.start_step(spe), m.end_step(spe)
    values = [m.sparsity_at(s, spe) for s in range(last + 3)]
    assert all(v == 0.0 for v in values[:first])
    assert values[first] == (final if first == last else init) and values[last] == final
    assert all(init <= v <= final for v in values[first:])
    assert all(a <= b for a, b in zip(values, values[1:]))
    updates = set(m.update_steps(spe))
    assert all(values[s] == values[s - 1] for s in range(first + 1, last + 1) if s not in updates)


# -- gradual magnitude pruning -------------------------------------------------------------------

def test_gmp_hits_the_schedule_at_every_update_and_never_revives():
    model, m = mlp(), gmp()
    assert m.update_steps(SPE) == [5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 30]
    names = ["0.weight", "2.weight"]
    previous = {n: zeros(model, n) for n in names}
    seen = []

    def check(state):
        target = m.sparsity_at(state.step, SPE)
        for n in names:
            now = zeros(model, n)
            assert abs(int(now.sum()) - target * now.numel()) <= 1, (state.step, n)
            assert torch.equal(now & previous[n], previous[n]), "a pruned weight came back"
            previous[n] = now
        seen.append(target)

    train(model, [m], 40, check)
    assert seen[4] == 0.0 and seen[5] == 0.0 and seen[7] > 0 and seen[-1] == 0.8
    assert all(a <= b for a, b in zip(seen, seen[1:]))
    assert all(int(zeros(model, n).sum()) == round(0.8 * zeros(model, n).numel()) for n in names)


def test_gmp_prunes_the_smallest_weights():
    w = torch.randn(8, 16)
    (keep,) = magnitude_masks([w], [torch.ones_like(w, dtype=torch.bool)], 0.25, ("unstructured",))
    assert int((~keep).sum()) == 32
    assert w.abs()[~keep].max() <= w.abs()[keep].min()
    for pattern in (("unstructured",), ("block", 4), ("nm", 2, 4)):
        (first,) = magnitude_masks([w], [torch.ones_like(w, dtype=torch.bool)], 0.25, pattern)
        (second,) = magnitude_masks([w.masked_fill(~first, 100.0)], [first], 0.5, pattern)  # revived weights
        assert not (second & ~first).any() and int((~second).sum()) == 64, pattern  # pruned stays pruned


def test_block4_prunes_whole_blocks_of_four_input_weights_by_mean_magnitude():
    w = torch.randn(8, 16)
    (keep,) = magnitude_masks([w], [torch.ones_like(w, dtype=torch.bool)], 0.5, ("block", 4))
    blocks, means = keep.reshape(-1, 4), w.abs().reshape(-1, 4).mean(1)
    assert ((blocks.all(1)) | (~blocks).all(1)).all()
    assert int((~blocks.all(1)).sum()) == 16
    assert means[~blocks.all(1)].max() <= means[blocks.all(1)].min()

    model, m = mlp(), gmp(mask_type=[1, 4], final_sparsity=0.75)
    train(model, [m], 35)
    for name in ("0.weight", "2.weight"):
        z = zeros(model, name).reshape(-1, 4)
        assert (z.all(1) | (~z).all(1)).all() and z.all(1).float().mean() == 0.75


def test_two_four_pattern_grows_to_exactly_two_of_every_four():
    model, m = mlp(), gmp(mask_type="2:4", final_sparsity=0.5, inter_func="linear")
    per_group = []
    train(model, [m], 35, lambda s: per_group.append(zeros(model, "0.weight").reshape(-1, 4).sum(1)))
    assert all(int(counts.max()) <= 2 for counts in per_group)  # never more than the pattern allows
    assert 0 < int(per_group[12].sum()) < 2 * per_group[12].numel()  # gradual in between
    for name in ("0.weight", "2.weight"):
        assert (zeros(model, name).reshape(-1, 4).sum(1) == 2).all()


def test_global_magnitude_uses_one_threshold_across_layers():
    model = mlp()
    with torch.no_grad():
        model[0].weight.mul_(10)  # a large-weight layer should end less sparse
    keeps = magnitude_masks([model[0].weight, model[2].weight],
                            [torch.ones_like(model[0].weight, dtype=torch.bool),
                             torch.ones_like(model[2].weight, dtype=torch.bool)], 0.6, ("unstructured",), True)
    kept = torch.cat([w.abs()[k] for w, k in zip((model[0].weight, model[2].weight), keeps)])
    pruned = torch.cat([w.abs()[~k] for w, k in zip((model[0].weight, model[2].weight), keeps)])
    assert pruned.max() <= kept.min()

    m = gmp(GlobalMagnitudePruningModifier, final_sparsity=0.6)
    state, _ = train(model, [m], 32)
    first, second = zeros(model, "0.weight"), zeros(model, "2.weight")
    assert first.float().mean() < 0.6 - 0.1 and second.float().mean() > 0.6 + 0.1
    total = first.numel() + second.numel()
    assert int(first.sum() + second.sum()) == round(0.6 * total)
    assert state.logs["sparsity/global"] == pytest.approx(int(first.sum() + second.sum()) / total)


def assert_masks_hold(model, m, before, sparsity):
    params = dict(model.named_parameters())
    for name, keep in m.masks.items():
        weight = params[name].detach()
        assert torch.equal(weight == 0, ~keep), name
        assert (~keep).float().mean() == pytest.approx(sparsity, abs=1 / keep.numel())
        assert not torch.equal(weight[keep], before[name][keep])  # the kept weights did train


def test_masks_hold_exact_zeros_through_100_adamw_steps_with_weight_decay():
    model, m = mlp(), gmp(start_epoch=0.0, end_epoch=2.0, update_frequency=0.5, final_sparsity=0.7)
    before = copy.deepcopy(model.state_dict())
    train(model, [m], 100)
    assert_masks_hold(model, m, before, 0.7)


def test_masked_gradients_alone_give_adamw_the_weights_masking_them_gave(monkeypatch):
    """With zeroed moments, skipping the weight masking after each step changes no weight, ever."""
    weight_maskings = []
    masking = pruning.apply_masks
    monkeypatch.setattr(pruning, "apply_masks", lambda model, masks, grads=False, cache=None:
                        weight_maskings.append(not grads) or masking(model, masks, grads, cache))
    runs = {}
    for kind in ("grads only", "grads and weights"):
        if kind == "grads and weights":
            monkeypatch.setattr(pruning, "plain_adam", lambda state: False)
        weight_maskings.clear()
        model, m = mlp(), gmp(start_epoch=0.0, end_epoch=2.0, update_frequency=0.3, final_sparsity=0.7)
        history = []
        state, opt = train(model, [m], 30, lambda s: history.append([p.detach().clone() for p in model.parameters()]))
        runs[kind] = history, sum(weight_maskings), m.grads_keep_zeros, opt.state[model[0].weight], m.masks
    assert runs["grads only"][2] and not runs["grads and weights"][2]
    updates = len(gmp(start_epoch=0.0, end_epoch=2.0, update_frequency=0.3, final_sparsity=0.7).update_steps(SPE))
    assert runs["grads only"][1] == updates + 1  # each mask change (and FIT_START), never after a step
    assert runs["grads and weights"][1] == updates + 30
    for step, (a, b) in enumerate(zip(runs["grads only"][0], runs["grads and weights"][0])):
        assert all(torch.equal(x, y) for x, y in zip(a, b)), step
    moments, masks = runs["grads only"][3], runs["grads only"][4]
    assert (moments["exp_avg"][~masks["0.weight"]] == 0).all() and (moments["exp_avg_sq"][~masks["0.weight"]] == 0).all()


def test_a_resumed_optimizer_state_with_moments_at_pruned_weights_is_zeroed_there(monkeypatch):
    """A checkpoint from before the rule holds decaying moments where weights are pruned: resumed,
    they are zeroed, so the zeros hold; left alone, AdamW would move those weights."""
    monkeypatch.setattr(pruning, "plain_adam", lambda state: False)  # the old rule: masks on weights
    model, m = mlp(), gmp()
    state, opt = train(model, [m], 12)
    pruned = ~m.masks["0.weight"]
    assert (opt.state[model[0].weight]["exp_avg"][pruned] != 0).any()
    saved = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()), copy.deepcopy(m.state_dict())
    train(model, [m], 15, state=state, opt=opt)  # the old rule to the end
    monkeypatch.undo()

    def resumed(zero_moments: bool):
        model2, m2 = mlp(seed=5), gmp()
        state2 = State(model=model2, steps_per_epoch=SPE)
        fire([m2], Event.INIT, state2)
        model2.load_state_dict(saved[0])
        opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2, weight_decay=0.1)
        opt2.load_state_dict(copy.deepcopy(saved[1]))  # it keeps the very tensors it is given
        m2.load_state_dict(saved[2])
        state2.optimizer, state2.step = opt2, 12
        if not zero_moments:
            monkeypatch.setattr(pruning, "zero_pruned_moments_", lambda *args: None)
        fire([m2], Event.FIT_START, state2)
        assert m2.grads_keep_zeros
        train(model2, [m2], 15, state=state2, opt=opt2)
        return model2

    model2 = resumed(zero_moments=True)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))
    assert not (resumed(zero_moments=False)[0].weight[pruned] == 0).all()


def test_other_optimizers_keep_masking_the_weights():
    model, m = mlp(), gmp(start_epoch=0.0, end_epoch=2.0, update_frequency=0.5, final_sparsity=0.7)
    state = State(model=model, steps_per_epoch=SPE)
    fire([m], Event.INIT, state)
    state.optimizer = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9, weight_decay=0.1)
    fire([m], Event.FIT_START, state)
    assert not m.grads_keep_zeros and m.match(Event.OPTIMIZER_STEP_END, state)
    before = copy.deepcopy(model.state_dict())
    train(model, [m], 25, state=state, opt=state.optimizer)
    assert_masks_hold(model, m, before, 0.7)


def test_magnitude_pruning_of_a_tiny_bert_encoder():
    model = tiny_bert()
    m = gmp(MagnitudePruningModifier, params=[ENCODER], start_epoch=0.0, end_epoch=2.0, update_frequency=0.5,
            final_sparsity=0.7)
    before = copy.deepcopy(model.state_dict())
    train(model, [m], 25)
    assert len(m.masks) == 12
    assert_masks_hold(model, m, before, 0.7)


def test_constant_pruning_keeps_a_sparse_models_zeros():
    model = tiny_bert(sparsity=0.5)
    m = ConstantPruningModifier(params="__ALL_PRUNABLE__", start_epoch=0.0)
    m.validate()
    zero_before = {n: p.detach() == 0 for n, p in model.named_parameters()}
    state, _ = train(model, [m], 30)
    assert "bert.embeddings.word_embeddings.weight" in m.names and "classifier.weight" in m.names
    params = dict(model.named_parameters())
    for n in m.names:
        assert torch.equal(params[n].detach() == 0, zero_before[n]), n
    zero_count = sum(int(zero_before[n].sum()) for n in m.names)
    assert zero_count > 0 and state.logs["sparsity/global"] == zero_count / sum(params[n].numel() for n in m.names)

    control = tiny_bert(sparsity=0.5)  # without the modifier AdamW's decay and momentum move the zeros
    train(control, [], 3)
    assert (control.bert.encoder.layer[0].intermediate.dense.weight == 0).float().mean() < 0.01


def test_constant_pruning_starts_late_and_ends():
    model = mlp()
    with torch.no_grad():
        model[0].weight[:, :8] = 0
    m = ConstantPruningModifier(params=["0.weight"], start_epoch=0.5, end_epoch=1.5)
    m.validate()
    fire([m], Event.INIT, State(model=model, steps_per_epoch=SPE))
    assert m.masks == {}  # built at its start, not before
    masked_at = []

    def record(state):
        masked_at.append(bool((model[0].weight[:, :8] == 0).all()))
        if state.step == 4:  # what the model looks like when the modifier starts
            with torch.no_grad():
                model[0].weight[:, :8] = 0

    train(model, [m], 20, record)
    assert masked_at == [False] * 5 + [True] * 10 + [False] * 5


def test_apply_masks_zeroes_weights_or_only_gradients():
    model, keep = mlp(), torch.rand(32, 16, generator=torch.Generator().manual_seed(0)) > 0.5
    model(torch.randn(4, 16)).pow(2).sum().backward()
    weight, grad = model[0].weight.detach().clone(), model[0].weight.grad.clone()
    apply_masks(model, {"0.weight": keep}, grads=True)
    assert torch.equal(model[0].weight.grad, grad * keep) and torch.equal(model[0].weight.detach(), weight)
    apply_masks(model, {"0.weight": keep})
    assert torch.equal(model[0].weight.detach(), weight * keep)


def test_global_sparsity_log_covers_every_pruning_modifier():
    model = mlp()
    mods = [gmp(params=["0.weight"], final_sparsity=0.5), gmp(params=["2.weight"], final_sparsity=0.9, end_epoch=2.0)]
    state, _ = train(model, mods, 31)
    assert state.logs["sparsity/global"] == pytest.approx((0.5 * 512 + 0.9 * 256) / 768, abs=1 / 768)


def test_leave_enabled_false_stops_masking_after_end_epoch():
    model, m = mlp(), gmp(leave_enabled=False, end_epoch=1.0)
    seen = []
    train(model, [m], 20, lambda s: seen.append(float(zeros(model, "0.weight").float().mean())))
    assert seen[9] == pytest.approx(m.sparsity_at(9, SPE), abs=1e-3) and seen[-1] < 0.1


def test_masks_broadcast_once_per_update_for_all_params(monkeypatch):
    calls = []
    monkeypatch.setattr(pruning, "broadcast_", lambda tensors, src: calls.append((len(tensors), src)))
    m = gmp()
    train(mlp(), [m], 40)
    assert calls == [(2, 0)] * len(m.update_steps(SPE))


def test_state_dict_round_trip_and_exact_resume():
    model, m = mlp(), gmp()
    state, opt = train(model, [m], 12)
    saved = (copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict()), copy.deepcopy(m.state_dict()))
    train(model, [m], 15, state=state, opt=opt)

    model2, m2 = mlp(seed=5), gmp()
    state2 = State(model=model2, steps_per_epoch=SPE)
    fire([m2], Event.INIT, state2)
    model2.load_state_dict(saved[0])
    opt2 = torch.optim.AdamW(model2.parameters(), lr=1e-2, weight_decay=0.1)
    opt2.load_state_dict(saved[1])
    m2.load_state_dict(saved[2])
    assert all(torch.equal(m2.masks[n], saved[2]["masks"][n]) for n in m.names)
    state2.optimizer, state2.step = opt2, 12
    fire([m2], Event.FIT_START, state2)
    train(model2, [m2], 15, state=state2, opt=opt2)
    assert all(torch.equal(m.masks[n], m2.masks[n]) for n in m.names)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))


# -- recipe checks -------------------------------------------------------------------------------

def test_timeline_says_what_and_when():
    points = gmp(mask_type="2:4", final_sparsity=0.5).timeline(SPE)
    assert [p[0] for p in points] == [5, 19, 30]
    assert "cubic sparsity 0 -> 0.5" in points[0][1] and "14 mask updates every 2 steps" in points[0][1]
    assert "keep 2 of every 4" in points[0][1] and points[2][1].startswith("GMPruningModifier ends: sparsity 0.5")
    assert "one global threshold" in gmp(GlobalMagnitudePruningModifier).timeline(SPE)[0][1]
    constant = ConstantPruningModifier(params="__ALL_PRUNABLE__", end_epoch=2).timeline(SPE)
    assert constant[0][0] == 0 and "weights != 0" in constant[0][1] and constant[1][0] == 20


@pytest.mark.parametrize("kw, key", [
    (dict(final_sparsity=1.0), "final_sparsity"),
    (dict(init_sparsity=-0.1), "init_sparsity"),
    (dict(init_sparsity=0.9, final_sparsity=0.5), "init_sparsity"),
    (dict(init_sparsity="half"), "init_sparsity"),
    (dict(final_sparsity={0.9: ["0.weight"]}), "final_sparsity"),
    (dict(final_sparsity=None), "final_sparsity"),
    (dict(inter_func="quadratic"), "inter_func"),
    (dict(mask_type="channel"), "mask_type"),
    (dict(mask_type="4:2"), "mask_type"),
    (dict(mask_type=[2, 4]), "mask_type"),
    (dict(mask_type="2:4", final_sparsity=0.9), "final_sparsity"),
    (dict(update_frequency=0), "update_frequency"),
    (dict(update_frequency=None), "update_frequency"),
    (dict(end_epoch=-1), "end_epoch"),
    (dict(params=None), "params"),
])
def test_validate_refuses_bad_values(kw, key):
    with pytest.raises(RecipeError, match=f"GMPruningModifier: {key}: "):
        gmp(**kw)


def test_structured_masks_refuse_weights_they_cannot_tile():
    model = torch.nn.Sequential(torch.nn.Linear(6, 4))
    with pytest.raises(RecipeError, match=r"mask_type: block4 .* 0.weight has shape \(4, 6\)"):
        fire([gmp(params=["0.weight"], mask_type="block4")], Event.INIT, State(model=model, steps_per_epoch=SPE))
    with pytest.raises(RecipeError, match="matches no parameter"):
        fire([gmp(params=["re:nothing.*"])], Event.INIT, State(model=model, steps_per_epoch=SPE))


def test_prune_lowest_breaks_ties_by_index_like_a_stable_sort():
    from distsparse.modifiers.pruning import _prune_lowest

    scores = torch.tensor([3.0, 1.0, 1.0, 0.5, 1.0, float("inf"), 2.0, 1.0])
    assert _prune_lowest(scores, 0.375).tolist() == [True, False, False, False, True, True, True, True]
    assert _prune_lowest(scores, 1.0).tolist() == [False] * 5 + [True] + [False] * 2  # inf is never pruned
    assert _prune_lowest(scores, 0.0).all()
    big = torch.randint(0, 50, (10_000,)).double()  # many ties
    assert torch.equal(~_prune_lowest(big, 0.3), torch.zeros(10_000, dtype=torch.bool).index_fill(
        0, big.argsort(stable=True)[:3000], True))
