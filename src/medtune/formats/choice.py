"""Multiple-choice records: one reader per format, shared by training and evaluation, and their ReasonMed rendering.

Formats (`detect_format` tells them by their keys):
- `multiple_choice`: MedQA-USMLE (`question`, `options` {letter: text}, `answer_idx`), the shape of the medagents
  and MedReason evaluation files and of AfriMed-QA; an explanation, when the record has one, is read from
  `explanation`, `exp`, `reason` (AfriMed-QA) or `reasoning`. The id is `realidx`, `id` or the file's key.
- `medmcqa`: MedMCQA rows (`question`, `opa`..`opd`, `cop`, `exp`, `subject_name`). `cop` is 0-3 on the hub
  (openlifescienceai/medmcqa) and 1-4 in the original release's JSON; a file says which by holding a 0 or a 4
  (`cop_base_of`).
- `pubmedqa`: PubMedQA PQA-L records (`QUESTION`, `CONTEXTS`, `final_decision`, `LONG_ANSWER`), keyed by PMID in
  `ori_pqal.json`; the options are yes/no/maybe as A/B/C, the abstract is the context, `LONG_ANSWER` the explanation.

A record that does not fit raises `BadItem`: evaluation turns it into a MedtuneError with the record's location,
training into a rejection counted by its `reason`.

As training data an item becomes a ReasonMed record (`reasonmed_record`): the instruction is the prompt evaluation
asks with (the ReasonMed preamble, the question and its lettered options), the input is the context, and the output
is the explanation, when there is one, followed by an explicit final line "The answer is X." that
`medtune.answers.extract_letter` reads back.
"""

from __future__ import annotations

import dataclasses
import string
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

LETTERS = string.ascii_uppercase
PUBMEDQA_OPTIONS = {"A": "yes", "B": "no", "C": "maybe"}
INSTRUCTION = "Please answer the following multiple-choice question:\n"
FINAL_ANSWER = "The answer is {letter}."
EXPLANATION_KEYS = ("explanation", "exp", "reason", "reasoning")
MEDMCQA_OPTION_KEYS = ("opa", "opb", "opc", "opd")
FORMATS = ("multiple_choice", "medmcqa", "pubmedqa")


@dataclass(frozen=True)
class Item:
    id: str
    question: str
    options: dict[str, str]
    answer: str  # the correct letter
    context: str = ""  # passage the question is about (PubMedQA abstract); empty for exam questions
    subject: str = ""  # benchmark subject (MMLU subject, MedMCQA subject_name) where the source records one
    explanation: str = ""  # why the answer is right, where the source has one (MedMCQA exp, PubMedQA LONG_ANSWER)


class BadItem(Exception):
    """A record that does not fit its format: `reason` is a short category, `message` the full sentence."""

    def __init__(self, reason: str, message: str | None = None) -> None:
        super().__init__(message or reason)
        self.reason = reason
        self.message = message or reason


def detect_format(obj: dict[str, Any]) -> str | None:
    """The multiple-choice format a record follows, judged by its keys, or None."""
    if "options" in obj and "question" in obj:
        return "multiple_choice"
    if "opa" in obj and "question" in obj:
        return "medmcqa"
    if "QUESTION" in obj and ("final_decision" in obj or "CONTEXTS" in obj):
        return "pubmedqa"
    return None


def _question(obj: dict[str, Any], key: str = "question") -> str:
    question = obj.get(key)
    if not isinstance(question, str) or not question.strip():
        raise BadItem(f"field {key!r} must be a non-empty string")
    return question.strip()


def _explanation(obj: dict[str, Any], keys: Iterable[str]) -> str:
    for key in keys:
        value = obj.get(key)
        if isinstance(value, str) and value.strip():
            return value.strip()
    return ""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def multiple_choice_item(obj: dict[str, Any], key: str) -> Item:
    """A MedQA-shaped record (also AfriMed-QA); `key` is the id when the record has no `realidx` or `id`."""
    question, options, answer = _question(obj), obj.get("options"), obj.get("answer_idx")
    if not isinstance(options, dict) or len(options) < 2:
        raise BadItem("field 'options' must map letters to option texts")
    if not isinstance(answer, str) or answer not in options:
        raise BadItem("field 'answer_idx' is not one of the options",
                      f"field 'answer_idx' {answer!r} is not one of the options {list(options)}")
    return Item(str(obj.get("realidx", obj.get("id", key))), question, {k: str(v) for k, v in options.items()},
                answer, explanation=_explanation(obj, EXPLANATION_KEYS))


def medmcqa_item(obj: dict[str, Any], key: str) -> tuple[Item, int]:
    """A MedMCQA row without its answer letter (`answer` is ""), and its raw `cop` (see `with_cop`)."""
    question = _question(obj)
    options = {}
    for letter, field in zip("ABCD", MEDMCQA_OPTION_KEYS):
        if not isinstance(obj.get(field), str):
            raise BadItem(f"field {field!r} must be the option text (a string)")
        options[letter] = obj[field]
    cop = obj.get("cop")
    if not _is_int(cop) or not 0 <= cop <= 4:
        # the hub's test split stores cop -1: its answers were never released
        raise BadItem("field 'cop' is not an option index",
                      f"field 'cop' {cop!r} is not an option index 0-3 or 1-4 (MedMCQA's test split has no answers; "
                      "evaluate on the validation split)")
    subject = obj.get("subject_name")
    item = Item(str(obj.get("id", key)), question, options, "", subject=subject if isinstance(subject, str) else "",
                explanation=_explanation(obj, ("exp",)))
    return item, cop


def cop_base_of(cops: Iterable[int]) -> int | None:
    """0 when some `cop` is 0, 1 when some is 4, None when all are 1-3 (the base can't be told yet)."""
    seen = set(cops)
    if 0 in seen and 4 in seen:
        raise BadItem("field 'cop' has both 0 and 4", "field 'cop' has both 0 and 4, so it is neither 0-3 nor 1-4")
    return 0 if 0 in seen else 1 if 4 in seen else None


def with_cop(item: Item, cop: int, cop_base: int) -> Item:
    """The MedMCQA item with its answer letter, `cop` read as a `cop_base`-based index."""
    if not 0 <= cop - cop_base <= 3:
        raise BadItem("field 'cop' is out of range", f"field 'cop' {cop} is out of range for {cop_base}-based indices")
    return dataclasses.replace(item, answer="ABCD"[cop - cop_base])


def pubmedqa_item(obj: dict[str, Any], key: str) -> Item:
    """A PubMedQA PQA-L record; `key` (the PMID in `ori_pqal.json`) is its id."""
    question, contexts = _question(obj, "QUESTION"), obj.get("CONTEXTS")
    if not isinstance(contexts, list) or not contexts or not all(isinstance(c, str) for c in contexts):
        raise BadItem("field 'CONTEXTS' must be a non-empty list of abstract sections")
    decision = obj.get("final_decision")
    letter = {label: letter for letter, label in PUBMEDQA_OPTIONS.items()}.get(decision)
    if letter is None:
        raise BadItem("field 'final_decision' is not yes, no or maybe",
                      f"field 'final_decision' {decision!r} is not one of yes/no/maybe")
    return Item(str(key), question, dict(PUBMEDQA_OPTIONS), letter,
                context="\n\n".join(c.strip() for c in contexts), explanation=_explanation(obj, ("LONG_ANSWER",)))


def question_prompt(item: Item) -> str:
    """The ReasonMed instruction: preamble, question and lettered options; a context follows after a blank line."""
    options = "\n".join(f"{letter}. {text}" for letter, text in item.options.items())
    prompt = f"{INSTRUCTION}{item.question}\n{options}"
    return f"{prompt}\n\n{item.context}" if item.context else prompt


def reasonmed_record(item: Item) -> dict[str, str]:
    """The item as a ReasonMed training record: the explanation (if any), then an explicit final answer line."""
    final = FINAL_ANSWER.format(letter=item.answer)
    options = "\n".join(f"{letter}. {text}" for letter, text in item.options.items())
    return {"instruction": f"{INSTRUCTION}{item.question}\n{options}", "input": item.context,
            "output": f"{item.explanation}\n\n{final}" if item.explanation else final}
