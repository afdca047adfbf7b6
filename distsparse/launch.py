"""How a job is launched: the Accelerator (DDP or DeepSpeed, as ``accelerate launch`` configured
it) and the teacher (frozen, or ZeRO-3 partitioned). What keeps ranks *agreeing* afterwards lives in
``distributed.py``; this module only builds.
"""
from __future__ import annotations

import copy
import os

from . import compat, tracking
from .distributed import full_parameters, zero_stage
from .errors import UserError
from .extras import require
from .savedmodel import from_pretrained

FSDP_REFUSED = ("FSDP is not supported yet: masks and the rank-consistency check do not follow FSDP's "
                "sharded parameters; launch with launch_configs/deepspeed_zero2.yaml or deepspeed_zero3.yaml")


def make_accelerator(args):
    """The Accelerator for ``args``: DDP or DeepSpeed, as ``accelerate launch`` configured the run.

    Under DeepSpeed it holds two plugins, "student" (active) and "teacher", both built from the
    launch config; ``prepare_teacher`` uses the second one only under ZeRO-3. DDP's buffer
    broadcast is off: our observer sync keeps buffers equal, and DDP copying rank 0's buffers
    over the others' would hide a bug from the consistency check.
    """
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        raise UserError(FSDP_REFUSED)
    from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs, PartialState
    from accelerate.utils import DeepSpeedPlugin

    plugins = None
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        require("deepspeed", "deepspeed", "a DeepSpeed launch")
        from deepspeed.accelerator import get_accelerator

        if get_accelerator().device_name() == "cpu":  # DS_ACCELERATOR=cpu, or no GPU found
            PartialState(backend="gloo")  # without it Accelerate finds no backend and runs one process
        # --max_grad_norm fills the config's "auto" (DeepSpeed clips inside its step; 0 turns it off).
        plugins = {key: DeepSpeedPlugin(gradient_clipping=args.max_grad_norm) for key in ("student", "teacher")}
        # The teacher is prepared without a dataloader, so its micro batch cannot stay "auto".
        plugins["teacher"].deepspeed_config["train_micro_batch_size_per_gpu"] = args.per_device_train_batch_size
    return Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=tracking.log_with(args.report_to),
        project_dir=args.output_dir,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
        kwargs_handlers=[DistributedDataParallelKwargs(broadcast_buffers=False)],
        deepspeed_plugins=plugins,
    )


def load_teacher(args, model, model_class, model_kwargs: dict):
    """``--teacher``: None, a frozen copy of the starting model ("self"), or a model folder/Hub name."""
    if args.teacher in (None, "", "disable"):
        return None
    if args.teacher == "self":
        with full_parameters(model):  # ZeRO-3 loads partitioned (zero.Init): copy whole weights
            teacher = copy.deepcopy(model)
    else:
        teacher = from_pretrained(model_class, args.teacher, **model_kwargs)
    return teacher.eval().requires_grad_(False)


def prepare_teacher(accelerator, teacher):
    """The teacher for inference on every rank: frozen, in eval mode, never wrapped for gradient sync.

    DDP and ZeRO-1/2: a whole frozen copy on the device (Accelerate adds autocast for mixed
    precision). ZeRO-3: a DeepSpeed inference engine from the "teacher" plugin, so each rank keeps
    1/world_size of the teacher's parameters, gathered layer by layer in its forward.

    Why Accelerate's multiple DeepSpeed plugins rather than TRL's direct ``deepspeed.initialize``
    with a copied config: the teacher takes the very ZeRO-3 settings the user launched with
    (offload, buckets, precision), Accelerate fills their "auto" values and keeps one process
    group and one device setup; ``accelerator.backward`` keeps stepping the student's engine.
    Either way the teacher is taken out of Accelerate's model list: checkpoints must not write
    (nor restore) a frozen teacher that ``--teacher`` reloads anyway.
    """
    if teacher is None:
        return None
    teacher.eval().requires_grad_(False)
    if zero_stage(accelerator) == 3:
        accelerator.state.select_deepspeed_plugin("teacher")
        try:
            prepared = accelerator.prepare(teacher)
        finally:
            accelerator.state.select_deepspeed_plugin("student")
    else:
        prepared = accelerator.prepare_model(teacher, evaluation_mode=True)
    compat.forget_prepared_model(accelerator, prepared)
    prepared.eval()  # DeepSpeedEngine.eval() returns None
    if zero_stage(accelerator) == 3:
        params = list(prepared.module.parameters())
        local, total = sum(map(compat.local_numel, params)), sum(map(compat.zero3_numel, params))
        accelerator.print(f"teacher: ZeRO-3 partitioned, rank 0 holds {local / total:.1%} of its {total:,} parameters")
    return prepared
