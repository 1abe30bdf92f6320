"""Privacy events: frozen records of what a release cost.

An event describes one release (or a block of ``steps`` identical releases) of a
Gaussian mechanism, possibly under Poisson subsampling, with everything an
accountant needs to compose it: the noise multiplier, the sampling rate, the
number of steps, the sensitivity, the unit of privacy and the neighbouring
relation. Events are values (dp-accounting's habit, see ``dp_accounting.dp_event``):
frozen, hashable, comparable, and they carry no state. Mechanisms return them;
the ledger composes them; the audit re-reads them from the ledger file.

Conventions
-----------
``sensitivity`` is the L2 sensitivity *under the event's relation*: for a
payload clipped to norm C it is C under ``add_remove`` and 2C under
``replace_one``. ``noise_multiplier`` is ``noise_std / sensitivity``. With that
convention a plain Gaussian release with multiplier σ has the same ε whatever the
relation; the relation matters for subsampled releases (see
:mod:`securefl.privacy.analysis.conversions`).

A step that used only public data spends nothing; it is logged with a
:class:`PublicDataEvent` (``mechanism="none"``) so that the ledger can say so
explicitly rather than by omission.

References
----------
Abadi et al., "Deep Learning with Differential Privacy", CCS 2016 (DP-SGD).
Mironov, "Rényi Differential Privacy", CSF 2017.
Google dp-accounting, ``dp_event.py`` (events as frozen values).
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Unit = Literal["record", "participant"]
Relation = Literal["add_remove", "replace_one"]
Mechanism = Literal["gaussian", "subsampled_gaussian"]

UNITS: tuple[str, ...] = ("record", "participant")
RELATIONS: tuple[str, ...] = ("add_remove", "replace_one")


class PrivacyEvent(BaseModel):
    """One (block of) Gaussian release(s) to be composed by an accountant.

    Parameters
    ----------
    unit : {"record", "participant"}
        The unit of privacy the event protects.
    mechanism : {"gaussian", "subsampled_gaussian"}
        Plain Gaussian (``sample_rate`` must be 1.0) or Poisson-subsampled Gaussian.
    noise_multiplier : float
        Noise standard deviation divided by ``sensitivity``; > 0.
    sample_rate : float
        Poisson sampling probability q in (0, 1]; 1.0 for a plain Gaussian.
    steps : int
        Number of identical self-composed releases (e.g. DP-SGD steps); >= 1.
    sensitivity : float
        L2 sensitivity under ``relation`` (recorded for the audit; accounting
        depends only on ``noise_multiplier``); > 0.
    relation : {"add_remove", "replace_one"}
        The neighbouring relation the sensitivity refers to.
    payload : str
        The kind of payload released, e.g. ``"dp_sgd"``, ``"logits"``,
        ``"label_histogram"``, ``"generator_update"``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    unit: Unit
    mechanism: Mechanism
    noise_multiplier: float = Field(gt=0)
    sample_rate: float = Field(gt=0, le=1)
    steps: int = Field(ge=1)
    sensitivity: float = Field(gt=0)
    relation: Relation
    payload: str = Field(min_length=1, max_length=128)

    @field_validator("noise_multiplier", "sensitivity")
    @classmethod
    def _finite(cls, value: float) -> float:
        # An infinite multiplier would mean "no release", which is a PublicDataEvent,
        # and a NaN would poison every comparison the ledger makes.
        if not math.isfinite(value):
            raise ValueError(f"must be finite, got {value}")
        return float(value)

    @field_validator("steps", mode="before")
    @classmethod
    def _steps_not_bool(cls, value: object) -> object:
        # bool is an int subclass; ``steps=True`` is almost certainly a bug upstream.
        if isinstance(value, bool):
            raise ValueError(f"must be an integer >= 1, got {value!r}")
        return value

    @model_validator(mode="after")
    def _mechanism_matches_rate(self) -> PrivacyEvent:
        if self.mechanism == "gaussian" and self.sample_rate != 1.0:
            raise ValueError(
                f"sample_rate must be 1.0 for mechanism 'gaussian' (got {self.sample_rate}); "
                "use mechanism='subsampled_gaussian' for Poisson subsampling"
            )
        return self

    @property
    def subsampled(self) -> bool:
        """Whether the release enjoys amplification by (Poisson) subsampling."""
        return self.sample_rate < 1.0

    @property
    def noise_std(self) -> float:
        """Standard deviation of the noise actually added (σ · Δ)."""
        return self.noise_multiplier * self.sensitivity

    @classmethod
    def dp_sgd(
        cls,
        *,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
        clip_norm: float = 1.0,
        payload: str = "dp_sgd",
    ) -> PrivacyEvent:
        """The event of ``steps`` DP-SGD steps (Abadi et al. 2016) with Poisson sampling.

        Record-level, add/remove: per-example gradients are clipped to ``clip_norm``
        (the add/remove sensitivity of their sum) and ``noise_multiplier`` is
        Opacus's σ (noise std / clip_norm).
        """
        return cls(
            unit="record",
            mechanism="subsampled_gaussian" if sample_rate < 1.0 else "gaussian",
            noise_multiplier=noise_multiplier,
            sample_rate=sample_rate,
            steps=steps,
            sensitivity=clip_norm,
            relation="add_remove",
            payload=payload,
        )


class PublicDataEvent(BaseModel):
    """A step that released something computed from public data only: it spends nothing.

    Logging it (rather than logging nothing) lets the ledger, the report and the
    audit say "this step spent nothing" explicitly. Note that subsampling a
    public set gives no amplification, and that anything derived from private
    data is *not* a public-data step.

    Parameters
    ----------
    payload : str
        Kind of payload released, e.g. ``"public_logits"``.
    unit : {"record", "participant"} or None
        Optional unit the step is attributed to in reports; ``None`` for all.
    reason : str
        Free-text justification written to the ledger for the privacy officer.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    mechanism: Literal["none"] = "none"
    payload: str = Field(min_length=1, max_length=128)
    unit: Unit | None = None
    reason: str = "computed from public data only"


AnyEvent = PrivacyEvent | PublicDataEvent
