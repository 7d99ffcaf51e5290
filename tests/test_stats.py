"""Accuracy statistics: Wilson intervals and McNemar's exact test, against values worked out by hand."""

from __future__ import annotations

import pytest

from medtune.evaluate.stats import mcnemar_exact, paired_comparison, smallest_p, wilson_interval


def test_wilson_interval_known_values():
    low, high = wilson_interval(8, 10)  # the textbook example: 0.8 of 10 -> [0.490, 0.943]
    assert low == pytest.approx(0.4902, abs=1e-4) and high == pytest.approx(0.9433, abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 0.0)
    assert wilson_interval(0, 5)[0] == 0.0 and wilson_interval(5, 5)[1] == 1.0


@pytest.mark.parametrize(("b", "c", "p"), [
    (0, 0, 1.0),  # no discordant pair: nothing to test
    (1, 6, 2 * (1 + 7) / 2**7),  # n = 7: 2 * P(X <= 1) = 16/128 = 0.125
    (0, 6, 2 / 2**6),  # all six on one side: 0.03125
    (10, 2, 2 * (1 + 12 + 66) / 2**12),  # n = 12: 2 * (C(12,0) + C(12,1) + C(12,2)) / 4096 = 0.03857
    (3, 3, 1.0),  # 2 * P(X <= 3) = 84/64 > 1: capped
])
def test_mcnemar_exact_against_hand_computation(b, c, p):
    assert mcnemar_exact(b, c) == pytest.approx(p, rel=1e-12)
    assert mcnemar_exact(c, b) == pytest.approx(p, rel=1e-12)  # two-sided: symmetric


def test_mcnemar_matches_scipy_binomtest_when_installed():
    stats = pytest.importorskip("scipy.stats")
    for b, c in ((4, 17), (0, 9), (25, 31), (12, 3)):
        assert mcnemar_exact(b, c) == pytest.approx(stats.binomtest(b, b + c, 0.5).pvalue, rel=1e-9)


def test_mcnemar_rejects_negative_counts():
    with pytest.raises(ValueError, match=">= 0"):
        mcnemar_exact(-1, 3)


def test_paired_comparison_counts_discordant_items_on_shared_ids():
    reference = {"1": True, "2": True, "3": False, "4": False, "5": True, "6": True, "only-ref": True}
    other = {"1": True, "2": False, "3": True, "4": True, "5": False, "6": False, "only-other": False}
    c = paired_comparison(reference, other)
    assert (c.n, c.reference_correct, c.correct) == (6, 4, 3)
    assert (c.only_reference, c.only_this) == (3, 2)  # items 2, 5 and 6; items 3 and 4
    assert c.difference == pytest.approx(-1 / 6)
    assert c.p_value == 1.0  # 2 * P(X <= 2 | n = 5) = 2 * 16/32
    assert not c.significant and not c.can_be_significant  # 5 discordant items: at best p = 2/32
    assert c.as_dict()["p_value"] == 1.0


def test_small_samples_can_not_be_significant():
    assert smallest_p(5) == pytest.approx(0.0625) and smallest_p(6) == pytest.approx(0.03125)
    twelve = {str(i): i < 2 for i in range(12)}  # 2 right
    better = {str(i): True for i in range(12)}  # 12 right: 10 discordant, all one way
    c = paired_comparison(twelve, better)
    assert c.difference == pytest.approx(10 / 12) and c.p_value == pytest.approx(2 / 2**10)
    assert c.significant and c.can_be_significant
