"""Hugging Face's and SparseML's command-line habits work unchanged: --do_train/--do_eval/--do_predict,
--fp16 False, booleans as True/False, --distill_teacher, --sequence_length, results files,
--load_best_model_at_end, eval-only and predict-only runs of a saved QAT model, a line when the recipe
overrides a flag the user gave, and the README's run_glue.py-style command."""
from __future__ import annotations

import json
import re
import shlex

import pytest

from conftest import CONSTANT_PRUNING, FIXTURES, ROOT, small_recipe
from distsparse.args import parse_args
from distsparse.cli import main as cli
from distsparse.errors import UserError

QAT = small_recipe(CONSTANT_PRUNING, """
quantization_modifiers:
  - !QuantizationModifier
    start_epoch: 0.0
    submodules: [bert.encoder, classifier]
""", num_epochs=3.0)


def test_flags_parse_as_transformers_spells_them():
    args = parse_args(["--do_train", "--do_eval", "--fp16", "False", "--overwrite_output_dir=True",
                       "--distill_teacher", "t", "--bf16=true"])
    assert args.do_train and args.do_eval and args.overwrite_output_dir and args.teacher == "t"
    assert args.mixed_precision == "bf16" and not args.fp16
    assert parse_args([]).do_train and parse_args([]).do_eval  # neither given: train, then evaluate
    only_eval = parse_args(["--do_eval"])
    assert only_eval.do_eval and not only_eval.do_train
    assert parse_args(["--teacher", "self"]).teacher == "self" and parse_args([]).teacher == "disable"
    with pytest.raises(UserError, match="disagree"):
        parse_args(["--fp16", "--mixed_precision", "bf16"])
    with pytest.raises(SystemExit):
        parse_args(["--do_train", "maybe"])
    only_predict = parse_args(["--do_predict", "--test_file", "t.csv", "--task_name", "stsb"])
    assert only_predict.do_predict and not (only_predict.do_train or only_predict.do_eval)  # as TrainingArguments
    assert only_predict.test_file == "t.csv" and only_predict.task_name == "stsb"
    assert parse_args(["--sequence_length", "64"]).max_seq_length == 64  # SparseML's name
    assert parse_args([]).entity_scoring == "conlleval" and parse_args(["--entity_scoring", "strict"]).entity_scoring == "strict"


@pytest.fixture
def job(tmp_path, tiny_model_dir):
    rows = ["sentence,label"] + [f"sample {i} {'good fine great' if i % 2 else 'bad poor awful'} text,{i % 2}"
                                 for i in range(48)]
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    (tmp_path / "dev.csv").write_text("\n".join(rows[:21]) + "\n")
    (tmp_path / "recipe.yaml").write_text(QAT)

    def argv(out: str, *extra: str) -> list[str]:
        return ["train", "--model_name_or_path", str(tiny_model_dir), "--recipe", str(tmp_path / "recipe.yaml"),
                "--train_file", str(tmp_path / "train.csv"), "--validation_file", str(tmp_path / "dev.csv"),
                "--output_dir", str(tmp_path / out), "--per_device_train_batch_size", "8",
                "--max_seq_length", "32", "--logging_steps", "1", *extra]

    return argv


def test_results_files_best_model_and_eval_only(job, tmp_path, capsys):
    """The best checkpoint becomes the saved model and the one that predicts (as HF's Trainer reloads it)."""
    dev = str(tmp_path / "dev.csv")
    # At LR 0.03 the eval loss goes 0.728, 0.703, 0.712 and the model predicts all 1, then all 0: with the
    # highest loss as "best", step 6 wins and coming back to it changes every prediction.
    assert cli(job("out", "--do_train", "--do_eval", "--fp16", "False", "--learning_rate", "0.01",
                   "--load_best_model_at_end", "True", "--metric_for_best_model", "loss", "--greater_is_better", "True",
                   "--save_total_limit", "1", "--do_predict", "--test_file", dev, "--recipe_args", "init_lr=0.03")) == 0
    printed = capsys.readouterr().out
    assert "--learning_rate 0.01: the recipe's LearningRateFunctionModifier sets it instead" in printed
    out = tmp_path / "out"
    evals = {int(step): float(loss) for step, loss in re.findall(r"^step (\d+) eval/loss=(\S+)", printed, re.M)}
    assert sorted(evals) == [6, 12, 18]
    best_step = max(evals, key=evals.get)
    assert best_step == 6 and f"best model: step {best_step}" in printed
    assert (out / f"checkpoint-{best_step}").is_dir()  # kept despite --save_total_limit 1
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == best_step  # its files were copied
    predicted = {line.split("\t")[1] for line in (out / "predict_results_text-classification.txt").read_text().splitlines()[1:]}
    assert predicted == {"1"}  # step 6's model (the last one predicts 0 everywhere)
    results = json.loads((out / "eval_results.json").read_text())
    assert results["eval_loss"] == pytest.approx(evals[best_step], abs=1e-4) and results["eval_samples"] == 20
    train_results = json.loads((out / "train_results.json").read_text())
    assert train_results["global_step"] == 18 and train_results["train_samples"] == 48
    assert json.loads((out / "all_results.json").read_text()) == {**train_results, **results}

    # Eval only, on the saved QAT model: its own recipe and scales, the same numbers as at that step,
    # and the same predictions as the training run made after coming back to that step.
    assert cli(["train", "--do_eval", "--model_name_or_path", str(out), *job("eval")[5:9],
                "--output_dir", str(tmp_path / "eval"), "--max_seq_length", "32", "--do_predict", "--test_file", dev]) == 0
    again = json.loads((tmp_path / "eval" / "eval_results.json").read_text())
    assert again["eval_loss"] == pytest.approx(results["eval_loss"], abs=1e-5)
    assert again["eval_accuracy"] == results["eval_accuracy"]
    predictions = "predict_results_text-classification.txt"
    assert (tmp_path / "eval" / predictions).read_text() == (out / predictions).read_text()
    assert not (tmp_path / "eval" / "train_results.json").exists() and not (tmp_path / "eval" / "model.safetensors").exists()


def test_best_model_needs_matching_strategies(job, capsys):
    assert cli(job("x", "--load_best_model_at_end", "--save_strategy", "no")) == 2
    assert "--load_best_model_at_end: needs --save_strategy equal to --eval_strategy" in capsys.readouterr().err


def test_predict_after_training_and_from_the_saved_qat_model(job, tmp_path, capsys):
    """--do_predict writes run_glue.py's predict_results file in the test file's order; a predict-only run
    of the saved QAT folder (its recipe and scales) writes the same file and nothing else."""
    assert cli(job("out", "--do_train", "--do_eval", "--do_predict", "--test_file", str(tmp_path / "dev.csv"))) == 0
    out = tmp_path / "out"
    lines = (out / "predict_results_text-classification.txt").read_text().splitlines()
    assert lines[0] == "index\tprediction" and [line.split("\t")[0] for line in lines[1:]] == [str(i) for i in range(20)]
    gold = [row.rsplit(",", 1)[1] for row in (tmp_path / "dev.csv").read_text().splitlines()[1:]]
    predicted = [line.split("\t")[1] for line in lines[1:]]
    assert set(predicted) <= {"0", "1"}
    accuracy = json.loads((out / "eval_results.json").read_text())["eval_accuracy"]
    assert sum(p == g for p, g in zip(predicted, gold)) / 20 == pytest.approx(accuracy)  # row i is dev row i

    assert cli(["train", "--do_predict", "--model_name_or_path", str(out), *job("p")[5:7], "--test_file",
                str(tmp_path / "dev.csv"), "--output_dir", str(tmp_path / "p"), "--max_seq_length", "32"]) == 0
    assert (tmp_path / "p" / "predict_results_text-classification.txt").read_text().splitlines() == lines
    assert [p.name for p in (tmp_path / "p").iterdir()] == ["predict_results_text-classification.txt"]


@pytest.mark.parametrize("case", ["no test file", "qa"])
def test_predict_refusals(job, tmp_path, capsys, case):
    extra = {"no test file": ["--do_predict"],
             "qa": ["--do_predict", "--task", "question-answering", "--train_file", str(FIXTURES / "squad_tiny.json"),
                    "--test_file", str(FIXTURES / "squad_tiny.json")]}[case]
    message = {"no test file": "--do_predict: pass --test_file",
               "qa": "--do_predict: --task question-answering writes no predictions"}[case]
    assert cli(job("x", *extra)) == 2
    assert message in capsys.readouterr().err


def readme_command(marker: str) -> list[str]:
    """The README's shell command whose first line contains ``marker``, as argv (without ``distsparse``)."""
    text = (ROOT / "README.md").read_text()
    start = text.index(marker)
    command = text[start:text.index("\n```", start)].replace("\\\n", " ")
    return shlex.split(command)[1:]


def test_readme_run_glue_command_runs_unchanged(tmp_path, tiny_model_dir, capsys):
    """The README's run_glue.py-style RTE command, its data paths pointed at the synthetic RTE files (and a
    label-less test file, as GLUE's test.tsv), the tiny model and a short recipe added: it runs and writes
    HF's files."""
    argv = readme_command("distsparse train --task_name rte --do_train")
    assert parse_args(argv[1:]).task_name == "rte"
    dev = (FIXTURES / "entailment" / "dev.tsv").read_text().splitlines()
    (tmp_path / "test.tsv").write_text("".join(line.rsplit("\t", 1)[0] + "\n" for line in dev))
    files = {"../shared/data/rte/train.tsv": str(FIXTURES / "entailment" / "train.tsv"),
             "../shared/data/rte/dev.tsv": str(FIXTURES / "entailment" / "dev.tsv"),
             "../shared/data/rte/test.tsv": str(tmp_path / "test.tsv"), "outputs/rte": str(tmp_path / "rte")}
    (tmp_path / "recipe.yaml").write_text(small_recipe(CONSTANT_PRUNING, num_epochs=1.0))
    argv = [files.get(a, a) for a in argv] + ["--model_name_or_path", str(tiny_model_dir),
                                              "--recipe", str(tmp_path / "recipe.yaml")]
    assert cli(argv) == 0
    assert "--learning_rate 2e-05: the recipe's LearningRateFunctionModifier sets it instead" in capsys.readouterr().out
    out = tmp_path / "rte"
    results = json.loads((out / "all_results.json").read_text())
    assert results["eval_samples"] == 20 and 0 <= results["eval_accuracy"] <= 1 and results["train_samples"] == 60
    lines = (out / "predict_results_rte.txt").read_text().splitlines()
    assert lines[0] == "index\tprediction" and len(lines) == 21
    assert {line.split("\t")[1] for line in lines[1:]} <= {"entailment", "not_entailment"}
