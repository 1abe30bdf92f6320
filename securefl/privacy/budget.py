"""Privacy budgets: the data owner's policy against the experiment's request.

Budgets are set by the data owner. A participant's own :class:`PrivacyPolicy`
(ε_max, δ, unit) binds, whatever the coordinator's configuration asks for; when
the two differ the stricter wins component by component (smaller ε, smaller δ)
and :func:`resolve_budget` returns a note saying which one bound, for the report.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from securefl.privacy.errors import PolicyError
from securefl.privacy.events import Unit


def _finite_positive(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError(f"must be finite, got {value}")
    return value


class PrivacyPolicy(BaseModel):
    """A data owner's privacy policy.

    Parameters
    ----------
    max_epsilon : float
        Largest ε the owner accepts for ``unit`` (> 0, finite).
    delta : float
        δ at which ``max_epsilon`` is stated, in (0, 1).
    unit : {"record", "participant"}
        The unit of privacy the policy protects.
    participant : str, optional
        Whose policy this is (checked against the participant it is applied to).
    secure_aggregation : list of {"ckks", "masking"}, optional
        The secure aggregations the owner accepts; a node refuses a run with none of them
        (absent: no requirement).
    signing : bool, optional
        ``true``: a node refuses a run whose messages are not signed.
    min_contributors : float, optional
        Smallest fraction of a round's participants any aggregate of the owner's releases may hold
        (in (0, 1]); a node refuses a run whose cohort fractions (``privacy.min_contributors`` and, under
        masking, ``masking.threshold_fraction``) are smaller.

    Without a policy a node may run without DP; with one it refuses ``privacy.unit: none`` and a
    larger δ than the policy's, and keeps a ledger (see :mod:`securefl.deploy.approval`).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_epsilon: float = Field(gt=0)
    delta: float = Field(gt=0, lt=1)
    unit: Unit = "record"
    participant: str | None = None
    # Optional requirements on the setup (older policy files, without them, stay valid).
    secure_aggregation: list[Literal["ckks", "masking"]] | None = Field(None, min_length=1)
    signing: bool | None = None
    min_contributors: float | None = Field(None, gt=0, le=1)

    @field_validator("max_epsilon")
    @classmethod
    def _max_epsilon_finite(cls, value: float) -> float:
        return _finite_positive(value)

    @classmethod
    def from_file(cls, path: str | Path) -> PrivacyPolicy:
        """Load a policy from a ``.yaml``/``.yml`` or ``.json`` file; errors name the file and field."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise PolicyError(f"{path}: privacy policy file not found") from None
        except UnicodeDecodeError as exc:
            raise PolicyError(f"{path}: not a UTF-8 text file (byte {exc.start}); a privacy policy is YAML or JSON") from None
        except OSError as exc:
            raise PolicyError(f"{path}: cannot read privacy policy: {exc}") from None
        suffix = path.suffix.lower()
        try:
            if suffix in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(text)
            elif suffix == ".json":
                data = json.loads(text)
            else:
                raise PolicyError(f"{path}: unsupported policy file type {path.suffix!r}; use .yaml, .yml or .json")
        except PolicyError:
            raise
        except Exception as exc:  # yaml.YAMLError, json.JSONDecodeError, or a YAML constructor's ValueError
            # One line: PyYAML's messages span several lines with a caret under the problem.
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            detail = getattr(exc, "problem", None) or (str(exc).splitlines() or [type(exc).__name__])[0]
            raise PolicyError(f"{path}: not valid {suffix.lstrip('.').upper()}{where}: {detail}") from None
        if not isinstance(data, dict):
            raise PolicyError(f"{path}: a privacy policy must be a mapping of fields, got {type(data).__name__}")
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            problems = "; ".join(
                f"field {'.'.join(str(p) for p in err['loc']) or '<policy>'!r}: {err['msg']} (got {err.get('input')!r})"
                for err in exc.errors()
            )
            raise PolicyError(f"{path}: invalid privacy policy: {problems}") from None


class ExperimentTarget(BaseModel):
    """What an experiment's configuration requests for one participant."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    target_epsilon: float = Field(gt=0)
    delta: float = Field(gt=0, lt=1)
    unit: Unit = "record"

    @field_validator("target_epsilon")
    @classmethod
    def _target_epsilon_finite(cls, value: float) -> float:
        return _finite_positive(value)


class Budget(BaseModel):
    """The budget that binds a participant, and where each part of it came from."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_epsilon: float = Field(gt=0)
    delta: float = Field(gt=0, lt=1)
    unit: Unit
    epsilon_bound_by: Literal["policy", "experiment", "both"]
    delta_bound_by: Literal["policy", "experiment", "both"]


def _bound_by(policy_value: float, experiment_value: float) -> Literal["policy", "experiment", "both"]:
    if policy_value < experiment_value:
        return "policy"
    if experiment_value < policy_value:
        return "experiment"
    return "both"


def resolve_budget(
    policy: PrivacyPolicy | None, experiment: ExperimentTarget, *, participant: str | None = None
) -> tuple[Budget, str]:
    """Combine a participant's policy with an experiment's target: the stricter wins.

    Parameters
    ----------
    policy : PrivacyPolicy or None
        The data owner's policy (``None``: the owner set none; the experiment binds).
    experiment : ExperimentTarget
        What the experiment requests for this participant.
    participant : str, optional
        Name used in the note, and checked against ``policy.participant``.

    Returns
    -------
    (budget, note)
        The binding :class:`Budget` and a sentence for the report.

    Raises
    ------
    PolicyError
        If the policy protects a different unit than the experiment provides, or
        belongs to another participant.
    """
    who = participant or (policy.participant if policy else None) or "participant"
    if policy is None:
        budget = Budget(
            max_epsilon=experiment.target_epsilon,
            delta=experiment.delta,
            unit=experiment.unit,
            epsilon_bound_by="experiment",
            delta_bound_by="experiment",
        )
        return budget, (
            f"{who}: no privacy policy; the experiment's target binds "
            f"(ε={experiment.target_epsilon:g}, δ={experiment.delta:g}, {experiment.unit}-level)"
        )
    if participant is not None and policy.participant is not None and policy.participant != participant:
        raise PolicyError(f"field 'participant': policy belongs to {policy.participant!r}, applied to {participant!r}")
    if policy.unit != experiment.unit:
        # A guarantee for one unit says nothing about the other; refuse rather
        # than silently report a promise the owner did not ask for.
        raise PolicyError(
            f"field 'unit': {who}'s policy protects the {policy.unit!r} unit but the experiment "
            f"accounts the {experiment.unit!r} unit; configure the experiment for {policy.unit!r}-level DP"
        )
    eps_by = _bound_by(policy.max_epsilon, experiment.target_epsilon)
    delta_by = _bound_by(policy.delta, experiment.delta)
    budget = Budget(
        max_epsilon=min(policy.max_epsilon, experiment.target_epsilon),
        delta=min(policy.delta, experiment.delta),
        unit=policy.unit,
        epsilon_bound_by=eps_by,
        delta_bound_by=delta_by,
    )
    parts = []
    for name, by, pv, ev in (
        ("ε", eps_by, policy.max_epsilon, experiment.target_epsilon),
        ("δ", delta_by, policy.delta, experiment.delta),
    ):
        if by == "both":
            parts.append(f"{name}={pv:g} (policy and experiment agree)")
        elif by == "policy":
            parts.append(f"{name}={pv:g} bound by {who}'s policy (experiment asked {ev:g})")
        else:
            parts.append(f"{name}={ev:g} bound by the experiment (policy allows {pv:g})")
    return budget, f"{who}: " + "; ".join(parts) + f"; {policy.unit}-level"
