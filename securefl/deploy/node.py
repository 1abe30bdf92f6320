"""A data owner's node: one participant, in its own directory, under its own policy.

The coordinator sends requests (``setup``, ``prepare``, ``step``, ``update``,
``evaluate``, ``finish``); :class:`ParticipantNode` answers each with a reply
mapping, never an exception, so a failure on a node reaches the coordinator as
a clear message. Everything the node must keep lives in ``node_dir``, which the
data owner chooses:

- ``keys/``: the participant's Ed25519 key, the CKKS committee secret and the
  roster of everyone's public keys (see :mod:`securefl.deploy.provision`);
- ``ledgers/<participant>.jsonl``: its privacy ledger, which
  ``securefl audit NODE_DIR`` verifies;
- ``checkpoints/node.pt``: its models and optimizer state after every phase,
  so a node process that restarts (or a ClientApp started afresh for every
  message) carries on where it was;
- ``replay/<participant>.replay.json``: the signed messages it has accepted, so a
  message replayed to a fresh process is refused;
- ``config.yaml``: the experiment config as the node accepted it.

Policy: the node's own policy file (``policy_file``) always applies; whatever
policy file the coordinator's config names for this participant is ignored,
and the stricter of the node's policy and the experiment's target binds. The
coordinator cannot loosen it.

Paths: a node reads only the paths its owner configured (``data_file``,
``public_file``, ``test_file``, ``data_dir``). A path the coordinator's config
names that the owner did not configure is refused at setup, naming the setting
to give: the coordinator must not make a node read (and hash, or quote in an
error) whatever file it likes. The shared public and test tables (``data.dataset
= files``) are read from the node's own paths; its setup reply carries their
SHA-256, and the coordinator refuses to start if two nodes' differ.

Errors: a request that fails gets back one line (:func:`wire_message`):
securefl's own reasons whole, any other error as its type only, since its
message may quote a file; ``errors.log`` in the node directory keeps the
traceback for the owner.

Owner approval: the node refuses, at ``setup``, a setup weaker than its owner's policy file (no DP, a
larger δ, or a secure aggregation, signing or cohort the policy requires), and, when it requires an
approval (``require_approval``, or any approval in ``approvals/``), a setup its owner has not signed with
``securefl approve``; the matching approval goes into its ledger (see :mod:`securefl.deploy.approval`).

Learning rate: an owner that sets its own (``lr``) trains at it whatever the
coordinator's config says for this participant; without one, the config's
applies. The rate decides how the owner's private records shape its model, and
under DP-SGD a rate that suits one model and budget can ruin another, so the
owner, who knows its model and budget, has the last word.
"""

from __future__ import annotations

import json
import traceback
from pathlib import Path
from typing import Any

import yaml

from securefl.config import ConfigError, ExperimentConfig, dump_config, parse_config
from securefl.core.codec import DecodeError, decode_message, encode_message
from securefl.core.message import BROADCAST
from securefl.runtime.host import HostReport, ParticipantHost

NODE_CHECKPOINT = "checkpoints/node.pt"
REPLAY_DIR = "replay"  # <participant>.replay.json: the signed messages this node has accepted (see layers/signing.py)
PHASES = ("hello", "setup", "prepare", "layer", "step", "update", "evaluate", "finish")


class NodeError(RuntimeError):
    """A request this node refuses (wrong run, unknown participant, missing keys, ...)."""


class ParticipantNode:
    """Hosts one participant for a coordinator that talks to it only through requests."""

    def __init__(self, node_dir: str | Path, participant_id: str, *, policy_file: str | Path | None = None,
                 data_dir: str | Path | None = None, data_file: str | Path | None = None,
                 public_file: str | Path | None = None, test_file: str | Path | None = None,
                 lr: float | str | None = None, require_approval: bool = False) -> None:
        self.node_dir = Path(node_dir)
        # Take part only in a setup the owner approved (securefl approve); any approval on disk implies it.
        self.require_approval = require_approval
        self.participant_id = participant_id
        self.policy_file = str(policy_file) if policy_file else None
        self.data_dir = str(data_dir) if data_dir else None
        self.data_file = str(data_file) if data_file else None
        # Where this machine keeps the shared tables (data.dataset = files), if not at the config's paths.
        self.shared_files = {k: str(v) for k, v in (("public_file", public_file), ("test_file", test_file)) if v}
        self.lr = lr  # checked with the config it overrides (participants.<i>.lr), so the error names the field
        self.host: ParticipantHost | None = None
        self.run_id: str | None = None
        self._layer_round: int | None = None
        self._last_round = 0  # the latest round this node has worked in (from its checkpoint)

    # ----- the request loop --------------------------------------------------------------------
    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        """Answer one request; errors become ``{"ok": False, "error": ...}`` with the reason."""
        try:
            phase = request.get("phase")
            if phase not in PHASES:
                raise NodeError(f"unknown request phase {phase!r}; expected one of {', '.join(PHASES)}")
            if phase == "hello":
                return {"ok": True, "participant": self.participant_id}
            if phase == "setup":
                self._setup(request)
                assert self.host is not None
                # The coordinator compares these across nodes before round 1.
                return {"ok": True, "participant": self.participant_id,
                        "shared_data": self.host.ctx.shared_data_digests()}
            if phase == "layer":
                # A layer's own conversation with the coordinator (masking's key agreement and unmasking):
                # it keeps its state itself and needs neither the data nor the models, so a fresh process
                # answers it without rebuilding the participant.
                return {"ok": True, "message": encode_message(self._answer_for_layer(request))}
            host = self._open(request)
            reply: dict[str, Any] = {"ok": True}
            if phase == "prepare":
                reply.update(_report(host.prepare()))
            elif phase == "step":
                inbox = self._refuse_replays(host, self._inbox(request))
                self._rewind_if_redone(host, int(request["round"]))
                rnd = self._enter_round(host, request)
                reply.update(_report(host.step(rnd, {self.participant_id: inbox})))
            elif phase == "update":
                inbox = self._refuse_replays(host, self._inbox(request))
                rnd = self._enter_round(host, request)
                reply.update(_report(host.update(rnd, {self.participant_id: inbox})))
            elif phase == "evaluate":
                reply["metrics"] = host.evaluate(int(request["round"]))
                return reply  # evaluation changes nothing: no checkpoint
            elif phase == "finish":
                reply["facts"] = host.finish()
                self._write_node_summary(reply["facts"])
            self._checkpoint(phase)
            if phase in ("prepare", "update"):
                self._snapshot_end_of_round(host.current_round)
            if "evaluate" in request:
                # Evaluation rides on the phase that precedes it: one message (and process) less per round.
                reply["metrics"] = host.evaluate(int(request["evaluate"]))
            if phase == "finish":
                self.close()  # the ledger is sealed; release it
            return reply
        except Exception as exc:  # noqa: BLE001 - every failure goes back to the coordinator as a reason
            # The full error stays with the owner; the coordinator gets a message that holds no file content.
            (self.node_dir / "errors.log").parent.mkdir(parents=True, exist_ok=True)
            with open(self.node_dir / "errors.log", "a") as log:
                log.write(traceback.format_exc() + "\n")
            return {"ok": False, "error": f"node {self.participant_id!r}: {wire_message(exc)}"}

    def _enter_round(self, host: ParticipantHost, request: dict[str, Any]) -> int:
        """Start the round in this process's layers once, whichever phase of it arrives first (a ClientApp
        process may be new for every message; the signing layer must know the round to accept its mail)."""
        rnd = int(request["round"])
        if self._layer_round != rnd:
            for layer in host.layers:
                layer.start_round(rnd, list(request["sampled"]))
            self._layer_round = rnd
        return rnd

    def _answer_for_layer(self, request: dict[str, Any]) -> Any:
        from securefl.layers.secure_aggregation import MaskingNodeLayer

        run_id = request.get("run_id")
        saved = self.node_dir / "run.json"
        if not saved.exists() or json.loads(saved.read_text())["run_id"] != run_id:
            raise NodeError(f"layer request for run {run_id!r}, but {self.node_dir} holds no such run")
        try:
            msg = decode_message(request["message"])
        except (DecodeError, KeyError) as exc:
            raise NodeError(f"undecodable layer request ({exc})") from None
        if msg.run_id != run_id or msg.receiver not in (self.participant_id, BROADCAST):
            raise NodeError(f"a layer request for {msg.receiver!r} in run {msg.run_id!r} reached "
                            f"{self.participant_id!r} in run {run_id!r}")
        config = parse_config(yaml.safe_load((self.node_dir / "config.yaml").read_text()), "node config.yaml")
        if config.secure_aggregation != "masking":
            raise NodeError(f"no layer on this node answers a {msg.kind!r} request (secure_aggregation is "
                            f"{config.secure_aggregation!r})")
        masking = MaskingNodeLayer.for_node(config, run_id=run_id, participant_id=self.participant_id,
                                            key_dir=self.node_dir / "keys")
        masking.start_round(int(request["round"]), list(request["sampled"]))
        return masking.answer(msg)

    def close(self) -> None:
        if self.host is not None:
            self.host.close()
            self.host = None

    # ----- set-up and state ----------------------------------------------------------------------
    def _setup(self, request: dict[str, Any]) -> None:
        run_id = str(request.get("run_id") or "")
        config = self._accept_config(request.get("config"), run_id)
        approval = self._check_owner_terms(config)
        saved = self.node_dir / "run.json"
        if saved.exists():
            previous = json.loads(saved.read_text())["run_id"]
            if previous != run_id:
                raise NodeError(f"{self.node_dir} holds run {previous!r}; refusing to start run {run_id!r} over "
                                "its ledger (give this node a fresh directory)")
        else:
            self.node_dir.mkdir(parents=True, exist_ok=True)
            (self.node_dir / "config.yaml").write_text(dump_config(config))
            saved.write_text(json.dumps({"run_id": run_id, "participant": self.participant_id}) + "\n")
        self.close()
        self._build(config, run_id)
        self._record_approval(approval)

    def accepted_config(self, text: str) -> Any:
        """``text`` with this node's own overrides applied, as :meth:`handle` would accept it at setup (what
        ``securefl approve`` shows the owner and signs)."""
        return self._accept_config(text, "approval")

    def _check_owner_terms(self, config: ExperimentConfig) -> dict[str, Any] | None:
        """Refuse a setup weaker than the owner's policy, or one the owner has not approved (one line)."""
        from securefl.deploy.approval import ApprovalError, check_setup
        from securefl.privacy.budget import PrivacyPolicy

        policy = PrivacyPolicy.from_file(self.policy_file) if self.policy_file else None
        try:
            return check_setup(config, self.participant_id, self.node_dir, policy=policy,
                               require_approval=self.require_approval)
        except ApprovalError as exc:
            raise NodeError(str(exc)) from None

    def _record_approval(self, approval: dict[str, Any] | None) -> None:
        """Write the approval the run proceeds under into the participant's ledger, once per approval."""
        from securefl.deploy.approval import ledger_record

        assert self.host is not None
        if approval is None or self.host.privacy is None:
            return
        ledger = self.host.privacy.participants[self.participant_id].ledger
        if any(e["approval_digest"] == approval["digest"] for e in ledger.approvals()):
            return
        ledger.record_approval(digest=approval["digest"], approver_key=approval["fingerprint"],
                               approved=ledger_record(approval))

    def _accept_config(self, text: Any, run_id: Any) -> Any:
        if not isinstance(text, str) or not isinstance(run_id, str) or not run_id:
            raise NodeError("setup needs the experiment config (YAML text) and a run id")
        raw = yaml.safe_load(text)
        ids = [p.get("id") for p in (raw or {}).get("participants", []) if isinstance(p, dict)]
        if self.participant_id not in ids:
            raise NodeError(f"the experiment config has no participant {self.participant_id!r} (it has {ids})")
        for index, participant in enumerate(raw["participants"]):
            if participant.get("id") == self.participant_id:
                # The data owner's policy, never the coordinator's idea of it; and its own table.
                participant["policy_file"] = self.policy_file
                self._own_path(participant, "data_file", self.data_file, f"participants.{index}.data_file",
                               "data-file")
                if self.lr is not None:
                    participant["lr"] = self.lr
        if raw.get("data") is None:
            raw["data"] = {}
        data = raw["data"]
        if not isinstance(data, dict):
            raise NodeError("the experiment config's data section is not a mapping")
        self._own_path(data, "data_dir", self.data_dir, "data.data_dir", "data-dir")
        if self.shared_files:
            if data.get("dataset") != "files":
                raise NodeError(f"this node gives its own {' and '.join(self.shared_files)}, but the experiment's "
                                f"data.dataset is {data.get('dataset')!r}, not 'files'")
            if data.get("files") is None:
                data["files"] = {}
        if isinstance(data.get("files"), dict):
            for field, setting in (("public_file", "public-file"), ("test_file", "test-file")):
                self._own_path(data["files"], field, self.shared_files.get(field), f"data.files.{field}", setting)
        return parse_config(raw, f"config sent to node {self.participant_id!r}")

    def _own_path(self, section: dict[str, Any], field: str, own: str | None, where: str, setting: str) -> None:
        """Put this node's own path at ``section[field]``. A path the coordinator names that the owner has not
        configured is refused: the node would read it, and its errors could quote what it holds (any file the
        node's user may read)."""
        if own is not None:
            section[field] = own
        elif section.get(field) not in (None, ""):
            raise NodeError(f"the experiment config names {where} = {str(section[field])[:200]!r}, but this node's "
                            f"owner configured no {setting}: a node reads only the paths in its own settings (set "
                            f"{setting} in the node's config, e.g. --node-config '{setting}=\"/path\"')")

    def _open(self, request: dict[str, Any]) -> ParticipantHost:
        run_id = request.get("run_id")
        if self.host is not None and run_id == self.run_id:
            return self.host
        saved = self.node_dir / "run.json"
        if not saved.exists():
            raise NodeError(f"request {request.get('phase')!r} before setup (no {saved})")
        if json.loads(saved.read_text())["run_id"] != run_id:
            raise NodeError(f"request for run {run_id!r}, but {self.node_dir} holds another run")
        # A fresh process (Flower may start the ClientApp for every message): rebuild from disk.
        config = parse_config(yaml.safe_load((self.node_dir / "config.yaml").read_text()), "node config.yaml")
        self._build(config, run_id)
        assert self.host is not None
        return self.host

    def _build(self, config: ExperimentConfig, run_id: str) -> None:
        from securefl.layers.signing import SigningLayer
        from securefl.runtime.builder import KeyRing, host_participants
        from securefl.runtime.checkpoint import load_checkpoint
        from securefl.runtime.federation import build_world

        # Only this participant's own data is read on its node.
        _, _, ctx, parties, protocol = build_world(config, run_id, local={self.participant_id})
        protocol.validate_participants(parties)  # also builds what the protocol derives from them (topologies)
        mine = [p for p in parties if p.id == self.participant_id]
        host = host_participants(config, run_id=run_id, out=self.node_dir, ctx=ctx, protocol=protocol,
                                 parties=parties, hosted=mine, keys=KeyRing(self.node_dir / "keys"), side="participant")
        for layer in host.layers:
            layer.check(protocol, parties)
            if isinstance(layer, SigningLayer):
                # This process may live for one message only (Flower): what the node accepted must outlive it,
                # or a captured message replayed to the next process would be taken as new.
                layer.keep_replay_state(self.node_dir / REPLAY_DIR)
        checkpoint = self.node_dir / NODE_CHECKPOINT
        if checkpoint.exists():
            state = load_checkpoint(checkpoint)
            host.check_ledger_heads(state.get("ledger_heads", {}))
            protocol.load_state_dict(state["protocol"])
            host.load_party_states(state["parties"])
            host.stopped.update(state["stopped"])
            host.enter_round(int(state["round"]))
        self.host, self.run_id, self._layer_round = host, run_id, None
        self._last_round = host.current_round

    def _checkpoint(self, phase: str) -> None:
        from securefl.runtime.checkpoint import save_atomically

        assert self.host is not None
        path = self.node_dir / NODE_CHECKPOINT
        path.parent.mkdir(parents=True, exist_ok=True)
        save_atomically({"run_id": self.run_id, "phase": phase, "round": self.host.current_round,
                         "protocol": self.host.protocol.state_dict(), "parties": self.host.party_states(),
                         "stopped": dict(self.host.stopped), "ledger_heads": self.host.ledger_heads()}, path)

    # ----- a coordinator that restarts a round ----------------------------------------------------
    SNAPSHOTS_KEPT = 3

    def _snapshot_end_of_round(self, rnd: int) -> None:
        """Keep the state at the end of round ``rnd``: a coordinator that crashed mid-round and resumes
        will send this round's step again, and the node must then start from where the round started."""
        import shutil

        snapshots = self.node_dir / "checkpoints"
        shutil.copyfile(self.node_dir / NODE_CHECKPOINT, snapshots / f"end_of_round_{rnd}.pt")
        for old in sorted(snapshots.glob("end_of_round_*.pt"), key=_snapshot_round)[:-self.SNAPSHOTS_KEPT]:
            old.unlink()

    def _rewind_if_redone(self, host: ParticipantHost, rnd: int) -> None:
        """A step of a round this node has already worked in: go back to the state it started that round
        from. Spends booked the first time stay in the ledger (a redone round is charged twice, never
        under-counted)."""
        from securefl.layers.signing import SigningLayer
        from securefl.runtime.checkpoint import load_checkpoint

        self._last_round = max(self._last_round, host.current_round)
        if self._last_round < rnd:
            return
        earlier = [p for p in (self.node_dir / "checkpoints").glob("end_of_round_*.pt") if _snapshot_round(p) < rnd]
        if not earlier:
            raise NodeError(f"round {rnd} is being redone but no snapshot of an earlier round is kept")
        state = load_checkpoint(max(earlier, key=_snapshot_round))
        host.protocol.load_state_dict(state["protocol"])
        host.load_party_states(state["parties"])
        host.stopped.clear()
        host.stopped.update(state["stopped"])
        host.enter_round(int(state["round"]))
        for layer in host.layers:
            if isinstance(layer, SigningLayer):
                layer.redo_round()  # a process that lives on accepts the round's newly signed messages

    def _refuse_replays(self, host: ParticipantHost, inbox: list[Any]) -> list[Any]:
        """Refuse a request that carries a message this node accepted before, or one older than what it accepted
        since (a captured request delivered again), before anything is rewound, trained or released: a round a
        resumed coordinator redoes brings newly signed messages."""
        from securefl.layers.signing import SigningLayer

        for layer in host.layers:
            if isinstance(layer, SigningLayer):
                for msg in inbox:
                    reason = layer.seen_before(msg, self.participant_id)
                    if reason is not None:
                        why = "was accepted before" if reason == "replay" else "is older than what this node accepted"
                        raise NodeError(f"{reason}: {msg.kind!r:.80} from {msg.sender!r:.80} for round {msg.round} "
                                        f"{why}; refusing the request")
        return inbox

    def _inbox(self, request: dict[str, Any]) -> list[Any]:
        inbox = []
        for raw in request.get("inbox", []):
            try:
                inbox.append(decode_message(raw))
            except DecodeError as exc:
                raise NodeError(f"undecodable message in the inbox ({exc})") from None
        return inbox

    def _write_node_summary(self, facts: dict[str, Any]) -> None:
        """The data owner's own record of the run, kept on its node: a summary, its ε-over-rounds plot and
        its report page (the coordinator's report has no ledger to plot from)."""
        from securefl.report import participant_report, plot_privacy
        from securefl.runtime.privacy import ledger_path

        assert self.host is not None
        config, pid = self.host.config, self.participant_id
        (self.node_dir / "node_summary.json").write_text(json.dumps(
            {"run_id": self.run_id, "participant": pid, **facts.get(pid, {})}, indent=2) + "\n")
        if "epsilon" in facts.get(pid, {}):
            plot_privacy(facts, {p: ledger_path(self.node_dir, p) for p in facts}, self.node_dir / "privacy.png")
        metrics = self.host.evaluate(self.host.current_round)[pid]
        row = {"id": pid, "model": self.host.parties[0].model_name, "final_accuracy": metrics["accuracy"],
               "stopped_early": pid in self.host.stopped, "stopped_reason": self.host.stopped.get(pid, ""),
               **facts.get(pid, {})}
        run = {"protocol": config.protocol, "dataset": config.data.dataset, "rounds": config.run.rounds,
               "seed": config.run.seed, "secure_aggregation": config.secure_aggregation}
        (self.node_dir / "report.md").write_text(participant_report(
            row, run, ledger=str(ledger_path(self.node_dir, pid)), audit_dir=self.node_dir))


def settings_from_config(config: ExperimentConfig, participant_id: str) -> dict[str, str]:
    """The path settings of an owner that keeps its files where ``config`` names them, as
    :class:`ParticipantNode` keyword arguments (one machine standing in for every owner: the isolation check,
    tests, the loopback federation): its own table, the shared tables and the data directory."""
    participant = next(p for p in config.participants if p.id == participant_id)
    files = config.data.files if config.data.dataset == "files" else None
    paths = {"data_file": participant.data_file, "data_dir": config.data.data_dir,
             "public_file": files.public_file if files else None, "test_file": files.test_file if files else None}
    return {key: str(Path(value).resolve()) for key, value in paths.items() if value}


def wire_message(exc: BaseException) -> str:
    """What the coordinator may read of an error on this node.

    securefl's own errors are composed from the request and the node's settings, never from the bytes of a
    file (the table readers name a line or column, not what it holds), and go back whole: the coordinator
    needs the reason to act on it. Any other error (a parser's, the OS's, a library's) may quote what it
    read, e.g. a line of the owner's table, so only its type leaves; ``errors.log`` in the node directory
    keeps all of it for the owner.
    """
    from securefl.crypto.keystore import KeyFileError
    from securefl.crypto.signing import ReplayStateError
    from securefl.data.datasets import DataError
    from securefl.deploy.ceremony import CeremonyError
    from securefl.layers.base import LayerSetupError
    from securefl.models.zoo import UnknownModel
    from securefl.privacy.errors import CalibrationError, LedgerCorrupt, LedgerMismatch, PolicyError
    from securefl.protocols import ProtocolSetupError
    from securefl.runtime.checkpoint import RunDirError

    if isinstance(exc, NodeError | ConfigError):
        return str(exc)
    if isinstance(exc, DataError | KeyFileError | CeremonyError | LayerSetupError | UnknownModel | ProtocolSetupError
                  | PolicyError | CalibrationError | LedgerCorrupt | LedgerMismatch | RunDirError | ReplayStateError):
        return f"{type(exc).__name__}: {exc}"
    return (f"{type(exc).__name__} (its message is not sent, as it may quote a file; the node's owner finds it "
            "in errors.log in the node directory)")


def _snapshot_round(path: Path) -> int:
    return int(path.stem.rsplit("_", 1)[1])


def _report(report: HostReport) -> dict[str, Any]:
    return {"outgoing": [encode_message(m) for m in report.outgoing], "rejected": report.rejected,
            "stopped": report.stopped}
