"""Prompts for multiple-choice items, in the ReasonMed instruction format the model was tuned on."""

from __future__ import annotations

from medtune.evaluate.benchmarks import Item

INSTRUCTION = "Please answer the following multiple-choice question:\n"


def multiple_choice_prompt(item: Item) -> str:
    """Question and lettered options; a context (PubMedQA's abstract) follows after a blank line, as the `input`
    of a ReasonMed record does in training."""
    options = "\n".join(f"{letter}. {text}" for letter, text in item.options.items())
    prompt = f"{INSTRUCTION}{item.question}\n{options}"
    return f"{prompt}\n\n{item.context}" if item.context else prompt
