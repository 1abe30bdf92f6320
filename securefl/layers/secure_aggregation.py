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

Minimum cohort (:mod:`securefl.privacy.cohort`). Every participant knows ``n``
(participants sampled per round) and ``t`` from the config it accepted, not
from the coordinator's list of who was sampled, and refuses a round whose list
names more than ``n`` or fewer than ``t``. Under CKKS every aggregate carries
its contributors (``params["contributors"]`` of the sealed value, inside the
coordinator's signed message) and a participant opens none that names fewer
than ``t``: it holds against an honest-but-curious coordinator or a bug (e.g. a
catch-up log), not against a coordinator that forges the list, since all
owners share one key and TenSEAL has no threshold decryption. Under masking
``t`` is the Shamir threshold: a participant reveals no unmasking share for
fewer than ``t`` survivors, so no aggregate of fewer can be unmasked at all.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from cryptography.exceptions import InvalidSignature

from securefl.core.message import AGGREGATOR, Message
from securefl.core.sealed import SealedTensor, open_sealed_fields
from securefl.crypto.ckks.context import KeyHolderContext, PublicContext
from securefl.crypto.ckks.params import CkksParams
from securefl.crypto.ckks.vector import EncryptedVector
from securefl.crypto.errors import CiphertextError
from securefl.crypto.keystore import write_private_file
from securefl.crypto.masking import (
    KIND_ADVERTISE,
    KIND_ROSTER,
    KIND_SHARE_INBOX,
    KIND_UNMASK_REQUEST,
    MaskingClient,
    MaskingSession,
)
from securefl.crypto.signing import SIGNATURE_META_KEY, canonical_bytes
from securefl.layers.base import Layer, LayerSetupError, Rejected, aggregatable_fields
from securefl.layers.ckks_aggregator import CkksAggregator
from securefl.layers.masking_aggregator import MaskingAggregator, SecAggSimulation
from securefl.privacy.cohort import UNPLANNED, Cohort, min_cohort


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

    def __init__(self, params: CkksParams, *, key_dir: Path | None = None, cohort: Cohort | None = None) -> None:
        """A simulation's layer: the committee's keys (participant side) and the aggregator (server side).

        ``cohort``: the run's (from the config); without one, only aggregates of fewer than two are refused."""
        committee_file = key_dir / self.COMMITTEE_FILE if key_dir is not None else None
        if committee_file is not None and committee_file.exists():
            # A resumed run keeps the committee's key: sealed state may outlive a round.
            keys = _load_committee(committee_file)
        else:
            keys = KeyHolderContext.generate(params)
            if committee_file is not None:
                write_private_file(committee_file, keys.export_secret_for_committee())
        self._keys: KeyHolderContext | None = keys
        self.cohort = cohort
        self._set_public(keys.public())

    def _set_public(self, public: PublicContext) -> None:
        self.public_context = public
        self._aggregator = CkksAggregator(public)
        self._fields: list[str] = []

    @classmethod
    def for_participant(cls, key_dir: Path, *, cohort: Cohort | None = None) -> CkksLayer:
        """A deployed participant's layer: the committee secret its data owner was provisioned with, and the
        cohort of the config it accepted."""
        keys = _load_committee(_provisioned(Path(key_dir) / cls.COMMITTEE_FILE, "CKKS committee key; every "
                                            "participant of a CKKS run must hold the same one"))
        layer = cls._deployed(keys, keys.public())
        layer.cohort = cohort
        return layer

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
        layer.cohort = None
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
                    sealed = self._key_holder().seal(msg.tensor(name), field=name)
                except ValueError as exc:  # non-finite or out of the CKKS range: withheld, not crashed on
                    raise Rejected(party.id, f"field {name!r} cannot be sealed: {str(exc):.300}") from None
                msg = sealed.attach(msg, name)
        return msg

    def inbound(self, msg: Message, party: Any) -> Message:
        try:
            return open_sealed_fields(msg, _CohortOpener(self._key_holder(), self.cohort or UNPLANNED))
        except (CiphertextError, KeyError, ValueError) as exc:
            raise Rejected(msg.sender, f"cannot open a sealed field: {str(exc):.300}") from None

    def _key_holder(self) -> KeyHolderContext:
        if self._keys is None:
            raise LayerSetupError("this CKKS layer is a coordinator's: it holds no committee key to seal or open with")
        return self._keys

    def start_round(self, rnd: int, sampled: Sequence[str]) -> None:
        if self._keys is not None and self.cohort is not None:
            # A participant's check of the coordinator's list (ValueError: the node refuses the request).
            self.cohort.check_sampled(sampled)
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


class _CohortOpener:
    """Opens a CKKS value only if it is an aggregate that names at least the cohort's ``t`` contributors.

    An individual upload carries no contributor list, so a coordinator that forwards one owner's ciphertext
    to another (or a log that holds a one-contributor "sum") is refused here, before anything is decrypted.
    """

    def __init__(self, keys: KeyHolderContext, cohort: Cohort) -> None:
        self._keys, self._cohort = keys, cohort

    def open(self, sealed: SealedTensor) -> torch.Tensor:
        contributors = self._cohort.check_contributors(sealed.params.get("contributors"), what="the CKKS aggregate")
        if sealed.params.get("n", len(contributors)) != len(contributors):
            raise ValueError(f"the CKKS aggregate says it sums n = {sealed.params.get('n')!r:.20} replies but names "
                             f"{len(contributors)} contributors; refusing to open it")
        return self._keys.open(sealed)


def _masking_session(run_id: str, rnd: int, sampled: Sequence[str], threshold_fraction: float,
                     per_round: int | None = None) -> MaskingSession:
    """The round's session. With ``per_round`` (n from the config) the list is checked and t comes from n;
    without it (the coordinator's own list, on the coordinator), from the list."""
    if per_round is None:
        threshold = min_cohort(len(sampled), fraction=threshold_fraction)
    else:
        cohort = Cohort.plan(per_round=per_round, fraction=threshold_fraction)
        cohort.check_sampled(sampled)
        threshold = cohort.minimum
    return MaskingSession(run_id=run_id, round=rnd, participant_ids=list(sampled), threshold=threshold)


def _mask_fields(msg: Message, client: MaskingClient, fields: Sequence[str], party_id: str) -> Message:
    """Replace each aggregatable field of an uplink by its masked value (pre-weighted when the message says)."""
    weight = msg.meta.get("aggregation_weight")
    for name in fields:
        if name in msg.payload:
            try:
                sealed: SealedTensor = client.mask_input(msg.tensor(name), field=name, weight=weight)
            except ValueError as exc:  # outside the fixed-point ring: withheld, not crashed on
                raise Rejected(party_id, f"field {name!r} cannot be masked: {str(exc):.300}") from None
            msg = sealed.attach(msg, name)
    return msg


class _MaskingServer(Layer):
    """The server's half of masking: it checks masked uplinks and aggregates them with this round's session."""

    name = "masking"

    def __init__(self, *, run_id: str, threshold_fraction: float, per_round: int | None = None) -> None:
        """``per_round``: n, the participants the config samples a round (t comes from it, and a round's list
        is checked against it); None: from each round's list."""
        self.run_id = run_id
        self.threshold_fraction = threshold_fraction
        self.per_round = per_round
        self._session: MaskingSession | None = None
        self._aggregator: MaskingAggregator | None = None
        self._fields: list[str] = []

    def check(self, protocol: Any, parties: Sequence[Any]) -> None:
        _refuse_unsupported(protocol, "masking")
        self._fields = aggregatable_fields(protocol)

    def server_inbound(self, msg: Message) -> Message:
        """A masked field must come from a key-sharing participant, in this session's ring, whole."""
        if self._aggregator is None or self._session is None:
            return msg
        encoding = self._session.encoding
        for name in self._fields:
            sealed = _sealed_field(msg, name, "secagg")
            if sealed is None:
                continue
            if msg.sender not in self._aggregator.mask_peers:
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
        assert self._aggregator is not None, "start_round was not called"
        return self._aggregator


class MaskingLayer(_MaskingServer):
    """A simulation's masking: every participant's client and the server in one process."""

    def __init__(self, *, run_id: str, threshold_fraction: float, per_round: int | None = None) -> None:
        super().__init__(run_id=run_id, threshold_fraction=threshold_fraction, per_round=per_round)
        self._sim: SecAggSimulation | None = None

    def start_round(self, rnd: int, sampled: Sequence[str]) -> None:
        self._sim = SecAggSimulation.setup(_masking_session(self.run_id, rnd, sampled, self.threshold_fraction,
                                                            self.per_round))
        self._session, self._aggregator = self._sim.session, self._sim.aggregator

    def outbound(self, msg: Message, party: Any) -> Message:
        if msg.receiver != AGGREGATOR or self._sim is None:
            return msg
        return _mask_fields(msg, self._sim.clients[party.id], self._fields, party.id)

    def drop(self, *participant_ids: str) -> None:
        """Participants that shared keys but will not answer the unmasking request."""
        if self._sim is not None:
            self._sim.drop(*participant_ids)


# The coordinator's request that opens a node's session (SecAgg round 0), and the node's word that it holds
# its peers' shares (end of round 1). The other messages are :mod:`securefl.crypto.masking`'s own.
KIND_INVITE = "secagg/invite"
KIND_READY = "secagg/ready"


def _signature_of(advert: Message) -> bytes:
    """The advertiser's signature on its keys (empty when signing is off); ValueError if it is not hex."""
    raw = advert.meta.get(SIGNATURE_META_KEY, "")
    if not isinstance(raw, str):
        raise ValueError(f"advertisement from {advert.sender!r}: its signature is not a hex string")
    return bytes.fromhex(raw)


def _check_key_signature(public_keys: Mapping[str, Any], pid: str, *, run_id: str, rnd: int, c_pk: Any, s_pk: Any,
                         signature: Any) -> None:
    """``pid``'s signature on the SecAgg keys it advertised (ValueError if it does not verify)."""
    advert = Message(sender=pid, receiver=AGGREGATOR, run_id=run_id, round=rnd, kind=KIND_ADVERTISE,
                     payload={"c_pk": c_pk, "s_pk": s_pk})
    try:
        public_keys[pid].verify(bytes(signature), canonical_bytes(advert))
    except (KeyError, InvalidSignature, TypeError, ValueError):
        raise ValueError(f"the SecAgg keys advertised for {pid!r} are not signed by {pid!r}") from None


class MaskingCoordinatorLayer(_MaskingServer):
    """A deployed coordinator's masking: each round it runs SecAgg's key agreement with the sampled nodes
    (rounds 0-1), then aggregates their masked inputs and asks the survivors for the shares that remove
    the masks (round 4). It relays the participants' encrypted shares and never holds a secret of theirs.

    The conversation goes through ``participants.ask(round, sampled, {participant: request})``, which
    returns the answers that came back; a node that fails a phase is left out of the session from then on
    (recovered as a dropout), and ``participants.reject(participant, reason)`` logs why.

    With ``public_keys`` (the nodes' provisioned signing keys; signing on), an advertisement whose signature
    does not verify is left out like any malformed answer. Otherwise it would reach the roster, every honest
    node would refuse that roster, and one bad node could abort every round's key agreement.
    """

    def __init__(self, *, run_id: str, threshold_fraction: float, public_keys: Mapping[str, Any] | None = None,
                 per_round: int | None = None) -> None:
        super().__init__(run_id=run_id, threshold_fraction=threshold_fraction, per_round=per_round)
        self._participants: Any = None
        self.public_keys = None if public_keys is None else dict(public_keys)

    def connect(self, participants: Any) -> None:
        self._participants = participants

    def start_round(self, rnd: int, sampled: Sequence[str]) -> None:
        if self._participants is None:
            raise LayerSetupError("secure_aggregation = 'masking' on a coordinator needs the channel to the nodes")
        ask = self._participants.ask
        session = _masking_session(self.run_id, rnd, sampled, self.threshold_fraction, self.per_round)
        aggregator = MaskingAggregator(session, unmask_batch=lambda requests: self._unmask(rnd, sampled, requests))
        invites = {pid: session.message(sender=AGGREGATOR, receiver=pid, kind=KIND_INVITE, payload={})
                   for pid in session.participant_ids}
        adverts = self._well_formed(ask(rnd, sampled, invites), lambda msg: self._check_advert(aggregator, msg))
        roster = aggregator.collect_advertisements(list(adverts.values()))  # SecAggAbort below the threshold
        # Each node's signature on its own keys rides along, so every node can check that the roster's keys
        # are its peers' and not the coordinator's (a man in the middle); unsigned where signing is off.
        ids = [raw.decode() for raw in roster.payload["ids"]]
        roster = roster.model_copy(update={"payload": {**roster.payload, "signatures": [
            _signature_of(adverts[pid]) for pid in ids]}})
        shares = self._well_formed(ask(rnd, sampled, dict.fromkeys(adverts, roster)), aggregator.check_share_message)
        inboxes = aggregator.route_shares(list(shares.values()))
        # A node that cannot take its shares sends no masked input: the survivors' shares recover it.
        self._well_formed(ask(rnd, sampled, inboxes), lambda msg: session.check_message(msg, KIND_READY))
        self._session, self._aggregator = session, aggregator

    def _check_advert(self, aggregator: MaskingAggregator, advert: Message) -> None:
        aggregator.check_advertisement(advert)
        signature = _signature_of(advert)
        if self.public_keys is not None:
            _check_key_signature(self.public_keys, advert.sender, run_id=advert.run_id, rnd=advert.round,
                                 c_pk=advert.payload["c_pk"], s_pk=advert.payload["s_pk"], signature=signature)

    def _unmask(self, rnd: int, sampled: Sequence[str], requests: Sequence[Message]) -> dict[str, Message]:
        assert self._aggregator is not None
        answers = self._participants.ask(rnd, sampled, {r.receiver: r for r in requests})
        failures = self._aggregator.unmask_failures
        for reason in failures:
            self._participants.reject(AGGREGATOR, f"unmasking: {reason}")
        failures.clear()
        return answers

    def _well_formed(self, answers: dict[str, Message], check: Any) -> dict[str, Message]:
        kept = {}
        for pid, msg in answers.items():
            try:
                check(msg)
            except (ValueError, TypeError) as exc:
                self._participants.reject(pid, f"secure aggregation set-up: {str(exc):.300}")
                continue
            kept[pid] = msg
        return kept


class MaskingNodeLayer(Layer):
    """A data owner's node under masking: it answers the coordinator's SecAgg requests and masks its uplinks.

    The client of each round's session is kept between phases in ``key_dir/secagg/`` (a node may run every
    phase in a fresh process), in a file only the owner can read, and deleted when the next round starts:
    its secrets are single-use. Keeping it is what makes the client's promises hold across processes: it
    answers one survivor set only, and never masks a field twice with the same keys.
    """

    name = "masking"
    STATE_DIR = "secagg"

    def __init__(self, *, run_id: str, threshold_fraction: float, per_round: int, participant_id: str,
                 key_dir: Path, signing_key: Any = None, public_keys: Mapping[str, Any] | None = None) -> None:
        """``per_round``: n, the participants the accepted config samples a round; t comes from it, never from
        the coordinator's list, and a list of more than n or fewer than t is refused.

        ``signing_key`` (this participant's :class:`~securefl.crypto.signing.PartyKeys`) and
        ``public_keys`` (everyone's, from the provisioned roster): sign this node's SecAgg keys, and refuse a
        roster whose keys its peers did not sign. Both or neither."""
        if (signing_key is None) != (public_keys is None):
            raise LayerSetupError("MaskingNodeLayer needs both signing_key and public_keys, or neither")
        self.run_id = run_id
        self.threshold_fraction = threshold_fraction
        self.per_round = per_round
        self.participant_id = participant_id
        self.state_dir = Path(key_dir) / self.STATE_DIR
        self.signing_key = signing_key
        self.public_keys = dict(public_keys or {})
        self._session: MaskingSession | None = None
        self._fields: list[str] = []

    @classmethod
    def for_node(cls, config: Any, *, run_id: str, participant_id: str, key_dir: Path) -> MaskingNodeLayer:
        """The layer a node builds from its config and provisioned keys."""
        keys: dict[str, Any] = {}
        if config.signing:
            from securefl.crypto.keystore import load_or_create_party_keys, load_roster

            # Sign with the node's own provisioned key (never create one here: the roster would not know it).
            _provisioned(Path(key_dir) / f"{participant_id}.ed25519", f"signing key of {participant_id!r}")
            keys = {"signing_key": load_or_create_party_keys(key_dir, participant_id),
                    "public_keys": load_roster(key_dir, [p.id for p in config.participants])}
        return cls(run_id=run_id, threshold_fraction=config.cohort_fraction(), per_round=config.cohort().per_round,
                   participant_id=participant_id, key_dir=key_dir, **keys)

    def check(self, protocol: Any, parties: Sequence[Any]) -> None:
        _refuse_unsupported(protocol, "masking")
        self._fields = aggregatable_fields(protocol)

    def start_round(self, rnd: int, sampled: Sequence[str]) -> None:
        self._session = None
        # Checked whether or not this node was sampled: a list the config cannot produce is a lying coordinator.
        session = _masking_session(self.run_id, rnd, sampled, self.threshold_fraction, self.per_round)
        if self.participant_id in sampled:
            self._session = session
        for old in self.state_dir.glob(f"{self.participant_id}.round*.state"):
            if old != self._state_file(rnd):
                old.unlink()

    def answer(self, request: Message) -> Message:
        """One SecAgg request from the coordinator -> this node's answer (ValueError if it refuses)."""
        session = self._current(request.kind)
        if request.kind == KIND_INVITE:
            client = MaskingClient(session, self.participant_id)  # fresh secrets for every session
            reply = client.advertise_keys()
            if self.signing_key is not None:
                reply = self.signing_key.sign(reply)
        else:
            client = self._load(session)
            if request.kind == KIND_ROSTER:
                self._check_roster_signatures(request)
                reply = client.share_keys(request)
            elif request.kind == KIND_SHARE_INBOX:
                client.receive_shares(request)
                reply = session.message(sender=self.participant_id, receiver=AGGREGATOR, kind=KIND_READY, payload={})
            elif request.kind == KIND_UNMASK_REQUEST:
                reply = client.unmask(request)
            else:
                raise ValueError(f"masking does not answer a {request.kind!r} request")
        self._save(session, client)
        return reply

    def outbound(self, msg: Message, party: Any) -> Message:
        if msg.receiver != AGGREGATOR or not any(name in msg.payload for name in self._fields):
            return msg
        session = self._current("masked input")
        client = self._load(session)
        msg = _mask_fields(msg, client, self._fields, party.id)
        self._save(session, client)
        return msg

    def _check_roster_signatures(self, roster: Message) -> None:
        """Every peer's keys in the roster must carry that peer's signature, as it advertised them."""
        if self.signing_key is None:
            return
        ids, c_pks, s_pks, signatures = (roster.payload.get(k) for k in ("ids", "c_pks", "s_pks", "signatures"))
        if not (isinstance(ids, list) and isinstance(c_pks, list) and isinstance(s_pks, list)
                and isinstance(signatures, list) and len(ids) == len(c_pks) == len(s_pks) == len(signatures)):
            raise ValueError("the roster carries no signature for every participant's keys; refusing to share")
        for raw_id, c_pk, s_pk, signature in zip(ids, c_pks, s_pks, signatures, strict=True):
            pid = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
            try:
                _check_key_signature(self.public_keys, pid, run_id=roster.run_id, rnd=roster.round, c_pk=c_pk,
                                     s_pk=s_pk, signature=signature)
            except ValueError:
                raise ValueError(f"the roster's keys for {pid!r} are not signed by {pid!r}: the coordinator may "
                                 "have substituted them (a man in the middle); refusing to share keys") from None

    def _current(self, what: str) -> MaskingSession:
        if self._session is None:
            raise ValueError(f"{self.participant_id!r} is in no secure-aggregation session this round ({what})")
        return self._session

    def _state_file(self, rnd: int) -> Path:
        return self.state_dir / f"{self.participant_id}.round{rnd}.state"

    def _load(self, session: MaskingSession) -> MaskingClient:
        path = self._state_file(session.round)
        if not path.exists():
            raise ValueError(f"{self.participant_id!r} holds no SecAgg keys for round {session.round} (it was not "
                             "invited to this round's key agreement, or lost them)")
        return MaskingClient.from_state(session, self.participant_id, path.read_bytes())

    def _save(self, session: MaskingSession, client: MaskingClient) -> None:
        write_private_file(self._state_file(session.round), client.export_state(), atomic=True)
