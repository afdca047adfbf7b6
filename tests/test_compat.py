"""Every private API fenced in ``distsparse.compat`` still exists, with the meaning we rely on, in
the installed accelerate, torch and deepspeed. When an upgrade moves one, this fails by name."""
from __future__ import annotations

import argparse
import inspect

import pytest
import torch

from distsparse import compat


def test_accelerate_keeps_prepared_models_in_models_list():
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare_model(torch.nn.Linear(2, 2), evaluation_mode=True)
    assert model in accelerator._models
    compat.forget_prepared_model(accelerator, model)
    assert model not in accelerator._models
    # save_state/load_state walk exactly that list
    from accelerate import accelerator as module

    assert "self._models" in inspect.getsource(module.Accelerator.save_state)


def test_torch_ddp_reads_the_ignore_attribute():
    from torch.nn.parallel import distributed

    assert compat.DDP_IGNORE in inspect.getsource(distributed)
    model = torch.nn.Linear(2, 2)
    compat.ddp_ignore_buffers(model, ["a"])
    compat.ddp_ignore_buffers(model, ["b"])
    assert getattr(model, compat.DDP_IGNORE) == ["a", "b"]


def test_argparse_actions():
    parser = argparse.ArgumentParser()
    parser.add_argument("--learning_rate")
    assert compat.argparse_dests(parser) == {"help", "learning_rate"}


def test_torch_lists_unsafe_globals_without_unpickling(tmp_path):
    import os

    class Payload:
        def __reduce__(self):
            return (os.system, ("true",))

    torch.save({"x": torch.ones(1), "p": Payload()}, tmp_path / "f.pt")
    assert torch.serialization.get_unsafe_globals_in_checkpoint(str(tmp_path / "f.pt")) == ["posix.system"]


def test_deepspeed_private_attributes_exist():
    deepspeed = pytest.importorskip("deepspeed")
    import importlib

    partition_parameters = importlib.import_module("deepspeed.runtime.zero.partition_parameters")
    stage3 = importlib.import_module("deepspeed.runtime.zero.stage3")
    tensor_fragment = importlib.import_module("deepspeed.utils.tensor_fragment")

    assert "ds_tensor" in inspect.getsource(partition_parameters) and "ds_numel" in inspect.getsource(partition_parameters)
    assert "ds_id" in inspect.getsource(partition_parameters)
    assert "_z3_optimizer" in inspect.getsource(stage3)
    assert {"start", "numel"} <= set(tensor_fragment.fragment_address.__dataclass_fields__)
    assert "_hp_mapping" in inspect.getsource(tensor_fragment) and "hp_fragment" in inspect.getsource(tensor_fragment)
    assert hasattr(deepspeed.utils, "safe_get_local_fp32_param") and hasattr(deepspeed.utils, "safe_set_local_fp32_param")
    for name in compat.DEEPSPEED_CHECKPOINT_GLOBALS:
        module, _, attr = name.rpartition(".")
        assert hasattr(__import__(module, fromlist=[attr]), attr), name
