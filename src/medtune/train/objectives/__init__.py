"""Training objectives: what a micro-batch is, its loss and metrics, and what normalises the loss.

An objective plugs into the one training engine (train/engine.py) through this interface:

- `load(prepared, split)`: the split's items (SFT: rows of one or several packed examples; preference: pairs);
- `collate(items)`: one micro-batch of tensors, built on the CPU; `device_keys` name those the loss reads;
- `counts(items)`: (real tokens, units), where units normalise the loss (SFT: labelled tokens; preference: pairs)
  and are summed over the whole optimizer step, every process and micro-batch, before the loss is divided;
- `loss(loss_model, batch)`: (loss summed over the batch's units, metrics summed over its units: a 1-d tensor in
  the order of `metric_names`), without waiting for the device.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from medtune.config import TrainConfig


class Objective(Protocol):
    name: str
    metric_names: tuple[str, ...]
    device_keys: tuple[str, ...]

    def load(self, prepared: Any, split: str) -> list[Any]: ...

    def collate(self, items: list[Any]) -> dict[str, torch.Tensor]: ...

    def counts(self, items: list[Any]) -> tuple[int, int]: ...

    def loss(self, loss_model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        ...


def build(tc: TrainConfig, pad_id: int, max_len: int, packed: bool) -> Objective:
    """The objective of `train.objective`; packed rows (and every row of a compiled model) get one fixed width."""
    if tc.objective == "sft":
        from medtune.train.objectives.sft import SFT

        return SFT(pad_id, max_len if packed else None)
    from medtune.train.objectives.preference import Preference

    # varlen / flex attention: all pairs of a micro-batch in one row, else one row per pair (chosen then rejected)
    return Preference(tc.objective, tc.preference, pad_id, flat=tc.attention in ("varlen", "flex_attention"))
