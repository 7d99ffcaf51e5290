"""Prompts for multiple-choice items, in the ReasonMed instruction format the model was tuned on."""

from __future__ import annotations

from medtune.formats.choice import Item, question_prompt


def multiple_choice_prompt(item: Item) -> str:
    """Question and lettered options; a context (PubMedQA's abstract) follows after a blank line, as the `input`
    of a ReasonMed record does in training (the same text `medtune.formats.choice.reasonmed_record` trains on)."""
    return question_prompt(item)
