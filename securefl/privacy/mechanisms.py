"""Gaussian mechanisms for what participants release, each returning ``(noised, event)``.

A mechanism noises a payload and describes what that cost as a frozen
:class:`~securefl.privacy.events.PrivacyEvent`. It never touches a ledger: the
runtime asks the participant's ledger ``would_exceed(event)`` / ``commit(event)``
and only then releases the payload (check, then commit; write-ahead).

- :func:`clip_and_noise`: participant-level local DP. The whole payload is
  clipped to L2 norm C and Gaussian noise σ·Δ is added, with Δ = 2C under
  replace-one and C under add/remove (zero-out); see :func:`sensitivity_for`.
- :func:`distributed_noise_share`: participant-level distributed DP under
  secure aggregation (Kairouz, Liu & Steinke, ICML 2021). Each of n
  contributors adds N(0, σ²Δ²/n) to its clipped payload, so the *sum* carries
  σΔ. The share alone is far less private: this is only valid when the observer
  sees nothing but the sum (CKKS or pairwise masking).
- :func:`gaussian_histogram`: record-level Gaussian mechanism on label counts
  (sensitivity 1 under add/remove: one record changes one count by one).

All noise comes from :class:`~securefl.privacy.randomness.SecureRandom`, a
CSPRNG keyed from OS entropy, fresh for every call and every field: never from
the run's seed, which the coordinator knows (it could regenerate the noise and
subtract it). There is no generator argument, so none can be passed by mistake;
a DP release is reproducible in distribution only. Caveat (Mironov, "On
Significance of the Least Significant Bits for Differential Privacy", CCS 2012):
floating-point Gaussian samples are the standard practice of Opacus and
TF-Privacy, but are not a formally proven implementation of the continuous
Gaussian.

References
----------
Abadi et al., "Deep Learning with Differential Privacy", CCS 2016.
McMahan et al., "Learning Differentially Private Recurrent Language Models", ICLR 2018
(participant-level clipping of whole updates).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import TypeVar

import torch

from securefl.privacy.analysis.conversions import effective_noise_multiplier, top_up_std
from securefl.privacy.events import PrivacyEvent, Relation, Unit
from securefl.privacy.randomness import SecureRandom

Payload = TypeVar("Payload", torch.Tensor, Mapping[str, torch.Tensor])

__all__ = [
    "clip_and_noise",
    "clip_payload",
    "distributed_event",
    "distributed_noise_share",
    "effective_noise_multiplier",
    "gaussian_histogram",
    "histogram_event",
    "sensitivity_for",
    "top_up_std",
]

# Clipping divides by the norm times (1 + _CLIP_SLACK) so that, after float
# rounding, the clipped norm is still <= C: the privacy proof needs <=, not ≈.
_CLIP_SLACK = 1e-6


def _positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _check_relation(relation: str) -> None:
    if relation not in ("add_remove", "replace_one"):
        raise ValueError(f"relation must be 'add_remove' or 'replace_one', got {relation!r}")


def sensitivity_for(*, clip_norm: float, relation: Relation, unit: Unit = "participant") -> float:
    """L2 sensitivity Δ of a payload clipped to norm C, for a unit and a relation.

    - participant, ``replace_one``: one participant's payload is swapped for
      another inside the C-ball, so Δ = 2C.
    - participant, ``add_remove``: the zero-out relation (the participant's
      payload is replaced by zeros; Kairouz et al. 2021), so Δ = C.
    - record, either relation: clipping the *whole* payload bounds how far one
      record can move it only by the ball's diameter, so Δ = 2C. (Using C here
      would under-count by a factor of two.)
    """
    clip_norm = _positive("clip_norm", clip_norm)
    _check_relation(relation)
    if unit not in ("record", "participant"):
        raise ValueError(f"unit must be 'record' or 'participant', got {unit!r}")
    if unit == "participant" and relation == "add_remove":
        return clip_norm
    return 2.0 * clip_norm


def _tensors(payload: torch.Tensor | Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
    if isinstance(payload, torch.Tensor):
        tensors = [payload]
    elif isinstance(payload, Mapping):
        tensors = list(payload.values())
    else:
        raise TypeError(f"payload must be a torch.Tensor or a mapping of tensors, got {type(payload).__name__}")
    for t in tensors:
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError("every payload tensor must be a floating-point torch.Tensor")
        if not torch.isfinite(t).all():
            raise ValueError("payload contains NaN or inf; it cannot be clipped meaningfully")
    return tensors


def _global_norm(payload: torch.Tensor | Mapping[str, torch.Tensor]) -> float:
    # Accumulate in float64: the norm decides the clipping factor, so it must
    # not be under-estimated by float32 round-off.
    total = 0.0
    for t in _tensors(payload):
        total += float(t.detach().to(torch.float64).pow(2).sum())
    return math.sqrt(total)


def _map(payload: Payload, fn: Callable[[torch.Tensor], torch.Tensor]) -> Payload:
    if isinstance(payload, torch.Tensor):
        return fn(payload)
    return {name: fn(t) for name, t in payload.items()}  # type: ignore[return-value]


def clip_payload(payload: Payload, *, clip_norm: float) -> Payload:
    """Scale the whole payload (all tensors jointly) so its L2 norm is <= ``clip_norm``."""
    clip_norm = _positive("clip_norm", clip_norm)
    norm = _global_norm(payload)
    if norm <= clip_norm:
        return _map(payload, lambda t: t.detach().clone())
    factor = clip_norm / (norm * (1.0 + _CLIP_SLACK))
    return _map(payload, lambda t: t.detach() * factor)


def _add_noise(payload: Payload, *, std: float) -> Payload:
    def noisy(t: torch.Tensor) -> torch.Tensor:
        # A fresh key per field: no two fields (or releases) share noise, so none can cancel another's.
        return t + SecureRandom().normal(t.shape, std=std, dtype=t.dtype).to(t.device)

    return _map(payload, noisy)


def clip_and_noise(
    payload: Payload,
    *,
    clip_norm: float,
    noise_multiplier: float,
    relation: Relation = "replace_one",
    unit: Unit = "participant",
    payload_kind: str = "participant_update",
) -> tuple[Payload, PrivacyEvent]:
    """Clip the whole payload to L2 norm C and add N(0, (σΔ)²) to every coordinate.

    Parameters
    ----------
    payload : torch.Tensor or mapping of str to torch.Tensor
        What the participant is about to release; a mapping is clipped jointly.
    clip_norm : float
        C, the L2 bound of the clipped payload.
    noise_multiplier : float
        σ; the noise std is σ·Δ with Δ = :func:`sensitivity_for` (C or 2C, see there).
    relation : {"replace_one", "add_remove"}
        Replace-one (the default) is the meaningful relation for local noise:
        an observer sees whether a participant sent a message at all.
    unit : {"participant", "record"}
        Participant-level by default. Noise on the output of a model trained
        without DP protects only the participant unit (its record-level
        sensitivity is unbounded); say so in the report.
    payload_kind : str
        Recorded in the event (e.g. ``"logits"``, ``"generator_update"``).

    Returns
    -------
    (noised, event)
        The noised payload (same structure) and its :class:`PrivacyEvent`.
    """
    clip_norm = _positive("clip_norm", clip_norm)
    noise_multiplier = _positive("noise_multiplier", noise_multiplier)
    sensitivity = sensitivity_for(clip_norm=clip_norm, relation=relation, unit=unit)
    clipped = clip_payload(payload, clip_norm=clip_norm)
    noised = _add_noise(clipped, std=noise_multiplier * sensitivity)
    event = PrivacyEvent(
        unit=unit,
        mechanism="gaussian",
        noise_multiplier=noise_multiplier,
        sample_rate=1.0,
        steps=1,
        sensitivity=sensitivity,
        relation=relation,
        payload=payload_kind,
    )
    return noised, event


def distributed_event(
    *,
    clip_norm: float,
    noise_multiplier: float,
    relation: Relation,
    n_planned: int,
    n_actual: int | None = None,
    payload_kind: str = "participant_update",
) -> PrivacyEvent:
    """The event a distributed-noise *sum* achieves when ``n_actual`` of ``n_planned`` contributed.

    With dropouts the sum carries less noise, so the event uses
    :func:`effective_noise_multiplier` (σ·√(n_actual/n_planned)): account with it,
    or restore σ with :func:`top_up_std` first.
    """
    n_actual = n_planned if n_actual is None else n_actual
    sigma = effective_noise_multiplier(_positive("noise_multiplier", noise_multiplier), n_planned, n_actual)
    return PrivacyEvent(
        unit="participant",
        mechanism="gaussian",
        noise_multiplier=sigma,
        sample_rate=1.0,
        steps=1,
        sensitivity=sensitivity_for(clip_norm=clip_norm, relation=relation),
        relation=relation,
        payload=payload_kind,
    )


def distributed_noise_share(
    payload: Payload,
    *,
    clip_norm: float,
    noise_multiplier: float,
    n_contributors: int,
    relation: Relation,
    payload_kind: str = "participant_update",
) -> tuple[Payload, PrivacyEvent]:
    """Clip to C and add this contributor's share N(0, σ²Δ²/n) of the distributed noise.

    Returns the noised share and the event that the **sum over all n
    contributors** achieves (σ, Δ). If fewer contribute, account with
    :func:`distributed_event` (``n_actual=...``) instead, or top up.

    Here ``add_remove`` means the zero-out relation: a participant's update is
    replaced by zeros while its noise share stays in the sum (Kairouz et al. 2021).
    """
    if isinstance(n_contributors, bool) or not isinstance(n_contributors, int) or n_contributors < 1:
        raise ValueError(f"n_contributors must be an integer >= 1, got {n_contributors!r}")
    clip_norm = _positive("clip_norm", clip_norm)
    noise_multiplier = _positive("noise_multiplier", noise_multiplier)
    sensitivity = sensitivity_for(clip_norm=clip_norm, relation=relation)
    clipped = clip_payload(payload, clip_norm=clip_norm)
    share_std = noise_multiplier * sensitivity / math.sqrt(n_contributors)
    noised = _add_noise(clipped, std=share_std)
    event = distributed_event(
        clip_norm=clip_norm,
        noise_multiplier=noise_multiplier,
        relation=relation,
        n_planned=n_contributors,
        payload_kind=payload_kind,
    )
    return noised, event


def gaussian_histogram(
    counts: torch.Tensor,
    *,
    noise_multiplier: float,
    payload_kind: str = "label_histogram",
) -> tuple[torch.Tensor, PrivacyEvent]:
    """Release label counts with the Gaussian mechanism, record-level, sensitivity 1.

    Adding or removing one record changes exactly one count by one, so the L2
    sensitivity under add/remove is 1 and the noise std is σ. Counts are
    returned as float64 (they may become negative or fractional; clamp and round
    afterwards if needed, which is post-processing).
    """
    if not isinstance(counts, torch.Tensor):
        raise TypeError(f"counts must be a torch.Tensor, got {type(counts).__name__}")
    if counts.dim() != 1:
        raise ValueError(f"counts must be 1-D (one count per label), got shape {tuple(counts.shape)}")
    noise_multiplier = _positive("noise_multiplier", noise_multiplier)
    values = counts.detach().to(torch.float64)
    noise = SecureRandom().normal(values.shape, std=noise_multiplier, dtype=torch.float64)
    return values + noise, histogram_event(noise_multiplier, payload_kind=payload_kind)


def histogram_event(noise_multiplier: float, *, payload_kind: str = "label_histogram") -> PrivacyEvent:
    """The spend of one :func:`gaussian_histogram` release (also used to plan it before it happens)."""
    return PrivacyEvent(
        unit="record",
        mechanism="gaussian",
        noise_multiplier=_positive("noise_multiplier", noise_multiplier),
        sample_rate=1.0,
        steps=1,
        sensitivity=1.0,
        relation="add_remove",
        payload=payload_kind,
    )
