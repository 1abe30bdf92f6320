"""The exact privacy curve of the plain Gaussian mechanism.

Balle & Wang, "Improving the Gaussian Mechanism for Differential Privacy:
Analytical Calibration and Optimal Denoising", ICML 2018, Theorem 8: a Gaussian
mechanism with noise multiplier s = std / sensitivity is (ε, δ)-DP iff

    δ ≥ Φ(1/(2s) − ε s) − e^ε Φ(−1/(2s) − ε s).

k-fold composition of Gaussians with multiplier s is a single Gaussian with
multiplier s / √k. This is the ground truth the numerical accountants (PLD, PRV)
must approach from above and RDP must bound from above; the tests use it so.
"""

from __future__ import annotations

import math

from scipy import optimize, special


def _log_ndtr_diff(a: float, b: float, eps: float) -> float:
    # Φ(a) − e^ε Φ(b) computed without catastrophic overflow of e^ε.
    return float(special.ndtr(a) - math.exp(eps + special.log_ndtr(b)))


def analytic_gaussian_delta(*, noise_multiplier: float, epsilon: float, steps: int = 1) -> float:
    """δ(ε) of ``steps`` compositions of a Gaussian with multiplier ``noise_multiplier``."""
    if not noise_multiplier > 0:
        raise ValueError(f"noise_multiplier must be > 0, got {noise_multiplier}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    s = noise_multiplier / math.sqrt(steps)
    return max(0.0, _log_ndtr_diff(1 / (2 * s) - epsilon * s, -1 / (2 * s) - epsilon * s, epsilon))


def analytic_gaussian_epsilon(*, noise_multiplier: float, delta: float, steps: int = 1) -> float:
    """Smallest ε such that the composed Gaussian is (ε, δ)-DP (Balle & Wang 2018)."""
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")

    def gap(eps: float) -> float:
        return analytic_gaussian_delta(noise_multiplier=noise_multiplier, epsilon=eps, steps=steps) - delta

    if gap(0.0) <= 0:
        return 0.0
    hi = 1.0
    while gap(hi) > 0:
        hi *= 2
        if hi > 1e6:
            return math.inf
    return float(optimize.brentq(gap, 0.0, hi, xtol=1e-12, rtol=1e-12))
