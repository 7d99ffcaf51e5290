"""Does a training run fit: memory per process for the base's weights, LoRA with its gradients and optimizer
state, the activations kept for the backward pass and the loss head, against the device's memory; worked out from
the model's config before any weight is loaded (the dry run prints it first, and does not load a base that cannot
fit).

The activation count is per token and decoder layer, in the compute dtype: the saved inputs of the two norms and
their fp32 upcasts, the q/k/v/o and MLP inputs and outputs, attention's output, the dropout outputs feeding LoRA
(Llama-style layers: about 11 x hidden + 2 x kv width + 4 x ffn width values). It is an upper bound for eager
kernels; a compiled decoder keeps less. With gradient checkpointing only each layer's input stays, plus one
layer's worth while it is recomputed.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from medtune.config import Config

NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit values, a uint8 scale per 64, an fp32 scale per 256 scales
FP8_SCALE_BYTES = 4  # base_precision fp8: one fp32 scale per output row of each decoder linear
HEAD_BYTES_PER_LOGIT = 12  # one chunk's logits in the compute dtype, their fp32 copy, probabilities, gradient


def device_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / 2**30
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30  # the machine's RAM


def count(model_config: Any, targets: list[str]) -> dict[str, int]:
    """Parameters of the base (decoder linears apart, as QLoRA quantizes them) and of LoRA at rank 1, counted on
    a meta-device model (no memory)."""
    from medtune.train.sharded import decoder_layers, empty_model

    model = empty_model(model_config, torch.bfloat16, "auto", qlora=False)
    linear_ids = {id(m.weight) for layer in decoder_layers(model) for m in layer.modules()
                  if type(m) is torch.nn.Linear}
    seen: dict[int, int] = {id(p): p.numel() for p in model.parameters()}  # tied tensors once
    linears = sum(n for key, n in seen.items() if key in linear_ids)
    lora_per_rank = sum(m.in_features + m.out_features for name, m in model.named_modules()
                        if type(m) is torch.nn.Linear and name.rsplit(".", 1)[-1] in targets)
    decoder = [m for layer in decoder_layers(model) for m in layer.modules() if type(m) is torch.nn.Linear]
    return {"base": sum(seen.values()), "decoder_linears": linears, "lora_per_rank": lora_per_rank,
            "decoder_linear_rows": sum(m.out_features for m in decoder),
            "largest_linear": max((m.weight.numel() for m in decoder), default=0),
            "widest_linear": max((m.out_features for m in decoder), default=0)}


def fp8_bytes(counts: dict[str, int], rest_bytes: int, tokens: int) -> tuple[float, float]:
    """base_precision fp8: the base's bytes (decoder linears one byte a value plus a scale a row, the rest as
    loaded) and the scratch of one FP8 matrix multiply's backward (the weight transposed, the widest output
    gradient scaled in fp32 and its FP8 copy)."""
    weights = counts["decoder_linears"] + counts["decoder_linear_rows"] * FP8_SCALE_BYTES \
        + (counts["base"] - counts["decoder_linears"]) * rest_bytes
    return weights, counts["largest_linear"] + tokens * counts["widest_linear"] * (4 + 1)


def estimate(cfg: Config, model_config: Any, precision: str, world: int, device: torch.device) -> dict[str, Any]:
    """Memory per process in GiB, by part, and whether it fits the device."""
    tc = cfg.train
    sharded = tc.strategy == "fsdp" and world > 1
    counts = count(model_config, list(tc.lora.target_modules))
    dtype_bytes = 2 if precision == "bf16" else 4
    tokens = tc.batch_size * cfg.data.max_len  # a micro-batch: packed rows, or rows padded to at most max_len
    fp8_scratch = 0.0
    if tc.qlora:
        weights = counts["decoder_linears"] * NF4_BYTES + (counts["base"] - counts["decoder_linears"]) * dtype_bytes
    elif tc.base_precision == "fp8":
        weights, fp8_scratch = fp8_bytes(counts, dtype_bytes, tokens)
    else:
        weights = counts["base"] * dtype_bytes
    if sharded:
        weights /= world
    lora = counts["lora_per_rank"] * tc.lora.r
    state = 8 if tc.optimizer == "adamw" else 4 / max(1, tc.lora.r)  # Adafactor: a row and a column per matrix
    trainable = lora * (4 + 4 + state)  # fp32 values, gradients, optimizer state

    hidden = model_config.hidden_size
    heads = model_config.num_attention_heads
    head_dim = getattr(model_config, "head_dim", None) or hidden // heads
    kv = getattr(model_config, "num_key_value_heads", heads) * head_dim
    ffn = getattr(model_config, "intermediate_size", 4 * hidden)
    layers = model_config.num_hidden_layers
    act_dtype = 2 if precision in ("bf16", "fp16") else 4
    per_token_layer = act_dtype * (11 * hidden + 2 * kv + 4 * ffn) + 4 * 2 * hidden  # + the norms' fp32 upcasts
    if tc.gradient_checkpointing:
        activations = tokens * (layers * act_dtype * hidden + per_token_layer)
    else:
        activations = tokens * layers * per_token_layer
    from medtune.train.loss import chunk_for

    head = min(tokens, chunk_for(model_config.vocab_size, device)) * model_config.vocab_size * HEAD_BYTES_PER_LOGIT
    if sharded:  # the largest layer gathered whole (the next one is prefetched)
        gathered = 2 * weights * world / max(1, layers)
    else:
        gathered = 0.0
    parts = {"weights": weights, "lora_and_optimizer": trainable, "activations": activations, "loss_head": head,
             "fsdp_gathered_layers": gathered}
    if tc.base_precision == "fp8":
        parts["fp8_backward_scratch"] = fp8_scratch
    total = sum(parts.values())
    available = device_memory_gib(device)
    gib = {name: round(value / 2**30, 2) for name, value in parts.items()}
    return {"per_process_gib": gib, "estimated_peak_gib": round(total / 2**30, 2),
            "device_memory_gib": round(available, 1), "fits": total / 2**30 <= 0.95 * available,
            "base_params": counts["base"], "lora_params": lora}
