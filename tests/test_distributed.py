"""Rank consistency, proven with real processes: 2 gloo ranks on CPU that see different batches.

Every backend (DDP, DeepSpeed ZeRO-2, ZeRO-3) trains the same recipe (GMP masks changing every
step, QAT observers updating then frozen, distillation from a frozen teacher) with batch 4 per
rank, and is compared with one process at batch 8 over the same global batches: masks and
scales/zero-points must be bitwise equal across ranks and match the single process, and so must
the loss curve. Each rank dumps what the consistency check digests (DISTSPARSE_DUMP_RANK_STATE,
see ``distsparse.distributed._dump``), so the asserts read real values, not log lines only.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import ROOT, TWO_EPOCHS_LINEAR_LR, free_port, minilm_dir, tiny_bert
from distsparse import distributed

STEPS_PER_EPOCH, EPOCHS, BATCH = 4, 2, 4  # 32 rows = 4 steps of 2 ranks x 4 rows, 2 epochs
RECIPE = TWO_EPOCHS_LINEAR_LR + r"""
pruning_modifiers:
  - !GMPruningModifier
    params: ["re:bert\\.encoder\\.layer\\.\\d+\\..*dense\\.weight",
             "re:bert\\.encoder\\.layer\\.\\d+\\.attention\\.self\\.(query|key|value)\\.weight"]
    start_epoch: 0.0
    end_epoch: 1.0
    init_sparsity: 0.5
    final_sparsity: 0.8
    update_frequency: 0.25
    inter_func: linear
quantization_modifiers:
  - !QuantizationModifier
    start_epoch: 0.5
    disable_quantization_observer_epoch: 1.5
    submodules: [bert.embeddings, bert.encoder, bert.pooler, classifier]
    exclude_module_types: [LayerNorm, Tanh]
distillation_modifiers:
  - !DistillationModifier
    start_epoch: 0.0
    hardness: 0.5
    temperature: 2.0
"""



class Job:
    """The files of one small job and the ways to run it; launches are cached by name."""

    def __init__(self, root: Path):
        self.root = root
        self.model = root / "tiny-bert"
        tiny_bert(sparsity=0.5).save_pretrained(self.model)  # dropout 0: 2 x b and 1 x 2b compute the same
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(minilm_dir()).save_pretrained(self.model)
        words = "good great fine bad awful poor movie film plot actor scene story".split()
        rows = [f"{' '.join(words[(i * 7 + j * 5) % len(words)] for j in range(3 + i % 5))} {i},{i % 2}"
                for i in range(STEPS_PER_EPOCH * 2 * BATCH)]
        (root / "train.csv").write_text("sentence,label\n" + "\n".join(rows) + "\n")
        (root / "recipe.yaml").write_text(RECIPE)
        self.configs = self._launch_configs()
        self.runs: dict[str, tuple[subprocess.CompletedProcess, Path]] = {}

    def _launch_configs(self) -> dict[str, tuple[Path, dict]]:
        """The repository's CPU configs; ZeRO-3 with a stage-3 file whose persistence threshold is 0,
        so no parameter stays whole and masks must reach the partitions and fp32 master copies."""
        configs = ROOT / "launch_configs"
        ds = json.loads((configs / "ds_zero3.json").read_text())
        ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        (self.root / "ds_zero3.json").write_text(json.dumps(ds))
        zero3 = yaml.safe_load((configs / "cpu_deepspeed_zero3.yaml").read_text())
        zero3["deepspeed_config"]["deepspeed_config_file"] = str(self.root / "ds_zero3.json")
        (self.root / "zero3.yaml").write_text(yaml.safe_dump(zero3))
        return {"ddp": (configs / "cpu_2proc.yaml", {"ACCELERATE_USE_CPU": "true"}),
                "zero2": (configs / "deepspeed_zero2.yaml", {"DS_ACCELERATOR": "cpu"}),
                "zero3": (self.root / "zero3.yaml", {"DS_ACCELERATOR": "cpu"})}

    def args(self, out: Path, batch: int, *extra: str) -> list[str]:
        return ["--model_name_or_path", str(self.model), "--train_file", str(self.root / "train.csv"),
                "--recipe", str(self.root / "recipe.yaml"), "--output_dir", str(out), "--teacher", "self",
                "--per_device_train_batch_size", str(batch), "--max_seq_length", "16", "--logging_steps", "1",
                "--seed", "0", *extra]

    def launch(self, name: str, backend: str, *extra: str) -> tuple[subprocess.CompletedProcess, Path]:
        """``accelerate launch`` 2 processes of ``-m distsparse.train``; output folder and dumps under root/name."""
        if name not in self.runs:
            config, env_extra = self.configs[backend]
            out = self.root / name
            env = dict(os.environ, HF_HOME=str(self.root / "hf"), GLOO_SOCKET_IFNAME="lo", MASTER_ADDR="127.0.0.1",
                       OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), **env_extra,
                       **{distributed.DUMP_ENV: str(out / "ranks")})
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
                   "--num_processes", "2", "--main_process_port", str(free_port()),
                   "-m", "distsparse.train", *self.args(out, BATCH, *extra)]
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=400)
            self.runs[name] = (proc, out)
        return self.runs[name]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    return Job(tmp_path_factory.mktemp("distributed"))


@pytest.fixture(scope="module")
def reference(job):
    """One process, batch 8 = the 2 ranks' batches together: (loss per step, saved model folder)."""
    from distsparse.train import main as train

    out = job.root / "single"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert train(job.args(out, 2 * BATCH, "--save_strategy", "no")) == 0
    return losses(printed.getvalue()), out


def losses(log: str) -> list[float]:
    return [float(v) for v in re.findall(r"^.*?step \d+ train/loss=(\S+)", log, flags=re.M)]


def rank_states(out: Path) -> tuple[dict, dict]:
    return load_file(str(out / "ranks" / "rank0.safetensors")), load_file(str(out / "ranks" / "rank1.safetensors"))


def masks_of(state: dict) -> dict[str, torch.Tensor]:
    return {k.split(".masks.", 1)[1]: v for k, v in state.items() if ".masks." in k}


def ok(proc) -> str:
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    return log


@pytest.mark.parametrize("backend", ["ddp", "zero2", "zero3"])
def test_two_ranks_agree_bitwise_and_match_one_process(job, reference, backend):
    proc, out = job.launch(backend, backend, "--save_strategy", "epoch")
    log = ok(proc)
    # The check ran at both epoch ends (the second is the end of training) and passed.
    assert len(re.findall(r"^rank consistency: OK \((\d+) tensors\)$", proc.stdout, flags=re.M)) == EPOCHS, log[-3000:]

    rank0, rank1 = rank_states(out)
    assert rank0.keys() == rank1.keys()
    differing = [k for k in rank0 if not k.startswith("teacher_") and not torch.equal(rank0[k], rank1[k])]
    assert differing == []
    masks = masks_of(rank0)
    assert len(masks) == 12  # 2 layers x (q, k, v, attention out, intermediate, output)
    pruned = sum(int((~m).sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())
    assert pruned == pytest.approx(0.8, abs=1e-3)  # GMP reached final_sparsity: the masks changed from 0.5
    assert not any(rank0[k] for k in rank0 if k.endswith(".observe"))  # observers frozen on every rank
    assert all(rank0[k] for k in rank0 if k.endswith("weight_quant.enabled"))
    # DDP and ZeRO-2 compare whole weights and hold a frozen teacher in eval mode; ZeRO-3 shards both.
    weights = [k for k in rank0 if k.startswith("weight.")]
    assert bool(weights) == (backend != "zero3")
    assert not rank0["teacher_training"] and not rank1["teacher_training"]
    if backend == "zero3":
        for state in (rank0, rank1):
            assert float(state["teacher_local_numel"] / state["teacher_numel"]) == pytest.approx(0.5, abs=0.01)
    else:
        start = load_file(str(job.model / "model.safetensors"))
        assert all(torch.equal(rank0[f"teacher.{k}"], start[k]) for k in start)  # never trained

    # One process over the same global batches: same loss curve, same masks, same scales and zero points.
    ref_losses, ref_out = reference
    assert len(ref_losses) == STEPS_PER_EPOCH * EPOCHS
    assert losses(proc.stdout) == pytest.approx(ref_losses, abs=2e-4)  # printed to 4 digits
    assert max(ref_losses) - min(ref_losses) > 2e-3  # batches differ by far more than the tolerance
    ref_model = load_file(str(ref_out / "model.safetensors"))
    assert all(torch.equal(ref_model[n] == 0, ~m) for n, m in masks.items())
    ref_q, q = load_file(str(ref_out / "quantization.safetensors")), load_file(str(out / "quantization.safetensors"))
    assert q.keys() == ref_q.keys()
    for key, value in ref_q.items():
        if key.endswith(("scale", "zero_point")):
            assert torch.equal(rank0[f"qparams.{key}"], q[key]), key  # what rank 0 saved is what every rank holds
        if key.endswith(("scale", "min_val", "max_val")):
            torch.testing.assert_close(q[key], value, rtol=1e-5, atol=1e-7, msg=key)
        elif key.endswith("zero_point"):
            assert torch.equal(q[key], value), key

    # The saved model keeps its sparsity, and so do DeepSpeed's fp32 master weights in the checkpoint.
    model = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(model[n][~m], torch.zeros_like(model[n][~m])) for n, m in masks.items())
    if backend != "ddp":
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        master = get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoint-8" / "training_state"),
                                                          tag="pytorch_model")
        assert sum(int((master[n][~m] != 0).sum()) for n, m in masks.items()) == 0


def test_zero3_resume_continues_exactly(job):
    """A ZeRO-3 run resumed from its epoch-1 checkpoint ends bitwise where the uninterrupted one did."""
    full, full_out = job.launch("zero3", "zero3", "--save_strategy", "epoch")
    ok(full)
    proc, out = job.launch("zero3-resumed", "zero3", "--save_strategy", "no", "--resume_from_checkpoint",
                           str(full_out / "checkpoint-4"))
    assert "resumed from" in ok(proc)
    assert losses(proc.stdout) == losses(full.stdout)[STEPS_PER_EPOCH:]
    for a, b in zip(rank_states(full_out), rank_states(out)):
        assert [k for k in a if not torch.equal(a[k], b[k])] == []
    full_model, model = load_file(str(full_out / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert all(torch.equal(full_model[k], model[k]) for k in full_model)


def test_check_fails_without_rank_sync(job):
    """--debug_disable_rank_sync leaves each rank's observers to its own batches: the check stops the job."""
    proc, _ = job.launch("nosync", "ddp", "--save_strategy", "no", "--debug_disable_rank_sync")
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "rank consistency: OK" not in log
    found = re.search(r"rank consistency: FAILED: (\S+) differs between rank 0 and rank 1", log)
    assert found, log[-3000:]
    assert found[1].startswith("QuantizationModifier[") and found[1].endswith(("min_val", "max_val")), found[1]


def test_zero3_local_slices_cover_the_mask(monkeypatch):
    """ZeRO-3 partitions: equal slices in rank order, the last padded; the slices rebuild the mask."""
    keep = torch.rand(7, 5) > 0.5
    partition = torch.empty(12)  # ceil(35 / 3) = 12 elements per rank
    slices = []
    for r in range(3):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        slices.append(distributed._zero3_local(keep, partition))
    assert all(s.shape == (12,) for s in slices)
    assert torch.equal(torch.cat(slices)[:35], keep.reshape(-1))
    assert bool(torch.cat(slices)[35:].all())


def test_set_parameter_writes_this_ranks_zero3_slice_and_keeps_padding(monkeypatch):
    """A ZeRO-3 parameter outside a gather (size 0, its slice in ``ds_tensor``): each rank writes its
    slice of the whole value; the last rank's padding keeps what it held."""
    value = torch.arange(35.0).reshape(7, 5)
    for r in range(3):
        param = torch.nn.Parameter(torch.empty(0))
        param.ds_tensor = torch.full((12,), -1.0)  # ceil(35 / 3) = 12 elements per rank
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        distributed.set_parameter_(param, value)
        expected = value.reshape(-1)[12 * r:12 * (r + 1)]
        assert torch.equal(param.ds_tensor[:len(expected)], expected)
        assert bool((param.ds_tensor[len(expected):] == -1).all())
    whole = torch.nn.Parameter(torch.zeros(7, 5))
    distributed.set_parameter_(whole, value)
    assert torch.equal(whole.detach(), value)


def test_mask_parameter_plain_and_single_process_collectives():
    param = torch.nn.Parameter(torch.randn(4, 6))
    keep = torch.rand(4, 6) > 0.5
    distributed.mask_parameter_(param, keep)
    assert torch.equal(param.detach() == 0, ~keep) and param.requires_grad
    t = torch.arange(3.0)
    distributed.broadcast_([t], src=0)
    assert torch.equal(t, torch.arange(3.0))
    assert distributed.any_rank(True) and not distributed.any_rank(False)


def test_two_ranks_predict_in_dataset_order(job):
    """--do_predict on 2 ranks: each predicts its share, rank 0 writes every test row once, in the file's order,
    as one process does (13 rows in batches of 4: the last batch is short, Accelerate pads and drops the pad)."""
    from distsparse.train import main as train

    words = "good great fine bad awful poor movie film plot actor scene story".split()
    (job.root / "scores.csv").write_text("sentence,label\n" + "".join(
        f"{' '.join(words[(i * 5 + j * 3) % len(words)] for j in range(2 + i % 7))},{i / 13:.3f}\n" for i in range(13)))
    (job.root / "dense.yaml").write_text(TWO_EPOCHS_LINEAR_LR)
    model = tiny_bert(1, seed=3)  # a regression head whose weights are scaled so the rows' scores differ visibly
    with torch.no_grad():
        model.classifier.weight.mul_(1000.0)
    model.config.problem_type = "regression"
    model.save_pretrained(job.root / "regression")
    shutil.copy(job.model / "tokenizer.json", job.root / "regression")
    shutil.copy(job.model / "tokenizer_config.json", job.root / "regression")
    extra = ["--do_predict", "--train_file", str(job.root / "scores.csv"), "--test_file", str(job.root / "scores.csv"),
             "--model_name_or_path", str(job.root / "regression"), "--recipe", str(job.root / "dense.yaml"),
             "--teacher", "disable", "--per_device_eval_batch_size", "4"]
    proc, out = job.launch("predict", "ddp", *extra)
    ok(proc)
    with contextlib.redirect_stdout(io.StringIO()):
        assert train(job.args(job.root / "predict-single", BATCH, *extra)) == 0
    single = (job.root / "predict-single" / "predict_results_text-classification.txt").read_text().splitlines()
    assert (out / "predict_results_text-classification.txt").read_text().splitlines() == single
    assert single[0] == "index\tprediction" and [line.split("\t")[0] for line in single[1:]] == [str(i) for i in range(13)]
    assert len({line.split("\t")[1] for line in single[1:]}) >= 10  # the rows' scores differ: the order is visible
