"""Int8 fake quantization and the QuantizationModifier, checked against hand-written formulas."""
from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from conftest import FIXTURES, tiny_bert
from distsparse import distributed, fake_quant
from distsparse.errors import RecipeError, UserError
from distsparse.events import Event, State, fire
from distsparse.fake_quant import (ActivationFakeQuant, QuantEmbedding, QuantLinear, WeightFakeQuant, fake_quantize,
                                   fake_quants, load_quant_state, qparams, quant_state, to_quant_, update_observers_)
from distsparse.modifiers.quantization import QuantizationModifier
from distsparse.recipe import load_recipe

SST2 = FIXTURES / "sparseml_recipes/neuralmagic+sparseml__tutorial-sentiment-analysis-cli__sst2_pruned90_quant.yaml"


def sst2_block(**overrides) -> QuantizationModifier:
    """The sst2 recipe's QuantizationModifier, epochs scaled down (there: start 8, freeze 12)."""
    recipe = load_recipe(SST2, "qat_start_epoch=1,observer_epoch=2")
    (modifier,) = [m for m in recipe.modifiers if isinstance(m, QuantizationModifier)]
    for key, value in overrides.items():
        setattr(modifier, key, value)
    modifier.validate()
    return modifier


def fake_quant_ref(x, scale, zero_point, qmin, qmax):
    """The textbook formula: dequantize(clamp(round(x / s) + z)), scale broadcast as given."""
    return (torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax) - zero_point) * scale


def observed(fq: ActivationFakeQuant, *batches):
    fq.train()
    fq.observe = True
    for batch in batches:
        fq(batch)
        update_observers_([fq])
    return fq


def batch(seed, shape=(4, 16, 32), shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * (1 + seed) + shift


# -- fake-quant arithmetic -------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def seed():
    torch.manual_seed(0)


def test_weight_fake_quant_is_symmetric_per_channel_int8():
    w = torch.randn(6, 10)
    w[2] *= 10
    w[0, :5] = 0.0
    w[5] = 0.0  # a fully pruned row must not divide by zero
    fq = WeightFakeQuant(6)
    fq.enabled = fq.observe = True
    out = fq(w)
    scale = (w.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).eps)
    torch.testing.assert_close(fq.scale, scale, rtol=0, atol=0)
    torch.testing.assert_close(out, fake_quant_ref(w, scale[:, None], 0, -128, 127), rtol=0, atol=1e-7)
    assert (out[w == 0] == 0).all() and (out[5] == 0).all()
    levels = torch.round(out / scale[:, None])
    assert levels.min() >= -127 and levels.max() <= 127  # symmetric: -128 is never used
    assert levels.abs().amax(dim=1)[:5].eq(127).all()  # each channel's largest weight is kept exactly


def test_weight_fake_quant_per_tensor_is_torchs_op_for_linears_and_embedding_rows():
    """SparseML's strategy: one scale for the whole tensor, bitwise torch's per-tensor op (what ONNX
    export writes), the identity as gradient while the scale follows the weight; an embedding's
    looked-up rows get exactly the rows of the quantized table."""
    w = (torch.randn(40, 12) * torch.logspace(-2, 1, 40)[:, None]).requires_grad_()
    fq = WeightFakeQuant(40, strategy="tensor")
    fq.enabled = fq.observe = True
    out = fq(w)
    assert fq.scale.shape == fq.zero_point.shape == (1,) and fq.axis is None
    assert torch.equal(fq.scale, (w.detach().abs().max() / 127).reshape(1))
    reference = torch.fake_quantize_per_tensor_affine(w, fq.scale, fq.zero_point, -128, 127)
    grad = torch.randn(40, 12)
    assert torch.equal(out, reference)
    assert torch.equal(torch.autograd.grad(out, w, grad)[0], grad)
    assert len(torch.unique(out[:5])) < len(torch.unique(WeightFakeQuant(40)(w)[:5]))  # small rows lose levels

    table = to_quant_(nn.Embedding(40, 12), weight_strategy="tensor")
    table.weight.data = w.detach().clone()
    table.weight_quant.enabled = table.weight_quant.observe = True
    ids = torch.tensor([[0, 7, 39], [7, 7, 1]])
    assert torch.equal(table(ids), reference.detach()[ids])


def test_sparseml_recipes_quantize_weights_per_tensor_ours_per_channel():
    assert sst2_block().weight_strategy == "tensor"  # SparseML's QuantizationModifier: per-tensor weights
    shipped = load_recipe(FIXTURES.parent.parent / "distsparse" / "recipes" / "default.yaml")
    (modifier,) = [m for m in shipped.modifiers if isinstance(m, QuantizationModifier)]
    assert modifier.weight_strategy == "channel"


def test_activation_fake_quant_is_asymmetric_per_tensor_uint8():
    x = batch(0, shift=1.0)
    fq = observed(ActivationFakeQuant(), x)
    lo, hi = min(x.min().item(), 0.0), max(x.max().item(), 0.0)
    scale = (hi - lo) / 255
    zero_point = round(-lo / scale)
    assert fq.scale.item() == pytest.approx(scale, rel=1e-6)
    assert fq.zero_point.item() == zero_point
    fq.enabled = True
    torch.testing.assert_close(fq(x), fake_quant_ref(x, fq.scale, zero_point, 0, 255), rtol=0, atol=1e-6)
    assert len(torch.unique(fq(x))) <= 256

    small = observed(ActivationFakeQuant(reduce_range=True), x)
    assert small.quant_max == 127
    assert small.scale.item() == pytest.approx((hi - lo) / 127, rel=1e-6)
    small.enabled = True
    assert torch.round(small(x) / small.scale + small.zero_point).max() <= 127


@pytest.mark.parametrize("axis, zero_points", [(None, None), (0, "zero"), (0, "random")])
def test_cpu_fake_quantize_is_bitwise_torchs_op_with_the_same_gradient(axis, zero_points):
    """The CPU fast path must be the op that ONNX export and GPUs use, to the bit."""
    x = (torch.randn(64, 48) * 3).requires_grad_()
    if axis is None:
        scale, zero_point, qmin, qmax = torch.tensor(0.013), torch.tensor(101, dtype=torch.int32), 0, 255
        reference = torch.fake_quantize_per_tensor_affine(x, scale, zero_point, qmin, qmax)
    else:  # scales small enough that some values clip, so the gradient mask matters
        scale, qmin, qmax = torch.rand(64) * 0.02 + 1e-3, -128, 127
        zero_point = (torch.zeros(64) if zero_points == "zero" else torch.randint(-20, 20, (64,))).int()
        reference = torch.fake_quantize_per_channel_affine(x, scale, zero_point, 0, qmin, qmax)
    grad = torch.randn(64, 48)
    (expected,) = torch.autograd.grad(reference, x, grad)
    out = fake_quantize(x, scale, zero_point, qmin, qmax, axis)
    (got,) = torch.autograd.grad(out, x, grad)
    assert torch.equal(out, reference) and torch.equal(got, expected)
    assert 0 < (got == 0).sum() < got.numel()


@pytest.mark.parametrize("bits", [8, 4])
def test_weights_whose_scale_follows_them_clip_nothing_and_pass_the_gradient_through(bits):
    """While observing, a weight's scale is its own absmax / qmax: torch's op computes exactly these
    numbers, its straight-through mask is all ones, and the clamping path agrees bit for bit."""
    w = torch.randn(64, 48) * torch.logspace(-6, 3, 64)[:, None]  # channel scales from tiny to large
    w[3] = 0.0  # a pruned row: the scale is clamped to eps
    w[5, 7] = w[5].abs().max() * 2  # one outlier per channel sets its scale
    w.requires_grad_()
    fq = WeightFakeQuant(64, bits=bits)
    fq.enabled = fq.observe = True
    grad = torch.randn(64, 48)
    out = fq(w)
    (got,) = torch.autograd.grad(out, w, grad)
    reference = torch.fake_quantize_per_channel_affine(w, fq.scale, fq.zero_point, 0, fq.quant_min, fq.quant_max)
    (expected,) = torch.autograd.grad(reference, w, grad)
    assert torch.equal(out, reference) and torch.equal(got, expected) and torch.equal(got, grad)
    clamped = fake_quantize(w, fq.scale, fq.zero_point, fq.quant_min, fq.quant_max, axis=0)  # clips=True
    assert torch.equal(out, clamped)
    assert torch.round(out.detach() / fq.scale[:, None]).abs().max() == fq.quant_max

    fq.observe = False  # frozen scale, grown weights: clipped values get no gradient
    (frozen,) = torch.autograd.grad(fq(w * 1.5), w, grad)
    assert 0 < (frozen == 0).sum() < frozen.numel()


def test_embedding_quantizes_looked_up_rows_as_the_whole_table():
    embedding = to_quant_(nn.Embedding(50, 8))
    embedding.weight_quant.enabled = embedding.weight_quant.observe = True
    ids = torch.randint(0, 50, (3, 7))
    fast = embedding(ids)
    (fast_grad,) = torch.autograd.grad(fast.square().sum(), embedding.weight)
    table = embedding.weight_quant(embedding.weight)
    slow = nn.functional.embedding(ids, table)
    (slow_grad,) = torch.autograd.grad(slow.square().sum(), embedding.weight)
    assert torch.equal(fast, slow) and torch.equal(fast_grad, slow_grad)


def test_disabled_modules_compute_exactly_like_plain_layers():
    linear, embedding = nn.Linear(8, 5), nn.Embedding(20, 8, padding_idx=0)
    x, ids = torch.randn(3, 8), torch.randint(0, 20, (3, 7))
    expected = linear(x), embedding(ids)
    to_quant_(linear, quantize_output=True)
    to_quant_(embedding, quantize_output=True)
    assert isinstance(linear, QuantLinear) and isinstance(embedding, QuantEmbedding)
    for fq in (linear.input_quant, linear.weight_quant, linear.output_quant, embedding.output_quant):
        fq.observe = True  # observing alone changes nothing
    assert torch.equal(linear(x), expected[0]) and torch.equal(embedding(ids), expected[1])
    linear.weight_quant.enabled = True
    assert not torch.equal(linear(x), expected[0])


# -- observers -------------------------------------------------------------------------------------
def test_moving_average_matches_hand_computation():
    batches = [batch(i, shift=0.3 * i) for i in range(4)]
    fq = observed(ActivationFakeQuant(), *batches)
    lo, hi = batches[0].min().item(), batches[0].max().item()
    for b in batches[1:]:
        lo += 0.01 * (b.min().item() - lo)
        hi += 0.01 * (b.max().item() - hi)
    assert fq.min_val.item() == pytest.approx(lo, rel=1e-6)
    assert fq.max_val.item() == pytest.approx(hi, rel=1e-6)
    assert fq.scale.item() == pytest.approx((hi - min(lo, 0)) / 255, rel=1e-6)


def test_micro_batches_fold_into_one_update_and_eval_records_nothing():
    a, b = batch(1), batch(2, shift=3.0)
    fq = ActivationFakeQuant()
    fq.observe = True
    fq(a), fq(b)
    update_observers_([fq])
    assert fq.min_val.item() == min(a.min(), b.min()).item()
    assert fq.max_val.item() == max(a.max(), b.max()).item()
    assert fq.pending_min.item() == float("inf") and fq.pending_max.item() == float("-inf")
    before = fq.min_val.clone()
    fq.eval()
    fq(batch(3) * 100)
    update_observers_([fq])
    assert torch.equal(fq.min_val, before) and fq.pending_max.item() == float("-inf")


def test_two_ranks_merged_by_min_max_equal_one_process_on_the_full_batch(monkeypatch):
    """The all-reduce contract, with two 'ranks' simulated in one process."""
    ranks = [[ActivationFakeQuant(), ActivationFakeQuant()] for _ in range(2)]
    single = [ActivationFakeQuant(), ActivationFakeQuant()]
    for fq in [*ranks[0], *ranks[1], *single]:
        fq.observe = True
    calls = []
    for step in range(3):
        full = [batch(10 * step + k, shape=(8, 5, 6), shift=step - k) for k in range(2)]
        for fq, x in zip(single, full):
            fq(x)
        update_observers_(single)  # one process: the collective is a no-op
        for fqs, half in zip(ranks, (slice(0, 4), slice(4, 8))):
            for fq, x in zip(fqs, full):
                fq(x[half])
        gathered = [(torch.stack([o.pending_min for o in fqs]), torch.stack([o.pending_max for o in fqs]))
                    for fqs in ranks]

        def all_reduce(mins, maxs):  # what dist.all_reduce does: MIN/MAX over every rank's tensor
            calls.append(mins.numel())
            for lo, hi in gathered:
                mins.copy_(torch.minimum(mins, lo))
                maxs.copy_(torch.maximum(maxs, hi))

        monkeypatch.setattr(distributed, "all_reduce_min_max_", all_reduce)
        for fqs in ranks:
            update_observers_(fqs)
        monkeypatch.undo()
    assert calls == [2] * 6  # one fused collective per update, carrying every observer
    for a, b, ref in zip(*ranks, single):
        for key in ("min_val", "max_val", "scale", "zero_point"):
            assert torch.equal(getattr(a, key), getattr(ref, key)) and torch.equal(getattr(b, key), getattr(ref, key))


# -- the modifier on a tiny BERT -------------------------------------------------------------------
def run_steps(model, modifiers, state, n, seed=0):
    """The training loop's event order, minus Accelerate."""
    g = torch.Generator().manual_seed(seed)
    optimizer = state.optimizer or torch.optim.AdamW(model.parameters(), lr=1e-3)
    state.optimizer = optimizer
    model.train()
    history = []
    for _ in range(n):
        fire(modifiers, Event.BATCH_START, state)
        inputs_quantized = any(isinstance(m, ActivationFakeQuant) and m.enabled for m in model.modules())
        ids = torch.randint(0, 2000, (4, 12), generator=g)
        loss = model(input_ids=ids, labels=torch.tensor([0, 1, 1, 0])).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        fire(modifiers, Event.OPTIMIZER_STEP_END, state)
        history.append(dict(state.logs, inputs_quantized=inputs_quantized, qparams={k: v.clone() for k, v in qparams(model).items()}))
        state.step += 1
    return history


def init(model, steps_per_epoch=2, **kwargs):
    modifier = sst2_block(**kwargs)
    state = State(model=model, steps_per_epoch=steps_per_epoch)
    fire([modifier], Event.INIT, state)
    fire([modifier], Event.FIT_START, state)
    return modifier, state


def test_init_keeps_parameter_names_and_hf_weights_clean(tmp_path):
    model = tiny_bert()
    params = dict(model.named_parameters())
    keys = set(model.state_dict())
    init(model)
    assert dict(model.named_parameters()) == params  # same names, same Parameter objects
    assert set(model.state_dict()) == keys
    kinds = {n: type(m).__name__ for n, m in model.named_modules()}
    assert kinds["bert.encoder.layer.0.attention.self.query"] == "QuantLinear"
    assert kinds["bert.embeddings.word_embeddings"] == "QuantEmbedding"
    assert kinds["bert.embeddings.LayerNorm"] == "LayerNorm"
    assert sum(k == "QuantLinear" for k in kinds.values()) == 14  # 2 x 6 encoder + pooler + classifier
    assert sum(k == "QuantEmbedding" for k in kinds.values()) == 3
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(tmp_path)
    for name, p in reloaded.named_parameters():
        assert torch.equal(p, params[name]), name


def test_sst2_block_switches_qat_on_and_freezes_on_schedule():
    model = tiny_bert()
    reference = copy.deepcopy(model)
    modifier, state = init(model, num_calibration_steps=2)
    query = model.bert.encoder.layer[0].attention.self.query
    history = run_steps(model, [modifier], state, 2)
    # an evaluation between steps 1 and 2 already sees step 2's phase, as a resumed run would
    assert query.weight_quant.enabled and not query.input_quant.enabled
    run_steps(reference, [], State(model=reference, steps_per_epoch=2), 2)
    for name, p in reference.named_parameters():  # before QAT: the plain model, bit for bit
        assert torch.equal(p, model.get_parameter(name)), name
    history += run_steps(model, [modifier], state, 4, seed=1)

    # epoch 1 = step 2: weights; + 2 calibration steps = step 4: activations; epoch 2 = step 4: frozen
    assert [h["qat/enabled"] for h in history] == [0, 0, 1, 1, 1, 1]
    assert [h["qat/observers_frozen"] for h in history] == [0, 0, 0, 0, 1, 1]
    assert [h["inputs_quantized"] for h in history] == [0, 0, 0, 0, 1, 1]
    assert query.weight_quant.enabled and query.input_quant.enabled and not query.input_quant.observe
    assert isinstance(query.output_quant, nn.Identity)  # quantize_linear_activations: 0
    scale = "bert.encoder.layer.0.attention.self.query.input_quant.scale"
    assert history[1]["qparams"][scale] == 1.0  # nothing observed before QAT
    assert history[2]["qparams"][scale] != history[3]["qparams"][scale]  # moves while observing
    for h in history[4:]:  # frozen: weights still train, no scale moves
        for key, value in h["qparams"].items():
            assert torch.equal(value, history[3]["qparams"][key]), key
    weight_scale = "bert.encoder.layer.0.attention.self.query.weight_quant.scale"
    assert not torch.equal(history[3]["qparams"][weight_scale], query.weight.abs().amax(1) / 127)


def test_state_dict_round_trip_resumes_exactly(tmp_path):
    model = tiny_bert()
    modifier, state = init(model, steps_per_epoch=1, start_epoch=0, disable_quantization_observer_epoch=5)
    run_steps(model, [modifier], state, 3)
    saved = copy.deepcopy(modifier.state_dict())
    snapshot = copy.deepcopy(model.state_dict())
    ids = torch.randint(0, 2000, (2, 9))

    resumed = tiny_bert(seed=1)
    resumed.load_state_dict(snapshot)
    other, other_state = init(resumed, steps_per_epoch=1, start_epoch=0, disable_quantization_observer_epoch=5)
    other.load_state_dict(saved)
    assert quant_state(resumed).keys() == quant_state(model).keys()
    for key, value in quant_state(model).items():
        assert torch.equal(quant_state(resumed)[key], value), key
    model.eval(), resumed.eval()
    assert torch.equal(model(input_ids=ids).logits, resumed(input_ids=ids).logits)

    save_file({k: v.contiguous() for k, v in quant_state(model).items()}, tmp_path / "q.safetensors")
    fresh = tiny_bert(seed=1)
    fresh.load_state_dict(snapshot)
    init(fresh, steps_per_epoch=1, start_epoch=0, disable_quantization_observer_epoch=5)
    load_quant_state(fresh, load_file(tmp_path / "q.safetensors"))
    fresh.eval()
    assert torch.equal(model(input_ids=ids).logits, fresh(input_ids=ids).logits)
    broken = load_file(tmp_path / "q.safetensors")
    broken.pop(next(iter(broken)))
    with pytest.raises(UserError, match="missing"):
        load_quant_state(fresh, broken)
    # A file written per channel, read into per-tensor quantizers: refused, never broadcast.
    per_channel = tiny_bert(seed=1)
    init(per_channel, steps_per_epoch=1, start_epoch=0, weight_strategy="channel")
    key = "bert.embeddings.word_embeddings.weight_quant.scale"
    with pytest.raises(UserError, match=rf"{key} has shape \[30522\], the model's quantizer \[1\]: saved with "
                                        "weight_strategy channel, the recipe gives tensor"):
        load_quant_state(fresh, quant_state(per_channel))


def unshared(model):
    """A copy of ``model`` with Q, K and V's input quantizer as three equal modules, as before they shared one."""
    separate = copy.deepcopy(model)
    for layer in separate.bert.encoder.layer:
        attention = layer.attention.self
        for key in ("key", "value"):
            getattr(attention, key).input_quant = copy.deepcopy(attention.query.input_quant)
    return separate


def test_query_key_value_share_one_input_quantizer_with_the_numbers_of_three(monkeypatch):
    model = tiny_bert()
    init(model, steps_per_epoch=1, start_epoch=0)
    attention = model.bert.encoder.layer[1].attention.self
    assert attention.key.input_quant is attention.query.input_quant is attention.value.input_quant
    names = [n for n, _ in fake_quants(model)]
    assert "bert.encoder.layer.1.attention.self.query.input_quant" in names
    assert not [n for n in names if ".key.input_quant" in n or ".value.input_quant" in n]
    separate = unshared(model)
    assert len(fake_quants(separate)) == len(names) + 4
    g = torch.Generator().manual_seed(0)
    calibration, ids = torch.randint(0, 2000, (4, 12), generator=g), torch.randint(0, 2000, (4, 12), generator=g)
    calls, counts, outputs, grads = [], [], [], []
    counted = fake_quant.fake_quantize
    monkeypatch.setattr(fake_quant, "fake_quantize", lambda *a, **k: calls.append(1) or counted(*a, **k))
    for m in (model, separate):
        m.train()
        for _, fq in fake_quants(m):  # calibrate: observe everything, quantize weights only
            fq.observe, fq.enabled = True, isinstance(fq, WeightFakeQuant)
        m(input_ids=calibration)
        update_observers_([fq for _, fq in fake_quants(m) if isinstance(fq, ActivationFakeQuant)])
        for _, fq in fake_quants(m):
            fq.enabled = True
        calls.clear()
        out = m(input_ids=ids, labels=torch.tensor([0, 1, 1, 0]))
        out.loss.backward()
        counts.append(len(calls))
        outputs.append(out.logits)
        grads.append({n: p.grad for n, p in m.named_parameters()})
    assert counts[1] - counts[0] == 2 * 2  # K and V quantize nothing more, in both layers
    shared_qparams, separate_qparams = qparams(model), qparams(separate)
    for key, value in separate_qparams.items():  # three observers of one tensor: the shared one's numbers
        shared_key = key.replace(".key.input_quant", ".query.input_quant").replace(".value.input_quant", ".query.input_quant")
        assert torch.equal(value, shared_qparams[shared_key]), key
    assert torch.equal(outputs[0], outputs[1])  # the forward, bit for bit
    for name, grad in grads[0].items():
        if name.startswith(("bert.encoder.layer.1.", "bert.pooler", "classifier")):
            assert torch.equal(grad, grads[1][name]), name  # above the first shared quantizer: same sums
        else:  # Q, K and V's gradients are summed before the mask, not after: float32 rounding apart
            # (the key bias's gradient is rounding noise around its exact value 0: softmax ignores shifts)
            bound = 1e-6 * max(float(grad.abs().max()), 1e-6)
            torch.testing.assert_close(grad, grads[1][name], rtol=0, atol=bound, msg=name)


def test_files_with_three_query_key_value_input_quantizers_load(tmp_path):
    model = tiny_bert()
    modifier, state = init(model, steps_per_epoch=1, start_epoch=0)
    run_steps(model, [modifier], state, 2)
    old = quant_state(unshared(model))  # what distsparse wrote before Q, K and V shared one quantizer
    assert "bert.encoder.layer.0.attention.self.key.input_quant.scale" in old
    fresh = tiny_bert()
    other, _ = init(fresh, steps_per_epoch=1, start_epoch=0)
    load_quant_state(fresh, old)
    assert quant_state(fresh).keys() == quant_state(model).keys()
    assert all(torch.equal(v, quant_state(model)[k]) for k, v in quant_state(fresh).items())
    resumed, _ = init(tiny_bert(), steps_per_epoch=1, start_epoch=0)
    resumed.load_state_dict({"quant_state": old})  # a checkpoint's modifier state
    assert all(torch.equal(v, modifier.state_dict()["quant_state"][k]) for k, v in resumed.state_dict()["quant_state"].items())
    old["bert.encoder.layer.0.attention.self.value.input_quant.scale"] *= 2
    with pytest.raises(UserError, match="value.input_quant.scale differs from .*query.input_quant.scale"):
        load_quant_state(fresh, old)


def test_ddp_leaves_the_synced_buffers_alone():
    model = tiny_bert()
    init(model)
    ignored = set(model._ddp_params_and_buffers_to_ignore)
    buffers = {n for n, _ in model.named_buffers() if "_quant." in n}
    assert "bert.encoder.layer.1.output.dense.input_quant.pending_min" in ignored
    assert ignored == buffers


def test_recipe_errors_name_the_key():
    with pytest.raises(RecipeError, match="submodules: 'bert.decoder'"):
        init(tiny_bert(), submodules=["bert.decoder"])
    with pytest.raises(RecipeError, match="exclude_module_types|submodules"):
        init(tiny_bert(), submodules=["classifier"], exclude_module_types=["Linear"])
    with pytest.raises(RecipeError, match="end_epoch"):
        QuantizationModifier(end_epoch=3.0).validate()
    with pytest.raises(RecipeError, match="weight_bits"):
        QuantizationModifier(weight_bits=16).validate()
    with pytest.raises(RecipeError, match="weight_strategy: 'row' is not one of tensor, channel"):
        QuantizationModifier(weight_strategy="row").validate()
    with pytest.raises(RecipeError, match="disable_quantization_observer_epoch"):
        QuantizationModifier(start_epoch=2.0, disable_quantization_observer_epoch=2.0).validate()
    with pytest.raises(RecipeError, match="before QAT"):  # equal only after rounding to steps
        init(tiny_bert(), steps_per_epoch=1, start_epoch=1.0, disable_quantization_observer_epoch=1.2)


def test_timeline_names_the_qat_steps():
    modifier = sst2_block(num_calibration_steps=3)
    assert modifier.timeline(steps_per_epoch=10) == [
        (10, "QuantizationModifier: QAT starts: int8 weights fake-quantized (a scale per tensor), activation observers on "
             "(min/max all-reduced every step)"),
        (13, "QuantizationModifier: activations fake-quantized (after 3 calibration step(s) that only observe)"),
        (20, "QuantizationModifier: observers frozen: scales and zero points fixed"),
        (20, "QuantizationModifier: freeze_bn_stats_epoch: no BatchNorm in BERT, nothing to do"),
    ]
