"""Assemble BENCHMARKS.md from the JSON results in bench/results/ and the machine they ran on.

Each benchmark's table is rendered by that benchmark's own ``table()``, beside the exact command
that produced it. A benchmark without a result (or with only a --tiny one) says "not yet measured":
BENCHMARKS.md holds measured numbers only.

    .venv/bin/python bench/report.py
"""
from __future__ import annotations

import argparse
import itertools
import json
import re
from pathlib import Path

import accuracy_sst2
import benchlib as bl
import deploy_speed
import obs_sst2
import rank_sync
import step_overhead

SECTIONS = [  # (result name, title, module, default command, what it answers)
    ("step_overhead", "1. Training-step overhead of each modifier", step_overhead,
     ".venv/bin/python bench/step_overhead.py --out bench/results/step_overhead.json",
     "Targets: constant pruning ≤ 1.03x, constant pruning + QAT ≤ 1.15x, distillation ≤ 1 + the teacher's "
     "forward share. Where one is missed: `.venv/bin/python bench/step_overhead.py --profile qat` "
     "(torch.profiler's top operators, in bench/results/step_overhead_profile.json)."),
    ("rank_sync", "2. Rank-sync cost at 2 ranks", rank_sync,
     ".venv/bin/python bench/rank_sync.py --out bench/results/rank_sync.json",
     "Target: under 2% of the step time per step (the mask broadcast counted once per GMP mask update)."),
    ("accuracy_sst2", "3. Accuracy on the SST-2 dev set", accuracy_sst2,
     ".venv/bin/python bench/accuracy_sst2.py --out bench/results/accuracy_sst2.json",
     "Target: at least 98% recovery at 80% sparsity + int8."),
    ("deploy_speed", "4. Deployed speed and size", deploy_speed,
     ".venv/bin/python bench/deploy_speed.py --model_path outputs/bench/sst2/gmp80_qat "
     "--out bench/results/deploy_speed.json",
     "Target: int8 ≥ 2x PyTorch fp32 at batch 32. SparseML's export is compared in 4b, side by side."),
    ("deploy_vs_sparseml", "4b. Deployed int8 side by side with SparseML's export (issue 18)", deploy_speed,
     ".venv/bin/python bench/deploy_speed.py --against ../shared/peers/sparseml-minilm-int8/model.onnx "
     "--out bench/results/deploy_vs_sparseml.json",
     "Targets: ours ≤ 0.5x SparseML's ms/row at batch 1 and 32, file no bigger, onnxruntime accuracy on the full "
     "SST-2 dev set within 0.5 points of the PyTorch fake-quant model. Only numbers from one process on one machine "
     "are set against each other (../shared/NOTES.md: int8 kernels differ ~3x between CPUs)."),
    ("obs_sst2", "5. OBS (oBERT) against GMP at 80% sparsity; one OBS pruning step at 1 and 2 ranks", obs_sst2,
     ".venv/bin/python bench/obs_sst2.py --out bench/results/obs_sst2.json",
     "Issue 15: accuracy after OBS vs after GMP on the same SST-2 budget, the time (by phase) and memory of one "
     "OBS pruning step, and the summed-Fisher inverse against SparseML's Woodbury updates."),
]
MACHINE_KEYS = ["cpu", "cores", "cores_usable", "memory_gib", "os", "python", "torch", "accelerate", "transformers",
                "onnxruntime", "distsparse"]


def load(results: Path) -> dict[str, dict]:
    """Results by benchmark name; --tiny ones are left out (they measure nothing)."""
    found = {}
    for name, *_ in SECTIONS:
        path = results / f"{name}.json"
        if path.is_file():
            result = json.loads(path.read_text())
            if not result.get("settings", {}).get("tiny"):
                found[name] = result
    return found


def machine_section(found: dict[str, dict]) -> str:
    machines = {name: r["machine"] for name, r in found.items()}
    if not machines:
        machine = bl.machine()
        note = "No benchmark has run yet; this is the machine `bench/report.py` ran on."
    else:
        machine = next(iter(machines.values()))
        others = [n for n, m in machines.items() if any(m.get(k) != machine.get(k) for k in MACHINE_KEYS)]
        note = ("All results come from this machine and these versions." if not others else
                f"**Results from different machines or versions**: {', '.join(others)} (see each section).")
    rows = [[k, machine.get(k)] for k in MACHINE_KEYS]
    return "## Machine and versions\n\n" + note + "\n\n" + bl.markdown(["", "value"], rows)


def section(name: str, title: str, module, command: str, targets: str, result: dict | None) -> str:
    parts = [f"## {title}", targets]
    if result is None:
        parts += [f"```\n{command}\n```", "_Not yet measured._"]
    else:
        m = result["machine"]
        parts += [f"```\n{result.get('command', command)}\n```",
                  f"Measured at commit `{m.get('commit')}`, load average {m.get('load_average_1m')} when it started "
                  f"({m.get('cores')} cores).", module.table(result)]
    return "\n\n".join(parts)


NOTES_MARKER = "<!-- analysis: kept by bench/report.py -->"
NUMBERED = re.compile(r"^## (\d+)[a-z]?\. ", re.M)


def numbered_after(notes: str, generated: str) -> str:
    """The hand-written notes' numbered sections ("## 5. Export parity ...") renumbered to continue
    after the generated ones, so adding a benchmark section never gives two sections one number."""
    last = max((int(n) for n in NUMBERED.findall(generated)), default=0)
    numbers = itertools.count(last + 1)
    return re.sub(r"^## \d+\. ", lambda m: f"## {next(numbers)}. ", notes, flags=re.M)


def render(results: Path) -> str:
    found = load(results)
    head = ("# Benchmarks\n\nMeasured numbers only, each beside the command that produced it (run from the "
            "repository root; bench/README.md says what each does). Regenerate this file with "
            "`.venv/bin/python bench/report.py` after running them.")
    body = [section(name, title, module, command, targets, found.get(name))
            for name, title, module, command, targets in SECTIONS]
    return "\n\n".join([head, machine_section(found), *body]) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(prog="bench/report.py", description=__doc__.strip().splitlines()[0])
    p.add_argument("--results", default=str(bl.RESULTS))
    p.add_argument("--out", default=str(bl.ROOT / "BENCHMARKS.md"))
    args = p.parse_args()
    out = Path(args.out)
    # Hand-written analysis below the marker survives regeneration.
    notes = out.read_text().partition(NOTES_MARKER)[2] if out.is_file() else ""
    generated = render(Path(args.results))
    out.write_text(generated + (f"\n{NOTES_MARKER}{numbered_after(notes, generated)}" if notes else ""))
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
