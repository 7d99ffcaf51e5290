"""Benchmark loaders on the real shared files and on small fixtures in each source's shape; stratified sampling."""

from __future__ import annotations

import csv
import json
import os
import random
import re
from collections import Counter
from pathlib import Path

import pytest

from medtune.errors import MedtuneError
from medtune.evaluate.sample import stratified_sample
from medtune.formats.benchmarks import (
    MMLU_MEDICAL,
    load_benchmark,
    load_medmcqa,
    load_medmcqa_hub,
    load_mmlu,
    load_multiple_choice,
    load_pubmedqa,
)
from medtune.formats.choice import Item

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MEDTUNE_SHARED_DATA", ROOT.parent / "shared" / "data"))
real_data = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"shared benchmark data not found at {SHARED_DATA}")


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def letters(items: list[Item]) -> dict[str, int]:
    return dict(Counter(item.answer for item in items))


# --- the real files -------------------------------------------------------------------------------------------------

@real_data
def test_real_medqa_4_and_5_options():
    four = load_benchmark("medqa", SHARED_DATA / "medagents_benchmark" / "medqa" / "test.jsonl")
    five = load_multiple_choice(SHARED_DATA / "medreason_eval" / "medqa_test.jsonl")
    assert len(four) == 1273 and letters(four) == {"A": 353, "B": 309, "C": 346, "D": 265}
    assert all(list(item.options) == ["A", "B", "C", "D"] for item in four)
    assert four[0].id == "0" and four[0].answer == "B" and four[0].question.startswith("A junior orthopaedic surgery")
    assert len(five) == 1273 and all(list(item.options) == ["A", "B", "C", "D", "E"] for item in five)
    assert letters(five) == {"A": 273, "B": 277, "C": 252, "D": 269, "E": 202}
    # the same questions in the same order, with the same correct-answer text under different letters
    assert [i.question for i in four] == [i.question for i in five]
    assert [i.options[i.answer] for i in four] == [i.options[i.answer] for i in five]


@real_data
def test_real_medmcqa_medqa_shaped_file():
    path = SHARED_DATA / "medagents_benchmark" / "medmcqa" / "test.jsonl"
    items = load_multiple_choice(path)
    assert len(items) == 2816 and letters(items) == {"A": 950, "B": 735, "C": 617, "D": 514}
    assert items[0].id == "b64a9cd7-d076-4c55-8be1-f9c44fece6cc" and items[0].answer == "C"
    assert load_benchmark("medmcqa", path) == items  # the auto loader sees the MedQA shape


@real_data
def test_real_pubmedqa_test_set():
    ori = SHARED_DATA / "pubmedqa" / "ori_pqal.json"
    truth = json.loads((SHARED_DATA / "pubmedqa" / "test_ground_truth.json").read_text(encoding="utf-8"))
    items = load_benchmark("pubmedqa", ori)
    assert len(items) == 500 and [item.id for item in items] == list(truth)
    assert Counter(item.options[item.answer] for item in items) == {"yes": 276, "no": 169, "maybe": 55}
    assert letters(items) == {"A": 276, "B": 169, "C": 55}
    assert all(item.options == {"A": "yes", "B": "no", "C": "maybe"} for item in items)
    assert all(item.context.strip() and item.question.endswith("?") for item in items)
    first = items[0]
    assert first.id == "12377809" and first.question == "Is anorectal endosonography valuable in dyschesia?"
    assert first.context.startswith("Dyschesia can be provoked by inappropriate defecation movements.")
    assert "\n\n" in first.context  # sections joined by blank lines
    assert load_pubmedqa(ori, SHARED_DATA / "pubmedqa" / "test_ground_truth.json") == items


@real_data
def test_real_stratified_sample_of_medqa():
    items = load_multiple_choice(SHARED_DATA / "medagents_benchmark" / "medqa" / "test.jsonl")
    sample = stratified_sample(items, 100, seed=0)
    # exact shares 27.73 / 24.27 / 27.18 / 20.82: floors plus one each for the two largest remainders (D, A)
    assert letters(sample) == {"A": 28, "B": 24, "C": 27, "D": 21}
    assert sample == stratified_sample(items, 100, seed=0)


# --- MMLU, in cais/mmlu's two shapes ----------------------------------------------------------------------------------

MMLU_ROWS = [  # (subject, question, choices, answer index); invented questions
    ("anatomy", "Which bone forms the heel?", ["Talus", "Calcaneus", "Navicular", "Cuboid"], 1),
    ("anatomy", "Which nerve supplies the diaphragm?", ["Vagus", "Phrenic", "Intercostal", "Accessory"], 1),
    ("astronomy", "Which planet is closest to the Sun?", ["Venus", "Earth", "Mercury", "Mars"], 2),
    ("medical_genetics", "Trisomy 21 causes which syndrome?", ["Down", "Turner", "Edwards", "Patau"], 0),
    ("medical_genetics", 'Which base pairs with adenine in DNA, "usually"?\nPick one.',
     ["Guanine", "Cytosine", "Uracil", "Thymine"], 3),
]


def write_mmlu_csvs(root: Path) -> Path:
    """The original release's layout: data/{dev,val,test}/<subject>_<split>.csv, no header, answer as a letter."""
    by_subject: dict[str, list] = {}
    for subject, question, choices, answer in MMLU_ROWS:
        by_subject.setdefault(subject, []).append([question, *choices, "ABCD"[answer]])
    for subject, rows in by_subject.items():
        for split in ("test", "dev"):
            folder = root / "data" / split
            folder.mkdir(parents=True, exist_ok=True)
            with open(folder / f"{subject}_{split}.csv", "w", newline="", encoding="utf-8") as fh:
                csv.writer(fh).writerows(rows if split == "test" else [["Dev question?", "a", "b", "c", "d", "A"]])
    return root / "data"


def write_mmlu_jsonl(path: Path) -> Path:
    return write_jsonl(path, [{"question": q, "subject": s, "choices": c, "answer": a} for s, q, c, a in MMLU_ROWS])


def test_mmlu_hub_rows_and_csvs_give_the_same_items(tmp_path):
    subjects = ("anatomy", "medical_genetics")
    from_jsonl = load_mmlu(write_mmlu_jsonl(tmp_path / "mmlu_test.jsonl"), subjects)
    from_csv = load_mmlu(write_mmlu_csvs(tmp_path), subjects)  # dev files below data/ are not read
    assert from_jsonl == from_csv
    assert [item.id for item in from_jsonl] == ["anatomy:0", "anatomy:1", "medical_genetics:0", "medical_genetics:1"]
    assert letters(from_jsonl) == {"B": 2, "A": 1, "D": 1}
    heel = from_jsonl[0]
    assert heel == Item("anatomy:0", "Which bone forms the heel?",
                        {"A": "Talus", "B": "Calcaneus", "C": "Navicular", "D": "Cuboid"}, "B", subject="anatomy")
    assert from_csv[-1].question == 'Which base pairs with adenine in DNA, "usually"?\nPick one.'  # quoted, 2 lines


def test_mmlu_subject_filtering(tmp_path):
    jsonl = write_mmlu_jsonl(tmp_path / "mmlu_test.jsonl")
    assert [item.subject for item in load_mmlu(jsonl, ["astronomy"])] == ["astronomy"]
    assert [item.id for item in load_mmlu(jsonl, "medical_genetics")] == ["medical_genetics:0", "medical_genetics:1"]
    one_file = write_mmlu_csvs(tmp_path) / "test" / "anatomy_test.csv"
    assert [item.subject for item in load_benchmark("mmlu", one_file, subjects=["anatomy"])] == ["anatomy"] * 2
    # the default asks for all six medical subjects, and a score over fewer must not pass silently
    assert len(MMLU_MEDICAL) == 6
    with pytest.raises(MedtuneError, match=r"no MMLU items for subject\(s\) \['clinical_knowledge', 'college_bio"):
        load_mmlu(jsonl)
    with pytest.raises(MedtuneError, match=r"expected one clinical_knowledge_test.csv below it, found 0"):
        load_mmlu(tmp_path / "data")


def test_mmlu_malformed_records(tmp_path):
    good = {"question": "Q?", "subject": "anatomy", "choices": ["a", "b", "c", "d"], "answer": 0}
    cases = [
        ({**good, "answer": 4}, "field 'answer' 4 must be a choice index 0-3"),
        ({**good, "answer": True}, "field 'answer' True must be a choice index 0-3"),
        ({**good, "answer": "B"}, "field 'answer' 'B' must be a choice index 0-3"),
        ({**good, "choices": "abcd"}, "field 'choices' must be a list of option texts"),
        ({key: good[key] for key in ("question", "choices", "answer")}, "field 'subject' must name the MMLU subject"),
    ]
    for row, message in cases:
        path = write_jsonl(tmp_path / "bad.jsonl", [good, row])
        with pytest.raises(MedtuneError, match="^" + re.escape(f"{path}:2: {message}")):
            load_mmlu(path, ["anatomy"])
    bad_csv = tmp_path / "anatomy_test.csv"
    bad_csv.write_text('"Q1?",a,b,c,d,A\n"Q2?",a,b,c,d\n', encoding="utf-8")
    with pytest.raises(MedtuneError, match=rf"^{bad_csv}:2: expected 6 columns .* got 5$"):
        load_mmlu(bad_csv, ["anatomy"])
    bad_csv.write_text('"Q1?",a,b,c,d,A\n"Q2\nspans lines",a,b,c,d,A\nQ3?,a,b,c,d,E\n', encoding="utf-8")
    with pytest.raises(MedtuneError, match=rf"^{bad_csv}:4: answer \(column 6\) 'E' is not one of A, B, C, D$"):
        load_mmlu(bad_csv, ["anatomy"])


# --- MedMCQA hub rows -------------------------------------------------------------------------------------------------

def medmcqa_row(n: int, cop: int, **extra) -> dict:
    return {"id": f"q{n}", "question": f"Question {n}?", "opa": "one", "opb": "two", "opc": "three", "opd": "four",
            "cop": cop, "choice_type": "single", "exp": None, "subject_name": "Anatomy", **extra}


def test_medmcqa_hub_rows_cop_base_from_the_data(tmp_path):
    zero_based = write_jsonl(tmp_path / "hub.jsonl", [medmcqa_row(1, 0), medmcqa_row(2, 3), medmcqa_row(3, 1)])
    items = load_benchmark("medmcqa", zero_based)  # auto: hub rows
    assert [item.answer for item in items] == ["A", "D", "B"]
    assert items[0] == Item("q1", "Question 1?", {"A": "one", "B": "two", "C": "three", "D": "four"}, "A",
                            subject="Anatomy")
    one_based = write_jsonl(tmp_path / "orig.jsonl", [medmcqa_row(1, 4), medmcqa_row(2, 1), medmcqa_row(3, 2)])
    assert [item.answer for item in load_medmcqa(one_based)] == ["D", "A", "B"]

    ambiguous = write_jsonl(tmp_path / "small.jsonl", [medmcqa_row(1, 1), medmcqa_row(2, 3)])
    with pytest.raises(MedtuneError, match=r"only has values 1-3, so its base can't be told .* pass cop_base=0"):
        load_medmcqa_hub(ambiguous)
    assert [item.answer for item in load_medmcqa_hub(ambiguous, cop_base=0)] == ["B", "D"]
    assert [item.answer for item in load_benchmark("medmcqa", ambiguous, cop_base=1)] == ["A", "C"]

    mixed = write_jsonl(tmp_path / "mixed.jsonl", [medmcqa_row(1, 0), medmcqa_row(2, 4)])
    with pytest.raises(MedtuneError, match=r"has both 0 and 4, so it is neither 0-3 nor 1-4"):
        load_medmcqa_hub(mixed)
    with pytest.raises(MedtuneError, match=rf"^{mixed}:1: field 'cop' 0 is out of range for 1-based indices$"):
        load_medmcqa_hub(mixed, cop_base=1)


def test_medmcqa_hub_malformed_records(tmp_path):
    cases = [
        (medmcqa_row(2, -1), "field 'cop' -1 is not an option index 0-3 or 1-4 (MedMCQA's test split has no answers"),
        ({k: v for k, v in medmcqa_row(2, 0).items() if k != "cop"}, "field 'cop' None is not an option index"),
        (medmcqa_row(2, 0, opc=None), "field 'opc' must be the option text"),
        (medmcqa_row(2, 0, question="  "), "field 'question' must be a non-empty string"),
    ]
    for row, message in cases:
        path = write_jsonl(tmp_path / "bad.jsonl", [medmcqa_row(1, 0), row])
        with pytest.raises(MedtuneError, match="^" + re.escape(f"{path}:2: {message}")):
            load_medmcqa(path)
    neither = write_jsonl(tmp_path / "neither.jsonl", [{"question": "Q?", "choices": ["a", "b"]}])
    with pytest.raises(MedtuneError, match=rf"^{neither}:1: neither a MedQA-shaped record"):
        load_medmcqa(neither)


# --- MedQA-shaped and PubMedQA malformed records ----------------------------------------------------------------------

def test_multiple_choice_malformed_records(tmp_path):
    good = {"question": "Q?", "options": {"A": "x", "B": "y"}, "answer_idx": "A"}
    cases = [
        ('{"question": "Q?", ', r"malformed JSON \(.*\)"),
        ('["Q?", "A"]', "expected a JSON object, got list"),
        (json.dumps({**good, "answer_idx": ["A"]}), r"field 'answer_idx' \['A'\] is not one of the options \['A', "),
        (json.dumps({**good, "answer_idx": "C"}), r"field 'answer_idx' 'C' is not one of the options"),
        (json.dumps({**good, "options": ["x", "y"]}), "field 'options' must map letters to option texts"),
        (json.dumps({**good, "question": 3}), "field 'question' must be a non-empty string"),
    ]
    for line, message in cases:
        path = tmp_path / "bad.jsonl"
        path.write_text(json.dumps(good) + "\n\n" + line + "\n", encoding="utf-8")
        with pytest.raises(MedtuneError, match=f"^{re.escape(str(path))}:3: {message}"):
            load_multiple_choice(path)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(MedtuneError, match=rf"^{empty}: no items$"):
        load_multiple_choice(empty)


def write_pubmedqa(folder: Path, records: dict, labels: dict) -> Path:
    folder.mkdir(exist_ok=True)
    (folder / "test_ground_truth.json").write_text(json.dumps(labels), encoding="utf-8")
    ori = folder / "ori_pqal.json"
    ori.write_text(json.dumps(records, indent=1), encoding="utf-8")
    return ori


def pqal(question: str, decision: str) -> dict:
    return {"QUESTION": question, "CONTEXTS": ["Background text.", "Results text."],
            "LABELS": ["BACKGROUND", "RESULTS"], "final_decision": decision, "LONG_ANSWER": "Conclusion."}


def test_pubmedqa_fixture_keeps_only_test_ids(tmp_path):
    records = {"111": pqal("Does A help?", "yes"), "222": pqal("Does B harm?", "maybe"), "333": pqal("C?", "no")}
    ori = write_pubmedqa(tmp_path / "p", records, {"333": "no", "111": "yes"})
    assert load_pubmedqa(ori) == [
        Item("333", "C?", {"A": "yes", "B": "no", "C": "maybe"}, "B", context="Background text.\n\nResults text.",
             explanation="Conclusion."),
        Item("111", "Does A help?", {"A": "yes", "B": "no", "C": "maybe"}, "A",
             context="Background text.\n\nResults text.", explanation="Conclusion."),
    ]


def test_pubmedqa_errors(tmp_path):
    records = {"111": pqal("Does A help?", "yes"), "222": pqal("Does B harm?", "maybe")}
    ori = write_pubmedqa(tmp_path / "missing", records, {"111": "yes", "999": "no"})
    with pytest.raises(MedtuneError, match=rf"^{ori}: key '999': test PMID from .*test_ground_truth.json is missing$"):
        load_pubmedqa(ori)
    ori = write_pubmedqa(tmp_path / "disagree", records, {"111": "yes", "222": "no"})
    with pytest.raises(MedtuneError, match=rf"^{ori}: key '222': final_decision 'maybe' disagrees with the test label"):
        load_pubmedqa(ori)
    ori = write_pubmedqa(tmp_path / "label", records, {"111": "probably"})
    with pytest.raises(MedtuneError, match=r"test_ground_truth.json: key '111': label 'probably' is not one of yes/no"):
        load_pubmedqa(ori)
    ori = write_pubmedqa(tmp_path / "list_label", records, {"111": ["yes"]})
    with pytest.raises(MedtuneError, match=r"test_ground_truth.json: key '111': label \['yes'\] is not one of yes/no"):
        load_pubmedqa(ori)
    ori = write_pubmedqa(tmp_path / "contexts", {"111": {**pqal("Q?", "yes"), "CONTEXTS": []}}, {"111": "yes"})
    with pytest.raises(MedtuneError, match=rf"^{ori}: key '111': field 'CONTEXTS' must be a non-empty list"):
        load_pubmedqa(ori)
    ori = write_pubmedqa(tmp_path / "question", {"111": {"CONTEXTS": ["x"], "final_decision": "yes"}}, {"111": "yes"})
    with pytest.raises(MedtuneError, match=rf"^{ori}: key '111': field 'QUESTION' must be a non-empty string"):
        load_pubmedqa(ori)
    (tmp_path / "question" / "test_ground_truth.json").unlink()
    with pytest.raises(MedtuneError, match=r"test_ground_truth.json: file not found; pass test_ids_path="):
        load_pubmedqa(ori)
    labels = tmp_path / "labels.json"
    labels.write_text('{"111": "yes"}', encoding="utf-8")
    ori.write_text('{"111": {"QUESTION": "Q?",\n  "CONTEXTS": [}', encoding="utf-8")
    with pytest.raises(MedtuneError, match=rf"^{ori}:2: not valid JSON in element 0 \(Expecting value\)"):
        load_pubmedqa(ori, labels)


def test_load_benchmark_registry_errors(tmp_path):
    with pytest.raises(MedtuneError, match=r"unknown benchmark kind 'usmle': choose one of \['medmcqa', 'medqa', "):
        load_benchmark("usmle", tmp_path / "x.jsonl")
    with pytest.raises(MedtuneError, match=r"benchmark kind 'medqa' takes options \[\], not \['subjects'\]"):
        load_benchmark("medqa", tmp_path / "x.jsonl", subjects=["anatomy"])
    with pytest.raises(MedtuneError, match=r"x.jsonl: file not found \(benchmark kind 'medqa'\)"):
        load_benchmark("medqa", tmp_path / "x.jsonl")


# --- stratified_sample ------------------------------------------------------------------------------------------------

def make_items(counts: dict[tuple[str, str], int]) -> list[Item]:
    """Items with the given (letter, subject) counts, shuffled so that no stratum sits in one block."""
    cells = [cell for cell, n in counts.items() for _ in range(n)]
    random.Random(0).shuffle(cells)
    return [Item(str(i), f"Q{i}?", {"A": "a", "B": "b", "C": "c", "D": "d"}, letter, subject=subject)
            for i, (letter, subject) in enumerate(cells)]


def test_stratified_sample_letters_only():
    items = make_items({("A", ""): 50, ("B", ""): 30, ("C", ""): 15, ("D", ""): 5})
    sample = stratified_sample(items, 10, seed=3)
    assert letters(sample) == {"A": 5, "B": 3, "C": 2}  # shares 5 / 3 / 1.5 / 0.5: the tie goes to the earlier letter
    assert letters(stratified_sample(items, 7, seed=3)) == {"A": 4, "B": 2, "C": 1}  # 3.5 / 2.1 / 1.05 / 0.35


def test_stratified_sample_is_deterministic_and_keeps_order():
    items = make_items({("A", ""): 40, ("B", ""): 35, ("C", ""): 25})
    sample = stratified_sample(items, 20, seed=7)
    assert sample == stratified_sample(items, 20, seed=7)
    assert sample != stratified_sample(items, 20, seed=8)  # another seed draws other items ...
    assert letters(stratified_sample(items, 20, seed=8)) == letters(sample) == {"A": 8, "B": 7, "C": 5}  # ... alike
    positions = [items.index(item) for item in sample]
    assert positions == sorted(positions) and len(set(positions)) == 20


def test_stratified_sample_letters_and_subjects():
    counts = {("A", "anatomy"): 30, ("B", "anatomy"): 10, ("A", "genetics"): 5, ("B", "genetics"): 25,
              ("C", "genetics"): 10, ("C", "medicine"): 12, ("D", "medicine"): 8}
    items = make_items(counts)  # 100 items: letters A 35 B 35 C 22 D 8; subjects 40 / 40 / 20
    sample = stratified_sample(items, 25, seed=0)
    assert letters(sample) == {"A": 9, "B": 9, "C": 5, "D": 2}  # 8.75 / 8.75 / 5.5 / 2: C loses the tie-break
    assert Counter(item.subject for item in sample) == {"anatomy": 10, "genetics": 10, "medicine": 5}
    cells = Counter((item.answer, item.subject) for item in sample)
    assert all(abs(cells[cell] - 25 * n / 100) < 1 for cell, n in counts.items())


def test_stratified_sample_limits():
    items = make_items({("A", ""): 3, ("B", ""): 2})
    assert stratified_sample(items, 5, seed=0) == items
    assert stratified_sample(items, 50, seed=0) == items
    assert stratified_sample(items, 0, seed=0) == []
    with pytest.raises(MedtuneError, match="sample limit must be >= 0, not -1"):
        stratified_sample(items, -1, seed=0)
