"""The checks that stand between an ONNX file and the word "exported", and their re-run later.

Against the PyTorch model it came from (``check_export``, at export time):
- every Linear/Embedding weight in the file equals the weight the model computes with (its
  fake-quantized value for quantized layers), with the same zeros: sparsity is kept;
- every layer the model quantized has its int8 weight and, with the trained scales, Q/DQ on its
  activations; layers sharing one input quantizer (Q, K and V) read one Q/DQ pair;
- onnxruntime's outputs on the sample inputs match PyTorch's within the parity tolerance, and
  their argmax agrees wherever PyTorch's top two are more than 2 x tolerance apart.

The parity tolerance follows from the model (unless ``--atol`` is given):

    tolerance = 1e-4 x max(1, max |output|)                          float32 arithmetic
              + 4 x (s_in x max_c sum_j |W[c, j]|  +  s_out)         four quantization levels

where the output layer is the Linear whose result the model returns (classifier, qa_outputs, the
masked-LM decoder; an output may be one slice of its last axis, as QA's start and end logits), W
its (fake-quantized) weight and s_in / s_out its activation scales (s_out only where its output
is quantized). ``s_in x sum_j |W[c, j]|`` is how far output c moves if
every input of the output layer moves by one quantization level: the unit in which int8 rounding
differences reach the outputs. onnxruntime computes the same int8 model as the fake-quantized
PyTorch one, but its float sums round differently, and its QDQ fusions (graph optimization level
EXTENDED and up, on by default) compute in integer kernels, so activations can land levels apart.
Measured on a 70%-sparse MiniLM after 16 steps of seed-shaped QAT (256 SST-2 rows) on an AVX2
CPU: max diff 0.0094 with the default optimizations, 0.00043 with them off, against one level =
0.0114; a tiny QA model trained with squad_sparse_transfer.yaml, 0.0126 against one level =
0.0172 (it had been refused at 0.0111 = 2% of its output range: the split start/end logits hid
qa_outputs). Trained longer the gap grows: the same MiniLM after the seed's schedule on 2,000
SST-2 rows x 3 epochs, 0.130 against one level = 0.041 (3.1 levels, refused at the two levels used
until then); hence a margin of four levels. That gap turned out to be onnxruntime's AVX2 u8 x s8
saturation (``graph.as_uint8``: weights are stored as uint8 since, and such models differ by
0.002-0.02); the margin is kept. A model quantized
everywhere except its output layer cannot be bounded that way; it gets 2% of the outputs' range
on the samples. An fp32 model gets the
first term alone. A wrong graph (a lost op, a swapped input, a wrong bias) moves outputs by many
levels and flips argmaxes: the argmax must agree wherever PyTorch's top two are over 2 x
tolerance apart.

The same samples, tolerance and argmax rule check ``model_optimized.onnx``: onnxruntime's own
graph optimizations (ORT_ENABLE_ALL) applied to ``model.onnx`` and saved (``optimize_and_check``),
so a CPU deployment loads the fused graph (Q/DQ folded into integer kernels such as
MatMulIntegerToFloat, BiasGelu, FusedMatMul) as it is. It is for onnxruntime's CPU execution
provider; ``model.onnx`` stays the portable, checked QDQ graph.

Against a deployment folder alone (``verify_deployment``, ``distsparse verify``): the sha256 of
``model.onnx`` recorded in ``export_report.json``, the recorded sparsity of every weight, int8
weights and Q/DQ pairs for every recorded quantized layer (shared ones shared), and onnxruntime on the stored sample
inputs against the stored PyTorch outputs with the recorded tolerance.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from ..checkpoint import sha256
from ..errors import UserError
from ..fake_quant import ActivationFakeQuant, QuantEmbedding, QuantLinear
from .build import EXPORT_TASKS, ExportTask, model_outputs
from .graph import OnnxGraph

FP32_RELATIVE_TOLERANCE = 1e-4
QUANTIZATION_LEVELS = 4  # the margin the module docstring measures
UNBOUNDED_HEAD_RANGE_FRACTION = 0.02
REPORT_FILE = "export_report.json"
SAMPLE_INPUTS_FILE = "sample_inputs.npz"
SAMPLE_OUTPUTS_FILE = "sample_outputs.npz"
OPTIMIZED_FILE = "model_optimized.onnx"


class ExportCheckError(UserError):
    """The exported file is not the trained model: refuse it."""


def check_export(path: Path, model: nn.Module, task: ExportTask, samples: dict[str, torch.Tensor],
                 atol: float | None = None) -> dict:
    """Check the file against the PyTorch model it came from; raise ExportCheckError on any doubt.

    Returns the report's figures, and the PyTorch outputs on the samples under "reference".
    """
    model.eval()
    g = OnnxGraph(onnx.load(str(path)))
    layers, shared = check_qdq(g, model)
    report = {"sparsity": check_weights(g, model), "quantized_layers": layers, "shared_input_qdq": shared}
    reference = {k: v.numpy() for k, v in model_outputs(model, task, samples).items()}
    tolerance = parity_tolerance(model, task, samples, reference)
    if atol is not None:
        tolerance = {"atol": atol, "rule": "--atol"}
    got = run_onnx(path, {k: v.numpy() for k, v in samples.items()}, task.output_names)
    report.update(compare_outputs(got, reference, tolerance["atol"]), tolerance_rule=tolerance["rule"],
                  reference=reference)
    return report


# -- weights ---------------------------------------------------------------------------------------
def weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every Linear/Embedding, each weight once (a decoder tied to the word embeddings is the same tensor)."""
    seen, layers = set(), []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding)) and id(module.weight) not in seen:
            seen.add(id(module.weight))
            layers.append((name, module))
    return layers


def check_weights(g: OnnxGraph, model: nn.Module) -> dict:
    """Every Linear/Embedding weight: the file's value equals the one the model computes with.

    Returns the sparsity of each weight in the file, and of all of them together ("overall").
    """
    sparsity, zeros, total = {}, 0, 0
    for name, module in weight_layers(model):
        with torch.no_grad():
            expected = (module.weight_quant(module.weight) if isinstance(module, (QuantLinear, QuantEmbedding))
                        else module.weight).numpy()
        got = g.weight(f"{name}.weight")
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


def check_qdq(g: OnnxGraph, model: nn.Module) -> tuple[dict[str, list[str]], dict[str, str]]:
    """Every layer quantized in PyTorch is quantized in the file, with the same scales: its weight
    is int8, and the op using it reads (and, where asked, writes) activations through
    QuantizeLinear/DequantizeLinear. Layers sharing one input quantizer (Q, K and V) read one
    Q/DQ pair. Returns {layer: its quantized activations ("input", "output")} and {layer: the
    layer whose input Q/DQ it reads}."""
    layers, first, shared = {}, {}, {}
    for name, module in weight_layers(model):
        if not isinstance(module, (QuantLinear, QuantEmbedding)) or not module.weight_quant.enabled:
            continue
        activations = {"input": getattr(module, "input_quant", None), "output": module.output_quant}
        layers[name] = [k for k, fq in activations.items() if isinstance(fq, ActivationFakeQuant) and fq.enabled]
        for where, (scale, zero_point, _) in check_layer_qdq(g, name, layers[name]).items():
            fq = activations[where]
            if not (np.allclose(scale, fq.scale.numpy(), rtol=1e-6, atol=0)
                    and np.array_equal(zero_point, fq.zero_point.numpy())):
                raise ExportCheckError(f"{name}.{where}_quant: scale/zero point in the ONNX file differ from the trained ones")
            if where == "input" and first.setdefault(id(fq), name) != name:
                shared[name] = first[id(fq)]
    for layer, owner in shared.items():
        check_shared_input(g, layer, owner)
    return layers, shared


def check_layer_qdq(g: OnnxGraph, layer: str, activations: list[str]) -> dict[str, tuple]:
    """The layer's weight is int8 in the file and each of its ``activations`` passes a Q/DQ pair;
    returns {"input"/"output": (scale, zero point, the DequantizeLinear)} as the file has them (of
    the last op using it)."""
    found = g.int8_weight_users(f"{layer}.weight")
    if not found or not found[0]:
        raise ExportCheckError(f"{layer}: quantized in training, but its weight is not int8 into "
                               "DequantizeLinear (or row Gather) in the ONNX file")
    ops, weight_path = found
    qparams = {}
    for op in ops:
        for where in activations:
            pair = g.input_pair(op, weight_path) if where == "input" else g.output_pair(op)
            values = g.pair_qparams(*pair)
            if values is None:
                raise ExportCheckError(f"{layer}.{where}_quant: quantized in training, but has no "
                                       "QuantizeLinear/DequantizeLinear in the ONNX file")
            qparams[where] = (*values, pair[1])
    return qparams


def check_shared_input(g: OnnxGraph, layer: str, owner: str) -> None:
    """``layer`` reads its input through the very Q/DQ pair ``owner`` reads (one quantizer in training)."""
    dqs = [check_layer_qdq(g, name, ["input"])["input"][2].output[0] for name in (layer, owner)]
    if dqs[0] != dqs[1]:
        raise ExportCheckError(f"{layer}.input_quant: shares {owner}'s quantizer in training, but reads "
                               "another QuantizeLinear/DequantizeLinear in the ONNX file")


# -- outputs ---------------------------------------------------------------------------------------
def output_layers(model: nn.Module, task: ExportTask, samples: dict[str, torch.Tensor]) -> list[nn.Module]:
    """The Linear layers whose results the model returns as its outputs: an output equals the
    layer's result, or one slice of its last axis (QA's qa_outputs, split into start and end logits
    and copied by ``.contiguous()``, so storage identity cannot tell). Empty unless every output
    comes from one."""
    results = []
    hooks = [m.register_forward_hook(lambda m, i, o: results.append((m, o.detach())))
             for m in model.modules() if isinstance(m, nn.Linear)]
    try:
        outputs = model_outputs(model, task, samples)
    finally:
        for h in hooks:
            h.remove()

    def produces(o: torch.Tensor, out: torch.Tensor) -> bool:
        if o.shape == out.shape:
            return torch.equal(o, out)
        return o.shape[:-1] == out.shape and any(torch.equal(o[..., j], out) for j in range(o.shape[-1]))

    found = []
    for out in outputs.values():
        layer = next((m for m, o in reversed(results) if produces(o, out)), None)
        if layer is None:
            return []
        if layer not in found:
            found.append(layer)
    return found


def parity_tolerance(model: nn.Module, task: ExportTask, samples: dict[str, torch.Tensor],
                     reference: dict[str, np.ndarray]) -> dict:
    """{"atol": the tolerance the module docstring derives, "rule": how, in words}."""
    largest = max(float(np.abs(v).max()) for v in reference.values())
    floor = FP32_RELATIVE_TOLERANCE * max(1.0, largest)
    if not any(getattr(m, "weight_quant", None) is not None and m.weight_quant.enabled for m in model.modules()):
        return {"atol": floor, "rule": "fp32: 1e-4 x max(1, max |output|)"}
    steps = []
    for head in output_layers(model, task, samples):
        input_quant = getattr(head, "input_quant", None)
        if not isinstance(input_quant, ActivationFakeQuant) or not input_quant.enabled:
            steps = []
            break
        with torch.no_grad():
            weight = head.weight_quant(head.weight) if head.weight_quant.enabled else head.weight
            step = float(input_quant.scale) * float(weight.abs().sum(dim=1).max())
        if isinstance(head.output_quant, ActivationFakeQuant) and head.output_quant.enabled:
            step += float(head.output_quant.scale)
        steps.append(step)
    if not steps:
        spread = max(float(v.max() - v.min()) for v in reference.values())
        return {"atol": floor + UNBOUNDED_HEAD_RANGE_FRACTION * spread,
                "rule": "int8, output layer's input not quantized: 1e-4 x max(1, max |output|) + 2% of the output range"}
    return {"atol": floor + QUANTIZATION_LEVELS * max(steps),
            "rule": f"int8: 1e-4 x max(1, max |output|) + {QUANTIZATION_LEVELS} quantization levels at every "
                    "input (and output) of the output layer"}


def run_onnx(path: Path, feed: dict[str, np.ndarray], output_names) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return dict(zip(output_names, session.run(list(output_names), feed)))


def compare_outputs(got: dict[str, np.ndarray], reference: dict[str, np.ndarray], atol: float) -> dict:
    """Max abs diff within ``atol``, and argmax agreement wherever the reference's top two are
    more than 2 x atol apart (closer ones may legitimately swap)."""
    diff, agree, clear = 0.0, [], []
    for name, ref in reference.items():
        diff = max(diff, float(np.abs(got[name] - ref).max()))
        top2 = np.sort(ref, axis=-1)[..., -2:] if ref.shape[-1] > 1 else np.zeros(ref.shape[:-1] + (2,))
        agree.append((got[name].argmax(-1) == ref.argmax(-1)).ravel())
        clear.append(((top2[..., 1] - top2[..., 0]) > 2 * atol).ravel())
    agree, clear = np.concatenate(agree), np.concatenate(clear)
    if diff > atol or not agree[clear].all():
        raise ExportCheckError(f"onnxruntime differs from PyTorch: max abs diff {diff:.3g} (tolerance {atol:.3g}), "
                               f"argmax agreement {agree.mean():.1%}")
    return {"max_abs_diff": diff, "argmax_agreement": float(agree.mean()), "atol": atol}


# -- a deployment folder, later --------------------------------------------------------------------
def verify_deployment(folder: Path) -> dict:
    """Re-run the export's checks on what ``distsparse export`` wrote; ExportCheckError on any change."""
    folder = Path(folder)
    report_path, onnx_path = folder / REPORT_FILE, folder / "model.onnx"
    for needed in (report_path, onnx_path, folder / SAMPLE_INPUTS_FILE, folder / SAMPLE_OUTPUTS_FILE):
        if not needed.is_file():
            raise UserError(f"{needed}: missing (not a folder distsparse export wrote)")
    try:
        report = json.loads(report_path.read_text())
        recorded, task = report["sha256"], EXPORT_TASKS[report["task"]]
    except (ValueError, KeyError) as err:
        raise ExportCheckError(f"{report_path}: not an export report with sha256 and task ({err!r})") from None
    actual = sha256(onnx_path)
    if actual != recorded:
        raise ExportCheckError(f"{onnx_path}: sha256 {actual[:12]}... differs from {recorded[:12]}... recorded in "
                               f"{REPORT_FILE}: the file changed after export")
    g = OnnxGraph(onnx.load(str(onnx_path)))
    for weight, want in report["sparsity"].items():
        if weight == "overall":
            continue
        values = g.weight(weight)
        if values is None or round(float((values == 0).mean()), 6) != want:
            have = "missing" if values is None else f"{(values == 0).mean():.2%}"
            raise ExportCheckError(f"{onnx_path}: {weight} sparsity {have}, {want:.2%} recorded in {REPORT_FILE}")
    for layer, activations in report["quantized_layers"].items():
        check_layer_qdq(g, layer, activations)
    for layer, owner in report.get("shared_input_qdq", {}).items():
        check_shared_input(g, layer, owner)
    with np.load(folder / SAMPLE_INPUTS_FILE) as inputs, np.load(folder / SAMPLE_OUTPUTS_FILE) as outputs:
        feed, reference = dict(inputs), {name: outputs[name] for name in task.output_names}
    figures = compare_outputs(run_onnx(onnx_path, feed, task.output_names), reference, report["atol"])
    optimized = report.get("optimized")
    if optimized:
        path = folder / optimized["file"]
        if not path.is_file() or sha256(path) != optimized["sha256"]:
            raise ExportCheckError(f"{path}: missing or changed after export (sha256 differs from {REPORT_FILE})")
        compare_outputs(run_onnx(path, feed, task.output_names), reference, report["atol"])
    return {**report, **figures}


def optimize_and_check(path: Path, out: Path, feed: dict[str, np.ndarray], reference: dict[str, np.ndarray],
                       atol: float) -> dict:
    """Save onnxruntime's ORT_ENABLE_ALL graph of ``path`` as ``out`` and check it like ``path``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(out)
    options.log_severity_level = 3  # its note that an ENABLE_ALL graph is for this execution provider: said above
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    figures = compare_outputs(run_onnx(out, feed, list(reference)), reference, atol)
    return {"file": OPTIMIZED_FILE, "level": "ORT_ENABLE_ALL", "onnxruntime": ort.__version__,
            "bytes": out.stat().st_size, "sha256": sha256(out), "max_abs_diff": figures["max_abs_diff"]}
