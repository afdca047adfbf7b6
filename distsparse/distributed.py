"""Rank consistency: everything that makes the recipe act identically on every rank lives here.

Modifiers never talk to torch.distributed themselves; they call these functions, which are
no-ops in a single process. ``SYNC`` can be switched off (``--debug_disable_rank_sync``) only to
prove that the consistency check catches what it claims to catch.
"""
from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist

SYNC = True


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _active() -> bool:
    return SYNC and world_size() > 1


def broadcast_(tensors: list[torch.Tensor], src: int = 0) -> None:
    """Overwrite ``tensors`` in place with rank ``src``'s values, in one fused collective."""
    if not _active() or not tensors:
        return
    flat = torch.cat([t.detach().reshape(-1).to(torch.float32) for t in tensors])
    dist.broadcast(flat, src)
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view_as(t).to(t.dtype))
        offset += n


def all_reduce_min_max_(mins: torch.Tensor, maxs: torch.Tensor) -> None:
    """Global MIN of ``mins`` and MAX of ``maxs`` in place, as one collective (MAX over [-min, max])."""
    if not _active():
        return
    flat = torch.cat([-mins.reshape(-1), maxs.reshape(-1)]).to(torch.float32)
    dist.all_reduce(flat, op=dist.ReduceOp.MAX)
    n = mins.numel()
    mins.copy_((-flat[:n]).view_as(mins))
    maxs.copy_(flat[n:].view_as(maxs))


def any_rank(flag: bool) -> bool:
    """True on every rank if it is true on any (a preemption signal may reach only one process)."""
    if world_size() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def prepare_teacher(accelerator, teacher):
    """A frozen teacher in eval mode on the right device, never wrapped for gradient sync."""
    if teacher is None:
        return None
    return accelerator.prepare_model(teacher, evaluation_mode=True).eval()


class RankMismatch(RuntimeError):
    """Ranks disagree on a tensor the recipe says must be identical everywhere."""


def _digest(t: torch.Tensor) -> int:
    data = t.detach().cpu().contiguous().reshape(-1)
    if data.dtype == torch.bool:
        data = data.to(torch.uint8)
    return int.from_bytes(hashlib.blake2b(data.view(torch.uint8).numpy().tobytes(), digest_size=8).digest(), "little", signed=True)


def _flatten(prefix: str, value, out: list) -> None:
    if isinstance(value, torch.Tensor):
        out.append((prefix, value))
    elif isinstance(value, dict):
        for k in sorted(value, key=str):
            _flatten(f"{prefix}.{k}" if prefix else str(k), value[k], out)


def consistency_tensors(model, modifiers, include_weights: bool) -> list[tuple[str, torch.Tensor]]:
    """Every tensor that must be bitwise equal on all ranks: masks, quantization parameters, weights."""
    from .fake_quant import qparams

    tensors: list = []
    for i, m in enumerate(modifiers):
        _flatten(f"{type(m).__name__}[{i}]", m.state_dict(), tensors)
    _flatten("qparams", qparams(model), tensors)
    if include_weights:
        tensors += [(f"weight.{n}", p) for n, p in model.named_parameters()]
    return tensors


def check_rank_consistency(model, modifiers, accelerator) -> int:
    """Compare digests of masks, scales/zero-points and (DDP) weights across ranks; raise on the first mismatch."""
    from accelerate.utils import DistributedType

    include_weights = accelerator.distributed_type != DistributedType.DEEPSPEED
    tensors = consistency_tensors(accelerator.unwrap_model(model), modifiers, include_weights)
    mine = torch.tensor([_digest(t) for _, t in tensors], dtype=torch.int64)
    if world_size() > 1:
        everyone = [torch.empty_like(mine) for _ in range(world_size())]
        dist.all_gather(everyone, mine)
        for r, theirs in enumerate(everyone):
            differs = (theirs != everyone[0]).nonzero()
            if len(differs):
                name = tensors[int(differs[0])][0]
                raise RankMismatch(f"rank consistency: FAILED: {name} differs between rank 0 and rank {r}")
    return len(tensors)
