"""The rank-consistency check, on 2 real gloo ranks, catches a mask and a weight that differ on one
rank (the training tests show it catching drifting observers), naming the tensor."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import ROOT, free_port

WORKER = r"""
import sys, torch
from accelerate import Accelerator
from distsparse.distributed import RankMismatch, check_rank_consistency

class GMPruningModifier:  # what the check reads of a modifier: its name and state_dict
    def __init__(self, mask): self.mask = mask
    def state_dict(self): return {"masks": {"bert.encoder.w": self.mask}}

accelerator = Accelerator(cpu=True)
rank, case = accelerator.process_index, sys.argv[1]
torch.manual_seed(0)
model = torch.nn.Linear(4, 4)
mask = torch.rand(4, 4) > 0.5
if rank == 1 and case == "mask":
    mask[2, 3] = ~mask[2, 3]
if rank == 1 and case == "weight":
    with torch.no_grad():
        model.weight[1, 1] += 1e-7
try:
    said = f"OK {check_rank_consistency(model, [GMPruningModifier(mask)], accelerator)}"
except RankMismatch as err:
    said = str(err)
with open(f"{sys.argv[2]}/rank{rank}.txt", "w") as f:  # a file each: the ranks' prints would interleave
    f.write(f"rank {rank}: {said}")
accelerator.end_training()
"""


@pytest.mark.parametrize("case,tensor", [("mask", "GMPruningModifier[0].masks.bert.encoder.w"),
                                         ("weight", "weight.weight"), ("same", None)])
def test_check_names_the_tensor_that_differs(tmp_path, case, tensor):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT), GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_addr", "127.0.0.1", "--master_port", str(port), str(script), case, str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)]
    if tensor is None:
        assert lines == ["rank 0: OK 3", "rank 1: OK 3"]  # the mask, the weight and the bias
    else:
        expected = f"rank consistency: FAILED: {tensor} differs between rank 0 and rank 1"
        assert lines == [f"rank 0: {expected}", f"rank 1: {expected}"]
