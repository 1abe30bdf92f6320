"""Calibration: the returned σ meets the target with the reporting accountant, tightly."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from securefl.privacy.accountants import get_accountant
from securefl.privacy.calibration import MIN_NOISE_MULTIPLIER, calibrate_noise_multiplier, planned_event
from securefl.privacy.errors import CalibrationError

from .helpers import dp_sgd

TOL = 1e-3


def spend(accountant: str, sigma: float, *, q: float, steps: int, releases: int, delta: float, already=()) -> float:
    plan = planned_event(noise_multiplier=sigma, sample_rate=q, steps=steps)
    return get_accountant(accountant).epsilon([*already, *([plan] * releases)], delta=delta)


@settings(max_examples=12, deadline=None, database=None)
@given(
    target=st.floats(0.5, 10.0),
    log_delta=st.floats(-7.0, -4.0),
    q=st.one_of(st.floats(0.002, 0.1), st.just(1.0)),
    steps=st.integers(1, 1000),
    releases=st.integers(1, 4),
)
def test_calibrated_sigma_meets_target_tightly_rdp(target: float, log_delta: float, q: float, steps: int, releases: int) -> None:
    delta = 10.0**log_delta
    sigma = calibrate_noise_multiplier(
        target_epsilon=target, delta=delta, sample_rate=q, steps=steps, releases=releases, tolerance=TOL
    )
    assert spend("rdp", sigma, q=q, steps=steps, releases=releases, delta=delta) <= target
    if sigma > MIN_NOISE_MULTIPLIER:
        # Tight: 2·tolerance less noise already overshoots.
        assert spend("rdp", sigma * (1 - 2 * TOL), q=q, steps=steps, releases=releases, delta=delta) > target


@pytest.mark.parametrize("accountant", ["pld", "prv"])
def test_calibrated_sigma_meets_target_numerical_accountants(accountant: str) -> None:
    q, steps, releases, delta, target, tol = 0.05, 50, 2, 1e-5, 1.0, 1e-2
    kwargs = dict(sample_rate=q, steps=steps, releases=releases, delta=delta, tolerance=tol)
    sigma = calibrate_noise_multiplier(target_epsilon=target, accountant=accountant, **kwargs)
    assert spend(accountant, sigma, q=q, steps=steps, releases=releases, delta=delta) <= target
    assert spend(accountant, sigma * (1 - 3 * tol), q=q, steps=steps, releases=releases, delta=delta) > target
    # Tighter accountants need less noise for the same promise.
    assert sigma < calibrate_noise_multiplier(target_epsilon=target, accountant="rdp", **kwargs)


def test_already_spent_is_counted() -> None:
    spent = [dp_sgd(sigma=1.5, q=0.04, steps=1000)]
    fresh = calibrate_noise_multiplier(target_epsilon=8.0, delta=1e-5, sample_rate=0.04, steps=1000)
    after = calibrate_noise_multiplier(target_epsilon=8.0, delta=1e-5, sample_rate=0.04, steps=1000, already_spent=spent)
    assert after > fresh
    assert spend("rdp", after, q=0.04, steps=1000, releases=1, delta=1e-5, already=spent) <= 8.0


def test_already_spent_of_another_unit_is_ignored() -> None:
    from .helpers import logits_event

    kwargs = dict(target_epsilon=4.0, delta=1e-5, sample_rate=0.04, steps=500)
    assert calibrate_noise_multiplier(**kwargs, already_spent=[logits_event(sigma=0.5)]) == (calibrate_noise_multiplier(**kwargs))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(target_epsilon=0.0), "target_epsilon"),
        (dict(target_epsilon=-1.0), "target_epsilon"),
        (dict(target_epsilon=float("inf")), "target_epsilon"),
        (dict(delta=0.0), "delta"),
        (dict(delta=1.0), "delta"),
        (dict(sample_rate=0.0), "sample_rate"),
        (dict(steps=0), "steps"),
        (dict(releases=0), "releases"),
        (dict(target_epsilon=1e-4, sample_rate=1.0, steps=1_000_000), "no noise_multiplier"),
        (dict(already_spent=[dp_sgd(sigma=0.8, q=0.1, steps=2000)]), "already spent"),
        (dict(relation="replace_one"), "cannot account"),
    ],
)
def test_impossible_or_invalid_targets_are_clear(kwargs: dict, match: str) -> None:
    base = dict(target_epsilon=2.0, delta=1e-5, sample_rate=0.04, steps=100)
    with pytest.raises(CalibrationError, match=match):
        calibrate_noise_multiplier(**{**base, **kwargs})


def test_huge_target_returns_floor_that_still_meets_it() -> None:
    sigma = calibrate_noise_multiplier(target_epsilon=1000.0, delta=1e-5, sample_rate=0.001, steps=1)
    assert sigma == MIN_NOISE_MULTIPLIER
    assert spend("rdp", sigma, q=0.001, steps=1, releases=1, delta=1e-5) <= 1000.0
