"""Rebuilding the trained model as it trained, and tracing it to ONNX.

The model is ``from_pretrained`` + the QAT structure of its ``recipe.yaml`` + the scales in
``quantization.safetensors``. What each task exports is one row of ``EXPORT_TASKS``.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import onnx
import torch
from torch import nn

from ..errors import UserError
from ..fake_quant import freeze_
from ..savedmodel import QUANT_FILE, RECIPE_FILE, from_pretrained, load_quantization
from .graph import compact, store_int8_weights


@dataclass(frozen=True)
class ExportTask:
    """What a task exports: the transformers class that loads it, the outputs the ONNX file
    returns (attributes of the model's output, in order), and whether they have a sequence axis."""

    name: str
    auto_class: str
    output_names: tuple[str, ...]
    per_token: bool
    architecture_suffix: str  # a config.json architecture ending in this means this task


EXPORT_TASKS = {t.name: t for t in (
    ExportTask("text-classification", "AutoModelForSequenceClassification", ("logits",), False, "ForSequenceClassification"),
    ExportTask("multi-label-classification", "AutoModelForSequenceClassification", ("logits",), False, "ForSequenceClassification"),
    ExportTask("token-classification", "AutoModelForTokenClassification", ("logits",), True, "ForTokenClassification"),
    ExportTask("question-answering", "AutoModelForQuestionAnswering", ("start_logits", "end_logits"), True, "ForQuestionAnswering"),
    ExportTask("masked-lm", "AutoModelForMaskedLM", ("logits",), True, "ForMaskedLM"),
)}

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
MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")  # what Optimum's ORT models feed


def infer_task(config) -> str:
    """The task of a saved model from config.json: its architecture, and problem_type for multi-label."""
    for arch in config.architectures or []:
        for task in EXPORT_TASKS.values():
            if arch.endswith(task.architecture_suffix):
                multi = getattr(config, "problem_type", None) == "multi_label_classification"
                return "multi-label-classification" if task.name == "text-classification" and multi else task.name
    return "text-classification"


def load_trained(model_path, task: str | None = None):
    """The model as it ended training, in eval mode, scales fixed; plus its tokenizer and task name."""
    import transformers
    from transformers import AutoConfig, AutoTokenizer

    from ..modifiers.quantization import QuantizationModifier
    from ..recipe import load_recipe

    path = Path(model_path)
    if not (path / "config.json").is_file():
        raise UserError(f"--model_path {path}: no config.json here (not a saved model folder)")
    task = task or infer_task(AutoConfig.from_pretrained(path))
    model_class = getattr(transformers, EXPORT_TASKS[task].auto_class)
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # a refused export prints one line, not a loading bar
    try:
        # eager attention: one plain graph that traces the same for every sequence length
        model = from_pretrained(model_class, path, attn_implementation="eager")
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
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
            load_quantization(model, path)
    freeze_(model)
    return model.eval(), tokenizer, task


def sample_inputs(tokenizer, sequence_length: int) -> dict[str, torch.Tensor]:
    """The fixed sentences, padded to the longest (at most ``sequence_length``): shorter ones exercise
    the attention mask, and a masked-LM's stored outputs stay small (8 x 24 x vocabulary floats)."""
    encoded = tokenizer(SAMPLE_TEXTS, padding="longest", truncation=True, max_length=sequence_length,
                        return_tensors="pt")
    return {k: encoded[k] for k in MODEL_INPUTS if k in encoded}


def model_outputs(model: nn.Module, task: ExportTask, samples: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The task's outputs of the PyTorch model, by ONNX output name."""
    with torch.no_grad():
        out = model(**samples)
    return {name: getattr(out, name) for name in task.output_names}


class _OutputsByName(nn.Module):
    """Positional inputs in, the task's outputs out: what torch.onnx.export traces."""

    def __init__(self, model: nn.Module, input_names: list[str], output_names: tuple[str, ...]):
        super().__init__()
        self.model, self.input_names, self.output_names = model, input_names, output_names

    def forward(self, *inputs):
        out = self.model(**dict(zip(self.input_names, inputs)))
        return tuple(getattr(out, name) for name in self.output_names)


def export_onnx(model: nn.Module, task: ExportTask, samples: dict[str, torch.Tensor], path: Path,
                opset: int = 17) -> None:
    """TorchScript export (torch's dynamo exporter cannot export fake quantization), then int8 weights.

    Constant folding stays off so every initializer keeps its parameter's name: the checks find
    each weight by name. onnxruntime folds what is left when it loads the file.
    """
    names = list(samples)
    axes = {n: {0: "batch", 1: "sequence"} for n in names}
    axes.update({n: {0: "batch", 1: "sequence"} if task.per_token else {0: "batch"} for n in task.output_names})
    # an eval-mode wrapper: export restores the wrapper's mode, and a train-mode one would
    # switch the model's dropout back on
    wrapper = _OutputsByName(model, names, task.output_names).eval()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer chatter about HF's shape checks, and the legacy-exporter notice
        torch.onnx.export(wrapper, tuple(samples.values()), str(path), input_names=names,
                          output_names=list(task.output_names), dynamic_axes=axes, opset_version=opset,
                          dynamo=False, do_constant_folding=False)
    graph = onnx.load(str(path))
    store_int8_weights(graph)
    compact(graph)
    onnx.checker.check_model(graph)
    onnx.save(graph, str(path))
