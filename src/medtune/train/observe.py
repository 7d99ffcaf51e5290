"""What a training run shows and records: metrics.jsonl, TensorBoard events, and a PNG of loss and lr at the end."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class MetricsLog:
    """Appends one JSON line per record to `path`; mirrors scalars to TensorBoard when asked."""

    def __init__(self, path: Path, tensorboard_dir: Path | None, resume_step: int = 0) -> None:
        self.path = path
        kept = []
        if resume_step and path.is_file():  # drop lines written after the checkpoint being resumed
            kept = [line for line in path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        self.fh = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self.tb = None
        if tensorboard_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(tensorboard_dir), purge_step=resume_step + 1 if resume_step else None)

    def write(self, record: dict[str, Any]) -> None:
        self.fh.write(json.dumps(record) + "\n")
        self.fh.flush()
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and value is not None:
                    self.tb.add_scalar(f"train/{key}" if key != "val_loss" else "val/loss", value, record["step"])

    def close(self) -> None:
        self.fh.close()
        if self.tb is not None:
            self.tb.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def plot(metrics: list[dict[str, Any]], out: Path) -> None:
    """Loss (train and validation) and learning rate against the step; preference runs add the reward margin and
    the share of pairs whose chosen reply is preferred."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(m["step"], m["loss"]) for m in metrics if "loss" in m]
    val = [(m["step"], m["val_loss"]) for m in metrics if m.get("val_loss") is not None]
    lr = [(m["step"], m["lr"]) for m in metrics if "lr" in m]
    margins = [(m["step"], m["rewards/margins"]) for m in metrics if "rewards/margins" in m]
    accuracies = [(m["step"], m["rewards/accuracies"]) for m in metrics if "rewards/accuracies" in m]
    panels = 3 if margins else 2
    fig, axes = plt.subplots(panels, 1, figsize=(8, 2 + 2 * panels), sharex=True,
                             height_ratios=[3, 2, 1] if margins else [3, 1])
    ax_loss, ax_lr = axes[0], axes[-1]
    if train:
        ax_loss.plot(*zip(*train), label="train", linewidth=1)
    if val:
        ax_loss.plot(*zip(*val), "o-", label="validation")
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    if margins:
        ax_pref = axes[1]
        ax_pref.plot(*zip(*margins), label="reward margin", linewidth=1, color="tab:purple")
        ax_pref.set_ylabel("reward margin")
        ax_acc = ax_pref.twinx()
        ax_acc.plot(*zip(*accuracies), label="chosen preferred", linewidth=1, color="tab:orange")
        ax_acc.set_ylabel("share chosen > rejected")
        ax_acc.set_ylim(0, 1)
        ax_pref.grid(alpha=0.3)
    if lr:
        ax_lr.plot(*zip(*lr), color="tab:green")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("optimizer step")
    ax_lr.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
