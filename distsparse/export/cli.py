"""``distsparse export`` and ``distsparse verify``.

The export writes ``model.onnx.partial``, checks it, and only then names it ``model.onnx`` and
writes the rest of the folder (config, tokenizer, recipe, samples, report with the file's
sha256). A failed check leaves ``model.onnx.rejected`` and nothing else, and exits 2.
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

from ..checkpoint import sha256
from ..errors import UserError
from ..fake_quant import fake_quants
from ..savedmodel import RECIPE_FILE
from .build import EXPORT_TASKS, SAMPLE_TEXTS, export_onnx, load_trained, sample_inputs
from .verify import (OPTIMIZED_FILE, REPORT_FILE, SAMPLE_INPUTS_FILE, SAMPLE_OUTPUTS_FILE, ExportCheckError,
                     check_export, optimize_and_check, verify_deployment)


def build_export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="distsparse export", allow_abbrev=False,
                                description="Export a trained model folder to ONNX and verify it.")
    p.add_argument("--model_path", required=True, help="the folder distsparse train wrote (--output_dir)")
    p.add_argument("--output_dir", required=True, help="the deployment folder to write")
    p.add_argument("--task", type=export_task, default=None,
                   help=f"{', '.join(EXPORT_TASKS)}, or SparseML's export_onnx names ({', '.join(SPARSEML_TASKS)}); "
                        "default: from config.json's architectures")
    p.add_argument("--sequence_length", type=int, default=128,
                   help="longest sample input (they are padded to the longest sample sentence; axes stay dynamic)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (13 or newer for per-channel int8)")
    p.add_argument("--atol", type=float, default=None,
                   help="max abs difference allowed between onnxruntime and PyTorch "
                        "(default: derived from the model's quantization, see the README)")
    return p


# sparseml.transformers.export_onnx --task names (it also turns _ into -), as ours.
SPARSEML_TASKS = {"glue": "text-classification", "sequence-classification": "text-classification",
                  "sentiment-analysis": "text-classification", "ner": "token-classification",
                  "qa": "question-answering", "mlm": "masked-lm", "masked-language-modeling": "masked-lm"}


def export_task(name: str) -> str:
    """--task: one of ours, or SparseML's name for it."""
    name = name.replace("_", "-")
    task = SPARSEML_TASKS.get(name, name)
    if task not in EXPORT_TASKS:
        raise argparse.ArgumentTypeError(f"{name!r} is not a task ({', '.join([*EXPORT_TASKS, *SPARSEML_TASKS])})")
    return task


def export_main(argv: list[str] | None = None) -> int:
    args = build_export_parser().parse_args(argv)
    model, tokenizer, task_name = load_trained(args.model_path, args.task)
    task = EXPORT_TASKS[task_name]
    quantized = [(name, fq) for name, fq in fake_quants(model) if fq.enabled]
    if quantized and args.opset < 13:
        raise UserError(f"--opset {args.opset}: per-channel int8 needs opset 13 or newer")
    for name, fq in quantized:
        if (fq.quant_min, fq.quant_max) not in ((-128, 127), (0, 255), (0, 127)):
            raise UserError(f"{name}: range {fq.quant_min}..{fq.quant_max} has no ONNX QuantizeLinear; "
                            "export needs weight_bits and activation_bits 8")
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    samples = sample_inputs(tokenizer, args.sequence_length)
    partial, onnx_path = out / "model.onnx.partial", out / "model.onnx"
    optimized_partial = out / f"{OPTIMIZED_FILE}.partial"
    try:
        export_onnx(model, task, samples, partial, args.opset)
        report = check_export(partial, model, task, samples, args.atol)
        report["optimized"] = optimize_and_check(partial, optimized_partial, {k: v.numpy() for k, v in samples.items()},
                                                 report["reference"], report["atol"])
    except ExportCheckError:
        partial.replace(out / "model.onnx.rejected")
        for stale in (onnx_path, out / OPTIMIZED_FILE, optimized_partial, out / REPORT_FILE):
            stale.unlink(missing_ok=True)  # an earlier export here must not pass for this one
        raise
    except BaseException:
        for half in (partial, optimized_partial):  # an export that crashed leaves no half-written file
            half.unlink(missing_ok=True)
        raise
    partial.replace(onnx_path)
    optimized_partial.replace(out / OPTIMIZED_FILE)
    return write_deployment(args, out, tokenizer, samples, report, task_name, bool(quantized))


def write_deployment(args, out: Path, tokenizer, samples, report: dict, task_name: str, quantized: bool) -> int:
    """Everything beside the checked model.onnx, the report (with its sha256) last."""
    src = Path(args.model_path)
    shutil.copy(src / "config.json", out / "config.json")
    tokenizer.save_pretrained(out)
    if (src / RECIPE_FILE).exists():
        shutil.copy(src / RECIPE_FILE, out / RECIPE_FILE)
    np.savez(out / SAMPLE_INPUTS_FILE, **{k: v.numpy() for k, v in samples.items()})
    np.savez(out / SAMPLE_OUTPUTS_FILE, **report.pop("reference"))
    onnx_path = out / "model.onnx"
    report.update(task=task_name, quantized=quantized, opset=args.opset, onnx_bytes=onnx_path.stat().st_size,
                  sha256=sha256(onnx_path))
    (out / REPORT_FILE).write_text(json.dumps(report, indent=1) + "\n")
    print(export_summary(report, onnx_path))
    return 0


def export_summary(report: dict, path: Path) -> str:
    kind = "int8 QDQ" if report["quantized"] else "fp32"
    optimized = report["optimized"]
    return (f"exported {path} ({report['onnx_bytes'] / 2**20:.1f} MiB, {kind}, opset {report['opset']}, "
            f"sha256 {report['sha256'][:12]}...) and {path.parent / optimized['file']} (onnxruntime "
            f"{optimized['onnxruntime']} {optimized['level']}, CPU, {optimized['bytes'] / 2**20:.1f} MiB, max abs diff "
            f"{optimized['max_abs_diff']:.3g})\n" + parity_summary(report))


def parity_summary(report: dict) -> str:
    weights = (f"weights: {len(report['sparsity']) - 1} Linear/Embedding tensors equal to the trained ones, zeros "
               f"kept (sparsity {report['sparsity']['overall']:.1%}); quantized layers with int8 weights and Q/DQ: "
               f"{len(report['quantized_layers'])}")
    parity = (f"onnxruntime vs PyTorch on {len(SAMPLE_TEXTS)} samples: max abs diff {report['max_abs_diff']:.3g} "
              f"(tolerance {report['atol']:.3g}), argmax agreement {report['argmax_agreement']:.1%}")
    return f"{weights}\n{parity}"


def verify_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="distsparse verify", allow_abbrev=False,
                                description="Re-run the export's checks on a deployment folder "
                                            "(sha256, sparsity, Q/DQ, onnxruntime on the stored samples).")
    p.add_argument("deployment_dir", help="the folder distsparse export wrote")
    args = p.parse_args(argv)
    report = verify_deployment(Path(args.deployment_dir))
    print(f"verified {Path(args.deployment_dir) / 'model.onnx'} (sha256 {report['sha256'][:12]}... as recorded)\n"
          + parity_summary(report))
    return 0
