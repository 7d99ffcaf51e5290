import pytest

from medtune.answers import extract_letter
from medtune.evaluate.runner import wilson_interval

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


def test_wilson_interval():
    low, high = wilson_interval(8, 10)
    assert round(low, 3) == 0.490 and round(high, 3) == 0.943
    assert wilson_interval(0, 0) == (0.0, 0.0)
