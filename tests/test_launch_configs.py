"""launch_configs/: every file loads with Accelerate's own loader and says how to use it; the CPU
ones really start two processes that talk to each other."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.utils import DistributedType

from conftest import CONSTANT_PRUNING, ROOT, free_port, small_recipe

CONFIGS = ROOT / "launch_configs"
YAMLS = sorted(CONFIGS.glob("*.yaml"))
EXPECTED = {
    "single_gpu": DistributedType.NO, "multi_gpu": DistributedType.MULTI_GPU,
    "deepspeed_zero2": DistributedType.DEEPSPEED, "deepspeed_zero3": DistributedType.DEEPSPEED,
    "multi_node": DistributedType.MULTI_GPU,
    "cpu_2proc": DistributedType.MULTI_GPU, "cpu_deepspeed_zero3": DistributedType.DEEPSPEED,
}

# Initialises Accelerate like the training job does and all-reduces (rank + 1): 1 + 2 = 3 on 2 ranks.
# Under DeepSpeed it also builds what distsparse.train builds for deepspeed_zero3.yaml: one plugin per
# model from the config file, the student prepared first, then the teacher, and reports the share of
# the teacher's weights this rank holds (ZeRO-3 on 2 ranks: half).
ALL_REDUCE = """
import json, os, torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DeepSpeedPlugin
plugins = None
if os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true":
    PartialState(backend="gloo")  # DeepSpeed on a GPU-less machine sees no backend otherwise
    config = json.loads(open(os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"]).read())
    plugins = {"student": DeepSpeedPlugin(hf_ds_config=config),
               "teacher": DeepSpeedPlugin(hf_ds_config=dict(config, train_micro_batch_size_per_gpu=4))}
acc = Accelerator(deepspeed_plugins=plugins)
total = acc.reduce(torch.tensor([acc.process_index + 1.0]), reduction="sum")
print(f"rank {acc.process_index}/{acc.num_processes} {acc.distributed_type.value} sum={total.item():.0f}", flush=True)
if plugins:
    student = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 2))
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(16, 8)), batch_size=4)
    acc.prepare(student, torch.optim.AdamW(student.parameters()), data)
    acc.state.select_deepspeed_plugin("teacher")
    teacher = acc.prepare(torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Linear(32, 2)))
    held = sum(p.ds_tensor.numel() for p in teacher.parameters()) / sum(p.ds_numel for p in teacher.parameters())
    print(f"rank {acc.process_index} holds {held:.2f} of the teacher", flush=True)
acc.end_training()  # destroys the process group: exiting with gloo threads alive can abort (SIGABRT)
"""


RECIPE = small_recipe(CONSTANT_PRUNING)


def write_small_job(folder: Path) -> tuple[Path, Path]:
    """48 rows (6 steps per epoch at batch 4 x 2 processes) and a 2-epoch constant-pruning recipe."""
    rows = ["sentence,label"] + [f"sample {i} {'good fine great' if i % 2 else 'bad poor awful'},{i % 2}" for i in range(48)]
    (folder / "train.csv").write_text("\n".join(rows) + "\n")
    (folder / "recipe.yaml").write_text(RECIPE)
    return folder / "train.csv", folder / "recipe.yaml"


def lr_at(log: str, step: int) -> str:
    """The learning rate the training logged for a step (--logging_steps 1)."""
    return re.search(rf"^step {step} .*?train/lr=(\S+)", log, re.M).group(1)



def launch_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """gloo on loopback, no stray Accelerate default config, one thread per rank (2 cores)."""
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), GLOO_SOCKET_IFNAME="lo",
               MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.update(extra)
    return env


def accelerate_launch(config: Path, port: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
            "--main_process_port", str(port), *args]


def test_all_configs_present():
    assert {p.stem for p in YAMLS} == set(EXPECTED)


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: p.stem)
def test_config_loads_with_accelerate_and_says_how_to_use_it(path):
    config = load_config_from_file(str(path))
    assert isinstance(config, ClusterConfig)
    assert config.distributed_type == EXPECTED[path.stem]
    header = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    assert len(header) >= 3, "the file must begin with a comment: when to use it and the command"
    assert f"accelerate launch --config_file launch_configs/{path.name}" in "\n".join(header)


def test_deepspeed_zero3_configs_point_to_a_stage3_file_without_conflicting_keys():
    """Accelerate refuses plugins built from a DeepSpeed file when the YAML also sets these."""
    conflicting = {"zero_stage", "gradient_accumulation_steps", "gradient_clipping",
                   "offload_optimizer_device", "offload_param_device", "zero3_save_16bit_model"}
    for name in ("deepspeed_zero3", "cpu_deepspeed_zero3"):
        config = ClusterConfig.from_yaml_file(str(CONFIGS / f"{name}.yaml"))
        assert config.mixed_precision is None
        assert not conflicting & set(config.deepspeed_config)
        ds = json.loads((ROOT / config.deepspeed_config["deepspeed_config_file"]).read_text())
        assert ds["zero_optimization"]["stage"] == 3


@pytest.mark.parametrize("name, env", [
    ("cpu_2proc", {"ACCELERATE_USE_CPU": "true"}),
    ("cpu_deepspeed_zero3", {"DS_ACCELERATOR": "cpu"}),
])
def test_cpu_config_launches_two_processes_that_all_reduce(tmp_path, name, env):
    script = tmp_path / "all_reduce.py"
    script.write_text(ALL_REDUCE)
    proc = subprocess.run(accelerate_launch(CONFIGS / f"{name}.yaml", free_port(), str(script)),
                          cwd=ROOT, env=launch_env(tmp_path, **env), capture_output=True, text=True,
                          timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    kind = "DEEPSPEED" if "deepspeed" in name else "MULTI_CPU"
    for rank in (0, 1):
        assert f"rank {rank}/2 {kind} sum=3" in out, out[-3000:]
        assert (f"rank {rank} holds 0.50 of the teacher" in out) == (kind == "DEEPSPEED"), out[-3000:]


@pytest.mark.slow  # the same config and resume path as test_preemption's mid-epoch resume by two processes
def test_cpu_2proc_trains_and_resumes_a_one_process_checkpoint(tmp_path, tiny_model_dir, capsys):
    """The training job under the 2-process config, resuming a checkpoint written by one process:
    steps per epoch halve, and the run continues at the same epoch with the same LR schedule."""
    train = pytest.importorskip("distsparse.train").main
    train_file, recipe = write_small_job(tmp_path)
    out = tmp_path / "out"
    args = ["--model_name_or_path", str(tiny_model_dir), "--recipe", str(recipe), "--train_file", str(train_file),
            "--output_dir", str(out), "--per_device_train_batch_size", "4", "--max_seq_length", "16",
            "--logging_steps", "1", "--eval_strategy", "no", "--save_strategy", "epoch"]
    assert train(args) == 0  # one process: 12 steps per epoch, checkpoint-12 at epoch 1
    one_process = capsys.readouterr().out
    for path in out.iterdir():  # keep only the epoch-1 checkpoint, as if preempted there
        if path.is_dir() and path.name != "checkpoint-12":
            shutil.rmtree(path)
        elif path.is_file():
            path.unlink()

    cmd = accelerate_launch(CONFIGS / "cpu_2proc.yaml", free_port(), "-m", "distsparse.train", *args,
                            "--resume_from_checkpoint", "latest")
    proc = subprocess.run(cmd, cwd=ROOT, env=launch_env(tmp_path, ACCELERATE_USE_CPU="true"),
                          capture_output=True, text=True, timeout=300)
    two_processes = proc.stdout + proc.stderr
    assert proc.returncode == 0, two_processes[-3000:]
    assert f"resumed from {out / 'checkpoint-12'} at step 6" in two_processes
    assert "rank consistency: OK" in two_processes
    assert [int(s) for s in re.findall(r"^step (\d+) ", two_processes, re.M)] == list(range(7, 13))
    # Both steps start at epoch 1.0 (2-process step 7, 1-process step 13): the same learning rate.
    assert lr_at(two_processes, 7) == lr_at(one_process, 13) == "0.0005"
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 12
