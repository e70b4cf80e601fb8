"""Evaluation metrics: unbiased pass@k against brute-force enumeration, maj@k by hand."""
from __future__ import annotations

from itertools import combinations

import pytest

from roll.metrics import majority_correct, pass_at_k


@pytest.mark.parametrize("n", range(1, 8))
def test_pass_at_k_equals_enumeration_of_all_k_subsets(n):
    for c in range(n + 1):
        outcomes = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            subsets = list(combinations(range(n), k))
            brute = sum(any(outcomes[i] for i in s) for s in subsets) / len(subsets)
            assert pass_at_k(n, c, k) == pytest.approx(brute, abs=1e-12)


def test_pass_at_k_rejects_impossible_counts():
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_majority_vote():
    assert majority_correct(["3", "4", "3", ""], [True, False, True, False])
    assert not majority_correct(["4", "4", "3", "3"], [False, False, True, True])  # tie: first seen wins
    assert not majority_correct(["", ""], [False, False])
    assert majority_correct(["", "", "7"], [False, False, True])  # empty answers do not vote
