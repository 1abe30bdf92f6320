"""From an (ε, δ) target to a noise multiplier, with the accountant that reports.

Before round 1, securefl calibrates σ for each participant by binary search over
the *same* accountant its ledger reports with (as Opacus's
``get_noise_multiplier`` and dp-accounting's ``calibrate_dp_mechanism`` do), on
the *same* list of events the ledger will compose: what was already spent, plus
the planned releases. The search keeps the invariant "ε(hi) ≤ target" and
returns ``hi``, so the returned σ never overshoots, and a run that spends
exactly the plan ends at or under its target.

References
----------
Opacus, ``opacus.accountants.utils.get_noise_multiplier``.
Google dp-accounting, ``mechanism_calibration.calibrate_dp_mechanism``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from securefl.privacy.accountants import Accountant, get_accountant
from securefl.privacy.errors import CalibrationError
from securefl.privacy.events import AnyEvent, PrivacyEvent, Relation, Unit

#: Largest σ the search tries before declaring the target unreachable.
MAX_NOISE_MULTIPLIER = 1e4
#: Smallest σ the search tries: below it every accountant is slow and numerically
#: fragile, and no useful release needs less noise. If even this σ meets the
#: target, it is returned (it is safe, just not tight).
MIN_NOISE_MULTIPLIER = 0.1


def planned_event(
    *,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    unit: Unit = "record",
    relation: Relation = "add_remove",
    sensitivity: float = 1.0,
    payload: str = "planned",
) -> PrivacyEvent:
    """The event of one planned release block, as the ledger will later see it."""
    return PrivacyEvent(
        unit=unit,
        mechanism="subsampled_gaussian" if sample_rate < 1.0 else "gaussian",
        noise_multiplier=noise_multiplier,
        sample_rate=sample_rate,
        steps=steps,
        sensitivity=sensitivity,
        relation=relation,
        payload=payload,
    )


def planned_epsilon(events: Sequence[AnyEvent], *, delta: float, accountant: str | Accountant = "rdp") -> float:
    """ε of a planned sequence of releases, with the accountant that will report it (what an owner approves)."""
    acc = get_accountant(accountant) if isinstance(accountant, str) else accountant
    return float(acc.epsilon(list(events), delta=delta))


def calibrate_noise_multiplier(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str | Accountant = "rdp",
    already_spent: Iterable[AnyEvent] = (),
    releases: int = 1,
    unit: Unit = "record",
    relation: Relation = "add_remove",
    sensitivity: float = 1.0,
    tolerance: float = 1e-3,
) -> float:
    """Smallest σ (up to ``tolerance``) whose planned spend keeps total ε ≤ ``target_epsilon``.

    Parameters
    ----------
    target_epsilon : float
        ε budget for ``unit`` at ``delta``; > 0.
    delta : float
        δ in (0, 1).
    sample_rate : float
        Poisson sampling rate q in (0, 1] of each planned step (1.0: no subsampling).
    steps : int
        Steps per planned release (e.g. DP-SGD steps per round).
    accountant : str or Accountant
        The accountant the ledger reports with (registry name or instance).
    already_spent : iterable of events
        Events already in the participant's ledger; only those of ``unit`` count.
    releases : int
        Number of planned releases of ``steps`` steps each (e.g. rounds). The
        search composes exactly ``releases`` events, as the ledger will.
    unit, relation, sensitivity
        Describe the planned events (see :class:`PrivacyEvent`).
    tolerance : float
        Relative width of the final σ bracket: the result is within a factor
        ``1 + tolerance`` of the smallest feasible σ (for a monotone accountant).

    Returns
    -------
    float
        σ such that ε(already_spent + planned(σ)) ≤ ``target_epsilon``.

    Raises
    ------
    CalibrationError
        If ``target_epsilon`` ≤ 0, ``delta`` ∉ (0, 1), the budget is already used
        up, or no σ ≤ :data:`MAX_NOISE_MULTIPLIER` meets the target.
    """
    if isinstance(target_epsilon, bool) or not isinstance(target_epsilon, int | float):
        raise CalibrationError(f"target_epsilon must be a number > 0, got {target_epsilon!r}")
    if not (target_epsilon > 0 and math.isfinite(target_epsilon)):
        raise CalibrationError(f"target_epsilon must be finite and > 0, got {target_epsilon!r}")
    if isinstance(delta, bool) or not isinstance(delta, int | float) or not 0 < delta < 1:
        raise CalibrationError(f"delta must be in (0, 1), got {delta!r}")
    if not 0 < sample_rate <= 1:
        raise CalibrationError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise CalibrationError(f"steps must be an integer >= 1, got {steps!r}")
    if isinstance(releases, bool) or not isinstance(releases, int) or releases < 1:
        raise CalibrationError(f"releases must be an integer >= 1, got {releases!r}")
    if not 0 < tolerance < 1:
        raise CalibrationError(f"tolerance must be in (0, 1), got {tolerance!r}")

    acc = get_accountant(accountant) if isinstance(accountant, str) else accountant
    spent = [e for e in already_spent if isinstance(e, PrivacyEvent) and e.unit == unit]

    def total_epsilon(sigma: float) -> float:
        plan = planned_event(
            noise_multiplier=sigma,
            sample_rate=sample_rate,
            steps=steps,
            unit=unit,
            relation=relation,
            sensitivity=sensitivity,
        )
        return acc.epsilon([*spent, *([plan] * releases)], delta=delta)

    # Validate support once, with a representative σ, for a clear error up front.
    probe = planned_event(
        noise_multiplier=1.0,
        sample_rate=sample_rate,
        steps=steps,
        unit=unit,
        relation=relation,
        sensitivity=sensitivity,
    )
    if not acc.supports(probe):
        raise CalibrationError(f"accountant {acc.name!r} cannot account the planned event: {acc.unsupported_reason(probe)}")
    base = acc.epsilon(spent, delta=delta)
    if base >= target_epsilon:
        raise CalibrationError(
            f"already spent ε={base:.4g} (unit {unit!r}, δ={delta:g}, {acc.name}) leaves nothing "
            f"under target_epsilon={target_epsilon:g}"
        )

    hi = 1.0
    if total_epsilon(hi) > target_epsilon:
        lo = hi
        while True:
            hi *= 2.0
            if hi > MAX_NOISE_MULTIPLIER:
                raise CalibrationError(
                    f"no noise_multiplier <= {MAX_NOISE_MULTIPLIER:g} keeps ε <= target_epsilon={target_epsilon:g} "
                    f"at δ={delta:g} (sample_rate={sample_rate:g}, steps={steps}, releases={releases}, "
                    f"already spent ε={base:.4g}, {acc.name})"
                )
            if total_epsilon(hi) <= target_epsilon:
                break
            lo = hi
    else:
        lo = hi / 2.0
        while total_epsilon(lo) <= target_epsilon:
            hi = lo
            if hi <= MIN_NOISE_MULTIPLIER:
                return hi
            lo = max(hi / 2.0, MIN_NOISE_MULTIPLIER)
    # Invariant: ε(hi) <= target < ε(lo). Bisect in log-space (σ spans decades).
    while hi - lo > tolerance * hi:
        mid = math.sqrt(lo * hi)
        if total_epsilon(mid) <= target_epsilon:
            hi = mid
        else:
            lo = mid
    return hi
