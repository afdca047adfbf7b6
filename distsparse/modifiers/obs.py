"""oBERT: Optimal Brain Surgeon pruning with a block-diagonal empirical Fisher (Kurtic et al., 2022).

At each scheduled pruning step the modifier draws ``num_grads`` mini-batch gradients (masked by the
current mask), builds the Fisher ``F = damp * I + (1/m) sum g g^T`` restricted to blocks of
``fisher_block_size`` consecutive weights of each flattened tensor, inverts it, scores every weight
``w_q^2 / (2 [F^-1]_qq)`` (block4: ``w_b^T ([F^-1]_bb)^-1 w_b / 2`` per 1x4 block), prunes the
lowest-scoring to the scheduled sparsity and moves the weights that stay by the OBS update
``-F^-1 e_q w_q / [F^-1]_qq`` summed over the pruned ``q`` (SparseML's choice).

Why no Woodbury updates: SparseML starts each block from ``I / damp`` and applies one
Sherman-Morrison update per gradient, ``F^-1 -= (F^-1 g)(F^-1 g)^T / (m + g^T F^-1 g)``. After all
``m`` gradients that is exactly ``(damp I + (1/m) sum g g^T)^-1``, the inverse of the same matrix
built here by summing the outer products and inverting once. The sum is cheaper: gradients are
buffered and added by one batched matmul per weight (``add_outer_products_``), then one batched
Cholesky per chunk of blocks, where Woodbury makes ``m`` sequential passes of three batched
matmuls over every block. Measured on one MiniLM-L6 layer (1.77M weights, block 16, 64
gradients, float32, 1 thread, load ~9 on 2 cores;
``bench/obs_sst2.py --parts inverse --repeats 1 --threads 1``): Woodbury 49.7 s, summed +
Cholesky 3.6 s (13.9x), both within 2e-15 of ``torch.linalg.inv`` in float64.

Across ranks the sum also splits where Woodbury's sequence cannot: each rank takes its share of the
``num_grads`` samples from its own data shard. Gradients come without any parameter's gradient
(``weight_grads``): autograd differentiates w.r.t. the pruned ``nn.Linear`` layers' outputs, and a
weight's gradient is ``grad_out^T @ input``, so neither DDP's reducer nor ZeRO's reduce hooks run,
and under ZeRO-3 nothing has to stay gathered (a forward inside ``GatheredParameters`` fails:
DeepSpeed releases the weights after it). With DDP each rank adds the outer products of its
samples for every tensor, one fused all-reduce sums them, every rank inverts the same matrix and
rank 0's masks and updated weights are broadcast. Under ZeRO-2/3 each tensor is owned whole by one
rank (``distributed.owners_by_size``; DeepSpeed's even flat split would cut Fisher blocks): each
buffer of gradients is gathered to the owners, who alone hold, invert and score their tensors'
blocks; the scores are all-gathered, so every rank runs the same ``_prune_lowest`` on the same
concatenation, and each updated weight is broadcast from its owner and written into every copy a
rank keeps (``distributed.set_parameter_``: ZeRO-3 partition and fp32 master, ZeRO-1/2 fp32
master fragment). Masks are bitwise equal everywhere either way.

Memory per rank: ``4 * d * B`` bytes for ``d`` pruned weights at block size ``B`` with DDP; under
ZeRO the same for the ``d`` of the tensors the rank owns, about 1/N of them (``obs/fisher_elements``
in the logs); plus the gradient buffer (at most ``GRAD_BUFFER_BYTES``, and under ZeRO what the
owner receives of its tensors, about as much again) and, under ZeRO-3, the pruned weights whole
while they are written back.
"""
from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from .. import distributed
from ..errors import RecipeError
from ..events import Event, State
from .base import register
from .pruning import FROM_PARAM, GMPruningModifier, _prune_lowest, parse_mask_type

OBS_MASK_TYPES = ("unstructured", "block4")
GRAD_SAMPLER_KEYS = ("batch_size",)
# Memory for gradients waiting to be added to the Fisher sums together (MiniLM-L6: 12 at a time).
GRAD_BUFFER_BYTES = 1 << 29
# What one pruning step's time is split into (state.logs["obs/<phase>_seconds"], summed over its rounds).
OBS_PHASES = ("grads", "fisher", "all_reduce", "inverse", "scores_update")


def fisher_inverse_(sums: torch.Tensor, num_grads: int, damp: float, chunk: int = 4096) -> torch.Tensor:
    """``sums`` (blocks, B, B) of gradient outer products becomes ``(damp I + sums / num_grads)^-1``
    in place, ``chunk`` blocks at a time in float64 (damp is ~1e-7: float32 loses the small
    eigenvalues). Batched Cholesky: the matrix is symmetric positive definite by construction; the
    few blocks whose float32 sums lost that (fewer gradients than B, tiny damp) are inverted by LU."""
    eye = torch.eye(sums.shape[-1], dtype=torch.float64, device=sums.device)
    for part in sums.split(chunk):
        fisher = part.double() / num_grads + damp * eye
        factor, info = torch.linalg.cholesky_ex(fisher)
        inverse = torch.cholesky_inverse(factor)
        failed = info.nonzero().reshape(-1)
        if len(failed):
            inverse[failed] = torch.linalg.inv(fisher[failed])
        part.copy_(inverse)
    return sums


def add_outer_products_(sums: torch.Tensor, grads: torch.Tensor) -> None:
    """``sums[b] += sum_k grads[k, b] grads[k, b]^T``: one batched matmul over the blocks for the
    ``k`` buffered gradients (k, blocks, B), instead of ``k`` passes over the Fisher sums."""
    per_block = grads.permute(1, 2, 0)  # (blocks, B, k), strided: a contiguous copy is slower
    sums.baddbmm_(per_block, per_block.transpose(1, 2))


def _block_sub_inverses(finv: torch.Tensor) -> torch.Tensor:
    """The 4x4 diagonal sub-blocks of each (B, B) inverse, one per 1x4 weight block: (d / 4, 4, 4)."""
    blocks, size, _ = finv.shape
    sub = torch.diagonal(finv.view(blocks, size // 4, 4, size // 4, 4), dim1=1, dim2=3)  # (n, 4, 4, B/4)
    return sub.permute(0, 3, 1, 2).reshape(-1, 4, 4)


def obs_scores(weight: torch.Tensor, finv: torch.Tensor, block4: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(one saliency per pruning unit, the vector whose F^-1 product is the OBS update if that unit goes).

    Unstructured: ``w_q^2 / (2 [F^-1]_qq)`` and ``w_q / [F^-1]_qq``; block4: ``w_b^T S_b^-1 w_b / 2``
    and ``S_b^-1 w_b`` with ``S_b`` the 4x4 sub-inverse of the block.
    """
    w = weight.detach().reshape(-1).double()
    if not block4:
        diag = finv.diagonal(dim1=1, dim2=2).reshape(-1).double()
        return w.pow(2) / (2 * diag), w / diag
    w_blocks = w.view(-1, 4, 1)
    solved = torch.linalg.solve(_block_sub_inverses(finv).double(), w_blocks)  # (d / 4, 4, 1)
    return 0.5 * (w_blocks * solved).sum((1, 2)), solved.reshape(-1)


def obs_update(weight: torch.Tensor, finv: torch.Tensor, direction: torch.Tensor, pruned: torch.Tensor) -> torch.Tensor:
    """The weight after the OBS step: minus ``F^-1`` times ``direction`` on the newly pruned
    weights, those weights set to exactly zero."""
    blocks, size, _ = finv.shape
    v = (direction * pruned.reshape(-1)).view(blocks, size, 1)
    delta = torch.bmm(finv.double(), v).reshape(weight.shape)
    return (weight.double() - delta).masked_fill(pruned, 0.0).to(weight.dtype)


def _linear_of(model: torch.nn.Module, name: str) -> torch.nn.Linear | None:
    """The ``nn.Linear`` whose weight ``name`` is, or None."""
    prefix, _, leaf = name.rpartition(".")
    module = model.get_submodule(prefix)
    return module if leaf == "weight" and isinstance(module, torch.nn.Linear) else None


def weight_grads(model: torch.nn.Module, batch: dict, names: list[str]) -> list[torch.Tensor]:
    """The loss gradient of each named weight for one batch, without any parameter's gradient.

    An ``nn.Linear`` weight's gradient is ``sum over calls of grad_out^T @ input`` (what the
    layer's own backward computes), so autograd differentiates w.r.t. the layers' outputs only:
    no gradient accumulates into a parameter, no DDP or ZeRO gradient hook fires, and under ZeRO-3
    no layer is gathered again for a backward that would stop at it. Any other parameter (refused
    under ZeRO-3) gets autograd's gradient directly.
    """
    params = dict(model.named_parameters())
    linears = {n: _linear_of(model, n) for n in names}
    calls: dict[torch.nn.Module, list] = {m: [] for m in linears.values() if m is not None}

    def keep(module, args, output):
        calls[module].append((args[0], output))

    handles = [m.register_forward_hook(keep) for m in calls]
    try:
        loss = model(**batch).loss
    finally:
        for handle in handles:
            handle.remove()
    outputs = [out for module_calls in calls.values() for _, out in module_calls]
    others = [params[n] for n, m in linears.items() if m is None]
    found = iter(torch.autograd.grad(loss, outputs + others))
    out_grads = {m: [next(found) for _ in module_calls] for m, module_calls in calls.items()}
    grads = []
    for module in linears.values():
        if module is None:
            grads.append(next(found))
            continue
        grads.append(sum(g.reshape(-1, g.shape[-1]).T @ x.reshape(-1, x.shape[-1])
                         for (x, _), g in zip(calls[module], out_grads[module])))
    return grads


def grad_batches_for(dataset, collator, seed: int, device, state: State) -> Callable[[int], Iterator[dict]]:
    """What ``State.grad_batches`` holds: ``f(batch_size)`` yields this rank's shard of ``dataset``
    in an order seeded by ``seed + state.step`` (a different sample at each pruning step, the same
    on a rerun or resume), reshuffled every pass, endlessly."""
    from torch.utils.data import DataLoader, Subset

    def batches(batch_size: int) -> Iterator[dict]:
        generator = torch.Generator().manual_seed(seed + state.step)
        while True:
            order = torch.randperm(len(dataset), generator=generator).tolist()
            shard = order[distributed.rank()::distributed.world_size()]
            for batch in DataLoader(Subset(dataset, shard), batch_size=batch_size, collate_fn=collator):
                yield {k: v.to(device) for k, v in batch.items()}

    return batches


@register
@dataclass(kw_only=True)
class OBSPruningModifier(GMPruningModifier):
    """SparseML's OBSPruningModifier: GMP's schedule, oBERT's choice of weights and weight update.

    ``num_recomputations`` splits each pruning step into that many rounds, the sparsity rising
    linearly from where the step starts to its target, gradients and inverse recomputed each round.
    """

    global_sparsity: bool = True
    num_grads: int = 1024
    damp: float = 1e-7
    fisher_block_size: int = 50
    grad_sampler_kwargs: dict = field(default_factory=dict)
    num_recomputations: int = 1

    def init_masks(self, state: State) -> None:
        params = dict(state.model.named_parameters())
        zero3 = state.accelerator is not None and distributed.zero_stage(state.accelerator) == 3
        for name in self.names:
            if params[name].numel() % self.fisher_block_size:
                self.fail("fisher_block_size", f"{self.fisher_block_size} does not divide {name} "
                                                f"({params[name].numel()} weights)")
            if zero3 and _linear_of(state.model, name) is None:
                self.fail("params", f"{name} is not an nn.Linear weight: under ZeRO-3 OBS takes gradients from "
                                    "the layers' inputs and outputs only")
        super().init_masks(state)

    def apply(self, event: Event, state: State) -> None:
        if event == Event.BATCH_START:  # not inside one ZeRO-3 gather: forward/backward would release it
            self.update_masks(state)
        else:
            super().apply(event, state)

    def update_masks(self, state: State) -> None:
        if state.grad_batches is None:
            raise RecipeError(f"{self.where}: needs training batches to sample gradients (State.grad_batches is unset)")
        with distributed.full_parameters(state.model, self.names if self.init_sparsity == FROM_PARAM else []):
            inits = self.init_sparsities(state)
        targets = [self.sparsity_at(state.step, state.steps_per_epoch, init) for init in inits]
        sharded = state.accelerator is not None and distributed.zero_stage(state.accelerator) is not None
        owners = (distributed.owners_by_size([self.masks[n].numel() for n in self.names]) if sharded
                  else [0] * len(self.names))
        start, began = self._current_sparsity(), time.perf_counter()
        state.logs.update({f"obs/{phase}_seconds": 0.0 for phase in OBS_PHASES})
        for round_index in range(1, self.num_recomputations + 1):
            fraction = round_index / self.num_recomputations
            self._prune_round(state, [s + (t - s) * fraction for s, t in zip(start, targets)], owners, sharded)
        state.logs["obs/step_seconds"] = time.perf_counter() - began

    def _current_sparsity(self) -> list[float]:
        """Where this step starts: one value (global) or one per tensor."""
        keeps = [self.masks[n] for n in self.names]
        if self.global_sparsity:
            return [1 - sum(int(k.sum()) for k in keeps) / sum(k.numel() for k in keeps)]
        return [1 - int(k.sum()) / k.numel() for k in keeps]

    @torch.no_grad()
    def _prune_round(self, state: State, sparsities: list[float], owners: list[int], sharded: bool) -> None:
        """One round. Replicated (DDP, one process): every rank scores everything, rank 0's updated
        weights are broadcast. ``sharded`` (ZeRO): only the owner of a tensor holds its Fisher blocks,
        scores it and updates it; scores are all-gathered, so every rank runs the same threshold on
        the same concatenation, and each updated weight is broadcast from its owner."""
        block4 = parse_mask_type(self.mask_type)[0] == "block"
        unit = 4 if block4 else 1
        holds = [not sharded or owner == distributed.rank() for owner in owners]
        finvs = self._fisher_inverses(state, holds, owners, sharded)
        began = time.perf_counter()
        params = dict(state.model.named_parameters())
        old = [self.masks[n] for n in self.names]
        weights, scored = {}, {}
        for i, name in enumerate(self.names):
            with distributed.full_parameters(state.model, [name]):  # ZeRO-3: one tensor whole at a time
                if holds[i]:
                    weights[i] = params[name].detach().clone()
            if holds[i]:
                score, direction = obs_scores(weights[i], finvs[i], block4)
                scored[i] = score.masked_fill(~old[i].reshape(-1, unit).any(1), -1.0), direction
        sizes = [k.numel() // unit for k in old]
        if sharded:
            scores = distributed.all_gather_owned({i: s for i, (s, _) in scored.items()}, sizes, owners)
        else:
            scores = [scored[i][0] for i in range(len(self.names))]
        if self.global_sparsity:
            units = torch.split(_prune_lowest(torch.cat(scores), sparsities[0]), sizes)
        else:
            units = [_prune_lowest(s, sparsity) for s, sparsity in zip(scores, sparsities)]
        keeps = [u.repeat_interleave(unit).reshape(k.shape) & k for u, k in zip(units, old)]
        updated = [obs_update(weights[i], finvs[i], scored[i][1], old[i] & ~keeps[i]) if holds[i]
                   else torch.empty(old[i].shape, dtype=params[name].dtype, device=old[i].device)
                   for i, name in enumerate(self.names)]
        del finvs, weights, scored
        state.logs["obs/scores_update_seconds"] += time.perf_counter() - began
        for owner in sorted(set(owners)):
            distributed.broadcast_([v for v, o in zip(updated, owners) if o == owner], src=owner)
        with distributed.full_parameters(state.model, self.names):
            for name, value in zip(self.names, updated):
                distributed.set_parameter_(params[name], value)
            self.set_masks(state, dict(zip(self.names, keeps)))

    def _fisher_inverses(self, state: State, holds: list[bool], owners: list[int], sharded: bool) -> dict:
        """The block-diagonal Fisher inverse (blocks, B, B) of each tensor this rank holds, by index,
        summed over every rank's samples.

        Gradients are buffered, up to ``GRAD_BUFFER_BYTES`` of them. Replicated: each buffer is added
        to this rank's sums of every tensor (one batched matmul per weight) and the sums are
        all-reduced at the end. Sharded: each buffer is gathered to the tensors' owners (one fused
        gather per owner), who add every rank's gradients; every rank runs the same number of
        forwards (under ZeRO-3 each one is a collective), the surplus ones counted as zero. The
        phases' seconds go to ``state.logs`` (obs/*_seconds; the gathers count as all_reduce), and
        the Fisher elements this rank holds to ``obs/fisher_elements``."""
        size, world = self.fisher_block_size, distributed.world_size()
        keeps = [self.masks[n] for n in self.names]
        numels = [k.numel() for k in keeps]
        sums = {i: torch.zeros(n // size, size, size, device=k.device)
                for i, (n, k, held) in enumerate(zip(numels, keeps, holds)) if held}
        share = self.num_grads // world + (distributed.rank() < self.num_grads % world)
        samples = -(-self.num_grads // world) if sharded else share
        depth = max(1, min(samples, GRAD_BUFFER_BYTES // (4 * sum(numels))))
        buffers = [torch.empty(depth, n // size, size, device=k.device) for n, k in zip(numels, keeps)]
        batches = state.grad_batches(self.grad_sampler_kwargs.get("batch_size", 8))
        model, was_training = state.model, state.model.training
        seconds = {"grads": 0.0, "fisher": 0.0, "all_reduce": 0.0}
        model.eval()  # no dropout in the samples, as SparseML
        try:
            for sample in range(samples):
                began = time.perf_counter()
                with torch.enable_grad():
                    grads = weight_grads(model, next(batches), self.names)
                for buffer, grad, keep in zip(buffers, grads, keeps):
                    if sample < share:
                        buffer[sample % depth].copy_((grad * keep).reshape(-1, size))
                    else:
                        buffer[sample % depth].zero_()
                filled = sample % depth + 1
                seconds["grads"] += time.perf_counter() - began
                if filled == depth or sample == samples - 1:
                    if sharded:
                        self._add_to_owners(sums, [b[:filled] for b in buffers], owners, seconds)
                    else:
                        began = time.perf_counter()
                        for i, total in sums.items():
                            add_outer_products_(total, buffers[i][:filled])
                        seconds["fisher"] += time.perf_counter() - began
        finally:
            model.train(was_training)
        del buffers
        began = time.perf_counter()
        if not sharded:
            distributed.all_reduce_sum_(list(sums.values()))
        seconds["all_reduce"] += time.perf_counter() - began
        began = time.perf_counter()
        finvs = {i: fisher_inverse_(s, self.num_grads, self.damp) for i, s in sums.items()}
        seconds["inverse"] = time.perf_counter() - began
        for phase, value in seconds.items():
            state.logs[f"obs/{phase}_seconds"] += value
        state.logs["obs/fisher_elements"] = sum(s.numel() for s in sums.values())
        return finvs

    def _add_to_owners(self, sums: dict, buffers: list[torch.Tensor], owners: list[int], seconds: dict) -> None:
        """Every rank's buffered gradients of each tensor added to its owner's sums: per owner, one
        gather of the tensors it owns, concatenated."""
        for owner in sorted(set(owners)):
            mine = [i for i, o in enumerate(owners) if o == owner]
            began = time.perf_counter()
            received = distributed.gather_to(torch.cat([buffers[i].flatten(1) for i in mine], 1), owner)
            seconds["all_reduce"] += time.perf_counter() - began
            began = time.perf_counter()
            for flat in received or []:
                for i, part in zip(mine, flat.split([buffers[i][0].numel() for i in mine], 1)):
                    add_outer_products_(sums[i], part.view(len(flat), -1, self.fisher_block_size))
            seconds["fisher"] += time.perf_counter() - began

    def timeline(self, steps_per_epoch: int) -> list[tuple[int, str]]:
        points = super().timeline(steps_per_epoch)
        step, text = points[0]
        batch = self.grad_sampler_kwargs.get("batch_size", 8)
        points[0] = (step, f"{text}; each update: {self.num_grads} gradients of batch {batch}, Fisher blocks of "
                           f"{self.fisher_block_size}, damp {self.damp:g}, {self.num_recomputations} round(s)")
        return points

    def validate(self) -> None:
        if self.mask_type not in OBS_MASK_TYPES:
            self.fail("mask_type", f"{self.mask_type!r}: OBS supports {', '.join(OBS_MASK_TYPES)}")
        super().validate()
        if self.num_grads < 1:
            self.fail("num_grads", f"{self.num_grads} must be at least 1")
        if self.fisher_block_size < 1:
            self.fail("fisher_block_size", f"{self.fisher_block_size} must be at least 1")
        if self.mask_type == "block4" and self.fisher_block_size % 4:
            self.fail("fisher_block_size", f"{self.fisher_block_size} is not a multiple of 4, as block4 needs")
        if not (self.damp > 0 and math.isfinite(self.damp)):
            self.fail("damp", f"{self.damp} must be positive")
        if self.num_recomputations < 1:
            self.fail("num_recomputations", f"{self.num_recomputations} must be at least 1")
        batch = self.grad_sampler_kwargs.get("batch_size", 8)
        if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
            self.fail("grad_sampler_kwargs", f"batch_size {batch!r} must be a positive integer")
        for key in sorted(set(self.grad_sampler_kwargs) - set(GRAD_SAMPLER_KEYS)):
            warnings.warn(f"{self.where}: grad_sampler_kwargs.{key} is ignored (only batch_size is used)", stacklevel=2)
