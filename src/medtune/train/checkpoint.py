"""Training checkpoints: everything needed to continue a run exactly where it stopped.

A checkpoint is a folder `step-NNNNNNNN/` under `<run>/checkpoints/<key>/` (key: a fingerprint of the training
config and data, so a changed config never resumes from a foreign checkpoint) holding the adapter weights, the
optimizer, scheduler and loss-scaler states, the RNG states and the step; the data position follows from the step
(the batch order is a pure function of seed and epoch). Each process of a multi-GPU run gets its own RNG state back
(LoRA dropout draws differ between processes). Folders are written under a temporary name and renamed, so
a checkpoint that exists is complete; the newest `keep` are kept.
"""

from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

PREFIX = "step-"


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(root: Path, step: int, model: Any, optimizer: Any, scheduler: Any, scaler: Any, keep: int,
         rng: list[dict[str, Any]]) -> Path:
    """`rng`: every process's `rng_state()`, in rank order."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{PREFIX}{step:08d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{final.name}.", suffix=".partial"))
    try:
        model.save_pretrained(tmp)
        torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(), "rng": rng}, tmp / "trainer_state.pt")
        for path in tmp.iterdir():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in sorted(root.glob(f"{PREFIX}*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest(root: Path) -> Path | None:
    found = sorted(p for p in root.glob(f"{PREFIX}*") if (p / "trainer_state.pt").is_file()) if root.is_dir() else []
    return found[-1] if found else None


def load(path: Path, model: Any, optimizer: Any, scheduler: Any, scaler: Any, rank: int = 0) -> int:
    """Restore a checkpoint into freshly built objects (this process's RNG state: `rank`'s); returns its step."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(path / "adapter_model.safetensors"))
    state = torch.load(path / "trainer_state.pt", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    states = state["rng"] if isinstance(state["rng"], list) else [state["rng"]]
    set_rng_state(states[rank % len(states)])
    if rank >= len(states):  # more processes than the checkpoint has states for: a stream of its own
        torch.manual_seed(int(torch.randint(2**62, (1,))) + rank)
    return int(state["step"])
