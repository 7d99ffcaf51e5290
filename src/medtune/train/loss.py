"""The training loss: cross-entropy summed over the labelled (reply) tokens only.

The 128k-token vocabulary of Llama 3 makes the logits the largest tensor of a step. They are formed only at the
positions that carry a label (the replies; prompts and padding are about a third of the tokens), in chunks whose
logits are recomputed in the backward pass instead of kept, so their memory stays one chunk's.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

IGNORE = -100


def _chunk_loss(head: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(head(hidden).float(), labels, reduction="sum")


class CausalLMLoss(torch.nn.Module):
    """Wraps a (PEFT) causal LM; `forward` returns the summed loss, so DDP can wrap this module as a whole."""

    def __init__(self, model: Any, chunk_tokens: int = 4096) -> None:
        super().__init__()
        self.model = model
        self.chunk_tokens = chunk_tokens

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        causal = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        # use_cache=False: with a cache transformers would not derive the per-example mask from position ids.
        hidden = causal.model(input_ids=input_ids, position_ids=position_ids, use_cache=False).last_hidden_state
        keep = labels != IGNORE
        hidden, labels = hidden[keep], labels[keep]
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, labels.numel(), self.chunk_tokens):
            h, y = hidden[start : start + self.chunk_tokens], labels[start : start + self.chunk_tokens]
            if torch.is_grad_enabled():
                total = total + checkpoint(_chunk_loss, causal.lm_head, h, y, use_reentrant=False)
            else:
                total = total + _chunk_loss(causal.lm_head, h, y)
        return total
