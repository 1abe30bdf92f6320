"""Secure aggregation as layers: CKKS (TenSEAL) and pairwise masking (SecAgg family).

Both replace each *aggregatable* uplink field (as declared by the protocol's
schema) by a sealed value on the participant, and swap the server's
aggregator for one that combines sealed values.

- CKKS: the participants are the key-holder committee (in simulation they
  share one key generated at start); the aggregator holds only the public
  context and cannot decrypt. Aggregates come back sealed and are opened by
  the participants' inbound layer, so the server never sees a plaintext sum.
  Protocols with a global state (HeteroFL's model, FedGen's generator) keep
  it with the participants, who apply the sealed aggregates to their replicas
  (``securefl.protocols.base.Replica``). A protocol whose server must compute
  on the aggregate in the clear (``server_opens_aggregates``, e.g. FedAvg's
  global model) or that needs individual payloads in the clear (a
  non-aggregatable private uplink field, e.g. FedGen's reference mode) is
  refused before round 1.
- Masking: per round, the sampled participants agree on pairwise seeds and
  Shamir-share them (Bonawitz et al. 2017, rounds 0-1); each masks its input;
  the server learns only the sum, in the clear, and recovers dropouts from the
  shares. A protocol whose server reads aggregates works under masking.

Both also refuse what a protocol declares it cannot do under secure
aggregation (``protocol.secure_aggregation_refusal()``, e.g. HeteroFL's sBN
statistics query, which bypasses the layers).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from securefl.crypto.ckks import CkksAggregator, CkksParams, EncryptedVector, KeyHolderContext, PublicContext
from securefl.crypto.errors import CiphertextError
from securefl.crypto.keystore import write_private_file
from securefl.crypto.masking import MaskingSession, SecAggSimulation
from securefl.crypto.sealed import SealedTensor, open_sealed_fields
from securefl.layers.base import Layer, LayerSetupError, Rejected, aggregatable_fields
from securefl.runtime.message import AGGREGATOR, Message


def _refuse_unsupported(protocol: Any, scheme: str) -> None:
    refusal = getattr(protocol, "secure_aggregation_refusal", lambda: None)()
    if refusal:
        raise LayerSetupError(f"secure_aggregation={scheme} cannot run {protocol.name}: {refusal}")
    _refuse_individual_fields(protocol, scheme)


def _refuse_individual_fields(protocol: Any, scheme: str) -> None:
    uplink = getattr(protocol, "uplink", None)
    if uplink is None:
        return
    clear = [n for n, f in uplink.fields.items() if f.private and not f.aggregatable]
    if clear:
        raise LayerSetupError(
            f"secure_aggregation={scheme} cannot run {protocol.name}: its uplink sends {', '.join(clear)} that the "
            "server must read individually (not only as a sum), which secure aggregation forbids"
            + (f" ({protocol.secure_aggregation_note})" if getattr(protocol, "secure_aggregation_note", "") else "")
        )


def _sealed_field(msg: Message, name: str, scheme: str) -> SealedTensor | None:
    """Field ``name`` of an uplink as a sealed value of ``scheme`` (None if absent), or :class:`Rejected`.

    A field that should have been sealed but arrives in the clear, a malformed sealed description or a
    value of another scheme is refused here, on the server, before it can reach (and abort) the aggregator.
    """
    if name not in msg.payload:
        return None  # a withheld or otherwise incomplete message: the validation layer says why
    if isinstance(msg.payload[name], torch.Tensor):
        raise Rejected(msg.sender, f"field {name!r} arrived in the clear; secure_aggregation requires it sealed")
    try:
        sealed = SealedTensor.from_message(msg, name)
    except (KeyError, ValueError) as exc:
        raise Rejected(msg.sender, f"field {name!r}: malformed sealed value ({str(exc):.200})") from None
    if sealed.scheme != scheme:
        raise Rejected(msg.sender, f"field {name!r}: sealed with scheme {sealed.scheme!r:.40}, expected {scheme!r}")
    return sealed


def _load_committee(path: Path) -> KeyHolderContext:
    try:
        return KeyHolderContext.from_committee_secret(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise LayerSetupError(f"{path}: the CKKS committee key is corrupt or unreadable ({str(exc)[:160]}); restore "
                              "it from another committee member: a new key could not open what was sealed") from None


def _provisioned(path: Path, what: str) -> Path:
    if not path.exists():
        raise LayerSetupError(f"{path}: no {what} (`securefl provision`)")
    return path


class CkksLayer(Layer):
    name = "ckks"

    COMMITTEE_FILE = "ckks_committee.secret"
    PUBLIC_FILE = "ckks_public.context"

    def __init__(self, params: CkksParams, *, key_dir: Path | None = None) -> None:
        """A simulation's layer: the committee's keys (participant side) and the aggregator (server side)."""
        committee_file = key_dir / self.COMMITTEE_FILE if key_dir is not None else None
        if committee_file is not None and committee_file.exists():
            # A resumed run keeps the committee's key: sealed state may outlive a round.
            keys = _load_committee(committee_file)
        else:
            keys = KeyHolderContext.generate(params)
            if committee_file is not None:
                write_private_file(committee_file, keys.export_secret_for_committee())
        self._keys: KeyHolderContext | None = keys
        self._set_public(keys.public())

    def _set_public(self, public: PublicContext) -> None:
        self.public_context = public
        self._aggregator = CkksAggregator(public)
        self._fields: list[str] = []

    @classmethod
    def for_participant(cls, key_dir: Path) -> CkksLayer:
        """A deployed participant's layer: the committee secret its data owner was provisioned with."""
        keys = _load_committee(_provisioned(Path(key_dir) / cls.COMMITTEE_FILE, "CKKS committee key; every "
                                            "participant of a CKKS run must hold the same one"))
        return cls._deployed(keys, keys.public())

    @classmethod
    def for_coordinator(cls, key_dir: Path) -> CkksLayer:
        """A deployed coordinator's layer: the public context only, so it can add but never decrypt."""
        path = _provisioned(Path(key_dir) / cls.PUBLIC_FILE, "CKKS public context; the coordinator of a CKKS run "
                            "needs the committee's")
        return cls._deployed(None, PublicContext.from_bytes(path.read_bytes()))

    @classmethod
    def _deployed(cls, keys: KeyHolderContext | None, public: PublicContext) -> CkksLayer:
        layer = cls.__new__(cls)
        layer._keys = keys
        layer._set_public(public)
        return layer

    def check(self, protocol: Any, parties: Sequence[Any]) -> None:
        _refuse_unsupported(protocol, "ckks")
        if getattr(protocol, "server_opens_aggregates", False):
            raise LayerSetupError(
                f"secure_aggregation=ckks cannot run {protocol.name}: its server computes on the aggregate in the "
                "clear, and under CKKS the server cannot decrypt. Use secure_aggregation=masking, which reveals "
                "only the sum to the server."
            )
        self._fields = aggregatable_fields(protocol)

    def outbound(self, msg: Message, party: Any) -> Message:
        for name in self._fields:
            if name in msg.payload and msg.receiver == AGGREGATOR:
                try:
                    sealed = self._keys.seal(msg.tensor(name), field=name)
                except ValueError as exc:  # non-finite or out of the CKKS range: withheld, not crashed on
                    raise Rejected(party.id, f"field {name!r} cannot be sealed: {str(exc):.300}") from None
                msg = sealed.attach(msg, name)
        return msg

    def inbound(self, msg: Message, party: Any) -> Message:
        try:
            return open_sealed_fields(msg, self._keys)
        except (CiphertextError, KeyError, ValueError) as exc:
            raise Rejected(msg.sender, f"cannot open a sealed field: {str(exc):.300}") from None

    def start_round(self, rnd: int, sampled: Sequence[str]) -> None:
        self._aggregator.forget_parsed()

    def server_inbound(self, msg: Message) -> Message:
        """Every chunk of every sealed uplink field must load under the committee's public key.

        The loaded vectors go to the aggregator, which would otherwise deserialize them again.
        """
        for name in self._fields:
            sealed = _sealed_field(msg, name, "ckks")
            if sealed is None:
                continue
            try:
                vector = EncryptedVector.from_wire(self.public_context, sealed.chunks, sealed.length, sealed.shape)
            except CiphertextError as exc:
                raise Rejected(msg.sender, f"field {name!r}: {exc}") from None
            self._aggregator.hand_over(msg.sender, name, sealed, vector)
        return msg

    def wrap_aggregator(self, aggregator: Any, rnd: int) -> Any:
        return self._aggregator


class MaskingLayer(Layer):
    name = "masking"

    def __init__(self, *, run_id: str, threshold_fraction: float) -> None:
        self.run_id = run_id
        self.threshold_fraction = threshold_fraction
        self._sim: SecAggSimulation | None = None
        self._fields: list[str] = []

    def check(self, protocol: Any, parties: Sequence[Any]) -> None:
        _refuse_unsupported(protocol, "masking")
        self._fields = aggregatable_fields(protocol)

    def start_round(self, rnd: int, sampled: Sequence[str]) -> None:
        n = len(sampled)
        # SecAgg needs a strict majority threshold (t > n/2) for its dropout-robustness argument.
        threshold = min(n, max(n // 2 + 1, int(round(self.threshold_fraction * n))))
        session = MaskingSession(run_id=self.run_id, round=rnd, participant_ids=list(sampled), threshold=threshold)
        self._sim = SecAggSimulation.setup(session)

    def outbound(self, msg: Message, party: Any) -> Message:
        if msg.receiver != AGGREGATOR or self._sim is None:
            return msg
        client = self._sim.clients[party.id]
        weight = msg.meta.get("aggregation_weight")
        for name in self._fields:
            if name in msg.payload:
                try:
                    sealed: SealedTensor = client.mask_input(msg.tensor(name), field=name, weight=weight)
                except ValueError as exc:  # outside the fixed-point ring: withheld, not crashed on
                    raise Rejected(party.id, f"field {name!r} cannot be masked: {str(exc):.300}") from None
                msg = sealed.attach(msg, name)
        return msg

    def server_inbound(self, msg: Message) -> Message:
        """A masked field must come from a key-sharing participant, in this session's ring, whole."""
        if self._sim is None:
            return msg
        encoding = self._sim.session.encoding
        for name in self._fields:
            sealed = _sealed_field(msg, name, "secagg")
            if sealed is None:
                continue
            if msg.sender not in self._sim.aggregator.mask_peers:
                raise Rejected(msg.sender, f"field {name!r}: {msg.sender!r:.80} did not share keys in this round")
            ring = (sealed.params.get("ring_bits"), sealed.params.get("fractional_bits"))
            if ring != (encoding.ring_bits, encoding.fractional_bits):
                raise Rejected(msg.sender, f"field {name!r}: encoded with ring {ring!r:.80}, the session uses "
                                           f"{(encoding.ring_bits, encoding.fractional_bits)}")
            want = sealed.length * encoding.dtype.itemsize
            got = [len(c) for c in sealed.chunks]
            if got != [want]:
                raise Rejected(msg.sender, f"field {name!r}: expected one chunk of {want} bytes, got chunks of "
                                           f"{got[:8]} bytes (truncated or padded)")
            weight = sealed.params.get("weight")
            if weight is not None and not (isinstance(weight, int | float) and math.isfinite(weight) and weight >= 0):
                raise Rejected(msg.sender, f"field {name!r}: declared weight {weight!r:.40} is not finite and >= 0")
        return msg

    def wrap_aggregator(self, aggregator: Any, rnd: int) -> Any:
        assert self._sim is not None, "start_round was not called"
        return self._sim.aggregator

    def drop(self, *participant_ids: str) -> None:
        """Participants that shared keys but will not answer the unmasking request."""
        if self._sim is not None:
            self._sim.drop(*participant_ids)
