"""Checkpoints that survive being killed, and that a stranger's copy cannot turn into code.

``output_dir/checkpoint-STEP/`` holds the Hugging Face model (config, safetensors, tokenizer), the
applied recipe, quantization state and ``trainer_state.json``; its ``training_state/`` holds
Accelerate's files (model, optimizer, DeepSpeed shards) and ours: the loop's counters and every
modifier's state (masks, observer statistics) as ``distsparse_state.safetensors`` + ``.json``.

Why our own files: Accelerate's ``register_for_checkpointing`` unpickles with ``weights_only=False``,
so a planted ``custom_checkpoint_0.pkl`` runs code on resume. Nothing here is ever unpickled
freely: before anything is loaded, every file must be listed in ``manifest.json`` with its size and
sha256 (written last, before the atomic rename), and every pickle-based file (optimizer, DeepSpeed
shards) may reference only the globals torch's ``weights_only`` loader allows, plus DeepSpeed's
few plain classes (``compat.DEEPSPEED_CHECKPOINT_GLOBALS``). ``latest`` skips a checkpoint that fails
these checks, says which and why, and takes the newest intact one.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import zipfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from . import compat
from .errors import UserError

CHECKPOINT_PREFIX = "checkpoint-"
TRAINING_STATE = "training_state"
MANIFEST = "manifest.json"
FORMAT = "distsparse-checkpoint/1"
STATE_TENSORS, STATE_JSON = "distsparse_state.safetensors", "distsparse_state.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl")  # what torch.load reads (Accelerate, DeepSpeed)


class CheckpointError(UserError):
    """A checkpoint that is incomplete, corrupted or not written by distsparse."""


# -- finding checkpoints ------------------------------------------------------------------------------
def checkpoints(output_dir: str | Path) -> list[Path]:
    """Finished checkpoint folders, oldest first (temporary folders of an interrupted save are ignored)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and re.fullmatch(rf"{CHECKPOINT_PREFIX}\d+", p.name)]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def resolve_resume(value: str | None, output_dir: str | Path, say=print) -> Path | None:
    """``latest``: the newest checkpoint that passes ``verify`` (a fresh start if none exists);
    a path: that checkpoint, refused with one line if it does not pass."""
    if not value:
        return None
    if value != "latest":
        verify(Path(value))
        return Path(value)
    for path in reversed(checkpoints(output_dir)):
        try:
            verify(path)
            return path
        except CheckpointError as err:
            say(f"skipping {path.name}: {err}")
    return None


# -- verification -----------------------------------------------------------------------------------
def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def verify(path: Path) -> None:
    """Raise CheckpointError unless ``path`` is a distsparse checkpoint whose every file is listed in
    its manifest with the same size and sha256, and whose pickles reference no unsafe global."""
    manifest_file = path / MANIFEST
    if not (path / TRAINING_STATE).is_dir() or not manifest_file.is_file():
        raise CheckpointError(f"{path}: not a distsparse checkpoint (no {MANIFEST} and {TRAINING_STATE}/)")
    try:
        manifest = json.loads(manifest_file.read_text())
        listed = manifest["files"]
        ok_format = manifest["format"] == FORMAT
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"{manifest_file}: unreadable manifest") from None
    if not ok_format:
        raise CheckpointError(f"{manifest_file}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    present = [f for f in _files(path) if f != MANIFEST]
    extra = sorted(set(present) - set(listed))
    if extra:
        raise CheckpointError(f"{path / extra[0]}: not listed in the manifest (written by something else)")
    for name, entry in listed.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file}: missing (listed in the manifest)")
        if file.stat().st_size != entry["size"] or sha256(file) != entry["sha256"]:
            raise CheckpointError(f"{file}: corrupted (size or sha256 differs from the manifest)")
        if name.endswith(PICKLE_SUFFIXES) or zipfile.is_zipfile(file):  # any torch archive, whatever its name
            check_pickle(file)


def check_pickle(path: Path) -> None:
    """Refuse a torch-saved file that references any global outside the safe set, without unpickling it."""
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: not a torch zip archive; refusing to unpickle it")
    try:
        unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception as err:  # a malformed archive: whatever torch raises, the user needs the file
        raise CheckpointError(f"{path}: unreadable ({type(err).__name__}: {str(err).splitlines()[0][:120]})") from None
    unsafe -= compat.DEEPSPEED_CHECKPOINT_GLOBALS
    if unsafe:
        raise CheckpointError(f"{path}: references {sorted(unsafe)[0]}, which loading would execute; refusing it")


# -- writing ------------------------------------------------------------------------------------------
def save_checkpoint(accelerator, output_dir: str | Path, step: int, write, save_total_limit: int | None,
                    keep: Path | None = None) -> Path:
    """Save on all ranks into ``.tmp-checkpoint-STEP``; the manifest last; rename when every rank is done.

    ``write(folder)`` writes the model and our training state (collective under ZeRO-3). A crash at
    any point leaves earlier checkpoints untouched; the next save removes the stale temporary folder.
    ``save_total_limit`` rotates old checkpoints out, never ``keep`` (the best one).
    """
    root = Path(output_dir)
    final, tmp = root / f"{CHECKPOINT_PREFIX}{step}", root / f".tmp-{CHECKPOINT_PREFIX}{step}"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp / TRAINING_STATE))
    # A pickle we never need: every step seeds its own RNG (train.step_seed). Each rank removes its own.
    (tmp / TRAINING_STATE / f"random_states_{accelerator.process_index}.pkl").unlink(missing_ok=True)
    write(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        files = {name: {"size": (tmp / name).stat().st_size, "sha256": sha256(tmp / name)} for name in _files(tmp)}
        write_json(tmp / MANIFEST, {"format": FORMAT, "step": step, "files": files})
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        if save_total_limit:
            for old in checkpoints(root)[:-save_total_limit]:
                if old != keep:
                    shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def copy_model_files(checkpoint_dir: Path, folder: Path) -> None:
    """A checkpoint's model folder (everything but the training state and manifest) into ``folder``."""
    for item in checkpoint_dir.iterdir():
        if item.is_file() and item.name != MANIFEST:
            shutil.copy2(item, folder / item.name)


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


# -- our training state: tensors in safetensors, everything else in JSON --------------------------------
def save_state(folder: Path, tree: dict) -> None:
    """Write a nested dict of tensors, numbers, strings, lists: tensors to safetensors, the rest to JSON."""
    tensors: dict[str, torch.Tensor] = {}

    def split(value, key: str):
        if isinstance(value, torch.Tensor):
            tensors[key] = value.detach().cpu().clone()
            return {"__tensor__": key}
        if isinstance(value, dict):
            return {str(k): split(v, f"{key}/{k}") for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [split(v, f"{key}/{i}") for i, v in enumerate(value)]
        return value

    skeleton = split(tree, "state")
    save_file(tensors, str(folder / STATE_TENSORS))
    write_json(folder / STATE_JSON, skeleton)


def load_state(folder: Path) -> dict:
    tensors = load_file(str(folder / STATE_TENSORS))

    def join(value):
        if isinstance(value, dict):
            if set(value) == {"__tensor__"}:
                return tensors[value["__tensor__"]]
            return {k: join(v) for k, v in value.items()}
        if isinstance(value, list):
            return [join(v) for v in value]
        return value

    return join(json.loads((folder / STATE_JSON).read_text()))


def modifier_keys(recipe) -> list[tuple[str, object]]:
    """(identity, modifier): identity is the recipe key and position in it, and the class, so a
    recipe whose lists were reordered or edited cannot restore one modifier's state into another."""
    return [(f"{group}[{i}]:{type(m).__name__}", m) for group, mods in recipe.groups.items() for i, m in enumerate(mods)]


def recipe_state(recipe) -> dict:
    return {key: m.state_dict() for key, m in modifier_keys(recipe)}


def load_recipe_state(recipe, saved: dict, where: Path) -> None:
    """Restore every modifier's state; one line naming the modifier when the recipe changed."""
    keys = dict(modifier_keys(recipe))
    missing, extra = sorted(set(keys) - set(saved)), sorted(set(saved) - set(keys))
    if missing or extra:
        what = f"{missing[0]} is not in the checkpoint" if missing else f"the checkpoint has {extra[0]}, the recipe does not"
        raise CheckpointError(f"{where}: the recipe changed since this checkpoint: {what}")
    for key, modifier in keys.items():
        try:
            modifier.load_state_dict(saved[key])
        except (KeyError, RuntimeError, ValueError, TypeError) as err:
            raise CheckpointError(f"{where}: state of {key} does not fit the recipe: {str(err).splitlines()[0]}") from None
