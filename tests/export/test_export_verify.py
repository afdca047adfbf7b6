"""`distsparse verify` on a deployment folder, and the export's reject path through the CLI."""
from __future__ import annotations

import hashlib
import json
import re
import shutil

import numpy as np
import onnx
import pytest

from distsparse.cli import main as cli
from distsparse.export import cli as export_cli
from export_helpers import QAT_RECIPE, replace_initializer, skip_input_qdq, train_by_hand

LEVELS = "model.bert.encoder.layer.1.output.dense.weight_quantized"


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    """(trained folder, deployment folder) of a QAT, 50%-sparse tiny BERT."""
    root = tmp_path_factory.mktemp("verify")
    train_by_hand(root / "trained", QAT_RECIPE)
    assert cli(["export", "--model_path", str(root / "trained"), "--output_dir", str(root / "deploy"),
                "--sequence_length", "24"]) == 0
    return root / "trained", root / "deploy"


def copy_of(deploy, tmp_path):
    return shutil.copytree(deploy, tmp_path / "copy")


def edit_graph(folder, edit, rehash: bool):
    """Change model.onnx in place; with ``rehash`` also record its new sha256, as a forger would."""
    proto = onnx.load(str(folder / "model.onnx"))
    edit(proto.graph)
    onnx.save(proto, str(folder / "model.onnx"))
    if rehash:
        report = json.loads((folder / "export_report.json").read_text())
        report["sha256"] = hashlib.sha256((folder / "model.onnx").read_bytes()).hexdigest()
        (folder / "export_report.json").write_text(json.dumps(report))


def refused(folder, capfd) -> str:
    """Run `distsparse verify`; it must exit 2 with exactly one line on stderr. Returns the line."""
    capfd.readouterr()
    assert cli(["verify", str(folder)]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_untouched_deployment_verifies(deployed, capfd):
    _, deploy = deployed
    report = json.loads((deploy / "export_report.json").read_text())
    assert report["sha256"] == hashlib.sha256((deploy / "model.onnx").read_bytes()).hexdigest()
    capfd.readouterr()
    assert cli(["verify", str(deploy)]) == 0
    out, err = capfd.readouterr()
    assert f"sha256 {report['sha256'][:12]}... as recorded" in out
    assert "quantized layers with int8 weights and Q/DQ: 17" in out and "argmax agreement 100.0%" in out
    assert err == ""


def test_optimized_graph_is_saved_fused_and_checked(deployed):
    """model_optimized.onnx: onnxruntime's ORT_ENABLE_ALL graph, Q/DQ folded into integer kernels
    (every quantized encoder Linear a MatMulIntegerToFloat), within the tolerance, hash recorded."""
    _, deploy = deployed
    report = json.loads((deploy / "export_report.json").read_text())
    optimized = report["optimized"]
    path = deploy / "model_optimized.onnx"
    assert optimized["file"] == path.name and optimized["level"] == "ORT_ENABLE_ALL"
    assert optimized["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert optimized["bytes"] == path.stat().st_size
    assert 0 <= optimized["max_abs_diff"] <= report["atol"]
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    # 2 layers x (Q, K, V, attention output, FFN in, FFN out), the pooler and the classifier
    assert ops.count("MatMulIntegerToFloat") == 2 * 6 + 2


def test_changed_optimized_graph_is_refused(deployed, tmp_path, capfd):
    folder = copy_of(deployed[1], tmp_path)
    data = bytearray((folder / "model_optimized.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / "model_optimized.onnx").write_bytes(bytes(data))
    assert "model_optimized.onnx: missing or changed after export" in refused(folder, capfd)


def test_flipped_bytes_are_refused(deployed, tmp_path, capfd):
    folder = copy_of(deployed[1], tmp_path)
    data = bytearray((folder / "model.onnx").read_bytes())
    middle = len(data) // 2
    data[middle:middle + 200] = bytes(b ^ 0xFF for b in data[middle:middle + 200])
    (folder / "model.onnx").write_bytes(bytes(data))
    line = refused(folder, capfd)
    assert line.startswith("distsparse verify: error: ") and "sha256" in line and "changed after export" in line


def test_changed_initializer_is_refused(deployed, tmp_path, capfd):
    folder = copy_of(deployed[1], tmp_path)

    def unmask(graph):
        replace_initializer(graph, LEVELS, lambda levels: np.where(levels == 128, np.uint8(129), levels))  # zero point 128

    edit_graph(folder, unmask, rehash=False)
    assert "sha256" in refused(folder, capfd)
    edit_graph(folder, lambda graph: None, rehash=True)  # the report forged to match: the zeros check still sees it
    line = refused(folder, capfd)
    assert "bert.encoder.layer.1.output.dense.weight sparsity 0.00%, 50." in line and "recorded in export_report.json" in line


def test_removed_qdq_is_refused_with_a_forged_hash(deployed, tmp_path, capfd):
    folder = copy_of(deployed[1], tmp_path)

    edit_graph(folder, skip_input_qdq, rehash=True)
    assert "layer.0.intermediate.dense.input_quant: quantized in training, but has no QuantizeLinear" in refused(folder, capfd)


def test_changed_bias_is_refused_by_parity_with_a_forged_hash(deployed, tmp_path, capfd):
    folder = copy_of(deployed[1], tmp_path)
    edit_graph(folder, lambda g: replace_initializer(g, "model.classifier.bias", lambda b: b + np.float32(0.5)), rehash=True)
    # the classifier's output is quantized (clamped to its trained range), so less than 0.5 comes through
    assert re.search(r"onnxruntime differs from PyTorch: max abs diff 0\.0\d+ \(tolerance 0\.00\d+\)", refused(folder, capfd))


def test_missing_report_is_one_line(deployed, tmp_path, capfd):
    folder = copy_of(deployed[1], tmp_path)
    (folder / "export_report.json").unlink()
    assert "export_report.json: missing" in refused(folder, capfd)


def test_rejected_export_leaves_only_the_rejected_file(deployed, tmp_path, capfd, monkeypatch):
    """A file that fails the parity check (its classifier bias shifted after tracing): exit 2, one
    line, model.onnx.rejected, and nothing else in the folder."""
    trained, _ = deployed
    real_export = export_cli.export_onnx

    def export_then_break(model, task, samples, path, opset):
        real_export(model, task, samples, path, opset)
        proto = onnx.load(str(path))
        replace_initializer(proto.graph, "model.classifier.bias", lambda b: b + np.float32(1.0))
        onnx.save(proto, str(path))

    monkeypatch.setattr(export_cli, "export_onnx", export_then_break)
    out = tmp_path / "deploy"
    capfd.readouterr()
    assert cli(["export", "--model_path", str(trained), "--output_dir", str(out), "--sequence_length", "24"]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert re.fullmatch(r"distsparse export: error: onnxruntime differs from PyTorch: max abs diff 0\.0\d+ "
                        r"\(tolerance 0\.00\d+\), argmax agreement \d+\.\d%", err[0])
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx.rejected"]


def test_rejected_reexport_removes_the_earlier_model(deployed, tmp_path, capfd, monkeypatch):
    """Exporting again into a folder that holds a verified export: a rejected file must not leave
    the old model.onnx and report there to pass for the new one."""
    trained, deploy = deployed
    folder = copy_of(deploy, tmp_path)

    def reject(*args, **kwargs):
        raise export_cli.ExportCheckError("onnxruntime differs from PyTorch: forced")

    monkeypatch.setattr(export_cli, "check_export", reject)
    assert cli(["export", "--model_path", str(trained), "--output_dir", str(folder), "--sequence_length", "24"]) == 2
    assert (folder / "model.onnx.rejected").is_file()
    assert not (folder / "model.onnx").exists() and not (folder / "export_report.json").exists()
    assert not (folder / "model_optimized.onnx").exists()
    assert "export_report.json: missing" in refused(folder, capfd)
