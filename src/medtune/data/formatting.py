"""Rendering conversations with the model's own chat template, and the loss mask.

The loss covers exactly the assistant replies plus the end-of-turn token that closes each of them (so the model
learns to stop); no prompt token, no template text after the end-of-turn token, no padding. Each segment is
tokenized on its own, which guarantees that decoding the labelled tokens gives back the reply text plus the
end-of-turn token, character for character.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from medtune.errors import MedtuneError
from medtune.models import end_of_turn_token

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase



@dataclass
class Encoded:
    input_ids: list[int]
    loss_mask: list[int]  # 1 where the token is trained on
    reply_spans: list[tuple[int, int]]  # [start, end) of each reply's tokens, its end-of-turn token excluded


class ChatFormatter:
    """Turns message lists into (input_ids, loss_mask) with the tokenizer's chat template."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, system_prompt: str | None = None) -> None:
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.eot = end_of_turn_token(tokenizer)
        self.eot_id = tokenizer.convert_tokens_to_ids(self.eot)

    def _render(self, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Batched: the fast tokenizer spreads a batch over all cores."""
        if not texts:
            return []
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def with_system(self, messages: list[dict[str, str]]) -> list[dict[str, str]]:
        if self.system_prompt is not None and messages[0]["role"] != "system":
            return [{"role": "system", "content": self.system_prompt}, *messages]
        return messages

    def prompt_text(self, messages: list[dict[str, str]]) -> str:
        """The text a model sees before it starts its reply (used by chat and eval too)."""
        return self._render(self.with_system(messages), generation_prompt=True)

    def segments(self, messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
        """The rendered conversation cut into (text, is_reply) pieces; each reply is followed by end-of-turn."""
        messages = self.with_system(list(messages))
        pieces: list[tuple[str, bool]] = []
        done = ""  # the rendered text already cut into pieces
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
            pieces += [(prompt[len(done) :], False), (tail[:end], True)]
            done = prompt + tail[:end] + self.eot
        return pieces

    def encode_batch(self, conversations: list[list[dict[str, str]]]) -> list[Encoded]:
        cut = [self.segments(messages) for messages in conversations]
        flat = self.tokenize([text for pieces in cut for text, _ in pieces])
        out, k = [], 0
        for pieces in cut:
            ids: list[int] = []
            mask: list[int] = []
            spans: list[tuple[int, int]] = []
            for _, is_reply in pieces:
                piece = flat[k]
                k += 1
                if is_reply:
                    spans.append((len(ids), len(ids) + len(piece)))
                    piece = [*piece, self.eot_id]
                ids += piece
                mask += [int(is_reply)] * len(piece)
            out.append(Encoded(ids, mask, spans))
        return out

    def encode(self, messages: list[dict[str, str]]) -> Encoded:
        return self.encode_batch([messages])[0]
