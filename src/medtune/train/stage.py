"""LoRA training through PEFT: the seed recipe's hyper-parameters, a plain loop that reads top to bottom.

The recipe mirrors the seed (transformers Trainer + Adafactor): Adafactor with a fixed learning rate
(`scale_parameter=False, relative_step=False`), linear warm-up then linear decay, gradient clipping at 1.0, loss
averaged over every trained token of the accumulation window. A loop of our own rather than Trainer: it is what
checkpoint-exact resume, packed varlen batches and the fast GPU path build on.

Output folder `adapter/`: the PEFT adapter (adapter_model.safetensors, adapter_config.json), `metrics.jsonl`
(one line per optimizer step, plus validation lines) and `train_report.json`.
"""

from __future__ import annotations

import math
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medtune.artifacts import RunDir, atomic_write_json, fingerprint
from medtune.config import Config
from medtune.prepared import load_packs, load_split
from medtune.errors import MedtuneError
from medtune.models import load_model, load_tokenizer, resolve_base
from medtune.train import checkpoint
from medtune.train.attention import cu_seq_lens
from medtune.train.loss import IGNORE, CausalLMLoss, label_positions
from medtune.train.observe import MetricsLog, plot, read_metrics
from medtune.train.optim import Adafactor
from medtune.train.parallel import Distributed, shard
from medtune.ui import UI


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


def collate(rows: list[list[Example]], pad_id: int, width: int | None = None) -> dict[str, torch.Tensor]:
    """One row per list of examples (one example, or several packed), padded to the longest row.

    Position ids restart at every example and at the padding, and no attention mask is passed: transformers then
    keeps attention inside each example (block-diagonal causal mask; variable-length with flash attention).
    Labels are -100 on prompt and padding, so only reply tokens and their end-of-turn token carry loss.
    `width`: pad to at least this many columns (packed rows: the packing length, so every batch has one shape and
    a compiled model compiles once).
    """
    width = max(width or 0, max(sum(len(ids) for ids, _ in row) for row in rows))
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
    label_index, targets = label_positions(labels)
    return {"input_ids": input_ids, "position_ids": positions, "labels": labels, "label_index": label_index,
            "targets": targets, "cu_seq_lens": cu_seq_lens(positions)}


def counts(rows: list[list[Example]]) -> tuple[int, int]:
    """(real tokens, labelled tokens) of a micro-batch, without collating it: what `collate` would produce."""
    real = labelled = 0
    for row in rows:
        real += sum(len(ids) for ids, _ in row)
        # the label of position t is token t+1: a row's first token is never a target
        labelled += sum(int(np.count_nonzero(mask)) for _, mask in row) - int(bool(row[0][1][0]))
    return real, labelled


def load_rows(prepared: Path, split: str) -> tuple[list[list[Example]], bool]:
    """The rows of a prepared split (packed rows when the data stage packed it, else one example a row)."""
    examples = load_split(prepared, split)
    packs = load_packs(prepared, split)
    return ([[examples[i] for i in p] for p in packs] if packs else [[e] for e in examples]), packs is not None


LOSS_INPUTS = ("input_ids", "position_ids", "label_index", "targets", "cu_seq_lens")


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {key: batch[key].to(device, non_blocking=True) for key in LOSS_INPUTS}


def token_loss_sum(loss_model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed loss over the batch's labelled tokens (batch already on the device)."""
    return loss_model(*(batch[key] for key in LOSS_INPUTS))


@torch.no_grad()
def evaluate_loss(model, rows: list[list[Example]], batch_size: int, pad_id: int, device, autocast,
                  width: int | None = None) -> float | None:
    if not rows:
        return None
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(rows), batch_size):
        batch = collate(rows[i : i + batch_size], pad_id, width)
        with autocast():
            loss = token_loss_sum(model, to_device(batch, device))
        total, count = total + float(loss), count + batch["targets"].numel()
    model.train()
    return total / max(1, count)


def build_optimizer(cfg: Config, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if cfg.train.optimizer == "adafactor":
        # What transformers' Trainer builds for optim="adafactor" (a fixed external learning rate), batched.
        return Adafactor(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)


def apply_lora(model: Any, cfg: Config, ui: UI) -> Any:
    from peft import LoraConfig, get_peft_model

    lora = cfg.train.lora
    tied = {"lm_head", "embed_tokens"} & set(lora.target_modules)
    if tied and getattr(model.config, "tie_word_embeddings", False):
        ui.log(f"[yellow]warning: LoRA on {sorted(tied)}, which are tied in this model: the adapter changes both the "
               "input embeddings and the output head[/]")
    config = LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
                        use_dora=lora.dora, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def load_base_for_training(base: str, precision: str, device: torch.device, qlora: bool, attention: str) -> Any:
    """fp16 trains fp32 master weights under autocast with a loss scaler (as the seed's Trainer did); bf16 keeps the
    frozen base in bf16 and the LoRA weights in fp32 (PEFT's autocast_adapter_dtype); QLoRA loads it in 4-bit."""
    if attention == "varlen":
        from medtune.train.attention import register

        register()
    if not qlora:
        return load_model(base, dtype=torch.bfloat16 if precision == "bf16" else torch.float32, device=str(device),
                          attention=attention)
    if device.type != "cuda":
        raise MedtuneError("train.qlora needs a CUDA GPU (bitsandbytes 4-bit); set train.qlora=false on this machine")
    try:
        import bitsandbytes  # noqa: F401
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    except ImportError:
        raise MedtuneError("train.qlora needs bitsandbytes: pip install bitsandbytes") from None
    from peft import prepare_model_for_kbit_training

    compute = torch.bfloat16 if precision == "bf16" else torch.float16
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute,
                               bnb_4bit_use_double_quant=True)
    extra = {} if attention == "auto" else {"attn_implementation": attention}
    model = AutoModelForCausalLM.from_pretrained(base, quantization_config=quant, device_map={"": device.index or 0},
                                                 **extra)
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def resume_key(cfg: Config, run_dir: RunDir) -> str:
    """Checkpoints belong to one training config on one prepared data set."""
    return fingerprint({"train": cfg.train.model_dump(mode="json"), "seed": cfg.seed,
                        "data": (run_dir.manifest("prepared") or {}).get("fingerprint")})


class StepStats:
    """One optimizer step's numbers. Loss and gradient norm are copied to the host without waiting; `read` waits
    for that copy only, by when the GPU has long moved on to the next step."""

    def __init__(self, step: int, epoch: int, lr: float, tokens: int, loss: torch.Tensor, grad_norm: torch.Tensor):
        self.step, self.epoch, self.lr, self.tokens = step, epoch, lr, tokens
        self.val_loss: float | None = None
        values = torch.stack([loss.float(), grad_norm.float()])
        self.event = None
        if values.is_cuda:
            self.host = torch.empty(2, dtype=torch.float32, pin_memory=True)
            self.host.copy_(values, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = values

    def read(self) -> tuple[float, float]:
        if self.event is not None:
            self.event.synchronize()
        loss, grad_norm = self.host.tolist()
        return loss, grad_norm


def run(cfg: Config, run_dir: RunDir, out: Path, ui: UI, dry_run: bool = False) -> dict[str, Any]:
    """Train a LoRA adapter on the prepared data; write it and its metrics to `out`.

    Resumes from the newest checkpoint of the same config and data, if any. With `dry_run`, times a few steps and
    returns the plan (tokens, steps, memory, expected time) without training.
    """
    from transformers import get_linear_schedule_with_warmup

    tc = cfg.train
    prepared = run_dir.require("prepared", "medtune data CONFIG")
    dist = Distributed()
    if tc.threads:
        torch.set_num_threads(tc.threads)
    device = torch.device("cuda", dist.local_rank) if dist.world > 1 and torch.cuda.is_available() \
        else pick_device(tc.device)
    precision = pick_precision(tc.precision, device)
    if tc.attention in ("varlen", "flex_attention") and device.type != "cuda":
        raise MedtuneError(f"train.attention {tc.attention} trains on a CUDA GPU only (PyTorch has no CPU backward "
                           "for it); use train.attention=auto on this machine")
    base = resolve_base(cfg.base.model, cfg.base.revision)
    tokenizer = load_tokenizer(base)
    pad_id = tokenizer.pad_token_id
    train_rows, packed = load_rows(prepared, "train")
    val_rows, _ = load_rows(prepared, "val")
    # packed rows are padded to the packing length: one batch shape, so a compiled model compiles once
    width = cfg.data.max_len if packed else None

    if tc.strategy == "fsdp" and (tc.qlora or tc.compile):
        raise MedtuneError("train.strategy fsdp does not combine with train.qlora or train.compile yet; set those "
                           "to false, or use strategy ddp")
    torch.manual_seed(cfg.seed)  # the same LoRA initialisation on every process
    sharded = tc.strategy == "fsdp" and dist.world > 1
    model = apply_lora(load_base_for_training(base, precision, torch.device("cpu") if sharded else device, tc.qlora,
                                              tc.attention), cfg, ui)
    if tc.compile:
        # In place (Module.compile), so parameter names and the saved adapter stay as they are. The loss's gather
        # of labelled positions has a data-dependent shape and stays outside the compiled graph.
        model.get_base_model().model.compile()
        ui.log("train: the decoder is compiled on its first batches (one to several minutes before the first step)")
    model.config.use_cache = False
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)
    loss_model = CausalLMLoss(model)
    if sharded:
        shard(loss_model, params, device, dist.world)
    # what this process holds (a sharded parameter's local part)
    weights_gib = round(sum(getattr(p, "_local_tensor", p).nbytes for p in model.parameters()) / 2**30, 4)
    torch.manual_seed(cfg.seed + dist.rank)  # LoRA dropout draws differ between processes

    amp_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)

    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)

    scaler = torch.amp.GradScaler("cuda", enabled=precision == "fp16")
    window = tc.grad_accum * dist.world  # micro-batches per optimizer step, over all processes
    micro_per_epoch = math.ceil(len(train_rows) / tc.batch_size)
    steps_per_epoch = math.ceil(micro_per_epoch / window)
    total_steps = tc.max_steps or math.ceil(steps_per_epoch * tc.epochs)
    optimizer = build_optimizer(cfg, params)
    scheduler = get_linear_schedule_with_warmup(optimizer, tc.warmup_steps, total_steps)

    def micro_batches(skip: int):
        """The global order of micro-batches: a pure function of seed and epoch, so a resumed run continues it."""
        epoch, k = 0, 0
        while True:
            order = torch.randperm(len(train_rows), generator=torch.Generator().manual_seed(cfg.seed + epoch))
            for i in range(0, len(order), tc.batch_size):
                if k >= skip:
                    yield epoch, [train_rows[j] for j in order[i : i + tc.batch_size].tolist()]
                k += 1
            epoch += 1

    if dry_run:
        from medtune.train.plan import dry_run_plan

        return dry_run_plan(cfg, loss_model, params, train_rows, total_steps, window, pad_id, width, device,
                            precision, autocast, scaler, optimizer, weights_gib, dist)

    ckpt_root = run_dir / "checkpoints" / resume_key(cfg, run_dir)
    start_step = 0
    found = checkpoint.latest(ckpt_root)
    if found is not None:
        start_step = checkpoint.load(found, model, optimizer, scheduler, scaler, dist.rank)
        ui.log(f"train: resuming from {found} (step {start_step} of {total_steps})")
    else:
        dist.broadcast_(params)  # identical already; made certain, as DDP would
    if dist.main:
        log = MetricsLog(ckpt_root / "metrics.jsonl", ckpt_root / "tensorboard" if tc.tensorboard else None,
                         resume_step=start_step)
    if start_step == 0:
        val_before = evaluate_loss(loss_model, val_rows, tc.batch_size, pad_id, device, autocast, width)
        if dist.main:
            log.write({"step": 0, "val_loss": val_before})
    else:  # measured before the first step, by the run being resumed; read where the log is written
        val_before = next((m["val_loss"] for m in read_metrics(ckpt_root / "metrics.jsonl") if m["step"] == 0),
                          None) if dist.main else None

    def windows():
        """Each optimizer step: its epoch, labelled and real tokens over all processes, and this process's
        micro-batches, collated (CPU work)."""
        batches = micro_batches(skip=start_step * window)
        while True:
            group = [next(batches) for _ in range(window)]
            real, labelled = map(sum, zip(*(counts(rows) for _, rows in group)))
            yield group[-1][0], labelled, real, [collate(rows, pad_id, width)
                                                 for _, rows in group[dist.rank :: dist.world]]

    upcoming = windows()
    current = next(upcoming)
    start = time.perf_counter()
    seen_tokens = 0
    last: dict[str, Any] = {}
    pending: StepStats | None = None
    task = ui.task("train", total=total_steps)
    ui.update(task, completed=start_step)

    def finish(stats: StepStats) -> dict[str, Any]:
        """The host's side of a finished step: check the loss, log, show progress."""
        loss_value, grad_norm = stats.read()
        if not math.isfinite(loss_value):
            kept = checkpoint.latest(ckpt_root)
            raise MedtuneError(f"train: loss is {loss_value} at step {stats.step}; stopped. The last good checkpoint "
                               f"is {kept or '(none yet)'}; lower train.lr or check the data, then run again")
        elapsed = time.perf_counter() - start
        record = {"step": stats.step, "epoch": stats.epoch, "loss": round(loss_value, 5), "lr": stats.lr,
                  "grad_norm": round(grad_norm, 4), "tokens": stats.tokens,
                  "tokens_per_s": round(stats.tokens / elapsed, 1), "elapsed_s": round(elapsed, 2)}
        if stats.val_loss is not None:
            record["val_loss"] = stats.val_loss
        if dist.main and (stats.step % tc.logging_steps == 0 or stats.step == total_steps
                          or stats.val_loss is not None):
            log.write(record)
        ui.update(task, completed=stats.step, description=f"train loss {loss_value:.3f} lr {stats.lr:.2e} "
                  f"{record['tokens_per_s']:,.0f} tok/s")
        return record

    for step in range(start_step, total_steps):
        epoch, n_target, step_tokens, collated = current
        loss_sum = torch.zeros((), device=device)
        for batch in collated:
            with autocast():
                loss = token_loss_sum(loss_model, to_device(batch, device))
            scaler.scale(loss / n_target).backward()  # summed over processes: the mean over the global batch
            loss_sum += loss.detach()
        dist.reduce_grads(params)
        dist.sum_(loss_sum)
        # Collate the next step while the device works through this one, then read the previous step's numbers
        # (finished by now): the host never waits for the GPU inside a step.
        current = next(upcoming) if step + 1 < total_steps else current
        if pending is not None:
            last, pending = finish(pending), None
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        lr = scheduler.get_last_lr()[0]
        scheduler.step()
        seen_tokens += step_tokens
        stats = StepStats(step + 1, epoch, lr, seen_tokens, loss_sum / n_target, grad_norm)
        done = step + 1 == total_steps
        save = (step + 1) % tc.checkpoint_steps == 0 or done
        if tc.eval_steps and (step + 1) % tc.eval_steps == 0 and not done:
            stats.val_loss = evaluate_loss(loss_model, val_rows, tc.batch_size, pad_id, device, autocast, width)
        if save or stats.val_loss is not None:  # checked before anything is written
            last = finish(stats)
        else:
            pending = stats
        if save:
            rng = dist.gather(checkpoint.rng_state())
            if dist.main:
                checkpoint.save(ckpt_root, step + 1, model, optimizer, scheduler, scaler, tc.keep_checkpoints, rng)

    val_after = evaluate_loss(loss_model, val_rows, tc.batch_size, pad_id, device, autocast, width)
    report = {
        "device": str(device), "precision": precision, "world_size": dist.world,
        "strategy": tc.strategy if dist.world > 1 else None, "steps": total_steps,
        "weights_gib_per_process": weights_gib,
        "resumed_from_step": start_step, "trainable_params": n_trainable, "train_rows": len(train_rows),
        "packed": packed, "final_loss": last.get("loss"), "val_loss_before": val_before,
        "val_loss_after": val_after, "tokens_per_s": last.get("tokens_per_s"), "elapsed_s": last.get("elapsed_s"),
        "threads": torch.get_num_threads(),
        "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda"
        else None,
    }
    if dist.main:
        log.write({"step": total_steps, "val_loss": val_after})
        log.close()
        model.save_pretrained(out)
        shutil.copyfile(ckpt_root / "metrics.jsonl", out / "metrics.jsonl")
        if tc.tensorboard:
            shutil.copytree(ckpt_root / "tensorboard", out / "tensorboard")
        plot(read_metrics(out / "metrics.jsonl"), out / "loss.png")
        atomic_write_json(out / "train_report.json", report)
    return report
