"""Experiment tracking through Accelerate's trackers: one W&B run per job, continued on resume.

Accelerate starts a tracker on the main process only, so an N-rank job makes one run. The other ranks
never see ``wandb.config``: all they need comes from the command line (a sweep agent's
``--recipe.NAME=value`` reaches the recipe through ``args.py``). The run id is kept in the checkpoint
(``Run.tracking_ids``) so that a resumed or requeued job logs into the same run.
"""
from __future__ import annotations

import os
from pathlib import Path

from .extras import require
from .savedmodel import RECIPE_FILE

RUN_ID = "wandb_run_id"


def log_with(report_to: str) -> str | None:
    """``Accelerator(log_with=...)`` for ``--report_to``; fails before any data or model is loaded."""
    if report_to == "none":
        return None
    # Accelerate silently drops a tracker whose package is missing; we would rather say so at start.
    require(report_to, report_to, f"--report_to {report_to}")
    return report_to


def start(accelerator, args, config: dict, recipe, ids: dict) -> None:
    """Start the run with the job's config and save the resolved recipe with it.

    ``ids`` is the checkpointed ``Run.tracking_ids``: it holds the run id of the job being resumed,
    and receives the id of the run started now.
    """
    if not accelerator.log_with:
        return
    config = {**config, "distributed_type": str(accelerator.distributed_type),
              "backend": accelerator.state.backend}
    if args.report_to == "tensorboard":  # TensorBoard's hparams take scalars only
        config = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in config.items()}
    # A sweep agent names the sweep's project in WANDB_PROJECT; a run elsewhere would leave the sweep.
    project = args.wandb_project or os.environ.get("WANDB_PROJECT", "distsparse")
    accelerator.init_trackers(project, config=config,
                              init_kwargs={"wandb": wandb_init_kwargs(args, ids.get(RUN_ID))})
    if args.report_to == "wandb" and accelerator.is_main_process:
        run = accelerator.get_tracker("wandb", unwrap=True)
        ids[RUN_ID] = run.id
        path = Path(run.dir) / RECIPE_FILE
        path.write_text(recipe.to_yaml(config))
        run.save(str(path), base_path=run.dir, policy="now")


def wandb_init_kwargs(args, run_id: str | None) -> dict:
    """``wandb.init`` arguments; with no id W&B takes ``WANDB_RUN_ID`` (set by sweep agents) or makes one."""
    folder = os.environ.get("WANDB_DIR") or args.output_dir
    Path(folder).mkdir(parents=True, exist_ok=True)
    return {"name": args.run_name, "entity": args.wandb_entity, "group": args.wandb_group,
            "tags": args.wandb_tags.split(",") if args.wandb_tags else None,
            "id": run_id, "resume": "allow", "dir": folder}


def log(accelerator, logs: dict, step: int) -> None:
    if accelerator.log_with:
        accelerator.log(logs, step=step)


def log_report(accelerator, pictures: list[Path], columns: list[str], rows: list[list], step: int) -> None:
    """With W&B on: the job's pictures as ``wandb.Image`` and the per-layer sparsity as a ``wandb.Table``
    (``report/...`` keys), at the last step. Other trackers take scalars only, so they get none."""
    if accelerator is None or not any(tracker.name == "wandb" for tracker in accelerator.trackers):
        return
    import wandb

    values = {f"report/{path.stem}": wandb.Image(str(path)) for path in pictures}
    values["report/sparsity_per_layer"] = wandb.Table(columns=columns, data=rows)
    accelerator.get_tracker("wandb", unwrap=True).log(values, step=step)
