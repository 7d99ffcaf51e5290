"""Rendering conversations with the model's own chat template, and the loss mask.

The loss covers exactly the assistant replies plus the end-of-turn token that closes each of them (so the model
learns to stop); no prompt token, no template text after the end-of-turn token, no padding. Each segment is
tokenized on its own, which guarantees that decoding the labelled tokens gives back the reply text plus the
end-of-turn token, character for character.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from medtune.errors import MedtuneError
from medtune.models import end_of_turn_token

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

ANSWER_RE = re.compile(r"answer is:?\s*\(?([A-J])\b\)?", re.IGNORECASE)


@dataclass
class Encoded:
    input_ids: list[int]
    loss_mask: list[int]  # 1 where the token is trained on


class ChatFormatter:
    """Turns message lists into (input_ids, loss_mask) with the tokenizer's chat template."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, system_prompt: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.eot = end_of_turn_token(tokenizer)
        self.eot_id = tokenizer.convert_tokens_to_ids(self.eot)

    def _render(self, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"] if text else []

    def with_system(self, messages: list[dict[str, str]]) -> list[dict[str, str]]:
        if self.system_prompt is not None and messages[0]["role"] != "system":
            return [{"role": "system", "content": self.system_prompt}, *messages]
        return messages

    def prompt_text(self, messages: list[dict[str, str]]) -> str:
        """The text a model sees before it starts its reply (used by chat and eval too)."""
        return self._render(self.with_system(messages), generation_prompt=True)

    def encode(self, messages: list[dict[str, str]]) -> Encoded:
        messages = self.with_system(list(messages))
        ids: list[int] = []
        mask: list[int] = []
        done = ""  # the rendered text already turned into ids
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = self._render(messages[:i], generation_prompt=True)
            full = self._render(messages[: i + 1], generation_prompt=False)
            if not prompt.startswith(done) or not full.startswith(prompt):
                raise MedtuneError(
                    "the chat template does not render conversations as growing prefixes; "
                    "medtune cannot locate the assistant reply in it"
                )
            tail = full[len(prompt) :]
            end = tail.find(self.eot)
            if end < 0:
                raise MedtuneError(f"the chat template does not close the assistant turn with {self.eot!r}")
            reply = tail[:end]
            prompt_ids = self._ids(prompt[len(done) :])
            reply_ids = self._ids(reply) + [self.eot_id]
            ids += prompt_ids + reply_ids
            mask += [0] * len(prompt_ids) + [1] * len(reply_ids)
            done = prompt + reply + self.eot
        return Encoded(ids, mask)


def final_answer(text: str) -> str | None:
    """The letter of the last "The answer is X" in a reply, if any."""
    matches = ANSWER_RE.findall(text)
    return matches[-1].upper() if matches else None
