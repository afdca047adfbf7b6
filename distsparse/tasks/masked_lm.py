"""Masked-language-model training (upstream pruning), as Hugging Face's run_mlm.py: text in blocks, 15% masked.

Lines of text are tokenized, concatenated and cut into ``--max_seq_length`` blocks. Masking happens
in the collator, but never from a global random state: each block's mask comes from a generator
seeded with (--seed, epoch, block index), so every rank, every resume and every batch size masks a
block the same way. The eval set is masked as at epoch 0, the same at every evaluation.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import datasets
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset
from transformers import AutoModelForMaskedLM

from ..errors import DataError
from .base import TaskData
from .files import existing, load_splits, read_file, read_lines

TEXT_SUFFIXES = (".txt", ".text", ".raw")
INPUTS = ("input_ids", "token_type_ids", "attention_mask")


def read_text(path: str | Path) -> datasets.Dataset:
    """One paragraph a line (empty lines skipped) from a .txt file; csv/json/jsonl with a ``text`` column otherwise."""
    path = existing(path)
    if path.suffix.lower() not in TEXT_SUFFIXES:
        return read_file(path)
    lines = [line for line in read_lines(path) if line.strip()]
    if not lines:
        raise DataError(f"{path}: no text (every line is empty)")
    return datasets.Dataset.from_dict({"text": lines})


def blocks(tokenizer, column: str, block_size: int):
    """Tokenize a batch of lines and regroup the tokens into blocks of ``block_size`` (run_mlm's group_texts).

    The tail shorter than a block is dropped, unless the batch holds less than one block: then it is one block.
    """

    def encode(batch):
        enc = tokenizer([t for t in batch[column] if t and t.strip()], return_special_tokens_mask=True)
        joined = {k: list(chain.from_iterable(v)) for k, v in enc.items()}
        total = len(joined["input_ids"])
        cut = max(total // block_size * block_size, min(total, block_size))
        return {k: [v[i:i + block_size] for i in range(0, cut, block_size)] for k, v in joined.items()}

    return encode


class EpochIndexed(Dataset):
    """A dataset whose rows carry their index and the current epoch, the two things a block's mask depends on."""

    def __init__(self, rows: datasets.Dataset):
        self.rows, self.epoch = rows, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, index):
        return {**self.rows[index], "index": index, "epoch": self.epoch}


@dataclass
class MaskingCollator:
    """BERT's 80/10/10 masking of ``probability`` of the non-special tokens; labels are -100 elsewhere."""
    tokenizer: object
    probability: float = 0.15
    seed: int = 42

    def mask(self, ids: torch.Tensor, special: torch.Tensor, index: int, epoch: int):
        seed = int(np.random.SeedSequence([self.seed, epoch, index]).generate_state(1)[0])
        rng = torch.Generator().manual_seed(seed)
        chosen = (torch.rand(ids.shape, generator=rng) < self.probability) & ~special
        labels = torch.where(chosen, ids, -100)
        draw = torch.rand(ids.shape, generator=rng)
        random_tokens = torch.randint(len(self.tokenizer), ids.shape, generator=rng)
        ids = torch.where(chosen & (draw < 0.8), self.tokenizer.mask_token_id, ids)
        ids = torch.where(chosen & (draw >= 0.8) & (draw < 0.9), random_tokens, ids)
        return ids, labels

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        shape = (len(rows), max(len(r["input_ids"]) for r in rows))
        batch = {k: torch.zeros(shape, dtype=torch.long) for k in INPUTS if k in rows[0]}
        batch["input_ids"].fill_(self.tokenizer.pad_token_id)
        batch["labels"] = torch.full(shape, -100)
        for i, row in enumerate(rows):
            n = len(row["input_ids"])
            ids, labels = self.mask(torch.tensor(row["input_ids"]), torch.tensor(row["special_tokens_mask"]).bool(),
                                    row["index"], row["epoch"])
            batch["input_ids"][i, :n], batch["labels"][i, :n] = ids, labels
            for k in batch.keys() - {"input_ids", "labels"}:
                batch[k][i, :n] = torch.tensor(row[k])
        return batch


@dataclass
class MaskedLMData(TaskData):
    def model_kwargs(self) -> dict:
        return {}  # the head predicts the vocabulary: nothing to size

    def set_epoch(self, epoch: int) -> None:
        """Masks change every epoch: the loop calls this with Accelerate's set_epoch (which skips the dataset)."""
        self.train.set_epoch(epoch)

    @torch.no_grad()
    def evaluate(self, model, loader, accelerator) -> dict[str, float]:
        """Loss, perplexity and accuracy over the masked tokens of every block, summed per block across ranks."""
        model.eval()
        totals = torch.zeros(3, dtype=torch.float64)
        for batch in loader:
            logits = model(**batch).logits.float()
            labels = batch["labels"]
            masked = labels != -100
            losses = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
            per_block = torch.stack([losses.sum(1), ((logits.argmax(-1) == labels) & masked).sum(1).float(),
                                     masked.sum(1).float()], 1)
            totals += accelerator.gather_for_metrics(per_block).double().sum(0).cpu()
        model.train()
        loss = float(totals[0] / totals[2])
        return {"loss": loss, "perplexity": float(np.exp(min(loss, 700.0))), "accuracy": float(totals[1] / totals[2])}


def masked_lm(args, tokenizer) -> MaskedLMData:
    if tokenizer.mask_token_id is None:
        raise DataError(f"--task masked-lm: the tokenizer {type(tokenizer).__name__} has no mask token")
    train, evaluation, train_name, eval_name = load_splits(args, bundled=False, reader=read_text)
    column = (args.input_column_names or "text").strip()
    sets = []
    for ds, where in ((train, train_name), (evaluation, eval_name)):
        if ds is None:
            sets.append(None)
            continue
        if column not in ds.column_names:
            raise DataError(f"{where}: missing column {column!r} (columns: {', '.join(ds.column_names)})")
        grouped = ds.map(blocks(tokenizer, column, args.max_seq_length), batched=True, batch_size=1000,
                         remove_columns=ds.column_names, desc="tokenizing")
        if len(grouped) == 0:
            raise DataError(f"{where}: no text in column {column!r}")
        sets.append(EpochIndexed(grouped))
    return MaskedLMData(train=sets[0], eval=sets[1], label_list=[],
                        collator=MaskingCollator(tokenizer, args.mlm_probability, args.seed),
                        model_class=AutoModelForMaskedLM)
