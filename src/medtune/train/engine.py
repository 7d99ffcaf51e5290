"""The training engine: one step for every objective, and the loop around it (resume, reduction over processes,
clipping, optimizer, logging, validation and checkpoint cadence), plus the timing of a few steps for the dry run.

A step: each micro-batch's loss summed over its units (labelled tokens, or pairs) is divided by the units of the
whole optimizer step over all processes, so the gradients summed over processes are those of the global mean. The
host never waits for the device inside a step: loss, gradient norm and metrics are copied to pinned memory and read
one step later, and the next step's batches are collated while the device works.
"""

from __future__ import annotations

import math
import resource
import time
from pathlib import Path
from typing import Any

import torch

from medtune.errors import MedtuneError
from medtune.train import checkpoint
from medtune.train.batches import windows
from medtune.train.objectives import Objective
from medtune.train.observe import MetricsLog, read_metrics
from medtune.train.setup import Setup
from medtune.ui import UI

TIMED_STEPS = 2  # dry run: steps timed after one warm-up step


def to_device(objective: Objective, batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {key: batch[key].to(device, non_blocking=True) for key in objective.device_keys}


class StepStats:
    """One optimizer step's numbers. Loss, gradient norm and metrics are copied to the host without waiting; `read`
    waits for that copy only, by when the GPU has long moved on to the next step."""

    def __init__(self, step: int, epoch: int, lr: float, tokens: int, units: int, loss: torch.Tensor,
                 grad_norm: torch.Tensor, metrics: torch.Tensor):
        self.step, self.epoch, self.lr, self.tokens, self.units = step, epoch, lr, tokens, units
        self.val_loss: float | None = None
        values = torch.cat([torch.stack([loss.float(), grad_norm.float()]), metrics.float()])
        self.event = None
        if values.is_cuda:
            self.host = torch.empty(values.numel(), dtype=torch.float32, pin_memory=True)
            self.host.copy_(values, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = values

    def read(self) -> tuple[float, float, list[float]]:
        if self.event is not None:
            self.event.synchronize()
        loss, grad_norm, *metrics = self.host.tolist()
        return loss, grad_norm, metrics


@torch.no_grad()
def evaluate(setup: Setup, objective: Objective, items: list[Any]) -> float | None:
    """Mean loss per unit over `items` (the whole set, on every process)."""
    if not items:
        return None
    net = setup.loss_model
    net.eval()
    total, units = 0.0, 0
    size = setup.cfg.train.batch_size
    for i in range(0, len(items), size):
        micro = items[i : i + size]
        with setup.autocast():
            loss, _ = objective.loss(net, to_device(objective, objective.collate(micro), setup.device))
        total, units = total + float(loss), units + objective.counts(micro)[1]
    net.train()
    return total / max(1, units)


def backward_step(setup: Setup, objective: Objective, batches: list[dict[str, torch.Tensor]], units: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward of this process's micro-batches of one step, gradients summed over processes;
    returns the step's loss sum and metric sums over all processes (on the device, not waited for)."""
    loss_sum = torch.zeros((), device=setup.device)
    metric_sum = torch.zeros(len(objective.metric_names), device=setup.device)
    for batch in batches:
        with setup.autocast():
            loss, metrics = objective.loss(setup.loss_model, to_device(objective, batch, setup.device))
        setup.scaler.scale(loss / units).backward()  # summed over processes: the mean over the global step
        loss_sum += loss.detach()
        metric_sum += metrics.detach().float()
    setup.dist.reduce_grads(setup.params)
    totals = setup.dist.sum_(torch.cat([loss_sum[None], metric_sum]))
    return totals[0], totals[1:]


def optimizer_step(setup: Setup, max_grad_norm: float) -> tuple[torch.Tensor, float]:
    """Unscale, clip, apply and clear the gradients, advance the schedule; returns the gradient norm (on the device)
    and the learning rate the step used."""
    setup.scaler.unscale_(setup.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(setup.params, max_grad_norm)
    setup.scaler.step(setup.optimizer)
    setup.scaler.update()
    setup.optimizer.zero_grad(set_to_none=True)
    lr = setup.scheduler.get_last_lr()[0]
    setup.scheduler.step()
    return grad_norm, lr


def _start(setup: Setup, objective: Objective, val_items: list[Any], ckpt_root: Path,
           ui: UI) -> tuple[int, MetricsLog | None, float | None]:
    """Where training starts: the newest checkpoint every process sees (or step 0), the metrics log (the main
    process's), and the validation loss before the first step (measured now, or read from the resumed run's log)."""
    tc, dist = setup.cfg.train, setup.dist
    start_step = 0
    found = checkpoint.latest(ckpt_root)
    seen = dist.everyone(found.name if found else None)
    if len(set(seen)) > 1:  # several machines whose run directories are not one shared folder
        raise MedtuneError(f"train: the processes see different checkpoints under {ckpt_root} "
                           f"({sorted(set(map(str, seen)))}); over several machines the run directory must be on "
                           "storage they all share")
    if found is not None:
        start_step = checkpoint.load(found, setup.model, setup.optimizer, setup.scheduler, setup.scaler, dist.rank)
        ui.log(f"train: resuming from {found} (step {start_step} of {setup.total_steps})")
    else:
        dist.broadcast_(setup.params)  # identical already; made certain, as DDP would
    log = None
    if dist.main:
        log = MetricsLog(ckpt_root / "metrics.jsonl", ckpt_root / "tensorboard" if tc.tensorboard else None,
                         resume_step=start_step)
    if start_step == 0:
        val_before = evaluate(setup, objective, val_items)
        if log is not None:
            log.write({"step": 0, "val_loss": val_before})
    else:  # measured before the first step, by the run being resumed; read where the log is written
        val_before = next((m["val_loss"] for m in read_metrics(ckpt_root / "metrics.jsonl") if m["step"] == 0),
                          None) if dist.main else None
    return start_step, log, val_before


def fit(setup: Setup, objective: Objective, train_items: list[Any], val_items: list[Any], ckpt_root: Path,
        ui: UI) -> dict[str, Any]:
    """Train from the newest checkpoint under `ckpt_root` (or the start) to `setup.total_steps`; returns the
    numbers of the run (the adapter stays in `setup.model`)."""
    cfg, tc, dist = setup.cfg, setup.cfg.train, setup.dist
    total_steps = setup.total_steps
    start_step, log, val_before = _start(setup, objective, val_items, ckpt_root, ui)

    upcoming = windows(objective, train_items, tc.batch_size, cfg.seed, setup.window, dist.rank, dist.world,
                       start_step)
    current = next(upcoming)
    start = time.perf_counter()
    seen_tokens = 0
    last: dict[str, Any] = {}
    pending: StepStats | None = None
    task = ui.task("train", total=total_steps)
    ui.update(task, completed=start_step)

    def finish(stats: StepStats) -> dict[str, Any]:
        """The host's side of a finished step: check the loss, log, show progress."""
        loss_value, grad_norm, metrics = stats.read()
        if not math.isfinite(loss_value):
            kept = checkpoint.latest(ckpt_root)
            raise MedtuneError(f"train: loss is {loss_value} at step {stats.step}; stopped. The last good checkpoint "
                               f"is {kept or '(none yet)'}; lower train.lr or check the data, then run again")
        elapsed = time.perf_counter() - start
        record = {"step": stats.step, "epoch": stats.epoch, "loss": round(loss_value, 5), "lr": stats.lr,
                  "grad_norm": round(grad_norm, 4), "tokens": stats.tokens,
                  "tokens_per_s": round(stats.tokens / elapsed, 1), "elapsed_s": round(elapsed, 2)}
        record |= {name: round(value / max(1, stats.units), 5) for name, value in zip(objective.metric_names, metrics)}
        if stats.val_loss is not None:
            record["val_loss"] = stats.val_loss
        if dist.main and (stats.step % tc.logging_steps == 0 or stats.step == total_steps
                          or stats.val_loss is not None):
            log.write(record)
        ui.update(task, completed=stats.step, description=f"train loss {loss_value:.3f} lr {stats.lr:.2e} "
                  f"{record['tokens_per_s']:,.0f} tok/s")
        return record

    for step in range(start_step, total_steps):
        work = current
        loss_sum, metric_sum = backward_step(setup, objective, work.batches, work.units)
        # Collate the next step while the device works through this one, then read the previous step's numbers
        # (finished by now): the host never waits for the GPU inside a step.
        current = next(upcoming) if step + 1 < total_steps else current
        if pending is not None:
            last, pending = finish(pending), None
        grad_norm, lr = optimizer_step(setup, tc.max_grad_norm)
        seen_tokens += work.tokens
        stats = StepStats(step + 1, work.epoch, lr, seen_tokens, work.units, loss_sum / work.units, grad_norm,
                          metric_sum)
        done = step + 1 == total_steps
        save = (step + 1) % tc.checkpoint_steps == 0 or done
        if tc.eval_steps and (step + 1) % tc.eval_steps == 0 and not done:
            stats.val_loss = evaluate(setup, objective, val_items)
        if save or stats.val_loss is not None:  # checked before anything is written
            last = finish(stats)
        else:
            pending = stats
        if save:
            rng = dist.gather(checkpoint.rng_state())
            if dist.main:
                checkpoint.save(ckpt_root, step + 1, setup.model, setup.optimizer, setup.scheduler, setup.scaler,
                                tc.keep_checkpoints, rng)

    val_after = evaluate(setup, objective, val_items)
    if dist.main:
        log.write({"step": total_steps, "val_loss": val_after})
        log.close()
    return {"resumed_from_step": start_step, "final_loss": last.get("loss"), "val_loss_before": val_before,
            "val_loss_after": val_after, "tokens_per_s": last.get("tokens_per_s"),
            "elapsed_s": last.get("elapsed_s"), "final_metrics": {k: last[k] for k in objective.metric_names
                                                                  if k in last}}


def time_steps(setup: Setup, objective: Objective, items: list[Any]) -> dict[str, Any]:
    """The dry run: one warm-up and TIMED_STEPS optimizer steps on the real model and data, in the run's global
    order and per-process share, gradients reduced as in the run; nothing is applied (the weights stay as loaded).
    Tokens/s counts the whole step's tokens over all processes."""
    tc = setup.cfg.train
    device = setup.device
    tokens_per_epoch = sum(objective.counts([item])[0] for item in items)
    epochs = tc.max_steps * setup.window * tc.batch_size / max(1, len(items)) if tc.max_steps else tc.epochs
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    upcoming = windows(objective, items, tc.batch_size, setup.cfg.seed, setup.window, setup.dist.rank,
                       setup.dist.world)
    timed_tokens, timed = 0, 0.0
    for step in range(1 + TIMED_STEPS):
        begin = time.perf_counter()
        work = next(upcoming)
        backward_step(setup, objective, work.batches, work.units)
        setup.optimizer.zero_grad(set_to_none=True)  # measured, not applied
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step > 0:
            timed += time.perf_counter() - begin
            timed_tokens += work.tokens
    tokens_per_s = timed_tokens / timed if timed else 0.0
    return {
        "dry_run": True,
        "objective": objective.name,
        "device": str(device),
        "processes": setup.dist.world,
        "precision": setup.precision,
        "base_precision": tc.base_precision,
        "rows": len(items),
        "tokens_per_epoch": tokens_per_epoch,
        "epochs": round(epochs, 3),
        "steps": setup.total_steps,
        "trainable_params": sum(p.numel() for p in setup.params),
        "weights_gib": round(setup.weights_gib, 3),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda"
        else round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),  # CPU: peak RSS
        "measured_tokens_per_s": round(tokens_per_s, 1),
        "expected_hours": round(tokens_per_epoch * epochs / tokens_per_s / 3600, 3) if tokens_per_s else None,
    }
