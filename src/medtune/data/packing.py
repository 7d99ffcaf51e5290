"""Packing examples into rows of `max_len` tokens so that little compute is spent on padding.

Best-fit decreasing: examples are taken longest first and each goes into the open row with the least room that
still fits it. The result is a list of rows, each a list of example indices. A packed row restarts its position
ids at every example, which is what keeps attention inside each example (transformers builds a block-diagonal
mask from restarting position ids, and flash attention runs variable-length on them).
"""

from __future__ import annotations

import bisect

import numpy as np


def pack(lengths: list[int] | np.ndarray, max_len: int) -> list[list[int]]:
    """Rows of example indices whose lengths sum to at most `max_len` (an example longer than that is alone)."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    rows: list[list[int]] = []
    room: list[tuple[int, int]] = []  # sorted (free tokens, row index)
    for i in order.tolist():
        n = int(lengths[i])
        at = bisect.bisect_left(room, (n, -1))
        if at == len(room):
            rows.append([i])
            if max_len - n > 0:
                bisect.insort(room, (max_len - n, len(rows) - 1))
            continue
        free, row = room.pop(at)
        rows[row].append(i)
        if free - n > 0:
            bisect.insort(room, (free - n, row))
    return rows


def efficiency(lengths: list[int] | np.ndarray, rows: list[list[int]], max_len: int) -> float:
    """Real tokens / token slots."""
    return float(np.sum(lengths)) / (len(rows) * max_len) if rows else 0.0
