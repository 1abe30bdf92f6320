"""Empirical privacy auditing: turn a membership attack's success into a lower bound on ε.

Steinke, Nasr & Jagielski, "Privacy Auditing with One (1) Training Run",
NeurIPS 2023. If each of k guesses about independently included canaries
were made against an ε-DP mechanism, the number of correct guesses would be
dominated by Binomial(k, e^ε / (1 + e^ε)). Observing v correct rejects every
ε whose binomial tail P[X >= v] is at most β; the largest such ε is the
empirical lower bound. (This is the pure-ε form; δ = 1e-5 over a few hundred
canaries changes it negligibly, and it is stated as such in the report.)
"""

from __future__ import annotations

import numpy as np


def epsilon_lower_bound(correct: int, guesses: int, *, beta: float = 0.05) -> float:
    """Largest ε rejected at level β: P[Binomial(k, e^ε/(1+e^ε)) >= v] <= β (SNJ23, pure-ε form)."""
    from scipy.stats import binom

    if guesses == 0 or correct <= guesses / 2:
        return 0.0

    def tail(eps: float) -> float:
        p = np.exp(eps) / (1 + np.exp(eps))
        return float(binom.sf(correct - 1, guesses, p))

    lo, hi = 0.0, 30.0
    if tail(lo) > beta:
        return 0.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if tail(mid) <= beta:
            lo = mid
        else:
            hi = mid
    return lo
