"""LoRA training through PEFT: the seed recipe's hyper-parameters, a plain loop that reads top to bottom.

The recipe mirrors the seed (transformers Trainer + Adafactor): Adafactor with a fixed learning rate
(`scale_parameter=False, relative_step=False`), linear warm-up then linear decay, gradient clipping at 1.0, loss
averaged over every trained token of the accumulation window. A loop of our own rather than Trainer: it is what
checkpoint-exact resume, packed varlen batches and the fast GPU path build on.

Output folder `adapter/`: the PEFT adapter (adapter_model.safetensors, adapter_config.json), `metrics.jsonl`
(one line per optimizer step, plus validation lines) and `train_report.json`.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medtune.artifacts import RunDir, atomic_write_json
from medtune.config import Config
from medtune.data.prepare import load_packs, load_split
from medtune.errors import MedtuneError
from medtune.models import load_model, load_tokenizer, resolve_base
from medtune.ui import UI

IGNORE = -100


def pick_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise MedtuneError("train.device is 'cuda' but no CUDA GPU is visible; use train.device=auto or cpu")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def pick_precision(choice: str, device: torch.device) -> str:
    """auto: bf16 on GPUs that support it, else fp16 with loss scaling; fp32 on CPU."""
    if device.type == "cpu":
        if choice in ("fp16",):
            raise MedtuneError("train.precision fp16 needs a GPU; use precision auto or fp32 on CPU")
        return "fp32" if choice == "auto" else choice
    if choice == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return choice


Example = tuple[np.ndarray, np.ndarray]  # (token ids, loss mask)


def collate(rows: list[list[Example]], pad_id: int) -> dict[str, torch.Tensor]:
    """One row per list of examples (one example, or several packed), padded to the longest row.

    Position ids restart at every example and at the padding, and no attention mask is passed: transformers then
    keeps attention inside each example (block-diagonal causal mask; variable-length with flash attention).
    Labels are -100 on prompt and padding, so only reply tokens and their end-of-turn token carry loss.
    """
    width = max(sum(len(ids) for ids, _ in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        at = 0
        for ids, mask in row:
            n = len(ids)
            t = torch.from_numpy(np.asarray(ids, dtype=np.int64))
            input_ids[i, at : at + n] = t
            labels[i, at : at + n] = torch.where(torch.from_numpy(np.asarray(mask, dtype=bool)), t, IGNORE)
            positions[i, at : at + n] = torch.arange(n)
            at += n
        positions[i, at:] = torch.arange(width - at)
    # Causal LM: position t predicts token t+1, so the label of a reply token sits one step to the left.
    labels = torch.cat([labels[:, 1:], torch.full((len(rows), 1), IGNORE)], dim=1)
    real = sum(len(ids) for row in rows for ids, _ in row)
    return {"input_ids": input_ids, "position_ids": positions, "labels": labels, "real_tokens": torch.tensor(real)}


def token_loss_sum(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    # use_cache=False: with a cache transformers would not derive the per-example mask from position ids.
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    labels = batch["labels"]
    loss = torch.nn.functional.cross_entropy(
        logits.float().view(-1, logits.size(-1)), labels.view(-1), ignore_index=IGNORE, reduction="sum"
    )
    return loss, int((labels != IGNORE).sum())


@torch.no_grad()
def evaluate_loss(model, rows: list[list[Example]], batch_size: int, pad_id: int, device, autocast) -> float | None:
    if not rows:
        return None
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        batch = {k: v.to(device) for k, v in collate(rows[i : i + batch_size], pad_id).items()}
        with autocast():
            loss, n = token_loss_sum(model, batch)
        total, count = total + float(loss), count + n
    model.train()
    return total / max(1, count)


def build_optimizer(cfg: Config, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.train.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        # What transformers' Trainer builds for optim="adafactor": a fixed external learning rate.
        return Adafactor(params, lr=cfg.train.lr, scale_parameter=False, relative_step=False, warmup_init=False,
                         weight_decay=cfg.train.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)


def run(cfg: Config, run_dir: RunDir, out: Path, ui: UI) -> dict[str, Any]:
    """Train a LoRA adapter on the prepared data; write it and its metrics to `out`."""
    from peft import LoraConfig, get_peft_model
    from transformers import get_linear_schedule_with_warmup

    prepared = run_dir.require("prepared", "medtune data CONFIG")
    torch.manual_seed(cfg.seed)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = pick_device(cfg.train.device)
    precision = pick_precision(cfg.train.precision, device)
    base = resolve_base(cfg.base.model, cfg.base.revision)
    tokenizer = load_tokenizer(base)
    train_examples = load_split(prepared, "train")
    packs = load_packs(prepared, "train")
    train_rows = [[train_examples[i] for i in p] for p in packs] if packs else [[e] for e in train_examples]
    val_rows = [[e] for e in load_split(prepared, "val")]

    # fp16 trains fp32 master weights under autocast with a loss scaler (as the seed's Trainer did); bf16 keeps
    # the frozen base in bf16 and the LoRA weights in fp32 (PEFT's autocast_adapter_dtype).
    model = load_model(base, dtype=torch.bfloat16 if precision == "bf16" else torch.float32, device=str(device))
    model.config.use_cache = False
    tied = {"lm_head", "embed_tokens"} & set(cfg.train.lora.target_modules)
    if tied and getattr(model.config, "tie_word_embeddings", False):
        raise MedtuneError(f"train.lora.target_modules: {sorted(tied)} are tied in this model; keep LoRA off them")
    lora = LoraConfig(
        r=cfg.train.lora.r,
        lora_alpha=cfg.train.lora.alpha,
        lora_dropout=cfg.train.lora.dropout,
        target_modules=cfg.train.lora.target_modules,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)

    amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)

    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)

    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
    micro_per_epoch = math.ceil(len(train_rows) / cfg.train.batch_size)
    steps_per_epoch = math.ceil(micro_per_epoch / cfg.train.grad_accum)
    total_steps = cfg.train.max_steps or math.ceil(steps_per_epoch * cfg.train.epochs)
    optimizer = build_optimizer(cfg, params)
    scheduler = get_linear_schedule_with_warmup(optimizer, cfg.train.warmup_steps, total_steps)

    def micro_batches():
        epoch = 0
        while True:
            order = torch.randperm(len(train_rows), generator=torch.Generator().manual_seed(cfg.seed + epoch))
            for i in range(0, len(order), cfg.train.batch_size):
                yield epoch, [train_rows[j] for j in order[i : i + cfg.train.batch_size].tolist()]
            epoch += 1

    val_before = evaluate_loss(model, val_rows, cfg.train.batch_size, tokenizer.pad_token_id, device, autocast)
    batches = micro_batches()
    metrics_path = out / "metrics.jsonl"
    start = time.perf_counter()
    seen_tokens = 0
    last: dict[str, Any] = {}
    task = ui.task("train", total=total_steps)
    with open(metrics_path, "w", encoding="utf-8") as log:
        for step in range(total_steps):
            window = [next(batches) for _ in range(cfg.train.grad_accum)]
            epoch = window[-1][0]
            collated = [collate(rows, tokenizer.pad_token_id) for _, rows in window]
            n_target = sum(int((b["labels"] != IGNORE).sum()) for b in collated)
            loss_sum = 0.0
            for batch in collated:
                batch = {k: v.to(device) for k, v in batch.items()}
                with autocast():
                    loss, _ = token_loss_sum(model, batch)
                scaler.scale(loss / n_target).backward()
                loss_sum += float(loss.detach())
                seen_tokens += int(batch["real_tokens"])
            scaler.unscale_(optimizer)
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm))
            loss_value = loss_sum / n_target
            if not math.isfinite(loss_value):
                raise MedtuneError(f"train: loss is {loss_value} at step {step + 1}; lower train.lr or check the data")
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            elapsed = time.perf_counter() - start
            last = {
                "step": step + 1,
                "epoch": epoch,
                "loss": round(loss_value, 5),
                "lr": lr,
                "grad_norm": round(grad_norm, 4),
                "tokens": seen_tokens,
                "tokens_per_s": round(seen_tokens / elapsed, 1),
                "elapsed_s": round(elapsed, 2),
            }
            if (step + 1) % cfg.train.logging_steps == 0 or step + 1 == total_steps:
                log.write(json.dumps(last) + "\n")
                log.flush()
            ui.update(task, completed=step + 1, description=f"train loss {loss_value:.3f} lr {lr:.2e}")
        val_after = evaluate_loss(model, val_rows, cfg.train.batch_size, tokenizer.pad_token_id, device, autocast)
        log.write(json.dumps({"step": total_steps, "val_loss": val_after}) + "\n")

    model.save_pretrained(out)
    report = {
        "device": str(device),
        "precision": precision,
        "steps": total_steps,
        "trainable_params": n_trainable,
        "train_rows": len(train_rows),
        "final_loss": last.get("loss"),
        "val_loss_before": val_before,
        "val_loss_after": val_after,
        "tokens": seen_tokens,
        "tokens_per_s": last.get("tokens_per_s"),
        "elapsed_s": last.get("elapsed_s"),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }
    atomic_write_json(out / "train_report.json", report)
    return report
