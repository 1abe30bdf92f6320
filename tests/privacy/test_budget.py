"""Budgets: the data owner's policy binds; the stricter wins; files give clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from securefl.privacy.budget import ExperimentTarget, PrivacyPolicy, resolve_budget
from securefl.privacy.errors import PolicyError


def test_stricter_wins_component_by_component() -> None:
    policy = PrivacyPolicy(max_epsilon=3.0, delta=1e-5, participant="h1")
    experiment = ExperimentTarget(target_epsilon=8.0, delta=1e-6)
    budget, note = resolve_budget(policy, experiment, participant="h1")
    assert (budget.max_epsilon, budget.delta, budget.unit) == (3.0, 1e-6, "record")
    assert (budget.epsilon_bound_by, budget.delta_bound_by) == ("policy", "experiment")
    assert "ε=3 bound by h1's policy (experiment asked 8)" in note
    assert "δ=1e-06 bound by the experiment" in note


def test_experiment_stricter_and_agreement() -> None:
    budget, note = resolve_budget(
        PrivacyPolicy(max_epsilon=8.0, delta=1e-5), ExperimentTarget(target_epsilon=2.0, delta=1e-5), participant="h2"
    )
    assert (budget.max_epsilon, budget.epsilon_bound_by, budget.delta_bound_by) == (2.0, "experiment", "both")
    assert "agree" in note


def test_no_policy_means_the_experiment_binds() -> None:
    budget, note = resolve_budget(None, ExperimentTarget(target_epsilon=4.0, delta=1e-5, unit="participant"))
    assert (budget.max_epsilon, budget.unit, budget.epsilon_bound_by) == (4.0, "participant", "experiment")
    assert "no privacy policy" in note


def test_unit_conflict_and_wrong_participant_are_refused() -> None:
    with pytest.raises(PolicyError, match="'unit'"):
        resolve_budget(
            PrivacyPolicy(max_epsilon=1.0, delta=1e-5, unit="participant"), ExperimentTarget(target_epsilon=1, delta=1e-5)
        )
    with pytest.raises(PolicyError, match="'participant'"):
        resolve_budget(
            PrivacyPolicy(max_epsilon=1.0, delta=1e-5, participant="h1"),
            ExperimentTarget(target_epsilon=1, delta=1e-5),
            participant="h2",
        )


@pytest.mark.parametrize(
    ("field", "value"), [("max_epsilon", 0.0), ("max_epsilon", float("inf")), ("delta", 1.0), ("unit", "patient")]
)
def test_policy_field_errors_name_the_field(field: str, value: object) -> None:
    with pytest.raises(ValidationError, match=field):
        PrivacyPolicy(**{"max_epsilon": 1.0, "delta": 1e-5, field: value})


def test_policy_is_frozen_and_strict_about_extras() -> None:
    policy = PrivacyPolicy(max_epsilon=1.0, delta=1e-5)
    with pytest.raises(ValidationError):
        policy.max_epsilon = 9.0  # type: ignore[misc]
    with pytest.raises(ValidationError, match="epsilon"):
        PrivacyPolicy(max_epsilon=1.0, delta=1e-5, epsilon=3)  # type: ignore[call-arg]


def test_policy_files(tmp_path: Path) -> None:
    yaml_file = tmp_path / "h1.yaml"
    yaml_file.write_text("participant: h1\nmax_epsilon: 2.5\ndelta: 1.0e-6\nunit: record\n")
    assert PrivacyPolicy.from_file(yaml_file) == PrivacyPolicy(max_epsilon=2.5, delta=1e-6, participant="h1")
    json_file = tmp_path / "h2.json"
    json_file.write_text('{"max_epsilon": 4, "delta": 1e-5}')
    assert PrivacyPolicy.from_file(json_file).max_epsilon == 4.0


@pytest.mark.parametrize(
    ("name", "text", "match"),
    [
        ("bad.yaml", "max_epsilon: [1, 2\n", "not valid YAML"),
        ("bad.json", "{max_epsilon: 1}", "not valid JSON"),
        ("list.yaml", "- 1\n- 2\n", "mapping"),
        ("extra.yaml", "max_epsilon: 1\ndelta: 1e-5\nepsilon: 2\n", "field 'epsilon'"),
        ("neg.yaml", "max_epsilon: -1\ndelta: 1e-5\n", "field 'max_epsilon'.*-1"),
        ("policy.toml", "max_epsilon = 1\n", "unsupported policy file type"),
    ],
)
def test_policy_file_errors_name_the_file(tmp_path: Path, name: str, text: str, match: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(PolicyError, match=match) as info:
        PrivacyPolicy.from_file(path)
    assert str(path) in str(info.value)


def test_missing_policy_file(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="not found"):
        PrivacyPolicy.from_file(tmp_path / "nope.yaml")
