"""The pairs stage: grading and pairing (fake sampler), contamination refusal, resume after a kill, real HF sampling
on a tiny model, the CLI's errors and the pipeline wiring."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml
from conftest import SHARED_DATA, write_jsonl

from medtune.answers import extract_letter, question_options
from medtune.artifacts import RunDir
from medtune.config import load_config
from medtune.errors import MedtuneError
from medtune.pairs import stage as pairs
from medtune.pipeline import BY_NAME, active_stages, run_stage, stage_fingerprint
from medtune.ui import UI

ROOT = Path(__file__).resolve().parents[1]
OPTIONS = {"A": "aspirin", "B": "heparin", "C": "warfarin", "D": "insulin"}
# What the fake model gets right for question i: "all" right, "none", or right on the samples j < n.
RIGHT = {0: "all", 1: "none", 2: 3, 3: 1, 4: 6, 5: 2}


def question(i: int) -> dict:
    return {"realidx": f"q{i}", "question": f"Patient {i} has chest pain number {i} after exercise; which drug "
            f"reduces the risk {i}?", "options": OPTIONS, "answer_idx": "ABCD"[i % 4]}


def fake_sampler(calls: list | None = None):
    """Replies that depend on the question, the sample and the seed: right, another letter, or no answer."""
    def sample(conversations, n, seed):
        if calls is not None:
            calls.append((len(conversations), n, seed))
        out = []
        for messages in conversations:
            i = int(re.search(r"Patient (\d+)", messages[-1]["content"]).group(1))
            key, rule = "ABCD"[i % 4], RIGHT.get(i, 2)
            replies = []
            for j in range(n):
                right = rule == "all" or (rule != "none" and j < rule)
                if right:
                    replies.append(f"Reasoning {seed % 1000} {j}.\nThe answer is {key}.")
                elif j % 2:  # no extractable answer
                    replies.append({"text": f"Reasoning {seed % 1000} {j}, unsure", "finish_reason": "length"})
                else:
                    replies.append(f"Reasoning {seed % 1000} {j}.\nThe answer is {'ABCD'[(i + 1) % 4]}.")
            out.append(replies)
        return out
    return sample


@pytest.fixture
def pairs_config(tmp_path, tiny_base):
    """A config with a pairs section over 6 questions; the eval benchmark holds question 5 (refused)."""
    questions = write_jsonl(tmp_path / "questions.jsonl", [question(i) for i in range(6)])
    bench = write_jsonl(tmp_path / "bench.jsonl", [question(5), {
        "question": "An unrelated evaluation question about kidneys?", "options": OPTIONS, "answer_idx": "A"}])
    cfg = {
        "name": "pairs", "run_dir": str(tmp_path / "run"), "seed": 3,
        "base": {"model": str(tiny_base)},
        "data": {"max_len": 96},
        "train": {"objective": "dpo"},
        "export": {"name": "tiny", "types": ["F16"]},
        "eval": {"benchmarks": [{"name": "bench", "path": str(bench)}], "models": ["merged"]},
        # the fake sampler knows each question's key by its index: letters stay (balancing has its own tests)
        "pairs": {"questions": str(questions), "kind": "medqa", "samples": 8, "batch_size": 16,
                  "max_pairs_per_question": 3, "balance_letters": False},
    }
    path = tmp_path / "pairs.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def run_pairs(cfg, sampler, name: str = "pairs") -> tuple[RunDir, dict]:
    run = RunDir(cfg.run_dir)
    out = run / name
    out.mkdir(parents=True, exist_ok=True)
    return run, pairs.run(cfg, run, out, UI(), sampler=sampler)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_grading_pairing_skips_and_report(pairs_config):
    cfg = load_config(pairs_config)
    run, report = run_pairs(cfg, fake_sampler())
    samples = read_jsonl(run / "pairs" / "samples.jsonl")
    made = read_jsonl(run / "pairs" / "pairs.jsonl")
    # question 5 is in the evaluation set: refused, never sampled
    assert report["refused_contamination"] == 1 and {s["id"] for s in samples} == {f"q{i}" for i in range(5)}
    assert (report["questions"], report["sampled_questions"], report["samples"]) == (6, 5, 40)
    right = 8 + 0 + 3 + 1 + 6
    assert report["sampled_accuracy"] == round(right / 40, 4)
    wrong_per_question = {0: 0, 1: 8, 2: 5, 3: 7, 4: 2}
    unextractable = sum(sum(1 for j in range(8 - w, 8) if j % 2) for w in wrong_per_question.values())
    assert report["extraction_failures"] == unextractable == sum(s["answer"] is None for s in samples)
    assert report["cut_at_max_new_tokens"] == unextractable
    assert report["questions_skipped"] == {"all_right": 1, "all_wrong": 1}
    # q2: 3 right x 5 wrong, capped at 3; q3: 1 x 7 -> 3; q4: 6 x 2 -> 3
    assert report["pairs"] == len(made) == 9 and report["questions_with_pairs"] == 3
    for p in made:
        key = p["answer"]
        assert p["chosen_answer"] == key != p["rejected_answer"]
        assert p["prompt"][0]["role"] == "user" and p["prompt"][0]["content"].startswith(
            "Please answer the following multiple-choice question:\nPatient ")
        assert "\nA. aspirin\nB. heparin\nC. warfarin\nD. insulin" in p["prompt"][0]["content"]
        assert p["chosen"][0]["role"] == p["rejected"][0]["role"] == "assistant"
        assert p["chosen"][0]["content"] != p["rejected"][0]["content"]
        assert set(p) == {"id", "prompt", "chosen", "rejected", "answer", "chosen_answer", "rejected_answer"}
    q3 = [p for p in made if p["id"].startswith("q3:")]
    assert len({p["rejected"][0]["content"] for p in q3}) == 3  # one right reply against 3 different wrong ones
    on_disk = json.loads((run / "pairs" / "report.json").read_text())
    assert on_disk["refused"][0]["id"] == "q5" and on_disk["refused"][0]["matches"][0]["kind"] == "exact"


def test_make_pairs_cap_order_and_reference():
    q = pairs.Question(0, "x", "prompt", "stem", OPTIONS, "B", reference="Long reasoning.\nThe answer is B.")
    right = [{"text": f"r{j} The answer is B.", "answer": "B", "correct": True} for j in range(2)]
    wrong = [{"text": f"w{j} The answer is C.", "answer": "C", "correct": False} for j in range(3)]
    made, reason = pairs.make_pairs(q, right + wrong + [dict(wrong[0])], cap=100, include_reference=False)
    combos = [(p["chosen"][0]["content"], p["rejected"][0]["content"]) for p in made]
    assert reason is None and len(combos) == len(set(combos)) == 6  # every (right, wrong) once; the repeat dropped
    assert {c for c, _ in combos[:3]} == {"r0 The answer is B.", "r1 The answer is B."}
    assert {r for _, r in combos[:3]} == {w["text"] for w in wrong}  # the first pairs use each wrong reply
    assert len(pairs.make_pairs(q, right + wrong, cap=4, include_reference=False)[0]) == 4
    # all wrong: skipped, unless the record's own reasoning (right) is a chosen reply
    assert pairs.make_pairs(q, wrong, cap=4, include_reference=False) == ([], "all_wrong")
    made, reason = pairs.make_pairs(q, wrong, cap=4, include_reference=True)
    assert reason is None and len(made) == 3 and all(p["chosen"][0]["content"] == q.reference for p in made)
    assert pairs.make_pairs(q, right, cap=4, include_reference=True) == ([], "all_right")
    # a reference that does not end in the key is never a chosen reply
    bad = pairs.Question(0, "x", "prompt", "stem", OPTIONS, "B", reference="Thinking.\nThe answer is D.")
    assert pairs.make_pairs(bad, wrong, cap=4, include_reference=True) == ([], "all_wrong")


def test_reasonmed_questions_with_reference(tmp_path, pairs_config):
    records = [{"instruction": f"Please answer the following multiple-choice question:\nPatient {i} has chest pain "
                f"number {i} after exercise; which drug reduces the risk {i}?\nA. aspirin\nB. heparin\nC. warfarin\n"
                "D. insulin", "input": "", "output": f"Step 1.\nSummary.\nThe answer is {'ABCD'[i % 4]}."}
               for i in range(5)]
    records.insert(2, {"instruction": "Please answer the following multiple-choice question:\nNo options here?",
                       "input": "", "output": "Something"})
    path = write_jsonl(tmp_path / "reasonmed.jsonl", records)
    cfg = load_config(pairs_config, [f"pairs.questions={path}", "pairs.kind=reasonmed",
                                     "pairs.include_reference=true", "pairs.max_pairs_per_question=1"])
    run, report = run_pairs(cfg, fake_sampler())
    assert (report["questions"], report["no_answer_key"], report["sampled_questions"]) == (6, 1, 5)
    made = read_jsonl(run / "pairs" / "pairs.jsonl")
    # question 1 (all wrong) now pairs its reference; question 0 (all right) still has nothing to reject
    assert report["questions_skipped"] == {"all_right": 1, "all_wrong": 0}
    assert report["questions_with_reference_pair"] == 4 and len(made) == 4  # the reference comes first
    one = next(p for p in made if "Patient 1 " in p["prompt"][0]["content"])
    assert one["chosen"][0]["content"] == "Step 1.\nSummary.\nThe answer is B." and one["rejected_answer"] != "B"
    assert one["prompt"][0]["content"] == records[1]["instruction"]


def test_resume_after_a_kill_gives_the_same_pairs(pairs_config, tmp_path):
    whole = load_config(pairs_config, ["pairs.batch_size=8", f"run_dir={tmp_path / 'whole'}"])
    calls: list = []
    run, _ = run_pairs(whole, fake_sampler(calls))
    assert len(calls) == 5 and len({seed for *_, seed in calls}) == 5  # one question per call, each its own seed

    class Killed(Exception):
        pass

    def dies_on_third_call(inner):
        count = [0]

        def sample(conversations, n, seed):
            count[0] += 1
            if count[0] == 3:
                raise Killed
            return inner(conversations, n, seed)
        return sample

    cut = load_config(pairs_config, ["pairs.batch_size=8", f"run_dir={tmp_path / 'cut'}"])
    with pytest.raises(Killed):
        run_pairs(cut, dies_on_third_call(fake_sampler()))
    work = next((tmp_path / "cut" / ".pairs-work").iterdir()) / "samples.jsonl"
    assert len(read_jsonl(work)) == 16  # two questions' samples survived the kill
    with open(work, "a", encoding="utf-8") as fh:
        fh.write('{"index": 2, "id": "q2", "sam')  # a line the kill cut short
    resumed_calls: list = []
    cut_run, report = run_pairs(cut, fake_sampler(resumed_calls))
    assert len(resumed_calls) == 3 and report["resumed_questions"] == 2
    for name in ("pairs.jsonl", "samples.jsonl"):
        assert (cut_run / "pairs" / name).read_bytes() == (run / "pairs" / name).read_bytes()
    # a changed cap reuses the samples; nothing is sampled again
    again: list = []
    capped = load_config(pairs_config, ["pairs.batch_size=8", f"run_dir={tmp_path / 'cut'}",
                                        "pairs.max_pairs_per_question=1"])
    _, report = run_pairs(capped, fake_sampler(again))
    assert again == [] and report["pairs"] == 3


def test_samples_split_over_calls_when_k_exceeds_the_batch(pairs_config):
    cfg = load_config(pairs_config, ["pairs.batch_size=3"])
    calls: list = []
    run, report = run_pairs(cfg, fake_sampler(calls))
    assert [n for _, n, _ in calls] == [3, 3, 2] * 5 and report["samples"] == 40
    assert [s["sample"] for s in read_jsonl(run / "pairs" / "samples.jsonl")][:8] == list(range(8))


def test_real_contamination_guard_refuses_the_medmcqa_eval_items(tmp_path, pairs_config):
    dev, test = SHARED_DATA / "medmcqa_dev" / "dev.json", SHARED_DATA / "medagents_benchmark" / "medmcqa" / "test.jsonl"
    if not dev.is_file():
        pytest.skip(f"{dev} not present")
    cfg = load_config(pairs_config, [f"pairs.questions={dev}", "pairs.kind=medmcqa", "pairs.limit=2",
                                     f"eval.benchmarks=[{{name: medmcqa, kind: medmcqa, path: {test}}}]"])
    run, report = run_pairs(cfg, lambda convs, n, seed: [["The answer is A."] * n for _ in convs])
    eval_ids = {json.loads(line)["realidx"] for line in test.read_text().splitlines() if line.strip()}
    refused = json.loads((run / "pairs" / "report.json").read_text())["refused"]
    assert report["questions"] == 4183 and report["refused_contamination"] >= len(eval_ids) == 2816
    assert all(r["id"] in eval_ids for r in refused)
    sampled = {s["id"] for s in read_jsonl(run / "pairs" / "samples.jsonl")}
    assert len(sampled) == 2 and not sampled & eval_ids


def test_hf_sampler_on_a_tiny_model_is_seeded(tiny_base):
    sampler = pairs.HFSampler(str(tiny_base), temperature=1.0, top_p=1.0, max_new_tokens=6, device="cpu")
    convs = [[{"role": "user", "content": "Which drug? A. x B. y"}], [{"role": "user", "content": "Longer question "
                                                                        "about the heart and its valves?"}]]
    first = sampler(convs, 3, seed=11)
    assert [len(r) for r in first] == [3, 3]
    assert all(r["finish_reason"] in ("stop", "length") and isinstance(r["text"], str) for rs in first for r in rs)
    assert sampler(convs, 3, seed=11) == first
    assert sampler(convs, 3, seed=12) != first
    assert len({r["text"] for r in first[0]}) > 1  # sampled, not greedy


def text_sampler(seen: dict):
    """A model that knows each question's right option by its text ("right N"), whatever its letter: samples 0 and
    1 name it, the others name the first other option; `seen` collects the prompts it was asked."""
    def sample(conversations, n, seed):
        out = []
        for messages in conversations:
            prompt = messages[-1]["content"]
            seen.setdefault(prompt, 0)
            seen[prompt] += n
            options = question_options(prompt)
            right = next(letter for letter, text in options.items() if text.startswith("right"))
            wrong = next(letter for letter in options if letter != right)
            out.append([f"Thinking {seed % 97}.\nThe answer is {right if j < 2 else wrong}." for j in range(n)])
        return out
    return sample


def letter_questions(n: int) -> list[dict]:
    """n questions whose key is always A, with a reference explanation naming it."""
    return [{"realidx": f"k{i}", "question": f"Case {i}: a patient with finding {i}; which treatment number {i}?",
             "options": {"A": f"right {i}", "B": f"other {i}", "C": f"third {i}", "D": f"fourth {i}"},
             "answer_idx": "A", "explanation": f"Option A (right {i}) treats it; option B does not."}
            for i in range(n)]


def test_balanced_pairs_share_one_permutation_per_question(pairs_config, tmp_path):
    questions = write_jsonl(tmp_path / "keys_a.jsonl", letter_questions(8))
    cfg = load_config(pairs_config, [f"pairs.questions={questions}", "pairs.balance_letters=true",
                                     "pairs.max_pairs_per_question=2", "pairs.include_reference=true"])
    seen: dict = {}
    run, report = run_pairs(cfg, text_sampler(seen))
    made = read_jsonl(run / "pairs" / "pairs.jsonl")
    assert len(seen) == 8 and set(seen.values()) == {8}  # each question asked once, under one permutation
    golds = Counter()
    for p in made:
        prompt = p["prompt"][0]["content"]
        assert prompt in seen  # chosen and rejected were sampled under the prompt the pair shows
        options = question_options(prompt)
        assert options[p["answer"]].startswith("right")  # the gold text sits at the gold letter
        assert p["chosen_answer"] == p["answer"] != p["rejected_answer"]
        assert extract_letter(p["chosen"][0]["content"], options) == p["answer"]
        golds[p["answer"]] += 1
    assert golds == {"A": 4, "B": 4, "C": 4, "D": 4}  # 8 questions, 2 per letter, 2 pairs each
    letters = report["letters"]
    assert letters["pairs_answer_shares"] == {"A": 0.25, "B": 0.25, "C": 0.25, "D": 0.25}
    assert letters["pairs_chosen_answer_shares"] == letters["pairs_answer_shares"]
    assert sum(letters["pairs_rejected_answer_shares"].values()) == pytest.approx(1)
    assert letters["questions"]["gold_counts_before"] == {"A": 8}
    assert letters["questions"]["gold_counts_after"] == {"A": 2, "B": 2, "C": 2, "D": 2}
    # the explanation, re-lettered with its question, is a chosen reply naming the new letter
    refs = [p for p in made if p["chosen"][0]["content"].startswith("Option ")]
    assert refs and all(p["chosen"][0]["content"].startswith(f"Option {p['answer']} (right") for p in refs)

    off = load_config(pairs_config, [f"pairs.questions={questions}", "pairs.balance_letters=false",
                                     f"run_dir={tmp_path / 'off'}"])
    _, report_off = run_pairs(off, text_sampler({}))
    assert report_off["letters"]["pairs_answer_shares"] == {"A": 1.0}


def test_pubmedqa_labels_are_never_permuted(pairs_config, tmp_path):
    records = {str(1000 + i): {"QUESTION": f"Does drug {i} help patients with condition {i}?",
                               "CONTEXTS": [f"Abstract {i}."], "final_decision": "yes", "LONG_ANSWER": "It does."}
               for i in range(4)}
    path = tmp_path / "pqal.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    cfg = load_config(pairs_config, [f"pairs.questions={path}", "pairs.kind=pubmedqa", "pairs.balance_letters=true"])
    seen: dict = {}
    _, report = run_pairs(cfg, lambda convs, n, seed: [
        [seen.setdefault(c[-1]["content"], "The answer is A.")] * n for c in convs])
    assert all("\nA. yes\nB. no\nC. maybe" in prompt for prompt in seen) and len(seen) == 4
    assert report["letters"]["questions"]["multiple_choice"] == 0


def test_pipeline_stage_cli_and_data_path(pairs_config):
    from medtune.data.common import data_path

    cfg = load_config(pairs_config, ["pairs.samples=2", "pairs.limit=2", "chat.max_tokens=4",
                                     "pairs.max_new_tokens=4"])
    assert [s.name for s in active_stages(cfg)][:2] == ["pairs", "data"]
    run = RunDir(cfg.run_dir)
    with pytest.raises(MedtuneError, match="run `medtune pairs CONFIG` first"):
        data_path(cfg)
    before = stage_fingerprint(BY_NAME["data"], cfg, run)
    proc = subprocess.run([sys.executable, "-m", "medtune.cli", "pairs", str(pairs_config), "--set",
                           "pairs.samples=2", "--set", "pairs.limit=2", "--set", "pairs.max_new_tokens=4"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    report = run.manifest("pairs")["results"]
    assert report["samples"] == 4 and report["sampled_questions"] == 2
    assert report["questions_with_pairs"] + sum(report["questions_skipped"].values()) == 2
    assert data_path(cfg) == run / "pairs" / "pairs.jsonl"
    assert stage_fingerprint(BY_NAME["data"], cfg, run) != before  # data follows its upstream, the pairs stage
    assert run.is_current("pairs", stage_fingerprint(BY_NAME["pairs"], cfg, run))


def test_without_a_pairs_section_nothing_changes(tiny_config):
    cfg = load_config(tiny_config)
    run = RunDir(cfg.run_dir)
    assert "pairs" not in [s.name for s in active_stages(cfg)]
    before = stage_fingerprint(BY_NAME["data"], cfg, run)
    (run / "pairs").mkdir(parents=True)  # a stale pairs/ of an earlier config is not data's upstream
    (run / "pairs" / "manifest.json").write_text('{"fingerprint": "x"}')
    assert stage_fingerprint(BY_NAME["data"], cfg, run) == before
    with pytest.raises(MedtuneError, match="no pairs section"):
        run_stage(BY_NAME["pairs"], cfg, run, UI())


def test_cli_one_line_errors_for_bad_pairs_config(pairs_config, tmp_path):
    reasonmed = write_jsonl(tmp_path / "rm.jsonl", [{"instruction": "q", "input": "", "output": "a"}])
    for extra, needle in [
        (["pairs.samples=0"], "pairs.samples: Input should be greater than 0"),
        (["pairs.kind=gsm8k"], "pairs.kind"),
        (["pairs.questions=absent.jsonl"], "pairs.questions: file not found"),
        ([f"data.path={reasonmed}"], "leave both unset when the config has a pairs section"),
        ([f"pairs.questions={reasonmed}"],
         "rm.jsonl:1: field 'question' must be a non-empty string (pairs.kind is medqa)"),
        (["pairs.model=/nonexistent/merged"], "pairs.model: /nonexistent/merged not found"),
    ]:
        args = [sys.executable, "-m", "medtune.cli", "pairs", str(pairs_config)]
        for item in extra:
            args += ["--set", item]
        proc = subprocess.run(args, capture_output=True, text=True, cwd=ROOT)
        assert proc.returncode != 0, extra
        assert needle in proc.stderr, (extra, proc.stderr)
        assert "Traceback" not in proc.stderr + proc.stdout
        assert len([line for line in proc.stderr.splitlines() if line.strip()]) == 1, proc.stderr
    no_pairs = yaml.safe_load(pairs_config.read_text())
    del no_pairs["pairs"]
    for data, needle in [({"max_len": 96}, "data: set exactly one of data.path"),
                         ({"path": str(reasonmed)}, None)]:
        no_pairs["data"] = data
        path = tmp_path / "no_pairs.yaml"
        path.write_text(yaml.safe_dump(no_pairs), encoding="utf-8")
        proc = subprocess.run([sys.executable, "-m", "medtune.cli", "pairs", str(path)], capture_output=True,
                              text=True, cwd=ROOT)
        assert proc.returncode != 0 and "Traceback" not in proc.stderr
        assert (needle or "the config has no pairs section") in proc.stderr
