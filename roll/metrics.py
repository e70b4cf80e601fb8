"""Evaluation metrics over k samples per prompt: pass@1, unbiased pass@k, maj@k."""
from __future__ import annotations

from collections import Counter
from math import comb


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct (Chen et al. 2021): 1 − C(n−c, k) / C(n, k).

    The probability that k samples drawn without replacement from the n include at least one correct one.
    """
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n (n={n}, c={c}, k={k})")
    return 1.0 - comb(n - c, k) / comb(n, k)


def majority_correct(answers: list[str], correct: list[bool]) -> bool:
    """maj@k for one prompt: is the most frequent extracted answer (empty answers ignored) a correct one?

    Ties go to the answer seen first, so the result does not depend on hash order.
    """
    counted = Counter(a for a in answers if a)
    if not counted:
        return False
    best = max(counted.values())
    winner = next(a for a in answers if a and counted[a] == best)
    return any(ok for a, ok in zip(answers, correct) if a == winner)
