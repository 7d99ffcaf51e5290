"""Prompts for multiple-choice items, in the ReasonMed instruction format the model was tuned on."""

from __future__ import annotations

from medtune.evaluate.benchmarks import Item

INSTRUCTION = "Please answer the following multiple-choice question:\n"


def multiple_choice_prompt(item: Item) -> str:
    options = "\n".join(f"{letter}. {text}" for letter, text in item.options.items())
    return f"{INSTRUCTION}{item.question}\n{options}"
