"""Variable-length attention for packed rows through PyTorch's own FlashAttention (`torch.nn.attention.varlen`).

Registered with transformers as the attention implementation `varlen` (config: `train.attention: varlen`). A packed
batch is attended as one flat sequence of examples: the collate step finds each example's start on the CPU
(`cu_seq_lens`), the kernel visits only the causal block of each example, and no mask tensor is built.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch

NAME = "varlen"


@functools.cache
def _varlen_params() -> frozenset[str]:
    """The keywords this torch's varlen_attn takes (its signature changed between 2.10 and 2.12); read once."""
    from torch.nn.attention.varlen import varlen_attn

    return frozenset(inspect.signature(varlen_attn).parameters)


def varlen_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: Any, scaling: float | None = None, dropout: float = 0.0,
                     cu_seq_lens: torch.Tensor | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    from torch.nn.attention.varlen import varlen_attn

    if cu_seq_lens is None:
        raise ValueError("the varlen attention needs cu_seq_lens (the flat start of every example)")
    rows, heads, width, dim = query.shape
    kv_heads = key.shape[1]
    q = query.transpose(1, 2).reshape(rows * width, heads, dim)
    k = key.transpose(1, 2).reshape(rows * width, kv_heads, dim)
    v = value.transpose(1, 2).reshape(rows * width, kv_heads, dim)
    params = _varlen_params()
    extra: dict[str, Any] = {"window_size": (-1, 0)} if "window_size" in params else {"is_causal": True}  # causal
    if "scale" in params:
        extra["scale"] = scaling
    if kv_heads != heads:
        if "enable_gqa" in params:
            extra["enable_gqa"] = True
        else:
            k = k.repeat_interleave(heads // kv_heads, dim=1)
            v = v.repeat_interleave(heads // kv_heads, dim=1)
    out = varlen_attn(q, k, v, cu_seq_lens, cu_seq_lens, width, width, **extra)
    return out.view(rows, width, heads, dim), None


def register() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, varlen_attention)


def cu_seq_lens(position_ids: torch.Tensor) -> torch.Tensor:
    """Flat start offsets of the examples of a (rows, width) position tensor (restarting at 0), plus the end."""
    flat = position_ids.reshape(-1)
    starts = (flat == 0).nonzero().squeeze(1)
    return torch.cat([starts, torch.tensor([flat.numel()])]).to(torch.int32)
