"""Participant-level DP as a layer: clip every private payload a participant shares, then add noise.

Each outbound message's *private* fields (as the protocol's schema declares
them: logits, posteriors, meme parameters, generator updates, label counts)
are clipped jointly to L2 norm C and noised with the Gaussian mechanism:

- ``local``: the full noise, std σ·2C (replace-one: swapping a participant's
  whole payload moves it by at most 2C), so even the aggregator sees only a
  private release;
- ``distributed``: under secure aggregation, each of the n contributors adds
  N(0, σ²(2C)²/n), so the *sum* carries σ·2C. If participants drop out, the
  sum carries less, and a participant that sees the sum knows its own share;
  the ledger therefore records the worst case the round allows against any
  single observer, σ·sqrt((t-1)/n) with t the minimum cohort, and the server
  refuses to aggregate fewer than t (no release below what was booked). n and t
  come from the config (:mod:`securefl.privacy.cohort`), never from the
  coordinator's list of who was sampled.

Check-then-commit: the event is committed to the participant's ledger
(durably) before the message leaves; a refused commit (budget exhausted)
means the message is never sent and the participant stops contributing.
The same plaintext sent to several receivers (FedH2L's neighbours) is one
release: it is noised once and the noised copy is reused.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from securefl.core.message import Message
from securefl.layers.base import Layer, LayerSetupError
from securefl.privacy.cohort import Cohort, min_cohort
from securefl.privacy.events import PrivacyEvent
from securefl.privacy.mechanisms import clip_and_noise, distributed_noise_share


def private_fields(protocol: Any) -> list[str]:
    uplink = getattr(protocol, "uplink", None)
    return [] if uplink is None else [n for n, f in uplink.fields.items() if f.private]


def unsafe_release_reasons(protocol: Any, *, unit: str, noise: str) -> list[str]:
    """Why ``protocol``, as configured, would release private data outside what DP books (empty: it would not).

    Reads only the protocol's declarations (``uplink_metadata``, ``weighted_aggregation``, ``peer_to_peer``,
    ``releases_outside_layers``, ``record_coupling``); ``unit`` and ``noise`` are ``privacy.unit`` and
    ``privacy.noise``.
    """
    if unit == "none":
        return []
    reasons = []
    metadata: Mapping[str, Any] = getattr(protocol, "uplink_metadata", dict)()
    for key, spec in metadata.items():
        if spec.private:
            # No layer noises metadata, and the ledger books none of it: an exact value leaves as it is.
            reasons.append(f"its uplink metadata {key!r} is {spec.description}, sent exactly and outside the ledger")
    outside = getattr(protocol, "releases_outside_layers", lambda: None)()
    if outside:
        reasons.append(f"it releases {outside}, which no DP layer noises or books")
    coupling = getattr(protocol, "record_coupling", lambda: None)()
    if coupling and unit == "record":
        reasons.append(f"{coupling}, so DP-SGD's per-record clipping no longer bounds what one record changes")
    if unit == "participant" and noise == "distributed":
        weights = getattr(protocol, "weighted_aggregation", lambda: None)()
        if weights:
            reasons.append(f"its server weights the sum by {weights}: each noise share is scaled by its owner's "
                           "weight, so the heaviest contributor gets less noise than it booked (distributed noise "
                           "is for unweighted sums only)")
        peers = getattr(protocol, "peer_to_peer", lambda: None)()
        if peers:
            reasons.append(f"{peers}: each such message carries only a 1/sqrt(n) share of the noise, which the "
                           "ledger books for a sum nobody sees the parts of")
    return reasons


def refuse_unsafe_releases(protocol: Any, *, unit: str, noise: str) -> None:
    """Raise :class:`LayerSetupError`, before round 1, naming every reason of :func:`unsafe_release_reasons`."""
    reasons = unsafe_release_reasons(protocol, unit=unit, noise=noise)
    if reasons:
        setting = f"privacy.unit = {unit!r}" + (f", privacy.noise = {noise!r}" if unit == "participant" else "")
        raise LayerSetupError(f"{setting} cannot run {protocol.name}: " + "; ".join(reasons))


class ParticipantDPLayer(Layer):
    name = "participant_dp"
    #: The run's cohort from the config the participant accepted (:meth:`plan_cohort`); None: from each round's list.
    cohort: Cohort | None = None

    def __init__(self, *, noise_multipliers: Mapping[str, float], clip_norm: float, mode: str,
                 commit: Callable[[str, PrivacyEvent], None], min_contributors: float = 1.0) -> None:
        self.noise_multipliers = dict(noise_multipliers)
        self.clip_norm = clip_norm
        self.mode = mode
        self.commit = commit
        self.min_contributors = min_contributors
        self._fields: list[str] = []
        self._n_round = 0
        self._released: dict[tuple[str, int, str], tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = {}

    def check(self, protocol: Any, parties: Sequence[Any]) -> None:
        refuse_unsafe_releases(protocol, unit="participant", noise=self.mode)
        self._fields = private_fields(protocol)
        if not self._fields and getattr(protocol, "uplink", None) is not None:
            raise LayerSetupError(f"privacy.unit=participant: {protocol.name} declares no private uplink field to protect")

    def plan_cohort(self, cohort: Cohort) -> None:
        """n (sampled per round) and t from the approved config: the noise shares and the booking never depend
        on the coordinator's list of who was sampled (a longer list would shrink every share)."""
        self.cohort = cohort

    def start_round(self, rnd: int, sampled: Sequence[str]) -> None:
        if self.cohort is not None and self.mode == "distributed":
            self.cohort.check_sampled(sampled)  # ValueError: a node refuses the request
        self._n_round = self.cohort.per_round if self.cohort is not None else len(sampled)
        self._released = {k: v for k, v in self._released.items() if k[1] == rnd}

    def min_survivors(self) -> int:
        """t: the fewest shares a sum may hold (the server refuses fewer); the same t as masking's threshold and
        CKKS opening (:func:`securefl.privacy.cohort.min_cohort`)."""
        if self.cohort is not None:
            return self.cohort.minimum
        return min_cohort(max(1, self._n_round), fraction=self.min_contributors)

    def booked_noise_factor(self) -> float:
        """Distributed noise: the sum's σ is booked times sqrt((t-1)/n).

        The smallest sum the server accepts holds t shares of N(0, σ²Δ²/n). Its observers are the coordinator
        (masking) and every participant that opens or receives it, and a contributing participant knows its own
        share: what protects an owner against it is the other t-1 shares. So the ledger books σ·sqrt((t-1)/n),
        which also covers any observer that knows no share (t shares). Not covered: a coalition that knows k
        shares (k colluding owners) leaves t-k.
        """
        t = self.min_survivors()
        return math.sqrt((t - 1) / self._n_round)

    def outbound(self, msg: Message, party: Any) -> Message:
        fields = {n: msg.payload[n] for n in self._fields if isinstance(msg.payload.get(n), torch.Tensor)}
        if not fields or party.id not in self.noise_multipliers:
            return msg
        key = (party.id, msg.round, msg.kind)
        cached = self._released.get(key)
        if cached is not None and all(torch.equal(cached[0][n], fields[n]) for n in fields):
            return msg.with_payload(**cached[1])  # the same release again: no new spend
        sigma = self.noise_multipliers[party.id]
        # The mechanisms draw fresh OS-keyed noise for every field of every release (never the run's seed, which
        # the coordinator knows), so two releases of one participant in one round never share noise.
        if self.mode == "local":
            noised, event = clip_and_noise(fields, clip_norm=self.clip_norm, noise_multiplier=sigma,
                                           relation="replace_one", unit="participant", payload_kind=msg.kind)
        else:
            noised, event = distributed_noise_share(fields, clip_norm=self.clip_norm, noise_multiplier=sigma,
                                                    n_contributors=self._n_round, relation="replace_one",
                                                    payload_kind=msg.kind)
            # Book the worst case: the t-1 other shares of the smallest sum accepted (booked_noise_factor).
            event = event.model_copy(update={"noise_multiplier": event.noise_multiplier * self.booked_noise_factor()})
        self.commit(party.id, event)  # raises BudgetExceeded: the message never leaves
        noised = {n: v.to(fields[n].dtype) for n, v in noised.items()}
        self._released[key] = (fields, noised)
        return msg.with_payload(**noised)

    def wrap_aggregator(self, aggregator: Any, rnd: int) -> Any:
        if self.mode != "distributed":
            return aggregator
        return _MinimumContributors(aggregator, self.min_survivors())


class TooFewContributors(RuntimeError):
    """Distributed DP: fewer shares reached the sum than the ledgers booked noise for."""


class _MinimumContributors:
    """Refuses to aggregate fewer replies than the distributed noise was booked for."""

    def __init__(self, inner: Any, minimum: int) -> None:
        self._inner = inner
        self._minimum = minimum

    def _check(self, replies: Sequence[Message]) -> None:
        if len(replies) < self._minimum:
            raise TooFewContributors(
                f"distributed DP: {len(replies)} contributions reached the aggregator, fewer than the {self._minimum} "
                "the participants' ledgers booked noise for; the round is aborted without a release")

    def sum(self, replies: Sequence[Message], field: str) -> Any:
        self._check(replies)
        return self._inner.sum(replies, field)

    def mean(self, replies: Sequence[Message], field: str) -> Any:
        self._check(replies)
        return self._inner.mean(replies, field)

    def weighted_mean(self, replies: Sequence[Message], field: str, weights: Any) -> Any:
        self._check(replies)
        return self._inner.weighted_mean(replies, field, weights)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)
