"""Deployed speed: PyTorch fp32 vs onnxruntime fp32 vs onnxruntime int8, with model file sizes.

Input: a model folder ``distsparse train`` wrote with QAT (benchmark 3's gmp80_qat run). Both ONNX
files come from ``distsparse export`` (which verifies them): the int8 one from the folder as
trained, the fp32 one from the same weights without the QAT files. PyTorch runs the same weights
as a plain Hugging Face model (``from_pretrained``, default attention, inference mode). Engines
alternate round-robin for each batch size and sequence length; inputs are random token ids without
padding; torch and onnxruntime get the same thread count.

    .venv/bin/python bench/deploy_speed.py --model_path outputs/bench/sst2/gmp80_qat \\
        --out bench/results/deploy_speed.json
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import onnxruntime
import torch

import benchlib as bl
from accuracy_sst2 import sparsity

SHAPES = [(1, 64), (1, 128), (32, 64), (32, 128)]
ENGINES = ("pytorch_fp32", "onnx_fp32", "onnx_int8")
SPEEDUP_TARGET = 2.0  # int8 vs PyTorch fp32 at batch 32
SPARSEML = {"size_mib": 21.9, "ms_per_row": 6.6, "qdq_size_mib": 86.9, "qdq_ms_per_row": 11.7}  # 70%-sparse MiniLM, b1 s64


def tiny_qat_model(folder: Path) -> Path:
    """A tiny BERT, 80% pruned, after three constant-pruning + QAT steps of the real job, saved as training saves it."""
    from distsparse.train import train_step, write_model
    from step_overhead import PRESPARSITY, QAT, presparsify_

    model = bl.load_model(tiny=True)
    presparsify_(model, PRESPARSITY)
    run = bl.build_run(bl.save_model(model, folder.parent / "tiny-start"), QAT, folder.parent, "tiny-qat")
    for seed in range(3):
        train_step(run, bl.random_batch(4, 16, 30522, seed))
    write_model(run, folder)
    return folder


def export(model_dir: Path, out: Path, threads: int) -> Path:
    cmd = [sys.executable, "-m", "distsparse.cli", "export", "--model_path", str(model_dir), "--output_dir", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.run(cmd, cwd=bl.ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"deploy_speed: {' '.join(cmd[1:])} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return out / "model.onnx"


def fp32_copy(model_dir: Path, folder: Path) -> Path:
    """The trained model as a plain fp32 folder: the weights distsparse reads back (a QAT folder stores
    int8 x scale), without the quantization (no quantization_config, recipe or scales)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from distsparse.savedmodel import from_pretrained

    from_pretrained(AutoModelForSequenceClassification, model_dir).save_pretrained(folder)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(folder)
    return folder


def engines(model_dir: Path, onnx_fp32: Path, onnx_int8: Path, threads: int) -> dict:
    """name -> run(inputs) for each engine."""
    import onnxruntime as ort
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()

    def pytorch(inputs):
        with torch.inference_mode():
            model(**{k: torch.from_numpy(v) for k, v in inputs.items()})

    def session(path):
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        s = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        names = {i.name for i in s.get_inputs()}
        return lambda inputs: s.run(None, {k: v for k, v in inputs.items() if k in names})

    return {"pytorch_fp32": pytorch, "onnx_fp32": session(onnx_fp32), "onnx_int8": session(onnx_int8)}


def measure(args, model_dir: Path, work: Path) -> dict:
    onnx_int8 = export(model_dir, work / "int8", args.threads)
    fp32_model = fp32_copy(model_dir, work / "fp32-model")
    onnx_fp32 = export(fp32_model, work / "fp32", args.threads)
    sizes = {"pytorch_fp32": (fp32_model / "model.safetensors").stat().st_size,
             "onnx_fp32": onnx_fp32.stat().st_size, "onnx_int8": onnx_int8.stat().st_size}
    run = engines(fp32_model, onnx_fp32, onnx_int8, args.threads)
    vocab = 30522
    results = []
    for batch, seq in args.shapes:
        inputs = {k: v.numpy() for k, v in bl.random_batch(batch, seq, vocab).items() if k != "labels"}
        times = bl.round_robin({name: (lambda f=f: f(inputs)) for name, f in run.items()}, args.warmup, args.repeats)
        base = times["pytorch_fp32"]
        for name in ENGINES:
            ms = bl.median_ms(times[name])
            results.append({"batch": batch, "seq": seq, "engine": name, "ms_per_batch": round(ms, 3),
                            "ms_per_row": round(ms / batch, 3), "speedup_vs_pytorch": round(bl.paired_ratio(base, times[name]), 3)})
    return {"sizes_mib": {k: round(v / 2**20, 2) for k, v in sizes.items()}, "results": results}


def verdicts(result: dict) -> dict:
    int8 = [r for r in result["results"] if r["engine"] == "onnx_int8"]
    checks = {f"int8 ≥ {SPEEDUP_TARGET:g}x PyTorch fp32, batch 32 seq {r['seq']}": r["speedup_vs_pytorch"] >= SPEEDUP_TARGET
              for r in int8 if r["batch"] == 32}
    size = result["sizes_mib"]["onnx_int8"]
    checks[f"int8 file ≤ SparseML int8 {SPARSEML['size_mib']} MiB (ours {size} MiB)"] = size <= SPARSEML["size_mib"]
    for r in int8:
        if (r["batch"], r["seq"]) == (1, 64):
            checks[f"int8 ≤ SparseML int8 {SPARSEML['ms_per_row']} ms/row at batch 1 seq 64 (ours {r['ms_per_row']:.2f})"] = \
                r["ms_per_row"] <= SPARSEML["ms_per_row"]
    return checks


def table(result: dict) -> str:
    s, sizes = result["settings"], result["sizes_mib"]
    rows = [[r["batch"], r["seq"], r["engine"], f"{r['ms_per_batch']:.2f}", f"{r['ms_per_row']:.2f}",
             f"{r['speedup_vs_pytorch']:.2f}x", f"{sizes[r['engine']]:.1f}"] for r in result["results"]]
    head = (f"{s['model']} ({s['encoder_sparsity']:.1%} encoder sparsity), {s['threads']} threads for torch and "
            f"onnxruntime {s['onnxruntime']}, median of {s['repeats']} alternating rounds")
    checks = "\n".join(f"- {name}: {bl.verdict(ok)}" for name, ok in result["targets"].items())
    ref = (f"SparseML's int8 export of a 70%-sparse MiniLM on this kind of machine (issue 8): {SPARSEML['size_mib']} MiB, "
           f"{SPARSEML['ms_per_row']} ms/row at batch 1 seq 64; its QDQ-only export {SPARSEML['qdq_size_mib']} MiB, "
           f"{SPARSEML['qdq_ms_per_row']} ms/row.")
    return "\n\n".join([head, bl.markdown(["batch", "seq", "engine", "ms/batch", "ms/row", "speed vs PyTorch fp32",
                                           "file MiB"], rows), checks, ref])


def main() -> None:
    p = bl.parser("deploy_speed", __doc__)
    p.add_argument("--model_path", default=None, help="a QAT model folder from distsparse train (tiny: made if not given)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=30)
    args = p.parse_args()
    args.threads = bl.set_threads(args.threads)
    args.shapes = SHAPES
    if args.tiny:
        args.warmup, args.repeats, args.shapes = 1, 3, [(1, 64), (32, 64)]
    elif not args.model_path:
        p.error("--model_path is required (benchmark 3's gmp80_qat folder), except with --tiny")
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model_path) if args.model_path else tiny_qat_model(Path(tmp) / "tiny-qat")
        if not (model_dir / "quantization.safetensors").is_file():
            p.error(f"--model_path {model_dir}: no quantization.safetensors: not a QAT-trained model")
        result = measure(args, model_dir, Path(tmp))
        result["settings"] = {"tiny": args.tiny, "model": "tiny BERT" if args.tiny else str(model_dir),
                              "encoder_sparsity": sparsity(model_dir), "threads": args.threads,
                              "onnxruntime": onnxruntime.__version__, "warmup": args.warmup, "repeats": args.repeats,
                              "inputs": "random token ids, no padding"}
    result["targets"] = verdicts(result)
    result["sparseml_reference"] = SPARSEML
    bl.save(result, args.out, table(result))


if __name__ == "__main__":
    main()
