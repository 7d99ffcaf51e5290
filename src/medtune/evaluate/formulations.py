"""Formulations of one multiple-choice evaluation, and the measures that tell knowledge from a letter habit.

What is asked: each item as it is (shift 0); with `circular`, also under every circular shift of its options (shift
k puts the option at position j + k in position j; the gold letter moves with its text; MMBench's CircularEval);
in mode loglik, the PriDe calibration items (5% of the items, stratified by gold letter, seeded) under every shift.
A shifted copy has the id `<id>#shift<k>`, so the per-item cache and resume work on shifted copies as on items.

What is reported, per formulation (`FORMULATIONS`): accuracy, the share of each answer among the model's answers
(letters, or PubMedQA's labels, plus "none"), the keys' shares, RStd (the standard deviation of the per-class recall,
in points: 0 for a model without preference), and the score of always giving the keys' most common answer. A
circular formulation counts an item right only if it is right under every shift (a constant answer scores 0) and
also gives the mean accuracy over shifts and the consistency (the same option text chosen under every shift).

PriDe (Zheng et al., ICLR 2024): the prior of each letter is estimated on the calibration items, each scored under
all its cyclic permutations (there an option's content averages out of the mean log-probability of a letter), as the
mean over those items of softmax(mean over permutations of log P(letter)); every other item's letter probabilities
are divided by it and the argmax is the debiased answer. The calibration items are not counted in the debiased
accuracy: `loglik-pride` is reported on the remaining 95% of the items (its `n` says so, and its McNemar tests and
constant answer use the same items).

PubMedQA's yes/no/maybe are labels, not options whose order could be shuffled: circular and PriDe do not apply to
it, and its rows carry the macro-F1 over the labels beside the accuracy.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from medtune.evaluate.sample import stratified_sample
from medtune.evaluate.stats import answer_shares, macro_f1, paired_comparison, rstd, wilson_interval
from medtune.formats.choice import Item

FORMULATIONS = ("generate", "generate-circular", "loglik", "loglik-circular", "loglik-pride", "cloze", "cloze-norm")
PRIMARY = {"generate": "generate", "loglik": "loglik", "cloze": "cloze-norm"}  # the row summary["models"] shows
LABEL_KINDS = ("pubmedqa",)  # benchmarks whose options are labels: nothing to shift
NOT_APPLICABLE = "n/a: labels"
SHIFT_MARK = "#shift"
CALIBRATION_FRACTION = 0.05  # PriDe's calibration subset, as in the paper's default


def shifted(item: Item, shift: int) -> Item:
    """The item with its options shifted circularly by `shift` (the gold letter follows its text)."""
    letters, texts = list(item.options), list(item.options.values())
    n = len(letters)
    options = {letters[j]: texts[(j + shift) % n] for j in range(n)}
    gold = letters[(letters.index(item.answer) - shift) % n]
    return dataclasses.replace(item, id=item.id if shift % n == 0 else f"{item.id}{SHIFT_MARK}{shift % n}",
                               options=options, answer=gold)


def shift_of(record_id: str) -> tuple[str, int]:
    """(the item's id, the shift) of a record's id."""
    base, mark, shift = record_id.rpartition(SHIFT_MARK)
    return (base, int(shift)) if mark and shift.isdigit() else (record_id, 0)


def calibration_ids(items: Sequence[Item], seed: int) -> list[str]:
    """PriDe's calibration subset: 5% of the items (at least one), stratified by gold letter, seeded."""
    size = max(1, round(CALIBRATION_FRACTION * len(items)))
    return [item.id for item in stratified_sample(items, size, seed)]


def applies(kind: str) -> bool:
    """Whether circular shifts and PriDe apply to a benchmark kind (not to labels such as yes/no/maybe)."""
    return kind not in LABEL_KINDS


def items_to_ask(items: Sequence[Item], kind: str, mode: str, circular: bool, seed: int) -> list[Item]:
    """Every question asked for one benchmark: the items, then shifted copies where the formulations need them."""
    if not applies(kind) or mode == "cloze":
        return list(items)
    shifting = set(i.id for i in items) if circular else set(calibration_ids(items, seed)) if mode == "loglik" \
        else set()
    return list(items) + [shifted(item, k) for item in items if item.id in shifting
                          for k in range(1, len(item.options))]


@dataclass
class View:
    """One formulation's answers: per counted item, (gold, answer, chosen option text) under each shift asked."""

    formulation: str
    answers: dict[str, list[tuple[str, str | None, str | None]]]
    extra: dict[str, Any] = field(default_factory=dict)


def _by_item(items: Sequence[Item], records: dict[str, dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """{item id: its records in shift order} (records of shifted copies that were asked)."""
    grouped: dict[str, list[dict[str, Any]]] = {item.id: [] for item in items}
    for record_id, record in records.items():
        base, _ = shift_of(record_id)
        if base in grouped:
            grouped[base].append(record)
    for group in grouped.values():
        group.sort(key=lambda r: shift_of(r["id"])[1])
    return grouped


def _answer(record: dict[str, Any], key: str = "extracted") -> tuple[str, str | None, str | None]:
    letter = record.get(key)
    return record["gold"], letter, record["options"].get(letter) if letter else None


def views(items: Sequence[Item], kind: str, mode: str, records: dict[str, dict[str, Any]],
          calibration: Sequence[str] = ()) -> list[View]:
    """The formulations one run of `mode` gives for a benchmark, from its records (those of `items_to_ask`)."""
    first = {item.id: records[item.id] for item in items}
    if mode == "cloze":
        return [View("cloze", {i: [_answer(r)] for i, r in first.items()}),
                View("cloze-norm", {i: [_answer(r, "extracted_norm")] for i, r in first.items()})]
    out = [View(mode, {i: [_answer(r)] for i, r in first.items()})]
    grouped = _by_item(items, records) if applies(kind) else {}
    if mode == "loglik" and grouped and calibration:
        out.append(pride_view(items, grouped, calibration))
    if grouped and all(len(group) == len(item.options) for item, group in zip(items, grouped.values())) \
            and any(len(group) > 1 for group in grouped.values()):
        out.append(View(f"{mode}-circular", {i: [_answer(r) for r in group] for i, group in grouped.items()}))
    return out


def _log_softmax(scores: dict[str, float]) -> dict[str, float]:
    top = max(scores.values())
    total = top + math.log(sum(math.exp(v - top) for v in scores.values()))
    return {k: v - total for k, v in scores.items()}


def letter_prior(groups: Sequence[Sequence[dict[str, float]]]) -> dict[str, float]:
    """PriDe's prior over letters: per calibration item, softmax over letters of the mean log-probability each
    letter gets across the item's cyclic permutations; then the mean of those distributions over the items."""
    sums: Counter[str] = Counter()
    counts: Counter[str] = Counter()
    for group in groups:
        logps = [_log_softmax(scores) for scores in group]
        mean = {letter: sum(lp[letter] for lp in logps) / len(logps) for letter in logps[0]}
        for letter, p in _softmax(mean).items():
            sums[letter] += p
            counts[letter] += 1
    return {letter: sums[letter] / counts[letter] for letter in sorted(sums)}


def _softmax(scores: dict[str, float]) -> dict[str, float]:
    return {k: math.exp(v) for k, v in _log_softmax(scores).items()}


def debiased(scores: dict[str, float], prior: dict[str, float]) -> str:
    """The letter with the highest observed probability divided by its prior (a letter without one: uniform)."""
    logp = _log_softmax(scores)
    uniform = 1 / len(scores)
    adjusted = {letter: logp[letter] - math.log(prior.get(letter, uniform)) for letter in scores}
    return max(adjusted, key=adjusted.__getitem__)


def pride_view(items: Sequence[Item], grouped: dict[str, list[dict[str, Any]]], calibration: Sequence[str]) -> View:
    """`loglik-pride`: the letter prior from the calibration items' permutations, removed from every other item."""
    chosen = set(calibration)
    prior = letter_prior([[r["logprobs"] for r in grouped[i]] for i in calibration if len(grouped[i]) > 1])
    answers = {}
    for item in items:
        if item.id in chosen:
            continue
        record = grouped[item.id][0]
        letter = debiased(record["logprobs"], prior)
        answers[item.id] = [(record["gold"], letter, record["options"][letter])]
    return View("loglik-pride", answers, {"calibration_ids": list(calibration), "n_calibration": len(chosen),
                                          "prior": {k: round(v, 4) for k, v in prior.items()}})


def constant_answer(items: Sequence[Item]) -> str:
    """The keys' most common letter (a tie: the first in letter order)."""
    counts = Counter(item.answer for item in items)
    return min(counts, key=lambda letter: (-counts[letter], letter))


def correct_map(view: View, constant: str | None = None) -> dict[str, bool]:
    """{item id: right under every shift asked}, for the model, or for always answering `constant`."""
    return {i: all(gold == (constant or answer) for gold, answer, _ in pairs) for i, pairs in view.answers.items()}


def measure(view: View, names: dict[str, str], constant: str, labels: bool) -> dict[str, Any]:
    """A summary row for one view. `names`: {letter: what shares are keyed by} (letters, or PubMedQA's labels)."""
    flat = [pair for pairs in view.answers.values() for pair in pairs]
    golds = [names.get(gold, gold) for gold, _, _ in flat]
    answers = [names.get(a, a) if a else None for _, a, _ in flat]
    right, constant_right = correct_map(view), correct_map(view, constant)
    n, correct = len(right), sum(right.values())
    low, high = wilson_interval(correct, n)
    row: dict[str, Any] = {
        "formulation": view.formulation, "n": n, "correct": correct, "accuracy": correct / n if n else 0.0,
        "ci95": [round(low, 4), round(high, 4)],
        "answer_shares": answer_shares(answers, list(names.values())),
        "gold_shares": answer_shares(golds, list(names.values()), none=False),
        "rstd": round(rstd(golds, answers), 2),
        "constant_accuracy": sum(constant_right.values()) / n if n else 0.0,
        "mcnemar_p_vs_constant": paired_comparison(constant_right, right).p_value,
        "macro_f1": round(macro_f1(golds, answers), 4) if labels else None,
        **view.extra,
    }
    if view.formulation.endswith("-circular"):
        row["mean_accuracy"] = sum(g == a for g, a, _ in flat) / len(flat) if flat else 0.0
        row["consistency"] = sum(len({t for _, _, t in pairs}) == 1 and pairs[0][2] is not None
                                 for pairs in view.answers.values()) / n if n else 0.0
    return row
