import json

import pytest
from conftest import reasonmed_record, write_jsonl

from medtune.answers import extract_letter, final_answer, question_options
from medtune.artifacts import RunDir
from medtune.config import load_config
from medtune.evaluate.runner import wilson_interval
from medtune.pipeline import BY_NAME, run_stage
from medtune.ui import UI

OPTIONS = {"A": "Aspirin", "B": "Heparin", "C": "Warfarin", "D": "Alteplase"}


@pytest.mark.parametrize("text, expected", [
    ("Step 1...\nThe answer is B.", "B"),
    ("the answer is: (c)", "C"),
    ("First I thought the answer is A, but the answer is D.", "D"),
    ("Final answer: **A**", "A"),
    ("reasoning\n\\boxed{C}", "C"),
    ("so we pick\nB", "B"),
    ("so we pick\n(D)", "D"),
    ("A patient needs anticoagulation.\nGive heparin now.", "B"),
    ("A patient presents with pain.", None),
    ("The answer is E.", None),  # not an option
    ("", None),
])
def test_extraction_chain(text, expected):
    assert extract_letter(text, OPTIONS) == expected


QUESTION = ("Please answer the following multiple-choice question:\nWhich vitamin deficiency causes scurvy?\n"
            "A. Vitamin A\nB. Vitamin B12\nC. Vitamin C\nD. Vitamin D")


def test_question_options_are_read_off_the_option_lines():
    assert question_options(QUESTION) == {"A": "Vitamin A", "B": "Vitamin B12", "C": "Vitamin C", "D": "Vitamin D"}
    assert question_options("(A) Liver\nB) Heart\nC: Lung") == {"A": "Liver", "B": "Heart", "C": "Lung"}
    assert question_options("Define tachycardia.") == {}


# Replies on which the data report (explicit "answer is X" only) and chat (also \boxed{}, a lone letter, an option's
# text) used to disagree, and two where they agreed on a letter that is not an option.
@pytest.mark.parametrize("reply, expected", [
    ("Collagen needs it.\n\\boxed{C}", "C"),
    ("Collagen needs it.\nC", "C"),
    ("Collagen needs it.\n(C)", "C"),
    ("So the deficiency is of Vitamin C.", "C"),
    ("The answer is E.", None),
    ("The answer is C, not the answer is F.", "C"),
    ("1. Scurvy is vitamin C deficiency.\nSummary: vitamin C.\nThe answer is C.", "C"),
    ("the answer is (b) and later The answer is D.", "D"),
])
def test_final_answer_with_the_question_options(reply, expected):
    assert final_answer(reply, QUESTION) == expected


def test_final_answer_without_options_takes_an_explicit_or_boxed_letter():
    assert final_answer("Final answer: c", "free text question") == "C"
    assert final_answer("so \\boxed{B}") == "B"
    assert final_answer("Vitamin C.\nC") is None  # a lone letter means nothing without options
    assert final_answer("No letter here.") is None


def test_data_report_counts_every_answer_form_that_truncation_cuts(tiny_config, tmp_path):
    """The report's "lost their final answer" uses chat's and eval's extraction: a boxed answer, a lone letter and
    an explicit one cut off by data.max_len all count (the data stage used to see only the explicit one)."""
    records = [reasonmed_record(i) for i in range(24)]
    steps = "\n".join(f"{i}. A long step about the kidney number {i}." for i in range(60))
    for i, ending in [(1, "\\boxed{B}"), (2, "C"), (3, "The answer is D.")]:
        records[i]["output"] = f"{steps}\n{ending}"
    write_jsonl(tmp_path / "train.jsonl", records)
    cfg = load_config(tiny_config, ["data.length_policy=truncate"])
    run = RunDir(cfg.run_dir)
    run_stage(BY_NAME["data"], cfg, run, UI())
    report = json.loads((run / "prepared" / "report.json").read_text())
    assert report["truncated"] == 3 == report["truncated_answer_cut"]


def test_wilson_interval():
    low, high = wilson_interval(8, 10)
    assert round(low, 3) == 0.490 and round(high, 3) == 0.943
    assert wilson_interval(0, 0) == (0.0, 0.0)
