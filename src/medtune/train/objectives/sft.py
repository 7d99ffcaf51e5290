"""Supervised fine-tuning: cross-entropy on the reply tokens, normalised by the labelled tokens of the step."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from medtune.prepared import load_packs, load_split
from medtune.train.attention import cu_seq_lens
from medtune.train.loss import IGNORE, label_positions

Example = tuple[np.ndarray, np.ndarray]  # (token ids, loss mask)
LOSS_INPUTS = ("input_ids", "position_ids", "label_index", "targets", "cu_seq_lens")


def collate(rows: list[list[Example]], pad_id: int, width: int | None = None) -> dict[str, torch.Tensor]:
    """One row per list of examples (one example, or several packed), padded to the longest row.

    Position ids restart at every example and at the padding, and no attention mask is passed: transformers then
    keeps attention inside each example (block-diagonal causal mask; variable-length with flash attention).
    Labels are -100 on prompt and padding, so only reply tokens and their end-of-turn token carry loss.
    `width`: pad to at least this many columns (packed rows: the packing length, so every batch has one shape and
    a compiled model compiles once).
    """
    width = max(width or 0, max(sum(len(ids) for ids, _ in row) for row in rows))
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        at = 0
        for ids, mask in row:
            n = len(ids)
            t = torch.from_numpy(np.asarray(ids, dtype=np.int64))
            input_ids[i, at : at + n] = t
            labels[i, at : at + n] = torch.where(torch.from_numpy(np.asarray(mask, dtype=bool)), t, IGNORE)
            positions[i, at : at + n] = torch.arange(n)
            at += n
        positions[i, at:] = torch.arange(width - at)
    # Causal LM: position t predicts token t+1, so the label of a reply token sits one step to the left.
    labels = torch.cat([labels[:, 1:], torch.full((len(rows), 1), IGNORE)], dim=1)
    label_index, targets = label_positions(labels)
    return {"input_ids": input_ids, "position_ids": positions, "labels": labels, "label_index": label_index,
            "targets": targets, "cu_seq_lens": cu_seq_lens(positions)}


def counts(rows: list[list[Example]]) -> tuple[int, int]:
    """(real tokens, labelled tokens) of a micro-batch, without collating it: what `collate` would produce."""
    real = labelled = 0
    for row in rows:
        real += sum(len(ids) for ids, _ in row)
        # the label of position t is token t+1: a row's first token is never a target
        labelled += sum(int(np.count_nonzero(mask)) for _, mask in row) - int(bool(row[0][1][0]))
    return real, labelled


def load_rows(prepared: Path, split: str) -> list[list[Example]]:
    """The rows of a prepared split (packed rows when the data stage packed it, else one example a row)."""
    examples = load_split(prepared, split)
    packs = load_packs(prepared, split)
    return [[examples[i] for i in p] for p in packs] if packs else [[e] for e in examples]


class SFT:
    name = "sft"
    metric_names: tuple[str, ...] = ()
    device_keys = LOSS_INPUTS

    def __init__(self, pad_id: int, width: int | None) -> None:
        self.pad_id, self.width = pad_id, width

    def load(self, prepared: Path, split: str) -> list[list[Example]]:
        return load_rows(prepared, split)

    def collate(self, items: list[list[Example]]) -> dict[str, torch.Tensor]:
        return collate(items, self.pad_id, self.width)

    def counts(self, items: list[list[Example]]) -> tuple[int, int]:
        return counts(items)

    def loss(self, loss_model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        total = loss_model(*(batch[key] for key in LOSS_INPUTS))
        return total, total.new_zeros(0)
