"""Each optional feature, with its package missing, stops at once with one line naming the extra."""
from __future__ import annotations

import sys

import pytest

from distsparse import tracking
from distsparse.args import parse_args
from distsparse.cli import main
from distsparse.errors import UserError
from distsparse.extras import require


def test_require_returns_the_module():
    import yaml

    assert require("yaml", "none", "reading recipes") is yaml


@pytest.mark.parametrize("report_to", ["wandb", "tensorboard"])
def test_tracker_without_its_package(monkeypatch, report_to):
    monkeypatch.setitem(sys.modules, report_to, None)  # what `import X` sees when X is not installed
    with pytest.raises(UserError) as err:
        tracking.log_with(report_to)
    assert str(err.value) == f"--report_to {report_to} needs the {report_to} package: pip install 'distsparse[{report_to}]'"


def test_deepspeed_launch_without_deepspeed(monkeypatch):
    from distsparse.launch import make_accelerator

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setitem(sys.modules, "deepspeed", None)
    with pytest.raises(UserError) as err:
        make_accelerator(parse_args([]))
    assert str(err.value) == "a DeepSpeed launch needs the deepspeed package: pip install 'distsparse[deepspeed]'"


@pytest.mark.parametrize("module", ["onnx", "onnxruntime"])
def test_export_without_onnx(monkeypatch, capsys, tmp_path, module):
    for name in [m for m in sys.modules if m.startswith("distsparse.export")]:
        monkeypatch.delitem(sys.modules, name)  # import the package afresh, without `module`
    monkeypatch.setitem(sys.modules, module, None)
    assert main(["export", "--model_path", str(tmp_path), "--output_dir", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == (f"distsparse export: error: distsparse export needs the {module} package: "
                                       "pip install 'distsparse[export]'\n")
    assert not (tmp_path / "out").exists()
