"""Preference objectives (DPO and its variants, RPO, ORPO): per-sequence log-probabilities of the fused head, the
losses against TRL's formulas, and the first step of a run."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_train_parts import tiny_lora

from medtune.config import PreferenceConfig
from medtune.train.loss import CausalLMLoss
from medtune.train.objectives.preference import Preference, orpo_losses


def random_pairs(rng: np.random.Generator, n: int, vocab: int = 300):
    """Pairs sharing a prompt (mask 0) with different replies (mask 1), as the data stage writes them."""
    pairs = []
    for _ in range(n):
        prompt = rng.integers(0, vocab, int(rng.integers(4, 12))).astype(np.int32)
        sides = []
        for _ in range(2):
            reply = rng.integers(0, vocab, int(rng.integers(3, 15))).astype(np.int32)
            sides.append((np.r_[prompt, reply], np.r_[np.zeros(len(prompt), np.uint8), np.ones(len(reply), np.uint8)]))
        pairs.append((sides[0], sides[1], None))
    return pairs


def full_logits_logps(model, pairs) -> torch.Tensor:
    """(pairs, 2) summed reply log-probabilities, each sequence run alone through the model with full logits."""
    out = []
    for chosen, rejected, _ in pairs:
        row = []
        for ids, mask in (chosen, rejected):
            x = torch.from_numpy(ids.astype(np.int64))[None]
            logp = torch.log_softmax(model(input_ids=x, use_cache=False).logits.float(), dim=-1)[0]
            m = torch.from_numpy(mask.astype(bool))
            targets = x[0, 1:]
            row.append(logp[:-1].gather(1, targets[:, None]).squeeze(1)[m[1:]].sum())
        out.append(torch.stack(row))
    return torch.stack(out)


@pytest.mark.parametrize("on_head", [False, True], ids=["frozen-head-fused", "trained-head-chunked"])
def test_sequence_logps_and_gradients_equal_full_logits(on_head):
    """Chosen and rejected packed in one row, head in chunks of 7 tokens: the same log-probabilities and LoRA
    gradients as each sequence alone with the full vocabulary's logits."""
    model = tiny_lora(on_head=on_head)
    pairs = random_pairs(np.random.default_rng(0), 3)
    objective = Preference("dpo", PreferenceConfig(), pad_id=0, width=None)
    batch = objective.collate(pairs)
    weights = torch.tensor([[0.3, -1.2], [2.0, 0.5], [-0.7, 1.1]])
    ours = objective.sequence_logps(CausalLMLoss(model, chunk_tokens=7), batch)
    (ours * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    expected = full_logits_logps(model, pairs)
    (expected * weights).sum().backward()
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-4)
    for name, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)
    assert batch["lengths"].tolist() == [int(side[1].sum()) for c, r, _ in pairs for side in (c, r)]


def trl_dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps,
                 beta, loss_type, label_smoothing):
    """TRL DPOTrainer.dpo_loss, as written there (sigmoid, robust, hinge, ipo)."""
    pi_logratios = policy_chosen_logps - policy_rejected_logps
    ref_logratios = reference_chosen_logps - reference_rejected_logps
    logits = pi_logratios - ref_logratios
    if loss_type == "sigmoid":
        losses = (-F.logsigmoid(beta * logits) * (1 - label_smoothing)
                  - F.logsigmoid(-beta * logits) * label_smoothing)
    elif loss_type == "robust":
        losses = (-F.logsigmoid(beta * logits) * (1 - label_smoothing)
                  + F.logsigmoid(-beta * logits) * label_smoothing) / (1 - 2 * label_smoothing)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * logits)
    elif loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    chosen_rewards = beta * (policy_chosen_logps - reference_chosen_logps).detach()
    rejected_rewards = beta * (policy_rejected_logps - reference_rejected_logps).detach()
    return losses, chosen_rewards, rejected_rewards


def trl_odds_ratio_loss(policy_chosen_logps, policy_rejected_logps, beta):
    """TRL ORPOTrainer.odds_ratio_loss (average log-probabilities in)."""
    log_odds = (policy_chosen_logps - policy_rejected_logps) - (
        torch.log1p(-torch.exp(policy_chosen_logps)) - torch.log1p(-torch.exp(policy_rejected_logps)))
    ratio = F.logsigmoid(log_odds)
    losses = beta * ratio
    return losses, log_odds


@pytest.mark.parametrize("loss,smoothing", [("sigmoid", 0.0), ("sigmoid", 0.1), ("robust", 0.2), ("hinge", 0.0),
                                            ("ipo", 0.0)])
def test_dpo_loss_equals_trl_formula_on_a_model_batch(loss, smoothing):
    """The objective's loss on a real batch (tiny model, adapter moved off its start) equals TRL's formula applied to
    full-logits log-probabilities, with a given reference."""
    model = tiny_lora()
    pairs = random_pairs(np.random.default_rng(1), 4)
    reference = np.array([[-60.0, -70.0], [-40.0, -35.0], [-80.0, -82.0], [-20.0, -50.0]])
    pc = PreferenceConfig(beta=0.3, loss=loss, label_smoothing=smoothing)
    objective = Preference("dpo", pc, pad_id=0, width=None)
    with torch.no_grad():
        total, metrics = objective.loss(CausalLMLoss(model), objective.collate(
            objective.with_reference(pairs, reference)))
        logps = full_logits_logps(model, pairs)
    ref = torch.tensor(reference, dtype=torch.float32)
    if loss == "ipo":  # TRL averages log-probabilities per token for IPO
        lengths = torch.tensor([[c[1].sum(), r[1].sum()] for c, r, _ in pairs], dtype=torch.float32)
        logps, ref = logps / lengths, ref / lengths
    losses, chosen, rejected = trl_dpo_loss(logps[:, 0], logps[:, 1], ref[:, 0], ref[:, 1], 0.3, loss, smoothing)
    assert float(total) == pytest.approx(float(losses.sum()), rel=1e-5)
    assert float(metrics[0]) == pytest.approx(float(chosen.sum()), rel=1e-4, abs=1e-4)
    assert float(metrics[2]) == pytest.approx(float((chosen - rejected).sum()), rel=1e-4, abs=1e-4)
    assert float(metrics[3]) == float((chosen > rejected).sum())


def test_rpo_adds_the_chosen_mean_nll():
    """RPO is DPO with `nll_weight`: each pair's loss gains nll_weight x the chosen reply's mean negative
    log-likelihood per token (from full-logits log-probabilities here), and the `nll` metric is that sum."""
    model = tiny_lora()
    pairs = random_pairs(np.random.default_rng(3), 4)
    reference = np.array([[-55.0, -60.0], [-30.0, -28.0], [-70.0, -75.0], [-25.0, -45.0]])
    with torch.no_grad():
        logps = full_logits_logps(model, pairs)
        results = {}
        for weight in (0.0, 0.7):
            objective = Preference("dpo", PreferenceConfig(beta=0.1, nll_weight=weight), pad_id=0, width=None)
            results[weight] = objective.loss(CausalLMLoss(model), objective.collate(
                objective.with_reference(pairs, reference)))
    ref = torch.tensor(reference, dtype=torch.float32)
    chosen_tokens = torch.tensor([int(c[1].sum()) for c, _, _ in pairs], dtype=torch.float32)
    nll = -logps[:, 0] / chosen_tokens
    plain = -F.logsigmoid(0.1 * ((logps[:, 0] - logps[:, 1]) - (ref[:, 0] - ref[:, 1])))
    (plain_total, plain_metrics), (rpo_total, rpo_metrics) = results[0.0], results[0.7]
    assert float(nll.min()) > 0
    assert float(plain_total) == pytest.approx(float(plain.sum()), rel=1e-5)
    assert float(rpo_total) == pytest.approx(float((plain + 0.7 * nll).sum()), rel=1e-5)
    assert float(rpo_total - plain_total) == pytest.approx(0.7 * float(nll.sum()), rel=1e-4)
    for metrics in (plain_metrics, rpo_metrics):
        assert float(metrics[6]) == pytest.approx(float(nll.sum()), rel=1e-5)


def test_orpo_equals_trl_formula():
    mean_c, mean_r = torch.tensor([-0.9, -2.5, -0.05]), torch.tensor([-1.4, -0.3, -0.2])
    ratio, log_odds, _, _ = orpo_losses(mean_c, mean_r, PreferenceConfig(orpo_lambda=0.25))
    trl_losses, trl_log_odds = trl_odds_ratio_loss(mean_c, mean_r, 0.25)
    torch.testing.assert_close(0.25 * ratio, trl_losses)
    torch.testing.assert_close(log_odds, trl_log_odds)


def test_policy_equal_to_reference_gives_ln2_and_zero_rewards():
    """At the start the adapter does nothing (LoRA B = 0): the DPO loss of every pair is ln 2, rewards are 0."""
    model = tiny_lora()
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.zeros_(p)
    pairs = random_pairs(np.random.default_rng(2), 5)
    objective = Preference("dpo", PreferenceConfig(), pad_id=0, width=None)
    net = CausalLMLoss(model)
    from medtune.train.objectives.preference import reference_logps

    reference = reference_logps(objective, net, model, pairs, 2, torch.device("cpu"),
                                lambda: torch.autocast("cpu", enabled=False))
    with torch.no_grad():
        total, metrics = objective.loss(net, objective.collate(objective.with_reference(pairs, reference)))
    assert float(total) / len(pairs) == pytest.approx(math.log(2), abs=1e-6)
    assert metrics[:3].abs().max().item() < 1e-4
