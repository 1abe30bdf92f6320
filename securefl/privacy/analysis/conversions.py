"""Conversions between securefl's event conventions and the libraries' conventions.

securefl's convention (see :mod:`securefl.privacy.events`): ``sensitivity`` is the
L2 sensitivity under the event's own relation (C under add/remove, 2C under
replace-one for a payload clipped to C), and ``noise_multiplier`` is
std / sensitivity.

dp-accounting's convention (``pld.privacy_loss_mechanism.GaussianPrivacyLoss``):
the sensitivity is one record's contribution, and under ``REPLACE_ONE`` the two
neighbouring outputs are shifted by −sensitivity and +sensitivity, i.e. the
replace-one distance is *twice* its sensitivity. Its Poisson-subsampled
replace-one model is the mixture pair (1−q)N(0, s²) + qN(∓C, s²) — exactly a
subsampled sum of contributions clipped to C with one contribution replaced.
So an event (σ, replace_one) maps to dp-accounting's noise multiplier 2σ under
``REPLACE_ONE``; (σ, add_remove) maps to σ under ``ADD_OR_REMOVE_ONE``.

Distributed DP (Kairouz, Liu & Steinke, "The Distributed Discrete Gaussian
Mechanism for Federated Learning with Secure Aggregation", ICML 2021): n
contributors each add N(0, σ²Δ²/n) so that their sum carries N(0, σ²Δ²). If only
m < n contribute, the sum carries σ²Δ²·m/n, i.e. an effective multiplier
σ·√(m/n). The "zero-out" relation — a participant's update is replaced by zeros
while its noise share stays — is what securefl calls ``add_remove`` for a
distributed sum; dp-accounting's ``REPLACE_SPECIAL`` gives it the same Gaussian PLD.
"""

from __future__ import annotations

import math

from securefl.privacy.events import Relation


def dp_accounting_noise_multiplier(*, noise_multiplier: float, relation: Relation) -> float:
    """dp-accounting's Gaussian ``noise_multiplier`` for a securefl (σ, relation) pair.

    Under ``replace_one`` securefl's sensitivity is 2C while dp-accounting's is C
    (it doubles it internally), so the same noise std is 2σ in its units.
    """
    if relation == "add_remove":
        return noise_multiplier
    if relation == "replace_one":
        return 2.0 * noise_multiplier
    raise ValueError(f"relation must be 'add_remove' or 'replace_one', got {relation!r}")


def _check_counts(n_planned: int, n_actual: int) -> None:
    if isinstance(n_planned, bool) or n_planned < 1:
        raise ValueError(f"n_planned must be an integer >= 1, got {n_planned!r}")
    if isinstance(n_actual, bool) or not 1 <= n_actual <= n_planned:
        raise ValueError(f"n_actual must be an integer in [1, n_planned={n_planned}], got {n_actual!r}")


def effective_noise_multiplier(noise_multiplier: float, n_planned: int, n_actual: int) -> float:
    """Noise multiplier that a distributed-noise sum actually carries: σ·√(n_actual / n_planned).

    Use it to account honestly for dropouts (only contributors that reached the
    sum added noise) and, with ``n_actual`` = the number of contributors trusted
    not to collude with the observer, for the collusion-robust guarantee.
    """
    if not noise_multiplier > 0:
        raise ValueError(f"noise_multiplier must be > 0, got {noise_multiplier}")
    _check_counts(n_planned, n_actual)
    return noise_multiplier * math.sqrt(n_actual / n_planned)


def top_up_std(*, noise_multiplier: float, sensitivity: float, n_planned: int, n_actual: int) -> float:
    """Extra noise std each of the ``n_actual`` survivors must add to restore σ on the sum.

    The survivors carry n_actual·σ²Δ²/n_planned; each adding N(0, τ²) with
    τ² = σ²Δ²·(1/n_actual − 1/n_planned) brings the sum back to σ²Δ².
    """
    if not noise_multiplier > 0:
        raise ValueError(f"noise_multiplier must be > 0, got {noise_multiplier}")
    if not sensitivity > 0:
        raise ValueError(f"sensitivity must be > 0, got {sensitivity}")
    _check_counts(n_planned, n_actual)
    variance = (noise_multiplier * sensitivity) ** 2 * (1.0 / n_actual - 1.0 / n_planned)
    return math.sqrt(max(variance, 0.0))
