"""Slow tier (DISTSPARSE_SLOW=1): the real MiniLM, sparse-transferred on SST-2, exported to ONNX.

onnxruntime's accuracy on the full SST-2 dev set (872 rows) must be within 0.5 points of the
PyTorch fake-quant model's. ``DISTSPARSE_MINILM_MODEL`` may name a folder ``distsparse train``
already wrote (e.g. benchmark 3's gmp80_qat run); otherwise the default job (MiniLM, bundled
SST-2 sample, distsparse/recipes/default.yaml) is trained first, a few minutes on 2 cores.
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch

from conftest import SHARED, requires_shared

pytestmark = [pytest.mark.slow, requires_shared]


def dev_set():
    with open(SHARED / "data" / "sst2" / "dev.tsv") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))[1:]
    return [r[0] for r in rows], np.array([int(r[1]) for r in rows])


def test_minilm_int8_export_keeps_dev_accuracy(tmp_path):
    from distsparse.cli import main as cli
    from distsparse.export import load_trained

    model_dir = Path(os.environ.get("DISTSPARSE_MINILM_MODEL") or tmp_path / "trained")
    if not (model_dir / "config.json").is_file():
        assert cli(["train", "--output_dir", str(model_dir), "--save_strategy", "no", "--eval_strategy", "no"]) == 0
    deploy = tmp_path / "deploy"
    assert cli(["export", "--model_path", str(model_dir), "--output_dir", str(deploy)]) == 0

    sentences, labels = dev_set()
    model, tokenizer, _ = load_trained(model_dir)
    session = onnxruntime.InferenceSession(str(deploy / "model.onnx"), providers=["CPUExecutionProvider"])
    names = {i.name for i in session.get_inputs()}
    torch_preds, onnx_preds = [], []
    for start in range(0, len(sentences), 64):
        enc = tokenizer(sentences[start:start + 64], padding=True, truncation=True, max_length=128, return_tensors="pt")
        with torch.no_grad():
            torch_preds.append(model(**enc).logits.argmax(-1).numpy())
        feed = {k: v.numpy() for k, v in enc.items() if k in names}
        onnx_preds.append(session.run(["logits"], feed)[0].argmax(-1))
    torch_acc = float((np.concatenate(torch_preds) == labels).mean())
    onnx_acc = float((np.concatenate(onnx_preds) == labels).mean())
    figures = {"pytorch_fake_quant_accuracy": torch_acc, "onnxruntime_int8_accuracy": onnx_acc,
               "rows": len(labels), "model": str(model_dir), "onnx_bytes": (deploy / "model.onnx").stat().st_size}
    print(json.dumps(figures))
    if os.environ.get("DISTSPARSE_RESULTS"):
        Path(os.environ["DISTSPARSE_RESULTS"]).write_text(json.dumps(figures, indent=2) + "\n")
    majority = max(float(np.mean(labels == c)) for c in np.unique(labels))
    assert torch_acc > majority + 0.1  # a trained sentiment model, well above always saying the commoner label
    assert abs(onnx_acc - torch_acc) <= 0.005
