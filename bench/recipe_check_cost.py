"""What ``distsparse recipe check`` costs on the largest real SparseML recipe, and on refusing hostile ones.

Each case runs in a fresh process (under a timeout and a 2 GiB address-space limit, so that a
regression is reported rather than felt): the process times its imports and the check apart and
reports its peak resident memory (``ru_maxrss``) before and after the check. Cases alternate
round-robin; times are medians. The hostile cases are the issue-14 probe's: an alias bomb (10**9
nodes once expanded, 500 bytes of YAML), a recursive anchor, flow nesting 5000 deep, a 5 MB recipe
and a chain of 2000 variables; last, the largest recipe the bounds let through, for its parse time.

    .venv/bin/python bench/recipe_check_cost.py --out bench/results/recipe_check_cost.json
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import benchlib as bl

ADDRESS_SPACE = 2 * 2**30
# Runs in each case's process: the check's own time and memory, apart from the imports'.
PROBE = """
import contextlib, io, json, resource, sys, time
start = time.perf_counter()
from distsparse.cli import main
import distsparse.recipe.check  # what main imports for this command: torch and every modifier
imported = time.perf_counter()
rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out, err = io.StringIO(), io.StringIO()
with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    code = main(["recipe", "check", sys.argv[1]])
done = time.perf_counter()
print(json.dumps({"exit": code, "import_s": imported - start, "check_s": done - imported,
                  "rss_before_kib": rss_before, "rss_peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                  "stderr": err.getvalue(), "stdout_lines": out.getvalue().count("\\n")}))
"""


def bombs() -> dict[str, tuple[str, str]]:
    """name -> (what it is, recipe text): the hostile recipes that ran away before issue 14."""
    return {
        "alias_bomb": ("9 levels of 10 aliases: 10**9 nodes expanded",
                       "a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
                       + "".join(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 10))
                       + "modifiers: []\n"),
        "recursive_anchor": ("an alias inside its own anchor",
                             "num_epochs: 2\nloop: &loop [1, *loop]\nmodifiers: []\n"),
        "deep_flow": ("[[[...]]] 5000 deep", "x: 1\ndeep: " + "[" * 5000 + "]" * 5000 + "\nmodifiers: []\n"),
        "five_megabytes": ("400k variables, 5.7 MB",
                           "".join(f"v{i}: {i}\n" for i in range(400_000)) + "modifiers: []\n"),
        "variable_chain": ("v0: eval(v1), v1: eval(v2), ... 2000 long",
                           "".join(f"v{i}: eval(v{i + 1})\n" for i in range(2000)) + "v2000: 1\nmodifiers: []\n"),
    }


def largest_accepted() -> str:
    """Just under both the size and the node bound, in short tokens (PyYAML's slowest per byte)."""
    text = "".join(f"k{i:05}: {'x' * 13}\n" for i in range(47_000)) + "modifiers: []\n"
    assert len(text) <= 2**20
    return text


def largest_real_recipe() -> Path:
    """The largest SparseML recipe in ../shared/recipes-sparseml, else the largest of recipes/."""
    found = sorted((bl.SHARED / "recipes-sparseml").glob("*.yaml")) or sorted(bl.RECIPES.glob("*.yaml"))
    return max(found, key=lambda p: p.stat().st_size)


def limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE, ADDRESS_SPACE))


def run_case(path: Path, timeout: float) -> dict:
    try:
        proc = subprocess.run([sys.executable, "-c", PROBE, str(path)], cwd=bl.ROOT, capture_output=True, text=True,
                              timeout=timeout, preexec_fn=limit_memory, check=False)
    except subprocess.TimeoutExpired:
        return {"exit": None, "timed_out": True}
    if proc.returncode != 0:  # the check itself crashed: a traceback instead of one line
        return {"exit": proc.returncode, "crash": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout)


def measure(cases: dict[str, tuple[str, Path]], repeats: int, timeout: float) -> list[dict]:
    runs: dict[str, list[dict]] = {name: [] for name in cases}
    names = list(cases)
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            runs[name].append(run_case(cases[name][1], timeout))
    rows = []
    for name, (what, path) in cases.items():
        done = [run for run in runs[name] if "check_s" in run]
        row = {"case": name, "what": what, "bytes": path.stat().st_size, "exit": runs[name][0].get("exit"),
               "runs": len(runs[name])}
        if len(done) < len(runs[name]):
            row["failures"] = [run for run in runs[name] if "check_s" not in run]
        if done:
            row.update(
                seconds=statistics.median(run["check_s"] for run in done),
                import_seconds=statistics.median(run["import_s"] for run in done),
                peak_rss_mib=max(run["rss_peak_kib"] for run in done) / 1024,
                added_rss_mib=max(run["rss_peak_kib"] - run["rss_before_kib"] for run in done) / 1024,
                message=done[0]["stderr"].strip().replace(str(path), path.name),
                stderr_lines=done[0]["stderr"].count("\n"),
                stdout_lines=done[0]["stdout_lines"])
        rows.append(row)
    return rows


def table(result: dict) -> str:
    s = result["settings"]
    rows = []
    for c in result["cases"]:
        outcome = ("timed out" if c.get("failures") and "seconds" not in c else
                   f"exit {c['exit']}" + (f", {c['stdout_lines']}-line timeline" if c["exit"] == 0 else
                                          f", {c['stderr_lines']} line: `{c['message'].split(': error: ', 1)[-1]}`"))
        rows.append([c["case"], c["what"], f"{c['bytes']:,}", outcome, f"{c.get('seconds', float('nan')) * 1e3:.1f}",
                     f"{c.get('added_rss_mib', float('nan')):.1f}", f"{c.get('peak_rss_mib', float('nan')):.0f}"])
    head = (f"`distsparse recipe check` in a fresh process per case under a {s['address_space_gib']} GiB address-space "
            f"limit, median of {s['repeats']} alternating runs; imports (median {result['import_seconds']:.1f} s) "
            "not counted in check ms. Peak RSS is the whole process (Python, torch, the CLI); "
            "added RSS is what the check raised it by.")
    return head + "\n\n" + bl.markdown(["case", "what", "bytes", "outcome", "check ms", "added RSS MiB",
                                        "peak RSS MiB"], rows)


def main() -> None:
    p = bl.parser("recipe_check_cost", __doc__)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--timeout", type=float, default=300, help="seconds before a case counts as running away")
    args = p.parse_args()
    repeats = 1 if args.tiny else args.repeats
    real = largest_real_recipe()
    with tempfile.TemporaryDirectory() as tmp:
        cases = {"real": (f"the largest real recipe: {os.path.relpath(real, bl.ROOT)}", real)}
        hostile = {**bombs(), "largest_accepted": ("47k variables: 94k nodes, just under 1 MiB", largest_accepted())}
        for name, (what, text) in list(hostile.items())[:2 if args.tiny else None]:  # --tiny: 3 processes
            path = Path(tmp) / f"{name}.yaml"
            path.write_text(text)
            cases[name] = (what, path)
        rows = measure(cases, repeats, args.timeout)
    imports = [row["import_seconds"] for row in rows if "import_seconds" in row]
    result = {"settings": {"tiny": args.tiny, "repeats": repeats, "timeout_s": args.timeout,
                           "address_space_gib": ADDRESS_SPACE / 2**30},
              "import_seconds": statistics.median(imports) if imports else None, "cases": rows}
    bl.save(result, args.out, table(result))


if __name__ == "__main__":
    main()
