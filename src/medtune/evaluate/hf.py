"""Transformers models for evaluation: loading (model dir, PEFT adapter dir, hub id) and batched greedy generation.

The eval stage generates with `BatchedGenerator` for every HF model: on a GPU prompts are left-padded into batches and
decoded greedily, each row stopping at the model's end-of-turn ids; on a CPU the batch size is 1 (one item at a time).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from medtune.errors import MedtuneError
from medtune.models import chat_prompt_ids, end_of_turn_ids
from medtune.sampling import context_size

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

Messages = list[dict[str, str]]


class BatchedGenerator:
    """Greedy chat completions for several prompts at once (left padding), each stopping at an end-of-turn id."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, batch_size: int) -> None:
        if batch_size < 1:
            raise MedtuneError(f"eval.batch_size must be >= 1, got {batch_size}")
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.stop_ids = end_of_turn_ids(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[0]
        self.n_ctx = context_size(model.config)

    def prompt_ids(self, messages: Messages) -> list[int]:
        return chat_prompt_ids(self.tokenizer, messages)

    def generate(self, conversations: list[Messages], max_new_tokens: int) -> list[dict[str, Any]]:
        """One result per conversation, in order: {text, finish_reason ("stop" | "length"), completion_tokens}."""
        results: list[dict[str, Any]] = []
        for start in range(0, len(conversations), self.batch_size):
            results += self._batch(conversations[start:start + self.batch_size], max_new_tokens)
        return results

    def _batch(self, conversations: list[Messages], max_new_tokens: int) -> list[dict[str, Any]]:
        import torch

        prompts = [self.prompt_ids(m) for m in conversations]
        width = max(len(p) for p in prompts)
        if width >= self.n_ctx:
            raise MedtuneError(f"a prompt of {width} tokens does not fit the model's context of {self.n_ctx} tokens")
        ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in prompts], device=self.model.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.model.device)
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=min(max_new_tokens, self.n_ctx - width),
                do_sample=False, temperature=None, top_p=None, top_k=None,
                eos_token_id=self.stop_ids, pad_token_id=self.pad_id)
        results = []
        for row in out[:, width:].tolist():
            stop = next((i for i, token in enumerate(row) if token in self.stop_ids), None)
            new = row if stop is None else row[:stop + 1]
            results.append({"text": self.tokenizer.decode(new, skip_special_tokens=True),
                            "finish_reason": "length" if stop is None else "stop", "completion_tokens": len(new)})
        return results
