"""Rényi differential privacy of the (Poisson-subsampled) Gaussian mechanism.

Thin, cached wrappers around Opacus's analysis functions
(``opacus.accountants.analysis.rdp``):

- ``compute_rdp`` implements the Sampled Gaussian Mechanism bound of Mironov,
  Talwar & Zhang, "Rényi Differential Privacy of the Sampled Gaussian Mechanism"
  (2019), for the add/remove neighbouring relation; for q = 1 it is the plain
  Gaussian's α / (2σ²) (Mironov, "Rényi Differential Privacy", CSF 2017).
- ``get_privacy_spent`` converts RDP to (ε, δ)-DP with Theorem 21 of Balle et
  al., "Hypothesis Testing Interpretations and Rényi Differential Privacy",
  AISTATS 2020.

RDP composes by addition at every order, so the RDP of a sequence of events is
the sum of their per-step curves times their steps; we cache the per-step curve
for each (σ, q) because a ledger composes the same event many times.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence

import numpy as np
from opacus.accountants.analysis import rdp as _opacus_rdp

#: Opacus's default grid (``RDPAccountant.DEFAULT_ALPHAS``), widened at both ends:
#: orders close to 1 help when ε is large, large orders when ε is small. Widening
#: only at the ends keeps the interior, and so the golden numbers, unchanged.
_OPACUS_ALPHAS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))
DEFAULT_ORDERS: tuple[float, ...] = (1.01, 1.02, 1.03, 1.05, 1.07) + _OPACUS_ALPHAS + (80.0, 96.0, 128.0, 192.0, 256.0)


@functools.lru_cache(maxsize=4096)
def _rdp_per_step(noise_multiplier: float, sample_rate: float, orders: tuple[float, ...]) -> np.ndarray:
    curve = np.asarray(
        _opacus_rdp.compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=list(orders)),
        dtype=float,
    )
    curve.setflags(write=False)  # shared through the cache: nobody may mutate it
    return curve


def rdp_gaussian(
    *,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    orders: Sequence[float] = DEFAULT_ORDERS,
) -> np.ndarray:
    """RDP curve of ``steps`` compositions of the Poisson-subsampled Gaussian.

    Parameters
    ----------
    noise_multiplier : float
        Noise std divided by the add/remove L2 sensitivity (> 0).
    sample_rate : float
        Poisson sampling rate q in (0, 1]; q = 1 is the plain Gaussian.
    steps : int
        Number of compositions (>= 1).
    orders : sequence of float
        RDP orders α > 1.

    Returns
    -------
    numpy.ndarray
        RDP ε(α) at each order (may contain ``inf``).
    """
    if not noise_multiplier > 0:
        raise ValueError(f"noise_multiplier must be > 0, got {noise_multiplier}")
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return _rdp_per_step(float(noise_multiplier), float(sample_rate), tuple(float(a) for a in orders)) * steps


def rdp_to_epsilon(*, orders: Sequence[float], rdp: Sequence[float] | np.ndarray, delta: float) -> tuple[float, float]:
    """Convert an RDP curve to (ε, δ)-DP (Balle et al. 2020, Thm. 21).

    Returns
    -------
    (epsilon, best_order) : tuple of float
        ``epsilon`` is ``inf`` when no order gives a finite bound.
    """
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    rdp_vec = np.asarray(rdp, dtype=float)
    if np.all(rdp_vec == 0):
        return 0.0, float(orders[0])
    with warnings.catch_warnings():
        # Opacus warns when the optimum sits at the edge of the grid; our grid is
        # already widened, and the bound stays valid (just a little loose) there.
        warnings.simplefilter("ignore")
        with np.errstate(all="ignore"):
            eps, order = _opacus_rdp.get_privacy_spent(orders=list(orders), rdp=rdp_vec, delta=delta)
    eps = float(eps)
    if math.isnan(eps):
        return math.inf, float("nan")
    # The conversion can go (slightly) negative for tiny RDP; ε is never below 0.
    return max(eps, 0.0), float(order)
