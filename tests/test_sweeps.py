"""sweeps/: each W&B sweep config is valid for distsparse, and the command line a `wandb agent` forms
from sampled values runs training with the sampled recipe variables applied."""
from __future__ import annotations

import copy
import math
import os
import random
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, minilm_dir, tiny_bert
from distsparse.args import build_parser, parse_args
from distsparse.recipe import load_recipe

SWEEPS = sorted((ROOT / "sweeps").glob("*.yaml"))
PREFIX = "recipe."
# Where distsparse/recipes/sst2_sparse_transfer.yaml puts each swept variable: (modifier, key).
USED_BY = {"init_lr": ("LearningRateFunctionModifier", "init_lr"),
           "distill_hardness": ("DistillationModifier", "hardness"),
           "distill_temperature": ("DistillationModifier", "temperature"),
           "qat_start_epoch": ("QuantizationModifier", "start_epoch")}
DATA = ROOT / "distsparse" / "data"


def load_sweep(path: Path) -> dict:
    return yaml.safe_load(path.read_text())  # as `wandb sweep` reads it


def sample(spec: dict, rng: random.Random):
    """One value of a W&B sweep parameter (the distributions these configs use)."""
    if "value" in spec:
        return spec["value"]
    if "values" in spec:
        return rng.choice(spec["values"])
    lo, hi = spec["min"], spec["max"]
    kind = spec.get("distribution", "int_uniform" if isinstance(lo, int) and isinstance(hi, int) else "uniform")
    if kind == "uniform":
        return rng.uniform(lo, hi)
    if kind == "int_uniform":
        return rng.randint(lo, hi)
    if kind == "log_uniform_values":
        return math.exp(rng.uniform(math.log(lo), math.log(hi)))
    raise AssertionError(f"distribution {kind!r}: teach this test to sample it")


def agent_command(sweep: dict, values: dict) -> list[str]:
    """The argv `wandb agent` runs for a trial with ``values`` (as in wandb_agent.Agent._command_run)."""
    from wandb.sdk.launch.sweeps import utils as sweep_utils

    command = sweep_utils.create_sweep_command(copy.deepcopy(sweep["command"]))
    macros = sweep_utils.create_sweep_command_args({"args": {k: {"value": v} for k, v in values.items()}})
    macros.update(interpreter=["python"], program=[sweep.get("program")], env=["/usr/bin/env"])
    argv = []
    for chunk in map(str, command):
        argv += (macros.get(chunk[2:-1]) or []) if chunk.startswith("${") and chunk.endswith("}") else [chunk]
    return argv


def test_recipe_prefix_sets_recipe_variables(monkeypatch, capsys):
    args = parse_args(["--recipe_args", "num_epochs=4,distill_hardness=0.1", "--recipe.distill_hardness=0.75",
                       "--recipe.qat_start_epoch", "-1", "--recipe.init_lr=8e-5"])
    assert args.recipe_args == {"num_epochs": 4, "distill_hardness": 0.75, "qat_start_epoch": -1, "init_lr": 8e-5}
    assert parse_args(["--recipe_args", '{"a": 1}', "--recipe.b=x"]).recipe_args == {"a": 1, "b": "x"}
    assert parse_args(["--recipe_args", "a=1"]).recipe_args == "a=1"  # untouched without recipe.* flags
    monkeypatch.setenv("WANDB_RUN_ID", "r1")
    assert parse_args(["--output_dir=out/$WANDB_RUN_ID"]).output_dir == "out/r1"
    for bad in (["--recipe.x"], ["--recipe_argz=1"], ["--recipe.=1"]):
        with pytest.raises(SystemExit) as exit_:
            parse_args(bad)
        assert exit_.value.code == 2
    assert "unrecognized arguments: --recipe_argz=1" in capsys.readouterr().err


def test_there_are_sweeps():
    assert {p.name for p in SWEEPS} >= {"sst2_distillation.yaml", "sst2_qat_start.yaml"}


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_sweep_config_is_valid(path):
    sweep = load_sweep(path)
    assert sweep["method"] in ("grid", "random", "bayes")
    assert sweep["metric"]["name"].startswith("eval/") and sweep["metric"]["goal"] in ("maximize", "minimize")
    command = sweep["command"]
    assert command[:3] == ["${env}", "accelerate", "launch"] and command[-3:] == ["-m", "distsparse.train", "${args}"]
    config_file = ROOT / command[command.index("--config_file") + 1]
    assert config_file.is_file(), config_file

    flags = {a.dest for a in build_parser()._actions}
    params = sweep["parameters"]
    recipe = load_recipe(ROOT / params["recipe"]["value"])
    swept = {k for k, spec in params.items() if "value" not in spec}
    assert swept and all(k.startswith(PREFIX) for k in swept), swept  # LR too: the recipe sets the LR
    for name, spec in params.items():
        assert len({"value", "values", "min"} & set(spec)) == 1, (name, spec)
        if name.startswith(PREFIX):
            assert name[len(PREFIX):] in recipe.variables, f"{path.name}: {name} is not a variable of the recipe"
        else:
            assert name in flags, f"{path.name}: {name} is not a distsparse train flag"
        if sweep["method"] == "grid":
            assert "min" not in spec, f"{path.name}: grid search needs values, not a distribution ({name})"
        for value in spec.get("values", [spec.get("value"), spec.get("min"), spec.get("max")]):
            assert not isinstance(value, bool), f"{path.name}: {name}: the agent passes booleans as --flag=True"
    assert "$WANDB_RUN_ID" in params["output_dir"]["value"]  # trials must not share a folder
    # Every sampled trial parses, and its recipe variables land in recipe_args with their types.
    values = {k: sample(v, random.Random(0)) for k, v in params.items()}
    argv = agent_command(sweep, values)
    args = parse_args(argv[argv.index("distsparse.train") + 1:])
    assert args.recipe_args == {k[len(PREFIX):]: v for k, v in values.items() if k.startswith(PREFIX)}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("sweep-model") / "tiny-bert"
    tiny_bert(sparsity=0.5).save_pretrained(out)
    AutoTokenizer.from_pretrained(minilm_dir()).save_pretrained(out)
    return out


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_agent_command_trains_with_the_sampled_recipe_variables(path, tiny_model, tmp_path):
    sweep = load_sweep(path)
    params = sweep["parameters"]
    values = {k: sample(v, random.Random(path.name)) for k, v in params.items()}
    # The trial on this machine: a tiny model and data, one CPU process, W&B offline.
    for name in ("dataset_name", "dataset_config_name"):
        values.pop(name, None)
    values.update(model_name_or_path=str(tiny_model), teacher="self", train_file=str(DATA / "sst2_sample_train.tsv"),
                  validation_file=str(DATA / "sst2_sample_dev.tsv"), max_train_samples=16, max_eval_samples=8,
                  per_device_train_batch_size=16, max_seq_length=32, save_strategy="no", eval_strategy="no",
                  output_dir=str(tmp_path / "$WANDB_RUN_ID"))
    argv = agent_command(sweep, values)
    argv[argv.index("--config_file") + 1] = "launch_configs/single_gpu.yaml"
    run_id = uuid.uuid4().hex[:8]
    env = dict(os.environ, WANDB_RUN_ID=run_id, WANDB_MODE="offline", WANDB_DIR=str(tmp_path),
               HF_HOME=str(tmp_path / "hf"), ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, " ".join(argv) + "\n" + proc.stdout[-3000:] + proc.stderr[-5000:]

    applied = load_recipe(tmp_path / run_id / "recipe.yaml")  # the recipe as the trial ran it
    modifiers = {type(m).__name__: m for m in applied.modifiers}
    for name, value in values.items():
        if name.startswith(PREFIX):
            variable = name[len(PREFIX):]
            assert applied.variables[variable] == value, name
            modifier, key = USED_BY[variable]
            assert getattr(modifiers[modifier], key) == pytest.approx(value), name
    assert len(list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))) == 1
