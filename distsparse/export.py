"""distsparse export: a trained model folder to a verified ONNX deployment folder.

The model is rebuilt as it trained: ``from_pretrained`` + the QAT structure of its ``recipe.yaml``
+ the scales in ``quantization.safetensors``. The ONNX graph holds QuantizeLinear/DequantizeLinear
where the model fake-quantized (weights stored as int8 initializers) and plain fp32 elsewhere.

Nothing is called done before it is checked against the PyTorch model it came from:
- every Linear/Embedding weight in the file equals the weight the model computes with (its
  fake-quantized value for quantized layers), with the same zeros: sparsity is kept;
- every layer the recipe quantized has its int8 weight and Q/DQ on its activations;
- onnxruntime's outputs on the sample inputs match PyTorch's within ``--atol`` (max abs diff and
  argmax agreement reported; an argmax flip fails unless PyTorch's top two are within 2 x atol).
A failed check renames the file ``model.onnx.rejected`` and exits 2.
"""
from __future__ import annotations

import argparse
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .errors import UserError
from .extras import require
from .fake_quant import (ActivationFakeQuant, QuantEmbedding, QuantLinear, fake_quants, freeze_,
                         load_quant_state)
from .savedmodel import QUANT_FILE, RECIPE_FILE

# Checked on import, so `distsparse export` says what is missing before it loads a model.
onnx = require("onnx", "export", "distsparse export")
ort = require("onnxruntime", "export", "distsparse export")
numpy_helper = onnx.numpy_helper

TASKS = ("text-classification", "multi-label-classification", "token-classification")
PREFIX = "model."  # the wrapper's attribute: ONNX initializers are named "model.<parameter name>"
SAMPLE_TEXTS = [
    "a gripping, beautifully acted film that stays with you long after the credits.",
    "the plot is thin and the jokes fall flat.",
    "EU rejects German call to boycott British lamb.",
    "Peter Blackburn reported from Brussels on Monday",
    "it's not great, but it is not bad either",
    "an utterly pointless exercise in style over substance",
    "What a wonderful surprise!",
    "I would not recommend it to anyone, not even my worst enemy, and I have many.",
]


class ExportCheckError(UserError):
    """The exported file is not the trained model: refuse it."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="distsparse export", allow_abbrev=False,
                                description="Export a trained model folder to ONNX and verify it.")
    p.add_argument("--model_path", required=True, help="the folder distsparse train wrote (--output_dir)")
    p.add_argument("--output_dir", required=True, help="the deployment folder to write")
    p.add_argument("--task", choices=TASKS, default=None, help="default: from config.json's architectures")
    p.add_argument("--sequence_length", type=int, default=128, help="length of the sample inputs (axes stay dynamic)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset (13 or newer for per-channel int8)")
    p.add_argument("--atol", type=float, default=None,
                   help="max abs difference allowed between onnxruntime and PyTorch (default 1e-4 fp32, 0.05 int8)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    model, tokenizer, task = load_trained(args.model_path, args.task)
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
    onnx_path = out / "model.onnx"
    export_onnx(model, samples, onnx_path, args.opset, per_token=task == "token-classification")
    atol = args.atol if args.atol is not None else (0.05 if quantized else 1e-4)
    try:
        report = verify(onnx_path, model, samples, atol)
    except ExportCheckError:
        onnx_path.replace(out / "model.onnx.rejected")
        raise
    src = Path(args.model_path)
    shutil.copy(src / "config.json", out / "config.json")
    tokenizer.save_pretrained(out)
    if (src / RECIPE_FILE).exists():
        shutil.copy(src / RECIPE_FILE, out / RECIPE_FILE)
    np.savez(out / "sample_inputs.npz", **{k: v.numpy() for k, v in samples.items()})
    np.savez(out / "sample_outputs.npz", logits=report.pop("reference"))
    report.update(task=task, quantized=bool(quantized), opset=args.opset, onnx_bytes=onnx_path.stat().st_size)
    (out / "export_report.json").write_text(json.dumps(report, indent=1) + "\n")
    print(summary(report, onnx_path))
    return 0


# -- rebuilding the trained model ------------------------------------------------------------------
def load_trained(model_path, task: str | None = None):
    """The model as it ended training, in eval mode, scales fixed; plus its tokenizer and task."""
    from transformers import (AutoConfig, AutoModelForSequenceClassification,
                              AutoModelForTokenClassification, AutoTokenizer)

    from .modifiers.quantization import QuantizationModifier
    from .recipe import load_recipe

    path = Path(model_path)
    if not (path / "config.json").is_file():
        raise UserError(f"--model_path {path}: no config.json here (not a saved model folder)")
    if task is None:
        archs = AutoConfig.from_pretrained(path).architectures or []
        task = "token-classification" if any(a.endswith("ForTokenClassification") for a in archs) else "text-classification"
    model_class = AutoModelForTokenClassification if task == "token-classification" else AutoModelForSequenceClassification
    # eager attention: one plain graph that traces the same for every sequence length
    model = model_class.from_pretrained(path, attn_implementation="eager")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise UserError(f"--model_path {path}: no tokenizer files ({err})") from None
    if (path / RECIPE_FILE).is_file():
        quant = [m for m in load_recipe(path / RECIPE_FILE).modifiers if isinstance(m, QuantizationModifier)]
        for modifier in quant:
            modifier.build(model)
        if quant:
            if not (path / QUANT_FILE).is_file():
                raise UserError(f"{path / QUANT_FILE}: missing; the recipe quantizes, so its scales must be here")
            from safetensors.torch import load_file

            load_quant_state(model, load_file(path / QUANT_FILE), where=str(path / QUANT_FILE))
    freeze_(model)
    return model.eval(), tokenizer, task


def sample_inputs(tokenizer, sequence_length: int) -> dict[str, torch.Tensor]:
    """Fixed sentences, padded to ``sequence_length`` so that masking is exercised too."""
    encoded = tokenizer(SAMPLE_TEXTS, padding="max_length", truncation=True, max_length=sequence_length,
                        return_tensors="pt")
    accepted = ("input_ids", "attention_mask", "token_type_ids")
    return {k: encoded[k] for k in accepted if k in encoded}


# -- export ----------------------------------------------------------------------------------------
class _Logits(nn.Module):
    """Positional inputs in, logits out: what torch.onnx.export traces."""

    def __init__(self, model: nn.Module, names: list[str]):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *inputs):
        return self.model(**dict(zip(self.names, inputs))).logits


def export_onnx(model: nn.Module, samples: dict[str, torch.Tensor], path: Path, opset: int = 17,
                per_token: bool = False) -> None:
    """TorchScript export (torch's dynamo exporter cannot export fake quantization), then int8 weights.

    Constant folding stays off so every initializer keeps its parameter's name: the checks find
    each weight by name. onnxruntime folds what is left when it loads the file.
    """
    names = list(samples)
    axes = {n: {0: "batch", 1: "sequence"} for n in names}
    axes["logits"] = {0: "batch", 1: "sequence"} if per_token else {0: "batch"}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer chatter about HF's shape checks, and the legacy-exporter notice
        # an eval-mode wrapper: export restores the wrapper's mode, and a train-mode one would
        # switch the model's dropout back on
        torch.onnx.export(_Logits(model, names).eval(), tuple(samples.values()), str(path), input_names=names,
                          output_names=["logits"], dynamic_axes=axes, opset_version=opset, dynamo=False,
                          do_constant_folding=False)
    graph = onnx.load(str(path))
    store_int8_weights(graph)
    onnx.checker.check_model(graph)
    onnx.save(graph, str(path))


class _Graph:
    """Name lookups over an ONNX graph, and the constant value of a tensor where it has one."""

    def __init__(self, model: onnx.ModelProto):
        self.graph = model.graph
        self.initializers = {t.name: t for t in self.graph.initializer}
        self.producer = {o: n for n in self.graph.node for o in n.output}
        self.consumers: dict[str, list] = {}
        for n in self.graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)

    def initializer(self, name: str):
        """Follow Identity nodes (the exporter's de-duplication of equal tensors) to an initializer."""
        while name not in self.initializers and name in self.producer and self.producer[name].op_type == "Identity":
            name = self.producer[name].input[0]
        return self.initializers.get(name)

    def constant(self, name: str) -> np.ndarray | None:
        if self.initializer(name) is not None:
            return numpy_helper.to_array(self.initializer(name))
        node = self.producer.get(name)
        if node is None:
            return None
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            return numpy_helper.to_array(node.attribute[0].t)
        if node.op_type == "Cast":
            value = self.constant(node.input[0])
            to = onnx.helper.tensor_dtype_to_np_dtype(_attr(node, "to", None))
            return None if value is None else value.astype(to)
        return None


def _attr(node, name: str, default):
    return next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def store_int8_weights(model: onnx.ModelProto) -> None:
    """Replace QuantizeLinear(fp32 weight) -> DequantizeLinear by int8 weight -> DequantizeLinear.

    The levels are computed with the exact arithmetic of the PyTorch fake quantization, so the
    deployed weights are bit for bit the trained ones.
    """
    g = _Graph(model)
    done = []
    for q in [n for n in g.graph.node if n.op_type == "QuantizeLinear"]:
        weight = g.initializer(q.input[0])
        users = g.consumers.get(q.output[0], [])
        if weight is None or not users or any(u.op_type != "DequantizeLinear" for u in users):
            continue
        scale, zero_point = g.constant(q.input[1]), g.constant(q.input[2])
        if scale is None or zero_point is None:
            continue
        levels = quantize_levels(numpy_helper.to_array(weight), scale, zero_point, _attr(q, "axis", 1))
        name = f"{q.input[0]}_quantized"
        # scale and zero point as initializers of their own dtype: an int32 Constant cast to int8
        # would cost 4 bytes per channel, as much as a 4-wide row of weights
        for tensor, suffix in ((levels, ""), (scale, "_scale"), (zero_point, "_zero_point")):
            g.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(tensor), name + suffix))
        for dq in users:
            dq.input[:3] = [name, f"{name}_scale", f"{name}_zero_point"]
        done.append(q)
    for q in done:
        g.graph.node.remove(q)
    g = _Graph(model)
    for dq in [n for n in g.graph.node if n.op_type == "DequantizeLinear" and n.input[0].endswith("_quantized")]:
        _gather_rows_first(g, dq)
    _drop_unused(model)


def _gather_rows_first(g: _Graph, dq) -> None:
    """Gather(DequantizeLinear(table), ids) -> Cast(Gather(table, ids)) * Gather(row scales, ids).

    Same numbers (symmetric per-row int8), but onnxruntime no longer dequantizes the whole
    vocabulary table on every call (about 15 ms for MiniLM on 2 cores).
    """
    levels, scale, zero_point = dq.input[:3]
    users = g.consumers.get(dq.output[0], [])
    if (not users or any(u.op_type != "Gather" or u.input[0] != dq.output[0] or _attr(u, "axis", 0) != 0 for u in users)
            or g.constant(scale).ndim != 1 or _attr(dq, "axis", 1) != 0 or g.constant(zero_point).any()):
        return
    axes = "gather_rows_first_axes"
    if axes not in g.initializers:
        g.initializers[axes] = numpy_helper.from_array(np.array([-1], dtype=np.int64), axes)
        g.graph.initializer.append(g.initializers[axes])
    make = onnx.helper.make_node
    for gather in users:
        ids, out = gather.input[1], gather.output[0]
        nodes = [make("Gather", [levels, ids], [f"{out}_int8"], axis=0),
                 make("Cast", [f"{out}_int8"], [f"{out}_levels"], to=onnx.TensorProto.FLOAT),
                 make("Gather", [scale, ids], [f"{out}_row_scale"], axis=0),
                 make("Unsqueeze", [f"{out}_row_scale", axes], [f"{out}_row_scale_1"]),
                 make("Mul", [f"{out}_levels", f"{out}_row_scale_1"], [out])]
        at = list(g.graph.node).index(gather)
        g.graph.node.remove(gather)
        for offset, node in enumerate(nodes):
            g.graph.node.insert(at + offset, node)
    g.graph.node.remove(dq)


def quantize_levels(weight: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, axis: int) -> np.ndarray:
    """clamp(round(w * (1/s)) + z): torch's fake-quant rounding (a tie may round apart from ONNX's w / s)."""
    shape = [1] * weight.ndim
    if scale.ndim:
        shape[axis] = -1
    s, z = torch.tensor(scale).reshape(shape), torch.tensor(zero_point.astype(np.int32)).reshape(shape)
    info = np.iinfo(zero_point.dtype)
    q = torch.round(torch.tensor(weight) * torch.reciprocal(s)) + z
    return q.clamp(info.min, info.max).numpy().astype(zero_point.dtype)


def _drop_unused(model: onnx.ModelProto) -> None:
    graph = model.graph
    while True:
        used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        dead = [n for n in graph.node if not any(o in used for o in n.output)]
        for n in dead:
            graph.node.remove(n)
        if not dead:
            break
    unused = [t for t in graph.initializer if t.name not in used]
    for t in unused:
        graph.initializer.remove(t)


# -- verification ----------------------------------------------------------------------------------
def verify(path: Path, model: nn.Module, samples: dict[str, torch.Tensor], atol: float) -> dict:
    """Check the file against the PyTorch model it came from; raise ExportCheckError on any doubt."""
    model.eval()
    g = _Graph(onnx.load(str(path)))
    report = {"sparsity": check_weights(g, model), "quantized_layers": check_qdq(g, model)}
    report.update(check_outputs(path, model, samples, atol))
    return report


def _weight_layers(model: nn.Module):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Embedding))]


def check_weights(g: _Graph, model: nn.Module) -> dict:
    """Every Linear/Embedding weight: the file's value equals the one the model computes with.

    Returns the sparsity of each weight in the file, and of all of them together ("overall").
    """
    sparsity, zeros, total = {}, 0, 0
    for name, module in _weight_layers(model):
        key = f"{PREFIX}{name}.weight"
        with torch.no_grad():
            expected = (module.weight_quant(module.weight) if isinstance(module, (QuantLinear, QuantEmbedding))
                        else module.weight).numpy()
        got = _exported_weight(g, key)
        if got is None:
            raise ExportCheckError(f"{name}.weight: not found in the ONNX file")
        if got.shape != expected.shape:
            raise ExportCheckError(f"{name}.weight: shape {got.shape} in the ONNX file, {expected.shape} in the model")
        want, have = float((expected == 0).mean()), float((got == 0).mean())
        if not np.array_equal(expected == 0, got == 0):
            raise ExportCheckError(f"{name}.weight: sparsity {have:.2%} in the ONNX file, {want:.2%} in the trained "
                                   f"model ({int(((expected == 0) != (got == 0)).sum())} positions differ)")
        if not np.allclose(got, expected, rtol=1e-6, atol=0):
            raise ExportCheckError(f"{name}.weight: values differ from the trained model "
                                   f"(max abs diff {np.abs(got - expected).max():.3g})")
        sparsity[f"{name}.weight"] = round(have, 6)
        zeros, total = zeros + int((got == 0).sum()), total + got.size
    return {"overall": round(zeros / max(total, 1), 6), **sparsity}


def _exported_weight(g: _Graph, key: str) -> np.ndarray | None:
    """The weight as the graph computes it: dequantized (per output channel) where stored as int8."""
    levels = g.initializers.get(f"{key}_quantized")
    if levels is None:
        tensor = g.initializer(key)
        return None if tensor is None else numpy_helper.to_array(tensor)
    scale, zero_point = (g.constant(f"{key}_quantized{suffix}") for suffix in ("_scale", "_zero_point"))
    if scale is None:
        return None
    if zero_point is None:  # rows gathered before scaling: symmetric, no zero point left in the graph
        zero_point = np.zeros_like(scale, dtype=np.int8)
    q = numpy_helper.to_array(levels).astype(np.float32)
    shape = [-1] + [1] * (q.ndim - 1) if scale.ndim else []
    return (q - zero_point.astype(np.float32).reshape(shape)) * scale.reshape(shape)


def check_qdq(g: _Graph, model: nn.Module) -> int:
    """Every layer quantized in PyTorch is quantized in the file, with the same scales: its weight
    is int8, and the op using it reads (and, where asked, writes) activations through
    QuantizeLinear/DequantizeLinear."""
    layers = 0
    for name, module in _weight_layers(model):
        if not isinstance(module, (QuantLinear, QuantEmbedding)) or not module.weight_quant.enabled:
            continue
        levels = g.initializers.get(f"{PREFIX}{name}.weight_quantized")
        ops, weight_path = _weight_users(g, levels) if levels is not None else ([], set())
        if not ops or levels.data_type != onnx.TensorProto.INT8:
            raise ExportCheckError(f"{name}: quantized in training, but its weight is not int8 into "
                                   "DequantizeLinear (or row Gather) in the ONNX file")
        for op in ops:
            if isinstance(module, QuantLinear) and module.input_quant.enabled:
                (x,) = [i for i in op.input[:2] if i not in weight_path]
                dq = g.producer.get(x)
                _check_pair(g, dq and g.producer.get(dq.input[0]), dq, module.input_quant, f"{name}.input_quant")
            if isinstance(module.output_quant, ActivationFakeQuant) and module.output_quant.enabled:
                after = g.consumers.get(op.output[0], [])
                if len(after) == 1 and after[0].op_type == "Add":  # the bias of a MatMul
                    after = g.consumers.get(after[0].output[0], [])
                q = next((n for n in after if n.op_type == "QuantizeLinear"), None)
                dq = q and next(iter(g.consumers.get(q.output[0], [])), None)
                _check_pair(g, q, dq, module.output_quant, f"{name}.output_quant")
        layers += 1
    return layers


def _weight_users(g: _Graph, levels) -> tuple[list, set[str]]:
    """The ops that compute with an int8 weight, and the tensors on its way there:
    DequantizeLinear [-> Transpose] -> MatMul/Gemm, or Gather -> Cast -> Mul for embedding rows."""
    chains = {"DequantizeLinear": ("DequantizeLinear", "Transpose"), "Gather": ("Gather", "Cast")}
    ops, path = [], set()
    for user in g.consumers.get(levels.name, []):
        node, through = user, chains.get(user.op_type, ())
        while node is not None and node.op_type in through:
            path.add(node.output[0])
            after = g.consumers.get(node.output[0], [])
            node = after[0] if len(after) == 1 else None
        if node is not None and through:
            ops.append(node)
    return ops, path


def _check_pair(g: _Graph, q, dq, fq: ActivationFakeQuant, where: str) -> None:
    """``q`` -> ``dq`` is a QuantizeLinear/DequantizeLinear pair with the scale and zero point of ``fq``."""
    if not q or not dq or q.op_type != "QuantizeLinear" or dq.op_type != "DequantizeLinear":
        raise ExportCheckError(f"{where}: quantized in training, but has no QuantizeLinear/DequantizeLinear "
                               "in the ONNX file")
    scale, zero_point = g.constant(dq.input[1]), g.constant(dq.input[2])
    if scale is None or zero_point is None or not (
            np.allclose(scale, fq.scale.numpy(), rtol=1e-6, atol=0) and np.array_equal(zero_point, fq.zero_point.numpy())):
        raise ExportCheckError(f"{where}: scale/zero point in the ONNX file differ from the trained ones")


def check_outputs(path: Path, model: nn.Module, samples: dict[str, torch.Tensor], atol: float) -> dict:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {k: v.numpy() for k, v in samples.items()})[0]
    with torch.no_grad():
        reference = model(**samples).logits.numpy()
    diff = float(np.abs(got - reference).max())
    top2 = np.sort(reference, axis=-1)[..., -2:] if reference.shape[-1] > 1 else np.zeros(reference.shape[:-1] + (2,))
    agree = got.argmax(-1) == reference.argmax(-1)
    clear = (top2[..., 1] - top2[..., 0]) > 2 * atol
    figures = {"max_abs_diff": diff, "argmax_agreement": float(agree.mean()), "atol": atol, "reference": reference}
    if diff > atol or not agree[clear].all():
        raise ExportCheckError(f"onnxruntime differs from PyTorch: max abs diff {diff:.3g} (tolerance {atol:g}), "
                               f"argmax agreement {agree.mean():.1%}")
    return figures


def summary(report: dict, path: Path) -> str:
    return "\n".join([
        f"exported {path} ({report['onnx_bytes'] / 2**20:.1f} MiB, {'int8 QDQ' if report['quantized'] else 'fp32'}, "
        f"opset {report['opset']})",
        f"weights: {len(report['sparsity']) - 1} Linear/Embedding tensors equal to the trained ones, zeros kept "
        f"(sparsity {report['sparsity']['overall']:.1%}); quantized layers with int8 weights and Q/DQ: "
        f"{report['quantized_layers']}",
        f"onnxruntime vs PyTorch on {len(SAMPLE_TEXTS)} samples: max abs diff {report['max_abs_diff']:.3g} "
        f"(tolerance {report['atol']:g}), argmax agreement {report['argmax_agreement']:.1%}",
    ])
