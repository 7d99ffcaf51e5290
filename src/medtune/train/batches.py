"""The seeded global order of micro-batches: a pure function of seed and epoch, so a resumed run continues it, and
each process of a launch takes its share of every optimizer step."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch


def micro_batches(items: list[Any], batch_size: int, seed: int, skip: int = 0) -> Iterator[tuple[int, list[Any]]]:
    """(epoch, items) of every micro-batch after the first `skip`, epoch after epoch, reshuffled per epoch."""
    epoch, k = 0, 0
    while True:
        order = torch.randperm(len(items), generator=torch.Generator().manual_seed(seed + epoch))
        for i in range(0, len(order), batch_size):
            if k >= skip:
                yield epoch, [items[j] for j in order[i : i + batch_size].tolist()]
            k += 1
        epoch += 1


@dataclass
class Window:
    """One optimizer step's work: its epoch, its tokens and loss units over all processes, and this process's
    micro-batches, collated (CPU work)."""

    epoch: int
    units: int
    tokens: int
    batches: list[dict[str, torch.Tensor]]


def windows(objective: Any, items: list[Any], batch_size: int, seed: int, window: int, rank: int, world: int,
            start_step: int = 0) -> Iterator[Window]:
    batches = micro_batches(items, batch_size, seed, skip=start_step * window)
    while True:
        group = [next(batches) for _ in range(window)]
        tokens, units = map(sum, zip(*(objective.counts(micro) for _, micro in group)))
        yield Window(group[-1][0], units, tokens, [objective.collate(micro) for _, micro in group[rank::world]])
