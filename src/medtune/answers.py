"""Answer extraction, shared by data, chat, pairs and evaluation: the chosen option letter of a free-text answer.

`extract_letter` takes the options as data (evaluation items); `final_answer` reads them off the question's option
lines, as the data report and `medtune chat` see a question. With options, tried in order: an explicit "answer is X"
/ "Final answer: X" (the last one wins), `\\boxed{X}`, a final line that is just an option letter, then the text of
exactly one option in the final line. None when all fail; the share of such answers is reported, never hidden. A
question that lists no options accepts any letter A-J given explicitly or in `\\boxed{}`.
"""

from __future__ import annotations

import re

EXPLICIT = re.compile(r"(?:answer\s+is|final\s+answer\s*(?:is)?)\s*:?\s*\**\s*\(?([A-J])\)?(?![A-Za-z])", re.I)
BOXED = re.compile(r"\\boxed\{\s*\(?([A-J])\)?\s*\}")
STANDALONE = re.compile(r"^\W*(?:option\s+)?\(?([A-J])\)?\W*$", re.I)
OPTION_LINE = re.compile(r"^\s*\(?([A-J])[.):]\s+(\S.*)$", re.M)


def extract_letter(text: str, options: dict[str, str]) -> str | None:
    for pattern in (EXPLICIT, BOXED):
        found = [m.upper() for m in pattern.findall(text) if m.upper() in options]
        if found:
            return found[-1]
    lines = [line for line in text.strip().splitlines() if line.strip()]
    if not lines:
        return None
    last = lines[-1]
    alone = STANDALONE.match(last)
    if alone and alone.group(1).upper() in options:
        return alone.group(1).upper()
    named = [letter for letter, option in options.items() if option.strip() and option.lower() in last.lower()]
    return named[0] if len(named) == 1 else None


def question_options(question: str) -> dict[str, str]:
    """The options a question lists one a line ("A. ...", "(B) ...", "C: ..."), by letter."""
    return {letter.upper(): option for letter, option in OPTION_LINE.findall(question)}


def final_answer(text: str, question: str = "") -> str | None:
    """The option letter a reply to `question` settles on, if any; the question's option lines narrow the search."""
    options = question_options(question)
    if options:
        return extract_letter(text, options)
    for pattern in (EXPLICIT, BOXED):
        found = pattern.findall(text)
        if found:
            return found[-1].upper()
    return None
