"""oBERT pruning: scores and weight update against an explicit Fisher inverse, OBS against magnitude
pruning at equal sparsity, bad settings, and 2 real gloo ranks agreeing bitwise."""
from __future__ import annotations

import itertools
import re
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from distsparse.errors import RecipeError
from distsparse.events import Event, State, fire
from distsparse.modifiers.obs import OBSPruningModifier, fisher_inverse_
from distsparse.modifiers.pruning import GMPruningModifier
from distsparse.recipe import load_recipe
from conftest import ROOT, SHARED, TWO_EPOCHS_LINEAR_LR, free_port, minilm_dir, requires_shared

DAMP = 1e-4


class Regression(nn.Module):
    """y = x W^T, MSE: a model whose batches are dicts and whose output has ``.loss``, as HF's."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        self.lin.weight.data.copy_(weight)

    def forward(self, x, y):
        return SimpleNamespace(loss=((self.lin(x) - y) ** 2).mean())


def regression_data(rows: int = 512, inputs: int = 16, outputs: int = 4, seed: int = 0):
    """Strongly correlated inputs, so which weights to drop and how to compensate matters."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(rows, inputs // 4, generator=g)
    x = base.repeat_interleave(4, 1) + 0.3 * torch.randn(rows, inputs, generator=g)
    true = torch.randn(outputs, inputs, generator=g)
    return x, x @ true.T + 0.1 * torch.randn(rows, outputs, generator=g), true


def batches_of(x, y, batch_size):
    return [{"x": x[i:i + batch_size], "y": y[i:i + batch_size]} for i in range(0, len(x), batch_size)]


def one_shot(model, sparsity, mask_type="unstructured", num_grads=32, block=8, global_sparsity=False,
             batches=None, rounds=1, cls=OBSPruningModifier, **extra):
    """Prune ``model.lin.weight`` once, at step 0, to ``sparsity``; returns the modifier."""
    kwargs = dict(params=["lin.weight"], init_sparsity=sparsity, final_sparsity=sparsity, start_epoch=0.0,
                  end_epoch=0.0, update_frequency=1.0, mask_type=mask_type, global_sparsity=global_sparsity)
    kwargs.update(extra)
    if cls is OBSPruningModifier:
        kwargs.update(num_grads=num_grads, fisher_block_size=block, damp=DAMP, num_recomputations=rounds,
                      grad_sampler_kwargs={"batch_size": 16})
    modifier = cls(**kwargs)
    modifier.validate()
    state = State(model=model, steps_per_epoch=1, grad_batches=lambda size: itertools.cycle(batches))
    fire([modifier], Event.INIT, state)
    fire([modifier], Event.BATCH_START, state)
    return modifier


def explicit_inverse(model, batches, num_grads, block):
    """(d / B, B, B) inverses of damp I + mean g g^T, each block inverted by torch.linalg.inv in float64."""
    grads = []
    for batch in itertools.islice(itertools.cycle(batches), num_grads):
        model.zero_grad()
        model(**batch).loss.backward()
        grads.append(model.lin.weight.grad.reshape(-1, block).double().clone())
    g = torch.stack(grads)  # (m, blocks, B)
    fisher = torch.einsum("mbi,mbj->bij", g, g) / num_grads + DAMP * torch.eye(block, dtype=torch.float64)
    return torch.linalg.inv(fisher)


def test_fisher_inverse_matches_linalg_inv():
    g = torch.randn(40, 5, 8, dtype=torch.float64)
    exact = torch.einsum("mbi,mbj->bij", g, g)
    exact[3] = -torch.eye(8, dtype=torch.float64)  # not positive definite: Cholesky fails, LU takes this block
    expected = torch.linalg.inv(exact / 40 + 1e-3 * torch.eye(8, dtype=torch.float64))
    got = fisher_inverse_(exact.float(), 40, 1e-3, chunk=2).double()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert got[3, 0, 0] == pytest.approx(1 / (1e-3 - 1 / 40))


@pytest.mark.parametrize("buffer_bytes", [1, 4 * 64 * 5])  # one gradient at a time; 5 (32 = 6 x 5 + 2)
def test_buffered_gradients_give_the_same_step(monkeypatch, buffer_bytes):
    from distsparse.modifiers import obs

    x, y, _ = regression_data()
    w0 = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))
    reference = Regression(w0)
    expected = one_shot(reference, 0.5, batches=batches_of(x, y, 16)).masks["lin.weight"]
    monkeypatch.setattr(obs, "GRAD_BUFFER_BYTES", buffer_bytes)
    model = Regression(w0)
    modifier = one_shot(model, 0.5, batches=batches_of(x, y, 16))
    assert torch.equal(modifier.masks["lin.weight"], expected)
    torch.testing.assert_close(model.lin.weight, reference.lin.weight, rtol=1e-4, atol=1e-4)  # float32 sums, another order


@pytest.mark.parametrize("mask_type", ["unstructured", "block4"])
def test_scores_and_update_match_direct_computation(mask_type):
    x, y, _ = regression_data()
    batches = batches_of(x, y, 16)
    w0 = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))
    finv = explicit_inverse(Regression(w0), batches, 32, 8)
    w = w0.reshape(-1).double()
    if mask_type == "unstructured":
        diag = finv.diagonal(dim1=1, dim2=2).reshape(-1)
        scores, unit = w ** 2 / (2 * diag), 1
    else:
        subs = torch.stack([finv[b, i:i + 4, i:i + 4] for b in range(finv.shape[0]) for i in range(0, 8, 4)])
        wb = w.view(-1, 4)
        scores, unit = torch.stack([0.5 * wb[k] @ torch.linalg.inv(subs[k]) @ wb[k] for k in range(len(wb))]), 4
    pruned_units = scores.argsort()[: len(scores) // 2]
    pruned = torch.zeros(len(scores), dtype=torch.bool)
    pruned[pruned_units] = True
    pruned = pruned.repeat_interleave(unit)
    # The OBS update: w - sum over pruned q of F^-1 e_q w_q / [F^-1]_qq (block4: F^-1 E_b S_b^-1 w_b).
    expected = w.clone()
    for b in range(finv.shape[0]):
        full = torch.zeros(8, dtype=torch.float64)
        for q in range(0, 8, unit):
            i = b * 8 + q
            if pruned[i]:
                if unit == 1:
                    full[q] = w[i] / finv[b, q, q]
                else:
                    full[q:q + 4] = torch.linalg.inv(finv[b, q:q + 4, q:q + 4]) @ w[i:i + 4]
        expected[b * 8:(b + 1) * 8] -= finv[b] @ full
    expected[pruned] = 0.0

    model = Regression(w0)
    modifier = one_shot(model, 0.5, mask_type, batches=batches)
    keep = modifier.masks["lin.weight"].reshape(-1)
    assert torch.equal(keep, ~pruned)
    # float32 Fisher sums against float64 here
    torch.testing.assert_close(model.lin.weight.reshape(-1).double(), expected, rtol=1e-3, atol=1e-4)
    assert int((model.lin.weight == 0).sum()) == 32


def full_loss(model, x, y) -> float:
    with torch.no_grad():
        return float(model(x, y).loss)


def test_obs_keeps_lower_loss_than_magnitude_at_equal_sparsity():
    x, y, true = regression_data()
    batches = batches_of(x, y, 16)
    trained = true + 0.05 * torch.randn(true.shape, generator=torch.Generator().manual_seed(2))
    results = {}
    for cls in (OBSPruningModifier, GMPruningModifier):
        model = Regression(trained)
        one_shot(model, 0.75, batches=batches, num_grads=len(batches), block=16, cls=cls)
        assert int((model.lin.weight == 0).sum()) == 48
        results[cls.__name__] = full_loss(model, x, y)
    assert results["OBSPruningModifier"] < 0.85 * results["GMPruningModifier"], results  # measured: 2.73 vs 3.64


def test_global_sparsity_and_recomputations():
    x, y, _ = regression_data()
    batches = batches_of(x, y, 16)
    drawn = []
    model = Regression(torch.randn(4, 16, generator=torch.Generator().manual_seed(3)))

    def counting(size):
        for batch in itertools.cycle(batches):
            drawn.append(size)
            yield batch

    modifier = OBSPruningModifier(params=["lin.weight"], init_sparsity=0.6, final_sparsity=0.6, start_epoch=0.0,
                                  end_epoch=0.0, update_frequency=1.0, num_grads=8, fisher_block_size=16,
                                  num_recomputations=3, grad_sampler_kwargs={"batch_size": 5})
    state = State(model=model, steps_per_epoch=1, grad_batches=counting)
    fire([modifier], Event.INIT, state)
    fire([modifier], Event.BATCH_START, state)
    assert drawn == [5] * 24  # 3 rounds of 8 gradients each, batch size from grad_sampler_kwargs
    phases = [state.logs[f"obs/{p}_seconds"] for p in ("grads", "fisher", "all_reduce", "inverse", "scores_update")]
    assert all(t >= 0 for t in phases) and 0 < sum(phases) <= state.logs["obs/step_seconds"]  # the 3 rounds summed
    assert int((~modifier.masks["lin.weight"]).sum()) == round(0.6 * 64)
    assert torch.equal(model.lin.weight == 0, ~modifier.masks["lin.weight"])


def test_obs_init_sparsity_from_param():
    x, y, _ = regression_data()
    weight = torch.randn(4, 16, generator=torch.Generator().manual_seed(5))
    weight[:, :4] = 0.0  # 25% already zero
    model = Regression(weight)
    modifier = one_shot(model, 0.5, batches=batches_of(x, y, 16), init_sparsity="__FROM_PARAM__")
    assert modifier.from_param == {"lin.weight": 0.25}
    assert int((model.lin.weight == 0).sum()) == 32 and not model.lin.weight[:, :4].any()


OBS_RECIPE = """
pruning_modifiers:
  - !OBSPruningModifier
    params: [lin.weight]
    init_sparsity: 0.5
    final_sparsity: 0.8
    start_epoch: 0
    end_epoch: 2
    update_frequency: 1
    {extra}
"""


@pytest.mark.parametrize("extra, key", [
    ("num_grads: 0", "num_grads"),
    ("mask_type: block4\n    fisher_block_size: 6", "fisher_block_size"),
    ("mask_type: '2:4'", "mask_type"),
    ("damp: 0", "damp"),
    ("grad_sampler_kwargs: {batch_size: 0}", "grad_sampler_kwargs"),
    ("num_recomputations: 0", "num_recomputations"),
])
def test_bad_settings_stop_at_load(extra, key):
    with pytest.raises(RecipeError, match=rf"^<string>:\d+ OBSPruningModifier: {key}: "):
        load_recipe(OBS_RECIPE.format(extra=extra))


def test_block_size_not_dividing_a_weight_stops_at_init():
    recipe = load_recipe(OBS_RECIPE.format(extra="fisher_block_size: 7"))
    state = State(model=Regression(torch.zeros(4, 16)), steps_per_epoch=1)
    with pytest.raises(RecipeError, match=r"fisher_block_size: 7 does not divide lin.weight \(64 weights\)"):
        fire(recipe.modifiers, Event.INIT, state)


def test_grad_batches_are_this_ranks_shard_in_a_seeded_order(monkeypatch):
    from distsparse import distributed
    from distsparse.modifiers.obs import grad_batches_for

    rows = [{"x": torch.tensor([float(i)])} for i in range(10)]
    collate = lambda items: {"x": torch.cat([r["x"] for r in items])}  # noqa: E731
    state = State(model=None, steps_per_epoch=1, step=3)

    def first_pass(rank: int) -> list[int]:
        monkeypatch.setattr(distributed, "rank", lambda: rank)
        monkeypatch.setattr(distributed, "world_size", lambda: 2)
        batches = grad_batches_for(rows, collate, seed=7, device="cpu", state=state)(2)
        return [int(v) for _ in range(3) for v in next(batches)["x"]]  # batches of 2, 2, 1: the rank's 5 rows

    rank0, rank1 = first_pass(0), first_pass(1)
    assert sorted(set(rank0[:5]) | set(rank1[:5])) == list(range(10)) and not set(rank0[:5]) & set(rank1[:5])
    assert first_pass(0) == rank0  # the same step draws the same samples (a rerun or resume)
    state.step = 4
    assert first_pass(0) != rank0  # the next pruning step draws others


def deepspeed_accelerator(stage: int):
    """What ``distributed.zero_stage`` reads of an Accelerator running DeepSpeed at ``stage``."""
    from accelerate.utils import DistributedType

    return SimpleNamespace(distributed_type=DistributedType.DEEPSPEED,
                           state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=stage)))


def test_non_linear_weight_is_refused_under_zero3_at_init():
    model = nn.Module()
    model.emb = nn.Embedding(4, 16)
    modifier = OBSPruningModifier(params=["emb.weight"], init_sparsity=0.5, final_sparsity=0.5, start_epoch=0.0,
                                  end_epoch=0.0, update_frequency=1.0, fisher_block_size=16)
    modifier.validate()
    state = State(model=model, steps_per_epoch=1, accelerator=deepspeed_accelerator(3))
    with pytest.raises(RecipeError, match=r"OBSPruningModifier: params: emb.weight is not an nn.Linear weight: under"):
        fire([modifier], Event.INIT, state)
    fire([modifier], Event.INIT, State(model=model, steps_per_epoch=1, accelerator=deepspeed_accelerator(2)))


def test_linear_gradients_from_inputs_and_outputs_equal_autograd():
    """weight_grads' ``grad_out^T @ input`` against autograd's weight gradients on a tiny BERT (3-D
    inputs, Q/K/V reading one input): bitwise on CPU; an embedding goes through autograd itself. No
    parameter's .grad is written."""
    from conftest import tiny_bert
    from distsparse.modifiers.obs import weight_grads

    model = tiny_bert().eval()
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(0, 30522, (4, 12), generator=g), "labels": torch.tensor([0, 1, 1, 0])}
    names = [n for n, p in model.named_parameters() if n.startswith("bert.encoder") and p.dim() == 2]
    names.append("bert.embeddings.word_embeddings.weight")
    params = dict(model.named_parameters())
    expected = torch.autograd.grad(model(**batch).loss, [params[n] for n in names])
    got = weight_grads(model, batch, names)
    assert len(names) == 13 and all(torch.equal(a, b) for a, b in zip(got, expected))
    assert all(p.grad is None for p in model.parameters())


def test_owners_by_size_balances_whole_tensors(monkeypatch):
    from distsparse import distributed

    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    assert distributed.owners_by_size([10, 40, 30, 30, 5, 5]) == [1, 0, 1, 2, 2, 2]  # 40 each
    monkeypatch.setattr(distributed, "SYNC", False)  # without rank sync each rank keeps everything itself
    monkeypatch.setattr(distributed, "rank", lambda: 2)
    assert distributed.owners_by_size([10, 40]) == [2, 2]


def test_unused_sampler_key_warns():
    with pytest.warns(UserWarning, match=r"grad_sampler_kwargs.num_workers is ignored"):
        load_recipe(OBS_RECIPE.format(extra="grad_sampler_kwargs: {batch_size: 4, num_workers: 2}"))


# -- 2 real gloo ranks --------------------------------------------------------------------------------------
def _one_shot_on_rank(rank: int, port: int, out: str) -> None:
    """A spawned rank: half of the 32 gradient samples (every other batch), Fisher sums all-reduced."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    x, y, _ = regression_data()
    model = Regression(torch.randn(4, 16, generator=torch.Generator().manual_seed(4)))
    modifier = one_shot(model, 0.5, batches=batches_of(x, y, 16)[rank::2], num_grads=32)
    torch.save({"keep": modifier.masks["lin.weight"], "weight": model.lin.weight.detach()}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_two_ranks_equal_one_process_with_the_union_of_their_samples(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(_one_shot_on_rank, args=(free_port(), str(tmp_path)), nprocs=2)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert torch.equal(rank0["keep"], rank1["keep"]) and torch.equal(rank0["weight"], rank1["weight"])
    x, y, _ = regression_data()
    model = Regression(torch.randn(4, 16, generator=torch.Generator().manual_seed(4)))
    single = one_shot(model, 0.5, batches=batches_of(x, y, 16), num_grads=32)  # batches 0..31: both ranks' samples
    assert torch.equal(single.masks["lin.weight"], rank0["keep"])
    torch.testing.assert_close(model.lin.weight.detach(), rank0["weight"], rtol=1e-4, atol=1e-4)  # float32 sums, another order


class ThreeLayers(nn.Module):
    """y = C relu(B relu(A x)), MSE: three Linear weights of 192, 96 and 32 elements."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(6)
        self.a, self.b = nn.Linear(16, 12, bias=False), nn.Linear(12, 8, bias=False)
        self.c = nn.Linear(8, 4, bias=False)

    def forward(self, x, y):
        return SimpleNamespace(loss=((self.c(self.b(self.a(x).relu()).relu()) - y) ** 2).mean())


def _sharded_and_replicated_on_rank(rank: int, port: int, out: str) -> None:
    """A spawned rank: the same one-shot step with its half of 31 samples, replicated (as DDP) and
    sharded (as under ZeRO-2: whole tensors owned by ranks), and sharded with one tensor for two ranks."""
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    x, y, _ = regression_data()
    batches = batches_of(x, y, 16)[rank::2]
    results = {}
    for mode, accelerator, params in (("replicated", None, ["a.weight", "b.weight", "c.weight"]),
                                      ("sharded", deepspeed_accelerator(2), ["a.weight", "b.weight", "c.weight"]),
                                      ("one tensor", deepspeed_accelerator(2), ["a.weight"])):
        model = ThreeLayers()
        modifier = OBSPruningModifier(params=params, init_sparsity=0.6,
                                      final_sparsity=0.6, start_epoch=0.0, end_epoch=0.0, update_frequency=1.0,
                                      global_sparsity=True, num_grads=31, fisher_block_size=8, damp=DAMP,
                                      grad_sampler_kwargs={"batch_size": 16})
        state = State(model=model, steps_per_epoch=1, accelerator=accelerator,
                      grad_batches=lambda size: itertools.cycle(batches))
        fire([modifier], Event.INIT, state)
        fire([modifier], Event.BATCH_START, state)
        results[mode] = {"masks": dict(modifier.masks), "weights": {n: p.detach() for n, p in model.named_parameters()},
                         "fisher_elements": state.logs["obs/fisher_elements"]}
    torch.save(results, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def test_sharded_fisher_keeps_owned_blocks_and_prunes_as_replicated(tmp_path):
    """Sharded, each rank holds the Fisher blocks of the tensors it owns only (rank 0: a, 192
    weights; rank 1: b and c, 128), yet both ranks end with the replicated run's masks, bitwise,
    and its weights up to float32 summation order (the owner adds both ranks' outer products where
    replicated ranks add their own and all-reduce). 31 samples: rank 1's 16th forward counts zero."""
    import torch.multiprocessing as mp

    mp.spawn(_sharded_and_replicated_on_rank, args=(free_port(), str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert [r["replicated"]["fisher_elements"] for r in ranks] == [320 * 8] * 2
    assert [r["sharded"]["fisher_elements"] for r in ranks] == [192 * 8, 128 * 8]
    for mode in ("replicated", "sharded", "one tensor"):
        for key in ("masks", "weights"):
            assert all(torch.equal(v, ranks[1][mode][key][n]) for n, v in ranks[0][mode][key].items()), (mode, key)
    assert [r["one tensor"]["fisher_elements"] for r in ranks] == [192 * 8, 0]  # rank 1 owns nothing
    assert int((~ranks[0]["one tensor"]["masks"]["a.weight"]).sum()) == round(0.6 * 192)
    replicated, sharded = ranks[0]["replicated"], ranks[0]["sharded"]
    assert all(torch.equal(m, sharded["masks"][n]) for n, m in replicated["masks"].items())
    assert sum(int((~m).sum()) for m in sharded["masks"].values()) == round(0.6 * 320)
    for name, weight in replicated["weights"].items():
        torch.testing.assert_close(sharded["weights"][name], weight, rtol=1e-4, atol=1e-5)
    start = ThreeLayers()
    assert any((sharded["weights"][n] - p.detach())[sharded["masks"][n]].abs().max() > 1e-2
               for n, p in start.named_parameters())  # the OBS update moved kept weights


# -- 2 real gloo ranks --------------------------------------------------------------------------------------
DISTRIBUTED_RECIPE = TWO_EPOCHS_LINEAR_LR + r"""
pruning_modifiers:
  - !OBSPruningModifier
    params: ["re:bert\\.encoder\\.layer\\.\\d+\\..*dense\\.weight"]
    start_epoch: 0.0
    end_epoch: 1.0
    init_sparsity: 0.5
    final_sparsity: 0.8
    update_frequency: 0.5
    num_grads: 8
    fisher_block_size: 8
    damp: 1e-7
    grad_sampler_kwargs:
      batch_size: 4
"""


@pytest.fixture(scope="module")
def obs_job(tmp_path_factory):
    from test_distributed import Job

    job = Job(tmp_path_factory.mktemp("obs"))
    (job.root / "recipe.yaml").write_text(DISTRIBUTED_RECIPE)
    return job


def test_two_ranks_hold_the_same_obs_masks_and_weights(obs_job):
    from test_distributed import masks_of, ok, rank_states

    proc, out = obs_job.launch("obs", "ddp", "--save_strategy", "no", "--teacher", "disable")
    ok(proc)
    assert "rank consistency: OK" in proc.stdout
    rank0, rank1 = rank_states(out)
    assert [k for k in rank0 if not torch.equal(rank0[k], rank1[k])] == []
    masks = masks_of(rank0)
    assert len(masks) == 6 and all(k.startswith("OBSPruningModifier") for k in rank0 if ".masks." in k)
    pruned = sum(int((~m).sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
    assert pruned == pytest.approx(0.8, abs=1e-3)


@pytest.mark.parametrize("backend", ["ddp", pytest.param("zero3", marks=pytest.mark.slow)])
def test_check_names_an_obs_tensor_without_rank_sync(obs_job, backend):
    """Without rank sync each rank prunes from its own samples (under ZeRO it owns every tensor)."""
    proc, _ = obs_job.launch(f"obs-nosync-{backend}", backend, "--save_strategy", "no", "--teacher", "disable",
                             "--debug_disable_rank_sync")
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0
    found = re.search(r"rank consistency: FAILED: (\S+) differs between rank 0 and rank 1", log)
    assert found, log[-3000:]
    assert re.fullmatch(r"OBSPruningModifier\[\d+\]\.masks\.bert\.encoder\..*dense\.weight", found[1]), found[1]


@pytest.mark.parametrize("backend", ["zero3", pytest.param("zero2", marks=pytest.mark.slow)])
def test_zero_runs_prune_like_ddp_and_reach_the_master_weights(obs_job, backend):
    """The same recipe and samples under ZeRO-3 (no parameter whole between steps) and ZeRO-2: masks
    bitwise equal on both ranks and to the DDP run's, the schedule's sparsity reached, the pruned
    weights zero in the saved model and in DeepSpeed's fp32 masters after further steps, and the kept
    weights where DDP's are (so the OBS update reached the masters: without it they would differ by
    the update, far more than the tolerance)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from test_distributed import masks_of, ok, rank_states

    ddp, ddp_out = obs_job.launch("obs", "ddp", "--save_strategy", "no", "--teacher", "disable")
    ok(ddp)
    proc, out = obs_job.launch(f"obs-{backend}", backend, "--save_strategy", "epoch", "--teacher", "disable")
    ok(proc)
    assert "rank consistency: OK" in proc.stdout
    # Rank 0 holds the Fisher blocks of the 3 of 6 tensors it owns (half the elements); with DDP, all.
    assert set(re.findall(r"obs/fisher_elements=(\S+)", proc.stdout)) == {"4.096e+04"}
    assert set(re.findall(r"obs/fisher_elements=(\S+)", ddp.stdout)) == {"8.192e+04"}
    rank0, rank1 = rank_states(out)
    assert [k for k in rank0 if not torch.equal(rank0[k], rank1[k])] == []
    masks, ddp_masks = masks_of(rank0), masks_of(rank_states(ddp_out)[0])
    assert masks.keys() == ddp_masks.keys() and len(masks) == 6
    assert [n for n in masks if not torch.equal(masks[n], ddp_masks[n])] == []
    pruned = sum(int((~m).sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
    assert pruned == pytest.approx(0.8, abs=1e-3)
    model, ddp_model = load_file(str(out / "model.safetensors")), load_file(str(ddp_out / "model.safetensors"))
    start = load_file(str(obs_job.model / "model.safetensors"))
    master = get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoint-8" / "training_state"), tag="pytorch_model")
    for name, keep in masks.items():
        assert not model[name][~keep].any() and not master[name][~keep].any(), name
        torch.testing.assert_close(model[name], ddp_model[name], rtol=0, atol=1e-5, msg=name)
        assert (model[name] - start[name])[keep].abs().max() > 1e-3, name  # moved (OBS update and training)


# -- slow tier: obs80.yaml trains the real MiniLM on SST-2, 1 and 2 real gloo ranks ---------------------------
SST2_ROWS, SST2_EVAL_ROWS = 512, 256
SST2_RECIPE_ARGS = "num_epochs=2,pruning_end_epoch=1,update_frequency=0.5,num_grads=8,grad_batch_size=4,init_lr=2e-4"


def encoder_sparsity(model_dir) -> float:
    """Exact zeros in the weights obs80.yaml prunes, as saved."""
    obs = load_recipe((ROOT / "distsparse" / "recipes" / "obs80.yaml").read_text()).modifiers[2]
    patterns = [re.compile(p.removeprefix("re:")) for p in obs.params]
    weights = [w for n, w in load_file(str(model_dir / "model.safetensors")).items() if any(p.fullmatch(n) for p in patterns)]
    assert len(weights) == 36  # 6 layers x q, k, v, attention output, intermediate, output
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


@pytest.mark.slow
@requires_shared
@pytest.mark.parametrize("ranks", [1, 2])
def test_obs80_trains_minilm_on_sst2(tmp_path, ranks):
    """obs80.yaml, shortened (3 OBS steps of 8 gradients, 2 epochs of 512 rows at sequence 32): 80% of
    the encoder's linear weights zero, dev accuracy above always answering the commoner label, and at
    2 ranks the OBS masks bitwise equal on both (the rank-consistency check and each rank's dump)."""
    import json
    import os
    import subprocess
    import sys

    from distsparse import distributed

    out, data = tmp_path / "out", SHARED / "data" / "sst2"
    args = ["--recipe", str(ROOT / "distsparse" / "recipes" / "obs80.yaml"), "--recipe_args", SST2_RECIPE_ARGS,
            "--train_file", str(data / "train.tsv"), "--validation_file", str(data / "dev.tsv"),
            "--max_train_samples", str(SST2_ROWS), "--max_eval_samples", str(SST2_EVAL_ROWS), "--max_seq_length", "32",
            "--per_device_train_batch_size", str(16 // ranks), "--output_dir", str(out), "--save_strategy", "no",
            "--eval_strategy", "no", "--teacher", "disable", "--seed", "0", "--logging_steps", "8"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT),
               HF_HOME=str(tmp_path / "hf"), **{distributed.DUMP_ENV: str(out / "ranks")})
    if ranks == 1:
        cmd = [sys.executable, "-m", "distsparse.cli", "train", *args]
    else:
        env.update(ACCELERATE_USE_CPU="true", GLOO_SOCKET_IFNAME="lo", MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS="1")
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "launch_configs" / "cpu_2proc.yaml"), "--num_processes", "2", "--main_process_port",
               str(free_port()), "-m", "distsparse.train", "--model_name_or_path", str(minilm_dir()), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert encoder_sparsity(out) == pytest.approx(0.8, abs=1e-3)
    state = json.loads((out / "trainer_state.json").read_text())
    with open(data / "dev.tsv") as f:
        labels = [int(line.rstrip("\n").split("\t")[1]) for line in list(f)[1:SST2_EVAL_ROWS + 1]]
    majority = max(labels.count(0), labels.count(1)) / len(labels)
    assert state["metrics"]["eval/accuracy"] > majority + 0.1, (state["metrics"], majority)
    if ranks == 2:
        assert "rank consistency: OK" in log
        rank0, rank1 = (load_file(str(out / "ranks" / f"rank{r}.safetensors")) for r in (0, 1))
        masks = [k for k in rank0 if k.startswith("OBSPruningModifier") and ".masks." in k]
        assert len(masks) == 36 and all(torch.equal(rank0[k], rank1[k]) for k in masks)
