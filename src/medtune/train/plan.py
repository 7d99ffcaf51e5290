"""`medtune train --dry-run`: what a run will cost, from a few steps timed on this machine."""

from __future__ import annotations

import resource
import time
from typing import Any

import torch

from medtune.config import Config
from medtune.train.parallel import Distributed

TIMED_STEPS = 2


def dry_run_plan(cfg: Config, net: Any, params: list, rows: list, total_steps: int, window: int, pad_id: int,
                 width: int | None, device: torch.device, precision: str, autocast: Any, scaler: Any,
                 optimizer: Any, weights_gib: float, dist: Distributed) -> dict[str, Any]:
    """Times one warm-up and TIMED_STEPS optimizer steps on the real model and data (weights are not kept). Under a
    multi-process launch each process takes its share of a step's micro-batches and the gradients are summed, as in
    the run; tokens/s counts the whole step's tokens."""
    from medtune.train.stage import collate, counts, to_device, token_loss_sum

    tc = cfg.train
    real_tokens = sum(len(ids) for row in rows for ids, _ in row)
    epochs = tc.max_steps * window * tc.batch_size / max(1, len(rows)) if tc.max_steps else tc.epochs
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timed_tokens, timed = 0, 0.0
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
    for step in range(1 + TIMED_STEPS):
        begin = time.perf_counter()
        tokens = 0
        for k in range(window):
            at = ((step * window + k) * tc.batch_size) % max(1, len(rows))
            micro = [rows[order[(at + j) % len(rows)]] for j in range(tc.batch_size)]
            tokens += counts(micro)[0]
            if k % dist.world != dist.rank:  # another process's micro-batch
                continue
            batch = collate(micro, pad_id, width)  # the shape the run will have
            n = max(1, batch["targets"].numel())
            with autocast():
                loss = token_loss_sum(net, to_device(batch, device))
            scaler.scale(loss / n).backward()
        dist.reduce_grads(params)
        optimizer.zero_grad(set_to_none=True)  # measured, not applied: the weights stay as loaded
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step > 0:
            timed += time.perf_counter() - begin
            timed_tokens += tokens
    tokens_per_s = timed_tokens / timed if timed else 0.0
    total_tokens = real_tokens * epochs
    return {
        "dry_run": True,
        "device": str(device),
        "processes": dist.world,
        "precision": precision,
        "rows": len(rows),
        "tokens_per_epoch": real_tokens,
        "epochs": round(epochs, 3),
        "steps": total_steps,
        "trainable_params": sum(p.numel() for p in params),
        "weights_gib": round(weights_gib, 3),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda"
        else round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),  # CPU: peak RSS
        "measured_tokens_per_s": round(tokens_per_s, 1),
        "expected_hours": round(total_tokens / tokens_per_s / 3600, 3) if tokens_per_s else None,
    }
