"""The data owners' side of a run: the participants hosted in this process.

A :class:`ParticipantHost` holds one or more participants with their private
data, models, participant-side layers and (with DP) their ledgers, and runs
their half of every round: open the inbox, ``client_step``, seal and send;
later ``client_update`` and ``evaluate``. The coordinator (``Federation``)
never touches a participant's data or keys directly; it only talks to hosts.

In a simulation one host holds every participant in the coordinator's process.
In a deployment (``securefl.deploy.flower``) every data owner's node runs its
own host for its one participant, in its own directory, under its own policy
file, and the coordinator reaches it over the network. The code path is the
same, so a deployment computes what the simulation computes.
"""

from __future__ import annotations

import contextlib
import typing
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from securefl.config import ExperimentConfig
from securefl.core.message import AGGREGATOR, Message
from securefl.core.party import FederationContext, Party
from securefl.core.seeding import derive_seed, seeded
from securefl.layers.base import Layer, Rejected
from securefl.privacy.cohort import participants_per_round
from securefl.protocols import Protocol
from securefl.runtime.privacy import PartyKeysFor, PrivacyRuntime


@dataclass
class HostReport:
    """What a host hands back to the coordinator after a phase: messages, rejections, stops."""

    outgoing: list[Message] = field(default_factory=list)
    rejected: list[dict[str, str]] = field(default_factory=list)
    stopped: dict[str, str] = field(default_factory=dict)


class Participants(typing.Protocol):
    """The participants' side as the coordinator sees it: a :class:`ParticipantHost` in this process (a
    simulation), or remote nodes (``securefl.deploy.remote.RemoteParticipants``); the round loop is the same."""

    def prepare(self) -> HostReport: ...

    def step(self, rnd: int, inboxes: Mapping[str, Sequence[Message]]) -> HostReport: ...

    def update(self, rnd: int, inboxes: Mapping[str, Sequence[Message]]) -> HostReport: ...

    def evaluate(self, rnd: int) -> dict[str, dict[str, float]]: ...

    def finish(self) -> dict[str, dict[str, Any]]: ...

    def close(self) -> None: ...


class RemoteHosts(Participants, typing.Protocol):
    """Participants on their own nodes: they first receive the run's config (and refuse it, or accept)."""

    def connect(self, *, run_id: str, config_text: str) -> None: ...


class ParticipantHost:
    """Runs the participant half of every round for the parties it hosts."""

    def __init__(self, *, config: ExperimentConfig, out: Path, ctx: FederationContext, protocol: Protocol,
                 parties: Sequence[Party], keys: PartyKeysFor, n_participants: int,
                 stopped: dict[str, str] | None = None) -> None:
        self.config = config
        self.out = Path(out)
        self.ctx = ctx
        self.protocol = protocol
        self.parties = list(parties)
        self.by_id = {p.id: p for p in self.parties}
        self.keys = keys
        self.n_participants = n_participants
        # Shared with the coordinator in a simulation, so a stop is seen by sampling at once.
        self.stopped: dict[str, str] = stopped if stopped is not None else {}
        self.current_round = 0
        self.layers: list[Layer] = []
        self.privacy: PrivacyRuntime | None = None

    # ----- set-up ------------------------------------------------------------------------------
    def set_up(self) -> None:
        """Each hosted participant's models, then (with DP) its ledger and calibrated noise."""
        refusal = self.protocol.warm_start_refusal() if self.config.training.warm_start else None
        if refusal is not None:
            from securefl.protocols import ProtocolSetupError

            raise ProtocolSetupError(f"training.warm_start = true: {refusal}")
        for party in self.parties:
            with seeded(derive_seed(self.config.run.seed, "setup", party.id)):
                self.protocol.setup_party(party)
        if self.config.privacy.unit != "none":
            # One ledger per data owner for the whole run, opened here and never re-created mid-run.
            self.privacy = PrivacyRuntime.build(config=self.config, out=self.out, protocol=self.protocol,
                                                parties=self.parties, keys=self.keys)

    def attach_layers(self, layers: Sequence[Layer]) -> None:
        """The participant side of the layer stack (DP, sealing, signing, validation), in order."""
        self.layers = list(layers)

    def enter_round(self, rnd: int) -> None:
        """Round ``rnd`` begins (or, on resume, is where the hosted participants stand): what the ledgers book
        from now on is booked under it."""
        self.current_round = rnd
        if self.privacy is not None:
            self.privacy.enter_round(rnd)

    def sampled_per_round(self) -> int:
        return sampled_per_round(self.config, self.n_participants)

    # ----- the participant half of a round ------------------------------------------------------
    def prepare(self) -> HostReport:
        """Round 0: each participant's local preparation (e.g. FedMD's transfer learning)."""
        report = HostReport()
        for party in self.parties:
            with seeded(derive_seed(self.config.run.seed, "prepare", party.id)), self._budget_guard(party.id, report):
                self.protocol.prepare_party(party)
                if self.protocol.warm_starts():
                    self.protocol.warm_start(party)
        return report

    def step(self, rnd: int, inboxes: Mapping[str, Sequence[Message]]) -> HostReport:
        """``client_step`` of every hosted participant in ``inboxes``; sealed replies in ``outgoing``."""
        self.enter_round(rnd)
        report = HostReport()
        for pid, inbox in inboxes.items():
            party = self.by_id[pid]
            opened = self._open(party, inbox, report)
            with seeded(derive_seed(self.config.run.seed, "client_step", rnd, pid)), self._budget_guard(pid, report):
                sealed = []
                for reply in as_list(self.protocol.client_step(party, opened, rnd)):
                    # Messages to the aggregator are checked against the declared uplink; peer-to-peer
                    # messages (decentralised protocols) go straight to the peer's inbox.
                    if reply.receiver == AGGREGATOR and self.protocol.uplink is not None:
                        self.protocol.uplink.check(reply)
                    try:
                        for layer in self.layers:
                            reply = layer.outbound(reply, party)
                    except Rejected as rejection:
                        # E.g. a diverged model's logits outside the CKKS range: this message is withheld
                        # and logged; any spend already booked for it stays booked (never under-count).
                        report.rejected.append({"sender": pid, "receiver": reply.receiver, "reason": rejection.reason})
                        continue
                    sealed.append(reply)
                # Only once every release of this step is booked does anything leave the participant.
                report.outgoing.extend(sealed)
        return report

    def update(self, rnd: int, inboxes: Mapping[str, Sequence[Message]]) -> HostReport:
        """``client_update`` of every hosted participant with a non-empty (verified, opened) inbox."""
        self.enter_round(rnd)
        report = HostReport()
        for pid, inbox in inboxes.items():
            opened = self._open(self.by_id[pid], inbox, report)
            if opened and pid not in self.stopped:
                with seeded(derive_seed(self.config.run.seed, "client_update", rnd, pid)), \
                        self._budget_guard(pid, report):
                    self.protocol.client_update(self.by_id[pid], opened, rnd)
        return report

    def evaluate(self, rnd: int) -> dict[str, dict[str, float]]:
        # A metric computed from private data besides the model would leave the owner unprotected under DP.
        withheld = self.protocol.owner_only_metrics if self.config.privacy.unit != "none" else frozenset()
        per_party = {}
        for party in self.parties:
            with seeded(derive_seed(self.config.run.seed, "evaluate", rnd, party.id)):
                per_party[party.id] = {k: float(v) for k, v in self.protocol.evaluate(party).items()
                                       if k not in withheld}
        return per_party

    def finish(self) -> dict[str, dict[str, Any]]:
        """Seal every hosted ledger; what the report says of each participant (records, the rate it trained at
        if its own, privacy spent). On a deployment only the node knows them: its owner may have set the rate.

        Under DP the record count is left out: an exact count is private (one record more or less changes it)
        and no ledger books it, so it never leaves the owner."""
        private = self.config.privacy.unit != "none"
        facts: dict[str, dict[str, Any]] = {
            p.id: {**({} if private else {"train_records": p.num_samples}), **({"lr": p.lr} if p.lr is not None else {})}
            for p in self.parties}
        if self.privacy is not None:
            self.privacy.seal_all()
            for p in self.parties:
                facts[p.id].update(self.privacy.summary(p.id))
        return facts

    def close(self) -> None:
        if self.privacy is not None:
            self.privacy.close_all()

    # ----- state ---------------------------------------------------------------------------------
    def ledger_heads(self) -> dict[str, tuple[int, str]]:
        """Each hosted ledger's length and head hash, for the checkpoint: the record outside the ledger
        that tells a rolled-back ledger (a valid but shorter chain) from a shorter run."""
        if self.privacy is None:
            return {}
        return {pid: (len(pp.ledger.entries), pp.ledger.head) for pid, pp in self.privacy.participants.items()}

    def check_ledger_heads(self, saved: Mapping[str, tuple[int, str]]) -> None:
        """Refuse to resume if a ledger lacks what it held at the checkpoint. It may hold more: spends are
        written ahead of the messages, so a crash mid-round leaves entries past the checkpoint."""
        from securefl.privacy.errors import LedgerMismatch

        for pid, (n, head) in saved.items():
            ledger = self.privacy.participants[pid].ledger if self.privacy is not None else None
            if ledger is None:
                continue
            entries = ledger.entries
            if len(entries) < n or entries[n - 1]["hash"] != head:
                raise LedgerMismatch(
                    f"{ledger.path}: holds {len(entries)} entries, but the checkpoint recorded {n} ending in "
                    f"{head[:16]}; the ledger was rolled back or replaced. Restore it; refusing to resume with "
                    "less spend on record than was made")

    def party_states(self) -> dict[str, Any]:
        return {p.id: self.protocol.party_state(p) for p in self.parties}

    def load_party_states(self, states: Mapping[str, Any]) -> None:
        for party in self.parties:
            self.protocol.load_party_state(party, states[party.id])

    # ----- helpers -------------------------------------------------------------------------------
    def _open(self, party: Party, inbox: Sequence[Message], report: HostReport) -> list[Message]:
        """A participant's inbox after its inbound layers (verify, then open); rejections are logged."""
        accepted = []
        for msg in inbox:
            try:
                for layer in reversed(self.layers):
                    msg = layer.inbound(msg, party)
                accepted.append(msg)
            except Rejected as rejection:
                report.rejected.append({"sender": rejection.sender, "receiver": party.id, "reason": rejection.reason})
        return accepted

    @contextlib.contextmanager
    def _budget_guard(self, party_id: str, report: HostReport) -> Iterator[None]:
        """A refused release (budget exhausted) stops that participant; the run goes on without it."""
        from securefl.privacy.errors import BudgetExceeded

        try:
            yield
        except BudgetExceeded as exc:
            reason = f"round {self.current_round}: {exc}"
            self.stopped[party_id] = reason
            report.stopped[party_id] = reason


def sampled_per_round(config: ExperimentConfig, n_participants: int) -> int:
    """How many participants a round samples: the one rule the cohort planning uses too."""
    return participants_per_round(config.run.participation, n_participants)


def as_list(messages: Message | Sequence[Message] | None) -> list[Message]:
    if messages is None:
        return []
    return [messages] if isinstance(messages, Message) else list(messages)
