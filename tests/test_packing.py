"""Packing, answer-preserving shortening and the contamination guard."""

import json

import numpy as np
import pytest
import torch
from conftest import SHARED_DATA

from medtune.contamination import ContaminationGuard, normalise, question_stem
from medtune.data.formatting import ChatFormatter
from medtune.data.lengths import MARKER, keep_answer, truncate
from medtune.data.packing import efficiency, pack


def reasonmed_like_lengths(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(np.log(700), 0.6, n), 160, 4096).astype(int)


def test_pack_places_every_example_once_within_max_len():
    lengths = np.minimum(reasonmed_like_lengths(20_000), 2048)
    rows = pack(lengths, 2048)
    flat = sorted(i for row in rows for i in row)
    assert flat == list(range(len(lengths)))
    assert max(sum(lengths[i] for i in row) for row in rows) <= 2048
    assert efficiency(lengths, rows, 2048) >= 0.95


def test_packed_row_gives_each_example_the_same_loss_as_alone(tiny_base):
    from transformers import AutoModelForCausalLM

    from medtune.train.objectives.sft import collate

    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32).eval()
    rng = np.random.default_rng(0)
    examples = []
    for n in (40, 25, 31):
        ids = rng.integers(3, 1000, n).astype(np.int32)
        mask = np.r_[np.zeros(n // 2), np.ones(n - n // 2)].astype(np.uint8)
        examples.append((ids, mask))

    def per_token_losses(batch):
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
        losses = torch.nn.functional.cross_entropy(logits[0], batch["labels"][0], ignore_index=-100,
                                                   reduction="none")
        return losses[batch["labels"][0] != -100]

    with torch.no_grad():
        packed = per_token_losses(collate([examples], pad_id=0))
        alone = torch.cat([per_token_losses(collate([[e]], pad_id=0)) for e in examples])
        padded_batch = collate([[examples[0]], [examples[1]]], pad_id=0)  # the shorter row is padded
        logits = model(input_ids=padded_batch["input_ids"], position_ids=padded_batch["position_ids"],
                       use_cache=False).logits
    assert packed.shape == alone.shape
    torch.testing.assert_close(packed, alone, rtol=1e-4, atol=1e-4)
    second = torch.nn.functional.cross_entropy(logits[1], padded_batch["labels"][1], reduction="none",
                                               ignore_index=-100)
    expected = per_token_losses(collate([[examples[1]]], pad_id=0))
    torch.testing.assert_close(second[padded_batch["labels"][1] != -100], expected, rtol=1e-4, atol=1e-4)


def test_keep_answer_keeps_start_and_final_answer(smollm2_tokenizer):
    fmt = ChatFormatter(smollm2_tokenizer)
    steps = "\n".join(f"{i}. A long reasoning step about renal physiology number {i}." for i in range(1, 80))
    reply = f"Let's think step by step.\n{steps}\nSummary: the loop of Henle concentrates urine.\nThe answer is B."
    messages = [{"role": "user", "content": "Q?\nA. x\nB. y"}, {"role": "assistant", "content": reply}]
    enc = fmt.encode(messages)
    assert len(enc.input_ids) > 256
    short = keep_answer(enc, reply, 256, fmt)
    assert len(short.input_ids) <= 256
    labelled = smollm2_tokenizer.decode([t for t, m in zip(short.input_ids, short.loss_mask) if m])
    assert labelled.startswith("Let's think step by step.\n1. A long reasoning step")
    assert labelled.endswith("Summary: the loop of Henle concentrates urine.\nThe answer is B.<|im_end|>")
    assert MARKER in labelled
    assert short.input_ids[: enc.reply_spans[0][0]] == enc.input_ids[: enc.reply_spans[0][0]]  # prompt intact
    cut = truncate(enc, 256)
    assert "The answer is B." not in smollm2_tokenizer.decode(cut.input_ids)
    assert keep_answer(enc, reply, enc.reply_spans[0][0] + 20, fmt) is None  # no room left for the answer


def test_contamination_exact_and_near_duplicates():
    guard = ContaminationGuard({"medqa": [("7", "A 45-year-old man presents with crushing chest pain radiating "
                                                 "to the left arm and diaphoresis for two hours. What is next?")]})
    exact = guard.check("a 45 year old man presents with CRUSHING chest pain radiating to the left arm and "
                        "diaphoresis for two hours -- what is next")
    assert [(m.benchmark, m.item_id, m.kind) for m in exact] == [("medqa", "7", "exact")]
    near = guard.check("A 45-year-old man presents with crushing chest pain radiating to the left arm and "
                       "diaphoresis for two hours. Which drug should be given first?")
    assert [(m.kind, m.score >= 0.5) for m in near] == [("near", True)]
    assert guard.check("A child with a barking cough and inspiratory stridor. What is the diagnosis?") == []
    assert question_stem("Please answer the following multiple-choice question:\nStem here?\nA. one\nB. two") == \
        "Stem here?\n"
    assert normalise("  Hello,\tWORLD!! ") == "hello world"


@pytest.mark.skipif(not (SHARED_DATA / "pubmedqa").is_dir(), reason="../shared/data not present")
def test_contamination_finds_all_500_pubmedqa_test_questions_in_pqal():
    pqal = json.loads((SHARED_DATA / "pubmedqa" / "ori_pqal.json").read_text())
    test_ids = json.loads((SHARED_DATA / "pubmedqa" / "test_ground_truth.json").read_text())
    guard = ContaminationGuard({"pubmedqa": [(pmid, pqal[pmid]["QUESTION"]) for pmid in test_ids]})
    flagged = {pmid for pmid, rec in pqal.items() if guard.check(rec["QUESTION"])}
    assert flagged == set(test_ids)
    assert len(flagged) == 500
