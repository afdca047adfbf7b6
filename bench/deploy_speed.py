"""Deployed speed: PyTorch fp32 vs onnxruntime fp32 vs onnxruntime int8, with model file sizes;
with ``--against``, our int8 export side by side with another int8 ONNX file (SparseML's).

Input: a model folder ``distsparse train`` wrote with QAT (benchmark 3's gmp80_qat run). Both ONNX
files come from ``distsparse export`` (which verifies them): the int8 one from the folder as
trained, the fp32 one from the same weights without the QAT files. PyTorch runs the same weights
as a plain Hugging Face model (``from_pretrained``, default attention, inference mode). Engines
alternate round-robin for each batch size and sequence length; inputs are random token ids without
padding; torch and onnxruntime get the same thread count.

    .venv/bin/python bench/deploy_speed.py --model_path outputs/bench/sst2/gmp80_qat \\
        --out bench/results/deploy_speed.json

Side by side (``--against``): both ONNX files in one onnxruntime, same session options and
threads, same random token ids, alternating rounds, batch 1 and 32 at sequence 64 (SparseML's
file fixes the sequence at 64); ms/row medians, our/their ratio per round, file sizes, and
accuracy on the full SST-2 dev set (each file with its own folder's tokenizer, padded to 64)
beside our PyTorch fake-quant model. Without ``--model_path`` our model is made the way the
peer's was (``seed_model``) and kept in ``--work_dir`` for the next run:

    .venv/bin/python bench/deploy_speed.py --against ../shared/peers/sparseml-minilm-int8/model.onnx \\
        --out bench/results/deploy_vs_sparseml.json
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import onnxruntime
import torch

import benchlib as bl
from accuracy_sst2 import sparsity
from distsparse.tasks.files import DEFAULT_VALIDATION

SHAPES = [(1, 64), (1, 128), (32, 64), (32, 128)]
ENGINES = ("pytorch_fp32", "onnx_fp32", "onnx_int8")
SPEEDUP_TARGET = 2.0  # int8 vs PyTorch fp32 at batch 32
SIDE_BY_SIDE_BATCHES = (1, 32)
RATIO_TARGET = 0.5  # our ms/row at most half of theirs (issue 18)
ACCURACY_GAP = 0.005  # onnxruntime within 0.5 points of the PyTorch fake-quant model
# The peer's SparseML run (../shared/peers/README.md), in our recipe language: constant pruning of
# a model pruned beforehand, weight decay 0.01, linear LR 1.5e-4 -> 0, QAT from 2/3 of the epochs
# with observers frozen at 5/6, embeddings quantized, Linear outputs not, no distillation; one weight
# scale per tensor, as SparseML's QuantizationModifier (no weight_strategy: the default).
SEED_RECIPE = """
version: 1.1.0
num_epochs: 3.0
training_modifiers:
  - !EpochRangeModifier
    start_epoch: 0.0
    end_epoch: eval(num_epochs)
  - !LearningRateFunctionModifier
    start_epoch: 0.0
    end_epoch: eval(num_epochs)
    lr_func: linear
    init_lr: 1.5e-4
    final_lr: 0.0
  - !SetWeightDecayModifier
    start_epoch: 0.0
    weight_decay: 0.01
pruning_modifiers:
  - !ConstantPruningModifier
    start_epoch: 0.0
    params: __ALL_PRUNABLE__
quantization_modifiers:
  - !QuantizationModifier
    start_epoch: eval(num_epochs * 2 / 3)
    disable_quantization_observer_epoch: eval(num_epochs * 5 / 6)
    freeze_bn_stats_epoch: eval(num_epochs * 5 / 6)
    quantize_embeddings: 1
    quantize_linear_activations: 0
    exclude_module_types: [LayerNorm, Tanh]
    submodules: [bert.embeddings, bert.encoder, bert.pooler, classifier]
"""
SEED_SPARSITY = 0.7


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
    proc = bl.run_child(cmd, cwd=bl.ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
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
    return {f"int8 ≥ {SPEEDUP_TARGET:g}x PyTorch fp32, batch 32 seq {r['seq']}": r["speedup_vs_pytorch"] >= SPEEDUP_TARGET
            for r in result["results"] if r["engine"] == "onnx_int8" and r["batch"] == 32}


def table(result: dict) -> str:
    if "against" in result:
        return side_by_side_table(result)
    s, sizes = result["settings"], result["sizes_mib"]
    rows = [[r["batch"], r["seq"], r["engine"], f"{r['ms_per_batch']:.2f}", f"{r['ms_per_row']:.2f}",
             f"{r['speedup_vs_pytorch']:.2f}x", f"{sizes[r['engine']]:.1f}"] for r in result["results"]]
    head = (f"{s['model']} ({s['encoder_sparsity']:.1%} encoder sparsity), {s['threads']} threads for torch and "
            f"onnxruntime {s['onnxruntime']}, median of {s['repeats']} alternating rounds")
    # recomputed: a result written before issue 18 also carries cross-run SparseML figures, not shown
    checks = "\n".join(f"- {name}: {bl.verdict(ok)}" for name, ok in verdicts(result).items())
    return "\n\n".join([head, bl.markdown(["batch", "seq", "engine", "ms/batch", "ms/row", "speed vs PyTorch fp32",
                                           "file MiB"], rows), checks])


# -- side by side with another int8 ONNX file (--against) -------------------------------------------
def seed_model(args, work: Path) -> Path:
    """Our model trained the way the peer's SparseML model was: MiniLM-L6, every encoder Linear
    magnitude-pruned to 70% per tensor, a fresh 2-label head, then ``distsparse train`` with
    SEED_RECIPE on the first ``--train_rows`` SST-2 train rows (seq 64, batch 32, seed 42).
    Kept in ``work``; reused while the command and the recipe that made it are the same."""
    from step_overhead import presparsify_

    out, done = work / "model", work / "bench_run.json"
    recipe = work / "seed_recipe.yaml"
    cmd = ["-m", "distsparse.cli", "train", "--model_name_or_path", str(work / "start"), "--recipe", str(recipe),
           "--recipe_args", f"num_epochs={args.epochs:g}", "--train_file", str(bl.SST2 / "train.tsv"),
           "--max_train_samples", str(args.train_rows), "--max_seq_length", "64", "--per_device_train_batch_size", "32",
           "--seed", "42", "--save_strategy", "no", "--eval_strategy", "no", "--output_dir", str(out),
           "--overwrite_output_dir"]
    if done.is_file() and json.loads(done.read_text()).get("command") == cmd[1:] + [SEED_RECIPE]:
        print(f"deploy_speed: reusing {out}", flush=True)
        return out
    work.mkdir(parents=True, exist_ok=True)
    recipe.write_text(SEED_RECIPE)
    start = bl.load_model(tiny=False)
    presparsify_(start, SEED_SPARSITY)
    bl.save_model(start, work / "start")
    print(f"deploy_speed: training {out} ({args.train_rows} rows x {args.epochs:g} epochs) ...", flush=True)
    t0 = time.perf_counter()
    with open(work / "train.log", "w") as log:
        proc = bl.run_child([sys.executable, *cmd], cwd=bl.ROOT, stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    if proc.returncode != 0:
        sys.exit(f"deploy_speed: training failed, see {work / 'train.log'}")
    done.write_text(json.dumps({"command": cmd[1:] + [SEED_RECIPE], "train_seconds": round(time.perf_counter() - t0, 1)}, indent=1))
    return out


def session(path: Path, threads: int):
    """One onnxruntime session, the same options for every file; returns run(feed) and the input names."""
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    s = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in s.get_inputs()]
    return (lambda feed: s.run(None, {k: feed[k] for k in names})[0]), s.get_inputs()


def fixed_sequence(inputs) -> int | None:
    """The sequence length a file fixes in its inputs' second axis (None: dynamic)."""
    dims = {i.shape[1] for i in inputs if len(i.shape) > 1}
    fixed = [d for d in dims if isinstance(d, int)]
    return fixed[0] if fixed else None


def dev_accuracy(predict, tokenizer_dir: Path, dev_file: Path, seq: int, batch: int = 32) -> float:
    """Accuracy on every row of ``dev_file`` (sentence, label), padded (and truncated) to ``seq`` tokens."""
    import numpy as np
    from transformers import AutoTokenizer

    from distsparse.tasks.files import read_file

    dev = read_file(dev_file)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    right = 0
    for i in range(0, len(dev), batch):
        rows = dev[i:i + batch]
        enc = tokenizer(rows["sentence"], padding="max_length", truncation=True, max_length=seq, return_tensors="np")
        feed = {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}
        right += int((predict(feed).argmax(-1) == np.asarray(rows["label"])).sum())
    return right / len(dev)


def side_by_side(args, model_dir: Path, against: Path, work: Path) -> dict:
    from distsparse.export import load_trained
    from distsparse.tasks.files import read_file

    qdq = export(model_dir, work / "deploy", args.threads)
    ours_path = qdq.parent / "model_optimized.onnx"  # what a CPU deployment loads (same speed as model.onnx)
    files = {"distsparse": ours_path, "other": against}
    runs, seqs = {}, {}
    for name, path in files.items():
        runs[name], inputs = session(path, args.threads)
        seqs[name] = fixed_sequence(inputs)
    seq = seqs["other"] or seqs["distsparse"] or 64
    results = []
    for batch in args.batches:
        feed = {k: v.numpy() for k, v in bl.random_batch(batch, seq, 30522).items() if k != "labels"}
        times = bl.round_robin({name: (lambda f=f: f(feed)) for name, f in runs.items()}, args.warmup, args.repeats)
        results.append({"batch": batch, "seq": seq,
                        "ms_per_row": {n: round(bl.median_ms(t) / batch, 3) for n, t in times.items()},
                        "ratio": round(bl.paired_ratio(times["distsparse"], times["other"]), 3)})
    model, _, _ = load_trained(model_dir)

    def pytorch(feed):
        with torch.no_grad():
            return model(**{k: torch.from_numpy(v) for k, v in feed.items()}).logits.numpy()

    accuracy = {"pytorch_fake_quant": dev_accuracy(pytorch, model_dir, args.dev_file, seq),
                "distsparse": dev_accuracy(runs["distsparse"], ours_path.parent, args.dev_file, seq),
                "other": dev_accuracy(runs["other"], against.parent, args.dev_file, seq)}
    dev_rows = len(read_file(args.dev_file))
    report = json.loads((ours_path.parent / "export_report.json").read_text())
    return {"against": str(against), "results": results, "accuracy": accuracy,
            "bytes": {**{n: p.stat().st_size for n, p in files.items()}, "distsparse_qdq": qdq.stat().st_size},
            "sequence": seq,
            "export_parity": {k: report[k] for k in ("max_abs_diff", "atol", "argmax_agreement")},
            "encoder_sparsity": round(sparsity(model_dir), 4), "dev_rows": dev_rows}


def side_by_side_verdicts(result: dict) -> dict:
    checks = {f"ours ≤ {RATIO_TARGET:g}x theirs at batch {r['batch']}": r["ratio"] <= RATIO_TARGET
              for r in result["results"]}
    checks["our file ≤ theirs"] = result["bytes"]["distsparse"] <= result["bytes"]["other"]
    acc = result["accuracy"]
    checks[f"onnxruntime accuracy within {ACCURACY_GAP * 100:g} points of PyTorch fake-quant"] = \
        abs(acc["distsparse"] - acc["pytorch_fake_quant"]) <= ACCURACY_GAP
    return checks


def side_by_side_table(result: dict) -> str:
    s = result["settings"]
    head = (f"Both int8 files in one onnxruntime {s['onnxruntime']} process, the same session options "
            f"(ORT_ENABLE_ALL, {s['threads']} intra-op threads), the same random token ids (no padding), "
            f"{s['repeats']} alternating rounds after {s['warmup']}; ratio = median over rounds of ours / theirs. "
            f"Ours: `model_optimized.onnx` of `distsparse export` (onnxruntime's saved ORT_ENABLE_ALL graph) of "
            f"{s['model']}. Theirs: `{s['against']}`. Export parity on its samples: max abs diff "
            f"{result['export_parity']['max_abs_diff']:.3g} (tolerance {result['export_parity']['atol']:.3g}).")
    rows = [[r["batch"], r["seq"], f"{r['ms_per_row']['distsparse']:.2f}", f"{r['ms_per_row']['other']:.2f}",
             f"{r['ratio']:.3f}x"] for r in result["results"]]
    mib = {k: v / 2**20 for k, v in result["bytes"].items()}
    b = result["bytes"]
    rows.append(["file", "", f"{mib['distsparse']:.2f} MiB, {b['distsparse']:,} B (model_optimized.onnx; model.onnx: "
                 f"{b['distsparse_qdq']:,} B)", f"{mib['other']:.2f} MiB, {b['other']:,} B",
                 f"{b['distsparse'] / b['other']:.3f}x ({max(b['distsparse'], b['distsparse_qdq']) / b['other']:.3f}x)"])
    acc = result["accuracy"]
    rows.append([f"SST-2 dev accuracy ({result['dev_rows']} rows)", "", f"{acc['distsparse']:.2%} (PyTorch fake-quant "
                 f"{acc['pytorch_fake_quant']:.2%})", f"{acc['other']:.2%}", ""])
    checks = "\n".join(f"- {name}: {bl.verdict(ok)}" for name, ok in side_by_side_verdicts(result).items())
    return "\n\n".join([head, bl.markdown(["batch", "seq", "distsparse ms/row", "SparseML ms/row", "ratio"], rows), checks])


def main() -> None:
    p = bl.parser("deploy_speed", __doc__)
    p.add_argument("--model_path", default=None, help="a QAT model folder from distsparse train (tiny: made if not given; "
                                                       "with --against: made by seed_model if not given)")
    p.add_argument("--against", default=None, help="another int8 ONNX file (its folder has its tokenizer): side by side")
    p.add_argument("--work_dir", default=str(bl.ROOT / "outputs" / "bench" / "deploy_seed70"),
                   help="--against without --model_path: where our model is trained and kept")
    p.add_argument("--train_rows", type=int, default=2000, help="--against without --model_path: SST-2 train rows")
    p.add_argument("--epochs", type=float, default=3.0, help="--against without --model_path: epochs (QAT in the last third)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=30)
    args = p.parse_args()
    args.threads = bl.set_threads(args.threads)
    args.shapes, args.batches = SHAPES, SIDE_BY_SIDE_BATCHES
    if args.tiny:
        args.warmup, args.repeats, args.shapes = 1, 3, [(1, 64), (32, 64)]
    elif not args.model_path and not args.against:
        p.error("--model_path is required (benchmark 3's gmp80_qat folder), except with --tiny or --against")
    if args.against:
        return main_against(p, args)
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
    bl.save(result, args.out, table(result))


def main_against(p, args) -> None:
    against = Path(args.against)
    if not against.is_file():
        p.error(f"--against {against}: no such file")
    if args.out == str(bl.RESULTS / "deploy_speed.json"):
        args.out = str(bl.RESULTS / "deploy_vs_sparseml.json")
    args.dev_file = DEFAULT_VALIDATION if args.tiny else bl.SST2 / "dev.tsv"
    tmp = tempfile.TemporaryDirectory()
    if args.model_path:
        model_dir, made = Path(args.model_path), "given with --model_path"
    elif args.tiny:
        model_dir, made = tiny_qat_model(Path(tmp.name) / "tiny-qat"), "tiny_qat_model"
    else:
        model_dir = seed_model(args, Path(args.work_dir))
        made = (f"MiniLM-L6 pruned to {SEED_SPARSITY:.0%} per encoder Linear, then `distsparse train` with the "
                f"seed-shaped recipe (SparseML run's schedule: constant pruning, QAT from 2/3 of the epochs, observers "
                f"frozen at 5/6, no distillation) on {args.train_rows} SST-2 rows x {args.epochs:g} epochs, seq 64, "
                f"batch 32 (bench/deploy_speed.py seed_model)")
    with tmp:
        result = side_by_side(args, model_dir, against, Path(tmp.name))
    result["settings"] = {"tiny": args.tiny, "model": f"{model_dir} ({result['encoder_sparsity']:.1%} encoder "
                          f"sparsity; {made})", "against": args.against, "threads": args.threads,
                          "onnxruntime": onnxruntime.__version__, "warmup": args.warmup, "repeats": args.repeats,
                          "inputs": "random token ids, no padding"}
    result["targets"] = side_by_side_verdicts(result)
    bl.save(result, args.out, table(result))


if __name__ == "__main__":
    main()
