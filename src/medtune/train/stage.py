"""The train stage: LoRA training through PEFT on the prepared data, with the objective of `train.objective`.

SFT follows the seed recipe (transformers Trainer + Adafactor): Adafactor with a fixed learning rate, linear warm-up
then linear decay, gradient clipping at 1.0, loss averaged over every trained token of the accumulation window. DPO
and ORPO train on preference pairs with the same engine (train/engine.py), normalised by the pairs of the step.
A loop of our own rather than Trainer: it is what checkpoint-exact resume, packed varlen batches and the fast GPU
path build on.

Output folder `adapter/`: the PEFT adapter (adapter_model.safetensors, adapter_config.json), `metrics.jsonl`
(one line per optimizer step, plus validation lines), `loss.png`, TensorBoard events and `train_report.json`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medtune.artifacts import PREPARED, RunDir, atomic_write_json, fingerprint
from medtune.config import Config
from medtune.errors import MedtuneError
from medtune.models import load_tokenizer, resolve_base
from medtune.train import engine, memory, objectives
from medtune.train import setup as setups
from medtune.train.objectives.preference import reference_logps
from medtune.train.observe import plot, read_metrics
from medtune.ui import UI


def resume_key(cfg: Config, run_dir: RunDir) -> str:
    """Checkpoints belong to one training config on one prepared data set."""
    return fingerprint({"train": cfg.train.model_dump(mode="json"), "seed": cfg.seed,
                        "data": (run_dir.manifest(PREPARED) or {}).get("fingerprint")})


def reference_key(cfg: Config, run_dir: RunDir) -> str:
    """The reference log-probabilities depend on the starting model, the prepared pairs and the numerics. A starting
    model that is an earlier run's merged/ folder counts by its manifest's fingerprint: rebuilt, it is another model."""
    tc = cfg.train
    manifest = Path(cfg.base.model) / "manifest.json"
    built = json.loads(manifest.read_text(encoding="utf-8")).get("fingerprint") if manifest.is_file() else None
    # an FP8 base gives other log-probabilities; named only then, so references made before the setting stay valid
    fp8 = {"base_precision": tc.base_precision} if tc.base_precision != "bf16" else {}
    return fingerprint({"base": cfg.base.model_dump(mode="json"), "base_build": built, "precision": tc.precision,
                        "device": tc.device, "attention": tc.attention, "qlora": tc.qlora,
                        "data": (run_dir.manifest(PREPARED) or {}).get("fingerprint"), **fp8})


def prepared_kind(prepared: Path) -> str:
    """"pairs" or "conversations", as the data stage's report says."""
    report = prepared / "report.json"
    return json.loads(report.read_text(encoding="utf-8")).get("record_kind", "conversations") \
        if report.is_file() else "conversations"


def attach_reference(cfg: Config, run_dir: RunDir, s: setups.Setup, objective: Any, items: dict[str, list],
                     ui: UI) -> dict[str, list]:
    """DPO: the starting model's log-probabilities of every pair, computed once and kept under the run directory
    (reused by a resumed run and by any run on the same pairs and starting model)."""
    folder = run_dir / "reference" / reference_key(cfg, run_dir)
    out = {}
    for split, pairs in items.items():
        path = folder / f"{split}.npy"
        if path.is_file():
            reference = np.load(path)
        else:
            ui.log(f"train: reference log-probabilities of {len(pairs)} {split} pairs (the starting model)")
            part = reference_logps(objective, s.loss_model, s.model, pairs, s.cfg.train.batch_size, s.device,
                                   s.autocast, s.dist.rank, s.dist.world)
            reference = torch.from_numpy(np.nan_to_num(part, nan=0.0))
            reference = s.dist.sum_(reference.to(s.device)).cpu().numpy() if s.dist.world > 1 else reference.numpy()
            if s.dist.main:
                folder.mkdir(parents=True, exist_ok=True)
                tmp = folder / f".{split}.npy.partial"
                with open(tmp, "wb") as fh:
                    np.save(fh, reference)
                    fh.flush()
                    os.fsync(fh.fileno())
                tmp.replace(path)
        out[split] = objective.with_reference(pairs, reference)
    return out


def memory_plan(cfg: Config, ui: UI) -> dict[str, Any]:
    """The memory estimate per process against the device's memory (train/memory.py), logged at once."""
    from transformers import AutoConfig

    dist, device, precision = setups.placement(cfg)
    estimate = memory.estimate(cfg, AutoConfig.from_pretrained(resolve_base(cfg.base.model, cfg.base.revision)),
                               precision, dist.world, device)
    parts = ", ".join(f"{name} {value}" for name, value in estimate["per_process_gib"].items())
    if dist.main:
        ui.log(f"train: estimated peak {estimate['estimated_peak_gib']} GiB per process ({parts}) of "
               f"{estimate['device_memory_gib']} GiB on {device}" + ("" if estimate["fits"] else
               "; it does not fit: lower train.batch_size or data.max_len, or set train.gradient_checkpointing, "
               "train.base_precision fp8 (FP8 GPUs), train.qlora or train.strategy fsdp over more GPUs (nothing was "
               "loaded)"))
    return {"estimated_peak_gib": estimate["estimated_peak_gib"], "device_memory_gib": estimate["device_memory_gib"],
            "fits": estimate["fits"], "estimate_gib": estimate["per_process_gib"],
            "base_params": estimate["base_params"]}


def run(cfg: Config, run_dir: RunDir, out: Path, ui: UI, dry_run: bool = False) -> dict[str, Any]:
    """Train a LoRA adapter on the prepared data; write it and its metrics to `out`.

    Resumes from the newest checkpoint of the same config and data, if any. With `dry_run`, times a few steps and
    returns the plan (tokens, steps, memory, expected time) without training.
    """
    tc = cfg.train
    prepared = run_dir.require(PREPARED, "medtune data CONFIG")
    kind = prepared_kind(prepared)
    wanted = "conversations" if tc.objective == "sft" else "pairs"
    if kind != wanted:
        raise MedtuneError(f"train.objective is {tc.objective} but {prepared} holds {kind}; prepare the data again "
                           f"(medtune data CONFIG) or set train.objective to "
                           f"{'dpo or orpo' if kind == 'pairs' else 'sft'}")
    packed = (prepared / "train.packs.npy").is_file()
    pad_id = load_tokenizer(resolve_base(cfg.base.model, cfg.base.revision), cfg.base.chat_template).pad_token_id
    objective = objectives.build(tc, pad_id, cfg.data.max_len, packed)
    items = {split: objective.load(prepared, split) for split in ("train", "val")}
    if not items["train"]:
        raise MedtuneError(f"{prepared}: no training {kind}; check the data report (medtune data CONFIG)")
    if dry_run:  # does it fit, from the config alone, before the base is loaded
        fit = memory_plan(cfg, ui)
        if not fit["fits"]:
            return {"dry_run": True, **fit, "measured_tokens_per_s": None, "expected_hours": None}
    s = setups.build(cfg, len(items["train"]), ui)
    if getattr(objective, "needs_reference", False) and not dry_run:  # the timing does not need it
        items = attach_reference(cfg, run_dir, s, objective, items, ui)
    if dry_run:
        return engine.time_steps(s, objective, items["train"]) | fit

    ckpt_root = run_dir / "checkpoints" / resume_key(cfg, run_dir)
    result = engine.fit(s, objective, items["train"], items["val"], ckpt_root, ui)
    device = s.device
    report = {
        "objective": tc.objective, "device": str(device), "precision": s.precision,
        "base_precision": tc.base_precision, "world_size": s.dist.world,
        "strategy": tc.strategy if s.dist.world > 1 else None, "steps": s.total_steps,
        "weights_gib_per_process": s.weights_gib, "trainable_params": sum(p.numel() for p in s.params),
        "train_rows": len(items["train"]), "packed": packed, **result, "threads": torch.get_num_threads(),
        "peak_gpu_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda"
        else None,
    }
    if s.dist.main:
        s.model.save_pretrained(out)
        shutil.copyfile(ckpt_root / "metrics.jsonl", out / "metrics.jsonl")
        if tc.tensorboard:
            shutil.copytree(ckpt_root / "tensorboard", out / "tensorboard")
        plot(read_metrics(out / "metrics.jsonl"), out / "loss.png")
        atomic_write_json(out / "train_report.json", report)
    return report
