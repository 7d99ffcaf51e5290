"""A stratified sample of benchmark items (`eval.limit`); the loaders live in `medtune.formats.benchmarks`."""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from collections.abc import Sequence
from typing import Any

from medtune.errors import MedtuneError
from medtune.formats.choice import Item


def _apportion(sizes: dict[Any, int], limit: int) -> dict[Any, int]:
    """Largest-remainder shares of `limit` in proportion to `sizes` (ties go to the earlier key in sorted order)."""
    total = sum(sizes.values())
    shares = {key: limit * size // total for key, size in sizes.items()}
    by_remainder = sorted(sorted(sizes), key=lambda key: -(limit * sizes[key] % total))
    for key in by_remainder[: limit - sum(shares.values())]:
        shares[key] += 1
    return shares


def stratified_sample(items: Sequence[Item], limit: int, seed: int) -> list[Item]:
    """`limit` items drawn with the same proportions of gold letters, and of subjects where items have them.

    Each letter's count is its proportional share rounded by largest remainder, so it is within 1 of exact.
    Within that, each (letter, subject) cell gets the floor of its share and the leftover units go to the cells
    with the largest remainders whose subject is still below its own rounded share. That rounding is greedy, so a
    subject's count is usually but not always within 1 of exact (in random trials about 1 in 100 was off by 1-2).
    Items within a cell are drawn with `random.Random(seed)`, and the result keeps the original order.
    """
    if limit < 0:
        raise MedtuneError(f"sample limit must be >= 0, not {limit}")
    if limit >= len(items):
        return list(items)
    cells: dict[tuple[str, str], list[int]] = defaultdict(list)
    for index, item in enumerate(items):
        cells[(item.answer, item.subject)].append(index)
    letter_goal = _apportion(Counter(item.answer for item in items), limit)
    subject_goal = _apportion(Counter(item.subject for item in items), limit)
    share = {cell: divmod(limit * len(members), len(items)) for cell, members in cells.items()}  # (floor, remainder)
    take = {cell: floor for cell, (floor, _) in share.items()}
    letter_got, subject_got = Counter(), Counter()
    for (letter, subject), n in take.items():
        letter_got[letter] += n
        subject_got[subject] += n
    # a cell with a non-zero remainder may take one more item; each letter's goal is always reachable this way
    candidates = sorted((cell for cell in sorted(cells) if share[cell][1]), key=lambda cell: -share[cell][1])
    for respect_subject in (True, False):
        for cell in candidates:
            letter, subject = cell
            if take[cell] > share[cell][0] or letter_got[letter] >= letter_goal[letter]:
                continue  # already rounded up, or its letter is full
            if respect_subject and subject_got[subject] >= subject_goal[subject]:
                continue
            take[cell] += 1
            letter_got[letter] += 1
            subject_got[subject] += 1
    rng = random.Random(seed)
    chosen = [index for cell in sorted(cells) for index in rng.sample(cells[cell], take[cell])]
    return [items[index] for index in sorted(chosen)]
