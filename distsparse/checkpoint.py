"""Checkpoints that survive being killed: written to a temporary folder, then renamed.

``output_dir/checkpoint-STEP/`` holds the Hugging Face model (config, safetensors, tokenizer), the
applied recipe (``recipe.yaml``), quantization state and ``trainer_state.json``; its
``training_state/`` holds what Accelerate saves (optimizer, RNG, modifier state, DeepSpeed shards).
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from .errors import UserError

PREFIX = "checkpoint-"
TRAINING_STATE = "training_state"


def checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders of an interrupted save are ignored)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and re.fullmatch(rf"{PREFIX}\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def resolve_resume(value: str | None, output_dir: str | Path) -> Path | None:
    """``latest`` means the newest complete checkpoint, or a fresh start if there is none."""
    if not value:
        return None
    if value == "latest":
        found = checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(value)
    if not (path / TRAINING_STATE).is_dir():
        raise UserError(f"{path}: --resume_from_checkpoint is not a distsparse checkpoint (no {TRAINING_STATE}/)")
    return path


def save_checkpoint(accelerator, output_dir: str | Path, step: int, write_model, save_total_limit: int | None) -> Path:
    """Save on all ranks into ``.tmp-checkpoint-STEP`` and rename it when every rank is done.

    ``write_model(folder)`` writes the HF model files (collective under ZeRO-3). A crash at any point
    leaves earlier checkpoints untouched; the next save removes the stale temporary folder.
    """
    root = Path(output_dir)
    final = root / f"{PREFIX}{step}"
    tmp = root / f".tmp-{PREFIX}{step}"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp / TRAINING_STATE))
    write_model(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        if save_total_limit:
            for old in checkpoints(root)[:-save_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
