"""Middleware around the protocols: how DP, encryption and signing are composed at the call site.

A protocol computes; the runtime moves its messages through a stack of
layers. On the way out of a participant each layer may transform the message
(clip and noise it, seal it, sign it); on the way in it may check or open it.
On the server side a layer may replace the aggregator (a CKKS aggregator that
adds ciphertexts, a masking aggregator that cancels masks). No protocol file
knows which layers are on, so there is no ``if privacy:`` anywhere in
``securefl/protocols``.

Order matters and is fixed by the runtime: outbound DP → seal → sign; inbound
verify → open. Each layer also declares what it supports: ``check`` runs before
round 1 and refuses an impossible combination with a clear reason (for example
CKKS with a protocol whose server must read the aggregate in the clear).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from securefl.core.message import Message


class LayerSetupError(ValueError):
    """A layer cannot work with this protocol or configuration; raised before round 1."""


class Rejected(Exception):
    """A message was refused by a layer. The round goes on without it; the reason is logged."""

    def __init__(self, sender: str, reason: str) -> None:
        super().__init__(f"message from {sender!r} rejected: {reason}")
        self.sender = sender
        self.reason = reason


class Layer:
    """Base layer: every hook is the identity."""

    name = "layer"

    def check(self, protocol: Any, parties: Sequence[Any]) -> None:
        """Refuse an unsupported set-up before round 1 (raise :class:`LayerSetupError`)."""

    def connect(self, participants: Any) -> None:
        """Coordinator side of a deployment: the channel to the participants' nodes, for a layer whose
        per-round set-up is a conversation with them (pairwise masking's key agreement)."""

    def start_round(self, rnd: int, sampled: Sequence[str]) -> None:
        """Per-round set-up (e.g. the key agreement of pairwise masking)."""

    def outbound(self, msg: Message, party: Any) -> Message:
        """Participant side, on every message a participant sends."""
        return msg

    def inbound(self, msg: Message, party: Any) -> Message:
        """Participant side, on every message a participant receives (may raise :class:`Rejected`)."""
        return msg

    def server_inbound(self, msg: Message) -> Message:
        """Server side, on every reply (may raise :class:`Rejected`)."""
        return msg

    def server_outbound(self, msg: Message) -> Message:
        """Server side, on every message the server sends (already addressed to one receiver)."""
        return msg

    def wrap_aggregator(self, aggregator: Any, rnd: int) -> Any:
        """Server side: the aggregator ``server_step`` gets this round."""
        return aggregator


def aggregatable_fields(protocol: Any) -> list[str]:
    """The uplink fields a secure aggregator may replace (declared by the protocol)."""
    uplink = getattr(protocol, "uplink", None)
    if uplink is None:
        return []
    return [name for name, spec in uplink.fields.items() if spec.aggregatable]
