"""Loading multiple-choice benchmark files into one item shape.

Local JSONL in the MedQA-USMLE shape (`question`, `options` {letter: text}, `answer_idx`), as in the MedQA and
MedMCQA files of the medagents benchmark and medreason eval sets.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from medtune.errors import MedtuneError


@dataclass(frozen=True)
class Item:
    id: str
    question: str
    options: dict[str, str]
    answer: str  # the correct letter


def load_multiple_choice(path: Path) -> list[Item]:
    items = []
    with open(path, encoding="utf-8-sig") as fh:
        for lineno, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise MedtuneError(f"{where}: malformed JSON ({exc.msg})") from None
            question, options, answer = obj.get("question"), obj.get("options"), obj.get("answer_idx")
            if not isinstance(question, str) or not question.strip():
                raise MedtuneError(f"{where}: field 'question' must be a non-empty string")
            if not isinstance(options, dict) or len(options) < 2:
                raise MedtuneError(f"{where}: field 'options' must map letters to option texts")
            if answer not in options:
                raise MedtuneError(f"{where}: field 'answer_idx' {answer!r} is not one of the options {list(options)}")
            items.append(Item(str(obj.get("realidx", obj.get("id", lineno))), question.strip(),
                              {k: str(v) for k, v in options.items()}, answer))
    if not items:
        raise MedtuneError(f"{path}: no items")
    return items
