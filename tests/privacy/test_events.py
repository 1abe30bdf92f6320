"""Events are frozen, validated values whose errors name the field."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from securefl.privacy.events import PrivacyEvent, PublicDataEvent

BASE = dict(
    unit="record",
    mechanism="subsampled_gaussian",
    noise_multiplier=1.1,
    sample_rate=0.01,
    steps=100,
    sensitivity=1.0,
    relation="add_remove",
    payload="dp_sgd",
)


def test_valid_event_is_frozen_and_hashable() -> None:
    event = PrivacyEvent(**BASE)
    assert event.subsampled and event.noise_std == pytest.approx(1.1)
    with pytest.raises(ValidationError):
        event.steps = 5  # type: ignore[misc]
    assert hash(event) == hash(PrivacyEvent(**BASE))
    assert event == PrivacyEvent(**BASE)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("noise_multiplier", 0.0),
        ("noise_multiplier", -1.0),
        ("noise_multiplier", math.inf),
        ("noise_multiplier", math.nan),
        ("sample_rate", 0.0),
        ("sample_rate", 1.5),
        ("steps", 0),
        ("steps", True),
        ("sensitivity", 0.0),
        ("unit", "patient"),
        ("relation", "swap"),
        ("mechanism", "laplace"),
        ("payload", ""),
    ],
)
def test_invalid_field_is_named(field: str, value: object) -> None:
    with pytest.raises(ValidationError) as info:
        PrivacyEvent(**{**BASE, field: value})
    assert field in str(info.value)


def test_extra_fields_forbidden() -> None:
    with pytest.raises(ValidationError, match="epsilon"):
        PrivacyEvent(**BASE, epsilon=1.0)


def test_plain_gaussian_requires_rate_one() -> None:
    with pytest.raises(ValidationError, match="sample_rate must be 1.0"):
        PrivacyEvent(**{**BASE, "mechanism": "gaussian"})
    assert PrivacyEvent(**{**BASE, "mechanism": "gaussian", "sample_rate": 1.0}).subsampled is False


def test_dp_sgd_helper() -> None:
    event = PrivacyEvent.dp_sgd(noise_multiplier=1.5, sample_rate=0.04, steps=2250, clip_norm=0.5)
    assert (event.unit, event.relation, event.sensitivity, event.mechanism) == (
        "record",
        "add_remove",
        0.5,
        "subsampled_gaussian",
    )
    full_batch = PrivacyEvent.dp_sgd(noise_multiplier=1.5, sample_rate=1.0, steps=3)
    assert full_batch.mechanism == "gaussian"


def test_public_data_event_spends_nothing_marker() -> None:
    event = PublicDataEvent(payload="public_logits")
    assert event.mechanism == "none" and event.unit is None
    with pytest.raises(ValidationError):
        PublicDataEvent(payload="x", mechanism="gaussian")  # type: ignore[arg-type]
