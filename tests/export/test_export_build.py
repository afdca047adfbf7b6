"""ONNX export: int8 QDQ for QAT models, fp32 otherwise, and checks that catch a broken file."""
from __future__ import annotations

import copy
import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper
from transformers import AutoModelForSequenceClassification

from distsparse.cli import main as cli
from distsparse.export import EXPORT_TASKS, ExportCheckError, check_export, export_main as export, load_trained, sample_inputs
from distsparse.export.graph import OnnxGraph
from export_helpers import QAT_RECIPE, replace_initializer, skip_input_qdq, train_by_hand

TEXT = EXPORT_TASKS["text-classification"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """{kind: (trained folder, deployment folder)} for a QAT sparse model with a weight scale per
    channel, the same with one per tensor (SparseML's), and a dense fp32 one (no recipe: AdamW fills
    the zeros in)."""
    root = tmp_path_factory.mktemp("export")
    folders = {}
    per_tensor = QAT_RECIPE.replace("weight_strategy: channel", "weight_strategy: tensor")
    for kind, recipe in (("qat", QAT_RECIPE), ("qat_tensor", per_tensor), ("fp32", None)):
        trained, deploy = root / kind, root / f"{kind}-deploy"
        train_by_hand(trained, recipe)
        assert export(["--model_path", str(trained), "--output_dir", str(deploy), "--sequence_length", "24"]) == 0
        folders[kind] = trained, deploy
    return folders


def initializers(path):
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


@pytest.mark.parametrize("kind", ["qat", "qat_tensor"])
def test_qat_export_stores_int8_weights_keeps_zeros_and_matches_pytorch(exported, kind):
    trained, deploy = exported[kind]
    for name in ("model.onnx", "config.json", "tokenizer.json", "recipe.yaml", "sample_inputs.npz",
                 "sample_outputs.npz", "export_report.json"):
        assert (deploy / name).is_file(), name
    graph = onnx.load(str(deploy / "model.onnx")).graph
    ops = [n.op_type for n in graph.node]
    inits = initializers(deploy / "model.onnx")
    trained_weights = AutoModelForSequenceClassification.from_pretrained(trained).state_dict()
    quantized = [k for k, v in trained_weights.items() if k.endswith("weight") and v.dim() == 2]
    assert len(quantized) == 12 + 2 + 3  # encoder, pooler + classifier, 3 embeddings
    for key in quantized:
        levels = inits[f"model.{key}_quantized"]
        # matrix-multiplied weights as uint8 around 128 (onnxruntime's AVX2 u8 x s8 kernels saturate);
        # embedding tables, only gathered, as int8
        table = "embeddings" in key
        assert levels.dtype == (np.int8 if table else np.uint8) and f"model.{key}" not in inits
        zeros = (trained_weights[key] == 0).numpy()
        assert (levels[zeros] == (0 if table else 128)).all(), key  # every pruned weight is still exactly zero
        if key.startswith("bert.encoder"):
            assert zeros.mean() == pytest.approx(0.5, abs=0.01)
    assert ops.count("DequantizeLinear") >= 14 + 14  # Linear weights, plus their activations
    table = "model.bert.embeddings.word_embeddings.weight_quantized"
    users = [n.op_type for n in graph.node if table in n.input]
    assert users == ["Gather"]  # rows looked up in int8, never the whole table dequantized
    assert "QuantizeLinear" in ops

    report = json.loads((deploy / "export_report.json").read_text())
    assert report["quantized"] and len(report["quantized_layers"]) == 17
    assert report["max_abs_diff"] <= 1e-3 and report["argmax_agreement"] == 1.0
    assert report["sparsity"]["bert.encoder.layer.0.attention.self.query.weight"] >= 0.5

    session = ort.InferenceSession(str(deploy / "model.onnx"), providers=["CPUExecutionProvider"])
    inputs = dict(np.load(deploy / "sample_inputs.npz"))
    assert inputs["input_ids"].shape == (8, 21)  # padded to the longest sample sentence
    assert (inputs["attention_mask"] == 0).any()  # so padding is masked in the check
    np.testing.assert_allclose(session.run(None, inputs)[0], np.load(deploy / "sample_outputs.npz")["logits"], atol=1e-3)
    # dynamic axes: another batch size and sequence length, against the rebuilt PyTorch model
    model, tokenizer, _ = load_trained(trained)
    other = tokenizer(["one short line", "and a second, somewhat longer, line of text"], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = model(**other).logits.numpy()
    np.testing.assert_allclose(session.run(None, {k: v.numpy() for k, v in other.items()})[0], expected, atol=1e-3)


def test_dense_fp32_export_is_plain_and_exact(exported):
    trained, deploy = exported["fp32"]
    ops = {n.op_type for n in onnx.load(str(deploy / "model.onnx")).graph.node}
    assert not ops & {"QuantizeLinear", "DequantizeLinear"}
    inits = initializers(deploy / "model.onnx")
    assert all(v.dtype != np.int8 for v in inits.values())
    trained_weights = AutoModelForSequenceClassification.from_pretrained(trained).state_dict()
    for key in ("bert.encoder.layer.0.attention.self.query.weight", "classifier.weight"):
        assert np.array_equal(inits[f"model.{key}"], trained_weights[key].numpy())  # AdamW filled the zeros in
    report = json.loads((deploy / "export_report.json").read_text())
    assert not report["quantized"] and report["max_abs_diff"] <= 1e-4 and report["sparsity"]["overall"] < 1e-3
    assert not (deploy / "recipe.yaml").exists()
    # int8 weights: 1/4 of fp32, plus a 4-byte scale per row of 32 here (per row of 384 in MiniLM)
    qat_bytes = (exported["qat"][1] / "model.onnx").stat().st_size
    assert qat_bytes < 0.32 * (deploy / "model.onnx").stat().st_size


def expected_initializer_bytes(model) -> int:
    """What the int8 file must hold for ``model``, nothing more: per quantized weight its int8
    levels and its fp32 scales (one, or one per row); one shared all-zero int8 zero point per
    distinct Linear row count (per channel) or one scalar (per tensor); every other parameter in
    fp32; and the one int64 axes tensor where embedding rows gather their row scales."""
    from distsparse.fake_quant import QuantEmbedding, QuantLinear

    quantized = {id(m.weight): m for m in model.modules()
                 if isinstance(m, (QuantLinear, QuantEmbedding)) and m.weight_quant.enabled}
    total = 0
    for p in {id(p): p for p in model.parameters()}.values():
        total += p.numel() + 4 * quantized[id(p)].weight_quant.scale.numel() if id(p) in quantized else 4 * p.numel()
    linears = [m for m in quantized.values() if isinstance(m, QuantLinear)]
    total += sum({m.weight.shape[0] for m in linears if m.weight_quant.per_channel})
    total += any(not m.weight_quant.per_channel for m in linears)
    return total + 8 * any(isinstance(m, QuantEmbedding) and m.weight_quant.per_channel for m in quantized.values())


@pytest.mark.parametrize("kind", ["qat", "qat_tensor"])
def test_int8_file_holds_no_byte_beyond_the_model(exported, kind):
    """The file's size, as a property: initializers are exactly the model's numbers (no duplicate, no
    per-weight copy of an all-zero zero point), no two Constant nodes hold one value, and values
    between nodes have short names while the nodes keep their module paths."""
    trained, deploy = exported[kind]
    model, _, _ = load_trained(trained)
    proto = onnx.load(str(deploy / "model.onnx"))
    graph = proto.graph
    arrays = [numpy_helper.to_array(t) for t in graph.initializer]
    assert sum(a.nbytes for a in arrays) == expected_initializer_bytes(model)
    contents = [(a.dtype.str, a.shape, a.tobytes()) for a in arrays]
    assert len(set(contents)) == len(contents)  # no initializer twice
    zero_points = {n.input[2] for n in graph.node if n.op_type == "DequantizeLinear"
                   and n.input[0].endswith("weight_quantized")}
    assert zero_points == ({"zero_point_uint8_32", "zero_point_uint8_64", "zero_point_uint8_2"} if kind == "qat"
                           else {"zero_point_uint8"})
    scales = [numpy_helper.to_array(t) for t in graph.initializer if t.name.endswith("_quantized_scale")]
    assert len(scales) == 17 and all(s.ndim == (1 if kind == "qat" else 0) for s in scales)  # ONNX's per-tensor scalar
    constants = [n.attribute[0].t.SerializeToString() for n in graph.node if n.op_type == "Constant"]
    assert len(set(constants)) == len(constants)
    outer = {v.name for v in graph.output} | {t.name for t in graph.initializer}
    inner = [o for n in graph.node for o in n.output if o not in outer]
    assert inner and all(len(o) <= 5 and o.startswith("t") for o in inner)
    assert all(n.name for n in graph.node)
    (lookup,) = [n.name for n in graph.node if "model.bert.embeddings.word_embeddings.weight_quantized" in n.input]
    assert lookup == "/model/bert/embeddings/word_embeddings/Gather_int8"
    # the serialized graph beyond its raw numbers (nodes, names, tensor headers): 41 KB here, 98 KB
    # with the exporter's value names and repeated Constant nodes
    assert len(proto.SerializeToString()) - sum(a.nbytes for a in arrays) < 60_000


def test_a_changed_shared_zero_point_is_caught(qat_model, tmp_path):
    """The weight check reads each zero point where its DequantizeLinear does, not by name."""
    model, samples, path = qat_model

    def shift(graph):
        replace_initializer(graph, "zero_point_uint8_64", lambda z: z + 1)

    with pytest.raises(ExportCheckError, match=r"intermediate.dense.weight: sparsity .* in the ONNX file"):
        check_export(tampered(path, tmp_path, shift), model, TEXT, samples, atol=0.05)


@pytest.fixture(scope="module")
def qat_model(exported):
    trained, deploy = exported["qat"]
    model, tokenizer, _ = load_trained(trained)
    return model, sample_inputs(tokenizer, 24), deploy / "model.onnx"


def tampered(path, tmp_path, edit):
    proto = onnx.load(str(path))
    edit(proto.graph)
    out = tmp_path / "broken.onnx"
    onnx.save(proto, str(out))
    return out


def test_a_mask_lost_in_the_file_is_caught(qat_model, tmp_path):
    model, samples, path = qat_model
    key = "model.bert.encoder.layer.1.output.dense.weight_quantized"

    def unmask(graph):
        init = next(t for t in graph.initializer if t.name == key)
        levels = numpy_helper.to_array(init).copy()
        levels[levels == 128] = 129  # uint8 levels, zero point 128
        init.CopyFrom(numpy_helper.from_array(levels, key))

    with pytest.raises(ExportCheckError, match=r"bert.encoder.layer.1.output.dense.weight: sparsity 0.00% in the ONNX file"):
        check_export(tampered(path, tmp_path, unmask), model, TEXT, samples, atol=0.05)


def test_weights_changed_after_training_are_caught(qat_model, tmp_path):
    model, samples, path = qat_model
    check_export(path, model, TEXT, samples, atol=0.05)  # the untouched file passes
    weight = model.bert.encoder.layer[0].attention.self.key.weight
    saved = weight.detach().clone()
    with torch.no_grad():
        weight[weight == 0] = 0.05  # the mask removed in the reference model
    try:
        with pytest.raises(ExportCheckError, match="attention.self.key.weight: sparsity"):
            check_export(path, model, TEXT, samples, atol=0.05)
    finally:
        with torch.no_grad():
            weight.copy_(saved)


def test_missing_activation_qdq_is_caught(qat_model, tmp_path):
    model, samples, path = qat_model

    with pytest.raises(ExportCheckError, match="layer.0.intermediate.dense.input_quant: .* no QuantizeLinear"):
        check_export(tampered(path, tmp_path, skip_input_qdq), model, TEXT, samples, atol=0.05)


def attention_input_dqs(graph, layer: int) -> dict[str, str]:
    """{query/key/value: the DequantizeLinear output its MatMul reads as activation}."""
    g = OnnxGraph(onnx.ModelProto(graph=graph))
    found = {}
    for proj in ("query", "key", "value"):
        ops, path = g.int8_weight_users(f"bert.encoder.layer.{layer}.attention.self.{proj}.weight")
        (op,) = ops
        q, dq = g.input_pair(op, path)
        assert q.op_type == "QuantizeLinear" and dq.op_type == "DequantizeLinear"
        found[proj] = dq.output[0]
    return found


def test_query_key_value_read_one_qdq_pair(exported):
    _, deploy = exported["qat"]
    graph = onnx.load(str(deploy / "model.onnx")).graph
    for layer in (0, 1):
        assert len(set(attention_input_dqs(graph, layer).values())) == 1  # one Q/DQ feeds all three
    report = json.loads((deploy / "export_report.json").read_text())
    assert report["shared_input_qdq"] == {f"bert.encoder.layer.{i}.attention.self.{p}": f"bert.encoder.layer.{i}.attention.self.query"
                                          for i in (0, 1) for p in ("key", "value")}


def test_query_key_value_reading_separate_qdq_pairs_is_caught(qat_model, tmp_path):
    model, samples, path = qat_model

    def split_key_input(graph):  # a copy of the shared pair, only for layer 0's key
        dq_name = attention_input_dqs(graph, 0)["key"]
        dq = next(n for n in graph.node if n.output[0] == dq_name)
        q = next(n for n in graph.node if n.output[0] == dq.input[0])
        q2, dq2 = copy.deepcopy(q), copy.deepcopy(dq)
        q2.name, q2.output[0] = q.name + "_copy", q.output[0] + "_copy"
        dq2.name, dq2.input[0], dq2.output[0] = dq.name + "_copy", q2.output[0], dq.output[0] + "_copy"
        g = OnnxGraph(onnx.ModelProto(graph=graph))
        ops, _ = g.int8_weight_users("bert.encoder.layer.0.attention.self.key.weight")
        matmul = next(n for n in graph.node if n.output[0] == ops[0].output[0])
        matmul.input[:] = [dq2.output[0] if i == dq.output[0] else i for i in matmul.input]
        at = list(graph.node).index(dq) + 1
        graph.node.insert(at, dq2)
        graph.node.insert(at, q2)

    broken = tampered(path, tmp_path, split_key_input)
    with pytest.raises(ExportCheckError, match="layer.0.attention.self.key.input_quant: shares .*query's quantizer"):
        check_export(broken, model, TEXT, samples, atol=0.05)


def test_fp32_weight_where_training_quantized_is_caught(qat_model, tmp_path):
    model, samples, path = qat_model
    name = "model.classifier.weight"

    def dequantize(graph):
        init = next(t for t in graph.initializer if t.name == f"{name}_quantized")
        dq = next(n for n in graph.node if n.input and n.input[0] == init.name)
        with torch.no_grad():  # the very values the model computes with, but fp32: the Q/DQ is gone
            weight = model.classifier.weight_quant(model.classifier.weight).numpy()
        graph.initializer.append(numpy_helper.from_array(weight, name))
        for n in graph.node:
            n.input[:] = [name if i == dq.output[0] else i for i in n.input]
        graph.node.remove(dq)
        graph.initializer.remove(init)

    with pytest.raises(ExportCheckError, match="classifier: quantized in training, but its weight is not int8"):
        check_export(tampered(path, tmp_path, dequantize), model, TEXT, samples, atol=0.05)


def test_output_parity_failure_is_caught(exported, tmp_path):
    trained, deploy = exported["fp32"]
    model, tokenizer, _ = load_trained(trained)
    samples = sample_inputs(tokenizer, 24)

    def shift_bias(graph):
        init = next(t for t in graph.initializer if t.name == "model.classifier.bias")
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) + 0.01, init.name))

    with pytest.raises(ExportCheckError, match=r"onnxruntime differs from PyTorch: max abs diff 0.01"):
        check_export(tampered(deploy / "model.onnx", tmp_path, shift_bias), model, TEXT, samples, atol=1e-4)


def test_cli_exports_what_distsparse_train_wrote(tmp_path, tiny_model_dir, capsys):
    from distsparse.train import main as train

    rows = ["sentence,label"] + [f"sample {i} {'good great' if i % 2 else 'bad awful'} text,{i % 2}" for i in range(24)]
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "recipe.yaml").write_text(QAT_RECIPE.replace("start_epoch: 0.0\n    submodules", "start_epoch: 1.0\n    submodules")
                                          + "training_modifiers:\n  - !EpochRangeModifier\n    start_epoch: 0.0\n    end_epoch: 2.0\n")
    assert train(["--model_name_or_path", str(tiny_model_dir), "--recipe", str(tmp_path / "recipe.yaml"),
                  "--train_file", str(tmp_path / "train.csv"), "--output_dir", str(tmp_path / "run"),
                  "--per_device_train_batch_size", "8", "--max_seq_length", "16", "--save_strategy", "no"]) == 0
    assert cli(["export", "--model_path", str(tmp_path / "run"), "--output_dir", str(tmp_path / "deploy")]) == 0
    out = capsys.readouterr().out
    assert "int8 QDQ" in out and "quantized layers with int8 weights and Q/DQ: 17" in out and "argmax agreement 100.0%" in out
    shutil.copytree(tmp_path / "run", tmp_path / "broken")
    (tmp_path / "broken" / "quantization.safetensors").unlink()
    assert cli(["export", "--model_path", str(tmp_path / "broken"), "--output_dir", str(tmp_path / "d2")]) == 2
    assert "quantization.safetensors: missing" in capsys.readouterr().err
