"""Contamination guard: training questions that also appear in an evaluation set the run uses.

Texts are normalised (lower case, punctuation and runs of whitespace folded) and compared two ways: exact equality
of the normalised question, and near-duplicates by word n-gram containment (the share of an evaluation question's
8-grams found in one training question; 0.5 or more flags it). Training questions are the first user turn of each
conversation with the options (lines starting "A." ... "J.") and the ReasonMed preamble removed, so the comparison
is stem to stem.
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

NGRAM = 8
THRESHOLD = 0.5
PREAMBLE = re.compile(r"^please answer the following multiple-choice question:?\s*", re.I)
OPTION_LINE = re.compile(r"^\s*\(?[A-J][.)]\s", re.M)


def normalise(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def question_stem(user_turn: str) -> str:
    text = PREAMBLE.sub("", user_turn.strip())
    first_option = OPTION_LINE.search(text)
    return text[: first_option.start()] if first_option else text


def ngrams(words: list[str], n: int = NGRAM) -> set[tuple[str, ...]]:
    if len(words) < n:
        return {tuple(words)} if words else set()
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


@dataclass(frozen=True)
class Match:
    benchmark: str
    item_id: str
    kind: str  # "exact" or "near"
    score: float


class ContaminationGuard:
    """Index of evaluation questions; `check(text)` returns the evaluation items a training question matches."""

    def __init__(self, questions: dict[str, list[tuple[str, str]]]) -> None:
        """`questions`: benchmark name -> [(item id, question text)]."""
        self.exact: dict[str, list[tuple[str, str]]] = defaultdict(list)
        self.index: dict[tuple[str, ...], list[int]] = defaultdict(list)
        self.items: list[tuple[str, str, int]] = []  # (benchmark, id, number of n-grams)
        for bench, items in questions.items():
            for item_id, text in items:
                norm = normalise(text)
                if not norm:
                    continue
                self.exact[norm].append((bench, item_id))
                grams = ngrams(norm.split())
                for gram in grams:
                    self.index[gram].append(len(self.items))
                self.items.append((bench, item_id, len(grams)))

    def check(self, question: str) -> list[Match]:
        norm = normalise(question)
        found = {(b, i): Match(b, i, "exact", 1.0) for b, i in self.exact.get(norm, [])}
        hits: dict[int, int] = defaultdict(int)
        for gram in ngrams(norm.split()):
            for k in self.index.get(gram, ()):
                hits[k] += 1
        for k, count in hits.items():
            bench, item_id, total = self.items[k]
            score = count / total
            if score >= THRESHOLD and (bench, item_id) not in found:
                found[(bench, item_id)] = Match(bench, item_id, "near", round(score, 3))
        return list(found.values())


def guard_for(benchmarks: list[Any]) -> ContaminationGuard | None:
    """The guard over a run's evaluation sets (config `eval.benchmarks`: name, kind, path); None without any."""
    if not benchmarks:
        return None
    from medtune.formats.benchmarks import load_benchmark

    return ContaminationGuard({b.name: [(i.id, i.question) for i in load_benchmark(b.kind, b.path)]
                               for b in benchmarks})
