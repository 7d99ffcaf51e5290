"""Preference objectives on pairs of replies to one prompt: DPO (with its loss variants and an optional NLL term on
the chosen reply, which makes it RPO) and ORPO.

A pair is one row: the chosen conversation, then the rejected one, position ids restarting at each, so attention
never crosses from one to the other (packed like SFT rows). With a variable-length attention (GPU) all the pairs of
a micro-batch share one row, so no padding is computed between them. The head returns each labelled token's
log-probability (never the full vocabulary's logits for the batch); a sequence's is the sum over its reply tokens.

DPO's reference is the starting model itself (the adapter disabled): its log-probabilities are computed once before
training (`reference_logps`), stored next to the run's checkpoints and attached to the pairs, so a resumed run reads
them back. ORPO needs no reference.

Formulas as TRL's DPOTrainer / ORPOTrainer write them (Rafailov et al. 2023; Azar et al. 2023 for IPO; Chowdhury et
al. 2024 for robust DPO; Hong et al. 2024 for ORPO). The NLL term is the chosen reply's mean negative log-likelihood
per token, per pair (Pang et al. 2024), averaged over pairs like the DPO loss.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from medtune.config import PreferenceConfig
from medtune.prepared import load_split
from medtune.train.objectives.sft import LOSS_INPUTS, Example, collate

# (chosen, rejected, reference log-probabilities of both or None)
Pair = tuple[Example, Example, tuple[float, float] | None]

FLAT_MULTIPLE = 256  # a flat row's width is rounded up to this: few distinct shapes for a compiled decoder
DPO_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
               "logps/rejected", "nll")
ORPO_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
                "logps/rejected", "nll", "log_odds_ratio", "log_odds")


def dpo_losses(pi_c: torch.Tensor, pi_r: torch.Tensor, ref_c: torch.Tensor, ref_r: torch.Tensor,
               pc: PreferenceConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair DPO loss and the implicit rewards of chosen and rejected (log-probabilities already averaged per
    token for `ipo`)."""
    beta, smooth = pc.beta, pc.label_smoothing
    logits = (pi_c - pi_r) - (ref_c - ref_r)
    if pc.loss == "sigmoid":
        losses = -F.logsigmoid(beta * logits) * (1 - smooth) - F.logsigmoid(-beta * logits) * smooth
    elif pc.loss == "robust":
        losses = (-F.logsigmoid(beta * logits) * (1 - smooth) + F.logsigmoid(-beta * logits) * smooth) \
            / (1 - 2 * smooth)
    elif pc.loss == "hinge":
        losses = torch.relu(1 - beta * logits)
    else:  # ipo
        losses = (logits - 1 / (2 * beta)) ** 2
    return losses, beta * (pi_c - ref_c).detach(), beta * (pi_r - ref_r).detach()


def orpo_losses(mean_c: torch.Tensor, mean_r: torch.Tensor, pc: PreferenceConfig
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair odds-ratio term (to be subtracted, times lambda) and log-odds, from per-token mean log-probs."""
    # log(1 - p) as log(-expm1(log p)): exact near p = 1, where log1p(-exp(.)) loses every digit
    log_odds = (mean_c - mean_r) - (torch.log(-torch.expm1(mean_c)) - torch.log(-torch.expm1(mean_r)))
    ratio = F.logsigmoid(log_odds)
    return ratio, log_odds.detach(), pc.orpo_lambda * mean_c.detach(), pc.orpo_lambda * mean_r.detach()


class Preference:
    device_keys = (*LOSS_INPUTS, "sequence", "lengths", "reference")

    def __init__(self, kind: str, pc: PreferenceConfig, pad_id: int, width: int | None = None,
                 flat: bool = False) -> None:
        self.name, self.pc, self.pad_id, self.width, self.flat = kind, pc, pad_id, width, flat
        self.metric_names = ORPO_METRICS if kind == "orpo" else DPO_METRICS
        self.needs_reference = kind == "dpo"

    def load(self, prepared: Path, split: str) -> list[Pair]:
        examples = load_split(prepared, split)
        return [(examples[k], examples[k + 1], None) for k in range(0, len(examples) - 1, 2)]

    @staticmethod
    def with_reference(pairs: list[Pair], reference: np.ndarray) -> list[Pair]:
        """The pairs with the reference model's (chosen, rejected) log-probabilities attached."""
        return [(c, r, (float(a), float(b))) for (c, r, _), (a, b) in zip(pairs, reference)]

    def collate(self, items: list[Pair]) -> dict[str, torch.Tensor]:
        """One row per pair (chosen, then rejected), or with `flat` one row holding every sequence of the batch
        (variable-length attention on a GPU: no padding between pairs), padded to a multiple of FLAT_MULTIPLE."""
        sequences = [side for c, r, _ in items for side in (c, r)]
        if self.flat:
            total = sum(len(ids) for ids, _ in sequences)
            batch = collate([sequences], self.pad_id, -(-total // FLAT_MULTIPLE) * FLAT_MULTIPLE)
        else:
            batch = collate([[c, r] for c, r, _ in items], self.pad_id, self.width)
        # which sequence each labelled position belongs to; a sequence's last position predicts the next
        # sequence's first token, a prompt token, so no label straddles two sequences
        sequence = torch.full(batch["input_ids"].shape, -1, dtype=torch.long).reshape(-1)
        width = batch["input_ids"].shape[1]
        at = 0
        for k, (ids, _) in enumerate(sequences):
            if not self.flat and k % 2 == 0:
                at = (k // 2) * width
            sequence[at : at + len(ids)] = k
            at += len(ids)
        batch["sequence"] = sequence[batch["label_index"]]
        batch["lengths"] = torch.bincount(batch["sequence"], minlength=len(sequences))
        batch["reference"] = torch.tensor([ref or (0.0, 0.0) for _, _, ref in items], dtype=torch.float32)
        return batch

    def counts(self, items: list[Pair]) -> tuple[int, int]:
        return sum(len(c[0]) + len(r[0]) for c, r, _ in items), len(items)

    def sequence_logps(self, loss_model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(pairs, 2) summed log-probabilities of the chosen and rejected replies."""
        token_logps = loss_model(*(batch[key] for key in LOSS_INPUTS), per_token=True)
        sums = token_logps.new_zeros(batch["lengths"].numel()).index_add(0, batch["sequence"], token_logps)
        return sums.view(-1, 2)

    def loss(self, loss_model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        logps = self.sequence_logps(loss_model, batch)
        lengths = batch["lengths"].view(-1, 2).clamp(min=1).float()
        pi_c, pi_r = logps[:, 0], logps[:, 1]
        mean = logps / lengths
        nll = -mean[:, 0]
        if self.name == "orpo":
            ratio, log_odds, reward_c, reward_r = orpo_losses(mean[:, 0], mean[:, 1], self.pc)
            losses = nll - self.pc.orpo_lambda * ratio
            extra = [ratio.detach(), log_odds]
        else:
            ref = batch["reference"]
            if self.pc.loss == "ipo":  # IPO compares per-token means
                losses, reward_c, reward_r = dpo_losses(mean[:, 0], mean[:, 1], ref[:, 0] / lengths[:, 0],
                                                        ref[:, 1] / lengths[:, 1], self.pc)
            else:
                losses, reward_c, reward_r = dpo_losses(pi_c, pi_r, ref[:, 0], ref[:, 1], self.pc)
            if self.pc.nll_weight:
                losses = losses + self.pc.nll_weight * nll
            extra = []
        metrics = torch.stack([reward_c.sum(), reward_r.sum(), (reward_c - reward_r).sum(),
                               (reward_c > reward_r).float().sum(), pi_c.detach().sum(), pi_r.detach().sum(),
                               nll.detach().sum(), *(e.sum() for e in extra)])
        return losses.sum(), metrics


@torch.no_grad()
def reference_logps(objective: Preference, loss_model: torch.nn.Module, model: Any, pairs: list[Pair],
                    batch_size: int, device: torch.device, autocast: Any, rank: int = 0, world: int = 1
                    ) -> np.ndarray:
    """(pairs, 2) log-probabilities of chosen and rejected under the starting model (the adapter disabled).

    Each process computes every `world`-th micro-batch; every process runs the same number of forward passes
    (the last ones repeat a batch) so that sharded weights are gathered in step. Rows this process did not compute
    are NaN; the caller sums the processes' arrays after replacing NaN by 0."""
    out = np.full((len(pairs), 2), np.nan, dtype=np.float64)
    starts = list(range(0, len(pairs), batch_size))
    rounds = -(-len(starts) // world)
    was_training = loss_model.training
    loss_model.eval()
    with model.disable_adapter():
        for k in range(rounds):
            index = k * world + rank
            start = starts[index % len(starts)]
            items = pairs[start : start + batch_size]
            batch = {key: t.to(device, non_blocking=True) for key, t in objective.collate(items).items()
                     if key in objective.device_keys}
            with autocast():
                logps = objective.sequence_logps(loss_model, batch)
            if index < len(starts):
                out[start : start + len(items)] = logps.double().cpu().numpy()
    loss_model.train(was_training)
    return out
