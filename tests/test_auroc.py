"""AUROC against a hand-worked example and against scipy's Mann–Whitney U."""

import numpy as np
import pytest
from scipy.stats import mannwhitneyu

from evaluation.auroc import auroc, mean_per_prompt_auroc


def test_hand_worked_example():
    # Positives score 0.9, 0.6, 0.4; negatives 0.7, 0.2.
    # Pairs (pos > neg): 0.9>0.7 ✓ 0.9>0.2 ✓ 0.6>0.7 ✗ 0.6>0.2 ✓ 0.4>0.7 ✗ 0.4>0.2 ✓ → 4/6.
    assert auroc([0.9, 0.6, 0.4, 0.7, 0.2], [1, 1, 1, 0, 0]) == pytest.approx(4 / 6)


def test_ties_count_half():
    # One positive, one negative, same score → 0.5; a tie plus a win → (1 + 0.5) / 2.
    assert auroc([0.5, 0.5], [1, 0]) == 0.5
    assert auroc([0.5, 0.5, 0.1], [1, 0, 0]) == pytest.approx(0.75)


def test_perfect_and_inverted():
    assert auroc([3, 2, 1], [1, 0, 0]) == 1.0
    assert auroc([1, 2, 3], [1, 0, 0]) == 0.0


def test_matches_mann_whitney():
    rng = np.random.default_rng(0)
    for _ in range(20):
        y = rng.random(50) < 0.4
        s = np.round(rng.normal(size=50) + y, 1)  # rounding creates ties
        u = mannwhitneyu(s[y], s[~y]).statistic
        assert auroc(s, y) == pytest.approx(u / (y.sum() * (~y).sum()))


def test_single_class_is_an_error_and_is_dropped_from_the_mean():
    with pytest.raises(ValueError):
        auroc([0.1, 0.2], [1, 1])
    with pytest.raises(ValueError, match="NaN"):  # it sorted last: the best score, silently
        auroc([float("nan"), 1.0, 2.0, 0.0], [1, 0, 1, 0])
    mean, used = mean_per_prompt_auroc(
        [(np.array([0.9, 0.1]), np.array([1, 0])), (np.array([0.3, 0.2]), np.array([1, 1]))]
    )
    assert (mean, used) == (1.0, 1)
