"""Answer extraction, shared by data, chat, pairs and evaluation: the chosen option letter of a free-text answer.

Tried in order: an explicit "answer is X" / "Final answer: X" (the last one wins), `\\boxed{X}`, a final line that
is just an option letter, then the text of exactly one option in the final line. None when all fail; the share of
such answers is reported, never hidden.
"""

from __future__ import annotations

import re

EXPLICIT = re.compile(r"(?:answer\s+is|final\s+answer\s*(?:is)?)\s*:?\s*\**\s*\(?([A-J])\)?(?![A-Za-z])", re.I)
BOXED = re.compile(r"\\boxed\{\s*\(?([A-J])\)?\s*\}")
STANDALONE = re.compile(r"^\W*(?:option\s+)?\(?([A-J])\)?\W*$", re.I)


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
