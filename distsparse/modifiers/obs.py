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

Across ranks the sum also splits where Woodbury's sequence cannot: each rank adds the outer
products of its share of the ``num_grads`` samples (its own data shard, forward/backward on the
unwrapped model, so DDP's reducer never runs), one fused all-reduce sums them, and every rank
inverts the same matrix; masks and updated weights are then broadcast from rank 0, so they are
bitwise equal everywhere. Memory per rank: ``4 * d * B`` bytes for ``d`` pruned weights at block
size ``B``, plus the gradient buffer (at most ``GRAD_BUFFER_BYTES``).
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
from ..events import State
from .base import register
from .pruning import GMPruningModifier, _prune_lowest, parse_mask_type

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
        if state.accelerator is not None and distributed.zero_stage(state.accelerator) is not None:
            raise RecipeError(f"{self.where}: not supported under DeepSpeed (its weight update would have to reach "
                              "ZeRO's fp32 master copies); launch with DDP")
        params = dict(state.model.named_parameters())
        for name in self.names:
            if params[name].numel() % self.fisher_block_size:
                self.fail("fisher_block_size", f"{self.fisher_block_size} does not divide {name} "
                                                f"({params[name].numel()} weights)")
        super().init_masks(state)

    def update_masks(self, state: State) -> None:
        if state.grad_batches is None:
            raise RecipeError(f"{self.where}: needs training batches to sample gradients (State.grad_batches is unset)")
        params = dict(state.model.named_parameters())
        weights = [params[n] for n in self.names]
        targets = [self.sparsity_at(state.step, state.steps_per_epoch, init) for init in self.init_sparsities(state)]
        start, began = self._current_sparsity(), time.perf_counter()
        state.logs.update({f"obs/{phase}_seconds": 0.0 for phase in OBS_PHASES})
        for round_index in range(1, self.num_recomputations + 1):
            fraction = round_index / self.num_recomputations
            self._prune_round(state, weights, [s + (t - s) * fraction for s, t in zip(start, targets)])
        state.logs["obs/step_seconds"] = time.perf_counter() - began

    def _current_sparsity(self) -> list[float]:
        """Where this step starts: one value (global) or one per tensor."""
        keeps = [self.masks[n] for n in self.names]
        if self.global_sparsity:
            return [1 - sum(int(k.sum()) for k in keeps) / sum(k.numel() for k in keeps)]
        return [1 - int(k.sum()) / k.numel() for k in keeps]

    @torch.no_grad()
    def _prune_round(self, state: State, weights: list[torch.Tensor], sparsities: list[float]) -> None:
        block4 = parse_mask_type(self.mask_type)[0] == "block"
        finvs = self._fisher_inverses(state, weights)
        began = time.perf_counter()
        old = [self.masks[n] for n in self.names]
        scored = [obs_scores(w, f, block4) for w, f in zip(weights, finvs)]
        unit = 4 if block4 else 1
        scores = [s.masked_fill(~k.reshape(-1, unit).any(1), -1.0) for (s, _), k in zip(scored, old)]
        if self.global_sparsity:
            units = torch.split(_prune_lowest(torch.cat(scores), sparsities[0]), [len(s) for s in scores])
        else:
            units = [_prune_lowest(s, sparsity) for s, sparsity in zip(scores, sparsities)]
        keeps = [u.repeat_interleave(unit).reshape(w.shape) & k for u, w, k in zip(units, weights, old)]
        updated = [obs_update(w, f, d, k_old & ~k_new)
                   for w, f, (_, d), k_old, k_new in zip(weights, finvs, scored, old, keeps)]
        state.logs["obs/scores_update_seconds"] += time.perf_counter() - began
        distributed.broadcast_(updated, src=0)
        for weight, value in zip(weights, updated):
            weight.data.copy_(value)
        self.set_masks(state, dict(zip(self.names, keeps)))

    def _fisher_inverses(self, state: State, weights: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each weight's block-diagonal Fisher inverse (blocks, B, B), summed over every rank's samples.

        Gradients are buffered, up to ``GRAD_BUFFER_BYTES`` of them, and added to the sums as one
        batched matmul per weight; the phases' seconds go to ``state.logs`` (obs/*_seconds)."""
        size = self.fisher_block_size
        sums = [torch.zeros(w.numel() // size, size, size, device=w.device) for w in weights]
        keeps = [self.masks[n] for n in self.names]
        share = self.num_grads // distributed.world_size() + (distributed.rank() < self.num_grads % distributed.world_size())
        depth = max(1, min(share, GRAD_BUFFER_BYTES // (4 * sum(w.numel() for w in weights))))
        buffers = [torch.empty(depth, w.numel() // size, size, device=w.device) for w in weights]
        batches = state.grad_batches(self.grad_sampler_kwargs.get("batch_size", 8))
        model, was_training = state.model, state.model.training
        seconds = {"grads": 0.0, "fisher": 0.0}
        model.eval()  # no dropout in the samples, as SparseML
        try:
            for sample in range(share):
                began = time.perf_counter()
                with torch.enable_grad():
                    grads = torch.autograd.grad(model(**next(batches)).loss, weights)
                for buffer, grad, keep in zip(buffers, grads, keeps):
                    buffer[sample % depth].copy_((grad * keep).reshape(-1, size))
                filled = sample % depth + 1
                seconds["grads"] += time.perf_counter() - began
                if filled == depth or sample == share - 1:
                    began = time.perf_counter()
                    for total, buffer in zip(sums, buffers):
                        add_outer_products_(total, buffer[:filled])
                    seconds["fisher"] += time.perf_counter() - began
        finally:
            model.train(was_training)
        del buffers
        began = time.perf_counter()
        distributed.all_reduce_sum_(sums)
        seconds["all_reduce"] = time.perf_counter() - began
        began = time.perf_counter()
        finvs = [fisher_inverse_(s, self.num_grads, self.damp) for s in sums]
        seconds["inverse"] = time.perf_counter() - began
        for phase, value in seconds.items():
            state.logs[f"obs/{phase}_seconds"] += value
        return finvs

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
