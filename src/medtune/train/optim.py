"""Adafactor as the seed recipe's Trainer builds it, applied to all same-shaped tensors at once.

transformers' `Adafactor(lr, scale_parameter=False, relative_step=False, warmup_init=False)` — a fixed external
learning rate, no first moment, a factored second moment for matrices (row and column means), updates clipped to
RMS 1 — loops over the parameters one at a time: about 25 small GPU kernels per tensor, 3,200 a step for the 128
LoRA matrices of Llama-3.2-1B's q/k/v/o. LoRA has only a handful of distinct shapes, so here each step stacks the
tensors of one shape and runs the same arithmetic batched. Same update (tests compare it with transformers'),
same state keys (`step`, `exp_avg_sq_row`, `exp_avg_sq_col`, `exp_avg_sq`), so checkpoints move between the two.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch


class Adafactor(torch.optim.Optimizer):
    def __init__(self, params, lr: float, weight_decay: float = 0.0, eps: tuple[float, float] = (1e-30, 1e-3),
                 clip_threshold: float = 1.0, decay_rate: float = -0.8) -> None:
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "eps": eps,
                                  "clip_threshold": clip_threshold, "decay_rate": decay_rate})

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            buckets: dict[tuple, list[torch.nn.Parameter]] = defaultdict(list)
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Adafactor does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    if p.dim() >= 2:
                        state["exp_avg_sq_row"] = p.new_zeros(p.shape[:-1], dtype=torch.float32)
                        state["exp_avg_sq_col"] = p.new_zeros(p.shape[:-2] + p.shape[-1:], dtype=torch.float32)
                    else:
                        state["exp_avg_sq"] = p.new_zeros(p.shape, dtype=torch.float32)
                buckets[(tuple(p.shape), p.device, state["step"])].append(p)
            for ps in buckets.values():
                self._update(group, ps)
        return loss

    def _update(self, group: dict, params: list[torch.nn.Parameter]) -> None:
        states = [self.state[p] for p in params]
        step = states[0]["step"] + 1
        for state in states:
            state["step"] = step
        beta2t = 1.0 - math.pow(step, group["decay_rate"])
        grad = torch.stack([p.grad.float() for p in params])
        sq = grad.square().add_(group["eps"][0])
        if params[0].dim() >= 2:
            row = torch.stack([s["exp_avg_sq_row"] for s in states])
            col = torch.stack([s["exp_avg_sq_col"] for s in states])
            row.mul_(beta2t).add_(sq.mean(dim=-1), alpha=1.0 - beta2t)
            col.mul_(beta2t).add_(sq.mean(dim=-2), alpha=1.0 - beta2t)
            torch._foreach_copy_([s["exp_avg_sq_row"] for s in states], list(row.unbind(0)))
            torch._foreach_copy_([s["exp_avg_sq_col"] for s in states], list(col.unbind(0)))
            r_factor = (row / row.mean(dim=-1, keepdim=True)).rsqrt_().unsqueeze(-1)
            update = torch.mul(r_factor, col.unsqueeze(-2).rsqrt()).mul_(grad)
        else:
            avg = torch.stack([s["exp_avg_sq"] for s in states])
            avg.mul_(beta2t).add_(sq, alpha=1.0 - beta2t)
            torch._foreach_copy_([s["exp_avg_sq"] for s in states], list(avg.unbind(0)))
            update = avg.rsqrt().mul_(grad)
        dims = tuple(range(1, update.dim()))
        rms = update.norm(2, dim=dims) / math.sqrt(update[0].numel())
        update.div_((rms / group["clip_threshold"]).clamp_(min=1.0).view(-1, *[1] * len(dims)))
        update.mul_(group["lr"])
        work = [p if p.dtype == torch.float32 else p.float() for p in params]
        if group["weight_decay"] != 0:
            torch._foreach_add_(work, work, alpha=-group["weight_decay"] * group["lr"])
        torch._foreach_sub_(work, list(update.unbind(0)))
        for p, w in zip(params, work):
            if w is not p:
                p.copy_(w)
