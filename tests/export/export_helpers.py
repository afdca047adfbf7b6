"""Helpers the export tests share: a 'trained' folder as distsparse train writes it, without the loop."""
from __future__ import annotations

import torch
from onnx import numpy_helper
from safetensors.torch import save_file
from transformers import AutoTokenizer

from conftest import minilm_dir, tiny_bert
from distsparse.events import Event, State, fire
from distsparse.fake_quant import quant_state
from distsparse.recipe import load_recipe

QAT_RECIPE = """
constant_modifiers:
  - !ConstantPruningModifier
    start_epoch: 0.0
    params: __ALL_PRUNABLE__
quantization_modifiers:
  - !QuantizationModifier
    start_epoch: 0.0
    submodules: [bert.embeddings, bert.encoder, bert.pooler, classifier]
    exclude_module_types: [LayerNorm, Tanh]
    quantize_linear_activations: 1
    weight_strategy: channel
"""


def train_by_hand(out, recipe_text: str | None, steps: int = 4):
    """A 'trained' folder as distsparse train writes it: a 50%-sparse tiny BERT after a few
    optimizer steps under the recipe (QAT observers calibrated), plus recipe.yaml and scales."""
    model = tiny_bert(sparsity=0.5, dropout=0.1)
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    modifiers = load_recipe(recipe_text).modifiers if recipe_text else []
    state = State(model=model, steps_per_epoch=2)
    fire(modifiers, Event.INIT, state)
    state.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    fire(modifiers, Event.FIT_START, state)
    batch = tokenizer(["good fine great film", "bad poor awful plot here"] * 2, padding=True, return_tensors="pt")
    for _ in range(steps):
        fire(modifiers, Event.BATCH_START, state)
        model(**batch, labels=torch.tensor([1, 0, 1, 0])).loss.backward()
        fire(modifiers, Event.AFTER_BACKWARD, state)
        state.optimizer.step()
        state.optimizer.zero_grad()
        fire(modifiers, Event.OPTIMIZER_STEP_END, state)
        state.step += 1
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if recipe_text:
        (out / "recipe.yaml").write_text(load_recipe(recipe_text).to_yaml({"steps_per_epoch": 2}))
        save_file({k: v.contiguous() for k, v in quant_state(model).items()}, out / "quantization.safetensors")
    return model




def replace_initializer(graph, name, change):
    """Set the ONNX initializer ``name`` to ``change(its value)``."""
    init = next(t for t in graph.initializer if t.name == name)
    init.CopyFrom(numpy_helper.from_array(change(numpy_helper.to_array(init).copy()), name))


def skip_input_qdq(graph):
    """Feed layer 0's intermediate dense MatMul the float activation, skipping its Q/DQ pair."""
    dq = next(n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] ==
              "model.bert.encoder.layer.0.intermediate.dense.weight_quantized")
    transpose = next(n for n in graph.node if dq.output[0] in n.input)
    matmul = next(n for n in graph.node if transpose.output[0] in n.input)
    act_dq = next(n for n in graph.node if n.output[0] == matmul.input[0])
    matmul.input[0] = next(n for n in graph.node if n.output[0] == act_dq.input[0]).input[0]
