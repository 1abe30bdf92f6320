"""What every protocol is: pure role methods and a declared wire schema.

A round, as the runtime drives it::

    downlink = protocol.open_round(r, sampled)        # server -> sampled clients (optional)
    reply    = protocol.client_step(party, inbox, r)  # each sampled client -> server
    result   = protocol.server_step(r, replies, aggregator)
    protocol.client_update(party, inbox, r)           # clients apply the server's result

Protocols never import opacus, tenseal, cryptography or a transport. Private
training goes through ``party.trainer``; aggregation goes through the
``aggregator`` handed to ``server_step``. Privacy and encryption are layers the
runtime composes around these calls, so no protocol contains an ``if privacy``.

Global state held by the participants. Under CKKS the server cannot decrypt
an aggregate, so a protocol with a global state that evolves from aggregates
(HeteroFL's global model, FedGen's generator) does not keep it on the server.
The server sums through its aggregator and broadcasts the result exactly as
the aggregator returned it (a tensor, or a sealed value the participants'
inbound layer opens), with the public facts needed to apply it; every
participant applies it to its own :class:`Replica`. Applying is deterministic,
so all replicas are identical. A participant that sat out some rounds
receives the updates it missed, in order, before it trains again
(:class:`UpdateLog`). An update that sets the whole state regardless of what
the replica held (a protocol's ``supersedes`` says which, from public facts
only) makes every earlier one unnecessary: the log drops them, and a replica
behind it applies it over the gap. The same code runs in plaintext, under
masking and under CKKS.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from torch import nn

from securefl.core.aggregator import Aggregator
from securefl.core.message import AGGREGATOR, BROADCAST, Message
from securefl.core.party import FederationContext, Party
from securefl.core.training import accuracy, fit_with_early_stopping, predict_logits


class ProtocolSetupError(ValueError):
    """A protocol cannot run with this set-up; raised before round 1 with the reason."""


class ProtocolConfig(BaseModel):
    """Base of every per-protocol config section."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class Field:
    """One payload field a protocol releases.

    ``aggregatable`` fields are only ever combined by sums/means, so a secure
    aggregator may replace them by ciphertexts or masked vectors. ``private``
    fields are derived from private data and are what a privacy layer protects.
    """

    aggregatable: bool = False
    private: bool = True
    description: str = ""


class Schema:
    """The declared payload fields of one message kind."""

    def __init__(self, kind: str, **fields: Field) -> None:
        self.kind = kind
        self.fields = dict(fields)

    def __repr__(self) -> str:
        return f"Schema({self.kind!r}, {', '.join(self.fields)})"

    def check(self, msg: Message) -> None:
        if msg.kind != self.kind:
            raise ValueError(f"expected a {self.kind!r} message, got {msg.kind!r}")
        unknown = set(msg.payload) - set(self.fields)
        missing = set(self.fields) - set(msg.payload)
        if unknown or missing:
            raise ValueError(
                f"{self.kind!r} message from {msg.sender!r}: payload fields {sorted(msg.payload)} do not match "
                f"the declared schema {sorted(self.fields)}"
            )


# What a server (or relay) sends down: one message for every sampled client, a message per
# client, or several per client (a relay forwarding each neighbour's message unchanged).
Downlink = Message | dict[str, Message | list[Message]] | None


class Protocol(ABC):
    """Base class. Subclasses set the class attributes and implement the role methods."""

    name: ClassVar[str]
    summary: ClassVar[str]
    paper: ClassVar[str] = ""
    Config: ClassVar[type[ProtocolConfig]] = ProtocolConfig
    # What clients send up, and what the server (or relay) sends down.
    uplink: ClassVar[Schema | None] = None
    downlink: ClassVar[Schema | None] = None
    # True when server_step computes on the aggregate itself (e.g. keeps a global model):
    # fine under masking (the server learns the sum by design), refused under CKKS.
    server_opens_aggregates: ClassVar[bool] = False
    # Why the protocol cannot run with each participant on its own node (None: it can).
    simulation_only: ClassVar[str | None] = None

    def __init__(self, config: ProtocolConfig, ctx: FederationContext) -> None:
        self.config = config
        self.ctx = ctx

    # ----- checks before round 1 -------------------------------------------------------
    def private_histogram_releases(self, party: Party) -> int:
        """How many label histograms of its private data a participant releases (FedGen: one). Under
        record-level DP each is a Gaussian release at sensitivity 1, planned into its budget."""
        return 0

    def validate_participants(self, parties: Sequence[Party]) -> None:
        """Refuse an impossible set-up before any training (e.g. FedAvg with mixed models)."""

    # ----- lifecycle -------------------------------------------------------------------
    def setup_server(self, parties: Sequence[Party]) -> None:
        """Build the server's own state (e.g. FedAvg's global model). Runs only where the aggregator
        runs, never on a participant's node, so server state must not be built in ``setup_party``."""

    @abstractmethod
    def setup_party(self, party: Party) -> None:
        """Build the party's model(s) and optimizers. Runs on start and on resume."""

    def prepare_party(self, party: Party) -> None:
        """One-off work before round 1 (e.g. FedMD's transfer learning). Not re-run on resume."""

    # ----- the warm start (training.warm_start) ----------------------------------------------
    #: True when the protocol's own step 0 already fits each owner's model alone (FedMD's transfer learning).
    has_own_warm_start: ClassVar[bool] = False

    def warm_start_refusal(self) -> str | None:
        """Why ``training.warm_start`` cannot apply to this configuration (None: it can), e.g. every round
        starts from a global model that would overwrite the warm-started one."""
        return None

    def warm_starts(self) -> bool:
        """Whether the runtime fits each owner's model alone before round 1 (:meth:`warm_start`)."""
        return self.ctx.training.warm_start and not self.has_own_warm_start

    def warm_start(self, party: Party) -> None:
        """Fit ``party.model`` alone on the owner's private data, early-stopped on its validation split: the
        same first fit the local-only baseline gets, so every protocol starts round 1 where training alone
        would have stopped. The optimizer is the ``training`` section's, used once and dropped."""
        t, model = self.ctx.training, party.model
        assert model is not None
        optimizer = self.ctx.make_optimizer(model, lr=party.lr)
        fit_with_early_stopping(
            lambda: party.trainer.fit(model, optimizer, party.train.x, party.train.y, batch_size=t.batch_size,
                                      epochs=1, max_grad_norm=t.max_grad_norm, payload="warm_start"),
            model, party.trainer.validation(lambda: val_score(party, self.ctx.eval_classes)),
            max_epochs=t.warm_start_max_epochs, patience=t.warm_start_patience)

    def warm_start_plan(self, party: Party) -> list[tuple[int, int | None, int | None]]:
        """The warm start's private training, for the DP plan (empty when there is none)."""
        t = self.ctx.training
        return [(t.batch_size, t.warm_start_max_epochs, None)] if self.warm_starts() else []

    # ----- one round -------------------------------------------------------------------
    def open_round(self, rnd: int, sampled: Sequence[str]) -> Downlink:
        """Server to sampled clients at the start of a round (e.g. the global model)."""
        return None

    @abstractmethod
    def client_step(self, party: Party, inbox: Sequence[Message], rnd: int) -> Message | list[Message] | None:
        """Local work; returns the uplink message(s), or None when nothing is shared.

        Messages addressed to the aggregator are aggregated in ``server_step``;
        messages addressed to a peer id are delivered to that peer's inbox
        (decentralised protocols), read in ``client_update``.
        """

    def server_step(self, rnd: int, replies: Sequence[Message], aggregator: Aggregator) -> Downlink:
        """Combine the replies through ``aggregator`` only; returns what goes back down."""
        return None

    def client_update(self, party: Party, inbox: Sequence[Message], rnd: int) -> None:
        """Apply what the server sent back (e.g. FedMD's digest and revisit)."""

    def expected_uplink_shape(self, kind: str, field: str, sender: str, rnd: int) -> tuple[int, ...] | None:
        """The shape the server expects for uplink ``field`` of ``kind`` from ``sender`` in round ``rnd``.

        ``None`` (the default) declares no shape. A protocol that knows it (FedMD's logits on the
        round's alignment set) returns it, and the validation layer rejects any other shape before it
        reaches the aggregator.
        """
        return None

    # ----- privacy planning ------------------------------------------------------------
    def private_training_plan(self, party: Party) -> list[tuple[int, int | None, int | None]]:
        """Every training call on private data the run will make: (batch size, epochs, steps).

        Record-level DP calibrates each participant's noise from this plan before
        round 1; if a run ends up training more, the ledger refuses the excess.
        """
        t = self.ctx.training
        return [(t.batch_size, self.ctx.rounds * t.local_epochs, None)]

    # ----- evaluation ------------------------------------------------------------------
    #: Metrics that read the owner's private data beyond its model (e.g. its label shares). Their values are
    #: not covered by any DP guarantee, so the runtime reports them only from runs without DP.
    owner_only_metrics: ClassVar[frozenset[str]] = frozenset()

    def evaluate(self, party: Party) -> dict[str, float]:
        """Test metrics of one participant. ``accuracy`` is the headline number."""
        assert party.model is not None
        return {"accuracy": accuracy(party.model, self.ctx.test_x, self.ctx.test_y, classes=self.ctx.eval_classes)}

    def secure_aggregation_refusal(self) -> str | None:
        """Why this configuration cannot run under secure aggregation, CKKS or masking (None: it can).

        For what the schema cannot declare, e.g. an exchange that bypasses the
        participants' layers. Secure-aggregation layers raise it before round 1.
        """
        return None

    # ----- what leaves a participant besides the declared payload fields ----------------------
    # Declarations only: the privacy set-up (``securefl.layers.privacy.refuse_unsafe_releases``) reads them
    # and refuses, before round 1, a combination that would release private data outside the ledger.
    def uplink_metadata(self) -> dict[str, Field]:
        """The metadata keys this configuration puts on its uplink, each as a :class:`Field`.

        ``private=True`` marks a key derived from private data (a record count, the classes present). Its
        description says what it reveals and which setting sends none: no DP layer noises metadata, so under
        any DP unit a private key is refused before round 1.
        """
        return {}

    def weighted_aggregation(self) -> str | None:
        """The per-contributor weights the server combines uplinks with, and which setting drops them (None:
        unweighted sums and means only).

        A weighted sum scales each contributor's noise share by its weight, so the heaviest one carries less
        than its booked share of distributed noise: distributed noise is for unweighted sums only.
        """
        return None

    def peer_to_peer(self) -> str | None:
        """What goes to peers one message at a time, each seen on its own, and which setting sends it through
        the aggregator instead (None: everything goes to the aggregator)."""
        return None

    def releases_outside_layers(self) -> str | None:
        """What this configuration releases that does not pass the participants' layers, so no DP layer
        clips, noises or books it (None: everything goes through them)."""
        return None

    def record_coupling(self) -> str | None:
        """How one record's presence changes the training on the other records of its participant (None: each
        record's loss depends on that record and public facts only). Coupled records void DP-SGD's
        per-record clipping bound."""
        return None

    def run_notes(self) -> dict[str, str]:
        """Facts the run report must state (e.g. FedH2L's seed-set privacy assumption)."""
        return {}

    def evaluate_server(self) -> dict[str, float]:
        """Metrics of server-side models (e.g. a global model); empty when there is none."""
        return {}

    # ----- checkpointing ---------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Server-side state to checkpoint."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def party_state(self, party: Party) -> dict[str, Any]:
        """A party's state to checkpoint: its model plus every stateful object in ``party.state``."""
        return {
            "model": party.model.state_dict() if party.model is not None else None,
            "state": {k: _state_of(v) for k, v in party.state.items()},
        }

    def load_party_state(self, party: Party, state: dict[str, Any]) -> None:
        if party.model is not None:
            party.model.load_state_dict(state["model"])
        for key, value in state["state"].items():
            current = party.state.get(key)
            if current is not None and hasattr(current, "load_state_dict"):
                current.load_state_dict(value)
            else:
                party.state[key] = value

    # ----- helpers for subclasses ------------------------------------------------------
    def reply(self, party: Party, rnd: int, **payload: Any) -> Message:
        assert self.uplink is not None, f"{self.name} declares no uplink"
        return _with_fields(Message(sender=party.id, receiver=AGGREGATOR, run_id=self.ctx.run_id, round=rnd,
                                    kind=self.uplink.kind), payload)

    def broadcast(self, rnd: int, **payload: Any) -> Message:
        """A message from the server to every sampled client.

        Values may be tensors or whatever the aggregator returned: under CKKS
        that is a sealed value the server cannot read, which the clients'
        inbound layer opens. The protocol forwards it without knowing.
        """
        assert self.downlink is not None, f"{self.name} declares no downlink"
        return _with_fields(Message(sender=AGGREGATOR, receiver=BROADCAST, run_id=self.ctx.run_id, round=rnd,
                                    kind=self.downlink.kind), payload)


# ----- global state held by the participants -------------------------------------------------
UPDATES_META = "updates"


@dataclass(frozen=True)
class GlobalUpdate:
    """What one aggregation changed in a global state that the participants hold.

    ``version`` numbers the updates 1, 2, ... (a round without replies makes
    none); ``round`` is the round that made it. ``fields`` are exactly what
    the aggregator returned (tensors, or sealed values the server cannot read)
    and any public tensors; ``meta`` are the public facts a participant needs
    to apply them (e.g. HeteroFL's contributors' rates and label splits,
    which give the per-element counts).
    """

    version: int
    round: int
    fields: dict[str, Any]
    meta: dict[str, Any]


class UpdateLog:
    """The server's record of the updates it broadcast, for participants that missed some.

    ``holds`` is the version the server has sent each participant; ``acked``
    the version each one last said (in its uplink, ``replica_version``) that
    its replica holds. An ack behind what was sent means a message was lost:
    the participant is sent everything after its ack again. The log keeps the
    updates some participant has not acknowledged, so under full participation
    it holds at most the latest one. While a participant sits out, its size
    grows by one update a round (sealed under CKKS), unless ``supersedes``
    says an update sets the whole state: then nothing before the latest such
    update is kept, since a replica at any version applies it directly.
    ``supersedes`` must decide from public facts (the update's meta and which
    fields it has), so the server, which cannot read a sealed field, and every
    participant reach the same answer.
    """

    def __init__(self, supersedes: Callable[[GlobalUpdate], bool] | None = None) -> None:
        self.updates: list[GlobalUpdate] = []
        self.holds: dict[str, int] = {}
        self.acked: dict[str, int] = {}
        self.version = 0
        self.supersedes = supersedes

    def register(self, party_id: str) -> None:
        self.holds.setdefault(party_id, 0)
        self.acked.setdefault(party_id, 0)

    def record(self, rnd: int, fields: dict[str, Any], meta: dict[str, Any] | None = None) -> GlobalUpdate:
        self.version += 1
        update = GlobalUpdate(self.version, rnd, dict(fields), dict(meta or {}))
        self.updates.append(update)
        return update

    def missed(self, party_id: str) -> list[GlobalUpdate]:
        """The updates ``party_id`` has not been sent yet, oldest first."""
        held = self.holds.get(party_id, 0)
        return [u for u in self.updates if u.version > held]

    def acknowledge(self, party_id: str, version: Any) -> None:
        """``party_id``'s uplink says its replica holds ``version`` (anything else than a version this log
        made is ignored: the ack only decides what to send again, never what is applied)."""
        if isinstance(version, bool) or not isinstance(version, int) or not 0 <= version <= self.version:
            return
        self.acked[party_id] = version
        if version < self.holds.get(party_id, 0):
            self.holds[party_id] = version  # an update it was sent never arrived: send again from there

    def delivered(self, party_ids: Sequence[str]) -> None:
        """``party_ids`` have been sent every recorded update."""
        for pid in party_ids:
            self.holds[pid] = self.version
        oldest = min(self.acked.values(), default=self.version)
        self.updates = [u for u in self.updates if u.version > oldest]
        if self.supersedes is not None:
            base = max((u.version for u in self.updates if self.supersedes(u)), default=0)
            self.updates = [u for u in self.updates if u.version >= base]

    def state_dict(self) -> dict[str, Any]:
        return {"updates": list(self.updates), "holds": dict(self.holds), "acked": dict(self.acked),
                "version": self.version}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.updates = list(state["updates"])
        self.holds = dict(state["holds"])
        self.acked = dict(state.get("acked", state["holds"]))  # a checkpoint from before acks
        self.version = int(state["version"])


def record_count_metadata(section: str, weighting: str) -> dict[str, Field]:
    """What a client sends beside its payload when ``<section>.weighting`` is ``samples``: its exact record count."""
    if weighting != "samples":
        return {}
    count = Field(private=True, description=f"the client's exact number of training records "
                                            f"({section}.weighting: uniform sends none)")
    return {"num_samples": count, "aggregation_weight": count}


def record_count_weighting(section: str, weighting: str) -> str | None:
    """What a ``samples``-weighted mean weights by (None when uniform)."""
    if weighting != "samples":
        return None
    return f"each client's record count ({section}.weighting = 'samples'; use {section}.weighting: uniform)"


def attach_updates(msg: Message, updates: Sequence[GlobalUpdate]) -> Message:
    """Put updates on a message: field ``name`` of update ``v`` travels as ``name@v``.

    Sealed fields stay sealed (the participant's inbound layer opens them);
    the public part travels in ``meta["updates"]``, which the signature covers.
    """
    payload = {f"{name}@{u.version}": value for u in updates for name, value in u.fields.items()}
    index = [{"version": u.version, "round": u.round, "fields": sorted(u.fields), "meta": u.meta} for u in updates]
    return _with_fields(msg, payload).with_meta(**{UPDATES_META: index})


def send_updates(template: Message, log: UpdateLog, receivers: Sequence[str]) -> Downlink:
    """The end of a round: ``template`` to each receiver with every update it has not been sent (this
    round's, and any it lost before), then the log notes them as sent."""
    out: dict[str, Message | list[Message]] = {
        pid: attach_updates(template.model_copy(update={"receiver": pid}), log.missed(pid)) for pid in receivers}
    log.delivered(receivers)
    return out


def read_updates(msg: Message) -> list[GlobalUpdate]:
    """The updates a message carries, as plaintext tensors (after the participant's inbound layers)."""
    return [GlobalUpdate(int(entry["version"]), int(entry["round"]),
                         {name: msg.tensor(f"{name}@{entry['version']}") for name in entry["fields"]},
                         dict(entry["meta"]))
            for entry in msg.meta.get(UPDATES_META, [])]


class Replica:
    """A participant's copy of a global state; ``version`` is the last update it applied, made in ``round``."""

    version: int = 0
    round: int = 0

    def catch_up(self, updates: Sequence[GlobalUpdate], apply: Callable[[Any, GlobalUpdate], None],
                 owner: str, supersedes: Callable[[GlobalUpdate], bool] | None = None) -> None:
        """Apply the updates not applied yet, in order, and never skip one that matters.

        After a gap (a lost downlink, or updates the log dropped) an update is applied only if
        ``supersedes`` says it sets the whole state: applying any other without the missing one would make
        this replica differ from everyone else's. Otherwise the replica stays where it is; its owner's next
        uplink says which version it holds (``replica_version``), and the server sends the rest again.
        """
        for update in sorted(updates, key=lambda u: u.version):
            if update.version <= self.version:
                continue  # already applied (the same update delivered twice)
            if update.version != self.version + 1 and not (supersedes is not None and supersedes(update)):
                continue  # a gap: a later update may still supersede everything missing
            apply(self, update)
            self.version, self.round = update.version, update.round


def freshest(replicas: Sequence[Replica]) -> Replica:
    """The first of the replicas holding the latest update (all such replicas are identical)."""
    if not replicas:
        raise RuntimeError("no participant holds a replica of the global state")
    latest = max(r.version for r in replicas)
    return next(r for r in replicas if r.version == latest)


def _with_fields(msg: Message, payload: dict[str, Any]) -> Message:
    tensors = {k: v for k, v in payload.items() if isinstance(v, torch.Tensor)}
    msg = msg.with_payload(**tensors)
    for name, value in payload.items():
        if not isinstance(value, torch.Tensor):
            # A sealed aggregate knows how to put itself on a message (duck-typed: protocols
            # never import the crypto package).
            msg = value.attach(msg, name)
    return msg


def only_message(inbox: Sequence[Message], kind: str) -> Message:
    """The single message of ``kind`` in an inbox; anything else is a protocol error."""
    matches = [m for m in inbox if m.kind == kind]
    if len(matches) != 1:
        raise RuntimeError(f"expected exactly one {kind!r} message in the inbox, found {len(matches)}")
    return matches[0]


def val_score(party: Party, classes: torch.Tensor | None) -> float:
    """Early-stopping score on the party's validation split (higher is better). Never the test set.

    Negative cross-entropy rather than accuracy: on the few dozen validation
    records of a small silo, accuracy plateaus for epochs while the loss still
    moves, and stopping on the plateau leaves models badly under-trained.
    """
    assert party.model is not None
    view = party.val if len(party.val) > 0 else party.train  # a tiny silo may have no validation split
    logits = predict_logits(party.model, view.x)
    if classes is not None:
        # Score only the evaluated classes' outputs (A2: private classes), like the accuracy does.
        remap = torch.full((int(classes.max()) + 1,), -1, dtype=torch.long)
        remap[classes] = torch.arange(len(classes))
        return -float(F.cross_entropy(logits[:, classes], remap[view.y]))
    return -float(F.cross_entropy(logits, view.y))


def _state_of(value: Any) -> Any:
    return value.state_dict() if hasattr(value, "state_dict") else value


def flat_parameters(model: nn.Module) -> torch.Tensor:
    """All parameters and float buffers as one vector (what FedAvg-style protocols send)."""
    parts = [t.detach().reshape(-1).float() for t in _float_state(model).values()]
    return torch.cat(parts) if parts else torch.empty(0)


def load_flat_parameters(model: nn.Module, flat: torch.Tensor) -> None:
    """Inverse of :func:`flat_parameters`. Integer buffers (e.g. counters) are never overwritten."""
    state = _float_state(model)
    expected = sum(t.numel() for t in state.values())
    if flat.numel() != expected:
        raise ValueError(f"flat parameter vector has {flat.numel()} values; the model needs {expected}")
    offset = 0
    with torch.no_grad():
        for tensor in state.values():
            n = tensor.numel()
            tensor.copy_(flat[offset:offset + n].view_as(tensor).to(tensor.dtype))
            offset += n


def _float_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict(keep_vars=True).items() if v.is_floating_point()}
