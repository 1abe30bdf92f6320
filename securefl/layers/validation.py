"""Every uplink checked against the protocol's declared schema, on both sides of the wire.

The runtime puts this layer first in the stack, so its outbound hook runs on
the protocol's plaintext before DP, sealing and signing, and its inbound hooks
run last, after the signature is verified and the sealed fields have been
checked by their scheme's layer (CKKS or masking).

Participant side (``outbound``): an honest participant's software does not
release a payload it knows to be broken (NaN or Inf values, a shape the
protocol does not declare, a non-floating dtype), e.g. after its model
diverged. It sends a *withheld* notice instead: the same envelope with an
empty payload and ``meta["withheld"]`` giving the reason. Nothing private
leaves, so a DP layer books nothing; under masking the server recovers the
participant as a dropout. The server logs the notice as a rejection.

Server side (``server_inbound``) a message is rejected (:class:`Rejected`, so
the runtime logs sender, receiver and reason in ``metrics.jsonl`` and the round
goes on without it) when it is:

- a withheld notice;
- of another round (delayed, or early);
- from a party that is not sampled in this round;
- a second message of the same kind from the same sender in this round
  (with or without signing: a plaintext mean must never count a sender twice);
- of a kind, or with payload fields, the protocol's ``uplink`` does not declare;
- carrying a field that is not a dense floating-point tensor (or, once sealed,
  a well-formed sealed value of a floating dtype), that holds NaN or Inf, or
  whose shape differs from :meth:`Protocol.expected_uplink_shape`.

Before round 1 (``check``) every participant's data is checked
(:func:`securefl.data.checks.check_party_data`): an empty split, features of
the wrong shape, non-finite features or labels outside the configured classes
stop the run with a :class:`~securefl.data.datasets.DataError` naming the
participant, before any training.

Participant side (``inbound``): messages of another round are rejected, and a
peer-to-peer message of an uplink kind (decentralised protocols) gets the same
payload checks as the server applies.

What cannot be checked: the values inside a sealed field (that is the point of
sealing). A CKKS participant's own encryption refuses NaN/Inf; under masking a
finite but absurd value is only bounded by the DP layer's clipping.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

import torch

from securefl.core.message import Message
from securefl.core.sealed import SealedTensor, is_sealed, torch_dtype
from securefl.data.checks import check_party_data
from securefl.layers.base import Layer, Rejected

WITHHELD = "withheld"


def _describe(value: Any) -> str:
    return type(value).__name__ if not isinstance(value, torch.Tensor) else f"a {value.dtype} tensor"


class ValidationLayer(Layer):
    name = "validation"

    def __init__(self, *, check_data: bool = True, hosted: Collection[str] | None = None) -> None:
        """``check_data``: also check every hosted participant's data before round 1 (a side that holds
        no participant data, e.g. a deployed coordinator, turns it off). ``hosted``: the participants whose
        data this process holds (None: all, a simulation; a deployed node holds only its own)."""
        self.check_data = check_data
        self.hosted = None if hosted is None else set(hosted)
        self._protocol: Any = None
        self._schemas: dict[str, Any] = {}
        self._round: int | None = None
        self._sampled: set[str] = set()
        self._seen: set[tuple[str, str]] = set()

    def check(self, protocol: Any, parties: Sequence[Any]) -> None:
        self._protocol = protocol
        ctx = getattr(protocol, "ctx", None)
        if self.check_data and ctx is not None:
            for party in parties:
                if self.hosted is not None and party.id not in self.hosted:
                    continue
                check_party_data(party, input_shape=ctx.input_shape, num_classes=ctx.num_classes,
                                 classes=ctx.split.private_classes)
        uplink = getattr(protocol, "uplink", None)
        if uplink is None:
            self._schemas = {}
        else:
            # Several kinds declared together (HeteroFL's UplinkKinds) or one.
            self._schemas = dict(getattr(uplink, "kinds", None) or {uplink.kind: uplink})

    def start_round(self, rnd: int, sampled: Sequence[str]) -> None:
        self._round = rnd
        self._sampled = set(sampled)
        self._seen = set()

    # ----- participant side ------------------------------------------------------------------
    def outbound(self, msg: Message, party: Any) -> Message:
        if msg.kind not in self._schemas or WITHHELD in msg.meta:
            return msg
        problem = self.payload_problem(msg, sealed_allowed=False)
        if problem is None:
            return msg
        # Release nothing: the envelope only tells the receiver why nothing came.
        return msg.model_copy(update={"payload": {}, "meta": {WITHHELD: f"{party.id}'s own check: {problem}"}})

    def inbound(self, msg: Message, party: Any) -> Message:
        self._check_round(msg)
        if msg.kind in self._schemas:
            self._check_payload(msg)
        return msg

    # ----- server side ---------------------------------------------------------------------------
    def server_inbound(self, msg: Message) -> Message:
        self._check_round(msg)
        if self._round is not None and msg.sender not in self._sampled:
            raise Rejected(msg.sender, f"{msg.sender!r:.80} is not a participant sampled in round {self._round}")
        key = (msg.sender, msg.kind)
        if key in self._seen:
            raise Rejected(msg.sender, f"duplicate: a second {msg.kind!r:.80} message from {msg.sender!r:.80} "
                                       f"in round {msg.round}; each participant counts once")
        self._check_payload(msg)
        self._seen.add(key)
        return msg

    # ----- the checks ------------------------------------------------------------------------------
    def _check_round(self, msg: Message) -> None:
        if self._round is not None and msg.round != self._round:
            when = "stale" if msg.round < self._round else "early"
            raise Rejected(msg.sender, f"{when}: round {msg.round} received during round {self._round}")

    def _check_payload(self, msg: Message) -> None:
        if WITHHELD in msg.meta:
            raise Rejected(msg.sender, f"withheld by the sender: {str(msg.meta[WITHHELD]):.300}")
        problem = self.payload_problem(msg, sealed_allowed=True)
        if problem is not None:
            raise Rejected(msg.sender, problem)

    def payload_problem(self, msg: Message, *, sealed_allowed: bool) -> str | None:
        """Why ``msg`` does not match the declared uplink (``None`` if it does)."""
        schema = self._schemas.get(msg.kind)
        if schema is None:
            declared = sorted(self._schemas) or "none"
            return f"kind {msg.kind!r:.80} is not a declared uplink kind (declared: {declared})"
        if set(msg.payload) != set(schema.fields):
            return (f"payload fields {sorted(msg.payload)!r:.200} do not match the declared {msg.kind!r} "
                    f"fields {sorted(schema.fields)}")
        for name in schema.fields:
            problem = self._field_problem(msg, name, sealed_allowed=sealed_allowed)
            if problem is not None:
                return f"field {name!r}: {problem}"
        return None

    def _field_problem(self, msg: Message, name: str, *, sealed_allowed: bool) -> str | None:
        value = msg.payload[name]
        expected = self._protocol.expected_uplink_shape(msg.kind, name, msg.sender, msg.round)
        if isinstance(value, torch.Tensor):
            if value.layout != torch.strided:
                return f"a {value.layout} tensor; a dense tensor is expected"
            if not value.is_floating_point():
                return f"dtype {value.dtype}; a floating-point tensor is expected"
            if expected is not None and tuple(value.shape) != tuple(expected):
                return f"shape {tuple(value.shape)}, expected {tuple(expected)}"
            finite = torch.isfinite(value)
            if not bool(finite.all()):
                bad = int((~finite).sum())
                return f"{bad} of {value.numel()} values are NaN or Inf"
            return None
        if sealed_allowed and is_sealed(msg, name):
            try:
                sealed = SealedTensor.from_message(msg, name)
            except (KeyError, ValueError, TypeError) as exc:
                return f"malformed sealed value ({str(exc):.200})"
            if not torch_dtype(sealed.dtype).is_floating_point:
                return f"sealed dtype {sealed.dtype}; a floating-point tensor is expected"
            if expected is not None and sealed.shape != tuple(expected):
                return f"sealed shape {sealed.shape}, expected {tuple(expected)}"
            return None
        return f"{_describe(value)}, not a tensor" + (" or a sealed value" if sealed_allowed else "")
