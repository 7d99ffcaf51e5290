"""The prepared folder's format: written by the data stage (data/stage.py), read here by training.

  {split}.ids.npy, {split}.mask.npy, {split}.offsets.npy   flat int32 token ids, uint8 loss mask, int64 offsets
  {split}.packs.npy, {split}.pack_offsets.npy              with data.packing: example indices of each packed row

Preference data uses the same files: example 2k is a pair's chosen conversation, 2k+1 its rejected one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def load_split(prepared: Path, name: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """The examples of a prepared split as (ids, mask) array views."""
    ids = np.load(prepared / f"{name}.ids.npy", mmap_mode="r")
    mask = np.load(prepared / f"{name}.mask.npy", mmap_mode="r")
    offsets = np.load(prepared / f"{name}.offsets.npy")
    return [(ids[a:b], mask[a:b]) for a, b in zip(offsets[:-1], offsets[1:])]


def load_packs(prepared: Path, name: str) -> list[list[int]] | None:
    """The packed rows of a split (lists of example indices), or None when the data was not packed."""
    if not (prepared / f"{name}.packs.npy").is_file():
        return None
    flat = np.load(prepared / f"{name}.packs.npy")
    offsets = np.load(prepared / f"{name}.pack_offsets.npy")
    return [flat[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:])]
