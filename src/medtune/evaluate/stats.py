"""Statistics for accuracy on benchmark items: Wilson intervals, McNemar's exact test for paired models, and the
answer-distribution measures (answer shares, RStd, macro-F1).

A leaf module (standard library only), so reports and quality studies can import it without loading a model.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

ALPHA = 0.05  # significance level of the paired test in reports


def wilson_interval(correct: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for a proportion."""
    if total == 0:
        return (0.0, 0.0)
    p = correct / total
    denom = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def mcnemar_exact(only_first: int, only_second: int) -> float:
    """Two-sided p-value of McNemar's exact test: the discordant pairs as Binomial(b + c, 1/2).

    `only_first` (b) counts items the first model got right and the second wrong, `only_second` (c) the reverse.
    p = min(1, 2 * P(X <= min(b, c))); with no discordant pair p = 1.
    """
    if only_first < 0 or only_second < 0:
        raise ValueError(f"discordant counts must be >= 0, got {only_first} and {only_second}")
    n = only_first + only_second
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(only_first, only_second) + 1))
    return min(1.0, 2 * tail / 2**n)


def smallest_p(discordant: int) -> float:
    """The smallest p-value McNemar's exact test can give with this many discordant pairs (all on one side)."""
    return mcnemar_exact(discordant, 0)


@dataclass(frozen=True)
class Paired:
    """A model compared with a reference on the items both answered."""

    n: int  # items answered by both
    reference_correct: int
    correct: int
    only_reference: int  # right for the reference only (b)
    only_this: int  # right for this model only (c)
    difference: float  # accuracy of this model minus the reference's, on the shared items
    p_value: float
    significant: bool  # p < ALPHA
    can_be_significant: bool  # False: too few discordant items for any split to reach p < ALPHA

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def paired_comparison(reference: Mapping[str, bool], other: Mapping[str, bool], alpha: float = ALPHA) -> Paired:
    """McNemar's exact test on the items (ids) both mappings of {item id: correct} share."""
    shared = [key for key in reference if key in other]
    b = sum(reference[key] and not other[key] for key in shared)
    c = sum(other[key] and not reference[key] for key in shared)
    ref_correct = sum(bool(reference[key]) for key in shared)
    this_correct = sum(bool(other[key]) for key in shared)
    p = mcnemar_exact(b, c)
    n = len(shared)
    return Paired(n=n, reference_correct=ref_correct, correct=this_correct, only_reference=b, only_this=c,
                  difference=(this_correct - ref_correct) / n if n else 0.0, p_value=p, significant=p < alpha,
                  can_be_significant=smallest_p(b + c) < alpha)


def answer_shares(answers: Sequence[str | None], classes: Sequence[str], none: bool = True) -> dict[str, float]:
    """The share of each class among `answers` (every class listed, in order), plus "none" for no answer."""
    counts = Counter(answers)
    keys = list(dict.fromkeys(classes))
    shares = {key: round(counts[key] / len(answers), 4) if answers else 0.0 for key in keys}
    if none:
        shares["none"] = round(counts[None] / len(answers), 4) if answers else 0.0
    return shares


def rstd(golds: Sequence[str], answers: Sequence[str | None]) -> float:
    """RStd: the population standard deviation of the per-class recall over the classes among `golds`, in points
    (0 when every class is recalled equally often; large when a model favours some answers)."""
    recalls = [sum(a == cls for g, a in zip(golds, answers) if g == cls) / n for cls, n in Counter(golds).items()]
    if not recalls:
        return 0.0
    mean = sum(recalls) / len(recalls)
    return 100 * math.sqrt(sum((r - mean) ** 2 for r in recalls) / len(recalls))


def macro_f1(golds: Sequence[str], answers: Sequence[str | None]) -> float:
    """The mean F1 over the classes found among the keys or the answers (no answer counts as wrong)."""
    classes = sorted(set(golds) | {a for a in answers if a is not None})
    scores = []
    for cls in classes:
        hit = sum(g == cls and a == cls for g, a in zip(golds, answers))
        wrong = sum(a == cls for a in answers) - hit + sum(g == cls for g in golds) - hit
        scores.append(2 * hit / (2 * hit + wrong) if hit + wrong else 0.0)
    return sum(scores) / len(scores) if scores else 0.0
