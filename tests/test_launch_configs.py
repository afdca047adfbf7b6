"""launch_configs/: every file loads with Accelerate's own loader and says how to use it; the CPU
ones really start two processes that talk to each other."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
from accelerate.utils import DistributedType

from conftest import ROOT

CONFIGS = ROOT / "launch_configs"
YAMLS = sorted(CONFIGS.glob("*.yaml"))
EXPECTED = {
    "single_gpu": DistributedType.NO, "multi_gpu": DistributedType.MULTI_GPU,
    "deepspeed_zero2": DistributedType.DEEPSPEED, "deepspeed_zero3": DistributedType.DEEPSPEED,
    "fsdp": DistributedType.FSDP, "multi_node": DistributedType.MULTI_GPU,
    "cpu_2proc": DistributedType.MULTI_GPU, "cpu_deepspeed_zero3": DistributedType.DEEPSPEED,
}

# Initialises Accelerate like the training job does and all-reduces (rank + 1): 1 + 2 = 3 on 2 ranks.
ALL_REDUCE = """
import os, torch
from accelerate import Accelerator, PartialState
if os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true":
    PartialState(backend="gloo")  # DeepSpeed on a GPU-less machine sees no backend otherwise
acc = Accelerator()
total = acc.reduce(torch.tensor([acc.process_index + 1.0]), reduction="sum")
print(f"rank {acc.process_index}/{acc.num_processes} {acc.distributed_type.value} sum={total.item():.0f}", flush=True)
acc.end_training()  # destroys the process group: exiting with gloo threads alive can abort (SIGABRT)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def test_cpu_2proc_trains_tiny_model(tmp_path, tiny_model_dir):
    """The real training job under the 2-process CPU config: both ranks end with the same weights."""
    pytest.importorskip("distsparse.train")
    train = tmp_path / "train.csv"
    train.write_text("sentence,label\n" + "".join(
        f"{'good great fine' if i % 2 else 'bad awful poor'} movie {i},{i % 2}\n" for i in range(16)))
    out_dir = tmp_path / "out"
    cmd = accelerate_launch(CONFIGS / "cpu_2proc.yaml", free_port(), "-m", "distsparse.train",
                            "--model_name_or_path", str(tiny_model_dir), "--train_file", str(train),
                            "--output_dir", str(out_dir), "--per_device_train_batch_size", "4",
                            "--max_seq_length", "16", "--num_train_epochs", "1", "--seed", "0")
    proc = subprocess.run(cmd, cwd=ROOT, env=launch_env(tmp_path, ACCELERATE_USE_CPU="true"),
                          capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "rank consistency: OK" in out, out[-3000:]
    assert (out_dir / "config.json").is_file() and (out_dir / "model.safetensors").is_file()
