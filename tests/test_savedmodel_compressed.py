"""A saved QAT model loads in plain transformers WITH its int8 quantization (compressed-tensors format),
computes what distsparse computes, refuses to load as fp32 when compressed-tensors is missing, and
is about 4x smaller than the same model saved in fp32."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from conftest import CONSTANT_PRUNING, ROOT, small_recipe, tiny_bert
from distsparse.cli import main as cli

pytest.importorskip("compressed_tensors")

QAT = small_recipe(CONSTANT_PRUNING, """
quantization_modifiers:
  - !QuantizationModifier
    start_epoch: 0.0
    submodules: [bert, classifier]
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


def plain_transformers(*argv: str, block_compressed_tensors: bool = False) -> subprocess.CompletedProcess:
    code = PLAIN_TRANSFORMERS
    if block_compressed_tensors:  # as if the package were not installed
        code = "import sys; sys.modules['compressed_tensors'] = None\n" + code
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd="/",
                          timeout=300, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 50%-sparse tiny BERT after 12 QAT steps (activations quantized from step 2)."""
    from transformers import AutoTokenizer

    from conftest import minilm_dir

    tmp = tmp_path_factory.mktemp("ct")
    tiny_bert(sparsity=0.5).save_pretrained(tmp / "base")
    AutoTokenizer.from_pretrained(minilm_dir()).save_pretrained(tmp / "base")
    rows = ["sentence,label"] + [f"sample {i} {'good fine great' if i % 2 else 'bad poor awful'} text,{i % 2}"
                                 for i in range(48)]
    (tmp / "train.csv").write_text("\n".join(rows) + "\n")
    (tmp / "dev.csv").write_text("\n".join(rows[:21]) + "\n")
    (tmp / "recipe.yaml").write_text(QAT)
    assert cli(["train", "--model_name_or_path", str(tmp / "base"), "--recipe", str(tmp / "recipe.yaml"),
                "--train_file", str(tmp / "train.csv"), "--validation_file", str(tmp / "dev.csv"),
                "--output_dir", str(tmp / "out"), "--per_device_train_batch_size", "8",
                "--max_seq_length", "32", "--save_strategy", "no"]) == 0
    texts = [line.rsplit(",", 1)[0] for line in rows[1:21]]
    labels = [int(line.rsplit(",", 1)[1]) for line in rows[1:21]]
    return tmp / "out", texts, labels


def test_config_states_our_int8_scheme(trained):
    out, _, _ = trained
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "int-quantized"
    groups = list(config["config_groups"].values())
    linear = next(g for g in groups if "bert.encoder.layer.0.attention.self.query" in g["targets"])
    assert linear["weights"] == {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel", "dynamic": False}
    assert linear["input_activations"] == {"num_bits": 8, "type": "int", "symmetric": False, "strategy": "tensor",
                                           "dynamic": False}
    assert linear["output_activations"] is None
    embedding = next(g for g in groups if "bert.embeddings.word_embeddings" in g["targets"])
    assert embedding["input_activations"] is None and embedding["output_activations"]["strategy"] == "tensor"
    assert sum(len(g["targets"]) for g in groups) == 3 + 2 * 6 + 2  # embeddings, 2 layers x 6 Linear, pooler, classifier


def test_plain_transformers_reproduces_distsparse(trained):
    """Same predictions; logits within 1e-5. The two fake-quantize with the same integers and scales and
    differ only where x/s lands exactly on a rounding tie (we multiply by 1/s, compressed-tensors
    divides), which moves one activation by one step; with 20 rows that did not happen, and 1e-5
    is far below the gap between the two logits (> 1e-3 here) that decides a prediction."""
    from distsparse.export.build import load_trained

    out, texts, labels = trained
    run = plain_transformers(str(out), json.dumps(texts))
    assert run.returncode == 0, run.stderr[-2000:]
    plain = json.loads(run.stdout.strip().splitlines()[-1])
    assert plain["status"] == "QuantizationStatus.COMPRESSED" and plain["weight_dtype"] == "torch.int8"

    model, tokenizer, _ = load_trained(out)
    batch = tokenizer(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
    with torch.no_grad():
        ours = model(**batch).logits
    theirs = torch.tensor(plain["logits"])
    assert torch.allclose(theirs, ours, atol=1e-5, rtol=0)
    assert theirs.argmax(-1).tolist() == ours.argmax(-1).tolist()
    # our uint8 zero point z is compressed-tensors' int8 z - 128
    assert plain["input_zero_point"] == int(model.bert.encoder.layer[0].attention.self.query.input_quant.zero_point) - 128
    results = json.loads((out / "eval_results.json").read_text())
    accuracy = (theirs.argmax(-1) == torch.tensor(labels)).float().mean().item()
    assert accuracy == pytest.approx(results["eval_accuracy"])
    # and the quantization matters: the same weights without it give other logits
    fp32 = plain_fp32_logits(out, batch)
    assert (fp32 - ours).abs().max() > 1e-4


def plain_fp32_logits(out, batch) -> torch.Tensor:
    from transformers import AutoModelForSequenceClassification

    from distsparse.savedmodel import from_pretrained

    model = from_pretrained(AutoModelForSequenceClassification, out).eval()
    with torch.no_grad():
        return model(**batch).logits


def test_without_compressed_tensors_loading_fails_loudly(trained):
    out, texts, _ = trained
    run = plain_transformers(str(out), json.dumps(texts), block_compressed_tensors=True)
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
