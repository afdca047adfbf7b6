"""ONNX graph surgery and lookups: int8 weight initializers, row-gathered embeddings, and the
queries the checks make (a weight as the graph computes it, the ops that use it, their Q/DQ).

Only public ``onnx`` APIs (``onnx.helper``, ``onnx.numpy_helper``) are used.
"""
from __future__ import annotations

import itertools

import numpy as np
import onnx
import torch
from onnx import numpy_helper

INITIALIZER_PREFIX = "model."  # the export wrapper's attribute: initializers are "model.<parameter name>"
QUANTIZED_SUFFIX = "_quantized"  # "<weight>_quantized" holds the int8 levels of "<weight>"


class OnnxGraph:
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
            to = onnx.helper.tensor_dtype_to_np_dtype(node_attr(node, "to", None))
            return None if value is None else value.astype(to)
        return None

    def weight(self, parameter: str) -> np.ndarray | None:
        """The parameter as the graph computes with it: dequantized (per tensor or output channel) where stored as int8."""
        key = INITIALIZER_PREFIX + parameter
        levels = self.initializers.get(key + QUANTIZED_SUFFIX)
        if levels is None:
            tensor = self.initializer(key)
            return None if tensor is None else numpy_helper.to_array(tensor)
        scale = self.constant(f"{key}{QUANTIZED_SUFFIX}_scale")
        if scale is None:
            return None
        dq = next((n for n in self.consumers.get(levels.name, []) if n.op_type == "DequantizeLinear"), None)
        zero_point = self.constant(dq.input[2]) if dq is not None and len(dq.input) > 2 else None
        if zero_point is None:  # rows gathered before scaling (symmetric), or ONNX's default zero point
            zero_point = np.zeros_like(scale, dtype=np.int8)
        q = numpy_helper.to_array(levels).astype(np.float32)
        shape = [-1] + [1] * (q.ndim - 1) if scale.ndim else []
        return (q - zero_point.astype(np.float32).reshape(shape)) * scale.reshape(shape)

    def int8_weight_users(self, parameter: str) -> tuple[list, set[str]] | None:
        """The ops that compute with the parameter's int8 levels, and the tensors on the way there
        (DequantizeLinear [-> Transpose] -> MatMul/Gemm, or Gather -> Cast -> Mul for embedding rows);
        None where the parameter is not stored as int8."""
        levels = self.initializers.get(INITIALIZER_PREFIX + parameter + QUANTIZED_SUFFIX)
        if levels is None or levels.data_type not in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8):
            return None
        chains = {"DequantizeLinear": ("DequantizeLinear", "Transpose"), "Gather": ("Gather", "Cast")}
        ops, path = [], set()
        for user in self.consumers.get(levels.name, []):
            node, through = user, chains.get(user.op_type, ())
            while node is not None and node.op_type in through:
                path.add(node.output[0])
                after = self.consumers.get(node.output[0], [])
                node = after[0] if len(after) == 1 else None
            if node is not None and through:
                ops.append(node)
        return ops, path

    def input_pair(self, op, weight_path: set[str]) -> tuple:
        """(QuantizeLinear, DequantizeLinear) feeding the op's activation input, or Nones."""
        (x,) = [i for i in op.input[:2] if i not in weight_path]
        dq = self.producer.get(x)
        return (dq and self.producer.get(dq.input[0])), dq

    def output_pair(self, op) -> tuple:
        """(QuantizeLinear, DequantizeLinear) after the op (after its bias Add), or Nones."""
        after = self.consumers.get(op.output[0], [])
        if len(after) == 1 and after[0].op_type == "Add":  # the bias of a MatMul
            after = self.consumers.get(after[0].output[0], [])
        q = next((n for n in after if n.op_type == "QuantizeLinear"), None)
        return q, q and next(iter(self.consumers.get(q.output[0], [])), None)

    def pair_qparams(self, q, dq) -> tuple[np.ndarray, np.ndarray] | None:
        """The scale and zero point of a QuantizeLinear -> DequantizeLinear pair; None if it is not one."""
        if not q or not dq or q.op_type != "QuantizeLinear" or dq.op_type != "DequantizeLinear":
            return None
        scale, zero_point = self.constant(dq.input[1]), self.constant(dq.input[2])
        return None if scale is None or zero_point is None else (scale, zero_point)


def node_attr(node, name: str, default):
    return next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def store_int8_weights(model: onnx.ModelProto) -> None:
    """Replace QuantizeLinear(fp32 weight) -> DequantizeLinear by int8 weight -> DequantizeLinear.

    The levels are computed with the exact arithmetic of the PyTorch fake quantization, so the
    deployed weights are bit for bit the trained ones.
    """
    g = OnnxGraph(model)
    done = []
    for q in [n for n in g.graph.node if n.op_type == "QuantizeLinear"]:
        weight = g.initializer(q.input[0])
        users = g.consumers.get(q.output[0], [])
        if weight is None or not users or any(u.op_type != "DequantizeLinear" for u in users):
            continue
        scale, zero_point = g.constant(q.input[1]), g.constant(q.input[2])
        if scale is None or zero_point is None:
            continue
        if scale.size == 1 and node_attr(q, "axis", None) is None:  # per tensor: ONNX's scalar, as SparseML writes it
            scale, zero_point = scale.reshape(()), zero_point.reshape(())
        levels = quantize_levels(numpy_helper.to_array(weight), scale, zero_point, node_attr(q, "axis", 1))
        if not all(c.op_type == "Gather" for dq in users for c in g.consumers.get(dq.output[0], [])):
            levels, zero_point = as_uint8(levels, zero_point)
        name = q.input[0] + QUANTIZED_SUFFIX
        # scale and zero point as initializers of their own dtype: an int32 Constant cast to int8
        # would cost 4 bytes per channel, as much as a 4-wide row of weights
        for tensor, tensor_name in ((levels, name), (scale, f"{name}_scale")):
            g.graph.initializer.append(numpy_helper.from_array(np.array(tensor, order="C"), tensor_name))  # 0-d stays 0-d
        zero_name = _zero_point_initializer(g, zero_point, f"{name}_zero_point")
        for dq in users:
            dq.input[:3] = [name, f"{name}_scale", zero_name]
        done.append(q)
    for q in done:
        g.graph.node.remove(q)
    g = OnnxGraph(model)
    for dq in [n for n in g.graph.node if n.op_type == "DequantizeLinear" and n.input[0].endswith(QUANTIZED_SUFFIX)]:
        _gather_rows_first(g, dq)
    _drop_unused(model)


def as_uint8(levels: np.ndarray, zero_point: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The same weights as uint8 with zero point z + 128: DequantizeLinear gives the same floats.

    Matrix-multiplied weights are stored so, as SparseML's export stores them: onnxruntime's AVX2
    kernels without VNNI multiply uint8 activations by int8 weights with ``vpmaddubsw``, whose int16
    pair sums saturate (2 x 255 x 127 > 32767); on such a CPU a trained MiniLM came out 0.247 off on
    logits of +-1.46 with int8 weights and 0.0023 off with uint8 ones (its PyTorch model: 8e-7 with
    onnxruntime's integer fusions off). uint8 x uint8 has no such shortcut and no saturation.
    """
    if levels.dtype != np.int8:
        return levels, zero_point
    return (levels.astype(np.int16) + 128).astype(np.uint8), (zero_point.astype(np.int16) + 128).astype(np.uint8)


def _zero_point_initializer(g: OnnxGraph, zero_point: np.ndarray, name: str) -> str:
    """The zero point's initializer name; all-zero ones of one dtype and length are one shared tensor.

    Symmetric weights have zero points of 0 only (128 as uint8). They stay in the graph, one per channel as the
    scale (ONNX's shape rule), or one scalar: onnxruntime fuses DequantizeLinear -> MatMul into its
    integer kernels only where the zero point is given; sharing saves their bytes (21 KiB in MiniLM).
    """
    if (zero_point == (128 if zero_point.dtype == np.uint8 else 0)).all():
        name = f"zero_point_{zero_point.dtype}" + (f"_{zero_point.size}" if zero_point.ndim else "")
        if name in g.initializers:
            return name
    g.initializers[name] = numpy_helper.from_array(np.array(zero_point, order="C"), name)
    g.graph.initializer.append(g.initializers[name])
    return name


def _gather_rows_first(g: OnnxGraph, dq) -> None:
    """Gather(DequantizeLinear(table), ids) -> Cast(Gather(table, ids)) * scale, the scale gathered by
    row where there is one per row.

    Same numbers (symmetric int8, zero point 0), but onnxruntime no longer dequantizes the whole
    vocabulary table on every call (about 15 ms for MiniLM on 2 cores).
    """
    levels, scale, zero_point = dq.input[:3]
    users = g.consumers.get(dq.output[0], [])
    scale_ndim = g.constant(scale).ndim
    per_row = scale_ndim == 1
    if (not users or any(u.op_type != "Gather" or u.input[0] != dq.output[0] or node_attr(u, "axis", 0) != 0 for u in users)
            or scale_ndim > 1 or (per_row and node_attr(dq, "axis", 1) != 0) or g.constant(zero_point).any()):
        return
    axes = "gather_rows_first_axes"
    if per_row and axes not in g.initializers:
        g.initializers[axes] = numpy_helper.from_array(np.array([-1], dtype=np.int64), axes)
        g.graph.initializer.append(g.initializers[axes])
    make = onnx.helper.make_node
    for gather in users:
        ids, out = gather.input[1], gather.output[0]
        name = gather.name  # the module path, for every node that replaces it
        nodes = [make("Gather", [levels, ids], [f"{out}_int8"], f"{name}_int8", axis=0),
                 make("Cast", [f"{out}_int8"], [f"{out}_levels"], f"{name}_levels", to=onnx.TensorProto.FLOAT)]
        if per_row:
            nodes += [make("Gather", [scale, ids], [f"{out}_row_scale"], f"{name}_row_scale", axis=0),
                      make("Unsqueeze", [f"{out}_row_scale", axes], [f"{out}_row_scale_1"], f"{name}_row_scale_1")]
        nodes.append(make("Mul", [f"{out}_levels", f"{out}_row_scale_1" if per_row else scale], [out], f"{name}_scaled"))
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


def compact(model: onnx.ModelProto) -> None:
    """The same graph in fewer bytes: one Constant node per distinct value, and short names for the
    values passed between nodes. The exporter names a value after the node that makes it
    ("/model/bert/encoder/layer.0/attention/self/Transpose_1" + "_output_0"); the node keeps that
    name, so nothing is lost (about 100 KiB in MiniLM). Inputs, outputs and initializers keep theirs.
    """
    graph = model.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node for a in n.attribute):
        return  # a subgraph may read outer values by name
    keep = {v.name for v in graph.input} | {v.name for v in graph.output} | {t.name for t in graph.initializer}
    first, same = {}, {}
    for node in list(graph.node):
        if node.op_type == "Constant" and node.output[0] not in keep:
            value = b"".join(a.SerializeToString() for a in node.attribute)
            if value in first:
                same[node.output[0]] = first[value]
                graph.node.remove(node)
            else:
                first[value] = node.output[0]
    _rename(graph, same)
    names = (name for name in (f"t{i}" for i in itertools.count()) if name not in keep)
    _rename(graph, {out: next(names) for node in graph.node for out in node.output if out and out not in keep})


def _rename(graph, names: dict[str, str]) -> None:
    for node in graph.node:
        node.input[:] = [names.get(i, i) for i in node.input]
        node.output[:] = [names.get(o, o) for o in node.output]
    for info in graph.value_info:
        info.name = names.get(info.name, info.name)
