"""Participant-level DP as a layer: clip every private payload a participant shares, then add noise.

Each outbound message's *private* fields (as the protocol's schema declares
them: logits, posteriors, meme parameters, generator updates, label counts)
are clipped jointly to L2 norm C and noised with the Gaussian mechanism:

- ``local``: the full noise, std σ·2C (replace-one: swapping a participant's
  whole payload moves it by at most 2C), so even the aggregator sees only a
  private release;
- ``distributed``: under secure aggregation, each of the n contributors adds
  N(0, σ²(2C)²/n), so the *sum* carries σ·2C. If participants drop out, the
  sum carries less; the ledger therefore records the worst case the round
  allows, σ·sqrt(t/n) with t the minimum number of contributors, and the
  server refuses to aggregate fewer than t (no release below what was booked).

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

from securefl.layers.base import Layer, LayerSetupError
from securefl.privacy.events import PrivacyEvent
from securefl.privacy.mechanisms import clip_and_noise, distributed_noise_share
from securefl.runtime.message import Message


def private_fields(protocol: Any) -> list[str]:
    uplink = getattr(protocol, "uplink", None)
    return [] if uplink is None else [n for n, f in uplink.fields.items() if f.private]


class ParticipantDPLayer(Layer):
    name = "participant_dp"

    def __init__(self, *, noise_multipliers: Mapping[str, float], clip_norm: float, mode: str,
                 commit: Callable[[str, PrivacyEvent], None], generator: Callable[[str, int], torch.Generator],
                 min_contributors: float = 1.0) -> None:
        self.noise_multipliers = dict(noise_multipliers)
        self.clip_norm = clip_norm
        self.mode = mode
        self.commit = commit
        self.generator = generator
        self.min_contributors = min_contributors
        self._fields: list[str] = []
        self._n_round = 0
        self._released: dict[tuple[str, int, str], tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = {}

    def check(self, protocol: Any, parties: Sequence[Any]) -> None:
        self._fields = private_fields(protocol)
        if not self._fields and getattr(protocol, "uplink", None) is not None:
            raise LayerSetupError(f"privacy.unit=participant: {protocol.name} declares no private uplink field to protect")

    def start_round(self, rnd: int, sampled: Sequence[str]) -> None:
        self._n_round = len(sampled)
        self._released = {k: v for k, v in self._released.items() if k[1] == rnd}

    def min_survivors(self) -> int:
        return max(1, math.ceil(self.min_contributors * self._n_round))

    def outbound(self, msg: Message, party: Any) -> Message:
        fields = {n: msg.payload[n] for n in self._fields if isinstance(msg.payload.get(n), torch.Tensor)}
        if not fields or party.id not in self.noise_multipliers:
            return msg
        key = (party.id, msg.round, msg.kind)
        cached = self._released.get(key)
        if cached is not None and all(torch.equal(cached[0][n], fields[n]) for n in fields):
            return msg.with_payload(**cached[1])  # the same release again: no new spend
        sigma = self.noise_multipliers[party.id]
        gen = self.generator(party.id, msg.round)
        if self.mode == "local":
            noised, event = clip_and_noise(fields, clip_norm=self.clip_norm, noise_multiplier=sigma, generator=gen,
                                           relation="replace_one", unit="participant", payload_kind=msg.kind)
        else:
            noised, event = distributed_noise_share(fields, clip_norm=self.clip_norm, noise_multiplier=sigma,
                                                    n_contributors=self._n_round, relation="replace_one",
                                                    generator=gen, payload_kind=msg.kind)
            # Book the worst case the server will accept: only t of the n shares in the sum.
            t = self.min_survivors()
            event = event.model_copy(update={"noise_multiplier": event.noise_multiplier * math.sqrt(t / self._n_round)})
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
