"""The training loss: cross-entropy summed over the labelled (reply) tokens only.

The 128k-token vocabulary of Llama 3 makes the logits the largest tensor of a step. They are formed only at the
positions that carry a label (the replies; prompts and padding are about a third of the tokens), whose flat indices
the collate step computes on the CPU, so selecting them never waits for the GPU.

The head and the loss run chunk by chunk. With a frozen head (the usual LoRA case) each chunk's gradient with
respect to the hidden states is formed in the forward pass, right after its logits (as Liger's fused linear
cross-entropy does): the logits are computed once instead of again in the backward pass, and only one chunk's
logits are ever alive. On a GPU the softmax-minus-one-hot step is one compiled kernel pair reading bf16 logits.
A head that is trained (LoRA on a tied lm_head) takes the plain path: checkpointed chunks, recomputed in backward.

Preference objectives need each labelled token's log-probability rather than their sum (`per_token=True`): the same
chunked head returns them, with d logp / d hidden formed in the forward pass the same way; the backward pass scales
each token's row by the gradient the objective gives it.

A chunk holds `chunk_tokens` x vocabulary logits; by default the chunk follows the vocabulary so that one chunk's
logits stay within a fixed number of elements (4,096 tokens for Llama 3's 128k vocabulary on a GPU; a 262k
vocabulary gets half that; a CPU, whose memory is the machine's, a budget 32 times smaller).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from medtune.train.attention import NAME as VARLEN

IGNORE = -100
CHUNK_ELEMENTS = {"cuda": 2**29, "cpu": 2**24}  # logits elements of one head chunk, per device type


def chunk_for(vocab: int, device: torch.device) -> int:
    """Tokens per head chunk: the element budget over the vocabulary, a multiple of 64, at least 64."""
    budget = CHUNK_ELEMENTS.get(device.type, CHUNK_ELEMENTS["cuda"])
    return max(64, budget // vocab // 64 * 64)


def _ce_and_grad(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of a chunk and its gradient with respect to the logits (in the logits' dtype)."""
    x = logits.float()
    lse = torch.logsumexp(x, dim=-1, keepdim=True)
    loss = (lse.squeeze(1) - x.gather(1, targets[:, None]).squeeze(1)).sum()
    probs = torch.exp(x - lse)
    hit = torch.arange(x.shape[1], device=x.device)[None, :] == targets[:, None]
    return loss, torch.where(hit, probs - 1.0, probs).to(logits.dtype)


def _logp_and_grad(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's log-probability of its target and its gradient with respect to the logits (logits' dtype)."""
    x = logits.float()
    lse = torch.logsumexp(x, dim=-1, keepdim=True)
    logp = x.gather(1, targets[:, None]).squeeze(1) - lse.squeeze(1)
    probs = torch.exp(x - lse)
    hit = torch.arange(x.shape[1], device=x.device)[None, :] == targets[:, None]
    return logp, torch.where(hit, 1.0 - probs, -probs).to(logits.dtype)


@functools.cache
def _compiled_ce_and_grad() -> Any:
    return torch.compile(_ce_and_grad, dynamic=True)


@functools.cache
def _compiled_logp_and_grad() -> Any:
    return torch.compile(_logp_and_grad, dynamic=True)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """sum CE(hidden @ weight.T, targets) for a frozen weight; d/d(hidden) is computed in the forward pass."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        want_grad = ctx.needs_input_grad[0]
        ce = _compiled_ce_and_grad() if hidden.is_cuda else _ce_and_grad
        total = hidden.new_zeros((), dtype=torch.float32)
        grad_hidden = torch.empty_like(hidden) if want_grad else None
        for start in range(0, hidden.shape[0], chunk):
            logits = hidden[start : start + chunk] @ weight.t()  # autocast picks the matmul dtype
            loss, grad = ce(logits, targets[start : start + chunk])
            total += loss
            if grad_hidden is not None:
                grad_hidden[start : start + chunk] = grad @ weight
        ctx.save_for_backward(grad_hidden)
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (grad_hidden,) = ctx.saved_tensors
        return (grad_hidden.float() * grad_output).to(grad_hidden.dtype), None, None, None


class _FusedLinearLogProbs(torch.autograd.Function):
    """log softmax(hidden @ weight.T)[targets] per token for a frozen weight; d/d(hidden) formed in forward."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> torch.Tensor:
        want_grad = ctx.needs_input_grad[0]
        fn = _compiled_logp_and_grad() if hidden.is_cuda else _logp_and_grad
        logps = hidden.new_empty(hidden.shape[0], dtype=torch.float32)
        grad_hidden = torch.empty_like(hidden) if want_grad else None
        for start in range(0, hidden.shape[0], chunk):
            logits = hidden[start : start + chunk] @ weight.t()
            logp, grad = fn(logits, targets[start : start + chunk])
            logps[start : start + chunk] = logp
            if grad_hidden is not None:
                grad_hidden[start : start + chunk] = grad @ weight
        ctx.save_for_backward(grad_hidden)
        return logps

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (grad_hidden,) = ctx.saved_tensors
        return (grad_hidden.float() * grad_output[:, None]).to(grad_hidden.dtype), None, None, None


def _chunk_logps(head: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(head(hidden).float(), dim=-1).gather(1, labels[:, None]).squeeze(1)


def _chunk_loss(head: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(head(hidden).float(), labels, reduction="sum")


def label_positions(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat indices of the labelled positions of a (rows, width) label tensor, and their targets (CPU work)."""
    flat = labels.reshape(-1)
    index = (flat != IGNORE).nonzero().squeeze(1)
    return index, flat[index]


class CausalLMLoss(torch.nn.Module):
    """Wraps a (PEFT) causal LM; `forward` returns the loss summed over the labelled tokens.

    One module for the whole computation, so a data-parallel or sharding wrapper can take it as its root.
    """

    def __init__(self, model: Any, chunk_tokens: int | None = None, fused_head: bool = True) -> None:
        super().__init__()
        self.model = model
        self.chunk_tokens = chunk_tokens  # None: follows the vocabulary and the device (chunk_for)
        self.fused_head = fused_head

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, label_index: torch.Tensor,
                targets: torch.Tensor, cu_seq_lens: torch.Tensor | None = None,
                per_token: bool = False) -> torch.Tensor:
        """The loss summed over the labelled tokens, or (`per_token`) each labelled token's log-probability."""
        causal = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        extra = {"cu_seq_lens": cu_seq_lens} if causal.config._attn_implementation == VARLEN else {}
        # use_cache=False: with a cache transformers would not derive the per-example mask from position ids.
        hidden = causal.model(input_ids=input_ids, position_ids=position_ids, use_cache=False,
                              **extra).last_hidden_state
        selected = hidden.flatten(0, 1).index_select(0, label_index)
        if per_token:
            return self.head_logps(causal.lm_head, selected, targets)
        return self.head_loss(causal.lm_head, selected, targets)

    def _chunk(self, head: torch.nn.Module, hidden: torch.Tensor) -> int:
        return self.chunk_tokens or chunk_for(head.weight.shape[0], hidden.device)

    def _fused(self, head: torch.nn.Module) -> bool:
        return self.fused_head and type(head) is torch.nn.Linear and head.bias is None \
            and not head.weight.requires_grad

    def head_logps(self, head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        chunk = self._chunk(head, hidden)
        if self._fused(head):
            return _FusedLinearLogProbs.apply(hidden, head.weight, targets, chunk)
        parts = []
        for start in range(0, targets.numel(), chunk):
            h, y = hidden[start : start + chunk], targets[start : start + chunk]
            parts.append(checkpoint(_chunk_logps, head, h, y, use_reentrant=False) if torch.is_grad_enabled()
                         else _chunk_logps(head, h, y))
        return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)

    def head_loss(self, head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        chunk = self._chunk(head, hidden)
        if self._fused(head):
            return _FusedLinearCrossEntropy.apply(hidden, head.weight, targets, chunk)
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, targets.numel(), chunk):
            h, y = hidden[start : start + chunk], targets[start : start + chunk]
            if torch.is_grad_enabled():
                total = total + checkpoint(_chunk_loss, head, h, y, use_reentrant=False)
            else:
                total = total + _chunk_loss(head, h, y)
        return total
