"""Every private API of another library that distsparse relies on, fenced here and nowhere else.

Each function names the upstream version it was written against. ``tests/test_compat.py`` checks
every one of them against the installed libraries, so an upgrade that moves one fails that test by
name instead of leaving a run silently wrong (masks not reaching DeepSpeed's master weights, a
teacher saved into checkpoints, observers' buffers broadcast by DDP).
"""
from __future__ import annotations

import argparse

import torch

# Written against: accelerate 1.15.0, deepspeed 0.19.8, torch 2.13.0 (the versions tests/test_compat.py pins down).


# -- accelerate -------------------------------------------------------------------------------------
def forget_prepared_model(accelerator, model) -> None:
    """Take ``model`` out of the models ``save_state``/``load_state`` handle (accelerate 1.15:
    ``Accelerator._models``): a frozen teacher is reloaded from ``--teacher``, never checkpointed."""
    accelerator._models.remove(model)


# -- torch ------------------------------------------------------------------------------------------
DDP_IGNORE = "_ddp_params_and_buffers_to_ignore"  # torch 2.13: read by DistributedDataParallel.__init__


def ddp_ignore_buffers(model: torch.nn.Module, names: list[str]) -> None:
    """Keep DDP from broadcasting these buffers (fake-quant statistics we all-reduce ourselves)."""
    setattr(model, DDP_IGNORE, [*getattr(model, DDP_IGNORE, []), *names])


def argparse_dests(parser: argparse.ArgumentParser) -> set[str]:
    """Every destination a parser fills (``ArgumentParser._actions``, stable since Python 3.2)."""
    return {action.dest for action in parser._actions}


# -- deepspeed ----------------------------------------------------------------------------------------
# Plain classes DeepSpeed 0.19 pickles into its checkpoints (beside tensors and builtins); the only
# globals besides torch's weights_only set that a checkpoint may reference (checkpoint.check_pickle).
DEEPSPEED_CHECKPOINT_GLOBALS = frozenset({
    "deepspeed.runtime.zero.config.ZeroStageEnum",  # an Enum: rebuilt by value
    "deepspeed.utils.tensor_fragment.fragment_address",  # a dataclass of two ints
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",  # plain attributes
})


# -- deepspeed: where a ZeRO parameter keeps its values (deepspeed 0.19) ---------------------------------
def is_zero3(param) -> bool:
    """ZeRO-3 partitioned parameters carry ``ds_id`` (``deepspeed.zero.Init``)."""
    return hasattr(param, "ds_id")


def zero3_partition(param) -> torch.Tensor | None:
    """This rank's flat slice of a ZeRO-3 parameter (``param.ds_tensor``), or None."""
    return getattr(param, "ds_tensor", None)


def zero3_numel(param) -> int:
    """The whole parameter's element count (``param.ds_numel`` under ZeRO-3)."""
    return getattr(param, "ds_numel", param.numel())


def local_numel(param) -> int:
    """How many of the parameter's elements this rank holds (its ZeRO-3 slice, else all)."""
    partition = zero3_partition(param)
    return param.numel() if partition is None else partition.numel()


def zero3_has_master(param) -> bool:
    """Whether a ZeRO-3 optimizer holds an fp32 master partition for ``param`` (``_z3_optimizer``)."""
    return getattr(param, "_z3_optimizer", None) is not None and param.requires_grad


def zero12_master_fragment(param) -> tuple[torch.Tensor, int, int] | None:
    """ZeRO-1/2: (this rank's fp32 master fragment, its start in the flat parameter, its length),
    from ``param._hp_mapping`` (``deepspeed.utils.tensor_fragment``); None without one."""
    mapping = getattr(param, "_hp_mapping", None)
    if mapping is None:
        return None
    where = mapping.lp_fragment_address
    return mapping.hp_fragment, where.start, where.numel
