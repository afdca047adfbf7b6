"""SparseML recipes, read unchanged: variables, ``eval``, stages, recipe_args, ``!Modifier`` tags.

A recipe is a YAML mapping (or a recipe card: Markdown with the YAML between the first two ``---``
lines). Any top-level key whose name contains ``modifiers`` holds a list of ``!ModifierName``
mappings; other keys are variables. A top-level mapping that itself holds ``*modifiers`` keys is a
stage: stages run in file order, each shifted to start where the ones before it end.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from ..errors import RecipeError
from ..modifiers import MODIFIERS, Modifier  # the package imports every family: the registry is full
from ..modifiers.training import check_epoch_ranges
from . import yaml_io
from .arithmetic import EvalError, is_number
from .variables import Scope
from .yaml_io import Map, Tagged, brief

SUFFIXES = (".yaml", ".yml", ".md")
# SparseML's other PyTorch modifiers: refused at load, each with why (a silent no-op would train
# something other than what the recipe says).
_NOT_HERE = "not implemented here"
REFUSED = {
    "LearningRateModifier": "torch step schedulers (StepLR, MultiStepLR, ExponentialLR) are not supported; "
                            "write the schedule with LearningRateFunctionModifier or SetLearningRateModifier",
    "TrainableParamsModifier": f"{_NOT_HERE}: freezing parameters on a schedule changes what DDP/DeepSpeed reduce "
                               "after they wrapped the model",
    "SetParamModifier": f"{_NOT_HERE}: it overwrites parameter values on a schedule",
    "GradualParamModifier": f"{_NOT_HERE}: it overwrites parameter values on a schedule",
    "MFACPruningModifier": f"{_NOT_HERE}; OBSPruningModifier is the second-order pruner (oBERT)",
    "MovementPruningModifier": f"{_NOT_HERE}; use GMPruningModifier or OBSPruningModifier",
    "ACDCPruningModifier": f"{_NOT_HERE}: alternating dense/sparse phases revive pruned weights",
    "RigLPruningModifier": f"{_NOT_HERE}: regrowing pruned weights by gradient",
    "TopKASTPruningModifier": f"{_NOT_HERE}: separate forward and backward sparsity",
    "PowerpropagationModifier": f"{_NOT_HERE}: it reparametrizes the weights",
    "StructuredPruningModifier": f"{_NOT_HERE}: channel/head pruning changes tensor shapes",
    "LayerThinningModifier": f"{_NOT_HERE}: thinning changes tensor shapes",
    "PerLayerDistillationModifier": f"{_NOT_HERE}: DistillationModifier distills the model outputs",
    "SparseGPTModifier": "one-shot LLM compression from calibration data, outside a training run",
    "OBCQModifier": "one-shot LLM compression from calibration data, outside a training run",
}
RUN_TO_END = {"QuantizationModifier"}
METADATA = "metadata"  # written by Recipe.to_yaml; kept as data, never a variable
# More than any fine-tuning recipe: keeps epochs x steps far from float overflow and timelines small.
MAX_EPOCHS = 10_000


@dataclass
class Recipe:
    """Modifiers ready to run (epochs global, in file order), and the variables they came from."""

    modifiers: list[Modifier]
    variables: dict[str, Any]
    source: str
    groups: dict[str, list[Modifier]] = field(default_factory=dict)  # modifiers by recipe key
    metadata: dict | None = None

    @property
    def num_epochs(self) -> float:
        """The EpochRangeModifier's end, else the last start or end of any modifier (0: none)."""
        ranges = [m.end_epoch for m in self.modifiers
                  if type(m).__name__ == "EpochRangeModifier" and m.end_epoch >= 0]
        if ranges:
            return float(max(ranges))
        return float(max((e for m in self.modifiers for e in (m.start_epoch, m.end_epoch) if e >= 0),
                         default=0.0))

    def to_yaml(self, metadata: dict | None = None) -> str:
        """The recipe as it ran: evals substituted, stages flattened to global epochs."""
        data: dict[str, Any] = {k: yaml_io.plain(v) for k, v in self.variables.items()}
        if metadata is not None or self.metadata is not None:
            data[METADATA] = yaml_io.plain(metadata if metadata is not None else self.metadata)
        data.update(self.groups)
        return f"# resolved by distsparse from {self.source}\n" + yaml_io.dump(data)


def load_recipe(source, recipe_args=None) -> Recipe:
    """``source``: a file (.yaml/.yml/.md) or a YAML string; ``recipe_args``: dict, JSON or k=v,..."""
    text, name = _read(source)
    doc = yaml_io.parse(text, name)
    if not isinstance(doc, dict):
        if name == "<string>" and "\n" not in text.strip():
            raise RecipeError(f"{text.strip()!r}: no such recipe file, and not a YAML recipe")
        raise RecipeError(f"{name}: a recipe is a YAML mapping of variables and modifier lists")
    stage_names = [k for k, v in doc.items() if k != METADATA and _is_stage(v)]
    if stage_names and any(_is_group(k) for k in doc):
        raise RecipeError(f"{name}: modifier lists must all be inside stages ({', '.join(stage_names)}) "
                          "or all at the top level")

    overrides = parse_recipe_args(recipe_args)
    top = _scope(doc, name, overrides, parent=None)
    stage_scopes = [_scope(doc[s], name, overrides, parent=top) for s in stage_names]
    scopes = [top, *stage_scopes]
    unknown = set(overrides) - {k for s in scopes for k in s.raw}
    if unknown:
        known = sorted({str(k) for s in scopes for k in s.raw})
        raise RecipeError(f"{name}: recipe_args: {', '.join(sorted(unknown))} not a variable of the "
                          f"recipe (variables: {', '.join(known) or 'none'})")
    for scope in scopes:
        for var in scope.raw:
            scope.get(var)

    levels = [(s, doc[s], scope) for s, scope in zip(stage_names, stage_scopes)] or [(None, doc, top)]
    groups: dict[str, list[Modifier]] = {}
    stages: list[list[Modifier]] = []
    for stage, level, scope in levels:
        stages.append([])
        for key, entries in level.items():
            if _is_group(key):
                if not isinstance(entries, (list, type(None))):
                    raise RecipeError(f"{name}:{level.lines[key]}: {key}: must be a list of !ModifierName entries")
                built = [part for entry in entries or [] for part in _build(entry, scope, name, key, level.lines[key]).expand()]
                groups[key if stage is None else f"{stage}_{key}"] = built
                stages[-1].extend(built)
    _offset_stages(stages)
    for stage_modifiers in stages:
        for modifier in stage_modifiers:
            modifier.validate()
    check_epoch_ranges([m for s in stages for m in s])
    modifiers = [m for s in stages for m in s]
    return Recipe(  # structure first: parameter names in every other modifier refer to the model it leaves
        modifiers=sorted(modifiers, key=lambda m: not getattr(m, "changes_structure", False)),
        variables={k: top.get(k) for k in top.raw},
        source=name, groups=groups, metadata=doc.get(METADATA),
    )


def parse_recipe_args(recipe_args) -> dict:
    """A dict, a JSON object, or ``k=v,k2=v2`` whose values are read as YAML scalars."""
    if not recipe_args:
        return {}
    if isinstance(recipe_args, dict):
        return dict(recipe_args)
    text = str(recipe_args).strip()
    yaml_io.check_size(len(text), "recipe_args")
    if text.startswith("{"):
        try:
            parsed = json.loads(text)
        except ValueError as err:  # JSONDecodeError, or an int of more than 4300 digits
            raise RecipeError(f"recipe_args: not valid JSON: {err}") from None
        except RecursionError:
            raise RecipeError("recipe_args: JSON nested too deeply") from None
        if not isinstance(parsed, dict):
            raise RecipeError("recipe_args: JSON must be an object of variable names to values")
        for key, value in parsed.items():
            _check_nesting(value, f"recipe_args: {key}")
        return parsed
    parsed = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise RecipeError(f"recipe_args: {item.strip()!r} is not key=value")
        scalar = yaml_io.parse(value.strip(), "recipe_args")
        if isinstance(scalar, (Tagged, dict, list)):
            raise RecipeError(f"recipe_args: {key.strip()}: give a number or a string, not {brief(value)}")
        parsed[key.strip()] = scalar
    return parsed


def _read(source) -> tuple[str, str]:
    if isinstance(source, str) and source.startswith("zoo:"):
        raise RecipeError(f"{source}: SparseZoo stubs need a download: pass the recipe file instead")
    is_file = isinstance(source, os.PathLike) or (
        isinstance(source, str) and "\n" not in source
        and (source.lower().endswith(SUFFIXES) or os.path.isfile(source))
    )
    if not is_file:
        return str(source), "<string>"
    path = Path(source)
    try:
        with path.open("rb") as file:
            data = file.read(yaml_io.MAX_BYTES + 1)  # no more: the file may be endless
        yaml_io.check_size(len(data), str(path))
        text = data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise RecipeError(f"{path}: cannot read the recipe: {getattr(err, 'strerror', None) or err}") from None
    return (_card_yaml(text, str(path)) if path.suffix.lower() == ".md" else text), str(path)


def _card_yaml(text: str, name: str) -> str:
    """The YAML between a recipe card's first two ``---`` lines, padded so line numbers match."""
    lines = text.splitlines()
    marks = [i for i, line in enumerate(lines) if line.strip() == "---"][:2]
    if len(marks) < 2:
        raise RecipeError(f"{name}: a recipe card holds its recipe between two '---' lines")
    return "\n" * (marks[0] + 1) + "\n".join(lines[marks[0] + 1:marks[1]])


def _is_group(key) -> bool:
    return isinstance(key, str) and "modifiers" in key


def _is_stage(value) -> bool:
    return isinstance(value, dict) and any(_is_group(k) for k in value)


def _scope(level: Map, name: str, overrides: dict, parent: Scope | None) -> Scope:
    raw = {k: v for k, v in level.items() if not (_is_group(k) or _is_stage(v) or k == METADATA)}
    for key, value in level.items():
        if parent is not None and _is_stage(value):
            raise RecipeError(f"{name}:{level.lines[key]}: {key}: stages cannot hold stages")
        if key in raw and any(isinstance(v, Tagged) for v in (value if isinstance(value, list) else [value])):
            raise RecipeError(f"{name}:{level.lines[key]}: {key}: modifiers belong in a list under a key "
                              "whose name contains 'modifiers'")
    lines = {k: f"{name}:{level.lines[k]}" for k in raw}
    for key in raw.keys() & overrides.keys():
        raw[key], lines[key] = overrides[key], f"{name}: recipe_args"
    return Scope(raw, lines, parent)


def _build(entry, scope: Scope, name: str, group: str, group_line: int) -> Modifier:
    if not isinstance(entry, Tagged):
        raise RecipeError(f"{name}:{group_line}: {group}: each entry must be a !ModifierName "
                          f"mapping, got {brief(entry)}")
    where = f"{name}:{entry.line} {entry.name}"
    cls = MODIFIERS.get(entry.name)
    if entry.name in REFUSED:
        raise RecipeError(f"{name}:{entry.line}: !{entry.name} is not supported: {REFUSED[entry.name]}")
    if cls is None:
        raise RecipeError(f"{name}:{entry.line}: unknown modifier !{entry.name}; supported: "
                          f"{', '.join(sorted(MODIFIERS))}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, raw in entry.args.items():
        at = f"{name}:{entry.args.lines[key]} {entry.name}"
        if key not in fields:
            raise RecipeError(f"{at}: unknown key {key!r}; valid keys: {', '.join(fields)}")
        try:
            value = scope.resolve(raw)
        except EvalError as err:
            raise RecipeError(f"{at}: {key}: {err}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise RecipeError(f"{at}: {key}: {value} is not a finite number")
        try:
            kwargs[key] = _coerce(value, hints.get(key, Any))
        except _Mismatch:
            raise RecipeError(f"{at}: {key}: expected {_type_name(hints[key])}, got {brief(value)}") from None
        if _in_epochs(key) and is_number(kwargs[key]) and kwargs[key] != -1 and not 0 <= kwargs[key] <= MAX_EPOCHS:
            raise RecipeError(f"{at}: {key}: {kwargs[key]} is not an epoch: -1 (from the start / never) "
                              f"or 0 to {MAX_EPOCHS}")
    missing = [k for k, f in fields.items() if k not in kwargs
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise RecipeError(f"{where}: missing key(s): {', '.join(missing)}")
    modifier = cls(**kwargs)
    modifier.where = where
    return modifier


class _Mismatch(Exception):
    pass


def _coerce(value, hint):
    """``value`` as the dataclass field's type says, where YAML's types allow it without guessing."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (Union, types.UnionType):
        for option in args:
            try:
                return _coerce(value, option)
            except _Mismatch:
                pass
        raise _Mismatch
    if hint is type(None):
        if value is None:
            return None
        raise _Mismatch
    if hint is bool:
        if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
            return bool(value)  # SparseML recipes write flags as 0/1
        raise _Mismatch
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool) or isinstance(value, float) and value.is_integer():
            return int(value)
        raise _Mismatch
    if hint is float:
        if is_number(value) and abs(value) <= sys.float_info.max:  # not nan, inf, or an int beyond floats
            return float(value)
        raise _Mismatch
    if hint is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    if hint is list or origin is list:
        if value is None:
            raise _Mismatch
        items = value if isinstance(value, list) else [value]  # SparseML takes one name for a list
        return [_coerce(v, args[0]) for v in items] if args else items
    if hint is dict or origin is dict:
        if not isinstance(value, dict):
            raise _Mismatch
        return {_coerce(k, args[0]): _coerce(v, args[1]) for k, v in value.items()} if args else value
    return value  # Any, or a type the loader does not know: the modifier's validate() judges it


def _in_epochs(key: str) -> bool:
    """Keys counted in epochs, SparseML's names: start_epoch, cycle_epochs, update_frequency, ..."""
    return key.endswith(("_epoch", "_epochs")) or key == "update_frequency"


def _check_nesting(value, where: str) -> None:
    """JSON data (recipe_args) within the bounds YAML recipes get, walked without recursion."""
    stack, count = [(value, 1)], 0
    while stack:
        item, depth = stack.pop()
        count += 1
        if depth > yaml_io.MAX_DEPTH or count > yaml_io.MAX_NODES:
            raise RecipeError(f"{where}: more than {yaml_io.MAX_NODES} values or {yaml_io.MAX_DEPTH} levels deep")
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        stack.extend((child, depth + 1) for child in children)


def _type_name(hint) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")


def _offset_stages(stages: list[list[Modifier]]) -> None:
    """SparseML's ``compose_staged``: stage k starts at the whole epoch where stages < k end.

    Modifiers of an earlier stage that never end (end_epoch -1) end with their stage, except QAT,
    which cannot be undone (SparseML gives it no end).
    """
    offset = 0.0
    for index, modifiers in enumerate(stages):
        if index:
            for modifier in modifiers:
                _advance_epochs(modifier, offset)
        epochs = [e for m in modifiers for e in (m.start_epoch, m.end_epoch) if e >= 0]
        offset = max([offset, *(math.ceil(e) for e in epochs)])
        if index < len(stages) - 1:
            for modifier in modifiers:
                if modifier.end_epoch < 0 and type(modifier).__name__ not in RUN_TO_END:
                    modifier.end_epoch = float(offset)


def _advance_epochs(modifier: Modifier, offset: float) -> None:
    """Shift every ``*_epoch`` key by ``offset``; -1 or None (never) stay as they are."""
    for f in dataclasses.fields(modifier):
        value = getattr(modifier, f.name)
        if f.name == "start_epoch":
            modifier.start_epoch = max(0.0, value) + offset
        elif f.name.endswith("_epoch") and is_number(value) and value >= 0:
            setattr(modifier, f.name, value + offset)
