"""The eval stage: log-likelihood scoring, batched generation, reports, chart and contamination warnings."""

from __future__ import annotations

import json

import pytest
import torch

from medtune.artifacts import RunDir
from medtune.config import load_config
from medtune.errors import MedtuneError
from medtune.evaluate import stage as evaluate
from medtune.evaluate.hf import BatchedGenerator
from medtune.evaluate.loglik import LoglikScorer, Request, choose, encode_pair, loglik_request
from medtune.evaluate.report import overlap, overlap_warnings
from medtune.evaluate.runner import BatchedSolver, EngineSolver, LoglikSolver, evaluate_items
from medtune.evaluate.suite import folder_name
from medtune.formats.choice import Item
from medtune.formats.choice import question_prompt as multiple_choice_prompt
from medtune.models import load_hf
from medtune.ui import UI

OPTIONS = {"A": "Aspirin", "B": "Heparin", "C": "Warfarin", "D": "Alteplase"}
ITEMS = [
    Item("q1", "Which drug is a direct thrombin inhibitor?", {"A": "Dabigatran", "B": "Rivaroxaban"}, "A"),
    Item("q2", "A 64-year-old man has an acute ischemic stroke within 3 hours. Which treatment is given first?",
         OPTIONS, "D"),
    Item("q3", "Which anticoagulant is monitored with the aPTT?", OPTIONS, "B"),
]


@pytest.fixture(scope="module")
def tiny(tiny_base):
    return load_hf(tiny_base, device="cpu")


def with_eval(cfg, **fields):
    """The config with eval fields set, including ones config.py may not declare yet (read with getattr)."""
    cfg.eval = cfg.eval.model_copy(update=fields)
    return cfg


def test_loglik_prompts_follow_lm_eval_tasks():
    medqa = loglik_request(ITEMS[1], "medqa")
    assert medqa.context == (f"Question: {ITEMS[1].question}\nA. Aspirin\nB. Heparin\nC. Warfarin\nD. Alteplase\n"
                             "Answer:")
    assert medqa.continuations == {"A": " A", "B": " B", "C": " C", "D": " D"}
    assert loglik_request(ITEMS[2], "medmcqa").context.startswith(f"Question: {ITEMS[2].question}\nChoices:\nA. ")
    mmlu = loglik_request(Item("anatomy:0", " Where is the liver? ", {"A": "Left", "B": "Right"}, "B",
                               subject="clinical_knowledge"), "mmlu")
    assert mmlu.context == ("The following are multiple choice questions (with answers) about clinical knowledge."
                            "\n\nWhere is the liver?\nA. Left\nB. Right\nAnswer:")
    pubmed = loglik_request(Item("1", "Does it work?", {"A": "yes", "B": "no", "C": "maybe"}, "A",
                                 context="Background text.\n\nResults text."), "pubmedqa")
    assert pubmed.context == "Abstract: Background text.\nResults text.\nQuestion: Does it work?\nAnswer:"
    assert pubmed.continuations == {"A": " yes", "B": " no", "C": " maybe"}


def test_encode_pair_moves_trailing_space_to_continuation(tiny):
    _, tokenizer = tiny
    context, continuation = encode_pair(tokenizer, "Answer: ", "A")
    assert context == tokenizer.encode("Answer:")
    assert tokenizer.decode(continuation) == " A"


def hand_logprobs(model, tokenizer, context: str, continuation: str) -> float:
    """Sum of the continuation tokens' log-probabilities, from one unbatched forward pass over context + it."""
    whole, ctx = tokenizer.encode(context + continuation), tokenizer.encode(context)
    cont = whole[len(ctx):]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ctx + cont])).logits[0]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return sum(logprobs[len(ctx) - 1 + i, token].item() for i, token in enumerate(cont))


def test_loglik_scores_match_a_hand_computation(tiny):
    model, tokenizer = tiny
    scorer = LoglikScorer(model, tokenizer, batch_size=8)
    requests = [loglik_request(item, "medqa") for item in ITEMS]
    scores = scorer.score(requests)
    for item, found in zip(ITEMS, scores):
        assert set(found) == set(item.options) and choose(found) in item.options
    for letter, continuation in requests[1].continuations.items():
        assert scores[1][letter] == pytest.approx(hand_logprobs(model, tokenizer, requests[1].context, continuation),
                                                  abs=1e-4)
    # options of several tokens each are scored on their own rows; batching (padding) changes nothing
    multi = Request("Question: Which drug?\nAnswer:", {"A": " unfractionated heparin", "B": " warfarin sodium"})
    assert len(scorer.rows(multi)) == 2
    batched = scorer.score([multi, *requests])
    one_by_one = LoglikScorer(model, tokenizer, batch_size=1).score([multi, *requests])
    for letter, continuation in multi.continuations.items():
        assert batched[0][letter] == pytest.approx(hand_logprobs(model, tokenizer, multi.context, continuation),
                                                   abs=1e-4)
    for a, b in zip(batched, one_by_one):
        assert a == pytest.approx(b, abs=1e-4)


def test_loglik_solver_records(tiny, tmp_path):
    model, tokenizer = tiny
    solver = LoglikSolver(LoglikScorer(model, tokenizer, batch_size=2), "medqa")
    summary = evaluate_items(solver, ITEMS, tmp_path / "cache.jsonl")
    records = [json.loads(line) for line in (tmp_path / "cache.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in records) == ["q1", "q2", "q3"]
    for r in records:
        assert r["extracted"] == choose(r["logprobs"]) and r["correct"] == (r["extracted"] == r["gold"])
        assert r["output"] == f" {r['extracted']}" and r["prompt"].endswith("Answer:")
    assert summary["mode"] == "loglik" and summary["extraction_failure_rate"] == 0.0


def test_batched_generation_equals_one_at_a_time(tiny_base, tiny, tmp_path):
    from medtune.engines import HFEngine

    model, tokenizer = tiny
    generator = BatchedGenerator(model, tokenizer, batch_size=2)  # forced: the runner batches only on a GPU
    lengths = {len(generator.prompt_ids([{"role": "user", "content": multiple_choice_prompt(i)}])) for i in ITEMS}
    assert len(lengths) == len(ITEMS)  # prompts of different lengths: the batches are left-padded
    batched = evaluate_items(BatchedSolver(generator, max_new_tokens=12), ITEMS, tmp_path / "batched.jsonl")
    sequential = evaluate_items(EngineSolver(HFEngine(tiny_base, device="cpu"), max_new_tokens=12), ITEMS,
                                tmp_path / "sequential.jsonl")
    read = {name: {r["id"]: r for r in map(json.loads, (tmp_path / f"{name}.jsonl").read_text().splitlines())}
            for name in ("batched", "sequential")}
    for item in ITEMS:
        a, b = read["batched"][item.id], read["sequential"][item.id]
        assert a["output"] == b["output"]
        assert (a["completion_tokens"], a["finish_reason"]) == (b["completion_tokens"], b["finish_reason"])
    assert batched["accuracy"] == sequential["accuracy"]


def test_batched_generation_stops_each_row_at_its_end_of_turn(tiny):
    model, tokenizer = tiny
    conversations = [[{"role": "user", "content": multiple_choice_prompt(item)}] for item in ITEMS]
    single, batched = (BatchedGenerator(model, tokenizer, batch_size=size) for size in (1, 3))
    prompt = single.prompt_ids(conversations[0])
    free = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=6, do_sample=False, eos_token_id=single.stop_ids,
                          pad_token_id=single.pad_id)[0, len(prompt):].tolist()
    # make the first item's third generated token an end-of-turn id: that row stops while its batch-mates go on
    stop_at = free.index(free[2]) + 1
    for generator in (single, batched):
        generator.stop_ids = [*generator.stop_ids, free[2]]
    one, many = single.generate(conversations, 6), batched.generate(conversations, 6)
    assert one == many
    assert many[0]["finish_reason"] == "stop" and many[0]["completion_tokens"] == stop_at
    assert many[0]["text"] == tokenizer.decode(free[:stop_at], skip_special_tokens=True)
    assert any(r["completion_tokens"] == 6 for r in many[1:])  # the others were not cut with it


class FakeSolver:
    """Answers from a fixed table; counts what it was asked, to check resuming."""

    mode, batch_size = "generate", 2

    def __init__(self, answers: dict[str, str | None]) -> None:
        self.answers, self.asked = answers, []

    def solve(self, items):
        self.asked += [item.id for item in items]
        return [{"id": i.id, "prompt": "p", "output": "o", "extracted": self.answers[i.id], "gold": i.answer,
                 "correct": self.answers[i.id] == i.answer} for i in items]


def test_summary_fields_and_resume(tmp_path):
    items = [*ITEMS, Item("q4", "Which?", {"A": "a", "B": "b"}, "B")]
    solver = FakeSolver({"q1": "A", "q2": None, "q3": "B", "q4": "A"})
    summary = evaluate_items(solver, items, tmp_path / "c.jsonl")
    assert summary["n"] == 4 and summary["correct"] == 2 and summary["accuracy"] == 0.5
    assert summary["ci95"][0] <= summary["accuracy"] <= summary["ci95"][1]
    assert summary["extraction_failures"] == 1 and summary["extraction_failure_rate"] == 0.25
    assert summary["items_per_s"] > 0
    again = FakeSolver({})
    resumed = evaluate_items(again, items, tmp_path / "c.jsonl")
    assert again.asked == [] and resumed["accuracy"] == 0.5 and resumed["items_per_s"] is None


def test_loglik_rejects_gguf_models(tiny_config, tmp_path):
    cfg = load_config(tiny_config)
    gguf = tmp_path / "model.Q4_K_M.gguf"
    gguf.write_bytes(b"not loaded: the check comes first")
    with_eval(cfg, mode="loglik", models=["base", str(gguf)])
    out = tmp_path / "eval"
    out.mkdir()
    with pytest.raises(MedtuneError, match="GGUF file.*loglik.*needs an HF model"):
        evaluate.run(cfg, RunDir(cfg.run_dir), out, UI())
    with_eval(cfg, mode="sample")
    with pytest.raises(MedtuneError, match="mode must be one of"):
        evaluate.run(cfg, RunDir(cfg.run_dir), out, UI())


def write_contamination(run: RunDir, ids: list[str], policy: str = "report") -> None:
    prepared = run / "prepared"
    prepared.mkdir(parents=True, exist_ok=True)
    (prepared / "report.json").write_text(json.dumps({"contaminated": len(ids), "contamination_policy": policy}))
    (prepared / "contamination.jsonl").write_text("".join(
        json.dumps({"location": f"train.jsonl:{n}", "matches": [{"benchmark": "bench", "item_id": item_id,
                                                                   "kind": "exact", "score": 1.0}]}) + "\n"
        for n, item_id in enumerate(ids)))


def test_loglik_stage_compares_models_with_chart_and_contamination_warning(tiny_config, tiny_base, tmp_path):
    cfg = load_config(tiny_config)
    with_eval(cfg, mode="loglik", models=["base", str(tiny_base)])
    run = RunDir(cfg.run_dir)
    write_contamination(run, ["1", "2", "3"])
    out = tmp_path / "eval"
    out.mkdir()
    summary = evaluate.run(cfg, run, out, UI())
    assert list(summary["models"]) == ["base", str(tiny_base)] and summary["mode"] == "loglik"
    for per_model in summary["models"].values():
        s = per_model["bench"]
        assert s["n"] == 2 and s["ci95"][0] <= s["accuracy"] <= s["ci95"][1] and s["items_per_s"] > 0
    # the same weights, loaded twice, give the same answers
    base, path = ([json.loads(line) for line in (out / folder / "bench.jsonl").read_text().splitlines()]
                  for folder in ("base", folder_name(str(tiny_base))))
    assert [r["extracted"] for r in base] == [r["extracted"] for r in path]
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (out / "results.md").read_text()
    evaluated = sum(r["id"] in {"1", "2", "3"} for r in base)
    assert f"**Warning:** bench: 3 of its items ({evaluated} of those evaluated here) match training" in text
    assert "| base | bench | 2 |" in text and f"| {tiny_base} | bench | 2 |" in text
    assert "not a medical device" in text and "Mode: loglik" in text
    # the same answers: no discordant item, so McNemar's p is 1 and the report says it is not significant
    same = summary["paired"]["bench"][str(tiny_base)]
    assert same["reference"] == "base" and same["difference"] == 0 and same["p_value"] == 1.0
    assert (same["only_reference"], same["only_this"]) == (0, 0)
    assert f"| {tiny_base} | base | bench | 2 | +0.0% | 0 | 0 | 1 | not significant: 0 discordant items" in text
    assert json.loads((out / "summary.json").read_text())["overlap"]["bench"]["items"] == 3


def test_overlap_reads_the_data_stage_files(tmp_path):
    run = RunDir(tmp_path / "run")
    benches = {"bench": [Item("1", "q", {"A": "a"}, "A"), Item("2", "q", {"A": "a"}, "A")],
               "other": [Item("9", "q", {"A": "a"}, "A")]}
    assert overlap(run / "prepared", benches) == {}  # no data stage output: nothing to say
    write_contamination(run, ["2", "7"], policy="drop")
    found = overlap(run / "prepared", benches)
    assert found == {"bench": {"items": 2, "evaluated": 1, "records": 2, "policy": "drop"}}
    assert overlap_warnings(found)[0].startswith("Note: bench: 2 of its items (1 of those evaluated here)")
    (run / "prepared" / "contamination.jsonl").unlink()
    assert "2 training record(s)" in overlap_warnings(overlap(run / "prepared", benches))[0]
