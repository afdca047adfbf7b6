"""A saved QAT model loads in plain transformers WITH its int8 quantization (compressed-tensors format),
computes what distsparse computes, refuses to load as fp32 when compressed-tensors is missing, and
is about 4x smaller than the same model saved in fp32."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from conftest import CONSTANT_PRUNING, ROOT, small_recipe, tiny_bert
from distsparse.cli import main as cli

needs_compressed_tensors = pytest.mark.skipif(importlib.util.find_spec("compressed_tensors") is None,
                                              reason="needs compressed-tensors (pip install '.[compressed]')")

QAT = small_recipe(CONSTANT_PRUNING, """
quantization_modifiers:
  - !QuantizationModifier
    start_epoch: 0.0
    submodules: [bert, classifier]
    weight_strategy: {strategy}
""", num_epochs=2.0)

# Runs in a fresh interpreter that never imports distsparse: what a transformers user has.
PLAIN_TRANSFORMERS = textwrap.dedent("""
    import json, sys
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    folder, texts = sys.argv[1], json.loads(sys.argv[2])
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    query = model.bert.encoder.layer[0].attention.self.query
    loaded = {"status": str(query.quantization_status), "weight_dtype": str(query.weight.dtype)}
    batch = tokenizer(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert not any(m.startswith("distsparse") for m in sys.modules)
    print(json.dumps({"logits": logits.tolist(), "input_zero_point": int(query.input_zero_point), **loaded}))
""")


def plain_transformers(folder, texts: list[str], max_length: int = 32,
                       block_compressed_tensors: bool = False) -> subprocess.CompletedProcess:
    code = PLAIN_TRANSFORMERS.replace("max_length=32", f"max_length={max_length}")
    if block_compressed_tensors:  # as if the package were not installed
        code = "import sys; sys.modules['compressed_tensors'] = None\n" + code
    return subprocess.run([sys.executable, "-c", code, str(folder), json.dumps(texts)], capture_output=True,
                          text=True, cwd="/", timeout=600, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})


@pytest.fixture(scope="module", params=["tensor", "channel"])
def trained(tmp_path_factory, request):
    """A 50%-sparse tiny BERT after 12 QAT steps (activations quantized from the second), its weights
    with one scale per tensor (SparseML's) or per output channel."""
    from transformers import AutoTokenizer

    from conftest import minilm_dir

    tmp = tmp_path_factory.mktemp("ct")
    tiny_bert(sparsity=0.5).save_pretrained(tmp / "base")
    AutoTokenizer.from_pretrained(minilm_dir()).save_pretrained(tmp / "base")
    rows = ["sentence,label"] + [f"sample {i} {'good fine great' if i % 2 else 'bad poor awful'} text,{i % 2}"
                                 for i in range(48)]
    (tmp / "train.csv").write_text("\n".join(rows) + "\n")
    (tmp / "dev.csv").write_text("\n".join(rows[:21]) + "\n")
    (tmp / "recipe.yaml").write_text(QAT.replace("{strategy}", request.param))
    assert cli(["train", "--model_name_or_path", str(tmp / "base"), "--recipe", str(tmp / "recipe.yaml"),
                "--train_file", str(tmp / "train.csv"), "--validation_file", str(tmp / "dev.csv"),
                "--output_dir", str(tmp / "out"), "--per_device_train_batch_size", "8",
                "--max_seq_length", "32", "--save_strategy", "no"]) == 0
    texts = [line.rsplit(",", 1)[0] for line in rows[1:21]]
    labels = [int(line.rsplit(",", 1)[1]) for line in rows[1:21]]
    return tmp / "out", texts, labels


def test_config_states_our_int8_scheme(trained):
    out, _, _ = trained
    strategy = "channel" if "channel" in (out / "recipe.yaml").read_text() else "tensor"
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "int-quantized"
    groups = list(config["config_groups"].values())
    linear = next(g for g in groups if "bert.encoder.layer.0.attention.self.query" in g["targets"])
    assert linear["weights"] == {"num_bits": 8, "type": "int", "symmetric": True, "strategy": strategy, "dynamic": False}
    from safetensors.torch import load_file

    scale = load_file(out / "model.safetensors")["bert.encoder.layer.0.attention.self.query.weight_scale"]
    assert list(scale.shape) == ([32, 1] if strategy == "channel" else [1])
    assert linear["input_activations"] == {"num_bits": 8, "type": "int", "symmetric": False, "strategy": "tensor",
                                           "dynamic": False}
    assert linear["output_activations"] is None
    embedding = next(g for g in groups if "bert.embeddings.word_embeddings" in g["targets"])
    assert embedding["input_activations"] is None and embedding["output_activations"]["strategy"] == "tensor"
    assert sum(len(g["targets"]) for g in groups) == 3 + 2 * 6 + 2  # embeddings, 2 layers x 6 Linear, pooler, classifier


def plain_vs_distsparse(folder, texts: list[str], max_length: int) -> tuple[dict, torch.Tensor, dict]:
    """What plain transformers computes on ``texts`` from ``folder``, distsparse's logits for the same
    folder (``load_trained``, what ``distsparse export`` checks its ONNX file against), and the
    comparison under the export's parity rule (raises ExportCheckError outside it)."""
    from distsparse.export.build import EXPORT_TASKS, load_trained
    from distsparse.export.verify import compare_outputs, parity_tolerance

    run = plain_transformers(folder, texts, max_length)
    assert run.returncode == 0, run.stderr[-2000:]
    plain = json.loads(run.stdout.strip().splitlines()[-1])
    model, tokenizer, task = load_trained(folder)
    batch = dict(tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"))
    with torch.no_grad():
        ours = model(**batch).logits
    reference = {"logits": ours.numpy()}
    atol = parity_tolerance(model, EXPORT_TASKS[task], batch, reference)["atol"]
    return plain, ours, compare_outputs({"logits": torch.tensor(plain["logits"]).numpy()}, reference, atol)


@needs_compressed_tensors
def test_plain_transformers_reproduces_distsparse(trained):
    """Within the tolerance distsparse's ONNX export is held to, for the same reason: another engine
    computing the same int8 model (same integers, same scales) lands an activation one level apart
    wherever float noise before a quantizer crosses a rounding boundary (it divides by s, we
    multiply by 1/s; it runs SDPA attention, load_trained eager). The rule: 1e-4 x max(1, max
    |logit|) + 2 quantization levels of the classifier's input. Predictions agree wherever the
    top two logits are further apart than twice that."""
    out, texts, labels = trained
    plain, ours, parity = plain_vs_distsparse(out, texts, 32)
    assert plain["status"] == "QuantizationStatus.COMPRESSED" and plain["weight_dtype"] == "torch.int8"
    assert parity["argmax_agreement"] == 1.0 and parity["max_abs_diff"] <= parity["atol"]
    # our uint8 zero point z is compressed-tensors' int8 z - 128
    from distsparse.export.build import load_trained

    query = load_trained(out)[0].bert.encoder.layer[0].attention.self.query
    assert plain["input_zero_point"] == int(query.input_quant.zero_point) - 128
    theirs = torch.tensor(plain["logits"])
    results = json.loads((out / "eval_results.json").read_text())
    accuracy = (theirs.argmax(-1) == torch.tensor(labels)).float().mean().item()
    assert accuracy == pytest.approx(results["eval_accuracy"])
    # the tolerance tells quantized from not: the same weights without quantization land outside it
    assert (plain_fp32_logits(out, tokenized(out, texts)) - ours).abs().max() > parity["atol"]


@pytest.mark.slow
@needs_compressed_tensors
def test_plain_transformers_reproduces_distsparse_on_minilm(tmp_path):
    """The real MiniLM-L6, 80% sparse, int8 everywhere the default recipe puts it (calibrated on one
    batch): the same check on the real 22M-parameter model."""
    sys.path.insert(0, str(ROOT / "bench"))
    from accelerate import Accelerator
    from saved_size import qat_
    from step_overhead import presparsify_

    from transformers import AutoTokenizer

    import benchlib as bl
    from distsparse.recipe import load_recipe
    from distsparse.savedmodel import save_model

    model = bl.load_model(tiny=False)
    presparsify_(model, 0.8)
    qat_(model)
    save_model(Accelerator(cpu=True), model, AutoTokenizer.from_pretrained(bl.minilm_path()),
               load_recipe(ROOT / "distsparse" / "recipes" / "default.yaml"), tmp_path / "m", metadata={})
    texts = ["a gripping, beautifully acted film that stays with you long after the credits.",
             "the plot is thin and the jokes fall flat.", "it's not great, but it is not bad either",
             "What a wonderful surprise!"] * 4
    _, _, parity = plain_vs_distsparse(tmp_path / "m", texts, 64)
    assert parity["argmax_agreement"] == 1.0 and parity["max_abs_diff"] <= parity["atol"]


def tokenized(folder, texts):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)(texts, padding=True, truncation=True, max_length=32,
                                                 return_tensors="pt")


def plain_fp32_logits(out, batch) -> torch.Tensor:
    from transformers import AutoModelForSequenceClassification

    from distsparse.savedmodel import from_pretrained

    model = from_pretrained(AutoModelForSequenceClassification, out).eval()
    with torch.no_grad():
        return model(**batch).logits


def test_without_compressed_tensors_loading_fails_loudly(trained):
    out, texts, _ = trained
    run = plain_transformers(out, texts, block_compressed_tensors=True)
    assert run.returncode != 0
    assert "compressed-tensors" in run.stderr and "pip install" in run.stderr


def test_80_percent_sparse_folder_is_4x_smaller(tmp_path):
    from accelerate import Accelerator
    from transformers import AutoTokenizer

    from conftest import minilm_dir
    from distsparse.fake_quant import fake_quants, freeze_, to_quant_
    from distsparse.recipe import load_recipe
    from distsparse.savedmodel import save_model

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    recipe = load_recipe(ROOT / "distsparse" / "recipes" / "dense.yaml")
    accelerator = Accelerator(cpu=True)
    sizes = {}
    for kind in ("dense", "compressed"):
        model = tiny_bert(sparsity=0.8)
        if kind == "compressed":
            for module in [m for m in model.modules() if type(m) in (nn.Linear, nn.Embedding)]:
                to_quant_(module)
            for _, fq in fake_quants(model):
                fq.enabled = fq.observe = True
            freeze_(model)
        save_model(accelerator, model, tokenizer, recipe, tmp_path / kind, metadata={})
        sizes[kind] = (tmp_path / kind / "model.safetensors").stat().st_size
    assert sizes["compressed"] < 0.3 * sizes["dense"]
