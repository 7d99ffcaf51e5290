"""Formulations that tell knowledge from a letter habit: cloze, circular shifts, PriDe, answer shares, RStd,
the constant-answer baseline, macro-F1 for labels, their reports and their resume from the per-item cache."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from test_eval import ITEMS, hand_logprobs

from medtune.config import EvalConfig, load_config
from medtune.errors import MedtuneError
from medtune.evaluate import suite
from medtune.evaluate.formulations import (
    calibration_ids,
    debiased,
    items_to_ask,
    letter_prior,
    shift_of,
    shifted,
)
from medtune.evaluate.loglik import LoglikScorer, cloze_request, normalized, option_length
from medtune.evaluate.runner import ClozeSolver, asked, evaluate_items
from medtune.evaluate.stats import answer_shares, macro_f1, mcnemar_exact, rstd
from medtune.formats.choice import Item
from medtune.models import load_hf
from medtune.ui import UI

ROOT = Path(__file__).resolve().parents[1]
DRUGS = ["Aspirin", "Heparin", "Warfarin", "Alteplase"]


def mc_items(golds: str) -> list[Item]:
    """One four-option item per gold letter; each item's options are the drugs in a different rotation."""
    items = []
    for n, gold in enumerate(golds):
        texts = DRUGS[n % 4:] + DRUGS[:n % 4]
        items.append(Item(f"i{n}", f"Question {n}?", dict(zip("ABCD", texts)), gold))
    return items


def write_mc(path: Path, items: list[Item]) -> Path:
    path.write_text("".join(json.dumps({"id": i.id, "question": i.question, "options": i.options,
                                        "answer_idx": i.answer}) + "\n" for i in items))
    return path


class Fake:
    """A solver that answers by a rule on the item as asked: `rule(item) -> letter or None`; `scores(item)` gives a
    loglik record's per-letter log-likelihoods instead. Counts what it was asked."""

    def __init__(self, mode: str, rule=None, scores=None) -> None:
        self.mode, self.rule, self.scores, self.batch_size, self.asked = mode, rule, scores, 4, []

    def solve(self, items: list[Item]) -> list[dict]:
        self.asked += [i.id for i in items]
        records = []
        for item in items:
            logprobs = self.scores(item) if self.scores else None
            letter = max(logprobs, key=logprobs.__getitem__) if logprobs else self.rule(item)
            records.append({**asked(item, self.mode), "prompt": "", "output": str(letter), "extracted": letter,
                            "correct": letter == item.answer, **({"logprobs": logprobs} if logprobs else {})})
        return records


def run_suite(monkeypatch, tmp_path: Path, solvers: dict[str, Fake], benchmarks: list[dict], **section) -> dict:
    """`suite.evaluate_models` with fake solvers in place of loaded models."""
    monkeypatch.setattr(suite, "open_solvers", lambda path, *a, **k: lambda kind: solvers[path.name])
    cfg = EvalConfig(benchmarks=benchmarks, models=list(solvers), **section)
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    return suite.evaluate_models({name: tmp_path / name for name in solvers}, cfg, out, tmp_path / "cache", UI(),
                                 seed=3, n_ctx=2048)


def rows_of(summary: dict, model: str, bench: str = "bench") -> dict[str, dict]:
    return {r["formulation"]: r for r in summary["rows"] if r["model"] == model and r["benchmark"] == bench}


def gold_text(item: Item) -> str:
    return item.options[item.answer]


# --- cloze ------------------------------------------------------------------------------------------------------

def test_cloze_prompts_show_no_letters():
    medqa = cloze_request(ITEMS[1], "medqa")
    assert medqa.context == f"Question: {ITEMS[1].question}\nAnswer:"
    assert medqa.continuations == {"A": " Aspirin", "B": " Heparin", "C": " Warfarin", "D": " Alteplase"}
    mmlu = cloze_request(Item("x", " Where is the liver? ", {"A": "Left", "B": "Right"}, "B", subject="anatomy"),
                         "mmlu")
    assert mmlu.context == "The following are questions (with answers) about anatomy.\n\nQuestion: Where is the " \
                           "liver?\nAnswer:"
    pubmed = cloze_request(Item("1", "Does it work?", {"A": "yes", "B": "no", "C": "maybe"}, "A", context="Text."),
                           "pubmedqa")
    assert pubmed.context == "Abstract: Text.\nQuestion: Does it work?\nAnswer:"
    assert pubmed.continuations == {"A": " yes", "B": " no", "C": " maybe"}


def test_cloze_scores_match_a_hand_computation(tiny_base, tmp_path):
    model, tokenizer = load_hf(tiny_base, device="cpu")
    solver = ClozeSolver(LoglikScorer(model, tokenizer, batch_size=3), "medqa")
    evaluate_items(solver, ITEMS, tmp_path / "c.jsonl")
    records = {r["id"]: r for r in map(json.loads, (tmp_path / "c.jsonl").read_text().splitlines())}
    for item in ITEMS:
        record = records[item.id]
        context = f"Question: {item.question}\nAnswer:"
        hand = {k: hand_logprobs(model, tokenizer, context, f" {text}") for k, text in item.options.items()}
        assert record["logprobs"] == pytest.approx(hand, abs=1e-4)
        assert record["extracted"] == max(hand, key=hand.__getitem__)
        per_char = {k: v / len(item.options[k]) for k, v in hand.items()}
        assert record["extracted_norm"] == max(per_char, key=per_char.__getitem__)
        assert record["formulation"] == "cloze" and record["shift"] == 0 and record["gold"] == item.answer
        assert record["correct_norm"] == (record["extracted_norm"] == item.answer)


def test_acc_norm_divides_by_the_option_length_as_lm_eval_does():
    # the longer option has the higher sum but the lower per-character score
    scores = {"A": -6.0, "B": -8.0}
    options = {"A": "ab", "B": "abcdefgh"}
    assert normalized(scores, options) == {"A": -3.0, "B": -1.0}
    # lm-eval's acc_norm counts characters (len(choice)); "é" is one character and two UTF-8 bytes
    assert option_length("café") == 4 != len("café".encode())


# --- circular ---------------------------------------------------------------------------------------------------

def test_a_circular_shift_moves_the_gold_letter_with_its_text():
    item = ITEMS[1]  # gold D = Alteplase
    one = shifted(item, 1)
    assert list(one.options.values()) == ["Heparin", "Warfarin", "Alteplase", "Aspirin"]
    assert one.answer == "C" and one.options[one.answer] == "Alteplase" and one.id == "q2#shift1"
    assert shift_of(one.id) == ("q2", 1) and shift_of("q2") == ("q2", 0)
    assert [gold_text(shifted(item, k)) for k in range(4)] == ["Alteplase"] * 4
    assert shifted(item, 4) == item
    asked_ids = [i.id for i in items_to_ask(ITEMS, "medqa", "generate", True, 0)]
    assert len(asked_ids) == 2 + 4 + 4 and asked_ids[:3] == ["q1", "q2", "q3"]
    pubmed = [Item("p", "Q?", {"A": "yes", "B": "no", "C": "maybe"}, "A")]
    assert items_to_ask(pubmed, "pubmedqa", "generate", True, 0) == pubmed


def test_circular_scores_a_letter_habit_zero_and_knowledge_fully(monkeypatch, tmp_path):
    items = mc_items("AABCDA")
    bench = write_mc(tmp_path / "b.jsonl", items)
    texts = {i.id: gold_text(i) for i in items}
    solvers = {"habit": Fake("generate", rule=lambda item: "A"),
               "knows": Fake("generate", rule=lambda item: next(k for k, t in item.options.items()
                                                                if t == texts[shift_of(item.id)[0]])),
               "heparin": Fake("generate", rule=lambda item: next(k for k, t in item.options.items()
                                                                  if t == "Heparin"))}
    summary = run_suite(monkeypatch, tmp_path, solvers, [{"name": "bench", "path": bench}], circular=True)
    habit, knows, heparin = (rows_of(summary, m) for m in ("habit", "knows", "heparin"))
    assert habit["generate"]["accuracy"] == pytest.approx(3 / 6)  # the share of A keys
    assert habit["generate-circular"]["accuracy"] == 0 and habit["generate-circular"]["constant_accuracy"] == 0
    assert habit["generate-circular"]["mean_accuracy"] == pytest.approx(0.25)
    assert habit["generate-circular"]["consistency"] == 0  # "A" is another text under every shift
    assert habit["generate-circular"]["answer_shares"] == {"A": 1.0, "B": 0.0, "C": 0.0, "D": 0.0, "none": 0.0}
    assert knows["generate-circular"]["accuracy"] == 1 and knows["generate-circular"]["consistency"] == 1
    # one text every time: perfectly consistent, right only where it is the key
    assert heparin["generate-circular"]["consistency"] == 1
    assert heparin["generate-circular"]["accuracy"] == sum(t == "Heparin" for t in texts.values()) / 6
    assert len(solvers["knows"].asked) == 24 and summary["models"]["knows"]["bench"]["asked"] == 24
    records = [json.loads(line) for line in (tmp_path / "out" / "knows" / "bench.jsonl").read_text().splitlines()]
    assert {(r["item_id"], r["shift"]) for r in records} == {(i.id, k) for i in items for k in range(4)}
    assert all(r["formulation"] == "generate" and r["options"][r["gold"]] == texts[r["item_id"]] for r in records)
    assert "Circular: every item" in (tmp_path / "out" / "results.md").read_text()


# --- PriDe ------------------------------------------------------------------------------------------------------

def test_pride_prior_of_cyclic_permutations_is_the_letter_bias():
    bias = {"A": 2.0, "B": 0.5, "C": 0.0, "D": 0.0}
    content = [1.0, -1.0, 0.3, 0.0]
    groups = [[{k: bias[k] + content[(j + s) % 4] for j, k in enumerate("ABCD")} for s in range(4)]]
    prior = letter_prior(groups)
    total = sum(math.exp(v) for v in bias.values())
    assert prior == pytest.approx({k: math.exp(v) / total for k, v in bias.items()})
    assert debiased({"A": 2.0, "B": 0.5 + 1.0, "C": 0.0, "D": 0.0}, prior) == "B"


def test_pride_removes_a_strong_a_prior(monkeypatch, tmp_path):
    items = mc_items("ABCDBCDACDABDABCBCDA" * 2)
    bench = write_mc(tmp_path / "b.jsonl", items)
    texts = {i.id: gold_text(i) for i in items}

    def scores(item):  # knows the answer (+3) but prefers the letter A more (+5)
        return {k: 3.0 * (t == texts[shift_of(item.id)[0]]) + 5.0 * (k == "A") for k, t in item.options.items()}

    solver = Fake("loglik", scores=scores)
    summary = run_suite(monkeypatch, tmp_path, {"biased": solver}, [{"name": "bench", "path": bench}],
                        mode="loglik")
    rows = rows_of(summary, "biased")
    calibration = calibration_ids(items, 3)
    assert len(calibration) == 2 and summary["benchmarks"]["bench"]["calibration_ids"] == calibration
    assert sorted(items[int(i[1:])].answer for i in calibration) == ["A", "B"]  # stratified by gold letter
    assert rows["loglik"]["accuracy"] == pytest.approx(sum(i.answer == "A" for i in items) / 40)
    assert rows["loglik"]["answer_shares"]["A"] == 1.0
    pride = rows["loglik-pride"]
    assert pride["accuracy"] == 1.0 and pride["n"] == 38 and pride["calibration_ids"] == calibration
    assert pride["prior"]["A"] > 0.9 and "loglik-circular" not in rows
    # only the calibration items were asked again, under their 3 other shifts
    assert len(solver.asked) == 40 + 2 * 3
    text = (tmp_path / "out" / "results.md").read_text()
    assert "PriDe calibration items of bench (2," in text and ", ".join(calibration) in text


# --- answer shares, RStd, constant answer, macro-F1 --------------------------------------------------------------

def test_answer_shares_rstd_and_macro_f1_values():
    golds = ["A", "A", "B", "B"]
    answers = ["A", "A", "A", None]
    assert answer_shares(answers, ["A", "B"]) == {"A": 0.75, "B": 0.0, "none": 0.25}
    assert answer_shares(golds, ["A", "B", "C"], none=False) == {"A": 0.5, "B": 0.5, "C": 0.0}
    assert rstd(golds, answers) == pytest.approx(50.0)  # recalls 1.0 and 0.0
    assert rstd(golds, golds) == 0.0
    assert rstd(["A", "A", "A", "B"], ["A", "A", "B", "B"]) == pytest.approx(100 * (1 - 2 / 3) / 2)
    assert macro_f1(["yes", "yes", "no", "maybe"], ["yes", "no", "no", None]) == pytest.approx(4 / 9)


def test_rows_carry_the_constant_answer_and_mcnemar_against_it(monkeypatch, tmp_path):
    items = mc_items("AAAAABCDAB")  # A is the keys' most common letter: 6 of 10
    bench = write_mc(tmp_path / "b.jsonl", items)
    solvers = {"habit": Fake("generate", rule=lambda item: "A"), "right": Fake("generate", rule=lambda i: i.answer)}
    summary = run_suite(monkeypatch, tmp_path, solvers, [{"name": "bench", "path": bench}])
    constant = summary["always_most_common_answer"]["bench"]
    assert constant == {"answer": "A", "letter": "A", "correct": 6, "accuracy": 0.6, "n": 10}
    assert summary["benchmarks"]["bench"]["gold_shares"] == {"A": 0.6, "B": 0.2, "C": 0.1, "D": 0.1}
    habit, right = rows_of(summary, "habit")["generate"], rows_of(summary, "right")["generate"]
    assert habit["accuracy"] == 0.6 == habit["constant_accuracy"] and habit["mcnemar_p_vs_constant"] == 1.0
    assert habit["rstd"] == pytest.approx(43.3, abs=0.01)  # recalls 1, 0, 0, 0
    assert right["accuracy"] == 1.0 and right["rstd"] == 0.0 and right["macro_f1"] is None
    assert right["mcnemar_p_vs_constant"] == pytest.approx(mcnemar_exact(0, 4))
    assert right["mcnemar_p_vs_first"] == pytest.approx(mcnemar_exact(0, 4)) and habit["mcnemar_p_vs_first"] is None
    assert right["answer_shares"] == {"A": 0.6, "B": 0.2, "C": 0.1, "D": 0.1, "none": 0.0}
    # summary["models"] keeps its fields and gains the new ones
    model = summary["models"]["right"]["bench"]
    assert model["formulation"] == "generate" and model["accuracy"] == 1.0 and "extraction_failure_rate" in model
    assert model["rstd"] == 0.0 and model["gold_shares"] == summary["benchmarks"]["bench"]["gold_shares"]
    text = (tmp_path / "out" / "results.md").read_text()
    assert "| bench | 10 | A 60% B 20% C 10% D 10% | 60.0% (\"A\") | - |" in text
    assert "| right | bench | generate | 10 | 100.0% (" in text
    assert (tmp_path / "out" / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def write_pubmedqa(folder: Path, labels: list[str]) -> Path:
    folder.mkdir(exist_ok=True)
    records = {str(100 + n): {"QUESTION": f"Does {n} work?", "CONTEXTS": ["Background.", "Results."],
                              "final_decision": label, "LONG_ANSWER": "Because."} for n, label in enumerate(labels)}
    (folder / "ori_pqal.json").write_text(json.dumps(records))
    (folder / "test_ground_truth.json").write_text(json.dumps({k: v["final_decision"] for k, v in records.items()}))
    return folder / "ori_pqal.json"


def test_pubmedqa_labels_get_macro_f1_and_no_circular(monkeypatch, tmp_path):
    path = write_pubmedqa(tmp_path / "pqa", ["yes", "yes", "no", "maybe"])
    says = {"A": "A", "B": "B"}  # yes stays yes, no stays no, maybe becomes nothing
    solver = Fake("generate", rule=lambda item: says.get(item.answer))
    summary = run_suite(monkeypatch, tmp_path, {"m": solver}, [{"name": "pqa", "path": path, "kind": "pubmedqa"}],
                        circular=True)
    assert summary["benchmarks"]["pqa"]["not_applicable"] == {"generate-circular": "n/a: labels"}
    rows = rows_of(summary, "m", "pqa")
    assert list(rows) == ["generate"] and len(solver.asked) == 4
    assert rows["generate"]["macro_f1"] == pytest.approx(macro_f1(["yes", "yes", "no", "maybe"],
                                                                  ["yes", "yes", "no", None]), abs=1e-4)
    assert rows["generate"]["macro_f1"] == pytest.approx(2 / 3, abs=1e-4)
    assert rows["generate"]["answer_shares"] == {"yes": 0.5, "no": 0.25, "maybe": 0.0, "none": 0.25}
    assert summary["always_most_common_answer"]["pqa"]["answer"] == "yes"
    assert "| all | pqa | generate-circular | - | n/a: labels |" in (tmp_path / "out" / "results.md").read_text()


# --- cache, config and command line ------------------------------------------------------------------------------

def test_new_formulations_resume_from_the_cache(monkeypatch, tmp_path):
    items = mc_items("ABCDABCDAB")
    bench = [{"name": "bench", "path": write_mc(tmp_path / "b.jsonl", items)}]
    first = Fake("loglik", scores=lambda item: {k: float(k == "B") for k in item.options})
    summary = run_suite(monkeypatch, tmp_path, {"m": first}, bench, mode="loglik", circular=True)
    assert len(first.asked) == 40
    again = Fake("loglik", scores=lambda item: {k: 0.0 for k in item.options})
    resumed = run_suite(monkeypatch, tmp_path, {"m": again}, bench, mode="loglik", circular=True)
    assert again.asked == [] and rows_of(resumed, "m") == rows_of(summary, "m")
    assert set(rows_of(resumed, "m")) == {"loglik", "loglik-pride", "loglik-circular"}
    # half the cache lost (a killed run): only the missing questions are asked
    cached = next((tmp_path / "cache").glob("m-bench-*.jsonl"))
    cached.write_text("".join(cached.read_text().splitlines(keepends=True)[:20]))
    third = Fake("loglik", scores=lambda item: {k: float(k == "B") for k in item.options})
    run_suite(monkeypatch, tmp_path, {"m": third}, bench, mode="loglik", circular=True)
    assert len(third.asked) == 20


def test_circular_with_cloze_is_refused_with_a_readable_message(tmp_path, tiny_config):
    raw = yaml.safe_load(tiny_config.read_text())
    raw["eval"].update(mode="cloze", circular=True)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(MedtuneError, match="eval.circular applies to mode generate or loglik"):
        load_config(bad)
    raw["eval"].update(mode="loglik", loglik_formulation="texts")
    bad.write_text(yaml.safe_dump(raw))
    with pytest.raises(MedtuneError, match="loglik_formulation"):
        load_config(bad)
    proc = subprocess.run([sys.executable, "-m", "medtune.cli", "eval", "--model", "x/y", "--benchmark",
                           "medqa:examples/medqa_sample.jsonl", "--mode", "cloze", "--circular"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip() == ("error: --circular applies to --mode generate or loglik: --mode cloze shows no "
                                   "option letters, so their order cannot favour one; leave --circular out")


def test_eval_stage_scores_the_second_view_in_cloze(tiny_config, tmp_path):
    from medtune.artifacts import RunDir
    from medtune.evaluate import stage

    cfg = load_config(tiny_config)
    cfg.eval = cfg.eval.model_copy(update={"models": ["base"], "max_new_tokens": 4, "limit": 2,
                                           "loglik_models": ["base"], "loglik_formulation": "cloze"})
    out = tmp_path / "eval"
    out.mkdir()
    summary = stage.run(cfg, RunDir(cfg.run_dir), out, UI())
    view = json.loads((out / "loglik" / "summary.json").read_text())
    assert summary["loglik"]["mode"] == "cloze" == view["mode"]
    assert {r["formulation"] for r in view["rows"]} == {"cloze", "cloze-norm"}
    assert view["models"]["base"]["bench"]["formulation"] == "cloze-norm"
    assert "cloze-norm: the highest per character" in (out / "loglik" / "results.md").read_text()
