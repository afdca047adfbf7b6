"""Rank consistency: everything that makes the recipe act identically on every rank lives here.

Modifiers never talk to torch.distributed or DeepSpeed themselves; they call these functions,
which are no-ops in a single process:

- ``broadcast_`` / ``all_reduce_min_max_`` / ``all_reduce_sum_``: the fused collectives masks,
  observers and OBS's Fisher sums use;
- ``owners_by_size`` / ``gather_to`` / ``all_gather_owned``: whole tensors assigned to ranks, and
  what OBS under ZeRO sends to and gathers from their owners;
- ``full_parameters`` / ``mask_parameter_`` / ``set_parameter_``: read and write weights wherever
  this rank keeps them (plain tensor, ZeRO-3 partition, DeepSpeed's fp32 master copy);
- ``check_rank_consistency``: digests of masks, quantization parameters and replicated weights,
  compared across ranks.

``SYNC`` can be switched off (``--debug_disable_rank_sync``) only to prove that the consistency
check catches what it claims to catch.
"""
from __future__ import annotations

import hashlib
import os
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

from . import compat

SYNC = True
DUMP_ENV = "DISTSPARSE_DUMP_RANK_STATE"  # test hook, see _dump


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _active() -> bool:
    return SYNC and world_size() > 1


def _device() -> torch.device:
    """Where this rank's small control tensors must live for the backend (NCCL: its GPU)."""
    if dist.get_backend() == "gloo":
        return torch.device("cpu")
    from accelerate import PartialState

    return PartialState().device


# -- collectives ------------------------------------------------------------------------------------
def broadcast_(tensors: list[torch.Tensor], src: int = 0) -> None:
    """Overwrite ``tensors`` in place with rank ``src``'s values, one fused collective per dtype.

    Bool masks travel as uint8: one byte per weight, what every backend can broadcast.
    """
    if not _active() or not tensors:
        return
    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault(torch.uint8 if t.dtype == torch.bool else t.dtype, []).append(t)
    for wire, group in groups.items():
        flat = torch.cat([t.detach().reshape(-1).to(wire) for t in group])
        dist.broadcast(flat, src)
        for t, part in zip(group, flat.split([t.numel() for t in group])):
            t.copy_(part.view_as(t).to(t.dtype))


def all_reduce_min_max_(mins: torch.Tensor, maxs: torch.Tensor) -> None:
    """Global MIN of ``mins`` and MAX of ``maxs`` in place, as one collective (MAX over [-min, max])."""
    if not _active():
        return
    flat = torch.cat([-mins.reshape(-1), maxs.reshape(-1)]).to(torch.float32)
    dist.all_reduce(flat, op=dist.ReduceOp.MAX)
    n = mins.numel()
    mins.copy_((-flat[:n]).view_as(mins))
    maxs.copy_(flat[n:].view_as(maxs))


def all_reduce_sum_(tensors: list[torch.Tensor], bucket_numel: int = 1 << 26) -> None:
    """Sum ``tensors`` across ranks in place, fused into buckets of about ``bucket_numel`` elements
    (one collective per bucket: OBS's Fisher sums of a BERT-base are ~4e9 elements, a single
    concatenated copy would double the memory they take)."""
    if not _active() or not tensors:
        return
    bucket: list[torch.Tensor] = []
    for i, t in enumerate(tensors):
        bucket.append(t)
        if i == len(tensors) - 1 or sum(b.numel() for b in bucket) + tensors[i + 1].numel() > bucket_numel:
            flat = torch.cat([b.reshape(-1) for b in bucket]) if len(bucket) > 1 else bucket[0].reshape(-1).clone()
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            for b, part in zip(bucket, flat.split([b.numel() for b in bucket])):
                b.copy_(part.view_as(b))
            bucket = []


def owners_by_size(sizes: list[int]) -> list[int]:
    """The rank that owns each tensor: largest first to the least-loaded rank (ties to the lower
    index and rank), so each holds about 1/N of the elements and no tensor is cut between ranks.
    Deterministic, the same on every rank. Without rank sync every rank owns everything."""
    if not _active():
        return [rank()] * len(sizes)
    load, owners = [0] * world_size(), [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        owners[i] = min(range(world_size()), key=lambda r: (load[r], r))
        load[owners[i]] += sizes[i]
    return owners


def gather_to(tensor: torch.Tensor, dst: int) -> list[torch.Tensor] | None:
    """Every rank's ``tensor`` (same shape everywhere) on rank ``dst``, in rank order; None elsewhere."""
    if not _active():
        return [tensor]
    received = [torch.empty_like(tensor) for _ in range(world_size())] if rank() == dst else None
    dist.gather(tensor.contiguous(), received, dst=dst)
    return received


def all_gather_owned(owned: dict[int, torch.Tensor], sizes: list[int], owners: list[int]) -> list[torch.Tensor]:
    """Each rank holds the 1-D tensors ``owned`` (index -> ``sizes[index]`` elements) of the indices
    ``owners`` gives it; every rank gets all of them, in index order: one all_gather of the ranks'
    concatenations as float64 (OBS's scores), padded to the longest (no pickling)."""
    if not _active():
        return [owned[i] for i in range(len(sizes))]
    lengths = [sum(n for n, o in zip(sizes, owners) if o == r) for r in range(world_size())]
    flat = torch.zeros(max(lengths), dtype=torch.float64,
                       device=next(iter(owned.values())).device if owned else _device())
    if owned:
        mine = torch.cat([owned[i] for i in sorted(owned)])
        flat[:len(mine)] = mine
    everyone = [torch.empty_like(flat) for _ in range(world_size())]
    dist.all_gather(everyone, flat)
    offsets, out = [0] * world_size(), []
    for n, r in zip(sizes, owners):
        out.append(everyone[r][offsets[r]:offsets[r] + n])
        offsets[r] += n
    return out


def any_rank(flag: bool) -> bool:
    """True on every rank if it is true on any (a preemption signal may reach only one process)."""
    if world_size() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


# -- weights wherever they live -----------------------------------------------------------------------
@contextmanager
def full_parameters(model: torch.nn.Module, names=None):
    """Inside, ``names`` (all if None) hold their whole values on every rank: under ZeRO-3 they are
    gathered (a collective: every rank must enter), read-only, and partitioned again on exit."""
    wanted = None if names is None else set(names)
    params = [p for n, p in model.named_parameters() if wanted is None or n in wanted]
    if not any(compat.is_zero3(p) for p in params):
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params):
        yield


def _zero3_slice(full: torch.Tensor, partition: torch.Tensor) -> torch.Tensor:
    """This rank's slice of a flattened ``full``, as ZeRO-3 partitions: equal slices in rank order,
    the last one short (its partition is padded). Assumes data parallelism over all ranks."""
    size = partition.numel()
    return full.reshape(-1)[rank() * size:(rank() + 1) * size].to(partition.device)


def _zero3_local(keep: torch.Tensor, partition: torch.Tensor) -> torch.Tensor:
    """``_zero3_slice`` of a mask, padded to the partition with True (padding kept; it is never used)."""
    flat = _zero3_slice(keep, partition)
    size = partition.numel()
    return torch.cat([flat, flat.new_ones(size - flat.numel())]) if flat.numel() < size else flat


@torch.no_grad()
def mask_parameter_(param: torch.nn.Parameter, keep: torch.Tensor, multiplier: torch.Tensor | None = None) -> None:
    """Zero what ``keep`` prunes in every copy of ``param`` this rank holds, without collectives.

    The next forward must see zeros and so must the next optimizer step, which under DeepSpeed
    starts from its own fp32 master copy (masking ``param.data`` alone is undone at the next step):
    - the parameter itself when it holds the whole tensor (DDP, ZeRO-1/2, ZeRO-3 persistent or
      gathered parameters);
    - ZeRO-3: the partition ``ds_tensor`` (gathered for each forward) and the fp32 master partition
      (``deepspeed.utils.safe_get/set_local_fp32_param``); ZeRO++'s secondary partitions
      (hpZ) are not handled;
    - ZeRO-1/2: the fp32 master fragment this rank owns (``param._hp_mapping``; DeepSpeed has no
      local setter, and ``safe_get_full_fp32_param`` would be one all-reduce per tensor).
    ``multiplier`` (``keep`` as 0/1 in the parameter's dtype) makes the whole-tensor case one multiply.
    """
    if param.numel() == keep.numel():
        if multiplier is not None:
            param.data.mul_(multiplier)
        else:
            param.data.masked_fill_(~keep.to(param.device), 0.0)
    partition = compat.zero3_partition(param)
    if partition is not None:
        local = _zero3_local(keep, partition)
        partition.data.masked_fill_(~local, 0.0)
        if compat.zero3_has_master(param):
            from deepspeed.utils import safe_get_local_fp32_param, safe_set_local_fp32_param

            master = safe_get_local_fp32_param(param)
            safe_set_local_fp32_param(param, master.masked_fill(~local.to(master.device), 0.0))
    fragment = compat.zero12_master_fragment(param)
    if fragment is not None:
        master, start, numel = fragment
        local = keep.reshape(-1).narrow(0, start, numel)
        master.data.masked_fill_(~local.to(master.device), 0.0)


@torch.no_grad()
def set_parameter_(param: torch.nn.Parameter, value: torch.Tensor) -> None:
    """Write the whole ``value`` (the same on every rank) into every copy of ``param`` this rank
    holds, without collectives; the copies are those of ``mask_parameter_`` (OBS's weight update
    must reach DeepSpeed's fp32 master copy, or the next optimizer step undoes it). ZeRO-3 padding
    is left as it was."""
    if param.numel() == value.numel():
        param.data.copy_(value.view_as(param))
    partition = compat.zero3_partition(param)
    if partition is not None:
        local = _zero3_slice(value, partition)
        partition.data[:local.numel()].copy_(local)
        if compat.zero3_has_master(param):
            from deepspeed.utils import safe_get_local_fp32_param, safe_set_local_fp32_param

            master = safe_get_local_fp32_param(param).clone()
            master[:local.numel()] = local.to(master.device)
            safe_set_local_fp32_param(param, master)
    fragment = compat.zero12_master_fragment(param)
    if fragment is not None:
        master, start, numel = fragment
        master.data.copy_(value.reshape(-1).narrow(0, start, numel).to(master.device))


def zero_stage(accelerator) -> int | None:
    """The ZeRO stage of the active DeepSpeed plugin (the student's outside ``prepare_teacher``);
    None without DeepSpeed."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return None
    return int(accelerator.state.deepspeed_plugin.zero_stage)


# -- the check ---------------------------------------------------------------------------------------------
class RankMismatch(RuntimeError):
    """Ranks disagree on a tensor the recipe says must be identical everywhere."""


def _digest(t: torch.Tensor) -> int:
    data = t.detach().cpu().contiguous().reshape(-1)
    if data.dtype == torch.bool:
        data = data.to(torch.uint8)
    return int.from_bytes(hashlib.blake2b(data.view(torch.uint8).numpy().tobytes(), digest_size=8).digest(),
                          "little", signed=True)


def _flatten(prefix: str, value, out: list) -> None:
    if isinstance(value, torch.Tensor):
        out.append((prefix, value))
    elif isinstance(value, dict):
        for k in sorted(value, key=str):
            _flatten(f"{prefix}.{k}" if prefix else str(k), value[k], out)


def consistency_tensors(model, modifiers, include_weights: bool, teacher=None) -> list[tuple[str, torch.Tensor]]:
    """Every tensor that must be bitwise equal on all ranks: modifier state (masks, observer
    statistics), scales/zero-points, and with ``include_weights`` the student's and the (frozen)
    teacher's weights."""
    tensors: list = []
    for i, m in enumerate(modifiers):
        _flatten(f"{type(m).__name__}[{i}]", m.state_dict(), tensors)
    # Every fake-quant scale and zero point, found by buffer name (fake_quant imports this module).
    _flatten("qparams", {n: b for n, b in model.named_buffers() if n.endswith((".scale", ".zero_point"))}, tensors)
    if include_weights:
        tensors += [(f"weight.{n}", p) for n, p in model.named_parameters()]
        if teacher is not None:
            tensors += [(f"teacher.{n}", p) for n, p in teacher.named_parameters()]
    return tensors


def check_rank_consistency(model, modifiers, accelerator, teacher=None) -> int:
    """Compare digests across ranks; raise ``RankMismatch`` naming the first tensor that differs.

    Weights are compared where every rank holds them whole: DDP and ZeRO-1/2 (whose 16/32-bit
    parameters are all-gathered after every step; only optimizer state is sharded). Under ZeRO-3
    each rank holds a different partition, so only masks (GMP's, and OBS's, whose updated weights
    every rank writes from one broadcast value) and quantization state are compared.
    Collective: call on every rank. Returns the number of tensors compared.
    """
    replicated = zero_stage(accelerator) != 3
    tensors = consistency_tensors(accelerator.unwrap_model(model), modifiers, replicated, teacher)
    _dump(tensors, teacher)
    if world_size() == 1:
        return len(tensors)
    mine = torch.tensor([_digest(t) for _, t in tensors], dtype=torch.int64, device=_device())
    everyone = [torch.empty_like(mine) for _ in range(world_size())]
    dist.all_gather(everyone, mine)
    for r, theirs in enumerate(everyone):
        differs = (theirs != everyone[0]).nonzero()
        if len(differs):
            name = tensors[int(differs[0])][0]
            raise RankMismatch(f"rank consistency: FAILED: {name} differs between rank 0 and rank {r}")
    return len(tensors)


def _dump(tensors: list[tuple[str, torch.Tensor]], teacher) -> None:
    """Test hook: with ``DISTSPARSE_DUMP_RANK_STATE=DIR`` every rank writes what it just digested to
    ``DIR/rank{N}.safetensors`` (overwritten at each check), plus how many of the teacher's
    elements it holds and whether the teacher is in training mode, so tests compare real values."""
    folder = os.environ.get(DUMP_ENV)
    if not folder:
        return
    from safetensors.torch import save_file

    out = {name: t.detach().cpu().contiguous().clone() for name, t in tensors}
    if teacher is not None:
        params = list(teacher.parameters())
        out["teacher_numel"] = torch.tensor(sum(compat.zero3_numel(p) for p in params))
        out["teacher_local_numel"] = torch.tensor(sum(compat.local_numel(p) for p in params))
        module = getattr(teacher, "module", teacher)  # a DeepSpeed engine's own flag is never used
        out["teacher_training"] = torch.tensor(any(m.training for m in module.modules()))
    Path(folder).mkdir(parents=True, exist_ok=True)
    save_file(out, str(Path(folder) / f"rank{rank()}.safetensors"))
