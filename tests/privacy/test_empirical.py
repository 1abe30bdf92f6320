"""The one-run audit's ε lower bound (Steinke, Nasr & Jagielski 2023), against closed forms."""

from __future__ import annotations

import math

import pytest

from securefl.privacy.empirical import epsilon_lower_bound


def test_all_guesses_right_matches_the_closed_form() -> None:
    # P[Bin(k, p) >= k] = p^k = beta  =>  p = beta^(1/k), eps = log(p / (1 - p)).
    p = 0.05 ** (1 / 100)
    assert epsilon_lower_bound(100, 100, beta=0.05) == pytest.approx(math.log(p / (1 - p)), abs=1e-6)


def test_chance_level_gives_no_bound_and_the_bound_grows_with_success() -> None:
    assert epsilon_lower_bound(100, 200) == 0.0
    assert epsilon_lower_bound(90, 200) == 0.0
    bounds = [epsilon_lower_bound(v, 200) for v in (120, 150, 180, 200)]
    assert bounds == sorted(bounds) and bounds[0] > 0


def test_higher_confidence_gives_a_smaller_bound() -> None:
    assert epsilon_lower_bound(180, 200, beta=0.01) < epsilon_lower_bound(180, 200, beta=0.1)
