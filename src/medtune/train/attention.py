"""Variable-length attention for packed rows through PyTorch's own FlashAttention (`torch.nn.attention.varlen`).

Registered with transformers as the attention implementation `varlen` (config: `train.attention: varlen`). A packed
batch is attended as one flat sequence of examples: the collate step finds each example's start on the CPU
(`cu_seq_lens`), the kernel visits only the causal block of each example, and no mask tensor is built.

A layer with a sliding window (Gemma 3: 5 of 6 layers, 512 tokens; transformers hands it over as `sliding_window`)
attends to the last `sliding_window` positions of its example, itself included, as transformers' own masks do:
FlashAttention's `window_size=(sliding_window - 1, 0)`. A torch whose varlen_attn has no window, or a layer with
logit soft-capping (Gemma 2), is refused rather than attended wrongly.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch

from medtune.errors import MedtuneError

NAME = "varlen"


@functools.cache
def _varlen_params() -> frozenset[str]:
    """The keywords this torch's varlen_attn takes (its signature changed between 2.10 and 2.12); read once."""
    from torch.nn.attention.varlen import varlen_attn

    return frozenset(inspect.signature(varlen_attn).parameters)


def varlen_attention(module: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: Any, scaling: float | None = None, dropout: float = 0.0,
                     cu_seq_lens: torch.Tensor | None = None, sliding_window: int | None = None,
                     softcap: float | None = None, **kwargs: Any) -> tuple[torch.Tensor, None]:
    from torch.nn.attention.varlen import varlen_attn

    if cu_seq_lens is None:
        raise ValueError("the varlen attention needs cu_seq_lens (the flat start of every example)")
    if softcap is not None:
        raise MedtuneError("train.attention varlen: this model soft-caps attention logits, which PyTorch's varlen "
                           "attention cannot do; use train.attention=flex_attention or auto")
    rows, heads, width, dim = query.shape
    kv_heads = key.shape[1]
    q = query.transpose(1, 2).reshape(rows * width, heads, dim)
    k = key.transpose(1, 2).reshape(rows * width, kv_heads, dim)
    v = value.transpose(1, 2).reshape(rows * width, kv_heads, dim)
    params = _varlen_params()
    if "window_size" in params:  # (left, right): causal, and with a sliding window the last `sliding_window` keys
        extra: dict[str, Any] = {"window_size": (sliding_window - 1 if sliding_window else -1, 0)}
    elif sliding_window:
        raise MedtuneError(f"train.attention varlen: this model's layers attend over a sliding window of "
                           f"{sliding_window} tokens and this torch ({torch.__version__})'s varlen_attn has no window; "
                           "upgrade torch or use train.attention=flex_attention or auto")
    else:
        extra = {"is_causal": True}
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
