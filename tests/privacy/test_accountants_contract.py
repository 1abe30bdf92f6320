"""One contract, every accountant (dp-accounting's habit).

Each test is run against RDP, PLD and PRV. A new accountant joins by being
added to the registry; it then has to pass all of this.
"""

from __future__ import annotations

import pytest

from securefl.privacy.accountants import ACCOUNTANT_NAMES, Accountant, get_accountant
from securefl.privacy.analysis import analytic_gaussian_epsilon
from securefl.privacy.errors import UnsupportedEvent
from securefl.privacy.events import PrivacyEvent, PublicDataEvent

from .helpers import DELTA, logits_event


def sgd(sigma: float = 2.0, q: float = 0.05, steps: int = 100) -> PrivacyEvent:
    return PrivacyEvent.dp_sgd(noise_multiplier=sigma, sample_rate=q, steps=steps)


SUBSAMPLED_REPLACE = PrivacyEvent(
    unit="record",
    mechanism="subsampled_gaussian",
    noise_multiplier=1.0,
    sample_rate=0.05,
    steps=10,
    sensitivity=2.0,
    relation="replace_one",
    payload="dp_sgd",
)


@pytest.fixture(params=ACCOUNTANT_NAMES)
def accountant(request: pytest.FixtureRequest) -> Accountant:
    return get_accountant(request.param)


class TestAccountantContract:
    def test_identity(self, accountant: Accountant) -> None:
        assert accountant.name in ACCOUNTANT_NAMES
        assert isinstance(accountant.tight, bool) and accountant.description

    def test_nothing_spent_is_zero(self, accountant: Accountant) -> None:
        assert accountant.epsilon([], delta=DELTA) == 0.0
        assert accountant.epsilon([PublicDataEvent(payload="public_logits")], delta=DELTA) == 0.0
        assert accountant.epsilon_by_unit([], delta=DELTA) == {}

    def test_monotone_in_steps(self, accountant: Accountant) -> None:
        eps = [accountant.epsilon([sgd(steps=s)], delta=DELTA) for s in (10, 50, 250)]
        assert 0 < eps[0] < eps[1] < eps[2]

    def test_monotone_decreasing_in_sigma(self, accountant: Accountant) -> None:
        eps = [accountant.epsilon([sgd(sigma=s)], delta=DELTA) for s in (1.5, 2.0, 3.0)]
        assert eps[0] > eps[1] > eps[2] > 0

    def test_monotone_in_sample_rate(self, accountant: Accountant) -> None:
        eps = [accountant.epsilon([sgd(q=q)], delta=DELTA) for q in (0.01, 0.05, 0.2)]
        assert eps[0] < eps[1] < eps[2]

    def test_larger_delta_smaller_epsilon(self, accountant: Accountant) -> None:
        assert accountant.epsilon([sgd()], delta=1e-3) < accountant.epsilon([sgd()], delta=1e-7)

    def test_composition_at_least_either_alone(self, accountant: Accountant) -> None:
        a, b = sgd(sigma=2.0, q=0.05, steps=100), sgd(sigma=3.0, q=0.1, steps=30)
        both = accountant.epsilon([a, b], delta=DELTA)
        assert both >= max(accountant.epsilon([a], delta=DELTA), accountant.epsilon([b], delta=DELTA))
        assert both == accountant.epsilon([b, a], delta=DELTA)  # order-free, bit for bit

    def test_splitting_a_block_changes_nothing(self, accountant: Accountant) -> None:
        # A ledger commits one event per round; the plan is one block. They must agree exactly.
        whole = accountant.epsilon([sgd(steps=100)], delta=DELTA)
        assert accountant.epsilon([sgd(steps=25)] * 4, delta=DELTA) == whole

    def test_public_data_spends_nothing(self, accountant: Accountant) -> None:
        events = [sgd(), PublicDataEvent(payload="public_logits", unit="record")]
        assert accountant.epsilon(events, delta=DELTA) == accountant.epsilon([sgd()], delta=DELTA)

    def test_units_accounted_separately(self, accountant: Accountant) -> None:
        record, participant = sgd(), logits_event(sigma=3.0)
        with pytest.raises(ValueError, match="epsilon_by_unit"):
            accountant.epsilon([record, participant], delta=DELTA)
        by_unit = accountant.epsilon_by_unit([record, participant, record], delta=DELTA)
        assert by_unit == {
            "participant": accountant.epsilon([participant], delta=DELTA),
            "record": accountant.epsilon([record, record], delta=DELTA),
        }

    def test_plain_gaussian_supported_under_both_relations_with_same_epsilon(self, accountant: Accountant) -> None:
        replace = logits_event(sigma=2.0)
        add_remove = replace.model_copy(update={"relation": "add_remove", "sensitivity": 1.0})
        assert accountant.supports(replace) and accountant.supports(add_remove)
        assert accountant.epsilon([replace], delta=DELTA) == pytest.approx(
            accountant.epsilon([add_remove], delta=DELTA), rel=1e-9
        )

    def test_is_an_upper_bound_on_the_exact_gaussian(self, accountant: Accountant) -> None:
        exact = analytic_gaussian_epsilon(noise_multiplier=2.0, delta=DELTA, steps=3)
        event = logits_event(sigma=2.0).model_copy(update={"steps": 3})
        eps = accountant.epsilon([event], delta=DELTA)
        # PRV's upper end may undershoot the truth by less than its eps_error.
        assert eps >= exact - (0.01 if accountant.name == "prv" else 1e-9)
        if accountant.tight:
            assert eps <= exact + 0.03

    def test_supports_and_refuses(self, accountant: Accountant) -> None:
        if accountant.name == "pld":
            assert accountant.supports(SUBSAMPLED_REPLACE)
            assert accountant.epsilon([SUBSAMPLED_REPLACE], delta=DELTA) > 0
        else:
            # RDP (SGM bound) and Opacus PRV only analyse add/remove under subsampling.
            assert not accountant.supports(SUBSAMPLED_REPLACE)
            assert "replace_one" in (accountant.unsupported_reason(SUBSAMPLED_REPLACE) or "")
            with pytest.raises(UnsupportedEvent, match="replace_one"):
                accountant.epsilon([SUBSAMPLED_REPLACE], delta=DELTA)
        assert not accountant.supports("not an event")  # type: ignore[arg-type]
        with pytest.raises(UnsupportedEvent):
            accountant.epsilon(["not an event"], delta=DELTA)  # type: ignore[list-item]

    def test_mixed_relations_in_one_unit_refused(self, accountant: Accountant) -> None:
        add_remove = logits_event().model_copy(update={"relation": "add_remove", "sensitivity": 1.0})
        with pytest.raises(UnsupportedEvent, match="relations"):
            accountant.epsilon([logits_event(), add_remove], delta=DELTA)

    @pytest.mark.parametrize("delta", [0, 1, -1e-5, 1.5, True])
    def test_bad_delta_refused(self, accountant: Accountant, delta: float) -> None:
        with pytest.raises(ValueError, match="delta"):
            accountant.epsilon([sgd()], delta=delta)


def test_registry_unknown_name_lists_choices() -> None:
    with pytest.raises(ValueError, match=r"unknown accountant 'gdp'.*'rdp'.*'pld'.*'prv'"):
        get_accountant("gdp")


def test_registry_returns_fresh_instances() -> None:
    assert get_accountant("rdp") is not get_accountant("rdp")
